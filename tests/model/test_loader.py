"""Loading: configs from metadata, every listed tensor type, tokenizers and templates, and bad files."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from metronome.compile.plan import PlanError
from metronome.config import EngineConfig, SamplingParams
from metronome.engine import Engine
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


def _gguf_bytes(kv: bytes = b"", n_kv: int = 0, tensors: bytes = b"", n_tensors: int = 0, version: int = 3) -> bytes:
    """A GGUF header written by hand: magic, version, counts, then the given metadata and tensor records."""
    import struct

    return b"GGUF" + struct.pack("<IQQ", version, n_tensors, n_kv) + kv + tensors


def _gguf_string(s: str) -> bytes:
    import struct

    return struct.pack("<Q", len(s)) + s.encode()


def test_a_gguf_header_the_reader_cannot_trust_is_named_where_it_breaks(tmp_path):
    """Each check of the header reader, on bytes written by hand: an unknown version, implausible counts, an
    alignment that is not a power of two, a row that is not whole blocks, a string or array past the end."""
    import struct

    from metronome.model.gguf_file import GGUFFormatError, read

    def fails(data: bytes, match: str) -> None:
        path = tmp_path / "bad.gguf"
        path.write_bytes(data)
        with pytest.raises(GGUFFormatError, match=match):
            read(path)

    fails(_gguf_bytes(version=1), "GGUF version 1 is not supported")
    fails(_gguf_bytes(n_tensors=2_000_000) + b"\0" * 64, "implausible counts")
    align = _gguf_string("general.alignment") + struct.pack("<II", gguf.GGUFValueType.UINT32, 24)
    fails(_gguf_bytes(align, n_kv=1), "general.alignment=24: must be a power of two")
    q8 = _gguf_string("t") + struct.pack("<IQIQ", 1, 40, gguf.GGMLQuantizationType.Q8_0, 0)
    fails(_gguf_bytes(tensors=q8, n_tensors=1) + b"\0" * 64, "40 values per row is not a whole number of Q8_0")
    long_key = struct.pack("<Q", 1000) + b"key"
    fails(_gguf_bytes(long_key, n_kv=1) + b"\0" * 64, "a string of 1000 bytes .* runs past the end")
    array = _gguf_string("a") + struct.pack("<IIQ", gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.UINT32, 10**5)
    fails(_gguf_bytes(array, n_kv=1) + b"\0" * 64, "an array of 100000 values .* runs past the end")


def test_tensor_data_starts_at_the_next_aligned_byte_even_when_the_header_ends_on_one(tmp_path):
    """A header of exactly 64 bytes (32-byte alignment): the data starts right after it, as gguf's reader says."""
    import struct

    from metronome.model.gguf_file import read

    values = np.arange(1, 5, dtype=np.float32)
    record = _gguf_string("abcdefgh") + struct.pack("<IQIQ", 1, 4, gguf.GGMLQuantizationType.F32, 0)
    data = _gguf_bytes(tensors=record, n_tensors=1)
    assert len(data) == 64
    (tmp_path / "t.gguf").write_bytes(data + values.tobytes() + b"\0" * 16)
    f = read(tmp_path / "t.gguf")
    theirs = gguf.GGUFReader(tmp_path / "t.gguf").tensors[0]
    assert f.tensors["abcdefgh"].offset == theirs.data_offset == 64
    assert np.array_equal(f.array(f.tensors["abcdefgh"]), values)


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


@pytest.mark.parametrize(
    ("template", "rendered"),
    [
        ("{{ messages | tojson(separators=(',', ':'), sort_keys=True) }}", '[{"content":"Hi","role":"user"}]'),
        ("{% generation %}{{ messages[0].content }}{% endgeneration %}", "Hi"),
        ("{{ 'Köln 🙂' | tojson }}", '"Köln 🙂"'),  # as transformers' tojson: ensure_ascii=False
        ("{{ 1 / 0 }}", None),
        ("{{ 'a' + messages[0].missing }}", None),
        ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", None),
        ("{{ raise_exception('no system role') }}", None),
    ],
    ids=[
        "tojson-arguments",
        "generation-tag",
        "tojson-non-ascii",
        "zero-division",
        "none-added",
        "recursion",
        "raise_exception",
    ],
)
def test_chat_templates_render_as_transformers_does_or_fail_as_the_templates_error(smollm, template, rendered):
    """transformers' tojson arguments and {% generation %} tag failed to render (a 500, and a 400 on every
    request); a template's own failure (a division by zero, a None added to a string, runaway recursion) was
    a 500 'internal error'. It is the template's error, named as such."""
    import dataclasses

    tok = Tokenizer(dataclasses.replace(smollm.tokenizer, chat_template=template))
    messages = [{"role": "user", "content": "Hi"}]
    if rendered is not None:
        assert tok.render_chat(messages, add_generation_prompt=False) == rendered
        return
    with pytest.raises(ChatTemplateError, match="chat template"):
        tok.render_chat(messages)


def test_a_chat_template_is_compiled_once_and_a_broken_one_fails_every_time(smollm, monkeypatch):
    """Compiling the template was 95 % of a chat request's template work (about 2 ms); it is compiled once
    per template text. A template that does not compile is not kept: each request gets its error."""
    import dataclasses

    from jinja2.sandbox import ImmutableSandboxedEnvironment

    compiled = []
    compile_one = ImmutableSandboxedEnvironment.from_string

    def counting(env, source, *args, **kwargs):
        compiled.append(source)
        return compile_one(env, source, *args, **kwargs)

    monkeypatch.setattr(ImmutableSandboxedEnvironment, "from_string", counting)
    template = "{# compiled once #}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tok = Tokenizer(dataclasses.replace(smollm.tokenizer, chat_template=template))
    for text in ("Hi", "Hello", "Hey"):
        assert tok.render_chat([{"role": "user", "content": text}], add_generation_prompt=False) == f"user: {text}\n"
    assert compiled == [template]
    broken = Tokenizer(dataclasses.replace(smollm.tokenizer, chat_template="{% for m in messages %}{{ m }}"))
    for _ in range(2):
        with pytest.raises(ChatTemplateError, match="chat template failed"):
            broken.render_chat([{"role": "user", "content": "Hi"}])
    # a server compiles it as it starts (the first chat request paid for it), and says so if it cannot
    fresh = "{# compiled at start #}" + template
    assert Tokenizer(dataclasses.replace(smollm.tokenizer, chat_template=fresh)).compile_chat_template() is None
    assert compiled[-1] == fresh
    assert "does not compile" in broken.compile_chat_template()
    assert Tokenizer(dataclasses.replace(smollm.tokenizer, chat_template=None)).compile_chat_template() is None


def test_chat_templates_can_ask_for_the_date(smollm):
    """Llama 3's and others' templates write today's date with transformers' `strftime_now` global; without
    it they fail to render (a 400 on every request)."""
    import dataclasses
    from datetime import date, timedelta

    tok = Tokenizer(dataclasses.replace(smollm.tokenizer, chat_template="{{ strftime_now('%Y-%m-%d') }}"))
    before = date.today()
    rendered = tok.render_chat([{"role": "user", "content": "Hi"}], add_generation_prompt=False)
    assert rendered in {str(before), str(before + timedelta(days=1))}  # a run across midnight


def test_gemma_takes_runs_of_spaces_as_its_longest_space_tokens(gemma_path):
    """Gemma's space-run tokens are user-defined: sentencepiece (and llama.cpp) match them whole, longest
    first. Built as merges, runs of 32 spaces or more split otherwise (32 spaces: two 16s, not 31 + 1)."""
    tok = Tokenizer(load(gemma_path).tokenizer)
    vocab = tok.vocabulary()
    longest = max(len(t) for t in vocab if t and set(t) == {"\u2581"})
    run = {n: vocab["\u2581" * n] for n in range(2, longest + 1)}
    for n in (5, longest, longest + 1, 40, 3 * longest + 2):
        want = [run[longest]] * (n // longest) + ([run.get(n % longest, vocab["\u2581"])] if n % longest else [])
        assert tok.encode(" " * n, add_bos=False) == want, n
        assert tok.decode(tok.encode("x" + " " * n + "y", add_bos=False)) == "x" + " " * n + "y"


def test_control_tokens_that_end_a_document_end_generation(smollm):
    """The GGUF names one eos (<|im_end|>); <|endoftext|>, which SmolLM2 and Qwen2.5 write at a document's
    end, did not stop them (a fill-in-the-middle answer ran on to max_tokens, that token dropped from its
    text). llama.cpp ends on both."""
    tok = Tokenizer(smollm.tokenizer)
    ends = {smollm.tokenizer.tokens[i] for i in tok.eos_ids}
    assert {"<|im_end|>", "<|endoftext|>"} <= ends and tok.eos_ids[0] == tok.encode("<|im_end|>", add_bos=False)[0]
    assert "<repo_name>" not in ends and "<|im_start|>" not in ends


def test_an_output_that_completes_the_prompts_last_character_has_it_in_its_text(smollm):
    """Token-id prompts can end partway through a character. The stream measured the output's text against
    the prompt's, which ended in U+FFFD: the character the output completed replaced it, and the lengths no
    longer lined up (18 of the cuts of this text lost characters, a completed emoji among them)."""
    tok = Tokenizer(smollm.tokenizer)
    text = "Hi 😀😀 ok 𓏸𓏸 ࿕ done 🧑🏽‍💻 end"
    ids = tok.encode(text, add_bos=False)
    cuts = 0
    for cut in range(1, len(ids)):
        if not tok.decode(ids[:cut]).endswith("\ufffd"):
            continue
        cuts += 1
        dec = tok.stream_decoder(ids[:cut])
        out = "".join(dec.push(i) for i in ids[cut:]) + dec.flush()
        whole = b"".join(tok.token_bytes(i) for i in ids[:cut]).decode("utf-8", "ignore")  # its whole characters
        assert out == text[len(whole) :], (cut, out)
    assert cuts >= 10


# -- bad files ----------------------------------------------------------------------------------------


def _tiny_gguf(
    path: Path,
    arch: str = "llama",
    skip: str | None = None,
    bad_shape: str | None = None,
    meta: dict | None = None,
    tensors: dict[str, np.ndarray] | None = None,
) -> Path:
    """A tiny llama-shaped GGUF written with the gguf package (head_dim 8). `meta` replaces or adds metadata
    (keys without a dot are the architecture's own), `tensors` replaces or adds tensors."""
    d, f, vocab = 16, 32, 8
    settings = {
        "block_count": 1,
        "context_length": 64,
        "embedding_length": d,
        "feed_forward_length": f,
        "attention.head_count": 2,
        "attention.head_count_kv": 1,
        "attention.layer_norm_rms_epsilon": 1e-5,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": [chr(ord("a") + i) for i in range(vocab - 1)] + ["ab"],
        "tokenizer.ggml.token_type": [1] * vocab,
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1,
    } | (meta or {})
    w = gguf.GGUFWriter(path, arch)
    for key, value in settings.items():
        key = key if key.startswith(("tokenizer.", "split.")) else f"{arch}.{key}"
        if isinstance(value, list):
            w.add_array(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
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
    values = {
        name: np.random.default_rng(0).standard_normal(shape).astype(np.float32) * 0.3 for name, shape in shapes.items()
    }
    if bad_shape is not None:
        values[bad_shape] = np.ones((shapes[bad_shape][0] + 1,) + shapes[bad_shape][1:], dtype=np.float32)
    values |= tensors or {}
    for name, value in values.items():
        if name != skip:
            w.add_tensor(name, value)
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


_E = 200_000  # experts a hostile file claims while it holds 2: expected_shapes listed 600,000 names first


def _moe_tensors() -> dict[str, np.ndarray]:
    d, f = 16, 32
    return {
        "blk.0.ffn_gate_inp.weight": np.zeros((2, d), np.float32),
        "blk.0.ffn_gate_exps.weight": np.zeros((2, f, d), np.float32),
        "blk.0.ffn_up_exps.weight": np.zeros((2, f, d), np.float32),
        "blk.0.ffn_down_exps.weight": np.zeros((2, d, f), np.float32),
    }


@pytest.mark.parametrize(
    "case, meta, tensors, match",
    [
        # each once a traceback (ZeroDivisionError, IndexError, RuntimeError...) or a silent wrong model
        ("heads0", {"attention.head_count": 0}, {}, "num_heads=0: must be positive"),
        ("kv3", {"attention.head_count": 4, "attention.head_count_kv": 3}, {}, "num_kv_heads=3: must divide"),
        ("keylen7", {"attention.key_length": 7}, {}, "head_dim=7: must be even"),
        ("layers0", {"block_count": 0}, {}, "num_layers=0: must be positive"),
        ("ctx0", {"context_length": 0}, {}, "max_position=0: must be positive"),
        ("eps_negative", {"attention.layer_norm_rms_epsilon": -1.0}, {}, "rms_norm_eps=-1.0"),
        ("bos", {"tokenizer.ggml.bos_token_id": 100}, {}, "bos_token_id \\(100,\\) is outside the 8-token"),
        ("eos", {"tokenizer.ggml.eos_token_id": 8}, {}, "eos_token_id \\(8,\\) is outside"),
        ("split", {"split.count": 2}, {}, "one part of a model split in 2 files"),
        ("i32", {}, {"blk.0.ffn_up.weight": np.zeros((32, 16), np.int32)}, "stored as I32, not a weight format"),
        ("rope_freqs", {}, {"rope_freqs.weight": np.ones(3, np.float32)}, "rope_freqs holds 3 values; a head of 8"),
        ("q_rows", {}, {"blk.0.attn_q.weight": np.zeros((8, 16), np.float32)}, "has shape \\(8, 16\\), expected"),
        (
            "experts",
            {"expert_count": _E, "expert_used_count": 2},
            _moe_tensors(),
            f"says {_E} experts per layer but the file holds 2",
        ),
    ],
)
def test_impossible_gguf_settings_are_the_files_fault(tmp_path, case, meta, tensors, match):
    """Hand-made, damaged or hostile metadata: a ModelFileError naming the file and the setting, before any
    work (the expert count once built a shape for each claimed expert: gigabytes and minutes)."""
    skip = {"experts": "blk.0.ffn_gate.weight"}.get(case)
    path = _tiny_gguf(tmp_path / f"{case}.gguf", meta=meta, tensors=tensors, skip=skip)
    with pytest.raises(ModelFileError, match=match) as err:
        load(path)
    assert str(path) in str(err.value)


def test_a_vocabulary_the_tokenizer_cannot_build_is_the_files_fault(tmp_path):
    """A merge of tokens not in the vocabulary: the tokenizers library raised its own Exception (or a Rust
    panic, a BaseException) from inside Engine.from_model, after the compile. The error names the file."""
    path = _tiny_gguf(tmp_path / "merges.gguf", meta={"tokenizer.ggml.merges": ["x y"]})
    with pytest.raises(ModelFileError, match="the tokenizer cannot be built") as err:
        Tokenizer(load(path).tokenizer)
    assert f"{path}: its tokenizer.ggml.* keys" in str(err.value)


def test_nan_weights_are_named_not_blamed_on_the_kernels(tmp_path):
    """NaN weights: the invariance probe read NaN != NaN as rows that differ and called it a kernel bug
    (on the torch path they silently generated token 0)."""
    from metronome.compile.probe import NonFiniteLogits

    nan = np.full((32, 16), np.nan, np.float32)
    path = _tiny_gguf(tmp_path / "nan.gguf", tensors={"blk.0.ffn_up.weight": nan})
    for slots in (1, 2):
        with pytest.raises(NonFiniteLogits, match="NaN or infinite"):
            Engine.from_model(str(path), EngineConfig(slots=slots, ctx=64, spec_tokens=0))


def test_a_head_dim_the_cpp_attention_cannot_read_runs_on_torch(tmp_path):
    """head_dim 8 (this tiny file's): every C++ attention kernel reads 16 floats at a time, and the plan
    handed the unfused runner the C++ ops anyway: 'head dim must be a positive multiple of 16' at compile.
    Now auto kernels take the torch ops, with the same tokens as --kernels torch; cpp is refused by name."""
    path = str(_tiny_gguf(tmp_path / "hd8.gguf"))
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    runs = {}
    for kernels in ("auto", "torch"):
        engine = Engine.from_model(path, EngineConfig(slots=2, ctx=64, spec_tokens=0, kernels=kernels))
        assert "torch" in engine.plan.report.kernels
        runs[kernels] = engine.generate("ab", params).token_ids
    assert runs["auto"] == runs["torch"]
    with pytest.raises(PlanError, match="head_dim multiple of 16") as err:
        Engine.from_model(path, EngineConfig(slots=2, ctx=64, kernels="cpp"))
    assert err.value.param == "kernels"


def test_plan_settings_the_model_or_the_device_cannot_take_are_refused_by_name(tmp_path):
    """A context longer than the model's (64 here) is refused, its own length is not; int8 weights on a GPU
    are refused before any CUDA check (this machine may have none)."""
    from metronome.compile.stages import resolve_weights

    path = str(_tiny_gguf(tmp_path / "ctx.gguf"))
    with pytest.raises(PlanError, match="ctx=65 is longer than the model's context \\(64\\)") as err:
        Engine.from_model(path, EngineConfig(slots=1, ctx=65, spec_tokens=0))
    assert err.value.param == "ctx"
    assert Engine.from_model(path, EngineConfig(slots=1, ctx=64, spec_tokens=0)).plan.config.ctx == 64
    loaded = load(path)
    with pytest.raises(PlanError, match="weights='int8' runs on CPU only for now") as err:
        resolve_weights(loaded, EngineConfig(slots=1, ctx=64, device="cuda", weights="int8"))
    assert err.value.param == "weights"
    assert resolve_weights(loaded, EngineConfig(slots=1, ctx=64, device="cuda")) == "bf16"


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


def test_odd_hf_folders_get_one_clear_error(tmp_path, tiny_hf):
    """Settings missing, of the wrong type or in the wrong file: each was a KeyError, TypeError or
    AttributeError traceback, or an error that did not name the file."""
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_hf("llama"), folder)
    config = json.loads((folder / "config.json").read_text())

    def refused(match: str, file: str) -> None:
        with pytest.raises(ModelFileError, match=match) as err:
            load(folder)
        assert str(folder / file) in str(err.value)

    (folder / "config.json").write_text("[]")
    refused("a JSON object was expected, not a list", "config.json")
    (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if k != "hidden_size"}))
    refused("'hidden_size' is missing", "config.json")
    (folder / "config.json").write_text(json.dumps({**config, "rms_norm_eps": None}))
    refused("a setting has a value metronome cannot read", "config.json")
    (folder / "config.json").write_text(json.dumps({**config, "rope_scaling": {"rope_type": "llama3"}}))
    refused("'factor' is missing", "config.json")
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": "</s>"}))
    refused("eos_token_id must be a token id or a list of them", "generation_config.json")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": None}))  # as unset: loads
    assert load(folder).config.num_layers == config["num_hidden_layers"]
    tokenizer = (folder / "tokenizer.json").read_text()
    (folder / "tokenizer.json").write_text("{oops")
    refused("not valid JSON", "tokenizer.json")
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')
    with pytest.raises(ModelFileError, match="the tokenizer cannot be built") as err:
        Tokenizer(load(folder).tokenizer)
    assert str(folder / "tokenizer.json") in str(err.value)
    (folder / "tokenizer.json").write_text(tokenizer)


def test_hf_weights_are_the_files_transformers_would_read(tmp_path, tiny_hf):
    """A stale checkpoint beside model.safetensors replaced its tensors (every *.safetensors was read, in
    name order); the index's shards are read, and one it lists but the folder lacks is named; integer
    weights (a quantized checkpoint's codes, their scales unread) are refused, not run as another network."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(tiny_hf("llama"), folder)
    real = load(folder).weights["embed.weight"]
    tensors = load_file(folder / "model.safetensors")
    save_file({k: torch.zeros_like(v) for k, v in tensors.items()}, folder / "old-model.safetensors")
    assert torch.equal(load(folder).weights["embed.weight"], real)

    (folder / "old-model.safetensors").unlink()
    (folder / "model.safetensors").unlink()
    names = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, part in halves.items():
        save_file({k: tensors[k] for k in part}, folder / file)
    weight_map = {k: file for file, part in halves.items() for k in part}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(load(folder).weights["embed.weight"], real)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelFileError, match="lists model-00002-of-00002.safetensors, not in the folder"):
        load(folder)

    (folder / "model.safetensors.index.json").unlink()
    (folder / "model-00001-of-00002.safetensors").unlink()
    coded = {k: (v * 100).to(torch.int8) if k.endswith("proj.weight") else v for k, v in tensors.items()}
    save_file(coded, folder / "model.safetensors")
    with pytest.raises(ModelFileError, match="is int8 .* a quantized checkpoint"):
        load(folder)


def _settings(arch: str, **changes) -> dict:
    """A config.json of `arch` (transformers' own defaults, tiny sizes) with `changes`."""
    import transformers as T

    classes = {
        "llama": T.LlamaConfig,
        "mistral": T.MistralConfig,
        "mixtral": T.MixtralConfig,
        "qwen2": T.Qwen2Config,
        "qwen2moe": T.Qwen2MoeConfig,
        "qwen3moe": T.Qwen3MoeConfig,
        "olmoe": T.OlmoeConfig,
        "gemma3": T.Gemma3TextConfig,
    }
    names = {"qwen2moe": "Qwen2MoeForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM", "olmoe": "OlmoeForCausalLM"}
    names["gemma3"] = "Gemma3ForCausalLM"
    name = names.get(arch, arch.capitalize() + "ForCausalLM")
    sizes = dict(vocab_size=32, hidden_size=64, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    c = classes[arch](**sizes, num_key_value_heads=2, max_position_embeddings=512, **changes).to_dict()
    return {**c, "architectures": [name], **changes}  # as written, where the class derives another value


@pytest.mark.parametrize(
    ("arch", "changes", "match"),
    [
        ("llama", {"hidden_act": "gelu"}, "hidden_act='gelu' is not supported for llama"),
        ("mixtral", {"hidden_act": "gelu", "sliding_window": None}, "hidden_act='gelu' is not supported for mixtral"),
        ("llama", {"attention_bias": True}, "attention_bias=true"),
        ("qwen3moe", {"attention_bias": True}, "attention_bias=true"),
        ("olmoe", {"attention_bias": True}, "attention_bias=true"),
        ("qwen3moe", {"quantization_config": {"quant_method": "fp8"}}, "quant_method 'fp8'"),
        ("qwen2moe", {"num_experts": 0}, "num_experts=0"),
        # a sweep against transformers: the MLP's biases were dropped (0 of 16 greedy tokens alike), Gemma 3
        # ran its GELU whatever hidden_activation said and causal attention where the file asked for both ways
        ("llama", {"mlp_bias": True}, "mlp_bias=true"),
        ("gemma3", {"hidden_activation": "silu"}, "hidden_activation='silu' is not supported for gemma3"),
        ("gemma3", {"use_bidirectional_attention": True}, "use_bidirectional_attention=true"),
        # read as something else: no rope scaling at all, every layer sparse, every layer's pattern the first's,
        # unclipped q/k/v
        ("llama", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope type 'dynamic' is not supported"),
        ("qwen2moe", {"decoder_sparse_step": 2}, "dense layers between sparse ones"),
        ("gemma3", {"layer_types": ["full_attention", "sliding_attention"]}, "layer_types must repeat"),
        ("olmoe", {"clip_qkv": 8.0}, "clip_qkv=8.0 is not supported"),
    ],
)
def test_hf_settings_metronome_does_not_run_are_refused_not_dropped(tmp_path, arch, changes, match):
    """Each loaded and ran as another network (a sweep against transformers: 3 to 14 of 32 greedy tokens
    alike): an activation other than SiLU, o_proj's bias, FP8 weights without their scales. Qwen2-MoE with
    no experts said 'num_local_experts' is missing."""
    from metronome.model.loader import _hf_settings

    with pytest.raises(ModelFileError, match=match):
        _hf_settings(_settings(arch, **changes), tmp_path)


def test_a_sliding_window_outside_gemma3_cuts_the_context_to_it(tmp_path):
    """Mistral's, Mixtral's and the Qwen families' sliding window was ignored: past it the model attended to
    every position (0-2 of 32 greedy tokens as transformers'). Within it, windowed attention is full
    attention: the context is cut to the window, and the model runs exactly there."""
    from metronome.model.loader import _hf_settings

    assert _hf_settings(_settings("mistral", sliding_window=16), tmp_path).max_position == 16
    assert _hf_settings(_settings("mixtral", sliding_window=16), tmp_path).max_position == 16
    assert _hf_settings(_settings("mistral", sliding_window=None), tmp_path).max_position == 512
    assert _hf_settings(_settings("mistral", sliding_window=4096), tmp_path).max_position == 512
    used = {"use_sliding_window": True, "sliding_window": 16}
    assert _hf_settings(_settings("qwen2", **used, max_window_layers=0), tmp_path).max_position == 16
    # Qwen2 slides the layers from max_window_layers on (28 by default: none of these 2)
    assert _hf_settings(_settings("qwen2", **used), tmp_path).max_position == 512
    assert (
        _hf_settings(_settings("qwen2moe", **used, layer_types=["sliding_attention"] * 2), tmp_path).max_position == 16
    )
    assert _hf_settings(_settings("qwen2", sliding_window=16), tmp_path).max_position == 512  # not used
    full = {**used, "layer_types": ["full_attention"] * 2}
    assert _hf_settings(_settings("qwen2", **full), tmp_path).max_position == 512


def test_qwen2_moe_reads_its_qkv_bias_setting(tmp_path):
    """qkv_bias=false was read as true: a file without the biases was refused for a missing q_proj.bias."""
    from metronome.model.loader import _hf_settings

    assert _hf_settings(_settings("qwen2moe"), tmp_path).qkv_bias
    assert not _hf_settings(_settings("qwen2moe", qkv_bias=False), tmp_path).qkv_bias


def test_fp8_weights_are_refused(tmp_path, tiny_hf):
    """float8 tensors passed the float check and ran without their scales."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tmp_path / "m"
    shutil.copytree(tiny_hf("llama"), folder)
    [file] = folder.glob("*.safetensors")
    tensors = load_file(file)
    name = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[name] = tensors[name].to(torch.float8_e4m3fn)
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ModelFileError, match="float8_e4m3fn"):
        load(folder)


def test_gguf_rope_scaling_is_applied_or_refused(tmp_path):
    """rope.scaling.type was read for Gemma 3 alone: a Llama or Qwen export with linear scaling ran unscaled,
    and one with YaRN (Qwen2.5's 128k exports) too, both without a word."""
    linear = {"rope.scaling.type": "linear", "rope.scaling.factor": 4.0}
    cfg = load(_tiny_gguf(tmp_path / "linear.gguf", meta=linear)).config
    assert cfg.rope_scaling is not None and cfg.rope_scaling.kind == "linear" and cfg.rope_scaling.factor == 4.0
    yarn = {"rope.scaling.type": "yarn", "rope.scaling.factor": 4.0}
    path = _tiny_gguf(tmp_path / "yarn.gguf", meta=yarn)
    with pytest.raises(ModelFileError, match="rope scaling 'yarn' is not supported") as err:
        load(path)
    assert str(path) in str(err.value)
    assert load(_tiny_gguf(tmp_path / "none.gguf", meta={"rope.scaling.type": "none"})).config.rope_scaling is None


def test_a_large_files_kept_digest_follows_every_change_of_the_file(tmp_path, monkeypatch):
    """A large file's sha256 is kept in a stamp keyed by the file's version. Keyed by the mtime alone, a
    copy that keeps it (`cp -p`, `rsync -t`, `touch -r`) over a changed file got the old digest back, and
    the plan cache ran the old file's packed weights."""
    import os
    import time

    from metronome.model import loader

    monkeypatch.setattr(loader, "_STAMPED_BYTES", 1 << 20)
    monkeypatch.setattr(loader, "_RACY_S", 0.3)
    monkeypatch.setenv("METRONOME_CACHE_DIR", str(tmp_path / "cache"))
    stamps = tmp_path / "cache" / "digests"
    f = tmp_path / "model.gguf"
    raw = bytearray(np.random.default_rng(0).integers(0, 256, 2 << 20, dtype=np.uint8).tobytes())
    f.write_bytes(bytes(raw))
    first = loader.file_fingerprint(f)
    assert not stamps.exists(), "a file written this moment was stamped (its times may not move again)"
    old = time.time() - 60
    os.utime(f, (old, old))
    time.sleep(0.4)  # the ctime, which utime set to now, settles
    assert loader.file_fingerprint(f) == first and len(list(stamps.iterdir())) == 1
    raw[len(raw) // 2] ^= 0x01  # one bit, in place, then the old times put back
    with open(f, "r+b") as fh:
        fh.write(bytes(raw))
    os.utime(f, (old, old))
    time.sleep(0.4)
    assert loader.file_fingerprint(f) != first, "the stamp gave the old file's digest"


def test_a_q4_head_of_an_odd_vocabulary_runs_on_torch_int4(tmp_path):
    """torch's int4 packing takes rows in multiples of 16: a Q4_0 file whose tied head has 301 rows (GPT-2's
    vocabulary is 50,257) failed the compile with "expect N to be dividable by 16" on the torch kernels.
    That matrix now runs as int8 per channel and the others stay int4."""
    from metronome.bench.random_gguf import DenseShape, write_random_dense
    from metronome.compile.quant import Int4Linear, Int8Linear

    shape = DenseShape("odd-vocab", hidden=128, layers=1, heads=4, kv_heads=2, ffn=256, vocab=301)
    path = str(write_random_dense(tmp_path / "v301.gguf", shape))
    config = EngineConfig(slots=1, ctx=64, spec_tokens=0, kernels="torch", weights="int4")
    engine = Engine.from_model(path, config)
    model = engine.plan.runner.model
    assert isinstance(model.head, Int8Linear) and isinstance(model.layers[0].attn.wo, Int4Linear)
    logits = engine.plan.prefill([1, 2, 3], 0)
    assert logits.shape[-1] == 301 and torch.isfinite(logits).all()


@pytest.mark.parametrize("config_says", [None, False])
def test_a_bos_written_by_the_post_processor_is_added_as_transformers_adds_it(tmp_path, config_says):
    """Llama 3's folders say nothing of add_bos_token: tokenizer.json's post-processor writes the BOS before
    every text. metronome encoded without it, so a raw prompt (/v1/completions) ran without its BOS. An
    explicit add_bos_token still wins."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, processors
    from transformers import AutoTokenizer

    from metronome.model.loader import _hf_tokenizer

    words = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(3, 40)]
    tok = HFTokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(words[:3])
    template = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.post_processor = processors.Sequence([processors.ByteLevel(trim_offsets=False), template])
    tok.save(str(tmp_path / "tokenizer.json"))
    settings = {"bos_token": "<s>", "eos_token": "</s>", "tokenizer_class": "PreTrainedTokenizerFast"}
    if config_says is not None:
        settings["add_bos_token"] = config_says
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(settings))
    ours = Tokenizer(_hf_tokenizer(tmp_path)).encode("w5 w9 w33")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path))("w5 w9 w33").input_ids
    assert ours == ([1, 5, 9, 33] if config_says is None else [5, 9, 33])
    if config_says is None:
        assert ours == theirs


@pytest.mark.parametrize(
    "arch, patch, match",
    [
        # each once a traceback after the load (ZeroDivisionError building the rope, pybind's TypeError from a
        # complex attention scale, a Tensor / str in the first step) or a different network with no word said
        (
            "llama",
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 0}},
            "low_freq_factor=0.0",
        ),
        ("llama", {"rope_scaling": {"rope_type": "llama3", "factor": -8.0}}, "factor=-8.0: must be a finite positive"),
        (
            "llama",
            {"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 4.0}},
            "high_freq_factor=4.0: must be a finite number above low_freq_factor",
        ),
        ("llama", {"rope_scaling": {"rope_type": "linear", "factor": float("nan")}}, "factor=nan"),
        ("gemma3", {"query_pre_attn_scalar": -32}, "query_pre_attn_scalar=-32.0: must be a finite positive"),
        ("gemma3", {"final_logit_softcapping": "abc"}, "final_logit_softcap='abc'"),
    ],
)
def test_impossible_hf_numbers_are_the_files_fault(tmp_path, tiny_hf, arch, patch, match):
    import json
    import shutil

    folder = tmp_path / "m"
    shutil.copytree(tiny_hf(arch), folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **patch}))
    with pytest.raises(ModelFileError, match=match) as err:
        load(folder)
    assert str(folder / "config.json") in str(err.value)


@pytest.mark.parametrize(
    "case, meta, tensors, match",
    [
        # llama.cpp applies these; dropped without a word, the network was another (27 % of the logits' range)
        ("out_bias", {}, {"blk.0.attn_output.bias": np.zeros(16, np.float32)}, "blk.0.attn_output.bias are parts"),
        ("ffn_bias", {}, {"blk.0.ffn_up.bias": np.zeros(32, np.float32)}, "blk.0.ffn_up.bias are parts"),
        # every dimension was rotated; llama.cpp refuses it ("invalid n_rot")
        (
            "partial_rope",
            {"rope.dimension_count": 4, "attention.key_length": 8},
            {},
            "rope.dimension_count 4 of a 8-wide",
        ),
    ],
)
def test_what_a_gguf_holds_and_metronome_would_not_run_is_refused(tmp_path, case, meta, tensors, match):
    path = _tiny_gguf(tmp_path / f"{case}.gguf", meta=meta, tensors=tensors)
    with pytest.raises(ModelFileError, match=match) as err:
        load(path)
    assert str(path) in str(err.value)


def test_a_llama_files_qk_biases_are_permuted_with_their_rows(tmp_path):
    """llama.cpp stores a llama's q/k rows interleaved for its RoPE, and a "llamafied" Qwen's q/k biases with
    them; the rows were put back in rotate-half order and the biases left as stored (14 % of the logits)."""
    bias = {f"blk.0.attn_{n}.bias": np.arange(r, dtype=np.float32) for n, r in (("q", 16), ("k", 8), ("v", 8))}
    m = load(_tiny_gguf(tmp_path / "bias.gguf", tensors=bias))
    assert m.config.qkv_bias
    half = np.arange(8).reshape(4, 2).T.reshape(-1)  # one head of 8: interleaved pairs -> halves
    assert np.array_equal(np.asarray(m.weights["layers.0.wq.bias"].raw), np.concatenate([half, half + 8]))
    assert np.array_equal(np.asarray(m.weights["layers.0.wk.bias"].raw), half)
    assert np.array_equal(np.asarray(m.weights["layers.0.wv.bias"].raw), np.arange(8))  # v is not rotated


def test_gguf_settings_llama_cpp_fixes_by_model_size(tmp_path):
    """Settings the file does not store, as llama.cpp derives them: Gemma 3 27B (62 layers) scales its
    queries by hidden / heads, not head_dim (15 % off before); a mistral file's sliding window cuts the context
    to it, as the HF path does (it attended past the window)."""
    from metronome.model.loader import _gguf_config

    def config(arch: str, layers: int, extra: dict):
        meta = {
            "general.architecture": arch,
            "tokenizer.ggml.tokens": ["a", "b"],
            f"{arch}.embedding_length": 5376,
            f"{arch}.attention.head_count": 32,
            f"{arch}.attention.head_count_kv": 16,
            f"{arch}.attention.key_length": 128,
            f"{arch}.feed_forward_length": 21504,
            f"{arch}.block_count": layers,
            f"{arch}.context_length": 131072,
        } | {f"{arch}.{k}": v for k, v in extra.items()}
        return _gguf_config(meta, tmp_path / "x.gguf", {})

    assert config("gemma3", 62, {}).query_pre_attn_scalar == 168.0
    assert config("gemma3", 48, {}).query_pre_attn_scalar == 128.0
    assert config("mistral", 2, {"attention.sliding_window": 4096}).max_position == 4096
    assert config("llama", 2, {"attention.sliding_window": 4096}).max_position == 131072  # llama.cpp ignores it


def test_a_template_that_writes_bos_gets_one_and_the_options_reach_it(tiny_hf):
    """The tiny model's template starts with {{ bos_token }} and its tokenizer adds BOS: the prompt has one BOS
    (a second shifted every position); add_generation_prompt and add_bos are the caller's; a special token's
    text (logprobs' alternatives) is its own, not ''."""
    tok = Tokenizer(load(tiny_hf("llama")).tokenizer)
    user, assistant, hello = (tok.vocabulary()[t] for t in ("<|user|>", "<|assistant|>", "hello"))
    messages = [{"role": "user", "content": "hello"}]
    assert tok.encode_chat(messages) == [tok.bos_id, user, hello, assistant]
    assert tok.encode_chat(messages, add_generation_prompt=False) == [tok.bos_id, user, hello]
    assert tok.encode("hello", add_bos=False) == [hello] and tok.encode("hello") == [tok.bos_id, hello]
    assert tok.token_text(tok.eos_ids[0]) == "</s>"


def test_token_bytes_of_special_tokens_and_of_a_byte_level_tokenizer_json(smollm, tmp_path):
    """A special token's bytes are its text's; a byte-level vocabulary read from a tokenizer.json (HF
    checkpoints) spells its tokens in the byte alphabet too, which token_bytes undoes; a stream that ends
    partway through a character gives what the decoder holds when it is flushed."""
    import dataclasses

    tok = Tokenizer(smollm.tokenizer)
    end = tok.eos_ids[0]
    assert tok.token_bytes(end) == tok.token_text(end).encode() == b"<|im_end|>"
    path = tmp_path / "tokenizer.json"
    spec = json.loads(tok.tokenizer_json())
    added = len(tok.vocabulary())  # an added token spelled as text, with characters outside the byte alphabet
    spec["added_tokens"].append(
        {"id": added, "content": "<tool call ⟩", "single_word": False, "lstrip": False, "rstrip": False}
        | {"normalized": False, "special": True}
    )
    path.write_text(json.dumps(spec))
    hf = Tokenizer(dataclasses.replace(smollm.tokenizer, kind="hf-json", tokenizer_json=str(path)))
    assert hf.token_bytes(added) == "<tool call ⟩".encode()
    text = "Hello wörld 🙂 𓀀 ok"
    ids = hf.encode(text, add_bos=False)
    assert b"".join(hf.token_bytes(i) for i in ids) == text.encode("utf-8")
    cut = next(n for n in range(1, len(ids)) if tok.decode(ids[:n]).endswith("\ufffd"))
    dec = tok.stream_decoder()
    assert "".join(dec.push(i) for i in ids[:cut]) + dec.flush() == tok.decode(ids[:cut])
