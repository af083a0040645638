"""Model shapes: built-in list, GGUF metadata or an HF config.json, dense or mixture-of-experts."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from metronome.config import ModelConfig, ParamError


def experts_touched(experts: int, per_token: int, rows: int) -> float:
    """Experts a step of `rows` token rows is expected to read, routing each row to `per_token` of
    `experts` at random: each expert is missed by all rows with probability (1 - k/e)^rows."""
    return experts * (1.0 - (1.0 - per_token / experts) ** rows)


@dataclass(frozen=True)
class ModelShape:
    """A `ModelConfig` plus what the planner needs for MoE models (num_experts = 0: dense)."""

    config: ModelConfig
    num_experts: int = 0
    experts_per_token: int = 0
    expert_width: int = (
        0  # a routed expert's MLP width (Qwen2/3-MoE, OLMoE: moe_intermediate_size); 0: intermediate_size
    )
    shared_width: int = 0  # Qwen2-MoE's always-on shared expert (0: none)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def attention_params(self) -> int:
        c = self.config
        p = c.hidden_size * c.q_size + 2 * c.hidden_size * c.kv_size + c.q_size * c.hidden_size
        return p + ((c.q_size + 2 * c.kv_size) if c.qkv_bias else 0)

    def mlp_width(self) -> int:
        """The width of one gated MLP: a routed expert's, or the whole MLP's of a dense model."""
        return self.expert_width if self.is_moe and self.expert_width else self.config.intermediate_size

    def expert_params(self) -> int:
        """One gated MLP (gate, up, down): a routed expert's, or the whole MLP of a dense model."""
        return 3 * self.config.hidden_size * self.mlp_width()

    def router_params(self) -> int:
        return self.config.hidden_size * self.num_experts if self.is_moe else 0

    def shared_params(self) -> int:
        """The shared expert and its gate, read by every token (Qwen2-MoE)."""
        d = self.config.hidden_size
        return 3 * d * self.shared_width + d if self.is_moe and self.shared_width else 0

    def mlp_params_total(self) -> int:
        return self.expert_params() * max(self.num_experts, 1) + self.router_params() + self.shared_params()

    def mlp_params_active(self, batch: int = 1) -> int:
        """MLP weights read by one step of `batch` tokens: the experts those tokens are expected to touch."""
        if not self.is_moe:
            return self.expert_params()
        touched = experts_touched(self.num_experts, self.experts_per_token, batch)
        return round(touched * self.expert_params()) + self.router_params() + self.shared_params()

    def layer_params_total(self) -> int:
        return self.attention_params() + self.mlp_params_total()

    def embedding_params(self) -> int:
        return self.config.vocab_size * self.config.hidden_size

    def head_params(self) -> int:
        """The output projection; stored again even when tied, since it lives on the last pipeline stage."""
        return self.embedding_params()

    def total_params(self) -> int:
        """Distinct weights (tied head counted once)."""
        c = self.config
        head = 0 if c.tie_embeddings else self.head_params()
        return c.num_layers * self.layer_params_total() + self.embedding_params() + head

    def active_params(self) -> int:
        """Weights one token multiplies (one expert set per layer, the head, no embedding table)."""
        c = self.config
        return c.num_layers * (self.attention_params() + self.mlp_params_active(1)) + self.head_params()

    def decode_bytes_per_token(self, weight_bits: int, batch: int = 1) -> float:
        """Weight bytes one decode step of `batch` tokens reads (embedding: one row per token)."""
        c = self.config
        params = c.num_layers * (self.attention_params() + self.mlp_params_active(batch)) + self.head_params()
        return params * weight_bits / 8 + batch * c.hidden_size * weight_bits / 8

    def kv_positions(self, layer: int, context: int) -> int:
        """Cached positions layer `layer` holds at `context` tokens (sliding-window layers stop growing)."""
        c = self.config
        if c.is_sliding(layer) and c.sliding_window is not None:
            return min(context, c.sliding_window)
        return context

    def kv_bytes(self, context: int, kv_bits: int, layers: range | None = None) -> float:
        """KV cache bytes of one sequence of `context` tokens over `layers` (default all)."""
        c = self.config
        rng = range(c.num_layers) if layers is None else layers
        return sum(2 * c.kv_size * self.kv_positions(i, context) for i in rng) * kv_bits / 8


def _cfg(**kw) -> ModelConfig:
    kw.setdefault("max_position", 4096)
    kw.setdefault("tie_embeddings", False)
    return ModelConfig(**kw)


def builtin_shapes() -> dict[str, ModelShape]:
    """Shapes from each model's published config.json (Hugging Face model cards)."""
    llama = dict(arch="llama", head_dim=128)
    return {
        "llama-2-7b": ModelShape(
            _cfg(
                name="llama-2-7b",
                vocab_size=32000,
                hidden_size=4096,
                intermediate_size=11008,
                num_layers=32,
                num_heads=32,
                num_kv_heads=32,
                **llama,
            )
        ),
        "llama-2-70b": ModelShape(
            _cfg(
                name="llama-2-70b",
                vocab_size=32000,
                hidden_size=8192,
                intermediate_size=28672,
                num_layers=80,
                num_heads=64,
                num_kv_heads=8,
                **llama,
            )
        ),
        "llama-3.1-8b": ModelShape(
            _cfg(
                name="llama-3.1-8b",
                vocab_size=128256,
                hidden_size=4096,
                intermediate_size=14336,
                num_layers=32,
                num_heads=32,
                num_kv_heads=8,
                max_position=131072,
                rope_theta=500000.0,
                **llama,
            )
        ),
        "llama-3.1-70b": ModelShape(
            _cfg(
                name="llama-3.1-70b",
                vocab_size=128256,
                hidden_size=8192,
                intermediate_size=28672,
                num_layers=80,
                num_heads=64,
                num_kv_heads=8,
                max_position=131072,
                rope_theta=500000.0,
                **llama,
            )
        ),
        "mixtral-8x7b": ModelShape(
            _cfg(
                name="mixtral-8x7b",
                vocab_size=32000,
                hidden_size=4096,
                intermediate_size=14336,
                num_layers=32,
                num_heads=32,
                num_kv_heads=8,
                max_position=32768,
                rope_theta=1e6,
                **llama,
            ),
            num_experts=8,
            experts_per_token=2,
        ),
        "smollm2-135m": ModelShape(
            _cfg(
                name="smollm2-135m",
                arch="llama",
                vocab_size=49152,
                hidden_size=576,
                intermediate_size=1536,
                num_layers=30,
                num_heads=9,
                num_kv_heads=3,
                head_dim=64,
                max_position=8192,
                rope_theta=100000.0,
                tie_embeddings=True,
            )
        ),
        "gemma-3-270m": ModelShape(
            _cfg(
                name="gemma-3-270m",
                arch="gemma3",
                vocab_size=262144,
                hidden_size=640,
                intermediate_size=2048,
                num_layers=18,
                num_heads=4,
                num_kv_heads=1,
                head_dim=256,
                max_position=32768,
                tie_embeddings=True,
                qk_norm=True,
                sandwich_norms=True,
                activation="gelu_tanh",
                sliding_window=512,
                sliding_window_pattern=6,
            )
        ),
    }


def _gguf_shape(path: Path) -> ModelShape:
    import gguf  # local: only GGUF paths need it

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # the reader raises assorted errors on a bad file
        raise ValueError(f"{path}: not a readable GGUF file ({e}); pass a .gguf model or a built-in name") from e

    fields = reader.fields

    def get(key: str, default=None):
        f = fields.get(key)
        return default if f is None else f.contents()

    arch = get("general.architecture")
    if arch is None:
        raise ValueError(f"{path}: GGUF has no general.architecture key; is it a model file?")
    need = ["block_count", "embedding_length", "feed_forward_length", "attention.head_count"]
    missing = [f"{arch}.{k}" for k in need if get(f"{arch}.{k}") is None]
    if missing:
        raise ValueError(f"{path}: GGUF metadata lacks {missing}; the planner needs them to size the model")
    d, heads = int(get(f"{arch}.embedding_length")), int(get(f"{arch}.attention.head_count"))
    tokens = get("tokenizer.ggml.tokens")
    vocab = int(get(f"{arch}.vocab_size", len(tokens) if tokens is not None else 0))
    tensor_names = {t.name for t in reader.tensors}
    window = get(f"{arch}.attention.sliding_window")
    cfg = ModelConfig(
        arch=str(arch),
        name=str(get("general.name", path.stem)),
        vocab_size=vocab,
        hidden_size=d,
        intermediate_size=int(get(f"{arch}.feed_forward_length")),
        num_layers=int(get(f"{arch}.block_count")),
        num_heads=heads,
        num_kv_heads=int(get(f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(get(f"{arch}.attention.key_length", d // heads)),
        max_position=int(get(f"{arch}.context_length", 2048)),
        rope_theta=float(get(f"{arch}.rope.freq_base", 10000.0)),
        tie_embeddings="output.weight" not in tensor_names,
        sliding_window=int(window) if window is not None else None,
        sliding_window_pattern=6 if (window is not None and arch == "gemma3") else 0,
    )
    experts = int(get(f"{arch}.expert_count", 0))
    return ModelShape(
        _as_the_engine_reads(path, cfg),
        num_experts=experts,
        experts_per_token=int(get(f"{arch}.expert_used_count", 0)),
        expert_width=int(get(f"{arch}.expert_feed_forward_length", 0)),
        shared_width=int(get(f"{arch}.expert_shared_feed_forward_length", 0)),
    )


def _hf_shape(path: Path) -> ModelShape:
    file = path / "config.json" if path.is_dir() else path
    folder = path if path.is_dir() else path.parent  # the model's name: its folder's, not "config.json"
    try:
        raw = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{file}: cannot read an HF config.json ({e}); pass a model folder or a built-in name") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("text_config", raw), dict):
        raise ValueError(
            f"{file}: config.json is not a JSON object of settings; pass a model folder or a built-in name"
        )
    top = raw
    raw = raw.get("text_config", raw)  # multimodal wrappers (Gemma 3) nest the language model
    if "n_routed_experts" in raw or "kv_lora_rank" in raw:  # DeepSeek V2/V3: its experts under other names
        raise ValueError(
            f"{file}: a DeepSeek-style model (n_routed_experts, multi-head latent attention); the planner models "
            "Llama-style attention and Mixtral/Qwen-style experts only, and would size this one wrongly"
        )
    try:
        d, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        if d < 1 or heads < 1:
            raise ValueError(f"{file}: hidden_size {d} and num_attention_heads {heads} must be at least 1")
        cfg = ModelConfig(
            arch=str(raw.get("model_type", top.get("model_type", "llama"))),
            name=folder.name,
            vocab_size=int(raw.get("vocab_size", top.get("vocab_size", 0))),
            hidden_size=d,
            intermediate_size=int(raw["intermediate_size"]),
            num_layers=int(raw["num_hidden_layers"]),
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads", heads)),
            head_dim=int(raw.get("head_dim") or d // heads),
            max_position=int(raw.get("max_position_embeddings", 2048)),
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            tie_embeddings=bool(top.get("tie_word_embeddings", raw.get("tie_word_embeddings", True))),
            # 0 or null: no window (transformers writes either); a window with no pattern sizes nothing
            sliding_window=int(raw["sliding_window"]) if raw.get("sliding_window") else None,
            sliding_window_pattern=int(raw.get("sliding_window_pattern", 0)),
        )
    except KeyError as e:
        raise ValueError(f"{file}: config.json lacks {e}; the planner needs it to size the model") from e
    except ParamError:  # ModelConfig's own checks: load_shape names the model
        raise
    except (TypeError, ValueError) as e:  # null, a list or text where a number goes
        raise ValueError(f"{file}: a size in config.json is not a number ({e}); fix the file") from e
    experts = int(raw.get("num_local_experts", raw.get("num_experts", 0)) or 0)
    return ModelShape(
        _as_the_engine_reads(path.parent if path.name == "config.json" else path, cfg),
        num_experts=experts,
        experts_per_token=int(raw.get("num_experts_per_tok", 0) or 0),
        expert_width=int(raw.get("moe_intermediate_size", 0) or 0),  # Mixtral's experts are intermediate_size wide
        shared_width=int(raw.get("shared_expert_intermediate_size", 0) or 0),
    )


def _as_the_engine_reads(path: Path, cfg: ModelConfig) -> ModelConfig:
    """The engine's own reading of a model it runs (its norms, biases, activation and rope as the loader
    finds them), under the planner's name for it; `cfg` (the generic Llama-style reading above) for one it
    does not run. A registered model planned by its short name was read with none of Gemma 3's QK and
    sandwich norms, and got another plan than the same model by its built-in name."""
    from metronome.model.errors import ModelFileError
    from metronome.model.loader import read_config  # loads torch: only for a file or folder

    try:
        return dataclasses.replace(read_config(path), name=cfg.name)
    except ModelFileError:
        return cfg


MAX_LAYERS = 512  # the deepest published models have about 130; 500 layers plan in about 40 s here


def load_shape(spec: str) -> ModelShape:
    """A built-in name (e.g. "llama-2-70b"), a registered model's name (`metronome models`: its file, assembled
    from its packages if need be), a .gguf file, or an HF folder / config.json."""
    from metronome.model.registry import names, resolve

    shapes = builtin_shapes()
    if spec.lower() in shapes:
        return shapes[spec.lower()]
    path = Path(spec)
    if not path.exists() and spec in names():
        path = resolve(spec)  # a ModelNotFoundError (a ValueError) says how to install it
    if not path.exists():
        raise ValueError(
            f"MODEL {spec!r} is neither a built-in name ({', '.join(shapes)}), a registered model "
            f"({', '.join(names())}) nor an existing path"
        )
    try:
        shape = _gguf_shape(path) if path.suffix == ".gguf" else _hf_shape(path)
    except ParamError as exc:  # ModelConfig's checks: no network has these sizes
        raise ValueError(f"{spec}: {exc}") from exc
    if shape.experts_per_token and not shape.is_moe:
        raise ValueError(f"{spec}: {shape.experts_per_token} experts per token but no expert count the planner reads")
    if shape.is_moe and not 0 < shape.experts_per_token <= shape.num_experts:
        raise ValueError(f"{spec}: {shape.num_experts} experts but {shape.experts_per_token} per token")
    c = shape.config
    sizes = {
        "hidden size": c.hidden_size,
        "MLP width": shape.mlp_width(),
        "layers": c.num_layers,
        "attention heads": c.num_heads,
        "KV heads": c.num_kv_heads,
        "head size": c.head_dim,
        "vocabulary": c.vocab_size,
        "context": c.max_position,
    }
    bad = {what: n for what, n in sizes.items() if n < 1}
    if bad:
        raise ValueError(f"{spec}: " + ", ".join(f"{what} {n}" for what, n in bad.items()) + ": must be at least 1")
    if c.num_layers > MAX_LAYERS:
        raise ValueError(
            f"{spec}: {c.num_layers} layers; the planner sizes models of up to {MAX_LAYERS} (its search over "
            "pipeline stages grows with the square of the layers: 2,000 ran for minutes without a word)"
        )
    return shape
