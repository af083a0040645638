"""The engine plays the plan: requests take fixed slots, every step is schedule -> run plan -> sample -> emit.

Thread model: `submit`/`cancel` may be called from any thread; `step` runs on one thread (the caller's,
or the engine's own after `start()`). Each request's events go to its `on_event` callback, called on
the stepping thread.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import os
import statistics
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from metronome.compile import Plan, compile_plan
from metronome.compile.fused import PREFILL_CHUNK
from metronome.compile.stages import resolve_settings
from metronome.config import EngineConfig, Layout, SamplingParams
from metronome.engine.api import PythonAPI
from metronome.engine.pace import Pace, PaceByRows
from metronome.engine.prefix_cache import PrefixCache
from metronome.engine.profile import PhaseClock, StepProfile
from metronome.engine.request import (
    Constraint,
    ConstraintError,
    Delta,
    QueueFullError,
    Request,
    RequestError,
    SpecStats,
    Timings,
)
from metronome.engine.sampler import Choice, RequestSampler, argmax_rows, draw_settings, scored, uniforms
from metronome.engine.scheduler import Batch, Scheduler, check_max_queue
from metronome.engine.speculate import (
    Drafter,
    LookupOrModel,
    ModelDrafter,
    NgramDrafter,
    PayingDrafter,
    check_draft_tokenizer,
)
from metronome.engine.text import TextStream
from metronome.model.errors import ModelFileError, ModelNotFoundError
from metronome.model.loader import LoadedModel, load
from metronome.model.tokenizer import Tokenizer
from metronome.parallel.disagg import KVShape, PrefillJob, PrefillWorker

_LOG = logging.getLogger("metronome.engine")

PROBE_ROWS = 128  # the prompt a new prefill worker runs first, to measure its time against the plan's price
IDLE_WAKEUP_S = 1.0  # the stepping thread's longest sleep without work (bounds every wait)
# prompt rows whose logits a whole-prompt runner scores at once (prompt_logprobs): 256 x a 152k vocabulary
# is 156 MB of float32, where all 2,000 rows of a prompt at once were 1.2 GB (and their log-softmax as much)
SCORE_ROWS = 256


@dataclass
class StepRows:
    """The rows of one plan call: (slot, token, position) each, and which rows' logits the step needs.
    `firsts`: where each request's rows begin in the logits the call returns, the decoding requests' first
    and then the prompt chunks', in the step's order (one place that counts them, for _picks and _run)."""

    slots: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)
    logit_rows: list[int] = field(default_factory=list)
    prompt_rows: int = 0
    firsts: list[int] = field(default_factory=list)

    def begin(self) -> None:
        """The next rows added are the next request's."""
        self.firsts.append(len(self.logit_rows))

    def add(self, slot: int, token: int, position: int, logits: bool) -> None:
        if logits:
            self.logit_rows.append(len(self.slots))
        self.slots.append(slot)
        self.tokens.append(token)
        self.positions.append(position)


def _sampling_row(r: Request, lo: int, hi: int, first: int) -> int | None:
    """The logits row from which prompt chunk [lo, hi) of `r` samples the first output token, given where its
    rows begin (`first`): its last row, when the chunk ends the prompt (after its scored rows, with
    prompt_logprobs, where every row has logits); None when the prompt goes on."""
    if hi != len(r.prompt_ids):
        return None
    return first + (hi - lo - 1 if r.params.prompt_logprobs else 0)


@dataclass
class _StepOutput:
    """What one request produced in this step, delivered as one event at its end."""

    text: list[str] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)
    finish: str | None = None


@dataclass(frozen=True)
class _InFlight:
    """The step the plan is running: when its call began, the plan's price of its rows (what a request
    submitted meanwhile waits for before anything of its own runs, and what the step's time is held to for
    the engine's pace), and where each prompt it carries stands once it ends (by slot)."""

    started: float  # time.perf_counter()
    price_ms: float  # PlanReport.step_ms_with its decode rows and prompt chunks (NaN: no calibration)
    prefilled: dict[int, int]


def _mean_position(requests: Sequence[Request]) -> float | None:
    """The mean position of the decode rows of `requests` (their attention reads what they have cached)."""
    return sum(r.position for r in requests) / len(requests) if requests else None


def _slack_ms(r: Request, now: float, pace: float) -> float:
    """The time from `now` (perf_counter) to `r`'s promised first token, in the plan's ms (real ms over the
    engine's `pace`, as the plan's prices are compared with it); infinite where `r` was promised nothing."""
    promised = r.predicted_ttft_ms
    if promised != promised:  # NaN: uncalibrated, or it waited for a slot
        return float("inf")
    return (1000 * (r.timings.submitted - now) + promised) / pace


# A request that finds the engine idle waits longer than its price: SmolLM2's new prompts of 10, 40 and 200
# tokens took under 1 ms more after the engine idled 20 ms, 9-11 ms more after 100 ms and 12-17 ms more after
# 1 s, about the same whatever the prompt; and the extra moved from 4 to 48 ms between minutes on these VMs
# (2026-12-03, docs/performance.md). So the engine learns it from such requests (the median of the last
# RESUME_SAMPLES) and adds it, in part after a short wait and in full from RESUME_FULL_S.
RESUME_FROM_S = 0.02
RESUME_FULL_S = 0.1
RESUME_SAMPLES = 8


def resume_share(idle_s: float) -> float:
    """The share of the learned resume cost a request pays after the engine idled `idle_s` seconds."""
    return min(1.0, max(0.0, (idle_s - RESUME_FROM_S) / (RESUME_FULL_S - RESUME_FROM_S)))


class Engine(PythonAPI):
    def __init__(
        self,
        plan: Plan,
        tokenizer: Tokenizer,
        model_name: str = "",
        max_queue: int | None = None,
        drafter: Drafter | None = None,
    ) -> None:
        self.plan = plan
        # Speculation needs rows of one slot in a step: the fused plan's row-independent decoder. Prompt lookup's
        # guesses are free to make but not to check: each is a row of the step, which costs up to half of a
        # one-row step on an AVX2 CPU (docs/models.md), so drafting is judged and paused where it loses.
        use = plan.runner.any_rows and plan.config.spec_tokens > 0
        self.drafter = (drafter or PayingDrafter(NgramDrafter())) if use else None
        self.spec = SpecStats()
        self.tokenizer = tokenizer
        self.config: EngineConfig = plan.config
        self.model_name = model_name
        self.scheduler: Scheduler[Request] = Scheduler(self.config.slots, max_queue)
        self._lock = threading.Condition()
        # One step at a time: held by whoever steps (the engine's thread, or callers of `step()`, such as
        # `generate` from several threads without `start()`): two plan calls at once would run the same
        # slots' rows together and corrupt their KV and logits.
        self._step_lock = threading.Lock()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self._closed = False  # close() released the runner and the prefill worker: nothing may run again
        self._calling_back: int | None = None  # the thread handing events to callbacks now (_send_events)
        self.steps = 0
        self.profile = StepProfile()  # where the steps' time goes (profile.py)
        self.thread_id: int | None = None  # the stepping thread's OS id once it runs
        # events made by the steps, not yet handed to their callbacks (see _send_events)
        # (the request, its event): the request itself, since ids may repeat (a caller's own request_id)
        self._outgoing: collections.deque[tuple[Request, Delta]] = collections.deque()
        # prompts that begin like earlier ones copy that beginning's KV from the plan's pool (prefix_cache.py)
        self.prefix_cache = PrefixCache(plan.pages) if plan.pages is not None else None
        self.prefiller: PrefillWorker | None = None  # disaggregated layout: where prompts run (attach_prefiller)
        self._in_flight: _InFlight | None = None  # set by the stepping thread around its plan call
        self._step_started: float | None = None  # perf_counter() at the running step's start (step_s)
        # what requests that found the engine idle waited beyond their price (ms; _resume_ms, _learn_resume)
        self._resume_extras: collections.deque[float] = collections.deque(maxlen=RESUME_SAMPLES)
        # how much longer than the plan's prices the priced steps take now: every TTFT promise is multiplied
        # by it (pace.py); measured from the step's start to its last token sampled, less a draft model's time
        self.pace = Pace()
        # ... and by how many decode rows a step without prompt rows ran (a lone user's drafts are priced as
        # more rows of its slot): each speed promise is multiplied by the pace at its own load (_promise_tps)
        self.decode_pace = PaceByRows()

    @classmethod
    def from_model(
        cls,
        path: str | None = None,
        config: EngineConfig | None = None,
        calibrate: bool = False,
        max_queue: int | None = None,
        loaded: LoadedModel | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> "Engine":
        """Load a GGUF file or HF folder (default: the embedded SmolLM2) and compile its plan."""
        # checked before the load and the compile (seconds to minutes), which failed on them from deep inside
        if config is not None and not isinstance(config, EngineConfig):
            raise TypeError(
                f"config: expected an EngineConfig (e.g. EngineConfig(slots=2)), got {type(config).__name__}"
            )
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"path: expected a model name or a file/folder path (str), got {type(path).__name__}")
        check_max_queue(max_queue)
        config = config or EngineConfig()
        loaded = loaded or load(path)
        tokenizer = Tokenizer(loaded.tokenizer)  # a vocabulary it cannot build is reported before the compile
        prefill_threads = 0
        if config.layout == Layout.DISAGGREGATED:  # the cores shared between the decode engine and the worker
            cores = resolve_settings(loaded.config, config).threads or 1
            prefill_threads = max(1, cores // 2)
            config = dataclasses.replace(config, threads=max(1, cores - prefill_threads))
        # a bad --draft is reported before the target's compile (seconds to minutes), not after it
        draft_loaded = None
        if config.draft is not None and config.spec_tokens:
            try:
                draft_loaded = load(config.draft, param="draft")
            except ModelNotFoundError:
                raise  # names `draft` already
            except ModelFileError as exc:  # the file's own fault: say it is the draft model's
                raise ModelFileError(f"draft={config.draft!r}: {exc}") from None
            check_draft_tokenizer(config.draft, Tokenizer(draft_loaded.tokenizer), tokenizer)
        plan = compile_plan(loaded, config, calibrate=calibrate, progress=progress)
        engine = None
        try:  # past the compile, a refusal releases the ranks the plan started (a retry could not form them)
            drafter = None if draft_loaded is None else cls._drafter(config, plan, draft_loaded, progress)
            engine = cls(plan, tokenizer, loaded.config.name or loaded.path.stem, max_queue, drafter)
            if config.layout == Layout.DISAGGREGATED:
                engine.attach_prefiller(str(loaded.path), prefill_threads)
        except BaseException:
            if engine is not None and engine.prefiller is not None:
                engine.prefiller.close()
            plan.runner.close()
            raise
        return engine

    @staticmethod
    def _drafter(
        config: EngineConfig, plan: Plan, draft_loaded: LoadedModel, progress: Callable[[str], None] | None
    ) -> "PayingDrafter":
        """The draft model's drafter, compiled with the main plan's ctx. In this process alone (tp 1, its own
        cut): its drafts are checked by the main plan, so its bits need not match anything, and compiled with
        the main plan's tp it formed a second process group (refused, and at tp 2 rank 1 was left running).
        It keeps no prefix pool (it catches up on prompts itself)."""
        draft_config = dataclasses.replace(
            plan.config,
            spec_tokens=0,
            draft=None,
            prefix_cache_tokens=0,
            tp=1,
            tp_shards=None,
            layout=Layout.COLOCATED,
            pin_threads=bool(plan.report.cpus),  # the kernels' pool is the process's: placed as the main plan's
        )
        draft_plan = compile_plan(draft_loaded, draft_config, calibrate=False, progress=progress)
        try:
            # prompt lookup while the text copies; where it does not, the draft model (lookup's guesses
            # checked in its one call a step), paused where it does not pay
            # (the draft model judged on its own steps, and both modes together: lookup's rows cost too)
            model = PayingDrafter(ModelDrafter(draft_plan, plan.cfg.vocab_size, lookup=NgramDrafter()))
            return PayingDrafter(LookupOrModel(NgramDrafter(), model, slots=plan.config.slots))
        except ValueError as exc:
            raise ValueError(f"draft={config.draft!r}: {exc}") from None

    def attach_prefiller(self, path: str, threads: int) -> None:
        """Run prompts on a prefill worker process (parallel/disagg.py) with `threads` threads; their KV
        comes back into this engine's slots. The plan must be the fused one (its rows have the same bits
        wherever they run)."""
        if not self.plan.runner.any_rows:
            raise ValueError("layout='disaggregated' needs the fused CPU decoder (int4/int8 weights, C++ kernels)")
        config, k = self.config, self.plan.cache.k  # with tp > 1, rank 0's share of the KV heads
        heads = k.shape[2]
        if config.tp > 1:  # the worker runs the ranks' chunks (the plan's tp_shards) in one process: the same bits
            config = dataclasses.replace(config, tp=1)
            heads *= self.config.tp
        shape = KVShape(k.shape[0], heads, k.shape[4], self.plan.cfg.vocab_size, k.dtype)
        self.prefiller = PrefillWorker(path, config, shape, self._wake, threads)
        rows = min(PROBE_ROWS, self.config.ctx - 1)
        price = self._worker_price_ms(self.prefiller, 0, rows)
        if price > 0:  # a calibrated plan: its prices get the worker's measured slowdown from the start
            self.prefiller.probe(price, rows)

    def _wake(self) -> None:
        with self._lock:
            self._lock.notify()

    # -- requests --------------------------------------------------------------------------------

    def submit(
        self,
        prompt_ids: Sequence[int],
        params: SamplingParams,
        on_event: Callable[[Delta], None] | None = None,
        constraint: Constraint | None = None,
        request_id: str | None = None,
    ) -> Request:
        """Queue a request; refused at once (RequestError) if it cannot fit its slot. `params` were checked
        when they were built (SamplingParams is frozen and validates in __post_init__)."""
        self._refuse_closed()
        prompt = list(prompt_ids)
        ctx = self.config.ctx
        if not prompt:
            raise RequestError("the prompt is empty: send at least one token of text", param="prompt")
        vocab = self.plan.cfg.vocab_size
        bad = next((t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab), None)
        if bad is not None:  # caught here, not in a step, where it would fail every request beside it
            raise RequestError(f"prompt token {bad!r} is not a token id in [0, {vocab})", param="prompt")
        outside = next((t for t in params.stop_token_ids if t >= vocab), None)
        if outside is not None:
            raise RequestError(f"stop_token_ids names {outside}, outside the vocabulary [0, {vocab})", "stop_token_ids")
        outside = next((t for t, _ in params.logit_bias if t >= vocab), None)
        if outside is not None:
            raise RequestError(f"logit_bias names token {outside}, outside the vocabulary [0, {vocab})", "logit_bias")
        if params.prompt_logprobs and self.prefiller is not None:
            raise RequestError(
                "prompt logprobs (echo with logprobs) need the prompt's logits, which the disaggregated "
                "layout's prefill worker does not return: serve with --layout colocated",
                param="prompt_logprobs",
            )
        if len(prompt) + params.max_tokens > ctx:
            raise RequestError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds the context "
                f"of {ctx} tokens; shorten the prompt or lower max_tokens (or give the engine a larger ctx, --ctx)",
                param="max_tokens" if len(prompt) < ctx else "prompt",
            )
        req = Request(
            id=request_id or f"req-{next(self._ids)}",
            prompt_ids=prompt,
            params=params,
            sampler=RequestSampler(params, prompt, self.plan.cfg.vocab_size, self.plan.draw_rows),
            text=TextStream(
                self.tokenizer.stream_decoder(prompt),
                params.stop,
                frozenset(params.stop_token_ids)
                | (frozenset() if params.ignore_eos else frozenset(self.tokenizer.eos_ids)),
            ),
            on_event=on_event or (lambda _d: None),
            timings=Timings(time.perf_counter()),
            constraint=constraint,
        )
        with self._lock:
            # again under the lock close() takes to shut: checked only above, a submit racing close() queued its
            # request after close() had ended the others, and it never ended
            self._refuse_closed()
            if self.scheduler.queue_full:
                raise QueueFullError(
                    f"{self.scheduler.holding} requests are in, the most {self.config.slots} slots and a queue of "
                    f"{self.scheduler.max_queue} hold"
                )
            reuse = self.prefix_cache is not None and not params.prompt_logprobs  # as _schedule loads it
            cached = self.prefix_cache.peek(prompt) if reuse else 0
            req.expected_cached = cached
            req.predicted_ttft_ms = self._predict_ttft_ms(cached, len(prompt) - cached)
            req.resume_ms = self._resume_ms(req)
            req.predicted_ttft_ms += req.resume_ms
            self.scheduler.add(req)
            self._lock.notify()
        return req

    def _predict_ttft_ms(self, cached: int, prompt_tokens: int) -> float:
        """The plan's TTFT for a prompt submitted now (call under the lock): the prompt rows ahead of it
        (admitted prompts not yet in the cache, then the queue, less what each found in the prefix cache at
        its submit), then its own, at the calibrated step costs times the engine's pace (pace.py), the decode
        rows beside them priced at their mean position, each step keeping the promises of the prompts ahead
        (`PlanReport.keep_promises`); in the disaggregated layout, the prefill worker's queue
        (_predict_remote_ttft_ms). NaN when it would wait for a slot to free (that depends on how long
        others run)."""
        sched = self.scheduler
        if len(sched.by_slot) + len(sched.waiting) >= self.config.slots:
            return float("nan")
        # A request the stepping thread has just given a slot, outside this lock, is given its prefix cache's
        # beginning and then stamped `admitted` a moment later (_schedule): until then it comes after those
        # admitted before it (by_slot holds them in the order they took their slots) and starts where its
        # submit found the cache, as it will. Read as admitted at 0 and from token 0, a burst's first prompt
        # was priced behind the others, and every later arrival's promise with it (twice its TTFT).
        running = sorted(sched.by_slot.values(), key=lambda r: r.timings.admitted or float("inf"))
        # a step in flight has its rows already: the prompts it carries stand where it leaves them, and
        # what is left of it comes first (requests that arrive together land mostly in such a step's time)
        flight = self._in_flight
        pace = self.pace.factor
        wait_ms = 0.0
        after = {r.slot: r.prefilled if r.timings.admitted else max(r.prefilled, r.expected_cached) for r in running}
        if flight is not None and self.prefiller is None:
            price = pace * flight.price_ms
            wait_ms = max(0.0, price - 1000 * (time.perf_counter() - flight.started)) if price == price else 0.0
            after.update((slot, at) for slot, at in flight.prefilled.items() if slot in after)
        prefilling = [r for r in running if after[r.slot] < len(r.prompt_ids)]
        waiting = [(r.expected_cached, len(r.prompt_ids) - r.expected_cached) for r in sched.waiting]
        decoding = len(running) - len(prefilling)
        # the decode rows' attention reads what they have cached: a long conversation's rows cost more
        position = _mean_position([r for r in running if r.prefilled == len(r.prompt_ids)])
        if self.prefiller is not None:  # admitted prompts are on the worker (its backlog), not in our steps
            return self._predict_remote_ttft_ms(self.prefiller, [*waiting, (cached, prompt_tokens)], decoding, position)
        ahead = [(after[r.slot], len(r.prompt_ids) - after[r.slot]) for r in prefilling] + waiting
        chunk = self.config.prefill_chunk if self.plan.runner.any_rows else PREFILL_CHUNK
        queue = [*ahead, (cached, prompt_tokens)]
        # the steps keep the promises of the prompts ahead (_prompt_chunks), so the prediction does too:
        # their time left once the step in flight has ended
        now = time.perf_counter() + wait_ms / 1000
        slack = [_slack_ms(r, now, pace) for r in [*prefilling, *sched.waiting]] + [float("inf")]
        return wait_ms + pace * self.plan.report.ttft_ms(queue, decoding, chunk, PREFILL_CHUNK, position, slack)

    def _resume_ms(self, req: Request) -> float:
        """What `req` will wait beyond its price because the engine is idle (call under the lock, before
        `req` is queued): the learned extra (`_learn_resume`) times `resume_share` of the plan's idle time.
        Marks `req` as one to learn from when the engine has idled RESUME_FULL_S or more."""
        sched = self.scheduler
        if self._in_flight is not None or sched.by_slot or sched.waiting or self.prefiller is not None:
            return 0.0
        idle_s = time.perf_counter() - self.plan.last_call
        req.found_idle = idle_s >= RESUME_FULL_S
        extras = list(self._resume_extras)
        return max(0.0, statistics.median(extras)) * resume_share(idle_s) if extras else 0.0

    def _promise_tps(self, r: Request) -> float:
        """The decode speed promised to `r`, whose first token comes now, over the rest of its budget
        (max_tokens): a token a step, each step at the plan's price for every slot held now (decoding, or in
        its prompt and about to decode beside it) at the mean position they will hold halfway through that
        budget, times the pace of recent steps with as many decode rows (pace.PaceByRows; the engine's
        overall pace until enough have run). Priced at the rows' positions now, eight SmolLM2 users'
        200-token answers came 15 % short of it: each step reads more keys than the last.

        Made at the first token, not at submit: a burst's requests arrive one by one, and the first of them
        would be promised a step of its own. A floor where the answer ends early (fewer keys to read), or
        where speculation's accepted drafts add tokens to a step; it holds while the load does. NaN for an
        uncalibrated plan."""
        with self._lock:  # submit and cancel change the slots from other threads
            held = [q for q in self.scheduler.by_slot.values() if not q.cancelled]  # cancelled: gone within a step
        now = _mean_position(held)
        if now is None:  # not reached: `r` itself holds a slot
            return float("nan")
        position = min(now + (r.params.max_tokens - len(r.output_ids)) / 2, self.config.ctx)
        pace = self.decode_pace.factor(len(held), otherwise=self.pace.factor)
        price = pace * self.plan.report.step_ms_at(len(held), position)
        return 1000.0 / price if price > 0 else float("nan")  # NaN: no calibration at this many slots

    def _learn_resume(self, r: Request, first_token: float) -> None:
        """A request that found the engine idle got its first token: keep what it waited beyond its price."""
        base_ms = r.predicted_ttft_ms - r.resume_ms
        if r.found_idle and base_ms == base_ms:  # NaN: no price to compare with
            self._resume_extras.append(1000 * (first_token - r.timings.submitted) - base_ms)

    def _predict_remote_ttft_ms(
        self, prefiller: PrefillWorker, queued: list[tuple[int, int]], decoding: int, position: float | None = None
    ) -> float:
        """The disaggregated layout's TTFT for the last of `queued` ((cached, rows) of the prompts that will
        be sent to the worker, in order). The worker runs one prompt at a time, in the order they were sent,
        each in one call of its rows with nothing beside them (`_worker_price_ms`; a job sent carries its
        price): what is left of the job it runs now, the jobs sent after it, then these, each price times
        the worker's recent slowdown beside this engine (`Backlog.slowdown`). Around that: the wait for
        the engine's next step, which sends the prompt, and after the worker, the wait for the step that
        installs its KV and samples the first token: half a decode step each, on average (none while nobody
        decodes: the engine then waits for work and wakes at once)."""
        backlog = prefiller.backlog()
        prices = [*backlog.prices, *(self._worker_price_ms(prefiller, cached, rows) for cached, rows in queued)]
        costs = [backlog.slowdown * price for price in prices]
        if backlog.prices:
            costs[0] = max(0.0, costs[0] - 1000 * backlog.running_s)
        return sum(costs) + (self.plan.report.step_ms_with(decoding, (), position) if decoding else 0.0)

    def _worker_price_ms(self, prefiller: PrefillWorker, cached: int, rows: int) -> float:
        """The plan's price of a prompt's `rows` after `cached` on the worker, in one call with nothing beside
        them, at its share of the threads (the plan was timed with the engine's: `threads` on each of its `tp`
        ranks; prompt rows are bound by arithmetic, so their time goes as 1 / threads)."""
        share = (self.config.threads or 1) * self.config.tp / (prefiller.config.threads or 1)
        return share * self.plan.report.step_ms_with(0, [(cached, rows)])

    def cancel(self, request: Request) -> None:
        """Stop a request; its slot is free after the next step."""
        with self._lock:
            request.cancelled = True
            self._lock.notify()

    # -- the step --------------------------------------------------------------------------------

    @property
    def step_s(self) -> float | None:
        """How long the step running now has run, in seconds (None between steps): a stuck step (a rank that
        stopped answering) shows here; the server's /health reads it."""
        started = self._step_started
        return None if started is None else time.perf_counter() - started

    def step(self) -> int:
        """One step of the score: schedule -> run plan -> sample -> emit. Returns the rows the plan ran.
        Every event of the step has reached its callback when this returns. A step that raises ends the
        requests it ran with "error" (their slots free, as the engine's own thread does) and re-raises:
        left in their slots, every later step would have failed on them. Callers on several threads take
        turns (each waits for the step running to end)."""
        self._refuse_reentry("step")
        self._refuse_closed()
        try:
            with self._step_lock:
                try:
                    ran = self._step()
                except BaseException as exc:  # Ctrl-C too: a step cut midway left others' requests half-sampled
                    self._fail_running(exc)
                    self._send_events()
                    raise
                self._send_events()
                return ran
        finally:
            if self._closed:  # a close() that gave up waiting for this step left its requests in: they end now
                self._end_all("the engine was closed")

    def _send_events(self) -> None:
        """Hand the events made so far to their callbacks, in the order they were made.

        The stepping thread calls this just before its next plan call, not as each request's tokens are
        sampled: a server's callbacks wake its event loop, whose work then runs while the plan runs in C++
        without the GIL, instead of taking the GIL from the step's own Python work (sampling, stop checks).
        An event waits for the next step's scheduling only (microseconds); with no next step to run, the
        loop sends them at once (_loop). A callback that raises fails its own request only: the request
        is cancelled with the error noted on it and logged, and the other requests' events go on (raised
        from here, it failed every request of the step, or reached whichever caller was stepping); of that
        request's events still to come, only its end is sent."""
        self._calling_back = threading.get_ident()
        try:
            while self._outgoing:
                request, delta = self._outgoing.popleft()
                if request.callback_failed and delta.finish_reason is None:
                    continue  # the tokens of steps that ran before its cancel took effect: only its end goes out
                try:
                    request.on_event(delta)
                except Exception as exc:
                    self._callback_failed(request, delta, exc)
        finally:
            self._calling_back = None

    def _callback_failed(self, request: Request, delta: Delta, exc: Exception) -> None:
        """Logged always (a callback failing on a request's last event has nothing left to cancel, and
        went unseen); a request still running is cancelled, with the reason on it. (The request itself,
        not one found by its id: two requests a caller gave the same id, the other one was cancelled.)"""
        if request.finish_reason is None and not request.cancelled:
            request.callback_failed = True
            request.error = f"its callback raised {type(exc).__name__}: {exc}"
            self.cancel(request)
            _LOG.error("request %s: its callback raised; the request is cancelled", delta.request_id, exc_info=exc)
        else:
            _LOG.error("request %s: its callback raised on its last event", delta.request_id, exc_info=exc)

    def _refuse_reentry(self, what: str) -> None:
        """generate/stream/step/close from inside a callback would wait for the step that is calling it:
        a hang (and every other caller behind it)."""
        if self._calling_back == threading.get_ident():
            raise RuntimeError(
                f"{what}() was called from an engine callback (on_event), which runs inside a step and would "
                "wait for that step to end; submit() from the callback instead, or hand the work to another thread"
            )

    def _refuse_closed(self) -> None:
        if self._closed:
            raise RuntimeError("this engine was closed (close() or the end of its `with` block); build another")

    def _step(self) -> int:
        """step() without sending its own events (they go before the next plan call, or when idle).

        A step's rows are one per decoding request (plus its drafts while it runs alone) and, beside them,
        the next chunk of the waiting prompts: while anyone decodes, what keeps the step within STALL_STEPS
        all-slots steps (or `prefill_chunk` rows), so no stream stalls for a whole prompt; a whole
        PREFILL_CHUNK when nobody does. Runners that cannot mix
        rows (`any_rows` False) run each new prompt whole, in its own call, before the decode rows."""
        self._step_started = time.perf_counter()
        try:
            return self._step_timed()
        finally:
            self._step_started = None

    def _step_timed(self) -> int:
        clock = PhaseClock(self.profile)
        batch = self._schedule()
        clock.lap("schedule")
        if self.prefiller is not None:
            self._install_prefilled(self.prefiller, clock)
        if not self.plan.runner.any_rows:
            for r in batch.admitted:
                self._prefill_whole(r, clock)
        decoding = [r for r in batch.running if r.finish_reason is None and r.prefilled == len(r.prompt_ids)]
        chunks = self._prompt_chunks(batch.running, decoding)
        drafting_from = time.perf_counter()
        drafts = self._drafts(decoding) if not chunks else [[] for _ in decoding]
        drafting_s = time.perf_counter() - drafting_from  # a draft model's own steps: no price counts them
        clock.lap("draft")
        self._send_events()  # the last step's events: the loop that takes them runs beside this plan call
        clock.lap("emit")
        rows = self._rows(decoding, drafts, chunks)
        if not rows.slots:
            self.steps += 1
            return 0
        # a request's drafts are more rows of its slot after its decode row, priced as a prompt's rows beside
        # the decode rows (on the Xeon, SmolLM2's steps of 1-4 drafts took 0.79-0.85 of that price, against
        # 0.80 for a step without; docs/performance.md, "The pace of a speculating user")
        drafted = [(r.position + 1, len(d)) for r, d in zip(decoding, drafts) if d]
        prompts = [(lo, hi - lo) for _r, lo, hi in chunks]
        prefilled = {r.slot: hi for r, _lo, hi in chunks}
        price = self.plan.report.step_ms_with(len(decoding), prompts + drafted, _mean_position(decoding))
        flight = _InFlight(time.perf_counter(), price, prefilled)
        self._in_flight = flight
        try:
            self._run(rows, decoding, drafts, chunks, clock)
        finally:
            self._in_flight = None  # every prompt's `prefilled` now says where the step left it
        if self._priced():
            # every priced step sets the pace, drafting or not: while one user speculates, many of its steps
            # carry drafts, and a pace of the others alone went stale (with another process taking a core
            # as such a user ran, a request that arrived waited 1.6-2.1x the TTFT it was promised)
            measured_ms = 1000 * (time.perf_counter() - self._step_started - drafting_s)
            self.pace.record(flight.price_ms, measured_ms)
            if not chunks:
                self.decode_pace.record(len(decoding), flight.price_ms, measured_ms)
        return len(rows.slots)

    def _priced(self) -> bool:
        """Whether the plan's price is the whole of this step, but for a draft model's time: all of its
        work was this plan's calls (a disaggregated engine's steps also install the worker's KV, which the
        price leaves out). Only such steps set the pace."""
        return self.prefiller is None and self.plan.runner.any_rows

    def _run(
        self,
        rows: StepRows,
        decoding: list[Request],
        drafts: list[list[int]],
        chunks: list[tuple[Request, int, int]],
        clock: PhaseClock,
    ) -> None:
        """The step's plan call, then its sampling and events: run plan -> sample -> emit."""
        logits = self.plan.decode(rows.slots, rows.tokens, rows.positions, rows.logit_rows)
        clock.lap("plan")
        self.profile.decode_rows += len(rows.slots) - rows.prompt_rows
        self.profile.prompt_rows += rows.prompt_rows
        picks = self._picks(logits, rows.firsts, decoding, drafts, chunks)
        for r, d, first in zip(decoding, drafts, rows.firsts):
            self._verify(r, d, logits[first : first + 1 + len(d)], picks, first, clock)
        for (r, lo, hi), first in zip(chunks, rows.firsts[len(decoding) :]):
            r.prefilled = hi
            if r.params.prompt_logprobs:  # every row had logits: row p scores prompt token p + 1
                self._score_prompt(r, logits[first : first + hi - lo], lo)
            last = _sampling_row(r, lo, hi, first)
            if last is not None:  # the prompt is in the cache: its last row gives the first token
                self._verify(r, [], logits[last : last + 1], picks, last, clock)
        if self.prefix_cache is not None:
            self._pool_filled_pages(decoding, chunks, self.prefix_cache)
        self.profile.steps += 1
        self.steps += 1

    def _score_prompt(self, r: Request, logits: torch.Tensor, lo: int) -> None:
        """Prompt logprobs: rows for prompt positions lo.. score the tokens after them (the last prompt
        row's logits sample the first output token instead)."""
        tokens = r.prompt_ids[lo + 1 : lo + 1 + len(logits)]
        if tokens:
            rows = logits[: len(tokens), : self.plan.cfg.vocab_size]
            r.prompt_choices += scored(rows, tokens, r.params.top_logprobs)

    def _schedule(self) -> Batch[Request]:
        """Who runs this step: cancelled requests leave, waiting ones take free slots (scheduler.py)."""
        with self._lock:
            batch = self.scheduler.schedule()
        # each cancelled request ends here (its slot is already free, so a failure of the step would not end
        # it): one whose pages fail to reach the prefix cache must not leave the others without their end
        failed: BaseException | None = None
        for r in batch.cancelled:
            try:
                self._finish(r, "cancelled")
            except Exception as exc:  # raised below, once every cancelled request has ended
                failed = failed or exc
        if failed is not None:
            raise failed
        for r in batch.admitted:
            admitted = time.perf_counter()
            r.draft_k = self.config.spec_tokens
            if self.drafter is not None:
                self.drafter.reset(r.slot)
            if self.prefix_cache is not None and not r.params.prompt_logprobs:  # prefill starts after the copy
                r.prefilled = r.cached_tokens = self.prefix_cache.load(r.prompt_ids, r.slot)
            # stamped once its cached beginning is in: a prediction reads a stamped prompt's `prefilled` as
            # where it starts, and an unstamped one's `expected_cached` (_predict_ttft_ms)
            r.timings.admitted = admitted
            if self.prefiller is not None:
                self._route_prompt(r, self.prefiller)
        return batch

    def _route_prompt(self, r: Request, prefiller: PrefillWorker) -> None:
        """Disaggregated layout: an admitted prompt goes to the worker whole, or, past what the prefix cache
        copied into its slot, with that beginning's KV (copied: the slot is the engine's to change while
        the job waits), so the worker runs only the rest. Even a short rest goes there: decode steps then
        never carry prompt rows, which is what the layout is for (running a 32-token rest here was ~30 ms
        sooner to its first token, and doubled the streams' p99 gap on a bursty load: docs/parallel.md)."""
        r.remote_prefill = True
        k = v = None
        if r.prefilled:  # every rank's heads under tensor parallel
            k, v = self.plan.runner.read_kv(r.slot, r.prefilled)
        price = self._worker_price_ms(prefiller, r.prefilled, len(r.prompt_ids) - r.prefilled)
        prefiller.submit(PrefillJob(r, r.prompt_ids, r.prefilled, k, v, price))

    def _prefill_whole(self, r: Request, clock: PhaseClock) -> None:
        """A new request's whole prompt in one call (runners that cannot mix rows), and its first token."""
        self._send_events()
        if r.params.prompt_logprobs:
            logits = self._prefill_scored(r)
        else:
            logits = self.plan.prefill(r.prompt_ids, r.slot)
        clock.lap("plan")
        self.profile.prompt_rows += len(r.prompt_ids)
        r.prefilled = len(r.prompt_ids)
        self._verify(r, [], logits[None], None, 0, clock)

    def _prefill_scored(self, r: Request) -> torch.Tensor:
        """The whole prompt with its tokens scored: the last layer's rows, then the head over SCORE_ROWS of
        them at a time (every row's logits at once would be prompt x vocabulary floats); the last row's
        logits, the first token's, as a plain prefill gives them."""
        hidden = self.plan.prefill_hidden(r.prompt_ids, r.slot)
        for lo in range(0, len(r.prompt_ids) - 1, SCORE_ROWS):
            self._score_prompt(r, self.plan.head(hidden[lo : min(lo + SCORE_ROWS, len(r.prompt_ids) - 1)]), lo)
        return self.plan.head(hidden[-1:])[0]

    def _install_prefilled(self, prefiller: PrefillWorker, clock: PhaseClock) -> None:
        """Prompts the prefill worker finished: their KV into their slots, their first token sampled from
        the worker's logits. A request cancelled meanwhile lost its slot (maybe to another): skip it."""
        for result in prefiller.take():
            r: Request = result.key
            owner = self.scheduler.by_slot.get(r.slot) if r.slot is not None else None
            if r.finish_reason is not None or owner is not r:
                continue
            r.remote_prefill = False
            if result.error is not None:
                self._finish(r, "error", error=result.error)
                continue
            self.plan.runner.install_kv(r.slot, result.k, result.v, result.start)  # tp > 1: every rank's heads
            r.prefilled = len(r.prompt_ids)
            self.profile.prompt_rows += len(r.prompt_ids) - result.start
            clock.lap("plan")
            self._verify(r, [], result.logits[None], None, 0, clock)
            if self.prefix_cache is not None and r.finish_reason is None:  # as a prompt that ran here
                self.prefix_cache.store(r.prompt_ids, r.slot, len(r.prompt_ids), r.stored)

    def _prompt_chunks(self, running: list[Request], decoding: list[Request]) -> list[tuple[Request, int, int]]:
        """The prompt rows of this step, oldest request first: (request, first, end) token ranges. Beside
        decode rows, the budget is a time: what the plan leaves within STALL_STEPS all-slots steps, or
        `prefill_chunk` rows' worth at a prompt's start where one is set; either way priced by position
        (PlanReport.take_step_prompts), so a long prompt's late rows come in smaller chunks and the decoders'
        gap stays put. With nobody decoding, whole PREFILL_CHUNK-row chunks."""
        waiting = sorted(
            (
                r
                for r in running
                if r.finish_reason is None and r.prefilled < len(r.prompt_ids) and not r.remote_prefill
            ),
            key=lambda r: r.timings.admitted or 0.0,
        )
        queue = [(r.prefilled, len(r.prompt_ids) - r.prefilled) for r in waiting]
        now, pace = time.perf_counter(), self.pace.factor
        taken = self.plan.report.take_step_prompts(
            queue,
            len(decoding),
            self.config.prefill_chunk,
            PREFILL_CHUNK,
            _mean_position(decoding),
            [_slack_ms(r, now, pace) for r in waiting],
        )
        return [(r, r.prefilled, r.prefilled + n) for r, n in zip(waiting, taken) if n]

    def _rows(
        self, decoding: list[Request], drafts: list[list[int]], chunks: list[tuple[Request, int, int]]
    ) -> StepRows:
        """The plan's rows for this step: each decoding request's last token (and drafts), then prompt chunks.
        Logits are wanted for every decode row and for the last row of each prompt that ends this step."""
        rows = StepRows()
        for r, d in zip(decoding, drafts):
            rows.begin()
            for j, token in enumerate([r.output_ids[-1], *d]):
                rows.add(r.slot, token, r.position + j, logits=True)
        for r, lo, hi in chunks:
            rows.begin()
            for p in range(lo, hi):
                rows.add(r.slot, r.prompt_ids[p], p, logits=r.params.prompt_logprobs or p == len(r.prompt_ids) - 1)
            rows.prompt_rows += hi - lo
        return rows

    def _drafts(self, live: list[Request]) -> list[list[int]]:
        """Draft tokens for each live request: only while one request runs (a lone user's step is memory-
        bound, so extra rows are nearly free; a full batch is not), within max_tokens and the context."""
        if self.drafter is None or len(live) != 1:
            return [[] for _ in live]
        r = live[0]
        room = min(r.draft_k, r.params.max_tokens - len(r.output_ids) - 1, self.config.ctx - 1 - r.position)
        return [self.drafter.propose(r.slot, r.prompt_ids + r.output_ids, room) if room > 0 else []]

    def _picks(
        self,
        logits: torch.Tensor,
        firsts: list[int],
        decoding: list[Request],
        drafts: list[list[int]],
        chunks: list[tuple[Request, int, int]],
    ) -> list[int | None]:
        """The tokens of the step's rows that can be chosen for all rows at once, by logits row (None: the
        row's request samples it itself): every row of a plainly greedy request (one argmax over all rows),
        and the one row of a plainly sampled request without drafts (one DrawRows call for all of them). Each
        is the token the request's own sampler would choose, without a per-row Python call; a sampled row
        takes its request's next uniform number here, as the sampler would have. `firsts`: StepRows.firsts."""
        picks: list[int | None] = [None] * len(logits)
        greedy: list[tuple[int, int]] = []  # (first row, rows) of each plainly greedy request
        sampled: list[tuple[int, Request]] = []
        for r, d, first in zip(decoding, drafts, firsts):
            self._pick_row(r, first, 1 + len(d), greedy, sampled)
        for (r, lo, hi), first in zip(chunks, firsts[len(decoding) :]):
            last = _sampling_row(r, lo, hi, first)
            if last is not None:
                self._pick_row(r, last, 1, greedy, sampled)
        if greedy:
            tokens = argmax_rows(logits[:, : self.plan.cfg.vocab_size])
            for row, n in greedy:
                picks[row : row + n] = tokens[row : row + n]
        if sampled and self.plan.draw_rows is not None:
            rows = torch.tensor([row for row, _ in sampled], dtype=torch.long)
            samplers = [r.sampler for _, r in sampled]
            settings = draw_settings(samplers)
            drawn = self.plan.draw_rows(logits, rows, self.plan.cfg.vocab_size, *settings, uniforms(samplers))
            for (row, _), token in zip(sampled, drawn):
                picks[row] = token if token >= 0 else None  # nothing to draw: the sampler's own call says why
        return picks

    @staticmethod
    def _pick_row(
        r: Request, first: int, n: int, greedy: list[tuple[int, int]], sampled: list[tuple[int, Request]]
    ) -> None:
        """Where _picks chooses request r's rows [first, first + n): all of them by argmax when it is plainly
        greedy; its one row by the batched draw when it samples plainly, unconstrained and without drafts."""
        if r.argmax_only:
            greedy.append((first, n))
        elif n == 1 and r.constraint is None and r.sampler.plain_sampled and r.params.max_tokens > 0:
            sampled.append((first, r))

    def _verify(
        self,
        r: Request,
        drafts: list[int],
        logits: torch.Tensor,
        picks: list[int | None] | None,
        first: int,
        clock: PhaseClock,
    ) -> None:
        """Sample from row 0, then from row j+1 while the token sampled from row j equals draft j; the
        request's tokens of this step reach its callback as one event."""
        if r.params.max_tokens == 0:  # the prompt only (scored, with prompt_logprobs): nothing to sample
            self._finish(r, "length")
            return
        accepted = 0
        out = _StepOutput()
        try:
            for j, row in enumerate(logits):
                known = picks[first + j] if picks is not None else None  # None: nothing picked for the step
                choice = self._sample(r, row, known)
                clock.lap("sample")
                token = self._take(r, choice, out)
                clock.lap("emit")
                right = j < len(drafts) and token == drafts[j]  # the draft's guess for this row was right
                accepted += right  # a right draft that ends the request (EOS, a stop) counts too
                if not right or r.finish_reason is not None or out.finish is not None:
                    break
        except ConstraintError as exc:  # this request's grammar failed: it ends, and the step goes on (raised
            # further, the step failed every request in it: one client's schema ended everyone's answers)
            self._finish(r, "error", "".join(out.text), tuple(out.choices), error=str(exc), request_fault=True)
            return
        self._deliver(r, out)
        clock.lap("emit")
        if drafts:
            self.spec.steps += 1
            self.spec.drafted += len(drafts)
            self.spec.accepted += accepted
            # all right: draft one more next time; none right: halve (a wrong guess costs extra rows)
            if accepted == len(drafts):
                r.draft_k = min(self.config.spec_tokens, r.draft_k + 1)
            elif accepted == 0:
                r.draft_k = max(1, r.draft_k // 2)

    def _sample(self, r: Request, logits: torch.Tensor, known: int | None = None) -> Choice:
        """The request's next token: its constraint's mask, its own seeded sampler, its penalty counts.
        `known`: the token already picked for this row by the step (`_picks`: a batched argmax or draw)."""
        if known is not None:
            choice = Choice(known, None, ())
        else:
            allowed = r.constraint.allowed(logits) if r.constraint is not None else None
            choice = r.sampler.choose(logits, allowed)
        r.sampler.observe(choice.token)
        if r.constraint is not None:
            r.constraint.accept(choice.token)
        r.output_ids.append(choice.token)
        r.choices.append(choice)
        self.profile.tokens += 1
        return choice

    def _take(self, r: Request, choice: Choice, out: "_StepOutput") -> int:
        """Turn the sampled token into text: the first-token stamp, the end of the request (stop token,
        constraint complete, max_tokens, stop string), and the text it made final, added to `out`."""
        now = time.perf_counter()
        if r.timings.first_token is None:
            r.timings.first_token = now
            self._learn_resume(r, now)
            r.promised_tps = self._promise_tps(r)
        stop_token = r.text.is_stop_token(choice.token)
        finish = "stop" if stop_token or (r.constraint is not None and r.constraint.finished()) else None
        if finish is None and len(r.output_ids) >= r.params.max_tokens:
            finish = "length"
        stops = r.constraint is None or r.constraint.stops_apply()  # never inside a grammar's JSON or call
        piece = r.text.push(choice.token, now, final=finish is not None, stops=stops)
        if piece.stopped:
            finish = "stop"
        if r.timings.first_sentence is None and r.text.first_sentence_at is not None:
            r.timings.first_sentence = r.text.first_sentence_at
        out.text.append(piece.text)
        out.choices.append(choice)
        out.finish = finish
        return choice.token

    def _deliver(self, r: Request, out: "_StepOutput") -> None:
        """One event per request per step: its tokens and text, and the end if it came."""
        if out.finish is not None:
            self._finish(r, out.finish, "".join(out.text), tuple(out.choices))
        elif out.choices:
            delta = Delta(r.id, "".join(out.text), tuple(out.choices), prompt_choices=self._prompt_choices(r))
            self._outgoing.append((r, delta))

    def _finish(
        self,
        r: Request,
        reason: str,
        text: str = "",
        choices: tuple[Choice, ...] = (),
        error: str | None = None,
        request_fault: bool = False,
    ) -> None:
        r.finish_reason = reason
        r.error = error or r.error
        r.timings.finished = time.perf_counter()
        with self._lock:
            self.scheduler.release(r)
        delta = Delta(
            r.id, text, choices, reason, error, r.timings, len(r.output_ids), self._prompt_choices(r), request_fault
        )
        self._outgoing.append((r, delta))
        if self.prefix_cache is not None and r.slot is not None and reason != "error" and not self._closed:
            self._keep_prefix(r, self.prefix_cache)  # the slot is reused only by the next step's admissions

    @staticmethod
    def _prompt_choices(r: Request) -> tuple[Choice, ...]:
        """A request's scored prompt tokens, on its first event only (with prompt_logprobs)."""
        if r.prompt_choices_sent or not r.params.prompt_logprobs:
            return ()
        r.prompt_choices_sent = True
        return tuple(r.prompt_choices)

    @staticmethod
    def _pool_filled_pages(decoding: list[Request], chunks: list[tuple[Request, int, int]], cache: PrefixCache) -> None:
        """Pool the pages this step filled, for requests sharing their beginnings: a prompt's as its chunks
        run (whatever else the request does next), a decoding request's as its tokens run. A page or two a
        step, where storing a long prompt's pages once it was in stalled every stream for a copy of all of
        them (6 ms for 1,300 tokens of SmolLM2). A request that ended this step stores in _finish instead, as
        does one whose pages found the pool full (each step would search it again for a page to free)."""
        for r, _lo, hi in chunks:
            if r.finish_reason is None and not r.stored.full and hi // cache.page > r.stored.pages:
                cache.store(r.prompt_ids, r.slot, hi, r.stored)
        for r in decoding:  # KV up to its last sampled token's position (drafts past it may have been refused)
            if r.finish_reason is None and not r.stored.full and r.position // cache.page > r.stored.pages:
                cache.store(r.prompt_ids + r.output_ids, r.slot, r.position, r.stored)

    def _keep_prefix(self, r: Request, cache: PrefixCache) -> None:
        """Pool the full pages of what `r`'s slot holds (before another request runs in it): its
        prompt as far as it ran, and once past the prompt, prompt + output up to the last token sampled
        (never run, so not in the cache). Positions past that may hold drafts that were not accepted.
        A cancelled request's slot may already be promised to a newcomer, but nothing runs in it before this."""
        if r.prefilled < len(r.prompt_ids):
            cache.store(r.prompt_ids, r.slot, r.prefilled)
        else:
            cache.store(r.prompt_ids + r.output_ids, r.slot, r.position)

    # -- running -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Step on a background thread whenever there is work (again after stop(), or after the thread
        died)."""
        if self._thread is not None and self._thread.is_alive():
            if not self._stop:
                return
            raise RuntimeError(
                "the engine thread is still finishing its step after a stop() that timed out; call stop() again "
                "(it waits for that step), then start()"
            )
        self._refuse_closed()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="metronome-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop stepping after the current step (waits up to `timeout` seconds for it; from a callback on
        the engine's own thread, which cannot wait for itself, the thread ends when its step does)."""
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is threading.current_thread():
            return
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the engine thread did not stop within {timeout} s (a step is still running)")
            self._thread = None

    def _loop(self) -> None:
        self.thread_id = threading.get_native_id()  # the OS thread, for per-thread CPU accounts (profile.py)
        if self.plan.report.cpus:  # this thread runs a share of every plan call: on its own core (PlanReport.cpus)
            try:
                os.sched_setaffinity(0, {self.plan.report.cpus[0]})
            except OSError as exc:  # the process's CPUs changed since the compile (a cgroup's): the OS places it
                _LOG.warning("the engine thread stays unpinned: CPU %d refused (%s)", self.plan.report.cpus[0], exc)
        try:
            while True:
                with self._lock:
                    while self.scheduler.idle and not self._outgoing and not self._stop:
                        self._lock.wait(timeout=IDLE_WAKEUP_S)  # notified on submit/cancel/stop; timeout bounds it
                    if self._stop:
                        return
                    idle = self.scheduler.idle
                try:
                    if idle:  # no plan call coming to send them before: the last step's events go now
                        with self._step_lock:
                            self._send_events()
                        continue
                    with self._step_lock:
                        ran = self._step()
                    if not ran and self.prefiller is not None:
                        with self._step_lock:
                            self._send_events()
                        with self._lock:  # every live prompt is on the prefill worker: sleep until one comes back
                            if not self.prefiller.has_results and not self._stop:
                                self._lock.wait(timeout=IDLE_WAKEUP_S)
                except BaseException as exc:  # a failed step fails its requests; the engine goes on
                    self._fail_running(exc)
                    if not isinstance(exc, Exception):  # SystemExit and the like end the thread (waiters are told)
                        raise
        finally:
            self._send_events()
            if self._closed:  # a close() that timed out waiting for this thread's last step left them in
                self._end_all("the engine was closed")

    def close(self, timeout: float = 60.0) -> None:
        """Stop stepping and release what the engine started beside it: a disaggregated layout's prefill
        worker process, a tensor-parallel plan's other ranks. The engine runs no more after this (a `with`
        block calls it at its end). Every request still in ends with "cancelled": at once, or where the step
        running outlasts `timeout`, when that step ends (the engine thread, or the caller's step() running it,
        ends them on its way out). The worker and ranks are released even then (the TimeoutError is raised
        after)."""
        self._refuse_reentry("close")
        with self._lock:  # (submit checks it under the same lock before it queues)
            self._closed = True
        try:
            self.stop(timeout)
            self._end_all("the engine was closed", timeout)
        finally:
            if self.prefiller is not None:
                self.prefiller.close()
            self.plan.runner.close()

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _end_all(self, why: str, timeout: float = 60.0) -> None:
        """Cancel every request still in (running or queued), each with its final event: closed with some in,
        their callbacks never heard an end (finish_reason None). Waits up to `timeout` seconds for a step
        that a caller's thread is running (the requests it holds then end when it does: step() ends them)."""
        if not self._step_lock.acquire(timeout=timeout):
            raise TimeoutError(
                f"a step running on another thread did not end within {timeout} s; the requests still in end "
                "when it does"
            )
        try:
            with self._lock:
                live = [*self.scheduler.by_slot.values(), *self.scheduler.waiting]
                self.scheduler.waiting.clear()
            for r in live:
                if r.finish_reason is None:
                    r.cancelled = True
                    self._finish(r, "cancelled", error=why)
            self._send_events()
        finally:
            self._step_lock.release()

    def _fail_running(self, exc: BaseException) -> None:
        with self._lock:
            running = list(self.scheduler.by_slot.values())
        for r in running:
            if r.finish_reason is None:
                self._finish(r, "error", error=f"{type(exc).__name__}: {exc}")

    @property
    def capacity(self) -> int | None:
        """The most requests in at once, running or queued (slots + max_queue); None: no limit."""
        return self.scheduler.capacity

    @property
    def running(self) -> bool:
        """Whether the engine's thread steps (callers wait) or not (callers step): once stopped, or asked to
        stop, and ended, callers step, even before stop() has returned."""
        thread = self._thread
        return thread is not None and (thread.is_alive() or not self._stop)

    def check_alive(self) -> None:
        """Raise if `start()` was called but the stepping thread died (waiters would wait forever)."""
        thread = self._thread
        if thread is not None and not thread.is_alive() and not self._stop:
            raise RuntimeError("the engine thread has stopped; no more steps will run (start() starts another)")
