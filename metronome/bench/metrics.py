"""Figures per request (from a stream's timestamps) and per measurement (percentiles, rates).

Definitions (all times from the moment the request is sent, i.e. its first byte is written):
- TTFT: until the first chunk carrying content text.
- output speed: the output tokens after the first chunk / (time of last content chunk - time of first);
  the first chunk's tokens are counted with --tokenizer, else placed as below (one, when every chunk
  carries one token).
- time to first sentence: until the chunk that shows the first sentence ended, by the rule the engine
  stamps its own by (metronome/sentences.py): the chunk holding the whitespace after its mark (". ",
  "! ", "? "), or the last chunk where the output ends first (a one-sentence answer).
- end-to-end for 100 tokens: until the chunk holding the 100th output token; when a response is
  shorter it is projected as TTFT + 99 / output speed and flagged `e2e_100_projected`.
- total: until the stream's end ([DONE]).
Output tokens are the server's `usage.completion_tokens` when it sends usage, else the text's tokens
counted with --tokenizer, else the count of content chunks (flagged: a server that sends several tokens a
chunk is under-counted); when tokens and chunks differ, token k is placed in chunk ceil(k * chunks / tokens).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Iterable, Sequence

from metronome.sentences import sentence_end

if TYPE_CHECKING:  # the bench's counters; this module stays free of the prompt machinery
    from metronome.bench.workloads import TokenCounter

_E2E_TOKENS = 100


@dataclass(frozen=True)
class StreamTrace:
    """What the client saw of one streamed response; times are seconds since the request was sent."""

    chunk_times: tuple[float, ...]
    chunk_texts: tuple[str, ...]
    end_s: float
    usage_prompt_tokens: int | None = None
    usage_completion_tokens: int | None = None
    error_kind: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class RequestResult:
    """One request's figures. `ok` is False when the request failed; its figures are then None."""

    key: str
    user: int
    seq: int
    started_s: float  # since the measurement started
    ok: bool
    error_kind: str | None
    error: str | None
    total_s: float
    ttft_s: float | None
    output_speed_tps: float | None
    first_sentence_s: float | None
    e2e_100_s: float | None
    e2e_100_projected: bool
    chunks: int
    output_tokens: int
    output_tokens_source: str  # "usage", "tokenizer" or "chunks"
    requested_output_tokens: int
    input_tokens: int
    input_tokens_source: str  # "usage", "tokenizer" or "estimate"
    prompt_chars: int


def first_sentence_chunk(texts: Sequence[str]) -> int | None:
    """Index of the chunk that shows the first sentence ended (sentences.py: the one holding the whitespace
    after its mark, or the line break after a line of text; the last one where the output ends first), or
    None for an output with no text. The chunk holding the mark itself was one token early: a client cannot
    tell "3." from "3.14" there."""
    full = "".join(texts)
    position = sentence_end(full)
    if position is None:
        return len(texts) - 1 if full.strip() else None
    consumed = 0
    for index, text in enumerate(texts):
        consumed += len(text)
        if position < consumed:
            return index
    return None


def token_chunk(token: int, tokens: int, chunks: int) -> int:
    """Index of the chunk that holds 1-based output token `token` of `tokens` spread over `chunks`."""
    if tokens == chunks:
        return token - 1
    return max(0, min(chunks - 1, math.ceil(token * chunks / tokens) - 1))


def derive_result(
    trace: StreamTrace,
    *,
    key: str,
    user: int,
    seq: int,
    started_s: float,
    requested_output_tokens: int,
    prompt_tokens: int,
    prompt_counted_by: str,
    prompt_chars: int,
    counter: "TokenCounter | None" = None,
) -> RequestResult:
    """The figures of one request from its trace. An empty successful stream counts as an error. `counter`:
    the bench's token counter; a real tokenizer counts the output where the server sends no usage, and the
    first chunk's tokens, which the output speed leaves out."""
    tokenizer = counter if counter is not None and counter.method == "tokenizer" else None
    chunks = len(trace.chunk_times)
    error_kind, error = trace.error_kind, trace.error
    if error_kind is None and chunks == 0:
        error_kind, error = "empty", "the server finished the stream without any content text"
    if trace.usage_completion_tokens is not None:
        output_tokens, output_source = trace.usage_completion_tokens, "usage"
    elif tokenizer is not None and chunks:
        output_tokens, output_source = max(chunks, tokenizer.count("".join(trace.chunk_texts))), "tokenizer"
    else:
        output_tokens, output_source = chunks, "chunks"
    if trace.usage_prompt_tokens is not None:
        input_tokens, input_source = trace.usage_prompt_tokens, "usage"
    else:
        input_tokens, input_source = prompt_tokens, prompt_counted_by
    common = dict(
        key=key,
        user=user,
        seq=seq,
        started_s=started_s,
        total_s=trace.end_s,
        chunks=chunks,
        output_tokens=output_tokens,
        output_tokens_source=output_source,
        requested_output_tokens=requested_output_tokens,
        input_tokens=input_tokens,
        input_tokens_source=input_source,
        prompt_chars=prompt_chars,
    )
    if error_kind is not None:
        return RequestResult(
            ok=False,
            error_kind=error_kind,
            error=error,
            ttft_s=None,
            output_speed_tps=None,
            first_sentence_s=None,
            e2e_100_s=None,
            e2e_100_projected=False,
            **common,
        )
    times = trace.chunk_times
    ttft = times[0]
    decode_s = times[-1] - times[0]
    # the tokens that came after the first chunk (its own arrived at TTFT: counted in, a server that sends
    # its first five tokens at once read 1.3x faster than it streams)
    if tokenizer is not None:
        first = max(1, min(output_tokens, tokenizer.count(trace.chunk_texts[0])))
    else:
        # at least one: with more chunks than tokens the spread put none in the first chunk, and the speed
        # counted the first token too (10 % high at 20 chunks for 10 tokens)
        first = max(1, sum(1 for k in range(1, output_tokens + 1) if token_chunk(k, output_tokens, chunks) == 0))
    after = output_tokens - first
    speed = after / decode_s if after >= 1 and decode_s > 0 else None
    sentence = first_sentence_chunk(trace.chunk_texts)
    projected = output_tokens < _E2E_TOKENS
    if not projected:
        e2e = times[token_chunk(_E2E_TOKENS, output_tokens, chunks)]
    elif speed is not None:
        e2e = ttft + (_E2E_TOKENS - 1) / speed
    else:
        e2e = None
    return RequestResult(
        ok=True,
        error_kind=None,
        error=None,
        ttft_s=ttft,
        output_speed_tps=speed,
        first_sentence_s=None if sentence is None else times[sentence],
        e2e_100_s=e2e,
        e2e_100_projected=projected and e2e is not None,
        **common,
    )


@dataclass(frozen=True)
class Stat:
    """Distribution of one figure over requests; all None when no request had the figure."""

    n: int
    mean: float | None
    p50: float | None
    p90: float | None
    p99: float | None


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile (q in [0, 100]) of an ascending, non-empty sequence."""
    if not sorted_values:
        raise ValueError("percentile of an empty sequence")
    rank = (len(sorted_values) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def describe(values: Iterable[float | None]) -> Stat:
    """n, mean, p50, p90 and p99 of the values that are not None."""
    present = sorted(v for v in values if v is not None)
    if not present:
        return Stat(n=0, mean=None, p50=None, p90=None, p99=None)
    return Stat(
        n=len(present),
        mean=sum(present) / len(present),
        p50=percentile(present, 50),
        p90=percentile(present, 90),
        p99=percentile(present, 99),
    )


@dataclass(frozen=True)
class MetricStats:
    """The per-request figures of a set of successful requests."""

    ttft_s: Stat
    output_speed_tps: Stat
    first_sentence_s: Stat
    e2e_100_s: Stat
    total_s: Stat
    output_tokens: Stat
    input_tokens: Stat


STAT_NAMES = ("mean", "p50", "p90", "p99")
METRIC_NAMES = tuple(f.name for f in fields(MetricStats))


@dataclass(frozen=True)
class Window:
    """One timed batch of requests (a measurement): its wall time and its requests."""

    wall_s: float
    requests: tuple[RequestResult, ...]


@dataclass(frozen=True)
class Summary:
    """One target at one concurrency, pooled over every round."""

    target: str
    concurrency: int
    rounds: int
    requests: int
    ok: int
    errors: int
    error_kinds: tuple[tuple[str, int, str], ...]  # (kind, count, first message)
    short_outputs: int  # successful requests that returned fewer tokens than asked for
    chunk_counted: int  # successful requests whose tokens were counted as chunks (no usage, no tokenizer)
    e2e_100_projected: int
    wall_s: float
    requests_per_s: float | None
    output_tokens_per_s: float | None
    output_tokens_per_s_by_round: tuple[float | None, ...]
    stats: MetricStats


def summarize(target: str, concurrency: int, windows: Sequence[Window]) -> Summary:
    """Pool the rounds of one (target, concurrency): percentiles over requests, rates over wall time."""
    requests = [r for w in windows for r in w.requests]
    good = [r for r in requests if r.ok]
    wall = sum(w.wall_s for w in windows)
    counts: dict[str, int] = {}
    examples: dict[str, str] = {}
    for r in requests:
        if not r.ok:
            kind = r.error_kind or "unknown"
            counts[kind] = counts.get(kind, 0) + 1
            examples.setdefault(kind, r.error or "")
    tokens = sum(r.output_tokens for r in good)
    by_round = tuple(
        sum(r.output_tokens for r in w.requests if r.ok) / w.wall_s if w.wall_s > 0 else None for w in windows
    )
    return Summary(
        target=target,
        concurrency=concurrency,
        rounds=len(windows),
        requests=len(requests),
        ok=len(good),
        errors=len(requests) - len(good),
        error_kinds=tuple((kind, counts[kind], examples[kind]) for kind in sorted(counts)),
        short_outputs=sum(1 for r in good if r.output_tokens < r.requested_output_tokens),
        chunk_counted=sum(1 for r in good if r.output_tokens_source == "chunks"),
        e2e_100_projected=sum(1 for r in good if r.e2e_100_projected),
        wall_s=wall,
        requests_per_s=len(good) / wall if wall > 0 else None,
        output_tokens_per_s=tokens / wall if wall > 0 else None,
        output_tokens_per_s_by_round=by_round,
        stats=MetricStats(
            ttft_s=describe(r.ttft_s for r in good),
            output_speed_tps=describe(r.output_speed_tps for r in good),
            first_sentence_s=describe(r.first_sentence_s for r in good),
            e2e_100_s=describe(r.e2e_100_s for r in good),
            total_s=describe(r.total_s for r in good),
            output_tokens=describe(float(r.output_tokens) for r in good),
            input_tokens=describe(float(r.input_tokens) for r in good),
        ),
    )


def figures(summary: Summary) -> dict[str, float | None]:
    """Every figure of a summary by name ("ttft_s.p50", "output_tokens_per_s", ...)."""
    named: dict[str, float | None] = {
        "requests_per_s": summary.requests_per_s,
        "output_tokens_per_s": summary.output_tokens_per_s,
    }
    for metric, stat in asdict(summary.stats).items():
        for stat_name in STAT_NAMES:
            named[f"{metric}.{stat_name}"] = stat[stat_name]
    return named


def ratios(summary: Summary, baseline: Summary) -> dict[str, float | None]:
    """Each figure of `summary` divided by the same figure of `baseline` (None where undefined)."""
    ours, theirs = figures(summary), figures(baseline)
    return {
        name: (value / theirs[name] if value is not None and theirs[name] else None) for name, value in ours.items()
    }
