"""The kernels' own thread pool (csrc/pool.h): resizing it right before a job never hangs, a pool with more
threads than cores still finishes every job, an idle pool sleeps, and its size never changes results.

The hang checks run in a child process with a timeout, so that a pool that hangs fails the test instead
of hanging the suite."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from helpers.threads import workers_cpus

from metronome.kernels.ops import CppOps, KernelBuildError, load_kernels

CORES = len(os.sched_getaffinity(0))
OVERSUBSCRIBED = (CORES + 1, CORES + 2)  # more threads than this process may run at once
CHILD_TIMEOUT_S = 180  # the child imports torch and loads the built kernels; the rounds take seconds


@pytest.fixture(scope="module")
def cpp() -> CppOps:
    try:
        return load_kernels()
    except KernelBuildError as e:
        if "AVX-512" in str(e):  # another CPU kind: the kernels need x86-64 with AVX-512 or AVX2
            pytest.skip(str(e))
        raise


@pytest.fixture
def pool_size(cpp: CppOps):
    """Restores the pool's size and placement after the test (the pool is shared by the whole process)."""
    before, placed = cpp.threads(), cpp.thread_cpus()
    yield
    if placed:
        cpp.place_threads(placed)
    else:
        cpp.set_threads(before)


@pytest.mark.skipif(CORES < 2, reason="placing two threads needs two CPUs")
def test_placed_workers_run_each_on_its_own_cpu_and_a_resize_frees_them(cpp: CppOps, pool_size) -> None:
    """place_threads pins worker i to cpus[i] (cpus[0] is the submitter's, left to it); set_threads then
    restarts the workers free to run anywhere. The bits do not depend on where threads run."""
    allowed = sorted(os.sched_getaffinity(0))
    x = torch.randn(512, 576, generator=torch.Generator().manual_seed(0))
    w = torch.rand(576, generator=torch.Generator().manual_seed(1)) + 0.5
    cpp.set_threads(1)
    ref = cpp.rms_norm(x, w, 1e-5)
    placement = (allowed[-1], allowed[0])  # the reverse of the default's order: worker 1 on the first CPU
    cpp.place_threads(placement)
    assert torch.equal(cpp.rms_norm(x, w, 1e-5), ref)  # every worker checks in for a job: it has started
    assert cpp.threads() == 2 and cpp.thread_cpus() == placement
    assert workers_cpus() == [{allowed[0]}]
    assert os.sched_getaffinity(0) == set(allowed), "the submitting thread was pinned too"
    cpp.set_threads(2)
    assert torch.equal(cpp.rms_norm(x, w, 1e-5), ref)
    assert cpp.thread_cpus() == () and workers_cpus() == [set(allowed)]


def test_a_placement_names_cpus_this_process_may_use_once_each(cpp: CppOps, pool_size) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    outside = max(allowed) + 1
    with pytest.raises(RuntimeError, match=f"CPU {outside} is not one this thread may run on"):
        cpp.place_threads((allowed[0], outside))
    with pytest.raises(RuntimeError, match=f"CPU {allowed[0]} named twice"):
        cpp.place_threads((allowed[0], allowed[0]))
    with pytest.raises(RuntimeError, match="at least one CPU"):
        cpp.place_threads(())


# rms_norm of 512 x 576 splits into ~10 chunks (grain: 2^15 elements), so every pool size runs every worker.
CHILD = """
import torch
from metronome.kernels.ops import load_kernels

k = load_kernels()
x = torch.randn(512, 576, generator=torch.Generator().manual_seed(0))
w = torch.rand(576, generator=torch.Generator().manual_seed(1)) + 0.5
k.set_threads(1)
ref = k.rms_norm(x, w, 1e-5)
for r in range({rounds}):
    for n in {sizes}:
        k.set_threads(1)
        k.set_threads(n)  # fresh workers; the job below is posted before they may have started
        out = k.rms_norm(x, w, 1e-5)
        assert torch.equal(out, ref), f"round {{r}}, {{n}} threads: other results"
        for m in (n, 1, n + 1, n):  # resizes in a row, no job: workers stopped before they ever ran
            k.set_threads(m)
            assert k.threads() == m, f"set {{m}} threads, the pool has {{k.threads()}}"
print("done", flush=True)
"""


def run_child(rounds: int, sizes: tuple[int, ...]) -> None:
    code = textwrap.dedent(CHILD.format(rounds=rounds, sizes=sizes))
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(
            f"the pool hung: {rounds} rounds of resize-then-run at {sizes} threads took over {CHILD_TIMEOUT_S} s"
        )
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-3000:]


def test_resize_then_run_never_hangs(cpp: CppOps) -> None:
    """A worker started by a resize must see the job posted right after it, and a stop right after it,
    even when its thread first runs after either (the old pool hung here within a round or two)."""
    run_child(rounds=40, sizes=(2, *OVERSUBSCRIBED))


def test_an_idle_pool_sleeps(cpp: CppOps, pool_size) -> None:
    """After a job, the workers spin for microseconds at most, then sleep: between jobs 50 ms apart the
    process burns (almost) only the jobs' own CPU. CPU time, not wall-clock: a busy machine cannot make a
    sleeping pool look busy, and a spinning worker burns CPU whenever it runs."""
    x = torch.randn(512, 576)
    w = torch.ones(576)
    cpp.set_threads(1)
    start = time.process_time()
    for _ in range(10):
        cpp.rms_norm(x, w, 1e-5)
    alone = time.process_time() - start  # the jobs' own CPU
    for n in (CORES, *OVERSUBSCRIBED):
        cpp.set_threads(n)
        time.sleep(0.05)  # the fresh workers start (the start-up race has a test of its own)
        start = time.process_time()
        for _ in range(10):
            cpp.rms_norm(x, w, 1e-5)
            time.sleep(0.05)
        burned = time.process_time() - start - alone
        # a pool that spins ~20 ms per worker after each job burns 200 ms x workers here; the 50 us spin
        # and the wake-ups cost a few ms
        assert burned < 0.05, f"{n} threads burned {burned * 1000:.0f} ms of CPU between 10 jobs in 0.5 s"


@pytest.mark.parametrize("threads", (2, 3))
def test_the_others_take_over_a_held_threads_share(cpp: CppOps, pool_size, threads: int) -> None:
    """A thread held up inside a job (preempted by the server's event loop, say) holds up one small chunk,
    not its whole share: the other threads take every other chunk while it waits. With one fixed share per
    thread (the pool before), the held chunk is half the job at 2 threads."""
    cpp.set_threads(threads)
    items = 64
    held, others, timed_out = cpp.hold_first_chunk(items, grain=1, timeout_ms=5000)
    assert not timed_out, f"the held chunk of {held} items waited 5 s for the others ({others} done)"
    assert held + others == items
    assert held <= items // (2 * threads), f"the held chunk has {held} of {items} items at {threads} threads"


@pytest.mark.parametrize("threads", (2, 3))
def test_a_chunk_that_throws_fails_its_job_only(cpp: CppOps, pool_size, threads: int) -> None:
    """An exception inside a chunk, on whichever thread ran it, reaches the job's caller once every other
    chunk has run; the next job starts clean (the error is not thrown again). No kernel throws inside a chunk
    today; one that did and was swallowed would leave its rows unwritten and report success."""
    cpp.set_threads(threads)
    items = 64
    for at in (0, 1, 17, 40, 63):  # the job's first, middle and last chunks, taken in turn by every thread
        rethrown, thrower, others = cpp.throw_in_chunk(items, grain=1, at=at)
        assert rethrown, f"the chunk holding item {at} threw and the job returned as if it had not"
        assert 0 < thrower <= items // threads and others == items - thrower, (at, thrower, others)
        assert cpp.throw_in_chunk(items, grain=1, at=-1) == (False, 0, items), "a clean job rethrew the last error"
    x = torch.randn(512, 576, generator=torch.Generator().manual_seed(0))
    w = torch.rand(576, generator=torch.Generator().manual_seed(1)) + 0.5
    out = cpp.rms_norm(x, w, 1e-5)  # and the pool still runs real work, with the same bits as one thread
    cpp.set_threads(1)
    assert torch.equal(out, cpp.rms_norm(x, w, 1e-5))


# SIGALRM every 100 us: each one that lands while the caller sleeps on its futex ends that sleep early (EINTR)
SIGNALLED = """
import signal
import torch
from metronome.kernels.ops import load_kernels

k = load_kernels()
x = torch.randn(64, 1 << 16, generator=torch.Generator().manual_seed(0))  # 8 to 16 chunks of 1 MiB rows
w = torch.rand(1 << 16, generator=torch.Generator().manual_seed(1)) + 0.5
k.set_threads(1)
ref = k.rms_norm(x, w, 1e-5)
signal.signal(signal.SIGALRM, lambda *_: None)
signal.setitimer(signal.ITIMER_REAL, 0.0001, 0.0001)
for n in {sizes}:
    k.set_threads(n)
    for i in range({rounds}):
        out = k.rms_norm(x, w, 1e-5)
        assert torch.equal(out, ref), f"{{n}} threads, job {{i}}: other results"
signal.setitimer(signal.ITIMER_REAL, 0, 0)
print("done", flush=True)
"""


def test_a_signal_never_ends_the_callers_wait_before_the_workers_are_done() -> None:
    """The caller's sleep (and a worker's) can end early: a signal (EINTR), a spurious wake-up, the 100 ms
    timeout. After each it must look again and sleep on until every worker has checked in; returning at the
    first wake-up would hand back an output a worker is still writing (and start the next job under it)."""
    code = textwrap.dedent(SIGNALLED.format(sizes=(2, *OVERSUBSCRIBED), rounds=60))
    try:
        out = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"jobs under a stream of signals took over {CHILD_TIMEOUT_S} s")
    assert out.returncode == 0 and "done" in out.stdout, (out.returncode, out.stderr[-3000:])
