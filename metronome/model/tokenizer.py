"""Text <-> token ids: tokenizers built from a GGUF vocabulary or an HF tokenizer.json, chat templates,
and incremental detokenization for streaming."""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from typing import Iterable, Sequence

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from metronome.model.errors import ModelFileError
from metronome.model.loader import TokenizerData

_CONTROL, _USER_DEFINED = 3, 4  # GGUF token types

# How each byte-level vocabulary split text into words before its merges were learned.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {"llama3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}


def _byte_level_table() -> dict[str, int]:
    """The byte each character of a byte-level (GPT-2 style) vocabulary stands for: the printable bytes are
    their own characters, and every other byte (controls, space, ...) takes the next character from U+0100
    on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    table = {chr(b): b for b in printable}
    others = [b for b in range(256) if b not in set(printable)]
    table.update({chr(256 + n): b for n, b in enumerate(others)})
    return table


_BYTE_OF = _byte_level_table()
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # sentencepiece's byte-fallback pieces


class ChatTemplateError(ValueError):
    """The model has no chat template, or the template rejected the conversation."""


def _byte_level_pretokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    if pre in _SPLITS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre == "smollm":  # SmolLM's own tokenizer.json: every digit alone, then GPT-2's split
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _merges_from_vocab(tokens: Sequence[str], priority: Sequence[float]) -> list[tuple[str, str]]:
    """Sentencepiece files carry no merges: every split of a token into two vocabulary pieces is a
    merge, ranked by the merged token's priority (higher first)."""
    index = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for t, p in zip(tokens, priority):
        for cut in range(1, len(t)):
            left, right = t[:cut], t[cut:]
            if left in index and right in index:
                ranked.append((-p, index[left], index[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _build_from_gguf(data: TokenizerData) -> HFTokenizer:
    tokens = list(data.tokens)
    if data.kind == "gguf-bpe":
        merges = [tuple(m.split(" ", 1)) for m in (data.merges or [])]
        tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=False))
        tok.pre_tokenizer = _byte_level_pretokenizer(data.pre)
        tok.decoder = decoders.ByteLevel()
    else:
        if data.pre == "gemma":
            # Gemma files store runs of spaces as real spaces; the model looks them up as '▁' runs.
            tokens = ["\u2581" * len(t) if t and not t.strip(" ") else t for t in tokens]
            # Gemma's scores do not follow its merge order; the order in the file does.
            priority = [-float(i) for i in range(len(tokens))]
        else:
            priority = list(data.scores or [0.0] * len(tokens))
        vocab = {t: i for i, t in enumerate(tokens)}
        # Control tokens (<bos>, <start_of_turn>, ...) never take part in merges.
        plain = [("\0" if data.token_types and data.token_types[i] == _CONTROL else t) for i, t in enumerate(tokens)]
        unk = next((t for t, ty in zip(tokens, data.token_types or []) if ty == 2), None)
        tok = HFTokenizer(
            models.BPE(vocab, _merges_from_vocab(plain, priority), unk_token=unk, fuse_unk=True, byte_fallback=True)
        )
        norms = [normalizers.Replace(" ", "\u2581")]
        if data.add_space_prefix:
            norms.insert(0, normalizers.Prepend("\u2581"))
        tok.normalizer = normalizers.Sequence(norms)
        dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if data.add_space_prefix:
            dec.append(decoders.Strip(" ", 1, 0))
        tok.decoder = decoders.Sequence(dec)
    types = data.token_types or []
    specials = [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types) if ty == _CONTROL]
    if data.kind == "gguf-bpe":  # a control token outside the byte alphabet is a mislabel; leave it out
        alphabet = set(pre_tokenizers.ByteLevel.alphabet())
        specials = [s for s in specials if set(s.content) <= alphabet]
    tok.add_special_tokens(specials)
    # User-defined tokens match as whole pieces, longest first, before any merge (sentencepiece's rule).
    # Gemma's are runs of spaces, which the normalizer has turned into '▁' runs: they match the
    # normalized text (as merges they split runs of 32 spaces or more otherwise than sentencepiece)
    tok.add_tokens(
        [
            AddedToken(t, normalized=data.pre == "gemma" and set(t) == {"\u2581"})
            for t, ty in zip(tokens, types)
            if ty == _USER_DEFINED
        ]
    )
    return tok


class Tokenizer:
    """Encode, decode and apply the chat template of one model."""

    def __init__(self, data: TokenizerData) -> None:
        self.data = data
        try:
            self._tok = HFTokenizer.from_file(data.tokenizer_json) if data.kind == "hf-json" else _build_from_gguf(data)
        except (KeyboardInterrupt, SystemExit):
            raise
        except BaseException as exc:  # BaseException: the library's Rust panics arrive as pyo3's PanicException
            where = data.tokenizer_json or f"{data.source or 'the GGUF file'}: its tokenizer.ggml.* keys"
            raise ModelFileError(
                f"{where}: the tokenizer cannot be built from it ({type(exc).__name__}: {exc}); "
                "the model's vocabulary is damaged or in a form metronome does not read"
            ) from exc
        self.bos_id = data.bos_id
        self.eos_ids = tuple(data.eos_ids)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return bool(self.data.chat_template)

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Ids for `text`; special tokens written in the text (e.g. <|im_start|>) become their ids.
        BOS is added when the model asks for it and the text does not already start with it."""
        ids = self._tok.encode(text, add_special_tokens=False).ids
        add = self.data.add_bos if add_bos is None else add_bos
        if add and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def vocabulary(self) -> dict[str, int]:
        """Every token's text (as the tokenizer stores it) and id, added tokens included: two tokenizers
        with the same vocabulary turn any text into the same ids (a draft model's must be its model's)."""
        return self._tok.get_vocab(with_added_tokens=True)

    def tokenizer_json(self) -> str:
        """The tokenizer as HF tokenizers' JSON (what grammar engines read: engine/grammar.py)."""
        return self._tok.to_str()

    def token_text(self, token_id: int) -> str:
        """The text one token stands for on its own (for logprobs)."""
        return self._tok.decode([token_id], skip_special_tokens=False)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (logprobs' `bytes`). A token that holds part of a multi-byte
        character has those bytes, where its text (`token_text`) can only show U+FFFD; a reply's tokens'
        bytes joined are its text's UTF-8."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            return b""
        if self._byte_level:
            if all(ch in _BYTE_OF for ch in piece):
                return bytes(_BYTE_OF[ch] for ch in piece)
            return piece.encode("utf-8")  # an added token, stored as its text
        byte = _BYTE_TOKEN.fullmatch(piece)
        if byte:
            return bytes([int(byte.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    @functools.cached_property
    def _byte_level(self) -> bool:
        """Whether tokens are spelled in the byte-level alphabet (GPT-2, Llama 3, Qwen2) rather than as text
        with sentencepiece's U+2581 spaces and <0xNN> byte pieces."""
        if self.data.kind != "hf-json":
            return self.data.kind == "gguf-bpe"
        return "ByteLevel" in json.dumps(json.loads(self._tok.to_str()).get("decoder"))

    @functools.cached_property
    def template_reads_tools(self) -> bool:
        """The chat template renders a `tools` list (Qwen2.5's does; SmolLM2's does not). Read once: parsing
        the template took 1.4 ms, and every chat request asks."""
        if not self.data.chat_template:
            return False
        import jinja2
        from jinja2 import meta

        try:
            parsed = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(self.data.chat_template)
        except jinja2.TemplateError:
            return False  # rendering reports the broken template
        return "tools" in meta.find_undeclared_variables(parsed)

    def compile_chat_template(self) -> str | None:
        """Compile the chat template now, as a server starts: the first chat request paid 18-24 ms for it.
        Returns why it does not compile (every chat request would get that error), or None."""
        import jinja2

        if not self.data.chat_template:
            return None
        try:
            _compiled(self.data.chat_template)
        except jinja2.TemplateError as exc:
            return f"the model's chat template does not compile ({exc}): chat requests will be refused"
        self.template_reads_tools  # noqa: B018 (cached: a chat request reads it)
        return None

    def render_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> str:
        """The prompt text for a conversation, through the model's own chat template; `tools`: OpenAI's
        tool list, for templates that read it (`template_reads_tools`)."""
        if not self.data.chat_template:
            raise ChatTemplateError(
                "this model has no chat template (a base model); send a plain completion instead "
                "(/v1/completions, or --raw on the command line)"
            )
        return _render(
            self.data.chat_template, messages, add_generation_prompt, self.data.bos_token, self.data.eos_token, tools
        )

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        return self.encode(self.render_chat(messages, add_generation_prompt, tools))

    def stream_decoder(self, prompt_ids: Sequence[int] = ()) -> "StreamDecoder":
        return StreamDecoder(self, prompt_ids)


def _raise_exception(message: str) -> None:
    """The templates' own `raise_exception(...)` (transformers gives them one)."""
    raise ChatTemplateError(f"the chat template rejected the conversation: {message}")


def _tojson(x: object, indent=None, ensure_ascii=False, separators=None, sort_keys=False) -> str:
    """`tojson` with transformers' arguments (jinja's own escapes HTML)."""
    return json.dumps(x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)


@functools.lru_cache(maxsize=8)
def _compiled(template: str):  # -> jinja2.Template
    """A chat template compiled once per text (a template that fails to compile raises each time: nothing is
    kept). Compiled on every request, it was 95 % of a chat request's template work: 1.9 ms of 2.0 for
    SmolLM2's, and served, eight users who arrived together waited in turn for 3-4 ms each before their
    prompts reached the engine (docs/performance.md). Rendering a compiled template is safe from several
    threads: each render has a context of its own."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _generation_tag()]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def _render(
    template: str, messages: list[dict], add_generation_prompt: bool, bos: str, eos: str, tools: list[dict] | None
) -> str:
    import jinja2

    try:
        return _compiled(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos, eos_token=eos, tools=tools
        )
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the model's chat template failed: {exc}") from exc
    except (ArithmeticError, LookupError, TypeError, ValueError, RecursionError) as exc:
        # the template's own code failing on this conversation (a None content added to a string, a
        # division by zero): the template's error, said as such, where it was a 500 "internal error"
        if isinstance(exc, ChatTemplateError):
            raise
        raise ChatTemplateError(f"the model's chat template failed: {type(exc).__name__}: {exc}") from exc


def _generation_tag() -> type:
    """Jinja's extension for `{% generation %}...{% endgeneration %}`, which transformers' templates use to
    mark the assistant's text (for training masks): here it renders what it holds."""
    from jinja2 import nodes
    from jinja2.ext import Extension

    class Generation(Extension):
        tags = {"generation"}

        def parse(self, parser):  # type: ignore[no-untyped-def]
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.Scope(body).set_lineno(lineno)

    return Generation


class StreamDecoder:
    """Turns a growing list of ids into text pieces without broken UTF-8 or lost spaces.

    Decodes a short window (a few tokens before the unread ones) so that tokenizers that drop a leading
    space or hold half a character in a byte token still produce the right text."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self._tok = tokenizer
        # the prompt's last few ids, from a character's start (a window that began with a character's last
        # bytes would decode to U+FFFD there)
        start = max(0, len(prompt_ids) - 4)
        while start > 0 and len(prompt_ids) - start < 8 and tokenizer.decode(prompt_ids[start:]).startswith("\ufffd"):
            start -= 1
        self._ids: list[int] = list(prompt_ids[start:])
        self._prefix = 0
        self._read = len(self._ids)
        # A prompt that ends partway through a character (token ids cut anywhere) decodes to U+FFFD there,
        # which the output's first bytes turn into the whole character: that text is not the prompt's, so
        # it is left out of what the output's text is measured against (it cut real text, a completed emoji
        # and a space after it, where the lengths no longer lined up).
        tail = tokenizer.decode(self._ids)
        self._partial = len(tail) - len(tail.rstrip("\ufffd"))

    def _before(self) -> str:
        """The window's text already given out (or the prompt's), which the next piece follows."""
        before = self._tok.decode(self._ids[self._prefix : self._read])
        if self._prefix == 0 and self._partial:  # still the prompt's window: without its partial character
            before = before[: len(before) - self._partial]
        return before

    def push(self, token_id: int) -> str:
        """Add one id; return the text that became final (possibly '')."""
        self._ids.append(token_id)
        before = self._before()
        after = self._tok.decode(self._ids[self._prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self._prefix, self._read, self._partial = self._read, len(self._ids), 0
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back at the end of a stream."""
        before = self._before()
        after = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        self._partial = 0
        return after[len(before) :] if len(after) > len(before) else ""
