"""Random-weight GGUF files of real models' shapes, for timing what no package ships (or what cannot travel:
a lent GPU machine takes at most 64 MiB of files along, and SmolLM2's file alone is 98 MB).

Every matrix is Q4_0 (random codes and scales, the weights' standard deviation about 1/sqrt(width)), norms
float32. Decode speed does not depend on the values, so a file of a model's shape times that model's decode
step at Q4_0, though its text is noise (never measure speculation or stop rules on it).

    python -m metronome.bench.random_gguf --shape llama-3.2-1b --out /tmp/llama-1b.gguf
    python tools/bench_tp.py --model /tmp/llama-1b.gguf --tp 1,2,4 --threads 16

The MoE shapes (OLMoE's and Qwen3-MoE's layouts) are written by metronome.bench.moe with the same blocks.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class DenseShape:
    """A Llama-architecture decoder's dimensions (no biases, SwiGLU MLP, grouped-query attention)."""

    name: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    ffn: int
    vocab: int
    tie_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.hidden % self.heads or self.heads % self.kv_heads:
            raise ValueError(f"{self.name}: heads={self.heads} must divide hidden and be a multiple of kv_heads")
        if self.hidden % 32 or self.ffn % 32:
            raise ValueError(f"{self.name}: hidden and ffn must be multiples of 32 (Q4_0 blocks)")

    def parameters(self) -> int:
        d, kv = self.hidden, self.hidden // self.heads * self.kv_heads
        per_layer = 2 * d * d + 2 * d * kv + 3 * d * self.ffn
        return self.layers * per_layer + self.vocab * d * (1 if self.tie_embeddings else 2)


# Published configs (Meta's Llama 3.2 model cards / config.json), so that a figure on one reads as that model's.
SHAPES = {
    s.name: s
    for s in (
        DenseShape("llama-3.2-1b", hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, vocab=128256),
        DenseShape("llama-3.2-3b", hidden=3072, layers=28, heads=24, kv_heads=8, ffn=8192, vocab=128256),
        DenseShape(
            "llama-3.1-8b", hidden=4096, layers=32, heads=32, kv_heads=8, ffn=14336, vocab=128256, tie_embeddings=False
        ),
    )
}


def gpt2_byte_tokens() -> list[str]:
    """GPT-2's byte-level alphabet: one printable character per byte (so any text encodes)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, n = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + n)
            n += 1
    return [chars[b] for b in range(256)]


def random_q4_0(rng: np.random.Generator, rows: int, cols: int, scale: float) -> np.ndarray:
    """Random Q4_0 blocks (rows, cols/32*18) uint8: an fp16 d near `scale`/4.6 and 32 random 4-bit codes,
    so that the weights' standard deviation is about `scale`."""
    nb = cols // 32
    d = (rng.uniform(0.8, 1.2, (rows, nb, 1)) * scale / 4.6).astype(np.float16).view(np.uint8)
    codes = rng.integers(0, 256, (rows, nb, 16), dtype=np.uint8)
    return np.concatenate([d, codes], axis=-1).reshape(rows, nb * 18)


def add_byte_vocabulary(writer, vocab: int) -> None:
    """A byte-level BPE vocabulary of `vocab` entries: the 256 bytes, one merge, filler tokens, then <s> and
    </s>. The one merge (" t" -> "Ġt") is there because llama.cpp refuses a BPE vocabulary without merges
    ("cannot find tokenizer merges in model file") and the gguf writer leaves an empty list out."""
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(gpt2_byte_tokens() + ["Ġt"] + [f"<t{i}>" for i in range(vocab - 259)] + ["<s>", "</s>"])
    writer.add_token_types([1] * (vocab - 2) + [3, 3])
    writer.add_token_merges(["Ġ t"])
    writer.add_bos_token_id(vocab - 2)
    writer.add_eos_token_id(vocab - 1)


def write_random_dense(path: Path, shape: DenseShape, seed: int = 0) -> Path:
    """Write `shape` as a Llama GGUF of random Q4_0 matrices to `path`; returns `path`."""
    import gguf

    rng = np.random.default_rng(seed)
    s, d = shape, shape.hidden
    head_dim = d // s.heads
    w = gguf.GGUFWriter(path, "llama")
    w.add_name(f"random-{s.name}")
    w.add_block_count(s.layers)
    w.add_context_length(8192)
    w.add_embedding_length(d)
    w.add_feed_forward_length(s.ffn)
    w.add_head_count(s.heads)
    w.add_head_count_kv(s.kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(500000.0)
    add_byte_vocabulary(w, s.vocab)
    q4 = gguf.GGMLQuantizationType.Q4_0

    def matrix(name: str, rows: int, cols: int) -> None:
        data = random_q4_0(rng, rows, cols, cols**-0.5)
        w.add_tensor(name, data, raw_shape=data.shape, raw_dtype=q4)

    def norm(name: str) -> None:
        w.add_tensor(name, np.ones(d, dtype=np.float32))

    kv = head_dim * s.kv_heads
    matrix("token_embd.weight", s.vocab, d)
    if not s.tie_embeddings:
        matrix("output.weight", s.vocab, d)
    norm("output_norm.weight")
    for i in range(s.layers):
        b = f"blk.{i}."
        norm(b + "attn_norm.weight")
        norm(b + "ffn_norm.weight")
        matrix(b + "attn_q.weight", d, d)
        matrix(b + "attn_k.weight", kv, d)
        matrix(b + "attn_v.weight", kv, d)
        matrix(b + "attn_output.weight", d, d)
        matrix(b + "ffn_gate.weight", s.ffn, d)
        matrix(b + "ffn_up.weight", s.ffn, d)
        matrix(b + "ffn_down.weight", d, s.ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m metronome.bench.random_gguf", description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), required=True)
    parser.add_argument("--out", type=Path, required=True, help="the GGUF file to write (an existing one is kept)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    shape = SHAPES[args.shape]
    if args.out.is_file():
        print(f"{args.out}: exists, kept")
        return
    write_random_dense(args.out, shape, args.seed)
    print(f"{args.out}: {shape.name}, {shape.parameters() / 1e9:.2f}B weights, {args.out.stat().st_size / 1e9:.2f} GB")


if __name__ == "__main__":
    main()
