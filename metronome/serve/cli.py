"""`metronome serve`: the OpenAI-compatible server and chat page on one port.

The port opens at once and answers /health with 503 while the model loads on a side thread; it turns
200 once the engine is compiled and stepping. `python -m metronome.serve.cli [flags]` is the same
command without the `metronome` front end.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import errno
import ipaddress
import multiprocessing
import os
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING

from metronome.args import (
    add_engine_args,
    add_model_arg,
    add_speech_model_arg,
    engine_config,
    param_message,
    speech_model_path,
)
from metronome.config import ParamError
from metronome.serve.settings import ServerSettings

if TYPE_CHECKING:
    import uvicorn

    from metronome.engine import Engine
    from metronome.serve.server import ServerState

# The web framework, the engine and the model loader are imported where the server starts, not here: every
# `metronome` command builds its parser from this module's flags (`add_cli`), and `metronome plan` or
# `metronome models` should not need uvicorn or FastAPI to be installed.

API_KEY_ENV = "METRONOME_API_KEY"


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arg(p)
    add_speech_model_arg(p)
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port to bind (0: any free port)")
    p.add_argument(
        "--max-queue",
        type=int,
        default=None,
        help="requests that may wait for a slot, beyond the slots, before new ones get 429; a request asking "
        "for more generations (n x prompts) than slots + this can never fit and gets 400 (default: no limit)",
    )
    p.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on every endpoint but /health, the chat page and /openapi.json "
        f"(better: set {API_KEY_ENV}, which ps does not show)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=int,
        default=ServerSettings.max_body_bytes,
        help=f"larger request bodies get 413 (default {ServerSettings.max_body_bytes})",
    )
    p.add_argument(
        "--log-level",
        default="warning",
        choices=("critical", "error", "warning", "info", "debug"),
        help="uvicorn's log level (info logs every request)",
    )
    add_engine_args(p)


def add_cli(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve an OpenAI-compatible API and a chat page",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
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

    def __init__(
        self, args: argparse.Namespace, state: ServerState, server: uvicorn.Server, freeze_heap: bool = False
    ) -> None:
        """`freeze_heap`: once the model is attached, set what start-up made aside from the cyclic collector
        (engine/heap.py): for the server's own process, not for a caller's (a test's) whose heap it would
        keep."""
        super().__init__(name="metronome-loader", daemon=True)
        self.args, self.state, self.server = args, state, server
        self.freeze_heap = freeze_heap
        self.engine: Engine | None = None
        self.error: BaseException | None = None

    def run(self) -> None:
        from metronome.engine import Engine
        from metronome.engine.heap import freeze_startup_heap
        from metronome.model.loader import load
        from metronome.serve.server import ModelIdentity

        a = self.args
        try:
            speech, speech_path = self.state.speech, speech_model_path(a)[1]
            if speech is not None:  # first: it loads in seconds, and /health turns 200 with both ready
                from metronome.audio.transcribe import Transcriber  # the Whisper runner: only when served

                speech.attach(Transcriber.load(speech_path))
            loaded = load(a.model)
            config = engine_config(a)  # ctx, threads None: resolved by the compile, as for Engine.from_model
            # calibrated (and cached on disk: the next start with the same settings skips it)
            # the compile's steps and warnings (a plan cache it cannot write, C++ kernels it cannot build),
            # said as `metronome compile` says them: dropped here, they left a slow server unexplained
            self.engine = Engine.from_model(
                config=config, max_queue=a.max_queue, loaded=loaded, calibrate=True, progress=_say
            )
            if self.server.should_exit:  # stopped while compiling: never ready (`serve` stops the engine)
                return
            template_error = self.engine.tokenizer.compile_chat_template()
            if template_error is not None:
                print(f"metronome: warning: {template_error}", flush=True)
            self.state.attach(self.engine, ModelIdentity.of(loaded, a.model))
            if self.freeze_heap:  # a full collection of what start-up made stalled every stream for 60-90 ms
                freeze_startup_heap()
            r = self.engine.plan.report
            kv = f"KV cache {megabytes(r.kv_cache_bytes)} of {r.kv_cache_format}, prefix cache " + (
                megabytes(r.prefix_cache_bytes) if r.prefix_cache_bytes else r.prefix_cache_note
            )
            for warning in r.warnings:
                print(f"metronome: warning: {warning}", flush=True)
            print(
                f"metronome: {self.state.served.identity.id} ready ({self.state.served.fingerprint}; {kv}; "
                f"kernels {r.kernels})",
                flush=True,
            )
        except BaseException as exc:  # reported by `run` once the server has stopped
            self.error = exc
            self.server.should_exit = True


def _say(message: str) -> None:
    print(f"metronome: {message}", flush=True)


def megabytes(n: int) -> str:
    """A size for a person: whole megabytes, with a decimal below 10 MB (a tiny model's KV cache is not "0 MB")."""
    return f"{n / 1e6:.0f} MB" if n >= 10e6 else f"{n / 1e6:.2g} MB"


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    sock.set_inheritable(True)
    return sock


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from metronome.compile import PlanError
    from metronome.model.loader import ModelFileError
    from metronome.parallel.group import GroupError
    from metronome.serve.audio import SpeechService
    from metronome.serve.server import create_app

    if not 0 <= args.port <= 65535:
        print(f"metronome serve: --port {args.port}: a port is 0-65535 (0: any free one)", file=sys.stderr)
        return 2
    if args.max_queue is not None and args.max_queue < 0:
        print(
            f"metronome serve: --max-queue {args.max_queue}: must be 0 or more (or left out: no limit)", file=sys.stderr
        )
        return 2
    try:
        settings = settings_from(args)
        engine_config(args)  # the engine flags, checked before the port opens (the model's context: once it loads)
    except ParamError as exc:
        print(f"metronome serve: {param_message(exc)}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"metronome serve: {exc}", file=sys.stderr)
        return 2
    try:
        sock = _bind(args.host, args.port)
    except OSError as exc:
        # a name that does not resolve or an address not on this machine is the host's fault, not the port's
        fix = (
            "check --host"
            if isinstance(exc, socket.gaierror) or exc.errno == errno.EADDRNOTAVAIL
            else "pick another --port"
        )
        print(f"metronome serve: cannot listen on {args.host}:{args.port} ({exc}); {fix}", file=sys.stderr)
        return 2
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    if ipaddress.ip_address(host).is_loopback:  # only this machine's names reach it
        # and the address and name it was given: 127.0.0.2, or a hostname that resolves to 127.0.1.1
        # (Debian's), answered 403 to everything, /health too, sent to the address it was told to serve
        settings = dataclasses.replace(settings, allowed_hosts=LOOPBACK_NAMES | {host, args.host})
    elif settings.api_key is None:
        print(
            f"metronome serve: warning: listening on {host}, beyond this machine, with no API key: anyone who "
            f"can reach it may use it (set {API_KEY_ENV})",
            file=sys.stderr,
        )
    speech = SpeechService() if speech_model_path(args)[0] else None
    app = create_app(None, settings, speech=speech)
    from metronome.serve.http import BoundedHttpToolsProtocol

    config = uvicorn.Config(
        app,
        log_level=args.log_level,
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S,
        http=BoundedHttpToolsProtocol,  # headers bounded in size and in time (serve/http.py)
        limit_concurrency=MAX_CONNECTIONS,
    )
    server = _server(config)
    loader = ModelLoader(args, app.state.server, server, freeze_heap=True)
    print(f"metronome: chat page at {url}/  (API at {url}/v1; loading the model...)", flush=True)
    loader.start()
    # uvicorn stops gracefully on SIGINT and SIGTERM, then raises the signal again with the handler it
    # found: SIGTERM's default would end the process there, skipping the cleanup below (the ranks and
    # the prefill worker were left to notice by their own timeouts). As Ctrl-C's, it ends the run instead.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        server.run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down gracefully on Ctrl-C or SIGTERM, then re-raised it
        print("metronome: stopped", flush=True)
    finally:
        try:
            _await_loader(loader)
            app.state.server.detach()
            if loader.engine is not None:
                try:
                    loader.engine.close()  # its thread, and the ranks and prefill worker it started
                except TimeoutError as exc:  # a step that outlasts it: said; the processes are released anyway
                    print(f"metronome: {exc}", file=sys.stderr)
        finally:
            signal.signal(signal.SIGTERM, previous)  # only now: a SIGTERM above is Ctrl-C's, not a kill
            if speech is not None:
                speech.stop()
            sock.close()
    if loader.error is not None:
        if isinstance(loader.error, ParamError):
            print(f"metronome serve: {param_message(loader.error)}", file=sys.stderr)
            return 2
        if isinstance(loader.error, (ModelFileError, PlanError)):
            print(f"metronome serve: {loader.error}", file=sys.stderr)
            return 2
        if isinstance(loader.error, FileNotFoundError):  # the speech model's folder or package
            print(f"metronome serve: --speech-model: {loader.error}", file=sys.stderr)
            return 2
        if isinstance(loader.error, GroupError):  # a rank or the prefill worker did not start: it is named
            print(f"metronome serve: {loader.error}", file=sys.stderr)
            return 1
        raise loader.error
    return 0


# Stopping (Ctrl-C, SIGTERM): uvicorn stops accepting connections and waits this long for those open to end,
# then cancels their handlers. Generations still running when STREAMS_END_S of it have passed are ended by
# the server first, so their clients get a clean end (ServerState.stop_generating) rather than a cut stream.
SHUTDOWN_GRACE_S = 5.0
STREAMS_END_S = 3.5
FORCE_AFTER_S = 0.5  # a second Ctrl-C: the time the 503s of the generations it ends have to be written
# Connections (or requests in progress) beyond this get a 503 at once (serve/http.py, in the API's error
# shape): a server with a few slots has no use for more, and it keeps clear of the usual limit of 1,024 open
# files per process.
MAX_CONNECTIONS = 512
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


def _server(config: "uvicorn.Config") -> "uvicorn.Server":
    """uvicorn's server, ending the app's running generations part-way through its graceful shutdown, and
    at once on a second Ctrl-C."""
    import uvicorn

    class Server(uvicorn.Server):
        _loop: asyncio.AbstractEventLoop | None = None

        async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
            self._loop = asyncio.get_running_loop()
            state = self.config.app.state.server
            ending = self._loop.call_later(STREAMS_END_S, state.stop_generating)
            try:
                await super().shutdown(sockets)
            finally:
                ending.cancel()

        def handle_exit(self, sig: int, frame: object) -> None:
            """A second Ctrl-C while shutting down quits without waiting for the connections, which uvicorn
            does by cancelling their handlers: every stream cut without an end, a text/plain 500 for whole
            answers, a traceback each. The generations are ended first (their clients get the 503), and the
            quit follows FORCE_AFTER_S later, once those answers are written."""
            loop = self._loop
            if self.should_exit and sig == signal.SIGINT and loop is not None and not self.force_exit:
                # (the first signal is what uvicorn raises again once it is done: Ctrl-C's exit as before)
                loop.call_soon_threadsafe(self._force_soon, loop)
                return
            super().handle_exit(sig, frame)  # type: ignore[arg-type]

        def _force_soon(self, loop: asyncio.AbstractEventLoop) -> None:
            self.config.app.state.server.stop_generating()
            loop.call_later(FORCE_AFTER_S, setattr, self, "force_exit", True)

    return Server(config)


def _await_loader(loader: threading.Thread) -> None:
    """Wait for the model's compile to end (it cannot be cut short: its processes end with it). Ctrl-C (or
    SIGTERM) again while waiting quits at once: the compile's thread runs C++, and an interpreter that exits
    around it aborts (a core dump, exit -6); the processes it started are killed first."""
    if loader.is_alive():
        print(
            "metronome: waiting for the model's compile to finish before exiting (Ctrl-C again: quit now)", flush=True
        )
    while loader.is_alive():
        try:
            loader.join(timeout=0.5)
        except KeyboardInterrupt:
            for child in multiprocessing.active_children():  # ranks, a prefill worker: daemons os._exit skips
                child.kill()
            print("metronome: stopped during the compile", flush=True)
            os._exit(130)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    if sys.stdout is None:
        from metronome.cli import stdout_closed

        return stdout_closed()
    parser = argparse.ArgumentParser(
        prog="metronome serve", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
