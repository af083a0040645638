"""Fleet planner: compile a model onto LPU, GPU and hybrid fleets and predict speed and cost (docs/planner.md).

Modules: catalog (hardware data files), shapes (model sizes), ops (the layer dataflow program), schedule
(list scheduler over units, links and ports; contention; Chrome trace), lpu (partition, per-chip schedule,
pipeline schedule), gpu (calibrated roofline), hybrid (GPU+LPU fleets, scheduled KV hand-off), frontier
(sweeps, Pareto, plot), validation (leave-one-out against published figures), calibrate (metronome's own
speed on this machine), machine (the measured machine as a target), render (trace as SVG), cli.
"""

from metronome.fleet.catalog import Hardware, HardwareKind, load_hardware
from metronome.fleet.costs import Candidate, Kind, Workload
from metronome.fleet.lpu import LpuOptions, LpuPlan, build_schedule, chrome_trace, compile_lpu, min_chips
from metronome.fleet.machine import measure_machine, predict_decode_tokens_per_s
from metronome.fleet.shapes import ModelShape, builtin_shapes, load_shape

__all__ = [
    "Candidate",
    "Hardware",
    "HardwareKind",
    "Kind",
    "LpuOptions",
    "LpuPlan",
    "ModelShape",
    "Workload",
    "build_schedule",
    "builtin_shapes",
    "chrome_trace",
    "compile_lpu",
    "load_hardware",
    "load_shape",
    "measure_machine",
    "min_chips",
    "predict_decode_tokens_per_s",
]
