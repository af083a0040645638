"""`metronome generate | chat | transcribe | info | serve | compile | bench | plan | models`."""

from __future__ import annotations

import argparse
import os
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from metronome.args import (
    SPEECH_MODEL_HELP,
    add_engine_args,
    add_model_arg,
    add_reflect_args,
    add_sampling_args,
    engine_config,
    param_message,
    parse_noting_given,
    reflect_settings,
    sampling_params,
)
from metronome.config import ParamError

__all__ = ["build_parser", "engine_config", "load_engine", "main"]  # engine_config: see metronome.args


@contextmanager
def loading_progress(enabled: bool) -> Iterator[Callable[[str], None]]:
    """A spinner with the current loading stage on a terminal; silent when piped."""
    if not enabled:
        yield lambda _msg: None
        return
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("loading model") as status:
        yield lambda msg: status.update(msg)


def load_engine(args: argparse.Namespace, calibrate: bool = False):
    from metronome.engine import Engine
    from metronome.model.loader import load

    engine_config(args)  # the flags checked before the model loads (ParamError)
    with loading_progress(sys.stderr.isatty()) as say:
        say("reading model file")
        loaded = load(args.model)
        engine = Engine.from_model(config=engine_config(args), loaded=loaded, calibrate=calibrate, progress=say)
    for warning in engine.plan.report.warnings:  # the spinner is gone, or was never shown (piped)
        print(f"metronome: warning: {warning}", file=sys.stderr, flush=True)
    return engine


def _stats(n_tokens: int, usage: dict) -> str:
    """The line after a reply: what was timed (no TTFT without a token, no rate from fewer than two)."""
    parts = [f"{n_tokens} tokens"]
    ttft, decode, total = usage["time_to_first_token"], usage["completion_time"], usage["total_time"]
    if ttft is not None:
        parts.append(f"TTFT {ttft * 1000:.0f} ms")
    elif total is not None:
        parts.append(f"{total * 1000:.0f} ms in all")
    if n_tokens > 1 and decode:
        parts.append(f"{(n_tokens - 1) / decode:.1f} tokens/s")
    return "[" + " · ".join(parts) + "]"


def cmd_generate(args: argparse.Namespace) -> int:
    from metronome.serve.usage import groq_timings

    params = sampling_params(args)
    engine = load_engine(args)
    if not args.raw and not engine.tokenizer.has_chat_template:  # as --raw, which the user did not ask for
        print(
            f"metronome: note: {engine.model_name} has no chat template (a base model): the prompt goes in as "
            "plain text to continue, as with --raw",
            file=sys.stderr,
        )
    for delta in engine.stream(args.prompt, params, chat=not args.raw):
        sys.stdout.write(delta.text)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()  # before stderr's stats line: `2>&1 |` put it ahead of the answer's newline
    if delta.error:
        print(f"metronome: error: {delta.error}", file=sys.stderr)
        return 1
    print(_stats(delta.completion_tokens, groq_timings(delta.timings)), file=sys.stderr)
    return 0


CHAT_COMMANDS = "/reset clears the conversation, /exit or Ctrl-D quits, /help shows this"


def cmd_chat(args: argparse.Namespace) -> int:
    from metronome.engine import RequestError
    from metronome.serve.usage import groq_timings

    params = sampling_params(args)
    if params.max_tokens < 1:  # as the chat completions route (ge=1): every reply would be empty
        raise ParamError("max_tokens", f"max_tokens={params.max_tokens}: a reply needs at least 1 token")
    engine = load_engine(args)
    if not engine.tokenizer.has_chat_template:
        print("this model has no chat template (a base model): use `metronome generate --raw`", file=sys.stderr)
        return 2
    messages: list[dict] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    # the shortest conversation (the system message and an empty line) must leave a reply its max_tokens:
    # else every line failed on the context, and /reset, which the error suggested, could not help
    shortest = len(engine.encode_prompt([*messages, {"role": "user", "content": ""}]))
    if shortest + params.max_tokens > engine.config.ctx:
        raise ParamError(
            "max_tokens",
            f"max_tokens={params.max_tokens}: with the shortest prompt ({shortest} tokens, the chat template"
            f"{' and --system' if args.system else ''}) a reply would not fit the context of {engine.config.ctx} "
            f"tokens; lower --max-tokens to {engine.config.ctx - shortest} or less, or raise --ctx",
        )
    print(f"metronome chat · {engine.model_name} · {CHAT_COMMANDS}", file=sys.stderr)
    while True:
        try:
            line = input("> ")
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return 0
        command = line.strip()
        if command in ("/exit", "/quit"):
            return 0
        if command == "/reset":
            messages = messages[:1] if args.system else []
            print("(a new conversation)", file=sys.stderr)
            continue
        if not command:
            continue
        # one word after a slash is a command: an unknown one (a typo of /reset) must not reach the model
        # as a message, where it would stay in the conversation
        if command.startswith("/") and " " not in command:
            if command not in ("/help", "/?"):
                print(f"unknown command {command}", file=sys.stderr)
            print(CHAT_COMMANDS, file=sys.stderr)
            continue
        messages.append({"role": "user", "content": line})
        reply, delta = [], None
        try:
            for delta in engine.stream(messages, params):
                sys.stdout.write(delta.text)
                sys.stdout.flush()
                reply.append(delta.text)
        except KeyboardInterrupt:
            print("\n[interrupted]", file=sys.stderr)
        except ValueError as exc:  # e.g. the conversation outgrew the context
            messages.pop()
            # the conversation outgrew the context (it will not shrink); not a bad line, which is dropped above
            outgrew = isinstance(exc, RequestError) and exc.param in ("prompt", "max_tokens")
            earlier = len(messages) > (1 if args.system else 0)  # turns /reset would drop
            hint = "\n(/reset starts a new conversation)" if outgrew and earlier else ""
            print(f"\nerror: {exc}{hint}", file=sys.stderr)
            continue
        print(flush=True)  # before the stats line on stderr
        messages.append({"role": "assistant", "content": "".join(reply)})
        if delta is not None and delta.timings is not None:
            print(_stats(delta.completion_tokens, groq_timings(delta.timings)), file=sys.stderr)


def cmd_reflect(args: argparse.Namespace) -> int:
    """Answer, then critique and revise for --rounds rounds: each turn streamed, its timings on stderr."""
    from metronome.agents.reflect import ReflectionDone, TurnDelta, TurnDone, TurnStarted, reflect

    settings, params = reflect_settings(args), sampling_params(args)
    engine = load_engine(args)
    # reflect() checks that the loop fits the context before it runs a turn (ParamError naming --rounds)
    for event in reflect(engine, args.task, settings, params):
        if isinstance(event, TurnStarted):
            sys.stdout.write(f"## round {event.round} · {event.kind}\n")
        elif isinstance(event, TurnDelta):
            sys.stdout.write(event.text)
        elif isinstance(event, TurnDone):
            s = event.stats
            sys.stdout.write("\n\n")
            print(
                f"[{s.kind}: {s.prompt_tokens} prompt tokens ({s.cached_tokens} cached) · TTFT {s.ttft_ms:.0f} ms"
                f" · {s.completion_tokens} tokens in {s.decode_ms:.0f} ms · {s.tokens_per_s:.1f} tokens/s]",
                file=sys.stderr,
            )
        elif isinstance(event, ReflectionDone):
            t = event.totals
            print(
                f"[{len(event.turns)} turns · {t.completion_tokens} tokens · {t.wall_ms / 1000:.2f} s · "
                f"outside decoding {t.outside_ms:.0f} ms ({t.outside_share:.1%})]",
                file=sys.stderr,
            )
        sys.stdout.flush()
    return 0


def cmd_transcribe(args: argparse.Namespace) -> int:
    """Transcribe (or translate to English) one audio file; the result in --format on stdout."""
    import json
    from pathlib import Path

    from metronome.audio.decode import decode_audio
    from metronome.audio.formats import ResponseFormat, render
    from metronome.audio.transcribe import Transcriber

    path = Path(args.file)
    if not path.is_file():
        why = "a folder, not an audio file" if path.is_dir() else "no such file"
        print(f"metronome transcribe: {path}: {why}", file=sys.stderr)
        return 2
    audio = decode_audio(path.read_bytes())  # AudioError (a ValueError) names what is wrong with the file
    with loading_progress(sys.stderr.isatty()) as say:
        say("loading the speech model")
        try:
            transcriber = Transcriber.load(args.model)
        except FileNotFoundError as exc:  # the folder, or the package of a named model, is missing
            print(f"metronome transcribe: --model: {exc}", file=sys.stderr)
            return 2
    transcript = transcriber.transcribe(
        audio.samples,
        language=args.language,
        prompt=args.prompt,
        temperature=args.temperature,
        task="translate" if args.translate else "transcribe",
    )
    body = render(transcript, ResponseFormat(args.format))
    sys.stdout.write(body if isinstance(body, str) else json.dumps(body, ensure_ascii=False, indent=2) + "\n")
    t = transcript.timings
    print(
        f"[{t.audio_s:.1f} s of audio ({audio.codec}) · transcribed in {t.total_ms / 1000:.2f} s · "
        f"{t.audio_s / max(t.total_ms / 1000, 1e-9):.1f}x real time]",
        file=sys.stderr,
    )
    return 0


def _moe_rows(c) -> list[tuple[str, str]]:
    """A mixture of experts' own rows for `metronome info` (none for a dense model): its MLP is the experts,
    so the dense ffn width above may go unused."""
    if not c.is_moe:
        return []
    shared = f", a shared expert of width {c.shared_expert_size}" if c.shared_expert_size else ""
    return [
        ("experts", f"{c.num_experts} of width {c.moe_intermediate_size}, {c.experts_per_token} per token{shared}"),
        ("active parameters", f"{c.active_parameters() / 1e6:.1f} M a token"),
    ]


def _positional_model(args: argparse.Namespace) -> str | None:
    """The model of `info` and `compile`: given as MODEL or --model, once (both was the positional, silently)."""
    if args.model_path is not None and args.model is not None and args.model_path != args.model:
        raise ParamError(
            "model", f"the model is given twice ({args.model_path!r} and --model {args.model!r}); give one"
        )
    return args.model_path if args.model_path is not None else args.model


def cmd_info(args: argparse.Namespace) -> int:
    from metronome.model.loader import load

    m = load(_positional_model(args))
    c = m.config
    rows = [
        ("file", str(m.path)),
        ("name", c.name),
        ("architecture", c.arch),
        ("parameters", f"{c.num_parameters() / 1e6:.1f} M"),
        ("file size", f"{m.file_bytes / 1e6:.1f} MB"),
        ("quantization", m.file_type),
        ("layers", str(c.num_layers)),
        ("hidden / ffn", f"{c.hidden_size} / {c.intermediate_size}"),
        *_moe_rows(c),
        ("heads (q / kv) x dim", f"{c.num_heads} / {c.num_kv_heads} x {c.head_dim}"),
        ("vocabulary", str(c.vocab_size)),
        ("context length", str(c.max_position)),
        ("rope base", f"{c.rope_theta:g}" + (f" (local {c.rope_local_theta:g})" if c.rope_local_theta else "")),
        (
            "sliding window",
            f"{c.sliding_window} (every {c.sliding_window_pattern}th layer global)" if c.sliding_window else "none",
        ),
        ("tied embeddings", str(c.tie_embeddings)),
        ("chat template", "yes" if m.tokenizer.chat_template else "no (base model: use --raw)"),
        ("fingerprint", m.fingerprint()),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    return 0


def cmd_compile(args: argparse.Namespace) -> int:
    """Compile a plan and print what it fixed and what it predicts."""
    from metronome.compile.fused import PREFILL_CHUNK
    from metronome.compile.plan import STALL_STEPS
    from metronome.fleet.machine import measure_machine

    args.model = _positional_model(args)
    started = time.perf_counter()
    engine = load_engine(args, calibrate=True)
    seconds = time.perf_counter() - started
    r = engine.plan.report
    bandwidth = measure_machine(threads=engine.config.threads).bandwidth  # the plan's threads (resolved)
    bound = bandwidth / r.weight_bytes
    how = "read from the plan cache" if r.cached else "compiled"
    print(
        f"plan for {engine.model_name}: {r.weights} weights on {r.device}, {r.slots} slots x {r.ctx} tokens "
        f"({how} in {seconds:.1f} s)"
    )
    print(f"  kernels             {r.kernels}")
    print(f"  decode shape        {r.decode_mode}: {r.invariance}")
    print(f"  weights read/token  {r.weight_bytes / 1e6:.1f} MB")
    print(f"  KV cache            {r.kv_cache_bytes / 1e6:.1f} MB of {r.kv_cache_format} (allocated once)")
    if r.prefix_cache_bytes:
        pages = engine.prefix_cache.pages if engine.prefix_cache is not None else 0
        print(f"  prefix cache        {r.prefix_cache_bytes / 1e6:.1f} MB, {pages} pages (allocated once)")
    else:
        print(f"  prefix cache        {r.prefix_cache_note}")
    print(f"  memory bound        {bound:.0f} tokens/s at {bandwidth / 1e9:.1f} GB/s measured read bandwidth")
    if r.slots > 1 and engine.plan.runner.any_rows:  # prompt rows beside decode rows (chunked prefill)
        chunk = engine.config.prefill_chunk
        how = f"set to {chunk}" if chunk else f"the plan's choice: a step within {STALL_STEPS:g} all-slots steps"
        taken = [r.take_step_prompts([(0, r.ctx)], live, chunk, PREFILL_CHUNK)[0] for live in (1, r.slots - 1)]
        print(f"  prompt rows/step    {taken[0]} beside 1 user decoding, {taken[1]} beside {r.slots - 1} ({how})")
    print("  live slots   step ms   tokens/s per user   aggregate tokens/s   fraction of bound")
    for live, ms in sorted(r.step_ms.items()):
        print(f"  {live:>10}   {ms:7.2f}   {1000 / ms:17.1f}   {live * 1000 / ms:18.1f}   {1000 / ms / bound:17.0%}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="metronome", description="Deterministic, statically planned LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a completion for one prompt to stdout")
    g.add_argument("prompt")
    g.add_argument("--raw", action="store_true", help="no chat template: plain completion")
    add_model_arg(g)
    add_engine_args(g)
    add_sampling_args(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="an interactive conversation in the terminal")
    c.add_argument("--system", default=None, help="a system message")
    add_model_arg(c)
    add_engine_args(c)
    add_sampling_args(c)
    c.set_defaults(func=cmd_chat)

    r = sub.add_parser("reflect", help="answer a task, then critique and revise the answer for N rounds")
    r.add_argument("task")
    add_reflect_args(r)
    add_model_arg(r)
    add_engine_args(r)
    add_sampling_args(r)
    r.set_defaults(func=cmd_reflect)

    t = sub.add_parser("transcribe", help="speech to text: transcribe an audio file with Whisper")
    t.add_argument("file", help="an audio file: wav, flac, mp3, ogg, webm...")
    from metronome.audio.formats import ResponseFormat  # the response formats of the API, as text

    t.add_argument("--format", default="text", choices=ResponseFormat.choices(), help="output (default text)")
    add_model_arg(t, help=SPEECH_MODEL_HELP)
    # as the API reads it (serve/audio.py): " EN " is en
    t.add_argument(
        "--language",
        type=lambda s: s.strip().lower(),
        default=None,
        help="the spoken language, e.g. en (default: detected)",
    )
    t.add_argument("--prompt", default=None, help="text that precedes the audio: names, spelling, style")
    t.add_argument("--temperature", type=float, default=0.0, help="0: greedy, with Whisper's fallback (default 0)")
    t.add_argument("--translate", action="store_true", help="translate to English (a multilingual model)")
    t.set_defaults(func=cmd_transcribe)

    i = sub.add_parser("info", help="architecture, sizes, quantization and context of a model")
    i.add_argument("model_path", nargs="?", default=None)
    add_model_arg(i)
    i.set_defaults(func=cmd_info)

    k = sub.add_parser("compile", help="compile a plan; print its memory layout and calibrated step latency")
    k.add_argument("model_path", nargs="?", default=None)
    add_model_arg(k)
    add_engine_args(k)
    k.set_defaults(func=cmd_compile)

    from metronome.bench.cli import add_cli as add_bench
    from metronome.fleet.cli import add_cli as add_plan
    from metronome.model.cli import add_cli as add_models
    from metronome.serve.cli import add_cli as add_serve

    add_serve(sub)
    add_bench(sub)
    add_plan(sub)
    add_models(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    if sys.stdout is None:
        return stdout_closed()
    args = parse_noting_given(build_parser, argv)
    try:
        return args.func(args)
    except ParamError as exc:  # a flag out of range: name the flag
        print(f"metronome: error: {param_message(exc)}", file=sys.stderr)
        return 2
    # ModelFileError, PlanError, ChatTemplateError... are ValueErrors: named here, their modules (and torch)
    # would load before the arguments are read, and `--help` would take seconds
    except ValueError as exc:
        print(f"metronome: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: the command stops, as a shell tool does, without a traceback
        print(file=sys.stderr)
        return 130
    except RuntimeError as exc:
        group = sys.modules.get("metronome.parallel.group")  # not imported: loaded, it would load torch
        if group is None or not isinstance(exc, group.GroupError):  # never imported: it cannot be one
            raise
        print(f"metronome: error: {exc}", file=sys.stderr)  # a rank or prefill worker: its message names it
        return 1
    except BrokenPipeError:
        return reader_left()


def stdout_closed() -> int:
    """Started with stdout closed (`>&-`), Python sets sys.stdout to None, and the first write anywhere (the
    kernels' build, uvicorn's log formatter, an answer) was an AttributeError traceback after the model had
    loaded. Said at once instead, with what to do."""
    print(
        "metronome: error: standard output is closed; send it somewhere (`> out.txt`, `> /dev/null`)", file=sys.stderr
    )
    return 2


def reader_left() -> int:
    """The reader of stdout left (`| head`): stop quietly, as other command-line tools do. stdout goes to
    /dev/null so that the interpreter's own flush at exit does not fail again. Returns 141 (128 + SIGPIPE,
    what a shell reports for a tool the pipe ended)."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 141


if __name__ == "__main__":
    sys.exit(main())
