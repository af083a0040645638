"""The Responses API's request body (`POST /v1/responses`) as strict pydantic models, in the style of
serve/schemas.py: a wrong JSON type is a 400 naming the parameter, unknown fields are ignored, null means
"the default".

The subset is what the OpenAI Agents SDK sends by default: `input` as a string or a list of items
(messages with input_text/output_text parts, `function_call` and `function_call_output` items),
`instructions`, function `tools`, `tool_choice`, `parallel_tool_calls`, `max_output_tokens`,
`temperature`, `top_p`, `text.format`, `stream`, and the output text's logprobs (`include` with
"message.output_text.logprobs", `top_logprobs`). Fields that change nothing here are accepted and
ignored (`store`, `include`'s other values, `truncation`, `metadata`, `user`, `reasoning`,
`max_tool_calls`, which bounds calls to built-in tools and there are none, the prompt-cache hints:
`metadata` is echoed back). What cannot be honoured is refused with the parameter named: stored state
(`previous_response_id`, `conversation`), `background`, prompt templates, tools other than functions,
images and files in the input.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from metronome.config import MIN_SAMPLING_FLOAT
from metronome.serve.schemas import (
    _INT64,
    MAX_TOP_LOGPROBS,
    Int,
    _Body,
    _temperature_schema,
    error_message,
    error_param,
)

TEXT_PARTS = ("input_text", "output_text")
LOGPROBS = "message.output_text.logprobs"  # the `include` value that asks for the output text's logprobs


class ContentPart(_Body):
    """A text part of a message: `input_text` (what a user or system says) or `output_text` (an earlier
    assistant answer, as the Agents SDK sends it back)."""

    type: Literal["input_text", "output_text"]
    text: str


class RefusalPart(_Body):
    """An earlier assistant refusal, sent back in the history: its text goes into the transcript."""

    type: Literal["refusal"]
    refusal: str


def _part_kind(value: Any) -> str | None:
    kind = value.get("type") if isinstance(value, dict) else None
    return "refusal_part" if kind == "refusal" else "text_part" if kind in TEXT_PARTS else None


Part = Annotated[
    Annotated[ContentPart, Tag("text_part")] | Annotated[RefusalPart, Tag("refusal_part")],
    Discriminator(
        _part_kind,
        custom_error_type="content_part",
        custom_error_message="a content part must be input_text or output_text (images and files are not supported)",
    ),
]


class InputMessage(_Body):
    """A message item (`type` may be left out, as the SDK's "easy" messages do)."""

    type: Literal["message"] = "message"
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[Part]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(p.text if isinstance(p, ContentPart) else p.refusal for p in self.content)


class FunctionCall(_Body):
    """A tool call the model made earlier (from an earlier response's output)."""

    type: Literal["function_call"]
    call_id: str = Field(min_length=1)
    name: str = Field(min_length=1)
    arguments: str


class FunctionCallOutput(_Body):
    """What the caller's function returned for `call_id`."""

    type: Literal["function_call_output"]
    call_id: str = Field(min_length=1)
    output: str | list[ContentPart]

    @property
    def text(self) -> str:
        return self.output if isinstance(self.output, str) else "".join(p.text for p in self.output)


ITEM_TYPES = ("message", "function_call", "function_call_output")


def _item_kind(value: Any) -> str | None:
    if not isinstance(value, dict):
        return None
    kind = value.get("type", "message" if "role" in value else None)
    return kind if kind in ITEM_TYPES else None


InputItem = Annotated[
    Annotated[InputMessage, Tag("message")]
    | Annotated[FunctionCall, Tag("function_call")]
    | Annotated[FunctionCallOutput, Tag("function_call_output")],
    Discriminator(
        _item_kind,
        custom_error_type="input_item",
        custom_error_message="an input item must be a message (with a role), function_call or function_call_output",
    ),
]


class FunctionTool(_Body):
    type: Literal["function"] = Field(description="only function tools are served here")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: the function takes no arguments
    strict: bool = True


class NamedFunction(_Body):
    type: Literal["function"]
    name: str = Field(min_length=1)


class TextFormat(_Body):
    """`text.format`: plain text, any JSON object, or JSON that validates against `schema`."""

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_for_json_schema(self) -> "TextFormat":
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("text.format of type json_schema needs a schema")
        return self


class TextConfig(_Body):
    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # accepted, ignored: the model decides its length


class ResponsesBody(_Body):
    """`POST /v1/responses`."""

    model: str | None = None
    input: str | list[InputItem]
    instructions: str | None = None
    tools: list[FunctionTool] = Field(default_factory=list)
    tool_choice: Literal["none", "auto", "required"] | NamedFunction = "auto"
    parallel_tool_calls: bool = True
    max_output_tokens: Int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, json_schema_extra=_temperature_schema)
    top_p: float = Field(1.0, ge=MIN_SAMPLING_FLOAT, le=1.0)
    text: TextConfig | None = None
    stream: bool = False
    seed: Int | None = Field(None, ge=-_INT64, lt=_INT64)  # extension, as in chat completions
    top_logprobs: Int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)  # alternatives per token, with LOGPROBS
    include: list[str] = Field(default_factory=list)  # LOGPROBS is read; the others name what does not exist here
    # accepted and ignored: nothing is stored, no input is dropped, nothing here is a reasoning model
    store: bool = False
    truncation: Literal["auto", "disabled"] = "disabled"
    metadata: dict[str, str] = Field(default_factory=dict, max_length=16)
    user: str | None = None
    max_tool_calls: Int | None = Field(None, ge=1)  # a bound on built-in tools' calls; none exist here
    # refused when set (the handler says why): what needs state or features this server does not have
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    background: bool = False
    prompt: dict[str, Any] | None = None

    @field_validator("input")
    @classmethod
    def _some_input(cls, v: str | list) -> str | list:
        if isinstance(v, list) and not v:
            raise ValueError("input is an empty list: send a string or at least one item")
        return v

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools_only(cls, v: Any) -> Any:
        if isinstance(v, list):
            for i, tool in enumerate(v):
                kind = tool.get("type") if isinstance(tool, dict) else None
                if kind != "function":
                    raise ValueError(
                        f"tools[{i}] is of type {kind!r}: only function tools are supported here "
                        "(hosted tools such as web_search or file_search are not)"
                    )
        return v

    @property
    def logprobs(self) -> bool:
        """Whether the output text's tokens carry their logprobs: OpenAI's opt-in through `include`, or
        alternatives asked for (a top_logprobs that returned nothing would look like a model with none)."""
        return LOGPROBS in self.include or bool(self.top_logprobs)

    @property
    def format_type(self) -> str:
        return "text" if self.text is None or self.text.format is None else self.text.format.type


_MODELS = (ContentPart, RefusalPart, InputMessage, FunctionCall, FunctionCallOutput, FunctionTool, NamedFunction)
_MODELS += (TextFormat, TextConfig, ResponsesBody)
FIELDS = frozenset(name for m in _MODELS for name in m.model_fields) | {"schema"}  # parameter names in errors


def body_error(exc: ValidationError) -> tuple[str, str | None]:
    """The message and parameter of a body that failed validation (e.g. "input[2].call_id")."""
    return error_message(exc, FIELDS), error_param(exc, FIELDS)
