"""Where a step's time goes: the engine stamps each phase of every step, and `StepProfile` sums them.

The phases follow the step (engine.py): schedule (slots, cancellations), draft (speculation's guesses),
plan (the compiled model: every row of the step in one call), sample (penalties, masks, the token, logprobs),
emit (stop checks, detokenization, handing events to their callbacks). Whatever the engine thread does
outside a step (waiting for work, the GIL held by other threads) is not a phase: `wall_s` minus the phases'
sum shows it. The serving layer adds its own share (HTTP, SSE) by comparing its clients' clock with these.

Stamping costs two perf_counter calls per phase per step (well under 1 µs each), so it is always on.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

PHASES = ("schedule", "draft", "plan", "sample", "emit")


@dataclass
class StepProfile:
    """Running sums since the engine started (or since `reset`): seconds per phase, steps, rows, tokens."""

    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))
    steps: int = 0
    decode_rows: int = 0  # rows of requests past their prompt (drafts included)
    prompt_rows: int = 0  # prompt tokens run as rows
    tokens: int = 0  # tokens sampled and emitted
    started: float = field(default_factory=time.perf_counter)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, phase: str, seconds: float) -> None:
        self.seconds[phase] += seconds  # only the stepping thread writes; readers take a snapshot

    def snapshot(self) -> "StepProfile":
        with self._lock:
            return StepProfile(
                dict(self.seconds), self.steps, self.decode_rows, self.prompt_rows, self.tokens, self.started
            )

    def reset(self) -> None:
        with self._lock:
            self.seconds = dict.fromkeys(PHASES, 0.0)
            self.steps = self.decode_rows = self.prompt_rows = self.tokens = 0
            self.started = time.perf_counter()

    @property
    def wall_s(self) -> float:
        return time.perf_counter() - self.started

    @property
    def busy_s(self) -> float:
        return sum(self.seconds.values())

    def table(self) -> str:
        """A plain-text breakdown: each phase's share of the busy time and its cost per step and per token."""
        busy = self.busy_s or 1e-12
        lines = [f"{'phase':<10} {'share':>7} {'ms/step':>9} {'µs/token':>9}"]
        for phase in PHASES:
            s = self.seconds[phase]
            lines.append(
                f"{phase:<10} {100 * s / busy:6.1f}% {1000 * s / max(1, self.steps):9.3f} "
                f"{1e6 * s / max(1, self.tokens):9.1f}"
            )
        lines.append(
            f"{self.steps} steps, {self.tokens} tokens, {self.decode_rows} decode rows, "
            f"{self.prompt_rows} prompt rows; busy {busy:.2f} s of {self.wall_s:.2f} s on the engine thread"
        )
        return "\n".join(lines)


class PhaseClock:
    """Stamps consecutive phases of one step: `lap("plan")` charges the time since the last lap to "plan"."""

    __slots__ = ("profile", "last")

    def __init__(self, profile: StepProfile) -> None:
        self.profile = profile
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        now = time.perf_counter()
        self.profile.add(phase, now - self.last)
        self.last = now


# -- CPU time by thread ------------------------------------------------------------------------------
# A step's phases say where the engine thread's wall time goes; a served step also competes for the cores
# with the HTTP loop, the kernels' pool and whatever else runs. These read the kernel's own per-thread CPU
# account (Linux /proc), so the split costs nothing until it is read.

THREAD_ROLES = ("engine", "kernel_pool", "main", "other")
_POOL_THREAD_NAME = "metronome-pool"  # what csrc/pool.cpp names its workers


def cpu_seconds_by_thread(engine_thread: int | None, pid: int | None = None) -> dict[str, float]:
    """CPU seconds (user + system) used so far by each role's live threads of process `pid` (this one by
    default): the engine's stepping thread, the kernels' pool workers, the main thread (a server's event
    loop), and any other. Empty where /proc is not there. A thread that ends leaves the sum (ThreadCpu
    keeps it)."""
    live = _live_threads(engine_thread, pid)
    if live is None:
        return {}
    totals = dict.fromkeys(THREAD_ROLES, 0.0)
    for role, seconds in live.values():
        totals[role] += seconds
    return totals


class ThreadCpu:
    """cpu_seconds_by_thread as counters that never go down: the CPU of a thread that has ended since the
    last read stays in its role's total (a thread per reflection, or per speech request, made /metrics'
    "other" fall as each one ended, which Prometheus reads as a reset). What such a thread used between
    the last read and its end is not seen. Reads may come from several threads (scrapes)."""

    def __init__(self, pid: int | None = None) -> None:
        self._pid = pid
        self._lock = threading.Lock()
        self._last: dict[int, tuple[str, float]] = {}  # the live threads at the last read: tid -> role, seconds
        self._ended = dict.fromkeys(THREAD_ROLES, 0.0)

    def read(self, engine_thread: int | None) -> dict[str, float]:
        with self._lock:
            live = _live_threads(engine_thread, self._pid)
            if live is None:
                return {}
            for tid, (role, seconds) in self._last.items():
                now = live.get(tid)
                # gone, or its id taken by a new thread (less CPU than it had, or another role)
                if now is None or now[0] != role or now[1] < seconds:
                    self._ended[role] += seconds
            self._last = live
            totals = dict(self._ended)
            for role, seconds in live.values():
                totals[role] += seconds
            return totals


def _live_threads(engine_thread: int | None, pid: int | None) -> dict[int, tuple[str, float]] | None:
    """Each live thread of `pid` as (role, CPU seconds), by thread id; None where /proc is not there."""
    import os

    pid = os.getpid() if pid is None else pid
    tick = os.sysconf("SC_CLK_TCK")
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return None
    live: dict[int, tuple[str, float]] = {}
    for tid in map(int, tasks):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                stat = f.read()
        except OSError:  # the thread ended between the listing and the read
            continue
        name = stat[stat.index("(") + 1 : stat.rindex(")")]
        fields = stat[stat.rindex(")") + 2 :].split()
        seconds = (int(fields[11]) + int(fields[12])) / tick  # utime, stime (fields 14 and 15 of stat)
        if engine_thread is not None and tid == engine_thread:
            role = "engine"
        elif name == _POOL_THREAD_NAME:
            role = "kernel_pool"
        elif tid == pid:
            role = "main"
        else:
            role = "other"
        live[tid] = (role, seconds)
    return live
