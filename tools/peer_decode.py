"""Single-stream decode and 1,000-token prefill in process: metronome beside llama.cpp (llama-cpp-python), same
GGUF, same thread count, same prompt ids, alternating rounds.

    flock /tmp/metronome-bench.lock .venv/bin/python tools/peer_decode.py --model qwen2.5-coder-0.5b \
        [--threads 2] [--rounds 3] [--tokens 128] [--prompt-tokens 1000]

Decode: greedy tokens/s after a short prompt, ignoring EOS (both engines run the same number of steps).
Prefill: seconds from a cold 1,000-token prompt (a different one each round) to its first token
(metronome: a fresh request's TTFT in its one-slot plan; llama.cpp: `eval` of the prompt plus the first
sample). Medians over rounds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import numpy as np
import torch

from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine
from metronome.model.loader import load
from metronome.serve.usage import groq_timings

SHORT = "Write a long story about a lighthouse keeper and the sea."


def long_prompt_ids(engine: Engine, n: int, part: int) -> list[int]:
    """The `part`-th n tokens of Python's help topics: a different prompt each round, so metronome's prefix
    cache (on by default) cannot serve a later round from an earlier one."""
    from pydoc_data.topics import topics

    ids = engine.tokenizer.encode("\n\n".join(topics[k] for k in sorted(topics)))
    if len(ids) < (part + 1) * n:
        raise SystemExit(f"--prompt-tokens {n} x rounds is more text than the help topics hold ({len(ids)} tokens)")
    return ids[part * n : (part + 1) * n]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="qwen2.5-coder-0.5b")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=1000)
    a = p.parse_args()
    try:
        from llama_cpp import Llama
    except ModuleNotFoundError:  # was a traceback, after the arguments were read
        raise SystemExit(
            "tools/peer_decode.py needs llama-cpp-python, the llama.cpp peer: `make bench-peers`"
        ) from None

    torch.set_num_threads(a.threads)
    loaded = load(a.model)
    ctx = a.prompt_tokens + a.tokens + 64
    engine = Engine.from_model(config=EngineConfig(slots=1, ctx=ctx, threads=a.threads, spec_tokens=0), loaded=loaded)
    llm = Llama(model_path=str(loaded.path), n_ctx=ctx, n_batch=ctx, n_threads=a.threads, verbose=False)
    short = engine.encode_prompt(SHORT)
    longs = [long_prompt_ids(engine, a.prompt_tokens, r) for r in range(a.rounds)]
    params = SamplingParams(max_tokens=a.tokens, ignore_eos=True)
    first = SamplingParams(max_tokens=1, ignore_eos=True)

    def llama_decode() -> float:
        llm.reset()
        llm.eval(short)
        started = time.perf_counter()
        for _ in range(a.tokens - 1):
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            llm.eval([token])
        return (a.tokens - 1) / (time.perf_counter() - started)

    def llama_ttft(long: list[int]) -> float:
        llm.reset()
        started = time.perf_counter()
        llm.eval(long)
        int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return time.perf_counter() - started

    def ours_decode() -> float:
        c = engine.generate(short, params)
        return (len(c.token_ids) - 1) / groq_timings(c.timings)["completion_time"]

    def ours_ttft(long: list[int]) -> float:
        c = engine.generate(long, first)
        return groq_timings(c.timings)["time_to_first_token"]

    ours_decode(), llama_decode()  # warm-up
    rates: dict[str, list[float]] = {"metronome": [], "llama.cpp": []}
    ttfts: dict[str, list[float]] = {"metronome": [], "llama.cpp": []}
    for long in longs:
        rates["metronome"].append(ours_decode())
        rates["llama.cpp"].append(llama_decode())
        ttfts["metronome"].append(ours_ttft(long))
        ttfts["llama.cpp"].append(llama_ttft(long))
    print(
        f"{a.model} ({loaded.file_type}), {a.threads} threads, metronome plan {engine.plan.weights}, "
        f"medians of {a.rounds} rounds"
    )
    print(f"| engine | decode tok/s (in process) | TTFT of a {a.prompt_tokens}-token prompt (s) |\n|---|---:|---:|")
    for name in rates:
        print(f"| {name} | {statistics.median(rates[name]):.1f} | {statistics.median(ttfts[name]):.2f} |")
    for name in rates:  # the rounds behind the medians (these machines' speed drifts within minutes)
        each = ", ".join(f"{x:.1f}" for x in rates[name])
        print(f"{name} rounds: decode tok/s {each}; TTFT s {', '.join(f'{x:.2f}' for x in ttfts[name])}")
    r = statistics.median(rates["metronome"]) / statistics.median(rates["llama.cpp"])
    t = statistics.median(ttfts["metronome"]) / statistics.median(ttfts["llama.cpp"])
    print(f"| metronome / llama.cpp | {r:.2f}x | {t:.2f}x |")


if __name__ == "__main__":
    main()
