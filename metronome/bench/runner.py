"""The concurrency sweep: rounds interleaved across targets, each measurement a closed loop.

Order: for each round, for each concurrency level, for each target (A B C A B C ...), so that
slow drift of the machine (heat, background load) touches every target alike. A measurement of
target T at concurrency c runs `warmup` unmeasured requests, then c users that each send
`requests_per_user` requests back to back; its wall time runs from the first measured request
to the last answer. Prompt keys are `round.concurrency.user.seq`: unique within a target, and the
same prompt set for every target at the same point of the sweep, so targets see equal work.

Ctrl-C (KeyboardInterrupt, also when raised by an observer) stops the sweep; everything finished
so far, including the finished requests of the interrupted measurement, is returned.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol, Sequence

import httpx

from metronome.bench.client import Api, RequestSpec, stream_request
from metronome.bench.metrics import RequestResult, derive_result
from metronome.bench.workloads import Prompt, PromptBuilder, Workload


@dataclass(frozen=True)
class Target:
    """A server to measure: its label, base URL and the model id to send."""

    name: str
    base_url: str
    model: str
    model_found_by: str = "given"
    command: tuple[str, ...] = ()


@dataclass(frozen=True)
class SweepConfig:
    """What to send and how often; checked on construction (errors name the CLI option)."""

    workload: Workload
    concurrency: tuple[int, ...]
    rounds: int
    requests_per_user: int
    warmup: int
    seed: int
    api: Api
    ignore_eos: bool
    temperature: float
    request_timeout_s: float

    def __post_init__(self) -> None:
        if not self.concurrency or any(c < 1 for c in self.concurrency):
            raise ValueError(f"--concurrency needs levels of at least 1 (got {list(self.concurrency)})")
        for flag, value, least in (
            ("--rounds", self.rounds, 1),
            ("--requests-per-user", self.requests_per_user, 1),
            ("--warmup", self.warmup, 0),
        ):
            if value < least:
                raise ValueError(f"{flag} must be at least {least} (got {value})")
        if not self.request_timeout_s > 0:
            raise ValueError(f"--request-timeout must be positive (got {self.request_timeout_s})")

    def planned_requests(self, targets: int) -> int:
        """Measured requests in a complete sweep over `targets` targets (warmups not counted)."""
        return self.rounds * targets * sum(c * self.requests_per_user for c in self.concurrency)


@dataclass(frozen=True)
class Measurement:
    """One target at one concurrency in one round."""

    target: str
    concurrency: int
    round_index: int
    started_at: float  # unix time
    wall_s: float
    complete: bool
    warmup_errors: tuple[str, ...]
    requests: tuple[RequestResult, ...]


@dataclass(frozen=True)
class SweepOutcome:
    """Every finished measurement in sweep order; `interrupted` when Ctrl-C cut the sweep short."""

    measurements: tuple[Measurement, ...]
    interrupted: bool


class SweepObserver(Protocol):
    """Told about progress; may raise KeyboardInterrupt to stop the sweep."""

    def measurement_started(self, target: Target, concurrency: int, round_index: int) -> None: ...

    def request_done(self, target: Target, result: RequestResult) -> None: ...


class _OpenMeasurement:
    """A measurement being filled; `close` freezes it."""

    def __init__(self, target: Target, concurrency: int, round_index: int) -> None:
        self.target, self.concurrency, self.round_index = target, concurrency, round_index
        self.started_at = time.time()
        self.start = time.perf_counter()
        self.end: float | None = None
        self.warmup_errors: list[str] = []
        self.requests: list[RequestResult] = []

    def close(self, complete: bool) -> Measurement:
        end = self.end
        if end is None and self.requests:  # cut short (Ctrl-C): the window ends with its last finished request,
            # not at the interrupt, which would count the time the unfinished ones ran against the finished ones
            end = self.start + max(r.started_s + r.total_s for r in self.requests)
        elif end is None:
            end = time.perf_counter()
        return Measurement(
            target=self.target.name,
            concurrency=self.concurrency,
            round_index=self.round_index,
            started_at=self.started_at,
            wall_s=end - self.start,
            complete=complete,
            warmup_errors=tuple(self.warmup_errors),
            requests=tuple(sorted(self.requests, key=lambda r: (r.user, r.seq))),
        )


class _Sweep:
    def __init__(
        self, targets: Sequence[Target], config: SweepConfig, builder: PromptBuilder, observer: SweepObserver
    ) -> None:
        self.targets, self.config, self.builder, self.observer = targets, config, builder, observer
        self.done: list[Measurement] = []
        self.current: _OpenMeasurement | None = None

    def _spec(self, key: str) -> tuple[RequestSpec, Prompt]:
        prompt = self.builder.build(key, self.config.workload.input_tokens)
        spec = RequestSpec(
            prompt=prompt.text,
            max_tokens=self.config.workload.output_tokens,
            ignore_eos=self.config.ignore_eos,
            temperature=self.config.temperature,
        )
        return spec, prompt

    async def _one(
        self, http: httpx.AsyncClient, target: Target, key: str, user: int, seq: int, origin: float
    ) -> RequestResult:
        spec, prompt = self._spec(key)
        started = time.perf_counter() - origin
        trace = await stream_request(
            http, target.base_url, self.config.api, target.model, spec, self.config.request_timeout_s
        )
        return derive_result(
            trace,
            key=key,
            user=user,
            seq=seq,
            started_s=started,
            requested_output_tokens=spec.max_tokens,
            prompt_tokens=prompt.input_tokens,
            prompt_counted_by=prompt.counted_by,
            prompt_chars=len(prompt.text),
            counter=self.builder.counter,
        )

    async def _measure(self, target: Target, concurrency: int, round_index: int) -> None:
        config = self.config
        timeout = httpx.Timeout(connect=30.0, read=config.request_timeout_s, write=30.0, pool=None)
        limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
        async with httpx.AsyncClient(timeout=timeout, limits=limits) as http:
            for index in range(config.warmup):
                warm = await self._one(
                    http, target, f"w{round_index}.{concurrency}.{index}", -1, index, time.perf_counter()
                )
                if not warm.ok:
                    self.current_or_fail().warmup_errors.append(f"{warm.error_kind}: {warm.error}")
            record = self.current_or_fail()
            record.start = time.perf_counter()
            record.started_at = time.time()

            async def user(u: int) -> None:
                for seq in range(config.requests_per_user):
                    key = f"{round_index}.{concurrency}.{u}.{seq}"
                    result = await self._one(http, target, key, u, seq, record.start)
                    record.requests.append(result)
                    self.observer.request_done(target, result)

            await asyncio.gather(*(user(u) for u in range(concurrency)))
            record.end = time.perf_counter()

    def current_or_fail(self) -> _OpenMeasurement:
        if self.current is None:
            raise RuntimeError("no measurement is open")
        return self.current

    async def run(self) -> None:
        for round_index in range(self.config.rounds):
            for concurrency in self.config.concurrency:
                for target in self.targets:
                    self.current = _OpenMeasurement(target, concurrency, round_index)
                    self.observer.measurement_started(target, concurrency, round_index)
                    await self._measure(target, concurrency, round_index)
                    self.done.append(self.current.close(complete=True))
                    self.current = None


def run_sweep(
    targets: Sequence[Target], config: SweepConfig, builder: PromptBuilder, observer: SweepObserver
) -> SweepOutcome:
    """Measure every target at every concurrency for every round; partial on Ctrl-C."""
    if not targets:
        raise ValueError("nothing to measure: give --url or --model")
    names = [t.name for t in targets]
    if len(set(names)) != len(names):
        raise ValueError(f"target names must differ (got {names})")
    sweep = _Sweep(targets, config, builder, observer)
    try:
        asyncio.run(sweep.run())
    except KeyboardInterrupt:
        measurements = list(sweep.done)
        if sweep.current is not None and sweep.current.requests:
            measurements.append(sweep.current.close(complete=False))
        return SweepOutcome(measurements=tuple(measurements), interrupted=True)
    return SweepOutcome(measurements=tuple(sweep.done), interrupted=False)
