"""The voice loop under load: audio in -> transcript -> chat answer -> first sentence out.

Each speaker is a closed loop: it uploads a recording to `/v1/audio/transcriptions`, sends the
transcript as the user message of a streamed chat request, and reads the answer; then starts again.
At each level, that many speakers run at once for `loops` loops each. Times are client-side, from the
first byte of the upload: time to transcript, then the chat request's own TTFT and time to first
sentence, and the whole loop (audio sent -> first sentence of the answer), which is what decides when
a voice assistant can start speaking.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import httpx

from metronome.bench.client import Api, RequestSpec, stream_request
from metronome.bench.metrics import first_sentence_chunk, percentile


def default_audio() -> Path:
    """The 10-s sample shipped by useful-moonshine-onnx (a test dependency), if installed."""
    import importlib.util

    spec = importlib.util.find_spec("moonshine_onnx")
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            "no --audio given and no sample installed: give --audio FILE, or "
            "`pip install --no-deps useful-moonshine-onnx==20251121` for its beckett.wav"
        )
    return Path(spec.origin).parent / "assets" / "beckett.wav"


@dataclass(frozen=True)
class Loop:
    """One speaker's turn; times in seconds from the upload's start. None where it failed."""

    speaker: int
    ok: bool
    error: str | None
    transcript_s: float | None
    ttft_s: float | None  # of the chat request, from its own send
    first_sentence_s: float | None  # of the chat request, from its own send
    loop_s: float | None  # upload start -> first sentence of the answer
    transcript: str


@dataclass(frozen=True)
class Level:
    speakers: int
    wall_s: float
    loops: tuple[Loop, ...]

    def median(self, name: str) -> float | None:
        values = [getattr(loop, name) for loop in self.loops if loop.ok and getattr(loop, name) is not None]
        return statistics.median(values) if values else None

    def p90(self, name: str) -> float | None:
        values = [getattr(loop, name) for loop in self.loops if loop.ok and getattr(loop, name) is not None]
        return (
            percentile(sorted(values), 90) if values else None
        )  # as the other benches read it (it gave the max at 10)

    @property
    def ok(self) -> int:
        return sum(loop.ok for loop in self.loops)


async def _one_loop(
    http: httpx.AsyncClient,
    base_url: str,
    chat_model: str,
    audio: bytes,
    filename: str,
    speaker: int,
    max_tokens: int,
    timeout_s: float,
) -> Loop:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout_s):
            r = await http.post(
                f"{base_url}/v1/audio/transcriptions",
                files={"file": (filename, audio)},
                data={"response_format": "json"},
            )
    except (httpx.HTTPError, TimeoutError) as exc:
        return Loop(speaker, False, f"transcription: {type(exc).__name__}: {exc}", None, None, None, None, "")
    transcript_s = time.perf_counter() - started
    if r.status_code != 200:
        return Loop(speaker, False, f"transcription: HTTP {r.status_code}: {r.text[:200]}", None, None, None, None, "")
    text = r.json()["text"].strip()
    if not text:  # no prompt to answer: the loop failed here, as the chat page says "heard nothing"
        return Loop(
            speaker, False, "transcription: heard nothing (an empty transcript)", transcript_s, None, None, None, ""
        )
    chat_sent = time.perf_counter()
    spec = RequestSpec(prompt=text, max_tokens=max_tokens, ignore_eos=False, temperature=0.0)
    trace = await stream_request(http, base_url, Api.CHAT, chat_model, spec, timeout_s)
    if trace.error_kind is not None or not trace.chunk_times:
        return Loop(speaker, False, f"chat: {trace.error or 'no content'}", transcript_s, None, None, None, text)
    ttft = trace.chunk_times[0]
    sentence = first_sentence_chunk(trace.chunk_texts)  # None only for an answer without text
    first_sentence = trace.chunk_times[sentence if sentence is not None else -1]
    # the chat request's times are from its first byte on the wire; chat_sent is just before it
    loop_s = (chat_sent - started) + first_sentence
    return Loop(speaker, True, None, transcript_s, ttft, first_sentence, loop_s, text)


async def _level(
    base_url: str,
    chat_model: str,
    audio: bytes,
    filename: str,
    speakers: int,
    loops: int,
    max_tokens: int,
    timeout_s: float,
) -> Level:
    limits = httpx.Limits(max_connections=2 * speakers + 2)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as http:

        async def speaker(k: int) -> list[Loop]:
            return [
                await _one_loop(http, base_url, chat_model, audio, filename, k, max_tokens, timeout_s)
                for _ in range(loops)
            ]

        await _one_loop(http, base_url, chat_model, audio, filename, -1, max_tokens, timeout_s)  # warm-up, unmeasured
        started = time.perf_counter()
        results = await asyncio.gather(*(speaker(k) for k in range(speakers)))
        wall = time.perf_counter() - started
    return Level(speakers, wall, tuple(loop for per in results for loop in per))


async def _chat_model(base_url: str) -> str:
    """The chat model: the first id of GET /v1/models (the speech model is listed after it)."""
    async with httpx.AsyncClient(timeout=30.0) as http:
        try:
            r = await http.get(f"{base_url}/v1/models")
        except httpx.HTTPError as exc:  # as the other benches say it (their callers catch ConnectionError)
            raise ConnectionError(
                f"cannot reach {base_url}/v1/models ({type(exc).__name__}: {exc}); check that the server is running"
            ) from None
    if r.status_code != 200:
        raise ConnectionError(f"GET {base_url}/v1/models answered HTTP {r.status_code}: {r.text[:200]}")
    models = r.json()["data"]
    if not any(m.get("kind") == "speech-to-text" for m in models):
        raise ConnectionError(f"{base_url} serves no speech model (started with --speech-model none?)")
    return models[0]["id"]


def measure_voice(
    base_url: str, audio_path: Path, levels: tuple[int, ...], loops: int, max_tokens: int, timeout_s: float
) -> list[Level]:
    """The voice loop at each number of concurrent speakers in `levels`."""
    audio = audio_path.read_bytes()
    chat_model = asyncio.run(_chat_model(base_url))
    return [
        asyncio.run(_level(base_url, chat_model, audio, audio_path.name, n, loops, max_tokens, timeout_s))
        for n in levels
    ]


def voice_markdown(levels: list[Level], audio_path: Path, max_tokens: int) -> str:
    def s(v: float | None) -> str:
        return "-" if v is None else f"{v:.3f}"

    lines = [
        f"Voice loop: {audio_path.name} -> /v1/audio/transcriptions -> streamed chat (max_tokens {max_tokens}, "
        "temperature 0) -> first sentence. Seconds, medians (p90); TTFT and first sentence from the chat request's send.",
        "",
        "| speakers | loops ok | transcript | chat TTFT | chat first sentence | audio in -> first sentence | loops/s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lv in levels:
        lines.append(
            f"| {lv.speakers} | {lv.ok}/{len(lv.loops)} | {s(lv.median('transcript_s'))} ({s(lv.p90('transcript_s'))}) "
            f"| {s(lv.median('ttft_s'))} | {s(lv.median('first_sentence_s'))} "
            f"| {s(lv.median('loop_s'))} ({s(lv.p90('loop_s'))}) | {lv.ok / lv.wall_s:.2f} |"
        )
    errors = sorted({loop.error for lv in levels for loop in lv.loops if loop.error})
    lines += [f"\nerror: {e}" for e in errors[:5]]
    transcripts = sorted({loop.transcript for lv in levels for loop in lv.loops if loop.ok})
    lines += ["", "transcripts: " + " | ".join(repr(t) for t in transcripts)]
    return "\n".join(lines) + "\n"


def levels_json(levels: list[Level]) -> list[dict]:
    return [
        {"speakers": lv.speakers, "wall_s": lv.wall_s, "loops": [asdict(loop) for loop in lv.loops]} for lv in levels
    ]
