"""The `bench` subcommand: `add_cli(subparsers)` for `metronome bench`, `main()` for `python -m metronome.bench`.

Only the standard library and `workloads` are imported up front, so that adding the subcommand
costs the `metronome` command nothing; httpx, rich and matplotlib load when `run` is called.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from metronome.args import add_engine_args, engine_config
from metronome.bench.workloads import PRESETS

if TYPE_CHECKING:
    from rich.console import Console

    from metronome.bench.runner import SweepConfig, Target
    from metronome.bench.workloads import TokenCounter

_API_CHOICES = ("chat", "completions")  # the values of client.Api

_EXIT_INTERRUPTED = 130


def _levels(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        levels = ()
    if not levels or any(level < 1 for level in levels):
        raise argparse.ArgumentTypeError(f"want comma-separated integers of at least 1, like 1,2,4,8 (got {text!r})")
    return tuple(sorted(set(levels)))


def _threads(args: argparse.Namespace) -> int:
    """--threads, or the engine's default: every core this process may use."""
    engine_config(args)  # ParamError (a ValueError naming the flag's field) for a value out of range
    if args.threads is not None:
        return args.threads
    from metronome.compile import available_cores  # torch: only when a peer or an engine starts here

    return available_cores()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The bench's options (shared by `metronome bench` and `python -m metronome.bench`)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--url", help="measure a running OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    where.add_argument("--model", type=Path, help="a GGUF file (or model folder): start the server(s) on it")
    parser.add_argument(
        "--compare",
        default="metronome",
        help="with --model: peers to start and compare, from metronome, llama.cpp, transformers "
        "(default: metronome alone)",
    )
    parser.add_argument(
        "--decode-only",
        action="store_true",
        help="single-stream decode tokens/s in process (default model unless --model), beside the "
        "memory-bandwidth bound; --output-tokens tokens, --rounds runs",
    )
    parser.add_argument(
        "--speculation",
        action="store_true",
        help="in process: speculation off and on, greedy and sampled, on chat prompts whose answers "
        "copy a passage (edit, quote, summarize) and on free-form questions; outputs end on EOS "
        "within --output-tokens (default 384); --rounds rounds (--spec-tokens; --draft MODEL for "
        "a draft model)",
    )
    parser.add_argument("--name", default="server", help="label of the --url target in the report")
    parser.add_argument("--served-model", help="model id to send (default: the first id of GET /v1/models)")
    parser.add_argument("--workload", default="short", choices=tuple(PRESETS), help="preset (default short)")
    parser.add_argument("--scale", type=float, default=1.0, help="shrink the preset's token counts (e.g. 0.2)")
    parser.add_argument("--input-tokens", type=int, help="custom prompt length (overrides the preset)")
    parser.add_argument("--output-tokens", type=int, help="custom output length (overrides the preset)")
    parser.add_argument("--concurrency", type=_levels, default=(1, 2, 4, 8), help="levels, e.g. 1,2,4,8")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per level (default 3)")
    parser.add_argument("--requests-per-user", type=int, default=2, help="requests each user sends per round")
    parser.add_argument("--warmup", type=int, default=1, help="unmeasured requests before each measurement")
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt generator")
    parser.add_argument("--api", choices=_API_CHOICES, default="chat", help="endpoint (default chat)")
    parser.add_argument("--temperature", type=float, default=0.0, help="sent with every request (default 0)")
    parser.add_argument("--no-ignore-eos", action="store_true", help="do not send ignore_eos (outputs may end early)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer.json for exact prompt lengths (else ~4 chars/token)")
    parser.add_argument(
        "--hf-dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="transformers peer dtype"
    )
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds a peer may take to be ready")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds one request may take")
    parser.add_argument("--out", type=Path, help="output folder (default bench-results/<date-time>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    # the engine's flags, as `metronome serve` has them: --threads is every started peer's thread count
    # (llama.cpp and transformers too), --spec-tokens and --draft go to the metronome peer and the in-process runs
    add_engine_args(parser, only=("threads", "spec_tokens", "draft"))


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    """Add `bench` to the `metronome` command's subparsers."""
    parser = subparsers.add_parser(
        "bench",
        help="measure TTFT, speed and throughput of OpenAI-compatible servers",
        description="Artificial-Analysis-style load generator: workloads, a concurrency sweep, peers side by side.",
    )
    add_arguments(parser)
    parser.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m metronome.bench", description="metronome's load generator")
    add_arguments(parser)
    return run(parser.parse_args(argv))


def _plan(args: argparse.Namespace) -> tuple[SweepConfig, TokenCounter, Path]:
    """Check the options and resolve them; ValueError names the bad option."""
    from metronome.bench.client import Api, normalize_base_url
    from metronome.bench.peers import parse_peers
    from metronome.bench.runner import SweepConfig
    from metronome.bench.workloads import CharEstimate, TokenizerFileCounter, resolve_workload

    workload = resolve_workload(args.workload, args.scale, args.input_tokens, args.output_tokens)
    if args.temperature < 0:
        raise ValueError(f"--temperature must be 0 or more (got {args.temperature})")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1 (got {args.threads})")
    if args.startup_timeout <= 0:
        raise ValueError(f"--startup-timeout must be positive (got {args.startup_timeout})")
    if args.url is not None:
        normalize_base_url(args.url)
        if args.compare != "metronome":
            raise ValueError("--compare starts servers and needs --model; with --url one server is measured")
    else:
        parse_peers(args.compare)
    config = SweepConfig(
        workload=workload,
        concurrency=tuple(args.concurrency),
        rounds=args.rounds,
        requests_per_user=args.requests_per_user,
        warmup=args.warmup,
        seed=args.seed,
        api=Api(args.api),
        ignore_eos=not args.no_ignore_eos,
        temperature=args.temperature,
        request_timeout_s=args.request_timeout,
    )
    counter: TokenCounter = TokenizerFileCounter(args.tokenizer) if args.tokenizer else CharEstimate()
    out_dir = args.out if args.out is not None else Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    return config, counter, out_dir


async def _target(name: str, base_url: str, served_model: str | None, command: tuple[str, ...]) -> Target:
    import httpx

    from metronome.bench.client import discover_model
    from metronome.bench.runner import Target

    async with httpx.AsyncClient(timeout=30.0) as http:
        found = await discover_model(http, base_url)
    if served_model is not None:
        return Target(
            name=name, base_url=base_url, model=served_model, model_found_by="--served-model", command=command
        )
    return Target(name=name, base_url=base_url, model=found.model, model_found_by=found.how, command=command)


def _start_targets(
    args: argparse.Namespace, config: SweepConfig, out_dir: Path, stack: contextlib.ExitStack, console: Console
) -> list[Target]:
    """The --url server, or the --compare peers started on --model (stopped when `stack` closes)."""
    from metronome.bench.client import normalize_base_url
    from metronome.bench.peers import context_for, parse_peers, running_peers

    if args.url is not None:
        return [asyncio.run(_target(args.name, normalize_base_url(args.url), args.served_model, ()))]
    started = stack.enter_context(
        running_peers(
            parse_peers(args.compare),
            args.model,
            _threads(args),
            args.hf_dtype,
            context_for(config.workload),
            out_dir,
            args.startup_timeout,
            lambda line: console.print(line, markup=False),
            args.spec_tokens,
        )
    )
    return [asyncio.run(_target(p.peer.value, p.base_url, args.served_model, p.argv)) for p in started]


def run(args: argparse.Namespace) -> int:
    """Run the bench described by `args`; 0 on success, 1 on failure, 2 on bad options, 130 on Ctrl-C."""
    from rich.console import Console

    from metronome.bench.peers import PeerStartError, PeerUnavailable
    from metronome.bench.progress import SweepProgress
    from metronome.bench.report import Environment, build_report, render_markdown, write_report
    from metronome.bench.runner import run_sweep
    from metronome.bench.workloads import PromptBuilder, load_corpus

    console = Console(stderr=True)
    if args.decode_only:
        return _run_decode_only(args, console)
    if args.speculation:
        return _run_speculation(args, console)
    if args.url is None and args.model is None:
        console.print("metronome bench: error: give --url URL or --model PATH (or --decode-only)", markup=False)
        return 2
    try:
        config, counter, out_dir = _plan(args)
    except ValueError as exc:
        console.print(f"metronome bench: error: {exc}", markup=False)
        return 2
    started = time.time()
    try:
        with contextlib.ExitStack() as stack:
            targets = _start_targets(args, config, out_dir, stack, console)
            for target in targets:
                console.print(f"{target.name}: {target.base_url}, model {target.model!r} ({target.model_found_by})")
            builder = PromptBuilder(load_corpus(), config.seed, counter)
            planned = config.planned_requests(len(targets))
            with SweepProgress(planned, config.rounds, console, enabled=not args.no_progress) as progress:
                outcome = run_sweep(targets, config, builder, progress)
            environment = Environment.here(_threads(args) if args.model is not None else None)
            report = build_report(outcome, config, targets, environment, counter.method, started, time.time())
            files = write_report(report, out_dir)  # before the peers stop, so a slow stop loses nothing
    except (PeerUnavailable, PeerStartError, FileNotFoundError, ConnectionError) as exc:
        console.print(f"metronome bench: error: {exc}", markup=False)
        return 1
    except KeyboardInterrupt:
        console.print("metronome bench: interrupted before any measurement; nothing written")
        return _EXIT_INTERRUPTED
    sys.stdout.write(render_markdown(report))
    console.print(f"wrote {files.json}, {files.markdown}, " + ", ".join(str(p) for p in files.plots))
    if outcome.interrupted:
        console.print("metronome bench: interrupted; the files hold the measurements finished so far")
        return _EXIT_INTERRUPTED
    if not any(s.ok for s in report.summaries):
        console.print("metronome bench: every request failed; see the errors in the table")
        return 1
    return 0


def _run_decode_only(args: argparse.Namespace, console) -> int:
    from metronome.bench.decode import measure_decode

    if args.url is not None:
        console.print("metronome bench: error: --decode-only runs in process: use --model, not --url", markup=False)
        return 2
    try:
        result = measure_decode(args.model, _threads(args), tokens=args.output_tokens or 128, runs=args.rounds)
    except ValueError as exc:
        console.print(f"metronome bench: error: {exc}", markup=False)
        return 2
    print(result.markdown())
    return 0


def _run_speculation(args: argparse.Namespace, console) -> int:
    from metronome.bench.decode import measure_speculation, speculation_markdown

    if args.url is not None:
        console.print("metronome bench: error: --speculation runs in process: use --model, not --url", markup=False)
        return 2
    k = args.spec_tokens
    try:
        results = measure_speculation(
            args.model,
            _threads(args),
            tokens=args.output_tokens or 384,
            runs=args.rounds,
            spec_tokens=k,
            draft=args.draft,
        )
    except ValueError as exc:
        console.print(f"metronome bench: error: {exc}", markup=False)
        return 2
    print(speculation_markdown(results, k, f"draft model {args.draft}" if args.draft else "prompt lookup"))
    return 0
