"""Audio file bytes to float32 mono 16 kHz (PyAV): every container the API takes, and every refusal.

References are independent of FFmpeg: the stdlib `wave` reader for PCM, and analytic sines for the
resampled, downmixed and lossy formats."""

from __future__ import annotations

import io
import struct
import wave
from importlib import util
from pathlib import Path

import av
import numpy as np
import pytest
from helpers.wav import pcm_wav

from metronome.audio.decode import SAMPLE_RATE, AudioError, decode_audio


def _sample() -> Path:
    spec = util.find_spec("moonshine_onnx")
    if spec is None:
        pytest.skip("useful-moonshine-onnx is not installed: pip install --no-deps useful-moonshine-onnx==20251121")
    return Path(spec.origin).parent / "assets" / "beckett.wav"


def _wav(samples: np.ndarray, rate: int, channels: int = 1) -> bytes:
    return pcm_wav(samples, rate, channels)


def _sine(freq: float, rate: int, seconds: float, amplitude: float = 0.5) -> np.ndarray:
    return amplitude * np.sin(2 * np.pi * freq * np.arange(int(rate * seconds)) / rate)


def _encode(fmt: str, codec: str, rate: int, layout: str, signal: np.ndarray) -> bytes:
    """`signal` (float, mono) encoded by FFmpeg into `fmt`/`codec` at `rate`, duplicated on every channel."""
    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as out:
        stream = out.add_stream(codec, rate=rate, layout=layout)
        channels = 2 if layout == "stereo" else 1
        pcm = np.repeat((signal * 32767).astype(np.int16)[:, None], channels, axis=1).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout=layout)
        frame.sample_rate = rate
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=layout, rate=rate)
        for f in resampler.resample(frame) + resampler.resample(None):
            out.mux(stream.encode(f))
        out.mux(stream.encode(None))
    return buf.getvalue()


def test_a_16k_pcm_wav_is_read_sample_for_sample():
    path = _sample()
    with wave.open(str(path)) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
        expected = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2").astype(np.float32) / 32768
    audio = decode_audio(path.read_bytes())
    assert audio.samples.dtype == np.float32 and audio.samples.flags.c_contiguous
    assert audio.container == "wav" and audio.codec == "pcm_s16le"
    np.testing.assert_array_equal(audio.samples, expected)
    assert audio.seconds == pytest.approx(len(expected) / SAMPLE_RATE)


@pytest.mark.parametrize(
    "fmt, codec, rate, layout, tolerance",
    [
        ("wav", "pcm_s16le", 44100, "stereo", 2e-3),  # resampled and downmixed
        ("wav", "pcm_s16le", 8000, "mono", 2e-3),  # upsampled
        ("flac", "flac", 48000, "mono", 2e-3),
        ("mp3", "libmp3lame", 44100, "stereo", 0.05),  # lossy: the shape, not the bits
        ("ogg", "libopus", 48000, "mono", 0.05),
        ("webm", "libopus", 48000, "mono", 0.05),  # what Chromium's MediaRecorder records
    ],
)
def test_every_container_becomes_the_same_16k_mono_signal(fmt, codec, rate, layout, tolerance):
    seconds, freq = 1.0, 440.0
    data = _encode(fmt, codec, rate, layout, _sine(freq, rate, seconds))
    audio = decode_audio(data)
    got = audio.samples
    # lossy encoders add a delay (priming samples): find the shift that best matches the analytic sine
    # FFmpeg's stereo -> mono downmix (Whisper's `ffmpeg -ac 1` too) adds the channels at -3 dB each
    gain = np.sqrt(2) if layout == "stereo" else 1.0
    reference = gain * _sine(freq, SAMPLE_RATE, seconds + 0.2)
    assert len(got) >= 0.95 * SAMPLE_RATE * seconds
    inner = got[800:-800]  # edges: resampler and codec warm-up
    errors = [np.max(np.abs(inner - reference[800 + s : 800 + s + len(inner)])) for s in range(0, 1500)]
    assert min(errors) < tolerance, (fmt, codec, min(errors))


def test_refusals_name_the_file_parameter_and_what_to_do():
    cases = {
        b"": "empty",
        b"this is a text file, not a recording" * 20: "not audio",
        b"\x89PNG\r\n\x1a\n" + bytes(200): "no audio stream",
    }
    for data, words in cases.items():
        with pytest.raises(AudioError, match=words) as info:
            decode_audio(data)
        assert info.value.param == "file" and isinstance(info.value, ValueError)


def test_silence_is_refused_but_quiet_speech_is_not():
    silent = _wav(np.zeros(SAMPLE_RATE, dtype=np.int16), SAMPLE_RATE)
    with pytest.raises(AudioError, match="silent"):
        decode_audio(silent)
    quiet = _wav((_sine(200, SAMPLE_RATE, 1.0, amplitude=0.01) * 32767).astype(np.int16), SAMPLE_RATE)  # -40 dBFS
    assert decode_audio(quiet).seconds == pytest.approx(1.0)


def test_too_long_audio_is_refused_before_it_is_all_decoded():
    data = _wav((_sine(300, SAMPLE_RATE, 3.0) * 32767).astype(np.int16), SAMPLE_RATE)
    assert decode_audio(data, max_seconds=3.5).seconds == pytest.approx(3.0)
    with pytest.raises(AudioError, match="longer than 2 s"):
        decode_audio(data, max_seconds=2)


def test_an_unsupported_codec_is_named():
    pcm = (_sine(300, SAMPLE_RATE, 0.5) * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<IHHIIHH", 16, 0x1234, 1, SAMPLE_RATE, 2 * SAMPLE_RATE, 2, 16)  # format tag 0x1234: none
    data = b"RIFF" + struct.pack("<I", 36 + len(pcm)) + b"WAVEfmt " + fmt + b"data" + struct.pack("<I", len(pcm)) + pcm
    with pytest.raises(AudioError, match="codec .* not supported"):
        decode_audio(data)


def test_a_file_without_audio_is_refused():
    buf = io.BytesIO()
    with av.open(buf, "w", format="matroska") as out:  # a video-only file
        stream = out.add_stream("mpeg4", rate=10)
        stream.width, stream.height = 32, 32
        frame = av.VideoFrame.from_ndarray(np.zeros((32, 32, 3), np.uint8), format="rgb24")
        out.mux(stream.encode(frame.reformat(format="yuv420p")))
        out.mux(stream.encode(None))
    with pytest.raises(AudioError, match="no audio stream"):
        decode_audio(buf.getvalue())


def test_a_recording_cut_before_its_first_frame_is_called_empty():
    """A webm whose recorder stopped at once holds its header and no audio: FFmpeg's end of file on open was
    reported as "not audio FFmpeg can read", which sent a user after the wrong cause."""

    out = io.BytesIO()
    with av.open(out, mode="w", format="webm") as container:
        stream = container.add_stream("libopus", rate=48000)
        stream.layout = "mono"
        samples = (_sine(300, 48000, 0.5) * 0.5).astype(np.float32).reshape(1, -1)
        frame = av.AudioFrame.from_ndarray(samples, format="flt", layout="mono")
        frame.rate = 48000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    data = out.getvalue()
    whole = decode_audio(data)
    assert whole.seconds == pytest.approx(0.5, abs=0.05)
    header = data[: data.find(bytes.fromhex("1F43B675"))]  # up to the first Cluster: no frame at all
    with pytest.raises(AudioError, match="ends before its first audio frame") as info:
        decode_audio(header)
    assert info.value.param == "file"


@pytest.mark.parametrize("fmt, codec", [("flac", "flac"), ("mp3", "mp3")])
def test_a_recording_cut_short_or_damaged_keeps_the_audio_it_holds(fmt, codec):
    """A FLAC or MP3 cut at upload, or with a damaged stretch, was refused whole as 'corrupt or truncated'
    (a WAV or Opus cut the same way was kept, as faster-whisper keeps them); a file with nothing left to
    decode is still refused."""
    signal = _sine(440, 16000, 6.0)
    data = _encode(fmt, codec, 16000, "mono", signal)
    half = decode_audio(data[: len(data) // 2])
    assert 2.0 < half.seconds < 4.0
    damaged = bytearray(data)
    damaged[len(data) // 3 : len(data) // 3 + 1500] = (
        np.random.default_rng(0).integers(0, 256, 1500, np.uint8).tobytes()
    )
    assert decode_audio(bytes(damaged)).seconds > 5.0
    with pytest.raises(AudioError):
        decode_audio(data[:120])


def test_too_long_audio_stops_decoding_once_past_the_limit(monkeypatch):
    """A file past max_seconds is refused as soon as its decoded samples pass it, not once it is all decoded
    (two hours of FLAC silence fit in 1.6 MB and decode to 460 MB; ten hours, to 2.3 GB)."""
    from metronome.audio import decode

    decoded = [0]
    real = decode._append

    def counting(pieces, frame):
        n = real(pieces, frame)
        decoded[0] += n
        return n

    monkeypatch.setattr(decode, "_append", counting)
    data = _wav((_sine(300, SAMPLE_RATE, 30.0) * 32767).astype(np.int16), SAMPLE_RATE)
    with pytest.raises(AudioError, match="longer than 2 s"):
        decode_audio(data, max_seconds=2)
    assert decoded[0] < 5 * SAMPLE_RATE, decoded[0] / SAMPLE_RATE
