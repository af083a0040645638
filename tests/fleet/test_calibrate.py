"""`metronome plan --calibrate`: the plan's matrices priced by their shapes' own timings (fleet/calibrate.py).
The 15 % agreement with the engine is a measurement (docs/planner.md), never asserted here."""

from __future__ import annotations

import dataclasses

import pytest

from metronome.fleet.calibrate import (
    Matmul,
    PlanCost,
    Terms,
    logits_seconds,
    measure_collective,
    measure_terms,
    plan_matmuls,
    predict_step_s,
)
from metronome.kernels.blocks import BLOCK_KINDS

QKV = Matmul(((BLOCK_KINDS["Q4_1X16"], 960, 18 * 320),))  # 960 rows of K=576 as packed groups of 16 rows
DOWN = Matmul(((BLOCK_KINDS["Q8_0"], 576, 48 * 34),))  # K=1536 in Q8_0 rows
HEAD = Matmul(((BLOCK_KINDS["Q8_0_X8"], 1000, 18 * 34),))
TERMS = Terms(
    "cpu",
    2,
    {"Q8_0": {1: 1e-10, 8: 2e-10, 256: 4e-9}},
    attention_s=1e-11,
    call_s=1e-6,
    region_s=2e-6,
    matmul_s={
        QKV: {1: 10e-6, 8: 30e-6, 256: 900e-6},
        DOWN: {1: 8e-6, 8: 20e-6, 256: 700e-6},
        HEAD: {1: 50e-6, 8: 90e-6},
    },
)
COST = PlanCost(
    "m", {"Q8_0": 1_000_000}, 2, 64, 2 * 11 + 2, {1: 100, 8: 300}, ("Q8_0", 100_000), {QKV: 2, DOWN: 2}, HEAD
)


def test_matmul_k_reads_the_block_layout():
    assert QKV.k == 576 and DOWN.k == 1536 and HEAD.k == 576
    mixed = Matmul(((BLOCK_KINDS["Q4_K"], 10, 3 * 144), (BLOCK_KINDS["Q6_K"], 6, 3 * 210)))  # Gemma's q/k/v
    assert mixed.k == 768 and mixed.rows == 16


def test_each_shape_is_priced_by_its_timing_and_its_region_is_not_priced_again():
    want = 2 * 30e-6 + 2 * 20e-6 + 90e-6  # the matrices at 8 rows, the head too
    want += 8 * 64 * 64 * 2 * 1e-11  # attention
    want += (24 - 5) * 2e-6 + 300 * 1e-6  # the 19 regions that are not matmuls; the Python calls
    assert predict_step_s(COST, TERMS, 8, 64, 300) == pytest.approx(want)
    # a prompt runs the head on its last row; rows between measured counts interpolate
    assert predict_step_s(COST, TERMS, 8, 64, 300, head_rows=1) == pytest.approx(want - 40e-6)
    mid = predict_step_s(COST, TERMS, 132, 0, 0, head_rows=1) - predict_step_s(COST, TERMS, 8, 0, 0, head_rows=1)
    assert mid == pytest.approx(2 * (465e-6 - 30e-6) + 2 * (360e-6 - 20e-6))
    # tensor parallel: every exchange between ranks is priced
    tp = dataclasses.replace(COST, collectives=7)
    assert predict_step_s(tp, dataclasses.replace(TERMS, collective_s=1e-3), 1, 64, 100) == pytest.approx(
        predict_step_s(COST, TERMS, 1, 64, 100) + 7e-3
    )
    # a shape the terms lack: the whole step falls back to bytes x seconds per byte, every region priced
    bare = dataclasses.replace(TERMS, matmul_s={QKV: TERMS.matmul_s[QKV]})
    by_bytes = 1.1e6 * 2e-10 + 8 * 64 * 64 * 2 * 1e-11 + 24 * 2e-6 + 300 * 1e-6
    assert predict_step_s(COST, bare, 8, 64, 300) == pytest.approx(by_bytes)


def test_plan_matmuls_reads_every_matrix_of_the_shipped_plan(smollm_engine):
    runner = smollm_engine.plan.runner
    counts, head, samples = plan_matmuls(runner)
    cfg = smollm_engine.plan.cfg
    assert sum(counts.values()) == 4 * cfg.num_layers  # qkv, o, gate_up, down: one part each in Q4_1's plan
    by_rows = {(m.rows, m.k, len(m.parts)): n for m, n in counts.items()}
    q, kv, d, i = cfg.q_size, cfg.num_kv_heads * cfg.head_dim, cfg.hidden_size, cfg.intermediate_size
    # q, k and v (gate and up) are stored as parts of one format: one part each, as one call times them
    assert by_rows == {(q + 2 * kv, d, 1): 30, (d, q, 1): 30, (2 * i, d, 1): 30, (d, i, 1): 30}
    assert head.rows == cfg.vocab_size and head.k == d
    nbytes = {m: sum(b.nbytes for b in blocks) for m, blocks in samples.items()}
    per_step = sum(n * nbytes[m] for m, n in counts.items()) + nbytes[head]
    assert per_step == sum(blocks.nbytes for matrix in runner.segments for blocks, _, _ in matrix)


def test_measure_terms_times_each_shape_at_its_rows(smollm_engine):
    _counts, head, samples = plan_matmuls(smollm_engine.plan.runner)
    some = next(m for m in samples if m != head)
    t = measure_terms(
        1, repeats=1, stream_bytes=1 << 20, shapes={some: (samples[some], (1, 8)), head: (samples[head], (1,))}
    )
    assert set(t.matmul_s) == {some, head} and set(t.matmul_s[some]) == {1, 8} and set(t.matmul_s[head]) == {1}
    assert t.matmul_s[some][8] > t.matmul_s[some][1] > 0  # eight rows do eight times the arithmetic
    assert t.matmul_s[head][1] > t.matmul_s[some][1]  # the head holds 50x the bytes of a layer's matrix


def test_measure_collective_exchanges_between_two_ranks():
    seconds, shared = measure_collective(64, 0.0, calls=50)
    assert 0 < seconds < 1.0 and shared  # through shared memory, as a tensor-parallel plan exchanges here


def test_parts_of_one_format_are_timed_as_one_call():
    import torch

    from metronome.fleet.calibrate import _merged

    q8, q4k = BLOCK_KINDS["Q8_0"], BLOCK_KINDS["Q4_K"]
    a, b, c = (
        torch.zeros(4, 68, dtype=torch.uint8),
        torch.ones(2, 68, dtype=torch.uint8),
        torch.zeros(3, 144, dtype=torch.uint8),
    )
    m, blocks = _merged([(a, q8, 4), (b, q8, 2), (c, q4k, 3)])
    assert m.parts == ((q8, 6, 68), (q4k, 3, 144)) and m.k == 64
    assert torch.equal(blocks[0], torch.cat([a, b])) and blocks[1] is c


def test_the_logits_work_is_priced_per_row_and_grows_with_the_vocabulary():
    with_logits = dataclasses.replace(TERMS, logits_s={1: 1e-4, 8: 5e-4})
    assert predict_step_s(COST, with_logits, 8, 64, 300) == pytest.approx(
        predict_step_s(COST, TERMS, 8, 64, 300) + 5e-4
    )
    # a prompt's logits: its last row only
    assert predict_step_s(COST, with_logits, 8, 64, 300, head_rows=1) == pytest.approx(
        predict_step_s(COST, TERMS, 8, 64, 300, head_rows=1) + 1e-4
    )
    small, large = logits_seconds(1024, None, (1,)), logits_seconds(1 << 20, 30.0, (1,))
    assert large[1] > small[1] > 0  # a million logits through tanh and argmax cost more than a thousand


def test_calibrate_model_predicts_and_measures_every_row(tiny_hf):
    """The command's whole path on a tiny model: each row a median over the rounds, predicted and measured."""
    from metronome.fleet.calibrate import calibrate_model

    terms, rows = calibrate_model(str(tiny_hf("llama")), 1, live=(1, 2), measure=True, rounds=2)
    assert [r.what for r in rows] == [
        "decode, 1 live slot",
        "decode, 2 live slots (per slot)",
        "prefill, 256-token prompt",
    ]
    assert all(r.predicted > 0 and r.measured is not None and r.measured > 0 for r in rows)
    assert terms.threads == 1 and terms.logits_s  # one thread: no layout rows (they share 2+ threads)
    with pytest.raises(ValueError, match="rounds"):
        calibrate_model(str(tiny_hf("llama")), 1, rounds=0)


def test_the_logits_are_timed_through_the_engines_own_greedy_pick(monkeypatch):
    """The planner prices the step's pick with the function the engine's step calls (torch's argmax, which the
    engine no longer uses, costs 4-25x as much on a Gemma-sized row here)."""
    from metronome.engine import sampler

    rows_seen: list[tuple[int, int]] = []
    real = sampler.argmax_rows

    def counted(logits):
        rows_seen.append(tuple(logits.shape))
        return real(logits)

    monkeypatch.setattr(sampler, "argmax_rows", counted)
    logits_seconds(4096, None, (1, 8), repeats=2)
    assert set(rows_seen) == {(1, 4096), (8, 4096)}


def test_the_layout_rows_time_their_matrices_on_the_plans_ring(tmp_path, monkeypatch):
    """The disaggregated and tp=2 rows cycle their matrices through at least what their step reads, as the
    plan's own terms do, not through the 96 MiB default a large last-level cache can hold (a 16-core Xeon's
    disaggregated row was predicted 1.39-1.53x too fast). Here the floor is 4 KiB, so each ring is the
    step's own bytes: the whole model for the decode engine, about half of it for a rank."""
    import inspect

    from metronome.bench.random_gguf import DenseShape, write_random_dense
    from metronome.fleet import calibrate

    shape = DenseShape("tiny", hidden=128, layers=2, heads=4, kv_heads=2, ffn=256, vocab=512)
    model = str(write_random_dense(tmp_path / "tiny.gguf", shape))  # cuts into 2 ranks

    monkeypatch.setattr(calibrate, "STREAM_BYTES", 4096)
    rings: list[tuple[int, int]] = []
    real = calibrate.measure_terms

    def recorded(*args, **kwargs):
        bound = inspect.signature(real).bind(*args, **kwargs)
        bound.apply_defaults()
        rings.append((bound.arguments["threads"], bound.arguments["stream_bytes"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(calibrate, "measure_terms", recorded)
    _, rows = calibrate.calibrate_model(model, 2, live=(1,), measure=False)
    assert [r.what.split(" (")[0] for r in rows[-2:]] == [
        "decode, 1 live slot, disaggregated",
        "decode, 1 live slot, tp=2",
    ]
    (plan_threads, plan_ring), (decode_threads, decode_ring), (rank_threads, rank_ring) = rings
    assert (plan_threads, decode_threads, rank_threads) == (2, 1, 1)
    assert plan_ring == decode_ring > 4096  # the decode engine reads the whole model, as the plan does
    assert 4096 < rank_ring < plan_ring  # a rank reads its cut


def test_terms_refuse_a_value_in_the_wrong_field():
    # the CUDA terms were built positionally before wake_s was added: their notes landed in wake_s and the
    # planner failed only when it averaged two measurements
    with pytest.raises(TypeError, match="wake_s"):
        Terms("cuda", 1, {"bf16": {1: 1e-12}}, 1e-12, 1e-6, 0.0, ("torch bf16 matmul",))
    with pytest.raises(TypeError, match="notes"):
        dataclasses.replace(TERMS, notes=(1.0,))
    assert TERMS.mean(TERMS).wake_s == TERMS.wake_s
