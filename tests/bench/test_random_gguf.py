"""metronome.bench.random_gguf: random-weight files of real models' shapes, as tools/bench_tp.py times them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from helpers.tp_outputs import fused_tp_outputs

from metronome.bench.random_gguf import SHAPES, DenseShape, gpt2_byte_tokens, write_random_dense
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


def _fields(path: Path) -> tuple[dict, dict]:
    import gguf

    reader = gguf.GGUFReader(path)
    return {k: f.contents() for k, f in reader.fields.items()}, {t.name: t for t in reader.tensors}


def test_the_published_shapes_carry_their_config_json_dimensions() -> None:
    """Each named shape is its model card's config.json, field by field (a changed vocabulary or layer count
    moves every figure timed on it, but hardly moves the rounded parameter count)."""
    dims = {n: (s.hidden, s.layers, s.heads, s.kv_heads, s.ffn, s.vocab, s.tie_embeddings) for n, s in SHAPES.items()}
    assert dims == {
        "llama-3.2-1b": (2048, 16, 32, 8, 8192, 128256, True),
        "llama-3.2-3b": (3072, 28, 24, 8, 8192, 128256, True),
        "llama-3.1-8b": (4096, 32, 32, 8, 14336, 128256, False),
    }
    # 3B: kv = 3072/24*8 = 1024; per layer 2*3072^2 + 2*3072*1024 + 3*3072*8192 = 100,663,296;
    # 28 layers = 2,818,572,288, plus the tied 128256*3072 = 394,002,432 embedding: 3,212,574,720
    assert SHAPES["llama-3.2-3b"].parameters() == 3_212_574_720


def test_the_byte_alphabet_is_gpt2s() -> None:
    """256 distinct characters, the printable bytes as themselves and the others from U+0100 on in byte
    order, as GPT-2's bytes_to_unicode writes them: the space is 'Ġ' (U+0120, the 33rd unprintable byte),
    byte 0 is 'Ā' (U+0100) and byte 255 'ÿ' stays itself."""
    tokens = gpt2_byte_tokens()
    assert len(tokens) == len(set(tokens)) == 256
    assert (tokens[0], tokens[32], tokens[ord("A")], tokens[173], tokens[255]) == ("Ā", "Ġ", "A", "Ń", "ÿ")


def test_the_vocabulary_and_rope_fields_are_written(tmp_path: Path) -> None:
    """The header llama.cpp and the loader read: the byte alphabet first, the one merge, <s> and </s> as
    the last two (control) tokens and the BOS/EOS ids, Llama 3's rope base 500000, eps 1e-5, 8192 context."""
    fields, _ = _fields(write_random_dense(tmp_path / "tiny.gguf", TINY))
    tokens = fields["tokenizer.ggml.tokens"]
    assert len(tokens) == 512 and tokens[:257] == gpt2_byte_tokens() + ["Ġt"] and tokens[-2:] == ["<s>", "</s>"]
    assert fields["tokenizer.ggml.token_type"] == [1] * 510 + [3, 3]
    assert fields["tokenizer.ggml.merges"] == ["Ġ t"]
    assert (fields["tokenizer.ggml.bos_token_id"], fields["tokenizer.ggml.eos_token_id"]) == (510, 511)
    assert fields["llama.rope.freq_base"] == 500000.0
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert fields["llama.context_length"] == 8192


def test_the_weights_have_the_documented_spread_and_norms_are_ones(tmp_path: Path) -> None:
    """Q4_0 weights of standard deviation about 1/sqrt(width): d = u*scale/4.6 with u in [0.8, 1.2] and codes
    q uniform on 0..15, so the rms of d*(q-8) is scale * sqrt(E[u^2]=1.0133) * sqrt(E[(q-8)^2]=21.5)/4.6
    = 1.015*scale, and the mean of d*(q-8) is -0.5*d (about -0.11*scale). Norms are float32 ones; a tied
    shape writes no output.weight."""
    import gguf

    tied = DenseShape("tied", hidden=128, layers=1, heads=4, kv_heads=2, ffn=256, vocab=512)
    _, tensors = _fields(write_random_dense(tmp_path / "tied.gguf", tied))
    assert "output.weight" not in tensors
    for name, width in (("token_embd.weight", 128), ("blk.0.ffn_down.weight", 256)):
        t = tensors[name]
        w = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float64)
        scale = width**-0.5
        assert np.sqrt((w**2).mean()) == pytest.approx(1.015 * scale, rel=0.03), name
        assert w.mean() == pytest.approx(-0.5 * scale / 4.6, abs=0.02 * scale), name
        assert len(np.unique(np.round(w[0] / np.abs(w[0]).max() * 8))) > 8, name  # both nibbles random
    for name in ("output_norm.weight", "blk.0.attn_norm.weight", "blk.0.ffn_norm.weight"):
        assert tensors[name].data.dtype == np.float32 and (tensors[name].data == 1).all(), name


def test_the_seed_picks_the_weights(tmp_path: Path) -> None:
    """Same seed, same bytes; another seed, other weights."""
    a, b, c = (write_random_dense(tmp_path / f"{n}.gguf", TINY, seed=s) for n, s in (("a", 3), ("b", 3), ("c", 4)))
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_the_command_keeps_a_file_and_passes_its_seed(tmp_path: Path, monkeypatch, capsys) -> None:
    """`--out` naming an existing file leaves it untouched; otherwise the file is written with `--seed`, and
    the line reports parameters in billions (1e9): llama-3.2-1b's 1,235,746,816 read "1.24B" (2**30 would
    give 1.15)."""
    from metronome.bench import random_gguf

    calls = []

    def fake_write(path, shape, seed=0):  # the real 1B file would be 700 MB
        calls.append((shape.name, seed))
        path.write_bytes(b"x" * 1000)
        return path

    monkeypatch.setattr(random_gguf, "write_random_dense", fake_write)
    kept = tmp_path / "kept.gguf"
    kept.write_bytes(b"mine")
    random_gguf.main(["--shape", "llama-3.2-1b", "--out", str(kept)])
    assert kept.read_bytes() == b"mine" and calls == [] and "exists, kept" in capsys.readouterr().out

    random_gguf.main(["--shape", "llama-3.2-1b", "--out", str(tmp_path / "new.gguf"), "--seed", "7"])
    assert calls == [("llama-3.2-1b", 7)]
    assert "llama-3.2-1b, 1.24B weights, 0.00 GB" in capsys.readouterr().out
