"""The compiled plan: a runner with its KV cache allocated once, the decode shape fixed, and the step's
latency measured before serving (`PlanReport`). The engine calls `prefill` and `decode`; nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from metronome.compile.runner import Runner
from metronome.config import EngineConfig, ModelConfig
from metronome.model.transformer import KVCache


class PlanError(ValueError):
    """A plan setting that cannot work (a named parameter and what to do)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class PlanReport:
    weights: str  # resolved weight format
    device: str
    slots: int
    ctx: int
    decode_mode: str  # "fixed" or "compact"
    weight_bytes: int  # bytes of weights read by one decode step (every matrix once, plus one embedding row)
    kv_cache_bytes: int
    step_ms: dict[int, float] = field(default_factory=dict)  # calibrated median step latency by live rows
    invariance: str = ""
    kernels: str = ""  # which ops run the glue (and why, when the C++ kernels were not used)
    cached: bool = False  # read from the plan cache (no packing, probe or calibration this time)

    def tokens_per_s(self, live: int) -> float:
        return 1000.0 / self.step_ms[live] if live in self.step_ms else float("nan")


class Plan:
    """The compiled model: `prefill` one request into its slot, `decode` one token for the live slots."""

    def __init__(
        self, runner: Runner, cfg: ModelConfig, config: EngineConfig, weights: str, cache: KVCache, report: PlanReport
    ) -> None:
        self.runner, self.cfg, self.config = runner, cfg, config
        self.weights, self.cache, self.report = weights, cache, report
        self.device = torch.device(config.device)

    @property
    def decode_mode(self) -> str:
        return self.runner.decode_mode

    @torch.inference_mode()
    def prefill(self, ids: list[int], slot: int, all_logits: bool = False) -> torch.Tensor:
        """Run a prompt into `slot` from position 0; logits of its last position (V,) float32 (all: (T, V))."""
        return self.runner.prefill(ids, slot, all_logits)

    @torch.inference_mode()
    def decode(self, slots: list[int], tokens: list[int], positions: list[int]) -> torch.Tensor:
        """One token for each row (slot, token, position): logits (rows, V) float32 in that order. Rows are one
        per live slot, ascending; a runner with `any_rows` also takes several rows of one slot (drafts)."""
        return self.runner.decode(slots, tokens, positions)
