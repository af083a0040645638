"""The network: a decoder-only transformer (Llama family, Qwen2/3, Gemma 3) in plain PyTorch.

Pure: no serving logic, no quantization or compilation flags. Those are functions applied to a built
model (`quant.py`, `plan.py`). The model reads and writes a preallocated `KVCache` and is told which
rows of the batch to attend for (`Rows`): each row's attention runs over exactly its own positions,
so a row's result never depends on what else shares the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from metronome.config import ModelConfig
from metronome.kernels.ops import Ops, TorchOps, kv_int8_row_bytes
from metronome.model.moe import Expert, MoE, Router


@dataclass
class KVCache:
    """Keys and values of every slot at every position: allocated once, written in place."""

    k: torch.Tensor  # (layers, slots, kv_heads, ctx, head_dim), or rows of kv_int8_row_bytes(head_dim) when int8
    v: torch.Tensor  # (layers, slots, kv_heads, ctx, head_dim), the same

    @classmethod
    def allocate(
        cls, cfg: ModelConfig, slots: int, ctx: int, dtype: torch.dtype, device: str | torch.device
    ) -> "KVCache":
        """dtype int8: each row head_dim int8 values and their float32 scales (kernels/ops.py, quantize_kv_int8),
        which only the fused decoder reads and writes."""
        shape = (cfg.num_layers, slots, cfg.num_kv_heads, ctx, cls.row_size(cfg, dtype))
        return cls(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))

    @staticmethod
    def row_size(cfg: ModelConfig, dtype: torch.dtype) -> int:
        """Elements of one head's row at one position: head_dim, or with int8 its values' and scales' bytes."""
        return kv_int8_row_bytes(cfg.head_dim) if dtype == torch.int8 else cfg.head_dim

    @classmethod
    def token_bytes(cls, cfg: ModelConfig, dtype: torch.dtype) -> int:
        """Bytes one position of one slot takes, keys and values of every layer (what allocate sizes by)."""
        element = torch.empty((), dtype=dtype).element_size()
        return 2 * cfg.num_layers * cfg.num_kv_heads * cls.row_size(cfg, dtype) * element

    @property
    def slots(self) -> int:
        return self.k.shape[1]

    @property
    def ctx(self) -> int:
        return self.k.shape[3]

    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def write(self, slot: int, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> None:
        """KV (layers, kv_heads, T, head_dim) computed elsewhere into positions start..start+T-1 of `slot`."""
        end = start + k.shape[2]
        self.k[:, slot, :, start:end].copy_(k)
        self.v[:, slot, :, start:end].copy_(v)

    def read(self, slot: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A copy of `slot`'s KV at positions 0..n-1 (layers, kv_heads, n, head_dim): what `write` takes."""
        return self.k[:, slot, :, :n].clone(), self.v[:, slot, :, :n].clone()


@dataclass(frozen=True)
class Rows:
    """Which batch rows attend, in which cache slot, from which first position (Python ints: no syncs).

    Row b's T queries sit at positions start..start+T-1 of slot `slot`. Rows not listed are padding
    (a fixed-shape step): their projections run, their attention output is zero, their writes land in
    their own free slot."""

    row: tuple[int, ...]
    slot: tuple[int, ...]
    start: tuple[int, ...]


@dataclass(frozen=True)
class Step:
    """Everything one forward pass shares across layers, computed once."""

    positions: torch.Tensor  # (B, T)
    rope: tuple[torch.Tensor, torch.Tensor]  # cos, sin (B, T, Dh) of the global layers
    rope_local: tuple[torch.Tensor, torch.Tensor]  # ... of the sliding-window layers
    cache: KVCache
    rows: Rows
    slot_index: torch.Tensor  # (B,) cache slot of each row
    ends: torch.Tensor  # (B,) one past each row's last position


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.ops: Ops = TorchOps()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 whatever the activation dtype (as the reference implementations do).
        return self.ops.rms_norm(x, self.weight, self.eps)


def rope_frequencies(cfg: ModelConfig, theta: float, apply_scaling: bool) -> torch.Tensor:
    """Inverse frequencies (head_dim/2,), with Llama 3 or linear scaling when configured."""
    half = cfg.head_dim // 2
    inv = 1.0 / (theta ** (torch.arange(0, half, dtype=torch.float64) * 2 / cfg.head_dim))
    s = cfg.rope_scaling
    if s is None or not apply_scaling:
        return inv.float()
    if s.kind == "linear":
        return (inv / s.factor).float()
    if s.kind == "factors":
        return (inv / torch.tensor(s.factors, dtype=torch.float64)).float()
    # llama3: long wavelengths slowed by `factor`, short ones kept, a smooth blend between.
    low_wavelen = s.original_max_position / s.low_freq_factor
    high_wavelen = s.original_max_position / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv / s.factor + smooth * inv
    out = torch.where(wavelen > low_wavelen, inv / s.factor, inv)
    out = torch.where((wavelen >= high_wavelen) & (wavelen <= low_wavelen), blended, out)
    return out.float()


class Rope(nn.Module):
    """cos/sin tables for positions 0..ctx-1, rotate-half layout."""

    def __init__(self, cfg: ModelConfig, theta: float, ctx: int, apply_scaling: bool = True) -> None:
        super().__init__()
        inv = rope_frequencies(cfg, theta, apply_scaling)
        angles = torch.outer(torch.arange(ctx, dtype=torch.float32), inv)  # (ctx, head_dim/2)
        angles = torch.cat([angles, angles], dim=-1)  # (ctx, head_dim)
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def table(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin (float32) for `positions` (B, T): each (B, T, Dh). Once per step."""
        return self.cos[positions], self.sin[positions]


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.wqkv = nn.Linear(cfg.hidden_size, cfg.q_size + 2 * cfg.kv_size, bias=cfg.qkv_bias)  # q, k, v stacked
        self.wo = nn.Linear(cfg.q_size, cfg.hidden_size, bias=False)
        # OLMoE normalizes the whole Q and K projections; Qwen3 and Gemma each head.
        self.qk_norm_full = cfg.qk_norm_full
        self.q_norm = (
            RMSNorm(cfg.q_size if cfg.qk_norm_full else cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        )
        self.k_norm = (
            RMSNorm(cfg.kv_size if cfg.qk_norm_full else cfg.head_dim, cfg.rms_norm_eps) if cfg.qk_norm else None
        )
        self.window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.ops: Ops = TorchOps()

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        B, T, _ = x.shape
        H, Hkv, Dh = self.n_heads, self.n_kv, self.head_dim
        q, k, v = self.wqkv(x).view(B, T, H + 2 * Hkv, Dh).split([H, Hkv, Hkv], dim=2)  # (B, T, h, Dh) each
        if self.q_norm is not None and self.qk_norm_full:
            q = self.q_norm(q.reshape(B, T, H * Dh)).view(B, T, H, Dh)
            k = self.k_norm(k.reshape(B, T, Hkv * Dh)).view(B, T, Hkv, Dh)
        elif self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = step.rope_local if self.window is not None else step.rope
        q, k = self.ops.rope(q, cos, sin), self.ops.rope(k, cos, sin)
        ck, cv = step.cache.k[self.layer], step.cache.v[self.layer]  # (S, Hkv, ctx, Dh)
        if ck.dtype == torch.int8:  # compile.stages.kv_cache_dtype lets only the fused decoder have one
            raise ValueError("an int8 KV cache is read and written by the fused C++ decoder only")
        # Write this step's keys/values in place: row b -> (slot_index[b], positions[b, t]).
        ck[step.slot_index[:, None], :, step.positions] = k.to(ck.dtype)
        cv[step.slot_index[:, None], :, step.positions] = v.to(cv.dtype)
        if T == 1:  # decode: every row over its own span; idle rows of a fixed shape are computed and ignored
            out = self.ops.decode_attention(q[:, 0], ck, cv, step.slot_index, step.ends, self.window or 0, self.scale)
            return self.wo(out.reshape(B, 1, H * Dh))
        rows = step.rows
        q = q.transpose(1, 2)  # (B, H, T, Dh)
        out = torch.zeros_like(q) if len(rows.row) < B else torch.empty_like(q)
        for b, slot, start in zip(rows.row, rows.slot, rows.start):
            end = start + T
            first = 0 if self.window is None else max(0, end - T - self.window + 1)
            keys = ck[slot : slot + 1, :, first:end]  # (1, Hkv, L, Dh)
            values = cv[slot : slot + 1, :, first:end]
            # prefill: causal (and windowed) inside the new block
            qpos = torch.arange(start, end, device=x.device)[:, None]
            kpos = torch.arange(first, end, device=x.device)[None, :]
            mask = kpos <= qpos
            if self.window is not None:
                mask &= kpos > qpos - self.window
            out[b : b + 1] = F.scaled_dot_product_attention(
                q[b : b + 1], keys.to(q.dtype), values.to(q.dtype), attn_mask=mask, scale=self.scale, enable_gqa=True
            )
        return self.wo(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w_gate_up = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # gate, up stacked
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gelu = cfg.activation == "gelu_tanh"
        self.ops: Ops = TorchOps()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.w_gate_up(x)
        return self.w_down(self.ops.gelu_tanh_mul(gate_up) if self.gelu else self.ops.silu_mul(gate_up))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe else MLP(cfg)
        self.post_attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.sandwich_norms else None
        self.post_mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps) if cfg.sandwich_norms else None

    def forward(self, x: torch.Tensor, step: Step) -> torch.Tensor:
        h = self.attn(self.attn_norm(x), step)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, ctx: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.head.weight = self.embed.weight
        self.rope = Rope(cfg, cfg.rope_theta, ctx)
        # Gemma's local layers use their own base and no scaling.
        self.rope_local = Rope(cfg, cfg.rope_local_theta, ctx, apply_scaling=False) if cfg.rope_local_theta else None

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        rows: Rows,
        slot_index: torch.Tensor,
        all_logits: bool = False,
        hidden: bool = False,
    ) -> torch.Tensor:
        """tokens, positions: (B, T); slot_index: (B,) cache slot of each row.
        Returns logits (B, V) of each row's last position, or (B, T, V) with all_logits, or with hidden
        the last layer's output (B, T, D), which `logits` turns into logits a few rows at a time."""
        x = self.embed(tokens)  # (B, T, D)
        if self.cfg.embed_scale != 1.0:
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        rope = self.rope.table(positions)
        rope_local = self.rope_local.table(positions) if self.rope_local is not None else rope
        step = Step(positions, rope, rope_local, cache, rows, slot_index, positions[:, -1] + 1)
        for layer in self.layers:
            x = layer(x, step)
        if hidden:
            return x
        return self.logits(x if all_logits else x[:, -1])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output (..., D) -> float32 logits (..., V): the final norm, the head, the softcap."""
        logits = self.head(self.norm(x)).float()
        if self.cfg.final_logit_softcap:
            logits = torch.tanh(logits / self.cfg.final_logit_softcap) * self.cfg.final_logit_softcap
        return logits


def use_ops(model: Transformer, ops: Ops) -> Transformer:
    """Run `model`'s norms, RoPE, attention and activations with `ops` (e.g. compiled kernels)."""
    for m in model.modules():
        if isinstance(m, (RMSNorm, Attention, MLP, Expert)):
            m.ops = ops
    return model


def build_model(
    cfg: ModelConfig, weights: dict[str, torch.Tensor], ctx: int, dtype: torch.dtype, device: str | torch.device = "cpu"
) -> Transformer:
    """A model with `weights` (metronome names, float tensors) copied in, in `dtype` on `device`."""
    with torch.device("meta"):
        model = Transformer(cfg, ctx)
    model = model.to_empty(device=device)
    params = dict(model.named_parameters())
    for name, p in params.items():
        if name == "head.weight" and cfg.tie_embeddings:
            continue
        src = torch.cat([weights[n].to(torch.float32) for n in weight_sources(name)])
        with torch.no_grad():
            p.copy_(src.reshape(p.shape))
    # norm weights stay float32 (tiny; exact Gemma scales), and so do MoE routers (they pick the experts):
    # kept before `to(dtype)`, which would round them to `dtype` first
    exact = {m: m.weight.data.clone() for m in model.modules() if isinstance(m, (RMSNorm, Router))}
    model = model.to(dtype)
    # RoPE tables stay float32 (rounded once, where they are applied).
    model.rope = Rope(cfg, cfg.rope_theta, ctx).to(device)
    if cfg.rope_local_theta:
        model.rope_local = Rope(cfg, cfg.rope_local_theta, ctx, apply_scaling=False).to(device)
    if cfg.tie_embeddings:
        model.head.weight = model.embed.weight
    for module, weight in exact.items():
        module.weight.data = weight
    return model.eval().requires_grad_(False)


# Fused projections: one matmul reads the rows of several file tensors, stacked.
FUSED = {"wqkv": ("wq", "wk", "wv"), "w_gate_up": ("w_gate", "w_up")}


def weight_sources(param: str) -> list[str]:
    """Module parameter -> the loader's weight names it is stacked from
    ("layers.0.attn.wqkv.weight" -> ["layers.0.wq.weight", "layers.0.wk.weight", "layers.0.wv.weight"])."""
    name = param.replace(".attn.", ".").replace(".mlp.", ".")  # MoE: "layers.0.mlp.experts.3.w_down" too
    for fused, parts in FUSED.items():
        if f".{fused}." in name:
            return [name.replace(f".{fused}.", f".{part}.") for part in parts]
    return [name]
