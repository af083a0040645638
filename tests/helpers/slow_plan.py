"""A plan that runs slower than its calibration, for the engine's pace and promises."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def slowed_plan(engine, seconds: float) -> Iterator[None]:
    """Every `engine.plan.decode` call sleeps `seconds` first (a machine slower than the plan's calibration)."""
    decode = engine.plan.decode

    def slow(*args, **kwargs):
        time.sleep(seconds)
        return decode(*args, **kwargs)

    engine.plan.decode = slow
    try:
        yield
    finally:
        del engine.plan.decode  # the instance attribute: the plan's own method again
