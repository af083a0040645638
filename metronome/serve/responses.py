"""OpenAI response bodies: chat.completion / text_completion, their stream chunks, and logprobs in
each API's shape (chat: logprobs.content[]; completions: the legacy parallel lists, the prompt's first
with echo)."""

from __future__ import annotations

import codecs
from dataclasses import dataclass
from typing import Any, Sequence

from metronome.engine.sampler import Choice
from metronome.model.tokenizer import Tokenizer
from metronome.serve.jobs import ChoiceRun
from metronome.serve.tools import (
    ArgumentsDelta,
    CallStarted,
    ContentDelta,
    LooseCalls,
    ToolCallParser,
    parse_tool_calls,
)

Body = dict[str, Any]


@dataclass(frozen=True)
class Prompt:
    """A prompt as echo's logprobs report it: its first token (unscored) and the rest scored."""

    first: int
    scored: Sequence[Choice]


@dataclass(frozen=True)
class ResponseHead:
    """What every body and chunk of one response repeats."""

    id: str
    created: int
    model: str
    system_fingerprint: str


class ResponseShape:
    """Builds the bodies of one response. `chat`: chat completions, else legacy text completions.
    `logprobs`: report them; `top_logprobs`: alternatives per token; `tools`: the request has tools, so the
    text is parsed into content and tool calls (serve/tools.py), whole or as it streams. `echo` (text
    completions): each prompt's text, put before its choices' text (choice i is prompt i // n's), and with
    logprobs its tokens before theirs, the first with none (nothing precedes it)."""

    def __init__(
        self,
        head: ResponseHead,
        chat: bool,
        tokenizer: Tokenizer,
        logprobs: bool,
        top_logprobs: int,
        tools: bool = False,
        loose_calls: LooseCalls | None = None,
        echo: Sequence[str] | None = None,
        n: int = 1,
    ) -> None:
        self.head = head
        self.chat = chat
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self.tools = tools
        self.loose_calls = loose_calls  # what the answer's loose calls may be (serve/tools.py, LooseCalls)
        self._parsers: dict[int, ToolCallParser] = {}  # streamed choices with tools: their text so far
        # text completions: per choice, the characters its reported tokens' bytes make so far (text_offset)
        self._offsets: dict[int, _TextOffsets] = {}
        self.echo = echo
        self.n = n
        self._echoed: set[int] = set()  # streamed choices whose prompt went out

    def _start(self, chunk: bool) -> Body:
        kind = ("chat.completion" if self.chat else "text_completion") + (".chunk" if chunk and self.chat else "")
        h = self.head
        return {
            "id": h.id,
            "object": kind,
            "created": h.created,
            "model": h.model,
            "system_fingerprint": h.system_fingerprint,
        }

    # -- whole responses -------------------------------------------------------------------------

    def whole(self, runs: Sequence[ChoiceRun], usage: Body) -> Body:
        body = self._start(chunk=False)
        body["choices"] = [self._whole_choice(r) for r in runs]
        body["usage"] = usage
        return body

    def _whole_choice(self, run: ChoiceRun) -> Body:
        lp = self._logprobs(run.index, run.tokens, self._prompt_of(run))
        if self.chat and self.tools:
            parsed = parse_tool_calls(run.text, self.loose_calls)
            calls = parsed.calls
            # no text is null, as the stream's role chunk says it (a required call cut by max_tokens was "")
            message: Body = {"role": "assistant", "content": parsed.content or None}
            if calls:
                message["tool_calls"] = [c.openai() for c in calls]
            finish = _tool_finish(run.finish_reason, bool(calls))
            return {"index": run.index, "message": message, "logprobs": lp, "finish_reason": finish}
        if self.chat:
            return {
                "index": run.index,
                "message": {"role": "assistant", "content": run.text},
                "logprobs": lp,
                "finish_reason": run.finish_reason,
            }
        text = self._echo_text(run.index) + run.text
        return {"index": run.index, "text": text, "logprobs": lp, "finish_reason": run.finish_reason}

    # -- stream chunks ---------------------------------------------------------------------------

    def role_chunk(self, index: int) -> Body:
        """Chat streams open each choice with the assistant role. With tools its content is null, as OpenAI
        sends it: an answer that is only calls then accumulates (the openai client's stream helper) to the
        whole answer's null content, not ""."""
        body = self._start(chunk=True)
        content = None if self.tools else ""
        body["choices"] = [
            {
                "index": index,
                "delta": {"role": "assistant", "content": content},
                "logprobs": None,
                "finish_reason": None,
            }
        ]
        return body

    def delta_chunk(
        self, index: int, text: str, tokens: Sequence[Choice], finish_reason: str | None, prompt: Prompt | None = None
    ) -> Body:
        body = self._start(chunk=True)
        lp = self._logprobs(index, tokens, prompt) if tokens or prompt else None
        if self.chat:
            delta = {"content": text} if text or finish_reason is None else {}
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}
        body["choices"] = [choice]
        return body

    def delta_chunks(
        self, run: ChoiceRun, text: str, tokens: Sequence[Choice], finish_reason: str | None
    ) -> list[Body]:
        """The chunks one engine event of `run` makes (none when it carries nothing to say). With echo, the
        choice's first chunk starts with its prompt (and the prompt's logprobs). With tools, text goes
        through the choice's ToolCallParser: content deltas until a call starts, then `tool_calls` deltas
        (the call's index, id, type and name with empty arguments, then the arguments in pieces), and the
        last chunk's finish_reason is "tool_calls" when calls were made."""
        index = run.index
        if self.echo is not None and index not in self._echoed and (text or tokens or finish_reason is not None):
            self._echoed.add(index)  # the first event with an outcome (a cancel before it echoes nothing)
            return [self.delta_chunk(index, self._echo_text(index) + text, tokens, finish_reason, self._prompt_of(run))]
        if not (self.chat and self.tools):
            return [self.delta_chunk(index, text, tokens, finish_reason)] if text or tokens or finish_reason else []
        parser = self._parsers.setdefault(index, ToolCallParser(self.loose_calls))
        events = parser.feed(text) + (parser.close() if finish_reason is not None else [])
        deltas: list[Body] = []
        for event in events:
            if isinstance(event, ContentDelta):
                if deltas and "content" in deltas[-1]:
                    deltas[-1]["content"] += event.text
                else:
                    deltas.append({"content": event.text})
            elif isinstance(event, CallStarted):
                c = event.call
                call = {"index": c.index, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}
                deltas.append({"tool_calls": [call]})
            elif isinstance(event, ArgumentsDelta):
                deltas.append({"tool_calls": [{"index": event.index, "function": {"arguments": event.text}}]})
        if not deltas and (tokens and self.logprobs):
            deltas.append({})
        chunks = []
        for i, delta in enumerate(deltas):
            lp = self._logprobs(index, tokens) if i == 0 and tokens else None
            chunks.append(self._chunk(index, delta, lp, None))
        if finish_reason is not None:
            chunks.append(self._chunk(index, {}, None, _tool_finish(finish_reason, bool(parser.calls))))
        return chunks

    def _chunk(self, index: int, delta: Body, logprobs: Body | None, finish_reason: str | None) -> Body:
        body = self._start(chunk=True)
        body["choices"] = [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}]
        return body

    def usage_chunk(self, usage: Body) -> Body:
        body = self._start(chunk=True)
        body["choices"] = []
        body["usage"] = usage
        return body

    # -- logprobs --------------------------------------------------------------------------------

    def _logprobs(self, index: int, tokens: Sequence[Choice], prompt: Prompt | None = None) -> Body | None:
        if not self.logprobs:
            return None
        return {"content": [self._chat_entry(c) for c in tokens]} if self.chat else self._legacy(index, tokens, prompt)

    def _echo_text(self, index: int) -> str:
        return self.echo[index // self.n] if self.echo is not None else ""

    def _prompt_of(self, run: ChoiceRun) -> Prompt | None:
        """With echo and logprobs: the prompt's first token and the scored rest, for the legacy lists."""
        return (
            Prompt(run.request.prompt_ids[0], run.prompt_choices) if self.echo is not None and self.logprobs else None
        )

    def _chat_entry(self, c: Choice) -> Body:
        return token_logprob(self.tokenizer, c, self.top_logprobs)

    def _legacy_token(self, token: int, raw: bytes) -> str:
        """A token as the legacy lists name it: its text, or for a token holding part of a character (whose
        text is U+FFFD) its bytes `raw` as OpenAI writes them, "bytes:\\xe6\\x97", so that no two
        alternatives of top_logprobs (a dict keyed by these) fall on one key."""
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
        return self.tokenizer.token_text(token)

    def _legacy(self, index: int, tokens: Sequence[Choice], prompt: Prompt | None = None) -> Body:
        # echo: the prompt's tokens first; nothing scores the first
        scored = list(prompt.scored) if prompt is not None else []
        choices = [*scored, *tokens]
        ids = ([prompt.first] if prompt is not None else []) + [c.token for c in choices]
        logprobs: list[float | None] = ([None] if prompt is not None else []) + [c.logprob for c in choices]
        tok = self.tokenizer

        def name(t: int) -> str:
            return self._legacy_token(t, tok.token_bytes(t))

        tops: list[Body | None] = ([None] if prompt is not None else []) + [
            {name(t): lp for t, lp in c.top[: self.top_logprobs]} for c in choices
        ]
        raws = [tok.token_bytes(t) for t in ids]
        counter = self._offsets.setdefault(index, _TextOffsets())
        return {
            "tokens": [self._legacy_token(t, raw) for t, raw in zip(ids, raws)],
            "token_logprobs": logprobs,
            "top_logprobs": tops,
            "text_offset": [counter.add(raw) for raw in raws],
        }


def _tool_finish(finish_reason: str | None, called: bool) -> str | None:
    """OpenAI's finish reason of an answer with tools: "tool_calls" when it ended by making calls."""
    return "tool_calls" if called and finish_reason == "stop" else finish_reason


def _entry(tokenizer: Tokenizer, token: int, logprob: float | None) -> Body:
    return {"token": tokenizer.token_text(token), "logprob": logprob, "bytes": list(tokenizer.token_bytes(token))}


def token_logprob(tokenizer: Tokenizer, c: Choice, top_logprobs: int) -> Body:
    """One sampled token's logprob entry as chat completions and the Responses API both write it: its text,
    log-probability and bytes, and its `top_logprobs` best alternatives."""
    entry = _entry(tokenizer, c.token, c.logprob)
    entry["top_logprobs"] = [_entry(tokenizer, t, lp) for t, lp in c.top[:top_logprobs]]
    return entry


class _TextOffsets:
    """Where each token starts in the text (legacy completions' text_offset): the characters its bytes and
    those before it decode to. A token with part of a multi-byte character starts at that character, and
    the token with its rest too; counting each token's own text (U+FFFD for a part) drifted past the text."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._chars = 0

    def add(self, token_bytes: bytes) -> int:
        """The offset of a token whose bytes are `token_bytes`, the next one of the text."""
        at = self._chars
        self._chars += len(self._decoder.decode(token_bytes))
        return at
