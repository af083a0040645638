"""A request as the engine holds it, and what the engine hands back: events (`Delta`), the final
`Completion`, the life stamps (`Timings`), and the two refusals (`RequestError`, `QueueFullError`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch

from metronome.config import SamplingParams
from metronome.engine.prefix_cache import StoreCursor
from metronome.engine.sampler import Choice, RequestSampler
from metronome.engine.text import TextStream


class RequestError(ValueError):
    """A request the engine refuses up front; `param` names the offending parameter."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class QueueFullError(RuntimeError):
    """Every slot is busy and the waiting queue is at its limit: retry later."""


@dataclass
class Timings:
    """perf_counter() stamps of one request's life (None until reached). The serving layer shapes them
    into the API's usage fields (serve/usage.py)."""

    submitted: float
    admitted: float | None = None  # got a slot (queue time ends)
    first_token: float | None = None  # prefill done, first token sampled
    first_sentence: float | None = None
    finished: float | None = None


@dataclass(frozen=True)
class Delta:
    """What one step produced for one request: new text, the tokens behind it, and the end if reached."""

    request_id: str
    text: str
    choices: tuple[Choice, ...]  # sampled tokens with their logprobs (stop/EOS tokens included)
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None
    timings: Timings | None = None  # set on the final delta
    completion_tokens: int = 0  # set on the final delta
    # with prompt_logprobs, on the request's first event: each prompt token after the first, scored
    prompt_choices: tuple[Choice, ...] = ()
    # with "error": the request itself could not go on (its grammar failed: a client's error), not the engine
    request_fault: bool = False


@dataclass(frozen=True)
class Completion:
    request_id: str
    text: str
    token_ids: tuple[int, ...]
    choices: tuple[Choice, ...]
    finish_reason: str
    prompt_tokens: int
    timings: Timings
    seed: int
    cached_tokens: int = 0  # prompt tokens copied from the prefix cache instead of computed
    prompt_choices: tuple[Choice, ...] = ()  # with prompt_logprobs: prompt tokens 1.. scored
    error: str | None = None  # why it ended with "error" (or was cancelled for its callback's failure)


class ConstraintError(RuntimeError):
    """A request's constraint cannot go on (its grammar failed past its start, or refused the token chosen):
    that request ends with "error", and the others in its step go on."""


class Constraint(Protocol):
    """What the engine asks of a decoding constraint (e.g. `grammar.GrammarConstraint`)."""

    def allowed(self, logits: torch.Tensor) -> torch.Tensor | None:
        """A bool mask (V,) of the tokens that may come next, or None for no restriction. It and `accept`
        raise ConstraintError when the constraint cannot go on."""

    def accept(self, token: int) -> None:
        """Advance past the token that was chosen."""

    def finished(self) -> bool:
        """True once the constrained output is complete (the request then stops)."""

    def stops_apply(self) -> bool:
        """Whether the request's stop strings may end the output here (asked after each token is accepted).
        In free text they do; inside what the grammar shapes (a JSON answer, a tool call) they do not: the
        grammar decides where that ends, and a cut would hand the client JSON that does not parse, or drop
        the call it required."""


@dataclass(eq=False)
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    sampler: RequestSampler
    text: TextStream
    on_event: Callable[[Delta], None]
    timings: Timings
    constraint: Constraint | None = None
    slot: int | None = None
    cancelled: bool = False
    error: str | None = None  # why it failed (the engine's error), or why its callback got it cancelled
    callback_failed: bool = False  # its callback raised: it is cancelled, and only its end event is still sent
    output_ids: list[int] = field(default_factory=list)
    choices: list[Choice] = field(default_factory=list)
    prompt_choices: list[Choice] = field(default_factory=list)  # with prompt_logprobs: scored as prefilled
    prompt_choices_sent: bool = False  # they went out on the first event
    finish_reason: str | None = None
    draft_k: int = 0  # tokens to draft next step (adapts to how many were accepted)
    prefilled: int = 0  # prompt tokens already in the KV cache (a prompt runs in chunks, beside decode rows)
    stored: StoreCursor = field(default_factory=StoreCursor)  # its pages in the prefix cache's pool so far
    cached_tokens: int = 0  # prompt tokens copied from the prefix cache at admission instead of computed
    expected_cached: int = 0  # the prefix cache's match at submit: what the TTFT predictions behind it assume
    remote_prefill: bool = False  # its prompt is on the prefill worker (disaggregated layout): no rows here yet
    predicted_ttft_ms: float = float("nan")  # the plan's promise at submit (NaN: uncalibrated, or no free slot)
    resume_ms: float = 0.0  # the part of that promise for an engine that had been idle (Engine._resume_ms)
    found_idle: bool = False  # submitted to an engine idle for RESUME_FULL_S or more: its TTFT teaches resume_ms
    # its decode speed (tokens a second after the first) promised with its first token (Engine._promise_tps):
    # one token a step at the plan's price for the slots held then, times the pace at that load; NaN: uncalibrated
    promised_tps: float = float("nan")

    @property
    def argmax_only(self) -> bool:
        """Its next token is its row's argmax: plain greedy and unconstrained (the step's batched argmax)."""
        return self.constraint is None and self.sampler.plain_greedy

    @property
    def position(self) -> int:
        """Position of the last sampled token, the one the next decode step feeds."""
        return len(self.prompt_ids) + len(self.output_ids) - 1


@dataclass
class SpecStats:
    """Speculative decoding so far: verification steps, tokens drafted, drafts accepted."""

    steps: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0
