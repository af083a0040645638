"""Record the engine requests a piece of code submits (a reflection's turns), through Engine.submit."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from metronome.engine import Engine, Request


@contextmanager
def recorded_submits(engine: Engine) -> Iterator[list[Request]]:
    """Within the block, every request `engine.submit` returns is appended to the list yielded."""
    requests: list[Request] = []
    submit = engine.submit

    def recording(*args, **kwargs) -> Request:
        requests.append(submit(*args, **kwargs))
        return requests[-1]

    engine.submit = recording
    try:
        yield requests
    finally:
        del engine.submit
