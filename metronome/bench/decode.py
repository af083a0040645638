"""`metronome bench --decode-only`: single-stream decode speed in process, beside this machine's memory bound.

The bound is the weight bytes one decode step reads divided by the measured read bandwidth: no decoder
that reads every weight once per token can beat it."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from metronome.serve.usage import groq_timings
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
    from metronome.fleet.machine import measure_machine

    if tokens < 2 or runs < 1:
        raise ValueError("--decode-only needs --output-tokens >= 2 and --rounds >= 1")
    torch.set_num_threads(threads)
    # plain decoding (speculation off): the step the bound is about; `--speculation` measures drafting
    engine = Engine.from_model(None if model is None else str(model), EngineConfig(slots=1, ctx=ctx, weights=weights,
                                                                                   threads=threads, spec_tokens=0),
                               calibrate=True)
    prompt = engine.encode_prompt("Write a long story about a lighthouse keeper and the sea.", chat=False)
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    rates, ttfts = [], []
    engine.generate(prompt, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
    for _ in range(runs):
        c = engine.generate(prompt, params)
        usage = groq_timings(c.timings)
        rates.append((len(c.token_ids) - 1) / usage["completion_time"])
        ttfts.append(usage["time_to_first_token"])
    report = engine.plan.report
    machine = measure_machine(threads=threads)
    return DecodeResult(engine.model_name, report.weights, report.decode_mode, threads, tokens, tuple(rates),
                        tuple(ttfts), report.step_ms[1], report.weight_bytes, machine.bandwidth)


# ---------------------------------------------------------------------------------------------
# `metronome bench --speculation`: what speculative decoding buys a lone user, where it should and should not

QUOTED = (
    "The lighthouse stood at the edge of the cliff, its white tower streaked with salt and rust. Every night the "
    "keeper climbed the one hundred and twelve steps to light the lamp, and every morning he wrote the weather in a "
    "small green book: the wind, the height of the waves, the ships that passed and the ones that did not. In "
    "forty years he had missed only one night, the night his daughter was born in the village below."
)
SPEC_WORKLOADS = {
    # the answer quotes its prompt: prompt lookup drafts long runs of right tokens
    "quote the prompt": [{"role": "user", "content": "Repeat the following text exactly, word for word:\n\n" + QUOTED}],
    # nothing in the prompt to copy: drafts are rare and mostly wrong
    "free writing": [{"role": "user", "content": "Write a short story about a dragon who learns to bake bread."}],
}


@dataclass(frozen=True)
class SpecResult:
    workload: str
    tokens: int  # generated per run (median)
    plain_tokens_per_s: float  # median over runs, speculation off
    spec_tokens_per_s: float  # median over runs, speculation on
    acceptance: float  # drafts accepted / drafted
    tokens_per_step: float  # emitted tokens per verification step with drafts
    identical: bool  # the two outputs are the same tokens

    @property
    def speedup(self) -> float:
        return self.spec_tokens_per_s / self.plain_tokens_per_s


def measure_speculation(model: Path | None, threads: int, tokens: int = 128, runs: int = 3, ctx: int = 1024,
                        spec_tokens: int = 4, draft: str | None = None) -> list[SpecResult]:
    """Each workload decoded greedily with speculation off and on (interleaved runs, one engine each)."""
    import torch

    from metronome.engine import Engine
    from metronome.model.loader import load

    if tokens < 2 or runs < 1 or spec_tokens < 1:
        raise ValueError("--speculation needs --output-tokens >= 2, --rounds >= 1 and --spec-tokens >= 1")
    torch.set_num_threads(threads)
    loaded = load(None if model is None else str(model))
    engines = {k: Engine.from_model(config=EngineConfig(slots=1, ctx=ctx, threads=threads, spec_tokens=k,
                                                        draft=draft if k else None), loaded=loaded)
               for k in (0, spec_tokens)}
    params = SamplingParams(max_tokens=tokens)
    out = []
    for name, messages in SPEC_WORKLOADS.items():
        rates: dict[int, list[float]] = {0: [], spec_tokens: []}
        outputs: dict[int, tuple[int, ...]] = {}
        lengths = []
        for e in engines.values():
            e.generate(messages, SamplingParams(max_tokens=4))  # warm-up
        spec = engines[spec_tokens].spec
        spec.__init__()
        for _ in range(runs):
            for k, e in engines.items():
                c = e.generate(messages, params)
                rates[k].append((len(c.token_ids) - 1) / groq_timings(c.timings)["completion_time"])
                outputs[k] = c.token_ids
                lengths.append(len(c.token_ids))
        per_step = (spec.accepted + spec.steps) / spec.steps if spec.steps else 1.0
        out.append(SpecResult(name, int(statistics.median(lengths)), statistics.median(rates[0]),
                              statistics.median(rates[spec_tokens]), spec.acceptance, per_step,
                              outputs[0] == outputs[spec_tokens]))
    return out


def speculation_markdown(results: list[SpecResult], spec_tokens: int, drafter: str) -> str:
    head = (f"Speculative decoding ({drafter}, up to {spec_tokens} drafted tokens per step), greedy, one request:\n\n"
            "| workload | tokens | plain tok/s | speculative tok/s | speed-up | drafts accepted | tokens per verify step | same output |\n"
            "|---|---:|---:|---:|---:|---:|---:|---|\n")
    return head + "\n".join(
        f"| {r.workload} | {r.tokens} | {r.plain_tokens_per_s:.1f} | {r.spec_tokens_per_s:.1f} | {r.speedup:.2f}x | "
        f"{r.acceptance:.0%} | {r.tokens_per_step:.2f} | {'yes' if r.identical else 'NO'} |" for r in results)
