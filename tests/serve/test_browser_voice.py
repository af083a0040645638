"""The voice loop in a real browser: Chromium with a fake microphone playing beckett.wav records a
question, the page sends it to /v1/audio/transcriptions, the transcript becomes the prompt and the
answer streams, with the time to transcript, TTFT and time to first sentence shown."""

from __future__ import annotations

import re
import shutil
import time
from importlib import util
from pathlib import Path

import httpx
import pytest
from helpers.live_server import LiveServer

from metronome.audio.decode import decode_audio
from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.serve.audio import SpeechService
from metronome.serve.server import ModelIdentity, ServerSettings, create_app

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOT = "/tmp/voice.png"


def _beckett() -> Path:
    spec = util.find_spec("moonshine_onnx")
    if spec is None:
        pytest.skip("useful-moonshine-onnx is not installed: pip install --no-deps useful-moonshine-onnx==20251121")
    return Path(spec.origin).parent / "assets" / "beckett.wav"  # 16-bit PCM: what Chromium's fake device reads


@pytest.fixture(scope="module")
def transcriber():
    from metronome.audio.transcribe import Transcriber

    transcriber = Transcriber.load(None)
    yield transcriber
    transcriber.close()


@pytest.fixture(scope="module")
def voice_url(smollm, transcriber):
    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=512), loaded=smollm)
    speech = SpeechService()
    speech.attach(transcriber)
    app = create_app(engine, ServerSettings(), ModelIdentity.of(smollm), speech=speech)
    try:
        with LiveServer(app) as url:
            yield url
    finally:
        speech.stop()
        engine.stop()


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def test_models_lists_the_chat_model_then_the_speech_model(voice_url, smollm):
    data = httpx.get(f"{voice_url}/v1/models", timeout=30).json()["data"]
    assert [m["id"] for m in data] == [smollm.path.stem, "whisper-tiny.en"]
    assert data[1]["kind"] == "speech-to-text"
    assert httpx.get(f"{voice_url}/v1/models/whisper-1", timeout=30).json()["id"] == "whisper-tiny.en"


def test_speak_transcribe_answer(voice_url, transcriber):
    from playwright import sync_api

    if not shutil.which(CHROMIUM):
        pytest.skip("no chromium: apt-get install -y chromium")
    wav = _beckett()
    heard = _words(transcriber.transcribe(decode_audio(wav.read_bytes()).samples).text)
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--use-fake-ui-for-media-stream",  # grant the microphone without asking
        "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
    ]
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.goto(voice_url)
            page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=60_000)
            assert page.is_visible("#mic")
            page.fill("#max-tokens", "24")
            page.click("#mic")
            page.wait_for_function("document.getElementById('status').textContent === 'listening…'", timeout=30_000)
            time.sleep(4.0)  # speak for four seconds (the fake device plays the file)
            page.click("#mic")
            page.wait_for_selector(".turn .answer:not(.pending)", timeout=180_000)
            prompt = page.locator(".turn .you").first.text_content()
            answer = page.locator(".turn .answer").first.text_content()
            timing = page.locator(".turn .timing").first.text_content()
            page.screenshot(path=SCREENSHOT, full_page=True)
        finally:
            browser.close()
    assert prompt and _words(prompt) & heard, (prompt, heard)  # the prompt is what the microphone heard
    assert answer and not answer.startswith("Error")
    for stage in ("transcript", "TTFT", "first sentence", "end of speech to first sentence"):
        assert re.search(stage + r" \d+\.\d\d s", timing), (stage, timing)


def test_a_slip_of_the_finger_is_not_sent(voice_url):
    """Speak clicked twice at once stopped the recorder before its first frame: the page sent a webm cut
    before its audio and showed the server's "not audio FFmpeg can read". It now says the recording was too
    short and sends nothing; the server calls such a file empty (audio/decode.py). No favicon request 404s."""
    from playwright import sync_api

    if not shutil.which(CHROMIUM):
        pytest.skip("no chromium: apt-get install -y chromium")
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--use-fake-ui-for-media-stream"]
    args.append("--use-fake-device-for-media-stream")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page()
            posted, missing = [], []
            page.on("request", lambda r: posted.append(r.url) if "/v1/audio/" in r.url else None)
            page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
            page.goto(voice_url)
            page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=60_000)
            page.click("#mic")
            page.wait_for_function("document.getElementById('status').textContent === 'listening…'", timeout=30_000)
            page.click("#mic")
            page.wait_for_function(
                "document.getElementById('status').textContent.startsWith('too short')", timeout=30_000
            )
            time.sleep(0.5)  # a request the page might still send would be seen by now
        finally:
            browser.close()
    assert posted == [] and missing == []
