"""The `bench` subcommand: `add_cli(subparsers)` for `metronome bench`, `main()` for `python -m metronome.bench`.

Only the standard library and `workloads` are imported up front, so that adding the subcommand
costs the `metronome` command nothing; httpx, rich and matplotlib load when `run` is called.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from metronome.args import (
    ENGINE_FLAGS,
    add_engine_args,
    engine_argv,
    engine_config,
    engine_flags_set,
    param_message,
    parse_noting_given,
    was_given,
)
from metronome.bench.workloads import PRESETS
from metronome.config import ParamError

if TYPE_CHECKING:
    from rich.console import Console

    from metronome.bench.runner import SweepConfig, Target
    from metronome.bench.workloads import TokenCounter

_API_CHOICES = ("chat", "completions")  # the values of client.Api

_EXIT_INTERRUPTED = 130
REQUEST_TIMEOUT_S = 600.0  # one request's longest wait, unless --request-timeout says otherwise
FUZZ_TIMEOUT_S = 120.0  # the fuzzer's: a request past it is a hang (its cases are small)


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
    where.add_argument(
        "--model",
        type=Path,
        help="a GGUF file, model folder or registered model name (`metronome models`): start the server(s) on it",
    )
    parser.add_argument(
        "--compare",
        default="metronome",
        help="with --model: peers to start and compare, from metronome, llama.cpp, transformers "
        "(default: metronome alone)",
    )
    parser.add_argument(
        "--decode-only",
        action="store_true",
        help="decode tokens/s in process (default model unless --model), beside the memory-bandwidth bound; "
        "--output-tokens tokens, --rounds runs, --live slot counts",
    )
    parser.add_argument(
        "--live",
        type=_levels,
        default=(1,),
        metavar="SLOTS",
        help="with --decode-only: numbers of slots decoding together (e.g. 1,2,4,8; default 1), each held to "
        "the same memory-bound step",
    )
    parser.add_argument(
        "--load",
        type=_levels,
        metavar="USERS",
        help="the plan's promise under load: for each number of concurrent users (e.g. 1,4,8), greedy "
        "ignore_eos requests of --output-tokens (default 200) in process and served, per-user speed and TTFT "
        "against the plan's calibrated step and TTFT prediction, with the engine's step profile",
    )
    parser.add_argument(
        "--stall",
        action="store_true",
        help="with --load: also the longest gap of a streaming user while a 1.3k-token prompt arrives, and that "
        "prompt's TTFT against the same length alone (--rounds pairs, medians)",
    )
    parser.add_argument("--in-process-only", action="store_true", help="with --load: skip the served levels")
    parser.add_argument(
        "--speculation",
        action="store_true",
        help="in process: speculation off and on, greedy and sampled, on chat prompts whose answers "
        "copy a passage (edit, quote, summarize) and on free-form questions; outputs end on EOS "
        "within --output-tokens (default 384); --rounds rounds (--spec-tokens; --draft MODEL for "
        "a draft model)",
    )
    parser.add_argument(
        "--voice",
        action="store_true",
        help="the voice loop: --audio to /v1/audio/transcriptions, the transcript as a streamed chat prompt, "
        "until the answer's first sentence; --concurrency speakers, --rounds loops each, --output-tokens "
        "(default 64); on --url, or a metronome server started on --model (default: the embedded model)",
    )
    parser.add_argument("--audio", type=Path, help="with --voice: the recording (default: beckett.wav, 10 s)")
    parser.add_argument(
        "--soak",
        metavar="DURATION",
        help="reliability under load for DURATION (45s, 10m, 1h): --users clients (2 x slots), prompts "
        "of 10-1,500 tokens, streamed and whole, dropped streams and cancellations; fails on a lost or hung "
        "request, server memory growing over 5 %% after warm-up, or /metrics that do not add up; on --url, "
        "or a `metronome serve` started here (--model, --threads)",
    )
    parser.add_argument(
        "--fuzz",
        type=int,
        metavar="CASES",
        help="fuzz the HTTP API from its OpenAPI schema with schemathesis (pip install 'schemathesis==4.32.5'), CASES "
        "generated cases per endpoint beside its boundary cases (so more requests in all: minutes even at 2); fails "
        "on a 5xx, a hang (--request-timeout) or an answer outside the schema; on --url or a `metronome serve` "
        "started here",
    )
    parser.add_argument("--users", type=int, help="with --soak: concurrent clients (default: 2 x the server's slots)")
    parser.add_argument("--server-pid", type=int, help="with --soak --url: the server's process, for its memory")
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
    parser.add_argument(
        "--request-timeout",
        type=float,
        help=f"seconds one request may take (default {REQUEST_TIMEOUT_S:g}; --fuzz: {FUZZ_TIMEOUT_S:g}, where a "
        "request past it counts as a hang)",
    )
    parser.add_argument("--out", type=Path, help="output folder (default bench-results/<date-time>)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    # the engine's flags, as `metronome serve` has them: --threads is every started peer's thread count
    # (llama.cpp and transformers too), --spec-tokens and --draft go to the metronome peer and the in-process runs;
    # --slots, --prefill-chunk and --kv-cache to --load's engine and server
    add_engine_args(parser, only=_ENGINE)


_ENGINE = ("threads", "spec_tokens", "draft", "slots", "prefill_chunk", "kv_cache")  # the engine flags bench takes
_SERVED = ("spec_tokens", "draft", "slots", "prefill_chunk", "kv_cache")  # handed to a metronome server it starts


def _said(exc: BaseException) -> str:
    """An error for the terminal: a setting's (ParamError) with the flag that sets it."""
    return param_message(exc) if isinstance(exc, ParamError) else str(exc)


def _unused(args: argparse.Namespace, used: Sequence[str], mode: str) -> str | None:
    """The error for engine flags set that `mode` would not use (refused rather than silently ignored)."""
    unused = [ENGINE_FLAGS[d][0] for d in engine_flags_set(args, _ENGINE) if d not in used]
    return (
        f"{mode} does not use {', '.join(unused)}; leave {'it' if len(unused) == 1 else 'them'} out" if unused else None
    )


# What each mode reads besides the engine flags (those are checked by _unused): a flag set that its mode does not
# read is refused, not silently dropped (`--load 1,4 --workload long` measured the default 200 tokens).
# --no-progress, a display preference, is accepted everywhere.
_SWEEP = "a sweep (--url or --model without a mode flag)"
_READS: dict[str, tuple[str, ...]] = {
    "--decode-only": tuple("decode_only model live output_tokens rounds".split()),
    "--speculation": tuple("speculation model output_tokens rounds".split()),
    "--load": tuple("load model output_tokens rounds in_process_only stall".split()),
    "--voice": tuple(
        "voice url model audio concurrency rounds output_tokens request_timeout out startup_timeout".split()
    ),
    "--soak": tuple(
        "soak url model users server_pid output_tokens request_timeout seed tokenizer out startup_timeout".split()
    ),
    "--fuzz": tuple("fuzz url model request_timeout seed out startup_timeout".split()),
    _SWEEP: tuple(
        "url model compare name served_model workload scale input_tokens output_tokens concurrency rounds "
        "requests_per_user warmup seed api temperature no_ignore_eos tokenizer startup_timeout request_timeout "
        "out hf_dtype".split()
    ),
}


def _mode(args: argparse.Namespace) -> str:
    """The mode `args` runs, in the order _run dispatches them (a key of _READS)."""
    for flag, on in (
        ("--decode-only", args.decode_only),
        ("--speculation", args.speculation),
        ("--load", args.load is not None),
        ("--voice", args.voice),
        ("--soak", args.soak is not None),
        ("--fuzz", args.fuzz is not None),
    ):
        if on:
            return flag
    return _SWEEP


def _unread(args: argparse.Namespace) -> str | None:
    """The error for flags other than the engine's that the mode of `args` would not read."""
    parser = argparse.ArgumentParser(add_help=False)
    add_arguments(parser)
    mode = _mode(args)
    unread = [
        a.option_strings[0]
        for a in parser._actions
        if a.dest not in (*_READS[mode], *_ENGINE, "no_progress") and was_given(args, a.dest, a.default)
    ]
    if not unread:
        return None
    return f"{mode} does not use {', '.join(unread)}; leave {'it' if len(unread) == 1 else 'them'} out"


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
    def parser() -> argparse.ArgumentParser:
        built = argparse.ArgumentParser(prog="python -m metronome.bench", description="metronome's load generator")
        add_arguments(built)
        return built

    return run(parse_noting_given(parser, argv))


def _plan(args: argparse.Namespace) -> tuple[SweepConfig, TokenCounter, Path]:
    """Check the options and resolve them; ValueError names the bad option."""
    from metronome.bench.client import Api, normalize_base_url
    from metronome.bench.peers import parse_peers
    from metronome.bench.runner import SweepConfig
    from metronome.bench.workloads import CharEstimate, TokenizerFileCounter, resolve_workload

    if args.input_tokens is not None and args.output_tokens is not None:  # the whole workload is set: the
        # preset and its scale would be dropped (the report still said "scale 0.5")
        dropped = [
            f for d, f, v in (("workload", "--workload", "short"), ("scale", "--scale", 1.0)) if was_given(args, d, v)
        ]
        if dropped:
            raise ValueError(
                f"--input-tokens and --output-tokens set the whole workload: {' and '.join(dropped)} would not be "
                "used; leave them out, or give one of the two token counts"
            )
    workload = resolve_workload(args.workload, args.scale, args.input_tokens, args.output_tokens)
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be at least 1 (got {args.threads})")
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
        request_timeout_s=_request_timeout(args),
    )
    counter: TokenCounter = TokenizerFileCounter(args.tokenizer) if args.tokenizer else CharEstimate()
    return config, counter, _out_folder(args)


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
    from metronome.model.registry import resolve

    if args.url is not None:
        return [asyncio.run(_target(args.name, normalize_base_url(args.url), args.served_model, ()))]
    started = stack.enter_context(
        running_peers(
            parse_peers(args.compare),
            resolve(args.model),  # a registered name becomes its file: every peer is given the same GGUF
            _threads(args),
            args.hf_dtype,
            context_for(config.workload),
            out_dir,
            args.startup_timeout,
            lambda line: console.print(line, markup=False),
            engine_argv(args, _SERVED),
        )
    )
    return [asyncio.run(_target(p.peer.value, p.base_url, args.served_model, p.argv)) for p in started]


def run(args: argparse.Namespace) -> int:
    """Run the bench described by `args`; 0 on success, 1 on failure, 2 on bad options, 130 on Ctrl-C or
    SIGTERM (both stop the servers the bench started and keep what was measured, where a mode keeps it)."""
    # SIGTERM (`timeout`, CI, systemd) is taken as Ctrl-C: its default ended the process at once, leaving the
    # servers it had started (each in its own session) running, orphaned, and the measurements unwritten
    previous = signal.signal(signal.SIGTERM, _interrupt)
    # ... which needs a SIGINT handler to hand it to: a script's `bench ... &` (and nohup) starts with SIGINT
    # ignored, so SIGTERM did nothing, the caller's SIGKILL followed, and the bench's server was orphaned.
    # Python's own handler, for the run: asyncio.run then installs its runner's, as in a terminal.
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return _run(args)
    finally:
        signal.signal(signal.SIGTERM, previous)
        if ignored:
            signal.signal(signal.SIGINT, signal.SIG_IGN)


def _request_timeout(args: argparse.Namespace) -> float:
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise ValueError(f"--request-timeout must be positive (got {args.request_timeout})")
    return args.request_timeout if args.request_timeout is not None else REQUEST_TIMEOUT_S


def _out_folder(args: argparse.Namespace) -> Path:
    """The folder a mode writes its files to (--out, default bench-results/<time>), made now: a path that
    cannot be one (under a file, or where the user may not write) was found when the files were written,
    after the whole run, and the measurements were lost behind a traceback. ValueError names --out."""
    out = args.out if args.out is not None else Path("bench-results") / time.strftime("%Y%m%d-%H%M%S")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ValueError(
            f"--out {out}: cannot make this folder ({exc.strerror}); name a folder you can write"
        ) from None
    if not os.access(out, os.W_OK):
        raise ValueError(f"--out {out}: this folder is not writable; name one you can write")
    return out


def _interrupt(signum: int, frame: object) -> None:
    """SIGTERM as Ctrl-C: the SIGINT handler in place does what Ctrl-C does. Inside asyncio.run that is the
    runner's, which cancels the main task at its next await; a KeyboardInterrupt raised here instead landed
    at any bytecode, inside the HTTP client's pool or a lock, and once in CI the bench then never ended
    (the soak's SIGTERM test timed out after 60 s). Elsewhere it is Python's, which raises KeyboardInterrupt."""
    signal.raise_signal(signal.SIGINT)


def _common_refusal(args: argparse.Namespace) -> str | None:
    """What every mode refuses alike, before it measures anything."""
    if args.output_tokens is not None and args.output_tokens < 1:  # two modes took 0 as "the default"
        return f"--output-tokens must be at least 1 (got {args.output_tokens})"
    if args.load is not None and args.url is not None:
        return "--load runs the plan in process and serves it itself: --url is not used"
    if args.load is not None and args.out is not None:
        return "--load prints its tables and writes no files: --out is not used"
    if args.fuzz is not None and args.fuzz < 1:
        return f"--fuzz must be at least 1 case per endpoint (got {args.fuzz})"
    if args.fuzz is not None and args.soak is not None:
        return "--soak and --fuzz are separate runs: give one"
    # not `t <= 0`: NaN passes it (and then waited "nan s"); the temperature's range is the API's own, so a
    # sweep does not run to its end with every request a 400
    for flag, value in (("--startup-timeout", args.startup_timeout), ("--request-timeout", args.request_timeout)):
        if value is not None and not (math.isfinite(value) and value > 0):
            return f"{flag} must be a positive number of seconds (got {value})"
    if not 0.0 <= args.temperature <= 2.0:
        return f"--temperature must be in [0, 2], as the API's (got {args.temperature})"
    return None


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from metronome.bench.peers import PeerStartError, PeerUnavailable
    from metronome.bench.progress import SweepProgress
    from metronome.bench.report import Environment, build_report, render_markdown, write_report
    from metronome.bench.runner import run_sweep
    from metronome.bench.workloads import PromptBuilder, load_corpus

    # soft_wrap: a line longer than the terminal (or than 80 columns when piped) stays one line, so a path or
    # a "--port N" in it is never split where a reader or a script looks for it.
    console = Console(stderr=True, soft_wrap=True)
    refused = _common_refusal(args) or _unread(args)
    if refused:
        console.print(f"metronome bench: error: {refused}", markup=False)
        return 2
    if args.url is not None and not (args.decode_only or args.speculation):  # those two refuse --url themselves
        refused = _unused(args, (), "--url (a server already running, with its own settings)")
        if refused:
            console.print(f"metronome bench: error: {refused}", markup=False)
            return 2
    if args.decode_only:
        return _run_decode_only(args, console)
    if args.speculation:
        return _run_speculation(args, console)
    if args.load is not None:
        from metronome.bench.load import main as run_load

        try:
            config = engine_config(args)
        except ValueError as exc:
            console.print(f"metronome bench: error: {_said(exc)}", markup=False)
            return 2
        model = str(args.model) if args.model is not None else None
        try:
            return run_load(
                model,
                config,
                args.load,
                args.output_tokens or 200,
                not args.in_process_only,
                args.stall,
                args.rounds,
                freeze_heap=True,
            )
        except ValueError as exc:  # said as every other mode's refusal (it reached `metronome: error:`)
            console.print(f"metronome bench: error: {_said(exc)}", markup=False)
            return 2
    if args.voice:
        return _run_voice(args, console)
    if args.soak is not None or args.fuzz is not None:
        return _run_soak(args, console)
    if args.url is None and args.model is None:
        console.print("metronome bench: error: give --url URL or --model PATH (or --decode-only)", markup=False)
        return 2

    try:
        config, counter, out_dir = _plan(args)
    except ValueError as exc:
        console.print(f"metronome bench: error: {_said(exc)}", markup=False)
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
        console.print(f"metronome bench: error: {_said(exc)}", markup=False)
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
    from metronome.bench.decode import live_markdown, measure_decode

    if args.url is not None:
        console.print("metronome bench: error: --decode-only runs in process: use --model, not --url", markup=False)
        return 2
    # its plan has max(--live) slots and decodes plainly (--speculation measures drafting)
    refused = _unused(args, ("threads", "kv_cache"), "--decode-only")
    if refused:
        console.print(f"metronome bench: error: {refused}", markup=False)
        return 2
    try:
        results = measure_decode(
            args.model,
            _threads(args),
            tokens=args.output_tokens or 128,
            runs=args.rounds,
            live=args.live,
            kv_cache=args.kv_cache,
        )
    except ValueError as exc:
        console.print(f"metronome bench: error: {_said(exc)}", markup=False)
        return 2
    print(results[0].markdown() if len(results) == 1 else live_markdown(results))
    return 0


def _run_speculation(args: argparse.Namespace, console) -> int:
    from metronome.bench.decode import measure_speculation, speculation_markdown

    if args.url is not None:
        console.print("metronome bench: error: --speculation runs in process: use --model, not --url", markup=False)
        return 2
    refused = _unused(args, ("threads", "spec_tokens", "draft", "kv_cache"), "--speculation (one slot)")
    if refused:
        console.print(f"metronome bench: error: {refused}", markup=False)
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
            kv_cache=args.kv_cache,
        )
    except ValueError as exc:
        console.print(f"metronome bench: error: {_said(exc)}", markup=False)
        return 2
    print(speculation_markdown(results, k, f"draft model {args.draft}" if args.draft else "prompt lookup"))
    return 0


def _run_voice(args: argparse.Namespace, console) -> int:
    """`--voice`: the voice loop on --url, or on a metronome server started here (stopped at the end)."""
    import json

    from metronome.bench.client import normalize_base_url
    from metronome.bench.peers import Peer, PeerStartError, PeerUnavailable, running_peers
    from metronome.bench.voice import default_audio, levels_json, measure_voice, voice_markdown

    max_tokens = args.output_tokens or 64
    try:
        audio = args.audio if args.audio is not None else default_audio()
        if not audio.is_file():
            raise FileNotFoundError(f"--audio {audio}: no such file")
        if args.rounds < 1 or max_tokens < 1:
            raise ValueError("--rounds and --output-tokens must be at least 1")
        out_dir = _out_folder(args)
        with contextlib.ExitStack() as stack:
            if args.url is not None:
                base_url = normalize_base_url(args.url)
            else:
                from metronome.model.loader import default_model_path

                model = args.model if args.model is not None else default_model_path()
                peers = running_peers(
                    [Peer.METRONOME],
                    model,
                    _threads(args),
                    args.hf_dtype,
                    2048,
                    out_dir,
                    args.startup_timeout,
                    lambda line: console.print(line, markup=False),
                    engine_argv(args, _SERVED),
                )
                base_url = stack.enter_context(peers)[0].base_url
            levels = measure_voice(
                base_url, audio, tuple(args.concurrency), args.rounds, max_tokens, _request_timeout(args)
            )
    except (ValueError, FileNotFoundError) as exc:
        console.print(f"metronome bench: error: {_said(exc)}", markup=False)
        return 2
    except (PeerUnavailable, PeerStartError, ConnectionError) as exc:
        console.print(f"metronome bench: error: {_said(exc)}", markup=False)
        return 1
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "voice.json").write_text(json.dumps(levels_json(levels), indent=2))
    text = voice_markdown(levels, audio, max_tokens)
    (out_dir / "voice.md").write_text(text)
    sys.stdout.write(text)
    console.print(f"wrote {out_dir / 'voice.json'}, {out_dir / 'voice.md'}", markup=False)
    return 0 if all(lv.ok for lv in levels) else 1


def _run_soak(args: argparse.Namespace, console) -> int:
    """`--soak DURATION` / `--fuzz CASES`: on --url, or on a `metronome serve` started here with its defaults
    (stopped at the end)."""
    import subprocess

    from metronome.bench.client import normalize_base_url
    from metronome.bench.peers import PeerStartError, PeerUnavailable, _metronome_command, _stop, free_port, wait_ready
    from metronome.bench.soak import SoakConfig, parse_duration, rss_of, server_slots, soak
    from metronome.bench.workloads import CharEstimate, TokenizerFileCounter

    try:
        if args.fuzz is not None:
            from metronome.bench.fuzz import require_schemathesis

            require_schemathesis()  # before a server starts and the --out folder is made
        duration = parse_duration(args.soak) if args.soak is not None else 0.0
        counter = TokenizerFileCounter(args.tokenizer) if args.tokenizer else CharEstimate()
        # a soak against --url writes only its summary, and only with --out
        out_dir = _out_folder(args) if args.out is not None or args.url is None or args.fuzz is not None else None
        with contextlib.ExitStack() as stack:
            pid = args.server_pid
            if args.url is not None:
                url = normalize_base_url(args.url)
            else:
                port = free_port()
                argv = [*_metronome_command(), "serve", "--host", "127.0.0.1", "--port", str(port)]
                if args.fuzz is not None:  # a body without max_tokens generates to the end of the context
                    argv += ["--ctx", "256"]
                if args.model is not None:
                    argv += ["--model", str(args.model)]
                argv += engine_argv(args, _ENGINE)
                assert out_dir is not None  # made above: this soak starts its own server
                log_path = out_dir / ("fuzz-server.log" if args.fuzz is not None else "soak-server.log")
                log = stack.enter_context(open(log_path, "w", encoding="utf-8"))
                console.print(f"starting: {' '.join(argv)} (log: {log_path})", markup=False)
                process = subprocess.Popen(
                    argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True
                )
                stack.callback(_stop, process)
                url = f"http://127.0.0.1:{port}"
                wait_ready(process, f"{url}/health", args.startup_timeout, log_path, "metronome")
                pid = process.pid
            if args.fuzz is not None:
                from metronome.bench.fuzz import run_fuzz

                console.print(
                    f"fuzz: {args.fuzz} generated cases per endpoint, and schemathesis's boundary cases, on {url}",
                    markup=False,
                )
                timeout_s = args.request_timeout if args.request_timeout is not None else FUZZ_TIMEOUT_S
                fuzzed = run_fuzz(url, args.fuzz, out_dir / "fuzz", request_timeout_s=timeout_s, seed=args.seed)
                print(fuzzed.output)
                print(fuzzed.summary())
                return 0 if fuzzed.passed else 1
            users = args.users if args.users is not None else 2 * server_slots(url)
            config = SoakConfig(
                duration_s=duration,
                users=users,
                max_output_tokens=args.output_tokens or SoakConfig.max_output_tokens,
                request_timeout_s=_request_timeout(args),
                seed=args.seed,
            )
            console.print(
                f"soak: {duration:g} s on {url}, {users} users"
                + (f", server memory from pid {pid}" if pid else ", server memory not watched (no --server-pid)"),
                markup=False,
            )
            result = asyncio.run(
                soak(url, config, rss_of(pid) if pid else None, counter, lambda m: console.print(m, markup=False))
            )
    except (ValueError, FileNotFoundError, PeerUnavailable, PeerStartError, ConnectionError, RuntimeError) as exc:
        console.print(f"metronome bench: error: {_said(exc)}", markup=False)
        return 2
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the server started here was stopped on the way out
        what = "fuzz" if args.fuzz is not None else "soak"
        console.print(f"metronome bench: {what} interrupted before its end: no verdict", markup=False)
        return _EXIT_INTERRUPTED
    print(result.summary())
    if out_dir is not None:  # --out with --url: the summary is all the soak writes
        (out_dir / "soak-summary.txt").write_text(result.summary() + "\n", encoding="utf-8")
        console.print(f"summary: {out_dir / 'soak-summary.txt'}", markup=False)
    return 0 if result.passed else 1
