"""The Python API used from threads and by hand (engine/api.py, Engine's start/stop/close): what a caller's
callback may do to the others, Ctrl-C in the middle of a step, an engine whose thread ended, and inputs of
the wrong shape. A tiny random llama, so each test runs in seconds."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

from metronome.config import EngineConfig, ParamError, SamplingParams
from metronome.engine import Engine
from metronome.engine.request import RequestError

PARAMS = SamplingParams(max_tokens=8, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=8, ignore_eos=True, temperature=0.9, seed=11)


@pytest.fixture
def engine(tiny_hf):
    from metronome.model.loader import load

    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=128), loaded=load(tiny_hf("llama")), max_queue=2)
    yield engine
    engine.close()


def test_generate_from_a_callback_is_refused_not_a_hang(engine):
    """A callback runs inside the step: generate(), step() or close() there waited for that step (for ever,
    and with start() every other caller behind it)."""
    errors: list[BaseException] = []

    def on_event(delta) -> None:
        if delta.finish_reason is not None:
            for call in (lambda: engine.generate([5, 6], PARAMS), engine.step, engine.close):
                try:
                    call()
                except RuntimeError as exc:
                    errors.append(exc)

    for started in (False, True):
        if started:
            engine.start()
        errors.clear()
        engine.submit([5, 6, 7], PARAMS, on_event)
        done = threading.Event()
        caller = threading.Thread(target=lambda done=done: (engine.generate([8, 9], PARAMS), done.set()))
        caller.start()
        assert done.wait(timeout=60), "a bystander's generate hung behind the callback"
        caller.join(timeout=10)
        assert len(errors) == 3 and all("callback" in str(e) for e in errors), errors


def test_a_callback_that_raises_fails_its_own_request_only(engine):
    """A raising callback ended every request of the step with "error" (with start()), or raised in
    whichever thread was stepping (without). Now its request is cancelled, with the reason noted, and the
    others run exactly as alone."""
    alone = engine.generate([8, 9, 10], SAMPLED).token_ids
    for started in (False, True):
        if started:
            engine.start()

        def broken(delta) -> None:
            raise ValueError("a bug in someone else's callback")

        bad = engine.submit([5, 6, 7], PARAMS, broken)
        other = engine.generate([8, 9, 10], SAMPLED)
        assert other.finish_reason == "length" and other.token_ids == alone
        assert bad.cancelled and "a bug in someone else's callback" in bad.error


def test_a_callback_that_raises_on_the_last_event_is_logged(engine, caplog):
    """With nothing left to cancel, the exception went nowhere: no log, nothing on the request."""

    def broken_at_the_end(delta) -> None:
        if delta.finish_reason is not None:
            raise ValueError("a bug in the finish handler")

    with caplog.at_level("ERROR", logger="metronome.engine"):
        engine.submit([5, 6, 7], PARAMS, broken_at_the_end)
        while engine.step():
            pass
    assert any("last event" in r.message and "finish handler" in str(r.exc_info[1]) for r in caplog.records), (
        caplog.text
    )


def test_a_callback_that_raised_gets_no_more_tokens_only_its_end(engine, caplog):
    """The engine's thread hands a step's events over after the next step's schedule, so the cancel took
    effect a step late and that step made one more token, which was handed to the callback that had raised
    (raising again, logged as its "last event")."""
    seen: list[str | None] = []
    ended = threading.Event()

    def broken(delta) -> None:
        seen.append(delta.finish_reason)
        if delta.finish_reason is not None:
            ended.set()
        raise ValueError("a bug in the token handler")

    engine.start()
    with caplog.at_level("ERROR", logger="metronome.engine"):
        bad = engine.submit([5, 6, 7], PARAMS, broken)
        assert ended.wait(timeout=60)
    assert seen == [None, "cancelled"] and bad.finish_reason == "cancelled", seen
    logged = [r.message for r in caplog.records]
    assert sum("the request is cancelled" in m for m in logged) == 1 and sum("last event" in m for m in logged) == 1


def test_ctrl_c_in_a_step_ends_the_others_requests_rather_than_corrupting_them(engine, monkeypatch):
    """Without start(), a KeyboardInterrupt inside a step (the caller's Ctrl-C) skipped the step's failure
    handling: another thread's request was left half-sampled in its slot and went on to produce other
    tokens, with no error. Now it ends with "error"."""
    alone = engine.generate([8, 9, 10], SAMPLED).token_ids
    real = engine.plan.decode
    calls = [0]

    def interrupted(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 4:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.plan, "decode", interrupted)
    events: list = []
    other = engine.submit([8, 9, 10], SAMPLED, events.append)
    with pytest.raises(KeyboardInterrupt):
        engine.generate([5, 6, 7], PARAMS)
    monkeypatch.setattr(engine.plan, "decode", real)
    while other.finish_reason is None:
        engine.step()
    assert other.finish_reason == "error", other.output_ids  # not tokens other than its own, silently
    assert engine.scheduler.idle and engine.generate([8, 9, 10], SAMPLED).token_ids == alone


def test_an_engine_whose_thread_ended_starts_again_and_reports_errors(engine, monkeypatch):
    """After stop() timed out, start() did nothing and every later call failed; after the thread ended, a
    generate() that failed returned finish_reason "error" with no word of why."""
    engine.start()
    real = engine.plan.decode
    monkeypatch.setattr(engine.plan, "decode", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("simulated")))
    failed = engine.generate([5, 6, 7], PARAMS)
    assert failed.finish_reason == "error" and "simulated" in failed.error
    monkeypatch.setattr(engine.plan, "decode", real)
    gate, entered = threading.Event(), threading.Event()

    def slow(*args, **kwargs):
        entered.set()
        gate.wait(timeout=30)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.plan, "decode", slow)
    engine.submit([5, 6, 7], PARAMS, lambda d: None)
    assert entered.wait(timeout=30)
    with pytest.raises(TimeoutError):
        engine.stop(timeout=0.05)
    with pytest.raises(RuntimeError, match="stop\\(\\) again"):
        engine.start()
    gate.set()
    monkeypatch.setattr(engine.plan, "decode", real)
    engine.stop()
    engine.start()
    assert engine.generate([5, 6, 7], PARAMS).finish_reason == "length"


def test_inputs_of_the_wrong_shape_are_refused_naming_them(engine):
    ids = engine.generate([5, 6, 7], PARAMS).token_ids
    # token ids as numpy or torch integers are token ids (they were read as chat text)
    for given in (np.array([5, 6, 7]), [np.int64(5), np.int64(6), np.int64(7)], torch.tensor([5, 6, 7])):
        assert engine.generate(given, PARAMS).token_ids == ids
    # a message dict (not a list of them) was two prompts: "role" and "content"
    with pytest.raises(RequestError, match="list of message dicts") as err:
        engine.generate({"role": "user", "content": "hi"}, PARAMS)
    assert err.value.param == "prompts"
    with pytest.raises(RequestError) as err:
        engine.generate([{"role": "user"}], PARAMS)
    assert err.value.param == "prompt[0]"
    with pytest.raises(RequestError, match="not NoneType"):
        engine.generate(None, PARAMS)
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.generate("x", {"max_tokens": 3})
    assert SamplingParams(stop=None).stop == ()
    with pytest.raises(ParamError) as perr:
        SamplingParams(stop_token_ids=5)
    assert perr.value.param == "stop_token_ids"
    # more prompts than the engine ever holds could never run: refused up front, not "queue full, retry"
    with pytest.raises(RequestError, match="at most 4") as err:
        engine.generate(["a", "b", "c", "d", "e"], PARAMS)
    assert err.value.param == "prompts" and engine.scheduler.idle
    # a prompt that fills the context names the prompt (it said "messages", the chat route's name)
    with pytest.raises(RequestError, match="exceeds the context") as err:
        engine.generate([5] * 128, PARAMS)
    assert err.value.param == "prompt"


def test_close_and_with_release_the_engine(tiny_hf):
    from metronome.model.loader import load

    with Engine.from_model(config=EngineConfig(slots=1, ctx=64), loaded=load(tiny_hf("llama"))) as engine:
        engine.start()
        assert engine.generate([5, 6], PARAMS).finish_reason == "length"
    assert not engine.running and engine._thread is None
    for call in (lambda: engine.submit([5], PARAMS), engine.start, engine.step):
        with pytest.raises(RuntimeError, match="closed"):
            call()


def test_close_ends_the_requests_still_in_with_their_final_event(tiny_hf):
    """Closed with requests in, their callbacks never heard an end: finish_reason stayed None."""
    from metronome.model.loader import load

    engine = Engine.from_model(config=EngineConfig(slots=1, ctx=64), loaded=load(tiny_hf("llama")))
    ends: list = []
    running = engine.submit([5, 6], PARAMS, lambda d: ends.append(d) if d.finish_reason else None)
    queued = engine.submit([7, 8], PARAMS, lambda d: ends.append(d) if d.finish_reason else None)
    engine.step()
    engine.close()
    assert [d.finish_reason for d in ends] == ["cancelled", "cancelled"]
    assert running.finish_reason == queued.finish_reason == "cancelled" and "closed" in running.error
    assert engine.scheduler.idle  # the queued one left the queue too, not only its callback told


def test_close_releases_the_runner_even_when_the_step_outlasts_it(tiny_hf, monkeypatch):
    """close() raised stop()'s TimeoutError before releasing the ranks and the prefill worker."""
    import time

    from metronome.model.loader import load

    engine = Engine.from_model(config=EngineConfig(slots=1, ctx=64), loaded=load(tiny_hf("llama")))
    released: list[bool] = []
    monkeypatch.setattr(engine.plan.runner, "close", lambda: released.append(True))
    real, entered = engine.plan.decode, threading.Event()

    def slow(*args, **kwargs):
        entered.set()
        time.sleep(1.0)
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.plan, "decode", slow)
    engine.start()
    ends: list = []
    request = engine.submit([5, 6], PARAMS, lambda d: ends.append(d.finish_reason) if d.finish_reason else None)
    assert entered.wait(timeout=30)
    with pytest.raises(TimeoutError):
        engine.close(timeout=0.05)
    assert released == [True]
    engine._thread.join(timeout=30)
    # and the request in that step still ends, once the step does (close() gave up waiting, so the thread
    # ends it on its way out): it stayed in its slot with no final event
    assert ends == ["cancelled"] and request.finish_reason == "cancelled"


def test_an_idle_engine_thread_wakes_for_a_submit_and_for_close_not_on_its_timer(tiny_hf, monkeypatch):
    """The engine's thread sleeps while it has no work; submit() and stop() wake it. Its sleep's timeout
    (IDLE_WAKEUP_S) only bounds a lost wake-up, so with the timeout at 30 s here, a submit() or close() that
    did not wake it would wait out the 30 s."""
    import time

    from metronome.engine import engine as engine_module
    from metronome.model.loader import load

    monkeypatch.setattr(engine_module, "IDLE_WAKEUP_S", 30.0)
    engine = Engine.from_model(config=EngineConfig(slots=1, ctx=64), loaded=load(tiny_hf("llama")))
    engine.start()
    try:
        time.sleep(0.3)  # the thread is asleep, with nothing to do
        done = threading.Event()
        engine.submit([5, 6], PARAMS, lambda d: done.set() if d.finish_reason else None)
        assert done.wait(timeout=10), "the submit did not wake the idle engine"
        time.sleep(0.3)  # asleep again
    finally:
        engine.close(timeout=10)  # TimeoutError if stop() did not wake it


def test_close_gives_up_on_a_callers_step_that_outlasts_it(tiny_hf, monkeypatch):
    """Without the engine's thread, a caller's step() holds the engine: close() waited for it with no limit
    (a stuck step hung the caller of close() for ever). It waits `timeout`, releases the runner, raises; the
    request in that step ends once the step does, from that step() on its way out."""
    from metronome.model.loader import load

    engine = Engine.from_model(config=EngineConfig(slots=1, ctx=64), loaded=load(tiny_hf("llama")))
    released: list[bool] = []
    monkeypatch.setattr(engine.plan.runner, "close", lambda: released.append(True))
    real, entered, go = engine.plan.decode, threading.Event(), threading.Event()

    def stuck(*args, **kwargs):
        entered.set()
        go.wait(timeout=10)  # bounded: a close() that waits for this step returns (late), it cannot hang
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.plan, "decode", stuck)
    ends: list = []
    request = engine.submit([5, 6], PARAMS, lambda d: ends.append(d.finish_reason) if d.finish_reason else None)
    stepper = threading.Thread(target=engine.step)
    stepper.start()
    assert entered.wait(timeout=30)
    try:
        with pytest.raises(TimeoutError, match="did not end within"):
            engine.close(timeout=0.05)
        assert released == [True] and request.finish_reason is None  # still in the step that runs it
    finally:
        go.set()
        stepper.join(timeout=30)
    assert not stepper.is_alive()
    assert ends == ["cancelled"] and request.finish_reason == "cancelled" and "closed" in request.error
    assert engine.scheduler.idle


def test_a_submit_racing_close_is_refused_or_ended(tiny_hf, monkeypatch):
    """submit() checked `closed` before it built the request and queued it later: a close() between the two
    ended the others, and this one stayed queued, never ending (nothing steps a closed engine). Here the
    close() lands in that window, every time (building the request's text stream is slowed until it has)."""
    from metronome.model.loader import load

    engine = Engine.from_model(config=EngineConfig(slots=1, ctx=64), loaded=load(tiny_hf("llama")))
    entered, closed = threading.Event(), threading.Event()
    real = engine.tokenizer.stream_decoder

    def slow_decoder(*args, **kwargs):
        entered.set()  # past submit's first check
        assert closed.wait(timeout=30)  # close() has run
        return real(*args, **kwargs)

    monkeypatch.setattr(engine.tokenizer, "stream_decoder", slow_decoder)
    outcome: list = []

    def submit() -> None:
        try:
            outcome.append(engine.submit([5, 6], PARAMS))
        except RuntimeError as exc:
            outcome.append(exc)

    racer = threading.Thread(target=submit)
    racer.start()
    assert entered.wait(timeout=30)
    engine.close()
    closed.set()
    racer.join(timeout=30)
    assert len(outcome) == 1
    assert isinstance(outcome[0], RuntimeError) or outcome[0].finish_reason == "cancelled", outcome
    assert engine.scheduler.idle


def test_a_raising_callback_cancels_its_own_request_even_when_ids_repeat(tiny_hf):
    """A callback that raised had its request looked up by id: of two requests a caller gave the same id,
    the first one (whose callback was fine) was cancelled after one token, with the other's error."""
    from metronome.model.loader import load

    engine = Engine.from_model(config=EngineConfig(slots=2, ctx=64), loaded=load(tiny_hf("llama")))

    def boom(_delta) -> None:
        raise RuntimeError("boom")

    fine = engine.submit([5, 6], PARAMS, request_id="job-1")
    failing = engine.submit([7, 8], PARAMS, boom, request_id="job-1")
    while not engine.scheduler.idle:
        engine.step()
    assert failing.finish_reason == "cancelled" and "boom" in failing.error
    assert fine.finish_reason == "length" and fine.error is None


def test_a_cancelled_request_leaves_room_in_the_queue_at_once(tiny_hf):
    """`holding` counts "not the cancelled", but one cancelled in its slot still counted until the next step:
    with one slot and no queue, the next submit was refused (QueueFullError)."""
    from metronome.model.loader import load

    engine = Engine.from_model(config=EngineConfig(slots=1, ctx=64), loaded=load(tiny_hf("llama")), max_queue=0)
    first = engine.submit([5, 6], PARAMS)
    engine.step()  # in its slot
    engine.cancel(first)
    second = engine.submit([7, 8], PARAMS)
    while not engine.scheduler.idle:
        engine.step()
    assert first.finish_reason == "cancelled" and second.finish_reason == "length"


def test_prompts_are_read_as_the_caller_meant_them(engine):
    """The edges of what generate and stream take: no prompts, one more than fits, text that is not UTF-8,
    a batch given to stream, and chat=False."""
    from metronome.engine.api import _params

    assert engine.generate([], PARAMS) == []  # nothing to run: not a wait for requests that never come
    assert _params(None) == SamplingParams()  # the defaults of the CLI and the server
    # as many prompts as the engine holds (2 slots + max_queue 2) run together
    assert [c.finish_reason for c in engine.generate(["a", "b", "c", "d"], PARAMS)] == ["length"] * 4
    with pytest.raises(RequestError, match=r"pass \[message\], not the message"):
        engine.generate({"role": "user", "content": "hi"}, PARAMS)
    with pytest.raises(ValueError, match="stream takes one prompt"):
        next(engine.stream(["a", "b"], PARAMS))
    with pytest.raises(RequestError, match="the prompt is empty") as err:
        next(engine.stream([], PARAMS))  # an empty message list: the chat template alone is no prompt
    assert err.value.param == "prompt"
    # a lone surrogate (bytes that were not UTF-8) is named where it is, with the byte it stood for
    for prompt, param, byte in (
        ("caf\udce9", "prompt", "byte 0xe9 at character 3"),
        ("\udc80", "prompt", "byte 0x80 at character 0"),
        ([{"role": "user", "content": "x\udcff"}], "prompt[0].content", "byte 0xff at character 1"),
    ):
        with pytest.raises(RequestError, match=byte) as err:
            engine.generate(prompt, PARAMS)
        assert err.value.param == param
    # a message's content in OpenAI's other forms reads as the server reads it; anything else is named (an
    # int or a None failed inside the chat template: "can only concatenate str", no parameter)
    parts = [{"type": "text", "text": "hi"}, {"type": "text", "text": " there"}]
    said = [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": ""}]
    assert engine.encode_prompt([said[0] | {"content": parts}, said[1] | {"content": None}]) == engine.encode_prompt(
        said
    )
    for content in (5, [{"type": "image_url", "image_url": "x"}], {"text": "hi"}):
        with pytest.raises(RequestError, match="a message's content is text") as err:
            engine.generate([said[0], said[1] | {"content": content}], PARAMS)
        assert err.value.param == "prompt[1].content"
    with pytest.raises(RequestError, match="byte 0xe9") as err:
        engine.generate("caf\udce9", PARAMS, chat=False)  # raw text, past the chat template, too
    assert err.value.param == "prompt"
    raw = engine.generate("hello", PARAMS, chat=False)
    assert raw.prompt_tokens == len(engine.tokenizer.encode("hello"))
    if engine.tokenizer.has_chat_template:  # through the template, the same text is a longer prompt
        assert engine.generate("hello", PARAMS).prompt_tokens > raw.prompt_tokens


def test_requests_a_call_leaves_behind_are_cancelled(engine):
    """A generate() whose second prompt is refused, and a stream the caller stops reading, must not leave
    their requests running unseen (holding a slot until max_tokens)."""
    with pytest.raises(RequestError, match="exceeds the context"):
        engine.generate([[5, 6, 7], [5] * 128], PARAMS)  # the first was submitted before the second failed
    engine.step()
    assert engine.scheduler.idle
    tokens = engine.stream([5, 6, 7], PARAMS)
    next(tokens)
    tokens.close()  # the caller stopped reading after one token
    engine.step()
    assert engine.scheduler.idle


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death is the case
def test_a_call_waiting_on_an_engine_whose_thread_died_is_told_not_left_waiting(engine, monkeypatch):
    """start() was called and its thread then died (a SystemExit in a step ends it): requests submitted after
    that are never stepped, and nothing else will send their events, so a stream or a generate() waiting on
    them raises (check_alive between waits) rather than waiting for ever."""
    engine.start()
    real = engine.plan.decode
    monkeypatch.setattr(engine.plan, "decode", lambda *a, **k: (_ for _ in ()).throw(SystemExit("simulated")))
    assert engine.generate([5, 6, 7], PARAMS).finish_reason == "error"
    engine._thread.join(timeout=30)
    assert not engine._thread.is_alive()
    monkeypatch.setattr(engine.plan, "decode", real)
    outcomes: dict[str, BaseException | None] = {}

    def call(name: str, run) -> None:
        try:
            run()
            outcomes[name] = None
        except BaseException as exc:  # noqa: BLE001 - what the call ended with is what the test checks
            outcomes[name] = exc

    calls = {"stream": lambda: list(engine.stream([5, 6, 7], PARAMS)), "generate": lambda: engine.generate([5], PARAMS)}
    for name, run in calls.items():
        waiter = threading.Thread(target=call, args=(name, run), daemon=True)
        waiter.start()
        waiter.join(timeout=20)  # a few of WAIT_SLICE_S
        assert not waiter.is_alive(), f"{name} is still waiting on an engine thread that died"
        assert isinstance(outcomes[name], RuntimeError) and "engine thread has stopped" in str(outcomes[name])


def test_stop_token_ids_and_logit_bias_outside_the_vocabulary_are_refused_naming_them(engine):
    """The vocabulary's last id is a token; its size is not. A stop token or a biased token outside it is
    refused at submit, naming its field, and nothing is queued."""
    vocab = engine.plan.cfg.vocab_size
    for field, inside, outside in (
        ("stop_token_ids", (vocab - 1,), (vocab,)),
        ("logit_bias", ((vocab - 1, 1.0),), ((vocab, 1.0),)),
    ):
        with pytest.raises(RequestError, match=f"outside the vocabulary \\[0, {vocab}\\)") as err:
            engine.submit([5, 6, 7], SamplingParams(max_tokens=2, **{field: outside}))
        assert err.value.param == field and engine.scheduler.idle
        done = engine.generate([5, 6, 7], SamplingParams(max_tokens=2, **{field: inside}))
        assert done.finish_reason in ("length", "stop")


def test_a_full_queue_refuses_the_next_request_at_once(tiny_hf):
    """Every slot busy and the queue at max_queue: the next submit raises QueueFullError (the server's 429)
    instead of queueing it; once one ends, there is room again."""
    from metronome.engine.request import QueueFullError
    from metronome.model.loader import load

    engine = Engine.from_model(config=EngineConfig(slots=1, ctx=64), loaded=load(tiny_hf("llama")), max_queue=1)
    running = engine.submit([5, 6], PARAMS)
    queued = engine.submit([7, 8], PARAMS)
    with pytest.raises(QueueFullError, match="2 requests are in, the most 1 slots and a queue of 1 hold"):
        engine.submit([9, 10], PARAMS)
    assert engine.scheduler.holding == 2
    while running.finish_reason is None:
        engine.step()
    later = engine.submit([9, 10], PARAMS)
    while not engine.scheduler.idle:
        engine.step()
    assert (running.finish_reason, queued.finish_reason, later.finish_reason) == ("length",) * 3


def test_a_step_that_raises_has_sent_its_requests_final_events_before_it_raises(engine, monkeypatch):
    """step() ends the requests of a failed step with "error" and re-raises; as on success, every event of
    the step has reached its callback by then (the caller stepping by hand sees the end at once)."""
    ends: list = []
    req = engine.submit(
        [5, 6, 7], PARAMS, lambda d: ends.append((d.finish_reason, d.error)) if d.finish_reason else None
    )
    monkeypatch.setattr(engine.plan, "decode", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("simulated")))
    with pytest.raises(RuntimeError, match="simulated"):
        engine.step()
    assert req.finish_reason == "error" and ends == [("error", "RuntimeError: simulated")]
    assert engine.scheduler.idle


def test_a_callback_that_cancels_its_request_and_then_raises_leaves_the_cancel_as_the_reason(engine):
    """A callback that raises on a request its caller already cancelled (a client gone mid-stream, whose
    handler then fails) has nothing left to cancel: the request ends "cancelled" with no error noted, and
    the other requests go on."""
    holder: list = []

    def gone(delta) -> None:
        engine.cancel(holder[0])
        raise ConnectionError("the client went away")

    holder.append(engine.submit([5, 6, 7], PARAMS, gone))
    other = engine.submit([8, 9, 10], SAMPLED)
    while not engine.scheduler.idle:
        engine.step()
    assert holder[0].finish_reason == "cancelled" and holder[0].error is None
    assert other.finish_reason == "length"


def test_stop_from_a_callback_on_the_engines_thread_returns_and_callers_step_on_by_hand(engine):
    """stop() from a callback on the engine's own thread cannot wait for that thread: it returns at once and
    the thread ends when its step does. The request whose callback asked is not failed by it, and a
    generate() that was waiting on the thread is not told it died (it was stopped): it steps on by hand."""
    import time

    long = SamplingParams(max_tokens=40, ignore_eos=True)
    outcomes: list = []
    waited: list = []

    def on_event(delta) -> None:
        if not outcomes:
            deadline = time.monotonic() + 30
            while engine.scheduler.holding < 2 and time.monotonic() < deadline:  # the waiter's request is in
                time.sleep(0.01)
            try:
                engine.stop()
                outcomes.append("returned")
            except BaseException as exc:  # noqa: BLE001 - reported by the assert below
                outcomes.append(exc)

    engine.start()
    req = engine.submit([5, 6, 7], PARAMS, on_event)
    waiter = threading.Thread(target=lambda: waited.append(engine.generate([8, 9, 10], long)), daemon=True)
    waiter.start()
    waiter.join(timeout=60)
    assert not waiter.is_alive() and outcomes == ["returned"] and not engine.running
    assert waited and waited[0].finish_reason == "length" and len(waited[0].token_ids) == long.max_tokens
    while req.finish_reason is None:
        engine.step()
    assert req.finish_reason == "length" and req.error is None and len(req.output_ids) == PARAMS.max_tokens


@pytest.mark.parametrize(
    ("kwargs", "error", "names"),
    [
        ({"max_queue": -5}, ParamError, "max_queue"),  # was a capacity of slots - 5: every request refused
        ({"max_queue": 1.5}, ParamError, "max_queue"),
        ({"config": {"slots": 2}}, TypeError, "config"),  # was an AttributeError from inside from_model
        ({"path": 5}, TypeError, "path"),  # was a TypeError from pathlib
    ],
)
def test_from_model_refuses_arguments_of_the_wrong_kind_by_name_before_loading(kwargs, error, names, monkeypatch):
    """Checked before the model loads and compiles: the error names the argument and what it takes."""

    def no_load(*_args, **_kwargs):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("metronome.engine.engine.load", no_load)
    with pytest.raises(error) as caught:
        Engine.from_model(**kwargs)
    assert str(caught.value).startswith(names)
    if error is ParamError:
        assert caught.value.param == names
