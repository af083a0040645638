"""Who runs in the next step: a fixed set of slots, a FIFO queue, continuous batching.

A waiting request takes the lowest free slot as soon as one frees up; a finished or cancelled request
gives its slot back at once. The scheduler only does bookkeeping: the engine runs the step."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from metronome.config import ParamError


class Schedulable(Protocol):
    slot: int | None
    cancelled: bool


R = TypeVar("R", bound=Schedulable)


@dataclass(frozen=True)
class Batch(Generic[R]):
    admitted: list[R]  # newly given a slot: prefill these
    cancelled: list[R]  # removed this step (slot freed)
    running: list[R]  # every request holding a slot after admission, by slot


def check_max_queue(max_queue: int | None) -> None:
    """`max_queue` is how many requests may wait beyond the slots: None (no limit) or a count, 0 or more
    (a negative one made a capacity below the slots, which refused requests a free slot would take)."""
    if max_queue is not None and (isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 0):
        raise ParamError(
            "max_queue", f"max_queue={max_queue!r}: must be a whole number, 0 or more (or None: no limit on the queue)"
        )


class Scheduler(Generic[R]):
    def __init__(self, slots: int, max_queue: int | None = None) -> None:
        check_max_queue(max_queue)
        self.slots = slots
        self.max_queue = max_queue
        self.waiting: deque[R] = deque()
        self.by_slot: dict[int, R] = {}

    @property
    def capacity(self) -> int | None:
        """How many requests may be in at once, running or waiting: the slots and `max_queue` (None: no limit)."""
        return None if self.max_queue is None else self.slots + self.max_queue

    @property
    def queue_full(self) -> bool:
        """Whether one more request would wait beyond `max_queue`. A request submitted since the last step
        waits here until the next one, even for a free slot, so the count is of every request in, running or
        waiting, against the slots and the queue together (counting `waiting` alone refused requests that a
        free slot would take at once)."""
        capacity = self.capacity
        return capacity is not None and self.holding >= capacity

    @property
    def holding(self) -> int:
        """Requests in: those in slots and those waiting for one (not the cancelled, which leave next step)."""
        return sum(not r.cancelled for r in self.by_slot.values()) + sum(not r.cancelled for r in self.waiting)

    def add(self, request: R) -> None:
        self.waiting.append(request)

    def release(self, request: R) -> None:
        """Free a request's slot (finished)."""
        if request.slot is not None and self.by_slot.get(request.slot) is request:
            del self.by_slot[request.slot]

    def schedule(self) -> Batch[R]:
        cancelled = [r for r in self.by_slot.values() if r.cancelled]
        cancelled += [r for r in self.waiting if r.cancelled]
        self.waiting = deque(r for r in self.waiting if not r.cancelled)
        for r in cancelled:
            self.release(r)
        admitted = []
        free = [s for s in range(self.slots) if s not in self.by_slot]
        while free and self.waiting:
            r = self.waiting.popleft()
            r.slot = free.pop(0)
            self.by_slot[r.slot] = r
            admitted.append(r)
        running = [self.by_slot[s] for s in sorted(self.by_slot)]
        return Batch(admitted, cancelled, running)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.by_slot
