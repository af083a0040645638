"""Tensor parallelism on the fused CPU decoder: each rank's `FusedRunner` holds its cut of the file's
blocks, cut the same way as parallel/tp.py cuts a torch model.

The fused kernels compute every output feature with its own fixed-order dot product, so a column-
parallel matrix (q/k/v, gate/up, the head) needs no chunking to give the same bits on any number of
ranks: a rank simply holds the rows of its heads, of its MLP width, of its vocabulary. Only the
row-parallel matrices (o, down) change the sums: each is cut in `shards` K ranges, each range its own
matmul (`Decoder.add_layer(o_chunks=..., down_chunks=...)`), and the partial sums of all ranges are
gathered and added in range order by the decoder's reduce hook, on every rank. With one rank the
decoder adds its ranges itself, in the same order. A mixture-of-experts block is cut the same way as
parallel/tp.py's `ChunkedMoE`: every expert's width (and the shared expert's) in `shards` ranges, each
range a block of its own that routes every row with the whole router and gives one partial sum
(`Decoder.add_layer(moe_chunks=...)`), added in range order like down's.

The file's blocks are cut, not requantized: a K range must start on a block boundary (32 weights, 256
for the K-quants). The embedding stays whole on every rank (a view of the mapped file: it costs no memory).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import gguf
import numpy as np
import torch

from metronome.compile.fused import FusedRunner
from metronome.compile.moe import MoeCut
from metronome.compile.quant import dense
from metronome.config import ModelConfig
from metronome.kernels.ops import Q8_0_BLOCK, CppOps
from metronome.model.loader import QuantTensor, Weight
from metronome.model.transformer import KVCache
from metronome.parallel.tp import Collective, ShardingError, TPLayout, check_shards, kv_heads_of_chunk


def _rows(w: Weight, lo: int, hi: int) -> Weight:
    if isinstance(w, QuantTensor):
        return QuantTensor(w.raw[lo:hi], w.qtype, (hi - lo, *w.shape[1:]))
    return w[lo:hi]


def _stack(parts: list[Weight]) -> Weight:
    if len(parts) == 1:
        return parts[0]
    if all(isinstance(p, QuantTensor) for p in parts):
        stacked = QuantTensor.stack(parts)
        if stacked is not None:
            return stacked
    return torch.cat([dense(p) for p in parts])


def _columns(w: Weight, lo: int, hi: int, name: str) -> Weight:
    """Columns lo..hi of a matrix: whole blocks of the file's format (ShardingError if a block would split)."""
    dense = not isinstance(w, QuantTensor) or w.qtype in ("F32", "F16", "BF16")
    block, nbytes = (Q8_0_BLOCK, 0) if dense else gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[w.qtype]]
    if lo % block or hi % block:  # dense weights are quantized here, to Q8_0 blocks of 32
        # what the user can do: a chunk count that cuts on blocks (it must also be a multiple of --tp), or the
        # torch path. "Choose fewer tp_shards" could not be followed where --tp already equalled them
        blocks = w.shape[1] // block
        raise ShardingError(
            f"{name} is held in blocks of {block} weights ({blocks} a row), and its {hi - lo}-column chunks do "
            f"not start on a block: the fused decoder cuts it into a number of chunks (--tp-shards, a multiple "
            f"of --tp) that divides {blocks}; otherwise run the torch path, which cuts dense weights "
            "(--weights f32 or bf16)",
            "tp_shards",
        )
    if not isinstance(w, QuantTensor):
        return w[:, lo:hi].contiguous()
    if dense:
        return QuantTensor(np.ascontiguousarray(w.raw[:, lo:hi]), w.qtype, (w.shape[0], hi - lo))
    blocks = w.raw.reshape(w.shape[0], -1, nbytes)[:, lo // block : hi // block]
    return QuantTensor(np.ascontiguousarray(blocks).reshape(w.shape[0], -1), w.qtype, (w.shape[0], hi - lo))


@dataclass(frozen=True)
class RankWeights:
    """One rank's cut of the model: its config (heads, KV heads, MLP width of the rank), its weights (column-
    parallel rows cut out; `head.weight` is its vocabulary rows), the row-parallel chunks by name, and its
    MoE blocks' chunks (None for a dense model)."""

    cfg: ModelConfig
    weights: dict[str, Weight]
    row_chunks: dict[str, list[Weight]]
    moe_cut: MoeCut | None


def rank_weights(cfg: ModelConfig, weights: dict[str, Weight], layout: TPLayout) -> RankWeights:
    """This rank's cut of the file's blocks (ShardingError where a K range would split a block)."""
    check_shards(cfg, layout.shards)
    S, Dh = layout.shards, cfg.head_dim
    hq, F = cfg.num_heads // S, cfg.intermediate_size // S
    out = dict(weights)
    chunks: dict[str, list[Weight]] = {}
    moe: dict[int, list[dict[str, Weight]]] = {}
    local = layout.chunks
    for i in range(cfg.num_layers):
        p = f"layers.{i}."
        for kind in ("weight", "bias"):
            if p + f"wq.{kind}" not in weights:
                continue
            out[p + f"wq.{kind}"] = _rows(weights[p + f"wq.{kind}"], local.start * hq * Dh, local.stop * hq * Dh)
            for name in ("wk", "wv"):
                w = weights[p + f"{name}.{kind}"]
                heads = [h for j in local for h in kv_heads_of_chunk(cfg, S, j)]
                out[p + f"{name}.{kind}"] = _stack([_rows(w, h * Dh, (h + 1) * Dh) for h in heads])
        q = cfg.q_size // S
        chunks[p + "wo.weight"] = [_columns(weights[p + "wo.weight"], j * q, (j + 1) * q, p + "wo") for j in local]
        del out[p + "wo.weight"]
        if cfg.is_moe:
            # the router and shared gate as float32 once: the same tensors in every chunk (which route once)
            whole = {
                p + n: dense(weights[p + n]).contiguous()
                for n in ("router.weight", "shared_gate.weight")
                if p + n in weights
            }
            moe[i] = [_moe_chunk(cfg, weights, out, p, S, j) | whole for j in local]
            continue
        for name in ("w_gate", "w_up"):
            out[p + f"{name}.weight"] = _rows(weights[p + f"{name}.weight"], local.start * F, local.stop * F)
        chunks[p + "w_down.weight"] = [
            _columns(weights[p + "w_down.weight"], j * F, (j + 1) * F, p + "w_down") for j in local
        ]
        del out[p + "w_down.weight"]
    vocab_rows = -(-cfg.vocab_size // S)
    first, last = min(cfg.vocab_size, local.start * vocab_rows), min(cfg.vocab_size, local.stop * vocab_rows)
    out["head.weight"] = _rows(weights.get("head.weight", weights["embed.weight"]), first, last)
    local_cfg = dataclasses.replace(
        cfg,
        num_heads=hq * layout.per_rank,
        num_kv_heads=len(kv_heads_of_chunk(cfg, S, 0)) * layout.per_rank,
        intermediate_size=cfg.intermediate_size if cfg.is_moe else F * layout.per_rank,  # MoE: no dense MLP
    )
    cut = None
    if cfg.is_moe:
        chunk_cfg = dataclasses.replace(
            local_cfg,
            moe_intermediate_size=cfg.moe_intermediate_size // S,
            shared_expert_size=cfg.shared_expert_size // S,
        )
        cut = MoeCut(chunk_cfg, moe)
    return RankWeights(local_cfg, out, chunks, cut)


def _moe_chunk(
    cfg: ModelConfig, weights: dict[str, Weight], out: dict[str, Weight], p: str, shards: int, j: int
) -> dict[str, Weight]:
    """Chunk j of layer `p`'s MoE block: every expert's gate and up rows and down columns of width range j
    (the shared expert's likewise). The whole experts leave `out`."""
    chunk: dict[str, Weight] = {}
    experts = [f"{p}experts.{e}." for e in range(cfg.num_experts)]
    for q, width in [(q, cfg.moe_intermediate_size) for q in experts] + [(f"{p}shared.", cfg.shared_expert_size)]:
        if not width:
            continue
        n = width // shards
        for name in ("w_gate", "w_up"):
            chunk[q + f"{name}.weight"] = _rows(weights[q + f"{name}.weight"], j * n, (j + 1) * n)
            out.pop(q + f"{name}.weight", None)
        chunk[q + "w_down.weight"] = _columns(weights[q + "w_down.weight"], j * n, (j + 1) * n, q + "w_down")
        out.pop(q + "w_down.weight", None)
    return chunk


class TPFusedRunner(FusedRunner):
    """One rank's fused runner: its cut of the model, the row-parallel sums gathered from every rank, and
    the logits of every rank's vocabulary gathered in order."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, Weight],
        cache: KVCache,
        mode: str,
        ops: CppOps,
        layout: TPLayout,
        group: Collective,
    ) -> None:
        cut = rank_weights(cfg, weights, layout)
        super().__init__(cut.cfg, cut.weights, cache, mode, ops, row_chunks=cut.row_chunks, moe_cut=cut.moe_cut)
        self.rank = layout.rank
        self.full_vocab = cfg.vocab_size
        self.vocab_rows = -(-cfg.vocab_size // layout.shards) * layout.per_rank  # every rank's width, padded
        self.group = group
        if group.world > 1:
            self.decoder.set_reduce(self._reduce)  # partials larger than the host exchange's slots, or other hosts
            self.decoder.set_exchange(group.exchange)

    def _reduce(self, partials: torch.Tensor, out: torch.Tensor) -> None:
        """out = every rank's partial sums added in chunk order (rank order, then each rank's chunks)."""
        total = None
        for rank_partials in self.group.all_gather(partials):
            for p in rank_partials:
                total = p.clone() if total is None else total.add_(p)
        out.copy_(total)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        mine = super().logits(x)
        if self.group.world == 1:
            return mine
        padded = torch.zeros(mine.shape[0], self.vocab_rows, dtype=mine.dtype)
        padded[:, : mine.shape[1]] = mine  # the last rank's vocabulary may be short
        return torch.cat(self.group.all_gather(padded), dim=-1)[:, : self.full_vocab]
