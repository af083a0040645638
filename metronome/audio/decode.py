"""Audio file bytes to the samples Whisper reads: float32, mono, 16 kHz.

Decoding goes through PyAV (FFmpeg's demuxers and decoders), so one path covers wav, flac, mp3, ogg
(vorbis, opus) and the webm/opus a browser's MediaRecorder writes; FFmpeg's resampler does the channel
downmix and the rate conversion. Every refusal is an `AudioError`: a ParamError naming the `file`
parameter, which the API answers as a 400 and the CLI prints as is.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np

from metronome.config import ParamError

SAMPLE_RATE = 16_000  # Whisper's input rate
MAX_SECONDS = 2 * 60 * 60  # two hours: about what OpenAI's 25 MB upload limit holds as compressed speech
# Peak below -80 dBFS: nothing a microphone records is this quiet (its own noise floor is louder), so the
# file is digital silence and Whisper would only hallucinate text on it.
SILENCE_PEAK = 1e-4


class AudioError(ParamError):
    """The uploaded audio cannot be used: empty, not audio, an unsupported codec, silent or too long."""

    def __init__(self, message: str) -> None:
        super().__init__("file", message)


@dataclass(frozen=True)
class DecodedAudio:
    samples: np.ndarray  # float32, mono, SAMPLE_RATE
    container: str  # the format FFmpeg recognized, e.g. "wav", "ogg", "matroska,webm"
    codec: str  # e.g. "pcm_s16le", "opus"

    @property
    def seconds(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def decode_audio(data: bytes, max_seconds: float = MAX_SECONDS) -> DecodedAudio:
    """Decode `data` (a whole audio file) to float32 mono 16 kHz samples; AudioError for audio that
    cannot be used, naming what is wrong and what to send instead. Damaged packets are skipped and a file
    cut short keeps what it holds (a recording cut at upload was refused whole as a FLAC or MP3, and kept
    as a WAV or Opus); only a file with no audio left to decode is refused as corrupt."""
    import av  # FFmpeg: loaded only where audio is decoded

    if not data:
        raise AudioError("the file is empty; send a recording (wav, flac, mp3, ogg or webm)")
    try:
        container = av.open(io.BytesIO(data), mode="r")
    except av.error.EOFError:  # a container's header and nothing after it: what a recorder stopped at once sends
        raise AudioError("the file ends before its first audio frame: the recording is empty or cut short") from None
    except av.error.FFmpegError as exc:  # the bytes are the caller's: any failure to open them is theirs
        raise AudioError(
            f"the file is not audio FFmpeg can read ({exc.strerror}); send wav, flac, mp3, ogg or webm"
        ) from None
    with container:
        if not container.streams.audio:
            raise AudioError(f"the file ({container.format.name}) has no audio stream")
        stream = container.streams.audio[0]
        if stream.codec_context is None or stream.codec_context.codec is None:
            raise AudioError(f"the audio codec of this {container.format.name} file is not supported")
        codec = stream.codec_context.codec.name
        resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
        limit = int(max_seconds * SAMPLE_RATE)
        # the samples' bytes, frame after frame: one buffer, read as the array at the end without a copy (a
        # list of per-frame arrays, then their concatenation, took three times the samples' size at its peak:
        # 1.4 GB for two hours of silence that FLAC holds in 1.6 MB)
        pieces = bytearray()
        total = 0
        damage: str | None = None  # the first damaged packet's error; the audio around it is kept
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.InvalidDataError as exc:  # a damaged packet: skipped, as faster-whisper does
                    damage = damage or exc.strerror
                    continue
                for frame in frames:
                    frame.pts = (
                        None  # the resampler keeps its own clock; a container's odd timestamps must not stall it
                    )
                    for out in resampler.resample(frame):
                        total += _append(pieces, out)
                if total > limit:
                    raise AudioError(
                        f"the audio is longer than {max_seconds:g} s; split it and send the parts one by one"
                    )
        except av.error.FFmpegError as exc:  # the container itself ends early (an upload cut short)
            damage = damage or exc.strerror
        if damage is not None and total == 0:
            raise AudioError(f"the {codec} audio in this file is corrupt or truncated ({damage})")
        try:
            for out in resampler.resample(None):  # flush what the resampler holds back
                total += _append(pieces, out)
        except av.error.FFmpegError as exc:
            raise AudioError(f"the {codec} audio in this file is corrupt ({exc.strerror})") from None
        if total > limit:
            raise AudioError(f"the audio is longer than {max_seconds:g} s; split it and send the parts one by one")
        format_name = container.format.name
    if total == 0:
        raise AudioError(f"the {codec} stream of this file holds no samples: the recording is empty")
    samples = np.frombuffer(pieces, dtype=np.float32)
    if not np.isfinite(samples).all():  # a float file's NaN or Inf spoilt every window's mel (its maximum)
        samples = np.nan_to_num(samples, nan=0.0, posinf=1.0, neginf=-1.0)  # as a 16-bit decode would hold them
    if float(np.max(np.abs(samples))) < SILENCE_PEAK:
        raise AudioError(f"the audio ({total / SAMPLE_RATE:.1f} s) is silent; check the microphone and record again")
    return DecodedAudio(np.ascontiguousarray(samples, dtype=np.float32), format_name, codec)


def _append(pieces: bytearray, frame) -> int:
    """Add one resampled frame's samples (float32 bytes); return how many."""
    array = np.ascontiguousarray(frame.to_ndarray().reshape(-1), dtype=np.float32)  # flt, mono: shape (1, n)
    pieces += array.tobytes()
    return int(array.size)
