"""JSON-constrained decoding: a character-level automaton for prefixes of a JSON object, and a
constraint that lets a request take only tokens that keep its output such a prefix.

Guarantee: the text of the accepted tokens is always a prefix of a JSON object, and it is a complete
object by the last token of the budget. The constraint counts what closing the document would
still cost (the shortest completion, in characters: each is one single-character token, which the
vocabulary is checked to have) and refuses tokens that would leave more than the budget can pay.
Once the object is closed, only an end-of-sequence token is allowed, so the engine stops with
reason "stop" and the closing brace stays in the text.

Speed: each token's text is decoded once per vocabulary (`JsonVocabulary`); a step checks candidates
in logit order and stops at the first valid one when greedy (`width=1`) or after `width` valid ones,
so the whole vocabulary is never walked on an ordinary step.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import Iterator, NamedTuple

import numpy as np
import torch

from metronome.model.tokenizer import Tokenizer

_WHITESPACE = frozenset(" \t\n\r")
_DIGITS = frozenset("0123456789")
_HEX = frozenset("0123456789abcdefABCDEF")
_ESCAPES = frozenset('"\\/bfnrt')
_LITERALS = {"t": "rue", "f": "alse", "n": "ull"}
# Characters some shortest completion may need; each must be a token of its own.
_COMPLETION_CHARS = '{}[]":0n'
# Whitespace between tokens is free in JSON, and a model can loop on it: a run outside strings is capped.
_MAX_BLANK_RUN = 16


class Mode(IntEnum):
    START = 0  # nothing yet: whitespace, then "{"
    OBJECT_FIRST = 1  # after "{": a key or "}"
    KEY = 2  # after "," in an object: a key
    COLON = 3  # after a key
    VALUE = 4  # after ":" or "," in an array: a value
    ARRAY_FIRST = 5  # after "[": a value or "]"
    AFTER_VALUE = 6  # a value ended inside a container: "," or the closer
    STRING = 7
    ESCAPE = 8  # after a backslash in a string
    UNICODE = 9  # inside \\uXXXX
    LITERAL = 10  # inside true / false / null
    NUM_SIGN = 11  # "-"
    NUM_ZERO = 12  # "0" or "-0"
    NUM_INT = 13  # integer digits
    NUM_DOT = 14  # "."
    NUM_FRAC = 15  # fraction digits
    NUM_E = 16  # "e"
    NUM_E_SIGN = 17  # "e+" / "e-"
    NUM_EXP = 18  # exponent digits
    DONE = 19  # the object is closed


_NUMBER_DONE = frozenset({Mode.NUM_ZERO, Mode.NUM_INT, Mode.NUM_FRAC, Mode.NUM_EXP})


class State(NamedTuple):
    """Where a JSON prefix stands. Immutable, so candidates are tried without copying."""

    stack: str = ""  # open containers, innermost last: "{" or "["
    mode: Mode = Mode.START
    key: bool = False  # STRING / ESCAPE / UNICODE: this string is an object key
    rest: str = ""  # LITERAL: the letters still to come
    hex_left: int = 0  # UNICODE: hex digits still to come
    blank: int = 0  # whitespace characters in a row outside strings


def _after_value(stack: str) -> State:
    return State(stack, Mode.AFTER_VALUE)


def _close(stack: str) -> State:
    rest = stack[:-1]
    return State(rest, Mode.DONE) if not rest else _after_value(rest)


def _number_step(mode: Mode, c: str) -> Mode | None:
    digit = c in _DIGITS
    if mode == Mode.NUM_SIGN:
        return (Mode.NUM_ZERO if c == "0" else Mode.NUM_INT) if digit else None
    if mode in (Mode.NUM_ZERO, Mode.NUM_INT, Mode.NUM_FRAC):
        if digit and mode != Mode.NUM_ZERO:
            return mode
        if c == "." and mode != Mode.NUM_FRAC:
            return Mode.NUM_DOT
        return Mode.NUM_E if c in "eE" else None
    if mode == Mode.NUM_DOT:
        return Mode.NUM_FRAC if digit else None
    if mode == Mode.NUM_E:
        return Mode.NUM_E_SIGN if c in "+-" else (Mode.NUM_EXP if digit else None)
    return Mode.NUM_EXP if digit else None  # NUM_E_SIGN, NUM_EXP


def _start_value(stack: str, c: str) -> State | None:
    if c == "{":
        return State(stack + "{", Mode.OBJECT_FIRST)
    if c == "[":
        return State(stack + "[", Mode.ARRAY_FIRST)
    if c == '"':
        return State(stack, Mode.STRING)
    if c == "-":
        return State(stack, Mode.NUM_SIGN)
    if c in _DIGITS:
        return State(stack, Mode.NUM_ZERO if c == "0" else Mode.NUM_INT)
    if c in _LITERALS:
        return State(stack, Mode.LITERAL, rest=_LITERALS[c])
    return None


def step(s: State, c: str) -> State | None:
    """The state after one more character, or None if no JSON object starts with the result."""
    m = s.mode
    if m == Mode.STRING:
        if c == '"':
            return State(s.stack, Mode.COLON) if s.key else _after_value(s.stack)
        if c == "\\":
            return s._replace(mode=Mode.ESCAPE)
        return s if ord(c) >= 0x20 else None
    if m == Mode.ESCAPE:
        if c in _ESCAPES:
            return s._replace(mode=Mode.STRING)
        return s._replace(mode=Mode.UNICODE, hex_left=4) if c == "u" else None
    if m == Mode.UNICODE:
        if c not in _HEX:
            return None
        return s._replace(mode=Mode.STRING, hex_left=0) if s.hex_left == 1 else s._replace(hex_left=s.hex_left - 1)
    if m == Mode.LITERAL:
        if c != s.rest[0]:
            return None
        return _after_value(s.stack) if len(s.rest) == 1 else s._replace(rest=s.rest[1:])
    if Mode.NUM_SIGN <= m <= Mode.NUM_EXP:
        nxt = _number_step(m, c)
        if nxt is not None:
            return s._replace(mode=nxt)
        return step(_after_value(s.stack), c) if m in _NUMBER_DONE else None
    if c in _WHITESPACE:
        return s._replace(blank=s.blank + 1) if s.blank < _MAX_BLANK_RUN else None
    if s.blank:
        s = s._replace(blank=0)
    if m == Mode.START:
        return State("{", Mode.OBJECT_FIRST) if c == "{" else None
    if m in (Mode.OBJECT_FIRST, Mode.KEY):
        if c == '"':
            return State(s.stack, Mode.STRING, key=True)
        return _close(s.stack) if c == "}" and m == Mode.OBJECT_FIRST else None
    if m == Mode.COLON:
        return State(s.stack, Mode.VALUE) if c == ":" else None
    if m == Mode.ARRAY_FIRST and c == "]":
        return _close(s.stack)
    if m in (Mode.VALUE, Mode.ARRAY_FIRST):
        return _start_value(s.stack, c)
    if m == Mode.AFTER_VALUE:
        top = s.stack[-1]
        if c == ",":
            return State(s.stack, Mode.KEY if top == "{" else Mode.VALUE)
        return _close(s.stack) if c == ("}" if top == "{" else "]") else None
    return None  # DONE: nothing but whitespace may follow


def feed(s: State | None, text: str) -> State | None:
    """`step` over every character of `text` (None stays None)."""
    for c in text:
        if s is None:
            return None
        s = step(s, c)
    return s


def completion(s: State) -> str:
    """The shortest text that turns the prefix at `s` into a complete JSON object."""
    closers = "".join("}" if c == "{" else "]" for c in reversed(s.stack))
    m = s.mode
    if m == Mode.START:
        return "{}"
    if m in (Mode.STRING, Mode.ESCAPE, Mode.UNICODE):
        head = "n" if m == Mode.ESCAPE else "0" * s.hex_left
        return head + '"' + (":0" if s.key else "") + closers
    if m == Mode.LITERAL:
        return s.rest + closers
    if m in (Mode.NUM_SIGN, Mode.NUM_DOT, Mode.NUM_E, Mode.NUM_E_SIGN):
        return "0" + closers
    if m == Mode.KEY:
        return '"":0' + closers
    if m == Mode.COLON:
        return ":0" + closers
    if m == Mode.VALUE:
        return "0" + closers
    return closers  # OBJECT_FIRST, ARRAY_FIRST, AFTER_VALUE, finished numbers, DONE


@dataclass(frozen=True)
class JsonVocabulary:
    """Each token's text, decoded once per tokenizer, and what the constraint needs to close."""

    texts: tuple[str, ...]  # "" for tokens that add no text (special tokens)
    plain: tuple[bool, ...]  # the text leaves a string open and unchanged (no quote, backslash or control)
    eos_ids: tuple[int, ...]
    char_tokens: dict[str, int]  # a single-character token for each character a completion may need

    @classmethod
    def of(cls, tokenizer: Tokenizer) -> "JsonVocabulary":
        texts = tuple(tokenizer.decode([i]) for i in range(tokenizer.vocab_size))
        singles: dict[str, int] = {}
        for i, t in enumerate(texts):
            if len(t) == 1 and t in _COMPLETION_CHARS and i not in tokenizer.eos_ids:
                singles.setdefault(t, i)
        missing = [c for c in _COMPLETION_CHARS if c not in singles]
        if missing:
            raise ValueError(
                f"the tokenizer has no single-character token for {missing}; JSON mode needs one for each "
                f"to be able to close a document within its token budget"
            )
        plain = tuple(not any(c in '"\\' or ord(c) < 0x20 for c in t) for t in texts)
        return cls(texts, plain, tuple(tokenizer.eos_ids), singles)


class JsonConstraint:
    """Restricts one request's tokens to a JSON object, closed within `max_tokens` tokens.

    `width`: how many valid candidates (in logit order) stay allowed per step; 1 for greedy decoding.
    `scan`: how many candidates are checked at most before falling back to the shortest completion's
    next character."""

    min_tokens = len(completion(State()))  # the smallest budget that can hold an object: "{}"

    def __init__(
        self, vocabulary: JsonVocabulary, max_tokens: int | None = None, width: int = 64, scan: int = 4096
    ) -> None:
        if max_tokens is not None and max_tokens < self.min_tokens:
            raise ValueError(f"max_tokens={max_tokens}: a JSON object needs at least {self.min_tokens} tokens")
        if width < 1 or scan < width:
            raise ValueError(f"width={width}, scan={scan}: need 1 <= width <= scan")
        self.vocab = vocabulary
        self.max_tokens = max_tokens
        self.width = width
        self.scan = scan
        self.state = State()
        self.accepted = 0
        self.text = ""  # the JSON text accepted so far
        self._ended = False  # an end-of-sequence token was accepted after the object closed

    def allowed(self, logits: torch.Tensor) -> torch.Tensor:
        """Bool mask (V,) of the tokens this request may take next."""
        V = logits.shape[-1]
        mask = np.zeros(V, dtype=np.bool_)  # numpy: a torch fill this size can cost a thread-pool wake-up
        if self.state.mode == Mode.DONE:
            ends = [e for e in self.vocab.eos_ids if e < V]
            if ends:
                mask[ends] = True
                return torch.from_numpy(mask)
        budget = None if self.max_tokens is None else self.max_tokens - self.accepted - 1  # tokens after this one
        texts, plain, state = self.vocab.texts, self.vocab.plain, self.state
        first_ok: dict[str, bool] = {}  # most candidates are settled by their first character
        found = 0
        for t in self._candidates(logits):
            text = texts[t] if t < len(texts) else ""
            if not text:
                continue
            ok = first_ok.get(text[0])
            if ok is None:
                ok = first_ok[text[0]] = step(state, text[0]) is not None
            if not ok:
                continue
            nxt = state if state.mode == Mode.STRING and plain[t] else feed(state, text)
            if nxt is None or (budget is not None and len(completion(nxt)) > budget):
                continue
            mask[t] = True
            found += 1
            if found >= self.width:
                break
        closing = completion(self.state)
        if closing:  # the next character of the shortest completion is always allowed: closing stays possible
            mask[self.vocab.char_tokens[closing[0]]] = True
        return torch.from_numpy(mask)

    def _candidates(self, logits: torch.Tensor) -> Iterator[int]:
        """Token ids in logit order: a short head first (usually enough), then up to `scan` in all."""
        head = min(4 * self.width + 32, self.scan, logits.shape[-1])
        ranked = torch.topk(logits, head).indices.tolist()
        yield from ranked
        if head < min(self.scan, logits.shape[-1]):
            yield from torch.topk(logits, min(self.scan, logits.shape[-1])).indices.tolist()[head:]

    def accept(self, token: int) -> None:
        if self.state.mode == Mode.DONE and token in self.vocab.eos_ids:
            self._ended = True
        else:
            text = self.vocab.texts[token] if token < len(self.vocab.texts) else ""
            nxt = feed(self.state, text)
            if nxt is None:
                raise ValueError(f"token {token} ({text!r}) does not continue the JSON text {self.text!r}")
            self.state = nxt
            self.text += text
        self.accepted += 1

    def finished(self) -> bool:
        """True once the object is closed and an end token followed (or there is no end token to send)."""
        return self.state.mode == Mode.DONE and (self._ended or not self.vocab.eos_ids)

    @property
    def closed(self) -> bool:
        """The accepted text is a complete JSON object."""
        return self.state.mode == Mode.DONE
