// The mixture-of-experts block of the fused decoder (see moe.h).

#include "moe.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "checks.h"
#include "ops.h"
#include "pool.h"
#include "simd.h"

namespace metronome {

namespace {

// a . b over D floats: one 16-lane accumulator, the masked tail, then hsum's fixed tree.
float dot(const float* a, const float* b, int64_t D) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < D) {
    const __mmask16 m = tail_mask(D - i);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, a + i), _mm512_maskz_loadu_ps(m, b + i), acc);
  }
  return hsum(acc);
}

// y += w * x over D floats (multiply, then add: the reference's order).
void add_scaled(float* y, const float* x, float w, int64_t D) {
  const __m512 wv = _mm512_set1_ps(w);
  int64_t i = 0;
  for (; i + 16 <= D; i += 16)
    _mm512_storeu_ps(y + i, _mm512_add_ps(_mm512_loadu_ps(y + i), _mm512_mul_ps(wv, _mm512_loadu_ps(x + i))));
  if (i < D) {
    const __mmask16 m = tail_mask(D - i);
    _mm512_mask_storeu_ps(
        y + i, m, _mm512_add_ps(_mm512_maskz_loadu_ps(m, y + i), _mm512_mul_ps(wv, _mm512_maskz_loadu_ps(m, x + i))));
  }
}

// Regions of one scratch buffer, each 64-byte aligned: measured with base = nullptr, then laid out.
struct Carver {
  uint8_t* base;
  int64_t used = 0;
  template <typename T>
  T* take(int64_t count) {
    T* p = reinterpret_cast<T*>(base + used);
    used += (count * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64;
    return p;
  }
};

Tensor float_vector(const char* op, const char* name, const Tensor& t, int64_t n) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n, op, ": ", name,
              " must be a contiguous float32 tensor of ", n, " values");
  return t;
}

}  // namespace

MoeLayer::MoeLayer(const Tensor& router, const std::vector<std::vector<BlockPart>>& gate_up,
                   const std::vector<std::vector<BlockPart>>& down, int64_t width, int64_t top_k, bool normalize,
                   const std::vector<BlockPart>& shared_gate_up, const std::vector<BlockPart>& shared_down,
                   int64_t shared_width, const std::optional<Tensor>& shared_gate)
    : E_(static_cast<int64_t>(gate_up.size())), I_(width), k_(top_k), S_(shared_width), normalize_(normalize) {
  const char* op = "MoeLayer";
  TORCH_CHECK(router.dim() == 2 && router.size(0) == E_, op, ": router must be (experts, hidden) with ", E_,
              " experts, got ", router.sizes());
  D_ = router.size(1);
  router_ = float_vector(op, "router", router, E_ * D_);
  TORCH_CHECK(static_cast<int64_t>(down.size()) == E_ && E_ >= 1, op, ": give one gate_up and one down per expert");
  TORCH_CHECK(k_ >= 1 && k_ <= E_, op, ": top_k=", k_, " must be in [1, ", E_, "]");
  auto hold = [&](const std::vector<BlockPart>& parts) {
    for (const BlockPart& part : parts) keep_.push_back(std::get<0>(part));
  };
  for (int64_t e = 0; e < E_; ++e) {
    gate_up_.push_back(check_segments(op, gate_up[e], 2 * I_, D_, nullptr));
    down_.push_back(check_segments(op, down[e], D_, I_, nullptr));
    hold(gate_up[e]);
    hold(down[e]);
  }
  keep_.push_back(router);
  TORCH_CHECK((S_ > 0) == shared_gate.has_value(), op, ": a shared expert needs shared_width > 0 and shared_gate");
  if (S_ > 0) {
    shared_gate_up_ = check_segments(op, shared_gate_up, 2 * S_, D_, nullptr);
    shared_down_ = check_segments(op, shared_down, D_, S_, nullptr);
    shared_gate_ = float_vector(op, "shared_gate", *shared_gate, D_);
    hold(shared_gate_up);
    hold(shared_down);
    keep_.push_back(*shared_gate);
  }
}

void MoeLayer::route_rows(const float* h, int64_t M, float* weights, int64_t* ids, float* logits) const {
  const float* R = router_.data_ptr<float>();
  // the M*E router logits, split over (row, expert) pairs: one row's router (E*D floats) is too big a
  // read for one thread when a step has a single row
  parallel_for(0, M * E_, grain_for(D_, kMinParallelElems), [&](int64_t lo, int64_t hi) {
    for (int64_t q = lo; q < hi; ++q) logits[q] = dot(h + q / E_ * D_, R + q % E_ * D_, D_);
  });
  parallel_for(0, M, grain_for(E_ * 8, kMinParallelElems), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* lg = logits + r * E_;
      // softmax (in place): exp(l - max) / sum, summed in expert order
      float mx = lg[0];
      for (int64_t e = 1; e < E_; ++e) mx = std::max(mx, lg[e]);
      float sum = 0.0f;
      for (int64_t e = 0; e < E_; ++e) sum += (lg[e] = std::exp(lg[e] - mx));
      for (int64_t e = 0; e < E_; ++e) lg[e] = lg[e] / sum;
      // the k best, best first; strictly greater wins, so a tie goes to the lowest expert id
      float* w = weights + r * k_;
      int64_t* id = ids + r * k_;
      float top = 0.0f;
      for (int64_t j = 0; j < k_; ++j) {
        int64_t best = -1;
        for (int64_t e = 0; e < E_; ++e) {
          if (std::find(id, id + j, e) != id + j) continue;
          if (best < 0 || lg[e] > lg[best]) best = e;
        }
        id[j] = best;
        w[j] = lg[best];
        top += w[j];
      }
      if (normalize_)
        for (int64_t j = 0; j < k_; ++j) w[j] = w[j] / top;
    }
  });
}

std::tuple<Tensor, Tensor> MoeLayer::route(const Tensor& h) const {
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.dim() == 2 && h.size(1) == D_ && h.is_contiguous(),
              "MoeLayer.route: h must be a contiguous float32 (M, ", D_, ") tensor");
  const int64_t M = h.size(0);
  Tensor w = at::empty({M, k_}, at::kFloat), ids = at::empty({M, k_}, at::kLong);
  Tensor logits = at::empty({M, E_}, at::kFloat);
  route_rows(h.data_ptr<float>(), M, w.data_ptr<float>(), ids.data_ptr<int64_t>(), logits.data_ptr<float>());
  return {w, ids};
}

Tensor MoeLayer::apply(const Tensor& h) const {
  TORCH_CHECK(h.scalar_type() == at::kFloat && h.dim() == 2 && h.size(1) == D_ && h.is_contiguous(),
              "MoeLayer.apply: h must be a contiguous float32 (M, ", D_, ") tensor");
  Tensor out = at::empty({h.size(0), D_}, at::kFloat), scratch;
  forward(h.data_ptr<float>(), h.size(0), out.data_ptr<float>(), scratch);
  return out;
}

MoeLayer::Scratch MoeLayer::carve(int64_t M, int64_t C, Tensor& scratch) const {
  const int64_t P = M * k_;  // (row, expert) pairs: every one has a place, none is dropped
  const int64_t widest = std::max({D_, I_, S_});
  auto layout = [&](uint8_t* base) {
    Carver c{base};
    Scratch s;
    s.logits = c.take<float>(M * E_);
    s.weights = c.take<float>(P);
    s.ids = c.take<int64_t>(P);
    s.pos = c.take<int64_t>(P);   // pair (r, j) -> its place in the expert-major layout
    s.rows = c.take<int64_t>(P);  // place -> its row
    s.offsets = c.take<int64_t>(E_ + 1);
    s.fill = c.take<int64_t>(E_);
    // per chunk (C of them, tensor parallel; 1 otherwise): its pairs' rows, its shared expert's output
    s.jobs = c.take<BlockJob>(C * E_);
    s.xg = c.take<float>(P * D_);
    s.gu = c.take<float>(C * P * 2 * I_);
    s.act = c.take<float>(C * P * I_);
    s.yg = c.take<float>(C * P * D_);
    s.sgu = c.take<float>(M * 2 * S_);
    s.sact = c.take<float>(M * S_);
    s.sy = c.take<float>(C * M * D_);
    s.sx =
        c.take<uint8_t>(std::max(group_scratch_bytes(C * E_, C * P, std::max(D_, I_)), scratch_bytes(M, widest)) + 64);
    s.used = c.used;
    return s;
  };
  const int64_t need = layout(nullptr).used + 64;
  if (scratch.numel() < need) scratch = at::empty({need}, at::kByte);
  uint8_t* base = scratch.data_ptr<uint8_t>();
  base += (64 - reinterpret_cast<uintptr_t>(base) % 64) % 64;
  return layout(base);
}

void MoeLayer::dispatch(const float* h, int64_t M, const Scratch& s) const {
  const int64_t P = M * k_;
  route_rows(h, M, s.weights, s.ids, s.logits);
  // scatter: count per expert, then places in row order inside each expert's segment
  std::fill(s.offsets, s.offsets + E_ + 1, 0);
  for (int64_t p = 0; p < P; ++p) ++s.offsets[s.ids[p] + 1];
  for (int64_t e = 0; e < E_; ++e) s.offsets[e + 1] += s.offsets[e];
  std::copy(s.offsets, s.offsets + E_, s.fill);
  for (int64_t p = 0; p < P; ++p) {
    const int64_t place = s.fill[s.ids[p]]++;
    s.pos[p] = place;
    s.rows[place] = p / k_;
  }
  if (M > 1)  // one row is itself its experts' input (below): no copies
    parallel_for(0, P, grain_for(D_, kMinParallelElems), [&](int64_t lo, int64_t hi) {
      for (int64_t q = lo; q < hi; ++q)
        std::memcpy(s.xg + q * D_, h + s.rows[q] * D_, static_cast<size_t>(D_) * sizeof(float));
    });
}

void MoeLayer::experts(const MoeLayer* const* blocks, int64_t C, const float* h, int64_t M, const Scratch& s) {
  // every chosen expert's gate_up in one parallel region (its segment of rows, or with one row the row
  // itself: the k experts share it), one activation over all M*k rows, then every chosen expert's down in
  // one region. Idle experts are not read. Few regions per layer: at one row each expert's matmul is too
  // small to pay a region of its own (docs/moe.md). Chunks of one block (tensor parallel) share the
  // routing: chunk c's pairs take rows c*P.. of each buffer, and all chunks' jobs run in the same regions.
  const MoeLayer& f = *blocks[0];
  const int64_t P = M * f.k_, E = f.E_;
  int64_t J = 0;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t e = 0; e < E; ++e) {
      const int64_t lo = s.offsets[e], n = s.offsets[e + 1] - lo;
      if (n) s.jobs[J++] = BlockJob{&blocks[c]->gate_up_[e], M == 1 ? 0 : lo, c * P + lo, n};
    }
  block_linear_rows_group(s.jobs, J, M == 1 ? h : s.xg, M == 1 ? 1 : P, s.gu, s.sx);
  gated_rows<false>(s.gu, s.act, C * P, f.I_);
  J = 0;
  for (int64_t c = 0; c < C; ++c)
    for (int64_t e = 0; e < E; ++e) {
      const int64_t lo = s.offsets[e], n = s.offsets[e + 1] - lo;
      if (n) s.jobs[J++] = BlockJob{&blocks[c]->down_[e], c * P + lo, c * P + lo, n};
    }
  block_linear_rows_group(s.jobs, J, s.act, C * P, s.yg, s.sx);
  if (f.S_ > 0)
    for (int64_t c = 0; c < C; ++c) {
      block_linear_rows(blocks[c]->shared_gate_up_, h, M, s.sgu, s.sx);
      gated_rows<false>(s.sgu, s.sact, M, f.S_);
      block_linear_rows(blocks[c]->shared_down_, s.sact, M, s.sy + c * M * f.D_, s.sx);
    }
}

void MoeLayer::gather(const float* h, int64_t M, const Scratch& s, int64_t c, float* out) const {
  // per row, its experts' outputs in ascending expert id, then the gated shared expert (chunk c's)
  const float* G = S_ > 0 ? shared_gate_.data_ptr<float>() : nullptr;
  const float* yg = s.yg + c * M * k_ * D_;
  const float* sy = s.sy + c * M * D_;
  parallel_for(0, M, grain_for(k_ * D_, kMinParallelElems), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* o = out + r * D_;
      std::fill(o, o + D_, 0.0f);
      const int64_t* id = s.ids + r * k_;
      int64_t prev = -1;
      for (int64_t j = 0; j < k_; ++j) {  // k is small: pick the next larger id each time
        int64_t next = -1;
        for (int64_t t = 0; t < k_; ++t)
          if (id[t] > prev && (next < 0 || id[t] < id[next])) next = t;
        add_scaled(o, yg + s.pos[r * k_ + next] * D_, s.weights[r * k_ + next], D_);
        prev = id[next];
      }
      if (G != nullptr) {
        const float g = 1.0f / (1.0f + std::exp(-dot(h + r * D_, G, D_)));
        add_scaled(o, sy + r * D_, g, D_);
      }
    }
  });
}

namespace {
int64_t ns_between(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(b - a).count();
}
}  // namespace

void MoeLayer::forward(const float* h, int64_t M, float* out, Tensor& scratch) const {
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  const Scratch s = carve(M, 1, scratch);
  dispatch(h, M, s);
  const auto t1 = Clock::now();
  const MoeLayer* self = this;
  experts(&self, 1, h, M, s);
  const auto t2 = Clock::now();
  gather(h, M, s, 0, out);
  const auto t3 = Clock::now();
  dispatch_ns_ += ns_between(t0, t1) + ns_between(t2, t3);
  experts_ns_ += ns_between(t1, t2);
  ++calls_;
}

bool MoeLayer::same_routing(const MoeLayer& other) const {
  return D_ == other.D_ && E_ == other.E_ && I_ == other.I_ && k_ == other.k_ && S_ == other.S_ &&
         normalize_ == other.normalize_ && router_.equal(other.router_) &&
         shared_gate_.defined() == other.shared_gate_.defined() &&
         (!shared_gate_.defined() || shared_gate_.equal(other.shared_gate_));
}

void MoeLayer::forward_chunks(const std::vector<std::shared_ptr<const MoeLayer>>& chunks, const float* h, int64_t M,
                              float* partials, Tensor& scratch) {
  // Every chunk routes with the same router (same_routing, checked when the decoder takes them), so the
  // first chunk's routing and scatter serve all: the router is read once a step, not once per chunk. All
  // chunks' experts then run in the same parallel regions, and each chunk gathers its own partial. A
  // chunk's partial has the bits it has when run alone (forward): the same routing, the same
  // row-independent matmuls, the same gather. The chunks' clocks: all of it on the first chunk.
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  const MoeLayer& first = *chunks.front();
  const int64_t C = static_cast<int64_t>(chunks.size());
  std::vector<const MoeLayer*> blocks(C);
  for (int64_t c = 0; c < C; ++c) blocks[c] = chunks[c].get();
  const Scratch s = first.carve(M, C, scratch);
  first.dispatch(h, M, s);
  const auto t1 = Clock::now();
  experts(blocks.data(), C, h, M, s);
  const auto t2 = Clock::now();
  for (int64_t c = 0; c < C; ++c) blocks[c]->gather(h, M, s, c, partials + c * M * first.D_);
  first.dispatch_ns_ += ns_between(t0, t1) + ns_between(t2, Clock::now());
  first.experts_ns_ += ns_between(t1, t2);
  ++first.calls_;
}

std::tuple<double, double, int64_t> MoeLayer::timings() const {
  return {dispatch_ns_.load() * 1e-9, experts_ns_.load() * 1e-9, calls_.load()};
}

void MoeLayer::reset_timings() {
  dispatch_ns_ = 0;
  experts_ns_ = 0;
  calls_ = 0;
}

}  // namespace metronome
