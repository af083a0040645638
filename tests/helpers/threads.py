"""Where this process's threads may run: Linux's per-thread CPU lists (/proc/self/task/<tid>/status)."""

from __future__ import annotations

import os


def cpu_list(text: str) -> set[int]:
    """Linux's CPU list ("0-3,6") as a set."""
    cpus: set[int] = set()
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def thread_cpus(tid: int) -> set[int]:
    """The CPUs thread `tid` of this process may run on."""
    with open(f"/proc/self/task/{tid}/status") as f:
        line = next(x for x in f if x.startswith("Cpus_allowed_list:"))
    return cpu_list(line.split(":", 1)[1])


def workers_cpus() -> list[set[int]]:
    """The CPUs each of this process's kernel pool workers (threads named metronome-pool) may run on."""
    found = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                if f.read().strip() == "metronome-pool":
                    found.append(thread_cpus(int(tid)))
        except FileNotFoundError:  # a thread that ended while the list was read
            continue
    return found
