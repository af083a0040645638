// The fused decoder: every transformer layer of a plan in one call, for M token rows.
//
// Row r is one token: its cache slot, its position p; it writes its key/value at p and attends over
// [first, p] of its slot (first from the layer's window). All rows' keys and values are written before
// any row attends, so rows of one slot at consecutive positions (a prompt, or a drafted continuation
// being verified) see each other causally. Every op is row-independent (see simd.h), so a row's result
// never depends on the other rows: prefill, decode and verification are the same computation.
//
// Per layer (the model's Block, model.py):
//   h = norm(x); q,k,v = h @ Wqkv (+b); [q,k = per-head norm]; rope; cache <- k,v; a = attend(q);
//   o = a @ Wo; [o = post_norm(o)]; x += o; h = norm(x); g = act(h @ Wgu); d = g @ Wdown;
//   [d = post_norm(d)]; x += d
// Activations and the residual stream are float32 throughout; the cache keeps its own dtype.

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <vector>

#include "blocks.h"
#include "exchange.h"
#include "moe.h"

namespace metronome {

using at::Tensor;

struct DecoderLayer {
  BlockMatrix qkv, o, gate_up, down;  // gate_up, down: empty where `moe` is the feed-forward block
  // Row-parallel o and down (tensor parallel): chunks of equal K ranges, each its own matmul; their
  // partial sums are added by the reduce hook (or here, in chunk order). Empty: `o` / `down` serve.
  std::vector<BlockMatrix> o_chunks, down_chunks;
  std::shared_ptr<const MoeLayer> moe;  // a mixture-of-experts block (moe.h) in place of the MLP
  // Tensor parallel: the MoE block as chunks of every expert's width (and the shared expert's), each a
  // block of its own whose output is one partial sum, added like the row-parallel chunks'. Empty: `moe`.
  std::vector<std::shared_ptr<const MoeLayer>> moe_chunks;
  Tensor attn_norm, mlp_norm, post_attn_norm, post_mlp_norm, q_norm,
      k_norm;                // float32; the last four optional
  std::vector<Tensor> keep;  // the weight tensors, held alive
  int64_t window;            // 0: global attention
  bool local_rope;           // use the local (sliding-window) RoPE table
};

class Decoder {
 public:
  // k_cache, v_cache: (layers, slots, kv_heads, ctx, head_dim), float32 or bfloat16, contiguous; or int8
  // (layers, slots, kv_heads, ctx, head_dim * 5 / 4): each row head_dim bytes and their float32 scales (simd.h).
  Decoder(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps,
          double scale, bool gelu, Tensor k_cache, Tensor v_cache);

  // One layer's weights, in order: each matrix as its (blocks, kind, rows) parts stacked (blocks.h), float32
  // norms.
  void add_layer(const std::vector<BlockPart>& qkv, const std::optional<Tensor>& qkv_bias,
                 const std::vector<BlockPart>& o, const std::vector<BlockPart>& gate_up,
                 const std::vector<BlockPart>& down, const Tensor& attn_norm, const Tensor& mlp_norm,
                 const std::optional<Tensor>& post_attn_norm, const std::optional<Tensor>& post_mlp_norm,
                 const std::optional<Tensor>& q_norm, const std::optional<Tensor>& k_norm, int64_t window,
                 bool local_rope, const std::shared_ptr<MoeLayer>& moe,
                 const std::vector<std::vector<BlockPart>>& o_chunks,
                 const std::vector<std::vector<BlockPart>>& down_chunks,
                 const std::vector<std::shared_ptr<MoeLayer>>& moe_chunks);
  // An MoE layer gives `moe` (or `moe_chunks`) and empty gate_up/down. q_norm/k_norm span one head, or the whole
  // projection (OLMoE) when they hold heads * head_dim values. o_chunks / down_chunks (tensor parallel):
  // o / down as n matrices of K/n columns each (then o / down are empty); moe_chunks: the MoE block as n
  // blocks of 1/n of every expert's width (then `moe` is None).

  // The hook that adds a row-parallel matmul's partial sums: reduce(partials (n, M, D), out (M, D)) must
  // write into `out` the sum of every rank's partials in chunk order (parallel/fused_tp.py gathers them).
  // Called on the thread that called forward, with the GIL taken by pybind11. None: the local chunks
  // are added here, in chunk order.
  using Reduce = std::function<void(const Tensor&, const Tensor&)>;
  void set_reduce(Reduce reduce) { reduce_ = std::move(reduce); }
  // Ranks on one host add their partial sums through shared memory instead (exchange.h), without the
  // GIL or a Python call; a matmul whose partials do not fit the exchange's slot still takes the hook.
  void set_exchange(std::shared_ptr<HostExchange> exchange) { exchange_ = std::move(exchange); }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

  // x (M, D) float32, updated in place; slots, positions (M,) int64; cos/sin (M, Dh) float32 per row for
  // the global layers, cos_local/sin_local for the sliding-window ones.
  void forward(const Tensor& x, const Tensor& slots, const Tensor& positions, const Tensor& cos, const Tensor& sin,
               const Tensor& cos_local, const Tensor& sin_local);

 private:
  template <typename TC>
  void run(float* x, int64_t M, const int64_t* sp, const int64_t* pp, const int64_t* ends, const Tensor& cos,
           const Tensor& sin, const Tensor& cos_local, const Tensor& sin_local);

  // x += post_norm ? norm(y) : y
  void residual_add(float* x, float* y, int64_t M, const Tensor& post_norm);

  // out (M, D) = in (M, K) @ [chunks]^T, each chunk's K range alone, partials added in chunk order.
  void row_parallel(const std::vector<BlockMatrix>& chunks, const float* in, int64_t M, int64_t K, float* xin,
                    float* partials, float* out, uint8_t* sx);

  // out (M, D) = the n partial sums (n, M, D) of every rank added in chunk order: through the host
  // exchange, the reduce hook, or here (one process).
  void add_partials(float* partials, int64_t n, int64_t M, float* out);

  int64_t D_, H_, Hkv_, Dh_, F_;
  float eps_, scale_;
  bool gelu_;
  Tensor kc_, vc_;
  std::vector<DecoderLayer> layers_;
  Tensor scratch_;
  Tensor moe_scratch_;  // the MoE blocks' dispatch buffers (grown, never shrunk)
  Reduce reduce_;
  std::shared_ptr<HostExchange> exchange_;
  int64_t max_chunks_ = 0;  // the most row-parallel chunks of any layer (scratch for their partials)
};

}  // namespace metronome
