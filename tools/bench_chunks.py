"""What a long prompt costs in chunks: the whole prompt through `plan.decode`, in chunks of N rows, alone or
beside one decode row of another slot (as the engine's mixed steps run it while a user streams). The stall
goal of issue 11 sets one against the other: small chunks keep a stream's gap, large ones keep the
prompt's time.

    flock /tmp/metronome-bench.lock .venv/bin/python tools/bench_chunks.py [--model smollm2-135m] \
        [--prompt-tokens 1300] [--chunks 256 24 16] [--beside 24] [--rounds 3] [--threads 2]

Each `--chunks` size runs alone: the prompt's rows only, the last row's logits at the end. Each `--beside`
size runs with one row of slot 0 in every call, decoding at positions 700-799 of a 700-token context
(written once before the rounds), with that row's logits every call, as the streaming user's token needs
them. The sizes run in turn within each round, after one warm-up pass of each; it prints each size's median
over the rounds and every round's figure. Random token ids; the KV cache's contents do not change the work.
To compare two builds, run it under each (an earlier commit checked out with `git worktree add` and put
first on PYTHONPATH), alternating: one process cannot load two builds of the kernels.
docs/performance.md ("Serial work in a prompt's steps") has figures.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from metronome.config import EngineConfig
from metronome.engine import Engine

CONTEXT = 700  # the streaming user's context before the prompt arrives
SPAN = 100  # the decode row's positions cycle through [CONTEXT, CONTEXT + SPAN)


def prompt_ms(plan, prompt: list[int], stream: list[int], chunk: int, beside: bool) -> float:
    """The prompt into slot 1 in chunks of `chunk` rows, with slot 0's decode row in each call if `beside`."""
    start = time.perf_counter()
    pos, dpos = 0, CONTEXT
    while pos < len(prompt):
        n = min(chunk, len(prompt) - pos)
        last = pos + n == len(prompt)
        lead = 1 if beside else 0
        slots = [0] * lead + [1] * n
        tokens = [stream[dpos - CONTEXT]] * lead + prompt[pos : pos + n]
        positions = [dpos] * lead + list(range(pos, pos + n))
        rows = [0] * lead + ([len(slots) - 1] if last else [])
        plan.decode(slots, tokens, positions, rows)
        pos += n
        dpos = CONTEXT + (dpos + 1 - CONTEXT) % SPAN
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--prompt-tokens", type=int, default=1300)
    p.add_argument("--chunks", type=int, nargs="*", default=[256, 24, 16], help="chunk sizes run alone")
    p.add_argument("--beside", type=int, nargs="*", default=[24], help="chunk sizes run beside a decode row")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    sizes = [(c, False) for c in args.chunks] + [(c, True) for c in args.beside]
    if not sizes or min(c for c, _ in sizes) < 1:
        p.error("--chunks and --beside: at least one size, every size at least 1 row")
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    ctx = args.prompt_tokens + 8
    if ctx <= CONTEXT + SPAN:
        ctx = CONTEXT + SPAN + 8
    engine = Engine.from_model(
        args.model, EngineConfig(slots=2, ctx=ctx, threads=args.threads, spec_tokens=0), calibrate=False
    )
    plan = engine.plan
    if not plan.runner.any_rows:
        raise SystemExit(f"{args.model}'s plan cannot run prompt rows beside decode rows ({plan.report.kernels})")
    rng = random.Random(args.seed)
    vocab = plan.cfg.vocab_size
    prompt = [rng.randrange(vocab // 4, vocab // 2) for _ in range(args.prompt_tokens)]
    context = [rng.randrange(vocab // 4, vocab // 2) for _ in range(CONTEXT + SPAN)]
    plan.prefill(context[:CONTEXT], 0)
    stream = context[CONTEXT:]
    for chunk, beside in sizes:  # warm-up
        prompt_ms(plan, prompt, stream, chunk, beside)
    times: dict[tuple[int, bool], list[float]] = {s: [] for s in sizes}
    for _ in range(args.rounds):
        for chunk, beside in sizes:
            times[(chunk, beside)].append(prompt_ms(plan, prompt, stream, chunk, beside))
    print(f"{args.model}: a {args.prompt_tokens}-token prompt, {args.threads} threads, {args.rounds} rounds")
    for (chunk, beside), ts in times.items():
        steps = -(-args.prompt_tokens // chunk)
        where = "beside a decode row" if beside else "alone"
        rounds = ", ".join(f"{t:.0f}" for t in ts)
        print(f"  chunks of {chunk:4d} {where:20s} {statistics.median(ts):8.1f} ms  ({steps} calls; {rounds})")


if __name__ == "__main__":
    main()
