"""Structured outputs over HTTP (response_format json_schema and json_object) on SmolLM2: whole and
streamed replies validate against their schema, every choice of n, the text-completions route too; a
reply cut by max_tokens says "length"; bad schemas and keywords constrained decoding cannot enforce are
400s naming the parameter, and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from helpers.live_server import serving

from metronome.config import EngineConfig

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 30},
        "country": {"type": "string", "maxLength": 30},
        "population": {"type": "integer", "minimum": 0},
        "sights": {"type": "array", "items": {"type": "string", "maxLength": 30}, "minItems": 1, "maxItems": 3},
        "climate": {"enum": ["hot", "mild", "cold"]},
    },
    "required": ["city", "country", "population", "sights", "climate"],
}
ASK = [{"role": "user", "content": "Tell me about Lisbon as JSON."}]


def fmt(schema, name="city", strict=True):
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": strict}}


@pytest.fixture(scope="module")
def url(smollm):
    with serving(smollm, EngineConfig(slots=3, ctx=1024)) as live:
        yield live


@pytest.fixture(scope="module")
def http(url):
    with httpx.Client(base_url=url, timeout=120) as client:
        yield client


def chat(http, **body):
    r = http.post("/v1/chat/completions", json={"messages": ASK, "max_tokens": 200} | body)
    assert r.status_code == 200, r.text
    return r.json()


def test_json_schema_replies_validate_greedy_and_sampled_for_every_choice(http):
    for body in ({"temperature": 0}, {"temperature": 0.9, "seed": 4, "n": 3}):
        out = chat(http, response_format=fmt(CITY), **body)
        for choice in out["choices"]:
            assert choice["finish_reason"] == "stop"
            jsonschema.validate(json.loads(choice["message"]["content"]), CITY)


def test_stop_strings_do_not_cut_a_json_answer(http):
    """The grammar decides where a JSON answer ends: a stop string inside it (here a key and the comma
    after every value) used to cut it into JSON that does not parse, with finish_reason "stop"."""
    whole = chat(http, response_format=fmt(CITY), temperature=0)["choices"][0]
    stopped = chat(http, response_format=fmt(CITY), temperature=0, stop=[",", '"country"'])["choices"][0]
    assert stopped == whole
    jsonschema.validate(json.loads(stopped["message"]["content"]), CITY)
    free = chat(http, temperature=0, max_tokens=60)["choices"][0]["message"]["content"]
    word = free.split()[2]
    cut = chat(http, temperature=0, max_tokens=60, stop=[word])["choices"][0]
    assert (
        cut["finish_reason"] == "stop" and cut["message"]["content"] == free[: free.index(word)]
    )  # free text still stops


def test_objects_are_closed_to_their_properties(http):
    """additionalProperties unsaid: the model writes no key the schema does not list (OpenAI's strict)."""
    closed = {**CITY, "required": ["city"]}
    for seed in range(3):
        reply = json.loads(
            chat(http, response_format=fmt(closed), temperature=1.0, seed=seed)["choices"][0]["message"]["content"]
        )
        assert set(reply) <= set(CITY["properties"]) and "city" in reply


def test_streamed_json_schema_reply_validates(http):
    body = {"messages": ASK, "max_tokens": 200, "temperature": 0, "stream": True, "response_format": fmt(CITY)}
    text, finish = "", None
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                text += choice["delta"].get("content") or ""
                finish = choice["finish_reason"] or finish
    assert finish == "stop"
    jsonschema.validate(json.loads(text), CITY)
    assert json.loads(text) == json.loads(
        chat(http, response_format=fmt(CITY), temperature=0)["choices"][0]["message"]["content"]
    )


def test_json_object_and_the_completions_route(http):
    dog = [{"role": "user", "content": "Describe a dog as JSON with keys name and age."}]
    out = chat(http, messages=dog, response_format={"type": "json_object"}, temperature=0)
    assert out["choices"][0]["finish_reason"] == "stop"
    assert isinstance(json.loads(out["choices"][0]["message"]["content"]), dict)
    r = http.post(
        "/v1/completions",
        json={"prompt": "A JSON record of a city:", "max_tokens": 200, "temperature": 0, "response_format": fmt(CITY)},
    )
    assert r.status_code == 200, r.text
    jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), CITY)


def test_a_reply_cut_by_max_tokens_ends_with_length(http):
    out = chat(http, response_format=fmt(CITY), temperature=0, max_tokens=5)
    choice = out["choices"][0]
    assert choice["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 5
    assert choice["message"]["content"].startswith("{")


BAD = [  # (what, response_format, param)
    ("json_schema missing", {"type": "json_schema"}, "response_format.json_schema"),
    ("schema missing", {"type": "json_schema", "json_schema": {"name": "x"}}, "response_format.json_schema.schema"),
    (
        "schema not an object",
        {"type": "json_schema", "json_schema": {"name": "x", "schema": [1]}},
        "response_format.json_schema.schema",
    ),
    (
        "name with a space",
        {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}},
        "response_format.json_schema.name",
    ),
    (
        "strict not a boolean",
        {"type": "json_schema", "json_schema": {"name": "x", "schema": {}, "strict": "yes"}},
        "response_format.json_schema.strict",
    ),
    ("unknown type", fmt({"type": "frobnicate"}), "response_format.json_schema.schema"),
    ("uniqueItems", fmt({"type": "array", "uniqueItems": True}), "response_format.json_schema.schema"),
    ("not", fmt({"not": {"type": "string"}}), "response_format.json_schema.schema"),
    ("if/then", fmt({"if": {"type": "string"}, "then": {"minLength": 2}}), "response_format.json_schema.schema"),
    ("unknown format", fmt({"type": "string", "format": "credit-card"}), "response_format.json_schema.schema"),
    ("bad pattern", fmt({"type": "string", "pattern": "(unclosed"}), "response_format.json_schema.schema"),
    ("dangling $ref", fmt({"$ref": "#/$defs/Missing"}), "response_format.json_schema.schema"),
    (
        "unsatisfiable bounds",
        fmt({"type": "integer", "minimum": 9, "maximum": 1}),
        "response_format.json_schema.schema",
    ),
    ("unknown format type", {"type": "xml"}, "response_format.type"),
]


def test_bad_schemas_are_400s_naming_the_parameter(http):
    for what, response_format, param in BAD:
        r = http.post(
            "/v1/chat/completions", json={"messages": ASK, "max_tokens": 5, "response_format": response_format}
        )
        assert r.status_code == 400, f"{what}: {r.status_code} {r.text}"
        assert r.json()["error"]["param"] == param, f"{what}: {r.json()}"
    r = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 5, "response_format": fmt({"not": {}})})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.json_schema.schema"
    assert chat(http, max_tokens=3)["choices"][0]["finish_reason"] in ("stop", "length")  # still serving


def _engine_errors(http) -> float:
    line = next(ln for ln in http.get("/metrics").text.splitlines() if ln.startswith("metronome_engine_errors_total"))
    return float(line.split()[-1])


def test_a_grammar_that_fails_mid_answer_is_the_clients_400_not_an_engine_error(http, monkeypatch):
    """A schema past llguidance's limits, met a few tokens in, ended its request with a 500 engine_error and
    counted in metronome_engine_errors_total, as if the server had failed."""
    from metronome.engine.grammar import GrammarConstraint
    from metronome.engine.request import ConstraintError

    real = GrammarConstraint.allowed

    def fails_at_the_third_mask(self, logits):
        self.masks = getattr(self, "masks", 0) + 1
        if self.masks == 3:
            raise ConstraintError("the json_schema constraint failed: Too many items (limit 50000)")
        return real(self, logits)

    monkeypatch.setattr(GrammarConstraint, "allowed", fails_at_the_third_mask)
    before = _engine_errors(http)
    body = {"messages": ASK, "max_tokens": 40, "response_format": fmt(CITY)}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "grammar_failed" and "Too many items" in err["message"], err
    lines = [ln for ln in http.post("/v1/chat/completions", json=body | {"stream": True}).text.splitlines() if ln]
    assert json.loads(lines[-2][5:])["error"]["code"] == "grammar_failed" and lines[-1] == "data: [DONE]"
    assert _engine_errors(http) == before
