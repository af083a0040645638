"""A list scheduler over resources: per-chip functional units, directed chip-to-chip links, PCIe ports, GPUs.

Every task names the resources it holds, how long it holds them, and the earliest time its inputs are
ready. `Timeline.place` puts it at the earliest time at or after that when every resource it needs is free
for its whole duration (gaps left by earlier tasks are filled). Nothing else orders tasks: two ops on
different units, or an op and a transfer, overlap whenever their dependencies allow.

A transfer holds its link while it serializes (bytes / bandwidth); the hop latency is added to its arrival,
not to the link's busy time, so back-to-back messages pipeline on one wire. When a transfer's link is busy
at the time its data is ready, the wait is recorded as `Contention` (the link is over-subscribed there).
`Timeline.verify` re-checks the finished schedule: no two reservations of one resource overlap (a
violation is `LinkContentionError` on a link, `ResourceConflictError` on a unit).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

GPU_PID = 100_000  # the GPU side of a hybrid fleet, as a trace process id
PIPELINE_PID = 200_000  # the pipeline view (micro-batches in flight per stage), as a trace process id
_EPS = 1e-15  # seconds: below this a wait is rounding, not contention

Resource = tuple  # ("unit", chip, "mxm") | ("link", src, dst) | ("pcie", ...) | ("gpu", ...) | ("stage", s)


class ResourceConflictError(RuntimeError):
    """Two tasks were placed on one resource at overlapping times."""


class LinkContentionError(ResourceConflictError):
    """Two transfers were placed on one directed link (or PCIe port) at overlapping times."""


def is_link(resource: Resource) -> bool:
    return resource[0] in ("link", "pcie")


@dataclass(frozen=True)
class Event:
    chip: int  # trace process: a chip, GPU_PID or PIPELINE_PID
    track: str  # "mxm" | "vxm" | "sxm" | "mem" | "sram" | "link->N" | "pcie" | "pcie->N" | "gpu" | "stage N"
    name: str
    start_s: float
    dur_s: float
    category: str  # "compute" | "sram" | "transfer" | "pipeline"


@dataclass(frozen=True)
class Contention:
    """A transfer that found its link busy: its data was ready at `ready_s`, the link freed at `start_s`."""

    resource: Resource
    task: str
    ready_s: float
    start_s: float

    @property
    def wait_s(self) -> float:
        return self.start_s - self.ready_s


@dataclass
class Timeline:
    """Reservations per resource, kept sorted; `events` is what the trace shows (only if `record`)."""

    record: bool = True
    events: list[Event] = field(default_factory=list)
    contention: list[Contention] = field(default_factory=list)
    makespan_s: float = 0.0  # set by whoever lays the schedule out: when its last result lands
    _busy: dict[Resource, list[tuple[float, float]]] = field(default_factory=dict)

    def reserve(self, resource: Resource, start: float, end: float) -> None:
        """Claim `resource` for [start, end); raise if that overlaps an earlier claim."""
        spans = self._busy.setdefault(resource, [])
        i = bisect.bisect_left(spans, (start, end))
        before = spans[i - 1] if i > 0 else None
        after = spans[i] if i < len(spans) else None
        if (before is not None and before[1] > start + _EPS) or (after is not None and after[0] < end - _EPS):
            err = LinkContentionError if is_link(resource) else ResourceConflictError
            raise err(f"{resource} already busy around [{start:.9f}, {end:.9f}) s")
        spans.insert(i, (start, end))

    def _fit(self, resource: Resource, t: float, dur: float) -> float:
        """Earliest start >= t at which `resource` is free for `dur`."""
        spans = self._busy.get(resource)
        if not spans:
            return t
        i = max(0, bisect.bisect_right(spans, (t, float("inf"))) - 1)
        for s, e in spans[i:]:
            if e <= t + _EPS:
                continue
            if s >= t + dur - _EPS:
                return t
            t = e
        return t

    def earliest(self, resources: tuple[Resource, ...], ready: float, dur: float) -> float:
        """Earliest start >= `ready` at which every resource in `resources` is free for `dur`."""
        t = ready
        while True:
            starts = [self._fit(r, t, dur) for r in resources]
            latest = max(starts, default=t)
            if latest <= t + _EPS:
                return t
            t = latest

    def place(self, name: str, resources: tuple[Resource, ...], ready: float, dur: float) -> float:
        """Reserve every resource for `dur` from the earliest time they are all free; returns the start."""
        start = self.earliest(resources, ready, dur)
        if start > ready + _EPS:
            for r in resources:
                if is_link(r) and self._fit(r, ready, dur) > ready + _EPS:
                    self.contention.append(Contention(r, name, ready, start))
        for r in resources:
            self.reserve(r, start, start + dur)
        return start

    def event(self, chip: int, track: str, name: str, start: float, dur: float, category: str) -> None:
        if self.record:
            self.events.append(Event(chip, track, name, start, dur, category))

    def busy(self, resource: Resource) -> list[tuple[float, float]]:
        return list(self._busy.get(resource, []))

    def resources(self) -> list[Resource]:
        return list(self._busy)

    def verify(self) -> None:
        """Re-check the finished schedule: no resource holds two overlapping reservations."""
        for resource, spans in self._busy.items():
            for (s0, e0), (s1, _) in zip(spans, spans[1:]):
                if s1 < e0 - _EPS:
                    err = LinkContentionError if is_link(resource) else ResourceConflictError
                    raise err(f"{resource}: [{s0}, {e0}) overlaps a reservation starting at {s1}")

    def links_used(self, chip: int) -> int:
        """Distinct outbound chip-to-chip links chip `chip` uses."""
        return len({r[2] for r in self._busy if r[0] == "link" and r[1] == chip})


_TRACKS = ("mxm", "vxm", "sxm", "mem", "sram", "pcie", "gpu")  # first, in this order; then by first use


def to_chrome_trace(events: list[Event], labels: dict[int, str]) -> dict:
    """Chrome trace JSON (opens in Perfetto / chrome://tracing): one process per chip, one thread per unit
    or outbound link, complete ("X") events in microseconds."""
    out: list[dict] = []
    for pid, label in sorted(labels.items()):
        out.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": label}})
    tids: dict[tuple[int, str], int] = {}
    for e in events:
        key = (e.chip, e.track)
        if key not in tids:
            tids[key] = _TRACKS.index(e.track) + 1 if e.track in _TRACKS else 100 + len(tids)
            out.append({"ph": "M", "name": "thread_name", "pid": e.chip, "tid": tids[key], "args": {"name": e.track}})
        out.append(
            {
                "ph": "X",
                "name": e.name,
                "cat": e.category,
                "pid": e.chip,
                "tid": tids[key],
                "ts": e.start_s * 1e6,
                "dur": e.dur_s * 1e6,
            }
        )
    return {"traceEvents": out, "displayTimeUnit": "ns"}
