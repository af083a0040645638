"""Tool calling in /v1/chat/completions (serve/tools.py): the parser and the fallback prompt on their own,
then over HTTP on SmolLM2 (the fallback prompt: its template does not read `tools`) for every tool_choice,
parallel calls, bad tools, a history with tool results and streaming; then Qwen2.5-Coder-0.5B (its own
template renders the tools and `<tool_call>` is a special token), skipped when it is not installed.

Every call's arguments are checked with `jsonschema`, an independent validator of the function's schema."""

from __future__ import annotations

import dataclasses
import json

import httpx
import jsonschema
import pytest
import torch
from helpers.live_server import LiveServer

from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.model import registry
from metronome.model.loader import load
from metronome.serve.server import ModelIdentity, ServerSettings, create_app
from metronome.serve.tools import (
    FALLBACK_INTRO,
    ArgumentsDelta,
    CallRepeated,
    CallStarted,
    Function,
    LooseCalls,
    RepeatGuard,
    ToolCalling,
    ToolCallParser,
    ToolError,
    call_block,
    call_schema,
    parse_tool_calls,
    template_messages,
    tool_calling,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
ADD = {
    "type": "function",
    "function": {
        "name": "add",
        "description": "Add two integers.",
        "parameters": {
            "type": "object",
            "properties": {"a": {"type": "integer"}, "b": {"type": "integer", "minimum": 0}},
            "required": ["a", "b"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ADD]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius? Also, what is 2 + 3?"}]


def _valid_calls(calls: list[dict], names: set[str]) -> list[tuple[str, dict]]:
    """Each call's name is allowed and its arguments parse and validate against the function's schema."""
    out = []
    for call in calls:
        assert call["type"] == "function" and call["id"].startswith("call_")
        name = call["function"]["name"]
        assert name in names
        arguments = json.loads(call["function"]["arguments"])
        jsonschema.validate(arguments, SCHEMAS[name])
        out.append((name, arguments))
    return out


# -- no model: the parser and the fallback prompt -------------------------------------------------------


def test_the_parser_gives_the_same_calls_whole_and_piece_by_piece():
    text = (
        "Let me check.\n"
        + call_block("get_weather", {"city": "Paris", "unit": "celsius"})
        + "\n"
        + call_block("add", {"a": 2, "b": 3})
        + "\n"
        + call_block("add", {"a": 2, "b": 3})  # repeated: dropped
        + "\n<tool_call>\n"
        + '{"name": "add", "arguments": {"a": 1'  # cut off by max_tokens: left out
    )
    whole = parse_tool_calls(text)
    assert whole.content == "Let me check."
    assert [(c.index, c.name, json.loads(c.arguments)) for c in whole.calls] == [
        (0, "get_weather", {"city": "Paris", "unit": "celsius"}),
        (1, "add", {"a": 2, "b": 3}),
    ]
    pieces = ToolCallParser()
    events = []
    for i in range(0, len(text), 3):
        events += pieces.feed(text[i : i + 3])
    events += pieces.close()
    assert pieces.content == whole.content
    assert [(c.name, c.arguments) for c in pieces.calls] == [(c.name, c.arguments) for c in whole.calls]
    started = [e.call.name for e in events if isinstance(e, CallStarted)]
    arguments = "".join(e.text for e in events if isinstance(e, ArgumentsDelta) and e.index == 1)
    assert started == ["get_weather", "add"] and json.loads(arguments) == {"a": 2, "b": 3}


def test_loose_calls_are_read_only_as_whole_answers_of_valid_calls():
    """Qwen2.5-Coder's own call shape (a ```json fence or a bare object, pretty-printed): a call where the
    whole answer is call objects of allowed functions with valid arguments, the same whole and piece by
    piece; anything else stays text, as it did before loose calls were read."""
    functions = tuple(Function(t["function"]["name"], None, t["function"]["parameters"]) for t in TOOLS)
    calling = ToolCalling(functions, "auto", ("get_weather", "add"), True)
    loose = LooseCalls(calling.loose)
    pretty = json.dumps({"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}, indent=2)
    cases = [
        (f"```json\n{pretty}\n```", "", [("get_weather", {"city": "Paris", "unit": "celsius"})]),
        (
            '{"name": "add", "arguments": {"a": 2, "b": 3}}\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n'
            + '{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}',  # the repeat is dropped
            "",
            [("add", {"a": 2, "b": 3}), ("get_weather", {"city": "Oslo", "unit": "celsius"})],
        ),
        (
            '```json\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n```\nThat adds them.',
            "That adds them.",
            [("add", {"a": 2, "b": 3})],
        ),
        ('{"name": "cat", "arguments": {"name": "Tom"}}', '{"name": "cat", "arguments": {"name": "Tom"}}', []),
        ('```json\n{"name": "add", "arguments": {"a": 2, "b": -1}}\n```', None, []),  # b below its minimum
        ('```json\n{"name": "add", "arguments": {"a": 2}}\n```', None, []),  # b missing
        ('```json\n{"name": "add", "arguments": {"a": 2, "b": 3}, "why": 1}\n```', None, []),
        ('```json\n{"name": "add", "arguments": {"a": 2, "b": 3}} and so on\n```', None, []),
        ('```json\n{"name": "add", "arguments": {"a": 2', None, []),  # cut off by max_tokens
        ("```python\nprint(1)\n```", None, []),
        ("Sure: " + f"```json\n{pretty}\n```", None, []),  # after text: an example, not a call
        # JSON's other whitespace, tabs and CR, lays a call out too (they left it as text)
        (f"```json\r\n{pretty}\r\n```", "", [("get_weather", {"city": "Paris", "unit": "celsius"})]),
        (
            '{\t"name":\t"add", "arguments": {"a": 2, "b": 3}}\r\n\t{"name": "add", "arguments": {"a": 1, "b": 1}}',
            "",
            [("add", {"a": 2, "b": 3}), ("add", {"a": 1, "b": 1})],
        ),
    ]
    for text, content, calls in cases:
        whole = parse_tool_calls(text, loose)
        assert whole.content == (text if content is None else content), text
        assert [(c.name, json.loads(c.arguments)) for c in whole.calls] == calls, text
        assert all(c.arguments == json.dumps(json.loads(c.arguments)) for c in whole.calls)  # compact, as tagged
        pieces = ToolCallParser(loose)
        for i in range(0, len(text), 3):
            pieces.feed(text[i : i + 3])
        pieces.close()
        assert (pieces.content, [(c.name, c.arguments) for c in pieces.calls]) == (
            whole.content,
            [(c.name, c.arguments) for c in whole.calls],
        ), text
        assert parse_tool_calls(text).calls == []  # without auto's functions nothing loose is read
    assert dataclasses.replace(calling, mode="required").loose == {}
    # a call the conversation already made and answered, written again as the answer, is the answer's text
    again = '```json\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n```'
    answered = LooseCalls(calling.loose, frozenset({("add", '{"a": 2, "b": 3}')}))
    assert parse_tool_calls(again, answered).calls == [] and parse_tool_calls(again, answered).content == again
    assert [c.name for c in parse_tool_calls(again.replace("3", "4"), answered).calls] == ["add"]
    # parallel_tool_calls false: the first call only (two were returned), and the answer ends there
    two = '{"name": "add", "arguments": {"a": 2, "b": 3}}\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}'
    one = ToolCallParser(LooseCalls(calling.loose, parallel=False))
    events = one.feed(two) + one.close()
    assert [c.name for c in one.calls] == ["add"] and one.content == ""
    assert any(isinstance(e, CallRepeated) for e in events)  # what RepeatGuard ends the answer on
    assert [c.name for c in parse_tool_calls(two, loose).calls] == ["add", "get_weather"]
    # a second call cut off by max_tokens is left out, as a tagged one is (it came back as content)
    cut = parse_tool_calls(two[: two.index("Oslo")], loose)
    assert [c.name for c in cut.calls] == ["add"] and cut.content == ""


def test_stop_strings_apply_only_while_the_parser_reads_free_text():
    functions = tuple(Function(t["function"]["name"], None, t["function"]["parameters"]) for t in TOOLS)
    loose = LooseCalls(ToolCalling(functions, "auto", ("get_weather", "add"), True).loose)
    tagged = ToolCallParser()
    tagged.feed("Let me check. ")
    assert tagged.in_text
    tagged.feed('<tool_call>\n{"name": "add", "arguments": {"a": 2')
    assert not tagged.in_text
    tagged.feed(', "b": 3}}\n</tool_call>\nDone')
    assert not tagged.in_text  # after a call: more calls may follow
    maybe = ToolCallParser(loose)
    maybe.feed('```json\n{"name": "get_')  # may open a loose call: not yet text
    assert not maybe.in_text
    assert not maybe.feed('weather", "arguments": {') and not maybe.in_text
    prose = ToolCallParser(loose)
    prose.feed("Paris is sunny today, ")
    assert prose.in_text


def test_text_that_only_looks_like_a_tag_is_content():
    parsed = parse_tool_calls("a < b and <tool> is not <tool_call but text  ")
    assert parsed.calls == [] and parsed.content == "a < b and <tool> is not <tool_call but text  "


def test_the_fallback_prompt_describes_the_tools_and_renders_the_history():
    calling = tool_calling(TOOLS, "none", True, None)  # "none": described, not constrained
    history = [
        {"role": "system", "content": "Be brief."},
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}}],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
    ]
    messages, tools = template_messages(history, calling, template_knows_tools=False)
    assert tools is None
    assert messages[0]["role"] == "system" and messages[0]["content"].startswith("Be brief.\n\n" + FALLBACK_INTRO)
    assert json.dumps(WEATHER) in messages[0]["content"]
    assert messages[2] == {"role": "assistant", "content": call_block("add", {"a": 2, "b": 3})}
    assert messages[3] == {"role": "user", "content": "<tool_response>\n5\n</tool_response>"}
    # a template that reads tools gets OpenAI's list, and the calls' arguments as objects
    messages, tools = template_messages(history, calling, template_knows_tools=True)
    assert [t["function"]["name"] for t in tools] == ["get_weather", "add"]
    assert messages[2]["tool_calls"][0]["function"]["arguments"] == {"a": 2, "b": 3}


def test_objects_are_closed_and_references_follow_the_arguments():
    params = {
        "type": "object",
        "properties": {
            "where": {"$ref": "#/$defs/Point"},
            "again": {"$ref": "#/properties/where"},  # a reference into the arguments' own schema
            "tags": {"type": "array", "items": {"type": "object", "properties": {"k": {"type": "string"}}}},
            "extra": {"type": "object", "properties": {}, "additionalProperties": True},
        },
        "$defs": {"Point": {"type": "object", "properties": {"x": {"type": "number"}}}},
    }
    schema = call_schema(Function("f", None, params))
    arguments = schema["properties"]["arguments"]
    assert arguments["additionalProperties"] is False
    assert arguments["properties"]["tags"]["items"]["additionalProperties"] is False
    assert arguments["properties"]["extra"]["additionalProperties"] is True  # what the schema says stays
    assert schema["$defs"]["Point"]["additionalProperties"] is False and "$defs" not in arguments
    assert arguments["properties"]["again"] == {"$ref": "#/properties/arguments/properties/where"}
    good = {"name": "f", "arguments": {"where": {"x": 1.5}, "again": {"x": 2}, "tags": [{"k": "a"}], "extra": {"a": 1}}}
    jsonschema.validate(good, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"name": "f", "arguments": {"where": {"x": 1, "y": 2}}}, schema)


def _doubling(links: int) -> dict:
    """A chain of definitions, each made of the next one twice: 2**links copies once inlined."""
    defs = {f"A{i}": {"allOf": [{"$ref": f"#/$defs/A{i + 1}"}, {"$ref": f"#/$defs/A{i + 1}"}]} for i in range(links)}
    defs[f"A{links}"] = {"type": "object", "properties": {"x": {"type": "integer"}}}
    return {"type": "object", "properties": {"a": {"$ref": "#/$defs/A0"}}, "$defs": defs}


def test_a_schema_whose_copies_double_at_each_link_is_refused_at_once():
    """A 1.3 KB schema of 16 links grew a server by 700 MB before llguidance said it was too large; at ~22
    it would have killed it. Closing it stops at MAX_SCHEMA_NODES subschemas."""
    import tracemalloc

    from metronome.engine.grammar import GrammarError
    from metronome.serve.tools import closed

    assert closed(_doubling(6))["properties"]["a"] == {"$ref": "#/$defs/A0"}  # small: served as before
    tracemalloc.start()
    with pytest.raises(GrammarError, match="more than 20000 subschemas"):
        closed(_doubling(30))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 100 << 20, peak


@pytest.mark.parametrize("properties", [5, "x", [1]])
def test_a_properties_that_is_not_an_object_is_the_schemas_fault(properties):
    """`allOf: [{"properties": 5}]` was a TypeError (a 500) while closing the schema; it is left to the
    grammar, which refuses it (a 400 naming the schema)."""
    from metronome.serve.tools import closed

    schema = {"type": "object", "allOf": [{"properties": properties}], "properties": properties}
    out = closed(schema)
    assert out["properties"] == properties and "additionalProperties" not in out


# -- SmolLM2 over HTTP ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smol_url(smollm):
    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=2048), loaded=smollm)
    app = create_app(engine, ServerSettings(), ModelIdentity.of(smollm))
    try:
        with LiveServer(app) as url:
            yield url
    finally:
        engine.stop()


def _chat(url: str, **body) -> httpx.Response:
    body = {"messages": ASK, "tools": TOOLS, "temperature": 0, "max_tokens": 160, **body}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=300)


def _ok(url: str, **body) -> dict:
    r = _chat(url, **body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


@pytest.mark.parametrize("parallel", [True, False])
def test_required_makes_calls_that_validate(smol_url, parallel):
    choice = _ok(smol_url, tool_choice="required", parallel_tool_calls=parallel)
    assert choice["finish_reason"] == "tool_calls"
    calls = _valid_calls(choice["message"]["tool_calls"], {"get_weather", "add"})
    assert len(calls) >= 1 and (parallel or len(calls) == 1)
    assert choice["message"]["content"] is None


def test_a_named_function_is_one_call_whatever_parallel_tool_calls_says(smollm):
    """OpenAI's forced function is exactly one call: with parallel calls allowed, Qwen wrote the call for four
    other cities too, and the token budget cut it (finish_reason length). Only a slow test saw it."""
    from metronome.engine.grammar import Grammars
    from metronome.model.tokenizer import Tokenizer

    grammars = Grammars(Tokenizer(smollm.tokenizer))
    try:
        for parallel in (True, False):
            named = tool_calling(TOOLS, {"type": "function", "function": {"name": "add"}}, parallel, grammars)
            assert named.mode == "function" and named.allowed == ("add",) and named.parallel is False
        assert tool_calling(TOOLS, "required", True, grammars).parallel is True
    finally:
        grammars.close()


def test_a_named_function_is_the_one_called(smol_url):
    for name in ("add", "get_weather"):
        choice = _ok(smol_url, tool_choice={"type": "function", "function": {"name": name}})
        assert choice["finish_reason"] == "tool_calls"
        assert {n for n, _ in _valid_calls(choice["message"]["tool_calls"], {name})} == {name}


def test_sampled_calls_validate_too(smol_url):
    """Sampled at temperature 1, one call each. With parallel calls allowed, SmolLM2 writes three or four
    calls for some seeds and the 160-token budget cuts them (13 of 82 seeds, with the sampler's draw before
    2026-12-07 and after it alike): which seeds do is the draw's chance, not the grammar's fault."""
    for seed in range(4):
        choice = _ok(smol_url, tool_choice="required", temperature=1.0, seed=seed, parallel_tool_calls=False)
        assert choice["finish_reason"] == "tool_calls"
        _valid_calls(choice["message"]["tool_calls"], {"get_weather", "add"})


def test_auto_answers_text_or_calls_and_none_never_calls(smol_url):
    auto = _ok(smol_url, tool_choice="auto", max_tokens=60)
    if auto["message"].get("tool_calls"):
        assert auto["finish_reason"] == "tool_calls"
        _valid_calls(auto["message"]["tool_calls"], {"get_weather", "add"})
    else:
        assert auto["finish_reason"] in ("stop", "length") and "<tool_call>" not in auto["message"]["content"]
    none = _ok(smol_url, tool_choice="none", max_tokens=60)
    assert "tool_calls" not in none["message"] and none["finish_reason"] in ("stop", "length")


def test_stop_strings_never_cut_a_call(smol_url):
    # the required call's greedy answer, then the same with stop strings found inside it: the call comes
    # back whole ("tool_calls"), where the stop string used to cut it and the answer came back empty, "stop"
    choice = _ok(smol_url, tool_choice="required", parallel_tool_calls=False)
    call = choice["message"]["tool_calls"][0]["function"]
    inside = [call["name"][:4], call["arguments"][1:5]]
    again = _ok(smol_url, tool_choice="required", parallel_tool_calls=False, stop=inside)
    assert again["finish_reason"] == "tool_calls"
    assert again["message"]["tool_calls"][0]["function"] == call


def test_a_format_beside_tools_gives_that_json_or_calls(smol_url):
    """An agent with tools and an output type sends response_format with its tools (openai-agents does):
    with auto the answer is JSON under the format's schema, or calls; with required, calls. It was a 400."""
    report = {
        "type": "object",
        "properties": {"city": {"type": "string", "maxLength": 20}, "celsius": {"type": "integer"}},
        "required": ["city", "celsius"],
    }
    fmt = {"type": "json_schema", "json_schema": {"name": "report", "schema": report, "strict": True}}
    ends = set()
    for seed in range(6):  # one call at most: with parallel calls, some seeds' three or four calls ran out of tokens
        choice = _ok(smol_url, response_format=fmt, temperature=1.0, seed=seed, stop=[","], parallel_tool_calls=False)
        ends.add(choice["finish_reason"])
        if choice["finish_reason"] == "tool_calls":
            _valid_calls(choice["message"]["tool_calls"], {"get_weather", "add"})
        else:
            assert choice["finish_reason"] == "stop" and "tool_calls" not in choice["message"], choice
            jsonschema.validate(json.loads(choice["message"]["content"]), report)
    assert ends == {"stop", "tool_calls"}  # both ways out were taken (seeds chosen to show it)
    required = _ok(smol_url, response_format=fmt, tool_choice="required")
    assert required["finish_reason"] == "tool_calls"
    _valid_calls(required["message"]["tool_calls"], {"get_weather", "add"})
    # a format constrained decoding cannot hold is refused in every mode: with required or a named function
    # it was a 200, so an agent ran this turn's tools and got the 400 on its next turn
    unusable = {"type": "json_schema", "json_schema": {"name": "r", "schema": {**report, "uniqueItems": True}}}
    named = {"type": "function", "function": {"name": "add"}}
    for choice in ("auto", "required", named):
        r = _chat(smol_url, response_format=unusable, tool_choice=choice)
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("response_format"), (choice, r.text)


def test_a_history_with_tool_results_renders_and_runs(smol_url):
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}},
                {
                    "id": "call_2",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'},
                },
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
        {"role": "tool", "tool_call_id": "call_2", "content": "Sunny, 21 degrees."},
    ]
    answer = _ok(smol_url, messages=history, tool_choice="none", max_tokens=40)
    assert answer["message"]["content"] and answer["finish_reason"] in ("stop", "length")
    again = _ok(smol_url, messages=history, tool_choice="required")
    _valid_calls(again["message"]["tool_calls"], {"get_weather", "add"})


def _streamed(url: str, **body) -> tuple[str, list[dict], str | None]:
    content, calls, finish = "", {}, None
    body = {"messages": ASK, "tools": TOOLS, "temperature": 0, "max_tokens": 160, "stream": True, **body}
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=300) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            choice = json.loads(line[6:])["choices"][0]
            delta = choice["delta"]
            content += delta.get("content") or ""
            for part in delta.get("tool_calls", ()):
                call = calls.setdefault(part["index"], {"arguments": ""})
                if "id" in part:
                    assert part["type"] == "function" and part["function"]["arguments"] == ""
                    call.update(id=part["id"], name=part["function"]["name"])
                call["arguments"] += part["function"].get("arguments", "")
            finish = choice["finish_reason"] or finish
    as_openai = [
        {"id": c["id"], "type": "function", "function": {"name": c["name"], "arguments": c["arguments"]}}
        for _, c in sorted(calls.items())
    ]
    return content, as_openai, finish


@pytest.mark.parametrize(
    "tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}, "auto"], ids=str
)
def test_streamed_deltas_reassemble_to_the_whole_answer(smol_url, tool_choice):
    whole = _ok(smol_url, tool_choice=tool_choice)
    content, calls, finish = _streamed(smol_url, tool_choice=tool_choice)
    assert finish == whole["finish_reason"]
    assert (content or None) == (whole["message"]["content"] or None)
    names = {"get_weather", "add"}
    assert _valid_calls(calls, names) == _valid_calls(whole["message"].get("tool_calls", []), names)


def test_the_openai_stream_helper_gives_the_whole_answers_message(smol_url):
    """The openai client's stream helper accumulates the deltas into a message: for an answer of calls
    only, content None as in the whole answer (the role chunk's content "" made it "")."""
    import openai

    client = openai.OpenAI(base_url=f"{smol_url}/v1", api_key="unused", max_retries=0, timeout=300)
    body = dict(model="metronome", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=160)
    whole = client.chat.completions.create(**body).choices[0].message
    with client.chat.completions.stream(**body) as stream:
        streamed = stream.get_final_completion().choices[0].message
    assert whole.content is None and streamed.content is None and whole.tool_calls
    assert [(c.function.name, c.function.arguments) for c in streamed.tool_calls] == [
        (c.function.name, c.function.arguments) for c in whole.tool_calls
    ]


BAD = [
    ({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tool_choice": "required", "tools": []}, "tool_choice"),
    (
        {"tools": [WEATHER, {"type": "function", "function": {"name": "add", "parameters": []}}]},
        "tools[1].function.parameters",
    ),
    (
        {"tools": [WEATHER, {"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
        "tools[1].function.parameters",
    ),
    (
        {
            "tools": [
                WEATHER,
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "parameters": {"type": "object", "properties": {"x": {"format": "nope"}}},
                    },
                },
            ]
        },
        "tools[1].function.parameters",
    ),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "f" * 65}}]}, "tools[0].function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"messages": [*ASK, {"role": "tool", "content": "5"}]}, "messages[1]"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_9", "content": "5"}]}, "messages[1].tool_call_id"),
    (
        {
            "messages": [
                *ASK,
                {"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "add", "arguments": "{2"}}]},
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
    ),
    (  # 2 KB of nested brackets: a RecursionError, a 500
        {
            "messages": [
                *ASK,
                {
                    "role": "assistant",
                    "tool_calls": [{"id": "c", "function": {"name": "add", "arguments": "[" * 1000 + "]" * 1000}}],
                },
                {"role": "tool", "tool_call_id": "c", "content": "x"},
            ]
        },
        "messages[1].tool_calls[0].function.arguments",
    ),
    (  # a format beside tools is served (the answer or calls); its schema is still checked
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
        "response_format.json_schema.schema",
    ),
]


def test_a_function_name_is_1_to_64_of_the_allowed_characters():
    """OpenAI's rule, checked where the tools are read (the HTTP schema checks it too, before them)."""
    for name in ("f" * 64, "a.b-c_9"):
        assert tool_calling([{"type": "function", "function": {"name": name}}], "none", True, None) is not None
    for name in ("f" * 65, "has space", "f(x)"):
        with pytest.raises(ToolError) as err:
            tool_calling([{"type": "function", "function": {"name": name}}], "none", True, None)
        assert err.value.param == "tools[0].function.name"


@pytest.mark.parametrize("body,param", BAD, ids=[p for _, p in BAD])
def test_bad_tools_are_a_400_naming_the_parameter(smol_url, body, param):
    r = _chat(smol_url, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error


# -- Qwen2.5-Coder: its own template, special-token tags ----------------------------------------------------

QWEN = registry.find("qwen2.5-coder-0.5b")


@pytest.fixture(scope="module")
def qwen_url():
    if not registry.is_installed(QWEN):
        pytest.skip("Qwen2.5-Coder-0.5B is not installed (metronome models install qwen2.5-coder-0.5b)")
    loaded = load(registry.resolve(QWEN.name))
    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=2048), loaded=loaded)
    app = create_app(engine, ServerSettings(), ModelIdentity.of(loaded))
    try:
        with LiveServer(app) as url:
            yield url, engine
    finally:
        engine.stop()


@pytest.mark.model
@pytest.mark.slow
def test_qwen_renders_tools_with_its_own_template_and_calls_them(qwen_url):
    url, engine = qwen_url
    tok = engine.tokenizer
    assert tok.template_reads_tools
    prompt = tok.render_chat(ASK, tools=[WEATHER])
    assert "<tools>" in prompt and json.dumps(WEATHER) in prompt and FALLBACK_INTRO not in prompt
    choice = _ok(url, tool_choice="required")
    assert choice["finish_reason"] == "tool_calls"
    names = {n for n, _ in _valid_calls(choice["message"]["tool_calls"], {"get_weather", "add"})}
    assert names <= {"get_weather", "add"}
    content, calls, finish = _streamed(url, tool_choice="required")
    assert finish == "tool_calls"
    assert _valid_calls(calls, {"get_weather", "add"}) == _valid_calls(
        choice["message"]["tool_calls"], {"get_weather", "add"}
    )
    history = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "5"},
    ]
    rendered = tok.render_chat(
        [
            {"role": "user", "content": "x"},
            {**history[1], "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
            history[2],
        ],
        tools=[ADD],
    )
    assert '<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call>' in rendered
    assert "<tool_response>\n5\n</tool_response>" in rendered
    answer = _ok(url, messages=history, tool_choice="none", max_tokens=40)
    assert answer["message"]["content"]


@pytest.mark.model
@pytest.mark.slow
def test_qwen_coder_calls_in_its_own_shape_are_tool_calls(qwen_url):
    """With tool_choice auto the 0.5B answers the call in a ```json fence, not in its template's tags (as
    Qwen2.5-Coder does at every size): the API reports it as a tool call, whole, streamed and through
    /v1/responses, with arguments that validate; an answer without a call stays text."""
    url, _engine = qwen_url
    ask = [{"role": "user", "content": "What's the weather in Paris?"}]
    choice = _ok(url, messages=ask, tools=[WEATHER], tool_choice="auto")
    assert choice["finish_reason"] == "tool_calls", choice
    assert _valid_calls(choice["message"]["tool_calls"], {"get_weather"})[0][0] == "get_weather"
    content, calls, finish = _streamed(url, messages=ask, tools=[WEATHER], tool_choice="auto")
    assert (content or None, finish) == (None, "tool_calls")
    assert _valid_calls(calls, {"get_weather"}) == _valid_calls(choice["message"]["tool_calls"], {"get_weather"})
    tool = {"type": "function", **WEATHER["function"]}
    r = httpx.post(
        f"{url}/v1/responses", json={"input": ask[0]["content"], "tools": [tool], "temperature": 0}, timeout=300
    )
    assert r.status_code == 200, r.text
    [item] = [o for o in r.json()["output"] if o["type"] == "function_call"]
    assert (item["name"], json.loads(item["arguments"])) == _valid_calls(calls, {"get_weather"})[0]
    haiku = _ok(url, messages=[{"role": "user", "content": "Write a haiku about rain."}], tools=[WEATHER])
    assert haiku["finish_reason"] == "stop" and haiku["message"]["content"] and "tool_calls" not in haiku["message"]


@pytest.mark.model
@pytest.mark.slow
def test_a_named_function_is_called_exactly_once(qwen_url):
    """OpenAI's forced function calls it exactly once. With parallel calls on (the default) Qwen wrote the
    call for Tokyo, then New York, London and Sydney, and a smaller budget cut it (finish_reason length)."""
    url, _engine = qwen_url
    when = {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Current time in a timezone.",
            "parameters": {"type": "object", "properties": {"tz": {"type": "string"}}, "required": ["tz"]},
        },
    }
    body = {
        "messages": [{"role": "user", "content": "What time is it in Tokyo?"}],
        "tools": [when],
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "max_tokens": 100,
    }
    choice = _ok(url, **body)
    assert choice["finish_reason"] == "tool_calls" and len(choice["message"]["tool_calls"]) == 1, choice
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])["tz"]
    content, calls, finish = _streamed(url, **body)
    assert finish == "tool_calls" and [c["function"] for c in calls] == [
        c["function"] for c in choice["message"]["tool_calls"]
    ]


@pytest.mark.model
@pytest.mark.slow
def test_a_call_cut_by_max_tokens_leaves_null_content_as_the_stream_does(qwen_url):
    """Where the tag is a special token nothing of a cut call is text: the whole answer's content was "",
    the stream's null (its role chunk, then nothing)."""
    url, _engine = qwen_url
    choice = _ok(url, tool_choice="required", max_tokens=4)
    assert choice["finish_reason"] == "length" and "tool_calls" not in choice["message"], choice
    assert choice["message"]["content"] is None
    assert _streamed(url, tool_choice="required", max_tokens=4) == ("", [], "length")


def test_schemas_too_large_or_malformed_are_400s_over_http(smol_url):
    """The doubling schema and a non-object properties were a memory blow-up and a 500."""
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": _doubling(30)}}
    r = httpx.post(f"{smol_url}/v1/chat/completions", json={"messages": ASK, "response_format": fmt}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema", r.text
    bad = {
        "type": "function",
        "function": {"name": "f", "parameters": {"type": "object", "allOf": [{"properties": 5}]}},
    }
    r = _chat(smol_url, tools=[bad], tool_choice="required")
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("tools[0]"), r.text


def test_history_edge_cases_the_clients_send():
    """Consecutive tool results are one user turn (the fallback template); empty arguments (sent for a
    function without parameters) read as {}; arguments that are JSON but not an object are refused; two
    calls with the same arguments but other names are two calls, not a repeat."""
    calling = tool_calling(TOOLS, "none", True, None)
    two_calls = [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a":2,"b":3}'}},
        {"id": "c2", "type": "function", "function": {"name": "add", "arguments": ""}},
    ]
    history = [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": two_calls},
        {"role": "tool", "tool_call_id": "c1", "content": "5"},
        {"role": "tool", "tool_call_id": "c2", "content": "6"},
    ]
    messages, _ = template_messages(history, calling, template_knows_tools=False)
    assert len(messages) == 4  # the fallback system message, the question, the calls, both results
    assert messages[-2]["content"] == call_block("add", {"a": 2, "b": 3}) + "\n" + call_block("add", {})
    assert messages[-1] == {
        "role": "user",
        "content": "<tool_response>\n5\n</tool_response>\n<tool_response>\n6\n</tool_response>",
    }
    messages, _ = template_messages(history, calling, template_knows_tools=True)
    assert messages[-3]["tool_calls"][1]["function"]["arguments"] == {}
    bad = [
        *ASK,
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [dict(two_calls[0], function={"name": "add", "arguments": "[1, 2]"})],
        },
    ]
    with pytest.raises(ToolError, match="must be a JSON object") as info:
        template_messages(bad, calling, template_knows_tools=False)
    assert info.value.param == "messages[1].tool_calls[0].function.arguments"
    text = call_block("add", {"a": 2, "b": 3}) + "\n" + call_block("get_weather", {"a": 2, "b": 3})
    assert [c.name for c in parse_tool_calls(text).calls] == ["add", "get_weather"]
    assert not any(isinstance(e, CallRepeated) for e in ToolCallParser().feed(text))


def test_parameters_without_a_type_are_an_object_schema():
    untyped = {"type": "function", "function": {"name": "f", "parameters": {"properties": {"x": {"type": "integer"}}}}}
    assert [f.name for f in tool_calling([untyped], "none", True, None).functions] == ["f"]


def test_tools_for_a_tokenizer_that_cannot_be_constrained_are_refused_unless_none():
    """`grammars` None (a tokenizer llguidance cannot read): a choice that constrains the answer is a 400
    naming `tools`, not a crash where the grammar is built; "none" only describes them, and is served."""
    for choice in ("auto", "required", {"type": "function", "function": {"name": "add"}}):
        with pytest.raises(ToolError, match="cannot be constrained") as info:
            tool_calling(TOOLS, choice, True, None)
        assert info.value.param == "tools"
    assert tool_calling(TOOLS, "none", True, None).mode == "none"


@pytest.mark.parametrize("parameters", [[], "object", 5])
def test_parameters_that_are_not_a_schema_object_name_the_parameter(parameters):
    """The HTTP schema refuses these first; a Python caller of tool_calling gets the same ToolError, not an
    AttributeError."""
    tool = {"type": "function", "function": {"name": "f", "parameters": parameters}}
    with pytest.raises(ToolError, match="must be an object") as info:
        tool_calling([WEATHER, tool], "none", True, None)
    assert info.value.param == "tools[1].function.parameters"


def test_a_date_with_its_own_pattern_keeps_it():
    """Only a date (or date-time) without a pattern gets the calendar's exact pattern: a pattern the schema
    gives is the schema's rule, and replacing it let dates through that the schema refuses."""
    from metronome.serve.tools import closed

    own = {"type": "string", "format": "date", "pattern": "^2024-"}
    assert closed(own) == own
    bare = closed({"type": "string", "format": "date"})
    assert "format" not in bare and jsonschema.Draft202012Validator(bare).is_valid("2024-02-29")
    assert not jsonschema.Draft202012Validator(bare).is_valid("2023-02-29")


def test_references_to_draft_7_definitions_follow_them_to_the_root():
    """Pydantic v1 and other draft-7 writers put definitions under "definitions": the call schema moves
    them to its root, where their references point, as it does "$defs"."""
    params = {
        "type": "object",
        "properties": {"where": {"$ref": "#/definitions/Point"}},
        "required": ["where"],
        "definitions": {"Point": {"type": "object", "properties": {"x": {"type": "number"}}, "required": ["x"]}},
    }
    schema = call_schema(Function("f", None, params))
    arguments = schema["properties"]["arguments"]
    assert "definitions" not in arguments and schema["definitions"]["Point"]["additionalProperties"] is False
    assert arguments["properties"]["where"] == {"$ref": "#/definitions/Point"}
    jsonschema.validate({"name": "f", "arguments": {"where": {"x": 1.5}}}, schema)
    for bad in ({"where": {"x": "1"}}, {"where": {"x": 1, "y": 2}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"name": "f", "arguments": bad}, schema)


class _Pieces:
    """A stand-in tokenizer for RepeatGuard: token i decodes to pieces[i]; token 0 is the end of sequence."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces
        self.eos_ids = (0,)

    def stream_decoder(self) -> "_Pieces":
        return self

    def push(self, token: int) -> str:
        return self.pieces[token]


class _AllowAll:
    """An inner constraint that allows every token but those in `refused`, and records what it accepted."""

    def __init__(self, vocab: int, refused: tuple[int, ...] = ()) -> None:
        self.vocab, self.refused = vocab, refused
        self.accepted: list[int] = []

    def allowed(self, logits: torch.Tensor) -> torch.Tensor:
        mask = torch.ones(self.vocab, dtype=torch.bool)
        mask[list(self.refused)] = False
        return mask

    def accept(self, token: int) -> None:
        self.accepted.append(token)

    def finished(self) -> bool:
        return False


def test_the_repeat_guard_ends_the_answer_at_the_first_repeated_call_and_stays_ended():
    """After a call equal to an earlier one, only the end token may follow, for every later token too (a
    newline after the repeat must not let the loop go on); where the grammar itself refuses the end token
    there, the grammar's mask stands (an empty mask would fail the request). Stop strings never apply to a
    JSON answer (free_text False), and in free text only until a call begins."""
    add = call_block("add", {"a": 2, "b": 3})
    pieces = ["", add, "\n", call_block("add", {"a": 1, "b": 1}), "Hi"]
    logits = torch.zeros(len(pieces))
    guard = RepeatGuard(_AllowAll(len(pieces)), _Pieces(pieces))
    assert guard.stops_apply()
    for token in (1, 2, 3, 2):  # two different calls: nothing repeated yet
        guard.accept(token)
        assert guard.allowed(logits).all()
    assert not guard.stops_apply()  # inside the calls
    guard.accept(1)  # the first call again
    assert guard.repeated and guard.allowed(logits).tolist() == [True, False, False, False, False]
    guard.accept(2)  # more text after the repeat: still only the end
    assert guard.repeated and guard.allowed(logits).tolist() == [True, False, False, False, False]
    assert guard.inner.accepted == [1, 2, 3, 2, 1, 2]
    no_end = RepeatGuard(_AllowAll(len(pieces), refused=(0,)), _Pieces(pieces))
    for token in (1, 2, 1):
        no_end.accept(token)
    assert no_end.repeated and no_end.allowed(logits).tolist() == [False, True, True, True, True]
    shaped = RepeatGuard(_AllowAll(len(pieces)), _Pieces(pieces), free_text=False)
    shaped.accept(4)
    assert shaped.parser.in_text and not shaped.stops_apply()


def test_text_after_loose_calls_is_not_free_text_for_stop_strings():
    """Stop strings apply until a call begins: the word Qwen2.5-Coder writes after its loose call is content,
    but a stop string in it must not cut the answer as if no call had been made."""
    functions = tuple(Function(t["function"]["name"], None, t["function"]["parameters"]) for t in TOOLS)
    parser = ToolCallParser(LooseCalls(ToolCalling(functions, "auto", ("get_weather", "add"), True).loose))
    parser.feed('{"name": "add", "arguments": {"a": 2, "b": 3}}\nThat adds them')
    assert [c.name for c in parser.calls] == ["add"] and parser.content == "That adds them"
    assert not parser.in_text


def test_a_function_without_a_description_is_described_without_one():
    """No "description": null in the tools a template renders, nor in the fallback prompt's signatures."""
    from metronome.serve.tools import fallback_section

    bare = Function("f", None, {"type": "object", "properties": {}})
    assert bare.openai() == {"type": "function", "function": {"name": "f", "parameters": bare.parameters}}
    assert "null" not in fallback_section(ToolCalling((bare,), "none", (), True))
    assert Function("g", "Does g.", {}).openai()["function"]["description"] == "Does g."


@pytest.mark.parametrize("name", [["add"], {"add": 1}])
def test_a_loose_call_whose_name_is_given_again_as_no_string_is_text(name):
    """The opening reads `{"name": "add"`, but JSON keeps a repeated key's last value: a name that is a list
    or an object was a TypeError (unhashable) in the parser, on text the model wrote."""
    functions = tuple(Function(t["function"]["name"], None, t["function"]["parameters"]) for t in TOOLS)
    loose = LooseCalls(ToolCalling(functions, "auto", ("get_weather", "add"), True).loose)
    text = '{"name": "add", "arguments": {"a": 2, "b": 3}, "name": ' + json.dumps(name) + "}"
    parsed = parse_tool_calls(text, loose)
    assert parsed.calls == [] and parsed.content == text


def test_an_object_whose_name_is_no_function_streams_as_text_at_once():
    """`{"name": "` opens what may be a loose call, held until known; once the name can no longer be one of
    the functions', the text is content at once (and stop strings apply), not held to its closing quote."""
    functions = tuple(Function(t["function"]["name"], None, t["function"]["parameters"]) for t in TOOLS)
    loose = LooseCalls(ToolCalling(functions, "auto", ("get_weather", "add"), True).loose)
    held = ToolCallParser(loose)
    assert held.feed('{"name": "ad') == [] and not held.in_text  # may be add's call
    other = ToolCallParser(loose)
    assert [e.text for e in other.feed('{"name": "Ada Lovel')] == ['{"name": "Ada Lovel'] and other.in_text


def test_a_fenced_call_whose_fence_is_never_closed_is_the_answers_text():
    """A loose call is read once its fence closes; an answer that ends inside the fence (max_tokens after
    the object) is text, whole, not lost."""
    functions = tuple(Function(t["function"]["name"], None, t["function"]["parameters"]) for t in TOOLS)
    loose = LooseCalls(ToolCalling(functions, "auto", ("get_weather", "add"), True).loose)
    for text in (
        '```json\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n',
        '```json\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n``',
    ):
        parsed = parse_tool_calls(text, loose)
        assert (parsed.calls, parsed.content) == ([], text), text


def test_qwen_may_write_text_before_its_calls():
    """Where `<tool_call>` is one special token (Qwen2.5) free text can never open a call, so with "auto"
    the grammar lets text come before the calls (with a text tag, SmolLM2's, it cannot)."""
    if not registry.is_installed(QWEN):
        pytest.skip("Qwen2.5-Coder-0.5B is not installed (metronome models install qwen2.5-coder-0.5b)")
    from metronome.engine.grammar import Grammars
    from metronome.model.tokenizer import Tokenizer
    from metronome.serve.tools import tool_grammar

    tokenizer = Tokenizer(load(registry.resolve(QWEN.name)).tokenizer)
    grammars = Grammars(tokenizer, mask_thread=False)
    grammar = tool_grammar(tool_calling(TOOLS, "auto", True, grammars), grammars)

    def takes(text: str) -> bool:
        c = grammars.constraint(grammar)
        for t in tokenizer.encode(text, add_bos=False):
            if not c.next_mask()[t]:
                return False
            c.accept(t)
        return True

    block = call_block("add", {"a": 2, "b": 3})
    assert takes("Let me check.") and takes(block) and takes("Let me check.\n" + block + "\n" + block)
    grammars.close()
