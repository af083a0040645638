"""The chat page in a real browser: Debian's chromium driven by playwright (never `playwright install`)."""

from __future__ import annotations

import os
import shutil
import time

import pytest
from helpers.live_server import LiveServer

from metronome.config import EngineConfig
from metronome.engine import Engine
from metronome.serve.server import ModelIdentity, ServerSettings, create_app

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOT = "/tmp/chat.png"


@pytest.fixture(scope="module")
def chat_url(smollm):
    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=512), loaded=smollm)
    app = create_app(engine, ServerSettings(), ModelIdentity.of(smollm))
    try:
        with LiveServer(app) as url:
            yield url
    finally:
        engine.stop()


@pytest.fixture(scope="module")
def page(chat_url):
    from playwright import sync_api  # a test dependency (pyproject [test]); the browser is Debian's

    if not shutil.which(CHROMIUM):
        # .ci/run installs it; on a developer machine without it, say how to get it rather than fail obscurely.
        if os.environ.get("CI"):
            pytest.fail("no chromium in CI: .ci/run should have run `apt-get install -y chromium`")
        pytest.skip("no chromium: apt-get install -y chromium")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 760})
            page.goto(chat_url)
            yield page
        finally:
            browser.close()


def _ask(page, prompt: str) -> list[str]:
    """Send a prompt; return the answer texts seen while it was still streaming."""
    page.fill("#prompt", prompt)
    page.press("#prompt", "Enter")
    answer = page.locator(".turn .answer").first
    partial: list[str] = []
    for _ in range(3000):  # bounded: at most a few minutes on a loaded machine
        state = page.evaluate(
            "() => { const a = document.querySelector('.turn .answer');"
            " return a ? [a.textContent, a.classList.contains('pending')] : ['', true]; }"
        )
        if not state[1]:
            break
        if state[0]:
            partial.append(state[0])
        time.sleep(0.05)
    assert "pending" not in (answer.get_attribute("class") or "")
    return partial


def test_chat_page_streams_an_answer_with_its_timings(page):
    page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=60_000)
    page.fill("#max-tokens", "40")
    partial = _ask(page, "Tell me a short story about a lighthouse.")
    final = page.locator(".turn .answer").first.text_content()
    assert final and not final.startswith("Error")
    assert partial and partial[0] != final, "the text should appear piece by piece while streaming"
    assert all(final.startswith(p) for p in partial)
    timing = page.locator(".turn .timing").first.text_content()
    assert "TTFT" in timing and "tok/s" in timing and "first sentence" in timing

    # the prompt box is at the top of the page, the answer below it
    form, turn = page.locator("#ask").bounding_box(), page.locator(".turn").first.bounding_box()
    assert form["y"] < 120 and form["y"] + form["height"] <= turn["y"]

    # the conversation is kept: the second question is sent with the first exchange
    page.fill("#max-tokens", "12")
    _ask(page, "Give it a title.")
    assert page.locator(".turn").count() == 2
    assert page.evaluate("conversation.length") == 4
    assert page.evaluate("conversation.map(m => m.role)") == ["user", "assistant", "user", "assistant"]
    page.screenshot(path=SCREENSHOT, full_page=True)
