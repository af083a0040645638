"""'This machine' as a target: memory bandwidth and matmul rate measured with torch, briefly, at run time."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from metronome.config import ModelConfig
from metronome.fleet.catalog import Hardware, HardwareKind

THIS_MACHINE = "this-machine"


@dataclass(frozen=True)
class MachineMeasurement:
    bandwidth: float  # bytes/s read by a torch sum over a large float32 tensor (best of the repeats)
    matmul_flops: float  # FLOP/s of a square float32 torch matmul (best of the repeats)
    memory_bytes: float  # physical RAM
    threads: int


def _best_seconds(fn, repeats: int) -> float:
    fn()  # warm up (page faults, thread pool start)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def read_bandwidth(threads: int | None = None, size_mib: int = 256, repeats: int = 3) -> float:
    """Bytes/s read by a torch sum over a `size_mib` MiB float32 tensor (the best of `repeats`), with
    `threads` torch threads (default: torch's current setting, restored afterwards). A few tenths of a
    second: short enough to take before each run of a benchmark, whose fraction of the memory bound is then
    held to the bandwidth of its own minute (these VMs' read bandwidth moved between 17 and 27 GB/s from one
    minute to the next, 2026-12-01)."""
    if size_mib < 1 or repeats < 1:
        raise ValueError("read_bandwidth needs size_mib >= 1 and repeats >= 1")
    import torch  # local: planning without measuring never needs torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        x = torch.ones(size_mib * 2**20 // 4, dtype=torch.float32)
        return x.numel() * 4 / _best_seconds(lambda: float(x.sum()), repeats)
    finally:
        torch.set_num_threads(previous)


def measure_machine(
    size_mib: int = 512, matmul_n: int = 1024, repeats: int = 3, threads: int | None = None
) -> MachineMeasurement:
    """Bandwidth from summing a `size_mib` MiB tensor, FLOP/s from an n x n matmul; about a second at 512 MiB.
    `threads`: torch threads to measure with (default: torch's current setting), restored afterwards."""
    if size_mib < 1 or matmul_n < 16 or repeats < 1:
        raise ValueError("measure_machine needs size_mib >= 1, matmul_n >= 16 and repeats >= 1")
    import torch  # local: planning without measuring never needs torch

    bandwidth = read_bandwidth(threads, size_mib, repeats)
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        a = torch.randn(matmul_n, matmul_n)
        b = torch.randn(matmul_n, matmul_n)
        seconds = _best_seconds(lambda: torch.mm(a, b), repeats)
        flops = 2 * matmul_n**3 / seconds
        measured_threads = torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return MachineMeasurement(bandwidth, flops, float(ram), measured_threads)


def machine_hardware(m: MachineMeasurement, price_per_hour_usd: float = 0.05, power_w: float = 65.0) -> Hardware:
    """The measured machine as a catalog entry (price and power are assumptions: a small cloud VM)."""
    return Hardware(
        name=THIS_MACHINE,
        kind=HardwareKind.CPU,
        description=f"this machine ({m.threads} torch threads, measured)",
        memory_bytes=m.memory_bytes,
        memory_bandwidth=m.bandwidth,
        flops_fp16=m.matmul_flops,
        flops_int8=m.matmul_flops,
        flops_fp8=0.0,
        clock_hz=0.0,
        links=0,
        link_bandwidth=0.0,
        link_latency_s=0.0,
        node_size=1,
        max_chips=1,
        power_w=power_w,
        price_per_chip_usd=0.0,
        compute_dtype="fp16",
        default_weight_bits=16,
        price_per_hour_usd=price_per_hour_usd,
    )


def predict_decode_tokens_per_s(
    model_config: ModelConfig, bytes_per_token: float, machine: MachineMeasurement, efficiency: float = 1.0
) -> float:
    """Roofline prediction of metronome's own batch-1 decode speed on this machine.

    `bytes_per_token` is what one decode step reads (weights in their stored format plus the KV cache); the
    FLOP side is 2 x parameters. The lead wires this to the engine: pass the plan's real bytes per step and
    compare with the engine's measured step to get `efficiency` (achieved / bound).
    """
    if bytes_per_token <= 0:
        raise ValueError(f"bytes_per_token={bytes_per_token} must be positive")
    if not 0 < efficiency <= 1:
        raise ValueError(f"efficiency={efficiency} must be in (0, 1]")
    memory_s = bytes_per_token / machine.bandwidth
    compute_s = 2 * model_config.num_parameters() / machine.matmul_flops
    return efficiency / max(memory_s, compute_s)
