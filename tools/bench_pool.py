"""Decode-step latency of the fused plan at several kernel-pool sizes, the pool resized before each round.

    python tools/bench_pool.py [--threads 1 2 3] [--live 1 8] [--steps 20] [--rounds 3] [--csrc DIR]

One SmolLM2 plan is compiled once; each round resizes the pool to every thread count in turn (so machine
load hits them alike) and times `--steps` decode steps at each number of live rows after one warm-up
step. Prints the median step in ms per (threads, live rows). `--csrc DIR` builds and loads another copy
of metronome/kernels/csrc (e.g. an older pool.cpp) to compare two pools in separate runs. With more
threads than free cores a spinning pool can take seconds per step: `--steps` is the knob.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--live", type=int, nargs="+", default=[1, 8], help="live rows per step")
    p.add_argument("--steps", type=int, default=20, help="timed steps per (threads, live) per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--csrc", type=Path, default=None, help="another copy of metronome/kernels/csrc to build")
    args = p.parse_args()

    if args.csrc is not None:
        from metronome.kernels import build

        build.SOURCE_DIR = args.csrc.resolve()  # build_directory() is keyed by the files' content

    import torch

    from metronome.compile import compile_plan
    from metronome.config import EngineConfig
    from metronome.kernels.ops import load_kernels
    from metronome.model.loader import load

    slots = max(args.live)
    plan = compile_plan(load(None), EngineConfig(slots=slots, threads=1), calibrate=False, cache=False)
    ops = load_kernels()  # the plan's own (one kernel module per process)
    times: dict[tuple[int, int], list[float]] = {(t, m): [] for t in args.threads for m in args.live}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for t in args.threads:
                ops.set_threads(t)
                time.sleep(0.2)  # the fresh workers start (a pool with the start-up race could hang otherwise)
                for m in args.live:
                    rows = list(range(m))
                    plan.decode(rows, [1] * m, [64] * m)  # warm-up: the pool's fresh workers start here
                    for _ in range(args.steps):
                        t0 = time.perf_counter()
                        plan.decode(rows, [1] * m, [64] * m)
                        times[(t, m)].append((time.perf_counter() - t0) * 1000)
    print("threads  live rows  median step ms  p90 step ms")
    for (t, m), ts in times.items():
        ts.sort()
        print(f"{t:>7}  {m:>9}  {statistics.median(ts):>14.2f}  {ts[math.ceil(0.9 * len(ts)) - 1]:>11.2f}")


if __name__ == "__main__":
    main()
