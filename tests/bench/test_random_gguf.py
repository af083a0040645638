"""metronome.bench.random_gguf: random-weight files of real models' shapes, as tools/bench_tp.py times them."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers.tp_outputs import fused_tp_outputs

from metronome.bench.random_gguf import SHAPES, DenseShape, write_random_dense
from metronome.model.loader import load

TINY = DenseShape("tiny", hidden=128, layers=2, heads=4, kv_heads=2, ffn=256, vocab=512, tie_embeddings=False)


def test_the_file_holds_the_shape_as_q4_0_blocks(tmp_path: Path) -> None:
    loaded = load(str(write_random_dense(tmp_path / "tiny.gguf", TINY)))
    cfg = loaded.config
    got = (cfg.arch, cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.intermediate_size)
    assert got == ("llama", 128, 2, 4, 2, 256)
    assert (cfg.vocab_size, cfg.tie_embeddings, cfg.head_dim) == (512, False, 32)
    for name in ("layers.1.w_down.weight", "layers.0.wk.weight", "head.weight", "embed.weight"):
        assert loaded.weights[name].qtype == "Q4_0", name


def test_it_decodes_on_the_fused_plan_and_tp_2_keeps_the_tokens(tmp_path: Path) -> None:
    """The file runs where bench_tp runs it: the fused decoder, chunked tp=1 and tp=2 giving equal tokens
    and logprobs (the values are noise, so only the equality and the length mean anything)."""
    path = write_random_dense(tmp_path / "tiny.gguf", TINY)
    runs = fused_tp_outputs(path)
    assert runs[0] == runs[1] and len(runs[0][0]) == 6


def test_the_named_shapes_are_the_published_ones() -> None:
    assert round(SHAPES["llama-3.2-1b"].parameters() / 1e9, 2) == 1.24  # Meta: 1.23B
    assert round(SHAPES["llama-3.1-8b"].parameters() / 1e9, 2) == 8.03  # Meta: 8.03B


def test_a_shape_that_cannot_be_blocked_is_refused() -> None:
    with pytest.raises(ValueError, match="multiples of 32"):
        DenseShape("odd", hidden=96, layers=1, heads=4, kv_heads=2, ffn=100, vocab=300)
    with pytest.raises(ValueError, match="kv_heads"):
        DenseShape("odd", hidden=128, layers=1, heads=4, kv_heads=3, ffn=128, vocab=300)
