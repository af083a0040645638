"""The CPU-by-thread account (engine/profile.py) that the load bench and /metrics report: each role's
threads are the ones that burnt the CPU."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from metronome.engine.profile import ThreadCpu, cpu_seconds_by_thread
from metronome.kernels.ops import KernelBuildError, load_kernels


def _burn(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


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
    burnt, done = threading.Event(), threading.Event()

    def worker() -> None:
        _burn(0.3)
        burnt.set()
        done.wait(timeout=30)

    before = account.read(None)["other"]
    t = threading.Thread(target=worker)
    t.start()
    assert burnt.wait(timeout=30)
    alive = account.read(None)["other"]
    done.set()
    t.join(timeout=30)
    after = account.read(None)["other"]
    assert alive - before >= 0.2, (before, alive)
    assert after >= alive, (alive, after)
    assert cpu_seconds_by_thread(None)["other"] < alive - 0.2  # the one-shot read lost it: what this guards
