"""Settings records and the flags that build them: no model needed."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from metronome.args import ENGINE_FLAGS, SAMPLING_FLAGS, engine_config, sampling_params
from metronome.config import EngineConfig, Kernels, ModelConfig, ParamError, SamplingParams, Weights

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
    "tp": [0, 1.0],
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
}


@pytest.mark.parametrize(("field", "value"), [(f, v) for f, vs in BAD_ENGINE.items() for v in vs])
def test_engine_config_names_the_bad_field(field, value):
    with pytest.raises(ParamError) as err:
        EngineConfig(**{field: value})
    assert err.value.param == field and field in str(err.value)
    assert isinstance(err.value, ValueError)


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


def test_every_checked_field_is_covered():
    # a field added with a check but not to the tables above would go untested
    for cls, bad in ((EngineConfig, BAD_ENGINE), (SamplingParams, BAD_SAMPLING)):
        assert set(bad) <= {f.name for f in dataclasses.fields(cls)}


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
                "model_alias": [None, ""],
                "max_choices": [0, True],
                "allowed_hosts": [["localhost"], frozenset({""})],
                "api_key": ["", 5],
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
