"""OpenAI response bodies: chat.completion / text_completion, their stream chunks, and logprobs in
each API's shape (chat: logprobs.content[]; completions: the legacy parallel lists)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from metronome.engine.sampler import Choice
from metronome.model.tokenizer import Tokenizer
from metronome.serve.jobs import ChoiceRun

Body = dict[str, Any]


@dataclass(frozen=True)
class ResponseHead:
    """What every body and chunk of one response repeats."""

    id: str
    created: int
    model: str
    system_fingerprint: str


class ResponseShape:
    """Builds the bodies of one response. `chat`: chat completions, else legacy text completions.
    `logprobs`: report them; `top_logprobs`: alternatives per token."""

    def __init__(self, head: ResponseHead, chat: bool, tokenizer: Tokenizer, logprobs: bool, top_logprobs: int) -> None:
        self.head = head
        self.chat = chat
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.top_logprobs = top_logprobs
        self._offsets: dict[int, int] = {}  # text completions: characters of token text reported per choice

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
        lp = self._logprobs(run.index, run.tokens)
        if self.chat:
            return {
                "index": run.index,
                "message": {"role": "assistant", "content": run.text},
                "logprobs": lp,
                "finish_reason": run.finish_reason,
            }
        return {"index": run.index, "text": run.text, "logprobs": lp, "finish_reason": run.finish_reason}

    # -- stream chunks ---------------------------------------------------------------------------

    def role_chunk(self, index: int) -> Body:
        """Chat streams open each choice with the assistant role."""
        body = self._start(chunk=True)
        body["choices"] = [
            {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        ]
        return body

    def delta_chunk(self, index: int, text: str, tokens: Sequence[Choice], finish_reason: str | None) -> Body:
        body = self._start(chunk=True)
        lp = self._logprobs(index, tokens) if tokens else None
        if self.chat:
            delta = {"content": text} if text or finish_reason is None else {}
            choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text, "logprobs": lp, "finish_reason": finish_reason}
        body["choices"] = [choice]
        return body

    def usage_chunk(self, usage: Body) -> Body:
        body = self._start(chunk=True)
        body["choices"] = []
        body["usage"] = usage
        return body

    # -- logprobs --------------------------------------------------------------------------------

    def _logprobs(self, index: int, tokens: Sequence[Choice]) -> Body | None:
        if not self.logprobs:
            return None
        return {"content": [self._chat_entry(c) for c in tokens]} if self.chat else self._legacy(index, tokens)

    def _entry(self, token: int, logprob: float) -> Body:
        text = self.tokenizer.token_text(token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    def _chat_entry(self, c: Choice) -> Body:
        entry = self._entry(c.token, c.logprob)
        entry["top_logprobs"] = [self._entry(t, lp) for t, lp in c.top[: self.top_logprobs]]
        return entry

    def _legacy(self, index: int, tokens: Sequence[Choice]) -> Body:
        texts = [self.tokenizer.token_text(c.token) for c in tokens]
        offsets = []
        at = self._offsets.get(index, 0)
        for t in texts:
            offsets.append(at)
            at += len(t)
        self._offsets[index] = at
        return {
            "tokens": texts,
            "token_logprobs": [c.logprob for c in tokens],
            "top_logprobs": [
                {self.tokenizer.token_text(t): lp for t, lp in c.top[: self.top_logprobs]} for c in tokens
            ],
            "text_offset": offsets,
        }
