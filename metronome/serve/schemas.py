"""OpenAI request bodies as strict pydantic models, and the parameter a validation error points at.

Strict: a wrong JSON type is an error (no "0.5" for 0.5), never a silent coercion; JSON has one number
type, so 3.0 is the integer 3 where an integer is asked for (as JSON Schema reads it), and 3.5 an error.
Unknown fields are accepted and ignored, as OpenAI does; an explicit null means "the default".
serve/openapi.py publishes these models as the API's OpenAPI schema; the `json_schema_extra` below only
state there what the validators check."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from metronome.config import MAX_LOGIT_BIAS, MAX_STOP_CHARS, MIN_SAMPLING_FLOAT

MAX_STOPS = 4
MAX_TOP_LOGPROBS = 20
MAX_N = 16
# a legacy completion's length when max_tokens is not sent: OpenAI's documented default (vLLM's too); chat's
# default is the rest of the context
LEGACY_MAX_TOKENS = 16
_INT64 = 2**63


def _integral(value: Any) -> Any:
    return int(value) if isinstance(value, float) and value.is_integer() else value


Int = Annotated[int, BeforeValidator(_integral)]  # an integer, written 3 or 3.0
TokenKey = Annotated[str, StringConstraints(pattern=r"^[0-9]{1,9}$")]  # a token id as a JSON object's key


def _temperature_schema(schema: dict[str, Any]) -> None:
    """0 (greedy), or at least MIN_SAMPLING_FLOAT: SamplingParams refuses what lies between (a 400)."""
    schema.pop("minimum", None)
    schema["anyOf"] = [{"const": 0}, {"minimum": MIN_SAMPLING_FLOAT}]


def _stop_schema(schema: dict[str, Any]) -> None:
    text = {"type": "string", "minLength": 1, "maxLength": MAX_STOP_CHARS}
    schema["anyOf"] = [text, {"type": "array", "items": text, "maxItems": MAX_STOPS}]


def _prompt_schema(schema: dict[str, Any]) -> None:
    ids = {"type": "array", "items": {"type": "integer", "minimum": 0}, "minItems": 1}
    schema["anyOf"] = [
        {"type": "string"},
        {"type": "array", "items": {"type": "string"}, "minItems": 1},
        ids,
        {"type": "array", "items": ids, "minItems": 1},
    ]


class _Body(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False, frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchemaFormat(_Body):
    """`response_format.json_schema`, OpenAI's shape: the reply is JSON that validates against `schema`
    (engine/grammar.py; docs/structured-outputs.md lists what a schema may use)."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # accepted: the output is always constrained to the schema


class ResponseFormat(_Body):
    """`json_object`: the reply is a JSON object; `json_schema`: JSON that validates against
    `json_schema.schema`. Both are enforced token by token (engine/grammar.py), sampling included; a reply
    cut by max_tokens ends with finish_reason "length", as OpenAI's does."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None  # required with type json_schema (checked by the server)


class TextPart(_Body):
    type: Literal["text"]
    text: str


class FunctionCall(_Body):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(_Body):
    """A call an assistant message made (serve/tools.py renders it into the prompt)."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] = ""  # null: none (an assistant message that only calls tools)
    name: str | None = None
    tool_calls: list[ToolCall] = Field(default_factory=list)  # assistant messages only
    tool_call_id: str | None = None  # tool messages: the call this result answers

    @model_validator(mode="after")
    def _tool_fields(self) -> "Message":
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls belong to assistant messages, not {self.role!r} ones")
        if self.role == "tool" and self.tool_call_id is None:
            raise ValueError("a tool message needs tool_call_id: the id of the call it answers")
        return self

    def as_template_message(self) -> dict[str, Any]:
        """The dict a chat template reads ("developer" is OpenAI's newer "system"): role and content, and
        the tool fields when present (serve/tools.py turns those into what the template understands)."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        out: dict[str, Any] = {"role": "system" if self.role == "developer" else self.role, "content": text}
        if self.tool_calls:
            out["tool_calls"] = [c.model_dump() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.name is not None and self.role == "tool":
            out["name"] = self.name
        return out


class FunctionDefinition(_Body):
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema of an object; none: no arguments
    strict: bool | None = None  # accepted: the arguments are always constrained to the schema


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDefinition


class FunctionName(_Body):
    name: str


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: FunctionName


class SamplingBody(_Body):
    """The fields chat and text completions share."""

    model: str | None = None
    max_tokens: Int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, json_schema_extra=_temperature_schema)
    top_p: float = Field(1.0, ge=MIN_SAMPLING_FLOAT, le=1.0)
    top_k: Int = Field(0, ge=0)
    min_p: float = Field(0.0, ge=0.0, le=1.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, ge=MIN_SAMPLING_FLOAT, le=10.0)
    stop: str | list[str] = Field(default_factory=list, json_schema_extra=_stop_schema)
    seed: Int | None = None  # in [-2**63, 2**63): _check_seed (pydantic's own bound printed 2**63 as a float)
    n: Int = Field(1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    ignore_eos: bool = False  # extension: keep generating past the end-of-sequence token (benchmarks)
    # token id -> a bias added to its logit before sampling (JSON keys are strings; ids past the vocabulary are
    # refused by the engine, which knows it)
    logit_bias: dict[TokenKey, Annotated[float, Field(ge=-MAX_LOGIT_BIAS, le=MAX_LOGIT_BIAS)]] = Field(
        default_factory=dict, json_schema_extra={"additionalProperties": False}
    )

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, v: int | None) -> int | None:
        if v is not None and not -_INT64 <= v < _INT64:
            raise ValueError("seed must be an integer in [-2**63, 2**63)")  # error_message shows the value
        return v

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, v: str | list[str]) -> str | list[str]:
        stops = [v] if isinstance(v, str) else v
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences are allowed, got {len(stops)}")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must not be empty strings")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence may hold at most {MAX_STOP_CHARS} characters")
        return v

    @property
    def stops(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    @property
    def logit_bias_pairs(self) -> tuple[tuple[int, float], ...]:
        return tuple((int(token), bias) for token, bias in self.logit_bias.items())

    def unset_budget(self, room: int) -> int:
        """The output length when the request names none, given the `room` its prompt leaves in the context."""
        return room


class ChatBody(SamplingBody):
    messages: list[Message] = Field(min_length=1)
    tools: list[Tool] = Field(default_factory=list, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # None: auto with tools
    parallel_tool_calls: bool = True
    max_completion_tokens: Int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    # the deprecated form of tools: accepted where it asks for nothing, refused otherwise (never ignored)
    functions: list[dict[str, Any]] = Field(default_factory=list)
    function_call: Literal["none", "auto"] | dict[str, Any] | None = None

    @field_validator("functions")
    @classmethod
    def _check_functions(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if v:
            raise ValueError("functions is the deprecated form of tools: send tools (and tool_choice) instead")
        return v

    @field_validator("function_call")
    @classmethod
    def _check_function_call(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if isinstance(v, dict):
            raise ValueError("function_call is the deprecated form of tool_choice: send tools and tool_choice instead")
        return v

    @property
    def token_budget(self) -> tuple[int | None, str]:
        """The requested output length and the field it came from (max_completion_tokens wins)."""
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"


class CompletionBody(SamplingBody):
    prompt: str | list[str] | list[Int] | list[list[Int]] = Field(json_schema_extra=_prompt_schema)
    # 0: the prompt only, as scoring clients send it with echo and logprobs (the text is the prompt's, the
    # finish_reason "length")
    max_tokens: Int | None = Field(None, ge=0, json_schema_extra={"default": LEGACY_MAX_TOKENS})
    logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # legacy: how many alternatives per token
    # the prompt before the completion's text; with logprobs, its tokens' logprobs before the completion's
    # (the first token's None), as lm-evaluation-harness scores a continuation
    echo: bool = False
    # legacy fields served only where they change nothing, refused otherwise (never silently ignored)
    suffix: str | None = None
    best_of: Int | None = Field(None, ge=1)

    @field_validator("suffix")
    @classmethod
    def _check_suffix(cls, v: str | None) -> str | None:
        if v:
            raise ValueError("suffix (text after an insertion) is not supported: send the text before it as the prompt")
        return v

    @field_validator("best_of")
    @classmethod
    def _check_best_of(cls, v: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if v is not None and v != n:
            raise ValueError(f"best_of={v} with n={n} is not supported: every choice generated is returned; ask for n")
        return v

    @field_validator("prompt")
    @classmethod
    def _check_prompt(cls, v: str | list) -> str | list:
        if isinstance(v, list) and not v:
            raise ValueError("the prompt list is empty: send a string, a list of strings or token ids")
        return v

    @property
    def token_budget(self) -> tuple[int | None, str]:
        return self.max_tokens, "max_tokens"

    def unset_budget(self, room: int) -> int:
        return min(LEGACY_MAX_TOKENS, room)


_MODELS = (StreamOptions, ResponseFormat, JsonSchemaFormat, TextPart, Message, SamplingBody, ChatBody, CompletionBody)
_MODELS += (FunctionCall, ToolCall, FunctionDefinition, Tool, FunctionName, NamedToolChoice)
# parameter names, for error locations (as the client spells them: a field's alias where it has one)
_FIELDS = frozenset(f.alias or name for m in _MODELS for name, f in m.model_fields.items())


def _main_error(exc: ValidationError) -> dict:
    """The most specific error: for a union, the member that got furthest into the value."""
    return max(exc.errors(), key=lambda e: len(e["loc"]))


def error_param(exc: ValidationError, fields: frozenset[str] = _FIELDS) -> str | None:
    """The parameter the error is about, e.g. "temperature" or "messages[1].role"; `fields`: the body's
    parameter names (serve/responses_schemas.py passes its own)."""
    loc = _main_error(exc)["loc"]
    param = ""
    for part in loc:
        if isinstance(part, int):
            param += f"[{part}]"
        elif part in fields:
            param += f".{part}" if param else part
        # other parts name a member of a union ("str", "list[int]"): not a parameter
    return param or None


def error_message(exc: ValidationError, fields: frozenset[str] = _FIELDS) -> str:
    first = _main_error(exc)
    where = error_param(exc, fields)
    text = first["msg"].removeprefix("Value error, ")
    if first["type"] == "missing":
        return f"{where} is required"
    got = first.get("input")
    shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
    return f"{where}: {text}{shown}" if where else text
