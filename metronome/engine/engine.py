"""The engine plays the plan: requests take fixed slots, every step is schedule -> run plan -> sample -> emit.

Thread model: `submit`/`cancel` may be called from any thread; `step` runs on one thread (the caller's,
or the engine's own after `start()`). Each request's events go to its `on_event` callback, called on
the stepping thread.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from metronome.compile import Plan, compile_plan
from metronome.compile.fused import PREFILL_CHUNK
from metronome.config import EngineConfig, SamplingParams
from metronome.engine.api import PythonAPI
from metronome.engine.profile import PhaseClock, StepProfile
from metronome.engine.request import Constraint, Delta, QueueFullError, Request, RequestError, SpecStats, Timings
from metronome.engine.sampler import Choice, RequestSampler
from metronome.engine.scheduler import Batch, Scheduler
from metronome.engine.speculate import Drafter, ModelDrafter, NgramDrafter, PayingDrafter
from metronome.engine.text import TextStream
from metronome.model.loader import LoadedModel, load
from metronome.model.tokenizer import Tokenizer

IDLE_WAKEUP_S = 1.0  # the stepping thread's longest sleep without work (bounds every wait)


@dataclass
class StepRows:
    """The rows of one plan call: (slot, token, position) each, and which rows' logits the step needs."""

    slots: list[int]
    tokens: list[int]
    positions: list[int]
    logit_rows: list[int]
    prompt_rows: int

    def add(self, slot: int, token: int, position: int, logits: bool) -> None:
        if logits:
            self.logit_rows.append(len(self.slots))
        self.slots.append(slot)
        self.tokens.append(token)
        self.positions.append(position)


@dataclass
class _StepOutput:
    """What one request produced in this step, delivered as one event at its end."""

    text: list[str] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)
    finish: str | None = None


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
        # Speculation needs rows of one slot in a step: the fused plan's row-independent decoder.
        self.drafter = (drafter or NgramDrafter()) if plan.runner.any_rows and plan.config.spec_tokens > 0 else None
        self.spec = SpecStats()
        self.tokenizer = tokenizer
        self.config: EngineConfig = plan.config
        self.model_name = model_name
        self.scheduler: Scheduler[Request] = Scheduler(self.config.slots, max_queue)
        self._lock = threading.Condition()
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.steps = 0
        self.profile = StepProfile()  # where the steps' time goes (profile.py)

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
        config = config or EngineConfig()
        loaded = loaded or load(path)
        plan = compile_plan(loaded, config, calibrate=calibrate, progress=progress)
        drafter = None
        if config.draft is not None and config.spec_tokens > 0:
            draft_config = dataclasses.replace(plan.config, spec_tokens=0, draft=None)  # the main plan's ctx
            draft_plan = compile_plan(
                load(config.draft, param="draft"), draft_config, calibrate=False, progress=progress
            )
            try:
                # prompt lookup's guesses checked in one draft-model call; drafting paused where it does not pay
                drafter = PayingDrafter(ModelDrafter(draft_plan, plan.cfg.vocab_size, lookup=NgramDrafter()))
            except ValueError as exc:
                raise ValueError(f"draft={config.draft!r}: {exc}") from None
        return cls(plan, Tokenizer(loaded.tokenizer), loaded.config.name or loaded.path.stem, max_queue, drafter)

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
        prompt = list(prompt_ids)
        ctx = self.config.ctx
        if not prompt:
            raise RequestError("the prompt is empty: send at least one token of text", param="prompt")
        if len(prompt) + params.max_tokens > ctx:
            raise RequestError(
                f"the prompt ({len(prompt)} tokens) plus max_tokens ({params.max_tokens}) exceeds the context "
                f"of {ctx} tokens; shorten the prompt or lower max_tokens (or serve with a larger --ctx)",
                param="max_tokens" if len(prompt) < ctx else "messages",
            )
        req = Request(
            id=request_id or f"req-{next(self._ids)}",
            prompt_ids=prompt,
            params=params,
            sampler=RequestSampler(params, prompt, self.plan.cfg.vocab_size),
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
            if self.scheduler.queue_full:
                raise QueueFullError(
                    f"all {self.config.slots} slots are busy and {len(self.scheduler.waiting)} requests wait"
                )
            req.predicted_ttft_ms = self._predict_ttft_ms(len(prompt))
            self.scheduler.add(req)
            self._lock.notify()
        return req

    def _predict_ttft_ms(self, prompt_tokens: int) -> float:
        """The plan's TTFT for a prompt submitted now (call under the lock): the prompt rows ahead of it
        (admitted prompts not yet in the cache, then the queue), then its own, at the calibrated step costs.
        NaN when it would wait for a slot to free (that depends on how long others run)."""
        sched = self.scheduler
        if len(sched.by_slot) + len(sched.waiting) >= self.config.slots:
            return float("nan")
        running = sorted(sched.by_slot.values(), key=lambda r: r.timings.admitted or 0.0)
        ahead = [len(r.prompt_ids) - r.prefilled for r in running if r.prefilled < len(r.prompt_ids)]
        ahead += [len(r.prompt_ids) for r in sched.waiting]
        decoding = len(running) - sum(1 for r in running if r.prefilled < len(r.prompt_ids))
        chunk = self.config.prefill_chunk if self.plan.runner.any_rows else PREFILL_CHUNK
        return self.plan.report.ttft_ms([*ahead, prompt_tokens], decoding, chunk, PREFILL_CHUNK)

    def cancel(self, request: Request) -> None:
        """Stop a request; its slot is free after the next step."""
        with self._lock:
            request.cancelled = True
            self._lock.notify()

    # -- the step --------------------------------------------------------------------------------

    def step(self) -> int:
        """One step of the score: schedule -> run plan -> sample -> emit. Returns the rows the plan ran.

        A step's rows are one per decoding request (plus its drafts while it runs alone) and, beside them,
        the next chunk of the waiting prompts: at most `prefill_chunk` prompt rows while anyone decodes, so
        no stream stalls for a whole prompt; a whole PREFILL_CHUNK when nobody does. Runners that cannot mix
        rows (`any_rows` False) run each new prompt whole, in its own call, before the decode rows."""
        clock = PhaseClock(self.profile)
        batch = self._schedule()
        clock.lap("schedule")
        if not self.plan.runner.any_rows:
            for r in batch.admitted:
                self._prefill_whole(r, clock)
        decoding = [r for r in batch.running if r.finish_reason is None and r.prefilled == len(r.prompt_ids)]
        chunks = self._prompt_chunks(batch.running, bool(decoding))
        drafts = self._drafts(decoding) if not chunks else [[] for _ in decoding]
        clock.lap("draft")
        rows = self._rows(decoding, drafts, chunks)
        if not rows.slots:
            self.steps += 1
            return 0
        logits = self.plan.decode(rows.slots, rows.tokens, rows.positions, rows.logit_rows)
        clock.lap("plan")
        self.profile.decode_rows += len(rows.slots) - rows.prompt_rows
        self.profile.prompt_rows += rows.prompt_rows
        greedy = self._greedy_tokens(logits, decoding, chunks)
        first = 0
        for r, d in zip(decoding, drafts):
            self._verify(r, d, logits[first : first + 1 + len(d)], greedy, first, clock)
            first += 1 + len(d)
        for r, _lo, hi in chunks:
            r.prefilled = hi
            if hi == len(r.prompt_ids):  # the prompt is in the cache: its last row gives the first token
                self._verify(r, [], logits[first : first + 1], greedy, first, clock)
                first += 1
        self.profile.steps += 1
        self.steps += 1
        return len(rows.slots)

    def _schedule(self) -> Batch[Request]:
        """Who runs this step: cancelled requests leave, waiting ones take free slots (scheduler.py)."""
        with self._lock:
            batch = self.scheduler.schedule()
        for r in batch.cancelled:
            self._finish(r, "cancelled")
        for r in batch.admitted:
            r.timings.admitted = time.perf_counter()
            r.draft_k = self.config.spec_tokens
            if self.drafter is not None:
                self.drafter.reset(r.slot)
        return batch

    def _prefill_whole(self, r: Request, clock: PhaseClock) -> None:
        """A new request's whole prompt in one call (runners that cannot mix rows), and its first token."""
        logits = self.plan.prefill(r.prompt_ids, r.slot)
        clock.lap("plan")
        self.profile.prompt_rows += len(r.prompt_ids)
        r.prefilled = len(r.prompt_ids)
        self._verify(r, [], logits[None], None, 0, clock)

    def _prompt_chunks(self, running: list[Request], anyone_decoding: bool) -> list[tuple[Request, int, int]]:
        """The prompt rows of this step, oldest request first: (request, first, end) token ranges."""
        budget = self.config.prefill_chunk if anyone_decoding else PREFILL_CHUNK
        waiting = sorted(
            (r for r in running if r.finish_reason is None and r.prefilled < len(r.prompt_ids)),
            key=lambda r: r.timings.admitted or 0.0,
        )
        chunks = []
        for r in waiting:
            if budget <= 0:
                break
            hi = min(len(r.prompt_ids), r.prefilled + budget)
            chunks.append((r, r.prefilled, hi))
            budget -= hi - r.prefilled
        return chunks

    def _rows(
        self, decoding: list[Request], drafts: list[list[int]], chunks: list[tuple[Request, int, int]]
    ) -> StepRows:
        """The plan's rows for this step: each decoding request's last token (and drafts), then prompt chunks.
        Logits are wanted for every decode row and for the last row of each prompt that ends this step."""
        rows = StepRows([], [], [], [], 0)
        for r, d in zip(decoding, drafts):
            for j, token in enumerate([r.output_ids[-1], *d]):
                rows.add(r.slot, token, r.position + j, logits=True)
        for r, lo, hi in chunks:
            for p in range(lo, hi):
                rows.add(r.slot, r.prompt_ids[p], p, logits=p == len(r.prompt_ids) - 1)
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

    def _greedy_tokens(
        self, logits: torch.Tensor, decoding: list[Request], chunks: list[tuple[Request, int, int]]
    ) -> list[int] | None:
        """Every row's argmax in one call when some request samples greedily with nothing else to apply
        (the common case): the same token its own sampler would pick, without a per-row Python call."""
        if not any(r.argmax_only for r in decoding + [c[0] for c in chunks]):
            return None
        return logits[:, : self.plan.cfg.vocab_size].argmax(dim=-1).tolist()

    def _verify(
        self,
        r: Request,
        drafts: list[int],
        logits: torch.Tensor,
        greedy: list[int] | None,
        first: int,
        clock: PhaseClock,
    ) -> None:
        """Sample from row 0, then from row j+1 while the token sampled from row j equals draft j; the
        request's tokens of this step reach its callback as one event."""
        accepted = 0
        out = _StepOutput()
        for j, row in enumerate(logits):
            known = greedy[first + j] if greedy is not None and r.argmax_only else None
            choice = self._sample(r, row, known)
            clock.lap("sample")
            token = self._take(r, choice, out)
            clock.lap("emit")
            if r.finish_reason is not None or out.finish is not None or j == len(drafts) or token != drafts[j]:
                break
            accepted += 1
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
        `known`: the token already picked for this row by the step's batched argmax (plain greedy)."""
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
        stop_token = r.text.is_stop_token(choice.token)
        finish = "stop" if stop_token or (r.constraint is not None and r.constraint.finished()) else None
        if finish is None and len(r.output_ids) >= r.params.max_tokens:
            finish = "length"
        piece = r.text.push(choice.token, now, final=finish is not None)
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
            r.on_event(Delta(r.id, "".join(out.text), tuple(out.choices)))

    def _finish(
        self, r: Request, reason: str, text: str = "", choices: tuple[Choice, ...] = (), error: str | None = None
    ) -> None:
        r.finish_reason = reason
        r.timings.finished = time.perf_counter()
        with self._lock:
            self.scheduler.release(r)
        r.on_event(Delta(r.id, text, choices, reason, error, r.timings, len(r.output_ids)))

    # -- running -----------------------------------------------------------------------------------

    def start(self) -> None:
        """Step on a background thread whenever there is work."""
        if self._thread is not None:
            return
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="metronome-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 60.0) -> None:
        """Stop stepping after the current step (waits up to `timeout` seconds for it)."""
        with self._lock:
            self._stop = True
            self._lock.notify()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"the engine thread did not stop within {timeout} s (a step is still running)")
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._lock:
                while self.scheduler.idle and not self._stop:
                    self._lock.wait(timeout=IDLE_WAKEUP_S)  # notified on submit/cancel/stop; the timeout only bounds it
                if self._stop:
                    return
            try:
                self.step()
            except Exception as exc:  # a failed step fails its requests, reported to each; the engine goes on
                self._fail_running(exc)

    def _fail_running(self, exc: Exception) -> None:
        with self._lock:
            running = list(self.scheduler.by_slot.values())
        for r in running:
            if r.finish_reason is None:
                self._finish(r, "error", error=f"{type(exc).__name__}: {exc}")

    @property
    def running(self) -> bool:
        return self._thread is not None

    def check_alive(self) -> None:
        """Raise if `start()` was called but the stepping thread is gone (waiters would wait forever)."""
        if self._thread is not None and not self._thread.is_alive():
            raise RuntimeError("the engine thread has stopped; no more steps will run")
