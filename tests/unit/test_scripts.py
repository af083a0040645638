"""The measurement scripts people are told to run (tools/, examples/): each answers --help, and the
perplexity windows open with one BOS."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted((ROOT / "tools").glob("*.py")) + sorted((ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_script_answers_help(script: Path) -> None:
    """resident_memory.py took --help for a model's name and stream_probe.py for a port: tracebacks."""
    out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "usage:" in out.stdout, out.stderr[-2000:]


def test_perplexity_windows_open_with_one_bos() -> None:
    """The tokenizer adds BOS for such models (Gemma): the first window had it twice, and its perplexity
    was 3.5 % higher."""
    spec = importlib.util.spec_from_file_location("perplexity_tool", ROOT / "tools" / "perplexity.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    ids = [2, *range(10, 30)]  # as encoded: BOS (2) first
    wins = tool.windows(ids, 8, 2, bos=2)
    assert wins == [[2, *range(10, 17)], [2, *range(17, 24)]]
    assert tool.windows(list(range(10, 30)), 8, 1, bos=None) == [list(range(10, 18))]
