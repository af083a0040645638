"""The API's timing fields (Groq's `usage` shape), made from the engine's `Timings` stamps."""

from __future__ import annotations

from metronome.engine.request import Timings


def groq_timings(
    t: Timings, predicted_ttft_ms: float = float("nan"), promised_tps: float = float("nan")
) -> dict[str, float | None]:
    """Groq-style seconds: queue_time, prompt_time, completion_time, total_time, plus time_to_first_token
    and time_to_first_sentence (None where the request never got there), the time to first token the
    engine promised at submit, `predicted_ttft_ms` (None where it promised none: an uncalibrated plan, or a
    request that waited for a slot), and the decode speed it promised with the first token, `promised_tps`
    (tokens a second after the first; None where it promised none: no token, or an uncalibrated plan).
    queue + prompt + completion is total_time: Groq's total counts the queue too."""

    def span(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None else round(b - a, 6)

    # a request that ended before any token (max_tokens 0 scores its prompt, or it was cancelled in its
    # prompt) spent its run on the prompt: the parts still add up to total_time
    tokenless = t.first_token is None and t.admitted is not None and t.finished is not None
    return {
        "queue_time": span(t.submitted, t.admitted),
        "prompt_time": span(t.admitted, t.finished if tokenless else t.first_token),
        "completion_time": 0.0 if tokenless else span(t.first_token, t.finished),
        "total_time": span(t.submitted, t.finished),
        "time_to_first_token": span(t.submitted, t.first_token),
        "time_to_first_sentence": span(t.submitted, t.first_sentence),
        "predicted_time_to_first_token": round(predicted_ttft_ms / 1000, 6) if predicted_ttft_ms >= 0 else None,
        "predicted_output_tokens_per_second": round(promised_tps, 3) if promised_tps > 0 else None,
    }
