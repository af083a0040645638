"""A GGUF format as the file stores it (kind Q5_0, Q4_K or Q6_K) against its 16-row packing (Q5_0X16,
Q4_KX16, Q6_KX16: what the plans run): the same weights, calls alternating round by round in one process,
GB/s of the file's bytes (docs/models.md).

    flock /tmp/metronome-bench.lock .venv/bin/python tools/ab_x16.py [--format Q5_0] [--shape 512 2048] \
        [--threads 1] [--rows 1 4 8 32] [--rounds 9]

Q5_0 weights come from gguf's quantizer; K-quant blocks are random bytes with small fp16 scales (any bit
pattern is a valid block, and the kernels' time does not depend on the values).

Each row reports both kernels' median GB/s and the median (range) of the per-round time ratios file/packed.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import torch
from bench_kernels import alternating  # tools/
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, quants

from metronome.compile.quant import pack_16_rows
from metronome.kernels.blocks import FILE_KINDS
from metronome.kernels.ops import load_kernels
from metronome.model.loader import QuantTensor


def blocks(qtype: str, n: int, k: int) -> np.ndarray:
    """(n, k) weights in `qtype` as the file stores them."""
    rng = np.random.default_rng(0)
    kind = GGMLQuantizationType[qtype]
    if qtype in ("Q5_0", "Q8_0"):
        return quants.quantize((rng.standard_normal((n, k)) * 0.02).astype(np.float32), kind).reshape(n, -1)
    block, size = GGML_QUANT_SIZES[kind]
    raw = rng.integers(0, 256, size=(n, k // block, size), dtype=np.uint8)
    scales = (rng.standard_normal((n, k // block, 2)) * 0.01).astype(np.float16).view(np.uint8)  # 2 fp16
    if qtype == "Q6_K":
        raw[..., 208:210] = scales[..., 0:2]  # d is the last field
    else:
        raw[..., 0:4] = scales  # d, dmin
    return raw.reshape(n, -1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--format", choices=["Q5_0", "Q4_K", "Q6_K", "Q8_0"], default="Q5_0")
    p.add_argument("--shape", type=int, nargs=2, default=[512, 2048], metavar=("N", "K"))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 8, 32], help="rows of x (M)")
    p.add_argument("--rounds", type=int, default=9)
    a = p.parse_args()
    ops = load_kernels()
    ops.set_threads(a.threads)
    n, k = a.shape
    raw = blocks(a.format, n, k)
    stored = torch.from_numpy(raw.copy())
    packed, packed_kind = pack_16_rows(QuantTensor(raw=raw, qtype=a.format, shape=(n, k)), ops)
    print(
        f"{a.format}, {n} x {k}, {a.threads} thread(s), {a.rounds} rounds; GB/s of the file's "
        f"{stored.nbytes / 1e6:.1f} MB (packed: {packed.nbytes / 1e6:.1f} MB)"
    )
    for m in a.rows:
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
        calls = {
            "file": lambda x=x: ops.block_linear(x, stored, FILE_KINDS[a.format], n),
            "packed": lambda x=x: ops.block_linear(x, packed, packed_kind, n),
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
