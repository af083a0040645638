"""Constrained decoding through llguidance: a grammar (a JSON schema, any JSON object, a Lark grammar) is
compiled against the model's tokenizer once, and each constrained request holds a matcher that tells the
engine which tokens may come next.

Why llguidance: it is a maintained grammar engine (vLLM and SGLang use it) that computes a token mask
from a lexer over the vocabulary's byte trie, in well under a millisecond per step for JSON schemas on our
vocabularies (docs/structured-outputs.md), where our earlier hand-written JSON automaton walked candidate
tokens in Python. It supports JSON Schema (with a documented list of unsupported keywords, which it
reports, and which we turn into a 400) and Lark with embedded `%json{...}` schemas (tool calls use that).

Shapes: `Grammars` (one per served tokenizer: building llguidance's tokenizer view takes ~0.3 s for
SmolLM2's 49k vocabulary) turns what a request asks for into a checked `Grammar`;
`Grammars.constraint(grammar)` gives each choice its `GrammarConstraint` (engine/request.py's
`Constraint` protocol: allowed / accept / finished), whose next mask is computed on the `Grammars`'
mask thread while the engine runs the step. Schemas llguidance would only partly enforce are refused.
"""

from __future__ import annotations

import json
import threading
from concurrent.futures import CancelledError, Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import llguidance
import numpy as np
import torch

from metronome.engine.request import ConstraintError
from metronome.model.tokenizer import Tokenizer


class GrammarError(ValueError):
    """A schema or grammar llguidance cannot use; `param` names the request field it came from."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Grammar:
    """A grammar checked against the tokenizer, in llguidance's serialized form."""

    text: str
    what: str  # how errors and logs name it: "json_schema 'person'", "json_object", "tools"


# The longest wait for a mask from the mask thread. llguidance bounds each mask's work itself (its parser
# and lexer limits), so this only guards against a thread that is gone; a mask takes microseconds.
MASK_WAIT_S = 30.0
STARTED_KEPT = 256

# JSON as a model writes it: compact separators with optional single spaces, never a run of whitespace
# (a small model can loop on whitespace, which JSON allows anywhere between tokens).
JSON_OPTIONS: dict[str, Any] = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


# llguidance reads a schema's numbers as float64: a larger integer in const, enum or a bound became its
# nearest double (2**53 + 1 became 2**53), and the grammar then held answers to a value the schema forbids
EXACT_INT = 2**53
_NUMBER_KEYWORDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")


def _inexact_number(schema: Any) -> int | None:
    """An integer past ±2**53 among the values a schema compares answers with (const, enum, bounds)."""

    def big(value: Any) -> int | None:  # in a const or enum value, however nested
        if isinstance(value, int) and not isinstance(value, bool):
            return value if abs(value) > EXACT_INT else None
        items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        return next((found for item in items if (found := big(item)) is not None), None)

    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        for key, value in node.items():
            if key in ("const", "enum") or (key in _NUMBER_KEYWORDS and not isinstance(value, (dict, list))):
                found = big(value)
                if found is not None:
                    return found
            elif isinstance(value, (dict, list)):
                stack.append(value)
    return None


class Grammars:
    """Grammars for one tokenizer, and matchers over them."""

    def __init__(self, tokenizer: Tokenizer, mask_thread: bool = True) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = tokenizer.vocab_size
        self.ll = llguidance.LLTokenizer(
            tokenizer.tokenizer_json(), n_vocab=tokenizer.vocab_size, eos_token=list(tokenizer.eos_ids)
        )
        # one thread computes every request's next mask while the engine thread runs the step (see
        # GrammarConstraint); one is enough: a JSON mask takes tens of microseconds, a step milliseconds
        # (mask_thread False: each mask is computed when the engine asks for it, on its thread)
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="metronome-mask") if mask_thread else None
        # grammars whose first matcher started and computed a mask (_check), the latest STARTED_KEPT: an agent
        # sends the same tools and format call after call, and each would pay the trial again
        self._started: dict[str, None] = {}
        self._lock = threading.Lock()

    # -- what a request may ask for ----------------------------------------------------------------

    def json_object(self) -> Grammar:
        """Any JSON object (response_format json_object)."""
        return self._check(
            llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS),
            "json_object",
            "response_format",
        )

    def json_schema(self, schema: Any, param: str, name: str = "") -> Grammar:
        """Outputs that validate against `schema` (response_format json_schema, a tool's parameters)."""
        if not isinstance(schema, dict):
            raise GrammarError(f"{param}: a JSON schema must be an object, got {type(schema).__name__}", param)
        inexact = _inexact_number(schema)
        if inexact is not None:
            raise GrammarError(
                f"{param}: the integer {inexact} cannot be enforced exactly: the grammar compares numbers as "
                f"float64, which holds integers exactly only up to 2**53 ({EXACT_INT}); write it as a string",
                param,
            )
        try:
            text = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_OPTIONS)
        except ValueError as exc:
            raise GrammarError(f"{param}: not a usable JSON schema: {exc}", param) from None
        return self._check(text, f"json_schema {name!r}" if name else "json_schema", param)

    def lark(self, lark: str, param: str, what: str = "grammar") -> Grammar:
        """A Lark grammar (llguidance's dialect: `%json{...}` embeds a JSON schema; tool calls use it)."""
        return self._check(llguidance.LLMatcher.grammar_from_lark(lark), what, param)

    def _check(self, text: str, what: str, param: str) -> Grammar:
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(text, self.ll)
        if is_error:
            why = " ".join(messages[0].split())  # one line (a regex error draws its caret on lines of its own)
            raise GrammarError(f"{param}: the {what} cannot be used for constrained decoding: {why}", param)
        if messages:  # warnings: llguidance ignored something the schema asks for; we refuse, not guess
            raise GrammarError(
                f"{param}: the {what} uses what constrained decoding does not enforce: " + "; ".join(messages), param
            )
        grammar = Grammar(text, what)
        with self._lock:
            if text in self._started:
                return grammar
        # Some grammars pass validation and fail only when a matcher starts on them or computes its first mask
        # (a schema that refers to itself with nothing else, past llguidance's limits on items or rows): found
        # in the engine, that was a 500 "engine_error" for the client's own schema. So one matcher starts here.
        try:
            first = GrammarConstraint(llguidance.LLMatcher(self.ll, text, log_level=0), self.vocab_size, grammar, None)
            allowed = first.next_mask().any()
        except RuntimeError as exc:
            why = " ".join(str(exc).split())
            raise GrammarError(f"{param}: the {what} cannot be used for constrained decoding: {why}", param) from None
        if not allowed:
            raise GrammarError(f"{param}: the {what} allows no output at all", param)
        with self._lock:
            self._started[text] = None
            while len(self._started) > STARTED_KEPT:
                del self._started[next(iter(self._started))]  # the oldest: dicts keep their insertion order
        return grammar

    # -- per request ---------------------------------------------------------------------------------

    def constraint(self, grammar: Grammar) -> "GrammarConstraint":
        """A new matcher over `grammar`; its first mask is computed at once on the mask thread (it overlaps
        the request's prompt)."""
        matcher = llguidance.LLMatcher(self.ll, grammar.text, log_level=0)
        return GrammarConstraint(matcher, self.vocab_size, grammar, self._worker)

    def close(self) -> None:
        """Stop the mask thread (masks asked for afterwards are computed on the caller's thread)."""
        if self._worker is not None:
            self._worker.shutdown(wait=False, cancel_futures=True)


class GrammarConstraint:
    """One request's matcher: the mask of the tokens that keep its output in the grammar.

    Off the critical path: as soon as a token is accepted, the next mask is computed on the mask thread
    (llguidance drops the GIL while it works), so it runs while the engine emits, schedules and runs the
    plan's step; `next_mask` joins it, with a bound. The mask depends only on the tokens accepted, so the
    tokens are the same whichever thread computed it. Nothing touches the matcher while a mask is being
    computed: `finished` reads the state recorded when the token was accepted."""

    def __init__(
        self, matcher: llguidance.LLMatcher, vocab_size: int, grammar: Grammar, worker: ThreadPoolExecutor | None
    ) -> None:
        self.matcher = matcher
        self.vocab_size = vocab_size
        self.grammar = grammar
        self._worker = worker
        self._bits = np.empty((vocab_size + 31) // 32, dtype=np.int32)  # llguidance writes each mask here
        self._mask: torch.Tensor | None = None  # the next step's mask, once computed
        self._pending: Future[torch.Tensor] | None = None  # its computation on the mask thread
        self._stopped = matcher.is_stopped()
        self._raise_if_error()
        self._start_mask()

    def _raise_if_error(self) -> None:
        if self.matcher.is_error():
            raise ConstraintError(f"the {self.grammar.what} constraint failed: {self.matcher.get_error()}")

    def _compute(self) -> torch.Tensor:
        """The next mask, as bools (llguidance drops the GIL while it fills the bits)."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")[: self.vocab_size]
        return torch.from_numpy(bits.view(np.bool_))

    def _start_mask(self) -> None:
        if self._stopped or self._worker is None:
            return  # nothing more to choose (only the end token), or no mask thread: computed when asked
        try:
            self._pending = self._worker.submit(self._compute)
        except RuntimeError:  # the Grammars was closed: compute on the caller's thread when asked
            self._pending = None

    def next_mask(self) -> torch.Tensor:
        """Bool (vocab_size,) of the tokens allowed next (computed once per accepted token)."""
        if self._mask is None:
            pending, self._pending = self._pending, None
            if pending is None:
                mask = self._compute()
            else:
                try:
                    mask = pending.result(timeout=MASK_WAIT_S)
                except CancelledError:  # the Grammars closed before the thread took it: compute it here
                    mask = self._compute()
                except FutureTimeout:
                    raise ConstraintError(
                        f"the {self.grammar.what} mask took over {MASK_WAIT_S} s to compute; the grammar is too "
                        "complex for constrained decoding"
                    ) from None
            self._raise_if_error()
            self._mask = mask
        return self._mask

    def allowed(self, logits: torch.Tensor) -> torch.Tensor:
        """Bool mask over the logits' row (padded vocabularies: the padding is never allowed)."""
        mask = self.next_mask()
        V = logits.shape[-1]
        if V == len(mask):
            return mask
        out = torch.zeros(V, dtype=torch.bool)
        n = min(V, len(mask))
        out[:n] = mask[:n]
        return out

    def accept(self, token: int) -> None:
        if self._pending is not None:  # the matcher is the mask thread's until its mask is done
            self.next_mask()
        if not self.matcher.consume_token(token):
            why = next((line for line in self.matcher.get_error().splitlines() if line.startswith("Error:")), "")
            raise ConstraintError(f"token {token} is not allowed by the {self.grammar.what} here {why}".rstrip())
        self._mask = None
        self._stopped = self.matcher.is_stopped()
        self._start_mask()

    def finished(self) -> bool:
        """The grammar is complete and nothing more may follow (its end token was taken, or none is left)."""
        return self._stopped

    def stops_apply(self) -> bool:
        """Never: the whole output is the grammar's (a wrapper that knows free text from calls says otherwise)."""
        return False


def schema_json(schema: Any) -> str:
    """A schema as compact JSON text (for prompts that show it to the model)."""
    return json.dumps(schema, separators=(",", ":"), ensure_ascii=False)
