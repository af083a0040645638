"""Models the tensor-parallel tests share."""

from __future__ import annotations

import shutil

import pytest
import torch


@pytest.fixture(scope="session")
def wide_llama(tiny_hf, tmp_path_factory) -> str:
    """The tiny Llama made wide enough for the fused decoder to cut o and down in 4 K ranges of 32+ columns
    (hidden 128, 4 heads of 32, MLP 256): with 4 chunks the order of the sum matters (with 2 it does not:
    a + b == b + a)."""
    import transformers as T

    small = tiny_hf("llama")
    config = T.LlamaConfig(
        vocab_size=T.AutoConfig.from_pretrained(small).vocab_size,
        hidden_size=128,
        intermediate_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_hidden_layers=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=False,
    )
    torch.manual_seed(7)
    folder = tmp_path_factory.mktemp("wide-llama")
    T.LlamaForCausalLM(config).eval().save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(small / name, folder / name)
    return str(folder)
