"""Loading: configs from metadata, every listed tensor type, tokenizers and templates, and bad files."""

from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from metronome.model.loader import ModelFileError, QuantTensor, load, read_config
from metronome.model.tokenizer import ChatTemplateError, Tokenizer

TEXTS = [
    "Hello, world! How are you today?",
    "  leading spaces and   multiple   gaps\n\nnew lines\ttabs",
    "Numbers 12345 and 3.14159, émigré café 日本語 🙂",
    "def f(x):\n    return x**2  # comment",
]


def test_smollm2_config_from_metadata(smollm_path):
    c = read_config(smollm_path)
    assert (c.arch, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        "llama",
        30,
        576,
        9,
        3,
        64,
    )
    assert (c.vocab_size, c.max_position, c.rope_theta, c.tie_embeddings) == (49152, 8192, 100000.0, True)
    assert 134e6 < c.num_parameters() < 136e6


def test_gemma3_config_from_metadata(gemma_path):
    c = read_config(gemma_path)
    assert (c.arch, c.num_layers, c.head_dim, c.sliding_window, c.activation) == ("gemma3", 18, 256, 512, "gelu_tanh")
    assert [i for i in range(c.num_layers) if not c.is_sliding(i)] == [5, 11, 17]
    assert c.embed_scale == pytest.approx(640**0.5)


# -- tensor types ---------------------------------------------------------------------------------

# Byte offsets of the fp16 scale fields in each block type (set to sane values in random blocks).
_HALF_FIELDS = {"Q8_0": (0,), "Q4_0": (0,), "Q4_1": (0, 2), "Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,)}


@pytest.mark.parametrize("qtype", sorted(_HALF_FIELDS))
def test_block_types_match_an_independent_dequantizer(qtype):
    """Random blocks decoded by metronome (via the gguf package) and by transformers' own decoder agree."""
    from transformers.integrations.gguf.dequant import dequantize as hf_dequantize

    kind = gguf.GGMLQuantizationType[qtype]
    block, size = gguf.GGML_QUANT_SIZES[kind]
    rows, blocks = 3, 2
    rng = np.random.default_rng(0)
    raw = rng.integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    for off in _HALF_FIELDS[qtype]:
        raw[:, :, off : off + 2] = rng.uniform(0.01, 0.1, (rows, blocks, 1)).astype(np.float16).view(np.uint8)
    t = QuantTensor(raw.reshape(rows, blocks * size), qtype, (rows, blocks * block))
    ours = t.dequantize()
    theirs = hf_dequantize(torch.from_numpy(raw.reshape(-1).copy()), int(kind)).reshape(rows, -1)
    assert ours.shape == (rows, blocks * block)
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "qtype,tol",
    [("F32", 0), ("F16", 1e-3), ("BF16", 1e-2), ("Q8_0", 2e-2), ("Q5_0", 0.15), ("Q4_0", 0.3), ("Q4_1", 0.3)],
)
def test_types_round_trip_through_a_written_gguf(tmp_path, qtype, tol):
    """Write a tensor with the gguf package, read it back through metronome's reader and dequantizer."""
    from metronome.model import gguf_file

    x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32)
    kind = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    data = gguf.quants.quantize(x, kind)
    w.add_tensor("t", data, raw_shape=data.shape, raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    f = gguf_file.read(tmp_path / "t.gguf")
    rec = f.tensors["t"]
    assert rec.qtype == qtype and rec.shape == (4, 64)
    back = QuantTensor(f.array(rec), rec.qtype, rec.shape).dequantize()
    assert (back - torch.from_numpy(x)).abs().max().item() <= tol


# -- tokenizers and templates ---------------------------------------------------------------------


@pytest.mark.parametrize("which", ["smollm", "gemma"])
def test_tokenizer_matches_transformers_gguf_tokenizer(which, smollm_path, gemma_path):
    from transformers import AutoTokenizer

    path = smollm_path if which == "smollm" else gemma_path
    ours = Tokenizer(load(path).tokenizer)
    theirs = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    for text in TEXTS:
        ids = ours.encode(text)
        if which == "smollm":  # SmolLM splits digits one by one (its tokenizer.json); transformers' GGUF path does not
            assert ours.decode(ids) == text
            text = text.replace("12345", "1 2 3 4 5").replace("3.14159", "3.1")
            ids = ours.encode(text)
        assert ids == theirs(text)["input_ids"], text
        assert ours.decode(ids) == theirs.decode(ids, skip_special_tokens=True)


@pytest.mark.parametrize("which", ["smollm", "gemma"])
def test_token_bytes_join_into_the_texts_utf8(which, smollm_path, gemma_path):
    # logprobs' `bytes`: a token holding part of a character (emoji, CJK) has that part's bytes, not U+FFFD's
    tok = Tokenizer(load(smollm_path if which == "smollm" else gemma_path).tokenizer)
    for text in [*TEXTS, "🤘🤩 🇫🇷 𓀀"]:
        ids = [i for i in tok.encode(text) if i != tok.bos_id]
        assert b"".join(tok.token_bytes(i) for i in ids) == text.encode("utf-8"), text
    partial = [i for i in tok.encode("𓀀") if i != tok.bos_id]
    assert len(partial) > 1 and tok.token_text(partial[0]) == "\ufffd"  # the case the text cannot show


def test_smollm_digits_are_split_one_by_one(smollm):
    tok = Tokenizer(smollm.tokenizer)
    assert [tok.decode([i]) for i in tok.encode("2024")] == ["2", "0", "2", "4"]


def test_chat_template_matches_transformers(smollm, smollm_path):
    from transformers import AutoTokenizer

    ours = Tokenizer(smollm.tokenizer)
    theirs = AutoTokenizer.from_pretrained(str(smollm_path.parent), gguf_file=smollm_path.name)
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
    ]
    for msgs in (messages, messages[1:2]):
        assert ours.render_chat(msgs) == theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def test_base_model_has_no_chat_template(gemma_path):
    tok = Tokenizer(load(gemma_path).tokenizer)
    assert not tok.has_chat_template and tok.encode("Hi")[0] == tok.bos_id
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tok.render_chat([{"role": "user", "content": "Hi"}])


def test_stream_decoder_never_splits_characters(smollm):
    tok = Tokenizer(smollm.tokenizer)
    text = "Grüße aus Köln 🙂🎉 — “quotes” and 日本語 text"
    dec = tok.stream_decoder()
    pieces = [dec.push(i) for i in tok.encode(text)] + [dec.flush()]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)


# -- bad files ----------------------------------------------------------------------------------------


def _tiny_gguf(path: Path, arch: str = "llama", skip: str | None = None, bad_shape: str | None = None) -> Path:
    """A tiny llama-shaped GGUF written with the gguf package."""
    d, f, layers, vocab = 16, 32, 1, 8
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(layers)
    w.add_context_length(64)
    w.add_embedding_length(d)
    w.add_feed_forward_length(f)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_tokenizer_model("gpt2")
    w.add_token_list([chr(ord("a") + i) for i in range(vocab)])
    w.add_token_types([1] * vocab)
    w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    shapes = {
        "token_embd.weight": (vocab, d),
        "output_norm.weight": (d,),
        "blk.0.attn_norm.weight": (d,),
        "blk.0.attn_q.weight": (d, d),
        "blk.0.attn_k.weight": (8, d),
        "blk.0.attn_v.weight": (8, d),
        "blk.0.attn_output.weight": (d, d),
        "blk.0.ffn_norm.weight": (d,),
        "blk.0.ffn_gate.weight": (f, d),
        "blk.0.ffn_up.weight": (f, d),
        "blk.0.ffn_down.weight": (d, f),
    }
    for name, shape in shapes.items():
        if name == skip:
            continue
        if name == bad_shape:
            shape = (shape[0] + 1,) + shape[1:]
        w.add_tensor(name, np.ones(shape, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_stacking_vectors_and_matrices() -> None:
    """QuantTensor.stack of matrices stacks rows; of vectors (a qwen2 file's F32 q/k/v biases, which tensor
    parallel stacks per KV head) it concatenates entries."""
    a = QuantTensor(np.arange(4, dtype=np.float32), "F32", (4,))
    b = QuantTensor(np.arange(4, 6, dtype=np.float32), "F32", (2,))
    v = QuantTensor.stack([a, b])
    assert v is not None and v.shape == (6,) and np.array_equal(v.raw, np.arange(6, dtype=np.float32))
    m = QuantTensor(np.zeros((3, 68), dtype=np.uint8), "Q8_0", (3, 64))
    stacked = QuantTensor.stack([m, m])
    assert stacked is not None and stacked.shape == (6, 64) and stacked.raw.shape == (6, 68)


def test_a_valid_tiny_gguf_loads(tmp_path):
    m = load(_tiny_gguf(tmp_path / "ok.gguf"))
    assert m.config.num_layers == 1 and m.weights["layers.0.w_down.weight"].shape == (16, 32)


@pytest.mark.parametrize(
    "case,match",
    [
        ("arch", "unsupported architecture 'bert'"),
        ("missing", "tensor 'blk.0.ffn_up.weight' is missing"),
        ("shape", "has shape \\(17, 16\\), expected \\(16, 16\\)"),
    ],
)
def test_bad_gguf_contents_get_one_clear_error(tmp_path, case, match):
    kwargs = {
        "arch": {"arch": "bert"},
        "missing": {"skip": "blk.0.ffn_up.weight"},
        "shape": {"bad_shape": "blk.0.attn_q.weight"},
    }[case]
    path = _tiny_gguf(tmp_path / f"{case}.gguf", **kwargs)
    with pytest.raises(ModelFileError, match=match) as err:
        load(path)
    assert str(path) in str(err.value)


def test_truncated_gguf(tmp_path, smollm_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(smollm_path.read_bytes()[:50_000_000])
    with pytest.raises(ModelFileError, match="truncated GGUF file: tensor .* ends at byte"):
        load(cut)
    head = tmp_path / "head.gguf"
    head.write_bytes(smollm_path.read_bytes()[:100_000])  # cut inside the metadata
    with pytest.raises(ModelFileError, match="damaged or truncated"):
        load(head)


def test_wrong_magic_and_missing_paths(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGML" + b"\0" * 64)
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        load(bad)
    with pytest.raises(ModelFileError, match="no such file or folder"):
        load(tmp_path / "nope.gguf")
    empty = tmp_path / "folder"
    empty.mkdir()
    with pytest.raises(ModelFileError, match="config.json: missing"):
        load(empty)


def test_hf_folder_errors(tmp_path, tiny_hf):
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_hf("llama"), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["BertModel"]}))
    with pytest.raises(ModelFileError, match="unsupported architecture"):
        load(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer.json").unlink()
    with pytest.raises(ModelFileError, match="tokenizer.json: missing"):
        load(folder)
