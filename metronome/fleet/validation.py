"""Predicted vs published decode speeds, and the one fit behind the LPU's per-op latency."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from metronome.fleet.catalog import Hardware, HardwareKind
from metronome.fleet.gpu import BOUND, step_time
from metronome.fleet.lpu import LpuOptions, LpuPlan, compile_lpu, distribute_layers, plan_partition
from metronome.fleet.shapes import ModelShape, builtin_shapes


@dataclass(frozen=True)
class ValidationRow:
    model: str
    hardware: str
    layout: str
    predicted: float  # tokens/s per user
    published_low: float
    published_high: float

    @property
    def published(self) -> float:
        return (self.published_low + self.published_high) / 2

    @property
    def ratio(self) -> float:
        return self.predicted / self.published


def lpu_for_published(entry: dict, shape: ModelShape, hw: Hardware) -> LpuPlan:
    """The published layout when Groq gave one (chips, tp), else the planner's fastest layout."""
    opts = LpuOptions(weight_bits=entry["weight_bits"], context=entry["context"])
    if entry["chips"] and entry["tp"]:
        part = distribute_layers(shape, entry["chips"] // entry["tp"], entry["tp"])
        return plan_partition(shape, hw, part, opts)
    return compile_lpu(shape, hw, opts)


def fit_op_latency(entry: dict, shape: ModelShape, hw: Hardware) -> float:
    """The per-op latency (seconds) that makes the decode step of `entry`'s layout match the midpoint of its
    published speed. The step time is linear in it: t(x) = a + n_ops * x."""
    target = 2.0 / (entry["tokens_per_s_low"] + entry["tokens_per_s_high"])
    t0 = lpu_for_published(entry, shape, dataclasses.replace(hw, op_latency_s=0.0)).decode.total_s
    t1 = lpu_for_published(entry, shape, dataclasses.replace(hw, op_latency_s=1e-6)).decode.total_s
    slope = (t1 - t0) / 1e-6
    x = (target - t0) / slope
    if x <= 0:
        raise ValueError(f"{entry['model']}: hardware terms alone exceed the published time; nothing to fit")
    return x


def validation_rows(hardware: dict[str, Hardware], published: list[dict]) -> list[ValidationRow]:
    """One row per published result. LPU rows: the compiled decode step at batch 1. GPU rows: the batch-1
    bandwidth bound (efficiency 1), which is what the published GPU figure is."""
    shapes = builtin_shapes()
    rows = []
    for e in published:
        shape, hw = shapes[e["model"]], hardware[e["hardware"]]
        if hw.kind is HardwareKind.LPU:
            plan = lpu_for_published(e, shape, hw)
            p = plan.partition
            layout, predicted = f"{plan.chips} chips (tp{p.tp} x {p.stages})", 1.0 / plan.decode.total_s
        else:
            t = step_time(shape, hw, BOUND, e["chips"], 1, 1, e["context"], e["weight_bits"])
            layout, predicted = f"{e['chips']} GPU, {e['weight_bits']}-bit, bound", 1.0 / t
        rows.append(
            ValidationRow(e["model"], e["hardware"], layout, predicted, e["tokens_per_s_low"], e["tokens_per_s_high"])
        )
    return rows


def validation_table(rows: list[ValidationRow]) -> str:
    lines = [
        "| model | hardware | layout | predicted tok/s | published tok/s | ratio |",
        "| --- | --- | --- | ---: | ---: | ---: |",
    ]
    for r in rows:
        pub = (
            f"{r.published_low:g}"
            if r.published_low == r.published_high
            else f"{r.published_low:g}-{r.published_high:g}"
        )
        lines.append(f"| {r.model} | {r.hardware} | {r.layout} | {r.predicted:,.0f} | {pub} | {r.ratio:.2f} |")
    return "\n".join(lines) + "\n"
