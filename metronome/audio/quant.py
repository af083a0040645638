"""Weight formats for a built Whisper, applied as a pass over the pure model (it never knows its format).

"q8": the decoder's matrices (every layer's and the vocab projection) as Q8_0 blocks (an fp16 scale per 32
int8 weights) read by metronome's C++ `block_linear` against float32 activations. A decode step is bound by
reading weights, and the projection alone is 80 MB in float32 (20 MB as Q8_0): docs/speech.md has the
measurements. The encoder stays float32 (it is compute-bound at 1500 rows, where torch's GEMM is faster).
"""

from __future__ import annotations

from enum import Enum

import torch
from torch import Tensor

from metronome.audio.whisper import Linear, Whisper
from metronome.compile.quant import quantize_q8_0
from metronome.kernels.blocks import Q8_0_KIND


class WhisperWeights(str, Enum):
    AUTO = "auto"  # q8 where metronome's C++ kernels build, else f32 (Transcriber.load decides)
    F32 = "f32"  # the checkpoint's fp16 weights widened to float32: exact, the reference
    Q8 = "q8"  # decoder matrices as Q8_0 blocks (C++ kernels)


class Q8Linear:
    def __init__(self, linear: Linear, ops):
        self.blocks = quantize_q8_0(linear.weight)
        self.rows, self.cols = linear.weight.shape
        self.bias = linear.bias
        self.ops = ops

    def __call__(self, x: Tensor) -> Tensor:
        flat = x.reshape(-1, self.cols).contiguous()
        y = self.ops.block_linear(flat, self.blocks, Q8_0_KIND, self.rows, self.bias)
        return y.reshape(*x.shape[:-1], self.rows)


_DECODER_MATRICES = ("self_qkv", "self_out", "cross_q", "cross_out", "fc1", "fc2")


def apply_weights(model: Whisper, weights: WhisperWeights, ops=None) -> None:
    """Convert `model`'s weights in place to `weights` (q8 needs `ops`, metronome's loaded C++ kernels)."""
    if weights is WhisperWeights.F32:
        return
    if weights is WhisperWeights.AUTO:
        raise ValueError("weights='auto' is resolved by Transcriber.load; pass 'f32' or 'q8' here")
    if ops is None:
        raise ValueError("weights='q8' needs metronome's C++ kernels (ops=load_kernels()); use weights='f32' without")
    with torch.inference_mode():
        for layer in model.decoder.layers:
            for name in _DECODER_MATRICES:
                setattr(layer, name, Q8Linear(getattr(layer, name), ops))
        model.decoder.projection = Q8Linear(model.decoder.projection, ops)
