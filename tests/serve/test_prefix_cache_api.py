"""The prefix cache as clients see it: `usage.prompt_tokens_details.cached_tokens` in chat and completion
bodies (whole and streamed), and the cache's counters in /metrics."""

from __future__ import annotations

import re

import httpx
import pytest
from helpers.live_server import LiveServer

from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.model.loader import load
from metronome.serve.server import ModelIdentity, ServerSettings, create_app

SYSTEM = " ".join(["the red cat and the blue dog see a green tree"] * 6)  # 60 words: 3 pages and more


@pytest.fixture(scope="module")
def served(tiny_hf):
    loaded = load(tiny_hf("llama"))
    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=256, prefix_cache_tokens=512), loaded=loaded)
    app = create_app(engine, ServerSettings(), ModelIdentity.of(loaded))
    with LiveServer(app) as url:
        yield url, engine
    engine.stop()


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    match = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert match, f"{name} is not in /metrics"
    return float(match.group(1))


def _chat(url: str, question: str, **extra) -> httpx.Response:
    messages = [{"role": "user", "content": SYSTEM}, {"role": "assistant", "content": "yes"}]
    body = {"messages": [*messages, {"role": "user", "content": question}], "max_tokens": 3, **extra}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def test_cached_tokens_in_usage_and_metrics(served):
    url, engine = served
    hits_before = _metric(url, "metronome_prompt_cached_tokens_total")
    first = _chat(url, "hello world").json()
    again = _chat(url, "what is the sun").json()  # same beginning, another question
    assert first["usage"]["prompt_tokens_details"] == {"cached_tokens": 0}
    cached = again["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < again["usage"]["prompt_tokens"] and cached % engine.prefix_cache.page == 0
    assert _metric(url, "metronome_prompt_cached_tokens_total") - hits_before == cached
    assert _metric(url, "metronome_prefix_cache_hit_tokens_total") == engine.prefix_cache.stats.hit_tokens >= cached
    assert _metric(url, "metronome_prefix_cache_pages_used") == engine.prefix_cache.used_pages > 0
    assert _metric(url, "metronome_prefix_cache_pages") == engine.prefix_cache.pages == 512 // 16


def test_a_prompt_with_several_choices_counts_its_cached_tokens_once(served):
    """n choices of one prompt: cached_tokens is part of prompt_tokens, counted once (the most any choice
    copied), not summed over the choices (it came out larger than the prompt)."""
    url, _ = served
    _chat(url, "the moon")  # its beginning is now cached
    r = _chat(url, "the stars", n=2, temperature=1.0, seed=1).json()
    cached, prompt = r["usage"]["prompt_tokens_details"]["cached_tokens"], r["usage"]["prompt_tokens"]
    assert 0 < cached < prompt, r["usage"]


def test_streamed_usage_and_completions_carry_cached_tokens(served):
    url, _engine = served
    _chat(url, "one")
    with httpx.stream(
        "POST",
        f"{url}/v1/chat/completions",
        json={
            "messages": [
                {"role": "user", "content": SYSTEM},
                {"role": "assistant", "content": "yes"},
                {"role": "user", "content": "two"},
            ],
            "max_tokens": 3,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
        timeout=60,
    ) as r:
        lines = [line for line in r.iter_lines() if line.startswith("data: {")]
    usage = httpx.Response(200, content=lines[-1][6:]).json()["usage"]
    assert usage["prompt_tokens_details"]["cached_tokens"] > 0
    text = httpx.post(f"{url}/v1/completions", json={"prompt": SYSTEM, "max_tokens": 2}, timeout=60).json()
    repeat = httpx.post(f"{url}/v1/completions", json={"prompt": SYSTEM + " sun", "max_tokens": 2}, timeout=60).json()
    assert "prompt_tokens_details" in text["usage"] and repeat["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


def test_the_responses_api_carries_cached_tokens(served):
    """`/v1/responses` reports the prefix cache's hit as `input_tokens_details.cached_tokens`, as chat does."""
    url, engine = served
    items = [{"role": "user", "content": SYSTEM}, {"role": "assistant", "content": "yes"}]
    usages = [
        httpx.post(
            f"{url}/v1/responses",
            json={"input": [*items, {"role": "user", "content": question}], "max_output_tokens": 3},
            timeout=60,
        ).json()["usage"]
        for question in ("a green tree", "the blue dog")
    ]
    cached = usages[1]["input_tokens_details"]["cached_tokens"]
    assert 0 < cached < usages[1]["input_tokens"] and cached % engine.prefix_cache.page == 0, usages
