"""Tensor-parallel decode speed and determinism on this host: the same greedy request at tp=1 (all
threads), tp=1 with the TP chunking, and tp=2 / tp=4 (threads split among the ranks). Prints tokens/s
(median of `--rounds`) and whether every run's tokens and logprobs equal the chunked tp=1 run's.

    python tools/bench_tp.py --model gemma3-270m --tp 1,2 --tokens 64 --rounds 3              # fused C++ decoder
    python tools/bench_tp.py --model gemma3-270m --weights f32 --tp 1,2 --tokens 48 --rounds 3  # torch path
"""

from __future__ import annotations

import argparse
import statistics

from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine

PROMPT = "The history of the printing press begins"


def run(model: str | None, weights: str, tp: int, shards: int | None, tokens: int, rounds: int) -> tuple:
    kernels = "torch" if weights in ("f32", "bf16") else "auto"
    config = EngineConfig(slots=1, ctx=512, weights=weights, kernels=kernels, tp=tp, tp_shards=shards, spec_tokens=0)
    engine = Engine.from_model(model, config, calibrate=False)
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, logprobs=True)
    speeds, out = [], None
    for _ in range(rounds):
        c = engine.generate(PROMPT, params, chat=False)
        decode_s = c.timings.finished - c.timings.first_token
        speeds.append((len(c.token_ids) - 1) / decode_s)
        out = (c.token_ids, tuple(ch.logprob for ch in c.choices))
    close = getattr(engine.plan.runner, "close", None)
    if close is not None:
        close()
    return statistics.median(speeds), out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--tp", default="1,2")
    p.add_argument("--shards", type=int, default=None, help="default: the model's (parallel/tp.py)")
    p.add_argument("--weights", default="auto", help="auto (int4/int8: the fused C++ decoder) or f32/bf16 (torch)")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    plain, _ = run(a.model, a.weights, 1, None, a.tokens, a.rounds)
    print(f"tp=1 unchunked (the plain plan, no tensor parallel): {plain:.1f} tok/s")
    base = None
    for tp in [int(x) for x in a.tp.split(",")]:
        speed, out = run(a.model, a.weights, tp, a.shards or _default(a.model), a.tokens, a.rounds)
        base = out if base is None else base
        print(
            f"tp={tp} chunked: {speed:.1f} tok/s ({speed / plain:.2f}x unchunked), same tokens and logprobs as tp={a.tp.split(',')[0]}: {out == base}"
        )


def _default(model: str | None) -> int:
    from metronome.model.loader import load
    from metronome.parallel.tp import default_shards

    return default_shards(load(model).config)


if __name__ == "__main__":
    main()
