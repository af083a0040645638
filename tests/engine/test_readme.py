"""The README's Python API example runs as written (it once called a method that did not exist)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_the_readme_python_example_runs(smollm_path, capsys):  # smollm_path: the default model it loads
    text = README.read_text()
    block = re.search(r"### Python API\s+```python\n(.*?)```", text, re.S)
    assert block is not None, "README.md has no Python API example under '### Python API'"
    code = block.group(1).replace("ctx=2048", "ctx=512")  # the same calls, a smaller cache to compile
    namespace: dict = {}
    exec(compile(code, "README.md (Python API)", "exec"), namespace)
    out = capsys.readouterr().out
    assert "TTFT" in out and len(namespace["many"]) == 2 and namespace["done"].finish_reason in ("stop", "length")
    namespace["engine"].stop()
