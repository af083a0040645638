"""The registered Qwen2.5-Coder-0.5B (installed by `make install`), loaded by its short name."""

from __future__ import annotations

import pytest

from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine

pytestmark = [pytest.mark.model, pytest.mark.slow]


def test_qwen_coder_0_5b_by_short_name_answers_sensibly():
    engine = Engine.from_model("qwen2.5-coder-0.5b", EngineConfig(slots=1, ctx=512))
    assert engine.model_name.startswith("Qwen2.5 Coder 0.5B")
    assert engine.tokenizer.has_chat_template
    greedy = SamplingParams(max_tokens=48)
    capital = engine.generate([{"role": "user", "content": "What is the capital of France? One word."}], greedy)
    assert "Paris" in capital.text
    code = engine.generate(
        [{"role": "user", "content": "Write a Python function `square(x)` that returns x squared. Code only."}],
        SamplingParams(max_tokens=64),
    )
    assert "def square(x)" in code.text and "x" in code.text.split("return", 1)[1]


def test_qwen_coder_0_5b_drafts_for_itself_exactly():
    """A registered name as the draft model: speculation's output is plain decoding's, greedy and sampled."""
    config = EngineConfig(slots=1, ctx=512, spec_tokens=0)
    plain = Engine.from_model("qwen2.5-coder-0.5b", config)
    spec = Engine.from_model(
        "qwen2.5-coder-0.5b", EngineConfig(slots=1, ctx=512, spec_tokens=4, draft="qwen2.5-coder-0.5b")
    )
    edit = [
        {
            "role": "user",
            "content": "Rename `x` to `count`. Reply with the code only.\n\n"
            "def mean(values):\n    x = 0\n    total = 0\n    for v in values:\n        x += 1\n"
            "        total += v\n    return total / x\n",
        }
    ]
    poem = [{"role": "user", "content": "Write a short poem about the sea."}]  # lookup finds little: the model drafts
    for messages in (edit, poem):
        for params in (SamplingParams(max_tokens=40), SamplingParams(max_tokens=40, temperature=0.8, seed=5)):
            a, b = plain.generate(messages, params), spec.generate(messages, params)
            assert a.token_ids == b.token_ids
    assert spec.spec.accepted > 0  # the same model drafts: its greedy drafts are right
    assert spec.drafter.inner.model.inner.calls > 0  # and it did draft (LookupOrModel: where lookup stopped guessing)
