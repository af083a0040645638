"""Prefill attention on its own: the fused decoder's attention kernel (`decode_attention`) over the rows of
one prompt chunk, as the decoder calls it, timed.

    flock /tmp/metronome-bench.lock .venv/bin/python tools/bench_attention.py \
        [--rows 256] [--span 1000] [--heads 12] [--kv-heads 2] [--head-dim 128] [--threads 2] [--rounds 9]

The default shape is the 1.5B's last chunk of a 1,000-token prompt: 256 rows of one slot at positions
745..1000, 12 query heads over 2 kv heads of 128 dims, a bf16 cache. `--decode-spans 1300 ...` puts one-row
slots attending that many keys before the prompt's rows, as a step of chunked prefill orders them (with
`--rows 0`, a decode step alone). `--layers N` times N calls, each on caches of its own, as a step runs its
layers: their keys then come from memory, not from the caches a single call's repeats keep them in.
`--kv-cache int8` times the int8 cache's rows (bytes and their scales) in place of bf16's. Prints
the median time of `--rounds` calls and the multiply-adds per second (q.k and p.v, counted once). To compare two builds, run it under
each (e.g. an earlier commit checked out with `git worktree add` and put first on PYTHONPATH, from another
directory), alternating, and compare medians: one process cannot load two builds of the kernels.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from metronome.config import KvCache
from metronome.kernels.ops import load_kernels, quantize_kv_int8


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=256, help="prompt rows in the call (a prefill chunk)")
    p.add_argument("--span", type=int, default=1000, help="keys the last row attends to")
    p.add_argument("--decode-spans", type=int, nargs="*", default=[], help="one-row slots' keys, before the rows")
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--layers", type=int, default=1, help="calls per timing, each with caches of its own")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=9)
    p.add_argument("--kv-cache", default="auto", choices=KvCache.choices(), help="auto: bf16; int8: rows of bytes")
    a = p.parse_args()
    if a.rows > a.span or a.heads % a.kv_heads or a.rows + len(a.decode_spans) == 0:
        raise SystemExit("--rows must be at most --span, --heads a multiple of --kv-heads, and some row given")
    ops = load_kernels()
    ops.set_threads(a.threads)
    g = torch.Generator().manual_seed(0)
    spans = a.decode_spans
    shape = (1 + len(spans), a.kv_heads, max([a.span, *spans]), a.head_dim)
    store = quantize_kv_int8 if a.kv_cache == KvCache.INT8 else (lambda t: t.to(torch.bfloat16))
    caches = [
        (store(torch.randn(*shape, generator=g)), store(torch.randn(*shape, generator=g))) for _ in range(a.layers)
    ]
    q = torch.randn(len(spans) + a.rows, a.heads, a.head_dim, generator=g)
    slots = torch.tensor(list(range(1, 1 + len(spans))) + [0] * a.rows, dtype=torch.long)
    ends = torch.cat([torch.tensor(spans, dtype=torch.long), torch.arange(a.span - a.rows + 1, a.span + 1)])
    scale = a.head_dim**-0.5

    def step() -> None:
        for k, v in caches:
            ops.decode_attention(q, k, v, slots, ends, 0, scale)

    for _ in range(2):  # warm-up: the pool's threads, the caches
        step()
    times = []
    for _ in range(a.rounds):
        started = time.perf_counter()
        step()
        times.append(time.perf_counter() - started)
    t = statistics.median(times)
    macs = 2 * a.heads * a.head_dim * int(ends.sum()) * a.layers
    # key and value rows read once per (slot, kv head): a slot's prompt rows share theirs
    row_bytes = caches[0][0].shape[-1] * caches[0][0].element_size()
    read = 2 * a.kv_heads * row_bytes * (sum(spans) + (a.span if a.rows else 0)) * a.layers
    print(
        f"{a.layers} x {a.rows} rows, span {a.span}, decode spans {spans}, "
        f"{a.heads}/{a.kv_heads} heads x {a.head_dim}, KV {a.kv_cache}, {a.threads} threads: "
        f"median {t * 1e3:.2f} ms of {a.rounds} ({macs / t / 1e9:.1f} G multiply-adds/s, "
        f"{read / 1e6:.0f} MB of keys and values at {read / t / 1e9:.1f} GB/s)"
    )


if __name__ == "__main__":
    main()
