"""What a configuration costs: the workload, the candidate record every target produces, $ per million tokens."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from metronome.fleet.lpu import LpuPlan

SECONDS_PER_HOUR = 3600.0


class Kind(enum.Enum):
    GPU = "gpu"
    LPU = "lpu"
    PREFILL_GPU_DECODE_LPU = "prefill-gpu+decode-lpu"
    ATTENTION_GPU_PROJECTIONS_LPU = "attention-gpu+projections-lpu"


@dataclass(frozen=True)
class Workload:
    """One request: `prompt` tokens in, `output` tokens out. The KV cache holds prompt + output."""

    prompt: int = 1000
    output: int = 1000

    def __post_init__(self) -> None:
        if self.prompt < 0 or self.output < 1:
            raise ValueError(
                f"--prompt {self.prompt}, --output {self.output}: the prompt must be >= 0 tokens and the output >= 1"
            )

    @property
    def context(self) -> int:
        return self.prompt + self.output


@dataclass(frozen=True)
class Candidate:
    """One deployable configuration of one kind, with its speed and price."""

    kind: Kind
    layout: str  # human summary, e.g. "tsp-v1 x576 (tp8 x 72 stages)"
    lpu_chips: int
    gpus: int
    batch: int  # sequences per step (per micro-batch on an LPU pipeline)
    per_user_tokens_per_s: float
    aggregate_tokens_per_s: float
    ttft_s: float
    power_w: float
    usd_per_hour: float
    cost_per_mtok: float  # US dollars per million output tokens, prefill of their prompts included
    lpu_plan: LpuPlan | None = field(default=None, compare=False, repr=False)  # for traces
    handoff_s: float = 0.0  # prefill-gpu+decode-lpu: KV cache hand-off after prefill (in TTFT and cost)
    handoff_events: tuple = field(default=(), compare=False, repr=False)  # its schedule, for traces


def cost_per_million(parts: list[tuple[float, float]], output_tokens: int) -> float:
    """$ per million output tokens from [(fleet $/hour, fleet seconds spent per request)]."""
    usd = sum(rate / SECONDS_PER_HOUR * seconds for rate, seconds in parts)
    return usd / output_tokens * 1e6
