"""Time to first token with the first N prompt tokens in the prefix cache, against the same prompt uncached.

    flock /tmp/metronome-bench.lock .venv/bin/python tools/bench_prefix_cache.py [--rounds 9] \
        [--prefix-tokens 1000] [--suffix-tokens 24] [--busy 0] [engine flags: --slots, --ctx, ...]

One engine with the serve defaults (a calibrated plan, its own stepping thread, as `metronome serve` runs it).
Each round submits, one after another:
- uncached: a prompt whose first `--prefix-tokens` tokens were never seen (a fresh text each round);
- cached: a prompt whose first `--prefix-tokens` tokens an earlier request already ran (its pages pooled),
  then a suffix of its own (`--suffix-tokens`, never seen).
Both have the same length and ask for one token; TTFT is the engine's submitted -> first token stamp. With
`--busy K`, K other requests decode throughout (their prompts chunked beside: the `--prefill-chunk` regime).
Prints medians, the ratio cached/uncached, the pool's copy time per cached request, and checks that both
variants of one prompt give the same first token and logprob (bitwise) as a control.
"""

from __future__ import annotations

import argparse
import random
import statistics
import threading

from metronome.args import add_engine_args, add_model_arg, engine_config
from metronome.config import SamplingParams
from metronome.engine import Engine
from metronome.engine.request import Delta, Request
from metronome.model.loader import load

WORDS = (
    "river stone morning light garden window paper letter music engine silver forest ocean winter summer "
    "market station bridge tower castle valley harbor village mountain candle shadow thunder whisper "
    "journey lantern meadow orchard compass anchor feather ribbon marble copper velvet crystal"
).split()
ONE = SamplingParams(max_tokens=1, ignore_eos=True, logprobs=True)


def text_tokens(engine: Engine, seed: int, n: int) -> list[int]:
    """Exactly `n` token ids of fresh pseudo-random prose (no BOS), different for every seed."""
    rng = random.Random(seed)
    ids: list[int] = []
    while len(ids) < n:
        ids += engine.tokenizer.encode(" ".join(rng.choice(WORDS) for _ in range(200)) + ".", add_bos=False)
    return ids[:n]


def timed(engine: Engine, prompt: list[int]) -> tuple[Request, float]:
    """Submit, wait for the end (the engine steps on its own thread), return the request and TTFT in ms."""
    done = threading.Event()

    def on_event(delta: Delta) -> None:
        if delta.finish_reason is not None:
            done.set()

    req = engine.submit(prompt, ONE, on_event)
    if not done.wait(timeout=300):
        raise TimeoutError("a request did not finish within 300 s")
    if req.finish_reason == "error":
        raise RuntimeError("the engine failed a request")
    return req, (req.timings.first_token - req.timings.submitted) * 1000


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arg(p)
    add_engine_args(p)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--prefix-tokens", type=int, default=1000)
    p.add_argument("--suffix-tokens", type=int, default=24)
    p.add_argument("--busy", type=int, default=0, help="requests decoding throughout (default 0)")
    args = p.parse_args()
    engine = Engine.from_model(config=engine_config(args), loaded=load(args.model), calibrate=True)
    if engine.prefix_cache is None:
        raise SystemExit(f"no prefix cache in this plan: {engine.plan.report.prefix_cache_note}")
    r = engine.plan.report
    print(
        f"{engine.model_name}: {r.weights}, {r.slots} slots x {r.ctx}, prefill_chunk {engine.config.prefill_chunk}, "
        f"prefix cache {r.prefix_cache_bytes / 1e6:.0f} MB ({engine.prefix_cache.pages} pages of "
        f"{engine.prefix_cache.page}); prompts {args.prefix_tokens} + {args.suffix_tokens} tokens, {args.busy} busy"
    )
    engine.start()
    busy = [
        engine.submit(
            text_tokens(engine, 10_000 + i, 32), SamplingParams(max_tokens=engine.config.ctx - 64, ignore_eos=True)
        )
        for i in range(args.busy)
    ]
    bos = [engine.tokenizer.bos_id] if engine.tokenizer.bos_id is not None else []
    shared = bos + text_tokens(engine, 1, args.prefix_tokens - len(bos))
    timed(engine, shared + text_tokens(engine, 2, args.suffix_tokens))  # the shared prefix, pooled
    rows = []
    for i in range(args.rounds):
        fresh = bos + text_tokens(engine, 100 + i, args.prefix_tokens - len(bos))
        suffix = text_tokens(engine, 1000 + i, args.suffix_tokens)
        cold, cold_ms = timed(engine, fresh + suffix)
        load_before = engine.prefix_cache.stats.load_s
        warm, warm_ms = timed(engine, shared + suffix)
        copy_ms = (engine.prefix_cache.stats.load_s - load_before) * 1000  # its pages into its slot
        rows.append((cold_ms, warm_ms, warm.cached_tokens, copy_ms, warm.predicted_ttft_ms, cold.predicted_ttft_ms))
        print(
            f"round {i}: uncached {cold_ms:7.1f} ms   cached {warm_ms:6.1f} ms ({warm.cached_tokens} tokens copied, "
            f"loaded in {copy_ms:.2f} ms)   ratio {warm_ms / cold_ms:.3f}"
        )
    # control: the same prompt served from the cache and computed (it was pooled by its uncached run above)
    last = fresh + suffix
    again, _ = timed(engine, last)
    assert again.cached_tokens > 0 and (again.choices[0].token, again.choices[0].logprob) == (
        cold.choices[0].token,
        cold.choices[0].logprob,
    ), "the cached run's first token differs from the computed one"
    for b in busy:
        engine.cancel(b)
    engine.stop()
    cold_med = statistics.median(r[0] for r in rows)
    warm_med = statistics.median(r[1] for r in rows)
    print(
        f"\nmedians over {args.rounds} rounds: uncached {cold_med:.1f} ms, cached {warm_med:.1f} ms "
        f"({statistics.median(r[2] for r in rows):.0f} tokens from cache), ratio {warm_med / cold_med:.3f}; "
        f"pages loaded in {statistics.median(r[3] for r in rows):.2f} ms per cached request; predicted TTFT "
        f"{statistics.median(r[5] for r in rows):.1f} -> {statistics.median(r[4] for r in rows):.1f} ms"
    )
    stats = engine.prefix_cache.stats
    print(
        f"pool stores (after a request's first token or end, off its TTFT): {stats.stored_pages} pages in "
        f"{stats.store_s * 1000:.1f} ms ({stats.store_s * 1e6 / max(1, stats.stored_pages):.0f} µs a page)"
    )
    print(f"engine profile:\n{engine.profile.table()}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
