"""The tensor-parallel determinism check: the same prompt and decode steps on 1, 2, 4 ranks give the same
logits bit for bit (tests/parallel/test_tp.py; `python -m metronome.parallel.check MODEL --tp 1,2,4`)."""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch

from metronome.compile.runner import Runner
from metronome.config import EngineConfig
from metronome.model.loader import load
from metronome.parallel.plan import rank_runner
from metronome.parallel.tp import Collective, Solo, TPLayout, default_shards


def sharded_runner(
    path: str | None, group: Collective, shards: int | None, slots: int = 2, ctx: int = 256, weights: str = "f32"
) -> Runner:
    """This rank's runner over its cut of the model at `path` (None: the default model): float32 on the
    torch path, or int8/int4 on the fused C++ decoder."""
    loaded = load(path)
    layout = TPLayout(group.world, group.rank, shards or default_shards(loaded.config))
    kernels = "torch" if weights in ("f32", "bf16") else "cpp"
    return rank_runner(loaded, EngineConfig(slots=slots, ctx=ctx, weights=weights, kernels=kernels), layout, group)


def greedy_trace(
    group: Collective, path: str | None, shards: int | None, prompt: list[int], steps: int, weights: str = "f32"
) -> dict[str, Any]:
    """Prefill `prompt`, then `steps` greedy decode steps: every step's logits, the decode time, and how
    the ranks exchanged."""
    runner = sharded_runner(path, group, shards, weights=weights)
    with torch.inference_mode():
        logits = [runner.prefill(prompt, 0)]
        token, pos = int(logits[-1].argmax()), len(prompt)
        t0 = time.perf_counter()
        for _ in range(steps):
            logits.append(runner.decode([0], [token], [pos])[0])
            token, pos = int(logits[-1].argmax()), pos + 1
        seconds = time.perf_counter() - t0
    return {"logits": torch.stack(logits), "decode_s": seconds, "transport": group.transport}


def main() -> None:
    from metronome.parallel.group import run_ranks

    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("model", nargs="?", default=None)
    p.add_argument("--tp", default="1,2")
    p.add_argument("--shards", type=int, default=None)
    p.add_argument("--steps", type=int, default=32)
    a = p.parse_args()
    prompt = list(range(1, 33))
    base = None
    for tp in [int(x) for x in a.tp.split(",")]:
        if tp == 1:
            trace = greedy_trace(Solo(), a.model, a.shards, prompt, a.steps)
        else:
            trace = run_ranks(tp, greedy_trace, (a.model, a.shards, prompt, a.steps), timeout_s=600)[0]
        base = trace if base is None else base
        same = torch.equal(trace["logits"], base["logits"])
        print(f"tp={tp}: {a.steps / trace['decode_s']:.1f} tok/s, logits identical to tp={a.tp.split(',')[0]}: {same}")


if __name__ == "__main__":
    main()
