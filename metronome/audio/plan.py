"""The Whisper plan: encoder at one fixed shape, decoder rows in a fixed set of slots whose self- and
cross-attention caches are allocated once, and decode steps that batch the rows of every request.

Determinism: every decode step runs all slots (rows of idle slots go to a scratch slot), so the matmul and
attention shapes never change and a row's arithmetic does not depend on which other requests share the
step. The encoder runs one window at a time ([1, n_mels, 3000]) and a prompt is prefilled alone (its shape
depends only on that request), so a request's logits are bitwise the same alone or beside others.
All model calls hold one compute lock: the machine's cores go to one call at a time.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass

import torch
from torch import Tensor

from metronome.audio.whisper import DecoderCache, Whisper
from metronome.config import check_fields, is_integer

# A step waits at most this long for the rows of every decoding slot, so that concurrent requests share
# steps; a request between two tokens spends well under this in Python.
GATHER_S = 0.005
# Every cross-thread wait is bounded: a decode step of tiny/base takes milliseconds, a stuck one is a bug.
STEP_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class PlanConfig:
    slots: int = 4  # concurrent decoder rows (one per request window being decoded)
    threads: int = 2  # torch intra-op threads: encoder, prefill (and the C++ kernels' pool, set by the caller)
    # torch intra-op threads inside a decode step: its torch ops are tiny (a few rows), and waking a second
    # thread per op costs more than it saves (docs/speech.md); its matmuls run on the C++ pool in q8.
    step_threads: int = 1

    def __post_init__(self) -> None:
        # kinds first: a slots of 2.5 or True failed inside torch when the cache was allocated
        check_fields(self, [(name, is_integer(getattr(self, name)), "must be an integer") for name in _PLAN_INTS])
        check_fields(
            self,
            [
                ("slots", self.slots >= 1, "must be at least 1"),
                ("threads", self.threads >= 1, "must be at least 1"),
                ("step_threads", 1 <= self.step_threads <= self.threads, "must be in [1, threads]"),
            ],
        )


_PLAN_INTS = ("slots", "threads", "step_threads")


@dataclass
class _Row:
    slot: int
    token: int
    position: int
    future: Future


class WhisperPlan:
    def __init__(self, model: Whisper, config: PlanConfig | None = None):
        self.model = model
        self.config = config or PlanConfig()
        torch.set_num_threads(self.config.threads)
        # One extra slot is scratch: idle rows of a step write and read there.
        self.cache = DecoderCache.allocate(model.cfg, self.config.slots + 1)
        self._scratch = self.config.slots
        self._compute = threading.Lock()
        self._cv = threading.Condition()
        self._free = list(range(self.config.slots))
        self._pending: list[_Row] = []
        self._decoding: set[int] = set()  # slots between their prefill and their window's last token
        self._closed = False
        self._stepping = False  # a caller is running a step (the others wait for its results)
        self.steps = 0  # decode steps run
        self.most_rows = 0  # the most live rows one step carried (> 1: requests shared steps)

    # ---- slots -------------------------------------------------------------------------------------------
    def acquire(self, timeout: float = STEP_TIMEOUT_S) -> int:
        with self._cv:
            if not self._cv.wait_for(lambda: self._free or self._closed, timeout=timeout):
                raise TimeoutError(f"no decoder slot freed within {timeout:.0f} s (slots={self.config.slots})")
            if self._closed:
                raise RuntimeError("the Whisper plan is closed")
            return self._free.pop(0)

    def release(self, slot: int) -> None:
        with self._cv:
            self._free.append(slot)
            self._free.sort()
            self._cv.notify_all()

    def begin_decoding(self, slot: int) -> None:
        with self._cv:
            self._decoding.add(slot)

    def end_decoding(self, slot: int) -> None:
        with self._cv:
            self._decoding.discard(slot)
            self._cv.notify_all()

    # ---- compute -----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode(self, mel: Tensor) -> Tensor:
        """One window [n_mels, 3000] -> audio states [1500, d]."""
        with self._compute:
            return self.model.encoder(mel[None])[0]

    @torch.inference_mode()
    def prefill(self, slot: int, audio: Tensor | None, tokens: list[int], rows: list[int]) -> Tensor:
        """Set `slot`'s audio (None: keep it, e.g. a fallback on the same window), run the prompt `tokens` from
        position 0, return the logits of prompt positions `rows` [len(rows), V]."""
        n = len(tokens)
        with self._compute:
            if audio is not None:
                self.model.decoder.set_audio(self.cache, slot, audio)
            states = self.model.decoder.hidden(
                self.cache, torch.full((n,), slot), torch.tensor(tokens), torch.arange(n)
            )
            return self.model.decoder.logits(states[rows])

    def step(self, slot: int, token: int, position: int) -> Tensor:
        """Decode one token of `slot` at `position`, batched with the other requests' rows; logits [V].

        No stepping thread: the first caller to find no step running leads the next one (it gathers the
        pending rows, runs them, hands out the results), so a lone request never waits on a thread switch."""
        row = _Row(slot, token, position, Future())
        with self._cv:
            if self._closed:
                raise RuntimeError("the Whisper plan is closed")
            self._pending.append(row)
            self._cv.notify_all()
            while not row.future.done() and self._stepping:
                if not self._cv.wait(timeout=STEP_TIMEOUT_S):
                    raise TimeoutError(f"a Whisper decode step took over {STEP_TIMEOUT_S:.0f} s")
            leader = not row.future.done()
            if leader:
                # Lead: claim the step, then wait (briefly) for every decoding slot's row so that requests
                # share it; this row is still pending, so the step is never empty.
                self._stepping = True
                self._cv.wait_for(lambda: self._decoding <= {r.slot for r in self._pending}, timeout=GATHER_S)
                rows, self._pending = self._pending, []
        if leader:
            self._lead(rows)
        return row.future.result(timeout=STEP_TIMEOUT_S)

    def close(self) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()

    def _lead(self, rows: list[_Row]) -> None:
        try:
            logits = self._run(rows, self.config.slots)
        except BaseException as exc:  # every request in the step gets the failure
            for r in rows:
                r.future.set_exception(exc)
        else:
            self.steps += 1
            self.most_rows = max(self.most_rows, len(rows))
            for i, r in enumerate(rows):
                r.future.set_result(logits[i])
        finally:
            with self._cv:
                self._stepping = False
                self._cv.notify_all()

    @torch.inference_mode()
    def _run(self, rows: list[_Row], n: int) -> Tensor:
        # Rows in arrival order, padded with scratch rows to exactly `n`: the step's shape never changes.
        slots = torch.full((n,), self._scratch)
        tokens = torch.zeros(n, dtype=torch.long)
        positions = torch.zeros(n, dtype=torch.long)
        for i, row in enumerate(rows):
            slots[i], tokens[i], positions[i] = row.slot, row.token, row.position
        with self._compute:
            torch.set_num_threads(self.config.step_threads)
            try:
                states = self.model.decoder.hidden(self.cache, slots, tokens, positions, live=len(rows))
                return self.model.decoder.logits(states)[: len(rows)].clone()
            finally:
                torch.set_num_threads(self.config.threads)
