"""One API request run as engine requests (n choices per prompt): submit them, carry their events
from the engine thread onto the event loop, and shape what they produce into OpenAI's chat and
text-completion bodies, whole or as stream chunks."""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Callable

from starlette.types import Receive

from metronome.config import SamplingParams
from metronome.engine import Delta, Engine, QueueFullError, Request, RequestError, Timings
from metronome.engine.grammar import Grammar, Grammars
from metronome.engine.request import Constraint
from metronome.engine.sampler import Choice
from metronome.serve.prometheus import ApiRequest, ServerMetrics, outcome_of
from metronome.serve.tools import LooseCalls, RepeatGuard
from metronome.serve.usage import groq_timings

_SEEDS = 1 << 64  # a seed is a signed 64-bit integer: [-2**63, 2**63)


def choice_seed(seed: int, index: int) -> int:
    """Choice `index`'s seed: seed + index, wrapped into the seed's 64-bit range (seed 2**63 - 1 with n=2
    was a 500, its first choice left generating for nobody)."""
    return (seed + index + _SEEDS // 2) % _SEEDS - _SEEDS // 2


class Outbox:
    """Carries events from the engine thread onto one event loop, with one loop wake-up per burst.

    A step ends with an event for each of its requests; waking the loop once per event costs a system call
    and a loop turn each (call_soon_threadsafe writes the loop's self-pipe). Here the first event of a burst
    schedules one drain, and the events that follow before it runs ride along."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue, Any]] = []

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        """Any thread: `queue.put_nowait(item)` on the loop, soon."""
        with self._lock:
            self._items.append((queue, item))
            if len(self._items) > 1:
                return  # a drain is already scheduled
        if not self.loop.is_closed():  # a closed loop means the server is gone: nobody is left to tell
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for queue, item in items:
            queue.put_nowait(item)


# The error a choice ends with when the server stops before it finished (ServerState.stop_generating):
# answered 503 server_shutting_down rather than the engine failure an "error" finish otherwise is.
SHUTTING_DOWN = "the server is shutting down"


class JobRefused(Exception):
    """The engine refused the request up front (queue full, or it cannot fit its slot)."""

    def __init__(self, message: str, param: str | None, queue_full: bool) -> None:
        super().__init__(message)
        self.param = param
        self.queue_full = queue_full


@dataclass(frozen=True)
class JobSpec:
    prompts: tuple[tuple[int, ...], ...]  # one per prompt; each gets n choices
    params: SamplingParams  # choice i of a seeded request uses seed + i (choice_seed)
    n: int
    grammar: Grammar | None = None  # what every choice's output is constrained to (tool calls, response_format)
    tool_calls: bool = False  # the grammar is a tool grammar: a repeated call ends the answer (tools.RepeatGuard)
    loose_calls: LooseCalls | None = None  # what the answer's loose calls may be (tools.LooseCalls)
    shaped_text: bool = False  # the tool grammar's text is response_format's JSON: no stop string cuts it


@dataclass
class ChoiceRun:
    """One choice: its engine request and what it produced so far."""

    index: int
    request: Request
    text: str = ""
    tokens: list[Choice] = field(default_factory=list)  # sampled tokens reported in logprobs
    prompt_choices: tuple[Choice, ...] = ()  # with prompt logprobs: prompt tokens 1.. scored (first event)
    finish_reason: str | None = None
    error: str | None = None
    last_token_at: float | None = None
    token_gaps: list[float] = field(default_factory=list)

    def absorb(self, delta: Delta, stamp: float, eos_ids: tuple[int, ...]) -> list[Choice]:
        """Take one event; returns the tokens it adds to the logprobs (a final end-of-sequence is left out)."""
        if delta.choices:
            # one event per step may carry several tokens (accepted drafts): they arrive together, so the
            # first waited the whole gap and the rest none, one gap per token as the client sees them
            gaps = [stamp - self.last_token_at] if self.last_token_at is not None else []
            self.token_gaps += gaps + [0.0] * (len(delta.choices) - 1)
            self.last_token_at = stamp
        reported = [
            c
            for i, c in enumerate(delta.choices)
            if not (delta.finish_reason == "stop" and i == len(delta.choices) - 1 and c.token in eos_ids)
        ]
        self.text += delta.text
        self.tokens += reported
        self.prompt_choices += delta.prompt_choices
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
            self.error = delta.error
        return reported


class Job:
    """The engine requests behind one API request. Create and consume it on the event loop."""

    def __init__(
        self,
        engine: Engine,
        spec: JobSpec,
        metrics: ServerMetrics,
        request_id: str,
        outbox: Outbox | None = None,
        grammars: Grammars | None = None,
    ) -> None:
        self.engine = engine
        self.grammars = grammars  # makes the constraint of a spec's grammar
        self.spec = spec
        self.metrics = metrics
        self.request_id = request_id
        self.loop = asyncio.get_running_loop()
        self.outbox = outbox if outbox is not None else Outbox(self.loop)
        self.events: asyncio.Queue[tuple[int, float, Delta]] = asyncio.Queue()
        self.runs: list[ChoiceRun] = []
        self.account: ApiRequest | None = None  # the API request's account, ended when its last choice ends

    def submit(self) -> None:
        """Queue every choice with the engine; all or none (a refusal cancels those already queued)."""
        p, n = self.spec.params, self.spec.n
        total, capacity = len(self.spec.prompts) * n, self.engine.capacity
        if capacity is not None and total > capacity:  # never admitted, however long it retries: not a 429
            raise JobRefused(
                f"this request asks for {total} generations at once ({len(self.spec.prompts)} prompt(s) x n={n}), "
                f"more than the server ever holds ({capacity}: its slots and --max-queue); ask for fewer",
                "n" if n > 1 else "prompt",
                queue_full=False,
            )
        try:
            for prompt in self.spec.prompts:
                for _ in range(n):
                    index = len(self.runs)
                    params = p if p.seed is None else replace(p, seed=choice_seed(p.seed, index))
                    req = self.engine.submit(
                        prompt,
                        params,
                        self._deliver(index),
                        self._constraint(),
                        request_id=f"{self.request_id}-{index}",
                    )
                    self.runs.append(ChoiceRun(index, req))
                    self.metrics.observe_submitted()
        except QueueFullError as exc:
            self.cancel_unfinished()
            raise JobRefused(f"the server is at capacity: {exc}; retry later", None, queue_full=True) from exc
        except RequestError as exc:
            self.cancel_unfinished()
            raise JobRefused(str(exc), exc.param, queue_full=False) from exc
        except BaseException:  # whatever else stops it: the choices already queued must not run for nobody
            self.cancel_unfinished()
            raise

    def _constraint(self) -> Constraint | None:
        """A new matcher per choice over the spec's grammar (every choice walks its own output)."""
        if self.spec.grammar is None:
            return None
        if self.grammars is None:
            raise RuntimeError("a job with a grammar needs the served Grammars")
        constraint = self.grammars.constraint(self.spec.grammar)
        if not self.spec.tool_calls:
            return constraint
        return RepeatGuard(
            constraint, self.engine.tokenizer, self.spec.loose_calls, free_text=not self.spec.shaped_text
        )

    def _deliver(self, index: int) -> Callable[[Delta], None]:
        """The engine-thread callback of choice `index`: stamp the event and hand it to the loop."""
        outbox, events = self.outbox, self.events

        def deliver(delta: Delta) -> None:
            outbox.put(events, (index, time.perf_counter(), delta))

        return deliver

    async def deltas(self) -> AsyncIterator[tuple[ChoiceRun, Delta, list[Choice]]]:
        """Events as they come, each with its choice and the tokens it reports, until every choice ended."""
        open_runs = sum(r.finish_reason is None for r in self.runs)
        eos = tuple(self.engine.tokenizer.eos_ids)
        while open_runs:
            index, stamp, delta = await self.events.get()
            run = self.runs[index]
            if run.finish_reason is not None:  # ended already (`stop`): the engine's own end that follows
                continue
            reported = run.absorb(delta, stamp, eos)
            if delta.finish_reason is not None:
                open_runs -= 1
                req = run.request
                self.metrics.observe_request(
                    req.timings,
                    len(req.prompt_ids),
                    len(req.output_ids),
                    run.token_gaps,
                    delta.finish_reason,
                    predicted_ttft_ms=req.predicted_ttft_ms,
                    promised_tps=req.promised_tps,
                    cached_tokens=req.cached_tokens,
                    request_fault=delta.request_fault,
                )
                if not open_runs and self.account is not None:
                    self.account.end(outcome_of(r.finish_reason for r in self.runs))
            yield run, delta, reported

    @property
    def done(self) -> bool:
        return all(r.finish_reason is not None for r in self.runs)

    async def settle(self) -> None:
        """Take the events still due after the client left (a cancelled choice ends within a step), so
        that every choice is counted in the metrics."""
        async for _ in self.deltas():
            pass

    def stop(self, reason: str) -> None:
        """End every unfinished choice now with an error event carrying `reason`, and cancel its engine
        request (the server is stopping: its clients get a clean end instead of a cut connection)."""
        for run in self.runs:
            if run.finish_reason is None and run.request.finish_reason is None:
                self.engine.cancel(run.request)
                stamp = time.perf_counter()
                self.events.put_nowait((run.index, stamp, Delta(run.request.id, "", (), "error", reason)))

    def cancel_unfinished(self) -> None:
        for run in self.runs:
            if run.request.finish_reason is None:
                self.engine.cancel(run.request)

    def usage(self) -> dict[str, int | float | None]:
        """Token counts and Groq-style timings of the whole request (its first submit to its last token)."""
        reqs = [r.request for r in self.runs]
        prompt = sum(len(p) for p in self.spec.prompts)
        completion = sum(len(r.output_ids) for r in reqs)
        n = self.spec.n
        # each prompt counts once in prompt_tokens, so its cached tokens do too: the most any of its choices
        # copied from the prefix cache (choices admitted in one step all compute it; later ones may hit)
        cached = sum(max(r.cached_tokens for r in reqs[i : i + n]) for i in range(0, len(reqs), n))
        # the first token is the earliest choice's (merge_timings): so is its promise
        promised = min((r.predicted_ttft_ms for r in reqs if r.predicted_ttft_ms >= 0), default=float("nan"))
        # the choices decode in the same steps: the speed promised with the earliest first token
        started = [r for r in reqs if r.timings.first_token is not None]
        speed = min(started, key=lambda r: r.timings.first_token).promised_tps if started else float("nan")
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached},
            **groq_timings(merge_timings([r.timings for r in reqs]), promised, speed),
        }


def merge_timings(all_timings: list[Timings]) -> Timings:
    """One request's timings from its choices': the earliest start, admission and first token, the latest end.
    Each span is then one the request lived through, and they add up to the total (with the latest admission,
    a choice admitted a step after another's first token made prompt_time negative)."""

    def first(values: list[float | None]) -> float | None:
        known = [v for v in values if v is not None]
        return min(known) if known else None

    def last(values: list[float | None]) -> float | None:
        return None if any(v is None for v in values) else max(values)  # type: ignore[type-var]

    return Timings(
        submitted=min(t.submitted for t in all_timings),
        admitted=first([t.admitted for t in all_timings]),
        first_token=first([t.first_token for t in all_timings]),
        first_sentence=first([t.first_sentence for t in all_timings]),
        finished=last([t.finished for t in all_timings]),
    )


async def client_gone(receive: Receive) -> None:
    """Return once the client has gone away (its request body was read already: what comes is the end)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(receive: Receive, job: Job) -> None:
    """Wait for the client to go away, then cancel the job's engine requests (their slots free next step)."""
    await client_gone(receive)
    job.cancel_unfinished()
