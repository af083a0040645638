"""The bench sweep settings its tests start from: a short workload, one round, no sampling."""

from __future__ import annotations

from metronome.bench.client import Api
from metronome.bench.runner import SweepConfig
from metronome.bench.workloads import resolve_workload


def sweep_config(**overrides: object) -> SweepConfig:
    values: dict = dict(
        workload=resolve_workload("short", input_tokens=40, output_tokens=120),
        concurrency=(1,),
        rounds=1,
        requests_per_user=2,
        warmup=1,
        seed=0,
        api=Api.COMPLETIONS,
        ignore_eos=True,
        temperature=0.0,
        request_timeout_s=30.0,
    )
    values.update(overrides)
    return SweepConfig(**values)
