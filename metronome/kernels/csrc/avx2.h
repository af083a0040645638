// The AVX-512 intrinsics the kernels use, for CPUs with AVX2 only (AMD Zen 1-3, most Intel client chips).
//
// The kernels are written once, with AVX-512 intrinsics. On a CPU without AVX-512, simd.h includes this
// file instead, and every 512-bit register becomes a pair of 256-bit ones: `__m512` names `f512` and
// `__m512i` names `i512` below, masks are plain integers, and each `_mm512_*` name used in csrc/ is a
// function here written from its definition in Intel's intrinsics guide. The results are the
// instruction's, lane for lane and bit for bit: integer sums are exact in any order, every float
// operation is the same IEEE operation on the same lanes, and the float reductions keep the order the
// sources give them. So the determinism contract (simd.h) holds unchanged, and the kernel tests check
// the same references on both builds.
//
// Where AVX2 has no such instruction the function costs more than one: vpdpbusd is seven, a masked
// store two vmaskmovps, a scatter a loop. A pair of __m256 in a struct stays in registers (GCC splits
// the struct), which a 64-byte generic vector (SIMDe's emulation, tried first) does not: it lived on the
// stack, and SmolLM2 decoded at 25 % of the memory bound.
//
// Only what csrc/ uses is here; an intrinsic the sources start to use must be added (the build fails
// until it is: GCC refuses the native one without AVX-512).

#pragma once

#include <immintrin.h>

#include <cstdint>
#include <cstring>

namespace metronome::avx2 {

struct f512 {
  __m256 lo, hi;
};
struct i512 {
  __m256i lo, hi;
};

// -- masks: bit j of a mask selects lane j; these spread bits to lanes ------------------------------

inline __m256i lanes32(unsigned k) {  // 8 int32 lanes, all ones where bit j of k is set
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  return _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(k)), bit), bit);
}
inline __m256i lanes64(unsigned k) {  // 4 int64 lanes
  const __m256i bit = _mm256_setr_epi64x(1, 2, 4, 8);
  return _mm256_cmpeq_epi64(_mm256_and_si256(_mm256_set1_epi64x(k), bit), bit);
}
inline __m256i bytes_of(uint32_t k) {  // 32 byte lanes: k's byte holding bit j copied to byte j, tested
  const __m256i group = _mm256_setr_epi64x(0, 0x0101010101010101, 0x0202020202020202, 0x0303030303030303);
  const __m256i bit = _mm256_set1_epi64x(static_cast<int64_t>(0x8040201008040201ull));
  __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(k)), group);
  return _mm256_cmpeq_epi8(_mm256_and_si256(spread, bit), bit);
}
inline __m256 lanes32_ps(unsigned k) { return _mm256_castsi256_ps(lanes32(k)); }

// -- loads, stores and constants --------------------------------------------------------------------

inline f512 loadu_ps(const void* p) {
  const float* f = static_cast<const float*>(p);
  return {_mm256_loadu_ps(f), _mm256_loadu_ps(f + 8)};
}
inline f512 load_ps(const void* p) {
  const float* f = static_cast<const float*>(p);
  return {_mm256_load_ps(f), _mm256_load_ps(f + 8)};
}
inline i512 loadu_si512(const void* p) {
  const __m256i* v = static_cast<const __m256i*>(p);
  return {_mm256_loadu_si256(v), _mm256_loadu_si256(v + 1)};
}
inline void storeu_ps(void* p, f512 a) {
  float* f = static_cast<float*>(p);
  _mm256_storeu_ps(f, a.lo);
  _mm256_storeu_ps(f + 8, a.hi);
}
inline void store_ps(void* p, f512 a) {
  float* f = static_cast<float*>(p);
  _mm256_store_ps(f, a.lo);
  _mm256_store_ps(f + 8, a.hi);
}
// Masked loads and stores touch only the mask's lanes (vmaskmovps neither reads nor writes the others,
// so a tail never faults nor overwrites the next row); 16-bit lanes have no such instruction on AVX2.
inline f512 maskz_loadu_ps(unsigned k, const void* p) {
  const float* f = static_cast<const float*>(p);
  return {_mm256_maskload_ps(f, lanes32(k & 0xFF)), _mm256_maskload_ps(f + 8, lanes32(k >> 8 & 0xFF))};
}
inline void mask_storeu_ps(void* p, unsigned k, f512 a) {
  float* f = static_cast<float*>(p);
  _mm256_maskstore_ps(f, lanes32(k & 0xFF), a.lo);
  _mm256_maskstore_ps(f + 8, lanes32(k >> 8 & 0xFF), a.hi);
}
inline __m256i maskz_loadu_epi16(unsigned k, const void* p) {
  alignas(32) uint16_t lane[16] = {};
  for (int j = 0; j < 16; ++j)
    if (k >> j & 1u) std::memcpy(&lane[j], static_cast<const char*>(p) + 2 * j, 2);
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(lane));
}
inline void mask_storeu_epi16(void* p, unsigned k, __m256i a) {
  alignas(32) uint16_t lane[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(lane), a);
  for (int j = 0; j < 16; ++j)
    if (k >> j & 1u) std::memcpy(static_cast<char*>(p) + 2 * j, &lane[j], 2);
}
// Lane j to base + index[j] * scale where bit j of k is set, in lane order (as vscatterdps orders
// overlapping stores).
inline void mask_i32scatter_ps(void* base, unsigned k, i512 index, f512 a, int scale) {
  alignas(32) int32_t at[16];
  alignas(32) float v[16];
  _mm256_store_si256(reinterpret_cast<__m256i*>(at), index.lo);
  _mm256_store_si256(reinterpret_cast<__m256i*>(at + 8), index.hi);
  _mm256_store_ps(v, a.lo);
  _mm256_store_ps(v + 8, a.hi);
  for (int j = 0; j < 16; ++j)
    if (k >> j & 1u) *reinterpret_cast<float*>(static_cast<char*>(base) + static_cast<int64_t>(at[j]) * scale) = v[j];
}

inline f512 setzero_ps() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline i512 setzero_si512() { return {_mm256_setzero_si256(), _mm256_setzero_si256()}; }
inline f512 set1_ps(float a) { return {_mm256_set1_ps(a), _mm256_set1_ps(a)}; }
inline i512 set1_epi32(int a) { return {_mm256_set1_epi32(a), _mm256_set1_epi32(a)}; }
inline i512 set1_epi8(char a) { return {_mm256_set1_epi8(a), _mm256_set1_epi8(a)}; }
inline i512 setr_epi32(int a0, int a1, int a2, int a3, int a4, int a5, int a6, int a7, int a8, int a9, int a10, int a11,
                       int a12, int a13, int a14, int a15) {
  return {_mm256_setr_epi32(a0, a1, a2, a3, a4, a5, a6, a7), _mm256_setr_epi32(a8, a9, a10, a11, a12, a13, a14, a15)};
}
inline i512 setr_epi64(int64_t a0, int64_t a1, int64_t a2, int64_t a3, int64_t a4, int64_t a5, int64_t a6, int64_t a7) {
  return {_mm256_setr_epi64x(a0, a1, a2, a3), _mm256_setr_epi64x(a4, a5, a6, a7)};
}
// (d, c, b, a): a in lane 0, b in lane 1, ... of every 128-bit lane.
inline i512 set4_epi32(int d, int c, int b, int a) {
  __m256i v = _mm256_setr_epi32(a, b, c, d, a, b, c, d);
  return {v, v};
}

// -- lane-wise arithmetic: the same instruction on each half ----------------------------------------

#define METRONOME_AVX2_LANEWISE(name, T, op) \
  inline T name(T a, T b) { return {op(a.lo, b.lo), op(a.hi, b.hi)}; }
METRONOME_AVX2_LANEWISE(add_ps, f512, _mm256_add_ps)
METRONOME_AVX2_LANEWISE(sub_ps, f512, _mm256_sub_ps)
METRONOME_AVX2_LANEWISE(mul_ps, f512, _mm256_mul_ps)
METRONOME_AVX2_LANEWISE(div_ps, f512, _mm256_div_ps)
METRONOME_AVX2_LANEWISE(min_ps, f512, _mm256_min_ps)
METRONOME_AVX2_LANEWISE(max_ps, f512, _mm256_max_ps)
METRONOME_AVX2_LANEWISE(and_ps, f512, _mm256_and_ps)
METRONOME_AVX2_LANEWISE(xor_ps, f512, _mm256_xor_ps)
METRONOME_AVX2_LANEWISE(add_epi32, i512, _mm256_add_epi32)
METRONOME_AVX2_LANEWISE(mullo_epi32, i512, _mm256_mullo_epi32)
METRONOME_AVX2_LANEWISE(and_si512, i512, _mm256_and_si256)
METRONOME_AVX2_LANEWISE(or_si512, i512, _mm256_or_si256)
METRONOME_AVX2_LANEWISE(xor_si512, i512, _mm256_xor_si256)
METRONOME_AVX2_LANEWISE(srlv_epi64, i512, _mm256_srlv_epi64)
METRONOME_AVX2_LANEWISE(maddubs_epi16, i512, _mm256_maddubs_epi16)  // per 128-bit lane: the same on halves
METRONOME_AVX2_LANEWISE(shuffle_epi8, i512, _mm256_shuffle_epi8)    // per 128-bit lane
#undef METRONOME_AVX2_LANEWISE
inline i512 abs_epi8(i512 a) { return {_mm256_abs_epi8(a.lo), _mm256_abs_epi8(a.hi)}; }

inline f512 fmadd_ps(f512 a, f512 b, f512 c) {
  return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)};
}
inline f512 fnmadd_ps(f512 a, f512 b, f512 c) {
  return {_mm256_fnmadd_ps(a.lo, b.lo, c.lo), _mm256_fnmadd_ps(a.hi, b.hi, c.hi)};
}
inline f512 cvtepi32_ps(i512 a) { return {_mm256_cvtepi32_ps(a.lo), _mm256_cvtepi32_ps(a.hi)}; }
inline i512 cvtps_epi32(f512 a) { return {_mm256_cvtps_epi32(a.lo), _mm256_cvtps_epi32(a.hi)}; }
#define METRONOME_AVX2_SHIFT(name, op)           \
  template <int kShift>                          \
  inline i512 name(i512 a) {                     \
    return {op(a.lo, kShift), op(a.hi, kShift)}; \
  }
METRONOME_AVX2_SHIFT(slli_epi16, _mm256_slli_epi16)
METRONOME_AVX2_SHIFT(srli_epi16, _mm256_srli_epi16)
METRONOME_AVX2_SHIFT(slli_epi32, _mm256_slli_epi32)
METRONOME_AVX2_SHIFT(srli_epi32, _mm256_srli_epi32)
#undef METRONOME_AVX2_SHIFT
template <int kImm>  // per 128-bit lane
inline f512 shuffle_ps(f512 a, f512 b) {
  return {_mm256_shuffle_ps(a.lo, b.lo, kImm), _mm256_shuffle_ps(a.hi, b.hi, kImm)};
}
// vroundscaleps without a scale (imm's high 4 bits zero) is vroundps, whose imm means the same.
template <int kImm>
inline f512 roundscale_ps(f512 a) {
  static_assert((kImm & 0xF0) == 0, "roundscale with a scale: not written for AVX2 builds");
  return {_mm256_round_ps(a.lo, kImm), _mm256_round_ps(a.hi, kImm)};
}
// vpternlogd with imm 0xF8: a | (b & c), the only truth table csrc/ uses.
template <int kImm>
inline i512 ternarylogic_epi32(i512 a, i512 b, i512 c) {
  static_assert(kImm == 0xF8, "this truth table is not written for AVX2 builds");
  return {_mm256_or_si256(a.lo, _mm256_and_si256(b.lo, c.lo)), _mm256_or_si256(a.hi, _mm256_and_si256(b.hi, c.hi))};
}

// vpdpbusd: each int32 lane plus the four products of a's unsigned bytes and b's signed bytes, exactly
// (no saturation): even and odd bytes widen to int16 and vpmaddwd sums their pairs into int32.
inline __m256i dpbusd256(__m256i acc, __m256i a, __m256i b) {
  const __m256i low_bytes = _mm256_set1_epi16(0x00FF);
  __m256i a_even = _mm256_and_si256(a, low_bytes), a_odd = _mm256_srli_epi16(a, 8);
  __m256i b_even = _mm256_srai_epi16(_mm256_slli_epi16(b, 8), 8), b_odd = _mm256_srai_epi16(b, 8);
  acc = _mm256_add_epi32(acc, _mm256_madd_epi16(a_even, b_even));
  return _mm256_add_epi32(acc, _mm256_madd_epi16(a_odd, b_odd));
}
inline i512 dpbusd_epi32(i512 acc, i512 a, i512 b) {
  return {dpbusd256(acc.lo, a.lo, b.lo), dpbusd256(acc.hi, a.hi, b.hi)};
}
// vpdpwssd: each int32 lane plus the two products of a's and b's int16 pairs (vpmaddwd, then the add).
inline i512 dpwssd_epi32(i512 acc, i512 a, i512 b) {
  return {_mm256_add_epi32(acc.lo, _mm256_madd_epi16(a.lo, b.lo)),
          _mm256_add_epi32(acc.hi, _mm256_madd_epi16(a.hi, b.hi))};
}

// -- masked lane-wise operations ----------------------------------------------------------------------

inline f512 maskz_mov_ps(unsigned k, f512 a) {
  return {_mm256_and_ps(a.lo, lanes32_ps(k & 0xFF)), _mm256_and_ps(a.hi, lanes32_ps(k >> 8 & 0xFF))};
}
inline i512 maskz_mov_epi8(uint64_t k, i512 a) {
  return {_mm256_and_si256(a.lo, bytes_of(static_cast<uint32_t>(k))),
          _mm256_and_si256(a.hi, bytes_of(static_cast<uint32_t>(k >> 32)))};
}
inline i512 mask_blend_epi32(unsigned k, i512 a, i512 b) {
  return {_mm256_blendv_epi8(a.lo, b.lo, lanes32(k & 0xFF)), _mm256_blendv_epi8(a.hi, b.hi, lanes32(k >> 8 & 0xFF))};
}
inline f512 mask_max_ps(f512 src, unsigned k, f512 a, f512 b) {
  return {_mm256_blendv_ps(src.lo, _mm256_max_ps(a.lo, b.lo), lanes32_ps(k & 0xFF)),
          _mm256_blendv_ps(src.hi, _mm256_max_ps(a.hi, b.hi), lanes32_ps(k >> 8 & 0xFF))};
}
template <int kPredicate>  // one of _CMP_*
inline unsigned cmp_ps_mask(f512 a, f512 b) {
  unsigned lo = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a.lo, b.lo, kPredicate)));
  unsigned hi = static_cast<unsigned>(_mm256_movemask_ps(_mm256_cmp_ps(a.hi, b.hi, kPredicate)));
  return lo | hi << 8;
}

// -- casts, widening and narrowing ----------------------------------------------------------------

inline i512 castps_si512(f512 a) { return {_mm256_castps_si256(a.lo), _mm256_castps_si256(a.hi)}; }
inline f512 castsi512_ps(i512 a) { return {_mm256_castsi256_ps(a.lo), _mm256_castsi256_ps(a.hi)}; }
inline __m256 castps512_ps256(f512 a) { return a.lo; }
// The casts from narrower registers leave the upper lanes undefined; zero is one definition.
inline f512 zextps256_ps512(__m256 a) { return {a, _mm256_setzero_ps()}; }
inline f512 castps256_ps512(__m256 a) { return zextps256_ps512(a); }
inline f512 castps128_ps512(__m128 a) { return {_mm256_insertf128_ps(_mm256_setzero_ps(), a, 0), _mm256_setzero_ps()}; }
inline i512 zextsi256_si512(__m256i a) { return {a, _mm256_setzero_si256()}; }
inline i512 castsi256_si512(__m256i a) { return zextsi256_si512(a); }
inline i512 zextsi128_si512(__m128i a) {
  return {_mm256_inserti128_si256(_mm256_setzero_si256(), a, 0), _mm256_setzero_si256()};
}

inline f512 cvtph_ps(__m256i h) {
  return {_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))};
}
inline i512 cvtepu16_epi32(__m256i a) {
  return {_mm256_cvtepu16_epi32(_mm256_castsi256_si128(a)), _mm256_cvtepu16_epi32(_mm256_extracti128_si256(a, 1))};
}
inline i512 cvtepi8_epi32(__m128i a) { return {_mm256_cvtepi8_epi32(a), _mm256_cvtepi8_epi32(_mm_srli_si128(a, 8))}; }
inline i512 cvtepu8_epi32(__m128i a) { return {_mm256_cvtepu8_epi32(a), _mm256_cvtepu8_epi32(_mm_srli_si128(a, 8))}; }
inline i512 cvtepu8_epi16(__m256i a) {
  return {_mm256_cvtepu8_epi16(_mm256_castsi256_si128(a)), _mm256_cvtepu8_epi16(_mm256_extracti128_si256(a, 1))};
}
// vpmovdw: each int32 truncated to its low 16 bits. Masked to 16 bits, the saturating pack is exact; it
// interleaves the 128-bit lanes (lo, hi, lo, hi), which the permute puts back in order.
inline __m256i cvtepi32_epi16(i512 a) {
  const __m256i low16 = _mm256_set1_epi32(0xFFFF);
  __m256i packed = _mm256_packus_epi32(_mm256_and_si256(a.lo, low16), _mm256_and_si256(a.hi, low16));
  return _mm256_permute4x64_epi64(packed, 0xD8);
}
// vpmovsdb: each int32 saturated to int8; saturating to int16 first, then to int8, gives the same byte.
inline __m128i cvtsepi32_epi8(i512 a) {
  __m256i words = _mm256_permute4x64_epi64(_mm256_packs_epi32(a.lo, a.hi), 0xD8);  // 16 x int16, in order
  __m256i bytes = _mm256_packs_epi16(words, words);  // each 128-bit lane: its 8 words as bytes, twice
  return _mm_unpacklo_epi64(_mm256_castsi256_si128(bytes), _mm256_extracti128_si256(bytes, 1));
}

// -- across the 512 bits ----------------------------------------------------------------------------

template <int kIndex>
inline __m256 extractf32x8_ps(f512 a) {
  return kIndex ? a.hi : a.lo;
}
template <int kIndex>
inline __m256i extracti64x4_epi64(i512 a) {
  return kIndex ? a.hi : a.lo;
}
template <int kIndex>
inline i512 inserti64x4(i512 a, __m256i b) {
  return kIndex ? i512{a.lo, b} : i512{b, a.hi};
}
inline i512 broadcast_i32x4(__m128i a) {
  __m256i b = _mm256_broadcastsi128_si256(a);
  return {b, b};
}
inline i512 broadcast_i64x4(__m256i a) { return {a, a}; }
// The 128 bits of a in every 128-bit lane whose 64-bit lanes' bits of k are set, else src's (mask) or 0.
inline i512 mask_broadcast_i64x2(i512 src, unsigned k, __m128i a) {
  __m256i b = _mm256_broadcastsi128_si256(a);
  return {_mm256_blendv_epi8(src.lo, b, lanes64(k & 0xF)), _mm256_blendv_epi8(src.hi, b, lanes64(k >> 4 & 0xF))};
}
inline i512 maskz_broadcast_i64x2(unsigned k, __m128i a) { return mask_broadcast_i64x2(setzero_si512(), k, a); }
// The low two int32 of a repeated over the 16 lanes; the lanes whose bits of k are clear are 0.
inline i512 maskz_broadcast_i32x2(unsigned k, __m128i a) {
  __m256i b = _mm256_broadcastq_epi64(a);
  return {_mm256_and_si256(b, lanes32(k & 0xFF)), _mm256_and_si256(b, lanes32(k >> 8 & 0xFF))};
}
// vshuff32x4: 128-bit lanes imm[1:0], imm[3:2] of a, then imm[5:4], imm[7:6] of b (a lane number l is
// half l/2, part l%2, which is vperm2f128's own numbering of its two sources).
template <int kImm>
inline f512 shuffle_f32x4(f512 a, f512 b) {
  return {_mm256_permute2f128_ps(a.lo, a.hi, (kImm & 3) | (kImm >> 2 & 3) << 4),
          _mm256_permute2f128_ps(b.lo, b.hi, (kImm >> 4 & 3) | (kImm >> 6 & 3) << 4)};
}
// vpermps over 16 lanes: each half picks from both halves of a (vpermps uses the index's low 3 bits)
// and keeps the pick from the half the index's bit 3 names.
inline __m256 permute16(__m256i idx, __m256 lo, __m256 hi) {
  __m256 from_hi = _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28));  // bit 3 to the sign bit, which blendv reads
  return _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx), from_hi);
}
inline f512 permutexvar_ps(i512 idx, f512 a) { return {permute16(idx.lo, a.lo, a.hi), permute16(idx.hi, a.lo, a.hi)}; }
inline f512 maskz_permutexvar_ps(unsigned k, i512 idx, f512 a) { return maskz_mov_ps(k, permutexvar_ps(idx, a)); }
inline i512 permutexvar_epi32(i512 idx, i512 a) { return castps_si512(permutexvar_ps(idx, castsi512_ps(a))); }

// The maximum of 16 lanes in GCC's own order for the native intrinsic (halves, quarters, pairs, lanes,
// each maximum taking the upper part first): the same result for a -0 and a +0 as well.
inline float reduce_max_ps(f512 a) {
  __m256 m8 = _mm256_max_ps(a.hi, a.lo);
  __m128 m4 = _mm_max_ps(_mm256_extractf128_ps(m8, 1), _mm256_castps256_ps128(m8));
  __m128 m2 = _mm_max_ps(m4, _mm_shuffle_ps(m4, m4, _MM_SHUFFLE(1, 0, 3, 2)));
  return _mm_cvtss_f32(_mm_max_ps(m2, _mm_shuffle_ps(m2, m2, _MM_SHUFFLE(2, 3, 0, 1))));
}
// The sum of 16 int32 lanes, wrapping (exact mod 2^32 in any order).
inline int reduce_add_epi32(i512 a) {
  __m256i s = _mm256_add_epi32(a.lo, a.hi);
  __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
  t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
  return _mm_cvtsi128_si32(t);
}

// p * 2^n for integral n in [-252, 252], as vscalefps gives it (simd.h's vexp: n in [-150, 129]). 2^n
// need not be a float, so it is applied as 2^h, then 2^(n - h), h = floor(n / 2), each a normal float;
// for p in [0.5, 2) the first product is exact and the second rounds once, as vscalefps does.
inline f512 scale_pow2(f512 p, f512 n) {
  auto half = [](__m256 x, __m256 e) {
    const __m256i bias = _mm256_set1_epi32(127);
    __m256i ni = _mm256_cvtps_epi32(e);
    __m256i h = _mm256_srai_epi32(ni, 1), rest = _mm256_sub_epi32(ni, h);
    __m256 two_h = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(h, bias), 23));
    __m256 two_rest = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(rest, bias), 23));
    return _mm256_mul_ps(_mm256_mul_ps(x, two_h), two_rest);
  };
  return {half(p.lo, n.lo), half(p.hi, n.hi)};
}

}  // namespace metronome::avx2

#ifndef METRONOME_AVX2_NO_ALIASES  // tests/kernels/test_avx2.py compares these with the native ones

// The names the sources use. Types and masks first: after <immintrin.h>, so its own declarations keep
// theirs.
#define __m512 ::metronome::avx2::f512
#define __m512i ::metronome::avx2::i512
#define __mmask8 uint8_t
#define __mmask16 uint16_t
#define __mmask64 uint64_t

#define _mm512_loadu_ps ::metronome::avx2::loadu_ps
#define _mm512_load_ps ::metronome::avx2::load_ps
#define _mm512_loadu_si512 ::metronome::avx2::loadu_si512
#define _mm512_storeu_ps ::metronome::avx2::storeu_ps
#define _mm512_store_ps ::metronome::avx2::store_ps
#define _mm512_maskz_loadu_ps ::metronome::avx2::maskz_loadu_ps
#define _mm512_mask_storeu_ps ::metronome::avx2::mask_storeu_ps
#define _mm256_maskz_loadu_epi16 ::metronome::avx2::maskz_loadu_epi16
#define _mm256_mask_storeu_epi16 ::metronome::avx2::mask_storeu_epi16
#define _mm512_mask_i32scatter_ps ::metronome::avx2::mask_i32scatter_ps
#define _mm512_setzero_ps ::metronome::avx2::setzero_ps
#define _mm512_setzero_si512 ::metronome::avx2::setzero_si512
#define _mm512_set1_ps ::metronome::avx2::set1_ps
#define _mm512_set1_epi32 ::metronome::avx2::set1_epi32
#define _mm512_set1_epi8 ::metronome::avx2::set1_epi8
#define _mm512_setr_epi32 ::metronome::avx2::setr_epi32
#define _mm512_setr_epi64 ::metronome::avx2::setr_epi64
#define _mm512_set4_epi32 ::metronome::avx2::set4_epi32
#define _mm512_add_ps ::metronome::avx2::add_ps
#define _mm512_sub_ps ::metronome::avx2::sub_ps
#define _mm512_mul_ps ::metronome::avx2::mul_ps
#define _mm512_div_ps ::metronome::avx2::div_ps
#define _mm512_min_ps ::metronome::avx2::min_ps
#define _mm512_max_ps ::metronome::avx2::max_ps
#define _mm512_and_ps ::metronome::avx2::and_ps
#define _mm512_xor_ps ::metronome::avx2::xor_ps
#define _mm512_add_epi32 ::metronome::avx2::add_epi32
#define _mm512_mullo_epi32 ::metronome::avx2::mullo_epi32
#define _mm512_and_si512 ::metronome::avx2::and_si512
#define _mm512_or_si512 ::metronome::avx2::or_si512
#define _mm512_xor_si512 ::metronome::avx2::xor_si512
#define _mm512_srlv_epi64 ::metronome::avx2::srlv_epi64
#define _mm512_maddubs_epi16 ::metronome::avx2::maddubs_epi16
#define _mm512_abs_epi8 ::metronome::avx2::abs_epi8
#define _mm512_shuffle_epi8 ::metronome::avx2::shuffle_epi8
#define _mm512_fmadd_ps ::metronome::avx2::fmadd_ps
#define _mm512_fnmadd_ps ::metronome::avx2::fnmadd_ps
#define _mm512_cvtepi32_ps ::metronome::avx2::cvtepi32_ps
#define _mm512_cvtps_epi32 ::metronome::avx2::cvtps_epi32
#define _mm512_slli_epi16(a, n) ::metronome::avx2::slli_epi16<(n)>(a)
#define _mm512_srli_epi16(a, n) ::metronome::avx2::srli_epi16<(n)>(a)
#define _mm512_slli_epi32(a, n) ::metronome::avx2::slli_epi32<(n)>(a)
#define _mm512_srli_epi32(a, n) ::metronome::avx2::srli_epi32<(n)>(a)
#define _mm512_shuffle_ps(a, b, imm) ::metronome::avx2::shuffle_ps<(imm)>(a, b)
#define _mm512_roundscale_ps(a, imm) ::metronome::avx2::roundscale_ps<(imm)>(a)
#define _mm512_ternarylogic_epi32(a, b, c, imm) ::metronome::avx2::ternarylogic_epi32<(imm)>(a, b, c)
#define _mm512_dpbusd_epi32 ::metronome::avx2::dpbusd_epi32
#define _mm512_dpwssd_epi32 ::metronome::avx2::dpwssd_epi32
#define _mm512_maskz_mov_ps ::metronome::avx2::maskz_mov_ps
#define _mm512_maskz_mov_epi8 ::metronome::avx2::maskz_mov_epi8
#define _mm512_mask_blend_epi32 ::metronome::avx2::mask_blend_epi32
#define _mm512_mask_max_ps ::metronome::avx2::mask_max_ps
#define _mm512_cmp_ps_mask(a, b, p) ::metronome::avx2::cmp_ps_mask<(p)>(a, b)
#define _mm512_castps_si512 ::metronome::avx2::castps_si512
#define _mm512_castsi512_ps ::metronome::avx2::castsi512_ps
#define _mm512_castps512_ps256 ::metronome::avx2::castps512_ps256
#define _mm512_zextps256_ps512 ::metronome::avx2::zextps256_ps512
#define _mm512_castps256_ps512 ::metronome::avx2::castps256_ps512
#define _mm512_castps128_ps512 ::metronome::avx2::castps128_ps512
#define _mm512_zextsi256_si512 ::metronome::avx2::zextsi256_si512
#define _mm512_castsi256_si512 ::metronome::avx2::castsi256_si512
#define _mm512_zextsi128_si512 ::metronome::avx2::zextsi128_si512
#define _mm512_cvtph_ps ::metronome::avx2::cvtph_ps
#define _mm512_cvtepu16_epi32 ::metronome::avx2::cvtepu16_epi32
#define _mm512_cvtepi8_epi32 ::metronome::avx2::cvtepi8_epi32
#define _mm512_cvtepu8_epi32 ::metronome::avx2::cvtepu8_epi32
#define _mm512_cvtepu8_epi16 ::metronome::avx2::cvtepu8_epi16
#define _mm512_cvtepi32_epi16 ::metronome::avx2::cvtepi32_epi16
#define _mm512_cvtsepi32_epi8 ::metronome::avx2::cvtsepi32_epi8
#define _mm512_extractf32x8_ps(a, i) ::metronome::avx2::extractf32x8_ps<(i)>(a)
#define _mm512_extracti64x4_epi64(a, i) ::metronome::avx2::extracti64x4_epi64<(i)>(a)
#define _mm512_inserti64x4(a, b, i) ::metronome::avx2::inserti64x4<(i)>(a, b)
#define _mm512_broadcast_i32x4 ::metronome::avx2::broadcast_i32x4
#define _mm512_broadcast_i64x4 ::metronome::avx2::broadcast_i64x4
#define _mm512_mask_broadcast_i64x2 ::metronome::avx2::mask_broadcast_i64x2
#define _mm512_maskz_broadcast_i64x2 ::metronome::avx2::maskz_broadcast_i64x2
#define _mm512_maskz_broadcast_i32x2 ::metronome::avx2::maskz_broadcast_i32x2
#define _mm512_shuffle_f32x4(a, b, imm) ::metronome::avx2::shuffle_f32x4<(imm)>(a, b)
#define _mm512_permutexvar_ps ::metronome::avx2::permutexvar_ps
#define _mm512_maskz_permutexvar_ps ::metronome::avx2::maskz_permutexvar_ps
#define _mm512_permutexvar_epi32 ::metronome::avx2::permutexvar_epi32
#define _mm512_reduce_max_ps ::metronome::avx2::reduce_max_ps
#define _mm512_reduce_add_epi32 ::metronome::avx2::reduce_add_epi32

#endif  // METRONOME_AVX2_NO_ALIASES
