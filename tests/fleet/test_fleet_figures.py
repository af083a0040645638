"""The planner's figures against values worked out by hand (from the model cards' shapes, the catalog's
datasheet numbers and the formulas in the module docstrings), one term at a time."""

from __future__ import annotations

import dataclasses
import math
from types import SimpleNamespace

import pytest

from metronome.fleet import machine
from metronome.fleet.calibrate import _measure_decode, _measure_prefill, _median_row
from metronome.fleet.catalog import load_calibration, load_hardware
from metronome.fleet.cli import _fmt
from metronome.fleet.costs import Candidate, Kind, Workload
from metronome.fleet.gpu import (
    BOUND,
    GpuCalibration,
    calibration_from_table,
    fit_allreduce_latency,
    plan_gpu,
    step_time,
)
from metronome.fleet.hybrid import Handoff, attention_candidate, attention_gpu_plan, prefill_gpu_decode_lpu
from metronome.fleet.lpu import LpuOptions, Pass, StepTiming, _op_work, distribute_layers, plan_partition
from metronome.fleet.ops import Op, Unit
from metronome.fleet.shapes import builtin_shapes

HW = load_hardware()
TSP, H100 = HW["tsp-v1"], HW["h100-sxm"]
SHAPES = builtin_shapes()
TABLE = load_calibration()
CAL = calibration_from_table(TABLE)
HANDOFF = Handoff(TABLE["handoff"]["bandwidth"], TABLE["handoff"]["latency_s"])
# llama-2-7b: 32 layers of q, k, v, o (4096 x 4096 each) and a gated MLP (3 x 4096 x 11008), a 32000-row head
LLAMA7_ACTIVE = 32 * (4 * 4096 * 4096 + 3 * 4096 * 11008) + 32000 * 4096
LLAMA7_TOTAL = LLAMA7_ACTIVE + 32000 * 4096  # and its (untied) embedding table
LLAMA7_KV_PER_POSITION = 2 * 4096 * 32 * 2  # K and V, 4096 wide, 32 layers, 2 bytes


def test_a_step_crosses_each_hop_between_stages_once_and_loops_the_token_back():
    t = StepTiming((1.0, 2.0, 3.0), 0.1, 0.05)
    assert t.total_s == pytest.approx(6 + 2 * 0.1 + 0.05)
    assert t.interval_s == pytest.approx(3 + 0.1)  # the slowest stage and its outgoing hop
    one = StepTiming((2.0,), 0.1, 0.05)
    assert (one.total_s, one.interval_s) == (2.0, 2.0)


# ---- GPU -----------------------------------------------------------------------------------------------------


def test_a_compute_bound_gpu_step_counts_two_flops_a_weight_and_four_a_cached_position():
    rows, positions = 1000, 4000
    flops = 2 * LLAMA7_ACTIVE * rows + 4 * rows * positions * 4096 * 32  # matmuls; QK^T and PV over the cache
    assert step_time(SHAPES["llama-2-7b"], H100, BOUND, 1, rows, 1, positions, 16) == pytest.approx(flops / 989e12)


def test_tensor_parallel_steps_pay_two_all_reduces_a_layer_and_one_gpu_none():
    shape = SHAPES["llama-2-7b"]
    cal = GpuCalibration(1.0, 1.0, allreduce_base_s=10e-6, allreduce_per_doubling_s=2e-6, memory_fraction=1.0)

    def extra(gpus: int) -> float:
        return step_time(shape, H100, cal, gpus, 1, 1, 100, 16) - step_time(shape, H100, BOUND, gpus, 1, 1, 100, 16)

    assert extra(8) == pytest.approx(2 * 32 * (10e-6 + 3 * 2e-6))  # log2(8) = 3 doublings
    assert extra(1) == 0.0


def test_the_all_reduce_fit_recovers_the_latency_the_runs_were_made_with():
    base, per_doubling, single = 10e-6, 2e-6, 100.0
    runs = [(g, 1 / (1 / (g * single) + 2 * 32 * (base + per_doubling * math.log2(g)))) for g in (2, 4, 8)]
    got = fit_allreduce_latency(SHAPES["llama-2-7b"], single, runs)
    assert got == pytest.approx((base, per_doubling), rel=1e-6)


def test_gpu_prefill_rate_and_the_largest_batch_that_fits():
    shape = SHAPES["llama-2-7b"]
    cal = dataclasses.replace(BOUND, memory_fraction=0.9)
    plan = plan_gpu(shape, H100, cal, 1, 1, 4096, 1000)
    assert plan.prefill_tokens_per_s * plan.ttft_s == pytest.approx(1000)
    # 72 GB usable: 13.48 GB of bf16 weights, then 2.15 GB of KV cache per 4096-token sequence: 27 sequences
    assert int((80e9 * 0.9 - 2 * LLAMA7_TOTAL) // (4096 * LLAMA7_KV_PER_POSITION)) == 27
    assert plan_gpu(shape, H100, cal, 1, 27, 4096, 1000) is not None
    assert plan_gpu(shape, H100, cal, 1, 28, 4096, 1000) is None


# ---- LPU -----------------------------------------------------------------------------------------------------


def test_a_one_token_prompts_first_token_is_one_pass():
    shape = SHAPES["llama-2-7b"]
    part = distribute_layers(shape, 8, 8)
    alone = plan_partition(shape, TSP, part, LpuOptions(context=2048, prompt=0))
    one = plan_partition(shape, TSP, part, LpuOptions(context=2048, prompt=1))
    assert one.ttft_s == pytest.approx(alone.ttft_s, rel=1e-12)
    assert one.prefill_tokens_per_s == pytest.approx(alone.prefill_tokens_per_s, rel=1e-12)
    # and a pass's rate is one token per pipeline beat, never more than one per step through every stage
    assert one.prefill_tokens_per_s * one.ttft_s >= 1.0


def test_a_pipeline_holds_one_micro_batch_per_stage_and_its_aggregate_counts_their_rows():
    shape = SHAPES["smollm2-135m"]
    # two stages of 15 layers: a stage holds 15 x 3.54 M + 28.3 M (embedding or tied head) 8-bit weights, 81.4 MB
    # of 230 MB; a 2048-token sequence's KV over 15 layers is 2 x 192 x 2048 x 15 x 2 B = 23.6 MB: 6 sequences
    plan = plan_partition(shape, TSP, distribute_layers(shape, 2, 1), LpuOptions(context=2048, batch=2))
    assert plan.max_users == 6
    assert plan.micro_batches == 2  # 3 batches of 2 fit, but two stages keep only two in flight
    assert plan.aggregate_tokens_per_s == pytest.approx(2 * 2 / plan.period_s)


def test_a_hybrids_users_are_the_kv_that_fits_in_90_percent_of_the_gpus_memory():
    shape = SHAPES["llama-2-7b"]
    opts = LpuOptions(context=4096)
    plan = attention_gpu_plan(shape, TSP, distribute_layers(shape, 8, 8), opts, H100, 8, CAL, HANDOFF)
    assert plan.max_users == int(8 * 80e9 * 0.9 // (4096 * LLAMA7_KV_PER_POSITION)) == 268


# ---- costs of the hybrids ------------------------------------------------------------------------------------


def test_the_attention_hybrid_pays_for_its_gpus_and_its_prefill():
    shape = SHAPES["llama-2-7b"]
    plan = attention_gpu_plan(
        shape, TSP, distribute_layers(shape, 8, 8), LpuOptions(context=2048), H100, 8, CAL, HANDOFF
    )
    wl = Workload(1024, 256)
    cand = attention_candidate(plan, wl, 1.0, 2.0)
    assert cand.usd_per_hour == 64 * 1.0 + 8 * 2.0
    seconds = 1024 / plan.prefill_tokens_per_s + 256 / plan.aggregate_tokens_per_s
    assert cand.cost_per_mtok == pytest.approx(80.0 / 3600 * seconds / 256 * 1e6)


def test_prefill_on_gpus_charges_the_decode_fleet_each_users_share_of_the_handoff():
    shape = SHAPES["llama-2-7b"]
    decode = plan_partition(shape, TSP, distribute_layers(shape, 8, 8), LpuOptions(context=2048))
    wl = Workload(1024, 256)
    prefill = plan_gpu(shape, H100, CAL, 1, 1, wl.context, wl.prompt)
    cand = prefill_gpu_decode_lpu(decode, prefill, HANDOFF, wl, 1.0, 2.0)
    users = decode.micro_batches * decode.options.batch
    gpu_s = 1024 / prefill.prefill_tokens_per_s + cand.handoff_s
    lpu_s = 256 / decode.aggregate_tokens_per_s + cand.handoff_s / users
    assert cand.cost_per_mtok == pytest.approx((2.0 * gpu_s + 64 * 1.0 * lpu_s) / 3600 / 256 * 1e6)


# ---- this machine and the printout ---------------------------------------------------------------------------


def test_read_bandwidth_counts_bytes_not_elements(monkeypatch):
    monkeypatch.setattr(machine, "_best_seconds", lambda fn, repeats: 0.5)
    assert machine.read_bandwidth(size_mib=8, repeats=1) == 8 * 2**20 / 0.5


def test_a_compute_bound_machine_is_held_to_two_flops_a_parameter():
    cfg = SHAPES["smollm2-135m"].config
    slow = machine.MachineMeasurement(bandwidth=1e15, matmul_flops=1e9, memory_bytes=1e10, threads=1)
    assert machine.predict_decode_tokens_per_s(cfg, 270e6, slow) == pytest.approx(1e9 / (2 * cfg.num_parameters()))


def test_the_plan_line_prints_ttft_in_ms_and_power_in_kw():
    cand = Candidate(Kind.LPU, "tsp-v1 x64", 64, 0, 1, 500.0, 3000.0, 0.25, 19_200.0, 64.0, 0.5)
    words = _fmt(cand).split()
    assert words[words.index("TTFT") + 1 : words.index("TTFT") + 3] == ["250.0", "ms"]
    assert words[words.index("kW") - 1] == "19.2"


# ---- --calibrate --measure -----------------------------------------------------------------------------------


def _timings(prompt_s: float, completion_s: float) -> SimpleNamespace:
    t = dict(submitted=0.0, admitted=0.0, first_token=prompt_s, finished=prompt_s + completion_s)
    return SimpleNamespace(**t, first_sentence=None)


def test_measured_decode_is_the_tokens_after_the_first_over_the_time_after_it():
    class Engine:
        def encode_prompt(self, text: str, chat: bool) -> list[int]:
            return [1, 2]

        def generate(self, prompts, params):
            return [SimpleNamespace(token_ids=[7] * params.max_tokens, timings=_timings(0.25, 2.0)) for _ in prompts]

    assert _measure_decode(Engine(), 2) == pytest.approx(127 / 2.0)  # 128 tokens: 127 after the first, in 2 s


def test_measured_prefill_leaves_out_the_warm_up_run():
    prompt_s = iter([10.0, 0.5, 0.25, 1.0])  # the first run warms the pages up

    class Engine:
        plan = SimpleNamespace(cfg=SimpleNamespace(vocab_size=50_000))

        def generate(self, ids, params):
            return SimpleNamespace(timings=_timings(next(prompt_s), 0.0))

    assert _measure_prefill(Engine()) == pytest.approx(256 / 0.5)  # the median of 0.5, 0.25 and 1.0 s


def test_a_calibration_rows_ratio_is_predicted_over_measured():
    row = _median_row("m", "decode, 1 live slot", [12.0, 10.0, 11.0], [8.0, 9.0, 10.0])
    assert (row.predicted, row.measured, row.ratio) == (11.0, 9.0, pytest.approx(11 / 9))


def test_an_lpu_op_reads_its_weights_at_the_weight_bits_not_the_caches():
    # 1 M 8-bit weights split over 2 chips: 0.5 MB a chip at 80 TB/s (a 16-bit KV cache beside them is not read)
    op = Op("w", Unit.MXM, weights=1_000_000)
    work, sram = _op_work(op, TSP, LpuOptions(weight_bits=8, kv_bits=16), 2, Pass(1, 1, 0))
    assert work == sram == pytest.approx(500_000 / 80e12)


def test_the_winner_is_the_cheapest_kind_that_meets_the_speed(capsys):
    import argparse

    from metronome.fleet.cli import add_cli

    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["plan", "smollm2-135m", "--tokens-per-s", "300", "--prompt", "128", "--output", "128"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    costs = [float(line.split("$")[1].split("/M")[0].replace(",", "")) for line in out.splitlines() if "/M tok" in line]
    winner = float(next(line for line in out.splitlines() if line.startswith("winner:")).split("$")[1].split()[0])
    assert len(costs) >= 2 and winner == pytest.approx(min(costs), abs=1e-4)


def test_a_validation_rows_ratio_is_against_the_middle_of_the_published_range():
    """A published range (120-180 tok/s) is held at its middle, 150: a prediction of 150 is 1.00x, and the
    band's ends are read against the same middle."""
    from metronome.fleet.validation import ValidationRow

    row = ValidationRow("lpu", "m", "hw", "1 chip", 150.0, 135.0, 165.0, 120.0, 180.0, "x", "s")
    assert row.published == 150.0 and row.ratio == 1.0
    assert row.band_ratio == (0.9, 1.1)
