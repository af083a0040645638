"""The compiled plan: a runner with its KV cache allocated once, the decode shape fixed, and the step's
latency measured before serving (`PlanReport`). The engine calls `prefill` and `decode`; nothing else."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from metronome.compile.probe import NEAR_POSITION
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
    step_ms_far: dict[int, float] = field(default_factory=dict)  # the same, every row at `far_position`
    far_position: int = 1024
    prompt_row_ms: float = float("nan")  # calibrated cost of one prompt row beside the decode rows (chunked prefill)
    prefill_row_ms: float = float("nan")  # ... and of one row of a prompt run alone (a whole chunk, nobody decoding)
    invariance: str = ""
    kernels: str = ""  # which ops run the glue (and why, when the C++ kernels were not used)
    cached: bool = False  # read from the plan cache (no packing, probe or calibration this time)
    prefix_cache_bytes: int = 0  # the prefix cache's pool (Plan.prefix_pool), allocated once; 0: none
    prefix_cache_note: str = ""  # why there is none, where it was asked for

    def tokens_per_s(self, live: int, position: float | None = None) -> float:
        """Each live request's promised decode speed with `live` requests decoding (no prompt arriving),
        at the calibration's near position, or at `position` (the rows' mean position) when given."""
        ms = self.step_ms.get(live, float("nan")) if position is None else self.step_ms_at(live, position)
        return 1000.0 / ms

    def step_ms_at(self, live: int, position: float) -> float:
        """Step latency with `live` decode rows at mean `position`: linear between the two calibrated
        positions (attention's cost grows with the tokens each row reads; the rest does not)."""
        near, far = self.step_ms.get(live, float("nan")), self.step_ms_far.get(live, float("nan"))
        if far != far:  # NaN: no far calibration
            return near
        return near + (far - near) * (position - NEAR_POSITION) / (self.far_position - NEAR_POSITION)

    def step_ms_with(self, live: int, prompt_rows: int) -> float:
        """Predicted latency of a step of `live` decode rows and `prompt_rows` prompt rows beside them."""
        if not live:
            return prompt_rows * self.prefill_row_ms
        base = self.step_ms.get(live, float("nan"))
        return base + prompt_rows * self.prompt_row_ms if prompt_rows else base

    def ttft_ms(self, prompts: list[int], decoding: int, chunk: int, alone_chunk: int) -> float:
        """Predicted time to the first token of the last of `prompts` (prompt rows still to run, in the order
        the engine runs them: the queue ahead, then this request) while `decoding` requests decode: the
        steps that chunked prefill takes, each priced by `step_ms_with`. A prompt that completes joins the
        decode rows. NaN without calibration."""
        total, live = 0.0, min(decoding, self.slots)
        remaining = list(prompts)
        while remaining:
            budget = chunk if live else alone_chunk
            taken = finished = 0
            while remaining and taken < budget:
                rows = min(remaining[0], budget - taken)
                taken += rows
                remaining[0] -= rows
                if remaining[0] == 0:
                    remaining.pop(0)
                    finished += 1
            total += self.step_ms_with(live, taken)
            live = min(self.slots, live + finished)
        return total


# Tokens per page of the prefix cache's pool: a prompt is reused in whole pages. Smaller pages reuse more of
# a prompt (up to page - 1 tokens are recomputed) and cost more copies per token (docs/prefix-cache.md).
PREFIX_PAGE_TOKENS = 16


class Plan:
    """The compiled model: `prefill` one request into its slot, `decode` one token for the live slots.
    `prefix_pool`: pages of KV for the engine's prefix cache (engine/prefix_cache.py), or None."""

    def __init__(
        self,
        runner: Runner,
        cfg: ModelConfig,
        config: EngineConfig,
        weights: str,
        cache: KVCache,
        report: PlanReport,
        prefix_pool: KVCache | None = None,
    ) -> None:
        self.runner, self.cfg, self.config = runner, cfg, config
        self.weights, self.cache, self.report = weights, cache, report
        self.prefix_pool = prefix_pool
        self.device = torch.device(config.device)

    @property
    def decode_mode(self) -> str:
        return self.runner.decode_mode

    @torch.inference_mode()
    def prefill(self, ids: list[int], slot: int, all_logits: bool = False) -> torch.Tensor:
        """Run a prompt into `slot` from position 0; logits of its last position (V,) float32 (all: (T, V))."""
        return self.runner.prefill(ids, slot, all_logits)

    @torch.inference_mode()
    def decode(
        self, slots: list[int], tokens: list[int], positions: list[int], logit_rows: list[int] | None = None
    ) -> torch.Tensor:
        """One token for each row (slot, token, position): logits (rows, V) float32 in that order (only of
        `logit_rows` when given). Rows are one per live slot, ascending; a runner with `any_rows` also takes
        several rows of one slot (drafts) and prompt tokens beside the decode rows (chunked prefill)."""
        return self.runner.decode(slots, tokens, positions, logit_rows)
