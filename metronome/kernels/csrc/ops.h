// The row kernels: RMSNorm, rotate-half RoPE, gated activations, decode attention. Each comes as a
// tensor-level op (bound to Python; checks its arguments) and as a raw row loop over pointers (used by the
// fused decoder, decoder.cpp). Every one is row-independent (the determinism contract, simd.h).

#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <tuple>

#include "simd.h"

namespace metronome {

using at::Tensor;

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

inline float rstd_of(float sum_sq, int64_t D, float eps) {
  return 1.0f / std::sqrt(sum_sq / static_cast<float>(D) + eps);
}

// rows x (rows, D) -> y; y may be x. Instantiated for float and BFloat16.
template <typename T>
void rms_norm_rows(const T* x, const float* w, T* y, int64_t rows, int64_t D, float eps);

// ---------------------------------------------------------------------------------------------------
// Rotate-half RoPE: out = x*cos + rotate_half(x)*sin, rotate_half(x) = [-x2, x1] (two products, one sum,
// each rounded: the reference's order). cos/sin rows (Dh,) are shared by the H heads of a (b, t).

// One head's row; y may be x (each step reads its two inputs before writing them).
template <typename T>
inline void rope_row(const T* xr, const float* c, const float* s, T* yr, int64_t Dh) {
  const int64_t half = Dh / 2;
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(static_cast<int>(0x80000000u)));
  for (int64_t i = 0; i < half; i += 16) {
    const __mmask16 m = tail_mask(half - i);
    __m512 x1 = load16(xr + i, m), x2 = load16(xr + half + i, m);
    __m512 lo_out =
        _mm512_add_ps(_mm512_mul_ps(x1, load16(c + i, m)), _mm512_mul_ps(_mm512_xor_ps(x2, sign), load16(s + i, m)));
    __m512 hi_out =
        _mm512_add_ps(_mm512_mul_ps(x2, load16(c + half + i, m)), _mm512_mul_ps(x1, load16(s + half + i, m)));
    store16(yr + i, lo_out, m);
    store16(yr + half + i, hi_out, m);
  }
}

// ---------------------------------------------------------------------------------------------------
// Gated activations (ops.cpp): rows of [gate, up] (2F) -> act(gate) * up (F); kGelu picks gelu_tanh over
// silu. Instantiated for float and BFloat16.
template <bool kGelu, typename T>
void gated_rows(const T* x, T* y, int64_t rows, int64_t F);

// ---------------------------------------------------------------------------------------------------
// Decode attention (ops.cpp): q (B, H, Dh) -> out (B, H, Dh) over the caches' spans. ks/vs are the
// caches' strides over (slot, kv head, position); the head dim is contiguous. Instantiated for
// TQ in {float, BFloat16}, TC in {float, BFloat16, int8_t} (int8: rows of Dh bytes and their scales, simd.h).
template <typename TQ, typename TC>
void attention_rows(const TQ* q, TQ* out, const TC* kc, const TC* vc, const int64_t* ks, const int64_t* vs,
                    const int64_t* slots, const int64_t* ends, int64_t B, int64_t H, int64_t Hkv, int64_t Dh,
                    int64_t window, float scale, int64_t total_keys);

// ---------------------------------------------------------------------------------------------------
// The tensor-level ops (bound to Python in bindings.cpp; see metronome/kernels/ops.py for their meaning).

Tensor rms_norm(const Tensor& x, const Tensor& weight, double eps);
std::tuple<Tensor, Tensor> add_rms_norm(const Tensor& x, const Tensor& residual, const Tensor& weight, double eps);
Tensor rope(const Tensor& x, const Tensor& cos, const Tensor& sin);
Tensor silu_mul(const Tensor& gate_up);
Tensor gelu_tanh_mul(const Tensor& gate_up);
Tensor decode_attention(const Tensor& q, const Tensor& k_cache, const Tensor& v_cache, const Tensor& slots,
                        const Tensor& ends, int64_t window, double scale);

}  // namespace metronome
