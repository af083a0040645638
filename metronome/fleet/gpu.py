"""GPU target: roofline of HBM bytes and FLOPs per step, with efficiency factors calibrated from measured runs.

step time = max(bytes / (g * bandwidth * eff_bw), flops / (g * peak * eff_flops)) + 2 * layers * allreduce(g)

`eff_bw` and the all-reduce latency come from gpt-fast's published A100 runs (catalog/calibration.toml):
efficiency = achieved / peak bandwidth, and the time a tensor-parallel run spends above the ideal 1/g split,
spread over its 2 all-reduces per layer, fitted as a + b * log2(g).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from metronome.fleet.catalog import Hardware, HardwareKind
from metronome.fleet.shapes import ModelShape, builtin_shapes


@dataclass(frozen=True)
class GpuCalibration:
    bandwidth_efficiency: float  # achieved / peak HBM bandwidth of a decode step
    flops_efficiency: float  # achieved / peak dense FLOP/s of a compute-bound (prefill) step
    allreduce_base_s: float  # all-reduce latency(g) = base + per_doubling * log2(g)
    allreduce_per_doubling_s: float
    memory_fraction: float = 0.9  # of HBM usable for weights + KV (the rest: activations, workspace)
    step_overhead_s: float = 0.0  # per forward step, outside the kernels (the serving stack's own time)

    def allreduce_s(self, gpus: int) -> float:
        return 0.0 if gpus <= 1 else self.allreduce_base_s + self.allreduce_per_doubling_s * math.log2(gpus)


BOUND = GpuCalibration(1.0, 1.0, 0.0, 0.0, 1.0)  # the pure roofline: datasheet peaks, free collectives


def fit_allreduce_latency(
    shape: ModelShape, single_tokens_per_s: float, runs: list[tuple[int, float]]
) -> tuple[float, float]:
    """Least-squares (base, per_doubling) seconds from tensor-parallel runs [(gpus, tokens/s)] of `shape`
    whose 1-GPU speed is `single_tokens_per_s`: overhead(g) = 1/tps(g) - 1/(g * tps(1)), per all-reduce."""
    if len(runs) < 2:
        raise ValueError("fit_allreduce_latency needs at least 2 tensor-parallel runs")
    per_step = 2 * shape.config.num_layers
    xs = [math.log2(g) for g, _ in runs]
    ys = [(1.0 / tps - 1.0 / (g * single_tokens_per_s)) / per_step for g, tps in runs]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def calibration_from_table(table: dict) -> GpuCalibration:
    """Build the calibration from catalog/calibration.toml's [gpu] table (fits done here, not by hand)."""
    g = table["gpu"]
    shape = builtin_shapes()[g["calibration_model"]]
    base, slope = fit_allreduce_latency(
        shape, g["single_gpu_tokens_per_s"], [(r["gpus"], r["tokens_per_s"]) for r in g["tp_runs"]]
    )
    return GpuCalibration(
        bandwidth_efficiency=g["achieved_bandwidth"] / g["peak_bandwidth"],
        flops_efficiency=g["flops_efficiency"],
        allreduce_base_s=base,
        allreduce_per_doubling_s=slope,
    )


@dataclass(frozen=True)
class GpuPlan:
    hardware: Hardware
    shape: ModelShape
    gpus: int
    batch: int
    weight_bits: int
    context: int
    step_s: float
    ttft_s: float
    prefill_tokens_per_s: float

    @property
    def chips(self) -> int:
        return self.gpus

    @property
    def per_user_tokens_per_s(self) -> float:
        return 1.0 / self.step_s

    @property
    def aggregate_tokens_per_s(self) -> float:
        return self.batch / self.step_s

    @property
    def power_w(self) -> float:
        return self.gpus * self.hardware.power_w


def _check(hw: Hardware, gpus: int, batch: int) -> None:
    if hw.kind is HardwareKind.LPU:
        raise ValueError(f"target {hw.name!r} is an LPU; GPU planning needs a GPU or this-machine target")
    if gpus < 1 or batch < 1:
        raise ValueError(f"gpus={gpus} and batch={batch} must both be at least 1")


def fits(
    shape: ModelShape,
    hw: Hardware,
    cal: GpuCalibration,
    gpus: int,
    batch: int,
    context: int,
    weight_bits: int,
    kv_bits: int = 16,
) -> bool:
    weights = shape.total_params() * weight_bits / 8
    return weights + batch * shape.kv_bytes(context, kv_bits) <= gpus * hw.memory_bytes * cal.memory_fraction


def step_time(
    shape: ModelShape,
    hw: Hardware,
    cal: GpuCalibration,
    gpus: int,
    rows: int,
    seqs: int,
    positions: int,
    weight_bits: int,
    kv_bits: int = 16,
) -> float:
    """One forward step of `rows` token rows from `seqs` sequences attending to `positions` cached tokens."""
    _check(hw, gpus, rows)
    c = shape.config
    weight_bytes = shape.decode_bytes_per_token(weight_bits, batch=rows)
    kv_bytes = seqs * shape.kv_bytes(positions, kv_bits)
    flops = 2 * shape.active_params() * rows + 4 * rows * positions * c.q_size * c.num_layers
    memory_s = (weight_bytes + kv_bytes) / (gpus * hw.memory_bandwidth * cal.bandwidth_efficiency)
    compute_s = flops / (gpus * hw.matmul_flops * cal.flops_efficiency)
    return max(memory_s, compute_s) + 2 * c.num_layers * cal.allreduce_s(gpus) + cal.step_overhead_s


def plan_gpu(
    shape: ModelShape,
    hw: Hardware,
    cal: GpuCalibration,
    gpus: int,
    batch: int,
    context: int,
    prompt: int,
    weight_bits: int | None = None,
) -> GpuPlan | None:
    """Decode at `batch` on `gpus` GPUs (tensor parallel), or None when weights + KV do not fit."""
    _check(hw, gpus, batch)
    bits = weight_bits or hw.default_weight_bits
    if not fits(shape, hw, cal, gpus, batch, context, bits):
        return None
    step = step_time(shape, hw, cal, gpus, batch, batch, context, bits)
    n = max(prompt, 1)
    prefill = step_time(shape, hw, cal, gpus, n, 1, max(1, n // 2), bits)
    return GpuPlan(hw, shape, gpus, batch, bits, context, step, prefill, n / prefill)


def min_gpus(shape: ModelShape, hw: Hardware, cal: GpuCalibration, context: int, weight_bits: int) -> int | None:
    """Fewest GPUs (a power of two within one NVLink domain) that hold the weights and one sequence."""
    g = 1
    while g <= hw.max_chips:
        if fits(shape, hw, cal, g, 1, context, weight_bits):
            return g
        g *= 2
    return None
