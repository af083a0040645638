"""Tiny random mixture-of-experts models for tests: built by transformers (fixed seed), saved as HF folders
in both expert layouts, and written as GGUF files with the `gguf` package's writer (llama.cpp's names)."""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import torch

ARCHS = ("mixtral", "qwen2moe", "qwen3moe", "olmoe")
# 96 tokens. The last two and "w9" make one BPE merge ("w" + "9"): llama.cpp refuses a BPE vocabulary without
# merges, the gguf writer leaves an empty list out, and a merge must join two tokens into a third.
VOCAB = ["<unk>", "<s>", "</s>"] + [f"w{i}" for i in range(91)] + ["w", "9"]
MERGES = ["w 9"]
GGUF_ARCH = {"mixtral": "llama", "qwen2moe": "qwen2moe", "qwen3moe": "qwen3moe", "olmoe": "olmoe"}


def hf_config(arch: str, kv_heads: int = 2, wide: bool = False):
    """(model class, config): 2 layers, hidden 64, 4 heads of 16 (`kv_heads` KV heads), 8 experts of width 64;
    top-2 for Mixtral (its own k), top-3 for the others (with three experts a row's sum order matters to its
    bits). Widths are multiples of 32 so that the fused decoder's blocks fit. `wide`: every width doubled
    (hidden 128, heads of 32, experts and the shared expert 128), so that the fused decoder's Q8_0 blocks
    still fit when o and the experts are cut in 4 chunks (tensor parallel)."""
    import transformers as T

    w = 2 if wide else 1
    common = dict(
        vocab_size=len(VOCAB),
        hidden_size=64 * w,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        num_experts_per_tok=2 if arch == "mixtral" else 3,
        tie_word_embeddings=False,
    )
    if arch == "mixtral":
        return T.MixtralForCausalLM, T.MixtralConfig(intermediate_size=64 * w, num_local_experts=8, **common)
    if arch == "qwen2moe":  # shared expert with its sigmoid gate; softmax weights not renormalized
        return T.Qwen2MoeForCausalLM, T.Qwen2MoeConfig(
            intermediate_size=128,
            moe_intermediate_size=64 * w,
            shared_expert_intermediate_size=128 if wide else 96,
            num_experts=8,
            norm_topk_prob=False,
            **common,
        )
    if arch == "qwen3moe":  # per-head QK norm, head_dim given, renormalized top-k
        return T.Qwen3MoeForCausalLM, T.Qwen3MoeConfig(
            intermediate_size=128,
            moe_intermediate_size=64 * w,
            num_experts=8,
            head_dim=16 * w,
            norm_topk_prob=True,
            **common,
        )
    if arch == "olmoe":  # QK norm over the whole projection
        return T.OlmoeForCausalLM, T.OlmoeConfig(
            intermediate_size=64 * w, num_experts=8, norm_topk_prob=False, **common
        )
    raise ValueError(arch)


def build(
    arch: str,
    seed: int = 1234,
    kv_heads: int = 2,
    gain: float | None = None,
    router_std: float = 0.5,
    wide: bool = False,
):
    """The transformers model (float32, eval), with random norms and routers of std `router_std` (0.5: a
    spread wide enough that top-k choices are not near-ties at float32 rounding differences). With
    `gain`, every other matrix is drawn with std gain / sqrt(fan-in) instead of transformers' 0.02, and biases
    with std 0.1: logits spread over several units, so that greedy choices are rarely near-ties either (a test
    of greedy tokens against another engine, whose rounding differs, is then meaningful at most steps)."""
    cls, config = hf_config(arch, kv_heads, wide)
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if gain is not None and "norm" not in name and "gate.weight" not in name:
                p.normal_(0.0, gain * p.shape[-1] ** -0.5 if p.dim() >= 2 else 0.1)
            if "norm" in name:
                p.normal_(1.0, 0.3)
            elif name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight"):
                p.normal_(0.0, router_std)
            elif "shared_expert_gate" in name:
                p.normal_(0.0, 0.3)
    return model


def _write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(VOCAB[:3])
    (folder / "tokenizer.json").write_text(tok.to_str())
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))


def save_hf(model, folder: Path, stacked: bool) -> Path:
    """An HF folder: `stacked` writes the experts as transformers 5 holds them (gate_up_proj (E, 2I, D),
    down_proj (E, D, I)); otherwise save_pretrained's per-expert tensors."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if stacked:
        from safetensors.torch import save_file

        for f in folder.glob("*.safetensors"):
            f.unlink()
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        assert any(k.endswith("experts.gate_up_proj") for k in state), "transformers holds experts stacked"
        save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_tokenizer(folder)
    return folder


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's Q/K row order for llama-family files (interleaved RoPE pairs)."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(loaded, path: Path, expert_type: str = "Q8_0", matrix_type: str = "Q8_0") -> Path:
    """A GGUF file of metronome's loaded (float) model, under llama.cpp's tensor names: experts stacked as
    ffn_{gate,up,down}_exps in `expert_type` blocks, other matrices in `matrix_type`, router and norms F32."""
    cfg, W = loaded.config, {k: v.float().numpy() for k, v in loaded.weights.items()}
    arch = GGUF_ARCH[cfg.arch]
    w = gguf.GGUFWriter(path, arch)
    w.add_block_count(cfg.num_layers)
    w.add_context_length(cfg.max_position)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.moe_intermediate_size if arch == "llama" else cfg.intermediate_size)
    w.add_head_count(cfg.num_heads)
    w.add_head_count_kv(cfg.num_kv_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_expert_count(cfg.num_experts)
    w.add_expert_used_count(cfg.experts_per_token)
    if arch != "llama":
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if cfg.shared_expert_size:
        w.add_expert_shared_feed_forward_length(cfg.shared_expert_size)
    w.add_tokenizer_model("gpt2")
    w.add_token_list(VOCAB)
    w.add_token_types([3, 3, 3] + [1] * (len(VOCAB) - 3))
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)

    def put(name: str, x: np.ndarray, qtype: str = "F32") -> None:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if qtype == "F32":
            w.add_tensor(name, x)
        else:
            kind = gguf.GGMLQuantizationType[qtype]
            data = gguf.quants.quantize(x, kind)
            w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=kind)

    put("token_embd.weight", W["embed.weight"], matrix_type)
    put("output_norm.weight", W["norm.weight"])
    put("output.weight", W["head.weight"], matrix_type)
    for i in range(cfg.num_layers):
        p, b = f"layers.{i}.", f"blk.{i}."
        q, k = W[p + "wq.weight"], W[p + "wk.weight"]
        if arch == "llama":
            q, k = _permute(q, cfg.num_heads), _permute(k, cfg.num_kv_heads)
        put(b + "attn_norm.weight", W[p + "attn_norm.weight"])
        put(b + "attn_q.weight", q, matrix_type)
        put(b + "attn_k.weight", k, matrix_type)
        put(b + "attn_v.weight", W[p + "wv.weight"], matrix_type)
        put(b + "attn_output.weight", W[p + "wo.weight"], matrix_type)
        if cfg.qkv_bias:
            for g, m in (("attn_q", "wq"), ("attn_k", "wk"), ("attn_v", "wv")):
                put(b + g + ".bias", W[p + m + ".bias"])
        if cfg.qk_norm:
            put(b + "attn_q_norm.weight", W[p + "q_norm.weight"])
            put(b + "attn_k_norm.weight", W[p + "k_norm.weight"])
        put(b + "ffn_norm.weight", W[p + "mlp_norm.weight"])
        put(b + "ffn_gate_inp.weight", W[p + "router.weight"])
        for g, m in (("ffn_gate_exps", "w_gate"), ("ffn_up_exps", "w_up"), ("ffn_down_exps", "w_down")):
            stacked = np.stack([W[f"{p}experts.{e}.{m}.weight"] for e in range(cfg.num_experts)])
            put(b + g + ".weight", stacked, expert_type)
        if cfg.shared_expert_size:
            for g, m in (("ffn_gate_shexp", "w_gate"), ("ffn_up_shexp", "w_up"), ("ffn_down_shexp", "w_down")):
                put(b + g + ".weight", W[f"{p}shared.{m}.weight"], expert_type)
            put(b + "ffn_gate_inp_shexp.weight", W[p + "shared_gate.weight"].reshape(-1))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
