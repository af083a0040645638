"""The chat page in a real browser: Debian's chromium driven by playwright (never `playwright install`)."""

from __future__ import annotations

import json
import os
import shutil
import time

import httpx
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
def browser():
    from playwright import sync_api  # a test dependency (pyproject [test]); the browser is Debian's

    if not shutil.which(CHROMIUM):
        # .ci/run installs it; on a developer machine without it, say how to get it rather than fail obscurely.
        if os.environ.get("CI"):
            pytest.fail("no chromium in CI: .ci/run should have run `apt-get install -y chromium`")
        pytest.skip("no chromium: apt-get install -y chromium")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def page(browser, chat_url):
    page = browser.new_page(viewport={"width": 1000, "height": 760})
    try:
        page.goto(chat_url)
        page.wait_for_function("document.getElementById('status').textContent === 'ready'", timeout=60_000)
        yield page
    finally:
        page.close()


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


def test_the_keyboard_is_back_in_the_prompt_box_after_send_is_clicked(page):
    """Clicking Send disabled the button that had the focus: the focus fell to the page, and typing went nowhere."""
    page.fill("#max-tokens", "4")
    page.fill("#prompt", "Say hi.")
    page.click("#send")
    page.wait_for_function("!document.getElementById('send').disabled", timeout=120_000)
    assert page.evaluate("document.activeElement.id") == "prompt"


def _metric(url: str, name: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} is not in /metrics")


CANCELLED = 'metronome_api_requests_ended_total{endpoint="/v1/chat/completions",outcome="cancelled"}'


def _start_a_long_answer(page, shown: int) -> None:
    """Ask for a 400-token story; return once `shown` characters of it are on the page."""
    page.fill("#max-tokens", "400")
    page.fill("#prompt", "Tell me a long story about a lighthouse keeper and the sea.")
    page.press("#prompt", "Enter")
    page.wait_for_function(f"document.querySelector('.turn .answer').textContent.length >= {shown}", timeout=120_000)


def test_new_chat_cancels_the_answer_streaming_and_starts_empty(page, chat_url):
    """New chat while an answer streamed left it generating on the server, Send disabled until it ended, and
    the old answer was then put at the head of the new conversation."""
    cancelled = _metric(chat_url, CANCELLED)
    _start_a_long_answer(page, shown=1)
    page.click("#new-chat")
    page.wait_for_function("!document.getElementById('send').disabled", timeout=30_000)
    assert page.evaluate("conversation.length") == 0 and page.locator(".turn").count() == 0
    deadline = time.monotonic() + 30
    while _metric(chat_url, CANCELLED) < cancelled + 1 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _metric(chat_url, CANCELLED) == cancelled + 1  # the server stopped generating it
    page.fill("#max-tokens", "8")
    _ask(page, "Say hi.")
    assert page.evaluate("conversation.map(m => m.role)") == ["user", "assistant"]
    assert page.evaluate("conversation[0].content") == "Say hi."


def test_stop_keeps_what_was_answered_and_says_it_stopped(page):
    """The answer is redrawn at most every 50 ms while it streams: Stop draws what had come first, and a
    redraw still due must not wipe the "[stopped]" after it."""
    _start_a_long_answer(page, shown=20)
    page.click("#stop")
    page.wait_for_function("!document.getElementById('send').disabled", timeout=30_000)
    time.sleep(0.3)  # past any redraw that was due
    shown = page.locator(".turn .answer").first.text_content()
    kept = page.evaluate("conversation[conversation.length - 1]")
    assert kept["role"] == "assistant" and kept["content"], kept
    assert shown == kept["content"] + "[stopped]", (shown, kept)


def test_a_long_unbroken_line_wraps_inside_its_card(page):
    page.fill("#max-tokens", "4")
    _ask(page, "https://example.com/" + "a" * 600)
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def test_enter_that_confirms_a_composition_does_not_send(page):
    page.fill("#prompt", "にほん")
    page.evaluate(
        "document.getElementById('prompt').dispatchEvent(new KeyboardEvent('keydown',"
        " {key: 'Enter', isComposing: true, keyCode: 229, bubbles: true, cancelable: true}))"
    )
    time.sleep(0.3)
    assert page.locator(".turn").count() == 0 and page.input_value("#prompt") == "にほん"


def _chunk(content: str | None = None, finish: str | None = None, usage: dict | None = None) -> str:
    delta = {} if content is None else {"content": content}
    body = {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else []}
    if usage is not None:
        body["usage"] = usage
    return "data: " + json.dumps(body)


def _served(page, body: str) -> None:
    """The next chat completion answered with `body` as its event stream (whole, in one piece)."""
    page.route(
        "**/v1/chat/completions",
        lambda route: route.fulfill(status=200, content_type="text/event-stream", body=body),
        times=1,
    )


USAGE = {"prompt_tokens": 5, "completion_tokens": 51, "total_tokens": 56, "completion_time": 0.5}


@pytest.mark.parametrize(
    ("body", "answer", "timing"),
    [
        (  # every event in one piece: the rate is the server's, not 50 tokens over no time
            "\n\n".join(
                [_chunk("Hello"), _chunk(" there."), _chunk(finish="stop"), _chunk(usage=USAGE), "data: [DONE]"]
            )
            + "\n\n",
            "Hello there.",
            "100.0 tok/s",
        ),
        (  # the engine's promises beside what was measured; none where the usage carries none ("burst")
            "\n\n".join(
                [
                    _chunk("Hi."),
                    _chunk(finish="stop"),
                    _chunk(
                        usage={
                            **USAGE,
                            "predicted_time_to_first_token": 0.12,
                            "predicted_output_tokens_per_second": 97.46,
                        }
                    ),
                    "data: [DONE]",
                ]
            )
            + "\n\n",
            "Hi.",
            "(promised 0.12 s) · 100.0 tok/s (promised 97.5) · first sentence",
        ),
        (  # lines ended with CRLF (the SSE spec allows it), the last event without its blank line
            "\r\n\r\n".join([_chunk("Hi"), _chunk("!", "stop"), _chunk(usage=USAGE), "data: [DONE]"]),
            "Hi!",
            "51 tokens",
        ),
        ("\n\n".join([_chunk("Half an"), _chunk(" answer")]) + "\n\n", "Error: the stream ended before", None),
        (
            "\n\n".join([_chunk(finish="stop"), _chunk(usage={**USAGE, "completion_tokens": 0}), "data: [DONE]"])
            + "\n\n",
            "(the model answered nothing)",
            None,
        ),
        ('data: {"choices": [oops\n\n', "Error:", None),
    ],
    ids=["burst", "promise", "crlf", "cut-short", "empty", "malformed"],
)
def test_the_stream_is_read_whatever_its_line_ends_and_an_answer_cut_short_is_an_error(page, body, answer, timing):
    """The page split events on LF only (a CRLF stream showed a blank answer), dropped a last event without
    its blank line, showed a stream cut before its end as a whole answer, divided the token count by the
    spread of chunk arrivals (245,000 tok/s when they came in one piece), and showed nothing for an empty
    answer."""
    _served(page, body)
    _ask(page, "Anything.")
    assert answer in page.locator(".turn .answer").first.text_content()
    shown = page.locator(".turn .timing").first.text_content()
    if timing is not None:
        assert timing in shown
    assert ("promised" in shown) == ("predicted_" in body), shown
    whole = not answer.startswith("Error")
    assert page.evaluate("conversation.length") == (2 if whole else 0)  # a failed turn is left out, to retry
