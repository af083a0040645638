"""OpenAI's Responses API, `POST /v1/responses`: the subset the OpenAI Agents SDK uses by default.

A Responses request is served as the chat completion it is equivalent to: `instructions` and the input
items become chat messages (a `function_call` item an assistant `tool_calls` entry, a
`function_call_output` a `tool` message), function tools the chat request's tools, `text.format` its
`response_format`, `max_output_tokens` its `max_completion_tokens`. So the chat pipeline's prompt
rendering, tool grammar and tool-call parsing (serve/tools.py) and structured outputs
(engine/grammar.py) serve both APIs, with the same determinism. What comes back is shaped here: output
items (an assistant `message` with one `output_text` part, and one `function_call` item per tool call),
the `response` object, and the stream's typed events, each with its `sequence_number`.

Nothing is stored: a request carries its whole history (as the Agents SDK sends it by default), and
`previous_response_id` is refused with a 400 naming it.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError

from metronome.engine.sampler import Choice
from metronome.serve.errors import ApiError
from metronome.serve.jobs import Job
from metronome.serve.responses import token_logprob
from metronome.serve.responses_schemas import (
    LOGPROBS,
    FunctionCall,
    FunctionCallOutput,
    InputMessage,
    ResponsesBody,
    body_error,
)
from metronome.serve.schemas import ChatBody, error_message, error_param
from metronome.serve.tools import ArgumentsDelta, CallStarted, ContentDelta, LooseCalls, ToolCallParser, ToolEvent

if TYPE_CHECKING:
    from metronome.serve.server import ServerState

RESPONSES = "/v1/responses"

Body = dict[str, Any]

# refused parameters: what they need that this server does not have
_REFUSED = {
    "previous_response_id": "responses are not stored here: send the whole history in input (the Agents SDK "
    "does so by default)",
    "conversation": "conversations are not stored here: send the whole history in input",
    "background": "background responses are not supported: send the request and wait for it (or stream it)",
    "prompt": "stored prompt templates are not supported: send instructions and input",
}


def refusal(body: ResponsesBody) -> ApiError | None:
    """The 400 for a parameter this server cannot honour, or None."""
    for name, why in _REFUSED.items():
        value = getattr(body, name)
        if value not in (None, False):
            return ApiError(400, f"{name}: {why}", param=name)
    if body.logprobs and body.tools:
        # the text is parsed into a message and calls, and its tokens' logprobs would not line up with
        # the message's text
        name = "include" if LOGPROBS in body.include else "top_logprobs"
        return ApiError(
            400,
            f"{name}: logprobs are not supported with tools here: ask for them without tools, or use chat "
            "completions, whose logprobs cover every token with tools too",
            param=name,
        )
    return None


# -- in: a Responses body as the chat completion it is --------------------------------------------------


def chat_messages(body: ResponsesBody) -> list[Body]:
    """`instructions` and the input items as OpenAI chat messages: consecutive function_call items (with
    the assistant text just before them) become one assistant message with tool_calls."""
    messages: list[Body] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        messages.append({"role": "user", "content": body.input})
        return messages
    for item in body.input:
        if isinstance(item, InputMessage):
            messages.append({"role": item.role, "content": item.text})
        elif isinstance(item, FunctionCall):
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif isinstance(item, FunctionCallOutput):
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": item.text})
    return messages


def chat_request(body: ResponsesBody) -> Body:
    """The chat-completions body equivalent to `body` (without stream: the answer is shaped here)."""
    chat: Body = {
        "messages": chat_messages(body),
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_completion_tokens": body.max_output_tokens,
        "seed": body.seed,
    }
    if body.tools:
        chat["tools"] = [
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters if t.parameters is not None else {"type": "object", "properties": {}},
                    "strict": t.strict,
                },
            }
            for t in body.tools
        ]
    choice = body.tool_choice  # checked against the tools by serve/tools.py
    chat["tool_choice"] = choice if isinstance(choice, str) else {"type": "function", "function": {"name": choice.name}}
    chat["parallel_tool_calls"] = body.parallel_tool_calls
    fmt = body.text.format if body.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        schema = {"name": fmt.name or "output", "schema": fmt.schema_, "strict": bool(fmt.strict)}
        if fmt.description is not None:
            schema["description"] = fmt.description
        chat["response_format"] = {"type": "json_schema", "json_schema": schema}
    return {k: v for k, v in chat.items() if v is not None}


# chat-completions parameter names -> the Responses parameters the client sent (errors name the latter).
# The chat messages are not the input items one to one (instructions, merged calls), so a message's error
# names `input`.
_RENAMES = (
    (re.compile(r"\bmessages\[\d+\][\w.\[\]]*"), "input"),
    (re.compile(r"\bmessages\b"), "input"),
    (re.compile(r"\btools\[(\d+)\]\.function\b"), r"tools[\1]"),
    (re.compile(r"\btool_choice\.function\b"), "tool_choice"),
    (re.compile(r"\bmax_completion_tokens\b|\bmax_tokens\b"), "max_output_tokens"),
    (re.compile(r"\bresponse_format\.json_schema\b"), "text.format"),
    (re.compile(r"\bresponse_format\b"), "text.format"),
)


def renamed(exc: ApiError) -> ApiError:
    """A chat-pipeline error with the Responses parameter names."""
    param, message = exc.param, exc.message
    for pattern, name in _RENAMES:
        message = pattern.sub(name, message)
        param = pattern.sub(name, param) if param is not None else None
    return ApiError(exc.status, message, param, exc.type, exc.code, exc.headers)


def as_chat(body: ResponsesBody) -> ChatBody:
    """The equivalent ChatBody; a part the chat API cannot take is a 400 naming the Responses parameter."""
    try:
        return ChatBody.model_validate_json(json.dumps(chat_request(body)))
    except ValidationError as exc:
        raise renamed(ApiError(400, error_message(exc), param=error_param(exc))) from None


# -- out: output items, the response object, stream events -------------------------------------------


def _id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _text_part(text: str, logprobs: list[Body] | None = None) -> Body:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _status(finish_reason: str | None) -> str:
    """The response's status from how its generation ended ("tool_calls" and "stop" are both done)."""
    return {"length": "incomplete", "error": "failed", "cancelled": "cancelled"}.get(finish_reason or "", "completed")


@dataclass
class Output:
    """The output items of one generation, built as its text arrives, in the order it was written: an
    assistant message for the text before any call, one function_call item per call, and a message after
    them for text that follows loose calls (Qwen2.5-Coder's own shape: the call, then a word on it). Each
    event it takes becomes the stream's events, with their output and content indexes; `items()` is the
    whole output."""

    tools: bool  # parse the text into content and calls (serve/tools.py), else it is all content
    loose_calls: LooseCalls | None = None  # what the answer's loose calls may be (serve/tools.py)
    items_done: list[Body] = field(default_factory=list)
    text: str = ""
    logprobs: list[Body] = field(default_factory=list)  # the text's tokens' entries (asked for only without tools)
    _unsent: list[Body] = field(default_factory=list)  # entries no text delta has carried yet (text held back)
    message_id: str = field(default_factory=lambda: _id("msg"))
    _parser: ToolCallParser = field(init=False)
    _open: str | None = None  # the item being written: "message", "call", or none
    _call: Body | None = None

    def __post_init__(self) -> None:
        self._parser = ToolCallParser(self.loose_calls)

    def message(self, status: str, text: str) -> Body:
        content = [_text_part(text, self.logprobs)] if status != "in_progress" else []
        return {"id": self.message_id, "type": "message", "role": "assistant", "status": status, "content": content}

    def feed(self, text: str, event: EventWriter, logprobs: list[Body] | None = None) -> list[str]:
        """The events `text` (the next piece of the generation, with its tokens' logprob entries when they
        were asked for) makes certain. A token whose text is held back (a possible stop string) has its
        entry sent with the next text delta, and every entry is in the text's done event."""
        self.logprobs += logprobs or []
        self._unsent += logprobs or []
        if not self.tools:
            return self._content(text, event) if text else []
        out: list[str] = []
        for e in self._parser.feed(text):
            out += self._event(e, event)
        return out

    def close(self, status: str, event: EventWriter) -> list[str]:
        """The end of the generation: what was held back, then every open item closed; an answer with
        neither text nor calls is one empty message."""
        out: list[str] = []
        if self.tools:
            for e in self._parser.close():
                out += self._event(e, event)
        if self._open is None and not self.items_done:
            out += self._open_message(event)
        out += self._close_item(event, "incomplete" if status == "incomplete" else "completed")
        return out

    def items(self) -> list[Body]:
        return self.items_done

    def _event(self, e: ToolEvent, event: EventWriter) -> list[str]:
        if isinstance(e, ContentDelta):
            return self._content(e.text, event)
        if isinstance(e, CallStarted):
            out = self._close_item(event, "completed")
            self._call = {
                "id": _id("fc"),
                "type": "function_call",
                "status": "in_progress",
                "call_id": e.call.id,
                "name": e.call.name,
                "arguments": "",
            }
            self._open = "call"
            return out + [event("response.output_item.added", output_index=self._index, item=dict(self._call))]
        if isinstance(e, ArgumentsDelta) and self._call is not None:
            # the parser reports a call once it is complete (start, then all its arguments), so its
            # item is done with them
            self._call["arguments"] += e.text
            delta = event("response.function_call_arguments.delta", **self._where(self._call), delta=e.text)
            return [delta] + self._close_item(event, "completed")
        return []  # a repeated call, dropped by the parser (tools.py)

    @property
    def _index(self) -> int:
        return len(self.items_done)

    def _where(self, item: Body) -> Body:
        return {"item_id": item["id"], "output_index": self._index}

    def _content(self, text: str, event: EventWriter) -> list[str]:
        out = self._open_message(event) if self._open is None else []
        self.text += text
        where = {"item_id": self.message_id, "output_index": self._index, "content_index": 0}
        sent, self._unsent = self._unsent, []
        return out + [event("response.output_text.delta", **where, delta=text, logprobs=sent)]

    def _open_message(self, event: EventWriter) -> list[str]:
        self._open = "message"
        where = {"item_id": self.message_id, "output_index": self._index}
        return [
            event("response.output_item.added", output_index=self._index, item=self.message("in_progress", "")),
            event("response.content_part.added", **where, content_index=0, part=_text_part("")),
        ]

    def _close_item(self, event: EventWriter, status: str) -> list[str]:
        out: list[str] = []
        if self._open == "message":
            where = {"item_id": self.message_id, "output_index": self._index, "content_index": 0}
            item = self.message(status, self.text)
            out += [
                event("response.output_text.done", **where, text=self.text, logprobs=self.logprobs),
                event("response.content_part.done", **where, part=_text_part(self.text, self.logprobs)),
                event("response.output_item.done", output_index=self._index, item=item),
            ]
        elif self._open == "call" and self._call is not None:
            item = {**self._call, "status": status}
            done = {**self._where(item), "name": item["name"], "arguments": item["arguments"]}
            out += [
                event("response.function_call_arguments.done", **done),
                event("response.output_item.done", output_index=self._index, item=item),
            ]
        else:
            return out
        self.items_done.append(item)
        self._open, self._call = None, None
        return out


class EventWriter:
    """Server-sent events of one response, numbered in order (a whole answer is built through the same
    Output with a writer whose events nobody reads)."""

    def __init__(self) -> None:
        self.sequence = 0

    def __call__(self, kind: str, **fields: Any) -> str:
        event = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: {json.dumps(event, ensure_ascii=False)}\n\n"


class ResponseShape:
    """The `response` object of one request, at each stage of its life."""

    def __init__(self, body: ResponsesBody, model: str) -> None:
        self.body = body
        self.model = model
        self.id = _id("resp")
        self.created_at = int(time.time())

    def response(self, status: str, output: list[Body], usage: Body | None = None, error: Body | None = None) -> Body:
        b = self.body
        choice = b.tool_choice if isinstance(b.tool_choice, str) else b.tool_choice.model_dump()
        fmt = {"type": "text"} if b.text is None or b.text.format is None else b.text.format.model_dump(by_alias=True)
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions,
            "max_output_tokens": b.max_output_tokens,
            "max_tool_calls": b.max_tool_calls,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": b.parallel_tool_calls,
            "previous_response_id": None,
            "reasoning": None,
            "store": False,
            "temperature": b.temperature,
            "text": {"format": {k: v for k, v in fmt.items() if v is not None}},
            "tool_choice": choice,
            "tools": [t.model_dump() for t in b.tools],
            "top_logprobs": b.top_logprobs,
            "top_p": b.top_p,
            "truncation": b.truncation,
            "usage": usage,
            "user": b.user,
            "metadata": b.metadata,
        }


def responses_usage(chat_usage: Body) -> Body:
    """Chat usage (prompt/completion tokens, cached tokens, Groq-style timings) in the Responses shape;
    the timings ride along as in chat completions."""
    details = chat_usage.get("prompt_tokens_details") or {}
    counts = ("prompt_tokens", "completion_tokens", "total_tokens", "prompt_tokens_details")
    return {
        "input_tokens": chat_usage["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": details.get("cached_tokens", 0)},
        "output_tokens": chat_usage["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": chat_usage["total_tokens"],
        **{k: v for k, v in chat_usage.items() if k not in counts},
    }


# -- serving -------------------------------------------------------------------------------------------


def add_responses_routes(app: FastAPI, state: ServerState) -> None:
    # server.py owns the chat pipeline these requests run through, and calls this once it is defined
    from metronome.serve import server as chat

    @app.post(RESPONSES)
    async def responses(request: Request) -> Response:
        with chat._accounted(state.metrics, RESPONSES) as account:
            served = state.require()
            raw = await chat._read_body(request, state.settings.max_body_bytes)
            # megabytes validate for seconds: off the loop, as the chat route does, so other streams go on
            off_loop = len(raw) > chat.PARSE_ON_LOOP_BYTES
            body = await asyncio.to_thread(_parse, raw) if off_loop else _parse(raw)
            chat._check_model(body, served, state.settings.model_alias)
            refused = refusal(body)
            if refused is not None:
                raise refused
            chat_body = await asyncio.to_thread(as_chat, body) if off_loop else as_chat(body)
            try:
                prompt = await asyncio.to_thread(chat._chat_request, chat_body, served)
                top = body.top_logprobs or 0
                params = chat._sampling(chat_body, [prompt.ids], served, "messages", body.logprobs, top)
                job = chat._submit(state, served, prompt.job_spec(params, 1), account)  # as the chat route's
            except ApiError as exc:
                raise renamed(exc) from None
            shape = ResponseShape(body, served.identity.id)
            out = Output(tools=prompt.tools is not None, loose_calls=prompt.loose_calls)
            tokenizer = served.engine.tokenizer

            def entries(tokens: list[Choice]) -> list[Body]:
                return [token_logprob(tokenizer, c, top) for c in tokens] if body.logprobs else []

            if body.stream:
                return StreamingResponse(
                    _stream(request, state, job, shape, out, entries),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
                )
            await chat._run_whole(request, state, job)
            run, quiet = job.runs[0], EventWriter()
            status = _status(run.finish_reason)
            out.feed(run.text, quiet, entries(run.tokens))
            out.close(status, quiet)
            return JSONResponse(shape.response(status, out.items(), responses_usage(job.usage())))


def _parse(raw: bytes) -> ResponsesBody:
    try:
        return ResponsesBody.model_validate_json(raw)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {exc.errors()[0]['msg']}") from None
        message, param = body_error(exc)
        raise ApiError(400, message, param=param) from None


async def _stream(
    request: Request,
    state: ServerState,
    job: Job,
    shape: ResponseShape,
    out: Output,
    entries: Callable[[list[Choice]], list[Body]],
) -> AsyncIterator[str]:
    """The typed events of one response; a client that goes away cancels the generation."""
    from metronome.serve import server as chat

    event = EventWriter()
    watcher = chat._watch(request, job)
    finish: str | None = None
    try:
        yield event("response.created", response=shape.response("in_progress", []))
        yield event("response.in_progress", response=shape.response("in_progress", []))
        async for _run, delta, tokens in job.deltas():
            if delta.finish_reason == "error":
                failure = chat._failure(delta)
                error = {"code": failure.code or "server_error", "message": failure.message}
                yield event("response.failed", response=shape.response("failed", out.items(), None, error))
                return
            for line in out.feed(delta.text, event, entries(tokens)):
                yield line
            finish = delta.finish_reason or finish
        if finish == "cancelled":
            return
        status = _status(finish)
        for line in out.close(status, event):
            yield line
        final = shape.response(status, out.items(), responses_usage(job.usage()))
        yield event(f"response.{status}", response=final)
    finally:
        watcher.cancel()
        state.release(job)
