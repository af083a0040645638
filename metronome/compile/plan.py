"""The compiled plan: a runner with its KV cache allocated once, the decode shape fixed, and the step's
latency measured before serving (`PlanReport`). The engine calls `prefill` and `decode`; nothing else."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from metronome.compile.pages import Pages
from metronome.compile.probe import DEFAULT_PREFILL_CHUNK, NEAR_POSITION
from metronome.compile.runner import Runner
from metronome.config import EngineConfig, ModelConfig
from metronome.kernels.ops import DrawRows
from metronome.model.transformer import KVCache

# When the plan chooses how many prompt rows run beside decode rows (EngineConfig.prefill_chunk None), a
# step that carries them is priced at this many all-slots steps: a decoding user's gap while a prompt arrives
# stays within #11's bound of 3, with half a step of room because these VMs drift: the same mixed steps ran
# 0.79x to 1.11x their price from one repeat to the next (2026-12-04, docs/performance.md).
STALL_STEPS = 2.5


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
    kv_cache_format: str = ""  # the cache's dtype: "bfloat16", "float32", or "int8" (rows of bytes and scales)
    step_ms: dict[int, float] = field(default_factory=dict)  # calibrated median step latency by live rows
    step_ms_far: dict[int, float] = field(default_factory=dict)  # the same, every row at `far_position`
    far_position: int = 1024
    prompt_row_ms: float = float("nan")  # calibrated cost of one prompt row beside the decode rows (chunked prefill)
    prefill_row_ms: float = float("nan")  # ... and of one row of a prompt run alone (nobody decoding), beyond the
    # one-row step (step_ms[1]) that every such call pays: its weights are read whatever the rows
    prompt_row_position: float = 0.0  # the mean position of the rows prompt_row_ms was calibrated on
    prefill_row_position: float = 0.0  # ... and of prefill_row_ms's
    prompt_row_ms_far: float = float("nan")  # prompt_row_ms deep into the prompt, its rows' mean position:
    prompt_row_far_position: float = 0.0
    invariance: str = ""
    kernels: str = ""  # which ops run the glue (and why, when the C++ kernels were not used)
    # the chunks each matrix is cut in (tensor parallel, or --tp-shards at tp=1): the order of its sums, so
    # its outputs' bits; 1: the plain one-process plan
    shards: int = 1
    # the CPUs the compute threads are pinned to, one each: the calling thread's first (the engine pins its own
    # thread there), the kernels' pool workers on the rest; (): placed by the OS (compile/stages.py)
    cpus: tuple[int, ...] = ()
    cached: bool = False  # read from the plan cache (no packing, probe or calibration this time)
    prefix_cache_bytes: int = 0  # the prefix cache's pool (Plan.pages), allocated once; 0: none
    prefix_cache_note: str = ""  # why there is none, where it was asked for
    warnings: tuple[str, ...] = ()  # what a user should hear about: C++ kernels unavailable, a plan not saved

    def tokens_per_s(self, live: int, position: float | None = None) -> float:
        """Each live request's promised decode speed with `live` requests decoding (no prompt arriving),
        at the calibration's near position, or at `position` (the rows' mean position) when given."""
        ms = self.step_ms.get(live, float("nan")) if position is None else self.step_ms_at(live, position)
        return 1000.0 / ms

    def step_ms_at(self, live: int, position: float) -> float:
        """Step latency with `live` decode rows at mean `position`: on the line through the two calibrated
        positions (attention's cost grows with the tokens each row reads; the rest does not), never falling
        with position. Below the near position the line runs on toward the step without attention; where
        its slope is so steep that it would reach zero there (noise in a tiny model's sub-millisecond steps:
        a step priced below zero promised a negative speed), it holds at the near figure instead."""
        near, far = self.step_ms.get(live, float("nan")), self.step_ms_far.get(live, float("nan"))
        if far != far or self.far_position <= NEAR_POSITION:  # NaN: no far calibration
            return near
        slope = max(0.0, (far - near) / (self.far_position - NEAR_POSITION))
        if near - slope * NEAR_POSITION <= 0:
            position = max(position, NEAR_POSITION)
        return near + slope * (position - NEAR_POSITION)

    @property
    def key_ms(self) -> float:
        """What one more cached token costs one row's attention (ms): the slope between the 1-slot steps
        calibrated near and far into the context. 0 without the far calibration."""
        near, far = self.step_ms.get(1, float("nan")), self.step_ms_far.get(1, float("nan"))
        if near != near or far != far or self.far_position <= NEAR_POSITION:
            return 0.0
        return max(0.0, (far - near) / (self.far_position - NEAR_POSITION))

    @property
    def prompt_key_ms(self) -> float:
        """What one more cached token costs a prompt row (ms): the slope between the prompt rows calibrated
        near a prompt's start and deep into it. A chunk's rows read the earlier keys together, so this is
        well below a decode row's `key_ms`, which stands in where the far figure is missing (older plans)."""
        near, far = self.prompt_row_ms, self.prompt_row_ms_far
        span = self.prompt_row_far_position - self.prompt_row_position
        if near != near or far != far or span <= 0:
            return self.key_ms
        return max(0.0, (far - near) / span)

    def prompt_rows_ms(self, start: int, rows: int, alone: bool = False) -> float:
        """The cost of rows [start, start + rows) of one prompt: the calibrated cost of a prompt row (beside
        decode rows, or `alone`), plus what attending to more (or fewer) cached tokens than the calibration's
        rows did adds (`prompt_key_ms`). A row 1,300 tokens into a prompt costs more than a row at its start,
        which is why a step's prompt budget is priced by position (`take_prompt_rows`)."""
        base, at = (
            (self.prefill_row_ms, self.prefill_row_position)
            if alone
            else (self.prompt_row_ms, self.prompt_row_position)
        )
        if rows <= 0:
            return 0.0
        mean = start + (rows - 1) / 2
        return rows * max(0.1 * base, base + self.prompt_key_ms * (mean - at))

    def prompt_budget_ms(self, live: int, position: float | None = None) -> float:
        """What the prompt rows of a step beside `live` decode rows may cost when the plan chooses its chunk:
        the step stays within STALL_STEPS all-slots steps, less what the decode rows cost themselves (both at
        the decode rows' mean `position`). With fewer users decoding, their own rows cost less and a prompt
        takes more rows per step. NaN without calibration."""
        unit = self.prompt_rows_ms(0, 1)
        if unit != unit:  # NaN: prompt rows not calibrated
            return float("nan")
        if position is None:
            full, own = self.step_ms.get(self.slots, float("nan")), self.step_ms.get(live, float("nan"))
        else:
            full, own = self.step_ms_at(self.slots, position), self.step_ms_at(live, position)
        # every slot's step costs at least one with fewer: a calibration that says otherwise (another process
        # on the cores, compile/probe.py's calibration_problem) left no budget, and a prompt one row a step
        return STALL_STEPS * max(full, own) - own

    def take_step_prompts(
        self,
        queue: Sequence[tuple[int, int]],
        live: int,
        chunk: int | None,
        alone_chunk: int,
        position: float | None = None,
        slack_ms: Sequence[float] | None = None,
    ) -> list[int]:
        """The engine's rule for how many rows each prompt of `queue` (as in `take_prompt_rows`) runs in a
        step beside `live` decode rows at mean `position`. Nobody decoding: whole `alone_chunk`s. A `chunk`:
        that many rows' worth at a prompt's start. None: the plan's choice, what `prompt_budget_ms` leaves,
        at most `alone_chunk` rows; DEFAULT_PREFILL_CHUNK rows where the plan was not calibrated. With
        `slack_ms`, no prompt's rows join the step where that would break an earlier one's promise
        (`keep_promises`)."""
        if not live:
            taken = self.take_prompt_rows(queue, alone_chunk, priced=False)
        else:
            budget = self.prompt_budget_ms(live, position) if chunk is None else float("nan")
            if budget != budget:
                taken = self.take_prompt_rows(queue, chunk or DEFAULT_PREFILL_CHUNK, priced=True)
            else:
                taken = self.take_prompt_rows(queue, alone_chunk, priced=True, budget_ms=budget)
        return taken if slack_ms is None else self.keep_promises(queue, taken, live, position, slack_ms)

    def keep_promises(
        self,
        queue: Sequence[tuple[int, int]],
        taken: list[int],
        live: int,
        position: float | None,
        slack_ms: Sequence[float],
    ) -> list[int]:
        """`taken` (take_step_prompts' rows for each prompt of `queue`) cut back so that the step ends within
        the promise of every prompt it finishes. A prompt's rows join a step only after every prompt ahead
        of it has its last rows there (take_prompt_rows), so each prompt beyond the first lengthens a step
        that ends those prompts: it is left for a later step where the step, priced with its rows, would run
        past the time left to one of them (`slack_ms`, plan ms; NaN or infinite where there is no promise).
        The first prompt always runs, and a promise whose time has passed holds back no one: under overload,
        holding every later prompt back for it would leave one prompt a step, and the queue would grow for
        want of the rows it left out."""
        for i in range(1, len(taken)):
            if not taken[i]:
                break
            live_promises = [slack for slack in slack_ms[:i] if slack > 0]  # False for NaN: no promise there
            rows = [(start, n) for (start, _), n in zip(queue[: i + 1], taken[: i + 1])]
            if live_promises and self.step_ms_with(live, rows, position) > min(live_promises):  # NaN: no price
                return taken[:i] + [0] * (len(taken) - i)
        return taken

    def take_prompt_rows(
        self, queue: Sequence[tuple[int, int]], budget_rows: int, priced: bool, budget_ms: float | None = None
    ) -> list[int]:
        """How many rows each prompt of `queue` runs this step: `queue` holds (next position, rows left) per
        prompt, oldest first, and they take rows in that order, at most `budget_rows` in all. Unpriced
        (nobody decoding, or no calibration): `budget_rows` rows. Priced: rows worth `budget_ms`, or the time
        of `budget_rows` prompt rows at position 0, so that a prompt's late rows, which attend to more, come
        in smaller chunks and the decode rows beside them wait no longer; at least one row, so that a prompt
        always advances."""
        unit = self.prompt_rows_ms(0, 1)
        priced = priced and unit == unit  # NaN: not calibrated
        left_rows, left_ms = budget_rows, 0.0
        if priced:
            left_ms = budget_rows * unit if budget_ms is None else budget_ms
        taken: list[int] = []
        for start, rows in queue:
            if priced:
                lo, hi = 0, min(rows, left_rows)
                while lo < hi:  # the most rows within the time left (a row's cost grows with its position)
                    mid = (lo + hi + 1) // 2
                    if self.prompt_rows_ms(start, mid) <= left_ms * (1 + 1e-9):
                        lo = mid
                    else:
                        hi = mid - 1
                n = lo if lo or any(taken) else min(1, rows)
                left_ms -= self.prompt_rows_ms(start, n)
            else:
                n = min(rows, left_rows)
            left_rows -= n
            taken.append(n)
            if n < rows:
                break
        return taken + [0] * (len(queue) - len(taken))

    def step_ms_with(self, live: int, prompts: Sequence[tuple[int, int]] = (), position: float | None = None) -> float:
        """Predicted latency of a step of `live` decode rows and the prompt rows `prompts` beside them, as
        (first position, rows) per prompt; with nobody decoding, a one-row step (the weights' read, which a
        short prompt's rows cannot hide) plus the prompt rows alone. `position`: the decode rows' mean
        position (`step_ms_at`; None: the calibration's near position)."""
        if not live:
            if not prompts:
                return 0.0
            return self.step_ms.get(1, float("nan")) + sum(
                self.prompt_rows_ms(start, rows, alone=True) for start, rows in prompts
            )
        base = self.step_ms.get(live, float("nan")) if position is None else self.step_ms_at(live, position)
        return base + sum(self.prompt_rows_ms(start, rows) for start, rows in prompts)

    def prefill_steps_ms(
        self,
        prompts: list[tuple[int, int]],
        decoding: int,
        chunk: int | None,
        alone_chunk: int,
        position: float | None = None,
        slack_ms: Sequence[float] | None = None,
    ) -> list[float]:
        """The predicted latency of each step until the last of `prompts` ((next position, rows left) per
        prompt, in the order the engine runs them: the queue ahead, then this request) is in the cache, while
        `decoding` requests decode, their rows at mean `position` (None: the calibration's near position):
        the steps that chunked prefill takes (`take_step_prompts`, as the engine takes them), each priced by
        `step_ms_with`. A prompt that completes joins the decode rows. NaN prices without calibration.
        `slack_ms`: each prompt's time left to its promised first token (plan ms; see `keep_promises`),
        which shrinks by each step's price as the steps go by."""
        steps, live = [], min(decoding, self.slots)
        entries = [
            (start, rows, slack) for (start, rows), slack in zip(prompts, _slacks(prompts, slack_ms)) if rows > 0
        ]
        while entries:
            queue = [(start, rows) for start, rows, _ in entries]
            slacks = [slack for _, _, slack in entries]
            taken = self.take_step_prompts(queue, live, chunk, alone_chunk, position, slacks)
            price = self.step_ms_with(live, [(start, n) for (start, _), n in zip(queue, taken) if n], position)
            steps.append(price)
            entries = [(start + n, rows - n, slack - price) for (start, rows, slack), n in zip(entries, taken)]
            finished = sum(1 for _, rows, _ in entries if rows == 0)
            entries = [e for e in entries if e[1] > 0]
            live = min(self.slots, live + finished)
        return steps

    def ttft_ms(
        self,
        prompts: list[tuple[int, int]],
        decoding: int,
        chunk: int | None,
        alone_chunk: int,
        position: float | None = None,
        slack_ms: Sequence[float] | None = None,
    ) -> float:
        """Predicted time to the first token of the last of `prompts`: its `prefill_steps_ms`, summed."""
        return sum(self.prefill_steps_ms(prompts, decoding, chunk, alone_chunk, position, slack_ms), 0.0)


def _slacks(prompts: Sequence[tuple[int, int]], slack_ms: Sequence[float] | None) -> list[float]:
    """One slack per prompt: `slack_ms`, or none promised (infinite) where it is not given."""
    if slack_ms is None:
        return [float("inf")] * len(prompts)
    if len(slack_ms) != len(prompts):
        raise ValueError(f"slack_ms has {len(slack_ms)} entries for {len(prompts)} prompts: give one per prompt")
    return list(slack_ms)


# Tokens per page of the prefix cache's pool: a prompt is reused in whole pages. Smaller pages reuse more of
# a prompt (up to page - 1 tokens are recomputed) and cost more copies per token (docs/prefix-cache.md).
PREFIX_PAGE_TOKENS = 16


class Plan:
    """The compiled model: `prefill` one request into its slot, `decode` one token for the live slots.
    `pages`: the pool of KV pages for the engine's prefix cache (compile/pages.py, engine/prefix_cache.py),
    or None. `draw_rows`: the kernel the engine's samplers draw sampled CPU rows with, or None (torch)."""

    def __init__(
        self,
        runner: Runner,
        cfg: ModelConfig,
        config: EngineConfig,
        weights: str,
        cache: KVCache,
        report: PlanReport,
        pages: Pages | None = None,
        draw_rows: DrawRows | None = None,
    ) -> None:
        self.runner, self.cfg, self.config = runner, cfg, config
        self.weights, self.cache, self.report = weights, cache, report
        self.pages = pages
        self.draw_rows = draw_rows  # the C++ kernel that draws sampled rows (None: torch draws them)
        self.device = torch.device(config.device)
        self.last_call = time.perf_counter()  # when a call last ended: the engine's idle time (Engine._resume_ms)

    @property
    def decode_mode(self) -> str:
        return self.runner.decode_mode

    @torch.inference_mode()
    def prefill(self, ids: list[int], slot: int, all_logits: bool = False) -> torch.Tensor:
        """Run a prompt into `slot` from position 0; logits of its last position (V,) float32 (all: (T, V))."""
        try:
            return self.runner.prefill(ids, slot, all_logits)
        finally:
            self.last_call = time.perf_counter()

    @torch.inference_mode()
    def prefill_hidden(self, ids: list[int], slot: int) -> torch.Tensor:
        """Run a prompt as `prefill` does; the last layer's output at every position (T, D), which `head`
        turns into logits a few rows at a time (all T rows' logits at once are T x V floats: 1.2 GB for
        2,000 tokens of a 152k vocabulary)."""
        try:
            return self.runner.prefill_hidden(ids, slot)
        finally:
            self.last_call = time.perf_counter()

    @torch.inference_mode()
    def head(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of `prefill_hidden`'s output (M, D) -> logits (M, V) float32 (the last row's are `prefill`'s)."""
        try:
            return self.runner.head(x)
        finally:
            self.last_call = time.perf_counter()

    @torch.inference_mode()
    def decode(
        self, slots: list[int], tokens: list[int], positions: list[int], logit_rows: list[int] | None = None
    ) -> torch.Tensor:
        """One token for each row (slot, token, position): logits (rows, V) float32 in that order (only of
        `logit_rows` when given). Rows are one per live slot, ascending; a runner with `any_rows` also takes
        several rows of one slot (drafts) and prompt tokens beside the decode rows (chunked prefill)."""
        try:
            return self.runner.decode(slots, tokens, positions, logit_rows)
        finally:
            self.last_call = time.perf_counter()
