"""The plan's promises, as pure arithmetic over its calibration: step latency with prompt rows beside the
decode rows, and the TTFT of a prompt behind a queue (chunked prefill)."""

import math

import pytest

from metronome.compile.plan import STALL_STEPS, PlanReport
from metronome.compile.probe import DEFAULT_PREFILL_CHUNK


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
    assert r.step_ms_with(2) == 5.0
    assert r.step_ms_with(2, [(0, 16)]) == 5.0 + 16 * 1.5
    # nobody decoding: the one-row step (the weights' read every call pays), then the prompt's rows alone
    assert r.step_ms_with(0, [(0, 256)]) == 4.0 + 256 * 1.0
    assert r.step_ms_with(0, [(0, 3)]) == 4.0 + 3 * 1.0  # a short prompt costs about a decode step
    assert r.step_ms_with(0) == 0.0


def test_ttft_alone_is_whole_chunks_at_the_alone_cost():
    r = _report()
    assert r.ttft_ms([(0, 300)], decoding=0, chunk=16, alone_chunk=256) == (4.0 + 256 * 1.0) + (4.0 + 44 * 1.0)


def test_ttft_beside_decoders_is_chunk_sized_steps():
    r = _report()
    # 40 rows in chunks of 16 beside 2 decode rows: steps of 16, 16, 8 rows
    assert r.ttft_ms([(0, 40)], decoding=2, chunk=16, alone_chunk=256) == 3 * 5.0 + 40 * 1.5


def test_ttft_counts_the_queue_ahead_and_prompts_that_join_the_decode_rows():
    r = _report()
    # nobody decodes: the first step runs both prompts (10 + 20 rows) whole
    assert r.ttft_ms([(0, 10), (0, 20)], decoding=0, chunk=16, alone_chunk=256) == 4.0 + 30 * 1.0
    t = r.ttft_ms([(0, 20), (0, 10)], decoding=1, chunk=16, alone_chunk=256)
    # step 1: 16 rows of the first prompt beside 1 decoder; step 2: its last 4 and our 10, still 1 decoder
    assert t == (4.0 + 16 * 1.5) + (4.0 + 14 * 1.5)
    # the first prompt ends in step 1 here, so step 2 has 2 decoders
    t = r.ttft_ms([(0, 16), (0, 10)], decoding=1, chunk=16, alone_chunk=256)
    assert t == (4.0 + 16 * 1.5) + (5.0 + 10 * 1.5)


def test_without_calibration_there_is_no_promise():
    r = _report(step_ms={}, prompt_row_ms=float("nan"), prefill_row_ms=float("nan"))
    assert math.isnan(r.ttft_ms([(0, 10)], decoding=0, chunk=16, alone_chunk=256))
    assert math.isnan(r.tokens_per_s(1))


# With a far calibration, a row's attention over more cached tokens costs more: here 1 µs per token.
FAR = dict(step_ms_far={1: 4.0 + 0.001 * 960, 2: 5.0, 3: 6.0, 4: 7.0}, far_position=1024, prompt_row_position=100.0)


def test_a_prompt_row_costs_more_the_further_into_its_prompt():
    r = _report(**FAR)
    assert abs(r.key_ms - 0.001) < 1e-12
    assert abs(r.prompt_rows_ms(100, 1) - 1.5) < 1e-9  # where it was calibrated
    assert abs(r.prompt_rows_ms(1100, 1) - (1.5 + 1.0)) < 1e-9
    # rows 0..9: their mean position is 4.5
    assert abs(r.prompt_rows_ms(0, 10) - 10 * (1.5 + 0.001 * (4.5 - 100))) < 1e-9
    assert _report().key_ms == 0.0  # no far calibration: no slope


def test_prompt_rows_are_priced_by_their_own_slope_where_it_was_calibrated():
    """A chunk's rows read the earlier keys together: their cost grows more slowly with position than a
    decode row's, and the far prompt-row figure, when calibrated, sets that slope."""
    r = _report(**FAR, prompt_row_ms_far=1.5 + 0.0002 * 900, prompt_row_far_position=1000.0)
    assert abs(r.prompt_key_ms - 0.0002) < 1e-12 and abs(r.key_ms - 0.001) < 1e-12
    assert abs(r.prompt_rows_ms(1100, 1) - (1.5 + 0.0002 * 1000)) < 1e-9
    # so late rows come in larger chunks than the decode rows' slope would allow
    assert (
        r.take_prompt_rows([(1000, 500)], 16, priced=True)[0]
        > _report(**FAR).take_prompt_rows([(1000, 500)], 16, priced=True)[0]
    )


def test_a_steps_prompt_budget_is_priced_by_position():
    r = _report(**FAR)
    unit = r.prompt_rows_ms(0, 1)
    # at the start of a prompt, 16 rows' worth is about 16 rows; 1,000 tokens in, far fewer rows
    early, late = r.take_prompt_rows([(0, 500)], 16, priced=True), r.take_prompt_rows([(1000, 500)], 16, priced=True)
    assert 15 <= early[0] <= 16 and late[0] < 11
    for start, (n,) in ((0, early), (1000, late)):
        assert r.prompt_rows_ms(start, n) <= 16 * unit * (1 + 1e-9) < r.prompt_rows_ms(start, n + 1)
    assert r.take_prompt_rows([(1000, 500)], 16, priced=False) == [16]  # nobody decoding: rows, unpriced
    assert r.take_prompt_rows([(5000, 500)], 1, priced=True) == [1]  # always at least one row
    # the queue's second prompt takes what the first leaves
    first, second = r.take_prompt_rows([(0, 3), (0, 100)], 16, priced=True)
    spent = r.prompt_rows_ms(0, 3) + r.prompt_rows_ms(0, second)
    assert first == 3 and spent <= 16 * unit * (1 + 1e-9) < r.prompt_rows_ms(0, 3) + r.prompt_rows_ms(0, second + 1)


def test_ttft_beside_decoders_follows_the_priced_chunks():
    r = _report(**FAR)
    queue, steps, total = [(0, 300)], 0, 0.0
    while queue[0][1]:
        (n,) = r.take_prompt_rows(queue, 16, priced=True)
        total += r.step_ms_with(1, [(queue[0][0], n)])
        queue, steps = [(queue[0][0] + n, queue[0][1] - n)], steps + 1
    assert steps > 300 / 16 + 1  # late rows come in smaller chunks
    assert abs(r.ttft_ms([(0, 300)], decoding=1, chunk=16, alone_chunk=256) - total) < 1e-9


def test_decode_rows_far_into_their_conversations_make_every_step_dearer():
    """The decode rows beside a prompt's chunks attend to all they have cached: at their mean position,
    each step costs what `step_ms_at` says there, not the near calibration (a prompt that arrived while
    two users were 1,000 tokens into their streams took 1.2x the near-priced TTFT)."""
    r = _report(**FAR)
    queue, steps = [(0, 40)], 0
    while queue[0][1]:
        (n,) = r.take_prompt_rows(queue, 16, priced=True)
        queue, steps = [(queue[0][0] + n, queue[0][1] - n)], steps + 1
    near = r.ttft_ms([(0, 40)], decoding=1, chunk=16, alone_chunk=256)
    far = r.ttft_ms([(0, 40)], decoding=1, chunk=16, alone_chunk=256, position=1024)
    assert abs((far - near) - steps * 0.001 * 960) < 1e-9
    assert r.step_ms_with(1, [], position=1024) == r.step_ms_far[1]


def test_the_plans_own_chunk_keeps_the_step_within_its_stall_bound():
    """With no `prefill_chunk` set, a step's prompt rows take what STALL_STEPS all-slots steps leave after
    the decode rows' own cost: more rows beside one user than beside three, never past the bound."""
    r = _report(**FAR)
    bound = STALL_STEPS * r.step_ms[4]
    taken = {}
    for live in (1, 3):
        (n,) = r.take_step_prompts([(0, 500)], live, None, 256)
        assert r.step_ms_with(live, [(0, n)]) <= bound < r.step_ms_with(live, [(0, n + 1)]), live
        taken[live] = n
    assert taken[1] > taken[3]
    # deep into the prompt, its rows cost more: fewer of them, still within the bound
    (late,) = r.take_step_prompts([(1000, 500)], 1, None, 256)
    assert late < taken[1] and r.step_ms_with(1, [(1000, late)]) <= bound
    # the decode rows far into their conversations: both steps are priced there
    far = r.take_step_prompts([(0, 500)], 1, None, 256, position=1024)[0]
    assert r.step_ms_with(1, [(0, far)], 1024) <= STALL_STEPS * r.step_ms_at(4, 1024)
    assert r.take_step_prompts([(0, 500)], 1, None, 8) == [8]  # at most alone_chunk rows a step


def test_a_set_chunk_nobody_decoding_and_no_calibration_take_rows_as_before():
    r = _report(**FAR)
    assert r.take_step_prompts([(0, 500)], 1, 16, 256) == r.take_prompt_rows([(0, 500)], 16, priced=True)
    assert r.take_step_prompts([(1000, 500)], 0, None, 256) == [256]  # nobody decoding: whole chunks, unpriced
    uncalibrated = _report(step_ms={}, prompt_row_ms=float("nan"), prefill_row_ms=float("nan"))
    assert math.isnan(uncalibrated.prompt_budget_ms(1))
    assert uncalibrated.take_step_prompts([(0, 500)], 1, None, 256) == [DEFAULT_PREFILL_CHUNK]


def test_ttft_follows_the_plans_own_chunks():
    r = _report(**FAR)
    queue, total = [(0, 300)], 0.0
    while queue[0][1]:
        (n,) = r.take_step_prompts(queue, 2, None, 256)
        total += r.step_ms_with(2, [(queue[0][0], n)])
        queue = [(queue[0][0] + n, queue[0][1] - n)]
    assert abs(r.ttft_ms([(0, 300)], decoding=2, chunk=None, alone_chunk=256) - total) < 1e-9


def test_tokens_per_s_is_one_step_per_token_for_each_live_request():
    r = _report(**FAR)
    assert r.tokens_per_s(2) == 1000.0 / 5.0
    assert r.tokens_per_s(1, position=1024) == 1000.0 / (4.0 + 0.96)


def test_a_step_is_never_priced_at_zero_or_below_nor_cheaper_further_into_the_context():
    """The line through the two calibrated steps ran on past them: a tiny model's steps (1 ms at 64 tokens, 20
    at 128) put a step 10 tokens in at -15 ms, and `bench --load` printed the plan's promise as -89,756 tok/s;
    a far step measured below the near one made steps deep in the context cheaper, down through zero."""
    steep = _report(step_ms={2: 1.0}, step_ms_far={2: 20.0}, far_position=128)
    assert steep.step_ms_at(2, 10) == 1.0  # held at the near figure below it
    assert steep.tokens_per_s(2, 10) == 1000.0
    assert steep.step_ms_at(2, 96) == 10.5 and steep.step_ms_at(2, 256) == 58.0  # the line itself, and on past it
    noisy = _report(step_ms={2: 5.0}, step_ms_far={2: 4.0}, far_position=1024)
    assert noisy.step_ms_at(2, 8000) == noisy.step_ms_at(2, 500) == 5.0
    gentle = _report(**FAR)  # a real model's slope still runs below the near position (attention costs less)
    assert gentle.step_ms_at(1, 0) == 4.0 - 0.001 * 64


def test_a_far_step_cheaper_than_the_near_one_gives_no_negative_key_cost():
    # a noisy calibration: the far step measured below the near one; attention never makes a row cheaper
    r = _report(step_ms_far={1: 3.5}, far_position=1024)
    assert r.key_ms == 0.0
    assert r.prompt_rows_ms(1000, 1) == 1.5


def test_prompt_rows_calibrated_at_one_position_fall_back_to_the_decode_slope():
    # a small context: calibration's first and far prompt rows are the same rows (probe._far_prompt_row)
    r = _report(**{**FAR, "prompt_row_ms_far": 2.0, "prompt_row_far_position": 100.0})
    assert r.prompt_key_ms == r.key_ms == 0.001


def test_a_prompt_row_before_the_calibrated_one_costs_at_least_a_tenth_of_it():
    # 0.001 ms a token from the decode rows' slope; calibrated 2,000 tokens in, a row at 0 would cost 1.5 - 2.0
    r = _report(**{**FAR, "prompt_row_position": 2000.0})
    assert r.prompt_rows_ms(0, 1) == 0.1 * 1.5
    assert r.prompt_rows_ms(0, 4) == 4 * 0.1 * 1.5


def test_the_stall_bound_is_two_and_a_half_all_slots_steps():
    # docs: a decoding user's gap while a prompt arrives stays within 3 steps, with half a step of room
    assert STALL_STEPS == 2.5
    assert _report().prompt_budget_ms(1) == 2.5 * 7.0 - 4.0


def test_a_calibration_with_more_slots_timed_faster_still_leaves_a_prompt_its_rows():
    """A plan calibrated while another process held the cores priced SmolLM2's one-slot step at 20.4 ms
    and its all-slots step at 7.7: the budget, 2.5 all-slots steps less the decode rows' own, went
    negative, and a second user's prompt ran one row a step beside the first user's stream."""
    r = _report(step_ms={1: 20.4, 2: 20.9, 3: 7.6, 4: 7.7}, prompt_row_ms=0.4)
    assert r.prompt_budget_ms(1) == 2.5 * 20.4 - 20.4  # as if every slot's step cost what one slot's did
    assert r.take_step_prompts([(16, 29)], live=1, chunk=None, alone_chunk=256) == [29]


def test_a_prompt_that_does_not_finish_in_its_step_holds_back_the_prompts_behind_it():
    # the first prompt's late rows are dear (FAR: 1 µs a cached token); a later prompt's early rows are
    # cheaper, but prompts take rows oldest first: nothing goes past one that has not finished
    r = _report(**FAR)
    taken = r.take_prompt_rows([(1500, 100), (0, 50)], 64, priced=True, budget_ms=20.0)
    assert 0 < taken[0] < 100 and taken[1] == 0, taken


def test_more_requests_decoding_than_slots_are_priced_as_all_slots():
    r = _report()
    assert r.ttft_ms([(0, 40)], decoding=9, chunk=16, alone_chunk=256) == 3 * 7.0 + 40 * 1.5


def test_a_prompt_joins_a_step_only_where_the_prompts_it_ends_keep_their_promises():
    """Nobody decoding, two prompts of 10 and 20 rows: together they cost 4 + 30 x 1 = 34 ms, the first
    alone 14. With 14 ms left to the first one's promise the second waits; with 34 it joins."""
    r = _report()
    queue = [(0, 10), (0, 20)]
    assert r.take_step_prompts(queue, 0, 16, 256) == [10, 20]  # no promises given: rows as before
    assert r.take_step_prompts(queue, 0, 16, 256, slack_ms=[14.0, float("inf")]) == [10, 0]
    assert r.take_step_prompts(queue, 0, 16, 256, slack_ms=[34.0, float("inf")]) == [10, 20]
    assert r.take_step_prompts(queue, 0, 16, 256, slack_ms=[float("nan"), 1.0]) == [10, 20]  # no promise there
    # the oldest prompt always runs, even past its promise; a promise whose time has passed holds back no one
    assert r.take_step_prompts([(0, 10), (0, 2), (0, 2)], 0, 16, 256, slack_ms=[-5.0, 99.0, 99.0]) == [10, 2, 2]
    assert r.take_step_prompts([(0, 10), (0, 2), (0, 2)], 0, 16, 256, slack_ms=[-5.0, 16.0, 99.0]) == [10, 2, 0]
    assert r.take_step_prompts([(0, 10), (0, 2)], 0, 16, 256, slack_ms=[1.0, 99.0]) == [10, 0]  # late, not past
    # beside a decoder (16-row chunks): the first prompt's last 4 rows and 12 of ours would cost 4 + 16 x 1.5
    assert r.take_step_prompts([(16, 4), (0, 20)], 1, 16, 256, slack_ms=[9.9, float("inf")]) == [4, 0]
    assert r.take_step_prompts([(16, 4), (0, 20)], 1, 16, 256, slack_ms=[28.0, float("inf")]) == [4, 12]
    uncalibrated = _report(step_ms={}, prompt_row_ms=float("nan"), prefill_row_ms=float("nan"))
    assert uncalibrated.take_step_prompts(queue, 0, 16, 256, slack_ms=[0.0, 0.0]) == [10, 20]  # nothing to price


def test_a_prediction_runs_the_steps_that_keep_the_promises_ahead_of_it():
    """The simulation takes each step as the engine does, the time left to each promise shrinking by each
    step's price: a prompt whose rows would make an earlier one late runs after it, beside it decoding."""
    r = _report()
    queue = [(0, 10), (0, 20)]
    assert r.prefill_steps_ms(queue, 0, 16, 256) == [4.0 + 30 * 1.0]  # both alone in one step
    # the first was promised its own step (14 ms): ours runs next, beside it decoding, in 16-row chunks
    kept = r.prefill_steps_ms(queue, 0, 16, 256, slack_ms=[14.0, float("inf")])
    assert kept == [4.0 + 10 * 1.0, 4.0 + 16 * 1.5, 4.0 + 4 * 1.5]
    # three prompts: the second joins the first's step only if both promises hold; the slack is spent step by step
    three = [(0, 10), (0, 2), (0, 40)]
    assert r.prefill_steps_ms(three, 0, 16, 256, slack_ms=[16.0, 16.0, float("inf")]) == [16.0, 5.0 + 16 * 1.5] + [
        5.0 + 16 * 1.5,
        5.0 + 8 * 1.5,
    ]
    with pytest.raises(ValueError, match="slack_ms has 1 entries for 2 prompts"):
        r.prefill_steps_ms(queue, 0, 16, 256, slack_ms=[1.0])
