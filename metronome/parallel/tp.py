"""Tensor parallelism as a function applied to a built model: `shard_model(model, layout, group)`.

Megatron's split, with one change that makes the result the same on every number of ranks:

- column-parallel: q/k/v, gate/up and the head (by vocabulary) are split by output columns;
- row-parallel: o and down are split by input columns (K); each rank computes partial sums and the
  partials are added up;
- the embedding is split by vocabulary (a token's row lives on one rank; the others give zeros);
- attention heads and the KV cache are split by rank.

Determinism across degrees. Floating-point addition is not associative, so a row-parallel matmul whose K
range is cut in two and summed gives other bits than the same matmul uncut; and a matmul library may pick
another kernel (another reduction order) when a matrix has half the columns. So every split matrix is cut
into the same `shards` chunks whatever the number of ranks: each chunk is its own matmul (the same shapes
on 1, 2 or 4 ranks), a rank computes `shards / world` of them, and the row-parallel partials of all chunks
are gathered and added in chunk order, in float32, on every rank. A plan with the same `shards` gives the
same tokens and logprobs at tp=1, 2 and 4; the cost is more, smaller matmuls (docs/parallel.md).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from metronome.config import ModelConfig
from metronome.model.moe import MoE, add_experts, route
from metronome.model.transformer import MLP, Attention, KVCache, Transformer


class Collective(Protocol):
    """The one collective tensor parallelism needs (parallel/group.py implements it over torch.distributed)."""

    rank: int
    world: int
    exchange: Any | None  # the ranks' shared-memory exchange when they share a host (parallel/host.py)
    transport: str  # how the ranks exchange, in words

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's `t` (same shape on every rank), in rank order."""


class Solo:
    """The group of one process: tp=1 runs the same chunked model, with nothing to exchange."""

    rank = 0
    world = 1
    exchange = None
    transport = "none (one rank)"

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t]


class ShardingError(ValueError):
    """A tensor-parallel layout the model cannot take; `param` names the setting."""

    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class TPLayout:
    """Rank `rank` of `world`, over matrices cut in `shards` chunks (`world` divides `shards`)."""

    world: int
    rank: int
    shards: int

    def __post_init__(self) -> None:
        if self.world < 1:
            raise ShardingError(f"tp={self.world}: need at least 1 rank", "tp")
        if self.shards < 1 or self.shards % self.world:
            raise ShardingError(
                f"tp_shards={self.shards} is not a multiple of tp={self.world}: the chunks must divide evenly "
                f"among the ranks; choose tp among the divisors of {self.shards}",
                "tp",
            )
        if not 0 <= self.rank < self.world:
            raise ShardingError(f"rank={self.rank} is outside 0..{self.world - 1}", "rank")

    @property
    def per_rank(self) -> int:
        return self.shards // self.world

    @property
    def chunks(self) -> range:
        """The chunks this rank computes."""
        return range(self.rank * self.per_rank, (self.rank + 1) * self.per_rank)


def check_shards(cfg: ModelConfig, shards: int) -> None:
    """Raise ShardingError unless the model's heads and widths cut into `shards` equal chunks."""
    problems = []
    if cfg.num_heads % shards:
        problems.append(f"{cfg.num_heads} attention heads")
    if cfg.num_kv_heads % shards and shards % cfg.num_kv_heads:
        problems.append(f"{cfg.num_kv_heads} KV heads (neither a multiple nor a divisor)")
    if cfg.is_moe:  # every layer's feed-forward is the experts (and the shared expert): their widths are cut
        if cfg.moe_intermediate_size % shards:
            problems.append(f"an expert width of {cfg.moe_intermediate_size}")
        if cfg.shared_expert_size % shards:
            problems.append(f"a shared expert width of {cfg.shared_expert_size}")
    elif cfg.intermediate_size % shards:
        problems.append(f"an MLP width of {cfg.intermediate_size}")
    if cfg.qk_norm_full:
        problems.append("a QK norm over the whole projection (it needs every head's values)")
    if problems:
        raise ShardingError(f"tp_shards={shards}: this model cannot be cut in {shards}: {', '.join(problems)}", "tp")


def default_shards(cfg: ModelConfig, limit: int = 8) -> int:
    """The largest power of two up to `limit` the model cuts into: fixed per model, so every tp dividing it
    gives the same outputs."""
    best = 1
    s = 2
    while s <= limit:
        try:
            check_shards(cfg, s)
            best = s
        except ShardingError:
            pass
        s *= 2
    return best


# -- the split modules -----------------------------------------------------------------------------------


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.Linear(in_f, out_f, bias=bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    return lin.requires_grad_(False)


class ColumnChunks(nn.Module):
    """Column-parallel: `parts` (e.g. q, k, v) each cut in chunks; the output is, part after part, the
    concatenation of this rank's chunks of it. One matmul per chunk."""

    def __init__(self, parts: list[list[nn.Linear]]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(nn.ModuleList(p) for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([chunk(x) for part in self.parts for chunk in part], dim=-1)


class RowChunks(nn.Module):
    """Row-parallel: the input's last dimension holds this rank's chunks of K, side by side; each chunk's
    partial product is computed alone, every rank's partials are gathered, and all `shards` of them are
    added in chunk order in float32: the same sum on every number of ranks."""

    def __init__(self, chunks: list[nn.Linear], group: Collective) -> None:
        super().__init__()
        self.chunks = nn.ModuleList(chunks)
        self.group = group
        self.width = chunks[0].in_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        partials = torch.stack([c(x[..., i * self.width : (i + 1) * self.width]) for i, c in enumerate(self.chunks)])
        return add_in_chunk_order(self.group, partials.float()).to(x.dtype)


def add_in_chunk_order(group: Collective, partials: torch.Tensor) -> torch.Tensor:
    """Every rank's `partials` (this rank's chunks, stacked) gathered and added in chunk order, in their
    dtype: the same sum on every number of ranks."""
    total = None
    for ranks_partials in group.all_gather(partials):
        for p in ranks_partials:
            total = p.clone() if total is None else total.add_(p)
    return total


class VocabEmbedding(nn.Module):
    """The embedding split by vocabulary: a token's row comes from the rank holding it (exact: the others
    add zeros)."""

    def __init__(self, weight: torch.Tensor, layout: TPLayout, group: Collective) -> None:
        super().__init__()
        vocab = weight.shape[0]
        self.rows = -(-vocab // layout.shards)  # rows per chunk (the last one may be short)
        lo = layout.chunks.start * self.rows
        hi = min(vocab, layout.chunks.stop * self.rows)
        self.lo, self.hi = lo, hi
        self.weight = nn.Parameter(weight[lo:hi].clone(), requires_grad=False)
        self.group = group

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        mine = (tokens >= self.lo) & (tokens < self.hi)
        local = torch.where(mine, tokens - self.lo, torch.zeros_like(tokens))
        rows = self.weight[local] * mine[..., None].to(self.weight.dtype)
        total = None
        for part in self.group.all_gather(rows):
            total = part.clone() if total is None else total.add_(part)
        return total


class VocabHead(nn.Module):
    """The head split by vocabulary: each rank computes its chunks' logits; they are gathered in order."""

    def __init__(self, chunks: list[nn.Linear], vocab: int, group: Collective) -> None:
        super().__init__()
        self.columns = ColumnChunks([chunks])
        self.vocab = vocab  # the last chunk is padded with zero rows up to an equal size
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.group.all_gather(self.columns(x).contiguous()), dim=-1)[..., : self.vocab]


class ChunkedMoE(MoE):
    """The mixture-of-experts block with every expert's width cut in chunks (the shared expert's too): a
    rank holds its chunks of every expert, so every rank routes every row (the router is whole on each)
    and runs the same experts on it, each on its own K range. A chunk's partial is the block's own sum
    over the chunk: the routed experts' partial products weighted and added in expert-id order, then the
    shared expert's; the chunks' partials are gathered and added in chunk order, as `RowChunks` does. At
    tp=1 the same chunks run in one process, so every tp dividing the shards gives the same bits."""

    def __init__(self, moe: MoE, layout: TPLayout, group: Collective) -> None:
        nn.Module.__init__(self)
        self.k, self.normalize, self.dense = moe.k, moe.normalize, moe.dense
        self.router, self.shared_gate = moe.router, moe.shared_gate
        self.group = group
        self.ops = moe.experts[0].ops
        # experts[e][x]: the x-th of this rank's chunks of expert e, as (gate/up, down)
        self.experts = nn.ModuleList(_expert_chunks(e, layout) for e in moe.experts)
        self.shared = _expert_chunks(moe.shared, layout) if moe.shared is not None else None

    def _run(self, chunk: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        gate_up, down = chunk
        return down(self.ops.silu_mul(gate_up(x))).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        weights, ids = route(self.router(flat), self.k, self.normalize)
        chunks = len(self.experts[0])
        partials = torch.zeros((chunks, *flat.shape), dtype=torch.float32, device=x.device)
        for c in range(chunks):  # each chunk's partial, as MoE.forward sums the whole experts
            experts = [lambda r, chunk=e[c]: self._run(chunk, r) for e in self.experts]
            add_experts(partials[c], flat, weights, ids, experts, self.dense)
            if self.shared is not None:
                partials[c] += torch.sigmoid(self.shared_gate(flat)) * self._run(self.shared[c], flat)
        return add_in_chunk_order(self.group, partials).to(x.dtype).reshape(shape)


def _expert_chunks(expert: nn.Module, layout: TPLayout) -> nn.ModuleList:
    """This rank's chunks of one gated expert, each (gate/up, down): the chunk's gate and up rows (output
    columns) side by side as the expert stacks them, and its down columns (its K range)."""
    gate, up = expert.w_gate_up.weight.split(expert.w_gate_up.weight.shape[0] // 2)
    downs = _column_chunks(expert.w_down.weight, layout)
    return nn.ModuleList(
        nn.ModuleList([_linear(torch.cat([g, u]), None), _linear(d, None)])
        for g, u, d in zip(_row_chunks(gate, layout), _row_chunks(up, layout), downs)
    )


# -- cutting a model -------------------------------------------------------------------------------------


def _row_chunks(w: torch.Tensor, layout: TPLayout) -> list[torch.Tensor]:
    """This rank's chunks of `w`'s rows (output columns), out of `layout.shards` equal ones."""
    n = w.shape[0] // layout.shards
    return [w[j * n : (j + 1) * n] for j in layout.chunks]


def _column_chunks(w: torch.Tensor, layout: TPLayout) -> list[torch.Tensor]:
    """This rank's chunks of `w`'s columns (the K range of a row-parallel matmul)."""
    n = w.shape[1] // layout.shards
    return [w[:, j * n : (j + 1) * n].contiguous() for j in layout.chunks]


def kv_heads_of_chunk(cfg: ModelConfig, shards: int, j: int) -> range:
    """KV heads chunk j's query heads read: its own share, or (fewer KV heads than chunks) the one its
    query heads group with, copied on every chunk that needs it."""
    if cfg.num_kv_heads % shards == 0:
        per = cfg.num_kv_heads // shards
        return range(j * per, (j + 1) * per)
    head = j // (shards // cfg.num_kv_heads)
    return range(head, head + 1)


def _shard_attention(attn: Attention, cfg: ModelConfig, layout: TPLayout, group: Collective) -> None:
    Dh, H = cfg.head_dim, cfg.num_heads
    w = attn.wqkv.weight
    b = attn.wqkv.bias
    q_w, k_w, v_w = w.split([cfg.q_size, cfg.kv_size, cfg.kv_size])
    q_b, k_b, v_b = b.split([cfg.q_size, cfg.kv_size, cfg.kv_size]) if b is not None else (None, None, None)
    hq = H // layout.shards
    parts: list[list[nn.Linear]] = [[], [], []]
    for j in layout.chunks:
        q_rows = slice(j * hq * Dh, (j + 1) * hq * Dh)
        kv = kv_heads_of_chunk(cfg, layout.shards, j)
        kv_rows = slice(kv.start * Dh, kv.stop * Dh)
        parts[0].append(_linear(q_w[q_rows], q_b[q_rows] if q_b is not None else None))
        parts[1].append(_linear(k_w[kv_rows], k_b[kv_rows] if k_b is not None else None))
        parts[2].append(_linear(v_w[kv_rows], v_b[kv_rows] if v_b is not None else None))
    attn.wqkv = ColumnChunks(parts)
    attn.n_heads = hq * layout.per_rank
    attn.n_kv = len(kv_heads_of_chunk(cfg, layout.shards, 0)) * layout.per_rank
    attn.wo = RowChunks([_linear(c, None) for c in _column_chunks(attn.wo.weight, layout)], group)


def _shard_mlp(mlp: MLP, cfg: ModelConfig, layout: TPLayout, group: Collective) -> None:
    gate, up = mlp.w_gate_up.weight.split([cfg.intermediate_size, cfg.intermediate_size])
    mlp.w_gate_up = ColumnChunks(
        [[_linear(c, None) for c in _row_chunks(gate, layout)], [_linear(c, None) for c in _row_chunks(up, layout)]]
    )
    mlp.w_down = RowChunks([_linear(c, None) for c in _column_chunks(mlp.w_down.weight, layout)], group)


def shard_model(model: Transformer, layout: TPLayout, group: Collective) -> Transformer:
    """Cut a built model (dense weights) for rank `layout.rank`, in place; returns it. Its attention then
    holds this rank's heads, so its KV cache is `shard_cache_shape`'s."""
    cfg = model.cfg
    check_shards(cfg, layout.shards)
    if group.world != layout.world or group.rank != layout.rank:
        raise ShardingError(
            f"the process group is rank {group.rank} of {group.world}, the layout rank {layout.rank} of "
            f"{layout.world}: launch one process per rank (metronome.parallel.group)",
            "tp",
        )
    head_w = model.head.weight
    vocab_rows = -(-cfg.vocab_size // layout.shards)
    padded = head_w
    if vocab_rows * layout.shards != cfg.vocab_size:  # equal chunks: pad the vocabulary with zero rows
        pad = torch.zeros(vocab_rows * layout.shards - cfg.vocab_size, head_w.shape[1], dtype=head_w.dtype)
        padded = torch.cat([head_w, pad])
    head = VocabHead([_linear(c, None) for c in _row_chunks(padded, layout)], cfg.vocab_size, group)
    model.embed = VocabEmbedding(model.embed.weight.detach(), layout, group)
    model.head = head
    for block in model.layers:
        _shard_attention(block.attn, cfg, layout, group)
        if isinstance(block.mlp, MoE):
            block.mlp = ChunkedMoE(block.mlp, layout, group)
        else:
            _shard_mlp(block.mlp, cfg, layout, group)
    model.tp_layout = layout
    return model


def local_kv_heads(cfg: ModelConfig, layout: TPLayout) -> int:
    """KV heads one rank's cache holds."""
    check_shards(cfg, layout.shards)
    return len(kv_heads_of_chunk(cfg, layout.shards, 0)) * layout.per_rank


def allocate_shard_cache(
    cfg: ModelConfig, layout: TPLayout, slots: int, ctx: int, dtype: torch.dtype, device: str
) -> KVCache:
    """The KV cache of one rank: its KV heads only (the torch model's and the fused decoder's alike)."""
    return KVCache.allocate(
        dataclasses.replace(cfg, num_kv_heads=local_kv_heads(cfg, layout)), slots, ctx, dtype, device
    )
