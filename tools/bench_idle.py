"""TTFT of a request that arrives after the engine idled, against back-to-back requests: what a voice user
who pauses between turns gets. One short chat request at a time (8 greedy tokens), after each gap of
`--gaps` seconds without work; medians over `--requests` requests per gap.

    flock /tmp/metronome-bench.lock .venv/bin/python tools/bench_idle.py [--model smollm2-135m] \
        [--gaps 0 1 3] [--requests 8] [--no-pin-threads] [--url http://127.0.0.1:8000]

In process (the default) it runs the engine on its own thread, as `metronome serve` does, and reports the
engine's TTFT (submit to first token) and the median gap between the next tokens. With `--url` it streams
from a running server instead and reports the client's TTFT (send to first content) beside the engine's
(`usage.time_to_first_token`). Each prompt opens with a number of its own, so no request's prompt comes from
the prefix cache. To compare with and without pinned threads, run it twice (`--no-pin-threads`), in turn.
docs/performance.md ("Threads pinned to cores") has figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time

from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Delta, Engine

TEXT = "Tell me a long story about a lighthouse keeper named Ana who finds a bottle with a map inside."
TOKENS = 8


def in_process(engine: Engine, n: int) -> tuple[float, float]:
    """(TTFT ms, median gap of the next tokens ms) of request number `n`, on the engine's thread."""
    ids = engine.encode_prompt([{"role": "user", "content": f"({n}) {TEXT}"}], True)
    stamps: list[float] = []
    done = threading.Event()

    def on_event(delta: Delta) -> None:
        stamps.append(time.perf_counter())
        if delta.finish_reason is not None:
            done.set()

    req = engine.submit(ids, SamplingParams(max_tokens=TOKENS, temperature=0.0, ignore_eos=True), on_event)
    if not done.wait(30):
        raise TimeoutError(f"request {n} did not finish within 30 s")
    gaps = [b - a for a, b in zip(stamps, stamps[1:])]
    return (req.timings.first_token - req.timings.submitted) * 1e3, statistics.median(gaps) * 1e3


def served(client, url: str, n: int) -> tuple[float, float]:
    """(client's TTFT ms, the engine's TTFT ms from `usage`) of request number `n`, streamed from `url`."""
    body = {
        "messages": [{"role": "user", "content": f"({n}) {TEXT}"}],
        "max_tokens": TOKENS,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, first, usage = time.perf_counter(), None, None
    with client.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
            usage = chunk.get("usage") or usage
    if first is None or usage is None:
        raise RuntimeError(f"request {n}: the stream ended without content or usage")
    return (first - start) * 1e3, usage["time_to_first_token"] * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m", help="in process: the model (default smollm2-135m)")
    p.add_argument("--url", help="measure a running server instead (e.g. http://127.0.0.1:8000)")
    p.add_argument("--gaps", type=float, nargs="+", default=[0.0, 1.0, 3.0], help="idle seconds before each request")
    p.add_argument("--requests", type=int, default=8, help="requests per gap")
    p.add_argument("--no-pin-threads", dest="pin_threads", action="store_false", help="in process: EngineConfig's")
    args = p.parse_args()
    if args.url:
        import httpx

        client = httpx.Client(timeout=60)
        run = lambda n: served(client, args.url.rstrip("/"), n)  # noqa: E731
        names = ("client TTFT", "engine TTFT")
    else:
        config = EngineConfig(spec_tokens=0, pin_threads=args.pin_threads)
        engine = Engine.from_model(args.model, config)
        print(f"threads pinned to CPUs {engine.plan.report.cpus or 'none (the OS places them)'}")
        engine.start()
        run = lambda n: in_process(engine, n)  # noqa: E731
        names = ("TTFT", "next tokens' gap")
    for n in range(3):  # warm-up: the first requests after start-up pay for more than idling
        run(n)
    for g, gap in enumerate(args.gaps):
        results = []
        for i in range(args.requests):
            time.sleep(gap)
            results.append(run(1000 * (g + 1) + i))
        first, second = zip(*results)
        print(
            f"after {gap:g} s idle: {names[0]} median {statistics.median(first):.1f} ms "
            f"(range {min(first):.1f}-{max(first):.1f}), {names[1]} median {statistics.median(second):.1f} ms"
        )
    if not args.url:
        engine.stop()


if __name__ == "__main__":
    main()
