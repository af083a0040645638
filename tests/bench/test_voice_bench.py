"""`metronome bench --voice`: the voice loop (audio -> transcript -> streamed chat -> first sentence) against a
live server with the real Whisper tiny.en and a tiny random chat model, at two levels of speakers."""

from __future__ import annotations

import json
from importlib import util
from pathlib import Path

import pytest
from helpers.live_server import LiveServer

from metronome.audio.decode import decode_audio
from metronome.bench.voice import measure_voice, voice_markdown
from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.model.loader import load
from metronome.serve.audio import SpeechService
from metronome.serve.server import ModelIdentity, ServerSettings, create_app

pytestmark = pytest.mark.model  # loads Whisper tiny.en


@pytest.fixture(scope="module")
def beckett() -> Path:
    spec = util.find_spec("moonshine_onnx")
    if spec is None:
        pytest.skip("useful-moonshine-onnx is not installed: pip install --no-deps useful-moonshine-onnx==20251121")
    return Path(spec.origin).parent / "assets" / "beckett.wav"


@pytest.fixture(scope="module")
def transcriber():
    from metronome.audio.transcribe import Transcriber

    transcriber = Transcriber.load(None)
    yield transcriber
    transcriber.close()


@pytest.fixture(scope="module")
def urls(tiny_hf, transcriber):
    loaded = load(tiny_hf("llama"))
    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=256), loaded=loaded)
    speech = SpeechService()
    speech.attach(transcriber)
    with_speech = create_app(engine, ServerSettings(), ModelIdentity.of(loaded), speech=speech)
    without = create_app(engine, ServerSettings(), ModelIdentity.of(loaded))
    try:
        with LiveServer(with_speech) as a, LiveServer(without) as b:
            yield a, b
    finally:
        speech.stop()
        engine.stop()


def test_the_loop_at_one_and_two_speakers(urls, beckett, transcriber):
    expected = transcriber.transcribe(decode_audio(beckett.read_bytes()).samples).text.strip()
    levels = measure_voice(urls[0], beckett, (1, 2), loops=1, max_tokens=8, timeout_s=300)
    assert [lv.speakers for lv in levels] == [1, 2] and [lv.ok for lv in levels] == [1, 2]
    for loop in (loop for lv in levels for loop in lv.loops):
        assert loop.transcript == expected
        assert 0 < loop.ttft_s <= loop.first_sentence_s
        # the loop spans the transcript and the chat request up to its first sentence
        assert loop.loop_s >= loop.transcript_s + loop.first_sentence_s
    table = voice_markdown(levels, beckett, 8)
    assert "| 1 | 1/1 |" in table and "| 2 | 2/2 |" in table and expected in table


def test_the_bench_command_writes_its_files_and_fails_without_a_speech_model(urls, beckett, tmp_path, capsys):
    from metronome.cli import main

    args = ["bench", "--voice", "--concurrency", "1", "--rounds", "1", "--output-tokens", "4"]
    assert main([*args, "--url", urls[0], "--audio", str(beckett), "--out", str(tmp_path)]) == 0
    loops = json.loads((tmp_path / "voice.json").read_text())[0]["loops"]
    assert len(loops) == 1 and loops[0]["ok"] and "| 1 | 1/1 |" in capsys.readouterr().out
    assert main([*args, "--url", urls[1], "--audio", str(beckett), "--out", str(tmp_path)]) == 1
    assert "serves no speech model" in capsys.readouterr().err
    assert main([*args, "--url", urls[0], "--audio", str(tmp_path / "none.wav")]) == 2


def test_a_loop_that_hears_nothing_fails_and_an_unreachable_server_is_said_plainly(urls, tmp_path, capsys):
    """An empty transcript was timed as a loop that worked, its chat answering an empty prompt (the chat page
    says "heard nothing"); a server that is not there was an httpx traceback, where the other benches say so."""
    import socket
    import wave

    import numpy as np

    from metronome.cli import main

    clip = tmp_path / "blip.wav"
    with wave.open(str(clip), "wb") as w:  # 50 ms of a tone: audible, and no words in it
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes((np.sin(np.arange(800) * 0.3) * 8000).astype(np.int16).tobytes())
    levels = measure_voice(urls[0], clip, (1,), loops=1, max_tokens=4, timeout_s=120)
    (loop,) = levels[0].loops
    assert not loop.ok and "heard nothing" in loop.error and levels[0].ok == 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    args = ["bench", "--voice", "--concurrency", "1", "--rounds", "1", "--output-tokens", "4", "--audio", str(clip)]
    assert main([*args, "--url", f"http://127.0.0.1:{port}"]) == 1
    assert "check that the server is running" in capsys.readouterr().err


def test_a_levels_p90_is_the_percentile_the_other_benches_read():
    """The voice bench took rank int(0.9 n): the slowest loop whenever there were 10 or fewer."""
    from metronome.bench.voice import Level, Loop

    loops = tuple(
        Loop(i, True, None, 0.1, 0.2, 0.3, float(s), "") for i, s in enumerate([5, 1, 9, 3, 7, 2, 10, 4, 8, 6])
    )
    assert Level(10, 1.0, loops).p90("loop_s") == pytest.approx(9.1)


def test_a_loop_is_timed_from_the_upload_to_the_answers_first_sentence(monkeypatch):
    """A loop's times on a made-up clock: the transcript 2 s after the upload started, the chat request sent
    0.5 s later, its first sentence shown by its third chunk (0.3 s after its send: the chunk holding the
    space after the full stop). The loop is 2.5 + 0.3 s; TTFT and first sentence are the chat request's own."""
    import asyncio
    from types import SimpleNamespace

    import httpx

    from metronome.bench import voice
    from metronome.bench.metrics import StreamTrace

    clock = iter([10.0, 12.0, 12.5])
    monkeypatch.setattr(voice, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    sent = []

    async def chat(_http, _base, _api, _model, spec, _timeout):
        sent.append(spec.prompt)
        return StreamTrace(chunk_times=(0.1, 0.2, 0.3, 0.4), chunk_texts=("Hi", " there.", " More", "."), end_s=0.5)

    monkeypatch.setattr(voice, "stream_request", chat)
    heard = httpx.MockTransport(lambda _request: httpx.Response(200, json={"text": " hello there "}))

    async def one() -> voice.Loop:
        async with httpx.AsyncClient(transport=heard) as http:
            return await voice._one_loop(http, "http://x", "m", b"RIFF", "a.wav", 0, 8, 30.0)

    loop = asyncio.run(one())
    assert loop.ok and sent == ["hello there"] and loop.transcript == "hello there"
    assert (loop.transcript_s, loop.ttft_s, loop.first_sentence_s) == (2.0, 0.1, 0.3)
    assert loop.loop_s == pytest.approx(2.8)


def test_a_level_counts_and_times_only_the_loops_that_worked(tmp_path):
    """A loop that heard nothing has a transcript time but is no loop done: it is out of the medians and of
    loops/s (1 loop done in 2 s is 0.50 loops/s, not 1.00)."""
    from metronome.bench.voice import Level, Loop

    done = Loop(0, True, None, 1.0, 0.2, 0.4, 1.5, "hello")
    silent = Loop(1, False, "transcription: heard nothing (an empty transcript)", 9.0, None, None, None, "")
    level = Level(2, 2.0, (done, silent))
    assert level.median("transcript_s") == 1.0 and level.ok == 1
    table = voice_markdown([level], tmp_path / "a.wav", 8)
    assert "| 2 | 1/2 | 1.000 (1.000) | 0.200 | 0.400 | 1.500 (1.500) | 0.50 |" in table, table
    assert "error: transcription: heard nothing" in table
