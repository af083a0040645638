"""The HTTP API fuzzed from its own OpenAPI schema by schemathesis (a test extra): over 1,000 generated cases
across every endpoint on a tiny model, with no server error, no hang, and every answer as the schema says
(every 4xx in OpenAI's error shape). `metronome bench --fuzz CASES` runs more, on any server."""

from __future__ import annotations

import importlib.util

import httpx
import pytest
from helpers.live_server import LiveServer

from metronome.bench.fuzz import run_fuzz
from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.model.loader import load
from metronome.serve.server import ModelIdentity, ServerSettings, create_app

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("schemathesis") is None, reason="schemathesis is a test extra: pip install -e '.[test]'"
)


@pytest.fixture(scope="module")
def tiny_url(tiny_hf):
    loaded = load(tiny_hf("llama"))
    engine = Engine.from_model(config=EngineConfig(slots=4, ctx=64), loaded=loaded)
    app = create_app(engine, ServerSettings(), ModelIdentity.of(loaded))
    try:
        with LiveServer(app) as url:
            yield url
    finally:
        engine.stop()


def test_the_schema_describes_every_endpoint(tiny_url):
    doc = httpx.get(f"{tiny_url}/openapi.json", timeout=30).json()
    routes = {"/health", "/metrics", "/v1/models", "/v1/models/{model_id}", "/v1/chat/completions", "/v1/completions"}
    routes |= {"/v1/responses"}
    assert routes <= set(doc["paths"])
    chat = doc["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatBody"}
    assert set(chat["responses"]["4XX"]["content"]["application/json"]["schema"]) == {"$ref"}
    model = doc["components"]["schemas"]["ChatBody"]["properties"]["model"]
    served = httpx.get(f"{tiny_url}/v1/models", timeout=30).json()["data"][0]["id"]
    assert model["anyOf"][0]["enum"] == [served, "metronome"]  # other names are a 404


def test_the_schema_names_the_served_model_and_keeps_required_fields_required(tiny_url):
    """A model id other than the served names is a 404, so the path parameter lists them; an explicit null
    reads as the default for optional fields only: a required one (messages) does not accept null."""
    doc = httpx.get(f"{tiny_url}/openapi.json", timeout=30).json()
    served = httpx.get(f"{tiny_url}/v1/models", timeout=30).json()["data"][0]["id"]
    (parameter,) = doc["paths"]["/v1/models/{model_id}"]["get"]["parameters"]
    assert parameter["schema"]["enum"] == [served, "metronome"]
    chat = doc["components"]["schemas"]["ChatBody"]
    assert "messages" in chat["required"] and "anyOf" not in chat["properties"]["messages"]
    assert {"type": "null"} in chat["properties"]["max_tokens"]["anyOf"]  # optional: null is its default


def test_fuzzing_the_api_finds_no_server_error_and_no_hang(tiny_url, tmp_path):
    # an --out folder used before: an earlier run's report (with its 500) must not count in this run's
    (tmp_path / "vcr-earlier.yaml").write_text("response:\n  status:\n    code: '500'\n")
    result = run_fuzz(tiny_url, max_examples=160, report_dir=tmp_path, request_timeout_s=30)
    print(result.summary())
    assert result.passed and "500" not in result.statuses, result.output[-6000:]
    assert result.cases >= 1000, result.output[-3000:]
    assert result.statuses["200"] > 100 and result.statuses["400"] > 100  # valid bodies generate, invalid are refused
