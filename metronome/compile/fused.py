"""The fused CPU runner: every layer of a step in one call to the C++ `Decoder` (kernels/csrc), weights
in block formats (quant.block_matrix: the file's own blocks in place, packed Q4, Q8_0), activations in float32.

It works on token rows: row r is one token of slot slots[r] at position positions[r]. A decode step is one
row per live slot, a prompt is its tokens as rows of one slot, a drafted continuation being verified is
several rows of one slot. Every row's result is independent of the others (the kernels are row-independent),
so all three give bitwise the same values for the same token, and a step runs exactly the live rows.
"""

from __future__ import annotations

import numpy as np
import torch

from metronome.compile.moe import MoeCut, fused_moe_layer
from metronome.compile.quant import block_matrix, cacheable, dense, file_view
from metronome.config import ModelConfig
from metronome.kernels.decoder import BlockPart
from metronome.kernels.ops import GGUF_ROW_TYPES, CppOps, LayerWeights
from metronome.model.loader import QuantTensor, Weight
from metronome.model.moe import active_weight_bytes
from metronome.model.transformer import FUSED, KVCache, Rope

PREFILL_CHUNK = 256  # token rows per call of the fused decoder


class FusedRunner:
    """The model compiled for the CPU's fused decoder (see the module docstring); a `Runner`."""

    def __init__(
        self,
        cfg: ModelConfig,
        weights: dict[str, Weight],
        cache: KVCache,
        mode: str,
        ops: CppOps,
        packed: list[list] | None = None,
        row_chunks: dict[str, list[Weight]] | None = None,
        moe_cut: MoeCut | None = None,
    ) -> None:
        """`packed`: the block matrices of an earlier build of the same model and mode (the plan cache).
        `row_chunks`: matrices given as K-range chunks, each its own matmul (tensor parallel's row-parallel
        o and down: parallel/fused_tp.py), by weight name; `moe_cut`: the MoE blocks as chunks of every
        expert's width, in the same way."""
        self.cfg, self.ops, self.cache = cfg, ops, cache
        self.matrices: list[list] = []  # every block matrix in build order, as the plan cache keeps it
        self.segments: list[list[BlockPart]] = []  # the same matrices as the decoder reads them (fleet/calibrate.py)
        attn_scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.decoder = ops.decoder(
            hidden=cfg.hidden_size,
            heads=cfg.num_heads,
            kv_heads=cfg.num_kv_heads,
            head_dim=cfg.head_dim,
            intermediate=cfg.intermediate_size,
            eps=cfg.rms_norm_eps,
            scale=attn_scale,
            gelu=cfg.activation == "gelu_tanh",
            k_cache=cache.k,
            v_cache=cache.v,
        )
        self.weight_bytes = 0

        chunked = row_chunks or {}

        def matrix(*names: str) -> list[BlockPart]:
            return matrix_of([weights[n] for n in names])

        def matrix_of(parts: list[Weight]) -> list[BlockPart]:
            cached = packed[len(self.matrices)] if packed is not None else None
            segments = block_matrix(parts, mode, ops, cached)
            self.weight_bytes += sum(blocks.nbytes for blocks, _kind, _rows in segments)
            self.matrices.append(cacheable(segments))
            self.segments.append(segments)
            return segments

        def vector(name: str) -> torch.Tensor | None:
            if name not in weights:
                return None
            return dense(weights[name]).contiguous()  # the decoder holds a reference to what it is given

        expert_bytes = 0
        self.moe_layers: list = []  # the C++ MoeLayer of each MoE layer (their timings: bench/moe.py)
        for i in range(cfg.num_layers):
            p = f"layers.{i}."
            qkv = matrix(*(p + f"{n}.weight" for n in FUSED["wqkv"]))
            bias = torch.cat([dense(weights[p + f"{n}.bias"]) for n in FUSED["wqkv"]]) if cfg.qkv_bias else None
            if bias is not None:
                self.weight_bytes += bias.nbytes
            window = cfg.sliding_window if cfg.is_sliding(i) else None
            o_chunks = [matrix_of([w]) for w in chunked.get(p + "wo.weight", [])]
            o = [] if o_chunks else matrix(p + "wo.weight")  # build order (qkv, o, gate_up, down): the plan cache's
            moe, moe_chunks = None, []
            if cfg.is_moe and moe_cut is not None:  # one block per chunk, each giving a partial sum
                for c, w in enumerate(moe_cut.layers[i]):
                    block, experts, floats = fused_moe_layer(
                        ops, moe_cut.cfg, w, i, lambda *names, w=w: matrix_of([w[n] for n in names])
                    )
                    moe_chunks.append(block)
                    expert_bytes += experts
                    if c == 0:  # the router (and shared gate) a step reads once for all chunks (forward_chunks)
                        self.weight_bytes += floats
                self.moe_layers.extend(moe_chunks)
                gate_up, down, down_chunks = [], [], []
            elif cfg.is_moe:  # experts in place of the MLP (compile/moe.py)
                moe, experts, floats = fused_moe_layer(ops, cfg, weights, i, matrix)
                self.moe_layers.append(moe)
                expert_bytes += experts
                self.weight_bytes += floats
                gate_up, down, down_chunks = [], [], []
            else:
                gate_up = matrix(*(p + f"{n}.weight" for n in FUSED["w_gate_up"]))
                down_chunks = [matrix_of([w]) for w in chunked.get(p + "w_down.weight", [])]
                down = [] if down_chunks else matrix(p + "w_down.weight")
            layer = LayerWeights(
                qkv=qkv,
                qkv_bias=bias,
                o=o,
                gate_up=gate_up,
                down=down,
                attn_norm=vector(p + "attn_norm.weight"),
                mlp_norm=vector(p + "mlp_norm.weight"),
                post_attn_norm=vector(p + "post_attn_norm.weight"),
                post_mlp_norm=vector(p + "post_mlp_norm.weight"),
                q_norm=vector(p + "q_norm.weight"),
                k_norm=vector(p + "k_norm.weight"),
                window=window or 0,
                local_rope=window is not None and cfg.rope_local_theta is not None,
                moe=moe,
                o_chunks=o_chunks,
                down_chunks=down_chunks,
                moe_chunks=moe_chunks,
            )
            self.decoder.add_layer(**layer.kwargs())
        self.norm = vector("norm.weight")
        head = "head.weight" if "head.weight" in weights else "embed.weight"  # tied
        # the head matrix packed (tensor parallel: this rank's vocabulary); `head` is the method that applies it
        [(self.head_blocks, self.head_kind, self.head_rows)] = matrix(head)
        self.embed = weights["embed.weight"]
        # the file's rows, dequantized in C++ as tokens need them: one call a step (a dozen numpy calls on
        # caches the step just flushed cost a visible share of a small model's decode step, docs/moe.md)
        self._embed_table = None
        if isinstance(self.embed, QuantTensor) and self.embed.qtype in GGUF_ROW_TYPES:
            self._embed_table = file_view(self.embed.raw, cfg.vocab_size)
        elif not isinstance(self.embed, QuantTensor):
            self.embed = self.embed.float()
        # a token reads only its active experts' blocks (model/moe.py: the one accounting of that)
        self.weight_bytes = active_weight_bytes(self.weight_bytes, expert_bytes, cfg) + self._embed_row_bytes()
        self.rope = Rope(cfg, cfg.rope_theta, cache.ctx)
        self.rope_local = (
            Rope(cfg, cfg.rope_local_theta, cache.ctx, apply_scaling=False) if cfg.rope_local_theta else self.rope
        )

    def _embed_row_bytes(self) -> int:
        e = self.embed
        if isinstance(e, QuantTensor):
            return int(np.asarray(e.raw).nbytes // self.cfg.vocab_size)
        return e[0].nbytes

    def _embed_rows(self, tokens: torch.Tensor) -> torch.Tensor:
        """(M,) token ids -> (M, D) float32 embeddings, dequantized exactly from the file's rows."""
        if self._embed_table is not None:
            x = self.ops.gguf_rows(self._embed_table, tokens, self.embed.qtype)
        elif isinstance(self.embed, QuantTensor):
            rows = np.asarray(self.embed.raw)[tokens.numpy()]
            x = QuantTensor(rows, self.embed.qtype, (len(tokens), self.cfg.hidden_size)).dequantize()
        else:
            x = self.embed[tokens]
        if self.cfg.embed_scale != 1.0:
            x = x * self.cfg.embed_scale
        return x.contiguous()

    def hidden(self, tokens: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """tokens, slots, positions (M,) int64 -> the last layer's output (M, D) float32; writes the cache.
        Many rows (a prompt) run in chunks of PREFILL_CHUNK: bounded scratch, and the same bits (rows are
        independent; a later chunk attends to the earlier ones through the cache)."""
        x = self._embed_rows(tokens)  # (M, D)
        for lo in range(0, len(tokens), PREFILL_CHUNK):
            rows = slice(lo, lo + PREFILL_CHUNK)
            pos = positions[rows]
            cos, sin = self.rope.cos[pos], self.rope.sin[pos]  # (m, Dh) each
            cos_l, sin_l = (
                (self.rope_local.cos[pos], self.rope_local.sin[pos]) if self.rope_local is not self.rope else (cos, sin)
            )
            self.decoder.forward(x[rows], slots[rows], pos, cos, sin, cos_l, sin_l)  # row slices: contiguous views
        return x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(M, D) hidden rows -> (M, V) float32 logits."""
        h = self.ops.rms_norm(x, self.norm, self.cfg.rms_norm_eps)
        logits = self.ops.block_linear(h, self.head_blocks, self.head_kind, self.head_rows)
        if self.cfg.final_logit_softcap:
            logits = torch.tanh(logits / self.cfg.final_logit_softcap) * self.cfg.final_logit_softcap
        return logits

    # -- the Runner interface (runner.py) --------------------------------------------------------

    any_rows = True  # rows are independent by construction: drafts and prompt tokens are rows like any other
    decode_mode = "compact"  # live rows only; the plan's probe confirms it on the real weights

    def prefill(self, ids: list[int], slot: int, all_logits: bool = False) -> torch.Tensor:
        x = self.prefill_hidden(ids, slot)
        return self.logits(x) if all_logits else self.logits(x[-1:])[0]

    def prefill_hidden(self, ids: list[int], slot: int) -> torch.Tensor:
        T = len(ids)
        return self.hidden(torch.tensor(ids), torch.full((T,), slot), torch.arange(T))

    def head(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x)

    def install_kv(self, slot: int, k: torch.Tensor, v: torch.Tensor, start: int = 0) -> None:
        """A prompt's KV computed by another process (the prefill worker) into `slot` from `start`: its rows
        have the bits this decoder would give them."""
        self.cache.write(slot, k, v, start)

    def read_kv(self, slot: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cache.read(slot, n)

    def close(self) -> None:  # nothing beside this process
        pass

    def decode(
        self, slots: list[int], tokens: list[int], positions: list[int], logit_rows: list[int] | None = None
    ) -> torch.Tensor:
        x = self.hidden(torch.tensor(tokens), torch.tensor(slots), torch.tensor(positions))
        if logit_rows is not None and len(logit_rows) != len(slots):
            x = x[logit_rows]  # the head is the largest matrix: run it only on the rows that sample
        return self.logits(x)
