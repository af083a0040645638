"""The OpenAI-compatible HTTP server: `create_app(engine, settings)` builds a FastAPI app around an
engine that steps on its own thread, so the event loop never waits on the model.

The app may exist before its engine: `/health` answers 503 (and the API 503) until
`app.state.server.attach(engine, identity)` makes it ready. Every error is OpenAI's
`{"error": {"message", "type", "param", "code"}}`; bad input is a 4xx, never a 500.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, replace
from importlib import resources
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import metronome
from metronome.config import ParamError, SamplingParams
from metronome.engine import Delta, Engine
from metronome.engine.grammar import Grammar, GrammarError, Grammars
from metronome.model.loader import LoadedModel
from metronome.model.registry import names as registered_names
from metronome.model.tokenizer import ChatTemplateError
from metronome.serve.audio import TRANSCRIPTIONS, TRANSLATIONS, SpeechService, add_speech_routes, speech_card
from metronome.serve.errors import (  # ApiError re-exported: callers import it from here too
    ApiError,
    busy,
    shutting_down,
)
from metronome.serve.jobs import SHUTTING_DOWN, Job, JobRefused, JobSpec, Outbox, cancel_on_disconnect
from metronome.serve.openapi import OPENAPI_PATH, openapi_schema
from metronome.serve.prometheus import CONTENT_TYPE, ApiRequest, ServerMetrics
from metronome.serve.reflect import REFLECTIONS, ReflectionRun, add_reflect_routes
from metronome.serve.responses import ResponseHead, ResponseShape
from metronome.serve.responses_api import RESPONSES, add_responses_routes
from metronome.serve.schemas import ChatBody, CompletionBody, ResponseFormat, SamplingBody, error_message, error_param
from metronome.serve.schemas import Message as ChatMessage
from metronome.serve.settings import ServerSettings
from metronome.serve.tools import (
    LooseCalls,
    ToolCalling,
    ToolError,
    closed,
    template_messages,
    tool_calling,
    tool_grammar,
)

BODY_TIMEOUT_S = 120.0  # the longest a request body may take to arrive (a JSON body is small)
PARSE_ON_LOOP_BYTES = 64 * 1024  # bodies up to this size are validated on the event loop (under a millisecond)
_PUBLIC_PATHS = frozenset({"/health", "/", OPENAPI_PATH})  # no API key: readiness, the chat page, the API's schema
_ENDPOINTS = frozenset(
    {"/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", TRANSCRIPTIONS, TRANSLATIONS}
    | {OPENAPI_PATH, RESPONSES, REFLECTIONS}
)


@dataclass(frozen=True)
class ModelIdentity:
    id: str  # the served model's id: its registered short name, else the GGUF file stem or the HF folder name
    file_hash: str  # LoadedModel.fingerprint()

    @classmethod
    def of(cls, loaded: LoadedModel, requested: str | None = None) -> "ModelIdentity":
        """`requested`: what the user named the model by (`--model`); a registered short name is the id
        clients then use, as they typed it (model/registry.py)."""
        if requested is not None and requested in registered_names():
            return cls(requested, loaded.fingerprint())
        return cls(loaded.path.name if loaded.path.is_dir() else loaded.path.stem, loaded.fingerprint())


def system_fingerprint(identity: ModelIdentity, engine: Engine) -> str:
    """Model file hash, engine version and plan settings: equal fingerprints give equal outputs for a seed.
    So it names what changes a token's bits: the weights' and the KV cache's formats, the device, the fused
    decoder or torch's ops, and the chunks a tensor-parallel plan cuts each matrix in (`--tp 2` and the plain
    plan gave the same fingerprint and different answers); slots, ctx and the decode shape besides."""
    c, report = engine.config, engine.plan.report
    ops = "rows" if engine.plan.runner.any_rows else "torch"  # the row-independent decoder, or torch's ops
    return (
        f"fp_{identity.file_hash}_v{metronome.__version__}_{engine.plan.weights}_kv-{report.kv_cache_format}"
        f"_{report.device}_{ops}_x{report.shards}_s{c.slots}_c{c.ctx}_{engine.plan.decode_mode}"
    )


@dataclass(frozen=True)
class Served:
    """A loaded engine and what the API says about it."""

    engine: Engine
    identity: ModelIdentity
    fingerprint: str
    created: int
    grammars: Grammars | None = None  # None: the tokenizer cannot be constrained by grammars (grammar_refusal says why)
    grammar_refusal: str = ""


class ServerState:
    """Everything one app owns: settings, metrics, the page, and the engine once attached."""

    def __init__(self, settings: ServerSettings, speech: SpeechService | None = None) -> None:
        self.settings = settings
        self.speech = speech  # the speech-to-text model beside the chat model (serve/audio.py), or none
        self.metrics = ServerMetrics()
        if speech is not None:
            self.metrics.bind_speech(lambda: speech.pending)
        self.page = resources.files("metronome.serve").joinpath("static/chat.html").read_text(encoding="utf-8")
        self.served: Served | None = None
        self._settling: set[asyncio.Task[None]] = set()  # strong references until each task ends
        self.jobs: set[Job] = set()  # the generation requests submitted and not yet released (event loop only)
        self.reflections: set[ReflectionRun] = set()  # those running (event loop only), ended by stop_generating too
        self.ending = asyncio.Event()  # set by stop_generating: transcriptions waiting on a worker end (serve/audio.py)
        self._outbox: Outbox | None = None  # engine events onto the serving loop (made on its first request)

    def outbox(self) -> Outbox:
        """The one Outbox of the running loop: a step's events for every request wake the loop once."""
        loop = asyncio.get_running_loop()
        if self._outbox is None or self._outbox.loop is not loop:
            self._outbox = Outbox(loop)
        return self._outbox

    def attach(self, engine: Engine, identity: ModelIdentity) -> None:
        """Make the app ready: start the engine's stepping thread and serve it."""
        try:
            grammars, grammar_refusal = Grammars(engine.tokenizer), ""
        except ValueError as exc:
            grammars, grammar_refusal = None, f"llguidance cannot read this tokenizer: {exc}"
        engine.start()
        self.metrics.bind(engine)
        self.served = Served(
            engine,
            identity,
            system_fingerprint(identity, engine),
            int(time.time()),
            grammars,
            grammar_refusal,
        )

    def detach(self) -> None:
        """The server stops: the grammar mask thread ends (the caller stops the engine)."""
        if self.served is not None and self.served.grammars is not None:
            self.served.grammars.close()

    def release(self, job: Job) -> None:
        """A job's client is done with it: cancel what still runs and count it as it ends."""
        self.jobs.discard(job)
        job.cancel_unfinished()
        if not job.done:
            task = asyncio.get_running_loop().create_task(job.settle())
            self._settling.add(task)
            task.add_done_callback(self._settling.discard)

    def stop_generating(self) -> None:
        """The server is stopping: every generation, reflection and transcription still running ends now, a
        stream with a 503 error event (and [DONE]), a whole answer with a 503, so that its connection closes
        within the shutdown's grace period (past it, uvicorn cancels the handlers: cut streams, and their
        tracebacks in the log)."""
        for job in list(self.jobs):
            job.stop(SHUTTING_DOWN)
        for run in list(self.reflections):
            run.halt(shutting_down())
        self.ending.set()

    def refuse_if_stopping(self) -> None:
        """A request that reaches its engine after stop_generating ran (a slow upload, a late handler) gets
        the same 503 as those it ended: submitted anyway, it ran until uvicorn cut it at the end of the grace
        period, a cut stream or a text/plain 500 and a traceback each."""
        if self.ending.is_set():
            raise shutting_down()

    def require(self) -> Served:
        if self.served is None:
            raise ApiError(
                503,
                "the model is still loading; retry shortly (GET /health answers 200 once ready)",
                type="service_unavailable",
                code="model_loading",
                headers={"Retry-After": str(self.settings.retry_after_s)},
            )
        return self.served


# -- middleware: API key and request counting --------------------------------------------------


class GateMiddleware:
    """Checks the API key (constant-time) and counts answered requests by endpoint and status."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key = self.state.settings.api_key
        if scope["type"] == "websocket" and key is not None and not _key_matches(scope, key):
            await send({"type": "websocket.close", "code": 1008})  # none is served; none gets past the key
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"
        counter = self.state.metrics.requests

        async def counting_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                counter.labels(endpoint, str(message["status"])).inc()
            await send(message)

        refused = _foreign(scope, self.state.settings.allowed_hosts)
        if refused is not None:
            await ApiError(403, refused, type="permission_error", code="forbidden").response()(
                scope, receive, counting_send
            )
            return
        if key is not None and path not in _PUBLIC_PATHS and not _key_matches(scope, key):
            error = ApiError(
                401,
                "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                type="authentication_error",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )
            await error.response()(scope, receive, counting_send)
            return
        await self.app(scope, receive, counting_send)


def _foreign(scope: Scope, allowed_hosts: frozenset[str] | None) -> str | None:
    """Why a request that a web page of another site sent is refused, or None. A page may post to this server
    without a preflight (a form, or text/plain) and make it generate; its Origin then differs from the Host.
    With `allowed_hosts` (a server on loopback), a Host of another name is a page that rebound its name to
    this machine, which would then read the answers. Clients that are not browsers send no Origin."""
    hosts = [value for name, value in scope["headers"] if name == b"host"]
    origins = [value for name, value in scope["headers"] if name == b"origin"]
    if len(hosts) > 1 or len(origins) > 1:  # one of each (RFC 9112): a dict kept the last, and the check read it
        return "a request may carry one Host and at most one Origin header"
    host = hosts[0].decode("latin-1") if hosts else ""
    if allowed_hosts is not None and _hostname(host) not in {_hostname(h) for h in allowed_hosts}:
        return f"the Host {host!r} is not this server's; use http://127.0.0.1 or http://localhost"
    if origins and origins[0].decode("latin-1").partition("://")[2].rstrip("/") != host:
        return "requests from another site's pages are refused; call the API from a program, or this server's page"
    return None


def _hostname(host: str) -> str:
    """The name of a Host header without its port ("[::1]:8000" -> "::1"), as names compare: in lower case
    and without a root's trailing dot (LOCALHOST and localhost. are localhost)."""
    if host.startswith("["):
        name = host[1 : host.find("]")] if "]" in host else host
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    return name.lower().rstrip(".")


def _key_matches(scope: Scope, key: str) -> bool:
    """One Authorization header, of the Bearer scheme (any case, as HTTP has schemes), holding the key.
    Two headers are refused (the last one won: a wrong key then the right one passed)."""
    given = [value for name, value in scope["headers"] if name == b"authorization"]
    if len(given) != 1:
        return False
    scheme, _, token = given[0].strip().partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), key.encode("utf-8"))


# -- request bodies --------------------------------------------------------------------------------


async def _read_body(request: Request, limit: int) -> bytes:
    """The request's body, refused past `limit` bytes (413) or past BODY_TIMEOUT_S (408: a client sending a
    byte a second held its connection and handler for as long as it liked)."""
    declared = request.headers.get("content-length", "")
    too_big = ApiError(
        413, f"the request body is larger than {limit} bytes; send a smaller request", code="request_too_large"
    )
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_big
                chunks.append(chunk)
    except TimeoutError:
        raise ApiError(
            408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s", code="request_timeout"
        ) from None
    return b"".join(chunks)


async def _parse(
    request: Request, state: ServerState, model: type[BaseModel], fields: frozenset[str] | None = None
) -> Any:
    """The body as `model`, or a 400 naming the bad parameter (`fields`: the body's parameter names, where
    they are not the chat and completions bodies')."""
    raw = await _read_body(request, state.settings.max_body_bytes)
    try:
        if len(raw) > PARSE_ON_LOOP_BYTES:  # seconds of validation for megabytes: off the loop, so the other
            # users' streams go on meanwhile (on it, a 3 MB body of 100,000 messages stalled them for 2 s)
            return await asyncio.to_thread(model.model_validate_json, raw)
        return model.model_validate_json(raw)
    except ValidationError as exc:
        if exc.errors()[0]["type"] == "json_invalid":
            raise ApiError(400, f"the request body is not valid JSON: {exc.errors()[0]['msg']}") from None
        named = {} if fields is None else {"fields": fields}
        raise ApiError(400, error_message(exc, **named), param=error_param(exc, **named)) from None


def _check_model(body: SamplingBody, served: Served, alias: str) -> None:
    if body.model is not None and body.model not in (served.identity.id, alias):
        raise ApiError(
            404,
            f"the model {body.model!r} does not exist here; this server serves "
            f"{served.identity.id!r} (also called {alias!r})",
            param="model",
            code="model_not_found",
        )


# -- turning a body into engine work ---------------------------------------------------------------


@dataclass(frozen=True)
class ChatPrompt:
    """A chat request made ready for the engine: its prompt, its tools and the grammar its output follows."""

    ids: tuple[int, ...]
    tools: ToolCalling | None  # None: no tools (the answer is plain content)
    grammar: Grammar | None  # the tool-call grammar, or else response_format's (None: free text)

    @property
    def tool_calls(self) -> bool:
        """The grammar is the tool-call grammar (a repeated call ends the answer: tools.RepeatGuard)."""
        return self.grammar is not None and self.tools is not None and self.tools.constrained

    answered: frozenset[tuple[str, str]] = frozenset()  # the history's tool calls: (name, compact arguments)
    shaped: bool = False  # the answer's text is response_format's JSON (beside tool_choice auto)

    @property
    def loose_calls(self) -> LooseCalls | None:
        """What the answer's loose calls (fenced or bare call objects, serve/tools.py) may be: none where
        the text is response_format's JSON (an object of the schema is the answer, not a call)."""
        if not self.tool_calls or self.tools is None or not self.tools.loose or self.shaped:
            return None
        return LooseCalls(self.tools.loose, self.answered, self.tools.parallel)

    def job_spec(self, params: SamplingParams, n: int) -> JobSpec:
        """What the engine runs for this prompt (the chat and Responses routes alike): its grammar and, with
        a tool grammar, what the repeat guard reads (loose calls, and whether the text is shaped)."""
        return JobSpec(
            (self.ids,),
            params,
            n,
            self.grammar,
            tool_calls=self.tool_calls,
            loose_calls=self.loose_calls,
            shaped_text=self.shaped,
        )


def _chat_request(body: ChatBody, served: Served) -> ChatPrompt:
    """The prompt through the chat template, with the request's tools rendered (serve/tools.py), and
    the grammar of the calls it allows. Bad tools, tool_choice or tool history are a 400 naming them."""
    tok = served.engine.tokenizer
    choice = body.tool_choice
    try:
        calling = tool_calling(
            [t.model_dump() for t in body.tools],
            choice.model_dump() if choice is not None and not isinstance(choice, str) else choice,
            body.parallel_tool_calls,
            served.grammars,
        )
        # response_format beside tools (an agent with tools and an output type): with auto, the answer is that
        # JSON or calls; required or named, this turn's answer is calls and the format shapes a later one
        fmt, answer = body.response_format, None
        if calling is not None and calling.constrained and fmt is not None and fmt.type != "text":
            # the schema's own refusals, naming response_format (ApiError), in every mode: a format that shapes
            # a later turn was refused only there, after an agent had run this turn's tools
            format_grammar(body, served)
            if calling.mode == "auto":
                answer = answer_schema(fmt)
        messages, tools = template_messages(
            [m.as_template_message() for m in body.messages], calling, tok.template_reads_tools
        )
        grammar = tool_grammar(calling, served.grammars, answer) if calling is not None and served.grammars else None
    except ToolError as exc:
        raise ApiError(400, str(exc), param=exc.param) from None
    try:
        ids = tuple(tok.encode_chat(messages, tools=tools))
    except ChatTemplateError as exc:
        raise ApiError(400, str(exc), param="messages") from None
    if grammar is None:
        grammar = format_grammar(body, served)
    answered = _answered(body.messages) if calling is not None and calling.mode == "auto" else frozenset()
    return ChatPrompt(ids, calling, grammar, answered, shaped=answer is not None)


def _answered(messages: Sequence[ChatMessage]) -> frozenset[tuple[str, str]]:
    """The history's tool calls as (name, compact arguments); arguments that are not JSON are left out
    (no loose call can repeat them)."""
    out = set()
    for m in messages:
        for call in m.tool_calls:
            try:
                out.add((call.function.name, LooseCalls.compact(json.loads(call.function.arguments))))
            except (json.JSONDecodeError, RecursionError):
                continue
    return frozenset(out)


def answer_schema(fmt: ResponseFormat) -> dict[str, Any]:
    """The JSON schema response_format asks of an answer (json_object: any object), closed as format_grammar
    closes it."""
    if fmt.type == "json_schema" and fmt.json_schema is not None:
        return closed(fmt.json_schema.schema_)
    return {"type": "object"}


def format_grammar(body: SamplingBody, served: Served) -> Grammar | None:
    """The grammar of response_format (None: plain text). A schema constrained decoding cannot enforce
    exactly (a bad schema, an unsupported keyword) is a 400 naming response_format.json_schema.schema."""
    fmt = body.response_format
    if fmt is None or fmt.type == "text":
        return None
    if served.grammars is None:
        raise ApiError(
            400,
            f"response_format {fmt.type} is not available for this model: {served.grammar_refusal}",
            param="response_format",
        )
    try:
        if fmt.type == "json_object":
            return served.grammars.json_object()
        if fmt.json_schema is None:
            raise ApiError(
                400,
                "response_format of type json_schema needs json_schema: {name, schema}",
                param="response_format.json_schema",
            )
        # objects closed to the properties they list, as OpenAI's strict mode has them: anything valid
        # against the closed schema is valid against the sent one, and a small model adds no stray keys
        schema = closed(fmt.json_schema.schema_)
        return served.grammars.json_schema(schema, "response_format.json_schema.schema", fmt.json_schema.name)
    except GrammarError as exc:
        raise ApiError(400, str(exc), param=exc.param or "response_format.json_schema.schema") from None


def _chat_prompt(body: ChatBody, served: Served) -> tuple[int, ...]:
    return _chat_request(body, served).ids


def _completion_prompts(body: CompletionBody, served: Served) -> list[tuple[int, ...]]:
    tok = served.engine.tokenizer
    p = body.prompt
    if isinstance(p, str):
        return [tuple(tok.encode(p))]
    if all(isinstance(x, str) for x in p):
        return [tuple(tok.encode(x)) for x in p]
    lists = [p] if all(isinstance(x, int) for x in p) else p
    vocab = served.engine.plan.cfg.vocab_size
    for i, ids in enumerate(lists):
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise ApiError(400, f"token id {bad} is outside the vocabulary [0, {vocab})", param="prompt")
        if not ids:
            raise ApiError(400, f"prompt {i} has no tokens", param="prompt")
    return [tuple(ids) for ids in lists]


def _echo_texts(body: CompletionBody, prompts: list[tuple[int, ...]], served: Served) -> list[str]:
    """What echo puts before each prompt's choices: the prompt as sent, or its token ids decoded."""
    if isinstance(body.prompt, str):
        return [body.prompt]
    if all(isinstance(x, str) for x in body.prompt):
        return list(body.prompt)
    return [served.engine.tokenizer.decode(list(ids)) for ids in prompts]


def _sampling(
    body: SamplingBody,
    prompts: list[tuple[int, ...]],
    served: Served,
    prompt_param: str,
    logprobs: bool,
    top_logprobs: int,
) -> SamplingParams:
    """SamplingParams for the request, with its length checked against the context."""
    ctx = served.engine.config.ctx
    longest = max(len(p) for p in prompts)
    budget, budget_param = body.token_budget
    # a prompt scored alone (max_tokens 0, a scoring client's window) may fill the context; one that samples
    # needs a position left for its first token
    if longest > ctx or (longest == ctx and budget != 0):
        raise ApiError(
            400,
            f"the prompt is {longest} tokens but the context holds {ctx}; shorten it (or serve with a larger --ctx)",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if budget is not None and longest + budget > ctx:
        shown = budget if budget < 10**12 else f"{budget:.3g}"  # a max_tokens of 1e308 is 309 digits long
        raise ApiError(
            400,
            f"the prompt ({longest} tokens) plus {budget_param}={shown} exceeds the context of "
            f"{ctx} tokens; lower {budget_param} to at most {ctx - longest}",
            param=budget_param,
            code="context_length_exceeded",
        )
    max_tokens = budget if budget is not None else body.unset_budget(ctx - longest)
    try:  # SamplingParams checks its fields when built
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_k=body.top_k,
            top_p=body.top_p,
            min_p=body.min_p,
            repetition_penalty=body.repetition_penalty,
            presence_penalty=body.presence_penalty,
            frequency_penalty=body.frequency_penalty,
            stop=body.stops,
            ignore_eos=body.ignore_eos,
            seed=body.seed,
            logprobs=logprobs,
            top_logprobs=top_logprobs,
            logit_bias=body.logit_bias_pairs,
        )
    except ParamError as exc:
        raise ApiError(400, str(exc), param=exc.param) from None


@contextmanager
def _accounted(metrics: ServerMetrics, endpoint: str) -> Iterator[ApiRequest]:
    """One generation request's account (prometheus.ApiRequest): ended by its job once that is submitted
    (completed, cancelled or failed, as its choices end), or here by what stopped it before: a 4xx is
    "rejected", a 5xx or an unexpected exception "failed", a client gone while it was prepared "cancelled"."""
    account = metrics.received(endpoint)
    try:
        yield account
    except ApiError as exc:
        account.end("rejected" if exc.status < 500 or exc.code == "model_loading" else "failed")
        raise
    except (asyncio.CancelledError, ClientDisconnect):
        account.end("cancelled")
        raise
    except BaseException:
        account.end("failed")
        raise


def _submit(state: ServerState, served: Served, spec: JobSpec, account: ApiRequest) -> Job:
    state.refuse_if_stopping()
    if len(spec.prompts) * spec.n > state.settings.max_choices:
        raise ApiError(
            400,
            f"{len(spec.prompts)} prompts x n={spec.n} would start more than "
            f"{state.settings.max_choices} generations; send fewer",
            param="n" if spec.n > 1 else "prompt",
        )
    request_id = f"req-{uuid.uuid4().hex[:12]}"
    job = Job(served.engine, spec, state.metrics, request_id, state.outbox(), served.grammars)
    job.account = account
    state.jobs.add(job)
    try:
        job.submit()
    except JobRefused as exc:
        state.release(job)  # the choices queued before the refusal were cancelled: count them as they end
        if exc.queue_full:
            raise busy(str(exc), state.settings.retry_after_s) from None
        raise ApiError(400, str(exc), param=exc.param) from None
    return job


def _failure(delta: Delta) -> ApiError:
    """A choice that ended with "error": a 400 where its own grammar could not be followed (a schema past
    llguidance's limits, met mid-answer: it was a 500 and counted an engine error), else the engine's."""
    if delta.request_fault:
        return ApiError(
            400,
            f"constrained decoding of this request failed mid-answer ({delta.error}); simplify its "
            "response_format schema or its tools' parameters",
            code="grammar_failed",
        )
    return _engine_failure(delta.error)


def _engine_failure(message: str | None) -> ApiError:
    if message == SHUTTING_DOWN:  # not a failure of this request: the server stopped (ServerState.stop_generating)
        return shutting_down()
    return ApiError(
        500,
        f"the engine failed while generating this request ({message}); the server goes on serving: retry it",
        type="server_error",
        code="engine_error",
    )


# -- answering ---------------------------------------------------------------------------------------


ACCESS_LOG = logging.getLogger("uvicorn.access")  # uvicorn's own: the same format, level and handlers


def log_access(scope: Scope, status: int) -> None:
    """An access-log line for an answer uvicorn will not write, in its arguments' order (client, method, path
    with query, HTTP version, status), which its access formatter reads."""
    client = scope.get("client")
    query = scope.get("query_string", b"").decode("latin-1")
    ACCESS_LOG.info(
        '%s - "%s %s HTTP/%s" %d',
        f"{client[0]}:{client[1]}" if client else "-",
        scope.get("method", "-"),
        scope.get("path", "") + (f"?{query}" if query else ""),
        scope.get("http_version", "1.1"),
        status,
    )


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _answer(
    request: Request, state: ServerState, job: Job, shape: ResponseShape, stream: bool, include_usage: bool
) -> Response:
    if stream:
        return StreamingResponse(
            _stream(request, state, job, shape, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    await _run_whole(request, state, job)
    return JSONResponse(shape.whole(job.runs, job.usage()))


async def _run_whole(request: Request, state: ServerState, job: Job) -> None:
    """Take a whole (not streamed) answer's events until every choice ended; a client that leaves first
    cancels them, and the request ends with ClientDisconnect (a 499 in the status counts, where the partial
    answer nobody would read was counted a 200)."""
    watcher = _watch(request, job)
    try:
        async for _run, delta, _tokens in job.deltas():
            if delta.finish_reason == "error":
                raise _failure(delta)
    finally:
        gone = watcher.done() and not watcher.cancelled()
        watcher.cancel()
        state.release(job)
    if gone:
        raise ClientDisconnect()


def _watch(request: Request, job: Job) -> "asyncio.Task[None]":
    return asyncio.create_task(cancel_on_disconnect(request.receive, job))


async def _stream(
    request: Request, state: ServerState, job: Job, shape: ResponseShape, include_usage: bool
) -> AsyncIterator[str]:
    """SSE events; a client that goes away cancels the job's engine requests (the finally below)."""
    watcher = _watch(request, job)
    try:
        if shape.chat:
            for run in job.runs:
                yield _sse(_with_usage(shape.role_chunk(run.index), include_usage))
        async for run, delta, tokens in job.deltas():
            if delta.finish_reason == "error":
                yield _sse(_failure(delta).body())
                break
            finish = delta.finish_reason if delta.finish_reason != "cancelled" else None
            for chunk in shape.delta_chunks(run, delta.text, tokens, finish):
                yield _sse(_with_usage(chunk, include_usage))
        else:
            if include_usage:
                yield _sse(shape.usage_chunk(job.usage()))
        yield "data: [DONE]\n\n"
    finally:
        watcher.cancel()
        state.release(job)


def _with_usage(chunk: dict[str, Any], include_usage: bool) -> dict[str, Any]:
    """With include_usage, every chunk carries "usage": null until the last one carries the numbers."""
    if include_usage:
        chunk["usage"] = None
    return chunk


# -- the app -------------------------------------------------------------------------------------------


def create_app(
    engine: Engine | None,
    settings: ServerSettings,
    identity: ModelIdentity | None = None,
    speech: SpeechService | None = None,
) -> FastAPI:
    """The app around `engine` (started here), or around none yet: attach one later with
    `app.state.server.attach(engine, identity)`; until then /health and the API answer 503.
    `speech` serves /v1/audio/* (its transcriber may be attached later: 503 until then)."""
    state = ServerState(settings, speech)
    app = FastAPI(
        title="metronome",
        version=metronome.__version__,
        docs_url=None,
        redoc_url=None,
        openapi_url=OPENAPI_PATH,
        # "/v1/models/" is a 404, as OpenAI answers, not a redirect to a URL built from the client's Host
        # header (whatever name it sent) that a client would then POST its body to again
        redirect_slashes=False,
    )
    # what the handlers parse themselves, and the model names served once attached (serve/openapi.py)
    app.openapi = lambda: openapi_schema(
        app, () if state.served is None else (state.served.identity.id, settings.model_alias)
    )
    app.state.server = state
    if engine is not None:
        if identity is None:
            raise ValueError("create_app: pass the model's identity (ModelIdentity.of(loaded)) with the engine")
        state.attach(engine, identity)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        what = "no such endpoint" if exc.status_code == 404 else str(exc.detail)
        # the router's own headers stay (a 405 names the allowed methods in Allow, as RFC 9110 asks)
        return ApiError(exc.status_code, f"{what}: {request.method} {request.url.path}", headers=exc.headers).response()

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _exc: ClientDisconnect) -> Response:
        # the client left (while sending its body, or before a whole answer was ready): nobody reads an answer
        # (499, nginx's "client closed request"). uvicorn writes its access line as an answer starts and
        # sends nothing to a client that left, so without this line a 499 was counted in /metrics and
        # missing from the log
        log_access(request.scope, 499)
        return Response(status_code=499)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Answered outside GateMiddleware, so counted here; Starlette re-raises after this answer, so
        # the traceback is still logged by the server.
        path = request.url.path
        state.metrics.requests.labels(path if path in _ENDPOINTS else "other", "500").inc()
        return ApiError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    def get(path: str, **kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        """A GET route that answers HEAD too (as Starlette's own routes do; monitors and `curl -I` send
        HEAD, which was a 405): uvicorn sends the GET's headers without its body. HEAD stays out of the
        OpenAPI document, which would otherwise hold two operations under one id."""

        def register(endpoint: Callable[..., Any]) -> Callable[..., Any]:
            # GET first: a method neither answers gets a 405 whose Allow names the first route's methods,
            # which must be the ones the OpenAPI document lists
            routed = app.get(path, **kwargs)(endpoint)
            app.add_api_route(path, endpoint, methods=["HEAD"], include_in_schema=False, **kwargs)
            return routed

        return register

    @get("/", response_class=HTMLResponse)
    async def chat_page() -> HTMLResponse:
        return HTMLResponse(state.page)

    @get("/health")
    async def health() -> dict[str, Any]:
        served = state.require()
        running_s = served.engine.step_s
        if running_s is not None and running_s > state.settings.stalled_after_s:
            raise ApiError(
                503,
                f"the engine's current step has run {running_s:.1f} s (over {state.settings.stalled_after_s:g} s): "
                "it may be stuck (a rank that stopped answering), and requests wait on it; the server log says why "
                "if the step fails",
                type="service_unavailable",
                code="engine_stalled",
                headers={"Retry-After": str(state.settings.retry_after_s)},
            )
        return {"status": "ok", "model": served.identity.id, "system_fingerprint": served.fingerprint}

    @get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @get("/v1/models")
    async def models() -> dict[str, Any]:
        served = state.require()
        speech = [speech_card(state.speech)] if state.speech is not None and state.speech.ready else []
        return {"object": "list", "data": [_model_card(served), *speech]}

    @get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        served = state.require()
        if state.speech is not None and state.speech.ready and model_id in state.speech.names():
            return speech_card(state.speech)
        if model_id not in (served.identity.id, settings.model_alias):
            raise ApiError(404, f"the model {model_id!r} does not exist here", param="model", code="model_not_found")
        return _model_card(served)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        with _accounted(state.metrics, "/v1/chat/completions") as account:
            served = state.require()
            body: ChatBody = await _parse(request, state, ChatBody)
            _check_model(body, served, settings.model_alias)
            if body.top_logprobs and not body.logprobs:
                raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs")
            chat = await asyncio.to_thread(_chat_request, body, served)  # a long prompt must not hold up the loop
            top = body.top_logprobs or 0
            params = _sampling(body, [chat.ids], served, "messages", body.logprobs, top)
            job = _submit(state, served, chat.job_spec(params, body.n), account)
            shape = ResponseShape(
                _head(served, "chatcmpl"),
                True,
                served.engine.tokenizer,
                body.logprobs,
                top,
                chat.tool_calls,
                loose_calls=chat.loose_calls,
            )
            return await _answer(request, state, job, shape, body.stream, body.include_usage)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        with _accounted(state.metrics, "/v1/completions") as account:
            served = state.require()
            body: CompletionBody = await _parse(request, state, CompletionBody)
            _check_model(body, served, settings.model_alias)
            prompts = await asyncio.to_thread(_completion_prompts, body, served)
            logprobs = body.logprobs is not None
            top = body.logprobs or 0
            params = _sampling(body, prompts, served, "prompt", logprobs, top)
            if body.echo and logprobs:  # the prompt's tokens scored too
                if served.engine.prefiller is not None:
                    raise ApiError(
                        400, "echo with logprobs needs --layout colocated (the prompt's logits)", param="echo"
                    )
                params = replace(params, prompt_logprobs=True)
            grammar = await asyncio.to_thread(format_grammar, body, served)  # a schema compiles in milliseconds
            job = _submit(state, served, JobSpec(tuple(prompts), params, body.n, grammar), account)
            echo = _echo_texts(body, prompts, served) if body.echo else None
            shape = ResponseShape(
                _head(served, "cmpl"), False, served.engine.tokenizer, logprobs, top, echo=echo, n=body.n
            )
            return await _answer(request, state, job, shape, body.stream, body.include_usage)

    add_speech_routes(app, state)
    add_reflect_routes(app, state)  # POST /v1/reflections (serve/reflect.py)
    add_responses_routes(app, state)
    app.add_middleware(GateMiddleware, state=state)
    return app


def _model_card(served: Served) -> dict[str, Any]:
    return {
        "id": served.identity.id,
        "object": "model",
        "created": served.created,
        "owned_by": "metronome",
        "system_fingerprint": served.fingerprint,
    }


def _head(served: Served, prefix: str) -> ResponseHead:
    return ResponseHead(f"{prefix}-{uuid.uuid4().hex}", int(time.time()), served.identity.id, served.fingerprint)
