"""Reflection rounds: an answer, then N rounds of critique ("what N things would make it better?") and
revision ("apply them"), each turn one engine request, streamed as events, with each turn's timings.

Each turn's prompt is the previous turn's prompt ids + the reply's ids as generated (its end token
included) + the next instruction's ids, so it extends the last transcript token for token and the prefix
cache (engine/prefix_cache.py) serves all of it but the new instruction. Re-encoding the conversation as
text would not do: a reply re-tokenized may split differently from how it was sampled, and the cache then
misses from the first such token on. Where a chat template does not render the reply back as it was
generated (`TurnStats.extends` False), the turn falls back to the template's own encoding.

Used alike from Python (`reflect`, `run_reflection`), `metronome reflect` and `POST /v1/reflections`
(serve/reflect.py), with the defaults of `ReflectSettings`. Imports only the standard library and
metronome.config at run time, so the CLI's flags cost nothing to build.
"""

from __future__ import annotations

import queue
import string
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable, Iterator

from metronome.config import ParamError, SamplingParams, check_fields, is_integer

if TYPE_CHECKING:
    from metronome.engine import Delta, Engine, Request

WAIT_SLICE_S = 0.5  # longest wait for an engine event before checking the engine thread is alive
MAX_ROUNDS = 32

DEFAULT_CRITIQUE = (
    "List the {points} most important things that would make your answer better. "
    "Number them and be brief; do not rewrite the answer yet."
)
DEFAULT_REVISION = "Rewrite your answer, applying those {points} improvements. Reply with the improved answer only."


@dataclass(frozen=True)
class TurnWatch:
    """Told of each turn's engine request as it is submitted and as its turn ends, on the thread running
    the loop (a server counts them in its metrics, as it counts its chat requests' choices)."""

    submitted: Callable[["Request"], None]
    # the request, the reason its turn ended ("cancelled" when the loop was closed before the request
    # finished: the engine ends it at its next step), and the gaps between its tokens (seconds)
    ended: Callable[["Request", str, list[float]], None]


@dataclass(frozen=True)
class ReflectSettings:
    """One reflection: `rounds` rounds of critique + revision after the first answer (2 * rounds + 1 turns).
    The instructions may use {points}. Sampling (and each turn's max_tokens) is a SamplingParams beside it."""

    rounds: int = 3
    points: int = 5
    critique: str = DEFAULT_CRITIQUE
    revision: str = DEFAULT_REVISION
    system: str | None = None  # a system message before the task (None: the chat template's default)

    def __post_init__(self) -> None:
        # kinds first: a rounds of 2.5 failed in the run's loop, and a points of 2.5 asked for "the 2.5 most
        # important things"
        check_fields(
            self,
            [
                ("rounds", is_integer(self.rounds), "must be an integer"),
                ("points", is_integer(self.points), "must be an integer"),
                ("critique", isinstance(self.critique, str), "must be the critique turn's words"),
                ("revision", isinstance(self.revision, str), "must be the revision turn's words"),
                ("system", self.system is None or isinstance(self.system, str), "must be a system message or None"),
            ],
        )
        for name in ("critique", "revision"):
            text = getattr(self, name)
            if not text.strip():
                raise ParamError(name, f"{name}: the instruction is empty; give the words of the {name} turn")
            # exactly {points}: {points[0]} or {points.x} failed at format time, and {points:>999999999}
            # would build a gigabyte of spaces
            try:
                fields = [(f, spec, conv) for _, f, spec, conv in string.Formatter().parse(text) if f is not None]
            except ValueError as exc:  # a lone { or }
                raise ParamError(name, f"{name}: only {{points}} may be used in braces ({exc})") from None
            odd = [f"{{{f}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}" for f, spec, conv in fields]
            odd = [o for o in odd if o != "{points}"]
            if odd:
                raise ParamError(name, f"{name}: only {{points}} may be used in braces, not {odd[0]}")
        if not 1 <= self.rounds <= MAX_ROUNDS:
            raise ParamError("rounds", f"rounds={self.rounds!r}: must be in [1, {MAX_ROUNDS}]")
        if not 1 <= self.points <= 20:
            raise ParamError("points", f"points={self.points!r}: must be in [1, 20]")

    @property
    def turns(self) -> int:
        return 2 * self.rounds + 1

    def kinds(self) -> list[tuple[int, str]]:
        """(round, kind) of every turn: (1, answer), then (r, critique), (r, revision) for r = 1..rounds."""
        out = [(1, "answer")]
        for r in range(1, self.rounds + 1):
            out += [(r, "critique"), (r, "revision")]
        return out

    def instruction(self, kind: str) -> str:
        return (self.critique if kind == "critique" else self.revision).format(points=self.points)


@dataclass(frozen=True)
class TurnStats:
    """One turn: its prompt (and how much of it the prefix cache served), its timings in ms and its output."""

    round: int
    turn: int  # 0-based index among all turns
    kind: str  # answer | critique | revision
    prompt_tokens: int
    cached_tokens: int
    extends: bool  # the prompt begins with the previous turn's prompt + reply ids (always True for turn 0)
    completion_tokens: int
    finish_reason: str
    queue_ms: float  # submit -> slot
    ttft_ms: float  # submit -> first token (queue and prefill)
    decode_ms: float  # first token -> last token
    build_ms: float  # building this turn's prompt (template and tokenizer), before its submit

    @property
    def tokens_per_s(self) -> float:
        n = self.completion_tokens - 1
        return n / (self.decode_ms / 1000) if n > 0 and self.decode_ms > 0 else float("nan")


@dataclass(frozen=True)
class ReflectionTotals:
    wall_ms: float  # the whole loop, first prompt built to last token
    decode_ms: float  # the turns' decode time, summed
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int

    @property
    def outside_ms(self) -> float:
        """Time not spent decoding: prompts built, queued and prefilled (TTFT), between turns."""
        return self.wall_ms - self.decode_ms

    @property
    def outside_share(self) -> float:
        return self.outside_ms / self.wall_ms if self.wall_ms > 0 else float("nan")


@dataclass(frozen=True)
class TurnStarted:
    round: int
    turn: int
    kind: str
    prompt_tokens: int


@dataclass(frozen=True)
class TurnDelta:
    round: int
    turn: int
    text: str


@dataclass(frozen=True)
class TurnDone:
    stats: TurnStats
    text: str


@dataclass(frozen=True)
class ReflectionDone:
    turns: tuple[TurnStats, ...]
    texts: tuple[str, ...]
    totals: ReflectionTotals

    @property
    def answer(self) -> str:
        """The last revision (the first answer after zero rounds)."""
        return self.texts[-1]


ReflectEvent = TurnStarted | TurnDelta | TurnDone | ReflectionDone


@dataclass
class _Transcript:
    """The conversation as messages (for the template) and as the ids the engine last saw."""

    messages: list[dict[str, str]]
    ids: list[int] = field(default_factory=list)
    text: str = ""  # what `ids` stand for, special tokens written out


def worst_case_tokens(engine: "Engine", task: str, settings: ReflectSettings, params: SamplingParams) -> int:
    """The context the whole loop may need: the transcript with every instruction, and every reply at
    max_tokens (the last turn's prompt plus its own max_tokens)."""
    messages = _opening(task, settings)
    for _round, kind in settings.kinds()[1:]:
        messages += [{"role": "assistant", "content": ""}, {"role": "user", "content": settings.instruction(kind)}]
    return len(engine.tokenizer.encode_chat(messages)) + settings.turns * params.max_tokens


def check_fits(engine: "Engine", task: str, settings: ReflectSettings, params: SamplingParams) -> None:
    """ParamError naming `rounds` when the loop could outgrow the context (checked before any turn runs)."""
    if not task.strip():
        raise ParamError("task", "task: empty; give the question or job to reflect on")
    if params.max_tokens < 1:  # the HTTP route's own check (ge=1): a turn of no tokens has nothing to reflect on
        raise ParamError("max_tokens", f"max_tokens={params.max_tokens}: a turn needs at least 1 token")
    if not engine.tokenizer.has_chat_template:
        raise ParamError("model", "reflection needs a chat model (this one has no chat template)")
    need, ctx = worst_case_tokens(engine, task, settings, params), engine.config.ctx
    if need > ctx:
        # fewer rounds help only if one round fits: else max_tokens (or the task) is what must shrink
        one_round = worst_case_tokens(engine, task, replace(settings, rounds=1), params)
        param, lower = ("rounds", "rounds or max_tokens") if one_round <= ctx else ("max_tokens", "max_tokens")
        raise ParamError(
            param,
            f"rounds={settings.rounds} with max_tokens={params.max_tokens} per turn may need {need} tokens "
            f"({settings.turns} turns) but the context holds {ctx}; lower {lower} "
            "(or run with a larger --ctx)",
        )


def reflect(
    engine: "Engine",
    task: str,
    settings: ReflectSettings | None = None,
    params: SamplingParams | None = None,
    watch: TurnWatch | None = None,
) -> Iterator[ReflectEvent]:
    """Run the loop, yielding events as they come; the last is ReflectionDone. Refused up front (ParamError)
    when it may not fit the context. Closing the generator cancels the running turn."""
    settings = settings or ReflectSettings()
    params = params or SamplingParams()
    check_fits(engine, task, settings, params)
    started = time.perf_counter()
    transcript = _Transcript(_opening(task, settings))
    turns: list[TurnStats] = []
    texts: list[str] = []
    for index, (round_, kind) in enumerate(settings.kinds()):
        t0 = time.perf_counter()
        extends = _next_prompt(engine, transcript, None if index == 0 else settings.instruction(kind))
        build_ms = (time.perf_counter() - t0) * 1000
        yield TurnStarted(round_, index, kind, len(transcript.ids))
        pieces: list[str] = []
        events: "queue.Queue[Delta]" = queue.Queue()
        request = engine.submit(transcript.ids, params, events.put)
        if watch is not None:
            watch.submitted(request)
        gaps: list[float] = []
        last: float | None = None
        try:
            for delta in _events(engine, request, events):
                if delta.choices:
                    now = time.perf_counter()
                    gaps += ([now - last] if last is not None else []) + [0.0] * (len(delta.choices) - 1)
                    last = now
                if delta.text:
                    pieces.append(delta.text)
                    yield TurnDelta(round_, index, delta.text)
                if delta.finish_reason == "error":
                    raise RuntimeError(f"the engine failed during turn {index} ({kind}): {delta.error}")
        finally:
            if watch is not None:
                watch.ended(request, request.finish_reason or "cancelled", gaps)
        text = "".join(pieces)
        stats = _stats(request, round_, index, kind, extends, build_ms)
        turns.append(stats)
        texts.append(text)
        transcript.messages.append({"role": "assistant", "content": text})
        transcript.ids = transcript.ids + list(request.output_ids)
        transcript.text += engine.tokenizer.decode(request.output_ids, skip_special=False)
        yield TurnDone(stats, text)
    wall_ms = (time.perf_counter() - started) * 1000
    totals = ReflectionTotals(
        wall_ms,
        sum(t.decode_ms for t in turns),
        sum(t.prompt_tokens for t in turns),
        sum(t.cached_tokens for t in turns),
        sum(t.completion_tokens for t in turns),
    )
    yield ReflectionDone(tuple(turns), tuple(texts), totals)


def run_reflection(
    engine: "Engine", task: str, settings: ReflectSettings | None = None, params: SamplingParams | None = None
) -> ReflectionDone:
    """The whole loop, blocking; its last event."""
    for event in reflect(engine, task, settings, params):
        if isinstance(event, ReflectionDone):
            return event
    raise RuntimeError("the reflection ended without its last event")  # unreachable: reflect always ends so


def _opening(task: str, settings: ReflectSettings) -> list[dict[str, str]]:
    system = [{"role": "system", "content": settings.system}] if settings.system is not None else []
    return system + [{"role": "user", "content": task}]


def _next_prompt(engine: "Engine", transcript: _Transcript, instruction: str | None) -> bool:
    """Add the instruction (None: the first turn) to the transcript; True when its ids extend the last ones."""
    tok = engine.tokenizer
    if instruction is not None:
        transcript.messages.append({"role": "user", "content": instruction})
    text = tok.render_chat(transcript.messages)
    if transcript.ids and text.startswith(transcript.text):
        transcript.ids = transcript.ids + tok.encode(text[len(transcript.text) :], add_bos=False)
        extends = True
    else:  # the first turn, or a template that renders the reply otherwise than it was generated
        extends = not transcript.ids
        transcript.ids = tok.encode(text)
    transcript.text = text
    return extends


def _events(engine: "Engine", request: "Request", events: "queue.Queue[Delta]") -> Iterator["Delta"]:
    """One turn's events until its last (as `PythonAPI.stream`, which does not hand out the request whose
    stamps and cached_tokens the stats read). Without `engine.start()` this thread steps the engine."""
    try:
        while True:
            if not engine.running and events.empty():
                engine.step()
                continue
            try:
                delta = events.get(timeout=WAIT_SLICE_S)
            except queue.Empty:
                engine.check_alive()
                continue
            yield delta
            if delta.finish_reason is not None:
                return
    finally:
        if request.finish_reason is None:
            engine.cancel(request)


def _stats(r: "Request", round_: int, turn: int, kind: str, extends: bool, build_ms: float) -> TurnStats:
    t = r.timings
    first = t.first_token if t.first_token is not None else t.finished
    admitted = t.admitted if t.admitted is not None else t.submitted
    return TurnStats(
        round=round_,
        turn=turn,
        kind=kind,
        prompt_tokens=len(r.prompt_ids),
        cached_tokens=r.cached_tokens,
        extends=extends,
        completion_tokens=len(r.output_ids),
        finish_reason=r.finish_reason or "error",
        queue_ms=(admitted - t.submitted) * 1000,
        ttft_ms=(first - t.submitted) * 1000,
        decode_ms=(t.finished - first) * 1000,
        build_ms=build_ms,
    )
