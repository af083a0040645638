"""Whisper as a pure torch network, built from a CTranslate2 model.bin.

The encoder maps one 30-s log-mel window [n_mels, 3000] to audio states [1500, d]: two 3-wide convolutions
(the second with stride 2) with GELU, learned positions, pre-norm self-attention layers, a final LayerNorm.
The decoder is a pre-norm transformer with learned positions, causal self-attention over a per-slot key/value
cache and cross-attention over per-slot keys/values of the audio states, then a final LayerNorm and the vocab
projection. The network knows nothing of scheduling: `DecoderCache` is the caller's fixed set of slots, and
`decode` computes one row per (slot, token, position) given to it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from metronome.audio.ct2 import Ct2Model, read_model_bin

_LN_EPS = 1e-5


@dataclass(frozen=True)
class WhisperConfig:
    n_mels: int
    n_audio_ctx: int  # encoder positions (1500 for 30 s)
    n_audio_state: int
    n_audio_head: int
    n_audio_layer: int
    n_vocab: int
    n_text_ctx: int  # decoder positions (448)
    n_text_state: int
    n_text_head: int
    n_text_layer: int

    def __post_init__(self) -> None:
        for name in ("n_audio_state", "n_text_state"):
            heads = getattr(self, name.replace("state", "head"))
            if getattr(self, name) % heads:
                raise ValueError(f"{name}={getattr(self, name)} is not divisible by its head count {heads}")


def _t(x: np.ndarray) -> Tensor:
    """fp16 (or any float) weights to float32 tensors; fp16 -> fp32 is exact."""
    return torch.from_numpy(np.asarray(x, dtype=np.float32).copy())


def _count_layers(names: list[str], prefix: str) -> int:
    parts = (n.split("/") for n in names if n.startswith(prefix + "/layer_"))
    return len({p[1] for p in parts if p[1].removeprefix("layer_").isdigit()})


def config_from_ct2(model: Ct2Model) -> WhisperConfig:
    if model.spec != "WhisperSpec":
        raise ValueError(f"model.bin holds a {model.spec}, not a WhisperSpec")
    names = list(model.variables)
    conv1 = model.get("encoder/conv1/weight")
    emb = model.get("decoder/embeddings/weight")
    return WhisperConfig(
        n_mels=conv1.shape[1],
        n_audio_ctx=model.get("encoder/position_encodings/encodings").shape[0],
        n_audio_state=conv1.shape[0],
        n_audio_head=int(model.get("encoder/num_heads")),
        n_audio_layer=_count_layers(names, "encoder"),
        n_vocab=emb.shape[0],
        n_text_ctx=model.get("decoder/position_encodings/encodings").shape[0],
        n_text_state=emb.shape[1],
        n_text_head=int(model.get("decoder/num_heads")),
        n_text_layer=_count_layers(names, "decoder"),
    )


class _LayerNorm:
    def __init__(self, model: Ct2Model, scope: str):
        self.weight = _t(model.get(f"{scope}/gamma"))
        self.bias = _t(model.get(f"{scope}/beta"))

    def __call__(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, _LN_EPS)


class Linear:
    """y = x @ W.T + b in float32. A weight-format pass (audio/quant.py) may swap it for another callable
    with the same meaning."""

    def __init__(self, weight: Tensor, bias: Tensor | None):
        self.weight = weight
        self.bias = bias

    def __call__(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


def _Linear(model: Ct2Model, scope: str) -> Linear:
    bias = model.variables.get(f"{scope}/bias")
    return Linear(_t(model.get(f"{scope}/weight")), _t(bias) if bias is not None else None)


class _EncoderLayer:
    def __init__(self, model: Ct2Model, scope: str, heads: int):
        self.heads = heads
        self.attn_norm = _LayerNorm(model, f"{scope}/self_attention/layer_norm")
        self.qkv = _Linear(model, f"{scope}/self_attention/linear_0")
        self.out = _Linear(model, f"{scope}/self_attention/linear_1")
        self.ffn_norm = _LayerNorm(model, f"{scope}/ffn/layer_norm")
        self.fc1 = _Linear(model, f"{scope}/ffn/linear_0")
        self.fc2 = _Linear(model, f"{scope}/ffn/linear_1")

    def __call__(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        x = x + self.out(a.transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(F.gelu(self.fc1(self.ffn_norm(x))))


class Encoder:
    def __init__(self, model: Ct2Model, cfg: WhisperConfig):
        self.cfg = cfg
        self.conv1_w = _t(model.get("encoder/conv1/weight"))
        self.conv1_b = _t(model.get("encoder/conv1/bias"))
        self.conv2_w = _t(model.get("encoder/conv2/weight"))
        self.conv2_b = _t(model.get("encoder/conv2/bias"))
        self.positions = _t(model.get("encoder/position_encodings/encodings"))
        self.layers = [_EncoderLayer(model, f"encoder/layer_{i}", cfg.n_audio_head) for i in range(cfg.n_audio_layer)]
        self.norm = _LayerNorm(model, "encoder/layer_norm")

    def __call__(self, mel: Tensor) -> Tensor:
        """mel [B, n_mels, 2 * n_audio_ctx] -> audio states [B, n_audio_ctx, d]."""
        want = (self.cfg.n_mels, 2 * self.cfg.n_audio_ctx)
        if mel.dim() != 3 or tuple(mel.shape[1:]) != want:
            raise ValueError(f"encoder input must be [B, {want[0]}, {want[1]}], got {tuple(mel.shape)}")
        x = F.gelu(F.conv1d(mel, self.conv1_w, self.conv1_b, padding=1))
        x = F.gelu(F.conv1d(x, self.conv2_w, self.conv2_b, stride=2, padding=1))
        x = x.transpose(1, 2) + self.positions
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


@dataclass
class DecoderCache:
    """Keys and values for a fixed number of slots, allocated once: self-attention over the text positions,
    cross-attention over the audio states. Indexed [layer, slot, head, position, head_dim]."""

    self_k: Tensor
    self_v: Tensor
    cross_k: Tensor
    cross_v: Tensor

    @property
    def slots(self) -> int:
        return self.self_k.shape[1]

    @classmethod
    def allocate(cls, cfg: WhisperConfig, slots: int) -> DecoderCache:
        if slots < 1:
            raise ValueError(f"slots must be >= 1, got {slots}")
        hd = cfg.n_text_state // cfg.n_text_head
        text = (cfg.n_text_layer, slots, cfg.n_text_head, cfg.n_text_ctx, hd)
        audio = (cfg.n_text_layer, slots, cfg.n_text_head, cfg.n_audio_ctx, hd)
        return cls(torch.zeros(text), torch.zeros(text), torch.zeros(audio), torch.zeros(audio))


def _runs(slots: list[int], positions: list[int]) -> list[tuple[int, int, int, int]]:
    """Rows [lo, hi) of one slot at consecutive positions from `first`: (lo, hi, slot, first) per run."""
    runs: list[tuple[int, int, int, int]] = []
    for r, (slot, pos) in enumerate(zip(slots, positions)):
        if runs and runs[-1][2] == slot and runs[-1][3] + r - runs[-1][0] == pos:
            lo, _, _, first = runs[-1]
            runs[-1] = (lo, r + 1, slot, first)
        else:
            runs.append((r, r + 1, slot, pos))
    return runs


class _DecoderLayer:
    def __init__(self, model: Ct2Model, scope: str, heads: int):
        self.heads = heads
        self.self_norm = _LayerNorm(model, f"{scope}/self_attention/layer_norm")
        self.self_qkv = _Linear(model, f"{scope}/self_attention/linear_0")
        self.self_out = _Linear(model, f"{scope}/self_attention/linear_1")
        self.cross_norm = _LayerNorm(model, f"{scope}/attention/layer_norm")
        self.cross_q = _Linear(model, f"{scope}/attention/linear_0")
        self.cross_kv = _Linear(model, f"{scope}/attention/linear_1")
        self.cross_out = _Linear(model, f"{scope}/attention/linear_2")
        self.ffn_norm = _LayerNorm(model, f"{scope}/ffn/layer_norm")
        self.fc1 = _Linear(model, f"{scope}/ffn/linear_0")
        self.fc2 = _Linear(model, f"{scope}/ffn/linear_1")


class Decoder:
    def __init__(self, model: Ct2Model, cfg: WhisperConfig):
        self.cfg = cfg
        self.embeddings = _t(model.get("decoder/embeddings/weight"))
        self.positions = _t(model.get("decoder/position_encodings/encodings"))
        self.layers = [_DecoderLayer(model, f"decoder/layer_{i}", cfg.n_text_head) for i in range(cfg.n_text_layer)]
        self.norm = _LayerNorm(model, "decoder/layer_norm")
        proj = model.variables.get("decoder/projection/weight")
        # Usually an alias of the embeddings (tied): the same array, so the same float32 tensor.
        tied = proj is None or proj is model.get("decoder/embeddings/weight")
        self.projection = Linear(self.embeddings if tied else _t(proj), None)
        self.head_dim = cfg.n_text_state // cfg.n_text_head
        self.scale = 1.0 / math.sqrt(self.head_dim)

    def set_audio(self, cache: DecoderCache, slot: int, audio: Tensor) -> None:
        """Fill `slot`'s cross-attention keys/values from audio states [n_audio_ctx, d]."""
        t = audio.shape[0]
        for i, layer in enumerate(self.layers):
            k, v = layer.cross_kv(audio).view(t, 2, self.cfg.n_text_head, self.head_dim).permute(1, 2, 0, 3)
            cache.cross_k[i, slot] = k
            cache.cross_v[i, slot] = v

    def hidden(
        self, cache: DecoderCache, slots: Tensor, tokens: Tensor, positions: Tensor, live: int | None = None
    ) -> Tensor:
        """One row per (slot, token, position): writes each row's self-attention key/value at its position,
        then each row attends to its slot's positions <= its own and to its slot's audio. Attention reads
        the cache in place, one run of rows at a time (consecutive rows of one slot at consecutive positions,
        i.e. a prompt), so a row's attention never depends on the other slots' rows. Rows from `live` on only
        fill a fixed shape: they go through the matmuls but attend to nothing. Returns the final-normed states
        [M, d]."""
        m = tokens.shape[0]
        live = m if live is None else live
        h, hd = self.cfg.n_text_head, self.head_dim
        runs = _runs(slots[:live].tolist(), positions[:live].tolist())
        x = self.embeddings[tokens] + self.positions[positions]
        for i, layer in enumerate(self.layers):
            q, k, v = layer.self_qkv(layer.self_norm(x)).view(m, 3, h, hd).transpose(0, 1).unbind(0)
            cache.self_k[i, slots, :, positions] = k
            cache.self_v[i, slots, :, positions] = v
            q = q.transpose(0, 1)  # [H, M, hd]
            parts = []
            for lo, hi, slot, first in runs:
                n = first + hi - lo
                mask = None
                if hi - lo > 1:  # a prompt: causal within the run, all earlier positions visible
                    mask = torch.arange(n)[None, :] > torch.arange(first, n)[:, None]
                parts.append(
                    self._attend(q[:, lo:hi], cache.self_k[i, slot, :, :n], cache.self_v[i, slot, :, :n], mask)
                )
            a = self._join(parts, m - live)
            x = x + layer.self_out(a.transpose(0, 1).reshape(m, h * hd))
            q = layer.cross_q(layer.cross_norm(x)).view(m, h, hd).transpose(0, 1)
            parts = [
                self._attend(q[:, lo:hi], cache.cross_k[i, slot], cache.cross_v[i, slot]) for lo, hi, slot, _ in runs
            ]
            a = self._join(parts, m - live)
            x = x + layer.cross_out(a.transpose(0, 1).reshape(m, h * hd))
            x = x + layer.fc2(F.gelu(layer.fc1(layer.ffn_norm(x))))
        return self.norm(x)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
        """q [H, L, hd] against k, v [H, T, hd] read in place (no scaled copy of the keys); mask True = hidden."""
        scores = torch.matmul(q * self.scale, k.transpose(1, 2))
        if mask is not None:
            scores.masked_fill_(mask, float("-inf"))
        return torch.matmul(torch.softmax(scores, dim=-1), v)

    def _join(self, parts: list[Tensor], padding: int) -> Tensor:
        if padding:
            parts = parts + [parts[0].new_zeros(parts[0].shape[0], padding, self.head_dim)]
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]

    def logits(self, states: Tensor) -> Tensor:
        return self.projection(states)


@dataclass
class Whisper:
    cfg: WhisperConfig
    encoder: Encoder
    decoder: Decoder

    @classmethod
    def from_ct2(cls, model_bin: str | Path) -> Whisper:
        model = read_model_bin(model_bin)
        cfg = config_from_ct2(model)
        return cls(cfg, Encoder(model, cfg), Decoder(model, cfg))
