"""Test audio: 16-bit PCM wav files written by the standard library."""

from __future__ import annotations

import io
import wave

import numpy as np


def pcm_wav(samples: np.ndarray, rate: int = 16000, channels: int = 1) -> bytes:
    """A wav of int16 `samples`, shape (n,) or (n, channels)."""
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(channels)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.ascontiguousarray(samples, dtype="<i2").tobytes())
    return buf.getvalue()
