"""A real uvicorn server on a free loopback port, run on a thread, for tests that talk HTTP to it."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from contextlib import contextmanager
from typing import Iterator

import httpx
import uvicorn
from fastapi import FastAPI


class LiveServer:
    """`with LiveServer(app) as url:` serves `app` at `url` (http://127.0.0.1:PORT) until the block ends."""

    def __init__(self, app: FastAPI, start_timeout_s: float = 30.0, limit_concurrency: int | None = None) -> None:
        self.app = app
        self.start_timeout_s = start_timeout_s
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        from metronome.serve.http import BoundedHttpToolsProtocol

        # the HTTP protocol `metronome serve` runs (bounds on headers: serve/http.py)
        config = uvicorn.Config(
            app,
            log_level="warning",
            timeout_graceful_shutdown=2,
            http=BoundedHttpToolsProtocol,
            limit_concurrency=limit_concurrency,  # `metronome serve` sets MAX_CONNECTIONS
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.monotonic() + self.start_timeout_s
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the test server did not start within {self.start_timeout_s} s")
            time.sleep(0.02)
        return self.url

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)
        self.sock.close()


@contextmanager
def serving(loaded, config) -> Iterator[str]:
    """`with serving(loaded, EngineConfig(...)) as url:` an engine for `loaded`, in the real app, on a live
    server; the engine is stopped when the block ends."""
    from metronome.engine import Engine
    from metronome.serve.server import ModelIdentity, ServerSettings, create_app

    engine = Engine.from_model(config=config, loaded=loaded)
    app = create_app(engine, ServerSettings(), ModelIdentity.of(loaded))
    try:
        with LiveServer(app) as url:
            yield url
    finally:
        engine.stop()


def openai_client(url: str):
    """The `openai` client pointed at a live server (no retries: a failure shows at once)."""
    import openai

    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout_s: float = 120.0) -> None:
    """Wait for a `metronome serve` process at `url` to load its model (/health 200); fail at once if it
    exits, and after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise AssertionError(
                f"the server exited with code {proc.returncode}:\n{proc.stdout.read() if proc.stdout else ''}"
            )
        time.sleep(0.1)
    raise AssertionError(f"the server at {url} was not healthy within {timeout_s:.0f} s")
