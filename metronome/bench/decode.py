"""`metronome bench --decode-only`: decode speed in process, beside this machine's memory bound.

The bound is the weight bytes one decode step reads divided by the measured read bandwidth: no decoder
that reads every weight once per token can beat it. A step reads the weights once however many live slots
it decodes, so with `--live 1,2,4,8` each level's step (the time between one user's tokens) is held to the
same bound: where it falls behind, the step's arithmetic on the extra rows, not its reading, is what costs.

`metronome bench --speculation` (below): plain vs speculative decoding on chat workloads whose outputs end on
their own, greedy and sampled, with the loop check (repeated 8-grams) beside every speed-up."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from metronome.config import EngineConfig, SamplingParams
from metronome.serve.usage import groq_timings


@dataclass(frozen=True)
class DecodeResult:
    model: str
    weights: str
    decode_mode: str
    threads: int
    tokens: int  # generated per run
    runs_tokens_per_s: tuple[float, ...]
    ttft_s: tuple[float, ...]
    predicted_step_ms: float  # the plan's calibration at `live` slots
    weight_bytes: int
    runs_bandwidth: tuple[float, ...]  # bytes/s, read just before each run (fleet/machine.read_bandwidth)
    live: int = 1  # slots decoding together; tokens/s are each user's (one token per step)

    @property
    def tokens_per_s(self) -> float:
        return statistics.median(self.runs_tokens_per_s)

    @property
    def measured_step_ms(self) -> float:
        return 1000.0 / self.tokens_per_s

    @property
    def bandwidth(self) -> float:
        return statistics.median(self.runs_bandwidth)

    @property
    def bound_tokens_per_s(self) -> float:
        return self.bandwidth / self.weight_bytes

    @property
    def runs_fraction(self) -> tuple[float, ...]:
        """Each run's speed against the bound at the bandwidth read just before it."""
        return tuple(r * self.weight_bytes / b for r, b in zip(self.runs_tokens_per_s, self.runs_bandwidth))

    def markdown(self) -> str:
        rows = [
            ("model", self.model),
            ("weights / decode shape", f"{self.weights} / {self.decode_mode}"),
            ("threads", str(self.threads)),
            ("live slots decoding together", str(self.live)),
            (
                "decode tokens/s per user (median of runs)",
                f"{self.tokens_per_s:.1f}  (runs: {', '.join(f'{r:.1f}' for r in self.runs_tokens_per_s)})",
            ),
            ("TTFT (median)", f"{statistics.median(self.ttft_s) * 1000:.0f} ms"),
            (
                f"step latency: calibrated at compile ({self.live} live) / measured in this decode",
                f"{self.predicted_step_ms:.2f} ms / {self.measured_step_ms:.2f} ms "
                f"(measured {self.measured_step_ms / self.predicted_step_ms - 1:+.0%})",
            ),
            ("weight bytes read per token", f"{self.weight_bytes / 1e6:.1f} MB"),
            (
                "read bandwidth, before each run (median)",
                f"{self.bandwidth / 1e9:.1f} GB/s (runs: {', '.join(f'{b / 1e9:.1f}' for b in self.runs_bandwidth)})",
            ),
            ("memory-bound decode (median bandwidth)", f"{self.bound_tokens_per_s:.0f} tokens/s"),
            (
                "fraction of the bound, each run at its own bandwidth (median)",
                f"{statistics.median(self.runs_fraction):.0%} "
                f"(runs: {', '.join(f'{f:.0%}' for f in self.runs_fraction)})",
            ),
        ]
        return "| figure | value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in rows)


def measure_decode(
    model: Path | None,
    threads: int,
    tokens: int = 128,
    runs: int = 3,
    ctx: int = 1024,
    weights: str = "auto",
    live: tuple[int, ...] = (1,),
    kv_cache: str = "auto",
) -> tuple[DecodeResult, ...]:
    """At each number of `live` slots, decode `tokens` tokens for that many copies of one prompt together,
    `runs` times, on one plan of max(live) slots; the machine's read bandwidth just before each run."""
    import torch

    from metronome.engine import Engine
    from metronome.fleet.machine import read_bandwidth

    if tokens < 2 or runs < 1:
        raise ValueError("--decode-only needs --output-tokens >= 2 and --rounds >= 1")
    if not live or min(live) < 1:
        raise ValueError(f"--live {live}: give live slot counts of at least 1, e.g. 1,2,4,8")
    torch.set_num_threads(threads)
    from metronome.model.loader import default_model_path, read_config

    ctx = min(ctx, read_config(default_model_path() if model is None else model).max_position)  # a short model's own
    if tokens >= ctx:  # refused before the compile: its prompt needs positions too (checked exactly below)
        raise ValueError(
            f"--output-tokens {tokens}: the decode bench's plan holds {ctx} tokens, its prompt included; give fewer"
        )
    # plain decoding (speculation off): the step the bound is about; `--speculation` measures drafting
    engine = Engine.from_model(
        None if model is None else str(model),
        EngineConfig(slots=max(live), ctx=ctx, weights=weights, threads=threads, spec_tokens=0, kv_cache=kv_cache),
        calibrate=True,
    )
    prompt = engine.encode_prompt("Write a long story about a lighthouse keeper and the sea.", chat=False)
    if len(prompt) + tokens > ctx:  # said in bench's terms (the engine's refusal would name --ctx, not a bench flag)
        raise ValueError(
            f"--output-tokens {tokens}: with its {len(prompt)}-token prompt the decode bench's {ctx}-token plan "
            f"holds at most {ctx - len(prompt)}"
        )
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)
    report = engine.plan.report
    results = []
    for n in live:
        rates, ttfts, bandwidths = [], [], []
        engine.generate([prompt] * n, SamplingParams(max_tokens=4, ignore_eos=True))  # warm-up
        for _ in range(runs):
            bandwidths.append(read_bandwidth(threads))
            # the n requests start in one step and decode side by side: each user's rate is the step's
            done = engine.generate([prompt] * n, params)
            usages = [groq_timings(c.timings) for c in done]
            rates.append(statistics.median((len(c.token_ids) - 1) / u["completion_time"] for c, u in zip(done, usages)))
            ttfts.append(statistics.median(u["time_to_first_token"] for u in usages))
        results.append(
            DecodeResult(
                engine.model_name,
                report.weights,
                report.decode_mode,
                threads,
                tokens,
                tuple(rates),
                tuple(ttfts),
                report.step_ms.get(n, float("nan")),
                report.weight_bytes,
                tuple(bandwidths),
                n,
            )
        )
    return tuple(results)


def live_markdown(results: tuple[DecodeResult, ...]) -> str:
    """One row per live slot count: each user's step beside the one memory-bound step every count shares."""
    first = results[0]
    head = (
        f"{first.model}, {first.weights} / {first.decode_mode}, {first.threads} threads, {first.tokens} tokens "
        f"per user, {len(first.runs_tokens_per_s)} runs per level; {first.weight_bytes / 1e6:.1f} MB of weights "
        "read per step whatever the rows\n\n"
        "| live slots | tok/s per user (median) | step ms: measured / calibrated | memory read GB/s, timed before each run (median) "
        "| memory-bound step ms | fraction of the bound (median; runs) |\n|---:|---:|---:|---:|---:|---:|\n"
    )
    rows = [
        f"| {r.live} | {r.tokens_per_s:.1f} | {r.measured_step_ms:.1f} / {r.predicted_step_ms:.1f} | "
        f"{r.bandwidth / 1e9:.1f} | {1000.0 / r.bound_tokens_per_s:.1f} | {statistics.median(r.runs_fraction):.0%} "
        f"({', '.join(f'{f:.0%}' for f in r.runs_fraction)}) |"
        for r in results
    ]
    return head + "\n".join(rows)


# ---------------------------------------------------------------------------------------------
# `metronome bench --speculation`: what speculative decoding buys a lone user, where it should and should not
#
# Outputs end on their own (EOS, no ignore_eos) within a generous max_tokens: a small model's greedy output
# forced past its end falls into a loop, and prompt lookup then drafts the loop and looks good for the wrong
# reason. Each row reports the fraction of the output's 8-grams that already occurred earlier in the output
# so that a loop shows.

PASSAGE = (
    "The lighthouse stood at the edge of the cliff, its white tower streaked with salt and rust. Every night the "
    "keeper climbed the one hundred and twelve steps to light the lamp, and every morning he wrote the weather in a "
    "small green book: the wind, the height of the waves, the ships that passed and the ones that did not. In "
    "forty years he had missed only one night, the night his daughter was born in the village below."
)
TYPOS = (
    "The lighthouse stood at the edge of the clif, its white tower streaked with salt and rust. Every night the "
    "keeper climbed the one hundred and twelve steps to light the lamp, and every morning he wrote the wether in a "
    "small green book: the wind, the hieght of the waves, the ships that passed and the ones that did not."
)
# (name, user message, whether prompt lookup should pay: the answer copies its prompt)
SPEC_WORKLOADS: tuple[tuple[str, str, bool], ...] = (
    (
        "edit a passage",
        "Correct the spelling mistakes in this passage and write out the corrected passage:\n\n" + TYPOS,
        True,
    ),
    ("quote a passage", "Here is a passage:\n\n" + PASSAGE + "\n\nQuote its first two sentences exactly.", True),
    ("summarize a passage", "Summarize this passage in two sentences:\n\n" + PASSAGE, True),
    ("question: why is the sky blue", "Why is the sky blue? Answer in a short paragraph.", False),
    ("question: tips for sleep", "Give three tips for sleeping better.", False),
)
SAMPLED_TEMPERATURE = 0.8
SAMPLED_SEED = 1234  # round r uses seed SAMPLED_SEED + r: each round a different sample, the same in both engines


def repeated_ngram_fraction(ids: "list[int] | tuple[int, ...]", n: int = 8) -> float:
    """Fraction of the n-grams of `ids` that already occurred earlier in `ids` (0 when there are none).
    Ordinary text scores near 0; a greedy loop scores near 1 (every n-gram after the first period repeats).
    Copying from the prompt does not count: only the output itself is searched."""
    total = len(ids) - n + 1
    if total <= 0:
        return 0.0
    seen: set[tuple[int, ...]] = set()
    repeated = 0
    for i in range(total):
        gram = tuple(ids[i : i + n])
        if gram in seen:
            repeated += 1
        seen.add(gram)
    return repeated / total


@dataclass(frozen=True)
class SpecResult:
    workload: str
    sampling: str  # "greedy" or "T=0.8, seeded"
    should_pay: bool  # what the workload is for: the answer copies its prompt
    rounds: int
    mean_tokens: float  # output length (mean over rounds, EOS included)
    ended: int  # rounds whose output ended on its own (not at max_tokens)
    plain_tokens_per_s: float  # median over rounds, speculation off
    spec_tokens_per_s: float  # median over rounds, speculation on
    speedup: float  # median over rounds of the round's spec / plain ratio (the two runs are side by side)
    acceptance: float  # drafts accepted / drafted (0 when nothing was drafted: see `drafted`)
    tokens_per_step: float  # emitted tokens per verification step with drafts (1 when there was none)
    repeated_8grams: float  # mean over rounds of repeated_ngram_fraction(output, 8)
    identical: bool  # in every round the two outputs are the same tokens
    drafted: int  # draft tokens proposed in all rounds: 0 is "never drafted" (paused), not "all rejected"

    def row(self) -> dict:
        """The row as plain data (for a reader or a JSON dump)."""
        return {
            "workload": self.workload,
            "sampling": self.sampling,
            "should_pay": self.should_pay,
            "rounds": self.rounds,
            "mean_tokens": self.mean_tokens,
            "ended": self.ended,
            "plain_tokens_per_s": self.plain_tokens_per_s,
            "spec_tokens_per_s": self.spec_tokens_per_s,
            "speedup": self.speedup,
            "acceptance": self.acceptance,
            "tokens_per_step": self.tokens_per_step,
            "repeated_8grams": self.repeated_8grams,
            "identical": self.identical,
            "drafted": self.drafted,
        }


def measure_speculation(
    model: Path | None,
    threads: int,
    tokens: int = 384,
    runs: int = 3,
    ctx: int = 1024,
    spec_tokens: int = 4,
    draft: str | None = None,
    kv_cache: str = "auto",
    workloads: tuple[tuple[str, str, bool], ...] = SPEC_WORKLOADS,
    engines: dict | None = None,
) -> list[SpecResult]:
    """Each workload, greedy and sampled, decoded with speculation off and on: `runs` rounds, the two
    engines side by side in each round. `tokens` is max_tokens: outputs end on EOS before it.
    `engines` ({0: plain, spec_tokens: speculative}) replaces the engines built from `model` (tests)."""
    from metronome.engine.request import SpecStats

    if tokens < 2 or runs < 1 or spec_tokens < 1:
        raise ValueError("--speculation needs --output-tokens >= 2, --rounds >= 1 and --spec-tokens >= 1")
    if engines is None:
        import torch

        from metronome.engine import Engine
        from metronome.model.loader import load

        torch.set_num_threads(threads)
        loaded = load(None if model is None else str(model))
        engines = {
            k: Engine.from_model(
                config=EngineConfig(
                    slots=1, ctx=ctx, threads=threads, spec_tokens=k, draft=draft if k else None, kv_cache=kv_cache
                ),
                loaded=loaded,
            )
            for k in (0, spec_tokens)
        }
        if engines[spec_tokens].drafter is None:  # e.g. the C++ kernels did not build: the torch runner
            raise ValueError(
                f"this plan cannot verify drafts ({engines[spec_tokens].plan.report.kernels}): speculation "
                "needs the fused decoder (int4/int8 weights with the C++ kernels on CPU)"
            )
    plain, spec = engines[0], engines[spec_tokens]
    for e in (plain, spec):
        e.generate([{"role": "user", "content": "Hello."}], SamplingParams(max_tokens=16))  # warm-up
    out = []
    for name, content, should_pay in workloads:
        messages = [{"role": "user", "content": content}]
        for sampled in (False, True):
            spec.spec = SpecStats()
            rates: dict[int, list[float]] = {0: [], spec_tokens: []}
            ratios, lengths, repeats, ended, identical = [], [], [], 0, True
            for r in range(runs):
                params = (
                    SamplingParams(max_tokens=tokens, temperature=SAMPLED_TEMPERATURE, seed=SAMPLED_SEED + r)
                    if sampled
                    else SamplingParams(max_tokens=tokens)
                )
                ids = {}
                for k, e in ((0, plain), (spec_tokens, spec)):
                    c = e.generate(messages, params)
                    rates[k].append((len(c.token_ids) - 1) / max(groq_timings(c.timings)["completion_time"], 1e-9))
                    ids[k] = c.token_ids
                    if k == 0:
                        ended += c.finish_reason == "stop"
                if rates[0][-1] > 0 and rates[spec_tokens][-1] > 0:  # one-token outputs have no decode rate
                    ratios.append(rates[spec_tokens][-1] / rates[0][-1])
                identical &= ids[0] == ids[spec_tokens]
                lengths.append(len(ids[0]))
                repeats.append(repeated_ngram_fraction(ids[0], 8))
            stats = spec.spec
            per_step = (stats.accepted + stats.steps) / stats.steps if stats.steps else 1.0
            out.append(
                SpecResult(
                    name,
                    f"T={SAMPLED_TEMPERATURE}, seeded" if sampled else "greedy",
                    should_pay,
                    runs,
                    statistics.mean(lengths),
                    ended,
                    statistics.median(rates[0]),
                    statistics.median(rates[spec_tokens]),
                    statistics.median(ratios) if ratios else float("nan"),
                    stats.acceptance,
                    per_step,
                    statistics.mean(repeats),
                    identical,
                    stats.drafted,
                )
            )
    return out


PAYS = 1.05  # a speed-up above this pays; below 1/PAYS speculation costs
LOOP = 0.5  # outputs with more repeated 8-grams than this are loops


def speculation_verdict(results: list[SpecResult]) -> str:
    """A sentence computed from the rows: where speculation paid, where it cost, what set them apart."""

    def names(rows: list[SpecResult]) -> str:
        return ", ".join(f"{r.workload} ({r.sampling}, {r.speedup:.2f}x, {_accepted(r)})" for r in rows)

    def shown(r: SpecResult) -> float:  # rows are judged as printed: 1.0498 is "1.05x", and it was "break-even"
        return round(r.speedup, 2)

    paid = [r for r in results if shown(r) >= PAYS and r.tokens_per_step > 1.0]  # faster needs accepted drafts
    cost = [r for r in results if shown(r) <= round(1 / PAYS, 2)]
    noise = [r for r in results if r.tokens_per_step <= 1.0 and shown(r) >= PAYS]
    even = [r for r in results if r not in paid and r not in cost and r not in noise]
    lines = []
    if paid:
        lines.append(
            f"Speculation paid (>= {PAYS:.2f}x) on {len(paid)} of {len(results)} rows: {names(paid)}; "
            f"the least accepted of them had {min(r.acceptance for r in paid):.0%} of drafts accepted."
        )
    else:
        lines.append(f"Speculation paid (>= {PAYS:.2f}x) on none of the {len(results)} rows.")
    if cost:
        lines.append(f"It cost (<= {1 / PAYS:.2f}x) on {len(cost)}: {names(cost)}.")
    if even:
        lines.append(f"Break-even on {len(even)}: {names(even)}.")
    if noise:
        lines.append(
            f"Faster by {PAYS - 1:.0%} or more without a single accepted draft on {len(noise)} rows ("
            + ", ".join(f"{r.workload}, {r.sampling}: {r.speedup:.2f}x" for r in noise)
            + "): timing noise of that size; rerun on a quiet machine before trusting the others."
        )
    loops = [r for r in results if r.repeated_8grams > LOOP]
    if loops:
        lines.append(
            f"Loops (> {LOOP:.0%} repeated 8-grams), whose speed-up says little about real text: "
            + ", ".join(f"{r.workload} ({r.sampling})" for r in loops)
            + "."
        )
    if not all(r.identical for r in results):
        lines.append(
            "ERROR: speculative output differed from plain output on "
            + ", ".join(f"{r.workload} ({r.sampling})" for r in results if not r.identical)
            + ": speculation must be exact."
        )
    return "\n".join(lines)


def _accepted(r: SpecResult) -> str:
    """The acceptance cell: a share of the drafts, or that none were made (drafting paused throughout: the
    engine judged them too costly), which a 0 % would read as every draft rejected."""
    return f"{r.acceptance:.0%} of {r.drafted}" if r.drafted else "none drafted"


def speculation_markdown(results: list[SpecResult], spec_tokens: int, drafter: str) -> str:
    rounds = results[0].rounds if results else 0
    head = (
        f"Speculative decoding ({drafter}, up to {spec_tokens} drafted tokens per step), one request, outputs "
        f"that end on their own; medians of {rounds} rounds, plain and speculative side by side in each:\n\n"
        "| workload | sampling | drafting should pay | mean tokens | ended on EOS | plain tok/s | speculative tok/s "
        "| speed-up | drafts accepted | tokens per verify step | repeated 8-grams | same output |\n"
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|\n"
    )
    rows = "\n".join(
        f"| {r.workload} | {r.sampling} | {'yes' if r.should_pay else 'no'} | {r.mean_tokens:.0f} | "
        f"{r.ended}/{r.rounds} | {r.plain_tokens_per_s:.1f} | {r.spec_tokens_per_s:.1f} | {r.speedup:.2f}x | "
        f"{_accepted(r)} | {f'{r.tokens_per_step:.2f}' if r.drafted else '–'} | {r.repeated_8grams:.0%} | "
        f"{'yes' if r.identical else 'NO'} |"
        for r in results
    )
    return head + rows + "\n\n" + speculation_verdict(results)
