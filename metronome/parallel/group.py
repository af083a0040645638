"""Process groups over torch.distributed, and a launcher for N ranks on this host.

One host: metronome starts the ranks itself (`run_ranks`), every group bound to loopback (127.0.0.1 and
the `lo` interface for gloo), on a port it finds free. Many hosts: `torchrun` starts them and its
environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) is read as it is (`env_rank`).

Nothing waits forever: collectives time out (`timeout_s`, given to the process group), and the launcher
joins its ranks with a deadline, killing them if it passes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import pickle
import queue
import socket
import traceback
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist


class GroupError(RuntimeError):
    """A rank failed, or the group could not form; the message names the rank and what happened."""


@dataclass(frozen=True)
class Endpoint:
    """Where rank 0 listens for the others to join."""

    addr: str
    port: int


def free_port() -> int:
    """A TCP port free on loopback now (the group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class GlooGroup:
    """This process's membership of a gloo group: the `Collective` tensor parallelism uses."""

    def __init__(self, rank: int, world: int, endpoint: Endpoint, timeout_s: float) -> None:
        if endpoint.addr in ("127.0.0.1", "localhost"):
            os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # one host: never another interface
        self.rank, self.world, self.timeout_s = rank, world, timeout_s
        self._join(endpoint)

    def _join(self, endpoint: Endpoint) -> None:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{endpoint.addr}:{endpoint.port}",
            rank=self.rank,
            world_size=self.world,
            timeout=timedelta(seconds=self.timeout_s),
        )

    def reconnect(self, endpoint: Endpoint) -> None:
        """Leave the current group (a rank of it died) and join a new one at `endpoint`."""
        self.close()
        self._join(endpoint)

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        t = t.contiguous()
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t)
        return out

    def all_gather_objects(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (picklable), in rank order."""
        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast_object(self, obj: Any = None) -> Any:
        """Rank 0's `obj` on every rank."""
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


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
    target: Callable[..., Any], rank: int, world: int, endpoint: Endpoint, timeout_s: float, args: tuple, out: Any
) -> None:
    torch.set_num_threads(1)
    group = None
    try:
        group = GlooGroup(rank, world, endpoint, timeout_s)
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
) -> list[Any]:
    """Run `target(group, *args)` on `world` fresh processes joined in a loopback gloo group; their results
    in rank order. `target` must be importable (spawned processes import it by name). Raises GroupError
    naming the first rank that failed, or the ranks still running after `timeout_s` (they are killed)."""
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    endpoint = Endpoint("127.0.0.1", free_port())
    procs = [
        ctx.Process(target=_rank_main, args=(target, r, world, endpoint, collective_timeout_s, args, out), daemon=True)
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
