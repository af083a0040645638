"""`metronome plan --calibrate`: the plan's matrices priced by their shapes' own timings (fleet/calibrate.py).
The 15 % agreement with the engine is a measurement (docs/planner.md), never asserted here."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

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


# ---- added by the mutation audit of fleet/calibrate.py --------------------------------------------------------


def test_terms_past_the_last_measured_rows_scale_with_the_rows():
    """A matmul or the logits' work past its last measured row count grows linearly with the rows (the
    work is compute-bound there): QKV at 512 rows is twice its 256-row time, the logits at 16 twice 8's."""
    assert TERMS.matmul(QKV, 512) == pytest.approx(2 * 900e-6)
    with_logits = dataclasses.replace(TERMS, logits_s={1: 1e-4, 8: 5e-4})
    assert with_logits.logits(16) == pytest.approx(2 * 5e-4) and with_logits.logits(4) == pytest.approx(
        1e-4 + 3 / 7 * 4e-4
    )


def test_the_mean_of_two_measurements_averages_every_term():
    """Terms measured before and after the engine ran are averaged field by field, each in its own field."""
    other = Terms(
        "cpu",
        2,
        {"Q8_0": {1: 3e-10, 8: 4e-10, 256: 8e-9}},
        attention_s=3e-11,
        call_s=5e-6,
        region_s=4e-6,
        wake_s=2e-5,
        matmul_s={QKV: {1: 20e-6, 8: 50e-6, 256: 1100e-6}, DOWN: {1: 8e-6, 8: 20e-6, 256: 700e-6}},
        collective_s=3e-5,
        logits_s={1: 3e-4, 8: 7e-4},
    )
    first = dataclasses.replace(TERMS, wake_s=1e-5, collective_s=1e-5, logits_s={1: 1e-4, 8: 5e-4})
    mean = first.mean(other)
    assert mean.seconds_per_byte["Q8_0"] == pytest.approx({1: 2e-10, 8: 3e-10, 256: 6e-9})
    assert (mean.attention_s, mean.call_s, mean.region_s, mean.wake_s, mean.collective_s) == pytest.approx(
        (2e-11, 3e-6, 3e-6, 1.5e-5, 2e-5)
    )
    assert mean.matmul_s[QKV] == pytest.approx({1: 15e-6, 8: 40e-6, 256: 1000e-6})
    assert set(mean.matmul_s) == {QKV, DOWN}  # HEAD was measured once only: not averaged with nothing
    assert mean.logits_s == pytest.approx({1: 2e-4, 8: 6e-4})


def test_a_term_is_the_median_batch_of_calls_after_the_warm_up(monkeypatch):
    """_mean_s: `warm` calls untimed, then `batches` timed batches of `repeats` calls; the median batch's mean
    is kept, so one batch another process interrupted (here 3 s) does not set the term."""
    from types import SimpleNamespace

    from metronome.fleet import calibrate

    clock = iter([0.0, 0.2, 1.0, 1.4, 2.0, 5.0])  # three batches of 2 calls: 0.2, 0.4 and 3.0 s
    monkeypatch.setattr(calibrate, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    calls = []
    assert calibrate._mean_s(lambda: calls.append(1), repeats=2, warm=2, batches=3) == pytest.approx(0.2)
    assert len(calls) == 2 + 3 * 2


def test_a_shape_is_timed_on_a_ring_of_copies_sized_by_its_rows(monkeypatch):
    """_matmul_seconds: few rows (up to 8, decode) cycle copies through `stream_bytes`, many rows through
    COMPUTE_BYTES (8 MiB); at least 2 copies, at most RING_COPIES; each call's seconds are the ring's time
    over its copies less one Python call per part (the decoder calls them from C++)."""
    import torch

    from metronome.fleet import calibrate

    calls: list[tuple] = []
    ops = SimpleNamespace(block_linear=lambda x, b, kind, n: calls.append((tuple(x.shape), kind, n)))
    monkeypatch.setattr(calibrate, "_mean_s", lambda fn, repeats, warm=2, batches=3: (fn(), 1.0)[1])
    q8 = BLOCK_KINDS["Q8_0"]
    m = Matmul(((q8, 1024, 34), (q8, 1024, 34)))  # K = 32; two parts of 34 KiB: 68 KiB a copy
    blocks = (torch.zeros(1024, 34, dtype=torch.uint8), torch.zeros(1024, 34, dtype=torch.uint8))
    out = calibrate._matmul_seconds(ops, m, blocks, (1, 8, 256), 32 << 20, 1e-6, 1)
    # 32 MiB / 68 KiB = 481.9 -> 482 copies at 1 and 8 rows; 8 MiB / 68 KiB = 120.5 -> 121 at 256
    assert out == pytest.approx({1: 1 / 482 - 2e-6, 8: 1 / 482 - 2e-6, 256: 1 / 121 - 2e-6})
    assert [c[0] for c in calls] == [(1, 32)] * 2 * 482 + [(8, 32)] * 2 * 482 + [(256, 32)] * 2 * 121
    assert {(kind, n) for _, kind, n in calls} == {(q8, 1024)}
    calls.clear()
    tiny = (torch.zeros(2, 34, dtype=torch.uint8),)  # 68 bytes: 1 MiB would be 15,421 copies
    assert calibrate._matmul_seconds(ops, Matmul(((q8, 2, 34),)), tiny, (1,), 1 << 20, 0.0, 1) == {1: 1 / 1024}
    assert len(calls) == calibrate.RING_COPIES == 1024
    calls.clear()
    assert calibrate._matmul_seconds(ops, m, blocks, (1,), 1024, 0.0, 1) == {1: 1 / 2}  # larger than the ring
    assert len(calls) == 2 * 2


def test_the_pools_wake_up_is_priced_once_a_step():
    woken = dataclasses.replace(TERMS, wake_s=5e-4)
    for rows in (1, 8):
        assert predict_step_s(COST, woken, rows, 64, 100) == pytest.approx(
            predict_step_s(COST, TERMS, rows, 64, 100) + 5e-4
        )


def test_sandwich_norms_add_two_regions_a_layer(monkeypatch):
    """plan_cost: 11 parallel regions a layer, 13 with sandwich norms (Gemma 3), plus 2 (docs/planner.md)."""
    from metronome.fleet import calibrate

    monkeypatch.setattr(calibrate, "count_step_ops", lambda engine, live: 10 * live)
    cfg = SimpleNamespace(num_layers=18, sandwich_norms=True, q_size=1024)
    plan = SimpleNamespace(cfg=cfg, device=SimpleNamespace(type="cuda"), report=SimpleNamespace(weight_bytes=1000))
    plan.runner = object()  # not a fused runner: no shapes
    cost = calibrate.plan_cost(SimpleNamespace(plan=plan, model_name="g"), None)
    assert cost.regions == 13 * 18 + 2 and cost.engine_ops == {1: 10, 8: 80}
    cfg.sandwich_norms = False
    assert calibrate.plan_cost(SimpleNamespace(plan=plan, model_name="g"), None).regions == 11 * 18 + 2


def test_the_head_is_timed_at_the_decode_rows_only():
    """A prompt runs the head on its last row: the head's shape is timed at 1 and 8 rows, the layers' at 256 too."""
    from metronome.fleet.calibrate import _timed_shapes

    assert _timed_shapes({QKV: 2}, HEAD, {QKV: "a", HEAD: "b"}) == {QKV: ("a", (1, 8, 256)), HEAD: ("b", (1, 8))}


def test_a_matrix_the_kernels_do_not_read_from_the_file_is_priced_as_q8_0():
    """plan_formats: a float matrix is quantized to Q8_0 (34 bytes a block of 32 weights); the head's bytes
    are kept apart from the layers'; the embedding table, not the head, is left out."""
    import torch

    from metronome.fleet.calibrate import plan_formats

    weights = {
        "layers.0.w": torch.zeros(64, 64),
        "head.weight": torch.zeros(100, 64),
        "embed.weight": torch.zeros(100, 64),
    }
    layers, samples, head = plan_formats(SimpleNamespace(weights=weights), "int8")
    assert layers == {"Q8_0": 64 * 64 // 32 * 34} and head == ("Q8_0", 100 * 64 // 32 * 34) and samples == {}


def test_a_steps_python_calls_count_builtins_too():
    """count_step_ops counts every Python function and builtin (torch's ops among them) one step calls."""
    from metronome.fleet.calibrate import count_step_ops

    def engine(builtins: int) -> SimpleNamespace:
        steps = iter(range(4))

        def step() -> None:
            if next(steps) == 2:  # the counted step
                for _ in range(builtins):
                    len(())

        return SimpleNamespace(
            encode_prompt=lambda text, chat: [1],
            submit=lambda prompt, params, emit: object(),
            cancel=lambda r: None,
            step=step,
        )

    assert count_step_ops(engine(7), 2) - count_step_ops(engine(0), 2) == 7


def test_the_table_reports_bandwidth_in_gb_s_and_compute_in_gflop_s():
    """1e-10 s per byte of Q4_1X16 at one row is 10.0 GB/s; at 256 rows 4e-9 s per byte of 5-bit weights
    (1.6 weights a byte, 2 FLOPs each) is 256 x 2 x 1.6 / 4e-9 = 204.8 GFLOP/s."""
    from metronome.fleet.calibrate import CalibrationRow, calibration_table

    terms = dataclasses.replace(TERMS, seconds_per_byte={"Q4_1X16": {1: 1e-10, 256: 4e-9}})
    text = calibration_table(terms, [CalibrationRow("m", "decode, 1 live slot", 11.0, 10.0)])
    assert "Q4_1X16 10.0 GB/s at 1 row, 205 GFLOP/s at 256 rows" in text and "2 threads" in text
    assert "| m | decode, 1 live slot | 11.0 | 10.0 | 1.10 |" in text


def test_a_rows_measurement_is_the_median_of_its_rounds():
    from metronome.fleet.calibrate import _median_row

    assert _median_row("m", "w", [1.0, 2.0, 9.0], [8.0, 9.0, 13.0]).measured == 9.0  # the mean would be 10


def test_each_row_is_predicted_from_the_terms_at_its_rows_and_positions(tiny_hf, monkeypatch):
    """calibrate_model's rows, with the machine terms fixed: decode at n live slots is 1 / step(n rows, 64
    cached positions, the Python calls of n slots) per slot; the 256-token prompt is 256 / step(256 rows,
    128 positions on average, one slot's calls, the head on its last row); at 3 threads the disaggregated
    decode engine gets 2 (3 - 3 // 2, as Engine.from_model splits them); the plan's ring is its weights and
    head."""
    from metronome.fleet import calibrate

    fixed = dataclasses.replace(TERMS, seconds_per_byte={"Q8_0": {1: 1e-9, 8: 2e-9, 256: 3e-8}}, wake_s=1e-5)
    measured: list[tuple[int, int]] = []

    def fake_terms(threads, device="cpu", repeats=5, stream_bytes=0, samples=None, shapes=None, file_pages=None):
        measured.append((threads, stream_bytes))
        return dataclasses.replace(fixed, threads=threads)

    costs = []
    real_cost = calibrate.plan_cost
    monkeypatch.setattr(calibrate, "STREAM_BYTES", 4096)  # the floor below the tiny plan: its ring is its bytes
    monkeypatch.setattr(calibrate, "measure_terms", fake_terms)
    monkeypatch.setattr(calibrate, "logits_seconds", lambda vocab, softcap, rows: {1: 1e-4, 2: 3e-4})
    monkeypatch.setattr(calibrate, "plan_cost", lambda *a: costs.append(real_cost(*a)) or costs[-1])
    monkeypatch.setattr(calibrate, "tp_plan_cost", lambda *a, **k: None)  # no tp=2 row
    _, rows = calibrate.calibrate_model(str(tiny_hf("llama")), 3, live=(1, 2))
    (cost,) = costs
    terms = dataclasses.replace(fixed, threads=3, logits_s={1: 1e-4, 2: 3e-4})
    step = [predict_step_s(cost, terms, n, 64, cost.engine_ops[n]) for n in (1, 2)]
    prompt = predict_step_s(cost, terms, 256, 128, cost.engine_ops[1], head_rows=1)
    assert [r.predicted for r in rows[:3]] == pytest.approx([1 / step[0], 1 / step[1], 256 / prompt])
    assert rows[3].what == "decode, 1 live slot, disaggregated (decode engine: 2 threads)" and len(rows) == 4
    ring = sum(cost.weight_bytes.values()) + cost.head[1]  # the layers' matrices and the head
    assert ring > 4096 and measured == [(3, ring), (2, ring)]
