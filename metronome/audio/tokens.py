"""Whisper's vocabulary: text tokens from tokenizer.json, the special tokens, and the token sets decoding
rules need (non-speech symbols to suppress, timestamps)."""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from metronome.config import ParamError

# Whisper's language codes in the order of its language tokens (<|en|> first).
LANGUAGES = (
    "en zh de es ru ko fr ja pt tr pl ca nl ar sv it id hi fi vi he uk el ms cs ro da hu ta no th ur hr bg lt la "
    "mi ml cy sk te fa lv bn sr az sl kn et mk br eu is hy ne mn bs kk sq sw gl mr pa si km sn yo so af oc ka be "
    "tg sd gu am yi lo uz fo ht ps tk nn mt sa lb my bo tl mg as tt haw ln ha ba jw su yue"
).split()

TIME_PRECISION = 0.02  # seconds per timestamp token step


class WhisperTokens:
    def __init__(self, tokenizer_json: str | Path, n_vocab: int):
        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))
        self.n_vocab = n_vocab
        # Multilingual checkpoints have one more token (<|yue|>, ...): 51865+ vs the English-only 51864.
        self.multilingual = n_vocab >= 51865
        self.eot = self._id("<|endoftext|>")
        self.sot = self._id("<|startoftranscript|>")
        self.translate = self._id("<|translate|>")
        self.transcribe = self._id("<|transcribe|>")
        self.sot_lm = self._id("<|startoflm|>")
        self.sot_prev = self._id("<|startofprev|>")
        no_speech = self.tokenizer.token_to_id("<|nospeech|>")
        self.no_speech = no_speech if no_speech is not None else self._id("<|nocaptions|>")
        self.no_timestamps = self._id("<|notimestamps|>")
        self.timestamp_begin = self.no_timestamps + 1
        self.timestamp_end = n_vocab - 1

    def _id(self, token: str) -> int:
        tid = self.tokenizer.token_to_id(token)
        if tid is None:
            raise ValueError(f"tokenizer.json has no {token} token: not a Whisper vocabulary")
        return tid

    def language_token(self, language: str) -> int:
        if language not in LANGUAGES:
            raise ParamError(
                "language", f"language {language!r} is not one of Whisper's language codes (e.g. 'en', 'fr')"
            )
        return self._id(f"<|{language}|>")

    def sot_sequence(self, language: str, task: str) -> list[int]:
        if not self.multilingual:
            return [self.sot]
        return [self.sot, self.language_token(language), self.translate if task == "translate" else self.transcribe]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, tokens: list[int] | tuple[int, ...]) -> str:
        return self.tokenizer.decode([t for t in tokens if t < self.eot])

    @cached_property
    def non_speech(self) -> tuple[int, ...]:
        """Tokens that only start speaker tags, sound annotations or music symbols (Whisper's rule: symbols
        that are one token alone or after a space; the first token of the music symbols; a leading ' -' or
        " '" but not those inside words)."""
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        music = "♩♪♫♬♭♮♯"
        out = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + list(music):
            for ids in (self.encode(symbol), self.encode(" " + symbol)):
                if len(ids) == 1 or symbol in music:
                    out.add(ids[0])
        return tuple(sorted(out))

    @cached_property
    def suppressed(self) -> tuple[int, ...]:
        """Never sampled: non-speech symbols and the control tokens."""
        control = {self.transcribe, self.translate, self.sot, self.sot_prev, self.sot_lm, self.no_speech}
        return tuple(sorted(set(self.non_speech) | control))

    @cached_property
    def suppressed_array(self) -> np.ndarray:
        return np.array(self.suppressed, dtype=np.int64)

    @cached_property
    def suppressed_at_start(self) -> tuple[int, ...]:
        """Not allowed as the first sampled token: a bare space, or ending at once."""
        return (self.encode(" ")[0], self.eot)
