"""Two measurements a plan takes of itself at compile time, on the real weights:
- the batch-invariance probe, which decides the decode shape ("compact" or "fixed");
- calibration, the median step latency at each number of live slots (what the server promises), and the
  cost of a prompt row run beside them (chunked prefill: what a new prompt adds to everyone's step), all
  timed in interleaved rounds (`calibrate`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from statistics import median
from typing import Callable

import torch

from metronome.compile.runner import Runner
from metronome.config import ModelConfig

NEAR_POSITION = 64  # where step_ms is calibrated (a short conversation)
# the prompt rows calibration times beside decode rows when the plan chooses its own chunk
# (EngineConfig.prefill_chunk None), and the chunk of a plan that was not calibrated
DEFAULT_PREFILL_CHUNK = 32


class NonFiniteLogits(ValueError):
    """A model whose logits are NaN or infinite (choose_decode_mode): its file, not the plan, is at fault."""


def choose_decode_mode(runner: Runner, cfg: ModelConfig, slots: int, ctx: int) -> tuple[str, str]:
    """'compact' if each row's logits are bitwise the same whether 1 or all slots are live, else 'fixed'.
    Leaves `runner.decode_mode` at the answer; returns it with a sentence saying why. Logits that are not
    finite are the model's fault (NaN or inf weights, an impossible norm epsilon or rope base): a
    NonFiniteLogits naming it, where NaN (never equal to itself) read as rows that differ, a kernel bug."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (slots,), generator=g).tolist()
    positions = [min(3 + 2 * s, ctx - 1) for s in range(slots)]  # within the context (16 tokens at least)
    runner.decode_mode = "compact"
    with torch.inference_mode():
        together = runner.decode(list(range(slots)), tokens, positions)
        if not bool(torch.isfinite(together).all()):
            raise NonFiniteLogits(
                "the model's logits are NaN or infinite for random tokens: its weights or settings (norm epsilon, "
                "rope base) are damaged; re-download or re-export the model"
            )
        if slots == 1:
            return "compact", "one slot: nothing shares the batch"
        for s in range(slots):
            alone = runner.decode([s], [tokens[s]], [positions[s]])
            if not torch.equal(alone[0], together[s]):
                runner.decode_mode = "fixed"
                return "fixed", f"rows differ between 1 and {slots} live slots (slot {s}): fixed shape M={slots}"
    return "compact", f"bitwise identical for 1 and {slots} live slots: compact rows"


CALIBRATION_ROUNDS = 5
# How long a figure runs untimed before one call of it is timed, and the most calls that may take. On the
# Intel Xeon VMs a 1-row SmolLM2 step took 5.3-6.1 ms right after a 256-row prompt call or a 100 ms sleep,
# and came down call after call to 2.8 ms over 10-13 calls (40-50 ms); after an 8-row step it took 3.0 ms
# at once (2026-12-03). A stream's steps run back to back, so the warm figure is the one its user sees; timed
# cold, as the first figure of each round was, the plan promised 5.0 ms for one live slot and 4.9 for two.
WARM_MS = 50.0
WARM_CALLS = 16


def time_warm(fn: Callable[[], object], device: torch.device, calls: int = 1) -> list[float]:
    """The times (ms) of `calls` calls of `fn`, after running it untimed for WARM_MS (at least once, at most
    WARM_CALLS times): what it costs in a run of calls like it, not right after something else or a pause."""
    if calls < 1:
        raise ValueError(f"calls={calls}: time at least one call")
    until = time.perf_counter() + WARM_MS / 1000
    for _ in range(WARM_CALLS):
        fn()
        _sync(device)
        if time.perf_counter() >= until:
            break
    times = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1000)
    return times


@dataclass(frozen=True)
class Calibration:
    """What a plan promises, in ms: its step at each number of live slots near the start of a conversation
    and deep into it (`far_position`), and one prompt row's cost beside the decode rows and alone."""

    step_ms: dict[int, float]
    step_ms_far: dict[int, float]
    prompt_row_ms: float  # NaN for runners that cannot mix prompt and decode rows
    prefill_row_ms: float  # a prompt row alone, beyond the one-row step (the weights' read) its call pays
    prompt_row_ms_far: float  # a prompt row beside decode rows, deep into its prompt (NaN as prompt_row_ms)


def calibrate(
    runner: Runner, slots: int, ctx: int, device: torch.device, chunk: int | None, rounds: int = CALIBRATION_ROUNDS
) -> Calibration:
    """Time every figure of the plan's promise, interleaved: each round times one of each (every live-slot
    count near and far, a step with `chunk` prompt rows beside `slots - 1` decode rows, near a prompt's start
    and deep into it, the same step without them, a whole prompt chunk alone), and each figure is its median
    over the rounds.

    Prompt rows get their own far figure: a chunk's rows read the earlier keys together, so a prompt row's
    cost grows with its position far more slowly than a decode row's (which reads them alone): priced by the
    decode rows' slope, a SmolLM2 chunk 1,000 tokens in was predicted at 36 ms and took 20 (2026-12-01).

    Why interleaved: these VMs' speed drifts by 2-3x from one minute to the next (2026-12-01). Timed one
    figure after another, a slow minute landed on some figures and not others, and the ratios the engine
    prices prompt chunks by (a late prompt row against an early one, a prompt row against a decode step)
    came out wrong; a drift now moves every figure of a round alike. Every figure is run once before any
    is timed: the first calls touch the weights' pages and the scratch buffers (timing 1 slot first
    charged that to it, and a 1-row step came out slower than 2). And each figure is timed warm (`time_warm`):
    a short step right after a long call or a pause runs slow for a few calls on these VMs."""
    near, far = min(NEAR_POSITION, ctx - 1), min(far_position(ctx), ctx - 1)
    chunk = calibrated_chunk(ctx, chunk)

    def step(live: int, position: int) -> Callable[[], object]:
        rows = list(range(live))
        return lambda: runner.decode(rows, [1] * live, [position] * live)

    figures: dict[tuple[str, int], Callable[[], object]] = {}
    for live in range(1, slots + 1):
        figures[("near", live)] = step(live, near)
        figures[("far", live)] = step(live, far)
    alone_rows = _alone_rows(ctx)
    figures[("alone", alone_rows)] = lambda: runner.prefill([1] * alone_rows, 0)
    mixing = runner.any_rows and slots >= 2
    if mixing:  # chunked prefill: `chunk` rows of a prompt partway in, beside slots - 1 decode rows
        pos, decode = min(64, ctx - 1), list(range(slots - 1))
        rows, logit_rows = decode + [slots - 1] * chunk, list(range(len(decode)))

        def mixed(first: int) -> Callable[[], object]:
            positions = [pos] * len(decode) + list(range(first, first + chunk))
            return lambda: runner.decode(rows, [1] * len(rows), positions, logit_rows)

        figures[("base", 0)] = lambda: runner.decode(decode, [1] * len(decode), [pos] * len(decode))
        figures[("mixed", 0)] = mixed(_first_prompt_row(ctx, chunk))
        figures[("mixed", 1)] = mixed(_far_prompt_row(ctx, chunk))
    times: dict[tuple[str, int], list[float]] = {key: [] for key in figures}
    with torch.inference_mode():
        for fn in figures.values():  # warm-up
            fn()
        _sync(device)
        for _ in range(rounds):
            for key, fn in figures.items():
                times[key] += time_warm(fn, device)
    ms = {key: median(values) for key, values in times.items()}

    def per_prompt_row(far: int) -> float:
        return max(0.0, ms[("mixed", far)] - ms[("base", 0)]) / chunk if mixing else float("nan")

    return Calibration(
        step_ms={live: ms[("near", live)] for live in range(1, slots + 1)},
        step_ms_far={live: ms[("far", live)] for live in range(1, slots + 1)},
        prompt_row_ms=per_prompt_row(0),
        prefill_row_ms=max(0.0, ms[("alone", alone_rows)] - ms[("near", 1)]) / alone_rows,
        prompt_row_ms_far=per_prompt_row(1),
    )


# A step with more live slots costs at least one with fewer, and deep into a conversation at least what it
# costs near its start. A calibration that broke this by more than MIN_CONSISTENT (and CONSISTENT_SLACK_MS,
# the timer's and the scheduler's noise on sub-millisecond steps) was taken while something else held the
# cores: on 2026-12-08 a plan compiled on the 2-core Xeon VM while other metronome processes ran there priced
# SmolLM2's step at 20.4 ms for one live slot and 7.7 ms for eight. Saved, it stayed wrong on every later
# start, and the engine, which sizes a prompt's chunk beside decode rows by those figures' ratio, gave a
# second user's prompt one row a step (its first token waited for the first user's whole answer). Quiet
# calibrations on these VMs kept every such ratio at 0.94 or more (docs/performance.md, 2026-12-08).
MIN_CONSISTENT = 0.8
CONSISTENT_SLACK_MS = 0.5
CALIBRATION_TRIES = 3


def calibration_problem(step_ms: dict[int, float], step_ms_far: dict[int, float]) -> str | None:
    """What makes a calibration's step times unbelievable (more slots timed faster than fewer, far faster
    than near, beyond noise), in a sentence; None where they hold together."""

    def below(more: float, fewer: float) -> bool:
        return more < MIN_CONSISTENT * fewer - CONSISTENT_SLACK_MS

    for where, figures in (("near the context's start", step_ms), ("deep into the context", step_ms_far)):
        live = sorted(figures)
        for i, fewer in enumerate(live):
            for more in live[i + 1 :]:
                if below(figures[more], figures[fewer]):
                    return (
                        f"{more} live slots timed {figures[more]:.1f} ms a step and {fewer} "
                        f"{figures[fewer]:.1f} ms ({where})"
                    )
    for live in sorted(step_ms.keys() & step_ms_far.keys()):
        if below(step_ms_far[live], step_ms[live]):
            return (
                f"{live} live slots timed {step_ms_far[live]:.1f} ms a step deep into the context and "
                f"{step_ms[live]:.1f} ms near its start"
            )
    return None


def inconsistent_calibration(problem: str) -> str:
    """The plan's warning when its calibration still did not hold together after CALIBRATION_TRIES tries."""
    return (
        f"the plan's calibration does not hold together ({problem}), so something else was using these "
        "cores; its TTFT and speed promises, and the prompt chunks it sizes beside decode rows, are unreliable, "
        "and the plan was not saved: start again on a quiet machine"
    )


def calibrate_consistent(
    runner: Runner, slots: int, ctx: int, device: torch.device, chunk: int | None, say: Callable[[str], None]
) -> tuple[Calibration, str | None]:
    """`calibrate`, again while its figures do not hold together (`calibration_problem`), up to
    CALIBRATION_TRIES times: the last calibration, and its problem (None: it holds together)."""
    for attempt in range(1, CALIBRATION_TRIES + 1):
        c = calibrate(runner, slots, ctx, device, chunk)
        problem = calibration_problem(c.step_ms, c.step_ms_far)
        if problem is None or attempt == CALIBRATION_TRIES:
            return c, problem
        say(f"calibrating again: {problem} (another process on these cores?)")
    raise AssertionError("unreachable: the last try returns")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def far_position(ctx: int) -> int:
    """The second calibration position: a long conversation, within the context."""
    return max(NEAR_POSITION + 1, min(1024, ctx - 1))


def calibrated_chunk(ctx: int, chunk: int | None) -> int:
    """The prompt chunk calibration times: `chunk` rows (None: DEFAULT_PREFILL_CHUNK), or as many as the
    context holds (a prompt is at most ctx - 1 rows, so no step carries more of it; timing
    `--prefill-chunk 4096` in a 3,200-token context asked for positions past the cache)."""
    return max(1, min(DEFAULT_PREFILL_CHUNK if chunk is None else chunk, ctx - 1))


def _alone_rows(ctx: int) -> int:
    return min(256, ctx - 1)


def _first_prompt_row(ctx: int, chunk: int) -> int:
    return min(256, max(0, ctx - chunk - 1))  # a prompt chunk partway in: its rows attend to earlier ones


def _far_prompt_row(ctx: int, chunk: int) -> int:
    return max(_first_prompt_row(ctx, chunk), min(far_position(ctx), ctx - chunk - 1))


def prompt_row_positions(ctx: int, chunk: int | None) -> tuple[float, float, float]:
    """The mean positions of the prompt rows `calibrate` times (beside decode rows, alone, beside deep into
    the prompt): a row's attention grows with its position, so its cost elsewhere is priced from there
    (PlanReport.prompt_rows_ms)."""
    chunk = calibrated_chunk(ctx, chunk)
    half = (chunk - 1) / 2
    return _first_prompt_row(ctx, chunk) + half, (_alone_rows(ctx) - 1) / 2, _far_prompt_row(ctx, chunk) + half
