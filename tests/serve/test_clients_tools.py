"""Tool calling through clients no one here wrote (test extras): the `openai` client's tools, whole and
streamed (its own stream accumulator), and langchain-openai's `ChatOpenAI(...).bind_tools([...])`, against
the real server on SmolLM2. The arguments each client hands back are validated with `jsonschema`."""

from __future__ import annotations

import importlib.util
import json

import jsonschema
import openai
import pytest
from helpers.live_server import openai_client, serving

from metronome.config import EngineConfig

LOOKUP = {
    "type": "object",
    "properties": {"city": {"type": "string", "minLength": 1}, "days": {"type": "integer", "minimum": 1, "maximum": 7}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "forecast", "description": "The weather forecast for a city.", "parameters": LOOKUP},
    }
]
ASK = [{"role": "user", "content": "What will the weather be in Lyon over the next 3 days?"}]


@pytest.fixture(scope="module")
def url(smollm):
    with serving(smollm, EngineConfig(slots=2, ctx=2048)) as live:
        yield live


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai_client(url)


def test_openai_client_tools_required_and_named(client):
    for tool_choice in ("required", {"type": "function", "function": {"name": "forecast"}}):
        out = client.chat.completions.create(
            model="metronome", messages=ASK, tools=TOOLS, tool_choice=tool_choice, temperature=0, max_tokens=120
        )
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None and choice.message.tool_calls
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.function.name == "forecast"
            jsonschema.validate(json.loads(call.function.arguments), LOOKUP)


def test_openai_client_stream_accumulates_the_same_calls(client):
    kwargs = dict(model="metronome", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120)
    whole = client.chat.completions.create(**kwargs).choices[0].message
    with client.chat.completions.stream(**kwargs) as stream:
        for _event in stream:
            pass
        final = stream.get_final_completion().choices[0]
    assert final.finish_reason == "tool_calls"
    streamed = [(c.function.name, json.loads(c.function.arguments)) for c in final.message.tool_calls]
    assert streamed == [(c.function.name, json.loads(c.function.arguments)) for c in whole.tool_calls]


def test_openai_client_sends_tool_results_back(client):
    first = client.chat.completions.create(
        model="metronome", messages=ASK, tools=TOOLS, tool_choice="required", temperature=0, max_tokens=120
    )
    call = first.choices[0].message.tool_calls[0]
    messages = [
        *ASK,
        first.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny, then rain on the third day."},
    ]
    answer = client.chat.completions.create(
        model="metronome", messages=messages, tools=TOOLS, tool_choice="none", temperature=0, max_tokens=40
    )
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


@pytest.mark.skipif(
    importlib.util.find_spec("langchain_openai") is None,
    reason="langchain-openai is a test extra: pip install -e '.[test]'",
)
def test_langchain_bind_tools(url):
    from langchain_core.messages import ToolMessage
    from langchain_openai import ChatOpenAI
    from pydantic import BaseModel, Field

    class Forecast(BaseModel):
        """The weather forecast for a city."""

        city: str = Field(description="the city")
        days: int = Field(ge=1, le=7, description="how many days ahead")

    llm = ChatOpenAI(base_url=f"{url}/v1", api_key="unused", model="metronome", temperature=0, max_tokens=120)
    bound = llm.bind_tools([Forecast], tool_choice="Forecast")
    reply = bound.invoke(ASK[0]["content"])
    assert reply.tool_calls, reply
    for call in reply.tool_calls:
        assert call["name"] == "Forecast"
        Forecast.model_validate(call["args"])  # pydantic's own check of the arguments
    streamed = None
    for chunk in bound.stream(ASK[0]["content"]):
        streamed = chunk if streamed is None else streamed + chunk
    assert [(c["name"], c["args"]) for c in streamed.tool_calls] == [(c["name"], c["args"]) for c in reply.tool_calls]
    # the call and its result go back into the history; with tool_choice "none" the model answers in text
    answer = llm.bind_tools([Forecast], tool_choice="none").invoke(
        [("human", ASK[0]["content"]), reply, ToolMessage("Sunny all week.", tool_call_id=reply.tool_calls[0]["id"])]
    )
    assert isinstance(answer.content, str) and answer.content and not answer.tool_calls
