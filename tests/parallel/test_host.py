"""The shared-memory exchange between the ranks of one host (kernels/csrc/exchange.h, parallel/host.py):
what it delivers under back-to-back exchanges, that a dead or silent rank fails a wait promptly instead
of hanging it, and that the fused decoder gives the same bits through it as over gloo and in one process."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial

import pytest
import torch

from metronome.kernels.ops import load_kernels
from metronome.parallel.check import greedy_trace
from metronome.parallel.group import run_ranks
from metronome.parallel.tp import Solo

PROMPT = [1, 7, 12, 30, 5, 9, 44, 3]
STEPS = 6
ROUNDS = 300
PART = 1 << 20  # bytes a rank sends per exchange: long copies, so a slot rewritten while read shows


def _back_to_back(group, rounds: int) -> list[str]:
    """`rounds` exchanges as fast as they go, three ranks on two cores (so a rank is often preempted
    between publishing its part and reading the others'); every part checked at its ends and middle.
    The rank that finishes an exchange first writes the next one at once: with one buffer instead of two,
    it overwrites a part another rank is still reading."""
    wrong = []
    mine = torch.empty(PART // 4)
    ends = torch.tensor([0, PART // 8, PART // 4 - 1])
    for i in range(rounds):
        got = torch.stack([part[ends] for part in group.all_gather(mine.fill_(group.rank * 100_000 + i))])
        want = (torch.arange(group.world) * 100_000 + i).float()[:, None].expand(-1, 3)
        if not torch.equal(got, want):
            wrong.append(f"exchange {i}: {got.tolist()}")
        call = group.broadcast_object({"i": i, "ids": list(range(i % 40))} if group.rank == 0 else None)
        if call != {"i": i, "ids": list(range(i % 40))}:
            wrong.append(f"broadcast {i}: {call}")
    big = group.broadcast_object(list(range(300_000)) if group.rank == 0 else None)  # larger than a slot: gloo
    if big != list(range(300_000)):
        wrong.append("the broadcast larger than a slot")
    return [group.transport, *wrong]


def test_back_to_back_exchanges_deliver_every_part_intact():
    results = run_ranks(3, _back_to_back, (ROUNDS,), timeout_s=240, collective_timeout_s=10, host_bytes=PART)
    for transport, *wrong in results:
        assert transport.startswith("shared memory"), transport
        assert wrong == []


def _peer(path: str, world: int, capacity: int, pids: list[int], ready) -> None:
    exchange = load_kernels().host_exchange()
    pids[1] = os.getpid()
    exchange.attach(path, 1, world, capacity, pids, 30.0, 50.0)
    ready.put(os.getpid())
    exchange.all_gather(torch.ones(4))
    time.sleep(60)  # alive and silent until killed


@pytest.fixture
def linked():
    """This process as rank 0 and a child as rank 1 of a 2-rank exchange, after one exchange."""
    made = []

    def link(timeout_s: float):
        capacity = 1024
        exchange = load_kernels().host_exchange()
        fd, path = tempfile.mkstemp(prefix="metronome-test-", dir="/dev/shm")
        os.posix_fallocate(fd, 0, exchange.header_bytes(2) + 2 * 2 * capacity)
        os.close(fd)
        ctx = mp.get_context("spawn")
        ready = ctx.Queue()
        child = ctx.Process(target=_peer, args=(path, 2, capacity, [os.getpid(), 0], ready), daemon=True)
        child.start()
        made.append((child, path))
        # the child's pid is known once it runs; rank 0 attaches with it, and exchanges once the child has
        # attached too (a short timeout_s would not cover the child's start-up)
        exchange.attach(path, 0, 2, capacity, [os.getpid(), child.pid], timeout_s, 50.0)
        assert ready.get(timeout=60) == child.pid
        got = exchange.all_gather(torch.zeros(4))
        assert torch.equal(got, torch.tensor([[0.0] * 4, [1.0] * 4]))
        return exchange, child

    yield link
    for child, path in made:
        if child.is_alive():
            child.kill()
        child.join(timeout=10)
        os.unlink(path)


def test_a_killed_rank_fails_the_wait_at_once(linked):
    exchange, child = linked(timeout_s=30.0)
    os.kill(child.pid, signal.SIGKILL)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"rank 1 \(pid {child.pid}\) has exited"):
        exchange.all_gather(torch.zeros(4))
    assert time.monotonic() - t0 < 1.0  # the liveness check runs every 50 ms, not at the 30 s timeout


def test_a_silent_rank_fails_the_wait_at_the_timeout(linked):
    exchange, _child = linked(timeout_s=0.3)
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank 1 .* sent nothing for 0.3 s"):
        exchange.all_gather(torch.zeros(4))
    assert 0.3 <= time.monotonic() - t0 < 2.0


def test_a_detached_exchange_refuses_work_instead_of_touching_freed_memory(linked):
    exchange, _child = linked(timeout_s=1.0)
    exchange.detach()
    assert not exchange.attached
    with pytest.raises(RuntimeError, match="not attached"):
        exchange.all_gather(torch.zeros(4))


def test_the_fused_decoder_gives_the_same_bits_through_shared_memory_gloo_and_one_process(wide_llama):
    """Rank 0 and 1 add the 4 K chunks' partial sums in chunk order, through the decoder's own exchange
    (no Python) or through its gloo hook; one process adds them itself."""
    one = greedy_trace(Solo(), wide_llama, 4, PROMPT, STEPS, "int8")
    shm = run_ranks(2, greedy_trace, (wide_llama, 4, PROMPT, STEPS, "int8"), timeout_s=240, host_bytes=1 << 20)
    gloo = run_ranks(2, greedy_trace, (wide_llama, 4, PROMPT, STEPS, "int8"), timeout_s=240)
    assert shm[0]["transport"].startswith("shared memory") and gloo[0]["transport"] == "gloo"
    for trace in (*shm, *gloo):
        assert torch.equal(trace["logits"], one["logits"])


SLOT = 4096


def _fitting(size: int) -> bytes:
    """A bytes object whose pickle is `size` bytes long."""
    import pickle

    data = b"x" * size
    return data[: size - (len(pickle.dumps(data)) - size)]


def _edges(group) -> tuple[int, list[int], bool]:
    """Broadcasts whose pickle is one byte short of a slot, a slot, and one byte more (a first byte says
    which way the object comes: it must fit beside it); whether the exchange's file was unlinked once every
    rank mapped it (its mapping reads "(deleted)"). Rank 0 answers last."""
    import pickle

    sizes = []
    for size in (SLOT - 1, SLOT, SLOT + 1):
        got = group.broadcast_object(_fitting(size) if group.rank == 0 else None)
        sizes.append(len(pickle.dumps(got)))
    with open("/proc/self/maps") as maps:
        mapped = [line for line in maps if "metronome-tp-" in line]
    if group.rank == 0:
        time.sleep(0.5)  # the others' results come first
    return group.rank, sizes, bool(mapped) and all(line.rstrip().endswith("(deleted)") for line in mapped)


def test_broadcasts_at_a_slots_size_arrive_and_the_exchange_leaves_no_file():
    results = run_ranks(2, _edges, timeout_s=120, collective_timeout_s=10, host_bytes=SLOT)
    assert [rank for rank, *_ in results] == [0, 1]  # in rank order, whichever came first
    for _rank, sizes, unlinked in results:
        assert sizes == [SLOT - 1, SLOT, SLOT + 1]
        assert unlinked  # nothing left in /dev/shm, whichever way the ranks end


def test_the_exchange_slot_holds_the_largest_part_a_rank_sends_rounded_to_64_bytes():
    """exchange_bytes: a rank's row-parallel partials (PREFILL_CHUNK rows of its chunks) or its share of the
    logits (its chunks of the vocabulary, cut rounding up, for at least MIN_LOGIT_ROWS slots), whichever is
    larger, in float32 bytes rounded up to a multiple of 64. Worked by hand: vocabulary 50,001 in 4 chunks
    of 12,501 (not 12,500), 2 per rank = 25,002 columns."""
    from metronome.config import EngineConfig, ModelConfig
    from metronome.parallel.host import exchange_bytes
    from metronome.parallel.tp import TPLayout

    def cfg(vocab: int, hidden: int) -> ModelConfig:
        return ModelConfig("llama", vocab, hidden, 2 * hidden, 1, 4, 2, hidden // 4, 512)

    layout = TPLayout(world=2, rank=0, shards=4)
    # 2 slots still reserve 8 rows of logits: 8 x 25,002 x 4 = 800,064 bytes (already a multiple of 64)
    assert exchange_bytes(cfg(50_001, 64), layout, EngineConfig(slots=2)) == 800_064
    # 9 slots: 9 x 25,002 x 4 = 900,072 bytes, rounded up to 900,096
    assert exchange_bytes(cfg(50_001, 64), layout, EngineConfig(slots=9)) == 900_096
    # a wide model's partials are larger: 256 rows x 2 chunks x 4,096 x 4 bytes
    assert exchange_bytes(cfg(1_000, 4096), layout, EngineConfig(slots=2)) == 256 * 2 * 4096 * 4


class _Exchange:
    """A stand-in for the kernels' HostExchange: records what link_host asks of it (and the file it maps)."""

    def __init__(self, fail: str = "") -> None:
        self.fail, self.attached_to, self.detached = fail, None, False

    @staticmethod
    def header_bytes(world: int) -> int:
        return 4096

    def attach(self, path, rank, world, capacity, pids, timeout_s, spin_us) -> None:
        self.attached_to = dict(path=path, size=os.path.getsize(path), rank=rank, world=world, pids=pids)
        if self.fail:
            raise RuntimeError(self.fail)

    def detach(self) -> None:
        self.detached = True


class _Group:
    """Rank `rank` of 2 whose other rank answers each all_gather_objects with the next of `answers`."""

    def __init__(self, rank: int, answers: list) -> None:
        self.rank, self.world, self.answers, self.gathers = rank, 2, list(answers), 0

    def all_gather_objects(self, obj):
        self.gathers += 1
        other = self.answers.pop(0)
        return [obj, other] if self.rank == 0 else [other, obj]


def _here(problem: str = "") -> tuple:
    """What a rank on this host (this boot) says at the first gather."""
    from metronome.parallel.host import _boot_id

    return (socket.gethostname(), _boot_id(), 4242, problem)


@pytest.fixture
def shm_dir(tmp_path, monkeypatch):
    """link_host's files go to an empty folder of this test's, so what it leaves behind shows."""
    monkeypatch.setattr("metronome.parallel.host.SHM_DIR", tmp_path)
    return tmp_path


def test_ranks_of_one_host_map_a_file_of_two_slots_each_and_rank_0_unlinks_it(shm_dir):
    from metronome.parallel.host import link_host

    exchange = _Exchange()
    link = link_host(_Group(0, [_here(), ("", ""), ""]), exchange, 8192, 5.0)
    assert link.exchange is exchange and link.transport == "shared memory (8 KiB slots)"
    attached = exchange.attached_to
    assert attached["size"] == 4096 + 2 * 2 * 8192  # header + two buffers of a slot per rank, reserved now
    assert (attached["rank"], attached["world"], attached["pids"]) == (0, 2, [os.getpid(), 4242])
    assert attached["path"].startswith(str(shm_dir)) and list(shm_dir.iterdir()) == []  # unlinked once mapped


def test_rank_1_maps_rank_0s_file_and_leaves_it_to_rank_0(shm_dir):
    from metronome.parallel.host import link_host

    made = shm_dir / "metronome-tp-rank0"
    made.write_bytes(bytes(4096 + 2 * 2 * 1024))
    exchange = _Exchange()
    link = link_host(_Group(1, [_here(), (str(made), ""), ""]), exchange, 1024, 5.0)
    assert link.exchange is exchange and exchange.attached_to["path"] == str(made)
    assert list(shm_dir.iterdir()) == [made]  # rank 1 made no file of its own, and unlinked nothing


@pytest.mark.parametrize(
    "peer, why",
    [
        (("elsewhere.example", "boot-a", 1, ""), "the ranks run on more than one host"),
        ((socket.gethostname(), "another-boot", 1, ""), "the ranks run on more than one host"),  # a VM's clone
        (None, "no C++ kernels here: not built"),
    ],
)
def test_ranks_that_cannot_share_memory_stay_on_gloo_and_make_no_file(shm_dir, peer, why):
    from metronome.parallel.host import link_host

    exchange = _Exchange()
    link = link_host(_Group(0, [peer or _here("no C++ kernels here: not built"), ("", ""), ""]), exchange, 1024, 5.0)
    assert (link.exchange, link.transport) == (None, f"gloo ({why})")
    assert exchange.attached_to is None and list(shm_dir.iterdir()) == []


def test_no_slot_capacity_means_gloo_without_asking_the_group(shm_dir):
    from metronome.parallel.host import link_host

    group = _Group(0, [])
    assert link_host(group, _Exchange(), 0, 5.0).transport == "gloo" and group.gathers == 0


def test_a_rank_that_fails_to_attach_sends_every_rank_to_gloo_and_the_file_is_still_unlinked(shm_dir):
    from metronome.parallel.host import link_host

    exchange = _Exchange()
    link = link_host(_Group(0, [_here(), ("", ""), "rank 1: cannot map"]), exchange, 1024, 5.0)
    assert (link.exchange, link.transport) == (None, "gloo (rank 1: cannot map)")
    assert exchange.detached and list(shm_dir.iterdir()) == []


def test_a_file_rank_0_cannot_reserve_is_removed_and_every_rank_stays_on_gloo(shm_dir, monkeypatch):
    """A full /dev/shm fails at the reservation (ENOSPC): the half-made file goes, and no rank maps anything."""
    from metronome.parallel.host import link_host

    def full(fd, offset, size):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "posix_fallocate", full)
    exchange = _Exchange()
    link = link_host(_Group(0, [_here(), ("", ""), ""]), exchange, 1024, 5.0)
    assert link.exchange is None and link.transport.startswith("gloo (cannot make a 8192-byte file in ")
    assert "No space left on device" in link.transport
    assert exchange.attached_to is None and list(shm_dir.iterdir()) == []


def _shm_file(size: int) -> str:
    fd, path = tempfile.mkstemp(prefix="metronome-test-", dir="/dev/shm")
    os.posix_fallocate(fd, 0, size)
    os.close(fd)
    return path


def _as_ranks(*calls):
    """Each rank's call on a thread of its own (the exchange releases the GIL while it waits), their results
    in rank order; every wait is bounded by the exchange's own timeout_s, and the threads' by 30 s."""
    pool = ThreadPoolExecutor(len(calls))
    try:
        futures = [pool.submit(call) for call in calls]
        return [future.result(timeout=30) for future in futures]
    finally:
        pool.shutdown(wait=False)


def test_an_exchange_attached_again_starts_at_exchange_0_like_a_fresh_rank():
    """parallel/host.py reuses a rank's HostExchange across reconnects: attached to the group's new file, it
    starts at exchange 0 again, as the fresh exchange of a rank that was restarted does. Counting on from
    before, it would wait for an exchange the fresh rank never makes, and the fresh rank would read the
    other buffer. Two ranks of this process, one thread each."""
    kernels = load_kernels()
    capacity = 1024
    size = kernels.host_exchange().header_bytes(2) + 2 * 2 * capacity
    pids = [os.getpid(), os.getpid()]
    reused, first_peer, fresh_peer = (kernels.host_exchange() for _ in range(3))
    paths = [_shm_file(size), _shm_file(size)]
    try:
        for path, peer in zip(paths, (first_peer, fresh_peer), strict=True):
            reused.attach(path, 0, 2, capacity, pids, 2.0, 50.0)
            peer.attach(path, 1, 2, capacity, pids, 2.0, 50.0)
            for i in range(3):  # an odd count: the group formed again would start in the other buffer
                got = _as_ranks(
                    partial(reused.all_gather, torch.full((4,), float(i))),
                    partial(peer.all_gather, torch.full((4,), 100.0 + i)),
                )
                want = torch.tensor([[float(i)] * 4, [100.0 + i] * 4])
                assert all(torch.equal(g, want) for g in got), f"{path}, exchange {i}: {got}"
    finally:
        for exchange in (reused, first_peer, fresh_peer):
            exchange.detach()
        for path in paths:
            os.unlink(path)


DETACH_WHILE_WAITING = """
import os, tempfile, threading, time
import torch
from metronome.kernels.ops import load_kernels

exchange = load_kernels().host_exchange()
capacity = 1024
fd, path = tempfile.mkstemp(prefix="metronome-test-", dir="/dev/shm")
os.posix_fallocate(fd, 0, exchange.header_bytes(2) + 2 * 2 * capacity)
os.close(fd)
# rank 1 (this process too, so it counts as running) never sends: rank 0's gather waits out its 1 s timeout
exchange.attach(path, 0, 2, capacity, [os.getpid(), os.getpid()], 1.0, 50.0)
os.unlink(path)
errors = []

def gather():
    try:
        exchange.all_gather(torch.zeros(4))
    except RuntimeError as e:
        errors.append(str(e))

waiting = threading.Thread(target=gather)
waiting.start()
time.sleep(0.3)  # the gather is asleep in its wait by now (if not, it finds the exchange detached)
exchange.detach()  # waits for the gather in flight instead of unmapping the file under it
waiting.join(10)
assert not waiting.is_alive() and not exchange.attached
assert len(errors) == 1 and ("sent nothing for 1" in errors[0] or "not attached" in errors[0]), errors
print("done", flush=True)
"""


def test_detach_waits_for_the_exchange_in_flight():
    """detach from one thread while another waits in an exchange: the file stays mapped until that wait ends
    (here at its timeout), instead of being unmapped under it (a crash). In a child process, so that a crash
    or a hang fails the test."""
    try:
        out = subprocess.run(
            [sys.executable, "-c", DETACH_WHILE_WAITING], capture_output=True, text=True, timeout=120, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.fail("detaching while an exchange waits hung for 120 s")
    assert out.returncode == 0 and "done" in out.stdout, (out.returncode, out.stderr[-3000:])
