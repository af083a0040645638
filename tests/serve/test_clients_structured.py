"""Structured outputs through clients no one here wrote (test extras), against the real server on
SmolLM2: the `openai` client's `chat.completions.parse()` with a pydantic model (its strict JSON schema
sent as response_format json_schema, the reply parsed back into the model), whole and streamed, and
langchain-openai's `ChatOpenAI(...).with_structured_output(Model)` (json_schema and json_mode methods)."""

from __future__ import annotations

import json
from typing import Literal

import openai
import pytest
from helpers.live_server import openai_client, serving
from pydantic import BaseModel, Field

from metronome.config import EngineConfig


class Pet(BaseModel):
    name: str = Field(max_length=20)
    kind: Literal["cat", "dog", "bird"]


class Person(BaseModel):
    name: str = Field(max_length=30)
    age: int = Field(ge=0, le=120)
    pets: list[Pet] = Field(max_length=2)


ASK = [{"role": "user", "content": "Invent a person who has a pet. Answer in JSON."}]


@pytest.fixture(scope="module")
def url(smollm):
    with serving(smollm, EngineConfig(slots=2, ctx=1024)) as live:
        yield live


@pytest.fixture(scope="module")
def client(url) -> openai.OpenAI:
    return openai_client(url)


def test_openai_parse_with_a_pydantic_model(client):
    for temperature, seed in ((0, None), (0.9, 1), (0.9, 2)):
        out = client.chat.completions.parse(
            model="metronome", messages=ASK, response_format=Person, temperature=temperature, seed=seed, max_tokens=200
        )
        message = out.choices[0].message
        assert out.choices[0].finish_reason == "stop" and message.refusal is None
        assert isinstance(message.parsed, Person)
        assert Person.model_validate_json(message.content) == message.parsed


def test_openai_parse_streamed(client):
    with client.chat.completions.stream(
        model="metronome", messages=ASK, response_format=Person, temperature=0, max_tokens=200
    ) as stream:
        final = stream.get_final_completion()
    parsed = final.choices[0].message.parsed
    assert isinstance(parsed, Person)
    whole = client.chat.completions.parse(
        model="metronome", messages=ASK, response_format=Person, temperature=0, max_tokens=200
    )
    assert whole.choices[0].message.parsed == parsed  # streamed or not, the same greedy reply


def test_openai_parse_reports_a_reply_cut_by_max_tokens(client):
    with pytest.raises(openai.LengthFinishReasonError):
        client.chat.completions.parse(model="metronome", messages=ASK, response_format=Person, max_tokens=4)


def test_openai_bad_schema_is_a_400_naming_the_parameter(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(
            model="metronome",
            messages=ASK,
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "p", "schema": {"type": "array", "uniqueItems": True}},
            },
        )
    assert err.value.body["param"] == "response_format.json_schema.schema"


@pytest.mark.parametrize("method", ["json_schema", "json_mode"])
def test_langchain_with_structured_output(url, method):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(
        model="metronome", base_url=f"{url}/v1", api_key="unused", temperature=0, max_tokens=200, max_retries=0
    )
    if method == "json_schema":
        person = llm.with_structured_output(Person, method="json_schema").invoke(ASK)
        assert isinstance(person, Person)
    else:  # json_object: the reply is any JSON object, which the client parses into a dict
        reply = llm.with_structured_output(None, method="json_mode").invoke(ASK)
        assert isinstance(reply, dict) and json.dumps(reply)
