"""Two measurements a plan takes of itself at compile time, on the real weights:
- the batch-invariance probe, which decides the decode shape ("compact" or "fixed");
- calibration, the median step latency at each number of live slots (what the server promises), and the
  cost of a prompt row run beside them (chunked prefill: what a new prompt adds to everyone's step)."""

from __future__ import annotations

import time
from statistics import median
from typing import Callable

import torch

from metronome.compile.runner import Runner
from metronome.config import ModelConfig

NEAR_POSITION = 64  # where step_ms is calibrated (a short conversation)


def choose_decode_mode(runner: Runner, cfg: ModelConfig, slots: int) -> tuple[str, str]:
    """'compact' if each row's logits are bitwise the same whether 1 or all slots are live, else 'fixed'.
    Leaves `runner.decode_mode` at the answer; returns it with a sentence saying why."""
    if slots == 1:
        runner.decode_mode = "compact"
        return "compact", "one slot: nothing shares the batch"
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (slots,), generator=g).tolist()
    positions = [3 + 2 * s for s in range(slots)]
    runner.decode_mode = "compact"
    with torch.inference_mode():
        together = runner.decode(list(range(slots)), tokens, positions)
        for s in range(slots):
            alone = runner.decode([s], [tokens[s]], [positions[s]])
            if not torch.equal(alone[0], together[s]):
                runner.decode_mode = "fixed"
                return "fixed", f"rows differ between 1 and {slots} live slots (slot {s}): fixed shape M={slots}"
    return "compact", f"bitwise identical for 1 and {slots} live slots: compact rows"


def calibrate(
    runner: Runner, slots: int, ctx: int, device: torch.device, steps: int = 5, position: int = NEAR_POSITION
) -> dict[int, float]:
    """Median decode-step latency (ms) at each number of live slots, every row at `position` (attention
    reads that many cached tokens), from `steps` timed steps after a warm-up.

    Every row count is run once before any is timed: the first calls touch the weights' pages and the
    scratch buffers, and timing 1 slot first charged that to it (a 1-row step came out slower than 2)."""
    pos = min(position, ctx - 1)
    out = {}

    def run(live: int) -> None:
        rows = list(range(live))
        runner.decode(rows, [1] * live, [pos] * live)
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.inference_mode():
        for live in range(slots, 0, -1):  # warm-up
            run(live)
        for live in range(1, slots + 1):
            out[live] = _median_ms(lambda live=live: run(live), steps)
    return out


def far_position(ctx: int) -> int:
    """The second calibration position: a long conversation, within the context."""
    return max(NEAR_POSITION + 1, min(1024, ctx - 1))


def calibrate_prompt_rows(runner: Runner, slots: int, ctx: int, chunk: int, steps: int = 3) -> tuple[float, float]:
    """Median cost (ms) of one prompt row (a) beside a full batch of decode rows: the slope between a step of
    `slots - 1` decode rows and the same step with `chunk` prompt rows of another slot added (chunked
    prefill), and (b) alone, in a whole PREFILL_CHUNK of one prompt (nobody decoding). Runners that cannot
    mix rows run prompts apart: (NaN, alone)."""
    alone_rows = _alone_rows(ctx)
    with torch.inference_mode():
        ids = [1] * alone_rows
        runner.prefill(ids, 0)  # warm-up
        alone = _median_ms(lambda: runner.prefill(ids, 0), steps) / alone_rows
    if not runner.any_rows or slots < 2:
        return float("nan"), alone
    pos = min(64, ctx - 1)
    first = _first_prompt_row(ctx, chunk)
    decode = list(range(slots - 1))
    prompt_slot = slots - 1
    rows = decode + [prompt_slot] * chunk
    tokens = [1] * len(rows)
    positions = [pos] * len(decode) + list(range(first, first + chunk))
    logit_rows = list(range(len(decode)))
    with torch.inference_mode():
        runner.decode(decode, [1] * len(decode), [pos] * len(decode))  # warm-up
        runner.decode(rows, tokens, positions, logit_rows)
        base = _median_ms(lambda: runner.decode(decode, [1] * len(decode), [pos] * len(decode)), steps)
        mixed = _median_ms(lambda: runner.decode(rows, tokens, positions, logit_rows), steps)
    return max(0.0, mixed - base) / chunk, alone


def _alone_rows(ctx: int) -> int:
    return min(256, ctx - 1)


def _first_prompt_row(ctx: int, chunk: int) -> int:
    return min(256, max(0, ctx - chunk - 1))  # a prompt chunk partway in: its rows attend to earlier ones


def prompt_row_positions(ctx: int, chunk: int) -> tuple[float, float]:
    """The mean positions of the rows `calibrate_prompt_rows` times (beside decode rows, alone): a row's
    attention grows with its position, so its cost elsewhere is priced from there (PlanReport.prompt_rows_ms)."""
    return _first_prompt_row(ctx, chunk) + (chunk - 1) / 2, (_alone_rows(ctx) - 1) / 2


def _median_ms(fn: Callable[[], object], steps: int) -> float:
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return median(times)
