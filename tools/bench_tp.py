"""Tensor-parallel decode speed and determinism on this host: the same greedy request on the plain plan
(no tensor parallel, all threads), tp=1 with the TP chunking, and tp=2 / tp=4 (threads split among the
ranks). Each engine lives in its own process (the kernels' pool size and the TP group are per process),
all built first; then each round runs the request once on each, in turn, so that the machine's drift
from minute to minute falls on all alike. Prints each engine's median tokens/s, the median of its
per-round ratios to the plain plan, and whether its tokens and logprobs equal the first degree's
(chunked tp=1 by default). `--threads N`: N threads in all, so tp=2 runs N/2 per rank.

    python tools/bench_tp.py --model gemma3-270m --tp 1,2 --tokens 64 --rounds 5              # fused C++ decoder
    python tools/bench_tp.py --model gemma3-270m --weights f32 --tp 1,2 --tokens 48 --rounds 3  # torch path
    python tools/bench_tp.py --model /tmp/llama-1b.gguf --tp 1,2,4 --threads 16  # metronome.bench.random_gguf
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics

from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine

PROMPT = "The history of the printing press begins"


def build(model: str | None, weights: str, tp: int, shards: int | None, threads: int | None) -> Engine:
    kernels = "torch" if weights in ("f32", "bf16") else "auto"
    config = EngineConfig(
        slots=1, ctx=512, weights=weights, kernels=kernels, tp=tp, tp_shards=shards, spec_tokens=0, threads=threads
    )
    return Engine.from_model(model, config, calibrate=False)


def once(engine: Engine, tokens: int) -> tuple[float, tuple]:
    """(decode tokens/s, (token ids, logprobs)) of one greedy request."""
    params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True, logprobs=True)
    c = engine.generate(PROMPT, params, chat=False)
    decode_s = c.timings.finished - c.timings.first_token
    return (len(c.token_ids) - 1) / decode_s, (c.token_ids, tuple(ch.logprob for ch in c.choices))


def serve_engine(
    conn, model: str | None, weights: str, tp: int, shards: int | None, threads: int | None, tokens: int
) -> None:
    """A child process holding one engine: answers "run" with (tokens/s, output) until "stop". One engine
    per process: the kernels' pool size and the TP group are per process."""
    engine = build(model, weights, tp, shards, threads)
    try:
        once(engine, 8)  # warm-up: first touch of pages and scratch
        conn.send("ready")
        while conn.recv() == "run":
            speed, out = once(engine, tokens)
            conn.send((speed, [out[0], list(out[1])]))
    finally:
        close = getattr(engine.plan.runner, "close", None)  # a TP runner stops its ranks
        if close is not None:
            close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="gemma3-270m")
    p.add_argument("--tp", default="1,2")
    p.add_argument("--shards", type=int, default=None, help="default: the model's (parallel/tp.py)")
    p.add_argument("--weights", default="auto", help="auto (int4/int8: the fused C++ decoder) or f32/bf16 (torch)")
    p.add_argument(
        "--threads", type=int, default=None, help="compute threads in all, shared among the ranks (default: every core)"
    )
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    a = p.parse_args()
    shards = a.shards or _default(a.model)
    degrees = [int(x) for x in a.tp.split(",")]
    runs = [("plain plan (no tensor parallel)", 1, None)] + [
        (f"tp={tp}, {shards} chunks", tp, shards) for tp in degrees
    ]
    ctx = mp.get_context("spawn")
    children = []
    try:
        for _name, tp, cut in runs:  # one at a time: each builds while the others are idle
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=serve_engine, args=(child, a.model, a.weights, tp, cut, a.threads, a.tokens))
            proc.start()
            children.append((parent, proc))
            if not parent.poll(600) or parent.recv() != "ready":
                raise SystemExit(f"the {_name} engine did not start within 600 s")
        speeds: list[list[float]] = [[] for _ in runs]
        outs: list = [None] * len(runs)
        for _ in range(a.rounds):  # each engine once a round, in turn: the machine's drift falls on all alike
            for i, (conn, _proc) in enumerate(children):
                conn.send("run")
                if not conn.poll(600):
                    raise SystemExit(f"{runs[i][0]}: no answer within 600 s")
                speed, outs[i] = conn.recv()
                speeds[i].append(speed)
    finally:
        for conn, proc in children:
            try:
                conn.send("stop")
            except OSError:
                pass
            proc.join(timeout=30)
            if proc.is_alive():
                proc.kill()
    for i, (name, _tp, _cut) in enumerate(runs):
        ratios = [x / y for x, y in zip(speeds[i], speeds[0])]
        line = f"{name}: {statistics.median(speeds[i]):.1f} tok/s"
        if i > 0:
            line += (
                f", {statistics.median(ratios):.2f}x the plain plan (median of rounds: "
                f"{', '.join(f'{x:.2f}' for x in ratios)}); same tokens and logprobs as tp={degrees[0]}: {outs[i] == outs[1]}"
            )
        print(line)


def _default(model: str | None) -> int:
    from metronome.model.loader import load
    from metronome.parallel.tp import default_shards

    return default_shards(load(model).config)


if __name__ == "__main__":
    main()
