"""Q5_0 as the file stores it (kind Q5_0) against its 16-row packing (Q5_0X16, what the plans run): the same
weights, calls alternating round by round in one process, GB/s of the file's bytes (docs/models.md).

    flock /tmp/metronome-bench.lock .venv/bin/python tools/ab_q5x16.py [--shape 512 2048] [--threads 1] \
        [--rows 1 4 8 32] [--rounds 9]

Each row reports both kernels' median GB/s and the median (range) of the per-round time ratios file/packed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from bench_kernels import alternating  # tools/
from gguf import GGMLQuantizationType, quants

from metronome.compile.quant import pack_q5_0
from metronome.kernels.blocks import BLOCK_KINDS
from metronome.kernels.ops import load_kernels


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", type=int, nargs=2, default=[512, 2048], metavar=("N", "K"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 32], help="rows of x (M)")
    p.add_argument("--rounds", type=int, default=9)
    a = p.parse_args()
    ops = load_kernels()
    ops.set_threads(a.threads)
    n, k = a.shape
    w = (np.random.default_rng(0).standard_normal((n, k)) * 0.02).astype(np.float32)
    raw = quants.quantize(w, GGMLQuantizationType.Q5_0)
    stored, packed = torch.from_numpy(raw.reshape(n, -1).copy()), pack_q5_0(raw, n, k)
    print(f"{n} x {k}, {a.threads} thread(s), {a.rounds} rounds; GB/s of the file's {stored.nbytes / 1e6:.1f} MB")
    for m in a.rows:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        calls = {
            "file": lambda x=x: ops.block_linear(x, stored, BLOCK_KINDS["Q5_0"], n),
            "packed": lambda x=x: ops.block_linear(x, packed, BLOCK_KINDS["Q5_0X16"], n),
        }
        start = time.perf_counter()
        calls["file"]()
        repeat = max(1, int(0.02 / max(time.perf_counter() - start, 1e-6)))  # ~20 ms per timing
        times = alternating(calls, a.rounds, repeat)
        ratios = [f / q for f, q in zip(times["file"], times["packed"])]
        gb = {name: stored.nbytes / statistics.median(t) / 1e9 for name, t in times.items()}
        print(
            f"M={m:<3d} file {gb['file']:6.2f} GB/s  packed {gb['packed']:6.2f} GB/s  file/packed "
            f"{statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f})",
            flush=True,
        )


if __name__ == "__main__":
    main()
