"""What sampling costs a user: greedy against sampled decoding, in process, at several live-slot counts.

    flock /tmp/metronome-bench.lock .venv/bin/python tools/bench_sampling.py [--model NAME] [--users 1 8] \
        [--tokens 200] [--threads 2]

Each level submits `users` prompts at once (`ignore_eos`, seeded) to one engine on its own thread and
prints the median tokens/s per user (first to last token) and the step profile's "sample" phase in ms a
step, for greedy, T=1 (the API's default), T=0.7 with top_p 0.9, and T=0.8 with presence and frequency
penalties of 0.3. Every level runs once unmeasured first.
To compare two builds, run it under each (an earlier commit checked out with `git worktree add` and put
first on PYTHONPATH, from another directory), alternating (docs/performance.md, "Sampling a row").
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import threading
import time

from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Delta, Engine

TOPICS = ("a robot", "the sea", "a city", "rain", "trains", "a library", "snow", "a market")
SAMPLINGS = {
    "greedy": {"temperature": 0.0},
    "T=1": {"temperature": 1.0},
    "T=0.7 top_p=0.9": {"temperature": 0.7, "top_p": 0.9},
    "T=0.8 penalties": {"temperature": 0.8, "presence_penalty": 0.3, "frequency_penalty": 0.3},
}


def level(engine: Engine, users: int, params: SamplingParams) -> tuple[float, float]:
    """(median tokens/s per user, the sample phase's ms a step) for `users` requests decoded side by side."""
    stamps: list[list[float]] = [[] for _ in range(users)]
    done = threading.Semaphore(0)

    def on_event(i: int):
        def deliver(delta: Delta) -> None:
            if delta.choices:
                stamps[i].append(time.perf_counter())
            if delta.finish_reason is not None:
                done.release()

        return deliver

    engine.profile.reset()
    for i in range(users):
        prompt = engine.tokenizer.encode(f"Write a long story about {TOPICS[i % len(TOPICS)]}.")
        engine.submit(prompt, dataclasses.replace(params, seed=i), on_event(i))
    for _ in range(users):
        if not done.acquire(timeout=600):
            raise TimeoutError(f"{users} users did not finish within 600 s")
    per_user = [(len(s) - 1) / (s[-1] - s[0]) for s in stamps if len(s) > 1]
    snapshot = engine.profile.snapshot()
    return statistics.median(per_user), 1000 * snapshot.seconds["sample"] / max(1, snapshot.steps)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="a model name, GGUF file or HF folder (default: SmolLM2)")
    p.add_argument("--users", type=int, nargs="+", default=[1, 8], help="live slots to measure at")
    p.add_argument("--tokens", type=int, default=200, help="tokens per user")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    config = EngineConfig(slots=max(args.users), spec_tokens=0, threads=args.threads)
    engine = Engine.from_model(args.model, config)
    engine.start()
    try:
        print("| sampling | users | tok/s per user | sample ms a step |\n|---|---:|---:|---:|")
        for name, fields in SAMPLINGS.items():
            params = SamplingParams(max_tokens=args.tokens, ignore_eos=True, **fields)
            for users in args.users:
                level(engine, users, params)  # unmeasured: the first level of a setting warms what it touches
                tps, sample_ms = level(engine, users, params)
                print(f"| {name} | {users} | {tps:.1f} | {sample_ms:.3f} |", flush=True)
    finally:
        engine.stop()


if __name__ == "__main__":
    main()
