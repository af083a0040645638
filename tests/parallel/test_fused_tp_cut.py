"""How parallel/fused_tp.py cuts a file's blocks for one rank, checked on tiny matrices whose every block is
distinct (no ranks started, no decoder built): which rows and K ranges each rank holds, and how its runner
adds the row-parallel sums and gathers the vocabulary."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from metronome.compile.fused import FusedRunner
from metronome.config import ModelConfig
from metronome.model.loader import QuantTensor
from metronome.parallel.fused_tp import TPFusedRunner, _columns, _rows, rank_weights
from metronome.parallel.tp import ShardingError, TPLayout

Q8_ROW = 34  # bytes of one Q8_0 block


def q8(rows: int, cols: int, salt: int) -> QuantTensor:
    """A Q8_0 matrix whose bytes tell its row and block apart (never dequantized here)."""
    r, b = np.meshgrid(np.arange(rows), np.arange(cols // 32 * Q8_ROW), indexing="ij")
    return QuantTensor(((r * 7 + b // Q8_ROW * 31 + salt) % 251).astype(np.uint8), "Q8_0", (rows, cols))


def blocks_of(w: QuantTensor, first: int, last: int) -> np.ndarray:
    return w.raw[:, first * Q8_ROW : last * Q8_ROW]


# 4 heads of 32, 2 KV heads, MLP width 128, a vocabulary of 10 that 4 chunks do not divide
DENSE = ModelConfig(
    arch="llama", vocab_size=10, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4,
    num_kv_heads=2, head_dim=32, max_position=64,
)  # fmt: skip


def dense_weights() -> dict:
    p = "layers.0."
    return {
        "embed.weight": torch.zeros(10, 64),
        "head.weight": QuantTensor(np.arange(640, dtype=np.float32).reshape(10, 64), "F32", (10, 64)),
        p + "wq.weight": q8(128, 64, 1),
        p + "wk.weight": q8(64, 64, 2),
        p + "wv.weight": q8(64, 64, 3),
        p + "wo.weight": q8(64, 128, 4),
        p + "w_gate.weight": q8(128, 64, 5),
        p + "w_up.weight": q8(128, 64, 6),
        p + "w_down.weight": q8(64, 128, 7),
    }


def test_the_second_rank_of_two_holds_the_rows_and_k_ranges_of_its_own_chunks() -> None:
    weights, p = dense_weights(), "layers.0."
    cut = rank_weights(DENSE, weights, TPLayout(2, 1, 4))  # chunks 2 and 3 of 4
    out = cut.weights
    assert out[p + "wq.weight"].shape == (64, 64)
    assert np.array_equal(out[p + "wq.weight"].raw, weights[p + "wq.weight"].raw[64:128])  # heads 2 and 3
    # 2 KV heads for 4 chunks: chunks 2 and 3 both read KV head 1, copied for each
    for name in ("wk", "wv"):
        kv = weights[p + f"{name}.weight"].raw[32:64]
        assert out[p + f"{name}.weight"].shape == (64, 64)
        assert np.array_equal(out[p + f"{name}.weight"].raw, np.concatenate([kv, kv]))
    for name in ("w_gate", "w_up"):
        assert np.array_equal(out[p + f"{name}.weight"].raw, weights[p + f"{name}.weight"].raw[64:128])
    for name in ("wo", "w_down"):  # K ranges of 32 columns: one Q8_0 block each, chunk 2 then chunk 3
        chunks = cut.row_chunks[p + f"{name}.weight"]
        assert [c.shape for c in chunks] == [(64, 32), (64, 32)] and p + f"{name}.weight" not in out
        assert np.array_equal(chunks[0].raw, blocks_of(weights[p + f"{name}.weight"], 2, 3))
        assert np.array_equal(chunks[1].raw, blocks_of(weights[p + f"{name}.weight"], 3, 4))
    # the file's own head (not the embedding), vocabulary chunks of ceil(10 / 4) = 3 rows: 6..9, the last short
    head = out["head.weight"]
    assert head.shape == (4, 64) and np.array_equal(head.raw, weights["head.weight"].raw[6:10])
    assert (cut.cfg.num_heads, cut.cfg.num_kv_heads, cut.cfg.intermediate_size) == (2, 2, 64)
    assert cut.moe_cut is None


def test_a_rank_past_the_end_of_a_small_vocabulary_holds_no_head_rows() -> None:
    """5 tokens in chunks of ceil(5 / 4) = 2: the last chunk starts at row 6, past the end. Its head was cut
    as rows 6..5, a matrix of -1 rows."""
    cut = rank_weights(dataclasses.replace(DENSE, vocab_size=5), dense_weights(), TPLayout(4, 3, 4))
    head = cut.weights["head.weight"]
    assert head.shape == (0, 64) and head.raw.shape[0] == 0


def test_a_cut_that_starts_or_ends_inside_a_block_is_refused() -> None:
    down = q8(4, 128, 0)
    for lo, hi in ((0, 48), (16, 64), (16, 48)):
        with pytest.raises(ShardingError, match="blocks of 32 weights"):
            _columns(down, lo, hi, "layers.0.w_down")


def test_dense_matrices_are_cut_by_columns_as_stored() -> None:
    values = np.arange(4 * 64, dtype=np.float16).reshape(4, 64)
    half = _columns(QuantTensor(values, "F16", (4, 64)), 32, 64, "w")
    assert half.qtype == "F16" and half.shape == (4, 32) and np.array_equal(half.raw, values[:, 32:64])
    floats = torch.arange(4 * 64, dtype=torch.float32).reshape(4, 64)
    assert torch.equal(_columns(floats, 32, 64, "w"), floats[:, 32:64])
    rows = _rows(q8(8, 64, 0), 2, 5)
    assert rows.shape == (3, 64) and rows.raw.shape == (3, 2 * Q8_ROW)


MOE = ModelConfig(
    arch="qwen2moe", vocab_size=8, hidden_size=64, intermediate_size=64, num_layers=1, num_heads=2,
    num_kv_heads=2, head_dim=32, max_position=64, num_experts=2, experts_per_token=1, moe_intermediate_size=64,
    shared_expert_size=64,
)  # fmt: skip


def moe_weights(shared: bool) -> dict:
    p = "layers.0."
    weights = {
        "embed.weight": torch.zeros(8, 64),
        p + "wq.weight": q8(64, 64, 1),
        p + "wk.weight": q8(64, 64, 2),
        p + "wv.weight": q8(64, 64, 3),
        p + "wo.weight": q8(64, 64, 4),
        p + "router.weight": torch.ones(2, 64),
    }
    experts = [f"{p}experts.{e}." for e in range(2)] + ([f"{p}shared."] if shared else [])
    for salt, q in enumerate(experts):
        weights |= {q + "w_gate.weight": q8(64, 64, salt), q + "w_up.weight": q8(64, 64, salt + 9)}
        weights[q + "w_down.weight"] = q8(64, 64, salt + 17)
    if shared:
        weights[p + "shared_gate.weight"] = torch.ones(1, 64)
    return weights


@pytest.mark.parametrize("shared", [True, False])
def test_every_experts_width_is_cut_into_chunks_that_each_route_with_the_whole_router(shared: bool) -> None:
    import dataclasses

    cfg = MOE if shared else dataclasses.replace(MOE, shared_expert_size=0)
    weights, p = moe_weights(shared), "layers.0."
    cut = rank_weights(cfg, weights, TPLayout(1, 0, 2))
    chunks = cut.moe_cut.layers[0]
    assert len(chunks) == 2
    assert (cut.moe_cut.cfg.moe_intermediate_size, cut.moe_cut.cfg.shared_expert_size) == (32, 32 if shared else 0)
    experts = [f"{p}experts.{e}." for e in range(2)] + ([f"{p}shared."] if shared else [])
    for j, chunk in enumerate(chunks):
        assert torch.equal(chunk[p + "router.weight"], weights[p + "router.weight"])
        assert (p + "shared_gate.weight" in chunk) == shared
        for q in experts:
            for name in ("w_gate", "w_up"):
                got = chunk[q + f"{name}.weight"]
                assert got.shape == (32, 64)
                assert np.array_equal(got.raw, weights[q + f"{name}.weight"].raw[j * 32 : (j + 1) * 32])
            assert np.array_equal(chunk[q + "w_down.weight"].raw, blocks_of(weights[q + "w_down.weight"], j, j + 1))
    assert not [k for k in cut.weights if ".experts." in k or ".shared." in k]


class TwoRanks:
    """A group of two ranks where the other rank's tensors are this rank's times 10."""

    rank, world, exchange, transport = 0, 2, None, "test"

    def all_gather(self, t: torch.Tensor) -> list[torch.Tensor]:
        return [t.clone(), t * 10]


def runner(vocab: int, layout: TPLayout) -> TPFusedRunner:
    """A TPFusedRunner's gathering state alone (its decoder is never built)."""
    tp = TPFusedRunner.__new__(TPFusedRunner)
    tp.group, tp.full_vocab = TwoRanks(), vocab
    tp.vocab_rows = -(-vocab // layout.shards) * layout.per_rank
    return tp


def test_the_row_parallel_sums_of_every_rank_and_chunk_are_all_added() -> None:
    tp = runner(10, TPLayout(2, 0, 4))
    partials = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # this rank's two chunks
    out = torch.zeros(2)
    tp._reduce(partials, out)
    assert out.tolist() == [44.0, 66.0]  # (1 + 3) * 11, (2 + 4) * 11


def test_the_gathered_logits_are_every_ranks_vocabulary_in_order_without_padding(monkeypatch) -> None:
    # vocabulary 10 in 4 chunks of 3 rows, 2 a rank: rank 0 holds 6 rows, rank 1 the other 4 (padded to 6)
    monkeypatch.setattr(FusedRunner, "logits", lambda self, x: x)
    tp = runner(10, TPLayout(2, 0, 4))
    got = tp.logits(torch.arange(1.0, 7.0)[None])
    assert got.tolist() == [[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 10.0, 20.0, 30.0, 40.0]]
