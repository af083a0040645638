"""The load bench's own server process (bench/load.py's start_server): started, waited for with a bound, and
its stderr kept where it cannot stall it. A stand-in executable plays `python -m metronome.serve.cli`."""

from __future__ import annotations

import sys
import textwrap

import pytest

from metronome.bench import load as bench_load

# Ignores `-m metronome.serve.cli`, reads --port, writes `noise` bytes to stderr, then answers /health.
_FAKE_SERVER = """\
#!{python}
import http.server, sys
port = int(sys.argv[sys.argv.index("--port") + 1])
sys.stderr.write("x" * {noise})
sys.stderr.write({last!r})
sys.stderr.flush()
if {exit_code} is not None:
    sys.exit({exit_code})

class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass

http.server.HTTPServer(("127.0.0.1", port), Health).serve_forever()
"""


def _fake(tmp_path, monkeypatch, noise: int, last: str = "", exit_code: int | None = None) -> None:
    script = tmp_path / "fake-python"
    script.write_text(
        textwrap.dedent(_FAKE_SERVER).format(python=sys.executable, noise=noise, last=last, exit_code=exit_code)
    )
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(script))
    monkeypatch.setattr(bench_load, "_WAIT_S", 20.0)


def test_a_server_that_writes_more_than_a_pipe_holds_still_comes_up(tmp_path, monkeypatch):
    """Its stderr went to a pipe nobody read: past 64 KiB the server blocked in the write (here before it
    could answer /health; in a bench, mid-level) and the bench waited out its bound."""
    _fake(tmp_path, monkeypatch, noise=256 * 1024)
    proc, url = bench_load.start_server(None, [])
    try:
        assert url.startswith("http://127.0.0.1:") and proc.poll() is None
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_a_server_that_exits_at_start_is_reported_with_the_end_of_its_stderr(tmp_path, monkeypatch):
    _fake(tmp_path, monkeypatch, noise=10_000, last="no such model: nowhere.gguf", exit_code=3)
    with pytest.raises(RuntimeError, match=r"the server exited: x*no such model: nowhere\.gguf$") as caught:
        bench_load.start_server("nowhere.gguf", [])
    assert len(str(caught.value)) < 2100  # its last 2,000 characters, not the whole of it
