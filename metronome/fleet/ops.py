"""The dataflow program of one decode step: the ops and chip-to-chip exchanges of each layer, in order.

Counts are of the whole op before it is split over a tensor-parallel group; the LPU compiler shards them.
Each step depends on the step before it, but a step may be *streamed*: split into chunks along an axis
(attention heads, hidden columns `d`, MLP columns `f`, vocabulary `v`). Chunk j of a streamed step waits
only for chunk j of the step before it when both stream along the same axis; otherwise it waits for the
whole previous step. That is where units and links overlap: an all-reduce sends the first columns of
`o_proj` while the matrix unit computes the next ones. Steps marked `off_path` (the KV-cache write) feed no
later step of the layer and run beside the chain.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from metronome.fleet.shapes import ModelShape


class Unit(enum.Enum):
    """The functional units of one chip (ISCA 2020: MXM, VXM, SXM and MEM slices), each a resource."""

    MXM = "mxm"  # matrix unit: weight and KV-cache matmuls
    VXM = "vxm"  # vector unit: norms, softmax, activations, residuals
    SXM = "sxm"  # switch unit: shifts and permutes (the half rotation of RoPE)
    MEM = "mem"  # memory slices as an op: embedding row gather, KV-cache append


class Pattern(enum.Enum):
    ALLREDUCE = "allreduce"  # sum (or max) of a vector held in parts by every chip of the group
    ALLGATHER = "allgather"  # each chip holds 1/tp of the vector; all need all of it


@dataclass(frozen=True)
class Op:
    name: str
    unit: Unit
    weights: int = 0  # parameters read (split over the group unless replicated)
    flops: int = 0  # FLOPs per token row, excluding attention over the cache
    kv_reads: int = 0  # cache elements read per cached position (per sequence)
    kv_flops: int = 0  # FLOPs per token row per cached position
    gathered: int = 0  # elements gathered per token row (embedding lookup)
    kv_written: int = 0  # cache elements appended per token row (this token's k and v)
    replicated: bool = False  # every chip does all of it (work on the replicated hidden vector)
    axis: str | None = None  # streamed along this axis (see the module docstring); None: one piece
    off_path: bool = False  # nothing later in the layer waits for it
    # (experts, per token) where `weights` are the routed experts a row runs: a step reads those its rows
    # touch (all of them at a large batch), not `weights` once
    routed: tuple[int, int] | None = None


@dataclass(frozen=True)
class Exchange:
    name: str
    pattern: Pattern
    elems: int  # length of the vector being reduced or gathered, per token row
    axis: str | None = None  # streamed along this axis; None: one piece


@dataclass(frozen=True)
class Offload:
    """Attention core sent to a GPU (hybrid fleet): q, k, v out, attention output back."""

    name: str
    send_elems: int  # per token row
    recv_elems: int  # per token row
    kv_reads: int  # cache elements the GPU reads per cached position (per sequence)
    kv_flops: int  # FLOPs per token row per cached position


Step = Op | Exchange | Offload


def _norm(prefix: str, d: int) -> list[Step]:
    return [
        Op(f"{prefix}.sumsq", Unit.VXM, flops=2 * d, replicated=True),
        Op(f"{prefix}.scale", Unit.VXM, weights=d, flops=2 * d, replicated=True),
    ]


def _attention(shape: ModelShape, offload: bool) -> list[Step]:
    c = shape.config
    d, q, kv = c.hidden_size, c.q_size, c.kv_size
    bias = (q + 2 * kv) if c.qkv_bias else 0
    qkv_w = d * (q + 2 * kv) + bias
    heads = "heads"
    steps: list[Step] = [*_norm("attn_norm", d), Op("qkv", Unit.MXM, weights=qkv_w, flops=2 * qkv_w, axis=heads)]
    if c.qk_norm:
        steps.append(Op("qk_norm", Unit.VXM, weights=2 * c.head_dim, flops=4 * (q + kv), axis=heads))
    steps.append(Op("rope", Unit.SXM, flops=3 * (q + kv), axis=heads))
    if offload:
        steps.append(Offload("attention@gpu", send_elems=q + 2 * kv, recv_elems=q, kv_reads=2 * kv, kv_flops=4 * q))
    else:
        steps += [
            Op("kv_write", Unit.MEM, kv_written=2 * kv, axis=heads, off_path=True),
            Op("scores", Unit.MXM, kv_reads=kv, kv_flops=2 * q, axis=heads),
            Op("softmax.max", Unit.VXM, kv_flops=c.num_heads, axis=heads),
            Op("softmax.exp_sum", Unit.VXM, kv_flops=3 * c.num_heads, axis=heads),
            Op("softmax.normalize", Unit.VXM, kv_flops=c.num_heads, axis=heads),
            Op("attn_v", Unit.MXM, kv_reads=kv, kv_flops=2 * q, axis=heads),
        ]
    # o_proj by output columns: each column block needs every head, and its partial sums leave at once.
    steps += [
        Op("o_proj", Unit.MXM, weights=q * d, flops=2 * q * d, axis="d"),
        Exchange("o_proj.allreduce", Pattern.ALLREDUCE, d, axis="d"),
    ]
    if c.sandwich_norms:
        steps += _norm("post_attn_norm", d)
    steps.append(Op("attn_residual", Unit.VXM, flops=d, replicated=True, axis="d"))
    return steps


def _mlp(shape: ModelShape) -> list[Step]:
    c = shape.config
    d, f = c.hidden_size, shape.mlp_width()  # a routed expert's width (Qwen-MoE's are narrower than the config's)
    steps: list[Step] = [*_norm("mlp_norm", d)]
    if shape.is_moe:
        # Router, then top-k by k passes of (max, mask), softmax over the k winners. The static schedule
        # reserves the k selected experts' reads; each chip holds 1/tp of every expert (sharded placement).
        e, k = shape.num_experts, shape.experts_per_token
        steps.append(Op("router", Unit.MXM, weights=d * e, flops=2 * d * e, replicated=True))
        for i in range(k):
            steps += [
                Op(f"topk{i}.max", Unit.VXM, flops=e, replicated=True),
                Op(f"topk{i}.mask", Unit.VXM, flops=e, replicated=True),
            ]
        steps += [
            Op("gate_softmax.max", Unit.VXM, flops=k, replicated=True),
            Op("gate_softmax.exp_sum", Unit.VXM, flops=3 * k, replicated=True),
            Op("gate_softmax.normalize", Unit.VXM, flops=k, replicated=True),
        ]
        mult = k
    else:
        mult = 1
    # gate/up, activation and down stream along f (down accumulates its partial sums chunk by chunk); the
    # all-reduce then streams the finished sums along d into the residual.
    routed = (shape.num_experts, shape.experts_per_token) if shape.is_moe else None
    steps += [
        Op("gate_up", Unit.MXM, weights=mult * 2 * d * f, flops=mult * 4 * d * f, axis="f", routed=routed),
        Op("act", Unit.VXM, flops=mult * 4 * f, axis="f"),
        Op("down", Unit.MXM, weights=mult * f * d, flops=mult * 2 * f * d, axis="f", routed=routed),
    ]
    if shape.is_moe and shape.shared_width:
        # the shared expert every token runs (Qwen2-MoE), beside the routed ones, and its sigmoid gate
        sw = shape.shared_width
        steps += [
            Op("shared.gate_up", Unit.MXM, weights=2 * d * sw, flops=4 * d * sw, axis="f"),
            Op("shared.act", Unit.VXM, flops=4 * sw, axis="f"),
            Op("shared.down", Unit.MXM, weights=sw * d, flops=2 * sw * d, axis="f"),
            Op("shared.gate", Unit.MXM, weights=d, flops=2 * d + 4, replicated=True),
        ]
    if shape.is_moe:
        steps.append(Op("expert_combine", Unit.VXM, flops=2 * shape.experts_per_token * d, axis="d"))
    steps.append(Exchange("down.allreduce", Pattern.ALLREDUCE, d, axis="d"))
    if c.sandwich_norms:
        steps += _norm("post_mlp_norm", d)
    steps.append(Op("mlp_residual", Unit.VXM, flops=d, replicated=True, axis="d"))
    return steps


def layer_program(shape: ModelShape, offload_attention: bool = False) -> tuple[Step, ...]:
    """One transformer block. `offload_attention`: the attention core runs on a GPU (hybrid fleet)."""
    return tuple(_attention(shape, offload_attention) + _mlp(shape))


def embed_program(shape: ModelShape) -> tuple[Step, ...]:
    """Embedding row lookup; the table is split by hidden columns over the group, so the row is all-gathered."""
    d = shape.config.hidden_size
    return (Op("embed", Unit.MEM, gathered=d), Exchange("embed.allgather", Pattern.ALLGATHER, d))


def head_program(shape: ModelShape) -> tuple[Step, ...]:
    """Final norm, output projection (vocabulary split over the group) and greedy argmax."""
    c = shape.config
    v, d = c.vocab_size, c.hidden_size
    return (
        *_norm("final_norm", d),
        Op("lm_head", Unit.MXM, weights=v * d, flops=2 * v * d, axis="v"),
        Op("argmax.local", Unit.VXM, flops=v, axis="v"),
        Exchange("argmax.allreduce", Pattern.ALLREDUCE, 2),
        Op("argmax.final", Unit.VXM, flops=2, replicated=True),
    )


def dependent_ops(steps: tuple[Step, ...]) -> int:
    """On-chip ops on the dependency chain of `steps` (each pays the fixed op latency once)."""
    return sum(1 for s in steps if isinstance(s, Op) and not s.off_path)
