"""`metronome bench --fuzz CASES`: the HTTP API fuzzed from its own OpenAPI schema (GET /openapi.json) by
schemathesis (a test extra: `pip install schemathesis==4.32.5`): valid and invalid bodies, parameters and methods on every endpoint,
up to CASES generated cases per endpoint.

Checked on every answer: no server error (5xx), no hang (a per-request timeout), the status, media type,
headers and body match the schema (every 4xx and 5xx body is OpenAI's {"error": {"message", "type",
"param", "code"}}), invalid data is refused, an undeclared method gets 405 with Allow. Not checked:
that every schema-valid body is accepted: the schema cannot know the model's vocabulary or what fits the
context, which the server refuses with a 400. A chat body without max_tokens generates to the end of
the context: serve the target with a small --ctx (the bench starts its own server with --ctx 256) so that
every answer comes within the request timeout.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

CHECKS = ("--checks", "all", "--exclude-checks", "positive_data_acceptance")
_CASES = re.compile(r"(\d+) generated, (?:(\d+) passed|(\d+) found)")
_STATUS = re.compile(r"status:\s*\n\s*code: '?(\d+)")


@dataclass(frozen=True)
class FuzzResult:
    cases: int  # generated and sent
    statuses: Counter  # answers by HTTP status (from the recorded interactions)
    returncode: int  # schemathesis's: 0 when every check passed
    output: str

    @property
    def passed(self) -> bool:
        return self.returncode == 0 and self.cases > 0 and not any(int(s) >= 500 for s in self.statuses)

    def summary(self) -> str:
        codes = ", ".join(f"{code}: {n}" for code, n in sorted(self.statuses.items()))
        server_errors = sum(n for code, n in self.statuses.items() if int(code) >= 500)
        verdict = "PASS" if self.passed else "FAIL (schemathesis's report above names each failure)"
        return f"fuzz: {self.cases} cases, answers by status {codes}; {server_errors} server errors\n{verdict}"


SCHEMATHESIS = "schemathesis==4.32.5"  # the test extra's pin (pyproject.toml)


def require_schemathesis() -> None:
    """Refuse before a server starts: the fuzzer's own "No module named 'schemathesis'" was read as 0 cases,
    a FAIL, and the check meant to catch it looked for the name without Python's quotes."""
    if importlib.util.find_spec("schemathesis") is None:
        raise RuntimeError(f"the fuzzer needs schemathesis in this Python: pip install '{SCHEMATHESIS}'")


def run_fuzz(
    url: str, max_examples: int, report_dir: Path, request_timeout_s: float = 120.0, seed: int = 0
) -> FuzzResult:
    """schemathesis against `url` (http://host:port of a running server); raises RuntimeError if schemathesis
    is not installed."""
    require_schemathesis()
    report_dir.mkdir(parents=True, exist_ok=True)
    # an --out folder used before holds earlier runs' reports: only this run's are counted (an old run's 500
    # failed a clean one)
    earlier = {p: p.stat().st_mtime_ns for p in report_dir.glob("vcr-*.yaml")}
    argv = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{url}/openapi.json",
        *CHECKS,
        "--max-examples",
        str(max_examples),
        "--phases",
        "examples,coverage,fuzzing",
        "--request-timeout",
        str(request_timeout_s),
        "--max-response-time",
        str(request_timeout_s),
        # One worker: with two, schemathesis's threads generate cases at once and hypothesis describes
        # lambdas with ast.parse in both; a run here failed once with "SystemError: AST constructor
        # recursion depth mismatch" inside the fuzzer (not the server), the error python/cpython#106905
        # reports from threaded programs on CPython 3.11.
        "--workers",
        "1",
        "--seed",
        str(seed),
        "--generation-database",
        "none",
        "--report",
        "vcr",
        "--report-dir",
        str(report_dir.resolve()),
    ]
    try:
        # in the report folder: schemathesis keeps its crash cache in ./.schemathesis
        done = subprocess.run(argv, capture_output=True, text=True, check=False, timeout=3600, cwd=report_dir)
    except FileNotFoundError as exc:
        raise RuntimeError(f"cannot run schemathesis ({exc})") from exc
    output = done.stdout + done.stderr
    match = _CASES.search(output)
    statuses: Counter = Counter()
    for report in report_dir.glob("vcr-*.yaml"):
        if earlier.get(report) == report.stat().st_mtime_ns:
            continue
        statuses.update(_STATUS.findall(report.read_text(encoding="utf-8", errors="replace")))
    return FuzzResult(int(match.group(1)) if match else 0, statuses, done.returncode, output)
