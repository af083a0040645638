"""Hybrid fleets: prefill on GPUs + decode on LPUs (KV handed over the link), and attention on GPUs +
projections on LPUs (the KV cache lives in HBM, the weights in SRAM, q/k/v cross the link every layer)."""

from __future__ import annotations

from dataclasses import dataclass, replace

from metronome.fleet.catalog import Hardware
from metronome.fleet.costs import Candidate, Kind, Workload, cost_per_million
from metronome.fleet.gpu import GpuCalibration, GpuPlan
from metronome.fleet.lpu import GpuAttention, LpuOptions, LpuPlan, Partition, plan_partition
from metronome.fleet.shapes import ModelShape


@dataclass(frozen=True)
class Handoff:
    """The GPU <-> LPU link (PCIe Gen4 x16 by default; catalog/calibration.toml [handoff])."""

    bandwidth: float
    latency_s: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth


def prefill_gpu_decode_lpu(
    decode: LpuPlan, prefill: GpuPlan, handoff: Handoff, workload: Workload, lpu_price: float, gpu_price: float
) -> Candidate:
    """The GPU group computes the prompt (TTFT) and ships its KV cache to the LPU pipeline, which decodes.
    Each fleet is charged for the time it spends on the request."""
    kv = decode.shape.kv_bytes(workload.prompt, decode.options.kv_bits)
    ttft = prefill.ttft_s + handoff.seconds(kv)
    gpu_s = workload.prompt / prefill.prefill_tokens_per_s
    lpu_s = workload.output / decode.aggregate_tokens_per_s
    gpu_rate, lpu_rate = prefill.gpus * gpu_price, decode.chips * lpu_price
    return Candidate(
        kind=Kind.PREFILL_GPU_DECODE_LPU,
        layout=f"{prefill.hardware.name} x{prefill.gpus} prefill -> {_lpu_layout(decode)}",
        lpu_chips=decode.chips,
        gpus=prefill.gpus,
        batch=decode.options.batch,
        per_user_tokens_per_s=decode.per_user_tokens_per_s,
        aggregate_tokens_per_s=decode.aggregate_tokens_per_s,
        ttft_s=ttft,
        power_w=decode.power_w + prefill.power_w,
        usd_per_hour=gpu_rate + lpu_rate,
        cost_per_mtok=cost_per_million([(gpu_rate, gpu_s), (lpu_rate, lpu_s)], workload.output),
        lpu_plan=decode,
    )


def attention_options(opts: LpuOptions, gpu: Hardware, gpus: int, cal: GpuCalibration, handoff: Handoff) -> LpuOptions:
    """`opts` with the attention core (and the KV cache) moved to `gpus` GPUs; SRAM then holds weights only."""
    ga = GpuAttention(gpu, gpus, cal.bandwidth_efficiency, handoff.bandwidth, handoff.latency_s)
    return replace(opts, attention=ga)


def attention_gpu_plan(
    shape: ModelShape,
    lpu: Hardware,
    part: Partition,
    opts: LpuOptions,
    gpu: Hardware,
    gpus: int,
    cal: GpuCalibration,
    handoff: Handoff,
) -> LpuPlan:
    """LPU plan whose attention core (and KV cache) runs on `gpus` GPUs."""
    return plan_partition(shape, lpu, part, attention_options(opts, gpu, gpus, cal, handoff))


def attention_candidate(plan: LpuPlan, workload: Workload, lpu_price: float, gpu_price: float) -> Candidate:
    ga = plan.options.attention
    if ga is None:
        raise ValueError("attention_candidate needs a plan made by attention_gpu_plan")
    rate = plan.chips * lpu_price + ga.gpus * gpu_price
    seconds = workload.prompt / plan.prefill_tokens_per_s + workload.output / plan.aggregate_tokens_per_s
    return Candidate(
        kind=Kind.ATTENTION_GPU_PROJECTIONS_LPU,
        layout=f"{_lpu_layout(plan)} + {ga.hardware.name} x{ga.gpus} attention",
        lpu_chips=plan.chips,
        gpus=ga.gpus,
        batch=plan.options.batch,
        per_user_tokens_per_s=plan.per_user_tokens_per_s,
        aggregate_tokens_per_s=plan.aggregate_tokens_per_s,
        ttft_s=plan.ttft_s,
        power_w=plan.power_w + ga.gpus * ga.hardware.power_w,
        usd_per_hour=rate,
        cost_per_mtok=cost_per_million([(rate, seconds)], workload.output),
        lpu_plan=plan,
    )


def _lpu_layout(plan: LpuPlan) -> str:
    p = plan.partition
    return f"{plan.hardware.name} x{plan.chips} (tp{p.tp} x {p.stages} stages)"
