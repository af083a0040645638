"""A stalled model on cue, for server tests that need requests to stay where they are."""

from __future__ import annotations

import threading

from metronome.engine import Engine
from metronome.engine.request import Request


class Gate:
    """Holds the engine inside its decode step until opened (the wait is bounded: 60 s); keeps the requests
    submitted to the engine, in order."""

    def __init__(self, engine: Engine) -> None:
        self.opened = threading.Event()
        self.submitted: list[Request] = []
        self._decode, self._submit = engine.plan.decode, engine.submit
        engine.plan.decode, engine.submit = self.decode, self.submit

    def decode(self, *args, **kwargs):
        self.opened.wait(timeout=60)
        return self._decode(*args, **kwargs)

    def submit(self, *args, **kwargs) -> Request:
        self.submitted.append(self._submit(*args, **kwargs))
        return self.submitted[-1]
