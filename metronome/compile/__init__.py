"""Compile: a loaded model becomes a static plan (resolve -> build -> probe -> calibrate -> cache; stages.py).

`compile_plan` is the entry; `Plan` is what the engine runs, through one `Runner` (runner.py: the torch
model; fused.py: the C++ decoder)."""

from metronome.compile.plan import Plan, PlanError, PlanReport
from metronome.compile.stages import available_cores, compile_plan, default_ctx, resolve_settings

__all__ = ["Plan", "PlanError", "PlanReport", "available_cores", "compile_plan", "default_ctx", "resolve_settings"]
