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
    # the GPUs: whole one-GPU groups, as many as the requests the pipeline finishes keep busy, over those requests
    requests_per_s = decode.aggregate_tokens_per_s / 256
    groups = math.ceil(requests_per_s * gpu_s)
    assert cand.gpus == groups == 1 and "x1 prefill ->" in cand.layout  # batch 1: one GPU keeps up
    assert cand.cost_per_mtok == pytest.approx((2.0 * groups / requests_per_s + 64 * 1.0 * lpu_s) / 3600 / 256 * 1e6)


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


# ---- added by the mutation audit: figures each a mutant of the planner moved -----------------------------------


def test_a_replicated_op_reads_its_whole_weights_on_every_chip():
    """Norms work on the replicated hidden vector: each chip of a tensor-parallel group reads all of the
    op's weights, not 1/tp (1 M 8-bit weights at 80 TB/s, at tp 2 as at tp 1)."""
    op = Op("norm.scale", Unit.VXM, weights=1_000_000, replicated=True)
    work, sram = _op_work(op, TSP, LpuOptions(weight_bits=8), 2, Pass(1, 1, 0))
    assert work == sram == pytest.approx(1_000_000 / 80e12)


def test_an_all_gather_sends_each_peer_one_share_and_an_all_reduce_picks_the_faster_form():
    """The embedding row (4096 fp16 values) is split by columns over 8 chips: each chip sends its eighth to
    every peer. An all-reduce of a small vector goes direct (the whole partial to every peer, one phase);
    of a large one as reduce-scatter + all-gather (two phases of 1/tp each)."""
    from metronome.fleet.lpu import _phases
    from metronome.fleet.ops import Exchange, Pattern

    opts = LpuOptions()
    gather = Exchange("embed.allgather", Pattern.ALLGATHER, 4096)
    assert _phases(gather, TSP, opts, 8, Pass(1, 1, 0)) == [4096 * 2 / 8]
    assert _phases(gather, TSP, opts, 1, Pass(1, 1, 0)) == []  # one chip has nothing to exchange
    reduce = Exchange("down.allreduce", Pattern.ALLREDUCE, 4096)
    # 8 KB: 3 us + 0.59 us direct against 2 x (3 us + 0.07 us) split
    assert _phases(reduce, TSP, opts, 8, Pass(1, 1, 0)) == [8192]
    # 64 rows, 512 KB: 3 us + 37.4 us direct against 2 x (3 us + 4.7 us) split
    assert _phases(reduce, TSP, opts, 8, Pass(64, 64, 0)) == [64 * 8192 / 8, 64 * 8192 / 8]


def test_micro_batches_in_flight_are_the_batches_that_fit_not_the_sequences():
    """Two stages of SmolLM2 hold 6 sequences of 2048 tokens (see the test above): at a batch of 4 only one
    micro-batch of 4 fits, so one is in flight, not min(stages, 6) = 2."""
    shape = SHAPES["smollm2-135m"]
    plan = plan_partition(shape, TSP, distribute_layers(shape, 2, 1), LpuOptions(context=2048, batch=4))
    assert plan.max_users == 6 and plan.micro_batches == 1
    assert plan.aggregate_tokens_per_s == pytest.approx(4 / plan.period_s)


def test_ttft_streams_the_prompt_in_chunks_and_takes_the_best_chunk(monkeypatch):
    """TTFT = pass(chunk) + (chunks - 1) x beat(chunk), over chunks of n, n/2, ... 1 rows, each attending to
    half the prompt. With a stage time of 1 ms + 0.1 ms a row + 1 us per attended position (4 stages, no
    hops), a 16-token prompt gives: chunk 16: 4 x (1 + 1.6 + 0.008) = 10.432 ms; chunk 8: 4 x 1.808 + 1 x
    1.808 = 9.04 ms, the best; chunk 4: 7 x 1.408 = 9.856; chunk 2: 11 x 1.208; chunk 1: 19 x 1.108."""
    import metronome.fleet.lpu as lpu

    seen = []

    def fake(shape, hw, part, opts, p):
        seen.append((p.rows, p.seqs, p.positions))
        stage = 1e-3 + 0.1e-3 * p.rows + 1e-6 * p.positions
        return StepTiming((stage,) * 4, 0.0, 0.0)

    monkeypatch.setattr(lpu, "step_timing", fake)
    shape = SHAPES["llama-2-7b"]
    ttft, rate = lpu._prefill(shape, TSP, distribute_layers(shape, 4, 8), LpuOptions(context=2048, prompt=16))
    assert seen == [(16, 1, 8), (8, 1, 8), (4, 1, 8), (2, 1, 8), (1, 1, 8)]
    assert ttft == pytest.approx(5 * 1.808e-3)
    assert rate == pytest.approx(16 / 2.608e-3)  # the largest chunk streams the most rows a beat


def test_a_hybrid_stage_holds_the_gpu_port_for_every_chip_that_shares_it():
    """Attention on 1 GPU for a group of 8 LPU chips: the one GPU port carries all 8 chips' q/k/v, 3 x 4096
    fp16 values a row for Llama-2-7B (24,576 bytes at 31.5 GB/s), and their 4096-value results back. On 8
    GPUs each port carries one chip's eighth."""
    from metronome.fleet.lpu import Pass as LpuPass
    from metronome.fleet.lpu import _stage_segments

    shape = SHAPES["llama-2-7b"]
    part = distribute_layers(shape, 8, 8)
    for gpus, chips_per_port in ((1, 8), (8, 1)):
        plan = attention_gpu_plan(shape, TSP, part, LpuOptions(context=2048), H100, gpus, CAL, HANDOFF)
        segs = _stage_segments(shape, TSP, part, plan.options, LpuPass(1, 1, 2048), None)[1]
        up = next(s for s in segs if s.name == "layer 4 q/k/v -> gpu")
        down = next(s for s in segs if s.name == "layer 4 attn -> lpu")
        assert up.occupy == pytest.approx(chips_per_port * 3 * 4096 * 2 / 8 / 31.5e9), gpus
        assert down.occupy == pytest.approx(chips_per_port * 4096 * 2 / 8 / 31.5e9), gpus
        assert up.latency == down.latency == 5e-6


def test_lpu_options_and_chips_that_cannot_work_are_refused():
    """A zero batch, context or chunk count, and a chip with too few links for a node plus the two pipeline
    links (8 chips: 7 peers + 2 = 9), are refused before planning."""
    shape = SHAPES["llama-2-7b"]
    part = distribute_layers(shape, 8, 8)
    for bad in ("batch", "context", "stream_chunks", "weight_bits", "kv_bits", "act_bytes"):
        with pytest.raises(ValueError, match=f"{bad}=0 must be at least 1"):
            plan_partition(shape, TSP, part, dataclasses.replace(LpuOptions(), **{bad: 0}))
    with pytest.raises(ValueError, match="8 links cannot connect a node of 8"):
        plan_partition(shape, dataclasses.replace(TSP, links=8), part, LpuOptions(context=1024))
    assert plan_partition(shape, dataclasses.replace(TSP, links=9), part, LpuOptions(context=1024)).chips == 64


def test_a_chip_budget_is_never_exceeded():
    """`--chips N`: every layout the planner considers uses at most N chips (SmolLM2 at tp1 fits one chip,
    so each budget from 1 to 12 allows exactly that many stage counts)."""
    from metronome.fleet.lpu import partitions

    shape, opts = SHAPES["smollm2-135m"], LpuOptions(context=1024)
    for cap in (1, 2, 5, 12):
        fits = partitions(shape, TSP, opts, cap)
        assert fits and max(p.chips for p in fits) == cap, cap


# ---- GPU figures the mutants moved --------------------------------------------------------------------------


def test_a_tensor_parallel_prefill_splits_its_flops_over_the_gpus():
    rows, positions = 1000, 4000
    flops = 2 * LLAMA7_ACTIVE * rows + 4 * rows * positions * 4096 * 32
    assert step_time(SHAPES["llama-2-7b"], H100, BOUND, 2, rows, 1, positions, 16) == pytest.approx(flops / 2 / 989e12)


def test_a_decode_step_reads_every_sequences_kv_cache():
    """8 sequences at 4096 positions: the bf16 weights (with one embedding row a token) plus 8 caches of
    2.15 GB, at 3.35 TB/s (memory-bound by far)."""
    weights = 2 * LLAMA7_ACTIVE + 8 * 4096 * 2
    want = (weights + 8 * 4096 * LLAMA7_KV_PER_POSITION) / 3.35e12
    assert step_time(SHAPES["llama-2-7b"], H100, BOUND, 1, 8, 8, 4096, 16) == pytest.approx(want)


def test_a_moe_gpu_step_reads_the_experts_its_rows_touch():
    """Mixtral (32 layers; attention 2 x 4096^2 + 2 x 4096 x 1024; 8 experts of 3 x 4096 x 14336; a router of
    4096 x 8; a 32000 x 4096 head): 64 rows routed 2 of 8 at random touch 8 (1 - 0.75^64) experts a layer,
    all 8 to 8 decimal places, where one row reads 2."""
    d, layers = 4096, 32
    attn, expert, router, head = 2 * d * d + 2 * d * 1024, 3 * d * 14336, d * 8, 32000 * d

    def bytes_read(experts: float, rows: int) -> float:
        return 2 * (layers * (attn + round(experts * expert) + router) + head) + rows * d * 2

    mix = SHAPES["mixtral-8x7b"]
    for rows, experts in ((1, 2.0), (64, 8 * (1 - 0.75**64))):
        got = step_time(mix, H100, BOUND, 1, rows, rows, 0, 16)
        assert got == pytest.approx(bytes_read(experts, rows) / 3.35e12, rel=1e-9), rows


def test_a_gpu_prefill_attends_to_half_the_prompt_on_average():
    """1000 prompt tokens in one compute-bound step: row i attends to about i positions, 500 on average."""
    plan = plan_gpu(SHAPES["llama-2-7b"], H100, BOUND, 1, 1, 4096, 1000)
    flops = 2 * LLAMA7_ACTIVE * 1000 + 4 * 1000 * 500 * 4096 * 32
    assert plan.ttft_s == pytest.approx(flops / 989e12)


def test_gpu_plans_refuse_an_lpu_target_and_an_empty_batch():
    shape = SHAPES["llama-2-7b"]
    with pytest.raises(ValueError, match="'tsp-v1' is an LPU"):
        plan_gpu(shape, TSP, CAL, 1, 1, 4096, 100)
    with pytest.raises(ValueError, match="batch=0 must both be at least 1"):
        plan_gpu(shape, H100, CAL, 1, 0, 4096, 100)


# ---- hybrids, candidates and workloads --------------------------------------------------------------------------


def test_prefill_on_gpus_pays_for_and_powers_both_fleets():
    """8 x 8 TSPs at $1/h and 300 W, one H100 at $2/h and 700 W; a batch of 2 per micro-batch: the KV
    hand-off is shared by micro-batches x 2 users."""
    shape = SHAPES["llama-2-7b"]
    decode = plan_partition(shape, TSP, distribute_layers(shape, 8, 8), LpuOptions(context=2048, batch=2))
    wl = Workload(1024, 256)
    prefill = plan_gpu(shape, H100, CAL, 1, 1, wl.context, wl.prompt)
    cand = prefill_gpu_decode_lpu(decode, prefill, HANDOFF, wl, 1.0, 2.0)
    users = decode.micro_batches * 2
    gpu_s = 1024 / prefill.prefill_tokens_per_s + cand.handoff_s
    requests_per_s = decode.aggregate_tokens_per_s / 256
    groups = math.ceil(requests_per_s * gpu_s)  # one H100 each: enough to prefill what the LPUs decode
    assert groups * 1024 / gpu_s >= requests_per_s * 1024 > (groups - 1) * 1024 / gpu_s
    assert cand.usd_per_hour == 64 * 1.0 + groups * 2.0 and cand.power_w == 64 * 300 + groups * 700
    assert cand.gpus == groups
    # answers of 8 tokens: the pipeline finishes requests 32x as often, and one GPU no longer keeps up
    short = prefill_gpu_decode_lpu(decode, prefill, HANDOFF, Workload(1024, 8), 1.0, 2.0)
    busy = math.ceil(decode.aggregate_tokens_per_s / 8 * gpu_s)
    assert busy > 1 and short.gpus == busy and f"x{busy} prefill ({busy} groups of 1)" in short.layout
    lpu_s = 256 / decode.aggregate_tokens_per_s + cand.handoff_s / users
    assert cand.cost_per_mtok == pytest.approx((2.0 * groups / requests_per_s + 64 * 1.0 * lpu_s) / 3600 / 256 * 1e6)


def test_the_kv_handoff_moves_the_caches_bits_and_nothing_without_a_prompt():
    """An 8-bit KV cache crosses the one GPU port in half the time of a 16-bit one (1024 tokens x 32 layers x
    2 x 4096 values, 1 byte each, at 31.5 GB/s plus 5 us); with no prompt there is nothing to hand off and
    the first token comes when the GPU's one step does."""
    from metronome.fleet.hybrid import kv_handoff

    shape = SHAPES["llama-2-7b"]
    part = distribute_layers(shape, 8, 8)
    decode = plan_partition(shape, TSP, part, LpuOptions(context=2048, kv_bits=8))
    prefill = plan_gpu(shape, H100, CAL, 1, 1, 2048, 1024)
    moved = kv_handoff(decode, prefill, HANDOFF, 1024)
    assert moved.makespan_s - prefill.ttft_s == pytest.approx(1024 * 32 * 2 * 4096 / 31.5e9 + 5e-6)
    empty = plan_gpu(shape, H100, CAL, 1, 1, 256, 0)
    cand = prefill_gpu_decode_lpu(decode, empty, HANDOFF, Workload(0, 256), 1.0, 2.0)
    assert cand.handoff_s == 0.0 and cand.ttft_s == empty.ttft_s


def test_the_attention_hybrid_counts_its_gpus_power_and_its_pipelines_speed():
    """64 TSPs at 300 W and 8 H100s at 700 W; the user's speed is the scheduled pipeline's (every stage
    queues on the one GPU group), not one idle pass."""
    shape = SHAPES["llama-2-7b"]
    plan = attention_gpu_plan(
        shape, TSP, distribute_layers(shape, 8, 8), LpuOptions(context=2048), H100, 8, CAL, HANDOFF
    )
    cand = attention_candidate(plan, Workload(1024, 256), 1.0, 2.0)
    assert cand.power_w == 64 * 300 + 8 * 700
    assert cand.per_user_tokens_per_s == pytest.approx(1 / plan.period_s)
    assert plan.period_s > plan.decode.total_s  # so the two differ here


def test_a_workload_needs_an_output_token_and_a_non_negative_prompt():
    assert Workload(3, 5).context == 8 and Workload(0, 1).context == 1
    for prompt, output in ((-1, 5), (3, 0)):
        with pytest.raises(ValueError, match="the prompt must be >= 0 tokens and the output >= 1"):
            Workload(prompt, output)


# ---- added by the mutation audit of fleet/ops.py: a layer's program, counted by hand ------------------------------


def test_a_layers_program_reads_every_weight_of_the_layer_once():
    """llama-2-7b: q, k, v, o (4096 x 4096 each), gate, up, down (4096 x 11008 each) and two norms' scales
    (4096 each); a Qwen2-style q/k/v bias adds q + 2 kv more, as attention_params counts it."""
    from metronome.config import ModelConfig
    from metronome.fleet.ops import layer_program
    from metronome.fleet.shapes import ModelShape

    weights = {s.name: s.weights for s in layer_program(SHAPES["llama-2-7b"]) if isinstance(s, Op)}
    assert sum(weights.values()) == 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert weights["attn_norm.scale"] == weights["mlp_norm.scale"] == 4096
    # 896 wide, 14 heads of 64, 2 KV heads: q 896, k and v 128 each; the bias 896 + 2 x 128 = 1152
    cfg = ModelConfig(
        arch="qwen2", name="q", vocab_size=1000, hidden_size=896, intermediate_size=4864, num_layers=2,
        num_heads=14, num_kv_heads=2, head_dim=64, max_position=4096, qkv_bias=True,
    )  # fmt: skip
    shape = ModelShape(cfg)
    qkv = next(s for s in layer_program(shape) if s.name == "qkv")
    assert qkv.weights == 896 * 1152 + 1152 and qkv.flops == 2 * qkv.weights
    assert shape.attention_params() == qkv.weights + 896 * 896  # and o


def test_attention_reads_each_cached_position_twice_at_two_flops_an_element():
    """Per cached position: scores and attn_v each read the KV heads' k (v) and do 2 FLOPs a query element;
    softmax's max, exp-sum (3) and normalize one FLOP each per head. llama-2-7b: q = 4096, 32 heads."""
    from metronome.fleet.ops import layer_program

    ops = {s.name: s for s in layer_program(SHAPES["llama-2-7b"]) if isinstance(s, Op)}
    assert (ops["scores"].kv_flops, ops["attn_v"].kv_flops) == (2 * 4096, 2 * 4096)
    assert sum(op.kv_flops for op in ops.values()) == 4 * 4096 + 5 * 32
    assert sum(op.kv_reads for op in ops.values()) == 2 * 4096


def test_the_dependency_chain_counts_every_op_but_the_cache_write():
    """llama-2-7b: attention's 12 ops (2 norm, qkv, rope, kv_write, scores, 3 softmax, attn_v, o_proj,
    residual) less the off-path kv_write, and the MLP's 6 (2 norm, gate_up, act, down, residual): 17.
    Gemma 3 adds the QK norm and the sandwich norms after attention and after the MLP (2 ops each): 22."""
    from metronome.fleet.ops import dependent_ops, layer_program

    assert dependent_ops(layer_program(SHAPES["llama-2-7b"])) == 17
    gemma = layer_program(SHAPES["gemma-3-270m"])
    assert dependent_ops(gemma) == 22
    names = [s.name for s in gemma]
    assert names.index("post_attn_norm.scale") < names.index("attn_residual")
    assert names.index("post_mlp_norm.scale") < names.index("mlp_residual")
