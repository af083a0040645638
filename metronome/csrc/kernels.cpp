// metronome's fused CPU kernels for the decode step (AVX-512, x86-64).
//
// Determinism contract: every output row is produced by one fixed code path with a fixed reduction
// order that depends only on that row's own shape (its length D, K, or attention span), never on the
// batch size, on other rows, or on how work is split between threads. Rows (or (row, head) pairs, or
// output columns) are the unit of parallel work: each is computed entirely by one thread.
//
// Numerics: all math in float32, inputs widened exactly (bf16 -> f32, int8 * fp16 scale -> f32), results
// rounded once to the output dtype with round-to-nearest-even (torch's rule). Built without -ffast-math
// and with -ffp-contract=off, so the only fused multiply-adds are the explicit ones below (in
// reductions); elementwise formulas are evaluated in the same order as the pure-torch reference
// (metronome/kernels.py, TorchOps).
//
// Python binding: a plain pybind11 module (functions take and return torch.Tensor).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/utils/pybind.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#if !defined(__AVX512F__) || !defined(__AVX512BW__) || !defined(__AVX512VL__) || !defined(__F16C__)
#error "metronome kernels need an x86-64 CPU with AVX-512 F/BW/VL and F16C (built with -march=native)"
#endif

namespace {

using at::BFloat16;
using at::Tensor;

// ---------------------------------------------------------------------------------------------------
// Loads and stores of 16 lanes, widened to / rounded from float32.

inline __mmask16 tail_mask(int64_t n) {  // lanes [0, n), n in [0, 16]
  return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1u);
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const BFloat16* p) {
  __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline __m512 load16(const BFloat16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// float32 -> bfloat16 bits, round to nearest even; NaN -> 0x7FC0 (as c10::BFloat16 does).
inline __m256i to_bf16(__m512 v) {
  __m512i u = _mm512_castps_si512(v);
  __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  __mmask16 ordered = _mm512_cmp_ps_mask(v, v, _CMP_ORD_Q);
  r = _mm512_mask_blend_epi32(ordered, _mm512_set1_epi32(0x7FC0), r);
  return _mm512_cvtepi32_epi16(r);
}
// The float32 value a bf16 store of v would hold (round, then widen back).
inline __m512 round_like(__m512 v, const BFloat16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(v)), 16));
}
inline __m512 round_like(__m512 v, const float*) { return v; }

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(BFloat16* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(BFloat16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, to_bf16(v)); }

// Horizontal sum of 16 lanes in a fixed tree order (8+8, 4+4, 2+2, 1+1).
inline float hsum(__m512 v) {
  __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  b = _mm_add_ss(b, _mm_movehdup_ps(b));
  return _mm_cvtss_f32(b);
}

// e^x for 16 lanes: x = n*ln2 + r with |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (truncation
// error < 6e-9 relative), scaled by 2^n. About 1 ulp. Overflows to +inf, underflows to 0, keeps NaN.
inline __m512 vexp(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);  // operand order keeps a NaN x (min/max return the 2nd)
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 high part (exact n*hi)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);  // ln2 low part
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// ---------------------------------------------------------------------------------------------------
// Argument checks (messages name the op and the offending argument).

void check_float_dtype(const char* op, const char* arg, const Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, op, ": ", arg,
              " must be float32 or bfloat16, got ", t.scalar_type());
}
void check_cpu(const char* op, const char* arg, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", arg, " must be a CPU tensor, got ", t.device());
}

// Rows of work per parallel task so that a task holds at least ~`min_elems` elements: small calls stay
// on the calling thread (thread hand-off costs more than they do). Grain never changes results.
int64_t grain_for(int64_t elems_per_unit, int64_t min_elems) {
  return std::max<int64_t>(1, min_elems / std::max<int64_t>(1, elems_per_unit));
}

constexpr int64_t kMinParallelElems = 1 << 15;

Tensor weight_f32(const Tensor& w) { return w.scalar_type() == at::kFloat ? w.contiguous() : w.to(at::kFloat).contiguous(); }

// ---------------------------------------------------------------------------------------------------
// RMSNorm: y = (x * (1 / sqrt(mean(x^2) + eps))) * w.
// Sum of squares: four 16-lane accumulators over 64-element steps, then 16-element steps into the
// first, the masked tail into the second, combined (a0 + a1) + (a2 + a3) and summed in a fixed tree.

template <typename T>
float sum_squares(const T* x, int64_t D) {
  __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
  int64_t i = 0;
  for (; i + 64 <= D; i += 64) {
    __m512 v0 = load16(x + i), v1 = load16(x + i + 16), v2 = load16(x + i + 32), v3 = load16(x + i + 48);
    a0 = _mm512_fmadd_ps(v0, v0, a0);
    a1 = _mm512_fmadd_ps(v1, v1, a1);
    a2 = _mm512_fmadd_ps(v2, v2, a2);
    a3 = _mm512_fmadd_ps(v3, v3, a3);
  }
  for (; i + 16 <= D; i += 16) {
    __m512 v = load16(x + i);
    a0 = _mm512_fmadd_ps(v, v, a0);
  }
  if (i < D) {
    __m512 v = load16(x + i, tail_mask(D - i));
    a1 = _mm512_fmadd_ps(v, v, a1);
  }
  return hsum(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
}

template <typename T>
void scale_row(const T* x, const float* w, float rstd, T* y, int64_t D) {
  const __m512 r = _mm512_set1_ps(rstd);
  int64_t i = 0;
  for (; i + 16 <= D; i += 16) store16(y + i, _mm512_mul_ps(_mm512_mul_ps(load16(x + i), r), load16(w + i)));
  if (i < D) {
    __mmask16 m = tail_mask(D - i);
    store16(y + i, _mm512_mul_ps(_mm512_mul_ps(load16(x + i, m), r), load16(w + i, m)), m);
  }
}

inline float rstd_of(float sum_sq, int64_t D, float eps) { return 1.0f / std::sqrt(sum_sq / static_cast<float>(D) + eps); }

template <typename T>
void rms_norm_rows(const T* x, const float* w, T* y, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, grain_for(D, kMinParallelElems), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) scale_row(x + r * D, w, rstd_of(sum_squares(x + r * D, D), D, eps), y + r * D, D);
  });
}

// new_residual = x + residual (rounded to T); y = rms_norm(new_residual).
template <typename T>
void add_rms_norm_rows(const T* x, const T* res, const float* w, T* y, T* new_res, int64_t rows, int64_t D, float eps) {
  at::parallel_for(0, rows, grain_for(D, kMinParallelElems), [&](int64_t lo, int64_t hi) {
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

Tensor rms_norm(const Tensor& x_in, const Tensor& weight, double eps) {
  check_cpu("rms_norm", "x", x_in);
  check_cpu("rms_norm", "weight", weight);
  check_float_dtype("rms_norm", "x", x_in);
  check_float_dtype("rms_norm", "weight", weight);
  TORCH_CHECK(x_in.dim() >= 1, "rms_norm: x must have at least one dimension");
  const int64_t D = x_in.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D, "rms_norm: weight must have shape (", D, ",), got ", weight.sizes());
  Tensor x = x_in.contiguous();
  Tensor w = weight_f32(weight);
  Tensor y = at::empty(x.sizes(), x.options());
  const int64_t rows = D == 0 ? 0 : x.numel() / D;
  if (x.scalar_type() == at::kFloat)
    rms_norm_rows(x.data_ptr<float>(), w.data_ptr<float>(), y.data_ptr<float>(), rows, D, static_cast<float>(eps));
  else
    rms_norm_rows(x.data_ptr<BFloat16>(), w.data_ptr<float>(), y.data_ptr<BFloat16>(), rows, D, static_cast<float>(eps));
  return y;
}

std::tuple<Tensor, Tensor> add_rms_norm(const Tensor& x_in, const Tensor& res_in, const Tensor& weight, double eps) {
  check_cpu("add_rms_norm", "x", x_in);
  check_cpu("add_rms_norm", "residual", res_in);
  check_cpu("add_rms_norm", "weight", weight);
  check_float_dtype("add_rms_norm", "x", x_in);
  check_float_dtype("add_rms_norm", "weight", weight);
  TORCH_CHECK(res_in.sizes() == x_in.sizes(), "add_rms_norm: residual shape ", res_in.sizes(), " must equal x's ", x_in.sizes());
  TORCH_CHECK(res_in.scalar_type() == x_in.scalar_type(), "add_rms_norm: residual dtype ", res_in.scalar_type(),
              " must equal x's ", x_in.scalar_type());
  TORCH_CHECK(x_in.dim() >= 1, "add_rms_norm: x must have at least one dimension");
  const int64_t D = x_in.size(-1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == D, "add_rms_norm: weight must have shape (", D, ",), got ", weight.sizes());
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
// Rotate-half RoPE: out = x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1] (two products, one sum,
// each rounded: the reference's order). cos/sin rows (Dh,) are shared by the H heads of a (b, t).

template <typename T>
void rope_rows(const T* x, const float* cs, const float* sn, T* y, int64_t BT, int64_t H, int64_t Dh) {
  const int64_t half = Dh / 2;
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
  at::parallel_for(0, BT * H, grain_for(Dh, kMinParallelElems), [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const int64_t bt = r / H;
      const T* xr = x + r * Dh;
      T* yr = y + r * Dh;
      const float* c = cs + bt * Dh;
      const float* s = sn + bt * Dh;
      for (int64_t i = 0; i < half; i += 16) {
        const __mmask16 m = tail_mask(half - i);
        __m512 x1 = load16(xr + i, m), x2 = load16(xr + half + i, m);
        __m512 lo_out = _mm512_add_ps(_mm512_mul_ps(x1, load16(c + i, m)), _mm512_mul_ps(_mm512_xor_ps(x2, sign), load16(s + i, m)));
        __m512 hi_out = _mm512_add_ps(_mm512_mul_ps(x2, load16(c + half + i, m)), _mm512_mul_ps(x1, load16(s + half + i, m)));
        store16(yr + i, lo_out, m);
        store16(yr + half + i, hi_out, m);
      }
    }
  });
}

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
  TORCH_CHECK(sin_in.sizes() == cos_in.sizes(), "rope: sin shape ", sin_in.sizes(), " must equal cos's ", cos_in.sizes());
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
  at::parallel_for(0, rows, grain_for(F, kMinParallelElems), [&](int64_t lo, int64_t hi) {
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

template <bool kGelu>
Tensor gated(const char* op, const Tensor& x_in) {
  check_cpu(op, "gate_up", x_in);
  check_float_dtype(op, "gate_up", x_in);
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) % 2 == 0, op, ": gate_up's last dimension must be even (gate then up), got shape ",
              x_in.sizes());
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

template <typename TQ, typename TC>
void attention_rows(const TQ* q, TQ* out, const TC* kc, const TC* vc, const int64_t* ks, const int64_t* vs,
                    const int64_t* slots, const int64_t* ends, int64_t B, int64_t H, int64_t Hkv, int64_t Dh,
                    int64_t window, float scale, int64_t total_keys) {
  const int64_t group = H / Hkv;
  const int64_t ngroups = (group + kMaxGroup - 1) / kMaxGroup;
  const int64_t units = B * Hkv * ngroups;
  const int64_t unit_work = std::max<int64_t>(1, total_keys / std::max<int64_t>(1, B)) * Dh * 2 * std::min<int64_t>(group, kMaxGroup);
  at::parallel_for(0, units, grain_for(unit_work, 4 * kMinParallelElems), [&](int64_t lo, int64_t hi) {
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
  for (auto [name, t] : {std::pair<const char*, const Tensor*>{"q", &q_in}, {"k_cache", &k_cache}, {"v_cache", &v_cache},
                         {"slots", &slots_in}, {"ends", &ends_in}})
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
#define METRONOME_ATTN(TQ, TC)                                                                                        \
  attention_rows<TQ, TC>(q.data_ptr<TQ>(), out.data_ptr<TQ>(), k_cache.data_ptr<TC>(), v_cache.data_ptr<TC>(), ks, vs, \
                         sp, ep, B, H, Hkv, Dh, window, sc, total_keys)
  if (q32 && c32) METRONOME_ATTN(float, float);
  else if (q32) METRONOME_ATTN(float, BFloat16);
  else if (c32) METRONOME_ATTN(BFloat16, float);
  else METRONOME_ATTN(BFloat16, BFloat16);
#undef METRONOME_ATTN
  return out;
}

// ---------------------------------------------------------------------------------------------------
// Q8_0 linear: y[m, n] = sum_k w[n, k] * x[m, k] with w = d * q (GGUF Q8_0: per 32 weights an fp16 d then
// 32 int8 q). q * d is exact in float32 (8-bit times 11-bit significands), so each block widens to the
// exact dequantized weights; the dot product is then an ordinary float32 one: per (m, n) one 16-lane
// accumulator, FMA over blocks in order (low 16 then high 16 weights), fixed-tree lane sum. Every
// (m, n) follows that order whatever the tile it sits in, so the result is independent of M and of the
// split over threads. Output columns are the unit of parallel work.

constexpr int64_t kQ8Block = 32;
constexpr int64_t kQ8Bytes = 34;

inline void q8_block(const uint8_t* p, __m512& w0, __m512& w1) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const __m512 d = _mm512_set1_ps(_cvtsh_ss(h));
  w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2)))), d);
  w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 18)))), d);
}

// NT output columns x MT rows of x, starting at column n0 and row m0.
// A tile reads NT short rows (K/32*34 bytes each) side by side: too short for the hardware prefetcher
// to follow, so each block step prefetches its share of the bytes kQ8PrefetchRows rows further on
// (the matrix is read front to back, tile after tile).
constexpr int64_t kQ8PrefetchRows = 8;

template <int NT, int MT>
void q8_tile(const uint8_t* wq, int64_t row_bytes, const float* xf, int64_t K, float* y, int64_t N, int64_t n0, int64_t m0) {
  __m512 acc[NT][MT];
  for (int n = 0; n < NT; ++n)
    for (int m = 0; m < MT; ++m) acc[n][m] = _mm512_setzero_ps();
  const int64_t nblocks = K / kQ8Block;
  const char* pf = reinterpret_cast<const char*>(wq + (n0 + kQ8PrefetchRows) * row_bytes);
  for (int64_t b = 0; b < nblocks; ++b) {
    const char* p = pf + b * NT * kQ8Bytes;  // NT*34 bytes per step cover the NT rows over the K/32 steps
    _mm_prefetch(p, _MM_HINT_T0);
    if constexpr (NT * kQ8Bytes > 64) _mm_prefetch(p + 64, _MM_HINT_T0);
    if constexpr (NT * kQ8Bytes > 128) _mm_prefetch(p + 128, _MM_HINT_T0);
    __m512 w[NT][2];
    for (int n = 0; n < NT; ++n) q8_block(wq + (n0 + n) * row_bytes + b * kQ8Bytes, w[n][0], w[n][1]);
    for (int m = 0; m < MT; ++m) {
      const float* xr = xf + (m0 + m) * K + b * kQ8Block;
      const __m512 x0 = _mm512_loadu_ps(xr), x1 = _mm512_loadu_ps(xr + 16);
      for (int n = 0; n < NT; ++n) {
        acc[n][m] = _mm512_fmadd_ps(w[n][0], x0, acc[n][m]);
        acc[n][m] = _mm512_fmadd_ps(w[n][1], x1, acc[n][m]);
      }
    }
  }
  for (int n = 0; n < NT; ++n)
    for (int m = 0; m < MT; ++m) y[(m0 + m) * N + n0 + n] = hsum(acc[n][m]);
}

template <int MT>
void q8_columns(const uint8_t* wq, int64_t row_bytes, const float* xf, int64_t K, float* y, int64_t N, int64_t n_lo,
                int64_t n_hi, int64_t m0) {
  constexpr int NT = MT <= 4 ? 4 : 2;  // NT * MT accumulators + 2 * NT weights fit the 32 registers
  int64_t n = n_lo;
  for (; n + NT <= n_hi; n += NT) q8_tile<NT, MT>(wq, row_bytes, xf, K, y, N, n, m0);
  for (; n < n_hi; ++n) q8_tile<1, MT>(wq, row_bytes, xf, K, y, N, n, m0);
}

void q8_columns_any(int64_t mt, const uint8_t* wq, int64_t row_bytes, const float* xf, int64_t K, float* y, int64_t N,
                    int64_t n_lo, int64_t n_hi, int64_t m0) {
  switch (mt) {
    case 1: q8_columns<1>(wq, row_bytes, xf, K, y, N, n_lo, n_hi, m0); break;
    case 2: q8_columns<2>(wq, row_bytes, xf, K, y, N, n_lo, n_hi, m0); break;
    case 3: q8_columns<3>(wq, row_bytes, xf, K, y, N, n_lo, n_hi, m0); break;
    case 4: q8_columns<4>(wq, row_bytes, xf, K, y, N, n_lo, n_hi, m0); break;
    case 5: q8_columns<5>(wq, row_bytes, xf, K, y, N, n_lo, n_hi, m0); break;
    case 6: q8_columns<6>(wq, row_bytes, xf, K, y, N, n_lo, n_hi, m0); break;
    case 7: q8_columns<7>(wq, row_bytes, xf, K, y, N, n_lo, n_hi, m0); break;
    default: q8_columns<8>(wq, row_bytes, xf, K, y, N, n_lo, n_hi, m0); break;
  }
}

Tensor q8_0_linear(const Tensor& x_in, const Tensor& blocks_in) {
  const char* op = "q8_0_linear";
  check_cpu(op, "x", x_in);
  check_cpu(op, "blocks", blocks_in);
  check_float_dtype(op, "x", x_in);
  TORCH_CHECK(blocks_in.scalar_type() == at::kByte, op, ": blocks must be uint8 (raw GGUF Q8_0 bytes), got ", blocks_in.scalar_type());
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be (M, K), got shape ", x_in.sizes());
  TORCH_CHECK(blocks_in.dim() == 2, op, ": blocks must be (N, K/32*34), got shape ", blocks_in.sizes());
  const int64_t M = x_in.size(0), K = x_in.size(1), N = blocks_in.size(0);
  TORCH_CHECK(K % kQ8Block == 0, op, ": K = ", K, " must be a multiple of 32 (the Q8_0 block)");
  const int64_t row_bytes = K / kQ8Block * kQ8Bytes;
  TORCH_CHECK(blocks_in.size(1) == row_bytes, op, ": blocks must have ", row_bytes, " bytes per row for K = ", K, ", got ",
              blocks_in.size(1));
  Tensor blocks = blocks_in.contiguous();
  Tensor xf = weight_f32(x_in);
  Tensor y = at::empty({M, N}, x_in.options().dtype(at::kFloat));
  const uint8_t* wq = blocks.data_ptr<uint8_t>();
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  // Fixed chunks of 64 columns (a multiple of every tile width) so tiles never straddle chunks.
  constexpr int64_t kChunk = 64;
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
  at::parallel_for(0, nchunks, grain_for(kChunk * K * std::max<int64_t>(M, 1), 1 << 17), [&](int64_t lo, int64_t hi) {
    const int64_t n_lo = lo * kChunk, n_hi = std::min(N, hi * kChunk);
    for (int64_t m0 = 0; m0 < M; m0 += 8) q8_columns_any(std::min<int64_t>(8, M - m0), wq, row_bytes, xp, K, yp, N, n_lo, n_hi, m0);
  });
  return y;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "metronome's fused, row-independent CPU kernels (AVX-512)";
  m.def("rms_norm", &rms_norm, "y = x * rsqrt(mean(x^2) + eps) * weight, f32 math", py::arg("x"), py::arg("weight"), py::arg("eps"));
  m.def("add_rms_norm", &add_rms_norm, "(rms_norm(x + residual), x + residual)", py::arg("x"), py::arg("residual"),
        py::arg("weight"), py::arg("eps"));
  m.def("rope", &rope, "rotate-half RoPE of (B, T, H, Dh) with cos/sin (B, T, Dh)", py::arg("x"), py::arg("cos"), py::arg("sin"));
  m.def("silu_mul", &silu_mul, "silu(gate) * up for gate_up = [gate, up] along the last dim", py::arg("gate_up"));
  m.def("gelu_tanh_mul", &gelu_tanh_mul, "gelu_tanh(gate) * up for gate_up = [gate, up]", py::arg("gate_up"));
  m.def("decode_attention", &decode_attention, "one-query attention per (row, head) over its own cache span",
        py::arg("q"), py::arg("k_cache"), py::arg("v_cache"), py::arg("slots"), py::arg("ends"), py::arg("window"),
        py::arg("scale"), py::call_guard<py::gil_scoped_release>());
  m.def("q8_0_linear", &q8_0_linear, "y = x @ dequant(blocks).T in f32 (GGUF Q8_0 weights)", py::arg("x"), py::arg("blocks"),
        py::call_guard<py::gil_scoped_release>());
}
