"""Process groups over torch.distributed, and a launcher for N ranks on this host.

One host: metronome starts the ranks itself (`run_ranks`), every group bound to loopback (127.0.0.1 and
the `lo` interface for gloo), on a port it finds free. Many hosts: `torchrun` starts them and its
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) is read as it is (`env_rank`).

Nothing waits forever: collectives time out (`timeout_s`, given to the process group), and the launcher
joins its ranks with a deadline, killing them if it passes.

Ranks that share a host also exchange through shared memory (parallel/host.py): `all_gather` and
`broadcast_object` use it for whatever fits its slots, and the fused decoder takes `exchange` for its
row-parallel sums. `transport` says which the group uses, and why.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import time
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from metronome.parallel.host import link_host


class GroupError(RuntimeError):
    """A rank failed, or the group could not form; the message names the rank and what happened."""


@dataclass(frozen=True)
class Endpoint:
    """Where rank 0 listens for the others to join."""

    addr: str
    port: int


# The longest a spawned rank or prefill worker may take to reach its group's join: start Python, import torch,
# load the model. Past the join, each collective has its own timeout (30 s); the start had only that, and a
# 2-core machine under load took longer to import torch alone.
START_S = 600.0
JOIN_POLL_S = 0.5  # how often the wait for a join looks at whether the process still lives


def await_joining(processes: Sequence[Any], joining: Sequence[Any], timeout_s: float = START_S) -> None:
    """Wait until each process has set its `joining` event (a multiprocessing Event it sets just before it
    joins the group), or raise GroupError as soon as one has died (its exit code), or at `timeout_s`. Joining
    first would wait the collective timeout out for a process that was already dead (killed by the Ctrl-C that
    stops the server while it imports torch, or out of memory) and then say only that it did not join."""
    deadline = time.monotonic() + timeout_s
    for process, event in zip(processes, joining):
        while not event.wait(JOIN_POLL_S):
            if not process.is_alive():
                raise GroupError(
                    f"{process.name} (pid {process.pid}) exited with code {process.exitcode} before joining"
                )
            if time.monotonic() > deadline:
                raise GroupError(
                    f"{process.name} (pid {process.pid}) did not reach its group within {timeout_s:.0f} s of its start "
                    "(starting Python and torch and loading the model): is the machine overloaded?"
                )


def await_go(go: Any, parent: int, timeout_s: float = START_S) -> None:
    """A spawned rank that has set its `joining` event waits here for rank 0's `go` (set once every rank
    has), so all ranks enter the group's join together: a rank that joined as soon as it was ready could
    wait out the 30 s collective timeout for a slower one (three or more ranks on a loaded machine). Raises
    GroupError if the parent process `parent` ends first, or at `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not go.wait(JOIN_POLL_S):
        if os.getppid() != parent:
            raise GroupError(f"rank 0 (pid {parent}) ended before the group formed")
        if time.monotonic() > deadline:
            raise GroupError(f"rank 0 did not form the group within {timeout_s:.0f} s")


def free_port() -> int:
    """A TCP port free on loopback now (the group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GlooGroup:
    """This process's membership of a gloo group: the `Collective` tensor parallelism uses.

    `host_bytes`: the slot size of the shared-memory exchange when every rank runs on this host (0: gloo
    only)."""

    def __init__(self, rank: int, world: int, endpoint: Endpoint, timeout_s: float, host_bytes: int = 0) -> None:
        if endpoint.addr in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one host: never another interface
        self.rank, self.world, self.timeout_s, self.host_bytes = rank, world, timeout_s, host_bytes
        self.exchange: Any | None = None  # attached while the ranks share this host
        self._made: Any | None = None  # the exchange object, kept across reconnects (a decoder holds it)
        self.transport = "gloo"
        self._join(endpoint)

    def _join(self, endpoint: Endpoint) -> None:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{endpoint.addr}:{endpoint.port}",
            rank=self.rank,
            world_size=self.world,
            timeout=timedelta(seconds=self.timeout_s),
        )
        link = link_host(self, self._made, self.host_bytes, self.timeout_s)
        self._made = self._made or link.exchange
        self.exchange, self.transport = link.exchange, link.transport

    def reconnect(self, endpoint: Endpoint) -> None:
        """Leave the current group (a rank of it died) and join a new one at `endpoint`."""
        self.close()
        self._join(endpoint)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        t = t.contiguous()
        if self.exchange is not None and t.nbytes <= self.exchange.capacity:
            return list(self.exchange.all_gather(t).unbind(0))
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return out

    def scatter(self, parts: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """Rank r's piece of rank 0's `parts` (every rank's pieces of `shape` one after the other along
        dim 1, the KV heads); other ranks pass None."""
        out = torch.empty(shape, dtype=dtype)
        pieces = [p.contiguous() for p in parts.chunk(self.world, dim=1)] if parts is not None else None
        if self.world == 1:
            return pieces[0] if pieces is not None else out
        dist.scatter(out, pieces, src=0)
        return out

    def gather(self, t: torch.Tensor) -> list[torch.Tensor] | None:
        """Every rank's `t` in rank order, on rank 0 (None elsewhere)."""
        t = t.contiguous()
        if self.world == 1:
            return [t]
        out = [torch.empty_like(t) for _ in range(self.world)] if self.rank == 0 else None
        dist.gather(t, out, dst=0)
        return out

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank. Through shared memory when it fits (a first byte of 1), else
        the shared memory says so (a 0) and the object follows over gloo."""
        if self.exchange is not None:
            if self.rank == 0:
                data = pickle.dumps(obj)
                if len(data) < self.exchange.capacity:
                    self.exchange.broadcast(b"\x01" + data)
                    return obj
                self.exchange.broadcast(b"\x00")
            else:
                got = self.exchange.broadcast(b"")
                if got[:1] == b"\x01":
                    return pickle.loads(got[1:])
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.exchange is not None:
            self.exchange.detach()
            self.exchange = None
        if dist.is_initialized():
            dist.destroy_process_group()


class PairLink:
    """Two processes joined by a gloo process group of their own: not torch.distributed's default group,
    which the tensor-parallel ranks of the same process use (an engine at tp=2 with a prefill worker is in
    both). Point-to-point only; every send and receive waits at most `timeout_s`."""

    def __init__(self, rank: int, endpoint: Endpoint, timeout_s: float) -> None:
        if rank not in (0, 1):
            raise ValueError(f"rank={rank}: a pair has ranks 0 and 1")
        self.rank, self.timeout = rank, timedelta(seconds=timeout_s)
        self._group: Any | None = None
        self._join(endpoint)

    def _join(self, endpoint: Endpoint) -> None:
        if endpoint.addr in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one host: never another interface
        # rank 0 serves the rendezvous store; the group's constructor waits (bounded) for the other rank
        store = dist.TCPStore(endpoint.addr, endpoint.port, 2, self.rank == 0, timeout=self.timeout)
        self._group = dist.ProcessGroupGloo(store, self.rank, 2, self.timeout)

    def _live(self) -> Any:
        if self._group is None:
            raise GroupError("the link is closed")
        return self._group

    def send(self, t: torch.Tensor, dst: int) -> None:
        self._live().send([t], dst, 0).wait(self.timeout)

    def recv(self, t: torch.Tensor, src: int) -> None:
        """Into `t` (contiguous, the sender's shape and dtype)."""
        self._live().recv([t], src, 0).wait(self.timeout)

    def reconnect(self, endpoint: Endpoint) -> None:
        """Leave this pair (the other process died) and join a new one at `endpoint`."""
        self.close()
        self._join(endpoint)

    def close(self) -> None:
        self._group = None  # its connections close with it


def env_rank() -> tuple[int, int, Endpoint] | None:
    """(rank, world, endpoint) from torchrun's environment, or None when not launched by it."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    return (
        int(os.environ["RANK"]),
        int(os.environ["WORLD_SIZE"]),
        Endpoint(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500"))),
    )


def _rank_main(
    target: Callable[..., Any],
    rank: int,
    world: int,
    endpoint: Endpoint,
    timeout_s: float,
    host_bytes: int,
    args: tuple,
    out: Any,
) -> None:
    torch.set_num_threads(1)
    group = None
    try:
        group = GlooGroup(rank, world, endpoint, timeout_s, host_bytes)
        # plain pickle bytes: torch's queue pickling shares tensors by file descriptor, which dies with this process
        out.put((rank, True, pickle.dumps(target(group, *args))))
    except BaseException as exc:  # reported to the launcher, which raises it with the rank named
        out.put((rank, False, f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if group is not None:
            group.close()


def run_ranks(
    world: int,
    target: Callable[..., Any],
    args: tuple = (),
    timeout_s: float = 120.0,
    collective_timeout_s: float = 30.0,
    host_bytes: int = 0,
) -> list[Any]:
    """Run `target(group, *args)` on `world` fresh processes joined in a loopback gloo group (with a
    shared-memory exchange of `host_bytes` slots; 0: none); their results in rank order. `target` must be importable (spawned processes import it by name). Raises GroupError
    naming the first rank that failed, or the ranks still running after `timeout_s` (they are killed)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    endpoint = Endpoint("127.0.0.1", free_port())
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(target, r, world, endpoint, collective_timeout_s, host_bytes, args, out),
            daemon=True,
        )
        for r in range(world)
    ]
    for p in procs:
        p.start()
    results: dict[int, Any] = {}
    try:
        while len(results) < world:
            try:
                rank, ok, value = out.get(timeout=timeout_s)
            except queue.Empty:
                missing = sorted(set(range(world)) - set(results))
                raise GroupError(f"ranks {missing} gave no result within {timeout_s} s; they were stopped") from None
            if not ok:
                raise GroupError(f"rank {rank} of {world} failed: {value}")
            results[rank] = pickle.loads(value)
    finally:
        for p in procs:
            p.join(timeout=5.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=5.0)
    return [results[r] for r in range(world)]
