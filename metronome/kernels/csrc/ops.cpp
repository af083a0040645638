// The row kernels (see ops.h): RMSNorm, RoPE, gated activations, decode attention.

#include "ops.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "checks.h"
#include "pool.h"

namespace metronome {

// ---------------------------------------------------------------------------------------------------
// RMSNorm (the row helpers and the formula are in ops.h).

template <typename T>
void rms_norm_rows(const T* x, const float* w, T* y, int64_t rows, int64_t D, float eps) {
  parallel_for(0, rows, grain_for(D, kMinParallelElems), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) scale_row(x + r * D, w, rstd_of(sum_squares(x + r * D, D), D, eps), y + r * D, D);
  });
}

namespace {

// new_residual = x + residual (rounded to T); y = rms_norm(new_residual).
template <typename T>
void add_rms_norm_rows(const T* x, const T* res, const float* w, T* y, T* new_res, int64_t rows, int64_t D, float eps) {
  parallel_for(0, rows, grain_for(D, kMinParallelElems), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const T* xr = x + r * D;
      const T* rr = res + r * D;
      T* nr = new_res + r * D;
      int64_t i = 0;
      for (; i + 16 <= D; i += 16) store16(nr + i, _mm512_add_ps(load16(xr + i), load16(rr + i)));
      if (i < D) {
        __mmask16 m = tail_mask(D - i);
        store16(nr + i, _mm512_add_ps(load16(xr + i, m), load16(rr + i, m)), m);
      }
      scale_row(nr, w, rstd_of(sum_squares(nr, D), D, eps), y + r * D, D);
    }
  });
}

}  // namespace

Tensor rms_norm(const Tensor& x_in, const Tensor& weight, double eps) {
  check_cpu("rms_norm", "x", x_in);
  check_cpu("rms_norm", "weight", weight);
  check_float_dtype("rms_norm", "x", x_in);
  check_float_dtype("rms_norm", "weight", weight);
  TORCH_CHECK(x_in.dim() >= 1, "rms_norm: x must have at least one dimension");
  const int64_t D = x_in.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D, "rms_norm: weight must have shape (", D, ",), got ",
              weight.sizes());
  Tensor x = x_in.contiguous();
  Tensor w = weight_f32(weight);
  Tensor y = at::empty(x.sizes(), x.options());
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  if (x.scalar_type() == at::kFloat)
    rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), rows, D, static_cast<float>(eps));
  else
    rms_norm_rows(x.data_ptr<BFloat16>(), w.data_ptr<float>(), y.data_ptr<BFloat16>(), rows, D,
                  static_cast<float>(eps));
  return y;
}

std::tuple<Tensor, Tensor> add_rms_norm(const Tensor& x_in, const Tensor& res_in, const Tensor& weight, double eps) {
  check_cpu("add_rms_norm", "x", x_in);
  check_cpu("add_rms_norm", "residual", res_in);
  check_cpu("add_rms_norm", "weight", weight);
  check_float_dtype("add_rms_norm", "x", x_in);
  check_float_dtype("add_rms_norm", "weight", weight);
  TORCH_CHECK(res_in.sizes() == x_in.sizes(), "add_rms_norm: residual shape ", res_in.sizes(), " must equal x's ",
              x_in.sizes());
  TORCH_CHECK(res_in.scalar_type() == x_in.scalar_type(), "add_rms_norm: residual dtype ", res_in.scalar_type(),
              " must equal x's ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() >= 1, "add_rms_norm: x must have at least one dimension");
  const int64_t D = x_in.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D, "add_rms_norm: weight must have shape (", D, ",), got ",
              weight.sizes());
  Tensor x = x_in.contiguous(), res = res_in.contiguous();
  Tensor w = weight_f32(weight);
  Tensor y = at::empty(x.sizes(), x.options());
  Tensor nr = at::empty(x.sizes(), x.options());
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  const float e = static_cast<float>(eps);
  if (x.scalar_type() == at::kFloat)
    add_rms_norm_rows(x.data_ptr<float>(), res.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(),
                      nr.data_ptr<float>(), rows, D, e);
  else
    add_rms_norm_rows(x.data_ptr<BFloat16>(), res.data_ptr<BFloat16>(), w.data_ptr<float>(), y.data_ptr<BFloat16>(),
                      nr.data_ptr<BFloat16>(), rows, D, e);
  return {y, nr};
}

// ---------------------------------------------------------------------------------------------------
// Rotate-half RoPE (rope_row is in ops.h).

namespace {

template <typename T>
void rope_rows(const T* x, const float* cs, const float* sn, T* y, int64_t BT, int64_t H, int64_t Dh) {
  parallel_for(0, BT * H, grain_for(Dh, kMinParallelElems), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) rope_row(x + r * Dh, cs + (r / H) * Dh, sn + (r / H) * Dh, y + r * Dh, Dh);
  });
}

}  // namespace

Tensor rope(const Tensor& x_in, const Tensor& cos_in, const Tensor& sin_in) {
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"x", &x_in}, {"cos", &cos_in}, {"sin", &sin_in}}) {
    check_cpu("rope", name, *t);
    check_float_dtype("rope", name, *t);
  }
  TORCH_CHECK(x_in.dim() == 4, "rope: x must be (B, T, H, Dh), got shape ", x_in.sizes());
  const int64_t B = x_in.size(0), T = x_in.size(1), H = x_in.size(2), Dh = x_in.size(3);
  TORCH_CHECK(Dh % 2 == 0, "rope: head dim ", Dh, " must be even");
  TORCH_CHECK(cos_in.dim() == 3 && cos_in.size(0) == B && cos_in.size(1) == T && cos_in.size(2) == Dh,
              "rope: cos must be (B, T, Dh) = (", B, ", ", T, ", ", Dh, "), got ", cos_in.sizes());
  TORCH_CHECK(sin_in.sizes() == cos_in.sizes(), "rope: sin shape ", sin_in.sizes(), " must equal cos's ",
              cos_in.sizes());
  Tensor x = x_in.contiguous();
  Tensor c = weight_f32(cos_in), s = weight_f32(sin_in);
  Tensor y = at::empty(x.sizes(), x.options());
  if (x.scalar_type() == at::kFloat)
    rope_rows(x.data_ptr<float>(), c.data_ptr<float>(), s.data_ptr<float>(), y.data_ptr<float>(), B * T, H, Dh);
  else
    rope_rows(x.data_ptr<BFloat16>(), c.data_ptr<float>(), s.data_ptr<float>(), y.data_ptr<BFloat16>(), B * T, H, Dh);
  return y;
}

// ---------------------------------------------------------------------------------------------------
// Gated activations: out = act(gate) * up, gate = row[:F], up = row[F:].
// silu(g) = g / (1 + e^-g)   (torch's formula)
// gelu_tanh(g) = 0.5*g*(1 + tanh(u)), u = sqrt(2/pi)*(g + 0.044715*g^3), evaluated as the identical
//   g / (1 + e^(-2u)), which has no cancellation for negative g (torch's 1 + tanh(u) loses digits there).

template <bool kGelu, typename T>
void gated_rows(const T* x, T* y, int64_t rows, int64_t F) {
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 kappa = _mm512_set1_ps(0.044715f);
  const __m512 m2beta = _mm512_set1_ps(-2.0f * 0.7978845608028654f);  // -2*sqrt(2/pi)
  auto act = [&](__m512 g) {
    __m512 arg;
    if constexpr (kGelu) {
      __m512 g3 = _mm512_mul_ps(_mm512_mul_ps(g, g), g);
      arg = _mm512_mul_ps(m2beta, _mm512_add_ps(g, _mm512_mul_ps(kappa, g3)));
    } else {
      arg = _mm512_xor_ps(g, _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u))));
    }
    return _mm512_div_ps(g, _mm512_add_ps(one, vexp(arg)));
  };
  parallel_for(0, rows, grain_for(F, kMinParallelElems), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const T* g = x + r * 2 * F;
      const T* u = g + F;
      T* o = y + r * F;
      int64_t i = 0;
      for (; i + 16 <= F; i += 16) store16(o + i, _mm512_mul_ps(act(load16(g + i)), load16(u + i)));
      if (i < F) {
        __mmask16 m = tail_mask(F - i);
        store16(o + i, _mm512_mul_ps(act(load16(g + i, m)), load16(u + i, m)), m);
      }
    }
  });
}

namespace {

template <bool kGelu>
Tensor gated(const char* op, const Tensor& x_in) {
  check_cpu(op, "gate_up", x_in);
  check_float_dtype(op, "gate_up", x_in);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) % 2 == 0, op,
              ": gate_up's last dimension must be even (gate then up), got shape ", x_in.sizes());
  Tensor x = x_in.contiguous();
  const int64_t F = x.size(-1) / 2;
  auto sizes = x.sizes().vec();
  sizes.back() = F;
  Tensor y = at::empty(sizes, x.options());
  const int64_t rows = F == 0 ? 0 : x.numel() / (2 * F);
  if (x.scalar_type() == at::kFloat)
    gated_rows<kGelu>(x.data_ptr<float>(), y.data_ptr<float>(), rows, F);
  else
    gated_rows<kGelu>(x.data_ptr<BFloat16>(), y.data_ptr<BFloat16>(), rows, F);
  return y;
}

}  // namespace

Tensor silu_mul(const Tensor& x) { return gated<false>("silu_mul", x); }
Tensor gelu_tanh_mul(const Tensor& x) { return gated<true>("gelu_tanh_mul", x); }

// ---------------------------------------------------------------------------------------------------
// Decode attention: one query per (row b, head h) over key positions [first, end) of cache slot
// slots[b]. Per (b, h), three passes in key order: scores s_j = (q . k_j) * scale (16-lane FMA chain over
// Dh, fixed-tree lane sum), p_j = e^(s_j - max), sum of p_j (16-lane accumulator, fixed-tree lane sum),
// then out = (sum_j p_j v_j) / sum, accumulated over j in order. Everything depends only on this row's
// span; an empty span gives zeros.
//
// The query heads that share a kv head (GQA) are processed together, up to 4 at a time, so each key and
// value row is loaded and widened once for all of them; each head still runs exactly the sequence of
// operations above, so its result does not depend on which heads it was grouped with. The unit of
// parallel work is (row, kv head, group of <= 4 heads).

namespace {

constexpr int kMaxGroup = 4;

template <typename TC, int NG>
void attend_group(const float* qf, float* of, const TC* kb, const TC* vb, int64_t kstride, int64_t vstride, int64_t L,
                  int64_t Dh, float scale, std::vector<float>& scores) {
  const int64_t nchunks = Dh / 16;
  scores.resize(static_cast<size_t>(NG * L));
  float mx[NG];
  for (int g = 0; g < NG; ++g) mx[g] = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < L; ++j) {
    const TC* k = kb + j * kstride;
    __m512 acc[NG];
    const __m512 k0 = load16(k);
    for (int g = 0; g < NG; ++g) acc[g] = _mm512_mul_ps(_mm512_loadu_ps(qf + g * Dh), k0);
    for (int64_t c = 1; c < nchunks; ++c) {
      const __m512 kc = load16(k + c * 16);
      for (int g = 0; g < NG; ++g) acc[g] = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * Dh + c * 16), kc, acc[g]);
    }
    for (int g = 0; g < NG; ++g) {
      const float sj = hsum(acc[g]) * scale;
      scores[g * L + j] = sj;
      mx[g] = sj > mx[g] ? sj : mx[g];
    }
  }
  __m512 denom[NG];
  for (int g = 0; g < NG; ++g) {
    float* sg = scores.data() + g * L;
    const __m512 vmax = _mm512_set1_ps(mx[g]);
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < L; j += 16) {
      const __mmask16 m = tail_mask(L - j);
      __m512 p = _mm512_maskz_mov_ps(m, vexp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + j), vmax)));
      _mm512_mask_storeu_ps(sg + j, m, p);
      vsum = _mm512_add_ps(vsum, p);
    }
    denom[g] = _mm512_set1_ps(hsum(vsum));
  }
  // Output in groups of up to 4 chunks (64 dims): NG x 4 accumulators in registers.
  for (int64_t c0 = 0; c0 < nchunks; c0 += 4) {
    const int64_t nc = std::min<int64_t>(4, nchunks - c0);
    __m512 a[NG][4];
    for (int g = 0; g < NG; ++g)
      for (int c = 0; c < 4; ++c) a[g][c] = _mm512_setzero_ps();
    const TC* v = vb + c0 * 16;
    for (int64_t j = 0; j < L; ++j, v += vstride) {
      __m512 vc[4];
      for (int c = 0; c < 4; ++c) vc[c] = c < nc ? load16(v + c * 16) : _mm512_setzero_ps();
      for (int g = 0; g < NG; ++g) {
        const __m512 p = _mm512_set1_ps(scores[g * L + j]);
        for (int c = 0; c < 4; ++c)
          if (c < nc) a[g][c] = _mm512_fmadd_ps(p, vc[c], a[g][c]);
      }
    }
    for (int g = 0; g < NG; ++g)
      for (int c = 0; c < nc; ++c) _mm512_storeu_ps(of + g * Dh + (c0 + c) * 16, _mm512_div_ps(a[g][c], denom[g]));
  }
}

}  // namespace

template <typename TQ, typename TC>
void attention_rows(const TQ* q, TQ* out, const TC* kc, const TC* vc, const int64_t* ks, const int64_t* vs,
                    const int64_t* slots, const int64_t* ends, int64_t B, int64_t H, int64_t Hkv, int64_t Dh,
                    int64_t window, float scale, int64_t total_keys) {
  const int64_t group = H / Hkv;
  const int64_t ngroups = (group + kMaxGroup - 1) / kMaxGroup;
  const int64_t units = B * Hkv * ngroups;
  const int64_t unit_work =
      std::max<int64_t>(1, total_keys / std::max<int64_t>(1, B)) * Dh * 2 * std::min<int64_t>(group, kMaxGroup);
  parallel_for(0, units, grain_for(unit_work, 4 * kMinParallelElems), [&](int64_t lo, int64_t hi) {
    std::vector<float> qf(kMaxGroup * Dh), of(kMaxGroup * Dh), scores;
    for (int64_t u = lo; u < hi; ++u) {
      const int64_t b = u / (Hkv * ngroups), kvh = (u / ngroups) % Hkv, gi = u % ngroups;
      const int64_t h0 = kvh * group + gi * kMaxGroup;
      const int64_t ng = std::min<int64_t>(kMaxGroup, group - gi * kMaxGroup);
      const int64_t end = ends[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, end - window) : 0;
      const int64_t L = end - first;
      TQ* o = out + (b * H + h0) * Dh;
      if (L <= 0) {
        for (int64_t i = 0; i < ng * Dh; i += 16) store16(o + i, _mm512_setzero_ps());
        continue;
      }
      const TQ* qg = q + (b * H + h0) * Dh;
      for (int64_t i = 0; i < ng * Dh; i += 16) _mm512_storeu_ps(qf.data() + i, load16(qg + i));
      const TC* kb = kc + slots[b] * ks[0] + kvh * ks[1] + first * ks[2];
      const TC* vb = vc + slots[b] * vs[0] + kvh * vs[1] + first * vs[2];
      switch (ng) {
        case 1: attend_group<TC, 1>(qf.data(), of.data(), kb, vb, ks[2], vs[2], L, Dh, scale, scores); break;
        case 2: attend_group<TC, 2>(qf.data(), of.data(), kb, vb, ks[2], vs[2], L, Dh, scale, scores); break;
        case 3: attend_group<TC, 3>(qf.data(), of.data(), kb, vb, ks[2], vs[2], L, Dh, scale, scores); break;
        default: attend_group<TC, 4>(qf.data(), of.data(), kb, vb, ks[2], vs[2], L, Dh, scale, scores); break;
      }
      for (int64_t i = 0; i < ng * Dh; i += 16) store16(o + i, _mm512_loadu_ps(of.data() + i));
    }
  });
}

Tensor decode_attention(const Tensor& q_in, const Tensor& k_cache, const Tensor& v_cache, const Tensor& slots_in,
                        const Tensor& ends_in, int64_t window, double scale) {
  const char* op = "decode_attention";
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"q", &q_in},
                         {"k_cache", &k_cache},
                         {"v_cache", &v_cache},
                         {"slots", &slots_in},
                         {"ends", &ends_in}})
    check_cpu(op, name, *t);
  check_float_dtype(op, "q", q_in);
  check_float_dtype(op, "k_cache", k_cache);
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), op, ": v_cache dtype ", v_cache.scalar_type(),
              " must equal k_cache's ", k_cache.scalar_type());
  TORCH_CHECK(q_in.dim() == 3, op, ": q must be (B, H, Dh), got shape ", q_in.sizes());
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must be (slots, kv_heads, ctx, Dh), got shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache shape ", v_cache.sizes(), " must equal k_cache's ",
              k_cache.sizes());
  const int64_t B = q_in.size(0), H = q_in.size(1), Dh = q_in.size(2);
  const int64_t S = k_cache.size(0), Hkv = k_cache.size(1), C = k_cache.size(2);
  TORCH_CHECK(k_cache.size(3) == Dh, op, ": cache head dim ", k_cache.size(3), " must equal q's ", Dh);
  TORCH_CHECK(Dh > 0 && Dh % 16 == 0, op, ": head dim must be a positive multiple of 16, got ", Dh);
  TORCH_CHECK(Hkv > 0 && H % Hkv == 0, op, ": query heads ", H, " must be a multiple of kv heads ", Hkv);
  TORCH_CHECK(k_cache.stride(3) == 1 && v_cache.stride(3) == 1, op, ": caches must be contiguous along the head dim");
  TORCH_CHECK(window >= 0, op, ": window must be >= 0 (0 = no window), got ", window);
  TORCH_CHECK(slots_in.scalar_type() == at::kLong && ends_in.scalar_type() == at::kLong, op,
              ": slots and ends must be int64, got ", slots_in.scalar_type(), " and ", ends_in.scalar_type());
  TORCH_CHECK(slots_in.dim() == 1 && slots_in.size(0) == B && ends_in.dim() == 1 && ends_in.size(0) == B, op,
              ": slots and ends must have shape (", B, ",), got ", slots_in.sizes(), " and ", ends_in.sizes());
  Tensor slots = slots_in.contiguous(), ends = ends_in.contiguous();
  const int64_t* sp = slots.data_ptr<int64_t>();
  const int64_t* ep = ends.data_ptr<int64_t>();
  int64_t total_keys = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(sp[b] >= 0 && sp[b] < S, op, ": slots[", b, "] = ", sp[b], " is out of range [0, ", S, ")");
    TORCH_CHECK(ep[b] >= 0 && ep[b] <= C, op, ": ends[", b, "] = ", ep[b], " is out of range [0, ", C, "]");
    total_keys += window > 0 ? std::min(ep[b], window) : ep[b];
  }
  Tensor q = q_in.contiguous();
  Tensor out = at::empty(q.sizes(), q.options());
  const int64_t ks[3] = {k_cache.stride(0), k_cache.stride(1), k_cache.stride(2)};
  const int64_t vs[3] = {v_cache.stride(0), v_cache.stride(1), v_cache.stride(2)};
  const float sc = static_cast<float>(scale);
  const bool q32 = q.scalar_type() == at::kFloat, c32 = k_cache.scalar_type() == at::kFloat;
#define METRONOME_ATTN(TQ, TC)                                                                                         \
  attention_rows<TQ, TC>(q.data_ptr<TQ>(), out.data_ptr<TQ>(), k_cache.data_ptr<TC>(), v_cache.data_ptr<TC>(), ks, vs, \
                         sp, ep, B, H, Hkv, Dh, window, sc, total_keys)
  if (q32 && c32)
    METRONOME_ATTN(float, float);
  else if (q32)
    METRONOME_ATTN(float, BFloat16);
  else if (c32)
    METRONOME_ATTN(BFloat16, float);
  else
    METRONOME_ATTN(BFloat16, BFloat16);
#undef METRONOME_ATTN
  return out;
}

// Explicit instantiations: the fused decoder (decoder.cpp) links against these.
template void rms_norm_rows<float>(const float*, const float*, float*, int64_t, int64_t, float);
template void rms_norm_rows<BFloat16>(const BFloat16*, const float*, BFloat16*, int64_t, int64_t, float);
template void gated_rows<false, float>(const float*, float*, int64_t, int64_t);
template void gated_rows<true, float>(const float*, float*, int64_t, int64_t);
template void gated_rows<false, BFloat16>(const BFloat16*, BFloat16*, int64_t, int64_t);
template void gated_rows<true, BFloat16>(const BFloat16*, BFloat16*, int64_t, int64_t);
#define METRONOME_ATTN_INSTANCE(TQ, TC)                                                                             \
  template void attention_rows<TQ, TC>(const TQ*, TQ*, const TC*, const TC*, const int64_t*, const int64_t*,        \
                                       const int64_t*, const int64_t*, int64_t, int64_t, int64_t, int64_t, int64_t, \
                                       float, int64_t);
METRONOME_ATTN_INSTANCE(float, float)
METRONOME_ATTN_INSTANCE(float, BFloat16)
METRONOME_ATTN_INSTANCE(BFloat16, float)
METRONOME_ATTN_INSTANCE(BFloat16, BFloat16)
#undef METRONOME_ATTN_INSTANCE

}  // namespace metronome
