"""The plan's promises, as pure arithmetic over its calibration: step latency with prompt rows beside the
decode rows, and the TTFT of a prompt behind a queue (chunked prefill)."""

import math

from metronome.compile.plan import PlanReport


def _report(**kw) -> PlanReport:
    base = dict(
        weights="int4",
        device="cpu",
        slots=4,
        ctx=2048,
        decode_mode="compact",
        weight_bytes=1,
        kv_cache_bytes=1,
        step_ms={1: 4.0, 2: 5.0, 3: 6.0, 4: 7.0},
        prompt_row_ms=1.5,
        prefill_row_ms=1.0,
    )
    return PlanReport(**{**base, **kw})


def test_step_latency_adds_prompt_rows_to_the_decode_step():
    r = _report()
    assert r.step_ms_with(2, 0) == 5.0
    assert r.step_ms_with(2, 16) == 5.0 + 16 * 1.5
    assert r.step_ms_with(0, 256) == 256 * 1.0  # nobody decoding: a prompt alone, at its own row cost


def test_ttft_alone_is_whole_chunks_at_the_alone_cost():
    r = _report()
    assert r.ttft_ms([300], decoding=0, chunk=16, alone_chunk=256) == 256 * 1.0 + 44 * 1.0


def test_ttft_beside_decoders_is_chunk_sized_steps():
    r = _report()
    # 40 rows in chunks of 16 beside 2 decode rows: steps of 16, 16, 8 rows
    assert r.ttft_ms([40], decoding=2, chunk=16, alone_chunk=256) == 3 * 5.0 + 40 * 1.5


def test_ttft_counts_the_queue_ahead_and_prompts_that_join_the_decode_rows():
    r = _report()
    # nobody decodes: the first step runs both prompts (10 + 20 rows) whole
    assert r.ttft_ms([10, 20], decoding=0, chunk=16, alone_chunk=256) == 30 * 1.0
    t = r.ttft_ms([20, 10], decoding=1, chunk=16, alone_chunk=256)
    # step 1: 16 rows of the first prompt beside 1 decoder; step 2: its last 4 and our 10, still 1 decoder
    assert t == (4.0 + 16 * 1.5) + (4.0 + 14 * 1.5)
    # the first prompt ends in step 1 here, so step 2 has 2 decoders
    t = r.ttft_ms([16, 10], decoding=1, chunk=16, alone_chunk=256)
    assert t == (4.0 + 16 * 1.5) + (5.0 + 10 * 1.5)


def test_without_calibration_there_is_no_promise():
    r = _report(step_ms={}, prompt_row_ms=float("nan"), prefill_row_ms=float("nan"))
    assert math.isnan(r.ttft_ms([10], decoding=0, chunk=16, alone_chunk=256))
    assert math.isnan(r.tokens_per_s(1))
