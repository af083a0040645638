"""`metronome bench --decode-only`: single-stream decode speed in process, beside this machine's memory bound.

The bound is the weight bytes one decode step reads divided by the measured read bandwidth: no decoder
that reads every weight once per token can beat it."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from metronome.config import EngineConfig, SamplingParams


@dataclass(frozen=True)
class DecodeResult:
    model: str
    weights: str
    decode_mode: str
    threads: int
    tokens: int  # generated per run
    runs_tokens_per_s: tuple[float, ...]
    ttft_s: tuple[float, ...]
    predicted_step_ms: float  # the plan's calibration at one live slot
    weight_bytes: int
    bandwidth: float  # bytes/s, measured here

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(self.runs_tokens_per_s)

    @property
    def measured_step_ms(self) -> float:
        return 1000.0 / self.tokens_per_s

    @property
    def bound_tokens_per_s(self) -> float:
        return self.bandwidth / self.weight_bytes

    def markdown(self) -> str:
        rows = [
            ("model", self.model),
            ("weights / decode shape", f"{self.weights} / {self.decode_mode}"),
            ("threads", str(self.threads)),
            ("decode tokens/s (median of runs)", f"{self.tokens_per_s:.1f}  (runs: {', '.join(f'{r:.1f}' for r in self.runs_tokens_per_s)})"),
            ("TTFT (median)", f"{statistics.median(self.ttft_s) * 1000:.0f} ms"),
            ("step latency predicted / measured", f"{self.predicted_step_ms:.2f} ms / {self.measured_step_ms:.2f} ms "
                                                  f"({self.predicted_step_ms / self.measured_step_ms - 1:+.0%})"),
            ("weight bytes read per token", f"{self.weight_bytes / 1e6:.1f} MB"),
            ("measured read bandwidth", f"{self.bandwidth / 1e9:.1f} GB/s"),
            ("memory-bound decode", f"{self.bound_tokens_per_s:.0f} tokens/s"),
            ("fraction of the bound", f"{self.tokens_per_s / self.bound_tokens_per_s:.0%}"),
        ]
        return "| figure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def measure_decode(model: Path | None, threads: int, tokens: int = 128, runs: int = 3, ctx: int = 1024,
                   weights: str = "auto") -> DecodeResult:
    """Decode `tokens` tokens `runs` times from one prompt on a one-slot plan; the machine's bandwidth too."""
    import torch

    from metronome.engine import Engine
    from metronome.planner.machine import measure_machine

    if tokens < 2 or runs < 1:
        raise ValueError("--decode-only needs --output-tokens >= 2 and --rounds >= 1")
    torch.set_num_threads(threads)
    engine = Engine.from_model(None if model is None else str(model), EngineConfig(slots=1, ctx=ctx, weights=weights,
                                                                                   threads=threads), calibrate=True)
    prompt = engine.encode_prompt("Write a long story about a lighthouse keeper and the sea.", chat=False)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    rates, ttfts = [], []
    engine.generate(prompt, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    for _ in range(runs):
        c = engine.generate(prompt, params)
        usage = c.timings.as_usage()
        rates.append((len(c.token_ids) - 1) / usage["completion_time"])
        ttfts.append(usage["time_to_first_token"])
    report = engine.plan.report
    machine = measure_machine()
    return DecodeResult(engine.model_name, report.weights, report.decode_mode, threads, tokens, tuple(rates),
                        tuple(ttfts), report.step_ms[1], report.weight_bytes, machine.bandwidth)
