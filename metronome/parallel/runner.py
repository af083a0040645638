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
from typing import Any, Protocol, Sequence

import torch

from metronome.compile.pages import Move, PagePool
from metronome.compile.runner import Runner, TorchRunner
from metronome.model.moe import use_dense_dispatch
from metronome.parallel.group import GlooGroup

_STALE = object()  # a call asked for at a failure count that has passed (TPRunner._call)
HEARTBEAT_S = 2.0  # an idle rank 0 says it is alive this often (well inside the collective timeout)


@dataclass(frozen=True)
class Prefill:
    ids: list[int]
    slot: int
    all_logits: bool
    hidden: bool = False  # the last layer's output instead of logits (Runner.prefill_hidden)


@dataclass(frozen=True)
class Head:
    """Logits of rows of the last layer's output: every rank computes its vocabulary chunks of them."""

    x: torch.Tensor


@dataclass(frozen=True)
class Decode:
    slots: list[int]
    tokens: list[int]
    positions: list[int]
    logit_rows: list[int] | None


@dataclass(frozen=True)
class InstallKV:
    """A prompt's KV from the prefill worker into `slot` from `start`: the call says what comes, and each
    rank then receives only its own heads, `shape` (layers, heads, T, head dim), straight from rank 0
    (a scatter: no pickling, and 1/tp of the bytes a broadcast would carry to every rank)."""

    slot: int
    start: int
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass(frozen=True)
class ReadKV:
    """A slot's first n positions of KV, every rank's heads gathered on rank 0 (for the prefill worker)."""

    slot: int
    n: int


@dataclass(frozen=True)
class CopyPages:
    """Prefix cache pages to or from a slot (compile/pages.py): each rank copies its own heads."""

    slot: int
    moves: list[Move]
    into_pool: bool


@dataclass(frozen=True)
class SetMode:
    decode_mode: str


@dataclass(frozen=True)
class Heartbeat:
    pass


@dataclass(frozen=True)
class Stop:
    pass


Call = Prefill | Head | Decode | InstallKV | ReadKV | CopyPages | SetMode | Heartbeat | Stop


@dataclass(frozen=True)
class Rank:
    """What one rank runs calls on: its runner, its prefix cache pool, and the group (for the calls that
    move KV between rank 0 and the others)."""

    runner: Runner
    pages: PagePool | None
    group: GlooGroup


def run_call(rank: Rank, call: Call, kv: tuple[torch.Tensor, torch.Tensor] | None = None) -> Any:
    """What every rank does with a call (rank 0 keeps the result). `kv`: on rank 0, an InstallKV's keys and
    values, every rank's heads in rank order."""
    runner = rank.runner
    with torch.inference_mode():
        if isinstance(call, Prefill):
            if call.hidden:
                return runner.prefill_hidden(call.ids, call.slot)
            return runner.prefill(call.ids, call.slot, call.all_logits)
        if isinstance(call, Head):
            return runner.head(call.x)
        if isinstance(call, Decode):
            return runner.decode(call.slots, call.tokens, call.positions, call.logit_rows)
        if isinstance(call, InstallKV):
            k, v = (rank.group.scatter(t, call.shape, call.dtype) for t in (kv or (None, None)))
            runner.install_kv(call.slot, k, v, call.start)
            return None
        if isinstance(call, ReadKV):
            heads = [rank.group.gather(t) for t in runner.read_kv(call.slot, call.n)]
            return None if heads[0] is None else tuple(torch.cat(h, dim=1) for h in heads)
        if isinstance(call, CopyPages):
            if rank.pages is None:  # every rank allocates its pool from the same config: a bug, said loudly
                raise RuntimeError("a prefix cache copy reached a rank without a pool")
            rank.pages.copy(call.slot, call.moves, call.into_pool)
            return None
    if isinstance(call, SetMode):
        runner.decode_mode = call.decode_mode
        if call.decode_mode == "fixed" and isinstance(runner, TorchRunner):
            use_dense_dispatch(runner.model)  # experts at fixed shapes, as compile/stages.py does for one rank
    return None


def follow(rank: Rank) -> int:
    """A rank other than 0: run every call rank 0 broadcasts, until Stop. Returns the calls run."""
    calls = 0
    while True:
        call = rank.group.broadcast_object()
        if isinstance(call, Stop):
            return calls
        run_call(rank, call)
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
    formed again with new processes (by the heartbeat when idle, else before the next call).

    `pages`: rank 0's own prefix cache pool (every rank holds one of its heads), or None."""

    def __init__(self, local: Runner, group: GlooGroup, ranks: Ranks, pages: PagePool | None = None) -> None:
        self.local, self.group, self.ranks = local, group, ranks
        self._rank = Rank(local, pages, group)
        self.any_rows = local.any_rows  # the fused decoder's rows are independent on every rank too
        self.weight_bytes = local.weight_bytes  # one rank's share of the weights
        self.rebuilds = 0
        self.failures = 0  # calls that failed: each may have cost ranks their state (a new rank starts empty)
        self._broken: Exception | None = None
        self._lock = threading.Lock()  # one call at a time on the group: the step, or the heartbeat
        self._last_call = time.monotonic()
        self._closed = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="metronome-tp-heartbeat", daemon=True)
        self._heartbeat.start()
        atexit.register(self.close)  # the other ranks end with this process (a torchrun job ends cleanly)

    def _call(
        self, call: Call, failures: int | None = None, kv: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> Any:
        """Run `call` on every rank; with `failures`, only while no call has failed since that count
        (else nothing runs: _STALE). `kv`: an InstallKV's tensors (run_call)."""
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("the tensor-parallel group is closed")
            if failures is not None and failures != self.failures:
                return _STALE
            try:
                # in the try: a group that fails to form again is a failure too (counted, so that the prefix
                # cache's pages, which the new ranks do not hold, are forgotten: Pages.generation)
                if self._broken is not None:
                    self._reform()
                self.group.broadcast_object(call)
                out = run_call(self._rank, call, kv)
            except Exception as exc:
                self._broken = exc
                self.failures += 1
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

    def prefill_hidden(self, ids: list[int], slot: int) -> torch.Tensor:
        return self._call(Prefill(list(ids), slot, False, hidden=True))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self._call(Head(x.contiguous()))

    def decode(
        self, slots: list[int], tokens: list[int], positions: list[int], logit_rows: list[int] | None = None
    ) -> torch.Tensor:
        return self._call(Decode(list(slots), list(tokens), list(positions), logit_rows))

    def install_kv(self, slot: int, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> None:
        """Every rank's KV heads of a prompt run elsewhere (the disaggregated layout), in rank order: each
        rank receives its own."""
        shape = (k.shape[0], k.shape[1] // self.group.world, *k.shape[2:])
        self._call(InstallKV(slot, start, shape, k.dtype), kv=(k, v))

    def read_kv(self, slot: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's KV heads of `slot`'s positions 0..n-1, in rank order (gathered on rank 0)."""
        return self._call(ReadKV(slot, n))

    def copy_pages(self, call: CopyPages, failures: int) -> bool:
        """Prefix cache pages copied on every rank, unless a call failed since `failures` (then False)."""
        return self._call(call, failures) is not _STALE

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


class TPPages:
    """The prefix cache's pool of a tensor-parallel plan (compile/pages.py `Pages`): each rank keeps the
    pages of its own KV heads, and a copy is a call every rank runs. After a failed call the group may be
    formed again with new ranks, whose pools are empty: `generation` counts failures, so the prefix cache
    forgets every page, and a copy asked for at an older generation does nothing."""

    def __init__(self, tp: TPRunner, local: PagePool) -> None:
        self.tp, self.local = tp, local
        self.page, self.pages = local.page, local.pages

    @property
    def generation(self) -> int:
        return self.tp.failures

    def nbytes(self) -> int:
        return self.local.nbytes() * self.tp.group.world

    def copy(self, slot: int, moves: Sequence[Move], into_pool: bool, generation: int) -> bool:
        return self.tp.copy_pages(CopyPages(slot, list(moves), into_pool), generation)
