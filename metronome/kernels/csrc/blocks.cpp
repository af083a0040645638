// Block matmuls (see blocks.h): GGUF Q8_0 rows against float32 x, packed Q4 groups against int8 x.

#include "blocks.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "checks.h"
#include "pool.h"
#include "simd.h"

namespace metronome {

namespace {

// ---------------------------------------------------------------------------------------------------
// Q8_0 linear: y[m, n] = sum_k w[n, k] * x[m, k] with w = d * q (GGUF Q8_0: per 32 weights an fp16 d then
// 32 int8 q). q * d is exact in float32 (8-bit times 11-bit significands), so each block widens to the
// exact dequantized weights; the dot product is then an ordinary float32 one: per (m, n) one 16-lane
// accumulator, FMA over blocks in order (low 16 then high 16 weights), fixed-tree lane sum. Every
// (m, n) follows that order whatever the tile it sits in, so the result is independent of M and of the
// split over threads. Output columns are the unit of parallel work.

inline void q8_block(const uint8_t* p, __m512& w0, __m512& w1) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  const __m512 d = _mm512_set1_ps(fp16_to_f32(h));
  w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2)))),
                     d);
  w1 = _mm512_mul_ps(
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 18)))), d);
}

// NT output columns x MT rows of x, starting at column n0 and row m0.
// A tile reads NT short rows (K/32*34 bytes each) side by side: too short for the hardware prefetcher
// to follow, so each block step prefetches its share of the bytes kQ8PrefetchRows rows further on
// (the matrix is read front to back, tile after tile).
constexpr int64_t kQ8PrefetchRows = 8;

template <int NT, int MT>
void q8_tile(const uint8_t* wq, int64_t row_bytes, const float* xf, int64_t K, float* y, int64_t N, int64_t n0,
             int64_t m0) {
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

// ---------------------------------------------------------------------------------------------------
// Q4 linear on packed weights. GGUF Q4_0 / Q4_1 blocks (32 weights, w = d*q + m with q in [0, 16);
// Q4_0's m = -8d) are repacked once, at compile time (quant.py, pack_q4), four output rows side by side:
// per group of 4 rows and per block, 80 bytes = 8 fp16 (d0..d3, m0..m3) then each row's 16 code bytes
// (byte j: weight j in the low nibble, weight j+16 in the high one). A thread's rows are then one
// sequential stream.
//
// x is quantized per block of 32 to int8 (dx = max|x| / 127, x8 = round(x / dx)), as llama.cpp does,
// and sx = dx * sum_j x8_j, the sum of the quantized x (the exact float sum would pair a quantized q-term
// with an exact m-term: the errors then no longer cancel and grow ~4x). For row n and block b:
//   sum_j w_j x_j ~= sum_j (d q_j + m) dx x8_j = d * dx * sum_j q_j x8_j + m * sx
// One 512-bit VNNI multiply-add covers 4 rows x 16 weights: lane 4r+i holds row r's products for
// weights 4i..4i+3 (low nibbles against x8[0..16), then high nibbles against x8[16..32)). Per block
// the 16 int32 lanes are scaled (d_r * dx) into a float accumulator, m_r * sx lands in lane 4r; at the
// end row r = (l0 + l1) + (l2 + l3) of its four lanes. The order depends only on (row, block): the same
// whatever M, the tile or the thread split.

// x (M, K) -> x8 (M, K) int8, dx and sx (M, K/32).
void quantize_blocks(const float* x, int64_t M, int64_t K, int8_t* x8, float* dx, float* sx) {
  const int64_t nb = K / kQ4Block;
  const __m512 sign = _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF));
  for (int64_t i = 0; i < M * nb; ++i) {
    const __m512 v0 = _mm512_loadu_ps(x + i * 32), v1 = _mm512_loadu_ps(x + i * 32 + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_and_ps(v0, sign), _mm512_and_ps(v1, sign)));
    const float id = amax > 0.0f ? 127.0f / amax : 0.0f;
    const __m512 s = _mm512_set1_ps(id);
    const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, s)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, s));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(x8 + i * 32), _mm512_cvtsepi32_epi8(q0));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(x8 + i * 32 + 16), _mm512_cvtsepi32_epi8(q1));
    dx[i] = amax / 127.0f;
    sx[i] = dx[i] * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1)));  // exact integer sum
  }
}

// 4 output rows (one packed group, starting at row n0) x MT rows of x (from m0).
template <int MT>
void q4x4_tile(const uint8_t* w, int64_t nb, const int8_t* x8, const float* dx, const float* sx, int64_t K, float* y,
               int64_t N, int64_t n0, int64_t m0) {
  const __m512i idx_d = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
  const __m512i idx_m = _mm512_setr_epi32(4, 4, 4, 4, 5, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 7);
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 acc[MT];
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const uint8_t* p = w + b * kQ4x4Bytes;
    const __m512 dm = _mm512_castps256_ps512(_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    const __m512 dv = _mm512_permutexvar_ps(idx_d, dm);
    const __m512 mv = _mm512_maskz_permutexvar_ps(0x1111, idx_m, dm);  // m_r in lane 4r only
    const __m512i q = _mm512_loadu_si512(p + 16);
    const __m512i lo = _mm512_and_si512(q, low4), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), low4);
    for (int m = 0; m < MT; ++m) {
      const int64_t row = (m0 + m);
      const int8_t* xb = x8 + row * K + b * kQ4Block;
      const __m512i xl = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb)));
      const __m512i xh = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(xb + 16)));
      const __m512i s = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(_mm512_setzero_si512(), lo, xl), hi, xh);
      acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dv, _mm512_set1_ps(dx[row * nb + b])), acc[m]);
      acc[m] = _mm512_fmadd_ps(mv, _mm512_set1_ps(sx[row * nb + b]), acc[m]);
    }
  }
  for (int m = 0; m < MT; ++m) {
    alignas(64) float l[16];
    _mm512_store_ps(l, acc[m]);
    for (int r = 0; r < 4 && n0 + r < N; ++r)
      y[(m0 + m) * N + n0 + r] = (l[4 * r] + l[4 * r + 1]) + (l[4 * r + 2] + l[4 * r + 3]);
  }
}

void q4x4_rows(int64_t mt, const uint8_t* w, int64_t nb, const int8_t* x8, const float* dx, const float* sx, int64_t K,
               float* y, int64_t N, int64_t n0, int64_t m0) {
  switch (mt) {
    case 1: q4x4_tile<1>(w, nb, x8, dx, sx, K, y, N, n0, m0); break;
    case 2: q4x4_tile<2>(w, nb, x8, dx, sx, K, y, N, n0, m0); break;
    case 3: q4x4_tile<3>(w, nb, x8, dx, sx, K, y, N, n0, m0); break;
    case 4: q4x4_tile<4>(w, nb, x8, dx, sx, K, y, N, n0, m0); break;
    case 5: q4x4_tile<5>(w, nb, x8, dx, sx, K, y, N, n0, m0); break;
    case 6: q4x4_tile<6>(w, nb, x8, dx, sx, K, y, N, n0, m0); break;
    case 7: q4x4_tile<7>(w, nb, x8, dx, sx, K, y, N, n0, m0); break;
    default: q4x4_tile<8>(w, nb, x8, dx, sx, K, y, N, n0, m0); break;
  }
}

}  // namespace

// y (M, N) = x (M, K) @ W.T (+ bias), float32. Output columns in fixed chunks of 16 (4 groups of 4) are
// the unit of parallel work; a thread walks its columns once per block of 64 rows of x, so its share
// of W and that block of x stay in L2.
void block_linear_rows(const BlockMatrix& W, const float* x, int64_t M, float* y, uint8_t* scratch) {
  const int64_t nb = W.K / kQ4Block;
  int8_t* x8 = reinterpret_cast<int8_t*>(scratch);
  float* dx = reinterpret_cast<float*>(scratch + ((M * W.K + 63) / 64) * 64);
  float* sx = dx + M * nb;
  if (W.kind == kQ4x4) quantize_blocks(x, M, W.K, x8, dx, sx);
  constexpr int64_t kChunk = 16, kRowBlock = 64;
  const int64_t nchunks = (W.N + kChunk - 1) / kChunk;
  parallel_for(0, nchunks, grain_for(kChunk * W.K * std::max<int64_t>(M, 1), 1 << 16), [&](int64_t lo, int64_t hi) {
    const int64_t n_lo = lo * kChunk, n_hi = std::min(W.N, hi * kChunk);
    for (int64_t mb = 0; mb < M; mb += kRowBlock) {
      const int64_t mb_hi = std::min(M, mb + kRowBlock);
      if (W.kind == kQ8_0) {
        const int64_t row_bytes = nb * kQ8Bytes;
        for (int64_t m0 = mb; m0 < mb_hi; m0 += 8)
          q8_columns_any(std::min<int64_t>(8, mb_hi - m0), W.w, row_bytes, x, W.K, y, W.N, n_lo, n_hi, m0);
      } else {
        for (int64_t n0 = n_lo; n0 < n_hi; n0 += 4)
          for (int64_t m0 = mb; m0 < mb_hi; m0 += 8)
            q4x4_rows(std::min<int64_t>(8, mb_hi - m0), W.w + (n0 / 4) * nb * kQ4x4Bytes, nb, x8, dx, sx, W.K, y, W.N,
                      n0, m0);
      }
    }
    if (W.bias != nullptr)
      for (int64_t m = 0; m < M; ++m)
        for (int64_t n = n_lo; n < n_hi; ++n) y[m * W.N + n] += W.bias[n];
  });
}

// w: Q8_0 rows (N, K/32*34), or packed Q4 groups (ceil(N/4), K/32*80) with `rows` = N.
BlockMatrix check_blocks(const char* op, const Tensor& w, int64_t kind, int64_t rows, int64_t K, const Tensor* bias) {
  check_cpu(op, "w", w);
  TORCH_CHECK(kind == kQ8_0 || kind == kQ4x4, op, ": kind must be 0 (Q8_0 rows) or 1 (packed Q4), got ", kind);
  TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), op,
              ": w must be a contiguous 2-D uint8 tensor of blocks, got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(K > 0 && K % kQ4Block == 0, op, ": K = ", K, " must be a positive multiple of 32 (the block size)");
  const int64_t N = kind == kQ8_0 ? w.size(0) : rows;
  const int64_t want_rows = kind == kQ8_0 ? N : (N + 3) / 4;
  const int64_t want_bytes = K / kQ4Block * (kind == kQ8_0 ? kQ8Bytes : kQ4x4Bytes);
  TORCH_CHECK(w.size(0) == want_rows && w.size(1) == want_bytes, op, ": w must have ", want_bytes,
              " bytes per row for K = ", K, " (", want_rows, " rows for N = ", N, "), got ", w.sizes());
  const float* b = nullptr;
  if (bias != nullptr && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == N && bias->is_contiguous(),
                op, ": bias must be a contiguous float32 (", N, ",) tensor, got ", bias->scalar_type(), " ",
                bias->sizes());
    b = bias->data_ptr<float>();
  }
  return BlockMatrix{w.data_ptr<uint8_t>(), kind, N, K, b};
}

Tensor block_linear(const Tensor& x_in, const Tensor& w, int64_t kind, int64_t rows,
                    const std::optional<Tensor>& bias) {
  const char* op = "block_linear";
  check_cpu(op, "x", x_in);
  check_float_dtype(op, "x", x_in);
  TORCH_CHECK(x_in.dim() == 2, op, ": x must be (M, K), got shape ", x_in.sizes());
  const int64_t M = x_in.size(0), K = x_in.size(1);
  const BlockMatrix W = check_blocks(op, w, kind, rows, K, bias.has_value() ? &*bias : nullptr);
  Tensor x = weight_f32(x_in);
  Tensor y = at::empty({M, W.N}, x.options());
  std::vector<uint8_t> scratch(static_cast<size_t>(scratch_bytes(M, K) + 64));
  block_linear_rows(W, x.data_ptr<float>(), M, y.data_ptr<float>(), scratch.data());
  return y;
}

}  // namespace metronome
