"""The command line, run as a user runs it: a subprocess, output piped (so no progress display)."""

from __future__ import annotations

import subprocess
import sys


def _metronome(*args: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "metronome.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=timeout)


def test_generate_streams_text_and_reports_speed(tiny_hf):
    out = _metronome("generate", "hello world", "--model", str(tiny_hf("llama")), "--max-tokens", "6", "--raw",
                     "--weights", "f32")
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.split()) >= 1
    assert "6 tokens" in out.stderr and "tokens/s" in out.stderr and "TTFT" in out.stderr
    assert "loading" not in out.stderr  # piped: quiet


def test_generate_is_reproducible_with_a_seed(tiny_hf):
    args = ("generate", "the cat", "--model", str(tiny_hf("qwen3")), "--max-tokens", "8", "--temperature", "1.0",
            "--seed", "5", "--raw", "--weights", "f32")
    assert _metronome(*args).stdout == _metronome(*args).stdout


def test_chat_keeps_the_conversation(tiny_hf):
    out = _metronome("chat", "--model", str(tiny_hf("llama")), "--max-tokens", "4", "--weights", "f32",
                     stdin="hello\nthe cat\n/exit\n")
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("tokens/s") == 2


def test_info_describes_the_default_model():
    out = _metronome("info")
    assert out.returncode == 0, out.stderr
    for expected in ("llama", "Q4_1", "49152", "8192", "30", "chat template"):
        assert expected in out.stdout


def test_compile_prints_the_plan(tiny_hf):
    out = _metronome("compile", str(tiny_hf("gemma3")), "--slots", "2", "--ctx", "64", "--weights", "f32")
    assert out.returncode == 0, out.stderr
    assert "decode shape" in out.stdout and "memory bound" in out.stdout and "KV cache" in out.stdout
    assert len([line for line in out.stdout.splitlines() if line.strip()[:1].isdigit()]) == 2  # one row per occupancy


def test_errors_are_one_line_for_people(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_text("not a model")
    out = _metronome("generate", "hi", "--model", str(bad))
    assert out.returncode == 2 and "not a GGUF file" in out.stderr and "Traceback" not in out.stderr
    out = _metronome("generate", "hi", "--ctx", "99999")
    assert out.returncode == 2 and "ctx=99999" in out.stderr and "Traceback" not in out.stderr
