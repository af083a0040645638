"""Tool calling (OpenAI's function tools), shared by /v1/chat/completions and /v1/responses.

Three parts, in request order:

- **The request**: `tool_calling(tools, tool_choice, parallel, grammars)` checks the functions and the
  choice (a 400 names the parameter: "tools[1].function.parameters", "tool_choice.function.name") and
  returns a `ToolCalling`: every function (all are described to the model), the names the model may call
  and how many calls it may make.
- **The prompt**: `template_messages(messages, calling, template_knows_tools)` gives the chat template its
  messages. A template that reads `tools` (Qwen2.5's) gets OpenAI's tool list and renders tool calls and
  tool results its own way; any other (SmolLM2's) gets the fallback of docs/tools.md: a system section
  describing the functions and the call format, assistant calls as text blocks, tool results as user turns.
- **The output**: `tool_grammar(calling, grammars)` constrains generation to text and/or
  `<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>` blocks whose arguments follow the
  function's JSON schema (so they always parse and validate); `ToolCallParser` turns the generated text,
  whole or piece by piece as it streams, into content and calls, including, with "auto", the fenced or
  bare call objects Qwen2.5-Coder writes instead of tags (see FENCE), checked against the schema.

The call format is Qwen2.5's (Hermes-style): where `<tool_call>` is one special token of the vocabulary the
grammar names it by id, so free text can never open a call; elsewhere it is text, and the grammar keeps
the literal string `<tool_call>` out of free text. Either way the generated text parses one way only.
"""

from __future__ import annotations

import copy
import functools
import json
import re
import uuid
from dataclasses import dataclass, field
from typing import Any, Literal, Mapping, Sequence

import jsonschema
import torch

from metronome.engine.grammar import JSON_OPTIONS, Grammar, GrammarError, Grammars
from metronome.engine.request import Constraint
from metronome.model.tokenizer import Tokenizer

OPEN = "<tool_call>"
CLOSE = "</tool_call>"
_CALL_END = "}\n" + CLOSE  # the wrapper object's brace, then the closing tag (compact JSON has no newline)
_HEADER = re.compile(r'\{"name": "([A-Za-z0-9_.\-]+)", "arguments": ')
# Qwen2.5-Coder answers a call as a JSON object in a ```json fence, or bare, pretty-printed, not in the
# <tool_call> tags its template asks for: its 0.5B and 1.5B do so on most prompts with tool_choice "auto",
# and vLLM's and ollama's trackers report the same of its 7B-32B. With "auto", an answer that is nothing but
# such objects ("loose calls"), each {"name": <an allowed function>, "arguments": <valid under its schema>},
# is read as those calls (ToolCallParser). The grammar cannot hold them to the schema as it holds tagged
# calls: a grammar whose free text may not open like a call object left llguidance's greedy lexer without
# the call's path once the text had begun (2026-12-05), so a loose call is checked after it is written, and
# anything else stays text.
FENCE = "```json"
_FENCE_END = "```"
JSON_SPACE = " \t\n\r"  # what JSON allows between tokens (RFC 8259): loose calls may be laid out with any of it
NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"

Mode = Literal["none", "auto", "required", "function"]


class ToolError(ValueError):
    """A bad tools / tool_choice / history entry; `param` names the request field."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class Function:
    """One function tool as the model sees it."""

    name: str
    description: str | None
    parameters: dict[str, Any]  # a JSON schema of an object (an empty object schema when none was given)

    def openai(self) -> dict[str, Any]:
        """OpenAI's tool entry (what chat templates read as `tools`)."""
        fn: dict[str, Any] = {"name": self.name}
        if self.description:
            fn["description"] = self.description
        fn["parameters"] = self.parameters
        return {"type": "function", "function": fn}


@dataclass(frozen=True)
class ToolCalling:
    """The tools of one request and what the model may do with them."""

    functions: tuple[Function, ...]  # all described in the prompt
    mode: Mode  # none: never call; auto: text or calls; required / function: calls only
    allowed: tuple[str, ...]  # the names the grammar lets the model call
    parallel: bool  # more than one call per answer

    @property
    def constrained(self) -> bool:
        return self.mode != "none"

    @functools.cached_property  # a request's closed schemas, built once (its chat route and parsers read them)
    def loose(self) -> dict[str, dict[str, Any]]:
        """What a loose call (a fenced or bare call object, see FENCE) may call, by name: each function's
        parameters as its tagged calls are held to them (objects closed). With "auto" only."""
        if self.mode != "auto":
            return {}
        return {f.name: closed(copy.deepcopy(f.parameters)) for f in self.functions if f.name in self.allowed}


def tool_calling(
    tools: Sequence[dict[str, Any]] | None,
    tool_choice: str | dict[str, Any] | None,
    parallel: bool,
    grammars: Grammars | None,
    param_prefix: str = "",
) -> ToolCalling | None:
    """The checked tools of a request (None when it has none). `tools`: OpenAI's chat entries
    ({"type": "function", "function": {"name", "description", "parameters"}}); `tool_choice`: "none",
    "auto" (the default), "required" or {"type": "function", "function": {"name": ...}}. Each function's
    parameters must be a JSON schema of an object that constrained decoding can enforce, else a ToolError
    naming "tools[i].function.parameters". `grammars` None: the model's tokenizer cannot be constrained."""
    p = param_prefix
    if not tools:
        if tool_choice in (None, "none", "auto"):
            return None
        raise ToolError(
            f"{p}tool_choice {_shown(tool_choice)} needs tools: send the functions in tools", f"{p}tool_choice"
        )
    functions: list[Function] = []
    for i, tool in enumerate(tools):
        fn = tool["function"]
        name, where = fn["name"], f"{p}tools[{i}].function"
        if not re.match(NAME_PATTERN, name):
            raise ToolError(f"{where}.name {name!r}: use 1 to 64 letters, digits, '_', '.' or '-'", f"{where}.name")
        if any(f.name == name for f in functions):
            raise ToolError(f"{where}.name: the function {name!r} is defined twice", f"{where}.name")
        parameters = _object_schema(fn.get("parameters"), f"{where}.parameters")
        functions.append(Function(name, fn.get("description"), parameters))
    names = tuple(f.name for f in functions)
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        mode: Mode = tool_choice or "auto"  # type: ignore[assignment]
        allowed = names
    else:
        wanted = tool_choice["function"]["name"]
        if wanted not in names:
            raise ToolError(
                f"{p}tool_choice.function.name: {wanted!r} is not one of the tools ({', '.join(names)})",
                f"{p}tool_choice.function.name",
            )
        # OpenAI's forced function is "call exactly one specific function", parallel calls or not (with
        # them, Qwen wrote the call for four other cities too, and a budget cut it: finish_reason length)
        mode, allowed, parallel = "function", (wanted,), False
    calling = ToolCalling(tuple(functions), mode, allowed, parallel)
    if calling.constrained:
        if grammars is None:
            raise ToolError(f"{p}tools: tool calls cannot be constrained for this model's tokenizer", f"{p}tools")
        for i, f in enumerate(functions):
            try:  # each schema alone, so that a refusal names its tool
                grammars.json_schema(_with_options(closed(f.parameters)), f"{p}tools[{i}].function.parameters", f.name)
            except GrammarError as exc:
                raise ToolError(str(exc), exc.param or f"{p}tools[{i}].function.parameters") from None
    return calling


def _shown(choice: Any) -> str:
    """A tool_choice as words: its mode, or the function it names (not its JSON: the Responses API spells
    a named choice differently from chat's, and both reach this check)."""
    return repr(choice) if isinstance(choice, str) else f"naming the function {choice['function']['name']!r}"


def _object_schema(schema: Any, param: str) -> dict[str, Any]:
    """The arguments' schema: a JSON object schema (OpenAI's rule); none means no arguments."""
    if schema is None:
        return {"type": "object", "properties": {}}
    if not isinstance(schema, dict):
        raise ToolError(f"{param}: a JSON schema must be an object", param)
    kind = schema.get("type", "object")
    if kind != "object":
        raise ToolError(f"{param}: the arguments' schema must have type 'object' (got {kind!r})", param)
    return schema


_SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains")


def closed(schema: Any) -> Any:
    """The schema with every object that lists its properties closed to them (additionalProperties false
    where the schema does not say): what OpenAI's strict mode asks for. Anything that validates against the
    closed schema validates against the original; without it a small model adds key after key. A schema
    that wants more keys says so (additionalProperties true or a schema).

    An object described in parts is closed once, where the parts meet: allOf's branches each list some of
    its keys (closed one by one, each would forbid the others' keys, and a document with the keys that
    two branches require would be impossible), and so do anyOf/oneOf branches beside properties of the
    object's own. Those branches stay open, and the object holding them is closed to the keys it and they
    list. A branch that is a reference to a definition is read as a copy of it, opened the same way; so is
    a reference beside the object's own properties (2020-12 applies both, as allOf would).

    GrammarError when the copies would pass MAX_SCHEMA_NODES: a definition referenced twice in each of a
    chain of definitions doubles at each link (a 1.3 KB schema grew a server by 700 MB)."""
    return _closed(schema, schema, frozenset(), [MAX_SCHEMA_NODES])


MAX_SCHEMA_NODES = 20_000  # subschemas a closed schema may hold, copies of definitions included

# RFC 3339's full-date with its calendar: 29 February only in leap years (divisible by 4, centuries by 400).
# llguidance's own "date" lets any year's 29 February through, which JSON Schema's format (RFC 3339 5.7)
# refuses; a string with one of these formats and no pattern of its own is given the exact pattern instead.
_DAY_IN_MONTH = (
    "(?:0[13578]|1[02])-(?:0[1-9]|[12][0-9]|3[01])|(?:0[469]|11)-(?:0[1-9]|[12][0-9]|30)|02-(?:0[1-9]|1[0-9]|2[0-8])"
)
_LEAP_YEAR = "[0-9]{2}(?:0[48]|[2468][048]|[13579][26])|(?:[02468][048]|[13579][26])00"
FULL_DATE = f"(?:[0-9]{{4}}-(?:{_DAY_IN_MONTH})|(?:{_LEAP_YEAR})-02-29)"
FULL_TIME = (
    "(?:[01][0-9]|2[0-3]):[0-5][0-9]:(?:[0-5][0-9]|60)(?:\\.[0-9]+)?(?:[zZ]|[+-](?:[01][0-9]|2[0-3]):[0-5][0-9])"
)
EXACT_FORMATS = {"date": FULL_DATE, "date-time": f"{FULL_DATE}[tT]{FULL_TIME}"}


def _closed(schema: Any, root: Any, inlined: frozenset[str], budget: list[int]) -> Any:
    if not isinstance(schema, dict):
        return schema
    budget[0] -= 1
    if budget[0] < 0:
        raise GrammarError(
            f"the schema expands to more than {MAX_SCHEMA_NODES} subschemas (a definition referenced from "
            "allOf/anyOf branches is copied at each use); simplify it"
        )
    out = dict(schema)
    if isinstance(out.get("$ref"), str) and "properties" in out:
        # a reference beside properties of the object's own applies with them (JSON Schema 2020-12), as an
        # allOf branch would: closed apart, the definition forbade the own keys and the object the definition's
        # (in the reference's place among the keys: llguidance orders an object's keys by where they appear)
        branches = [{"$ref": out["$ref"]}, *(out["allOf"] if isinstance(out.get("allOf"), list) else [])]
        keys, out = out, {}
        for key, value in keys.items():
            if key == "$ref":
                out["allOf"] = branches
            elif key != "allOf":
                out[key] = value
    parts = [key for key in ("allOf", "anyOf", "oneOf") if isinstance(out.get(key), list)]
    # the branches that describe parts of this object rather than whole alternatives of it
    shared = [key for key in parts if key == "allOf" or "properties" in out or "allOf" in parts]
    keys: dict[str, Any] = {}
    for key in shared:
        out[key] = [_open_part(branch, root, keys, inlined, budget) for branch in out[key]]
    listed = isinstance(out.get("properties", {}), dict)  # a properties of another type: the grammar refuses it
    if keys and listed and "additionalProperties" not in out and "patternProperties" not in out:
        own = out.get("properties", {})  # then the branches' keys (each checked by its branch), in their order
        out["properties"] = {**own, **{name: rule for name, rule in keys.items() if name not in own}}
    for key in _SUBSCHEMA_LISTS:
        if key not in shared and isinstance(out.get(key), list):
            out[key] = [_closed(s, root, inlined, budget) for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: _closed(s, root, inlined, budget) for name, s in out[key].items()}
    for key in _SUBSCHEMAS:
        if isinstance(out.get(key), dict):
            out[key] = _closed(out[key], root, inlined, budget)
    if "properties" in out and listed and "additionalProperties" not in out and "patternProperties" not in out:
        out["additionalProperties"] = False
    if isinstance(out.get("format"), str) and out["format"] in EXACT_FORMATS and "pattern" not in out:
        out["pattern"] = f"^{EXACT_FORMATS[out.pop('format')]}$"
    return out


def _open_part(branch: Any, root: Any, keys: dict[str, Any], inlined: frozenset[str], budget: list[int]) -> Any:
    """One branch of an object described in parts: closed inside, left open itself; adds the keys it
    lists to `keys` (each with the schema {}: the branch checks its value)."""
    if not isinstance(branch, dict):
        return branch
    ref = branch.get("$ref")
    target = _local_definition(root, ref) if ref not in inlined else None  # (a definition made of itself: once)
    if target is not None:  # the definition may be closed where it is used whole: this copy is not
        branch = {**target, **{k: v for k, v in branch.items() if k != "$ref"}}
        inlined = inlined | {ref}
    out = _closed(branch, root, inlined, budget)
    if "additionalProperties" not in branch and "patternProperties" not in branch:
        out.pop("additionalProperties", None)
    if isinstance(out.get("properties"), dict):
        for name in out["properties"]:
            keys.setdefault(name, {})
    return out


def _local_definition(root: Any, ref: Any) -> dict[str, Any] | None:
    """What `ref` ("#/$defs/Name" or "#/definitions/Name") points to in `root`, if it is an object schema."""
    if not isinstance(ref, str) or not isinstance(root, dict):
        return None
    for section in ("$defs", "definitions"):
        prefix = f"#/{section}/"
        if ref.startswith(prefix) and isinstance(root.get(section), dict):
            found = root[section].get(ref[len(prefix) :])
            return found if isinstance(found, dict) else None
    return None


def _with_options(schema: dict[str, Any]) -> dict[str, Any]:
    return {**schema, "x-guidance": JSON_OPTIONS}


def _rebased(node: Any) -> Any:
    """A schema moved under properties.arguments: references to its root follow it there."""
    if isinstance(node, dict):
        out = {k: _rebased(v) for k, v in node.items()}
        ref = node.get("$ref")
        if (
            isinstance(ref, str)
            and (ref == "#" or ref.startswith("#/"))
            and not ref.startswith(("#/$defs/", "#/definitions/"))
        ):
            out["$ref"] = "#/properties/arguments" + ref[1:]
        return out
    if isinstance(node, list):
        return [_rebased(v) for v in node]
    return node


def call_schema(function: Function) -> dict[str, Any]:
    """The JSON schema of one call object {"name": <the name>, "arguments": <its parameters>}: the
    parameters' definitions ($defs, definitions) move to the root, where their references point."""
    arguments = closed(copy.deepcopy(function.parameters))
    defs = {k: arguments.pop(k) for k in ("$defs", "definitions") if k in arguments}
    schema = {
        "type": "object",
        "properties": {"name": {"const": function.name}, "arguments": _rebased(arguments)},
        "required": ["name", "arguments"],
        "additionalProperties": False,
        **_rebased(defs),
    }
    return _with_options(schema)


# -- the grammar ---------------------------------------------------------------------------------------


def _marker(grammars: Grammars, text: str) -> str:
    """How the grammar names a tag: by token id where it is one special token, else as a string."""
    ids = grammars.tokenizer.encode(text, add_bos=False)
    if len(ids) == 1 and grammars.ll.is_special_token(ids[0]):
        return f"<[{ids[0]}]>"
    return json.dumps(text)


def tool_grammar(calling: ToolCalling, grammars: Grammars, answer: dict[str, Any] | None = None) -> Grammar | None:
    """The grammar of what the model may answer (None for tool_choice "none": no constraint).

    required: one call (or, with parallel calls, one or more separated by newlines), then the end. A named
    function: one call of it, then the end. auto: free text (never containing `<tool_call>`) or calls; where the tags are special
    tokens, text may also come before the calls; with `answer` (response_format's schema beside the tools,
    as an agent with tools and an output type sends), that JSON or calls. Each call is `<tool_call>\\n` +
    the call object of one allowed function (compact JSON, its arguments under the function's schema) +
    `\\n</tool_call>`."""
    if not calling.constrained:
        return None
    open_, close = _marker(grammars, OPEN), _marker(grammars, CLOSE)
    by_name = {f.name: f for f in calling.functions}
    lines = [f"fn{i}: %json {json.dumps(call_schema(by_name[n]))}" for i, n in enumerate(calling.allowed)]
    lines.append("fn: " + " | ".join(f"fn{i}" for i in range(len(calling.allowed))))
    lines.append(f'call: {open_} "\\n" fn "\\n" {close}')
    lines.append('calls: call ("\\n" call)*' if calling.parallel else "calls: call")
    if calling.mode == "auto" and answer is not None:  # a JSON answer starts with "{", a call with its tag
        lines.append(f"answer: %json {json.dumps(_with_options(answer))}")
        lines.append("start: answer | calls")
    elif calling.mode == "auto":
        special = open_.startswith("<[")
        lines.append("start: TEXT | TEXT? calls" if special else "start: TEXT | calls")
        lines.append(r"TEXT: /(.|\n)+/ & ~/(.|\n)*<tool_call>(.|\n)*/")
    else:
        lines.append("start: calls")
    try:
        return grammars.lark("\n".join(lines), "tools", f"tool_choice {calling.mode!r}")
    except GrammarError as exc:  # each schema compiled alone above; together they should too
        raise ToolError(f"the tools cannot be combined into one grammar: {exc}", "tools") from None


# -- the prompt ----------------------------------------------------------------------------------------

FALLBACK_INTRO = (
    "# Tools\n\nYou can call functions to help you answer. Their signatures, one JSON object a line:\n<tools>\n"
)
FALLBACK_FORMAT = (
    "\n</tools>\n\n"
    "To call a function, answer with one block per call and nothing after the blocks:\n"
    '<tool_call>\n{"name": "<function name>", "arguments": <the arguments as a JSON object>}\n</tool_call>\n'
    "The results come back in <tool_response></tool_response> blocks."
)


def fallback_section(calling: ToolCalling) -> str:
    """The system-prompt section that describes the tools to a template that does not read `tools`."""
    lines = "\n".join(json.dumps(f.openai(), ensure_ascii=False) for f in calling.functions)
    return FALLBACK_INTRO + lines + FALLBACK_FORMAT


def call_block(name: str, arguments: Any) -> str:
    """One call as the model writes it (the same text the grammar allows and Qwen2.5's template renders)."""
    return f"{OPEN}\n" + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False) + f"\n{CLOSE}"


def _arguments(text: str, param: str) -> Any:
    try:
        value = json.loads(text) if text.strip() else {}
    except json.JSONDecodeError as exc:
        raise ToolError(f"{param}: the arguments are not valid JSON ({exc.msg})", param) from None
    except RecursionError:  # a 2 KB body of nested brackets was a 500
        raise ToolError(f"{param}: the arguments are nested too deeply to read", param) from None
    if not isinstance(value, dict):
        raise ToolError(f"{param}: the arguments must be a JSON object", param)
    return value


def _check_tool_results(messages: Sequence[dict[str, Any]]) -> None:
    """A tool result answers a call that an earlier assistant message made, as OpenAI checks: a result for
    no call would reach the template as a reply to nothing."""
    made: set[Any] = set()
    for i, m in enumerate(messages):
        made.update(c.get("id") for c in m.get("tool_calls") or ())
        if m["role"] == "tool" and m.get("tool_call_id") not in made:
            raise ToolError(
                f"messages[{i}] is the result of tool call {m.get('tool_call_id')!r}, which no earlier assistant "
                "message made: send the assistant message with that call in its tool_calls before it",
                f"messages[{i}].tool_call_id",
            )


def template_messages(
    messages: Sequence[dict[str, Any]], calling: ToolCalling | None, template_knows_tools: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The messages and `tools` a chat template renders. `messages`: OpenAI chat messages as dicts
    (role, content as text or None, assistant `tool_calls` with `function.arguments` as a JSON string,
    tool messages with `tool_call_id`). A template that knows tools gets the calls' arguments as objects
    (as HF templates read them) and OpenAI's tool list; any other gets the fallback (docs/tools.md)."""
    _check_tool_results(messages)
    if template_knows_tools:
        out = []
        for i, m in enumerate(messages):
            m = {**m, "content": m.get("content") or ""}
            if m.get("tool_calls"):
                m["tool_calls"] = [
                    {
                        "id": c.get("id"),
                        "type": "function",
                        "function": {
                            "name": c["function"]["name"],
                            "arguments": _arguments(
                                c["function"]["arguments"], f"messages[{i}].tool_calls[{j}].function.arguments"
                            ),
                        },
                    }
                    for j, c in enumerate(m["tool_calls"])
                ]
            out.append(m)
        return out, [f.openai() for f in calling.functions] if calling is not None else None
    out = []
    for i, m in enumerate(messages):
        role, content = m["role"], m.get("content") or ""
        if m.get("tool_calls"):
            blocks = [
                call_block(
                    c["function"]["name"],
                    _arguments(c["function"]["arguments"], f"messages[{i}].tool_calls[{j}].function.arguments"),
                )
                for j, c in enumerate(m["tool_calls"])
            ]
            out.append({"role": "assistant", "content": "\n".join(([content] if content else []) + blocks)})
        elif role == "tool":
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("tool_results"):  # consecutive results: one user turn
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "tool_results": True})
        else:
            out.append({"role": role, "content": content})
    for m in out:
        m.pop("tool_results", None)
    if calling is not None:
        section = fallback_section(calling)
        if out and out[0]["role"] == "system":
            out[0] = {"role": "system", "content": out[0]["content"] + "\n\n" + section}
        else:
            out.insert(0, {"role": "system", "content": section})
    return out, None


# -- the output ----------------------------------------------------------------------------------------


@dataclass
class ToolCall:
    """One parsed call; `arguments` is the JSON text of the arguments (OpenAI sends a string)."""

    index: int
    id: str
    name: str
    arguments: str

    def openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


@dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclass(frozen=True)
class CallStarted:
    call: ToolCall  # its index, id and name (streamed with empty arguments)


@dataclass(frozen=True)
class ArgumentsDelta:
    index: int
    text: str


@dataclass(frozen=True)
class CallRepeated:
    """A call the answer may not add: equal to an earlier one of the same answer (same name, same arguments),
    or a second loose call where parallel calls are off (the grammar holds tagged calls to one). Dropped, and
    RepeatGuard ends the answer there."""

    name: str
    arguments: str


ToolEvent = ContentDelta | CallStarted | ArgumentsDelta | CallRepeated


def _held(buffer: str, tag: str) -> int:
    """How many characters at the end of `buffer` could be the start of `tag` (held back until known)."""
    for n in range(min(len(tag) - 1, len(buffer)), 0, -1):
        if tag.startswith(buffer[-n:]):
            return n
    return 0


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclass(frozen=True)
class LooseCalls:
    """What an answer's loose calls may be (see FENCE): calls of these functions, valid under their
    parameters' schemas, and none that repeats a call the conversation already made and answered (a small
    model that has its result tends to write the same call again as its answer: read as a call, an agent
    would run it until its turns ran out)."""

    schemas: Mapping[str, Any]  # function name -> its parameters' schema (objects closed)
    answered: frozenset[tuple[str, str]] = frozenset()  # (name, compact arguments) of the history's calls
    parallel: bool = True  # False (parallel_tool_calls false): one call, as the grammar allows one tagged call

    @staticmethod
    def compact(arguments: Any) -> str:
        """Arguments as reported: JSON with ", " and ": " separators (a tagged call's form)."""
        return json.dumps(arguments, ensure_ascii=False)


def _loose_opening(buffer: str, names: Mapping[str, Any]) -> Literal["no", "maybe", "yes"]:
    """Whether `buffer` opens a loose call (```json, then {"name": "<one of names>", whitespace between
    them allowed), could still open one as more text comes, or cannot."""
    i = 0
    if buffer.startswith(FENCE):
        i = len(FENCE)
    elif buffer and FENCE.startswith(buffer):
        return "maybe"

    def skip(i: int) -> int:
        while i < len(buffer) and buffer[i] in JSON_SPACE:
            i += 1
        return i

    for literal in ("{", '"name"', ":", '"'):
        i = skip(i)
        part = buffer[i : i + len(literal)]
        if not literal.startswith(part):
            return "no"
        if len(part) < len(literal):
            return "maybe"
        i += len(literal)
    end = buffer.find('"', i)
    if end < 0:
        return "maybe" if any(n.startswith(buffer[i:]) for n in names) else "no"
    return "yes" if buffer[i:end] in names else "no"


@dataclass
class ToolCallParser:
    """Generated text -> content and tool calls, fed piece by piece (streaming) or at once.

    `feed(text)` returns the events that text made certain: content (the text before the first call;
    trailing whitespace is held until more text follows, and dropped when a call follows), and each call
    once it is complete: its start (index, id, name), then its arguments. A call is reported whole
    because only then is it known not to repeat an earlier one: a repeated call (same name and arguments,
    the loop a small model falls into with parallel calls) is dropped, and `RepeatGuard` ends the answer
    there. `close()` flushes what was held at the end; an unfinished call (max_tokens) is left out. The
    whole text gives the same `content` and `calls` as its pieces do."""

    loose: LooseCalls | None = None  # what a loose call may be (None: loose calls are not read)
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    _state: Literal["text", "header", "arguments", "between", "loose", "loose_between"] = "text"
    _buffer: str = ""
    _name: str = ""  # the name of the call being read
    _not_loose: bool = False  # an opening that looked like a loose call was not one: the answer is text

    def feed(self, text: str) -> list[ToolEvent]:
        self._buffer += text
        events: list[ToolEvent] = []
        while True:
            before = (self._state, len(self._buffer))
            match self._state:
                case "text":
                    self._text(events)
                case "header":
                    self._header(events)
                case "arguments":
                    self._arguments(events)
                case "between":
                    self._between(events)
                case "loose":
                    self._loose(events, final=False)
                case "loose_between":
                    self._loose_between()
            if (self._state, len(self._buffer)) == before:
                return events

    @property
    def in_text(self) -> bool:
        """Reading free text: no call has begun (nor an opening that may be a loose call's)."""
        if self._state != "text" or self.calls:
            return False
        if self.loose is None or self.content or self._not_loose:  # as _text reads a loose call's opening
            return True
        return _loose_opening(self._buffer, self.loose.schemas) == "no"

    def close(self) -> list[ToolEvent]:
        """The end of the output: held text becomes content (outside a call); an open call is left out."""
        events: list[ToolEvent] = []
        if self._state == "loose":
            self._loose(events, final=True)
        if self._state == "text" and self._buffer:
            events.append(self._content(self._buffer))
            self._buffer = ""
        return events

    def _content(self, text: str) -> ContentDelta:
        self.content += text
        return ContentDelta(text)

    def _text(self, events: list[ToolEvent]) -> None:
        if self.loose and not self.content and not self.calls and not self._not_loose:  # whole answers only
            opening = _loose_opening(self._buffer, self.loose.schemas)
            if opening == "maybe":
                return
            if opening == "yes":
                self._state = "loose"
                return
        at = self._buffer.find(OPEN)
        if at >= 0:
            head = self._buffer[:at].rstrip()  # the whitespace before a call is not content
            if head:
                events.append(self._content(head))
            self._buffer, self._state = self._buffer[at + len(OPEN) :], "header"
            return
        # held: a possible start of the tag, and the whitespace before it (not content if a call follows)
        ready = self._buffer[: len(self._buffer) - _held(self._buffer, OPEN)].rstrip()
        if ready:
            events.append(self._content(ready))
            self._buffer = self._buffer[len(ready) :]

    def _header(self, events: list[ToolEvent]) -> None:
        match = _HEADER.match(self._buffer.lstrip("\n"))
        if match is not None:
            self._name = match.group(1)
            self._buffer, self._state = self._buffer.lstrip("\n")[match.end() :], "arguments"

    def _arguments(self, events: list[ToolEvent]) -> None:
        at = self._buffer.find(_CALL_END)
        if at < 0:
            return
        arguments, self._buffer, self._state = self._buffer[:at], self._buffer[at + len(_CALL_END) :], "between"
        if any(c.name == self._name and c.arguments == arguments for c in self.calls):
            events.append(CallRepeated(self._name, arguments))
            return
        call = ToolCall(len(self.calls), new_call_id(), self._name, arguments)
        self.calls.append(call)
        events += [CallStarted(call), ArgumentsDelta(call.index, arguments)]

    def _between(self, events: list[ToolEvent]) -> None:
        at = self._buffer.find(OPEN)
        if at >= 0:
            self._buffer, self._state = self._buffer[at + len(OPEN) :], "header"
        elif self._buffer.strip():  # the grammar allows only whitespace between calls; anything else is dropped
            self._buffer = self._buffer[len(self._buffer) - _held(self._buffer, OPEN) :]

    def _loose(self, events: list[ToolEvent], final: bool) -> None:
        """A loose call, once its object (and, fenced, the fence's end) is complete, if it is one: the call
        object of an allowed function whose arguments validate. Its arguments are reported compact, as a
        tagged call's are. Anything else, and an unfinished object at the end, is text."""
        fenced = self._buffer.startswith(FENCE)
        start = self._buffer.find("{")
        try:
            call, end = json.JSONDecoder().raw_decode(self._buffer, start)
        except json.JSONDecodeError:
            if final and self.calls:  # a later call cut off by max_tokens: left out, as a tagged one is
                self._buffer, self._state = "", "loose_between"
            elif final:
                self._as_text()
            return  # not complete yet
        if fenced:
            rest = self._buffer[end:].lstrip(JSON_SPACE)
            if not rest.startswith(_FENCE_END):
                if (rest and not _FENCE_END.startswith(rest)) or final:
                    self._as_text()  # text after the object inside the fence
                return
            end = len(self._buffer) - len(rest) + len(_FENCE_END)
        if self.loose is None or not _valid_loose(call, self.loose):
            self._as_text()
            return
        name, arguments = call["name"], LooseCalls.compact(call["arguments"])
        self._buffer, self._state = self._buffer[end:], "loose_between"
        repeat = any(c.name == name and c.arguments == arguments for c in self.calls)
        if repeat or (self.calls and not self.loose.parallel):
            events.append(CallRepeated(name, arguments))
            return
        done = ToolCall(len(self.calls), new_call_id(), name, arguments)
        self.calls.append(done)
        events += [CallStarted(done), ArgumentsDelta(done.index, arguments)]

    def _as_text(self) -> None:
        self._state, self._not_loose = "text", True

    def _loose_between(self) -> None:
        """After a loose call: another one, or the end. Text after loose calls is content."""
        rest = self._buffer.lstrip(JSON_SPACE)
        opening = _loose_opening(rest, self.loose.schemas) if rest and self.loose else "maybe"
        if opening == "yes":
            self._buffer, self._state = rest, "loose"
        elif opening == "no":
            self._buffer, self._state, self._not_loose = rest, "text", True


def _valid_loose(call: Any, loose: LooseCalls) -> bool:
    """A call object {"name", "arguments"} of a function in `loose`, its arguments valid under its schema,
    not a repeat of a call the conversation already made."""
    if not isinstance(call, dict) or set(call) != {"name", "arguments"} or not isinstance(call["name"], str):
        return False  # (a repeated "name" key leaves JSON's last value: a list or an object is unhashable)
    if call["name"] not in loose.schemas:
        return False
    if (call["name"], LooseCalls.compact(call["arguments"])) in loose.answered:
        return False
    return not any(jsonschema.Draft202012Validator(loose.schemas[call["name"]]).iter_errors(call["arguments"]))


def parse_tool_calls(text: str, loose: LooseCalls | None = None) -> ToolCallParser:
    """The whole output at once: `.content` (the text before the first call) and `.calls`."""
    parser = ToolCallParser(loose)
    parser.feed(text)
    parser.close()
    return parser


class RepeatGuard:
    """A tool grammar's constraint that ends the answer at the first repeated call.

    With parallel calls the grammar lets the model add call after call; a small model repeats its last
    call until max_tokens. Right after a call that repeats an earlier one (same name and arguments, which
    the parser drops), only the end-of-sequence token is allowed: the grammar allows it there (after a
    call the answer may end), so the output stays in the grammar and the finish reason is "tool_calls"."""

    def __init__(
        self, inner: Constraint, tokenizer: Tokenizer, loose: LooseCalls | None = None, free_text: bool = True
    ) -> None:
        self.inner = inner
        self.free_text = free_text  # False: the answer's text is response_format's JSON (tool_grammar's answer)
        self.decoder = tokenizer.stream_decoder()
        self.parser = ToolCallParser(loose)
        self.eos = torch.tensor(sorted(tokenizer.eos_ids), dtype=torch.long)
        self.repeated = False

    def allowed(self, logits: torch.Tensor) -> torch.Tensor | None:
        mask = self.inner.allowed(logits)
        if not self.repeated or mask is None:
            return mask
        only_end = torch.zeros_like(mask)
        only_end[self.eos] = mask[self.eos]
        return only_end if bool(only_end.any()) else mask

    def accept(self, token: int) -> None:
        self.inner.accept(token)
        events = self.parser.feed(self.decoder.push(token))
        self.repeated = self.repeated or any(isinstance(e, CallRepeated) for e in events)

    def finished(self) -> bool:
        return self.inner.finished()

    def stops_apply(self) -> bool:
        """In the answer's free text, until a call (tagged, or what may be a loose one) begins."""
        return self.free_text and self.parser.in_text
