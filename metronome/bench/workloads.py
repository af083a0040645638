"""Workloads (tokens in, tokens out) and the unique, real-language prompts that carry them.

Every prompt is drawn from `corpus.txt` (plain English prose written for this package) by a
generator seeded with the run's seed and the request's key: the same key always gives the same
prompt, two keys never share one (the key is written into the prompt's first line), and the
sentences come in a fresh random order, so neither a prefix cache nor n-gram speculation can
replay an earlier request. Sentences are drawn without replacement until the corpus is used up,
then the order is reshuffled (only prompts longer than the corpus, ~4.5k tokens, repeat text).
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from types import MappingProxyType
from typing import Iterator, Mapping, Protocol

CHARS_PER_TOKEN = 4  # the approximation used when no tokenizer is given

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MAX_EXTENSIONS = 8  # rounds of lengthening when a tokenizer counts fewer tokens than estimated


@dataclass(frozen=True)
class Workload:
    """How long each request's prompt is and how many tokens it asks for."""

    name: str
    input_tokens: int
    output_tokens: int
    scale: float = 1.0


PRESETS: Mapping[str, Workload] = MappingProxyType(
    {
        "short": Workload("short", input_tokens=100, output_tokens=300),
        "medium": Workload("medium", input_tokens=1000, output_tokens=1000),
        "long": Workload("long", input_tokens=10000, output_tokens=1500),
    }
)


def resolve_workload(
    name: str,
    scale: float = 1.0,
    input_tokens: int | None = None,
    output_tokens: int | None = None,
) -> Workload:
    """The preset `name` shrunk by `scale`, with `input_tokens`/`output_tokens` overriding it.

    Overrides are taken literally (not scaled); a workload with any override is named "custom".
    """
    if name not in PRESETS:
        raise ValueError(f"--workload {name!r} is not known; choose one of {', '.join(PRESETS)}")
    if not (scale > 0 and math.isfinite(scale)):
        raise ValueError(f"--scale must be a positive number (got {scale}); use e.g. 0.1 to shrink a workload")
    for flag, value in (("--input-tokens", input_tokens), ("--output-tokens", output_tokens)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be at least 1 (got {value})")
    preset = PRESETS[name]
    workload = Workload(
        name=preset.name,
        input_tokens=max(1, round(preset.input_tokens * scale)),
        output_tokens=max(1, round(preset.output_tokens * scale)),
        scale=scale,
    )
    if input_tokens is None and output_tokens is None:
        return workload
    return replace(
        workload,
        name="custom",
        input_tokens=workload.input_tokens if input_tokens is None else input_tokens,
        output_tokens=workload.output_tokens if output_tokens is None else output_tokens,
    )


class TokenCounter(Protocol):
    """Counts a text's tokens and cuts a text down to a token budget."""

    @property
    def method(self) -> str:
        """How counts are made: "estimate" or "tokenizer"."""
        ...

    def count(self, text: str) -> int: ...

    def truncate(self, text: str, tokens: int) -> str: ...


class CharEstimate:
    """~4 characters per token: good enough for English prose when no tokenizer is at hand."""

    @property
    def method(self) -> str:
        return "estimate"

    def count(self, text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    def truncate(self, text: str, tokens: int) -> str:
        limit = tokens * CHARS_PER_TOKEN
        if len(text) <= limit:
            return text
        cut = text[:limit]
        space = cut.rfind(" ")
        return cut[:space] if space > limit // 2 else cut


class TokenizerFileCounter:
    """Exact counts from a Hugging Face `tokenizer.json` (loaded with the `tokenizers` library)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        if not path.is_file():
            raise ValueError(f"--tokenizer {path}: no such file; give the path of a tokenizer.json")
        try:
            self._tokenizer = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception on a bad file
            raise ValueError(f"--tokenizer {path}: not a readable tokenizer.json ({exc})") from exc

    @property
    def method(self) -> str:
        return "tokenizer"

    def count(self, text: str) -> int:
        return len(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def truncate(self, text: str, tokens: int) -> str:
        encoding = self._tokenizer.encode(text, add_special_tokens=False)
        if len(encoding.ids) <= tokens:
            return text
        return text[: encoding.offsets[tokens - 1][1]]


@dataclass(frozen=True)
class Prompt:
    """One request's prompt and its length as counted on our side."""

    key: str
    text: str
    input_tokens: int
    counted_by: str


def load_corpus() -> str:
    """The English prose shipped with the package."""
    return resources.files("metronome.bench").joinpath("corpus.txt").read_text(encoding="utf-8")


def split_sentences(corpus: str) -> tuple[str, ...]:
    """The corpus's sentences, whitespace normalised."""
    flat = " ".join(corpus.split())
    return tuple(s for s in _SENTENCE_END.split(flat) if s)


class PromptBuilder:
    """Builds the prompt for a request key: deterministic per (seed, key), unique per key."""

    def __init__(self, corpus: str, seed: int, counter: TokenCounter) -> None:
        self._sentences = split_sentences(corpus)
        if len(self._sentences) < 2:
            raise ValueError("the prompt corpus needs at least two sentences")
        self._seed = seed
        self._counter = counter

    @property
    def counter(self) -> TokenCounter:
        """How this builder counts tokens (the bench counts outputs with it too)."""
        return self._counter

    def build(self, key: str, tokens: int) -> Prompt:
        """A prompt of about `tokens` tokens (never fewer than its one-line header needs)."""
        if tokens < 1:
            raise ValueError(f"a prompt needs at least 1 token (asked for {tokens})")
        rng = random.Random(f"{self._seed}|{key}")
        sentences = self._sentence_stream(rng)
        header = f"[{key}] Continue this passage:\n"
        parts = [header, next(sentences)]
        length = sum(map(len, parts))
        target_chars = tokens * CHARS_PER_TOKEN
        text = "".join(parts)
        for _ in range(_MAX_EXTENSIONS):
            while length < target_chars:
                parts.append(" " + next(sentences))
                length += len(parts[-1])
            text = "".join(parts)
            missing = tokens - self._counter.count(text)
            if missing <= 0:
                break
            target_chars = length + missing * CHARS_PER_TOKEN * 2
        text = self._counter.truncate(text, tokens)
        if len(text) < len(header):
            text = header.rstrip()
        return Prompt(key=key, text=text, input_tokens=self._counter.count(text), counted_by=self._counter.method)

    def _sentence_stream(self, rng: random.Random) -> Iterator[str]:
        """Sentences in random order, without replacement until all are used, then reshuffled."""
        while True:
            yield from rng.sample(self._sentences, len(self._sentences))
