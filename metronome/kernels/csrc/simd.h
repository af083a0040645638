// metronome's fused CPU kernels for the decode step (AVX-512, x86-64; AVX2 through avx2.h): the SIMD
// helpers every kernel uses.
//
// Determinism contract: every output row is produced by one fixed code path with a fixed reduction
// order that depends only on that row's own shape (its length D, K, or attention span), never on the
// batch size, on other rows, or on how work is split between threads. Rows (or (row, head) pairs, or
// output columns) are the unit of parallel work: each is computed entirely by one thread.
//
// Numerics: all math in float32, inputs widened exactly (bf16 -> f32, int8 * fp16 scale -> f32), results
// rounded once to the output dtype with round-to-nearest-even (torch's rule). Built without -ffast-math
// and with -ffp-contract=off, so the only fused multiply-adds are the explicit ones (in reductions);
// elementwise formulas are evaluated in the same order as the pure-torch reference
// (metronome/kernels/ops.py, TorchOps).
//
// The sources, by concern:
//   simd.h                  loads/stores of 16 lanes (bf16 <-> f32), lane sums, e^x (this file)
//   avx2.h                  the AVX-512 intrinsics used here, on pairs of AVX2 registers
//   pool.h, pool.cpp        the kernels' own thread pool and parallel_for
//   checks.h                argument checks of the tensor-level ops
//   ops.h, ops.cpp          norms, RoPE, gated activations, decode attention
//   blocks.h, blocks.cpp    block matmuls: GGUF Q8_0 rows and packed Q4 groups (the block kinds)
//   decoder.h, decoder.cpp  the fused decoder: every layer of a plan in one call
//   sample.h, sample.cpp    the token drawn from each sampled row (temperature, top-p, min-p)
//   bindings.cpp            the Python module (pybind11; functions take and return torch.Tensor)

#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__F16C__)
#include <immintrin.h>
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#define METRONOME_AVX2 1  // the same sources on 256-bit registers, in pairs (avx2.h)
#include "avx2.h"
#else
#error "metronome kernels need an x86-64 CPU with AVX-512 F/BW/VL/VNNI, or AVX2 with FMA, and F16C (-march=native)"
#endif

namespace metronome {

using c10::BFloat16;

// How many 512-bit values a kernel can keep in registers: AVX-512 has 32 zmm registers; on AVX2 each
// __m512 is two of the 16 ymm registers, so 8 at most, and kernels that keep accumulators in registers
// block their loops smaller.
#ifdef METRONOME_AVX2
constexpr int kVectorRegisters = 8;
#else
constexpr int kVectorRegisters = 32;
#endif

// Whether the build is for an AMD CPU (kernels/build.py passes METRONOME_AMD from /proc/cpuinfo's vendor).
// How far ahead the kernels ask for the bytes of their streams (weights, a decode row's keys and values),
// and in what bursts, was measured to suit the two machines at hand in opposite ways: the 2-core Zen 4
// EPYC and the 2-core Intel Xeon VM (docs/performance.md, 2026-12-05). It is the cores' memory side that
// differs, not the instructions a build uses (a Zen 4 may show AVX-512), so the vendor chooses.
#ifndef METRONOME_AMD
#define METRONOME_AMD 0
#endif
constexpr bool kAmdCpu = METRONOME_AMD != 0;

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

// An int8 KV cache row (the cache's "int8" format): Dh signed bytes q_j, then a float32 scale d_c for each
// chunk c of 16 (Dh / 4 bytes, unaligned), chunk c standing for d_c * q_j. Symmetric: d_c = max|x| / 127
// over the chunk and q_j = round(x_j * (127 / max|x|)), to nearest even. A scale per 16 rather than per
// row: Qwen2.5's keys have a few large channels, and one scale a row cost its perplexity 2.9 % where this
// costs 0.9 % (docs/performance.md, "An int8 KV cache"). A row depends only on its own values, so it is the same
// bytes whatever else the step holds; the scales travel inside the row, so copying rows (the prefix cache's
// pages, a prefill worker's KV) copies them too.
inline int64_t int8_row_bytes(int64_t Dh) { return Dh + Dh / 16 * 4; }
inline __m512 load16(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// Chunk c (16 values) of a cache row of Dh values, as float32: bfloat16 or float32 as stored, int8 times
// its chunk's scale.
template <typename T>
inline __m512 load_chunk(const T* row, int64_t c, int64_t) {
  return load16(row + c * 16);
}
inline __m512 load_chunk(const int8_t* row, int64_t c, int64_t Dh) {
  float d;
  std::memcpy(&d, row + Dh + 4 * c, sizeof d);
  return _mm512_mul_ps(load16(row + c * 16), _mm512_set1_ps(d));
}
// The least max|x| a block of values is quantized to int8 against: 127 / max|x| overflows float32 below
// about 3.7e-37 (a normal float), and the infinite scale made every code -128. A block that small takes its
// codes against this floor instead (coarse, but finite); every larger block keeps its bits.
constexpr float kMinAmax = 1e-36f;
inline float int8_amax(float amax) { return amax > 0.0f && amax < kMinAmax ? kMinAmax : amax; }

// x (Dh floats, Dh a multiple of 16) into the row at `row` (int8_row_bytes(Dh) bytes).
inline void quantize_int8_row(const float* x, int8_t* row, int64_t Dh) {
  for (int64_t c = 0; c < Dh / 16; ++c) {
    const __m512 v = _mm512_loadu_ps(x + c * 16);
    const float m = int8_amax(_mm512_reduce_max_ps(_mm512_max_ps(v, _mm512_sub_ps(_mm512_setzero_ps(), v))));
    const float d = m / 127.0f;
    const __m512 id = _mm512_set1_ps(m > 0.0f ? 127.0f / m : 0.0f);  // cvtps: to nearest even (the default)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(row + c * 16),
                     _mm512_cvtsepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(v, id))));
    std::memcpy(row + Dh + 4 * c, &d, sizeof d);
  }
}

inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(BFloat16* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16(v)); }
inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
inline void store16(BFloat16* p, __m512 v, __mmask16 m) { _mm256_mask_storeu_epi16(p, m, to_bf16(v)); }

// One fp16 value (its bits) widened exactly to float32.
inline float fp16_to_f32(uint16_t h) { return _cvtsh_ss(h); }

// vpdpbusd where every unsigned byte of u8 is below 128 (4-, 5- and 6-bit codes): the same sums, exact.
// On AVX2 this is two instructions instead of avx2.h's seven for any byte: vpmaddubsw's int16 pair sums
// cannot saturate (|127 * -128 * 2| < 32768), and vpmaddwd against ones widens them to the int32 sums.
#ifndef METRONOME_AVX2
inline __m512i dpbusd_small(__m512i acc, __m512i u8, __m512i s8) { return _mm512_dpbusd_epi32(acc, u8, s8); }
#else
inline __m512i dpbusd_small(__m512i acc, __m512i u8, __m512i s8) {
  const __m256i ones = _mm256_set1_epi16(1);
  return {_mm256_add_epi32(acc.lo, _mm256_madd_epi16(_mm256_maddubs_epi16(u8.lo, s8.lo), ones)),
          _mm256_add_epi32(acc.hi, _mm256_madd_epi16(_mm256_maddubs_epi16(u8.hi, s8.hi), ones))};
}
#endif

// acc + u8 . (x4's 4 bytes in every lane), vpdpbusd with x4 as the instruction's own {1to16} memory
// operand. GCC 12 compiles _mm512_dpbusd_epi32(acc, u8, _mm512_set1_epi32(*x4)) to a separate
// vpbroadcastd and a register vpdpbusd; on this project's Xeon that pair sustains ~4.0 G vpdpbusd/s per
// core against ~5.1 G/s for the folded form (docs/models.md, "Two instructions per cycle").
#ifndef METRONOME_AVX2
inline __m512i dpbusd_bcst(__m512i acc, __m512i u8, const int32_t* x4) {
  asm("vpdpbusd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(u8), "m"(*x4));
  return acc;
}
// The same for vpdpwssd (int16 pairs): acc + s16 . (x2's two int16 in every lane).
inline __m512i dpwssd_bcst(__m512i acc, __m512i s16, const int32_t* x2) {
  asm("vpdpwssd %2%{1to16%}, %1, %0" : "+v"(acc) : "v"(s16), "m"(*x2));
  return acc;
}
inline __m512i dpbusd_bcst_small(__m512i acc, __m512i u8, const int32_t* x4) { return dpbusd_bcst(acc, u8, x4); }
#else  // no such memory operand (nor instruction) on AVX2: broadcast, then avx2.h's vpdpbusd
inline __m512i dpbusd_bcst(__m512i acc, __m512i u8, const int32_t* x4) {
  return _mm512_dpbusd_epi32(acc, u8, _mm512_set1_epi32(*x4));
}
inline __m512i dpbusd_bcst_small(__m512i acc, __m512i u8, const int32_t* x4) {
  return dpbusd_small(acc, u8, _mm512_set1_epi32(*x4));
}
inline __m512i dpwssd_bcst(__m512i acc, __m512i s16, const int32_t* x2) {
  return _mm512_dpwssd_epi32(acc, s16, _mm512_set1_epi32(*x2));
}
#endif

// Small codes on AVX2, summed as int16 before they are widened. vpmaddubsw leaves each int32 lane's four
// products as two int16 pair sums. For codes below kBelow (4-, 5- and 6-bit) and x bytes of at most 128 in
// size, N such results add up as int16 while N * 2 * (kBelow - 1) * 128 < 32768, and one vpmaddwd then
// widens them: against ones, the dpbusd sums; against a scale in both int16 halves, the scaled sums. Two
// dpbusd_small cost four multiplies per 256-bit half, two code vectors summed this way three, and Q4_K's
// eight (the scale folded into the widening) nine where they were twenty. A prompt's rows are bound by those
// multiplies here: Qwen2.5-0.5B's Q5_0 tile was 56 % of its 1,000-token prefill on a Zen 4 without AVX-512
// (perf, 2026-12-04). The integer sums are the same numbers, so results are unchanged bit for bit.
// AVX-512 VNNI keeps vpdpbusd (one instruction per 64 products): there these are only declared, so that
// the kernels' discarded `if constexpr (kSums16)` branches compile, and a call would fail to link.
#ifdef METRONOME_AVX2
constexpr bool kSums16 = true;
// sum_i u[i] . (x4[i]'s 4 bytes in every lane), i < N, as the int16 pairs described above
template <int N, int kBelow>
inline __m512i sums16_bcst(const __m512i* u, const int32_t* x4) {
  static_assert(N * 2 * (kBelow - 1) * 128 < 32768, "the int16 sums could overflow: fewer vectors per sum");
  __m256i b = _mm256_set1_epi32(x4[0]);
  __m512i t = {_mm256_maddubs_epi16(u[0].lo, b), _mm256_maddubs_epi16(u[0].hi, b)};
  for (int i = 1; i < N; ++i) {
    b = _mm256_set1_epi32(x4[i]);
    t.lo = _mm256_add_epi16(t.lo, _mm256_maddubs_epi16(u[i].lo, b));
    t.hi = _mm256_add_epi16(t.hi, _mm256_maddubs_epi16(u[i].hi, b));
  }
  return t;
}
// acc + each int32 lane's two int16 of t times w's (vpmaddwd, then vpaddd)
inline __m512i madd16_add(__m512i acc, __m512i t, __m512i w) {
  return {_mm256_add_epi32(acc.lo, _mm256_madd_epi16(t.lo, w.lo)),
          _mm256_add_epi32(acc.hi, _mm256_madd_epi16(t.hi, w.hi))};
}
#else
constexpr bool kSums16 = false;
template <int N, int kBelow>
__m512i sums16_bcst(const __m512i* u, const int32_t* x4);
__m512i madd16_add(__m512i acc, __m512i t, __m512i w);
#endif
// int16 ones in every lane: widens sums16_bcst's pairs to their sums
inline __m512i ones16() { return _mm512_set1_epi32(0x00010001); }

// Q8_0's codes against x8, signed by signed: acc + q . x per int32 lane (4 products), exactly, for x in
// [-127, 127] (quantize's range: round(x * 127 / max|x|)). vpmaddubsw multiplies |q| <= 128 (unsigned) by x
// with q's sign: its int16 pair sums stay within 2 * 128 * 127 < 32768, and vpmaddwd widens them. abs_q is
// |q|, which the caller computes once for all the rows of x. On AVX2 that is three instructions where an
// exact vpdpbusd of the codes q + 128 takes seven (avx2.h), and the sum needs no -128 * sum(x) offset.
// AVX-512 VNNI keeps the codes q + 128 and one vpdpbusd (kSignedQ8 says which form a kernel takes): there
// dpbssd is only declared, so that the kernels' discarded `if constexpr` branches compile, and a call
// would fail to link.
#ifdef METRONOME_AVX2
constexpr bool kSignedQ8 = true;
inline __m512i dpbssd(__m512i acc, __m512i q, __m512i abs_q, __m512i x) {
  const __m256i ones = _mm256_set1_epi16(1);
  return {
      _mm256_add_epi32(acc.lo, _mm256_madd_epi16(_mm256_maddubs_epi16(abs_q.lo, _mm256_sign_epi8(x.lo, q.lo)), ones)),
      _mm256_add_epi32(acc.hi, _mm256_madd_epi16(_mm256_maddubs_epi16(abs_q.hi, _mm256_sign_epi8(x.hi, q.hi)), ones))};
}
#else
constexpr bool kSignedQ8 = false;
__m512i dpbssd(__m512i acc, __m512i q, __m512i abs_q, __m512i x);
#endif
// The same against x4's 4 bytes in every lane.
inline __m512i dpbssd_bcst(__m512i acc, __m512i q, __m512i abs_q, const int32_t* x4) {
  return dpbssd(acc, q, abs_q, _mm512_set1_epi32(*x4));
}

// Horizontal sum of 16 lanes in a fixed tree order (8+8, 4+4, 2+2, 1+1).
inline float hsum(__m512 v) {
  __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));
  __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
  b = _mm_add_ps(b, _mm_movehl_ps(b, b));
  b = _mm_add_ss(b, _mm_movehdup_ps(b));
  return _mm_cvtss_f32(b);
}

// hsum of 16 vectors at once: lane k of the result is hsum(v + 16k), bit for bit. Each of the four levels
// adds, for every vector, the same pairs hsum's tree adds (lanes i and i+8, i and i+4, i and i+2, i and
// i+1), two vectors' halves side by side, so the 16 sums take 46 instructions where 16 hsums take 128.
inline __m512 hsum16(const float* v) {
  __m512 t[8], r[4], z[2];
  for (int p = 0; p < 8; ++p) {  // [A0..7 + A8..15 | B0..7 + B8..15]
    const __m512 a = _mm512_loadu_ps(v + 32 * p), b = _mm512_loadu_ps(v + 32 * p + 16);
    t[p] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  for (int p = 0; p < 4; ++p)  // per 128-bit lane, one vector's 4 sums of i and i+4
    r[p] = _mm512_add_ps(_mm512_shuffle_f32x4(t[2 * p], t[2 * p + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(t[2 * p], t[2 * p + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  for (int p = 0; p < 2; ++p)  // i and i+2
    z[p] = _mm512_add_ps(_mm512_shuffle_ps(r[2 * p], r[2 * p + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(r[2 * p], r[2 * p + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 sums = _mm512_add_ps(_mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(2, 0, 2, 0)),  // i and i+1
                                    _mm512_shuffle_ps(z[0], z[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // lane 4a + b of sums holds vector a + 4b's: transpose back to the vectors' order
  return _mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15), sums);
}

// e^x for 16 lanes: x = n*ln2 + r with |r| <= ln2/2, e^r by its degree-7 Taylor polynomial (truncation
// error < 6e-9 relative), scaled by 2^n. About 1 ulp. Overflows to +inf, underflows to 0, keeps NaN.
inline __m512 vexp(__m512 x) {
  x = _mm512_min_ps(_mm512_set1_ps(89.0f), x);  // operand order keeps a NaN x (min/max return the 2nd)
  x = _mm512_max_ps(_mm512_set1_ps(-104.0f), x);
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2 high part (exact n*hi)
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);     // ln2 low part
  __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
#ifndef METRONOME_AVX2
  return _mm512_scalef_ps(p, n);
#else
  return avx2::scale_pow2(p, n);
#endif
}

}  // namespace metronome
