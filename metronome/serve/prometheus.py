"""Prometheus metrics of one server, in the app's own registry (never the process-global one).

Two accounts that add up at every scrape:
- generation requests (POST /v1/chat/completions, /v1/completions, /v1/responses, /v1/reflections):
  `metronome_api_requests_received_total` = the sum over outcomes of `metronome_api_requests_ended_total`
  + `metronome_api_requests_in_flight`;
- engine requests (one per choice, one per reflection turn): `metronome_engine_requests_submitted_total` = the
  sum over reasons of `metronome_engine_requests_finished_total` + `metronome_engine_requests_in_flight`.
"""

from __future__ import annotations

import gc
from typing import Callable, Iterable, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector

from metronome.engine import Engine, Timings
from metronome.engine.prefix_cache import PrefixCache
from metronome.engine.profile import PHASES, ThreadCpu

# Bucket edges in seconds: latencies of a request (queue, first token, first sentence, whole request)
# span milliseconds to minutes on CPU; the gap between two tokens is one engine step.
_REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

CONTENT_TYPE = CONTENT_TYPE_LATEST

GENERATION_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/reflections")
# How a generation request ended: every choice finished (stop, length); the client went away or cancelled;
# the engine or the server failed it (a 5xx, or an error event mid-stream); refused before it generated
# anything (a 4xx: a bad body, a full queue, the model still loading).
OUTCOMES = ("completed", "cancelled", "failed", "rejected")


def outcome_of(reasons: Iterable[str | None]) -> str:
    """The outcome of a request whose choices ended with these finish reasons."""
    reasons = list(reasons)
    if "error" in reasons:
        return "failed"
    if "cancelled" in reasons or None in reasons:
        return "cancelled"
    return "completed"


class ApiRequest:
    """The account of one generation request: received when made, ended exactly once."""

    def __init__(self, metrics: "ServerMetrics", endpoint: str) -> None:
        self.metrics, self.endpoint = metrics, endpoint
        self.outcome: str | None = None

    def end(self, outcome: str) -> None:
        """Record how the request ended; later calls change nothing (the first outcome known wins)."""
        if self.outcome is not None:
            return
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome {outcome!r} is not one of {OUTCOMES}")
        self.outcome = outcome
        self.metrics._api_ended(self.endpoint, outcome)


class _EngineTotals:
    """The engine's own running totals, read at scrape time and exposed as counters (`_total`), so that
    rate() and increase() read them right: speculation's drafted and accepted tokens, and the prefix cache's
    lookups, hits and evictions (zeros without an engine or a cache)."""

    def __init__(self, metrics: "ServerMetrics") -> None:
        self.metrics = metrics

    def collect(self) -> Iterable[Metric]:
        engine = self.metrics._engine
        cache = engine.prefix_cache if engine is not None else None
        for name, doc, value in (
            ("spec_drafted_tokens", "Tokens drafted for speculative decoding.", engine and engine.spec.drafted),
            ("spec_accepted_tokens", "Drafted tokens that were accepted.", engine and engine.spec.accepted),
            (
                "prefix_cache_lookup_tokens",
                "Prompt tokens looked up in the prefix cache.",
                cache and cache.stats.lookup_tokens,
            ),
            (
                "prefix_cache_hit_tokens",
                "Prompt tokens copied from the prefix cache.",
                cache and cache.stats.hit_tokens,
            ),
            (
                "prefix_cache_evicted_pages",
                "Prefix cache pages evicted (least recently used).",
                cache and cache.stats.evicted_pages,
            ),
        ):
            counter = CounterMetricFamily(f"metronome_{name}", doc + " Since start.")
            counter.add_metric((), float(value or 0))
            yield counter


class _StepCollector:
    """The engine's step profile (engine/profile.py) and this process's CPU time by thread, read at scrape
    time: a client that scrapes before and after a load sees where the served steps' time went."""

    def __init__(self, metrics: "ServerMetrics") -> None:
        self.metrics = metrics
        self.thread_cpu = ThreadCpu()

    def collect(self) -> Iterable[Metric]:
        engine = self.metrics._engine
        phases = CounterMetricFamily(
            "metronome_engine_step_phase_seconds",
            "Engine thread time in each phase of a step (schedule, draft, plan, sample, emit) since start.",
            labels=("phase",),
        )
        steps = CounterMetricFamily("metronome_engine_steps", "Engine steps run since start.")
        rows = CounterMetricFamily(
            "metronome_engine_step_rows", "Rows run in steps since start, by kind (decode, prompt).", labels=("kind",)
        )
        cpu = CounterMetricFamily(
            "metronome_thread_cpu_seconds",
            "CPU time of this process's threads by role: the engine's stepping thread, the kernels' pool "
            "workers, the main thread (the HTTP event loop), other.",
            labels=("thread",),
        )
        profile = engine.profile.snapshot() if engine is not None else None
        for phase in PHASES:
            phases.add_metric((phase,), profile.seconds[phase] if profile is not None else 0.0)
        steps.add_metric((), float(profile.steps) if profile is not None else 0.0)
        rows.add_metric(("decode",), float(profile.decode_rows) if profile is not None else 0.0)
        rows.add_metric(("prompt",), float(profile.prompt_rows) if profile is not None else 0.0)
        for role, seconds in self.thread_cpu.read(engine.thread_id if engine is not None else None).items():
            cpu.add_metric((role,), seconds)
        return [phases, steps, rows, cpu]


class ServerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.ttft = Histogram(
            "metronome_time_to_first_token_seconds",
            "An engine request's (a choice's) submit to its first token.",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.ttfs = Histogram(
            "metronome_time_to_first_sentence_seconds",
            "An engine request's submit to the end of its first sentence.",
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
            "metronome_e2e_latency_seconds",
            "An engine request's submit to its last token.",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter(
            "metronome_prompt_tokens",
            "Prompt tokens of admitted engine requests (each of n choices runs its prompt).",
            registry=r,
        )
        self.generated_tokens = Counter("metronome_generation_tokens", "Tokens generated.", registry=r)
        self.cached_tokens = Counter(
            "metronome_prompt_cached_tokens",
            "Prompt tokens of admitted engine requests copied from the prefix cache instead of computed.",
            registry=r,
        )
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
        self.submitted = Counter(
            "metronome_engine_requests_submitted",
            "Engine requests accepted by the engine (one per choice).",
            registry=r,
        )
        self.api_received = Counter(
            "metronome_api_requests_received", "Generation requests received, by endpoint.", ("endpoint",), registry=r
        )
        self.api_ended = Counter(
            "metronome_api_requests_ended",
            "Generation requests ended, by endpoint and outcome: completed, cancelled (by the client), "
            "failed (a server or engine error), rejected (a 4xx before generating).",
            ("endpoint", "outcome"),
            registry=r,
        )
        for endpoint in GENERATION_ENDPOINTS:  # every series exists from the start, at 0
            self.api_received.labels(endpoint)
            for outcome in OUTCOMES:
                self.api_ended.labels(endpoint, outcome)
        for reason in ("stop", "length", "cancelled", "error"):
            self.finished.labels(reason)
        self.max_itl = Histogram(
            "metronome_request_max_inter_token_latency_seconds",
            "The longest gap between two tokens of one request's stream (its worst stall).",
            buckets=_TOKEN_BUCKETS + _REQUEST_BUCKETS[_REQUEST_BUCKETS.index(5.0) :],
            registry=r,
        )
        self._api_in_flight = 0
        self._engine_in_flight = 0
        Gauge(
            "metronome_api_requests_in_flight", "Generation requests received and not ended yet.", registry=r
        ).set_function(lambda: float(self._api_in_flight))
        Gauge(
            "metronome_engine_requests_in_flight", "Engine requests submitted and not finished yet.", registry=r
        ).set_function(lambda: float(self._engine_in_flight))
        self._engine: Engine | None = None  # read at scrape time; zeros until one is bound
        Gauge("metronome_requests_running", "Requests holding a slot.", registry=r).set_function(self.running)
        Gauge("metronome_requests_waiting", "Requests queued for a slot.", registry=r).set_function(self.waiting)
        Gauge("metronome_slot_occupancy", "Fraction of slots in use.", registry=r).set_function(self.occupancy)
        Gauge(
            "metronome_engine_pace_ratio",
            "The engine's recent steps' measured time over the plan's price (median of the last 32; 1 until 8 "
            "have run, or without calibration): how much slower than its calibration (above 1) this machine "
            "runs the plan now. Each TTFT promise is the plan's price times this, and each decode-speed promise until "
            "steps at its own load have run (engine/pace.py).",
            registry=r,
        ).set_function(self.pace)
        self._prefix_gauges(r)
        GCCollector(registry=r)  # python_gc_collections_total by generation: how often the collector held the GIL
        Gauge(
            "metronome_gc_frozen_objects",
            "Objects set aside from the cyclic collector once the model was attached (engine/heap.py): a full "
            "collection scans only what came after.",
            registry=r,
        ).set_function(gc.get_freeze_count)
        self._speech_metrics(r)
        r.register(_StepCollector(self))
        r.register(_EngineTotals(self))
        self.slots = Gauge("metronome_slots", "Request slots of the plan (requests decoded together).", registry=r)
        self.promised_speed = Gauge(
            "metronome_plan_tokens_per_second",
            "The plan's promised decode speed per user (1 / calibrated step), by number of live slots.",
            ("live_slots",),
            registry=r,
        )
        self.decode_speed = Histogram(
            "metronome_request_decode_tokens_per_second",
            "Each request's decode speed, first token to last (compare with metronome_plan_tokens_per_second).",
            buckets=(5, 10, 20, 30, 40, 50, 60, 80, 100, 130, 160, 200, 300, 500),
            registry=r,
        )
        self.ttft_vs_plan = Histogram(
            "metronome_ttft_over_prediction_ratio",
            "Each request's measured time to first token over the plan's prediction at submit (1 is on time).",
            buckets=(0.5, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 5.0, 10.0),
            registry=r,
        )
        self.speed_vs_promise = Histogram(
            "metronome_decode_speed_over_promise_ratio",
            "Each request's decode speed, first token to last, over the speed the engine promised with its first "
            "token (1 is as promised; above 1 where speculation's accepted drafts added tokens).",
            buckets=(0.5, 0.8, 0.9, 0.95, 1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0),
            registry=r,
        )
        self.predicted_step = Gauge(
            "metronome_plan_step_seconds",
            "The plan's calibrated decode-step latency, by number of live slots.",
            ("live_slots",),
            registry=r,
        )

    def _prefix_gauges(self, r: CollectorRegistry) -> None:
        """The prefix cache's pool, read at scrape time (zeros without an engine or a cache)."""

        def stat(read: Callable[[PrefixCache], float]) -> Callable[[], float]:
            def value() -> float:
                cache = self._engine.prefix_cache if self._engine is not None else None
                return float(read(cache)) if cache is not None else 0.0

            return value

        for name, doc, read in (
            ("pages", "Pages of the prefix cache's pool (allocated at start).", lambda c: c.pages),
            ("page_tokens", "Tokens per page of the prefix cache.", lambda c: c.page),
            ("pages_used", "Pages of the prefix cache holding a prompt's KV.", lambda c: c.used_pages),
        ):
            Gauge(f"metronome_prefix_cache_{name}", doc, registry=r).set_function(stat(read))

    def _speech_metrics(self, r: CollectorRegistry) -> None:
        """The speech endpoints' account (serve/audio.py): what is in their path now, the audio they
        transcribed, and where a request's time went."""
        self._speech_pending: Callable[[], int] | None = None  # read at scrape time; 0 with no speech service
        Gauge(
            "metronome_speech_requests_in_flight",
            "Transcriptions and translations admitted and not answered yet (uploading, decoding, queued, running).",
            registry=r,
        ).set_function(lambda: float(self._speech_pending()) if self._speech_pending is not None else 0.0)
        self.speech_audio = Counter(
            "metronome_speech_audio_seconds", "Seconds of audio in transcripts delivered.", registry=r
        )
        self.speech_time = Histogram(
            "metronome_speech_request_seconds",
            "A transcript's time from its upload read to its last text (audio decode, queue, run).",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )
        self.speech_queue = Histogram(
            "metronome_speech_queue_time_seconds",
            "Time a transcription waited for a speech worker.",
            buckets=_REQUEST_BUCKETS,
            registry=r,
        )

    def bind_speech(self, pending: Callable[[], int]) -> None:
        self._speech_pending = pending

    def observe_speech(self, usage: dict[str, float]) -> None:
        """Record one transcript delivered, from its `usage` (serve/audio.py's _usage)."""
        self.speech_audio.inc(usage["seconds"])
        self.speech_time.observe(usage["total_time"])
        self.speech_queue.observe(usage["queue_time"])

    def bind(self, engine: Engine) -> None:
        self._engine = engine
        self.publish_plan(engine)

    def publish_plan(self, engine: Engine) -> None:
        """The plan's predictions as gauges (called once an engine is bound): its calibrated step latency and
        the per-user speed it promises, by live slots. Each request's TTFT is compared with its own
        prediction as it ends (metronome_ttft_over_prediction_ratio)."""
        self.slots.set(engine.config.slots)
        report = engine.plan.report
        for live, ms in report.step_ms.items() if report is not None else ():
            self.predicted_step.labels(str(live)).set(ms / 1000.0)
            self.promised_speed.labels(str(live)).set(1000.0 / ms)

    def received(self, endpoint: str) -> ApiRequest:
        """Count a generation request as it arrives; end its account once with `ApiRequest.end`."""
        self.api_received.labels(endpoint).inc()
        self._api_in_flight += 1
        return ApiRequest(self, endpoint)

    def _api_ended(self, endpoint: str, outcome: str) -> None:
        self.api_ended.labels(endpoint, outcome).inc()
        self._api_in_flight -= 1

    def observe_submitted(self) -> None:
        """Count one engine request the engine accepted (each is observed again when it finishes)."""
        self.submitted.inc()
        self._engine_in_flight += 1

    def running(self) -> float:
        return float(len(self._engine.scheduler.by_slot)) if self._engine is not None else 0.0

    def waiting(self) -> float:
        return float(len(self._engine.scheduler.waiting)) if self._engine is not None else 0.0

    def pace(self) -> float:
        return self._engine.pace.factor if self._engine is not None else 1.0

    def occupancy(self) -> float:
        return self.running() / self._engine.config.slots if self._engine is not None else 0.0

    def observe_request(
        self,
        timings: Timings,
        prompt_tokens: int,
        generated: int,
        token_gaps: Sequence[float],
        reason: str,
        predicted_ttft_ms: float = float("nan"),
        cached_tokens: int = 0,
        request_fault: bool = False,
        promised_tps: float = float("nan"),
    ) -> None:
        """Record one engine request that ended (every submitted one ends: finished, cancelled or failed).
        `request_fault`: it failed for its own grammar, which is not the engine's error. `promised_tps`: the
        decode speed the engine promised with its first token (Request.promised_tps)."""
        self.finished.labels(reason).inc()
        self._engine_in_flight -= 1
        if reason == "error" and not request_fault:
            self.engine_errors.inc()
        self.generated_tokens.inc(generated)
        if timings.admitted is not None:
            self.prompt_tokens.inc(prompt_tokens)
            self.cached_tokens.inc(cached_tokens)
            self.queue_time.observe(timings.admitted - timings.submitted)
        if timings.first_token is not None:
            self.ttft.observe(timings.first_token - timings.submitted)
            if predicted_ttft_ms > 0:  # NaN (no promise: uncalibrated, or it waited for a slot) is skipped
                self.ttft_vs_plan.observe((timings.first_token - timings.submitted) * 1000 / predicted_ttft_ms)
            if timings.finished is not None and generated > 1 and timings.finished > timings.first_token:
                speed = (generated - 1) / (timings.finished - timings.first_token)
                self.decode_speed.observe(speed)
                if promised_tps > 0:  # NaN (no promise: an uncalibrated plan) is skipped
                    self.speed_vs_promise.observe(speed / promised_tps)
        if timings.first_sentence is not None:
            self.ttfs.observe(timings.first_sentence - timings.submitted)
        if timings.finished is not None and reason in ("stop", "length"):
            self.e2e.observe(timings.finished - timings.submitted)
        for gap in token_gaps:
            self.itl.observe(gap)
        if token_gaps:
            self.max_itl.observe(max(token_gaps))

    def render(self) -> bytes:
        return generate_latest(self.registry)
