"""Sweep batch size and chip count for every kind of fleet; the cost-vs-speed Pareto frontier, plot and table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from metronome.fleet.catalog import Hardware, HardwareKind
from metronome.fleet.costs import Candidate, Kind, Workload, cost_per_million
from metronome.fleet.gpu import GpuCalibration, GpuPlan, min_gpus, plan_gpu
from metronome.fleet.hybrid import Handoff, attention_candidate, attention_options, prefill_gpu_decode_lpu
from metronome.fleet.lpu import LpuOptions, LpuPlan, Partition, partitions, plan_partition
from metronome.fleet.shapes import ModelShape

BATCHES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class SweepSpec:
    workload: Workload
    batches: tuple[int, ...] = BATCHES
    lpu_weight_bits: int | None = None  # None: the chip's default (8 on TSP v1)
    gpu_weight_bits: int | None = None  # None: the GPU's default (bf16)
    kv_bits: int = 16
    lpu_chips: int | None = None  # fixed LPU chip budget (None: any up to the system maximum)
    stage_steps: int = 10  # stage counts tried per tensor-parallel degree (spread geometrically)


def _spread(parts: list[Partition], steps: int) -> list[Partition]:
    """Per tp degree, about `steps` stage counts from the fewest to the most, geometrically spaced."""
    out: list[Partition] = []
    for tp in sorted({p.tp for p in parts}):
        group = sorted((p for p in parts if p.tp == tp), key=lambda p: p.stages)
        lo, hi = group[0].stages, group[-1].stages
        wanted, x = {lo, hi}, float(lo)
        while x < hi:
            wanted.add(round(x))
            x *= (hi / lo) ** (1.0 / max(steps - 1, 1))
        out += [p for p in group if p.stages in wanted]
    return out


def lpu_candidate(plan: LpuPlan, workload: Workload, price: float) -> Candidate:
    rate = plan.chips * price
    seconds = workload.prompt / plan.prefill_tokens_per_s + workload.output / plan.aggregate_tokens_per_s
    p = plan.partition
    return Candidate(
        Kind.LPU,
        f"{plan.hardware.name} x{plan.chips} (tp{p.tp} x {p.stages} stages)",
        plan.chips,
        0,
        plan.options.batch,
        plan.per_user_tokens_per_s,
        plan.aggregate_tokens_per_s,
        plan.ttft_s,
        plan.power_w,
        rate,
        cost_per_million([(rate, seconds)], workload.output),
        plan,
    )


def gpu_candidate(plan: GpuPlan, workload: Workload, price: float) -> Candidate:
    rate = plan.gpus * price
    seconds = workload.prompt / plan.prefill_tokens_per_s + workload.output / plan.aggregate_tokens_per_s
    return Candidate(
        Kind.GPU,
        f"{plan.hardware.name} x{plan.gpus} ({plan.weight_bits}-bit)",
        0,
        plan.gpus,
        plan.batch,
        plan.per_user_tokens_per_s,
        plan.aggregate_tokens_per_s,
        plan.ttft_s,
        plan.power_w,
        rate,
        cost_per_million([(rate, seconds)], workload.output),
    )


def _lpu_options(hw: Hardware, spec: SweepSpec, batch: int) -> LpuOptions:
    return LpuOptions(
        weight_bits=spec.lpu_weight_bits or hw.default_weight_bits,
        kv_bits=spec.kv_bits,
        context=spec.workload.context,
        batch=batch,
        prompt=spec.workload.prompt,
    )


def sweep_lpu(shape: ModelShape, hw: Hardware, spec: SweepSpec) -> list[LpuPlan]:
    plans = []
    for batch in spec.batches:
        opts = _lpu_options(hw, spec, batch)
        for part in _spread(partitions(shape, hw, opts, spec.lpu_chips), spec.stage_steps):
            plans.append(plan_partition(shape, hw, part, opts))
    return plans


def _gpu_bits_options(hw: Hardware, spec: SweepSpec) -> list[int]:
    """The GPU weight widths to try, in turn: the one asked for, else the GPU's own and then 8-bit."""
    return [spec.gpu_weight_bits] if spec.gpu_weight_bits else [hw.default_weight_bits, 8]


def sweep_gpu(shape: ModelShape, hw: Hardware, cal: GpuCalibration, spec: SweepSpec) -> list[GpuPlan]:
    plans = []
    for bits in _gpu_bits_options(hw, spec):
        for batch in spec.batches:
            g = 1
            while g <= hw.max_chips:
                plan = plan_gpu(shape, hw, cal, g, batch, spec.workload.context, spec.workload.prompt, bits)
                if plan is not None:
                    plans.append(plan)
                g *= 2
        if plans:
            break  # only drop to 8-bit weights when bf16 fits nowhere
    return plans


def sweep(
    shape: ModelShape,
    hardware: list[Hardware],
    prices: dict[str, float],
    cal: GpuCalibration,
    handoff: Handoff,
    spec: SweepSpec,
) -> list[Candidate]:
    """Every candidate of every kind the chosen hardware allows (hybrids need one LPU and one GPU kind)."""
    lpus = [h for h in hardware if h.kind is HardwareKind.LPU]
    gpus = [h for h in hardware if h.kind is not HardwareKind.LPU]
    wl = spec.workload
    out: list[Candidate] = []
    lpu_plans = {h.name: sweep_lpu(shape, h, spec) for h in lpus}
    for h in lpus:
        out += [lpu_candidate(p, wl, prices[h.name]) for p in lpu_plans[h.name]]
    for g in gpus:
        out += [gpu_candidate(p, wl, prices[g.name]) for p in sweep_gpu(shape, g, cal, spec)]
    for h in lpus:
        for g in gpus:
            out += _hybrids(shape, h, g, lpu_plans[h.name], prices, cal, handoff, spec)
    return out


def _hybrids(
    shape: ModelShape,
    lpu: Hardware,
    gpu: Hardware,
    lpu_plans: list[LpuPlan],
    prices: dict[str, float],
    cal: GpuCalibration,
    handoff: Handoff,
    spec: SweepSpec,
) -> list[Candidate]:
    wl, out = spec.workload, []
    for bits in _gpu_bits_options(gpu, spec):  # the prefill GPUs drop to 8-bit only where 16 fits nowhere, as above
        g_prefill = min_gpus(shape, gpu, cal, wl.context, bits)
        prefill = plan_gpu(shape, gpu, cal, g_prefill, 1, wl.context, wl.prompt, bits) if g_prefill else None
        if prefill is not None:
            out += [
                prefill_gpu_decode_lpu(p, prefill, handoff, wl, prices[lpu.name], prices[gpu.name]) for p in lpu_plans
            ]
            break
    for batch in spec.batches:
        opts = _lpu_options(lpu, spec, batch)
        g = 1
        while g <= gpu.max_chips:
            probe = attention_options(opts, gpu, g, cal, handoff)
            parts = partitions(shape, lpu, probe, spec.lpu_chips)
            for part in _spread(parts, spec.stage_steps):
                plan = plan_partition(shape, lpu, part, probe)
                out.append(attention_candidate(plan, wl, prices[lpu.name], prices[gpu.name]))
            g *= 2
    return out


PARETO_MIN_SAVING = 0.01  # a slower point joins the frontier only if at least 1% cheaper


def pareto(cands: list[Candidate]) -> list[Candidate]:
    """Candidates no other candidate beats on both speed per user (higher) and cost (lower), fastest first;
    a slower one must be at least PARETO_MIN_SAVING cheaper (no long flat tails of equal cost)."""
    best: list[Candidate] = []
    for c in sorted(cands, key=lambda c: (-c.per_user_tokens_per_s, c.cost_per_mtok)):
        if not best or c.cost_per_mtok <= best[-1].cost_per_mtok * (1 - PARETO_MIN_SAVING):
            best.append(c)
    return best


def cheapest_meeting(cands: list[Candidate], tokens_per_s: float) -> dict[Kind, Candidate | None]:
    """Per kind, the cheapest candidate whose per-user decode speed reaches `tokens_per_s`."""
    out: dict[Kind, Candidate | None] = {k: None for k in Kind}
    for c in cands:
        if c.per_user_tokens_per_s >= tokens_per_s:
            cur = out[c.kind]
            if cur is None or c.cost_per_mtok < cur.cost_per_mtok:
                out[c.kind] = c
    return out


_COLORS = {
    Kind.GPU: "tab:green",
    Kind.LPU: "tab:orange",
    Kind.PREFILL_GPU_DECODE_LPU: "tab:blue",
    Kind.ATTENTION_GPU_PROJECTIONS_LPU: "tab:purple",
}


def plot_frontier(cands: list[Candidate], path: Path, title: str) -> None:
    """PNG: every candidate faintly, each kind's frontier as a line, the union frontier dashed black."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not cands:
        raise ValueError("nothing to plot: no configuration fits; check the targets and --context")
    fig, ax = plt.subplots(figsize=(9, 6), dpi=110)
    for kind in Kind:
        mine = [c for c in cands if c.kind is kind]
        if not mine:
            continue
        ax.scatter(
            [c.per_user_tokens_per_s for c in mine],
            [c.cost_per_mtok for c in mine],
            s=6,
            alpha=0.15,
            color=_COLORS[kind],
        )
        front = pareto(mine)
        ax.plot(
            [c.per_user_tokens_per_s for c in front],
            [c.cost_per_mtok for c in front],
            marker="o",
            ms=3,
            color=_COLORS[kind],
            label=kind.value,
        )
    union = pareto(cands)
    ax.plot(
        [c.per_user_tokens_per_s for c in union],
        [c.cost_per_mtok for c in union],
        "k--",
        lw=1.5,
        label="union frontier",
    )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("decode tokens/s per user")
    ax.set_ylabel("$ per million output tokens (prefill included)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown_table(cands: list[Candidate]) -> str:
    """Markdown table of `cands` (e.g. a frontier)."""
    rows = [
        "| kind | layout | batch | tok/s/user | aggregate tok/s | TTFT ms | $/M tok | kW |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in cands:
        rows.append(
            f"| {c.kind.value} | {c.layout} | {c.batch} | {c.per_user_tokens_per_s:,.1f} | "
            f"{c.aggregate_tokens_per_s:,.0f} | {c.ttft_s * 1e3:,.1f} | {c.cost_per_mtok:,.4f} | "
            f"{c.power_w / 1e3:,.1f} |"
        )
    return "\n".join(rows) + "\n"
