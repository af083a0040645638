// The fused decoder (see decoder.h).

#include "decoder.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#include <utility>

#include "checks.h"
#include "ops.h"
#include "pool.h"
#include "simd.h"

namespace metronome {

Decoder::Decoder(int64_t hidden, int64_t heads, int64_t kv_heads, int64_t head_dim, int64_t intermediate, double eps,
                 double scale, bool gelu, Tensor k_cache, Tensor v_cache)
    : D_(hidden),
      H_(heads),
      Hkv_(kv_heads),
      Dh_(head_dim),
      F_(intermediate),
      eps_(static_cast<float>(eps)),
      scale_(static_cast<float>(scale)),
      gelu_(gelu),
      kc_(std::move(k_cache)),
      vc_(std::move(v_cache)) {
  const char* op = "Decoder";
  TORCH_CHECK(kc_.dim() == 5 && kc_.sizes() == vc_.sizes() && kc_.scalar_type() == vc_.scalar_type(), op,
              ": k_cache and v_cache must be equal (layers, slots, kv_heads, ctx, head_dim) tensors, got ", kc_.sizes(),
              " and ", vc_.sizes());
  const bool int8 = kc_.scalar_type() == at::kChar;  // rows of head_dim bytes and their scales (simd.h)
  if (!int8) check_float_dtype(op, "k_cache", kc_);
  TORCH_CHECK(kc_.is_contiguous() && vc_.is_contiguous(), op, ": caches must be contiguous");
  TORCH_CHECK(Dh_ % 16 == 0 && H_ % Hkv_ == 0, op,
              ": head_dim must be a multiple of 16 and heads a multiple of kv_heads");
  const int64_t row = int8 ? int8_row_bytes(Dh_) : Dh_;
  TORCH_CHECK(kc_.size(2) == Hkv_ && kc_.size(4) == row, op, ": cache shape ", kc_.sizes(), " does not match kv_heads ",
              Hkv_, " and rows of ", row,
              int8 ? " bytes (head_dim int8 values, a float32 scale for each 16)" : " values");
}

void Decoder::add_layer(const std::vector<BlockPart>& qkv, const std::optional<Tensor>& qkv_bias,
                        const std::vector<BlockPart>& o, const std::vector<BlockPart>& gate_up,
                        const std::vector<BlockPart>& down, const Tensor& attn_norm, const Tensor& mlp_norm,
                        const std::optional<Tensor>& post_attn_norm, const std::optional<Tensor>& post_mlp_norm,
                        const std::optional<Tensor>& q_norm, const std::optional<Tensor>& k_norm, int64_t window,
                        bool local_rope, const std::shared_ptr<MoeLayer>& moe,
                        const std::vector<std::vector<BlockPart>>& o_chunks,
                        const std::vector<std::vector<BlockPart>>& down_chunks,
                        const std::vector<std::shared_ptr<MoeLayer>>& moe_chunks) {
  const char* op = "Decoder.add_layer";
  TORCH_CHECK(static_cast<int64_t>(layers_.size()) < kc_.size(0), op, ": the cache holds ", kc_.size(0), " layers");
  DecoderLayer L;
  L.qkv = check_segments(op, qkv, (H_ + 2 * Hkv_) * Dh_, D_, qkv_bias.has_value() ? &*qkv_bias : nullptr);
  // a row-parallel matrix: n chunks of K/n columns each, in place of the whole
  auto chunks = [&](const std::vector<std::vector<BlockPart>>& parts, int64_t K, const char* name) {
    std::vector<BlockMatrix> out;
    const int64_t n = static_cast<int64_t>(parts.size());
    TORCH_CHECK(K % n == 0, op, ": ", name, " has ", n, " chunks, which do not divide its ", K, " columns");
    for (const auto& part : parts) {
      out.push_back(check_segments(op, part, D_, K / n, nullptr));
      for (const BlockPart& p : part) L.keep.push_back(std::get<0>(p));
    }
    max_chunks_ = std::max(max_chunks_, n);
    return out;
  };
  if (o_chunks.empty()) {
    L.o = check_segments(op, o, D_, H_ * Dh_, nullptr);
  } else {
    TORCH_CHECK(o.empty(), op, ": give o or o_chunks, not both");
    L.o_chunks = chunks(o_chunks, H_ * Dh_, "o_chunks");
  }
  if (moe != nullptr || !moe_chunks.empty()) {
    TORCH_CHECK(gate_up.empty() && down.empty(), op, ": an MoE layer takes empty gate_up and down lists");
    TORCH_CHECK(moe == nullptr || moe_chunks.empty(), op, ": give moe or moe_chunks, not both");
    TORCH_CHECK(moe == nullptr || moe->hidden() == D_, op, ": the MoE block's hidden size is not ", D_);
    for (const auto& block : moe_chunks)
      TORCH_CHECK(block != nullptr && block->hidden() == D_ && block->same_routing(*moe_chunks.front()), op,
                  ": MoE chunks must be blocks of hidden size ", D_,
                  " with one router, k and shapes (the chunks of one block's expert widths)");
    L.moe = moe;
    L.moe_chunks.assign(moe_chunks.begin(), moe_chunks.end());
    max_chunks_ = std::max(max_chunks_, static_cast<int64_t>(moe_chunks.size()));
  } else {
    L.gate_up = check_segments(op, gate_up, 2 * F_, D_, nullptr);
    if (down_chunks.empty()) {
      L.down = check_segments(op, down, D_, F_, nullptr);
    } else {
      TORCH_CHECK(down.empty(), op, ": give down or down_chunks, not both");
      L.down_chunks = chunks(down_chunks, F_, "down_chunks");
    }
  }
  auto norm = [&](const Tensor& t, int64_t n, const char* name, int64_t or_n = -1) {
    TORCH_CHECK(
        t.scalar_type() == at::kFloat && t.dim() == 1 && (t.size(0) == n || t.size(0) == or_n) && t.is_contiguous(), op,
        ": ", name, " must be a contiguous float32 (", n, ",) tensor");
    return t;
  };
  L.attn_norm = norm(attn_norm, D_, "attn_norm");
  L.mlp_norm = norm(mlp_norm, D_, "mlp_norm");
  if (post_attn_norm) L.post_attn_norm = norm(*post_attn_norm, D_, "post_attn_norm");
  if (post_mlp_norm) L.post_mlp_norm = norm(*post_mlp_norm, D_, "post_mlp_norm");
  if (q_norm) L.q_norm = norm(*q_norm, Dh_, "q_norm", H_ * Dh_);
  if (k_norm) L.k_norm = norm(*k_norm, Dh_, "k_norm", Hkv_ * Dh_);
  for (const auto* parts : {&qkv, &o, &gate_up, &down})
    for (const BlockPart& p : *parts) L.keep.push_back(std::get<0>(p));
  if (qkv_bias) L.keep.push_back(*qkv_bias);
  L.window = window;
  L.local_rope = local_rope;
  layers_.push_back(std::move(L));
}

template <typename TC>
void Decoder::run(float* x, int64_t M, const int64_t* sp, const int64_t* pp, const int64_t* ends, const Tensor& cos,
                  const Tensor& sin, const Tensor& cos_local, const Tensor& sin_local) {
  const int64_t Q = H_ * Dh_, KV = Hkv_ * Dh_, QKV = Q + 2 * KV;
  // Scratch for M rows, reused by every layer (grown, never shrunk).
  const int64_t widest = std::max({QKV, 2 * F_, D_});
  // + the row-parallel chunks' input columns and partial sums
  const int64_t floats = M * (D_ + QKV + 2 * Q + 3 * F_ + D_) + M * (std::max(Q, F_) + max_chunks_ * D_);
  const int64_t need = floats * 4 + scratch_bytes(M, std::max({D_, F_, Q})) + 64 + max_chunks_ * (1024 + 256);
  if (scratch_.numel() < need) scratch_ = at::empty({need}, at::kByte);
  // h (M, D): the normed input of a matmul.
  float* h = reinterpret_cast<float*>(scratch_.data_ptr<uint8_t>());
  float* qkv = h + M * D_;                      // (M, QKV)
  float* qb = qkv + M * QKV;                    // (M, H, Dh) queries, contiguous for the attention kernel
  float* att = qb + M * Q;                      // (M, H, Dh) attention output
  float* gu = att + M * Q;                      // (M, 2F)
  float* act = gu + M * 2 * F_;                 // (M, F)
  float* out = act + M * F_;                    // (M, D) a sublayer's output
  float* xin = out + M * D_;                    // (M, K/n) a chunk's input columns
  float* partials = xin + M * std::max(Q, F_);  // (n, M, D) the chunks' partial sums
  uint8_t* sx = reinterpret_cast<uint8_t*>(partials + M * max_chunks_ * D_);  // a matmul's quantized input
  const int64_t ks[3] = {kc_.stride(1), kc_.stride(2), kc_.stride(3)};
  int64_t total_keys = 0;
  for (int64_t r = 0; r < M; ++r) total_keys += ends[r];
  const int64_t grain = grain_for(D_, kMinParallelElems);
  for (int64_t l = 0; l < num_layers(); ++l) {
    const DecoderLayer& L = layers_[l];
    const float* cs = (L.local_rope ? cos_local : cos).data_ptr<float>();
    const float* sn = (L.local_rope ? sin_local : sin).data_ptr<float>();
    TC* kc = kc_.data_ptr<TC>() + l * kc_.stride(0);
    TC* vc = vc_.data_ptr<TC>() + l * vc_.stride(0);
    rms_norm_rows(x, L.attn_norm.data_ptr<float>(), h, M, D_, eps_);
    block_linear_rows(L.qkv, h, M, qkv, sx);
    parallel_for(0, M, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        float* qr = qkv + r * QKV;
        float* kr = qr + Q;
        const float* vr = kr + KV;
        if (L.q_norm.defined()) {  // per head (qn = Dh), or over the whole projection (OLMoE)
          const int64_t qn = L.q_norm.size(0), kn = L.k_norm.size(0);
          for (int64_t i = 0; i < Q; i += qn)
            scale_row(qr + i, L.q_norm.data_ptr<float>(), rstd_of(sum_squares(qr + i, qn), qn, eps_), qr + i, qn);
          for (int64_t i = 0; i < KV; i += kn)
            scale_row(kr + i, L.k_norm.data_ptr<float>(), rstd_of(sum_squares(kr + i, kn), kn, eps_), kr + i, kn);
        }
        for (int64_t i = 0; i < H_; ++i) rope_row(qr + i * Dh_, cs + r * Dh_, sn + r * Dh_, qr + i * Dh_, Dh_);
        for (int64_t i = 0; i < Hkv_; ++i) {
          rope_row(kr + i * Dh_, cs + r * Dh_, sn + r * Dh_, kr + i * Dh_, Dh_);
          TC* kd = kc + sp[r] * ks[0] + i * ks[1] + pp[r] * ks[2];
          TC* vd = vc + sp[r] * ks[0] + i * ks[1] + pp[r] * ks[2];
          if constexpr (std::is_same_v<TC, int8_t>) {
            quantize_int8_row(kr + i * Dh_, kd, Dh_);
            quantize_int8_row(vr + i * Dh_, vd, Dh_);
          } else {
            for (int64_t j = 0; j < Dh_; j += 16) {
              store16(kd + j, _mm512_loadu_ps(kr + i * Dh_ + j));
              store16(vd + j, _mm512_loadu_ps(vr + i * Dh_ + j));
            }
          }
        }
        std::memcpy(qb + r * Q, qr, static_cast<size_t>(Q) * sizeof(float));
      }
    });
    attention_rows<float, TC>(qb, att, kc, vc, ks, ks, sp, ends, M, H_, Hkv_, Dh_, L.window, scale_, total_keys);
    if (L.o_chunks.empty())
      block_linear_rows(L.o, att, M, out, sx);
    else
      row_parallel(L.o_chunks, att, M, Q, xin, partials, out, sx);
    residual_add(x, out, M, L.post_attn_norm);
    rms_norm_rows(x, L.mlp_norm.data_ptr<float>(), h, M, D_, eps_);
    if (!L.moe_chunks.empty()) {  // each chunk's block gives one partial sum, added as o's and down's are
      MoeLayer::forward_chunks(L.moe_chunks, h, M, partials, moe_scratch_);
      add_partials(partials, static_cast<int64_t>(L.moe_chunks.size()), M, out);
    } else if (L.moe != nullptr) {
      L.moe->forward(h, M, out, moe_scratch_);
    } else {
      block_linear_rows(L.gate_up, h, M, gu, sx);
      if (gelu_)
        gated_rows<true>(gu, act, M, F_);
      else
        gated_rows<false>(gu, act, M, F_);
      if (L.down_chunks.empty())
        block_linear_rows(L.down, act, M, out, sx);
      else
        row_parallel(L.down_chunks, act, M, F_, xin, partials, out, sx);
    }
    residual_add(x, out, M, L.post_mlp_norm);
  }
}

void Decoder::row_parallel(const std::vector<BlockMatrix>& chunks, const float* in, int64_t M, int64_t K, float* xin,
                           float* partials, float* out, uint8_t* sx) {
  const int64_t n = static_cast<int64_t>(chunks.size()), Kc = K / n;
  for (int64_t j = 0; j < n; ++j)  // chunk j's input columns, contiguous: xin + j*M*Kc
    for (int64_t r = 0; r < M; ++r)
      std::memcpy(xin + (j * M + r) * Kc, in + r * K + j * Kc, static_cast<size_t>(Kc) * sizeof(float));
  block_linear_rows_chunks(chunks, xin, M, partials, sx);
  add_partials(partials, n, M, out);
}

void Decoder::add_partials(float* partials, int64_t n, int64_t M, float* out) {
  const int64_t bytes = n * M * D_ * static_cast<int64_t>(sizeof(float));
  if (exchange_ && exchange_->attached() && bytes <= exchange_->capacity()) {
    exchange_->reduce_chunks(partials, n, M * D_, out);  // every rank's partials, in chunk order
    return;
  }
  if (reduce_) {
    const Tensor p = at::from_blob(partials, {n, M, D_}, at::kFloat);
    const Tensor o = at::from_blob(out, {M, D_}, at::kFloat);
    reduce_(p, o);
    return;
  }
  // one process: the chunks' partials added in chunk order (the same adds the hook does across ranks)
  std::memcpy(out, partials, static_cast<size_t>(M * D_) * sizeof(float));
  for (int64_t j = 1; j < n; ++j) {
    const float* pj = partials + j * M * D_;
    for (int64_t i = 0; i < M * D_; ++i) out[i] = out[i] + pj[i];
  }
}

void Decoder::residual_add(float* x, float* y, int64_t M, const Tensor& post_norm) {
  if (post_norm.defined()) rms_norm_rows(y, post_norm.data_ptr<float>(), y, M, D_, eps_);
  parallel_for(0, M, grain_for(D_, kMinParallelElems), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* xr = x + r * D_;
      const float* yr = y + r * D_;
      int64_t i = 0;
      for (; i + 16 <= D_; i += 16)
        _mm512_storeu_ps(xr + i, _mm512_add_ps(_mm512_loadu_ps(xr + i), _mm512_loadu_ps(yr + i)));
      if (i < D_) {
        const __mmask16 m = tail_mask(D_ - i);
        _mm512_mask_storeu_ps(xr + i, m,
                              _mm512_add_ps(_mm512_maskz_loadu_ps(m, xr + i), _mm512_maskz_loadu_ps(m, yr + i)));
      }
    }
  });
}

void Decoder::forward(const Tensor& x, const Tensor& slots, const Tensor& positions, const Tensor& cos,
                      const Tensor& sin, const Tensor& cos_local, const Tensor& sin_local) {
  const char* op = "Decoder.forward";
  TORCH_CHECK(num_layers() == kc_.size(0), op, ": ", num_layers(), " layers added, the cache holds ", kc_.size(0));
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 2 && x.size(1) == D_ && x.is_contiguous(), op,
              ": x must be a contiguous float32 (M, ", D_, ") tensor, got ", x.scalar_type(), " ", x.sizes());
  const int64_t M = x.size(0);
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"slots", &slots}, {"positions", &positions}})
    TORCH_CHECK(t->scalar_type() == at::kLong && t->dim() == 1 && t->size(0) == M && t->is_contiguous(), op, ": ", name,
                " must be a contiguous int64 (", M, ",) tensor");
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"cos", &cos},
                         {"sin", &sin},
                         {"cos_local", &cos_local},
                         {"sin_local", &sin_local}})
    TORCH_CHECK(
        t->scalar_type() == at::kFloat && t->dim() == 2 && t->size(0) == M && t->size(1) == Dh_ && t->is_contiguous(),
        op, ": ", name, " must be a contiguous float32 (", M, ", ", Dh_, ") tensor");
  const int64_t S = kc_.size(1), C = kc_.size(3);
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* pp = positions.data_ptr<int64_t>();
  std::vector<int64_t> ends(static_cast<size_t>(M));
  for (int64_t r = 0; r < M; ++r) {
    TORCH_CHECK(sp[r] >= 0 && sp[r] < S, op, ": slots[", r, "] = ", sp[r], " is out of range [0, ", S, ")");
    TORCH_CHECK(pp[r] >= 0 && pp[r] < C, op, ": positions[", r, "] = ", pp[r], " is out of range [0, ", C, ")");
    ends[r] = pp[r] + 1;
  }
  if (M == 0) return;
  if (kc_.scalar_type() == at::kChar)
    run<int8_t>(x.data_ptr<float>(), M, sp, pp, ends.data(), cos, sin, cos_local, sin_local);
  else if (kc_.scalar_type() == at::kFloat)
    run<float>(x.data_ptr<float>(), M, sp, pp, ends.data(), cos, sin, cos_local, sin_local);
  else
    run<BFloat16>(x.data_ptr<float>(), M, sp, pp, ends.data(), cos, sin, cos_local, sin_local);
}

}  // namespace metronome
