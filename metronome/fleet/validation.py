"""Predicted vs published speeds. Every free term is fitted on the other rows of its table (leave-one-out),
so no row is its own fit; each prediction comes with its band: the prediction's range when the free term
takes each value a single published row (at either end of its published range) would give it.

LPU rows (tsp-v1): the free term is the per-op latency; the step is the compiled schedule at that latency
(not linear in it: a longer latency changes what overlaps, so the fit evaluates the schedule itself).
GPU rows (NeMo latency, batch 1): the free term is the serving stack's per-step overhead; bandwidth
efficiency and all-reduce latency come from gpt-fast's A100 runs (calibration.toml), whose efficiency is
uncertain between the datasheet and the empirical peak: the band spans both. Speculative rows are not
predicted (the draft model and acceptance are not public): they report the acceptance the figure implies.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

from metronome.fleet.catalog import Hardware
from metronome.fleet.gpu import GpuCalibration, step_time
from metronome.fleet.lpu import LpuOptions, LpuPlan, Pass, compile_lpu, distribute_layers, plan_partition, step_timing
from metronome.fleet.shapes import ModelShape, builtin_shapes

GRID = 100  # points of the coarse search for the fit, before it is refined between the best point's neighbours
REFINE_STEPS = 40  # golden-section steps of that refinement (the bracket shrinks 0.618x a step)


@dataclass(frozen=True)
class ValidationRow:
    table: str  # "lpu" | "gpu"
    model: str
    hardware: str
    layout: str
    predicted: float  # tokens/s per user (lpu) or end-to-end tokens/s of the request (gpu)
    band_low: float  # the prediction across the fit's uncertainty
    band_high: float
    published_low: float
    published_high: float
    fitted: str  # the free term's value used for this row, and on what
    source: str

    @property
    def published(self) -> float:
        return (self.published_low + self.published_high) / 2

    @property
    def ratio(self) -> float:
        return self.predicted / self.published

    @property
    def band_ratio(self) -> tuple[float, float]:
        return self.band_low / self.published, self.band_high / self.published


class _Row:
    """A row's predicted time per token as a function of the free term x (increasing in it), its published
    time range, and the values it was evaluated at (the fits evaluate each row at many points)."""

    def __init__(self, time: Callable[[float], float], t_low: float, t_high: float) -> None:
        self._time, self.t_low, self.t_high = time, t_low, t_high
        self._seen: dict[float, float] = {}

    def time(self, x: float) -> float:
        if x not in self._seen:
            self._seen[x] = self._time(x)
        return self._seen[x]


def _ceiling(rows: list[_Row]) -> float:
    """A value of the free term at which every row runs at least twice its published time: the search's
    upper end (the best fit lies below it)."""
    x = 1e-6
    while any(r.time(x) < 2 * r.t_high for r in rows):
        x *= 2
        if x > 1.0:
            raise ValueError("the published rows are not reached by any free term up to 1 s")
    return x


def _fit(rows: list[_Row], ceiling: float) -> float:
    """x minimizing the squared relative time error over `rows`, against each one's midpoint: a grid over
    [0, ceiling], then a golden-section search between the best grid point's neighbours."""

    def error(x: float) -> float:
        return sum((r.time(x) / ((r.t_low + r.t_high) / 2) - 1) ** 2 for r in rows)

    grid = [ceiling * i / GRID for i in range(GRID + 1)]
    best = min(range(len(grid)), key=lambda i: error(grid[i]))
    lo, hi = grid[max(best - 1, 0)], grid[min(best + 1, GRID)]
    golden = (5**0.5 - 1) / 2
    for _ in range(REFINE_STEPS):
        a, b = hi - golden * (hi - lo), lo + golden * (hi - lo)
        lo, hi = (lo, b) if error(a) <= error(b) else (a, hi)
    x = (lo + hi) / 2
    if x <= ceiling / GRID / 2:
        raise ValueError("the fit rows do not constrain the free term (hardware terms alone exceed them)")
    return x


def _solve(row: _Row, t: float, ceiling: float) -> float | None:
    """The free term at which `row` takes time `t` (bisection; the time grows with it), or None where the
    row is slower than `t` already at 0."""
    lo, hi = 0.0, ceiling
    if row.time(lo) >= t:
        return None
    while row.time(hi) < t:
        lo, hi = hi, 2 * hi
    for _ in range(REFINE_STEPS):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if row.time(mid) < t else (lo, mid)
    return (lo + hi) / 2


def _single_fits(rows: list[_Row], ceiling: float) -> list[float]:
    """The free term each row alone gives, at either end of its published range (> 0 only)."""
    found = [_solve(r, t, ceiling) for r in rows for t in (r.t_low, r.t_high)]
    return [x for x in found if x is not None and x > 0]


def lpu_for_published(entry: dict, shape: ModelShape, hw: Hardware) -> LpuPlan:
    """The published layout when Groq gave one (chips, tp), else the planner's fastest layout."""
    opts = LpuOptions(weight_bits=entry["weight_bits"], context=entry["context"])
    if entry.get("chips") and entry.get("tp"):
        part = distribute_layers(shape, entry["chips"] // entry["tp"], entry["tp"])
        return plan_partition(shape, hw, part, opts)
    return compile_lpu(shape, hw, opts)


def _lpu_row(entry: dict, shape: ModelShape, hw: Hardware) -> tuple[_Row, LpuPlan]:
    """The step time of `entry`'s layout as a function of the op latency: its compiled schedule at that
    latency. The layout is chosen (when not published) at the catalog's op latency; the fit moves only the
    timing. (Extrapolated from two latencies as a line, it missed the schedule by up to 6 %: llama-2-70b on
    576 chips took 3.93 ms at 2.23 us, the line said 3.69.)"""
    plan = lpu_for_published(entry, shape, hw)
    part, opts = plan.partition, plan.options

    def time(x: float) -> float:
        return plan_partition(shape, dataclasses.replace(hw, op_latency_s=x), part, opts).decode.total_s

    return _Row(time, 1 / entry["tokens_per_s_high"], 1 / entry["tokens_per_s_low"]), plan


def fit_op_latency(entries: list[dict], hw: Hardware) -> float:
    """The per-op latency (seconds) that best matches `entries`' published speeds (least squares on the
    relative step time)."""
    shapes = builtin_shapes()
    rows = [_lpu_row(e, shapes[e["model"]], hw)[0] for e in entries]
    return _fit(rows, _ceiling(rows))


def lpu_rows(entries: list[dict], hw: Hardware) -> list[ValidationRow]:
    shapes = builtin_shapes()
    fitted = [_lpu_row(e, shapes[e["model"]], hw) for e in entries]
    ceiling = _ceiling([row for row, _ in fitted])
    rows = []
    for i, e in enumerate(entries):
        others = [row for j, (row, _) in enumerate(fitted) if j != i]
        x = _fit(others, ceiling)
        singles = _single_fits(others, ceiling)
        (own, plan) = fitted[i]
        p = plan.partition
        speed = [1 / own.time(v) for v in (x, min(singles), max(singles))]
        rows.append(
            ValidationRow(
                "lpu",
                e["model"],
                e["hardware"],
                f"{plan.chips} chips (tp{p.tp} x {p.stages}), {e['weight_bits']}-bit, {e['context']} ctx",
                speed[0],
                min(speed),
                max(speed),
                e["tokens_per_s_low"],
                e["tokens_per_s_high"],
                f"op latency {x * 1e6:.2f} us (fit on the {len(others)} other LPU rows)",
                e["source"],
            )
        )
    return rows


def _gpu_row(entry: dict, shape: ModelShape, hw: Hardware, cal: GpuCalibration) -> _Row:
    """Request latency = prefill + (output - 1) decode steps, linear in the per-step overhead (output
    steps in all). Per output token, so that every table fits the same way."""
    n, out, g = entry["prompt"], entry["output"], entry["gpus"]

    def latency(overhead: float) -> float:
        c = dataclasses.replace(cal, step_overhead_s=overhead)
        prefill = step_time(shape, hw, c, g, n, 1, max(1, n // 2), 16)
        steps = sum(step_time(shape, hw, c, g, 1, 1, n + k, 16) for k in range(1, out))
        return (prefill + steps) / out

    t = entry["latency_s"] / out
    return _Row(latency, t, t)


def gpu_rows(entries: list[dict], hardware: dict[str, Hardware], cal: GpuCalibration, cal_high: GpuCalibration):
    """NeMo latency rows; `cal` and `cal_high`: the two ends of the bandwidth-efficiency uncertainty."""
    shapes = builtin_shapes()
    rows = []
    curves = {
        id(c): [_gpu_row(e, shapes[e["model"]], hardware[e["hardware"]], c) for e in entries] for c in (cal, cal_high)
    }
    ceiling = {id(c): _ceiling(curves[id(c)]) for c in (cal, cal_high)}
    for i, e in enumerate(entries):
        speeds = []
        for c in (cal, cal_high):
            others = [x for j, x in enumerate(curves[id(c)]) if j != i]
            x = _fit(others, ceiling[id(c)])
            own = curves[id(c)][i]
            singles = _single_fits(others, ceiling[id(c)])
            speeds += [1 / own.time(v) for v in (x, min(singles), max(singles))]
            if c is cal:
                fitted = f"step overhead {x * 1e3:.2f} ms (fit on the {len(others)} other GPU rows)"
        rows.append(
            ValidationRow(
                "gpu",
                e["model"],
                e["hardware"],
                f"{e['gpus']} GPU, bf16, {e['prompt']} in + {e['output']} out",
                speeds[0],
                min(speeds),
                max(speeds),
                e["output"] / e["latency_s"],
                e["output"] / e["latency_s"],
                fitted,
                e["source"],
            )
        )
    return rows


def implied_acceptance(entry: dict, hw: Hardware, op_latency_s: float) -> tuple[float, float]:
    """(plain speed, mean tokens per verification) the published speculative speed implies for the target
    model alone: verification steps of draft_tokens + 1 rows on the planner's layout, drafting not costed
    (so the implied figure is a lower bound)."""
    shape = builtin_shapes()[entry["model"]]
    hw = dataclasses.replace(hw, op_latency_s=op_latency_s)
    k = entry["draft_tokens"]
    plain = compile_lpu(shape, hw, LpuOptions(weight_bits=entry["weight_bits"], context=entry["context"]))
    verify = step_timing(shape, hw, plain.partition, plain.options, Pass(k + 1, 1, entry["context"]))
    return plain.per_user_tokens_per_s, entry["tokens_per_s"] * verify.total_s


def validation_rows(
    hardware: dict[str, Hardware], published: dict[str, list[dict]], cal: GpuCalibration, cal_high: GpuCalibration
) -> list[ValidationRow]:
    lpu = [e for e in published["lpu"]]
    hw = hardware[lpu[0]["hardware"]]
    if any(e["hardware"] != hw.name for e in lpu):
        raise ValueError("published.toml: every [[lpu]] row must be on one chip (one free op latency)")
    return lpu_rows(lpu, hw) + gpu_rows(published["gpu"], hardware, cal, cal_high)


def validation_table(rows: list[ValidationRow]) -> str:
    lines = [
        "| model | hardware | layout | predicted tok/s (band) | published tok/s | ratio (band) | free term | source |",
        "| --- | --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for r in rows:
        pub = (
            f"{r.published_low:,.0f}"
            if r.published_low == r.published_high
            else f"{r.published_low:,.0f}-{r.published_high:,.0f}"
        )
        lo, hi = r.band_ratio
        lines.append(
            f"| {r.model} | {r.hardware} | {r.layout} | {r.predicted:,.0f} ({r.band_low:,.0f}-{r.band_high:,.0f}) "
            f"| {pub} | {r.ratio:.2f} ({lo:.2f}-{hi:.2f}) | {r.fitted} | {r.source} |"
        )
    return "\n".join(lines) + "\n"


def efficiency_band(table: dict, cal: GpuCalibration) -> GpuCalibration:
    """`cal` at the high end of the bandwidth-efficiency uncertainty (gpt-fast's empirical peak)."""
    g = table["gpu"]
    return dataclasses.replace(cal, bandwidth_efficiency=g["achieved_bandwidth"] / g["empirical_peak_bandwidth"])


def validation_report(hardware: dict[str, Hardware], published: dict[str, list[dict]], table: dict) -> str:
    """The `--validate` output: the table, then what the speculative rows imply."""
    from metronome.fleet.gpu import calibration_from_table

    cal = calibration_from_table(table)
    rows = validation_rows(hardware, published, cal, efficiency_band(table, cal))
    lines = [validation_table(rows)]
    lpu = published["lpu"]
    x = fit_op_latency(lpu, hardware[lpu[0]["hardware"]])
    for e in published.get("speculative", []):
        plain, accepted = implied_acceptance(e, hardware[e["hardware"]], x)
        lines.append(
            f"not predicted: {e['model']} on {e['hardware']} with speculative decoding, {e['tokens_per_s']:,.0f} "
            f"tok/s published ({e['source']}): plain decoding on the planner's fastest layout, at the op latency "
            f"fitted on every LPU row, is predicted at {plain:,.0f} tok/s; the figure "
            f"implies {accepted:.1f} tokens per verification of {e['draft_tokens']} drafts (at most "
            f"{e['draft_tokens'] + 1}), drafting not costed\n"
        )
    return "".join(lines)
