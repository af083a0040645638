"""The scheduler alone: FIFO admission, lowest free slot, cancellation, queue limits, idleness.
No model: a minimal request object is all it needs."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from metronome.config import ParamError
from metronome.engine.scheduler import Scheduler


@dataclass(eq=False)
class Req:
    name: str
    slot: int | None = None
    cancelled: bool = False


def _reqs(*names: str) -> list[Req]:
    return [Req(n) for n in names]


def test_fifo_order_and_lowest_slots():
    s = Scheduler(slots=3)
    reqs = _reqs("a", "b", "c", "d", "e")
    for r in reqs:
        s.add(r)
    batch = s.schedule()
    assert [r.name for r in batch.admitted] == ["a", "b", "c"]
    assert [r.slot for r in batch.admitted] == [0, 1, 2]
    assert [r.name for r in batch.running] == ["a", "b", "c"] and batch.cancelled == []
    assert [r.name for r in s.waiting] == ["d", "e"]
    assert reqs[3].slot is None
    # nothing frees: nobody is admitted, everyone keeps running
    batch = s.schedule()
    assert batch.admitted == [] and [r.name for r in batch.running] == ["a", "b", "c"]


def test_a_freed_slot_goes_to_the_oldest_waiter_lowest_slot_first():
    s = Scheduler(slots=4)
    a, b, c, d, e, f = _reqs("a", "b", "c", "d", "e", "f")
    for r in (a, b, c, d, e, f):
        s.add(r)
    s.schedule()
    s.release(c)  # slot 2
    s.release(b)  # slot 1: freed later, but lower
    batch = s.schedule()
    assert [(r.name, r.slot) for r in batch.admitted] == [("e", 1), ("f", 2)]
    assert [r.name for r in batch.running] == ["a", "e", "f", "d"]  # ordered by slot


def test_release_of_a_request_that_no_longer_holds_the_slot_is_ignored():
    s = Scheduler(slots=1)
    a, b = _reqs("a", "b")
    s.add(a)
    s.schedule()
    s.release(a)
    s.add(b)
    s.schedule()
    assert b.slot == 0
    s.release(a)  # stale: a's old slot now belongs to b
    assert s.by_slot == {0: b}


def test_cancelling_a_running_request_frees_its_slot_at_the_next_schedule():
    s = Scheduler(slots=2)
    a, b, c = _reqs("a", "b", "c")
    for r in (a, b, c):
        s.add(r)
    s.schedule()
    a.cancelled = True
    assert s.by_slot[0] is a  # nothing happens until the next schedule
    batch = s.schedule()
    assert batch.cancelled == [a]
    assert [(r.name, r.slot) for r in batch.admitted] == [("c", 0)]
    assert batch.running == [c, b]
    assert a not in s.by_slot.values()


def test_cancelling_a_waiting_request_removes_it_from_the_queue():
    s = Scheduler(slots=1)
    a, b, c = _reqs("a", "b", "c")
    for r in (a, b, c):
        s.add(r)
    s.schedule()
    b.cancelled = True
    batch = s.schedule()
    assert batch.cancelled == [b] and batch.admitted == []
    assert list(s.waiting) == [c]
    s.release(a)
    batch = s.schedule()
    assert batch.admitted == [c] and c.slot == 0 and b.slot is None


def test_queue_full_counts_every_request_in_against_slots_and_queue():
    s = Scheduler(slots=2, max_queue=1)
    a, b, c, d = _reqs("a", "b", "c", "d")
    s.add(a)
    s.add(b)  # both wait for the next step, with two slots free: not a queue of two
    assert not s.queue_full and s.capacity == 3
    s.add(c)
    assert s.queue_full
    s.schedule()  # a and b run, c waits
    assert s.queue_full
    c.cancelled = True  # leaves at the next step: no longer counted
    assert not s.queue_full
    s.add(d)
    assert s.queue_full
    s.release(a)
    s.schedule()  # c leaves, d runs
    assert not s.queue_full and s.holding == 2
    assert not Scheduler(slots=1).queue_full and Scheduler(slots=1).capacity is None  # no limit
    unlimited = Scheduler(slots=1)
    for r in _reqs(*"abcdefgh"):
        unlimited.add(r)
    assert not unlimited.queue_full


def test_idle_only_when_nothing_waits_or_runs():
    s = Scheduler(slots=2)
    assert s.idle
    a = Req("a")
    s.add(a)
    assert not s.idle  # waiting
    s.schedule()
    assert not s.idle  # running
    s.release(a)
    assert s.idle
    b = Req("b")
    s.add(b)
    b.cancelled = True
    assert not s.idle
    s.schedule()
    assert s.idle


def test_a_queue_of_zero_holds_the_slots_only():
    """max_queue=0 (the CLI's --max-queue 0) means no waiting beyond the slots, not "no limit"."""
    s = Scheduler(slots=2, max_queue=0)
    assert s.capacity == 2
    a, b = _reqs("a", "b")
    s.add(a)
    assert not s.queue_full
    s.add(b)
    assert s.queue_full


@pytest.mark.parametrize("max_queue", [-1, -5, 2.0, True])
def test_a_queue_limit_below_zero_or_not_a_count_is_refused_by_name(max_queue):
    """max_queue=-5 with 2 slots made a capacity of -3: every request was refused with a message about it."""
    with pytest.raises(ParamError) as caught:
        Scheduler(slots=2, max_queue=max_queue)
    assert caught.value.param == "max_queue"
    assert Scheduler(slots=2, max_queue=0).capacity == 2
