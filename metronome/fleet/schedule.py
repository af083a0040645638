"""Static schedule: per-chip timelines of compute, SRAM reads and link transfers, with no contended link.

The builder places every transfer itself, at the earliest time its link is free, and checks the invariant
(no two transfers overlap on one directed link) on every reservation: a violation is a compiler bug and
raises `LinkContentionError`.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

GPU_PID = 100_000  # the GPU of a hybrid fleet, as a trace process id


class LinkContentionError(RuntimeError):
    """Two transfers were placed on one directed link at overlapping times."""


@dataclass(frozen=True)
class Event:
    chip: int  # GPU_PID for the GPU side of a hybrid fleet
    track: str  # "mxm" | "vxm" | "mem" | "sram" | "link->N" | "pcie" | "gpu"
    name: str
    start_s: float
    dur_s: float
    category: str  # "compute" | "sram" | "transfer"


@dataclass
class ScheduleBuilder:
    """Lays out dependent steps on `chips` chips; `ready[c]` is when chip c may start its next dependent op."""

    chips: int
    ready: list[float] = field(init=False)
    events: list[Event] = field(default_factory=list)
    _busy: dict[tuple[object, object], list[tuple[float, float]]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.ready = [0.0] * self.chips

    def reserve(self, link: tuple[object, object], start: float, end: float) -> None:
        """Claim directed `link` for [start, end); raise LinkContentionError if that overlaps a claim."""
        spans = self._busy.setdefault(link, [])
        i = bisect.bisect_left(spans, (start, end))
        before = spans[i - 1] if i > 0 else None
        after = spans[i] if i < len(spans) else None
        if (before is not None and before[1] > start) or (after is not None and after[0] < end):
            raise LinkContentionError(f"link {link} already busy around [{start:.9f}, {end:.9f}) s")
        spans.insert(i, (start, end))

    def link_free_at(self, link: tuple[object, object]) -> float:
        spans = self._busy.get(link)
        return spans[-1][1] if spans else 0.0

    def op(self, chips: range, name: str, track: str, dur_s: float, sram_s: float) -> None:
        """One op on every chip of `chips`, starting when all of them are ready (they run in lockstep)."""
        start = max(self.ready[c] for c in chips)
        for c in chips:
            if sram_s > 0:
                self.events.append(Event(c, "sram", name, start, sram_s, "sram"))
            self.events.append(Event(c, track, name, start, dur_s, "compute"))
            self.ready[c] = start + dur_s

    def transfers(self, name: str, pairs: list[tuple[int, int]], dur_s: float) -> None:
        """Point-to-point transfers that all start together once every sender is ready; each pair uses its
        own directed link, placed after any earlier claim on it."""
        start = max(self.ready[s] for s, _ in pairs)
        start = max([start] + [self.link_free_at((s, d)) for s, d in pairs])
        arrive: dict[int, float] = {}
        for s, d in pairs:
            self.reserve((s, d), start, start + dur_s)
            self.events.append(Event(s, f"link->{d}", name, start, dur_s, "transfer"))
            arrive[d] = start + dur_s
        for d, t in arrive.items():
            self.ready[d] = max(self.ready[d], t)

    def offload(self, name: str, chips: range, send_s: float, gpu_s: float, recv_s: float) -> None:
        """Each chip sends to the GPU over its own PCIe link, the GPU computes once, results come back."""
        start = max([self.ready[c] for c in chips] + [self.link_free_at((c, "gpu")) for c in chips])
        for c in chips:
            self.reserve((c, "gpu"), start, start + send_s)
            self.events.append(Event(c, "pcie", f"{name}.send", start, send_s, "transfer"))
        gpu_start = start + send_s
        self.events.append(Event(GPU_PID, "gpu", name, gpu_start, gpu_s, "compute"))
        back = gpu_start + gpu_s
        for c in chips:
            self.reserve(("gpu", c), back, back + recv_s)
            self.events.append(Event(GPU_PID, f"pcie->{c}", f"{name}.recv", back, recv_s, "transfer"))
            self.ready[c] = back + recv_s

    def makespan(self) -> float:
        return max(self.ready) if self.ready else 0.0

    def links_used(self, chip: int) -> int:
        """Distinct outbound chip-to-chip links chip `chip` uses."""
        return len({d for s, d in self._busy if s == chip and isinstance(d, int)})

    def assert_no_contention(self) -> None:
        """Re-check the invariant over the finished schedule (reserve() enforces it as it goes)."""
        for link, spans in self._busy.items():
            for (s0, e0), (s1, _) in zip(spans, spans[1:]):
                if s1 < e0:
                    raise LinkContentionError(f"link {link}: [{s0}, {e0}) overlaps a transfer starting at {s1}")


_TRACKS = {"mxm": 1, "vxm": 2, "mem": 3, "sram": 4, "pcie": 5, "gpu": 6}


def _tid(track: str) -> int:
    if track in _TRACKS:
        return _TRACKS[track]
    if track.startswith("link->"):
        return 100 + int(track.removeprefix("link->"))
    if track.startswith("pcie->"):
        return 100 + int(track.removeprefix("pcie->"))
    raise ValueError(f"unknown schedule track {track!r}")


def to_chrome_trace(events: list[Event], chip_labels: dict[int, str]) -> dict:
    """Chrome trace JSON (opens in Perfetto / chrome://tracing): one process per chip, one thread per unit
    or outbound link, complete ("X") events in microseconds."""
    out: list[dict] = []
    for pid, label in sorted(chip_labels.items()):
        out.append({"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": label}})
    seen: set[tuple[int, str]] = set()
    for e in events:
        if (e.chip, e.track) not in seen:
            seen.add((e.chip, e.track))
            out.append(
                {"ph": "M", "name": "thread_name", "pid": e.chip, "tid": _tid(e.track), "args": {"name": e.track}}
            )
        out.append(
            {
                "ph": "X",
                "name": e.name,
                "cat": e.category,
                "pid": e.chip,
                "tid": _tid(e.track),
                "ts": e.start_s * 1e6,
                "dur": e.dur_s * 1e6,
            }
        )
    return {"traceEvents": out, "displayTimeUnit": "ns"}
