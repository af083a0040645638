"""Side-by-side timings of metronome's kernels: TorchOps (reference) vs CppOps, SmolLM2-135M shapes.

    python tools/bench_kernels.py [--rows 1 8] [--threads 2] [--reps 15]
    python tools/bench_kernels.py --formats [--rows 1 4] [--threads 2]   # block formats, GB/s of weight bytes

Each case alternates the implementations in one process (so machine load hits both alike) and reports
the median microseconds per call over `reps` rounds, and the ratio torch / cpp. Wall-clock times: on a
machine shared with other jobs, multi-threaded numbers suffer most; compare with --threads 1.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from metronome.kernels.ops import CppOps, TorchOps, dequantize_q8_0, load_kernels

D, H, HKV, DH, FF, VOCAB = 576, 9, 3, 64, 1536, 49152


def per_call_us(fn: Callable[[], object], calls: int) -> float:
    start = time.perf_counter_ns()
    for _ in range(calls):
        fn()
    return (time.perf_counter_ns() - start) / calls / 1e3


def compare(name: str, fns: dict[str, Callable[[], object]], reps: int) -> None:
    for fn in fns.values():  # warm up (allocator, caches, thread pool)
        per_call_us(fn, 3)
    single = per_call_us(next(iter(fns.values())), 3)
    calls = max(1, min(200, int(2000 / max(single, 1.0))))  # ~2 ms per measurement
    samples: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            time.sleep(0.002)  # let the previous implementation's OpenMP workers stop spinning
            per_call_us(fn, max(1, calls // 4))  # then warm this one up again (caches, clocks)
            samples[k].append(per_call_us(fn, calls))
    med = {k: statistics.median(v) for k, v in samples.items()}
    base = med.get("torch")
    cells = "  ".join(
        f"{k} {v:8.1f}" + (f" ({base / v:4.1f}x)" if base and k != "torch" else "") for k, v in med.items()
    )
    print(f"{name:<33} {cells}")


def q8_blocks(n: int, k: int, gen: torch.Generator) -> torch.Tensor:
    d = (torch.rand(n, k // 32, 1, generator=gen) * 0.02).half().view(torch.uint8)
    q = torch.randint(-128, 128, (n, k // 32, 32), generator=gen, dtype=torch.int8).view(torch.uint8)
    return torch.cat([d, q], dim=-1).reshape(n, k // 32 * 34)


def alternating(calls: dict[str, Callable[[], object]], rounds: int, repeat: int) -> dict[str, list[float]]:
    """Seconds per call of each of `calls`, `rounds` times: each timing runs a call `repeat` times, and the
    order alternates round by round, so a machine whose speed drifts slows every call alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for r in range(rounds):
        for name in calls if r % 2 == 0 else reversed(list(calls)):
            start = time.perf_counter()
            for _ in range(repeat):
                calls[name]()
            times[name].append((time.perf_counter() - start) / repeat)
    return times


def format_blocks(name: str, n: int, k: int, gen: torch.Generator) -> tuple[torch.Tensor, int]:
    """A random (n, k) matrix in block kind `name` (timing only: valid layouts, random codes and scales)."""
    from metronome.kernels.blocks import BLOCK_BYTES, BLOCK_GROUPS, BLOCK_KINDS, BLOCK_WEIGHTS

    rows = -(-n // BLOCK_GROUPS[name])
    raw = torch.randint(0, 256, (rows, k // BLOCK_WEIGHTS[name], BLOCK_BYTES[name]), generator=gen, dtype=torch.uint8)
    scale = (torch.rand(rows, k // BLOCK_WEIGHTS[name], 32, generator=gen) * 0.01).half().view(torch.uint8)
    if name == "Q6_K":
        raw[..., 208:210] = scale[..., :2]
    elif name.endswith("X16"):  # 16 fp16 d (and Q4_KX16's and Q4_1X16's 16 dmin or m) first
        fp16 = 64 if name in ("Q4_KX16", "Q4_1X16") else 32
        raw[..., :fp16] = scale[..., :fp16]
    elif name not in ("Q8_0", "Q8_0_X8"):
        raw[..., :4] = scale[..., :4]
    else:
        raw[..., :2] = scale[..., :2]
    return raw.reshape(rows, -1), BLOCK_KINDS[name]


def bench_formats(cpp: CppOps, rows: list[int], reps: int) -> None:
    """block_linear per block kind on a matrix larger than the caches: GB/s of the weight bytes read."""
    from metronome.kernels.blocks import BLOCK_KINDS

    gen = torch.Generator().manual_seed(0)
    n, k = 32768, 2048  # 64M weights: 36 MB (Q4_K) to 71 MB (Q8_0), beyond the L3
    for name in BLOCK_KINDS:
        w, kind = format_blocks(name, n, k, gen)
        for m in rows:
            x = torch.randn(m, k, generator=gen)
            cpp.block_linear(x, w, kind, n)  # warm up: pages, pool
            times = []
            for _ in range(reps):
                t = time.perf_counter()
                cpp.block_linear(x, w, kind, n)
                times.append(time.perf_counter() - t)
            med = statistics.median(times)
            print(
                f"{name:8s} M={m}: {med * 1e3:7.2f} ms  {w.nbytes / med / 1e9:6.2f} GB/s of weights "
                f"({w.nbytes / 1e6:.0f} MB, {w.nbytes * 8 / (n * k):.2f} bits/weight)"
            )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    ap.add_argument("--formats", action="store_true", help="time block_linear per block kind instead")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    cpp: CppOps = load_kernels()
    print(
        f"load_kernels: {time.perf_counter() - t0:.1f} s (build cached after the first run); "
        f"{args.threads} threads, {args.dtype}, median us per call over {args.reps} rounds"
    )
    if args.formats:
        bench_formats(cpp, args.rows, args.reps)
        return
    ref = TorchOps()
    dt = getattr(torch, args.dtype)
    gen = torch.Generator().manual_seed(0)
    eps = 1e-5
    w = torch.rand(D, generator=gen) + 0.5
    blocks = q8_blocks(VOCAB, D, gen)
    w_bf16 = dequantize_q8_0(blocks).to(torch.bfloat16)
    w_int8 = blocks.reshape(VOCAB, D // 32, 34)[..., 2:].contiguous().view(torch.int8).reshape(VOCAB, D)
    w_int8_scales = torch.ones(VOCAB, dtype=torch.bfloat16)  # timing only (per-channel scales)
    codes = torch.randint(0, 16, (VOCAB, D), generator=gen, dtype=torch.int32)  # int4pack: timing only
    w_int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 2)
    w_int4_sz = torch.ones(D // 32, VOCAB, 2, dtype=torch.bfloat16)
    for m in args.rows:
        print(f"--- M = {m}")
        x = torch.randn(m, D, generator=gen).to(dt)
        r = torch.randn(m, D, generator=gen).to(dt)
        both = {"torch": ref, "cpp": cpp}

        def case(name: str, call: Callable[[TorchOps | CppOps], object]) -> None:
            compare(name, {k: (lambda o=o: call(o)) for k, o in both.items()}, args.reps)

        case(f"rms_norm ({m}, {D})", lambda o: o.rms_norm(x, w, eps))
        case(f"add_rms_norm ({m}, {D})", lambda o: o.add_rms_norm(x, r, w, eps))
        q = torch.randn(m, 1, H, DH, generator=gen).to(dt)
        ang = torch.rand(m, 1, DH // 2, generator=gen) * 100
        cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
        case(f"rope q ({m}, 1, {H}, {DH})", lambda o: o.rope(q, cos, sin))
        gu = torch.randn(m, 2 * FF, generator=gen).to(dt)
        case(f"silu_mul ({m}, {2 * FF})", lambda o: o.silu_mul(gu))
        case(f"gelu_tanh_mul ({m}, {2 * FF})", lambda o: o.gelu_tanh_mul(gu))
        slots_n, ctx = max(m, 8), 1024
        kc = torch.randn(slots_n, HKV, ctx, DH, generator=gen).to(dt)
        vc = torch.randn(slots_n, HKV, ctx, DH, generator=gen).to(dt)
        qa = torch.randn(m, H, DH, generator=gen).to(dt)
        slots = torch.arange(m)
        for length in (64, 512):
            ends = torch.full((m,), length)
            case(
                f"decode_attention ({m}, L={length})",
                lambda o: o.decode_attention(qa, kc, vc, slots, ends, 0, DH**-0.5),
            )
        compare(
            f"q8_0_linear head ({m}, {VOCAB}x{D})",
            {
                "torch": lambda: ref.q8_0_linear(x, blocks),
                "cpp": lambda: cpp.q8_0_linear(x, blocks),
                "bf16 F.linear": lambda: F.linear(x.to(torch.bfloat16), w_bf16),
                "int8pack": lambda: torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), w_int8, w_int8_scales),
                "int4pack": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
                    x.to(torch.bfloat16), w_int4, 32, w_int4_sz
                ),
            },
            max(5, args.reps // 3),
        )


if __name__ == "__main__":
    main()
