"""metronome.bench.fuzz without schemathesis: the command line it builds and how it reads schemathesis's
answer (its summary line, its exit status and the interactions it recorded), against a stand-in for the
subprocess, so that these run in a second where the live fuzz (tests/serve/test_fuzz.py) takes minutes."""

from __future__ import annotations

import subprocess
from collections import Counter
from pathlib import Path

import pytest

from metronome.bench import fuzz
from metronome.bench.fuzz import FuzzResult, run_fuzz

# a recorded interaction as schemathesis's vcr report writes it (codes quoted), and one unquoted
VCR = "- response:\n    status:\n      code: '200'\n- response:\n    status:\n      code: '400'\n"
VCR += "- response:\n    status:\n      code: 422\n"


def _fake_schemathesis(monkeypatch, returncode: int = 0, stdout: str = "", stderr: str = "", vcr: str = VCR):
    calls = []

    def fake_run(argv, **kwargs):
        calls.append((argv, kwargs))
        (Path(kwargs["cwd"]) / "vcr-now.yaml").write_text(vcr)
        return subprocess.CompletedProcess(argv, returncode, stdout, stderr)

    monkeypatch.setattr(fuzz, "require_schemathesis", lambda: None)
    monkeypatch.setattr(fuzz.subprocess, "run", fake_run)
    return calls


def test_the_command_line_carries_every_option(tmp_path, monkeypatch):
    """The cases per endpoint, the request timeout (also the slowest answer allowed), one worker, the seed
    and the checks reach schemathesis; the run itself is bounded and runs in the report folder."""
    calls = _fake_schemathesis(monkeypatch, stdout="== 7 generated, 7 passed ==")
    run_fuzz("http://127.0.0.1:1", max_examples=7, report_dir=tmp_path / "out", request_timeout_s=5.0, seed=11)
    ((argv, kwargs),) = calls

    def after(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert argv[argv.index("run") + 1] == "http://127.0.0.1:1/openapi.json"
    assert (after("--max-examples"), after("--request-timeout"), after("--max-response-time")) == ("7", "5.0", "5.0")
    assert (after("--workers"), after("--seed"), after("--exclude-checks")) == ("1", "11", "positive_data_acceptance")
    assert after("--report-dir") == str((tmp_path / "out").resolve())
    assert kwargs["cwd"] == tmp_path / "out" and (kwargs.get("timeout") or 0) > 0


def test_the_answer_is_read_from_the_summary_and_this_runs_reports(tmp_path, monkeypatch):
    """The case count comes from schemathesis's summary wherever it printed it (stderr here), in its "found"
    form too; statuses come from the reports, quoted or not."""
    _fake_schemathesis(monkeypatch, returncode=1, stderr="== 1200 generated, 3 found ==")
    result = run_fuzz("http://127.0.0.1:1", 5, tmp_path)
    assert result.cases == 1200 and result.statuses == Counter({"200": 1, "400": 1, "422": 1})
    assert result.returncode == 1 and not result.passed  # schemathesis's failed checks fail the run
    assert "fuzz: 1200 cases, answers by status 200: 1, 400: 1, 422: 1; 0 server errors\nFAIL" in result.summary()


def test_a_missing_schemathesis_executable_is_a_runtime_error(tmp_path, monkeypatch):
    def missing(argv, **kwargs):
        raise FileNotFoundError(argv[0])

    monkeypatch.setattr(fuzz, "require_schemathesis", lambda: None)
    monkeypatch.setattr(fuzz.subprocess, "run", missing)
    with pytest.raises(RuntimeError, match="cannot run schemathesis"):
        run_fuzz("http://127.0.0.1:1", 5, tmp_path)


@pytest.mark.parametrize(
    "result, passed, errors",
    [
        (FuzzResult(10, Counter({"200": 10}), 0, ""), True, 0),
        (FuzzResult(10, Counter({"200": 9}), 1, ""), False, 0),  # a check failed without a 5xx
        (FuzzResult(0, Counter(), 0, ""), False, 0),  # nothing sent is no pass
        (FuzzResult(10, Counter({"200": 9, "500": 1}), 0, ""), False, 1),  # exactly 500 is a server error
        (FuzzResult(10, Counter({"200": 8, "503": 2}), 0, ""), False, 2),
    ],
)
def test_the_verdict_needs_cases_a_clean_exit_and_no_server_error(result, passed, errors):
    """PASS only with at least one case, schemathesis's exit 0 and no 5xx answer (500 included); the
    summary counts the 5xx answers and its verdict is the same."""
    assert result.passed is passed
    summary = result.summary()
    assert f"; {errors} server errors\n" in summary and summary.endswith("PASS") is passed
