"""Whisper in metronome against independent references: faster-whisper's front end and transcripts (f32,
greedy, no VAD) and CTranslate2's encoder, on the Beckett sample (10 s) and a 40-s clip built from it."""

from __future__ import annotations

import struct
import threading
import time
import wave
from importlib import util
from pathlib import Path

import numpy as np
import pytest
import torch

from metronome.audio.ct2 import Ct2FormatError, read_model_bin
from metronome.audio.mel import LogMel, mel_filters, window
from metronome.config import ParamError

SR = 16000


def _sample_path() -> Path:
    spec = util.find_spec("moonshine_onnx")
    if spec is None:
        pytest.skip("useful-moonshine-onnx is not installed: pip install --no-deps useful-moonshine-onnx==20251121")
    return Path(spec.origin).parent / "assets" / "beckett.wav"


def _read_wav(path: Path) -> np.ndarray:
    with wave.open(str(path)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, SR)
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0


@pytest.fixture(scope="module")
def beckett() -> np.ndarray:
    return _read_wav(_sample_path())


@pytest.fixture(scope="module")
def clip40(beckett: np.ndarray) -> np.ndarray:
    """5 s silence, Beckett, 10 s silence, Beckett, 5 s silence: two windows, the second prompted by the
    first's text. (Beckett four times in a row makes the reference fall back to sampling, which no two
    implementations share.)"""
    z = lambda s: np.zeros(int(s * SR), np.float32)  # noqa: E731
    return np.concatenate([z(5), beckett, z(10), beckett, z(5)])


@pytest.fixture(scope="module")
def model_dir() -> Path:
    from metronome.audio.transcribe import resolve_model_dir

    try:
        return resolve_model_dir(None)
    except FileNotFoundError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def transcriber(model_dir: Path):
    """The default: Q8_0 decoder matrices on the C++ kernels where they build."""
    from metronome.audio.transcribe import Transcriber

    tr = Transcriber.load(str(model_dir))
    yield tr
    tr.close()


@pytest.fixture(scope="module")
def exact(model_dir: Path):
    """float32 throughout: the checkpoint's fp16 weights widened exactly, as faster-whisper's f32 runs them."""
    from metronome.audio.transcribe import Transcriber

    tr = Transcriber.load(str(model_dir), weights="f32")
    yield tr
    tr.close()


@pytest.fixture(scope="module")
def reference(model_dir: Path):
    faster_whisper = pytest.importorskip("faster_whisper")
    model = faster_whisper.WhisperModel(str(model_dir), device="cpu", compute_type="float32", cpu_threads=2)

    def run(audio: np.ndarray) -> list:
        segments, _ = model.transcribe(audio, beam_size=1, vad_filter=False)
        return list(segments)

    return run


# ---- model.bin reader ------------------------------------------------------------------------------------
def _string(s: str) -> bytes:
    raw = s.encode() + b"\0"
    return struct.pack("<H", len(raw)) + raw


def _model_bin(variables: list[tuple[str, np.ndarray, int]], aliases: list[tuple[str, str]]) -> bytes:
    """A model.bin written from the format's description (version 6): header, variables, aliases."""
    out = struct.pack("<I", 6) + _string("TestSpec") + struct.pack("<I", 2) + struct.pack("<I", len(variables))
    for name, arr, type_id in variables:
        out += _string(name) + struct.pack("<B", arr.ndim) + struct.pack(f"<{arr.ndim}I", *arr.shape)
        out += struct.pack("<B", type_id) + struct.pack("<I", arr.nbytes) + arr.tobytes()
    out += struct.pack("<I", len(aliases))
    for alias, target in aliases:
        out += _string(alias) + _string(target)
    return out


def test_ct2_reader_round_trip(tmp_path: Path) -> None:
    w = np.arange(6, dtype=np.float16).reshape(2, 3) / 7
    b = np.array([1.5, -2.0], dtype=np.float32)
    heads = np.array(6, dtype=np.int16)
    path = tmp_path / "model.bin"
    path.write_bytes(
        _model_bin([("a/weight", w, 4), ("a/bias", b, 0), ("num_heads", heads, 2)], [("tied", "a/weight")])
    )
    m = read_model_bin(path)
    assert (m.spec, m.revision, m.binary_version) == ("TestSpec", 2, 6)
    assert m.get("a/weight").dtype == np.float16 and np.array_equal(m.get("a/weight"), w)
    assert np.array_equal(m.get("a/bias"), b) and int(m.get("num_heads")) == 6
    assert m.get("tied") is m.get("a/weight") and m.dtypes["tied"] == "float16"
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(Ct2FormatError, match="truncated"):
        read_model_bin(path)


def test_ct2_reader_reads_the_shipped_whisper(model_dir: Path) -> None:
    m = read_model_bin(model_dir / "model.bin")
    assert m.spec == "WhisperSpec"
    emb = m.get("decoder/embeddings/weight")
    assert emb.dtype == np.float16 and emb.shape == (51864, 384)
    assert np.isfinite(emb.astype(np.float32)).all()


# ---- front end -------------------------------------------------------------------------------------------
def test_mel_matches_faster_whisper(beckett: np.ndarray) -> None:
    fw = pytest.importorskip("faster_whisper.feature_extractor")
    ref = fw.FeatureExtractor()
    np.testing.assert_allclose(mel_filters(), ref.mel_filters, rtol=1e-6, atol=1e-9)
    ours = LogMel()(beckett).numpy()
    theirs = ref(beckett)
    assert ours.shape == theirs.shape == (80, (len(beckett) + 160) // 160)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    # a clip shorter than the STFT's reflection (1 to 200 samples, a few ms) failed inside torch.stft, a 500
    # from the server; it gets Whisper's zero padding, as faster-whisper's front end gives it
    for n in (1, 40, 200, 201):
        clip = beckett[5000 : 5000 + n]
        ours, theirs = LogMel()(clip).numpy(), ref(clip)
        assert ours.shape == theirs.shape == (80, (n + 160) // 160), n
        np.testing.assert_allclose(ours, theirs, atol=1e-4)


# ---- model against CTranslate2 ---------------------------------------------------------------------------
@pytest.mark.model
def test_encoder_matches_ctranslate2(model_dir: Path, exact, beckett: np.ndarray) -> None:
    ctranslate2 = pytest.importorskip("ctranslate2")
    feats = LogMel()(beckett)
    mel = window(feats, 0, feats.shape[1] - 1)
    ours = exact.plan.encode(mel).numpy()
    ct = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32", intra_threads=2)
    theirs = np.array(ct.encode(ctranslate2.StorageView.from_array(mel[None].numpy().copy())))[0]
    rms = float(np.sqrt(((ours - theirs) ** 2).mean() / (theirs**2).mean()))
    assert rms < 1e-4, rms


@pytest.mark.model
def test_decoder_greedy_tokens_and_scores_match_ctranslate2(model_dir: Path, exact, beckett) -> None:
    """One window through CTranslate2's generate (same rules: suppression, timestamp rules) against ours."""
    ctranslate2 = pytest.importorskip("ctranslate2")
    tok = exact.tokens
    feats = LogMel()(beckett)
    mel = window(feats, 0, feats.shape[1] - 1)
    ct = ctranslate2.models.Whisper(str(model_dir), device="cpu", compute_type="float32", intra_threads=2)
    enc = ct.encode(ctranslate2.StorageView.from_array(mel[None].numpy().copy()))
    ref = ct.generate(
        enc,
        [[tok.sot]],
        beam_size=1,
        return_scores=True,
        return_no_speech_prob=True,
        suppress_tokens=list(tok.suppressed),
        max_initial_timestamp_index=50,
    )[0]
    audio = exact.plan.encode(mel)
    slot = exact.plan.acquire()
    try:
        ours = exact._decode(slot, audio, [tok.sot], 0.0, seed=0)
    finally:
        exact.plan.release(slot)
    assert ours.tokens == ref.sequences_ids[0]
    n = len(ours.tokens)
    assert ours.avg_logprob == pytest.approx(ref.scores[0] * n / (n + 1), abs=1e-4)
    assert ours.no_speech_prob == pytest.approx(ref.no_speech_prob, abs=1e-4)


# ---- transcripts -----------------------------------------------------------------------------------------
def _same_segments(ours, theirs) -> None:
    assert "".join(s.text for s in ours).strip() == "".join(s.text for s in theirs).strip()
    assert [(round(s.start, 2), round(s.end, 2), s.text) for s in ours] == [
        (round(s.start, 2), round(s.end, 2), s.text) for s in theirs
    ]
    assert [list(s.tokens) for s in ours] == [list(s.tokens) for s in theirs]
    # OpenAI's `seek`: the offset of the window a segment was decoded in (it was the segment's own start)
    assert [s.seek for s in ours] == [s.seek for s in theirs]


@pytest.fixture(scope="module")
def ref_beckett(reference, beckett):
    return reference(beckett)


@pytest.fixture(scope="module")
def ref_clip40(reference, clip40):
    return reference(clip40)


@pytest.mark.model
def test_exact_transcript_equals_faster_whisper(exact, ref_beckett, beckett: np.ndarray) -> None:
    """f32: the same segments, tokens, timestamps and scores as faster-whisper f32."""
    out = exact.transcribe(beckett)
    _same_segments(out.segments, ref_beckett)
    assert out.text == "Ever tried, ever failed. No matter, try again. Fail again. Fail better."
    assert out.language == "en" and out.duration == pytest.approx(len(beckett) / SR)
    for ours, theirs in zip(out.segments, ref_beckett):
        assert ours.avg_logprob == pytest.approx(theirs.avg_logprob, abs=1e-3)
        assert ours.no_speech_prob == pytest.approx(theirs.no_speech_prob, abs=1e-3)
        assert ours.temperature == theirs.temperature == 0.0
    t = out.timings
    assert t.total_ms >= t.features_ms + t.encode_ms + t.decode_ms - 1.0 and t.encode_ms > 0 and t.decode_ms > 0


@pytest.mark.model
def test_exact_long_audio_window_by_window(exact, ref_clip40, clip40: np.ndarray) -> None:
    out = exact.transcribe(clip40)
    _same_segments(out.segments, ref_clip40)
    assert out.segments[-1].end > 30.0  # the second window was decoded
    assert out.text.count("Ever tried, ever failed.") == 2


@pytest.mark.model
def test_default_transcripts_equal_faster_whisper(transcriber, ref_beckett, ref_clip40, beckett, clip40) -> None:
    """The default (Q8_0 decoder where the kernels build): the same text and segments; a timestamp may move by
    a step or two (Q8_0 rounding moves the logits a little)."""
    for audio, ref in ((beckett, ref_beckett), (clip40, ref_clip40)):
        out = transcriber.transcribe(audio)
        assert out.text == "".join(s.text for s in ref).strip()
        assert [s.text for s in out.segments] == [s.text for s in ref]
        for ours, theirs in zip(out.segments, ref):
            assert abs(ours.start - theirs.start) <= 0.1 and abs(ours.end - theirs.end) <= 0.1


@pytest.mark.model
def test_prompt_is_previous_text(transcriber, beckett: np.ndarray) -> None:
    """A prompt changes the decoder's context (the reference takes it as its initial prompt)."""
    plain = transcriber.transcribe(beckett)
    prompted = transcriber.transcribe(beckett, prompt="EVER TRIED. EVER FAILED. NO MATTER.")
    assert prompted.segments[0].avg_logprob != plain.segments[0].avg_logprob


@pytest.mark.model
@pytest.mark.parametrize("which", ["transcriber", "exact"])
def test_same_text_alone_or_beside_another_request(which: str, request, beckett, clip40) -> None:
    """The determinism contract: bitwise the same tokens and scores alone and while another request's rows
    share the decoder steps (both weight formats)."""
    transcriber = request.getfixturevalue(which)
    alone = transcriber.transcribe(beckett)
    before = transcriber.plan.most_rows
    results: dict[str, object] = {}
    start = threading.Barrier(2, timeout=60)

    def run(name: str, audio: np.ndarray) -> None:
        start.wait()
        results[name] = transcriber.transcribe(audio)

    threads = [threading.Thread(target=run, args=(n, a)) for n, a in (("a", beckett), ("b", clip40))]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert transcriber.plan.most_rows >= 2 or before >= 2  # the two requests really shared steps
    beside = results["a"]
    assert [(s.tokens, s.avg_logprob, s.no_speech_prob, s.start, s.end) for s in beside.segments] == [
        (s.tokens, s.avg_logprob, s.no_speech_prob, s.start, s.end) for s in alone.segments
    ]


def test_bad_input_names_the_problem(transcriber) -> None:
    with pytest.raises(ValueError, match="samples"):
        transcriber.transcribe(np.zeros((2, 100), np.float32))
    with pytest.raises(ValueError, match="empty"):
        transcriber.transcribe(np.zeros(0, np.float32))
    with pytest.raises(ValueError, match="temperature"):
        transcriber.transcribe(np.zeros(1600, np.float32), temperature=2.0)
    with pytest.raises(ValueError, match="task"):
        transcriber.transcribe(np.zeros(1600, np.float32), task="summarize")
    with pytest.raises(ValueError, match="language"):
        transcriber.transcribe(np.zeros(1600, np.float32), language="xx")
    if not transcriber.tokens.multilingual:  # tiny.en: French was decoded as English, and said "english"
        with pytest.raises(ParamError, match="English-only") as caught:
            transcriber.transcribe(np.zeros(1600, np.float32), language="fr")
        assert caught.value.param == "language"


@pytest.mark.model
def test_temperatures_at_both_ends_of_the_range_are_taken(transcriber, beckett: np.ndarray) -> None:
    """The API takes temperature in [0, 1] (serve/audio.py), so the transcriber must too: 1.0 is a sampled
    decode of its own, seeded, with no fallback past it."""
    clip = beckett[: 3 * SR]
    assert transcriber.transcribe(clip, temperature=0.0).segments
    out = transcriber.transcribe(clip, temperature=1.0)
    assert out.segments and all(s.temperature == 1.0 for s in out.segments), out.segments


def test_fallback_temperatures() -> None:
    from metronome.audio.transcribe import DecodeOptions

    assert DecodeOptions().temperatures(0.0) == (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)
    assert DecodeOptions().temperatures(0.5) == (0.5, 0.7, 0.9)
    assert DecodeOptions().temperatures(1.0) == (1.0,)
    # never past 1.0, as Whisper's fallback (the rounded count went one step over)
    assert DecodeOptions().temperatures(0.7) == (0.7, 0.9)
    assert DecodeOptions().temperatures(0.25) == (0.25, 0.45, 0.65, 0.85)


@pytest.mark.parametrize("tokens", [[3, 7, 11, 5], [3, 7]])  # [sot, <|notimestamps|>] is a 2-token prompt
def test_plan_rows_of_one_slot_are_causal(tokens: list[int]) -> None:
    """A tiny random Whisper: a prompt prefilled in one call gives the same logits as the same tokens
    stepped one by one (attention within a run is causal, from 2 rows on), up to float rounding."""
    from metronome.audio.whisper import Decoder, DecoderCache, WhisperConfig

    cfg = WhisperConfig(
        n_mels=80, n_audio_ctx=6, n_audio_state=8, n_audio_head=2, n_audio_layer=1,
        n_vocab=50, n_text_ctx=10, n_text_state=8, n_text_head=2, n_text_layer=2,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    names: dict[str, np.ndarray] = {
        "decoder/embeddings/weight": torch.randn(50, 8, generator=g).numpy(),
        "decoder/position_encodings/encodings": torch.randn(10, 8, generator=g).numpy(),
        "decoder/layer_norm/gamma": np.ones(8, np.float32),
        "decoder/layer_norm/beta": np.zeros(8, np.float32),
    }
    shapes = {"self_attention/linear_0": 24, "self_attention/linear_1": 8, "attention/linear_0": 8}
    shapes |= {"attention/linear_1": 16, "attention/linear_2": 8, "ffn/linear_0": 32}
    for layer in range(2):
        p = f"decoder/layer_{layer}"
        for name, out in shapes.items():
            names[f"{p}/{name}/weight"] = (torch.randn(out, 8, generator=g) * 0.3).numpy()
            names[f"{p}/{name}/bias"] = (torch.randn(out, generator=g) * 0.1).numpy()
        names[f"{p}/ffn/linear_1/weight"] = (torch.randn(8, 32, generator=g) * 0.3).numpy()
        names[f"{p}/ffn/linear_1/bias"] = np.zeros(8, np.float32)
        for norm in ("self_attention", "attention", "ffn"):
            names[f"{p}/{norm}/layer_norm/gamma"] = np.ones(8, np.float32)
            names[f"{p}/{norm}/layer_norm/beta"] = np.zeros(8, np.float32)

    class _Fake:
        variables = names

        def get(self, name: str) -> np.ndarray:
            return names[name]

    dec = Decoder(_Fake(), cfg)  # type: ignore[arg-type]
    audio = torch.randn(6, 8, generator=g)
    a, b = DecoderCache.allocate(cfg, 2), DecoderCache.allocate(cfg, 2)
    with torch.inference_mode():
        dec.set_audio(a, 1, audio)
        dec.set_audio(b, 0, audio)
        n = len(tokens)
        full = dec.logits(dec.hidden(a, torch.full((n,), 1), torch.tensor(tokens), torch.arange(n)))
        for pos, t in enumerate(tokens):
            step = dec.logits(dec.hidden(b, torch.tensor([0]), torch.tensor([t]), torch.tensor([pos])))
            torch.testing.assert_close(step[0], full[pos], rtol=1e-5, atol=1e-5)


@pytest.mark.model
def test_a_silent_window_then_speech_as_faster_whisper(exact, reference, beckett: np.ndarray) -> None:
    """32 s of digital silence before the speech: the same segments as faster-whisper, its hallucinated
    " you" over the silence included (tiny.en's no-speech probability there is about 0.26, under 0.6)."""
    audio = np.concatenate([np.zeros(32 * SR, dtype=np.float32), beckett])
    out = exact.transcribe(audio)
    _same_segments(out.segments, reference(audio))
    assert "Ever tried" in out.text and out.segments[-1].seek == 3000


@pytest.mark.model
def test_a_window_judged_silent_gives_no_segment(exact, beckett: np.ndarray, monkeypatch) -> None:
    """Whisper's rule: no speech likely (no_speech_prob over 0.6) and a doubtful decode (avg_logprob under
    -1) means the window is skipped; a confident decode is kept whatever no_speech_prob says."""
    from metronome.audio import transcribe

    real = exact._decode_with_fallback
    calls: list[float] = []

    def judged(avg_logprob: float):
        def fake(audio, prompt, first, seed):
            d = real(audio, prompt, first, seed)
            calls.append(avg_logprob)
            return transcribe._Decoded(d.tokens, avg_logprob, 0.9, d.temperature, d.compression_ratio)

        return fake

    monkeypatch.setattr(exact, "_decode_with_fallback", judged(-2.0))
    assert exact.transcribe(beckett).segments == ()
    monkeypatch.setattr(exact, "_decode_with_fallback", judged(-0.5))
    assert "Ever tried" in exact.transcribe(beckett).text
    assert calls == [-2.0, -0.5]  # one window each


def test_a_timestamped_decode_never_picks_no_timestamps(model_dir: Path) -> None:
    """Once a window is decoded with timestamps, <|notimestamps|> must never win, at any step (at the first
    the opening-timestamp rule hides it anyway; later only its own suppression does)."""
    from metronome.audio.rules import apply_rules
    from metronome.audio.tokens import WhisperTokens

    tok = WhisperTokens(model_dir / "tokenizer.json", 51864)
    logits = np.zeros(51864, dtype=np.float32)
    logits[tok.no_timestamps] = 10.0
    for generated in ([], [tok.timestamp_begin], [tok.timestamp_begin, 345]):
        x = apply_rules(logits, generated, tok, timestamps=True, max_initial_timestamp=50)
        assert x[tok.no_timestamps] == -np.inf and int(np.argmax(x)) != tok.no_timestamps, generated


class _OneSlot:
    """The plan's slot bookkeeping, for a transcriber whose decodes are scripted."""

    def __init__(self) -> None:
        self.held = 0

    def acquire(self) -> int:
        self.held += 1
        return 0

    def release(self, slot: int) -> None:
        self.held -= 1


def _scripted(decodes: dict[float, tuple[float, float, float]]):
    """A Transcriber whose window decode at each temperature gives (compression_ratio, avg_logprob,
    no_speech_prob) from `decodes` (its tokens: [the temperature x 10]), and the temperatures it was asked for."""
    from metronome.audio import transcribe

    tr = transcribe.Transcriber.__new__(transcribe.Transcriber)
    tr.options, tr.plan, tried = transcribe.DecodeOptions(), _OneSlot(), []

    def decode(slot, audio, prompt, temperature, seed):
        tried.append(temperature)
        cr, logprob, no_speech = decodes[temperature]
        return transcribe._Decoded([round(temperature * 10)], logprob, no_speech, temperature, cr)

    tr._decode = decode
    return tr, tried


@pytest.mark.parametrize(
    "decodes, tried, kept, temperature",
    [
        # the greedy decode is good: taken, nothing more tried
        ({0.0: (1.5, -0.3, 0.1)}, [0.0], 0, 0.0),
        # too repetitive (compression ratio over 2.4), then good
        ({0.0: (2.6, -0.3, 0.1), 0.2: (1.5, -0.4, 0.1)}, [0.0, 0.2], 2, 0.2),
        # too unlikely (average log probability under -1), then good
        ({0.0: (1.5, -1.5, 0.1), 0.2: (1.5, -0.4, 0.1)}, [0.0, 0.2], 2, 0.2),
        # unlikely but silence (no-speech probability over 0.6): nothing better to find, no fallback
        ({0.0: (1.5, -1.5, 0.9)}, [0.0], 0, 0.0),
        # every temperature fails: the likeliest of those not too repetitive (0.6's, not 0.0's more likely
        # repetitive text), and the last temperature tried, which decides the next window's prompt
        (
            {
                0.0: (3.0, -0.2, 0.1),
                0.2: (2.0, -1.8, 0.1),
                0.4: (2.5, -1.1, 0.1),
                0.6: (2.0, -1.2, 0.1),
                0.8: (2.0, -1.6, 0.1),
                1.0: (2.0, -1.9, 0.1),
            },
            [0.0, 0.2, 0.4, 0.6, 0.8, 1.0],
            6,
            1.0,
        ),
        # every one too repetitive: the likeliest of all
        ({t: (3.0, -0.5 - t, 0.1) for t in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0)}, [0.0, 0.2, 0.4, 0.6, 0.8, 1.0], 0, 1.0),
    ],
)
def test_the_fallback_follows_whispers_rules(decodes, tried, kept, temperature) -> None:
    """Whisper's (and faster-whisper's) temperature fallback, on scripted decodes: which results send it to the
    next temperature, which one it keeps when all fail, and the temperature it reports."""
    tr, asked = _scripted(decodes)
    out = tr._decode_with_fallback(None, [1], 0.0, seed=0)
    assert asked == tried and out.tokens == [kept] and out.temperature == temperature
    assert tr.plan.held == 0  # the slot is given back


def test_fallback_temperatures_reach_one_from_any_start() -> None:
    from metronome.audio.transcribe import DecodeOptions

    # (1 - 0.4) / 0.2 is 2.9999999999999996 in floats: the last step, to 1.0, must not be lost to it
    assert DecodeOptions().temperatures(0.4) == (0.4, 0.6, 0.8, 1.0)
    assert DecodeOptions().temperatures(0.1) == (0.1, 0.3, 0.5, 0.7, 0.9)


_BIAS = b"a/bias\0" + struct.pack("<BI", 1, 2)  # the variable's name, rank 1, dimension 2: then its type id


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda raw: struct.pack("<I", 7) + raw[4:], "binary version 7 is not supported"),
        (lambda raw: struct.pack("<I", 3) + raw[4:], "binary version 3 is not supported"),
        (lambda raw: raw + b"\0", "1 trailing bytes"),
        (lambda raw: raw.replace(b"a/bias\0", b"a/bias!"), "malformed string"),
        (
            lambda raw: raw.replace(_BIAS + b"\0", _BIAS + b"\6"),
            "unknown type id 6",
        ),
        (
            lambda raw: raw.replace(_BIAS + b"\0", _BIAS + b"\4"),
            "has 8 bytes, its shape",
        ),
    ],
    ids=["newer-version", "older-version", "trailing-bytes", "string-without-nul", "type-id", "size"],
)
def test_ct2_reader_refuses_what_it_cannot_read(tmp_path: Path, damage, match: str) -> None:
    """Every way a file can be outside the format is a Ct2FormatError saying which (not a numpy error, and
    not a model read wrong): versions outside 4..6, an unknown type id (6 is one past bfloat16), a size its
    shape does not give, a string without its NUL, bytes after the alias table."""
    raw = _model_bin([("a/bias", np.array([1.5, -2.0], np.float32), 0)], [])
    assert read_model_bin(_write(tmp_path, raw)).get("a/bias").tolist() == [1.5, -2.0]
    with pytest.raises(Ct2FormatError, match=match):
        read_model_bin(_write(tmp_path, damage(raw)))


def _write(tmp_path: Path, raw: bytes) -> Path:
    path = tmp_path / "model.bin"
    path.write_bytes(raw)
    return path


def test_a_whisper_config_with_a_width_its_heads_do_not_divide_is_refused() -> None:
    from metronome.audio.whisper import WhisperConfig

    sizes = dict(n_mels=80, n_audio_ctx=6, n_audio_head=2, n_audio_layer=1, n_vocab=50, n_text_ctx=10, n_text_layer=1)
    WhisperConfig(**sizes, n_audio_state=8, n_text_state=8, n_text_head=2)
    with pytest.raises(ValueError, match="n_audio_state=9 is not divisible by its head count 2"):
        WhisperConfig(**sizes, n_audio_state=9, n_text_state=8, n_text_head=2)
    with pytest.raises(ValueError, match="n_text_state=8 is not divisible by its head count 3"):
        WhisperConfig(**sizes, n_audio_state=8, n_text_state=8, n_text_head=3)


class _StepRecorder:
    """A WhisperPlan's stand-in for the model's decode step: records the rows of every step and answers row i
    of a step with logits full of its token, so each caller can check it got its own row back."""

    def __init__(self) -> None:
        self.steps: list[list[tuple[int, int, int]]] = []

    def run(self, rows, n: int) -> torch.Tensor:  # WhisperPlan._run's signature
        self.steps.append([(r.slot, r.token, r.position) for r in rows])
        return torch.tensor([[float(r.token)] * 4 for r in rows])


def _recording_plan(monkeypatch, gather_s: float):
    from metronome.audio import plan as plan_module
    from metronome.audio.plan import PlanConfig, WhisperPlan
    from metronome.audio.whisper import WhisperConfig

    cfg = WhisperConfig(
        n_mels=80, n_audio_ctx=6, n_audio_state=8, n_audio_head=2, n_audio_layer=1,
        n_vocab=4, n_text_ctx=10, n_text_state=8, n_text_head=2, n_text_layer=1,
    )  # fmt: skip
    model = type("TinyWhisper", (), {"cfg": cfg})()
    plan = WhisperPlan(model, PlanConfig(slots=2, threads=1))  # type: ignore[arg-type]
    recorder = _StepRecorder()
    monkeypatch.setattr(plan, "_run", recorder.run)
    monkeypatch.setattr(plan_module, "GATHER_S", gather_s)
    return plan, recorder


def _wait_until(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout} s")
        time.sleep(0.001)


def test_a_step_waits_for_every_decoding_slots_row(monkeypatch) -> None:
    """The first caller leads the step and waits for the row of every other slot that is decoding, so two
    requests share one step (the leader's gather; without it each would run a step of its own), and each
    caller gets its own row's logits back."""
    plan, recorder = _recording_plan(monkeypatch, gather_s=30.0)  # far longer than the test: only the row ends it
    plan.begin_decoding(0)
    plan.begin_decoding(1)
    got: dict[int, torch.Tensor] = {}
    first = threading.Thread(target=lambda: got.__setitem__(0, plan.step(0, token=2, position=5)), daemon=True)
    first.start()
    _wait_until(lambda: plan._stepping, "the first caller claiming the step")
    got[1] = plan.step(1, token=3, position=7)
    first.join(timeout=10)
    assert not first.is_alive()
    assert recorder.steps == [[(0, 2, 5), (1, 3, 7)]]
    assert plan.most_rows == 2 and plan.steps == 1
    assert got[0].tolist() == [2.0] * 4 and got[1].tolist() == [3.0] * 4


def test_the_gather_is_bounded_when_a_decoding_slot_sends_no_row(monkeypatch) -> None:
    """A slot marked decoding that never steps (its request busy elsewhere) holds the leader only for the
    gather's bound: the step runs with the rows it has."""
    plan, recorder = _recording_plan(monkeypatch, gather_s=0.05)
    plan.begin_decoding(0)
    plan.begin_decoding(1)
    result: list[torch.Tensor] = []
    caller = threading.Thread(target=lambda: result.append(plan.step(0, token=1, position=0)), daemon=True)
    caller.start()
    caller.join(timeout=10)
    assert not caller.is_alive(), "the leader waited beyond the gather's bound for a row that never came"
    assert recorder.steps == [[(0, 1, 0)]] and result[0].tolist() == [1.0] * 4


def test_the_front_end_refuses_what_it_cannot_compute() -> None:
    """Only Whisper's 80- or 128-bin front ends, only mono samples, and a window holds 1..frames frames."""
    with pytest.raises(ValueError, match="80 or 128"):
        LogMel(64)
    with pytest.raises(ValueError, match="mono"):
        LogMel()(np.zeros((2, 1600), np.float32))
    feats = torch.ones(80, 10)
    for length in (0, 3001):
        with pytest.raises(ValueError, match="a window holds"):
            window(feats, 0, length)


def test_silence_is_the_log_floor() -> None:
    """All-zero audio sits at the 1e-10 power floor: log10 gives -10, scaled (x + 4) / 4 to -1.5 everywhere."""
    out = LogMel()(np.zeros(1600, np.float32))
    assert out.shape == (80, 11) and torch.all(out == -1.5)


def _rule_tokens():
    """apply_rules' view of a vocabulary: text 0..9, eot 10, sot 11, <|notimestamps|> 12, timestamps 13..19."""
    from types import SimpleNamespace

    return SimpleNamespace(
        suppressed_array=np.array([11], dtype=np.int64), suppressed_at_start=(3, 10), eot=10, no_timestamps=12,
        timestamp_begin=13,
    )  # fmt: skip


def test_whispers_decoding_rules_on_a_tiny_vocabulary() -> None:
    """The rules one by one: the first token is never a bare space or the end; the opening timestamp is at
    most max_initial_timestamp; after the opening timestamp text follows; after an open segment's end
    timestamp only a later timestamp or the end; timestamps win ties only when they outweigh text; the
    caller's logits are left as they were."""
    from metronome.audio.rules import apply_rules

    tok = _rule_tokens()
    logits = np.zeros(20, dtype=np.float32)
    kept = logits.copy()
    x = apply_rules(logits, [], tok, timestamps=False, max_initial_timestamp=2)
    assert np.isneginf(x[[3, 10, 11]]).all() and np.isfinite(x[[0, 12, 13]]).all()
    assert np.array_equal(logits, kept)
    x = apply_rules(logits, [], tok, timestamps=True, max_initial_timestamp=2)
    assert np.isfinite(x).nonzero()[0].tolist() == [13, 14, 15]
    x = apply_rules(logits, [13], tok, timestamps=True, max_initial_timestamp=2)  # <|0.00|> opened the window
    assert np.isneginf(x[13:]).all() and np.isfinite(x[[0, 10]]).all()
    end = logits.copy()
    end[10] = 5.0  # the end likelier than the timestamps together: the probability rule keeps it
    x = apply_rules(end, [13, 5, 15], tok, timestamps=True, max_initial_timestamp=2)  # a segment's end
    assert np.isfinite(x).nonzero()[0].tolist() == [10, 15, 16, 17, 18, 19]
    # one timestamp exactly as likely as the best text token: a tie is not "outweighs", text stays allowed
    tie = np.full(20, -np.inf, dtype=np.float32)
    tie[[0, 1, 16]] = [1.0, 0.0, 1.0]
    x = apply_rules(tie, [13, 0], tok, timestamps=True, max_initial_timestamp=2)
    assert x[0] == 1.0 and x[16] == 1.0
    tie[16] = 1.01
    assert np.isneginf(apply_rules(tie, [13, 0], tok, timestamps=True, max_initial_timestamp=2)[0])


def _byte_vocabulary(tmp_path: Path, nospeech: str) -> Path:
    """A byte-level tokenizer.json: the 256 bytes, one merge (' -'), and Whisper's special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    alphabet = ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    vocab["Ġ-"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [("Ġ", "-")]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|startoftranscript|>", "<|en|>", "<|fr|>", "<|translate|>", "<|transcribe|>"]
    tok.add_special_tokens([*specials, "<|startoflm|>", "<|startofprev|>", nospeech, "<|notimestamps|>"])
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def test_whisper_tokens_of_a_tiny_byte_vocabulary(tmp_path: Path) -> None:
    """The special tokens, multilingual from 51865 tokens (its start sequence names language and task),
    <|nospeech|> where the vocabulary has it, the suppressed set (non-speech symbols, the first byte of a
    multi-byte music symbol, every control token) and the tokens never first (a bare space, the end)."""
    from metronome.audio.tokens import WhisperTokens

    path = _byte_vocabulary(tmp_path, "<|nospeech|>")
    english = WhisperTokens(path, 51864)
    assert not english.multilingual and english.sot_sequence("fr", "translate") == [english.sot]
    many = WhisperTokens(path, 51865)
    assert many.multilingual and many.timestamp_end == 51864
    fr = many.language_token("fr")
    assert many.sot_sequence("fr", "translate") == [many.sot, fr, many.translate]
    assert many.sot_sequence("fr", "transcribe") == [many.sot, fr, many.transcribe]
    assert many.no_speech == many.tokenizer.token_to_id("<|nospeech|>") and many.no_speech in many.suppressed
    assert many.encode("♪")[0] in many.non_speech and len(many.encode("♪")) == 3  # its first byte
    assert many.encode("#")[0] in many.suppressed and many.encode(" -")[0] in many.suppressed
    assert many.suppressed_at_start == (many.encode(" ")[0], many.eot)
    (tmp_path / "old").mkdir()
    old = WhisperTokens(_byte_vocabulary(tmp_path / "old", "<|nocaptions|>"), 51864)  # the older checkpoints' name
    assert old.no_speech == old.tokenizer.token_to_id("<|nocaptions|>")
