"""The ranks of one host exchange through shared memory (kernels/csrc/exchange.h), the group through gloo.

A gloo collective between two processes on the 2-vCPU machine costs 300-650 µs, and a tensor-parallel
decode step makes two per layer (docs/parallel.md, "Where the exchange time goes"). When every rank of a
group runs on this host, `link_host` gives the group a shared-memory file instead: rank 0 creates it in
/dev/shm, every rank maps it, then rank 0 unlinks it (the mappings keep it; nothing is left behind if a
rank dies). The fused decoder adds its row-parallel partial sums there without a Python call, and the
group's `all_gather` and `broadcast_object` use it for anything that fits a slot. Everything else, and
every group that spans hosts, stays on gloo: forming the group, comparing fingerprints, large messages.

Sizing: a slot holds the largest part one rank sends in one exchange that should be fast: a decoder
call's row-parallel partials (PREFILL_CHUNK rows of each of the rank's chunks) or a decode step's logits
(the rank's vocabulary for each slot). Anything larger goes over gloo.
"""

from __future__ import annotations

import os
import socket
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from metronome.compile.fused import PREFILL_CHUNK
from metronome.config import EngineConfig, ModelConfig
from metronome.kernels.ops import KernelBuildError, load_kernels
from metronome.parallel.tp import TPLayout

SHM_DIR = Path("/dev/shm")  # tmpfs: the file lives in memory
SPIN_US = 50.0  # a waiting rank spins this long before it sleeps (the other is usually microseconds behind)
MIN_LOGIT_ROWS = 8  # a slot holds at least this many rows of logits (speculation sends more rows per slot)


def exchange_bytes(cfg: ModelConfig, layout: TPLayout, config: EngineConfig) -> int:
    """Bytes one rank sends in the largest exchange that should go through shared memory (a multiple of 64)."""
    per_rank = layout.shards // layout.world
    partials = PREFILL_CHUNK * per_rank * cfg.hidden_size
    vocab = -(-cfg.vocab_size // layout.shards) * per_rank
    logits = max(config.slots, MIN_LOGIT_ROWS) * vocab
    return -(-4 * max(partials, logits) // 64) * 64


class Objects(Protocol):
    """What linking needs of the group: its gloo object collectives (before the link exists)."""

    rank: int
    world: int

    def all_gather_objects(self, obj: Any) -> list[Any]: ...


@dataclass(frozen=True)
class Link:
    """How a group's ranks exchange: `exchange` (attached) when they share this host, else None and why."""

    exchange: Any | None
    transport: str


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _create(size: int) -> str:
    """A zeroed file of `size` bytes in /dev/shm, its blocks reserved now (a full tmpfs fails here, with
    ENOSPC, rather than with SIGBUS at the first write into a hole)."""
    fd, path = tempfile.mkstemp(prefix="metronome-tp-", dir=SHM_DIR)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError:
        os.close(fd)
        os.unlink(path)
        raise
    os.close(fd)
    return path


def link_host(group: Objects, exchange: Any | None, capacity: int, timeout_s: float) -> Link:
    """Attach `exchange` (a kernels HostExchange, reused across reconnects, or None to make one) to a new
    shared-memory file when every rank of `group` runs on this host. Collective: every rank calls it.
    Returns a gloo-only link, saying why, when the ranks span hosts or the file cannot be made here."""
    if group.world == 1 or capacity <= 0:
        return Link(None, "none (one rank)" if group.world == 1 else "gloo")
    try:
        made = exchange if exchange is not None else load_kernels().host_exchange()
        problem = ""
    except KernelBuildError as exc:
        made, problem = None, f"no C++ kernels here: {exc}"
    everyone = group.all_gather_objects((socket.gethostname(), _boot_id(), os.getpid(), problem))
    if len({(host, boot) for host, boot, _, _ in everyone}) != 1:
        return Link(None, "gloo (the ranks run on more than one host)")
    problems = [p for *_, p in everyone if p]
    if problems:
        return Link(None, f"gloo ({problems[0]})")
    size = made.header_bytes(group.world) + 2 * group.world * capacity
    path, problem = "", ""
    if group.rank == 0:
        try:
            path = _create(size)
        except OSError as exc:
            problem = f"cannot make a {size}-byte file in {SHM_DIR}: {exc}"
    path, problem = group.all_gather_objects((path, problem))[0]
    if problem:
        return Link(None, f"gloo ({problem})")
    pids = [pid for _, _, pid, _ in everyone]
    try:
        made.attach(path, group.rank, group.world, capacity, pids, timeout_s, SPIN_US)
        error = ""
    except RuntimeError as exc:
        error = f"rank {group.rank}: {exc}"
    errors = [e for e in group.all_gather_objects(error) if e]  # every rank has mapped it (or failed)
    if group.rank == 0:
        os.unlink(path)
    if errors:
        made.detach()
        return Link(None, f"gloo ({errors[0]})")
    return Link(made, f"shared memory ({capacity // 1024} KiB slots)")
