"""A tensor-parallel plan at run time: rank 0's `TPRunner` (a `Runner`) and every other rank's loop.

Rank 0 runs the scheduler, the server and the sampler; before each runner call it broadcasts the call
(the step's rows) to the other ranks, then all ranks run the same forward pass, meeting in the
collectives inside it (parallel/tp.py). The other ranks do nothing else: `follow` repeats the calls it is
sent until it is told to stop.

No wait is unbounded: every collective has the group's timeout. An idle server sends a heartbeat every
`HEARTBEAT_S` so that waiting ranks know rank 0 is alive (and do not time out between requests), and a
rank that dies makes the next collective fail on rank 0, which fails the step's requests.
"""

from __future__ import annotations

import atexit
import threading
import time
from dataclasses import dataclass
from typing import Protocol

import torch

from metronome.compile.runner import Runner, TorchRunner
from metronome.model.moe import use_dense_dispatch
from metronome.parallel.group import GlooGroup

HEARTBEAT_S = 2.0  # an idle rank 0 says it is alive this often (well inside the collective timeout)


@dataclass(frozen=True)
class Prefill:
    ids: list[int]
    slot: int
    all_logits: bool


@dataclass(frozen=True)
class Decode:
    slots: list[int]
    tokens: list[int]
    positions: list[int]
    logit_rows: list[int] | None


@dataclass(frozen=True)
class InstallKV:
    """A prompt's KV from the prefill worker, every rank's heads: each rank writes its own."""

    slot: int
    k: torch.Tensor
    v: torch.Tensor
    start: int


@dataclass(frozen=True)
class SetMode:
    decode_mode: str


@dataclass(frozen=True)
class Heartbeat:
    pass


@dataclass(frozen=True)
class Stop:
    pass


Call = Prefill | Decode | InstallKV | SetMode | Heartbeat | Stop


def run_call(runner: Runner, call: Call) -> torch.Tensor | None:
    """What every rank does with a call (rank 0 keeps the logits)."""
    with torch.inference_mode():
        if isinstance(call, Prefill):
            return runner.prefill(call.ids, call.slot, call.all_logits)
        if isinstance(call, Decode):
            return runner.decode(call.slots, call.tokens, call.positions, call.logit_rows)
        if isinstance(call, InstallKV):
            runner.install_kv(call.slot, call.k, call.v, call.start)
            return None
    if isinstance(call, SetMode):
        runner.decode_mode = call.decode_mode
        if call.decode_mode == "fixed" and isinstance(runner, TorchRunner):
            use_dense_dispatch(runner.model)  # experts at fixed shapes, as compile/stages.py does for one rank
    return None


def follow(group: GlooGroup, runner: Runner) -> int:
    """A rank other than 0: run every call rank 0 broadcasts, until Stop. Returns the calls run."""
    calls = 0
    while True:
        call = group.broadcast_object()
        if isinstance(call, Stop):
            return calls
        run_call(runner, call)
        calls += 1


class Ranks(Protocol):
    """The other ranks' processes (parallel/plan.py), which rank 0 can form into a group again."""

    def reform(self) -> None: ...

    def alive(self) -> bool: ...

    def stop(self) -> None: ...


class RankFailure(RuntimeError):
    """A rank died or timed out during a step; the step's requests fail, the group is formed again."""


class TPRunner:
    """Rank 0's runner: each call goes to every rank, then runs here (a `Runner`, runner.py).

    When a call fails (a rank died: gloo reports the broken connection at once; or a collective timed
    out), the step raises RankFailure, which the engine reports to that step's requests, and the group is
    formed again with new processes (by the heartbeat when idle, else before the next call)."""

    def __init__(self, local: Runner, group: GlooGroup, ranks: Ranks) -> None:
        self.local, self.group, self.ranks = local, group, ranks
        self.any_rows = local.any_rows  # the fused decoder's rows are independent on every rank too
        self.weight_bytes = local.weight_bytes  # one rank's share of the weights
        self.rebuilds = 0
        self._broken: Exception | None = None
        self._lock = threading.Lock()  # one call at a time on the group: the step, or the heartbeat
        self._last_call = time.monotonic()
        self._closed = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="metronome-tp-heartbeat", daemon=True)
        self._heartbeat.start()
        atexit.register(self.close)  # the other ranks end with this process (a torchrun job ends cleanly)

    def _call(self, call: Call) -> torch.Tensor | None:
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("the tensor-parallel group is closed")
            if self._broken is not None:
                self._reform()
            try:
                self.group.broadcast_object(call)
                out = run_call(self.local, call)
            except Exception as exc:
                self._broken = exc
                raise RankFailure(
                    f"a tensor-parallel rank failed ({type(exc).__name__}: {exc}); the group is being formed again"
                ) from exc
            self._last_call = time.monotonic()
            return out

    def _reform(self) -> None:
        """Form the group again (under the lock) and give the new ranks the plan's decode mode."""
        self.ranks.reform()
        self._broken = None
        self.rebuilds += 1
        self.group.broadcast_object(SetMode(self.local.decode_mode))

    def _beat(self) -> None:
        while not self._closed.wait(HEARTBEAT_S / 2):
            if time.monotonic() - self._last_call >= HEARTBEAT_S or self._broken is not None:
                try:
                    self._call(Heartbeat())
                except Exception:  # noted in self._broken; the next beat forms the group again
                    continue

    @property
    def decode_mode(self) -> str:
        return self.local.decode_mode

    @decode_mode.setter
    def decode_mode(self, mode: str) -> None:
        self._call(SetMode(mode))

    def prefill(self, ids: list[int], slot: int, all_logits: bool = False) -> torch.Tensor:
        return self._call(Prefill(list(ids), slot, all_logits))

    def decode(
        self, slots: list[int], tokens: list[int], positions: list[int], logit_rows: list[int] | None = None
    ) -> torch.Tensor:
        return self._call(Decode(list(slots), list(tokens), list(positions), logit_rows))

    def install_kv(self, slot: int, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> None:
        """Every rank's KV heads of a prompt run elsewhere (the disaggregated layout): each keeps its own."""
        self._call(InstallKV(slot, k, v, start))

    def close(self) -> None:
        """Tell the other ranks to stop (they return from `follow`) and leave the group."""
        if self._closed.is_set():
            return
        try:
            if self._broken is None and self.ranks.alive():  # a dead rank needs no Stop (and cannot take one)
                self._call(Stop())
        finally:
            self._closed.set()
            self.group.close()
            self.ranks.stop()
