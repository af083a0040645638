"""`metronome serve`: the OpenAI-compatible server and chat page on one port.

The port opens at once and answers /health with 503 while the model loads on a side thread; it turns
200 once the engine is compiled and stepping. `python -m metronome.serve.cli [flags]` is the same
command without the `metronome` front end.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import threading

import uvicorn

from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.model.loader import ModelFileError, load
from metronome.compile import PlanError, available_cores, default_ctx
from metronome.serve.server import ModelIdentity, ServerSettings, ServerState, create_app

API_KEY_ENV = "METRONOME_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="a .gguf file or an HF model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    p.add_argument("--slots", type=int, default=8, help="requests decoded together (default 8)")
    p.add_argument("--ctx", type=int, default=None,
                   help="context tokens per slot, prompt + output (default 2048, or the model's if shorter)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests that may wait for a slot before new ones get 429 (default: no limit)")
    p.add_argument("--api-key", default=None,
                   help=f"require 'Authorization: Bearer KEY' on every endpoint but /health (or set {API_KEY_ENV})")
    p.add_argument("--max-body-bytes", type=int, default=ServerSettings.max_body_bytes,
                   help=f"larger request bodies get 413 (default {ServerSettings.max_body_bytes})")
    p.add_argument("--weights", default="auto",
                   help="run-time weight format: auto, f32, bf16, or int8/int4 on CPU (the plan checks the choice)")
    p.add_argument("--threads", type=int, default=None,
                   help="compute threads (default: every core this process may use; on 2 cores a streamed "
                        "request ran at 157 tokens/s with 2 and 110 with 1)")
    p.add_argument("--device", default="cpu", help="cpu, or cuda / cuda:N")
    p.add_argument("--spec-tokens", type=int, default=EngineConfig.spec_tokens,
                   help="speculative decoding: most tokens drafted per step while one request runs (0: off)")
    p.add_argument("--draft", default=None, help="a draft model (same vocabulary) for speculation (default: prompt lookup)")
    p.add_argument("--log-level", default="warning", choices=("critical", "error", "warning", "info", "debug"),
                   help="uvicorn's log level (info logs every request)")


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve an OpenAI-compatible API and a chat page",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)


def settings_from(args: argparse.Namespace) -> ServerSettings:
    key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV)
    if key is not None and not key.strip():
        raise ValueError(f"the API key is empty (--api-key or {API_KEY_ENV}); give a non-empty key or none")
    if args.max_body_bytes < 1:
        raise ValueError(f"--max-body-bytes={args.max_body_bytes}: must be at least 1")
    return ServerSettings(api_key=key, max_body_bytes=args.max_body_bytes)


class ModelLoader(threading.Thread):
    """Loads and compiles the model, then attaches it to the app; a failure stops the server."""

    def __init__(self, args: argparse.Namespace, state: ServerState, server: uvicorn.Server) -> None:
        super().__init__(name="metronome-loader", daemon=True)
        self.args, self.state, self.server = args, state, server
        self.engine: Engine | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        a = self.args
        try:
            loaded = load(a.model)
            threads = a.threads if a.threads is not None else available_cores()
            config = EngineConfig(slots=a.slots, ctx=default_ctx(loaded.config, a.ctx), device=a.device,
                                  weights=a.weights, threads=threads, spec_tokens=a.spec_tokens, draft=a.draft)
            # calibrated (and cached on disk: the next start with the same settings skips it)
            self.engine = Engine.from_model(config=config, max_queue=a.max_queue, loaded=loaded, calibrate=True)
            self.state.attach(self.engine, ModelIdentity.of(loaded))
            print(f"metronome: {self.state.served.identity.id} ready ({self.state.served.fingerprint})", flush=True)
        except BaseException as exc:  # reported by `run` once the server has stopped
            self.error = exc
            self.server.should_exit = True


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from(args)
    except ValueError as exc:
        print(f"metronome serve: {exc}", file=sys.stderr)
        return 2
    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        print(f"metronome serve: cannot listen on {args.host}:{args.port} ({exc}); pick another --port", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    app = create_app(None, settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level=args.log_level, timeout_graceful_shutdown=5))
    loader = ModelLoader(args, app.state.server, server)
    print(f"metronome: chat page at {url}/  (API at {url}/v1; loading the model...)", flush=True)
    loader.start()
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully on Ctrl-C, then re-raised it: a normal stop
        print("metronome: stopped", flush=True)
    finally:
        loader.join()
        if loader.engine is not None:
            loader.engine.stop()
        sock.close()
    if loader.error is not None:
        if isinstance(loader.error, (ModelFileError, PlanError)):
            print(f"metronome serve: {loader.error}", file=sys.stderr)
            return 2
        raise loader.error
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metronome serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
