"""The engine plays a compiled plan: requests in fixed slots, one step at a time (schedule -> run -> sample -> emit)."""

from metronome.engine.engine import Engine
from metronome.engine.request import Completion, Constraint, Delta, QueueFullError, Request, RequestError, Timings

__all__ = ["Completion", "Constraint", "Delta", "Engine", "QueueFullError", "Request", "RequestError", "Timings"]
