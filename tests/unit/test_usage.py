"""The API's Groq-style timings for a request of several choices (n > 1, or several prompts)."""

import pytest

from metronome.engine.request import Timings
from metronome.serve.jobs import merge_timings
from metronome.serve.usage import groq_timings


def test_choices_timings_merge_into_spans_that_add_up():
    # choice 1 admitted at once, first token at 2.0; choice 2 admitted a step later (2.5), after it
    early = Timings(submitted=1.0, admitted=1.1, first_token=2.0, first_sentence=2.4, finished=3.0)
    late = Timings(submitted=1.0, admitted=2.5, first_token=2.6, first_sentence=None, finished=3.5)
    usage = groq_timings(merge_timings([early, late]))
    assert usage["queue_time"] == 0.1 and usage["prompt_time"] == 0.9  # was 2.0 - 2.5 < 0 with the last admission
    assert usage["completion_time"] == 1.5 and usage["total_time"] == 2.5
    assert usage["queue_time"] + usage["prompt_time"] + usage["completion_time"] == usage["total_time"]
    assert usage["time_to_first_token"] == 1.0 and usage["time_to_first_sentence"] == 1.4


def test_the_promised_ttft_rides_along_in_seconds_and_is_null_where_none_was_made():
    t = Timings(submitted=1.0, admitted=1.1, first_token=1.2, finished=1.5)
    assert groq_timings(t, 123.4567891)["predicted_time_to_first_token"] == 0.123457
    assert groq_timings(t)["predicted_time_to_first_token"] is None  # NaN: uncalibrated, or it waited for a slot
    assert groq_timings(t, float("nan"))["predicted_time_to_first_token"] is None


def test_the_promised_speed_rides_along_and_is_null_where_none_was_made():
    t = Timings(submitted=1.0, admitted=1.1, first_token=1.2, finished=1.5)
    assert groq_timings(t, 20.0, 123.45678)["predicted_output_tokens_per_second"] == 123.457
    assert groq_timings(t, 20.0)["predicted_output_tokens_per_second"] is None  # no token, or uncalibrated
    assert groq_timings(t, 20.0, float("nan"))["predicted_output_tokens_per_second"] is None


def test_a_choice_still_running_leaves_the_end_unknown():
    done = Timings(submitted=0.0, admitted=0.1, first_token=0.2, finished=0.3)
    running = Timings(submitted=0.0, admitted=0.1, first_token=0.25)
    usage = groq_timings(merge_timings([done, running]))
    assert usage["completion_time"] is None and usage["total_time"] is None and usage["prompt_time"] == 0.1


def test_a_request_without_tokens_spent_its_run_on_the_prompt():
    """max_tokens 0 (a scoring client's window) ran its prompt for a second and reported prompt_time null,
    so the parts did not add up to total_time."""
    scored = Timings(submitted=1.0, admitted=1.25, finished=2.0)
    usage = groq_timings(scored)
    assert usage["prompt_time"] == 0.75 and usage["completion_time"] == 0.0 and usage["total_time"] == 1.0
    assert usage["queue_time"] + usage["prompt_time"] + usage["completion_time"] == usage["total_time"]
    assert usage["time_to_first_token"] is None
    queued = groq_timings(Timings(submitted=1.0, finished=2.0))  # cancelled while it waited for a slot
    assert queued["prompt_time"] is None and queued["completion_time"] is None and queued["total_time"] == 1.0


def test_a_request_s_outcome_is_its_worst_choice_s():
    """A choice that failed makes the request failed, even when another was cancelled (the client left after
    the failure): failures are the server's to count, cancellations the client's."""
    from metronome.serve.prometheus import outcome_of

    assert outcome_of(["stop", "length"]) == "completed"
    assert outcome_of(["stop", "cancelled"]) == outcome_of(["stop", None]) == "cancelled"
    assert outcome_of(["error", "cancelled"]) == outcome_of(["cancelled", "error", None]) == "failed"


def test_a_request_with_no_promise_is_not_held_to_one_and_a_never_admitted_ones_prompt_is_not_counted():
    """The TTFT-over-prediction histogram takes only requests the engine promised a TTFT (NaN: uncalibrated,
    or it waited for a slot; a NaN ratio lands in no bucket but the sum turns NaN for good). A request
    cancelled before it was admitted computed none of its prompt: its tokens are not prompt tokens served."""
    from metronome.serve.prometheus import ServerMetrics

    def value(m: ServerMetrics, name: str) -> float:
        return m.registry.get_sample_value(name) or 0.0

    m = ServerMetrics()
    for predicted in (float("nan"), 0.0, 20.0):
        m.observe_submitted()
        done = Timings(submitted=1.0, admitted=1.001, first_token=1.03, finished=1.1)
        m.observe_request(done, 7, 3, [0.03, 0.04], "length", predicted_ttft_ms=predicted)
    assert value(m, "metronome_ttft_over_prediction_ratio_count") == 1
    assert value(m, "metronome_ttft_over_prediction_ratio_sum") == pytest.approx(30 / 20)
    assert value(m, "metronome_prompt_tokens_total") == 21
    assert value(m, "metronome_decode_speed_over_promise_ratio_count") == 0  # no speed promised to any of them
    m.observe_submitted()
    m.observe_request(Timings(submitted=1.0, finished=1.5), 50, 0, [], "cancelled")
    assert value(m, "metronome_prompt_tokens_total") == 21


def test_each_request_s_decode_speed_is_held_to_the_speed_promised_with_its_first_token():
    """Tokens after the first over the time from the first to the last, over the promise; a request promised
    nothing (NaN: an uncalibrated plan) or with one token only is left out."""
    from metronome.serve.prometheus import ServerMetrics

    m = ServerMetrics()
    done = Timings(submitted=1.0, admitted=1.001, first_token=1.02, finished=1.12)  # 4 more tokens in 0.1 s
    for promised, generated in ((50.0, 5), (float("nan"), 5), (50.0, 1)):
        m.observe_submitted()
        m.observe_request(done, 7, generated, [], "length", predicted_ttft_ms=20.0, promised_tps=promised)
    assert m.registry.get_sample_value("metronome_decode_speed_over_promise_ratio_count") == 1
    assert m.registry.get_sample_value("metronome_decode_speed_over_promise_ratio_sum") == pytest.approx(40 / 50)
