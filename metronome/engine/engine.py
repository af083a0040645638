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
from typing import Callable, Sequence

import torch

from metronome.compile import Plan, compile_plan
from metronome.config import EngineConfig, SamplingParams
from metronome.engine.api import PythonAPI
from metronome.engine.request import Constraint, Delta, QueueFullError, Request, RequestError, SpecStats, Timings
from metronome.engine.sampler import Choice, RequestSampler
from metronome.engine.scheduler import Batch, Scheduler
from metronome.engine.speculate import Drafter, ModelDrafter, NgramDrafter
from metronome.engine.text import TextStream
from metronome.model.loader import LoadedModel, load
from metronome.model.tokenizer import Tokenizer

IDLE_WAKEUP_S = 1.0  # the stepping thread's longest sleep without work (bounds every wait)


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
            draft_config = dataclasses.replace(config, spec_tokens=0, draft=None)
            draft_plan = compile_plan(load(config.draft), draft_config, calibrate=False, progress=progress)
            try:
                drafter = ModelDrafter(draft_plan, plan.cfg.vocab_size)
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
            self.scheduler.add(req)
            self._lock.notify()
        return req

    def cancel(self, request: Request) -> None:
        """Stop a request; its slot is free after the next step."""
        with self._lock:
            request.cancelled = True
            self._lock.notify()

    # -- the step --------------------------------------------------------------------------------

    def step(self) -> int:
        """One step of the score: schedule -> run plan -> sample -> emit. Returns the live requests decoded."""
        batch = self._schedule()
        for r in batch.admitted:  # a new request's prompt runs now and samples its first token ...
            self._emit(r, self._sample(r, self.plan.prefill(r.prompt_ids, r.slot)))
        live = [r for r in batch.running if r.finish_reason is None]  # ... and joins this step's decode
        if live:
            drafts = self._drafts(live)
            logits = self._run(live, drafts)
            first = 0
            for r, d in zip(live, drafts):
                self._verify(r, d, logits[first : first + 1 + len(d)])
                first += 1 + len(d)
        self.steps += 1
        return len(live)

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

    def _run(self, live: list[Request], drafts: list[list[int]]) -> torch.Tensor:
        """The plan's decode step: one row per live request (its last token), plus a row per draft."""
        rows = [
            (r.slot, token, r.position + j)
            for r, d in zip(live, drafts)
            for j, token in enumerate([r.output_ids[-1], *d])
        ]
        slots, tokens, positions = (list(x) for x in zip(*rows))
        return self.plan.decode(slots, tokens, positions)

    def _drafts(self, live: list[Request]) -> list[list[int]]:
        """Draft tokens for each live request: only while one request runs (a lone user's step is memory-
        bound, so extra rows are nearly free; a full batch is not), within max_tokens and the context."""
        if self.drafter is None or len(live) != 1:
            return [[] for _ in live]
        r = live[0]
        room = min(r.draft_k, r.params.max_tokens - len(r.output_ids) - 1, self.config.ctx - 1 - r.position)
        return [self.drafter.propose(r.slot, r.prompt_ids + r.output_ids, room) if room > 0 else []]

    def _verify(self, r: Request, drafts: list[int], logits: torch.Tensor) -> None:
        """Sample from row 0, then from row j+1 while the token sampled from row j equals draft j."""
        accepted = 0
        for j, row in enumerate(logits):
            token = self._advance(r, row)
            if r.finish_reason is not None or j == len(drafts) or token != drafts[j]:
                break
            accepted += 1
        if drafts:
            self.spec.steps += 1
            self.spec.drafted += len(drafts)
            self.spec.accepted += accepted
            # all right: draft one more next time; none right: halve (a wrong guess costs extra rows)
            if accepted == len(drafts):
                r.draft_k = min(self.config.spec_tokens, r.draft_k + 1)
            elif accepted == 0:
                r.draft_k = max(1, r.draft_k // 2)

    def _advance(self, r: Request, logits: torch.Tensor) -> int:
        """Sample one token for `r` from its logits row and emit it; returns the token."""
        return self._emit(r, self._sample(r, logits))

    def _sample(self, r: Request, logits: torch.Tensor) -> Choice:
        """The request's next token: its constraint's mask, its own seeded sampler, its penalty counts."""
        allowed = r.constraint.allowed(logits) if r.constraint is not None else None
        choice = r.sampler.choose(logits, allowed)
        r.sampler.observe(choice.token)
        if r.constraint is not None:
            r.constraint.accept(choice.token)
        r.output_ids.append(choice.token)
        r.choices.append(choice)
        return choice

    def _emit(self, r: Request, choice: Choice) -> int:
        """Turn the sampled token into text and events: the first-token stamp, the end of the request
        (stop token, constraint complete, max_tokens, stop string), and the text it made final."""
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
        if finish is not None:
            self._finish(r, finish, piece.text, (choice,))
        else:
            r.on_event(Delta(r.id, piece.text, (choice,)))
        return choice.token

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
