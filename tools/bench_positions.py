"""Decode speed where the users sit deep in their contexts: one request per `--contexts` length, all
decoding together, in process.

    flock /tmp/metronome-bench.lock .venv/bin/python tools/bench_positions.py --model gemma3-270m \
        --contexts 1500 [--tokens 128] [--rounds 3] [--threads 2]
    ... --model smollm2-135m --contexts 200 400 600 800 1000 1200 1400 1600
    ... --model smollm2-135m --contexts 1900 1900 1900 1900 1900 1900 1900 1900 --kv-cache auto int8

Each round sends new prompts of random tokens of those lengths once for one token, so that the prefix cache
holds them, then again for `--tokens` greedy tokens each (`ignore_eos`): the second run's prompts come from
the cache, and its steps are decode steps at the users' own positions. It prints, per round, the median
plan call of the steps where every user decodes (`plan.decode` timed around the call) and the users'
median decode rate (tokens after the first over the time after the first). The rates include the step's
Python; the plan calls do not. To compare two builds, run it under each (an earlier commit checked out with
`git worktree add` and put first on PYTHONPATH), alternating, and compare the medians: one process cannot
load two builds of the kernels. KV cache formats (--kv-cache auto int8) run side by side in one process,
each round on the same prompts. docs/performance.md ("Attention's units dealt by cost") has figures.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

from metronome.config import EngineConfig, KvCache, SamplingParams
from metronome.engine import Engine


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--contexts", type=int, nargs="+", required=True, help="prompt tokens, one user each")
    p.add_argument("--tokens", type=int, default=128, help="greedy tokens each user decodes")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--kv-cache", nargs="+", default=["auto"], choices=KvCache.choices(), help="KV cache formats, side by side"
    )
    a = p.parse_args()
    if a.rounds < 1 or a.tokens < 2 or min(a.contexts) < 1:
        raise SystemExit("--rounds must be at least 1, --tokens at least 2 and every --contexts length at least 1")
    slots = max(8, len(a.contexts))
    # a prefix cache that holds every prompt (else some run again, beside the others' decode steps)
    cache = max(EngineConfig.prefix_cache_tokens, sum(a.contexts) + 256 * len(a.contexts))
    calls: list[tuple[int, float]] = []  # (rows, seconds) of every plan call
    engines = {}
    for kv in a.kv_cache:
        config = EngineConfig(slots=slots, threads=a.threads, spec_tokens=0, prefix_cache_tokens=cache, kv_cache=kv)
        engine = engines[kv] = Engine.from_model(a.model, config)
        if max(a.contexts) + a.tokens > engine.config.ctx:
            raise SystemExit(f"--contexts plus --tokens must fit the plan's context ({engine.config.ctx} tokens)")
        engine.plan.decode = timed(engine.plan.decode, calls)  # an instance attribute: this plan only
    vocab = next(iter(engines.values())).plan.cfg.vocab_size
    rng = random.Random(a.seed)
    steps: dict[str, list[float]] = {kv: [] for kv in engines}
    rates: dict[str, list[float]] = {kv: [] for kv in engines}
    for r in range(a.rounds):
        prompts = [[rng.randrange(100, vocab - 100) for _ in range(n)] for n in a.contexts]
        for kv, engine in engines.items():  # side by side: each format in turn, on the same prompts
            engine.generate(prompts, SamplingParams(max_tokens=1), chat=False)  # into the prefix cache
            calls.clear()
            done = engine.generate(prompts, SamplingParams(max_tokens=a.tokens, ignore_eos=True), chat=False)
            full = [s for rows, s in calls if rows == len(a.contexts)]
            step = 1000 * statistics.median(full) if full else float("nan")
            rate = statistics.median(
                (len(c.token_ids) - 1) / (c.timings.finished - c.timings.first_token) for c in done
            )
            steps[kv].append(step)
            rates[kv].append(rate)
            print(
                f"round {r + 1}, KV {kv}: {len(full)} steps of {len(a.contexts)} decoding users, plan call median "
                f"{step:.2f} ms; per user {rate:.1f} tok/s",
                flush=True,
            )
    for kv in engines:
        print(
            f"{a.model}, KV {kv}, contexts {a.contexts}, {a.threads} threads: plan call "
            f"{statistics.median(steps[kv]):.2f} ms, per user {statistics.median(rates[kv]):.1f} tok/s "
            f"(medians of {a.rounds} rounds; KV cache {engines[kv].plan.report.kv_cache_bytes / 1e6:.0f} MB)"
        )


def timed(decode: Callable, calls: list[tuple[int, float]]) -> Callable:
    """`decode`, recording (rows, seconds) of every call into `calls`."""

    def timed_decode(slots, tokens, positions, logit_rows=None):
        start = time.perf_counter()
        try:
            return decode(slots, tokens, positions, logit_rows)
        finally:
            calls.append((len(slots), time.perf_counter() - start))

    return timed_decode


if __name__ == "__main__":
    main()
