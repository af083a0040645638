"""Prometheus metrics of one server, in the app's own registry (never the process-global one)."""

from __future__ import annotations

from typing import Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from metronome.engine import Engine, Timings

# Bucket edges in seconds: latencies of a request (queue, first token, first sentence, whole request)
# span milliseconds to minutes on CPU; the gap between two tokens is one engine step.
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(
            "metronome_time_to_first_token_seconds",
            "Request received to its first token.",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.ttfs = Histogram(
            "metronome_time_to_first_sentence_seconds",
            "Request received to the end of its first sentence.",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "metronome_inter_token_latency_seconds",
            "Time between two tokens of one request.",
            buckets=_TOKEN_BUCKETS,
            registry=r,
        )
        self.queue_time = Histogram(
            "metronome_queue_time_seconds", "Time a request waited for a slot.", buckets=_REQUEST_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "metronome_e2e_latency_seconds", "Request received to its last token.", buckets=_REQUEST_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("metronome_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generated_tokens = Counter("metronome_generation_tokens", "Tokens generated.", registry=r)
        self.requests = Counter(
            "metronome_requests",
            "HTTP requests answered, by endpoint and status code.",
            ("endpoint", "status"),
            registry=r,
        )
        self.finished = Counter(
            "metronome_engine_requests_finished", "Engine requests ended, by finish reason.", ("reason",), registry=r
        )
        self.engine_errors = Counter(
            "metronome_engine_errors", "Engine requests that failed inside the engine.", registry=r
        )
        self._engine: Engine | None = None  # read at scrape time; zeros until one is bound
        Gauge("metronome_requests_running", "Requests holding a slot.", registry=r).set_function(self.running)
        Gauge("metronome_requests_waiting", "Requests queued for a slot.", registry=r).set_function(self.waiting)
        Gauge("metronome_slot_occupancy", "Fraction of slots in use.", registry=r).set_function(self.occupancy)
        Gauge(
            "metronome_spec_drafted_tokens",
            "Tokens drafted for speculative decoding since start (cumulative).",
            registry=r,
        ).set_function(lambda: float(self._engine.spec.drafted) if self._engine is not None else 0.0)
        Gauge(
            "metronome_spec_accepted_tokens", "Drafted tokens that were accepted since start (cumulative).", registry=r
        ).set_function(lambda: float(self._engine.spec.accepted) if self._engine is not None else 0.0)
        self.predicted_step = Gauge(
            "metronome_plan_step_seconds",
            "The plan's calibrated decode-step latency, by number of live slots.",
            ("live_slots",),
            registry=r,
        )

    def bind(self, engine: Engine) -> None:
        self._engine = engine
        report = engine.plan.report
        for live, ms in report.step_ms.items() if report is not None else ():
            self.predicted_step.labels(str(live)).set(ms / 1000.0)

    def running(self) -> float:
        return float(len(self._engine.scheduler.by_slot)) if self._engine is not None else 0.0

    def waiting(self) -> float:
        return float(len(self._engine.scheduler.waiting)) if self._engine is not None else 0.0

    def occupancy(self) -> float:
        return self.running() / self._engine.config.slots if self._engine is not None else 0.0

    def observe_request(
        self, timings: Timings, prompt_tokens: int, generated: int, token_gaps: Sequence[float], reason: str
    ) -> None:
        """Record one engine request that ended."""
        self.finished.labels(reason).inc()
        if reason == "error":
            self.engine_errors.inc()
        self.generated_tokens.inc(generated)
        if timings.admitted is not None:
            self.prompt_tokens.inc(prompt_tokens)
            self.queue_time.observe(timings.admitted - timings.submitted)
        if timings.first_token is not None:
            self.ttft.observe(timings.first_token - timings.submitted)
        if timings.first_sentence is not None:
            self.ttfs.observe(timings.first_sentence - timings.submitted)
        if timings.finished is not None and reason in ("stop", "length"):
            self.e2e.observe(timings.finished - timings.submitted)
        for gap in token_gaps:
            self.itl.observe(gap)

    def render(self) -> bytes:
        return generate_latest(self.registry)
