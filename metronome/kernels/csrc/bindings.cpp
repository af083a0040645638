// The Python module: a plain pybind11 module (functions take and return torch.Tensor). The only file that
// knows about pybind11 and the torch extension's registration; metronome/kernels/build.py compiles it
// with the other .cpp files of this directory.

#include <ATen/ops/empty.h>
#include <pybind11/functional.h>
#include <torch/csrc/utils/pybind.h>

#include "blocks.h"
#include "decoder.h"
#include "exchange.h"
#include "moe.h"
#include "ops.h"
#include "pool.h"
#include "sample.h"

using metronome::Decoder;
using metronome::Tensor;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "metronome's fused, row-independent CPU kernels (AVX-512)";
  // A failed TORCH_CHECK here (a c10::Error) becomes its Python exception with the check's message only.
  // Left to pybind11, it is handled by torch's translator where this module shares torch's pybind11
  // internals, and otherwise by the generic std::exception one, which calls what(): c10 then symbolizes the
  // C++ stack (addr2line), and on a lent GPU machine's image (torch 2.11+cu130, the module built by g++
  // 13.3) every such error ended the process with no message (docs/performance.md, "On the lent machine").
  py::register_local_exception_translator([](std::exception_ptr error) {
    try {
      if (error) std::rethrow_exception(error);
    } catch (const c10::IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::NotImplementedError& e) {
      PyErr_SetString(PyExc_NotImplementedError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });
  m.def("rms_norm", &metronome::rms_norm, "y = x * rsqrt(mean(x^2) + eps) * weight, f32 math", py::arg("x"),
        py::arg("weight"), py::arg("eps"));
  m.def("add_rms_norm", &metronome::add_rms_norm, "(rms_norm(x + residual), x + residual)", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("eps"));
  m.def("rope", &metronome::rope, "rotate-half RoPE of (B, T, H, Dh) with cos/sin (B, T, Dh)", py::arg("x"),
        py::arg("cos"), py::arg("sin"));
  m.def("silu_mul", &metronome::silu_mul, "silu(gate) * up for gate_up = [gate, up] along the last dim",
        py::arg("gate_up"));
  m.def("gelu_tanh_mul", &metronome::gelu_tanh_mul, "gelu_tanh(gate) * up for gate_up = [gate, up]",
        py::arg("gate_up"));
  m.def("decode_attention", &metronome::decode_attention, "one-query attention per (row, head) over its own cache span",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"), py::arg("ends"), py::arg("window"),
        py::arg("scale"), py::call_guard<py::gil_scoped_release>());
  m.def("set_threads", &metronome::set_threads,
        "threads of the kernels' own pool (default: torch's thread count at first use)", py::arg("n"));
  m.def("get_threads", &metronome::get_threads, "threads of the kernels' own pool");
  m.def("place_threads", &metronome::place_threads,
        "one pool thread per CPU, worker i pinned to cpus[i] (cpus[0]: the submitting thread's, not pinned here)",
        py::arg("cpus"));
  m.def("thread_cpus", &metronome::thread_cpus, "the CPUs the pool's threads were placed on (empty: unpinned)");
  m.def("set_amx", &metronome::set_amx,
        "packed Q4_1/Q5_0/Q8_0/Q4_K matmuls on AMX, 16 rows of x at a time (same bits either way); "
        "returns whether AMX is in use",
        py::arg("enabled"));
  m.def("amx_in_use", &metronome::amx_in_use, "whether packed Q4_1/Q5_0/Q8_0/Q4_K matmuls run on AMX (see set_amx)");
  m.def("hold_first_chunk", &metronome::hold_first_chunk,
        "pool test: a job whose chunk holding item 0 waits for every other item (pool.h)", py::arg("items"),
        py::arg("grain"), py::arg("timeout_ms"), py::call_guard<py::gil_scoped_release>());
  m.def("throw_in_chunk", &metronome::throw_in_chunk,
        "pool test: a job whose chunk holding item `at` throws; (rethrown here, its items, the others') (pool.h)",
        py::arg("items"), py::arg("grain"), py::arg("at"), py::call_guard<py::gil_scoped_release>());

  m.def("sample_rows", &metronome::sample_rows,
        "the token drawn from each of logits' rows `rows` at its inverse temperature, top-k, top-p, min-p and uniform "
        "number u (-1: nothing to draw) (sample.h)",
        py::arg("logits"), py::arg("rows"), py::arg("vocab"), py::arg("inv_temp"), py::arg("top_k"), py::arg("top_p"),
        py::arg("min_p"), py::arg("u"), py::call_guard<py::gil_scoped_release>());

  // The block formats of block_linear and Decoder.add_layer (blocks.h), for metronome/kernels/blocks.py.
  py::dict kinds, bytes, weights, groups;
  for (int64_t k = 0; k < metronome::kNumKinds; ++k) {
    const metronome::KindInfo& info = metronome::kKinds[k];
    kinds[info.name] = k;
    bytes[info.name] = info.bytes;      // per block and group of rows
    weights[info.name] = info.weights;  // per block along K
    groups[info.name] = info.group;     // rows side by side (1: the file's rows)
  }
  m.attr("BLOCK_KINDS") = kinds;
  m.attr("BLOCK_BYTES") = bytes;
  m.attr("BLOCK_WEIGHTS") = weights;
  m.attr("BLOCK_GROUPS") = groups;

  m.def("block_linear", &metronome::block_linear,
        "y = x @ W.T (+ bias) in f32, W as blocks of one of BLOCK_KINDS, `rows` rows", py::arg("x"), py::arg("w"),
        py::arg("kind"), py::arg("rows"), py::arg("bias") = py::none(), py::call_guard<py::gil_scoped_release>());
  m.def("pack_x16", &metronome::pack_x16,
        "a GGUF Q5_0/Q4_K/Q6_K/Q8_0/Q4_0/Q4_1 matrix's rows repacked 16 side by side in block kind `kind` (Q5_0X16, "
        "Q4_KX16, Q6_KX16, Q8_0X16; Q4_1X16 for Q4_0 and Q4_1)",
        py::arg("raw"), py::arg("kind"), py::arg("rows"), py::arg("K"), py::call_guard<py::gil_scoped_release>());
  m.def("gguf_rows", &metronome::gguf_rows,
        "rows `ids` of a GGUF Q4_0/Q4_1/Q8_0 table as float32 (the gguf package's dequantization, bitwise)",
        py::arg("table"), py::arg("ids"), py::arg("ggml_type"));
  py::class_<metronome::MoeLayer, std::shared_ptr<metronome::MoeLayer>>(
      m, "MoeLayer", "a mixture-of-experts block for Decoder.add_layer(moe=...): static top-k dispatch (moe.h)")
      .def(py::init<const Tensor&, const std::vector<std::vector<metronome::BlockPart>>&,
                    const std::vector<std::vector<metronome::BlockPart>>&, int64_t, int64_t, bool,
                    const std::vector<metronome::BlockPart>&, const std::vector<metronome::BlockPart>&, int64_t,
                    const std::optional<Tensor>&>(),
           py::kw_only(), py::arg("router"), py::arg("gate_up"), py::arg("down"), py::arg("width"), py::arg("top_k"),
           py::arg("normalize"), py::arg("shared_gate_up"), py::arg("shared_down"), py::arg("shared_width"),
           py::arg("shared_gate"))
      .def("apply", &metronome::MoeLayer::apply, "h (M, D) -> the block's output (M, D)", py::arg("h"),
           py::call_guard<py::gil_scoped_release>())
      .def("timings", &metronome::MoeLayer::timings,
           "(routing + scatter + gather seconds, expert matmul seconds, calls) since the last reset")
      .def("reset_timings", &metronome::MoeLayer::reset_timings)
      .def("route", &metronome::MoeLayer::route, "h (M, D) -> (weights (M, k), expert ids (M, k)), best first",
           py::arg("h"), py::call_guard<py::gil_scoped_release>());
  py::class_<Decoder>(m, "Decoder",
                      "every layer of a plan, fused: forward(x, slots, positions, cos, sin, cos_local, sin_local)")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, double, bool, Tensor, Tensor>(), py::kw_only(),
           py::arg("hidden"), py::arg("heads"), py::arg("kv_heads"), py::arg("head_dim"), py::arg("intermediate"),
           py::arg("eps"), py::arg("scale"), py::arg("gelu"), py::arg("k_cache"), py::arg("v_cache"))
      .def("add_layer", &Decoder::add_layer, py::kw_only(), py::arg("qkv"), py::arg("qkv_bias"), py::arg("o"),
           py::arg("gate_up"), py::arg("down"), py::arg("attn_norm"), py::arg("mlp_norm"), py::arg("post_attn_norm"),
           py::arg("post_mlp_norm"), py::arg("q_norm"), py::arg("k_norm"), py::arg("window"), py::arg("local_rope"),
           py::arg("moe") = py::none(), py::arg("o_chunks") = std::vector<std::vector<metronome::BlockPart>>{},
           py::arg("down_chunks") = std::vector<std::vector<metronome::BlockPart>>{},
           py::arg("moe_chunks") = std::vector<std::shared_ptr<metronome::MoeLayer>>{})
      .def("set_reduce", &Decoder::set_reduce,
           "reduce(partials (n, M, D), out (M, D)): adds a row-parallel matmul's partial sums (tensor parallel)",
           py::arg("reduce"))
      .def("set_exchange", &Decoder::set_exchange,
           "add the row-parallel partial sums through this host exchange (None: the reduce hook)", py::arg("exchange"))
      .def_property_readonly("num_layers", &Decoder::num_layers)
      .def("forward", &Decoder::forward, py::arg("x"), py::arg("slots"), py::arg("positions"), py::arg("cos"),
           py::arg("sin"), py::arg("cos_local"), py::arg("sin_local"), py::call_guard<py::gil_scoped_release>());

  // Tensor parallel between the processes of one host (exchange.h; parallel/host.py sets it up).
  using metronome::HostExchange;
  py::class_<HostExchange, std::shared_ptr<HostExchange>>(
      m, "HostExchange", "exchanges between the ranks of one host through a shared-memory file (exchange.h)")
      .def(py::init<>())
      .def("attach", &HostExchange::attach, py::arg("path"), py::arg("rank"), py::arg("world"), py::arg("capacity"),
           py::arg("pids"), py::arg("timeout_s"), py::arg("spin_us"))
      .def("detach", &HostExchange::detach, py::call_guard<py::gil_scoped_release>())
      .def_property_readonly("attached", &HostExchange::attached)
      .def_property_readonly("capacity", &HostExchange::capacity)
      .def_static("header_bytes", &HostExchange::header_bytes, py::arg("world"))
      .def(
          "all_gather",
          [](HostExchange& self, const Tensor& t) {
            TORCH_CHECK(t.is_contiguous() && t.device().is_cpu(), "all_gather: a contiguous CPU tensor");
            std::vector<int64_t> shape{self.world()};
            for (int64_t s : t.sizes()) shape.push_back(s);
            Tensor out = at::empty(shape, t.options());
            const int64_t n = t.numel() * t.element_size();
            {
              py::gil_scoped_release release;
              self.all_gather(t.data_ptr(), n, out.data_ptr());
            }
            return out;
          },
          "every rank's tensor (same shape and dtype on every rank) stacked in rank order", py::arg("t"))
      .def(
          "broadcast",
          [](HostExchange& self, const py::bytes& data) {
            std::string in = data;
            std::string got;
            {
              py::gil_scoped_release release;
              got = self.broadcast(in);
            }
            return py::bytes(got);
          },
          "rank 0's bytes on every rank (the others pass b'')", py::arg("data"));
}
