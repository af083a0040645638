"""What a transcription returns: the shared shapes between the Whisper runner (whisper.py, transcribe.py)
and its users (the HTTP API, the CLI, the voice-loop bench). Times are seconds from the start of the audio."""

from __future__ import annotations

from dataclasses import dataclass


class TranscriptionStopped(Exception):
    """A transcription ended early because its `stop` event was set (its requester went away)."""


@dataclass(frozen=True)
class Segment:
    id: int
    start: float  # seconds
    end: float
    text: str
    tokens: tuple[int, ...]
    avg_logprob: float
    no_speech_prob: float
    temperature: float  # the temperature this segment's window was decoded at (fallback raises it)
    compression_ratio: float
    seek: int = 0  # the offset, in 10-ms mel frames, of the 30-s window it was decoded in (OpenAI's `seek`)


@dataclass(frozen=True)
class TranscriptTimings:
    audio_s: float  # length of the audio
    features_ms: float  # log-mel front end
    encode_ms: float  # encoder, every window
    decode_ms: float  # decoder, every window and fallback
    total_ms: float  # from samples in to transcript out (queueing included when served)


@dataclass(frozen=True)
class Transcript:
    text: str
    language: str
    duration: float  # seconds of audio
    segments: tuple[Segment, ...]
    timings: TranscriptTimings
    task: str = "transcribe"  # or "translate"
