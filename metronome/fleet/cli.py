"""`metronome plan`: compile a model onto LPU, GPU and hybrid fleets; print the cheapest of each kind."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from metronome.args import add_engine_args, was_given
from metronome.fleet.catalog import (
    Hardware,
    HardwareKind,
    hourly_price,
    load_calibration,
    load_cost_model,
    load_hardware,
    load_published,
    with_prices,
)
from metronome.fleet.costs import Candidate, Kind, Workload
from metronome.fleet.frontier import SweepSpec, cheapest_meeting, markdown_table, pareto, plot_frontier, sweep
from metronome.fleet.gpu import calibration_from_table
from metronome.fleet.hybrid import Handoff
from metronome.fleet.lpu import chrome_trace
from metronome.fleet.machine import THIS_MACHINE, machine_hardware, measure_machine
from metronome.fleet.render import trace_svg
from metronome.fleet.schedule import GPU_PID
from metronome.fleet.shapes import load_shape
from metronome.fleet.validation import validation_report

DEFAULT_TARGETS = ("tsp-v1", "h100-sxm")


_SVG_US = 100.0  # --svg-us's default (a value other than it needs --trace-svg)
_ROUNDS = 3  # --rounds' default (a value other than it needs --measure)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="built-in name (e.g. llama-2-70b), a .gguf file or an HF model folder")
    p.add_argument("--tokens-per-s", type=float, help="decode speed each user must get (tokens/s)")
    p.add_argument("--prompt", type=int, default=1000, help="prompt tokens per request (default 1000)")
    p.add_argument("--output", type=int, default=1000, help="output tokens per request (default 1000)")
    p.add_argument(
        "--target",
        action="append",
        metavar="HW",
        help=f"hardware to plan for, repeatable: {', '.join(sorted(load_hardware()))}, {THIS_MACHINE} "
        f"(default: {' + '.join(DEFAULT_TARGETS)})",
    )
    p.add_argument("--chips", type=int, help="LPU chip budget (default: up to the system maximum)")
    p.add_argument("--weight-bits", type=int, help="LPU weight storage bits (default: the chip's, 8 on tsp-v1)")
    p.add_argument("--gpu-weight-bits", type=int, help="GPU weight bits (default 16; 8 only if 16 fits nowhere)")
    p.add_argument(
        "--price-per-hour",
        action="append",
        default=[],
        metavar="HW=USD",
        help="override a chip's hourly price (default: purchase price amortized + power)",
    )
    p.add_argument(
        "--price-per-chip",
        action="append",
        default=[],
        metavar="HW=USD",
        help="override a chip's purchase price (cited defaults in the catalog)",
    )
    p.add_argument("--trace", type=Path, metavar="OUT.json", help="write the LPU decode-step schedule (Perfetto)")
    p.add_argument(
        "--trace-svg",
        type=Path,
        metavar="OUT.svg",
        help="with --trace: also draw the first 2 chips (and any GPU) over the first --svg-us microseconds",
    )
    p.add_argument("--svg-us", type=float, default=_SVG_US, help="time window of --trace-svg (default 100 us)")
    p.add_argument("--plot", type=Path, metavar="OUT.png", help="write the cost vs speed Pareto plot")
    p.add_argument("--table", type=Path, metavar="OUT.md", help="write the frontier as a Markdown table")
    p.add_argument(
        "--calibrate",
        action="store_true",
        help="measure this machine and predict metronome's own decode (1 and 8 live slots) and prefill speed "
        "for MODEL (a model file or registered name; default SmolLM2)",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="with --calibrate: also run the engine (as `metronome bench --decode-only` does) and compare",
    )
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="with --calibrate: the device to calibrate")
    p.add_argument(
        "--rounds",
        type=int,
        default=_ROUNDS,
        help="with --calibrate --measure: alternate the machine terms and the engine this many times and report "
        "medians (default 3; this machine's bandwidth drifts from minute to minute)",
    )
    add_engine_args(p, only=("threads",))
    p.add_argument("--validate", action="store_true", help="print predicted vs published speeds and exit")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Register `plan` on the main CLI's subparsers."""
    p = subparsers.add_parser(
        "plan", help="plan LPU / GPU / hybrid fleets for a model and a speed target", description=__doc__
    )
    add_arguments(p)
    p.set_defaults(func=run)


def _prices(flag: str, items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, sep, value = item.partition("=")
        try:
            if not sep:
                raise ValueError
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"{flag} {item!r}: write it as HW=USD, e.g. {flag} tsp-v1=0.9") from None
    return out


def _hardware(args: argparse.Namespace, catalog: dict[str, Hardware]) -> list[Hardware]:
    names = args.target or list(DEFAULT_TARGETS)
    known = sorted(catalog) + [THIS_MACHINE]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"--target {', '.join(unknown)}: unknown; choose from {', '.join(known)}")
    return [catalog[n] for n in names]


def _fmt(c: Candidate) -> str:
    return (
        f"{c.layout:<58} batch {c.batch:>3}  {c.per_user_tokens_per_s:8,.1f} tok/s/user  "
        f"${c.cost_per_mtok:9,.4f}/M tok  {c.power_w / 1e3:7,.1f} kW  TTFT {c.ttft_s * 1e3:7,.1f} ms  "
        f"({c.lpu_chips} LPU chips, {c.gpus} GPUs)"
    )


def _calibrate(args: argparse.Namespace, out) -> None:
    from metronome.compile import available_cores
    from metronome.fleet.calibrate import calibrate_model, calibration_table

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads={args.threads} must be at least 1")
    if args.rounds < 1:
        raise ValueError(f"--rounds={args.rounds} must be at least 1")
    threads = args.threads or available_cores()
    if args.rounds != _ROUNDS and not args.measure:
        raise ValueError("--rounds repeats the --measure runs: give --measure too, or leave --rounds out")
    rounds = args.rounds if args.measure else 1  # the terms alone: one measurement
    terms, rows = calibrate_model(args.model, threads, measure=args.measure, device=args.device, rounds=rounds)
    print(calibration_table(terms, rows), file=out, end="")


# The flags each mode reads besides its own switch; any other given is refused, not silently dropped.
_PLAN_FLAGS = frozenset(
    {"model", "tokens_per_s", "prompt", "output", "target", "chips", "weight_bits", "gpu_weight_bits"}
    | {"price_per_hour", "price_per_chip", "trace", "trace_svg", "svg_us", "plot", "table"}
)
_MODE_FLAGS = {
    "validate": frozenset(),
    "calibrate": frozenset({"model", "measure", "device", "rounds", "threads"}),
    "plan": _PLAN_FLAGS,
}


def _refuse_unused(args: argparse.Namespace, mode: str) -> None:
    """A flag the mode does not read is an error naming it (it used to be ignored without a word)."""
    defaults = argparse.ArgumentParser()
    add_arguments(defaults)
    given = [a for a in defaults._actions if a.dest not in ("help", mode) and was_given(args, a.dest, a.default)]
    unused = [
        a.option_strings[0] if a.option_strings else a.dest.upper() for a in given if a.dest not in _MODE_FLAGS[mode]
    ]
    if unused:
        what = {"validate": "--validate", "calibrate": "--calibrate", "plan": "planning a fleet"}[mode]
        raise ValueError(f"{what} does not use {', '.join(unused)}; leave {'it' if len(unused) == 1 else 'them'} out")


def _check_outputs(args: argparse.Namespace) -> None:
    """What the files to write and the drawing window need, checked before the sweep rather than after it."""
    for flag, path in (
        ("--table", args.table),
        ("--trace", args.trace),
        ("--trace-svg", args.trace_svg),
        ("--plot", args.plot),
    ):
        if path is not None and not path.parent.is_dir():
            raise ValueError(f"{flag} {path}: the folder {path.parent} does not exist")
        if path is not None and path.is_dir():  # was an IsADirectoryError after the whole sweep, naming no flag
            raise ValueError(f"{flag} {path}: this is a folder; name a file in it (e.g. {path / 'plan.md'})")
    if not (math.isfinite(args.svg_us) and args.svg_us > 0):
        raise ValueError(f"--svg-us={args.svg_us}: the drawing's window must be a positive number of microseconds")
    if args.svg_us != _SVG_US and args.trace_svg is None:
        raise ValueError("--svg-us sets the window of the --trace-svg drawing: give --trace-svg OUT.svg too")
    if args.plot is not None:
        from matplotlib.figure import Figure

        formats = Figure().canvas.get_supported_filetypes()
        if args.plot.suffix.lstrip(".").lower() not in formats:
            raise ValueError(f"--plot {args.plot}: name a file ending in one of .{', .'.join(sorted(formats))}")


def _plan(args: argparse.Namespace, out) -> int:
    if args.model is None or args.tokens_per_s is None:
        raise ValueError("give MODEL and --tokens-per-s (or use --validate / --calibrate)")
    if not (math.isfinite(args.tokens_per_s) and args.tokens_per_s > 0):
        raise ValueError(f"--tokens-per-s={args.tokens_per_s} must be a positive number")
    if args.chips is not None and args.chips < 1:
        raise ValueError(f"--chips={args.chips} must be at least 1")
    for flag, bits in (("--weight-bits", args.weight_bits), ("--gpu-weight-bits", args.gpu_weight_bits)):
        if bits is not None and not 1 <= bits <= 32:  # 0 was taken as "the default" and 64 fit no chip, unsaid
            raise ValueError(f"{flag}={bits} must be 1 to 32 (or left out: the chip's own)")
    if args.trace_svg is not None and args.trace is None:
        raise ValueError("--trace-svg draws the --trace schedule: give --trace OUT.json too")
    _check_outputs(args)
    shape = load_shape(args.model)
    catalog = load_hardware()
    if THIS_MACHINE in (args.target or []):
        catalog[THIS_MACHINE] = machine_hardware(measure_machine())
    catalog = with_prices(
        catalog, _prices("--price-per-hour", args.price_per_hour), _prices("--price-per-chip", args.price_per_chip)
    )
    hardware = _hardware(args, catalog)
    if args.trace is not None and not any(h.kind is HardwareKind.LPU for h in hardware):
        raise ValueError("--trace draws an LPU schedule: name an LPU among the targets (e.g. --target tsp-v1)")
    cost = load_cost_model()
    table = load_calibration()
    cal = calibration_from_table(table)
    handoff = Handoff(table["handoff"]["bandwidth"], table["handoff"]["latency_s"])
    workload = Workload(args.prompt, args.output)
    if workload.context > shape.config.max_position:
        raise ValueError(
            f"--prompt {workload.prompt} + --output {workload.output} = {workload.context} tokens is more than "
            f"{shape.name}'s context of {shape.config.max_position}; plan a shorter request"
        )
    spec = SweepSpec(
        workload, lpu_weight_bits=args.weight_bits, gpu_weight_bits=args.gpu_weight_bits, lpu_chips=args.chips
    )
    prices = {h.name: hourly_price(h, cost) for h in hardware}
    cands = sweep(shape, hardware, prices, cal, handoff, spec)
    best = cheapest_meeting(cands, args.tokens_per_s)
    print(
        f"metronome plan: {shape.name} ({shape.total_params() / 1e9:.2f} B params), "
        f"{args.tokens_per_s:g} tok/s per user, prompt {workload.prompt} + output {workload.output}",
        file=out,
    )
    print("prices $/chip-hour: " + ", ".join(f"{n} {p:.3f}" for n, p in prices.items()), file=out)
    for kind in Kind:
        mine = [c for c in cands if c.kind is kind]
        if not mine:
            print(f"{kind.value:<30} {_why_none(kind, hardware)}", file=out)
            continue
        c = best[kind]
        if c is None:
            fastest = max(c.per_user_tokens_per_s for c in mine)
            print(f"{kind.value:<30} none reaches {args.tokens_per_s:g} tok/s (fastest {fastest:,.1f})", file=out)
        else:
            print(f"{kind.value:<30} {_fmt(c)}", file=out)
    winners = [c for c in best.values() if c is not None]
    if winners:
        w = min(winners, key=lambda c: c.cost_per_mtok)
        print(f"winner: {w.kind.value} at ${w.cost_per_mtok:,.4f} per million output tokens", file=out)
    elif cands:
        print(f"no configuration reaches {args.tokens_per_s:g} tok/s per user: lower --tokens-per-s", file=out)
    else:
        print(
            "no target holds the model: name larger or more hardware (--target, --chips), fewer weight bits, "
            "or a shorter request (--prompt, --output: the KV cache)",
            file=out,
        )
    title = f"{shape.name}: prompt {workload.prompt}, output {workload.output}"
    if not cands and (args.plot or args.table or args.trace):  # said above: nothing holds the model
        print("nothing to write: no configuration holds the model", file=sys.stderr)
        return 1
    if args.plot:
        plot_frontier(cands, args.plot, title)
        print(f"wrote {args.plot}", file=out)
    if args.table:
        args.table.write_text(f"# {title}\n\n" + markdown_table(pareto(cands)))
        print(f"wrote {args.table}", file=out)
    if args.trace and not _write_trace(args.trace, winners, cands, out, args.trace_svg, args.svg_us):
        return 1
    return 0 if winners else 1


def _why_none(kind: Kind, hardware: list[Hardware]) -> str:
    """Why a kind of fleet has no candidate: none of its hardware among the targets, or none that holds it."""
    lpu = any(h.kind is HardwareKind.LPU for h in hardware)
    gpu = any(h.kind is not HardwareKind.LPU for h in hardware)
    needs = {Kind.LPU: (lpu, "an LPU"), Kind.GPU: (gpu, "a GPU")}.get(kind, (lpu and gpu, "an LPU and a GPU"))
    if not needs[0]:
        return f"not planned: needs {needs[1]} among the targets (--target)"
    return (
        "no configuration of the targets holds the model (a layer or the KV cache too large for the chips; "
        "see --chips, --weight-bits, --prompt/--output)"
    )


def _write_trace(
    path: Path, winners: list[Candidate], cands: list[Candidate], out, svg: Path | None, svg_us: float
) -> bool:
    """The chosen LPU plan's schedule (and its drawing); False, said, where no LPU layout holds the model."""
    with_lpu = [c for c in winners if c.lpu_plan is not None]
    pool = with_lpu or [c for c in cands if c.lpu_plan is not None]
    if not pool:
        print(
            f"--trace: no layout of the LPU targets holds the model, so {path} has no schedule to show", file=sys.stderr
        )
        return False
    pick = min(pool, key=lambda c: c.cost_per_mtok) if with_lpu else max(pool, key=lambda c: c.per_user_tokens_per_s)
    trace = chrome_trace(pick.lpu_plan, pick.handoff_events)
    path.write_text(json.dumps(trace))
    if svg is not None:
        chips = [c for c in (0, 1) if c < pick.lpu_plan.chips]
        start = min((e["ts"] for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == 0), default=0.0)
        svg.write_text(trace_svg(trace, [*chips, GPU_PID], start + svg_us, from_us=start))
        print(f"wrote {svg}", file=out)
    print(f"wrote {path} ({pick.layout}, batch {pick.batch}; open in https://ui.perfetto.dev)", file=out)
    return True


def run(args: argparse.Namespace) -> int:
    """Entry point of `metronome plan`; returns the exit code (2: bad input, 1: no configuration is fast enough)."""
    out = sys.stdout
    try:
        mode = "validate" if args.validate else "calibrate" if args.calibrate else "plan"
        _refuse_unused(args, mode)
        if args.validate:
            print(validation_report(load_hardware(), load_published(), load_calibration()), file=out, end="")
            return 0
        if args.calibrate:
            _calibrate(args, out)
            return 0
        return _plan(args, out)
    except ValueError as e:
        print(f"metronome plan: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader left (`| head`): metronome's main ends quietly with 141, as for generate
        raise
    except OSError as e:  # a file to write that cannot be (a full disk, no permission)
        print(f"metronome plan: error: {e}", file=sys.stderr)
        return 2
