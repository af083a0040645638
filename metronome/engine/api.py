"""The engine's Python API: `generate` (blocking, one prompt or many run together) and `stream` (a token
stream), over `submit` and `step`. Without `start()` the caller's thread drives the steps; with it, the
engine's own thread does and the caller waits (never without a bound: a dead engine thread is reported)."""

from __future__ import annotations

import numbers
import queue
import threading
from typing import TYPE_CHECKING, Iterator, Sequence

from metronome.config import SamplingParams
from metronome.engine.request import Completion, Delta, Request, RequestError

if TYPE_CHECKING:
    from metronome.engine.engine import Engine

WAIT_SLICE_S = 0.5  # how long a waiter sleeps before checking the engine thread is still alive

Prompt = str | list[dict] | Sequence[int]


class PythonAPI:
    """Mixed into `Engine`."""

    def encode_prompt(self: "Engine", prompt: str | list[dict], chat: bool = True) -> list[int]:
        """A string through the chat template (when the model has one and `chat`), or raw; or a message list."""
        if isinstance(prompt, (list, tuple)) and not prompt:  # the template alone would make a prompt of nothing
            raise RequestError("the prompt is empty: send text, a message list with a message, or token ids", "prompt")
        if isinstance(prompt, (list, tuple)):
            messages = []
            for i, m in enumerate(prompt):
                if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                    raise RequestError(
                        f"message {i} is not a dict with a 'role' and a 'content': {str(m)[:80]!r}", f"prompt[{i}]"
                    )
                _unicode(m, f"prompt[{i}]")
                messages.append(m | {"content": _content_text(m["content"], f"prompt[{i}].content")})
            return self.tokenizer.encode_chat(messages)
        if not isinstance(prompt, str):
            raise RequestError(
                f"a prompt is text, a list of message dicts or a list of token ids (ints), not {type(prompt).__name__}",
                "prompt",
            )
        if chat and self.tokenizer.has_chat_template:
            return self.tokenizer.encode_chat([{"role": "user", "content": _unicode(prompt, "prompt")}])
        return self.tokenizer.encode(_unicode(prompt, "prompt"))

    def stream(
        self: "Engine", prompt: Prompt, params: SamplingParams | None = None, chat: bool = True
    ) -> Iterator[Delta]:
        """Generate for one prompt, yielding a Delta per token (text may be '' while bytes are pending)."""
        self._refuse_reentry("stream")
        if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str):
            raise ValueError("stream takes one prompt (text, a message list or token ids); generate runs many")
        ids = _ids(prompt) if _is_ids(prompt) else self.encode_prompt(prompt, chat)
        events: "queue.Queue[Delta]" = queue.Queue()
        req = self.submit(ids, _params(params), events.put)
        try:
            while True:
                if not self.running and events.empty():
                    self.step()
                    continue
                try:
                    delta = events.get(timeout=WAIT_SLICE_S)
                except queue.Empty:
                    self.check_alive()
                    continue
                yield delta
                if delta.finish_reason is not None:
                    return
        finally:
            if req.finish_reason is None:
                self.cancel(req)

    def generate(
        self: "Engine", prompts: Prompt | Sequence[Prompt], params: SamplingParams | None = None, chat: bool = True
    ) -> Completion | list[Completion]:
        """Blocking generation for one prompt (returns a Completion) or many (a list, run together)."""
        self._refuse_reentry("generate")
        if isinstance(prompts, dict):  # iterated, a message's keys were two prompts ("role", "content")
            raise RequestError("a chat prompt is a list of message dicts: pass [message], not the message", "prompts")
        if not isinstance(prompts, (str, list, tuple)) and not _is_ids(prompts):
            raise RequestError(
                "prompts: text, a list of message dicts, token ids, or a list of those (to run several together), "
                f"not {type(prompts).__name__}",
                "prompts",
            )
        single = (
            isinstance(prompts, str)
            or _is_ids(prompts)
            or (isinstance(prompts, (list, tuple)) and prompts and isinstance(prompts[0], dict))
        )
        batch = [prompts] if single else list(prompts)
        if not batch:
            return []
        params = _params(params)
        if self.capacity is not None and len(batch) > self.capacity:  # it could never all be in at once
            raise RequestError(
                f"{len(batch)} prompts, but the engine holds at most {self.capacity} requests at once (slots + "
                "max_queue): pass fewer per call, or build the engine with a larger max_queue",
                "prompts",
            )
        encoded = [_ids(p) if _is_ids(p) else self.encode_prompt(p, chat) for p in batch]
        done = threading.Event()
        remaining = [len(encoded)]

        def on_event(d: Delta) -> None:
            if d.finish_reason is not None:
                remaining[0] -= 1
                if remaining[0] == 0:
                    done.set()

        reqs: list[Request] = []
        try:
            for ids in encoded:
                reqs.append(self.submit(ids, params, on_event))
            while not done.is_set():
                if self.running:
                    if not done.wait(WAIT_SLICE_S):
                        self.check_alive()
                else:
                    self.step()
        except BaseException:  # a refused prompt, a failed step, Ctrl-C: nothing of this call runs on unseen
            for r in reqs:
                if r.finish_reason is None:
                    self.cancel(r)
            raise
        out = [_completion(r) for r in reqs]
        return out[0] if single else out


def _is_ids(x) -> bool:
    """Token ids: a list or tuple of integers (numpy's and torch's integer scalars too), or a 1-D integer
    numpy array or tensor."""
    if hasattr(x, "ndim") and hasattr(x, "tolist"):  # numpy array, torch tensor
        return x.ndim == 1 and len(x) > 0 and isinstance(x.tolist()[0], int)
    return isinstance(x, (list, tuple)) and len(x) > 0 and isinstance(x[0], numbers.Integral)


def _ids(x) -> list[int]:
    return [int(t) for t in (x.tolist() if hasattr(x, "tolist") else x)]


def _params(params: SamplingParams | None) -> SamplingParams:
    if params is None:
        return SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params: a SamplingParams, e.g. SamplingParams(max_tokens=64), not {type(params).__name__}")
    return params


def _completion(r: Request) -> Completion:
    return Completion(
        r.id,
        r.text.text,
        tuple(r.output_ids),
        tuple(r.choices),
        r.finish_reason or "error",
        len(r.prompt_ids),
        r.timings,
        r.sampler.seed,
        r.cached_tokens,
        tuple(r.prompt_choices),
        r.error,
    )


def _content_text(content: object, param: str) -> str:
    """A message's content as the chat template reads it, text: OpenAI's forms of it taken as the server
    takes them (None, an assistant message that only calls tools: no text; a list of {"type": "text",
    "text": ...} parts: their texts joined). Anything else failed inside the template, naming nothing."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise RequestError(
        f"a message's content is text, None or a list of {{'type': 'text', 'text': ...}} parts, "
        f"not {str(content)[:80]!r}",
        param,
    )


def _unicode(value: object, param: str) -> object:
    """`value`, refused when a string in it holds a lone surrogate: Python's stand-in for bytes that were
    not UTF-8 (a command-line argument or a file read as-is). The tokenizer raised a TypeError after the load."""
    if isinstance(value, dict):
        for key, v in value.items():
            _unicode(v, f"{param}.{key}")
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _unicode(v, f"{param}[{i}]")
    elif isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            code = ord(value[exc.start])
            what = f"byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
            raise RequestError(
                f"{param} is not valid UTF-8: {what} at character {exc.start} (a lone surrogate); send UTF-8 text",
                param,
            ) from None
    return value
