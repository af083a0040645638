"""Colocated vs disaggregated prefill under a bursty mixed load: `python -m metronome.bench.layouts`.

The same workload runs on each layout, in this process, one after the other (equal hardware: colocated
uses every thread for one engine; disaggregated gives half to the decode engine and half to the prefill
worker, parallel/disagg.py). Two background users stream long outputs the whole time; every `--gap` seconds a
burst arrives at once: long prompts and short ones, each asking for `--output-tokens` greedy tokens.
Reported: TTFT p50/p99 over the burst requests, the p99 gap between the tokens of every stream, and each
burst request's TTFT over what the engine predicted for it at submit (`Request.predicted_ttft_ms`; a request
that had to wait for a slot has no prediction). The plans are calibrated (once; the plan cache keeps it).
"""

from __future__ import annotations

import argparse
import queue
import statistics
import time
from dataclasses import dataclass
from importlib import resources

from metronome.args import at_least, positive_seconds
from metronome.bench.metrics import percentile
from metronome.config import EngineConfig, Layout, SamplingParams
from metronome.engine import Engine, Request


@dataclass(frozen=True)
class LayoutResult:
    layout: str
    ttft_p50_ms: float
    ttft_p99_ms: float
    gap_p99_ms: float
    tokens: int
    seconds: float
    ttft_over_predicted: list[float]  # each burst request's measured TTFT / its prediction, where it had one
    unpredicted: int  # burst requests without a prediction (they waited for a slot)


def _pct(values: list[float], q: float) -> float:
    """Interpolated, as the other benches' percentiles (metrics.percentile)."""
    return percentile(sorted(values), 100 * q)


def _layouts(text: str) -> list[str]:
    try:
        return [Layout.parse("--layouts", part.strip()).value for part in text.split(",")]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _spread(ratios: list[float]) -> str:
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.2f} ({_pct(ratios, 0.1):.2f}-{_pct(ratios, 0.9):.2f})"


def _corpus_ids(engine: Engine) -> list[int]:
    text = resources.files("metronome.bench").joinpath("corpus.txt").read_text(encoding="utf-8")
    return engine.tokenizer.encode(text, add_bos=False)


def run_layout(
    model: str | None, layout: str, bursts: int, gap_s: float, long_tokens: int, output_tokens: int, slots: int
) -> LayoutResult:
    engine = Engine.from_model(model, EngineConfig(slots=slots, layout=layout, spec_tokens=0), calibrate=True)
    corpus = _corpus_ids(engine)
    events: queue.Queue = queue.Queue()
    stamps: dict[str, list[float]] = {}
    submitted: dict[str, float] = {}
    predicted: dict[str, float] = {}
    burst_ids: set[str] = set()

    def on_event(delta) -> None:
        events.put((time.perf_counter(), delta))

    def submit(rid: str, prompt: list[int], tokens: int) -> Request:
        submitted[rid] = time.perf_counter()
        params = SamplingParams(max_tokens=tokens, temperature=0, ignore_eos=True)
        return engine.submit(prompt, params, on_event, request_id=rid)

    engine.start()
    t0 = time.perf_counter()
    background = 1800  # longer than the bursts last at this model's speed: they stream through all of them
    streams = [submit(f"bg{i}", corpus[i * 40 : i * 40 + 40], background) for i in range(2)]  # through all bursts
    bursts_open = 0
    open_requests = 2
    next_burst, sent = t0 + 1.0, 0
    while open_requests or sent < bursts:
        if sent < bursts and time.perf_counter() >= next_burst:
            base = 200 + sent * 97
            prompts = [corpus[base : base + long_tokens], corpus[base + 11 : base + 11 + long_tokens]]
            prompts += [corpus[base + 13 * j : base + 13 * j + 30] for j in range(1, 4)]
            for j, p in enumerate(prompts):
                rid = f"b{sent}-{j}"
                burst_ids.add(rid)
                predicted[rid] = submit(rid, p, output_tokens).predicted_ttft_ms
            open_requests += len(prompts)
            bursts_open += len(prompts)
            sent += 1
            next_burst += gap_s
        try:
            stamp, delta = events.get(timeout=0.05)
        except queue.Empty:
            continue
        if delta.choices:
            stamps.setdefault(delta.request_id, []).append(stamp)
        if delta.finish_reason is not None:
            if delta.finish_reason not in ("length", "cancelled"):
                raise RuntimeError(f"{delta.request_id} ended with {delta.finish_reason}: {delta.error}")
            open_requests -= 1
            if delta.request_id.startswith("bg") and delta.finish_reason == "length":
                raise RuntimeError("a background stream ended before the last burst: lower --bursts or --gap")
            if not delta.request_id.startswith("bg"):
                bursts_open -= 1
                if sent == bursts and not bursts_open:  # the last burst is served: the streams may stop
                    for r in streams:
                        engine.cancel(r)
    seconds = time.perf_counter() - t0
    engine.stop()
    if engine.prefiller is not None:
        engine.prefiller.close()
    ttft = [(stamps[r][0] - submitted[r]) * 1000 for r in burst_ids]
    gaps = [(b - a) * 1000 for s in stamps.values() for a, b in zip(s, s[1:])]
    tokens = sum(len(s) for s in stamps.values())
    over = [(stamps[r][0] - submitted[r]) * 1000 / predicted[r] for r in burst_ids if predicted[r] > 0]
    return LayoutResult(
        layout,
        statistics.median(ttft),
        _pct(ttft, 0.99),
        _pct(gaps, 0.99),
        tokens,
        seconds,
        sorted(over),
        sum(1 for r in burst_ids if not predicted[r] > 0),
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None)
    # each checked here: 0 bursts ran 40 s and then blamed the gap, 0 output tokens raised a KeyError
    p.add_argument("--bursts", type=at_least(1), default=4)
    p.add_argument("--gap", type=positive_seconds, default=4.0, help="seconds between bursts")
    p.add_argument("--long-tokens", type=at_least(1), default=400, help="tokens of each burst's two long prompts")
    p.add_argument("--output-tokens", type=at_least(1), default=48)
    p.add_argument("--slots", type=at_least(1), default=8)
    p.add_argument("--layouts", type=_layouts, default="colocated,disaggregated")
    a = p.parse_args(argv)
    print(
        "| layout | TTFT p50 (ms) | TTFT p99 (ms) | inter-token gap p99 (ms) | tokens | seconds "
        "| TTFT / predicted: p50 (p10-p90) | no prediction |"
    )
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for layout in a.layouts:
        r = run_layout(a.model, layout, a.bursts, a.gap, a.long_tokens, a.output_tokens, a.slots)
        print(
            f"| {r.layout} | {r.ttft_p50_ms:.0f} | {r.ttft_p99_ms:.0f} | {r.gap_p99_ms:.1f} | {r.tokens} "
            f"| {r.seconds:.1f} | {_spread(r.ttft_over_predicted)} | {r.unpredicted} |"
        )


if __name__ == "__main__":
    main()
