"""Hybrid fleets: prefill on GPUs + decode on LPUs (KV handed over the link), and attention on GPUs +
projections on LPUs (the KV cache lives in HBM, the weights in SRAM, q/k/v cross the link every layer)."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from metronome.fleet.catalog import Hardware
from metronome.fleet.costs import Candidate, Kind, Workload, cost_per_million
from metronome.fleet.gpu import GpuCalibration, GpuPlan
from metronome.fleet.lpu import GpuAttention, LpuOptions, LpuPlan, Partition, plan_partition
from metronome.fleet.schedule import GPU_PID, Timeline
from metronome.fleet.shapes import ModelShape


@dataclass(frozen=True)
class Handoff:
    """One GPU <-> LPU PCIe link (Gen4 x16 by default; catalog/calibration.toml [handoff]); every GPU and
    every LPU chip has its own port."""

    bandwidth: float
    latency_s: float

    def seconds(self, nbytes: float) -> float:
        return self.latency_s + nbytes / self.bandwidth


def kv_handoff(decode: LpuPlan, prefill: GpuPlan, handoff: Handoff, prompt: int) -> Timeline:
    """The prompt's KV cache from the prefill GPUs to the LPU stages that hold those layers, scheduled over
    the ports that carry it: GPU g_i's PCIe port and each LPU chip's own (chip j of a stage from GPU
    j mod g). Each chip receives its 1/tp share of its stage's layers. `makespan_s` is when the last byte
    lands; the events are the trace's hand-off rows."""
    tl = Timeline()
    part, opts = decode.partition, decode.options
    end = 0.0
    for s in range(part.stages):
        share = decode.shape.kv_bytes(prompt, opts.kv_bits, part.stage_layers(s)) / part.tp
        if share <= 0:
            continue
        for j in range(part.tp):
            chip, port = s * part.tp + j, j % prefill.gpus
            occupy = share / handoff.bandwidth
            name = f"KV of stage {s} -> chip {chip}"
            t = tl.place(name, (("pcie", "gpu-out", port), ("pcie", "lpu-in", chip)), prefill.ttft_s, occupy)
            tl.event(GPU_PID, f"pcie->{chip}", name, t, occupy, "transfer")
            end = max(end, t + occupy + handoff.latency_s)
    tl.event(GPU_PID, "gpu", f"prefill {prompt} tokens", 0.0, prefill.ttft_s, "compute")
    tl.makespan_s = max(end, prefill.ttft_s)
    return tl


def prefill_gpu_decode_lpu(
    decode: LpuPlan, prefill: GpuPlan, handoff: Handoff, workload: Workload, lpu_price: float, gpu_price: float
) -> Candidate:
    """GPU groups compute the prompts and ship their KV caches to the LPU pipeline, which decodes. TTFT is
    prefill plus the scheduled hand-off. The GPU groups are as many as keep up with the requests the
    pipeline finishes, each request holding a group through its prefill and hand-off (sized as one group, a
    fleet prefilled a fraction of the prompts its LPUs decoded; docs/planner.md). Cost: the GPU groups' hours
    over the requests they serve; the LPU fleet its share per user of decoding, plus the user's pipeline
    slot while its KV arrives."""
    moved = kv_handoff(decode, prefill, handoff, workload.prompt)
    handoff_s = moved.makespan_s - prefill.ttft_s
    gpu_s = workload.prompt / prefill.prefill_tokens_per_s + handoff_s
    users = decode.micro_batches * decode.options.batch
    lpu_s = workload.output / decode.aggregate_tokens_per_s + handoff_s / users
    requests_per_s = decode.aggregate_tokens_per_s / workload.output if workload.output else 0.0
    groups = max(1, math.ceil(requests_per_s * gpu_s * (1 - 1e-9)))  # whole groups (a hair for rounding)
    gpus = groups * prefill.gpus
    gpu_rate, lpu_rate = gpus * gpu_price, decode.chips * lpu_price
    gpu_share = (1 / requests_per_s) if requests_per_s > 0 else gpu_s  # a request's share of the groups' hours
    return Candidate(
        kind=Kind.PREFILL_GPU_DECODE_LPU,
        layout=f"{prefill.hardware.name} x{gpus} prefill"
        + (f" ({groups} groups of {prefill.gpus})" if groups > 1 else "")
        + f" -> {_lpu_layout(decode)}",
        lpu_chips=decode.chips,
        gpus=gpus,
        batch=decode.options.batch,
        per_user_tokens_per_s=decode.per_user_tokens_per_s,
        aggregate_tokens_per_s=decode.aggregate_tokens_per_s,
        ttft_s=moved.makespan_s,
        power_w=decode.power_w + groups * prefill.power_w,
        usd_per_hour=gpu_rate + lpu_rate,
        cost_per_mtok=cost_per_million([(gpu_rate, gpu_share), (lpu_rate, lpu_s)], workload.output),
        lpu_plan=decode,
        handoff_s=handoff_s,
        handoff_events=tuple(moved.events),
    )


def attention_options(opts: LpuOptions, gpu: Hardware, gpus: int, cal: GpuCalibration, handoff: Handoff) -> LpuOptions:
    """`opts` with the attention core (and the KV cache) moved to `gpus` GPUs; SRAM then holds weights only."""
    ga = GpuAttention(gpu, gpus, cal.bandwidth_efficiency, handoff.bandwidth, handoff.latency_s, cal.flops_efficiency)
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
