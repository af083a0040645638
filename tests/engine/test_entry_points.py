"""Every entry point that builds an engine resolves its settings the same way: `Engine.from_model()`,
`metronome generate` (cli.load_engine) and `metronome serve` (its ModelLoader) compile the same plan for
the same model and flags, on a tiny model whose context (512) is shorter than the default (2048)."""

from __future__ import annotations

import types

import pytest

from metronome.cli import build_parser, load_engine
from metronome.compile import available_cores
from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.kernels.ops import load_kernels
from metronome.serve.cli import ModelLoader
from metronome.serve.server import ServerSettings, create_app


def _plans(path: str, flags: list[str], config: EngineConfig):
    """The plan settings, kernels and pool size each entry point leaves, in turn."""

    def seen(engine: Engine):
        r = engine.plan.report
        # the one pool, and where its threads run
        return engine.plan.config, r.weights, r.kernels, r.decode_mode, r.cpus, load_kernels().threads()

    api = Engine.from_model(path, config)
    out = {"python": seen(api)}
    parser = build_parser()
    cli = load_engine(parser.parse_args(["generate", "x", "--model", path, *flags]))
    out["generate"] = seen(cli)
    args = parser.parse_args(["serve", "--model", path, *flags])
    app = create_app(None, ServerSettings())
    loader = ModelLoader(args, app.state.server, types.SimpleNamespace(should_exit=False))
    loader.run()  # on this thread: load, compile, attach (starts the engine's thread)
    assert loader.error is None, loader.error
    try:
        out["serve"] = seen(loader.engine)
    finally:
        loader.engine.stop()
    return out


@pytest.mark.parametrize(
    ("flags", "config"),
    [
        ([], EngineConfig()),
        (["--slots", "3", "--threads", "1", "--spec-tokens", "0"], EngineConfig(slots=3, threads=1, spec_tokens=0)),
        (["--no-pin-threads"], EngineConfig(pin_threads=False)),
    ],
)
def test_python_cli_and_serve_compile_the_same_plan(tiny_hf, flags, config):
    plans = _plans(str(tiny_hf("llama")), flags, config)
    assert plans["python"] == plans["generate"] == plans["serve"], plans
    resolved = plans["python"][0]
    assert resolved.ctx == 512  # the model's own context: shorter than the default
    assert resolved.threads == (config.threads or available_cores())
