// The mixture-of-experts feed-forward block of the fused decoder (Mixtral, Qwen2/3-MoE, OLMoE).
//
// Static dispatch for M token rows, k experts per row, E experts:
//   route     per row: router logits (E dot products, float32), softmax, the k best (ties: the lowest
//             expert id), weights renormalized when the model does;
//   scatter   the M*k (row, expert) pairs counted per expert and laid out expert by expert (rows
//             ascending inside an expert's segment): index lists in scratch sized by M*k, so no pair is
//             ever dropped and a segment's length is the number of rows that chose that expert;
//   experts   each chosen expert runs its gate_up and down matmuls on its own segment only (the others
//             are not read): all chosen gate_ups in one parallel region, one activation over all M*k
//             rows, all downs in one region (block_linear_rows_group);
//   gather    per row, its k outputs times their weights added in ascending expert-id order, then the
//             optional shared expert scaled by sigmoid(x . gate).
// Every step is row-independent (block_linear_rows, gated_rows and the dots are; a row's sum order is
// fixed by its own choices), so a row's result never depends on the other rows (simd.h's contract).

#pragma once

#include <ATen/core/Tensor.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "blocks.h"

namespace metronome {

using at::Tensor;

class MoeLayer {
 public:
  // router (E, D) float32; per expert e: gate_up[e] (2I rows, D) and down[e] (D rows, I), each as its
  // (blocks, kind, rows) parts stacked (blocks.h). The shared expert (shared_width > 0): shared_gate_up
  // (2S rows), shared_down (D rows, S), shared_gate (D,) float32; empty lists and None without one.
  MoeLayer(const Tensor& router, const std::vector<std::vector<BlockPart>>& gate_up,
           const std::vector<std::vector<BlockPart>>& down, int64_t width, int64_t top_k, bool normalize,
           const std::vector<BlockPart>& shared_gate_up, const std::vector<BlockPart>& shared_down,
           int64_t shared_width, const std::optional<Tensor>& shared_gate);

  int64_t hidden() const { return D_; }
  int64_t experts() const { return E_; }

  // out (M, D) = the block applied to h (M, D); `scratch` is grown when too small, never shrunk.
  void forward(const float* h, int64_t M, float* out, Tensor& scratch) const;

  // Tensor parallel: blocks that are chunks of one block's expert widths (same router, k and shapes:
  // same_routing). partials (n, M, D): chunk c's output at c, each as its own forward would give it, with
  // the routing done once for all and every chunk's experts in the same parallel regions.
  static void forward_chunks(const std::vector<std::shared_ptr<const MoeLayer>>& chunks, const float* h, int64_t M,
                             float* partials, Tensor& scratch);
  bool same_routing(const MoeLayer& other) const;

  // The block as a tensor-level op, for tests: h (M, D) float32 -> (M, D) float32.
  Tensor apply(const Tensor& h) const;

  // Wall time spent in this block since the last reset: (routing + scatter + gather seconds, expert
  // matmul seconds, calls). Two clock reads per phase; they change no result.
  std::tuple<double, double, int64_t> timings() const;
  void reset_timings();

  // The routing alone, for tests: h (M, D) float32 -> (weights (M, k) float32, ids (M, k) int64).
  std::tuple<Tensor, Tensor> route(const Tensor& h) const;

 private:
  void route_rows(const float* h, int64_t M, float* weights, int64_t* ids, float* logits) const;

  // forward's buffers for M rows, carved from one scratch tensor, and its three phases over them
  struct Scratch {
    float *logits, *weights, *xg, *gu, *act, *yg, *sgu, *sact, *sy;
    int64_t *ids, *pos, *rows, *offsets, *fill;
    BlockJob* jobs;
    uint8_t* sx;
    int64_t used;
  };
  Scratch carve(int64_t M, int64_t C, Tensor& scratch) const;        // C: chunks sharing the routing
  void dispatch(const float* h, int64_t M, const Scratch& s) const;  // route, scatter, the rows' copies
  // the chosen experts and the shared one, of C blocks (chunks of one block's widths) in the same regions
  static void experts(const MoeLayer* const* blocks, int64_t C, const float* h, int64_t M, const Scratch& s);
  void gather(const float* h, int64_t M, const Scratch& s, int64_t c, float* out) const;  // chunk c's output

  int64_t D_, E_, I_, k_, S_;
  bool normalize_;
  Tensor router_, shared_gate_;
  std::vector<BlockMatrix> gate_up_, down_;
  BlockMatrix shared_gate_up_{}, shared_down_{};
  std::vector<Tensor> keep_;  // the weight tensors, held alive
  mutable std::atomic<int64_t> dispatch_ns_{0}, experts_ns_{0}, calls_{0};
};

}  // namespace metronome
