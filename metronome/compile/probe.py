"""Two measurements a plan takes of itself at compile time, on the real weights:
- the batch-invariance probe, which decides the decode shape ("compact" or "fixed");
- calibration, the median step latency at each number of live slots (what the server promises)."""

from __future__ import annotations

import time
from statistics import median

import torch

from metronome.compile.runner import Runner
from metronome.config import ModelConfig


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


def calibrate(runner: Runner, slots: int, ctx: int, device: torch.device, steps: int = 5) -> dict[int, float]:
    """Median decode-step latency (ms) at each number of live slots, from `steps` timed steps after a warm-up."""
    pos = min(64, ctx - 1)
    out = {}
    with torch.inference_mode():
        for live in range(1, slots + 1):
            rows = list(range(live))
            runner.decode(rows, [1] * live, [pos] * live)  # warm-up
            times = []
            for _ in range(steps):
                t0 = time.perf_counter()
                runner.decode(rows, [1] * live, [pos] * live)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                times.append((time.perf_counter() - t0) * 1000)
            out[live] = median(times)
    return out
