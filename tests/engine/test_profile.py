"""The CPU-by-thread account (engine/profile.py) that the load bench and /metrics report: each role's
threads are the ones that burnt the CPU."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
import torch

from metronome.engine.profile import ThreadCpu, cpu_seconds_by_thread
from metronome.kernels.ops import KernelBuildError, load_kernels


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


@contextlib.contextmanager
def _idle_after_burning(seconds: float) -> Iterator[None]:
    """Inside the block, a live thread (role "other") that burnt `seconds` of CPU and now waits; it ends after."""
    burnt, done = threading.Event(), threading.Event()

    def worker() -> None:
        _burn(seconds)
        burnt.set()
        done.wait(timeout=30)

    t = threading.Thread(target=worker)
    t.start()
    try:
        assert burnt.wait(timeout=30)
        yield
    finally:
        done.set()
        t.join(timeout=30)
        # join() returns once the thread's Python code is done; the OS thread, and its /proc entry, can
        # linger a moment more (a read then still saw it alive: 4 of 12 runs)
        task = Path(f"/proc/self/task/{t.native_id}")
        deadline = time.monotonic() + 10
        while task.exists() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert not task.exists(), f"thread {t.native_id} still in /proc 10 s after it ended"


def test_a_thread_is_charged_to_its_role() -> None:
    """A thread that burns 0.3 s of CPU, named as the engine's, shows it under "engine" (read while it is
    alive: an ended thread leaves /proc), and not under the others."""
    ids: list[int] = []
    burnt, done = threading.Event(), threading.Event()

    def worker() -> None:
        ids.append(threading.get_native_id())
        _burn(0.3)
        burnt.set()
        done.wait(timeout=30)

    before = cpu_seconds_by_thread(None)
    t = threading.Thread(target=worker)
    t.start()
    try:
        assert burnt.wait(timeout=30)
        named = cpu_seconds_by_thread(ids[0])
        unnamed = cpu_seconds_by_thread(None)
    finally:
        done.set()
        t.join(timeout=30)
    assert named["engine"] >= 0.2, named
    assert unnamed["engine"] == 0.0 and unnamed["other"] - before["other"] >= 0.2, unnamed


def test_the_kernel_pools_workers_are_charged_to_the_pool() -> None:
    try:
        cpp = load_kernels()
    except KernelBuildError as e:
        pytest.skip(str(e))
    before_threads = cpp.threads()
    cpp.set_threads(2)
    try:
        x = torch.randn(4096, 1024)
        w = torch.rand(1024) + 0.5
        before = cpu_seconds_by_thread(None)
        end = time.perf_counter() + 0.5
        while time.perf_counter() < end:
            cpp.rms_norm(x, w, 1e-5)
        after = cpu_seconds_by_thread(None)
    finally:
        cpp.set_threads(before_threads)
    assert after["kernel_pool"] - before["kernel_pool"] >= 0.05, (before, after)


def test_the_cpu_of_a_thread_that_ended_stays_counted() -> None:
    """/metrics exposes these as counters, and a server starts a thread per reflection: as each ended, its
    CPU left "other", which fell (Prometheus reads a fall as a reset). ThreadCpu keeps what it saw."""
    account = ThreadCpu()
    before = account.read(None)["other"]
    with _idle_after_burning(0.3):
        alive = account.read(None)["other"]
    after = account.read(None)["other"]
    once = cpu_seconds_by_thread(None)["other"]  # read right after: other threads' CPU is the same in both
    assert alive - before >= 0.2, (before, alive)
    assert after >= alive, (alive, after)
    assert after - once >= 0.2, (after, once)  # the one-shot read lost it: what this guards


def test_an_idle_threads_cpu_is_not_counted_again_at_each_read() -> None:
    """A live thread whose CPU did not move between two reads has not ended: counting it as ended added its
    seconds to its role's total at every scrape."""
    account = ThreadCpu()
    with _idle_after_burning(0.3):
        first = account.read(None)["other"]
        second = account.read(None)["other"]
        third = account.read(None)["other"]
    assert first >= 0.2 and third - first < 0.1, (first, second, third)


def test_step_profile_figures(monkeypatch) -> None:
    """Each lap charges the time since the last one; the table's ms/step divides by steps and µs/token by
    tokens; reset zeroes every count."""
    import metronome.engine.profile as profile_module
    from metronome.engine.profile import PhaseClock, StepProfile
    from metronome.engine.request import SpecStats

    now = iter([1.0, 3.0, 6.0])
    monkeypatch.setattr(profile_module, "time", type("T", (), {"perf_counter": staticmethod(lambda: next(now))}))
    p = StepProfile()
    clock = PhaseClock(p)  # 1.0
    clock.lap("plan")  # 3.0: 2 s of plan
    clock.lap("sample")  # 6.0: 3 s of sample
    assert p.seconds["plan"] == 2.0 and p.seconds["sample"] == 3.0 and p.busy_s == 5.0
    monkeypatch.undo()
    p.steps, p.tokens, p.decode_rows, p.prompt_rows = 4, 10, 8, 3
    plan_line = next(line for line in p.table().splitlines() if line.startswith("plan"))
    assert plan_line.split()[1:] == ["40.0%", "500.000", "200000.0"]
    p.reset()
    assert (p.steps, p.tokens, p.decode_rows, p.prompt_rows, p.busy_s) == (0, 0, 0, 0, 0.0)
    assert SpecStats(steps=2, drafted=8, accepted=6).acceptance == 0.75 and SpecStats().acceptance == 0.0
