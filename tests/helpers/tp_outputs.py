"""One greedy request on a model file at several tensor-parallel degrees, on the fused decoder."""

from __future__ import annotations

from pathlib import Path

from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine


def fused_tp_outputs(path: Path, degrees: tuple[int, ...] = (1, 2), tokens: int = 6) -> list[tuple[list, list]]:
    """(token ids, logprobs) of "a lighthouse" at each degree, each cut in 2 chunks with one thread per rank;
    fails unless every engine runs the fused decoder (the plan bench_tp times)."""
    params = SamplingParams(max_tokens=tokens, temperature=0, logprobs=True, ignore_eos=True)
    runs = []
    for tp in degrees:
        config = EngineConfig(slots=1, ctx=64, tp=tp, tp_shards=2, threads=tp, spec_tokens=0)
        engine = Engine.from_model(str(path), config, calibrate=False)
        try:
            assert "fused decoder" in engine.plan.report.kernels
            done = engine.generate("a lighthouse", params, chat=False)
            runs.append((done.token_ids, [c.logprob for c in done.choices]))
        finally:
            engine.plan.runner.close()
    return runs
