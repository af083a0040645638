"""Shared fixtures: the shipped models, and tiny random HF models built by transformers in the test."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import pytest
import torch

from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.model.loader import default_model_path, load

torch.set_num_threads(2)
# Plans compiled by tests are cached in a directory of their own, never read from the user's cache.
TEST_PLAN_CACHE = tempfile.mkdtemp(prefix="metronome-test-plans-")
os.environ["METRONOME_PLAN_CACHE"] = TEST_PLAN_CACHE

TINY_VOCAB = ["<unk>", "<s>", "</s>", "<|user|>", "<|assistant|>"] + [
    w
    for w in "the a of and to in is it you that he was for on are with as his they at be this from have or by one had "
    "not but what all were when we there can an your which their said if do will each about how up out them then she "
    "many some so these would other into has more her two like him see time could no make than first been its who now "
    "people my made over did down only way find use may water long little very after words called just where most know "
    "hello world red green blue cat dog sun moon star tree fish bird".split()
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|user|> {{ m['content'] }} "
    "{% else %}<|assistant|> {{ m['content'] }} </s> {% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


SHIPPED_MODEL_FIXTURES = frozenset({"smollm_path", "gemma_path"})


def pytest_sessionfinish(session, exitstatus) -> None:
    """Remove this run's plan cache: each run's compiled plans (up to ~280 MB with the shipped models) used to
    stay in /tmp, one folder a run."""
    shutil.rmtree(TEST_PLAN_CACHE)


def pytest_collection_modifyitems(config, items) -> None:
    """Mark every test that loads a shipped model (through any fixture chain) `model`, so that
    `make test-fast` (-m "not model and not slow and not browser") keeps the model-free and tiny-model tests."""
    for item in items:
        if SHIPPED_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.model)


@pytest.fixture(scope="session")
def smollm_path() -> Path:
    return default_model_path()


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """Gemma 3 270M from the model registry: its parts assembled once into the model cache, sha256-verified."""
    from metronome.model.registry import resolve

    return resolve("gemma3-270m")


@pytest.fixture(scope="session")
def smollm(smollm_path):
    return load(smollm_path)


def _word_tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(TINY_VOCAB)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.add_special_tokens(TINY_VOCAB[:5])
    return tok.to_str()


def _hf_config(arch: str):
    import transformers as T

    common = dict(
        vocab_size=len(TINY_VOCAB),
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=1,
        eos_token_id=2,
    )
    if arch == "llama":  # untied head, llama3 rope scaling
        return T.LlamaForCausalLM, T.LlamaConfig(
            num_hidden_layers=2,
            tie_word_embeddings=False,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
                "rope_theta": 500000.0,
            },
            **common,
        )
    if arch == "mistral":
        return T.MistralForCausalLM, T.MistralConfig(
            num_hidden_layers=2, tie_word_embeddings=True, sliding_window=None, **common
        )
    if arch == "qwen2":  # qkv bias
        return T.Qwen2ForCausalLM, T.Qwen2Config(num_hidden_layers=2, tie_word_embeddings=True, **common)
    if arch == "qwen3":  # QK-norm, head_dim != hidden/heads
        return T.Qwen3ForCausalLM, T.Qwen3Config(num_hidden_layers=2, head_dim=32, tie_word_embeddings=False, **common)
    if arch == "gemma3":  # sliding window 8 on layers 0-1, global layer 2, GeGLU, sandwich norms
        common.update(num_key_value_heads=1)
        return T.Gemma3ForCausalLM, T.Gemma3TextConfig(
            num_hidden_layers=3,
            head_dim=32,
            sliding_window=8,
            query_pre_attn_scalar=32,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            **common,
        )
    raise ValueError(arch)


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Callable[[str], Path]:
    """Build (once per arch) a tiny random HF model folder: config.json, safetensors, tokenizer files."""
    built: dict[str, Path] = {}

    def make(arch: str) -> Path:
        if arch not in built:
            cls, config = _hf_config(arch)
            torch.manual_seed(1234)
            model = cls(config).eval()
            with torch.no_grad():  # random norms so that the (1 + w) conventions are exercised
                for name, p in model.named_parameters():
                    if "norm" in name:
                        p.normal_(0.0 if arch == "gemma3" else 1.0, 0.3)
            folder = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(folder)
            (folder / "tokenizer.json").write_text(_word_tokenizer_json())
            (folder / "tokenizer_config.json").write_text(
                json.dumps(
                    {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True, "chat_template": CHAT_TEMPLATE}
                )
            )
            built[arch] = folder
        return built[arch]

    return make


@pytest.fixture(scope="module")
def smollm_engine(smollm):
    """The embedded model in its default CPU plan (int4), 8 slots."""
    return Engine.from_model(config=EngineConfig(slots=8, ctx=512), loaded=smollm)
