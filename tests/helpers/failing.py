"""An engine whose next decode steps fail on cue, for tests of what a client sees when a step raises."""

from __future__ import annotations

from metronome.engine import Engine


class FailingDecodes:
    """`fails = FailingDecodes(engine)`; `fails.next(2)`: the engine's next 2 decode steps raise
    RuntimeError("simulated kernel failure"), then it decodes as before."""

    def __init__(self, engine: Engine, count: int = 0) -> None:
        self.left = count
        self._decode = engine.plan.decode
        engine.plan.decode = self._run

    def next(self, count: int) -> None:
        self.left = count

    def _run(self, *args, **kwargs):
        if self.left > 0:
            self.left -= 1
            raise RuntimeError("simulated kernel failure")
        return self._decode(*args, **kwargs)
