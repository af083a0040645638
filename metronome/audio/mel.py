"""Whisper's log-mel front end: 16 kHz mono samples to 80 log-mel bins every 10 ms.

The spectrogram is a centred STFT (reflect padding, periodic Hann window of n_fft samples, hop 160), power
spectrum, a Slaney-style mel filterbank computed here from its definition, log10 floored at 1e-10, then the
dynamic range is clipped to 8 (i.e. 80 dB) below the loudest value of the whole audio and scaled as
(x + 4) / 4. Like faster-whisper, the audio gets `PAD_SAMPLES` zeros at the end and the last STFT frame is
dropped, so N samples give (N + 160) // 160 frames; windows shorter than 30 s are padded with zeros in
the log-mel domain by the caller (`window`).
"""

from __future__ import annotations

import numpy as np
import torch

SAMPLE_RATE = 16000
N_FFT = 400
HOP = 160
N_MELS = 80
WINDOW_SECONDS = 30
WINDOW_FRAMES = WINDOW_SECONDS * SAMPLE_RATE // HOP  # 3000 frames per encoder window
PAD_SAMPLES = HOP


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz (3 mel per 200 Hz), logarithmic above (27 mel per 6.4x)."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz * 3.0 / 200.0
    log_region = 15.0 + np.log(np.maximum(hz, 1e-12) / 1000.0) * 27.0 / np.log(6.4)
    return np.where(hz >= 1000.0, log_region, linear)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * 200.0 / 3.0
    log_region = 1000.0 * np.exp((mel - 15.0) * np.log(6.4) / 27.0)
    return np.where(mel >= 15.0, log_region, linear)


def mel_filters(n_mels: int = N_MELS, n_fft: int = N_FFT, sample_rate: int = SAMPLE_RATE) -> np.ndarray:
    """Triangular filters evenly spaced on the Slaney mel scale from 0 Hz to Nyquist, each scaled by
    2 / (its bandwidth in Hz) so that every band carries about the same energy. Shape [n_mels, n_fft//2+1]."""
    fft_hz = np.linspace(0.0, sample_rate / 2.0, n_fft // 2 + 1)
    edges_hz = _mel_to_hz(np.linspace(0.0, _hz_to_mel(sample_rate / 2.0), n_mels + 2))
    lo, centre, hi = edges_hz[:-2, None], edges_hz[1:-1, None], edges_hz[2:, None]
    rising = (fft_hz[None, :] - lo) / (centre - lo)
    falling = (hi - fft_hz[None, :]) / (hi - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= 2.0 / (hi - lo)
    return weights.astype(np.float32)


class LogMel:
    """The front end with its window and filterbank built once; `__call__` is thread-safe (no state)."""

    def __init__(self, n_mels: int = N_MELS):
        if n_mels not in (80, 128):
            raise ValueError(f"n_mels must be 80 or 128 (Whisper's front ends), got {n_mels}")
        self.n_mels = n_mels
        self._window = torch.hann_window(N_FFT, periodic=True, dtype=torch.float32)
        self._filters = torch.from_numpy(mel_filters(n_mels))

    def __call__(self, samples: np.ndarray) -> torch.Tensor:
        """float32 mono 16 kHz samples [N] -> log-mel [n_mels, (N + 160) // 160] (float32)."""
        if samples.ndim != 1:
            raise ValueError(f"samples must be mono (1-D), got shape {samples.shape}")
        audio = torch.from_numpy(np.ascontiguousarray(samples, dtype=np.float32))
        frames = (len(audio) + PAD_SAMPLES) // HOP
        # The reflection at each end needs N_FFT // 2 + 1 samples: a clip shorter than that (a few ms) gets
        # zeros, as Whisper's own 30-s zero padding gives it, and the frames past the clip's are dropped.
        audio = torch.nn.functional.pad(audio, (0, max(PAD_SAMPLES, N_FFT // 2 + 1 - len(audio))))
        spec = torch.stft(audio, N_FFT, HOP, window=self._window, center=True, pad_mode="reflect", return_complex=True)
        power = spec[:, :frames].abs() ** 2
        mel = self._filters @ power
        log_spec = torch.clamp(mel, min=1e-10).log10()
        log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
        return (log_spec + 4.0) / 4.0


def window(features: torch.Tensor, start: int, length: int, frames: int = WINDOW_FRAMES) -> torch.Tensor:
    """features[:, start:start+length], zero-padded on the right to exactly `frames` (the encoder's shape)."""
    if not 0 < length <= frames:
        raise ValueError(f"a window holds 1..{frames} frames, got length={length}")
    out = features.new_zeros(features.shape[0], frames)
    chunk = features[:, start : start + length]
    out[:, : chunk.shape[1]] = chunk
    return out
