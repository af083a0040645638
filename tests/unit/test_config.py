"""Settings records and the flags that build them: no model needed."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from metronome.args import ENGINE_FLAGS, SAMPLING_FLAGS, engine_config, sampling_params
from metronome.config import (
    MAX_CTX,
    MAX_SLOTS,
    MAX_SPEC_TOKENS,
    MAX_THREADS,
    MIN_SAMPLING_FLOAT,
    EngineConfig,
    Kernels,
    KvCache,
    Layout,
    ModelConfig,
    ParamError,
    RopeScaling,
    SamplingParams,
    Weights,
)

BAD_ENGINE = {
    # 2.5, "8" and 10**5 slots, 10**4 threads: tracebacks from torch's allocator or the thread pool before
    "slots": [0, -1, 2.5, "8", True, 100_000],
    "ctx": [15, 0, 100.5, 1 << 30],
    "weights": ["int3", "", "F32"],
    "kernels": ["cuda", ""],
    "threads": [0, -4, 1.5, 10_000],
    "spec_tokens": [-1, 1.5, 1000],
    "draft": [5, "", "  "],
    "prefix_cache_tokens": [-1, 10**20],
    "prefill_chunk": [0, 2.5],
    "tp": [0, 1.0, MAX_THREADS + 1],
    "tp_shards": [0, 2.5],
    "device": ["gpu", "cuda:", "cpux", "cuda:0x", ""],  # cuda:N is taken whole, not by its prefix
    "layout": ["split"],
    "kv_cache": ["int4"],
}

# the ends of each range, which must be accepted: a `<` for a `<=` refused what the message and the help offer
GOOD_ENGINE = {
    "slots": [1, MAX_SLOTS],
    "ctx": [16, MAX_CTX],
    "threads": [1, MAX_THREADS],
    "spec_tokens": [0, MAX_SPEC_TOKENS],
    "prefill_chunk": [1],
    "prefix_cache_tokens": [0, MAX_CTX * MAX_SLOTS],
    "tp": [1, MAX_THREADS],
    "tp_shards": [1],
    "device": ["cpu", "cuda", "cuda:0", "cuda:12"],
}

BAD_SAMPLING = {
    "max_tokens": [-1, -100],  # 0 is the prompt only (scoring)
    "temperature": [-0.1, 2.01, 5e-324, 1e-40],  # tiny: below what the float32 sampler can divide by
    "top_k": [-1],
    "top_p": [0.0, 1.5, 5e-324],
    "min_p": [-0.1, 1.1],
    "repetition_penalty": [0.0, 10.5, 5e-324],
    "presence_penalty": [-2.1, 2.1],
    "frequency_penalty": [-2.1, 2.1],
    "top_logprobs": [-1, 21],
    "logit_bias": [{-1: 1.0}, {3: 100.5}, {3: float("nan")}, {"3": 1.0}, {3: "1"}, ((3, 1.0), (3, 2.0)), 7],
    "seed": [2**63, -(2**63) - 1, 1.5, True, "3"],  # what a 64-bit generator's seed holds
    "stop": [("",), ("x", ""), {"x": 1}, 7, (7,)],
    "stop_token_ids": [(-1,), (1.5,), (True,), "12"],
    "logprobs": ["yes", 1],
    "ignore_eos": [None],
    "prompt_logprobs": [0],
}

GOOD_SAMPLING = {
    "max_tokens": [0, 1],  # 0: the prompt only (scoring)
    "temperature": [0.0, MIN_SAMPLING_FLOAT, 2.0],
    "top_p": [MIN_SAMPLING_FLOAT, 1.0],
    "min_p": [0.0, 1.0],
    "repetition_penalty": [MIN_SAMPLING_FLOAT, 10.0],
    "presence_penalty": [-2.0, 2.0],
    "frequency_penalty": [-2.0, 2.0],
    "top_logprobs": [0, 20],
    "logit_bias": [{0: -100.0, 7: 100.0}],
    "seed": [0, 2**63 - 1, -(2**63)],
    "stop_token_ids": [(0,)],
}


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, vs in BAD_ENGINE.items() for v in vs])
def test_engine_config_names_the_bad_field(field, value):
    with pytest.raises(ParamError) as err:
        EngineConfig(**{field: value})
    assert err.value.param == field and field in str(err.value)
    assert isinstance(err.value, ValueError)


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, vs in GOOD_ENGINE.items() for v in vs])
def test_engine_config_accepts_the_ends_of_each_range(field, value):
    assert getattr(EngineConfig(**{field: value}), field) == value


def test_string_settings_are_stored_as_their_members():
    """A str for a choice is parsed to the member (the repr and the plan cache key read the same either way)."""
    config = EngineConfig(layout="disaggregated", kv_cache="int8")
    assert config.layout is Layout.DISAGGREGATED and config.kv_cache is KvCache.INT8


def test_a_draft_model_needs_speculation():
    """--draft with --spec-tokens 0 ran without the draft, silently (even a draft path that does not exist)."""
    with pytest.raises(ParamError, match="drafts only with spec_tokens above 0") as err:
        EngineConfig(draft="model.gguf", spec_tokens=0)
    assert err.value.param == "draft"


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, vs in BAD_SAMPLING.items() for v in vs])
def test_sampling_params_names_the_bad_field(field, value):
    with pytest.raises(ParamError) as err:
        SamplingParams(**{field: value})
    assert err.value.param == field and field in str(err.value)


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, vs in GOOD_SAMPLING.items() for v in vs])
def test_sampling_params_accept_the_ends_of_each_range(field, value):
    SamplingParams(**{field: value})


def test_sampling_params_store_what_clients_send_as_the_record_holds_it():
    """OpenAI's clients send one stop string bare and None for "no stops"; a dict's biases may be ints."""
    assert SamplingParams(stop="ab").stop == ("ab",)  # not ("a", "b")
    assert SamplingParams(stop=None, stop_token_ids=None) == SamplingParams()
    assert SamplingParams(stop_token_ids=[2, 5]).stop_token_ids == (2, 5)
    pairs = SamplingParams(logit_bias={9: 1, 3: -2}).logit_bias
    assert pairs == ((3, -2.0), (9, 1.0)) and all(type(b) is float for _, b in pairs)  # sorted, as floats


def test_every_checked_field_is_covered():
    # a field added with a check but not to the tables above would go untested
    for cls, bad in ((EngineConfig, BAD_ENGINE), (SamplingParams, BAD_SAMPLING)):
        assert set(bad) <= {f.name for f in dataclasses.fields(cls)}
    for cls, good in ((EngineConfig, GOOD_ENGINE), (SamplingParams, GOOD_SAMPLING)):
        assert set(good) <= {f.name for f in dataclasses.fields(cls)}


def test_validate_still_checks_and_replace_rechecks():
    params = SamplingParams(temperature=0.7, stop=["x"])  # a list is kept as a tuple
    params.validate()
    assert params.stop == ("x",) and hash(params)
    with pytest.raises(ParamError) as err:
        dataclasses.replace(params, top_p=0.0)
    assert err.value.param == "top_p"
    with pytest.raises(ParamError) as err:
        dataclasses.replace(EngineConfig(), slots=0)
    assert err.value.param == "slots"


def test_weights_and_kernels_are_string_enums():
    config = EngineConfig(weights="int4", kernels="cpp")
    assert config.weights is Weights.INT4 and config.kernels is Kernels.CPP
    assert config.weights == "int4" and config.weights in ("int4", "int8") and config.kernels != "torch"
    assert str(config.weights) == "int4" and f"{config.weights}" == "int4"
    assert config == EngineConfig(weights=Weights.INT4, kernels=Kernels.CPP)
    assert hash(config) == hash(EngineConfig(weights=Weights.INT4, kernels=Kernels.CPP))
    # the repr (part of the plan cache key) reads as it did when the fields were plain strings
    assert "weights='int4'" in repr(config) and "kernels='cpp'" in repr(config)
    assert Weights.choices() == ("auto", "f32", "bf16", "int8", "int4")
    assert Kernels.choices() == ("auto", "cpp", "torch")


def _model(max_position: int = 8192) -> ModelConfig:
    return ModelConfig(
        arch="llama",
        vocab_size=100,
        hidden_size=64,
        intermediate_size=128,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        max_position=max_position,
    )


# what a damaged or hostile model file's metadata can put in a ModelConfig; the loaders name the file
BAD_MODEL = {
    "vocab_size": [0],
    "hidden_size": [0],
    "num_layers": [0],
    "num_heads": [0],
    "num_kv_heads": [0, 3, 8],  # 3 does not divide 4 heads; 8 is more than 4
    "head_dim": [0, -2, 7],
    "intermediate_size": [0],  # a dense model's MLP
    "max_position": [0],
    "rms_norm_eps": [0.0, 1.0, float("nan")],
    "rope_theta": [0.0, float("inf"), float("nan")],
    "num_experts": [-1],
    "query_pre_attn_scalar": [0.0, -32.0, float("nan")],
    "final_logit_softcap": [-1.0, float("inf")],
    "sliding_window": [0, 2.5],
    "rope_local_theta": [0.0, float("inf")],
    "embed_scale": [0.0, float("nan")],
}

GOOD_MODEL = {
    "final_logit_softcap": [0.0, None, 30.0],  # 0 or None: no cap
    "sliding_window": [1, None],
    "head_dim": [2],
    "num_kv_heads": [1, 4],
    "rms_norm_eps": [1e-6],
    "query_pre_attn_scalar": [None, 1.0],
    "embed_scale": [8.0],
}


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, vs in BAD_MODEL.items() for v in vs])
def test_model_config_names_the_bad_field(field, value):
    with pytest.raises(ParamError) as err:
        dataclasses.replace(_model(), **{field: value})
    assert err.value.param == field and field in str(err.value)


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, vs in GOOD_MODEL.items() for v in vs])
def test_model_config_accepts_the_ends_of_each_range(field, value):
    assert getattr(dataclasses.replace(_model(), **{field: value}), field) == value


def test_moe_config_checks_its_experts():
    moe = dataclasses.replace(
        _model(), num_experts=4, experts_per_token=1, moe_intermediate_size=8, intermediate_size=0
    )
    assert moe.is_moe and moe.intermediate_size == 0  # an MoE model's MLP is its experts: no dense width needed
    for field, value in (("experts_per_token", 0), ("experts_per_token", 5), ("moe_intermediate_size", 0)):
        with pytest.raises(ParamError) as err:
            dataclasses.replace(moe, **{field: value})
        assert err.value.param == field, (field, value)
    assert dataclasses.replace(moe, experts_per_token=4).experts_per_token == 4


BAD_ROPE = [
    ({"kind": "yarn"}, "kind"),
    ({"factor": 0.0}, "factor"),
    ({"kind": "linear", "factor": float("inf")}, "factor"),
    ({"kind": "factors", "factors": ()}, "factors"),
    ({"kind": "factors", "factors": (1.0, 0.0)}, "factors"),
    ({"kind": "factors", "factors": (1.0, float("nan"))}, "factors"),
    ({"low_freq_factor": 0.0}, "low_freq_factor"),
    ({"low_freq_factor": 4.0, "high_freq_factor": 4.0}, "high_freq_factor"),
    ({"original_max_position": 0}, "original_max_position"),
    ({"original_max_position": 8192.5}, "original_max_position"),
]


@pytest.mark.parametrize(("settings", "field"), BAD_ROPE)
def test_rope_scaling_names_the_bad_field(settings, field):
    with pytest.raises(ParamError) as err:
        RopeScaling(**settings)
    assert err.value.param == field and field in str(err.value)


def test_rope_scaling_accepts_what_each_kind_needs():
    RopeScaling()
    RopeScaling(original_max_position=1)
    # only llama3 blends between the two frequency factors: linear and factors ignore them
    RopeScaling(kind="linear", factor=4.0, low_freq_factor=0.0)
    assert RopeScaling(kind="factors", factors=(1.0, 2.5)).factors == (1.0, 2.5)


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from metronome.cli import build_parser
    from metronome.serve.cli import add_arguments

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    serve = argparse.ArgumentParser()
    add_arguments(serve)  # `python -m metronome.serve.cli`
    return {
        "generate": sub.choices["generate"],
        "chat": sub.choices["chat"],
        "compile": sub.choices["compile"],
        "serve": sub.choices["serve"],
        "serve.cli": serve,
    }


def _parse(command: str, flags: list[str]) -> argparse.Namespace:
    lead = ["a prompt"] if command == "generate" else []
    return _parsers()[command].parse_args(lead + flags)


ENGINE_COMMANDS = ["generate", "chat", "compile", "serve", "serve.cli"]


@pytest.mark.parametrize("command", ENGINE_COMMANDS)
def test_no_flags_give_the_python_defaults(command):
    from metronome.compile import available_cores, resolve_settings

    args = _parse(command, [])
    assert engine_config(args) == EngineConfig()
    # what the model and the machine decide is decided once, in the compile, for every entry point
    short = resolve_settings(_model(max_position=512), engine_config(args))
    assert short == resolve_settings(_model(max_position=512), EngineConfig())
    assert short.ctx == 512 and short.threads == available_cores()  # the model's shorter context; every core
    assert resolve_settings(_model(), engine_config(args)).ctx == 2048


FLAGS = [
    "--slots",
    "3",
    "--ctx",
    "256",
    "--weights",
    "int8",
    "--device",
    "cpu",
    "--threads",
    "2",
    "--kernels",
    "torch",
    "--spec-tokens",
    "2",
    "--draft",
    "d.gguf",
]


def test_the_same_flags_give_the_same_config_everywhere():
    expected = EngineConfig(slots=3, ctx=256, weights="int8", threads=2, kernels="torch", spec_tokens=2, draft="d.gguf")
    for command in ENGINE_COMMANDS:
        assert engine_config(_parse(command, FLAGS)) == expected, command


def test_every_engine_command_has_every_engine_flag():
    every = {flag for flag, _ in ENGINE_FLAGS.values()}
    assert {f"--{f.name.replace('_', '-')}" for f in dataclasses.fields(EngineConfig)} == every
    # a yes/no setting (--pin-threads) has its --no- form too
    every |= {
        f"--no-{flag[2:]}"
        for flag, kwargs in ENGINE_FLAGS.values()
        if kwargs.get("action") is argparse.BooleanOptionalAction
    }
    for command, parser in _parsers().items():
        group = next(g for g in parser._action_groups if g.title == "engine")
        have = {s for a in group._group_actions for s in a.option_strings}
        assert have == every, f"{command}: {sorted(have ^ every)}"


def test_flag_defaults_and_choices_come_from_the_records():
    parser = _parsers()["serve"]
    by_flag = {s: a for a in parser._actions for s in a.option_strings}
    defaults = EngineConfig()
    for dest, (flag, _) in ENGINE_FLAGS.items():
        if dest != "ctx":  # resolved against the model
            assert by_flag[flag].default == getattr(defaults, dest), flag
    assert tuple(by_flag["--weights"].choices) == Weights.choices()
    assert tuple(by_flag["--kernels"].choices) == Kernels.choices()
    assert tuple(by_flag["--layout"].choices) == Layout.choices()
    assert tuple(by_flag["--kv-cache"].choices) == KvCache.choices()


def test_sampling_flags_build_sampling_params():
    assert sampling_params(_parse("generate", [])) == SamplingParams()
    args = _parse(
        "generate",
        [
            "--max-tokens",
            "9",
            "--temperature",
            "0.5",
            "--top-p",
            "0.9",
            "--top-k",
            "4",
            "--min-p",
            "0.1",
            "--repetition-penalty",
            "1.1",
            "--seed",
            "3",
            "--stop",
            "a",
            "--stop",
            "b",
            "--logit-bias",
            "13=-100",
            "--logit-bias",
            "2=1.5",
        ],
    )
    assert sampling_params(args) == SamplingParams(
        max_tokens=9,
        temperature=0.5,
        top_p=0.9,
        top_k=4,
        min_p=0.1,
        repetition_penalty=1.1,
        seed=3,
        stop=("a", "b"),
        logit_bias={2: 1.5, 13: -100},
    )
    with pytest.raises(ParamError) as err:
        sampling_params(_parse("generate", ["--logit-bias", "13"]))
    assert err.value.param == "logit_bias" and "ID=BIAS" in str(err.value)
    for dest in SAMPLING_FLAGS:
        assert hasattr(SamplingParams(), dest)
    with pytest.raises(ParamError) as err:
        sampling_params(_parse("chat", ["--top-p", "0"]))
    assert err.value.param == "top_p"


def test_a_command_with_some_engine_flags_builds_its_config_from_those():
    """`metronome plan` and the benches add only some engine flags; the rest keep the record's defaults."""
    from metronome.args import add_engine_args

    parser = argparse.ArgumentParser()
    add_engine_args(parser, only=("threads", "slots"))
    assert engine_config(parser.parse_args(["--threads", "2"])) == EngineConfig(threads=2)
    with pytest.raises(SystemExit):  # not added: refused by argparse
        parser.parse_args(["--ctx", "64"])


def test_reflect_flags_build_reflect_settings():
    from metronome.agents.reflect import ReflectSettings
    from metronome.args import reflect_settings
    from metronome.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    reflect = sub.choices["reflect"]
    assert reflect_settings(reflect.parse_args(["a task"])) == ReflectSettings()
    args = reflect.parse_args(["a task", "--rounds", "3", "--points", "2", "--system", "be brief"])
    assert reflect_settings(args) == ReflectSettings(rounds=3, points=2, system="be brief")


def test_an_error_names_the_flag_of_its_field():
    from metronome.args import flag_of, param_message

    assert (
        flag_of("spec_tokens") == "--spec-tokens" and flag_of("top_p") == "--top-p" and flag_of("rounds") == "--rounds"
    )
    assert flag_of("model") == "--model" and flag_of("no_such_field") is None
    assert param_message(ParamError("model", "the model is empty")) == "the model is empty (check --model)"
    assert param_message(ParamError("messages", "no messages")) == "no messages"  # no flag sets it


def test_the_flags_a_command_line_names_are_noted_whatever_their_values():
    """`--slots 8` is the default value, but named: a mode that does not read --slots must see it given. A
    subcommand's own flags are noted as named too, not all of them by their defaults."""
    from metronome.args import parse_noting_given, was_given
    from metronome.cli import build_parser

    args = parse_noting_given(build_parser, ["generate", "hi", "--slots", "8"])
    assert args.flags_given == {"command", "prompt", "slots"}
    assert was_given(args, "slots", 8) and not was_given(args, "threads", None)
    assert parse_noting_given(build_parser, ["plan", "--threads", "2"]).flags_given == {"command", "threads"}


def test_argument_types_refuse_below_their_bound_and_take_it():
    from metronome.args import at_least, positive_seconds

    assert at_least(1)("1") == 1 and at_least(0)("0") == 0
    for text in ("0", "-3", "1.5", "x"):
        with pytest.raises(argparse.ArgumentTypeError):
            at_least(1)(text)
    assert positive_seconds("0.25") == 0.25 and positive_seconds("1e-9") == 1e-9
    for text in ("0", "-1", "inf", "nan", "x"):  # NaN and infinity are not a number of seconds
        with pytest.raises(argparse.ArgumentTypeError):
            positive_seconds(text)


def test_the_cli_reports_a_bad_flag_in_one_line(capsys):
    from metronome.cli import main

    assert main(["generate", "hi", "--temperature", "9"]) == 2
    err = capsys.readouterr().err
    assert "temperature=9.0" in err and "--temperature" in err and "Traceback" not in err
    assert main(["compile", "--threads", "0"]) == 2
    err = capsys.readouterr().err
    assert "threads=0" in err and "--threads" in err


def test_serve_refuses_a_bad_engine_flag_before_it_listens(capsys):
    from metronome.serve.cli import main

    assert main(["--port", "0", "--slots", "0"]) == 2
    assert "slots=0" in capsys.readouterr().err


def test_commands_that_serve_nothing_start_without_the_web_framework():
    """Every command's parser holds `serve`'s flags, but only `serve` itself needs uvicorn and FastAPI: on a
    machine without them (the lent GPU machine had neither) `metronome plan` must still start. A fresh
    interpreter with those modules blocked builds the parser and prints `plan --help`."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "for name in ('uvicorn', 'fastapi', 'starlette'):\n"
        "    sys.modules[name] = None  # any import of them fails\n"
        "from metronome.cli import main\n"
        "sys.exit(main(['plan', '--help']))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "--calibrate" in done.stdout


def test_the_command_line_starts_without_torch():
    """`metronome` imported torch before its first line ran (through serve/usage.py's engine import): 1.5 s
    for `--help`, and a Ctrl-C in that time printed an import traceback instead of ending with 130."""
    import subprocess
    import sys

    script = "import sys\nimport metronome.cli\nprint(sorted(m for m in ('torch', 'numpy') if m in sys.modules))\n"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]
    # nor before the arguments are read: main() imported the errors it catches from the compile package
    script = (
        "import contextlib, io, sys\nfrom metronome.cli import main\n"
        "for argv in (['--help'], ['generate', '--help'], ['serve', '--help'], ['models']):\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        main(argv)\n"
        "print(sorted(m for m in ('torch',) if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def _other_records() -> dict[str, tuple[type, dict[str, list[object]]]]:
    """The records beside EngineConfig and SamplingParams, with values each once took: accepted and failed
    later (a rounds of 2.5 in the run's loop, slots of True inside torch, a temperature_step of 0 dividing by
    zero) or ran wrong (points=2.5 asked for "the 2.5 most important things"; max_choices=0 refused every
    request as the client's fault)."""
    from metronome.agents.reflect import ReflectSettings
    from metronome.audio.plan import PlanConfig
    from metronome.audio.transcribe import DecodeOptions
    from metronome.serve.audio import SpeechSettings
    from metronome.serve.settings import ServerSettings

    nan, inf = float("nan"), float("inf")
    return {
        "ReflectSettings": (
            ReflectSettings,
            {"rounds": [2.5, True, "3", 0], "points": [2.5, None, 21], "critique": [None, 5, " "], "system": [5]},
        ),
        "PlanConfig": (PlanConfig, {"slots": [nan, 2.5, True, "4", 0], "threads": [2.5, 0], "step_threads": [3]}),
        "ServerSettings": (
            ServerSettings,
            {
                "max_body_bytes": [0, -1, 2.5],
                "retry_after_s": [nan, "1", -1],
                "model_alias": [None, "", " "],
                "max_choices": [0, True],
                "allowed_hosts": [["localhost"], frozenset({""})],
                "api_key": ["", "  ", 5],
                "stalled_after_s": ["10", nan, inf, 0],
            },
        ),
        "SpeechSettings": (
            SpeechSettings,
            {
                "workers": [2.5, True, 0],
                "max_pending": [inf, 0],
                "decoders": ["2"],
                "max_file_bytes": [0.5],
                "retry_after_s": [nan, [1], -1],
                "timeout_s": [nan, 0],
            },
        ),
        "DecodeOptions": (
            DecodeOptions,
            {
                "temperature_step": [0, -0.2, nan, 2.0],
                "no_speech_threshold": [1.5],
                "seed": [1.5],
                "logprob_threshold": [nan],
            },
        ),
    }


def test_server_settings_accept_the_ends_of_each_range():
    from metronome.serve.settings import ServerSettings

    # Retry-After: 0 is "now"; one generation per request is what a server with n=1 clients needs
    ServerSettings(retry_after_s=0, max_choices=1, max_body_bytes=1, stalled_after_s=0.001)
    ServerSettings(api_key="k", allowed_hosts=frozenset({"localhost", "127.0.0.1"}))


@pytest.mark.parametrize(
    "record", ["ReflectSettings", "PlanConfig", "ServerSettings", "SpeechSettings", "DecodeOptions"]
)
def test_other_records_name_the_bad_field(record):
    cls, bad = _other_records()[record]
    cls()  # the defaults pass
    for field, values in bad.items():
        for value in values:
            with pytest.raises(ParamError) as err:
                cls(**{field: value})
            assert err.value.param == field and field in str(err.value), (record, field, value, err.value)
