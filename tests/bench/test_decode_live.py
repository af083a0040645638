"""`metronome bench --decode-only --live 1,3`: each level decodes that many users side by side in one engine,
and every level is held to the same memory-bound step (a step reads the weights once, whatever its rows)."""

from __future__ import annotations

import pytest

from metronome.bench.decode import live_markdown, measure_decode
from metronome.engine import Engine


def test_each_level_decodes_its_users_together(tiny_hf, monkeypatch) -> None:
    batches: list[int] = []
    generate = Engine.generate

    def counting(self, prompts, params):
        batches.append(len(prompts) if isinstance(prompts[0], list) else 1)
        return generate(self, prompts, params)

    monkeypatch.setattr(Engine, "generate", counting)
    results = measure_decode(tiny_hf("llama"), threads=1, tokens=5, runs=2, ctx=64, live=(1, 3))
    # per level: a warm-up and `runs` measured calls, every one with that level's number of users
    assert batches == [1, 1, 1, 3, 3, 3]
    assert [r.live for r in results] == [1, 3]
    for r in results:
        assert len(r.runs_tokens_per_s) == len(r.runs_bandwidth) == 2 and r.tokens_per_s > 0
        assert r.weight_bytes == results[0].weight_bytes  # one plan: the same bytes per step at every level
    table = live_markdown(results)
    assert table.count("\n| 1 | ") == 1 and table.count("\n| 3 | ") == 1


def test_live_counts_must_be_positive(tiny_hf) -> None:
    with pytest.raises(ValueError, match="--live"):
        measure_decode(tiny_hf("llama"), threads=1, tokens=5, runs=1, ctx=64, live=(0, 2))


def test_a_model_shorter_than_the_bench_context_runs_in_its_own(tiny_hf) -> None:
    """The decode bench's plan asked for 1,024 tokens of context whatever the model's: a 512-token model was
    refused with 'lower --ctx', a flag bench does not have."""
    [result] = measure_decode(tiny_hf("llama"), threads=1, tokens=3, runs=1)  # the default ctx, 1,024
    assert result.tokens_per_s > 0


def test_more_output_tokens_than_the_plan_holds_are_refused_before_the_compile(tiny_hf, monkeypatch) -> None:
    """It was refused after the model had loaded and calibrated (seconds, minutes for a large model)."""

    def no_compile(*_args, **_kwargs):
        raise AssertionError("the engine was built before the refusal")

    monkeypatch.setattr(Engine, "from_model", no_compile)
    with pytest.raises(ValueError, match="--output-tokens 2000: the decode bench's plan holds 512 tokens"):
        measure_decode(tiny_hf("llama"), threads=1, tokens=2000, runs=1)  # a 512-token model
