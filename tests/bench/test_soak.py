"""`metronome bench --soak`: a short soak on a tiny model passes (nothing lost or hung, memory flat, /metrics add
up), and the soak does fail a server that loses requests or miscounts them."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from helpers.live_server import LiveServer

from metronome.bench.soak import SoakConfig, parse_duration, rss_of, soak
from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.model.loader import load
from metronome.serve.server import ModelIdentity, ServerSettings, create_app

SHORT = dict(min_prompt_tokens=5, max_prompt_tokens=60, max_output_tokens=8, cancel_within_s=0.5, seed=1)


@pytest.fixture
def tiny_server(tiny_hf):
    loaded = load(tiny_hf("llama"))
    engine = Engine.from_model(config=EngineConfig(slots=4, ctx=128), loaded=loaded)
    app = create_app(engine, ServerSettings(), ModelIdentity.of(loaded))
    try:
        with LiveServer(app) as url:
            yield url, engine
    finally:
        engine.stop()


def test_durations_parse():
    assert [parse_duration(t) for t in ("90", "45s", "10m", "1.5h")] == [90.0, 45.0, 600.0, 5400.0]
    for bad in ("", "10x", "-5s", "0"):
        with pytest.raises(ValueError, match="--soak"):
            parse_duration(bad)


def test_a_short_soak_passes(tiny_server):
    """30 s, 2 x slots users, streamed and whole, dropped streams and cancellations (the server runs in this
    process, so its memory is this process's)."""
    url, _ = tiny_server
    config = SoakConfig(duration_s=30, users=8, **SHORT)
    result = asyncio.run(soak(url, config, rss_of(os.getpid())))
    print(result.summary())
    assert result.passed, result.summary()
    t = result.tally
    assert t.outcomes["completed"] > 50 and t.kinds["disconnect"] > 0 and t.kinds["cancel"] > 0
    assert t.kinds["streamed"] and t.kinds["whole"] and t.kinds["chat"] and t.kinds["completions"]


def test_the_soak_fails_a_server_that_loses_requests(tiny_server):
    """A server that never tells some requests how they ended (their events are dropped): their clients
    time out ("hung") and /metrics keep them in flight, so the soak fails."""
    url, engine = tiny_server
    real_submit = engine.submit
    dropped = []

    def submit(prompt_ids, params, on_event=None, *args, **kwargs):
        if len(dropped) < 3:
            dropped.append(prompt_ids)
            return real_submit(prompt_ids, params, lambda _delta: None, *args, **kwargs)
        return real_submit(prompt_ids, params, on_event, *args, **kwargs)

    engine.submit = submit
    config = SoakConfig(duration_s=8, users=4, request_timeout_s=4, settle_s=2, **SHORT)
    result = asyncio.run(soak(url, config))
    assert len(dropped) == 3 and not result.passed
    assert result.tally.outcomes["hung"] + result.tally.outcomes["cancelled"] >= 3  # the cancel wait may come first
    assert any(not c.ok and "add up" in c.name for c in result.checks), result.summary()


@pytest.mark.slow
def test_the_soak_command_on_the_default_model(tmp_path):
    """`metronome bench --soak 40s`: starts `metronome serve` (SmolLM2, its defaults), prints the summary,
    exits 0 on a pass."""
    out = subprocess.run(
        [sys.executable, "-m", "metronome.bench", "--soak", "40s", "--out", str(tmp_path), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "PASS" in out.stdout and "/metrics requests add up" in out.stdout


def test_soak_on_an_unreachable_url_is_a_clean_error(tmp_path):
    """--soak --url at a port nothing listens on: exit 2 naming the URL, not an httpx traceback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed on leaving: nothing listens there
    out = subprocess.run(
        [sys.executable, "-m", "metronome.bench", "--soak", "5s", "--url", f"http://127.0.0.1:{port}"]
        + ["--out", str(tmp_path), "--no-progress"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "cannot reach" in out.stderr and "Traceback" not in out.stderr, out.stderr[-2000:]


def test_sigterm_stops_the_server_the_bench_started(tiny_hf, tmp_path):
    """`timeout` (SIGTERM) on a bench that started its own server: SIGTERM's default ended the bench at once
    and left the server (in a session of its own) running, orphaned. Now it stops it, as Ctrl-C does."""
    import re
    import signal
    import socket
    import time

    argv = [sys.executable, "-m", "metronome.bench", "--soak", "5m", "--model", str(tiny_hf("llama"))]
    from metronome.bench.peers import _metronome_command

    # rich wrapped the "starting:" line at the width (80 when piped), and CI's longer checkout path put "--port"
    # at the end of a line and its number on the next (CI failed on it). COLUMNS ending the line right after
    # "--port" wraps it so on any path: the console must not wrap.
    columns = len(f"starting: {' '.join(_metronome_command())} serve --host 127.0.0.1 --port")
    bench = subprocess.Popen(
        [*argv, "--out", str(tmp_path), "--no-progress"],
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        env={**os.environ, "COLUMNS": str(columns)},
    )
    try:
        port = None
        deadline = time.monotonic() + 120
        for line in bench.stderr:  # "starting: ... --port N ..." then "soak: ..." once the server answers
            port = port or (int(m.group(1)) if (m := re.search(r"--port (\d+)", line)) else None)
            if line.startswith("soak:") or time.monotonic() > deadline:
                break
        assert port is not None
        time.sleep(1.0)  # a few requests in flight
        bench.send_signal(signal.SIGTERM)
        assert bench.wait(timeout=60) == 130
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                break  # nothing listens: the server is gone
        time.sleep(0.2)
    else:
        pytest.fail(f"the bench's server still listens on {port} after the bench ended")
