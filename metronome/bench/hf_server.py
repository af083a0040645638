"""The plain baseline peer: an OpenAI-compatible streaming server over Hugging Face transformers.

`python -m metronome.bench.hf_server --model FILE.gguf|HF_FOLDER --port P` loads the model with
`AutoModelForCausalLM.from_pretrained` (a GGUF is dequantized by transformers) and serves
`/health`, `/v1/models`, `/v1/completions` and `/v1/chat/completions` with SSE streaming, usage
in the last chunk (`stream_options.include_usage`) and `ignore_eos`. It runs `model.generate`
one request at a time, as a plain transformers user would: no batching, concurrent requests queue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

_LOG = logging.getLogger("metronome.bench.hf_server")
_DTYPES = ("float32", "bfloat16", "float16")


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields are accepted and have no effect

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    n: int = 1
    stop: str | list[str] | None = None


class CompletionBody(_Common):
    prompt: str
    max_tokens: int = Field(16, ge=1)


class ChatMessage(BaseModel):
    role: str
    content: str


class ChatBody(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class ApiError(Exception):
    """An OpenAI-style error answer."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param = status, message, param

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": "invalid_request_error", "param": self.param}}
        return JSONResponse(body, status_code=self.status)


@dataclass(frozen=True)
class Generation:
    """One generate() call: prompt ids and sampling settings."""

    prompt_ids: tuple[int, ...]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    ignore_eos: bool


class IncrementalDecoder:
    """Text deltas from a growing list of ids; holds back an incomplete UTF-8 character."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = ""

    def push(self, ids: Sequence[int]) -> str:
        self._ids.extend(ids)
        return self._delta(hold=True)

    def flush(self) -> str:
        """At the end of the output: the text held back, as the tokenizer decodes it (an output cut inside a
        character ends in U+FFFD, as the ids say; dropping it lost that token's text, which the usage counts)."""
        return self._delta(hold=False)

    def _delta(self, hold: bool) -> str:
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if hold and text.endswith("\ufffd"):
            return ""
        delta = text[len(self._emitted) :]
        self._emitted = text
        return delta


class _Done:
    """End-of-generation marker on the token queue."""


class Backend:
    """A loaded model and tokenizer, generating on one worker thread (requests run one at a time)."""

    def __init__(self, model: Any, tokenizer: Any, model_id: str) -> None:
        self.model, self.tokenizer, self.model_id = model, tokenizer, model_id
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="generate")
        self.context_length = int(getattr(model.config, "max_position_embeddings", 0) or 0)

    def close(self) -> None:
        self._executor.shutdown(wait=True, cancel_futures=True)

    def encode_prompt(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        if not getattr(self.tokenizer, "chat_template", None):
            raise ApiError(400, f"model {self.model_id} has no chat template; use /v1/completions", "messages")
        rendered = self.tokenizer.apply_chat_template(
            [m.model_dump() for m in messages], add_generation_prompt=True, tokenize=False
        )
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def _generate(self, job: Generation, cancel: threading.Event, emit: Callable[[object], None]) -> None:
        """Runs on the worker thread; every outcome (ids, end, exception) goes to `emit`."""
        try:
            if not cancel.is_set():
                self._run_generate(job, cancel, emit)
            emit(_Done())
        except Exception as exc:  # forwarded to the waiting request, which reports it
            emit(exc)

    def _run_generate(self, job: Generation, cancel: threading.Event, emit: Callable[[object], None]) -> None:
        import torch
        from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList
        from transformers.generation import BaseStreamer

        class Streamer(BaseStreamer):
            def __init__(self) -> None:
                self.prompt_seen = False

            def put(self, value: torch.Tensor) -> None:
                if not self.prompt_seen:  # generate() first passes the prompt itself
                    self.prompt_seen = True
                    return
                emit(value.reshape(-1).tolist())

            def end(self) -> None:
                return None

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
                return torch.full((input_ids.shape[0],), cancel.is_set(), dtype=torch.bool)

        if job.seed is not None:
            torch.manual_seed(job.seed)
        eos = self.model.generation_config.eos_token_id
        pad = self.tokenizer.pad_token_id
        sampling = job.temperature > 0
        config = GenerationConfig(
            max_new_tokens=job.max_tokens,
            min_new_tokens=job.max_tokens if job.ignore_eos else 0,
            do_sample=sampling,
            temperature=job.temperature if sampling else 1.0,
            top_p=job.top_p if sampling else 1.0,
            eos_token_id=eos,
            pad_token_id=pad if pad is not None else (eos[0] if isinstance(eos, list) else eos),
        )
        input_ids = torch.tensor([job.prompt_ids], dtype=torch.long)
        with torch.inference_mode():
            self.model.generate(
                input_ids,
                attention_mask=torch.ones_like(input_ids),
                generation_config=config,
                streamer=Streamer(),
                stopping_criteria=StoppingCriteriaList([Cancelled()]),
            )

    async def stream(self, job: Generation) -> AsyncIterator[list[int]]:
        """New token ids as they are generated; raises the generation's exception if it fails."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[object] = asyncio.Queue()
        cancel = threading.Event()

        def emit(item: object) -> None:
            loop.call_soon_threadsafe(queue.put_nowait, item)

        self._executor.submit(self._generate, job, cancel, emit)
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Done):
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item  # type: ignore[misc]
        finally:
            cancel.set()  # a client that went away stops its generation at the next token


def _check_common(body: _Common) -> None:
    if body.n != 1:
        raise ApiError(400, f"n={body.n} is not supported: this baseline server makes one choice per request", "n")
    if body.stop:
        raise ApiError(400, "stop sequences are not supported by this baseline server; leave `stop` out", "stop")


def _sse(data: object) -> str:
    return f"data: {json.dumps(data)}\n\n"


class _Responder:
    """Builds OpenAI chunks and final objects for one request."""

    def __init__(self, chat: bool, model_id: str) -> None:
        self.chat, self.model_id = chat, model_id
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())

    def _envelope(self, choices: list, usage: dict | None = None) -> dict:
        kind = "chat.completion.chunk" if self.chat else "text_completion"
        body = {"id": self.id, "object": kind, "created": self.created, "model": self.model_id, "choices": choices}
        if usage is not None:
            body["usage"] = usage
        return body

    def chunk(self, text: str, finish: str | None) -> dict:
        if self.chat:
            delta = {"content": text} if text else {}
            return self._envelope([{"index": 0, "delta": delta, "finish_reason": finish}])
        return self._envelope([{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}])

    def role_chunk(self) -> dict:
        return self._envelope([{"index": 0, "delta": {"role": "assistant"}, "finish_reason": None}])

    def usage_chunk(self, usage: dict) -> dict:
        return self._envelope([], usage)

    def whole(self, text: str, finish: str, usage: dict) -> dict:
        if self.chat:
            message = {"role": "assistant", "content": text}
            body = self._envelope([{"index": 0, "message": message, "finish_reason": finish}], usage)
            body["object"] = "chat.completion"
            return body
        return self._envelope([{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}], usage)


async def _serve(backend: Backend, job: Generation, body: _Common, chat: bool) -> StreamingResponse | JSONResponse:
    responder = _Responder(chat, backend.model_id)
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def usage(generated: int) -> dict:
        prompt = len(job.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}

    if not body.stream:
        decoder, generated, text = IncrementalDecoder(backend.tokenizer), 0, ""
        try:
            async for ids in backend.stream(job):
                generated += len(ids)
                text += decoder.push(ids)
        except Exception as exc:
            _LOG.exception("generation failed")
            raise ApiError(500, f"generation failed: {type(exc).__name__}: {exc}") from exc
        text += decoder.flush()
        finish = "length" if generated >= job.max_tokens else "stop"
        return JSONResponse(responder.whole(text, finish, usage(generated)))

    async def events() -> AsyncIterator[str]:
        decoder, generated = IncrementalDecoder(backend.tokenizer), 0
        if chat:
            yield _sse(responder.role_chunk())
        try:
            async for ids in backend.stream(job):
                generated += len(ids)
                text = decoder.push(ids)
                if text:
                    yield _sse(responder.chunk(text, None))
        except Exception as exc:
            _LOG.exception("generation failed")
            yield _sse(
                {"error": {"message": f"generation failed: {type(exc).__name__}: {exc}", "type": "server_error"}}
            )
            return
        tail = decoder.flush()
        if tail:
            yield _sse(responder.chunk(tail, None))
        yield _sse(responder.chunk("", "length" if generated >= job.max_tokens else "stop"))
        if include_usage:
            yield _sse(responder.usage_chunk(usage(generated)))
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


def _job(backend: Backend, prompt_ids: list[int], max_tokens: int | None, body: _Common) -> Generation:
    room = backend.context_length - len(prompt_ids) if backend.context_length else None
    if room is not None and room < 1:
        raise ApiError(400, f"the prompt has {len(prompt_ids)} tokens; the context holds {backend.context_length}")
    wanted = max_tokens if max_tokens is not None else (room or 256)
    if room is not None and wanted > room:
        raise ApiError(
            400,
            f"max_tokens={wanted} does not fit: prompt {len(prompt_ids)} + max_tokens exceeds the "
            f"context of {backend.context_length} tokens; ask for at most {room}",
            "max_tokens",
        )
    return Generation(
        prompt_ids=tuple(prompt_ids),
        max_tokens=wanted,
        temperature=body.temperature,
        top_p=body.top_p,
        seed=body.seed,
        ignore_eos=body.ignore_eos,
    )


def build_app(backend: Backend) -> FastAPI:
    """The FastAPI app serving `backend`."""
    app = FastAPI(title="metronome bench: transformers baseline")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or None
        return ApiError(400, f"{param or 'body'}: {first.get('msg')}", param).response()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": backend.model_id, "object": "model", "owned_by": "transformers"}]}

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionBody) -> StreamingResponse | JSONResponse:
        _check_common(body)
        job = _job(backend, backend.encode_prompt(body.prompt), body.max_tokens, body)
        return await _serve(backend, job, body, chat=False)

    @app.post("/v1/chat/completions", response_model=None)
    async def chat(body: ChatBody) -> StreamingResponse | JSONResponse:
        _check_common(body)
        limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        job = _job(backend, backend.encode_chat(body.messages), limit, body)
        return await _serve(backend, job, body, chat=True)

    return app


def load_backend(path: Path, dtype: str, threads: int | None = None) -> Backend:
    """Load a GGUF file (dequantized by transformers) or an HF folder; `threads` sets torch's threads."""
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"--model {path}: give a .gguf file or a Hugging Face model folder")
        folder, extra = path.parent, {"gguf_file": path.name}
    elif path.is_dir():
        folder, extra = path, {}
    else:
        raise FileNotFoundError(f"--model {path}: no such file or folder")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if dtype not in dtypes:
        raise ValueError(f"--dtype {dtype!r}: choose one of {', '.join(dtypes)}")
    if threads is not None:
        torch.set_num_threads(threads)
    tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtypes[dtype], **extra)
    model.eval()
    return Backend(model, tokenizer, path.name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m metronome.bench.hf_server", description="OpenAI-compatible server over HF transformers"
    )
    parser.add_argument("--model", type=Path, required=True, help="a .gguf file or a Hugging Face model folder")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--dtype", default="float32", choices=_DTYPES)
    args = parser.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be at least 1 (got {args.threads})")
    try:
        backend = load_backend(args.model, args.dtype, args.threads)
    except (ValueError, FileNotFoundError) as exc:
        print(f"hf_server: {exc}", file=sys.stderr)
        return 2
    import uvicorn

    print(f"hf_server: {args.model.name} loaded ({args.dtype}); serving on http://{args.host}:{args.port}", flush=True)
    try:
        uvicorn.run(build_app(backend), host=args.host, port=args.port, log_level="warning")
    finally:
        backend.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
