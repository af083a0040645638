"""The bench's outputs: a JSON document (schema in `schema.json`), a Markdown table and two PNG plots.

Ratios compare each target with the baseline at the same concurrency: the baseline is the target
named "metronome" when there is one, else the first target.
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

import metronome
from metronome.bench.metrics import Summary, Window, figures, ratios, summarize
from metronome.bench.runner import Measurement, SweepConfig, SweepOutcome, Target

SCHEMA_ID = "metronome-bench/1"


@dataclass(frozen=True)
class Environment:
    """Where the run happened."""

    platform: str
    python: str
    cpu_count: int
    metronome_version: str
    peer_threads: int | None

    @staticmethod
    def here(peer_threads: int | None) -> Environment:
        return Environment(
            platform=platform.platform(),
            python=platform.python_version(),
            cpu_count=os.cpu_count() or 1,
            metronome_version=metronome.__version__,
            peer_threads=peer_threads,
        )


@dataclass(frozen=True)
class BenchReport:
    """Everything a run produced: settings, raw measurements and their per-(target, concurrency) summaries."""

    started_at: float
    finished_at: float
    interrupted: bool
    config: SweepConfig
    prompt_tokens_counted_by: str
    environment: Environment
    targets: tuple[Target, ...]
    baseline: str
    measurements: tuple[Measurement, ...]
    summaries: tuple[Summary, ...]


def build_report(
    outcome: SweepOutcome,
    config: SweepConfig,
    targets: Sequence[Target],
    environment: Environment,
    prompt_tokens_counted_by: str,
    started_at: float,
    finished_at: float,
) -> BenchReport:
    """Pool the measurements of each (concurrency, target) into a summary."""
    summaries = []
    for concurrency in config.concurrency:
        for target in targets:
            windows = [
                Window(wall_s=m.wall_s, requests=m.requests)
                for m in outcome.measurements
                if m.target == target.name and m.concurrency == concurrency
            ]
            if windows:
                summaries.append(summarize(target.name, concurrency, windows))
    names = [t.name for t in targets]
    return BenchReport(
        started_at=started_at,
        finished_at=finished_at,
        interrupted=outcome.interrupted,
        config=config,
        prompt_tokens_counted_by=prompt_tokens_counted_by,
        environment=environment,
        targets=tuple(targets),
        baseline="metronome" if "metronome" in names else names[0],
        measurements=outcome.measurements,
        summaries=tuple(summaries),
    )


def baseline_of(report: BenchReport, summary: Summary) -> Summary | None:
    for candidate in report.summaries:
        if candidate.target == report.baseline and candidate.concurrency == summary.concurrency:
            return candidate
    return None


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, tz=timezone.utc).isoformat(timespec="seconds")


def _summary_json(report: BenchReport, summary: Summary) -> dict:
    base = baseline_of(report, summary)
    data = asdict(summary)
    data["error_kinds"] = [{"kind": k, "count": n, "example": m} for k, n, m in summary.error_kinds]
    data["output_tokens_per_s_by_round"] = list(summary.output_tokens_per_s_by_round)
    data["metrics"] = data.pop("stats")
    data["ratio_to_baseline"] = ratios(summary, base) if base is not None else None
    return data


def report_json(report: BenchReport) -> dict:
    """The report as the JSON-ready document described by `schema.json`."""
    config = report.config
    return {
        "schema": SCHEMA_ID,
        "started_at": _iso(report.started_at),
        "finished_at": _iso(report.finished_at),
        "interrupted": report.interrupted,
        "environment": asdict(report.environment),
        "config": {
            "workload": asdict(config.workload),
            "concurrency": list(config.concurrency),
            "rounds": config.rounds,
            "requests_per_user": config.requests_per_user,
            "warmup": config.warmup,
            "seed": config.seed,
            "api": config.api.value,
            "ignore_eos": config.ignore_eos,
            "temperature": config.temperature,
            "request_timeout_s": config.request_timeout_s,
            "prompt_tokens_counted_by": report.prompt_tokens_counted_by,
        },
        "targets": [{**asdict(t), "command": list(t.command)} for t in report.targets],
        "baseline": report.baseline,
        "summaries": [_summary_json(report, s) for s in report.summaries],
        "measurements": [
            {
                "target": m.target,
                "concurrency": m.concurrency,
                "round": m.round_index,
                "started_at": _iso(m.started_at),
                "wall_s": m.wall_s,
                "complete": m.complete,
                "warmup_errors": list(m.warmup_errors),
                "requests": [asdict(r) for r in m.requests],
            }
            for m in report.measurements
        ],
    }


def load_schema() -> dict:
    """The JSON Schema (draft 2020-12) of `report_json`'s document."""
    return json.loads(resources.files("metronome.bench").joinpath("schema.json").read_text(encoding="utf-8"))


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _with_ratio(value: float | None, ratio: float | None, digits: int, show_ratio: bool) -> str:
    text = _number(value, digits)
    return f"{text} ({ratio:.2f}×)" if show_ratio and ratio is not None else text


_COLUMNS = (
    ("TTFT p50 (s)", "ttft_s.p50", 3),
    ("output speed p50 (tok/s)", "output_speed_tps.p50", 1),
    ("first sentence p50 (s)", "first_sentence_s.p50", 3),
    ("e2e 100 tok p50 (s)", "e2e_100_s.p50", 3),
    ("total p50 (s)", "total_s.p50", 3),
    ("req/s", "requests_per_s", 3),
    ("aggregate tok/s", "output_tokens_per_s", 1),
)


def render_markdown(report: BenchReport) -> str:
    """A table per (concurrency, target) with ratios to the baseline, then notes."""
    config, workload = report.config, report.config.workload
    several = len(report.targets) > 1
    lines = [
        f"# metronome bench: workload `{workload.name}`",
        "",
        f"- {workload.input_tokens} tokens in (counted by {report.prompt_tokens_counted_by}) / "
        f"{workload.output_tokens} out (scale {workload.scale:g}), API `{config.api.value}`, "
        f"ignore_eos {'on' if config.ignore_eos else 'off'}",
        f"- {config.rounds} round(s) interleaved across targets, {config.requests_per_user} request(s) per user "
        f"per round, {config.warmup} warmup request(s) per measurement, seed {config.seed}",
        f"- started {_iso(report.started_at)}, finished {_iso(report.finished_at)}"
        + (" — **interrupted: partial results**" if report.interrupted else ""),
    ]
    if several:
        lines.append(f"- ratios in parentheses are to `{report.baseline}` at the same concurrency")
    lines += [
        "",
        "| concurrency | target | " + " | ".join(title for title, _, _ in _COLUMNS) + " | errors |",
        "|---:|---|" + "---:|" * len(_COLUMNS) + "---:|",
    ]
    notes = []
    for summary in report.summaries:
        base = baseline_of(report, summary)
        values = figures(summary)
        rel = ratios(summary, base) if base is not None else {}
        show = several and summary.target != report.baseline
        cells = [_with_ratio(values[name], rel.get(name), digits, show) for _, name, digits in _COLUMNS]
        lines.append(
            f"| {summary.concurrency} | {summary.target} | "
            + " | ".join(cells)
            + f" | {summary.errors}/{summary.requests} |"
        )
        for kind, count, example in summary.error_kinds:
            notes.append(f"- {summary.target} at concurrency {summary.concurrency}: {count} × {kind} (e.g. {example})")
        if summary.chunk_counted:
            notes.append(
                f"- {summary.target} at concurrency {summary.concurrency}: {summary.chunk_counted} response(s) "
                "sent no usage, so their tokens were counted as chunks (under-counted where a chunk carries "
                "several; give --tokenizer to count them)"
            )
        if summary.short_outputs:
            notes.append(
                f"- {summary.target} at concurrency {summary.concurrency}: {summary.short_outputs} response(s) "
                "shorter than max_tokens (server may ignore ignore_eos); figures use the measured length"
            )
        if summary.e2e_100_projected:
            notes.append(
                f"- {summary.target} at concurrency {summary.concurrency}: e2e 100 tok projected as "
                f"TTFT + 99 / speed for {summary.e2e_100_projected} response(s) shorter than 100 tokens"
            )
    if notes:
        lines += ["", "Notes:", *notes]
    return "\n".join(lines) + "\n"


def _new_axes(title: str, xlabel: str, ylabel: str) -> tuple[Figure, object]:
    figure = Figure(figsize=(7.5, 5.0), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    axes.set_title(title)
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.grid(True, alpha=0.3)
    return figure, axes


def _series(report: BenchReport, target: str) -> list[Summary]:
    return sorted((s for s in report.summaries if s.target == target), key=lambda s: s.concurrency)


def plot_speed_vs_throughput(report: BenchReport, path: Path) -> Path:
    """Per-user output speed (p50) against aggregate output throughput: the Pareto points."""
    figure, axes = _new_axes(
        f"Per-user speed vs system throughput ({report.config.workload.name})",
        "aggregate output tokens/s",
        "per-user output speed, p50 (tokens/s)",
    )
    for target in report.targets:
        points = [
            (s.output_tokens_per_s, s.stats.output_speed_tps.p50, s.concurrency)
            for s in _series(report, target.name)
            if s.output_tokens_per_s is not None and s.stats.output_speed_tps.p50 is not None
        ]
        if not points:
            continue
        xs, ys, levels = zip(*points)
        axes.plot(xs, ys, marker="o", label=target.name)
        for x, y, level in points:
            axes.annotate(f"c={level}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axes.set_xlim(left=0)
    axes.set_ylim(bottom=0)
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    figure.savefig(path, format="png")
    return path


def plot_ttft(report: BenchReport, path: Path) -> Path:
    """TTFT p50 (solid) and p90 (dashed) against concurrency."""
    figure, axes = _new_axes(
        f"Time to first token vs concurrency ({report.config.workload.name})", "concurrent users", "TTFT (s)"
    )
    for target in report.targets:
        series = [s for s in _series(report, target.name) if s.stats.ttft_s.p50 is not None]
        if not series:
            continue
        xs = [s.concurrency for s in series]
        (line,) = axes.plot(xs, [s.stats.ttft_s.p50 for s in series], marker="o", label=f"{target.name} p50")
        axes.plot(
            xs, [s.stats.ttft_s.p90 for s in series], linestyle="--", color=line.get_color(), label=f"{target.name} p90"
        )
    if len(report.config.concurrency) > 1:
        axes.set_xscale("log", base=2)
    axes.set_xticks(list(report.config.concurrency), [str(c) for c in report.config.concurrency])
    axes.set_ylim(bottom=0)
    if axes.get_legend_handles_labels()[0]:
        axes.legend()
    figure.savefig(path, format="png")
    return path


@dataclass(frozen=True)
class WrittenFiles:
    """Paths of the files `write_report` wrote."""

    json: Path
    markdown: Path
    plots: tuple[Path, ...]


def write_report(report: BenchReport, out_dir: Path) -> WrittenFiles:
    """results.json, results.md, speed_vs_throughput.png and ttft_vs_concurrency.png in `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(report_json(report), indent=2) + "\n", encoding="utf-8")
    md_path = out_dir / "results.md"
    md_path.write_text(render_markdown(report), encoding="utf-8")
    plots = (
        plot_speed_vs_throughput(report, out_dir / "speed_vs_throughput.png"),
        plot_ttft(report, out_dir / "ttft_vs_concurrency.png"),
    )
    return WrittenFiles(json=json_path, markdown=md_path, plots=plots)
