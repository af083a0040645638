"""The Responses API (`POST /v1/responses`) over real HTTP, with the openai client's `responses.create`.

A Responses request is the chat completion it is equivalent to, so greedy answers are checked against
`/v1/chat/completions` with the equivalent messages; streams against the whole response; bad bodies
against the 400 and the parameter they name.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from helpers.live_server import openai_client, serving

from metronome.config import EngineConfig
from metronome.serve.responses_api import Output

GREEDY = {"temperature": 0, "max_output_tokens": 12}
FN = {"type": "function", "name": "f", "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}}}


@pytest.fixture(scope="module")
def url(smollm):
    with serving(smollm, EngineConfig(slots=4, ctx=512)) as live:
        yield live


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai_client(url)


def _chat(client: openai.OpenAI, messages: list[dict], max_tokens: int = 12) -> openai.types.chat.ChatCompletion:
    return client.chat.completions.create(
        model="metronome", messages=messages, temperature=0, max_completion_tokens=max_tokens
    )


def test_a_string_input_with_instructions_is_the_chat_completion(client):
    r = client.responses.create(model="metronome", input="Name three colors.", instructions="Be brief.", **GREEDY)
    chat = _chat(
        client, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three colors."}]
    )
    assert r.object == "response" and r.id.startswith("resp_")
    assert r.output_text == chat.choices[0].message.content and r.output_text
    [message] = r.output
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert r.usage.input_tokens == chat.usage.prompt_tokens
    assert r.usage.output_tokens == chat.usage.completion_tokens
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    assert r.usage.input_tokens_details.cached_tokens >= 0
    # the length ran out: incomplete, as OpenAI says it (the Agents SDK raises on it)
    expected = "incomplete" if chat.choices[0].finish_reason == "length" else "completed"
    assert r.status == expected
    assert (r.incomplete_details is not None) == (expected == "incomplete")
    assert r.instructions == "Be brief." and r.max_output_tokens == GREEDY["max_output_tokens"]


def test_input_items_are_the_chat_history(client):
    items = [
        {"type": "message", "role": "developer", "content": [{"type": "input_text", "text": "Answer in one word."}]},
        {"role": "user", "content": "What color is the sky?"},
        {
            "type": "message",
            "role": "assistant",
            "id": "msg_1",
            "status": "completed",
            "content": [{"type": "output_text", "text": "Blue.", "annotations": []}],
        },
        {"role": "user", "content": [{"type": "input_text", "text": "And "}, {"type": "input_text", "text": "grass?"}]},
    ]
    r = client.responses.create(model="metronome", input=items, **GREEDY)
    chat = _chat(
        client,
        [
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "What color is the sky?"},
            {"role": "assistant", "content": "Blue."},
            {"role": "user", "content": "And grass?"},
        ],
    )
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_the_stream_is_typed_numbered_events_that_add_up_to_the_response(client):
    whole = client.responses.create(model="metronome", input="Say hello.", **GREEDY)
    events = list(client.responses.create(model="metronome", input="Say hello.", stream=True, **GREEDY))
    kinds = [e.type for e in events]
    assert kinds[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert kinds[-4:] == [
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        f"response.{whole.status}",
    ]
    assert set(kinds[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-4].text == events[-2].item.content[0].text
    final = events[-1].response
    assert final.output_text == text and final.usage.output_tokens == whole.usage.output_tokens
    item_ids = {e.item_id for e in events if hasattr(e, "item_id")} | {events[2].item.id, events[-2].item.id}
    assert len(item_ids) == 1  # every event names the one message item


def test_json_object_format_gives_json(client):
    r = client.responses.create(
        model="metronome",
        input="Give a JSON object with a name and an age.",
        text={"format": {"type": "json_object"}},
        temperature=0,
        max_output_tokens=48,
    )
    assert isinstance(json.loads(r.output_text), dict)


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "input"),
        ({"input": []}, "input"),
        ({"input": 3}, "input"),
        ({"input": "hi", "previous_response_id": "resp_123"}, "previous_response_id"),
        ({"input": "hi", "background": True}, "background"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools"),
        ({"input": "hi", "tools": [{"type": "function", "name": "bad name!"}]}, "tools[0].name"),
        ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
        ({"input": "hi", "tool_choice": {"type": "function", "name": "f"}}, "tool_choice"),
        ({"input": "hi", "tools": [FN], "tool_choice": {"type": "function", "name": "g"}}, "tool_choice.name"),
        ({"input": "hi", "tools": [FN, FN]}, "tools[1].name"),
        ({"input": "hi", "tools": [{**FN, "parameters": {"type": "array"}}]}, "tools[0].parameters"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]}, "input"),
        (  # nested too deeply to read: a RecursionError, a 500
            {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[" * 1000 + "]" * 1000}]},
            "input",
        ),
        ({"input": [{"type": "reasoning", "summary": []}]}, "input[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content[0]"),
        ({"input": [{"role": "robot", "content": "hi"}]}, "input[0].role"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0].call_id"),
        ({"input": [{"type": "function_call_output", "call_id": "c"}]}, "input[0].output"),
        ({"input": "hi", "temperature": "0.5"}, "temperature"),
        ({"input": "hi", "max_output_tokens": 0}, "max_output_tokens"),
        ({"input": "hi", "max_output_tokens": 100_000}, "max_output_tokens"),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
        (
            {"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}}},
            "text.format.schema",
        ),
        (  # a format beside tools is served (the answer or calls); its schema is still checked
            {
                "input": "hi",
                "tools": [FN],
                "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "nope"}}},
            },
            "text.format.schema",
        ),
        ({"input": "hi", "model": "gpt-4o"}, "model"),
        ({"input": "hi", "top_logprobs": 21}, "top_logprobs"),
        ({"input": "hi", "max_tool_calls": 0}, "max_tool_calls"),
        ({"input": "hi", "tools": [FN], "include": ["message.output_text.logprobs"]}, "include"),
        ({"input": "hi", "tools": [FN], "top_logprobs": 2}, "top_logprobs"),
    ],
)
def test_bad_bodies_are_400s_naming_the_parameter(url, body, param):
    r = httpx.post(f"{url}/v1/responses", json=body, timeout=60)
    assert r.status_code in (400, 404), r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_fields_the_sdk_sends_are_accepted(client):
    r = client.responses.create(
        model="metronome",
        input="Hi",
        store=False,
        include=["message.output_text.logprobs"],
        truncation="disabled",
        metadata={"run": "test"},
        parallel_tool_calls=True,
        tool_choice="none",
        **GREEDY,
    )
    assert r.metadata == {"run": "test"} and r.output_text


def test_logprobs_are_the_chat_completions_and_the_stream_adds_up_to_them(client):
    """`include` with "message.output_text.logprobs" and `top_logprobs`: the output text's tokens with
    their logprobs and alternatives, as the equivalent chat completion reports them; streamed, each text
    delta carries its tokens' entries and the done event all of them. They were silently left empty."""
    ask = {"input": "Count from one to ten in words.", **GREEDY}
    logprobs = {"include": ["message.output_text.logprobs"], "top_logprobs": 3}
    whole = client.responses.create(model="metronome", **ask, **logprobs)
    chat = client.chat.completions.create(
        model="metronome",
        messages=[{"role": "user", "content": ask["input"]}],
        temperature=0,
        max_completion_tokens=GREEDY["max_output_tokens"],
        logprobs=True,
        top_logprobs=3,
    )
    expected = [c.model_dump() for c in chat.choices[0].logprobs.content]
    got = [lp.model_dump() for lp in whole.output[0].content[0].logprobs]
    assert got == expected and len(got) == whole.usage.output_tokens
    assert all(len(e["top_logprobs"]) == 3 for e in got)
    assert "".join(e["token"] for e in got) == whole.output_text
    # top_logprobs alone asks for them too; without either there are none
    alone = client.responses.create(model="metronome", **ask, top_logprobs=1)
    assert [lp.logprob for lp in alone.output[0].content[0].logprobs] == [e["logprob"] for e in expected]
    assert client.responses.create(model="metronome", **ask).output[0].content[0].logprobs == []
    events = list(client.responses.create(model="metronome", stream=True, **ask, **logprobs))
    deltas = [lp.model_dump() for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
    [done] = [e for e in events if e.type == "response.output_text.done"]
    assert deltas == [lp.model_dump() for lp in done.logprobs] == expected
    assert [lp.model_dump() for lp in events[-1].response.output[0].content[0].logprobs] == expected


def test_entries_of_text_held_back_go_out_with_the_next_text():
    """A token whose text is held back (half of a multi-byte character, or a possible stop) reaches the
    Output with no text: its entry goes out with the next text delta, and the done event has every one."""
    events: list[dict] = []

    def event(kind: str, **fields) -> str:
        events.append({"type": kind, **fields})
        return kind

    out = Output(tools=False)
    a, b, c = ({"token": t, "logprob": -1.0, "bytes": [], "top_logprobs": []} for t in "abc")
    out.feed("", event, [a])
    out.feed("xy", event, [b])
    out.feed("z", event, [c])
    out.close("completed", event)
    deltas = [e for e in events if e["type"] == "response.output_text.delta"]
    assert [(e["delta"], e["logprobs"]) for e in deltas] == [("xy", [a, b]), ("z", [c])]
    [done] = [e for e in events if e["type"] == "response.output_text.done"]
    assert done["logprobs"] == [a, b, c] and out.items()[0]["content"][0]["logprobs"] == [a, b, c]


WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city.",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    },
    "strict": True,
}
CHAT_WEATHER = {"type": "function", "function": {k: v for k, v in WEATHER.items() if k != "type"}}


def test_a_required_tool_call_is_a_function_call_item_like_the_chat_tool_call(client):
    ask = "What is the weather in Paris?"
    r = client.responses.create(
        model="metronome",
        input=ask,
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_output_tokens=100,
    )
    chat = client.chat.completions.create(
        model="metronome",
        messages=[{"role": "user", "content": ask}],
        tools=[CHAT_WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_completion_tokens=100,
    )
    calls = [item for item in r.output if item.type == "function_call"]
    expected = chat.choices[0].message.tool_calls
    assert [(c.name, c.arguments) for c in calls] == [(c.function.name, c.function.arguments) for c in expected]
    assert calls and r.status == "completed"
    for c in calls:
        assert c.call_id.startswith("call_") and c.id.startswith("fc_") and c.status == "completed"
        assert set(json.loads(c.arguments)) == {"city"}


def test_a_streamed_tool_call_adds_up_to_the_whole_response(client):
    kwargs = dict(
        model="metronome",
        input="Weather in Oslo?",
        tools=[WEATHER],
        tool_choice="required",
        parallel_tool_calls=False,
        temperature=0,
        max_output_tokens=100,
    )
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1].response
    assert events[-1].type == "response.completed"
    assert [(i.type, i.name, i.arguments) for i in final.output] == [
        (i.type, i.name, i.arguments) for i in whole.output
    ]
    for index, item in enumerate(final.output):
        mine = [e for e in events if getattr(e, "output_index", None) == index]
        kinds = [e.type for e in mine]
        assert kinds[0] == "response.output_item.added" and kinds[-1] == "response.output_item.done"
        assert kinds[-2] == "response.function_call_arguments.done"
        pieces = "".join(e.delta for e in mine if e.type == "response.function_call_arguments.delta")
        assert pieces == mine[-2].arguments == item.arguments == mine[-1].item.arguments
        assert {e.item_id for e in mine if hasattr(e, "item_id")} == {item.id}


def test_function_call_items_and_their_outputs_are_the_chat_tool_history(client):
    items = [
        {"role": "user", "content": "What is the weather in Paris?"},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "Sunny, 21 degrees."},
    ]
    r = client.responses.create(model="metronome", input=items, tools=[WEATHER], tool_choice="none", **GREEDY)
    chat = client.chat.completions.create(
        model="metronome",
        messages=[
            items[0],
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {
                        "id": "call_1",
                        "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 21 degrees."},
        ],
        tools=[CHAT_WEATHER],
        tool_choice="none",
        temperature=0,
        max_completion_tokens=GREEDY["max_output_tokens"],
    )
    assert r.output_text == chat.choices[0].message.content
    assert r.usage.input_tokens == chat.usage.prompt_tokens


def test_a_json_schema_format_gives_output_that_validates(client):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {
        "type": "object",
        "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
        "required": ["name", "age"],
        "additionalProperties": False,
    }
    r = client.responses.create(
        model="metronome",
        input="Invent a person.",
        text={"format": {"type": "json_schema", "name": "person", "schema": schema, "strict": True}},
        temperature=0,
        max_output_tokens=60,
    )
    assert r.status == "completed" and r.text.format.type == "json_schema"
    jsonschema.validate(json.loads(r.output_text), schema)


def test_a_named_tool_choice_without_tools_is_described_in_the_responses_words(url):
    """The message showed the chat API's JSON ({"type": "function", "function": {"name": ...}}), a shape
    the Responses client never sent."""
    body = {"input": "hi", "tool_choice": {"type": "function", "name": "zz"}}
    error = httpx.post(f"{url}/v1/responses", json=body, timeout=60).json()["error"]
    assert error["param"] == "tool_choice" and "'zz'" in error["message"]
    assert '"function": {' not in error["message"], error


def test_the_chat_request_carries_the_sampling_and_merges_calls_into_the_assistant_turn():
    """Input items to chat messages: the assistant's text and the calls after it are one assistant message
    (as a chat client sends it); top_p and seed reach sampling."""
    from metronome.serve.responses_api import chat_request
    from metronome.serve.responses_schemas import ResponsesBody

    call = {"type": "function_call", "name": "get_weather", "arguments": '{"city": "Oslo"}'}
    body = ResponsesBody.model_validate(
        {
            "input": [
                {"role": "user", "content": "Weather in Oslo and Bergen?"},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]},
                dict(call, call_id="c1"),
                dict(call, call_id="c2", arguments='{"city": "Bergen"}'),
                {"type": "function_call_output", "call_id": "c1", "output": "sunny"},
                {"type": "function_call_output", "call_id": "c2", "output": "rain"},
            ],
            "top_p": 0.5,
            "seed": 7,
            "temperature": 0.9,
        }
    )
    chat = chat_request(body)
    assert (chat["top_p"], chat["seed"], chat["temperature"]) == (0.5, 7, 0.9)
    messages = chat["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant", "tool", "tool"]
    assert messages[1]["content"] == "Checking." and [c["id"] for c in messages[1]["tool_calls"]] == ["c1", "c2"]


def test_text_before_a_call_stays_an_item_and_a_cut_answer_is_incomplete():
    from metronome.serve.responses import _tool_finish
    from metronome.serve.responses_api import _status
    from metronome.serve.tools import call_block

    events: list[dict] = []

    def event(kind: str, **fields) -> str:
        events.append({"type": kind, **fields})
        return kind

    out = Output(tools=True)
    out.feed("Let me check.\n" + call_block("get_weather", {"city": "Oslo"}), event)
    out.close("completed", event)
    items = out.items()
    assert [i["type"] for i in items] == ["message", "function_call"]
    assert items[0]["content"][0]["text"].strip() == "Let me check." and items[0]["status"] == "completed"
    added = [e for e in events if e["type"] == "response.output_item.added"]
    assert [e["output_index"] for e in added] == [0, 1]
    # an answer cut by max tokens after a call stays "length" (its last call may be cut too), and incomplete
    assert (_tool_finish("length", True), _tool_finish("stop", True), _tool_finish("stop", False)) == (
        "length",
        "tool_calls",
        "stop",
    )
    assert (_status("length"), _status("tool_calls"), _status("error")) == ("incomplete", "completed", "failed")
    cut = Output(tools=False)
    cut.feed("One, two", event)
    cut.close("incomplete", event)
    assert cut.items()[0]["status"] == "incomplete"


def test_an_answer_cut_by_its_length_says_why_and_a_stream_the_engine_fails_ends_failed(tiny_hf):
    """The incomplete response names its reason (the Agents SDK reads `incomplete_details.reason`), and a
    stream whose generation fails ends with `response.failed` carrying the engine's error, not a completion."""
    from helpers.failing import FailingDecodes
    from helpers.live_server import LiveServer

    from metronome.engine import Engine
    from metronome.model.loader import load
    from metronome.serve.server import ModelIdentity, ServerSettings, create_app

    loaded = load(tiny_hf("llama"))
    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=64), loaded=loaded)
    fails = FailingDecodes(engine)
    body = {"model": "metronome", "input": "the red cat", "max_output_tokens": 3, "temperature": 0}
    try:
        with LiveServer(create_app(engine, ServerSettings(), ModelIdentity.of(loaded))) as url:
            r = httpx.post(f"{url}/v1/responses", json=body, timeout=60).json()
            assert r.get("status") == "incomplete" and r["incomplete_details"] == {"reason": "max_output_tokens"}, r
            fails.next(1)
            text = httpx.post(f"{url}/v1/responses", json={**body, "stream": True}, timeout=60).text
            events = [json.loads(ln[5:]) for ln in text.splitlines() if ln.startswith("data:")]
            assert events[-1]["type"] == "response.failed", [e["type"] for e in events]
            failed = events[-1]["response"]
            assert failed["status"] == "failed" and failed["usage"] is None
            assert failed["error"]["code"] == "engine_error" and "simulated" in failed["error"]["message"]
    finally:
        engine.stop()


def test_the_chat_request_carries_the_tools_their_choice_and_the_output_limits():
    """The Responses parameters as the chat pipeline reads them: parallel_tool_calls false stays false (one
    call), a named choice is chat's named function, max_output_tokens the completion budget, and a
    json_schema format chat's response_format."""
    from metronome.serve.responses_api import as_chat, chat_request
    from metronome.serve.responses_schemas import ResponsesBody

    body = ResponsesBody.model_validate(
        {
            "input": "Weather in Oslo?",
            "tools": [WEATHER, {"type": "function", "name": "g"}],
            "tool_choice": {"type": "function", "name": "get_weather"},
            "parallel_tool_calls": False,
            "max_output_tokens": 33,
            "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}}},
        }
    )
    chat = chat_request(body)
    assert chat["parallel_tool_calls"] is False and as_chat(body).token_budget[0] == 33
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert [t["function"]["name"] for t in chat["tools"]] == ["get_weather", "g"]
    assert chat["tools"][1]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert chat["response_format"]["json_schema"]["schema"] == {"type": "object"}
    default = chat_request(ResponsesBody.model_validate({"input": "hi", "tools": [WEATHER]}))
    assert default["parallel_tool_calls"] is True and default["tool_choice"] == "auto"


def test_an_empty_answer_is_one_empty_message_and_the_response_says_when_it_completed():
    """An answer with neither text nor calls (the model ended at once) is still one assistant message, as
    OpenAI returns it (a client reading output[0] found nothing); completed_at and incomplete_details follow
    the status; usage carries cached tokens and the timings beside the counts."""
    from metronome.serve.responses_api import ResponseShape, _status, responses_usage
    from metronome.serve.responses_schemas import ResponsesBody

    events: list[dict] = []

    def event(kind: str, **fields) -> str:
        events.append({"type": kind, **fields})
        return kind

    for tools in (False, True):
        out = Output(tools=tools)
        events.clear()
        out.feed("", event)
        out.close("completed", event)
        [message] = out.items()
        assert message["type"] == "message" and message["status"] == "completed"
        assert message["content"][0]["text"] == ""
        # the item as added is in progress with no content yet (its part is added next), as OpenAI sends it
        [added] = [e["item"] for e in events if e["type"] == "response.output_item.added"]
        assert added["status"] == "in_progress" and added["content"] == []
    shape = ResponseShape(ResponsesBody.model_validate({"input": "hi"}), "m")
    done, cut = shape.response("completed", []), shape.response("incomplete", [])
    assert isinstance(done["completed_at"], int) and done["incomplete_details"] is None
    assert cut["completed_at"] is None and cut["incomplete_details"] == {"reason": "max_output_tokens"}
    assert _status("cancelled") == "cancelled"
    usage = responses_usage(
        {
            "prompt_tokens": 7,
            "completion_tokens": 3,
            "total_tokens": 10,
            "prompt_tokens_details": {"cached_tokens": 4},
            "queue_time": 0.5,
        }
    )
    assert usage["input_tokens_details"] == {"cached_tokens": 4} and usage["queue_time"] == 0.5
    assert (usage["input_tokens"], usage["output_tokens"], usage["total_tokens"]) == (7, 3, 10)
    assert "prompt_tokens" not in usage and "prompt_tokens_details" not in usage
