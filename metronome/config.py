"""Frozen configuration records, resolved once and passed down the pipeline."""

from __future__ import annotations

import contextlib
import enum
import math
import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path


class ParamError(ValueError):
    """A setting or request parameter out of range; `param` names it (for a CLI flag or an API 400)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def check_fields(record: object, checks: list[tuple[str, bool, str]]) -> None:
    """Raise ParamError for the first failed (name, ok, what) check. The list is built before it is read:
    check the fields' kinds in one call (is_integer, is_number) and their ranges in the next, or a range
    check raises its own TypeError on a value of the wrong kind."""
    for name, ok, what in checks:
        if not ok:
            raise ParamError(name, f"{name}={getattr(record, name)!r}: {what}")


def is_integer(x: object, optional: bool = False) -> bool:
    """An int, and not a bool (True would pass as 1); None too when `optional`. A float such as 2.5 or 2.0
    is refused: fields counted in units (slots, rounds, bytes) failed deep inside torch or a loop otherwise."""
    return (optional and x is None) or (isinstance(x, int) and not isinstance(x, bool))


def is_number(x: object, optional: bool = False) -> bool:
    """A finite int or float, not a bool; None too when `optional`. NaN passes every `not x < y` test
    and compares false with everything, so range checks alone let it through."""
    return (optional and x is None) or (isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x))


def is_text(x: object, optional: bool = False) -> bool:
    """A str with something besides whitespace in it; None too when `optional`."""
    return (optional and x is None) or (isinstance(x, str) and x.strip() != "")


def cache_root() -> Path:
    """Where metronome keeps what it builds or assembles: $METRONOME_CACHE_DIR, default ~/.cache/metronome.
    Everything lives under it (kernels, digests, plans/, models/, whisper-base/), so one variable moves it all;
    METRONOME_PLAN_CACHE and METRONOME_MODEL_CACHE move the two largest on their own."""
    return Path(os.environ.get("METRONOME_CACHE_DIR") or Path.home() / ".cache" / "metronome")


# A temporary file in the cache this old was left by a killed write: a plan is written in seconds (a minute for
# the largest), a model assembled in seconds. Each is as large as what it was becoming, and nothing reads it.
STALE_PARTIAL_S = 3600.0


def remove_stale_partials(files: Iterable[Path]) -> None:
    """Remove those of `files` (a cache's temporary files) older than STALE_PARTIAL_S; a younger one may be
    another process's write in progress."""
    for left in files:
        with contextlib.suppress(OSError):  # gone already, or not ours to remove: it only costs disk
            if time.time() - left.stat().st_mtime > STALE_PARTIAL_S:
                left.unlink()


class StrChoice(enum.StrEnum):
    """A setting with a fixed set of string values. Members compare, hash, format and print as their
    value (`Weights.INT4 == "int4"`, `f"{w}"` is "int4"), and repr as the plain string, so a record's repr
    (a plan cache key) reads the same as when the setting was a str."""

    def __repr__(self) -> str:
        return repr(self.value)

    @classmethod
    def choices(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)

    @classmethod
    def parse(cls, param: str, value: object) -> StrChoice:
        """`value` as a member, or ParamError naming `param`."""
        try:
            return cls(value)
        except ValueError:
            raise ParamError(param, f"{param}={value!r}: choose one of {', '.join(cls.choices())}") from None


class Weights(StrChoice):
    """The run-time weight format; int8/int4 are weight-only, where the file's blocks allow (CPU)."""

    AUTO = "auto"
    F32 = "f32"
    BF16 = "bf16"
    INT8 = "int8"
    INT4 = "int4"


class Kernels(StrChoice):
    """auto: the C++ kernels on CPU when they build, else torch; cpp: the C++ kernels, required; torch."""

    AUTO = "auto"
    CPP = "cpp"
    TORCH = "torch"


class KvCache(StrChoice):
    """The KV cache's format. auto: the activations' dtype of the plan (bfloat16 with int4/int8 weights);
    int8: a row of head_dim bytes and a float32 scale for each 16 (kernels/csrc/simd.h), 5/8 of bfloat16's
    bytes, so that attention deep in long contexts reads less, at a small cost in accuracy
    (docs/performance.md, "An int8 KV cache"). int8 runs on the fused C++ decoder only."""

    AUTO = "auto"
    INT8 = "int8"


class Layout(StrChoice):
    """Where prompts run: in the engine's own steps (colocated), or on a prefill worker whose KV moves into
    the engine's decode slots (disaggregated; parallel/disagg.py)."""

    COLOCATED = "colocated"
    DISAGGREGATED = "disaggregated"


@dataclass(frozen=True)
class RopeScaling:
    """Llama 3 style frequency scaling ("llama3"), linear position interpolation ("linear"), or explicit
    per-frequency divisors as GGUF files store them ("factors")."""

    kind: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    factors: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        # read from a file's settings: a low_freq_factor of 0 divided by zero when the rope was built, and a
        # negative factor ran as another network with no word said
        check_fields(
            self,
            [
                ("kind", self.kind in ("llama3", "linear", "factors"), "choose llama3, linear or factors"),
                ("factor", is_number(self.factor) and self.factor > 0, "must be a finite positive number"),
                ("factors", all(is_number(f) and f > 0 for f in self.factors), "must be finite positive divisors"),
                ("factors", self.kind != "factors" or len(self.factors) > 0, "must list the divisors"),
            ],
        )
        if self.kind == "llama3":
            check_fields(
                self,
                [
                    (
                        "low_freq_factor",
                        is_number(self.low_freq_factor) and self.low_freq_factor > 0,
                        "must be a finite positive number",
                    ),
                    (
                        "high_freq_factor",
                        is_number(self.high_freq_factor) and self.high_freq_factor > self.low_freq_factor,
                        "must be a finite number above low_freq_factor (the blend divides by their difference)",
                    ),
                    (
                        "original_max_position",
                        is_integer(self.original_max_position) and self.original_max_position >= 1,
                        "must be a positive number of positions",
                    ),
                ],
            )


@dataclass(frozen=True)
class ModelConfig:
    """The shape of a decoder-only transformer, as read from a GGUF file or an HF config.json.

    `arch` is the family: "llama" (also SmolLM2, Mistral), "qwen2" (qkv bias), "qwen3" (QK-norm), "gemma3".
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    max_position: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_embeddings: bool = True
    qkv_bias: bool = False
    qk_norm: bool = False
    activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    # Gemma 3 specifics
    sliding_window: int | None = None  # window of the local layers
    sliding_window_pattern: int = 0  # every Nth layer is global (0: all layers global)
    rope_local_theta: float | None = None  # rope base of the local layers
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5 (default head_dim)
    embed_scale: float = 1.0  # Gemma multiplies embeddings by sqrt(hidden_size)
    sandwich_norms: bool = False  # Gemma: post-attention and post-MLP norms
    final_logit_softcap: float | None = None
    # Mixture of experts (docs/moe.md): every layer's MLP is `num_experts` experts of width
    # `moe_intermediate_size`, `experts_per_token` of them run per token (softmax over the router's logits,
    # then top-k; `norm_topk_prob`: the k weights renormalized to sum to 1); 0 experts: a dense MLP.
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    shared_expert_size: int = 0  # Qwen2-MoE: an always-on expert of this width, scaled by sigmoid(x @ gate)
    qk_norm_full: bool = False  # OLMoE: the Q/K norms span the whole projection, not one head
    name: str = ""

    def __post_init__(self) -> None:
        # what a network can be built from (a damaged or hostile file's metadata is read into these); the
        # loaders report a failure as the file's fault (ModelFileError)
        check_fields(
            self,
            [
                ("vocab_size", self.vocab_size >= 1, "must be positive"),
                ("hidden_size", self.hidden_size >= 1, "must be positive"),
                ("num_layers", self.num_layers >= 1, "must be positive"),
                ("num_heads", self.num_heads >= 1, "must be positive"),
                ("num_kv_heads", 1 <= self.num_kv_heads <= self.num_heads, "must be in [1, num_heads]"),
                (
                    "num_kv_heads",
                    self.num_kv_heads >= 1 and self.num_heads % self.num_kv_heads == 0,  # (checks run at once)
                    "must divide num_heads (grouped queries)",
                ),
                ("head_dim", self.head_dim >= 2 and self.head_dim % 2 == 0, "must be even and positive (RoPE pairs)"),
                ("intermediate_size", self.intermediate_size >= (0 if self.num_experts else 1), "must be positive"),
                ("max_position", self.max_position >= 1, "must be positive"),
                ("rms_norm_eps", 0.0 < self.rms_norm_eps < 1.0, "must be in (0, 1)"),
                ("rope_theta", math.isfinite(self.rope_theta) and self.rope_theta > 0, "must be finite and positive"),
                ("num_experts", self.num_experts >= 0, "must be 0 (dense) or positive"),
                # Gemma 3's: a negative scalar made the attention scale complex, a text softcap failed the first
                # step, and a window of 0 attended to nothing
                (
                    "query_pre_attn_scalar",
                    self.query_pre_attn_scalar is None
                    or (is_number(self.query_pre_attn_scalar) and self.query_pre_attn_scalar > 0),
                    "must be a finite positive number (or None: head_dim)",
                ),
                (
                    "final_logit_softcap",
                    self.final_logit_softcap is None
                    or (is_number(self.final_logit_softcap) and self.final_logit_softcap >= 0),
                    "must be a finite positive number (0 or None: no cap)",
                ),
                (
                    "sliding_window",
                    self.sliding_window is None or (is_integer(self.sliding_window) and self.sliding_window >= 1),
                    "must be a positive number of positions (or None)",
                ),
                (
                    "rope_local_theta",
                    self.rope_local_theta is None or (is_number(self.rope_local_theta) and self.rope_local_theta > 0),
                    "must be finite and positive (or None)",
                ),
                ("embed_scale", is_number(self.embed_scale) and self.embed_scale > 0, "must be finite and positive"),
            ],
        )
        if self.num_experts:
            check_fields(
                self,
                [
                    ("experts_per_token", 1 <= self.experts_per_token <= self.num_experts, "must be in [1, experts]"),
                    ("moe_intermediate_size", self.moe_intermediate_size >= 1, "must be positive for an MoE model"),
                ],
            )

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    def is_sliding(self, layer: int) -> bool:
        """True where layer `layer` attends only to the last `sliding_window` positions."""
        if self.sliding_window is None or self.sliding_window_pattern <= 0:
            return False
        return (layer + 1) % self.sliding_window_pattern != 0

    def num_parameters(self) -> int:
        """Weights count (embedding counted once when tied)."""
        d, f, L = self.hidden_size, self.intermediate_size, self.num_layers
        attn = d * self.q_size + 2 * d * self.kv_size + self.q_size * d
        if self.qkv_bias:
            attn += self.q_size + 2 * self.kv_size
        mlp = 3 * d * f
        if self.is_moe:
            mlp = self.num_experts * (3 * d * self.moe_intermediate_size + d) + self._shared_parameters()
        norms = (4 if self.sandwich_norms else 2) * d + (
            (self.q_size + self.kv_size if self.qk_norm_full else 2 * self.head_dim) if self.qk_norm else 0
        )
        emb = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return L * (attn + mlp + norms) + emb + d

    def _shared_parameters(self) -> int:
        return 3 * self.hidden_size * self.shared_expert_size + self.hidden_size if self.shared_expert_size else 0

    def active_parameters(self) -> int:
        """Weights one token reads: `num_parameters` with only `experts_per_token` experts per layer (plus
        the router and any shared expert); the dense count for a dense model."""
        if not self.is_moe:
            return self.num_parameters()
        idle = self.num_experts - self.experts_per_token
        return self.num_parameters() - self.num_layers * idle * 3 * self.hidden_size * self.moe_intermediate_size


# The smallest positive temperature, top_p and repetition penalty: the sampler divides and compares in float32,
# where much smaller values overflow the logits or round to 0 (5e-324 failed the step; found by fuzzing the API).
MIN_SAMPLING_FLOAT = 1e-6
MAX_LOGIT_BIAS = 100.0  # OpenAI's range for logit_bias values
MAX_STOP_CHARS = 1000  # the longest stop string (a sentence or a code fence; not a document)


@dataclass(frozen=True)
class SamplingParams:
    """How one request picks its tokens; defaults are greedy. Checked when built (ParamError names the field)."""

    # 0: the prompt only (nothing sampled; the request ends "length" once the prompt is in the cache), what
    # scoring a text asks for with prompt_logprobs (the completions API's max_tokens 0 with echo)
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    # (token id, bias) pairs added to the logits before anything else (OpenAI's logit_bias): -100 bans a
    # token, +100 all but forces it; a dict {id: bias} is accepted and stored as pairs sorted by id
    logit_bias: tuple[tuple[int, float], ...] = ()
    # the log-probability of each prompt token after the first under the model's raw logits, with
    # top_logprobs alternatives (what the completions API's echo reports with logprobs): every prompt row
    # then runs the head, and the prompt skips the prefix cache (cached rows would have no logits)
    prompt_logprobs: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):  # one stop string, as OpenAI takes it (tuple() would split its letters)
            object.__setattr__(self, "stop", (self.stop,))
        # a list given for a tuple field: stored as a tuple (the record stays hashable)
        for name in ("stop", "stop_token_ids"):
            value = getattr(self, name)
            if value is None:  # what OpenAI's clients send for none
                object.__setattr__(self, name, ())
            elif not isinstance(value, tuple):
                if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
                    raise ParamError(name, f"{name} must be a list, not {type(value).__name__} ({value!r})")
                object.__setattr__(self, name, tuple(value))
        object.__setattr__(self, "logit_bias", _bias_pairs(self.logit_bias))
        self._check_types()
        self.validate()

    def _check_types(self) -> None:
        """Each field of the kind it is declared: a top_k of 2.5 or a stop of 7 would otherwise fail inside
        an engine step, beside other requests, rather than here naming the field."""

        kinds = (
            (is_integer, "an integer", ("max_tokens", "top_k", "top_logprobs")),
            (is_number, "a finite number", _FLOAT_FIELDS),
            (lambda x: isinstance(x, bool), "True or False", ("ignore_eos", "logprobs", "prompt_logprobs")),
        )
        for ok, kind, names in kinds:
            for name in names:
                if not ok(getattr(self, name)):
                    raise ParamError(name, f"{name}={getattr(self, name)!r}: must be {kind}")
        if self.seed is not None and not (is_integer(self.seed) and -(2**63) <= self.seed < 2**63):
            raise ParamError("seed", f"seed={self.seed!r}: must be an integer in [-2**63, 2**63) or None")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise ParamError("stop", f"stop={self.stop!r}: stop strings must be non-empty strings")
        longest = max((len(s) for s in self.stop), default=0)
        if longest > MAX_STOP_CHARS:  # each token's text is checked against every stop's prefixes
            raise ParamError("stop", f"a stop string of {longest} characters: at most {MAX_STOP_CHARS} are allowed")
        if not all(is_integer(t) and t >= 0 for t in self.stop_token_ids):
            raise ParamError("stop_token_ids", f"stop_token_ids={self.stop_token_ids!r}: must be token ids (>= 0)")

    def validate(self) -> None:
        """Raise ParamError naming the parameter if a value is out of range (also run when built)."""
        check_fields(
            self,
            [
                ("max_tokens", self.max_tokens >= 0, "must be at least 0 (0: run and score the prompt only)"),
                (
                    "temperature",
                    self.temperature == 0.0 or MIN_SAMPLING_FLOAT <= self.temperature <= 2.0,
                    f"must be 0 (greedy) or in [{MIN_SAMPLING_FLOAT:g}, 2]",
                ),
                ("top_k", self.top_k >= 0, "must be 0 (off) or positive"),
                ("top_p", MIN_SAMPLING_FLOAT <= self.top_p <= 1.0, f"must be in [{MIN_SAMPLING_FLOAT:g}, 1]"),
                ("min_p", 0.0 <= self.min_p <= 1.0, "must be in [0, 1]"),
                (
                    "repetition_penalty",
                    MIN_SAMPLING_FLOAT <= self.repetition_penalty <= 10.0,
                    f"must be in [{MIN_SAMPLING_FLOAT:g}, 10]",
                ),
                ("presence_penalty", -2.0 <= self.presence_penalty <= 2.0, "must be in [-2, 2]"),
                ("frequency_penalty", -2.0 <= self.frequency_penalty <= 2.0, "must be in [-2, 2]"),
                ("top_logprobs", 0 <= self.top_logprobs <= 20, "must be in [0, 20]"),
                (
                    "logit_bias",
                    all(t >= 0 and -MAX_LOGIT_BIAS <= b <= MAX_LOGIT_BIAS for t, b in self.logit_bias),
                    f"token ids must be >= 0 and biases in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]",
                ),
                ("logit_bias", len({t for t, _ in self.logit_bias}) == len(self.logit_bias), "names a token twice"),
            ],
        )


_FLOAT_FIELDS = ("temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty", "frequency_penalty")


def _bias_pairs(value: object) -> tuple[tuple[int, float], ...]:
    """SamplingParams.logit_bias as (int id, float bias) pairs sorted by id, from pairs or a dict."""
    try:
        pairs = [(t, b) for t, b in (value.items() if isinstance(value, dict) else value)]  # type: ignore[union-attr]
    except (TypeError, ValueError):
        pairs = None
    # bool is an int to Python: True is neither a token id nor a bias
    if pairs is None or not all(is_integer(t) and is_number(b) for t, b in pairs):
        raise ParamError("logit_bias", f"logit_bias={value!r}: must map integer token ids to finite numbers")
    return tuple(sorted((t, float(b)) for t, b in pairs))


DEFAULT_CTX = 2048  # EngineConfig.ctx when none is given, capped by the model's own context


# Bounds past which a setting is a typo, not a plan: beyond them the compile failed in torch's allocator or
# the thread pool with a traceback (the memory a plan needs is checked against the machine's at compile time).
MAX_SLOTS = 4096
MAX_CTX = 1 << 20
MAX_THREADS = 1024
MAX_SPEC_TOKENS = 64
_ENGINE_INTS = ("slots", "spec_tokens", "prefix_cache_tokens", "tp")
_ENGINE_OPTIONAL_INTS = ("ctx", "threads", "prefill_chunk", "tp_shards")


@dataclass(frozen=True)
class EngineConfig:
    """The static plan's settings: fixed for the life of an engine."""

    slots: int = 8  # request slots decoded together (an LPU-style small batch)
    # context every slot's KV cache holds (prompt + output); None: DEFAULT_CTX, or the model's own context if
    # that is shorter, decided when the plan is compiled (compile.resolve_settings), whatever the entry point
    ctx: int | None = None
    device: str = "cpu"
    weights: Weights = Weights.AUTO  # a str is accepted too ("int4"): stored as the member
    threads: int | None = None  # compute threads (None: every core this process may use)
    kernels: Kernels = Kernels.AUTO  # a str is accepted too ("cpp"): stored as the member
    spec_tokens: int = 4  # speculative decoding: most tokens drafted per step while one request runs (0: off)
    draft: str | None = None  # a draft model (same vocabulary) to speculate with; default: prompt lookup
    # prompt rows per step while other requests decode (it bounds their inter-token gap); None: the plan
    # chooses from its calibration, as many as keep such a step within a few all-slots steps (compile/plan.py)
    prefill_chunk: int | None = None
    # the prefix cache's pool (engine/prefix_cache.py): KV of this many prompt tokens kept for later requests
    # that begin the same way, allocated with the plan; 0: off (and always off where rows cannot run alone)
    prefix_cache_tokens: int = 8192
    tp: int = 1  # tensor-parallel ranks on this host (parallel/): 1 is one process
    tp_shards: int | None = None  # chunks each split matrix is cut in (None: the model's default; parallel/tp.py)
    layout: Layout = Layout.COLOCATED  # a str is accepted too ("disaggregated"): stored as the member
    kv_cache: KvCache = KvCache.AUTO  # a str is accepted too ("int8"): stored as the member
    # each compute thread on a core of its own (the engine's thread on the first), where the plan's threads fit
    # the cores this process may use (one process, colocated layout): threads that the OS let share a core
    # after an idle spell waited on each other for several steps (docs/performance.md)
    pin_threads: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "weights", Weights.parse("weights", self.weights))
        object.__setattr__(self, "kernels", Kernels.parse("kernels", self.kernels))
        object.__setattr__(self, "layout", Layout.parse("layout", self.layout))
        object.__setattr__(self, "kv_cache", KvCache.parse("kv_cache", self.kv_cache))

        check_fields(  # kinds first: a slots of 2.5 or "8" failed deep in the compile (torch.zeros, the thread pool)
            self,
            [(name, is_integer(getattr(self, name)), "must be an integer") for name in _ENGINE_INTS]
            + [
                (name, is_integer(getattr(self, name), True), "must be an integer or None")
                for name in _ENGINE_OPTIONAL_INTS
            ]
            + [
                (
                    "draft",
                    self.draft is None or (isinstance(self.draft, str) and self.draft.strip() != ""),
                    "must name a model",
                ),
                ("pin_threads", isinstance(self.pin_threads, bool), "must be True or False"),
            ],
        )
        check_fields(
            self,
            [
                (
                    "device",
                    isinstance(self.device, str) and re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None,
                    "choose cpu, cuda or cuda:N",
                ),
                ("slots", 1 <= self.slots <= MAX_SLOTS, f"need 1 to {MAX_SLOTS} request slots"),
                ("ctx", self.ctx is None or 16 <= self.ctx <= MAX_CTX, f"the context must hold 16 to {MAX_CTX} tokens"),
                (
                    "threads",
                    self.threads is None or 1 <= self.threads <= MAX_THREADS,
                    f"must be 1 to {MAX_THREADS} (or None: every core)",
                ),
                ("spec_tokens", 0 <= self.spec_tokens <= MAX_SPEC_TOKENS, f"must be 0 (off) to {MAX_SPEC_TOKENS}"),
                ("draft", self.draft is None or self.spec_tokens > 0, "drafts only with spec_tokens above 0"),
                (
                    "prefill_chunk",
                    self.prefill_chunk is None or self.prefill_chunk >= 1,
                    "must be at least 1 prompt row per step (or None: the plan chooses)",
                ),
                (
                    "prefix_cache_tokens",
                    0 <= self.prefix_cache_tokens <= MAX_CTX * MAX_SLOTS,
                    "must be 0 (off) or a number of tokens",
                ),
                ("tp", 1 <= self.tp <= MAX_THREADS, f"must be 1 to {MAX_THREADS} ranks"),
                ("tp_shards", self.tp_shards is None or self.tp_shards >= 1, "must be at least 1 (or None)"),
            ],
        )
