"""csrc/avx2.h against the instructions it stands in for: every function, on random inputs, gives the
native AVX-512 intrinsic's result bit for bit.

The kernels compile through avx2.h on CPUs without AVX-512, and there the kernel tests check them against
their references. This test checks the other direction on a CPU that has AVX-512: a C++ program (built
here with g++) runs each native intrinsic and its avx2.h function on the same random registers, masks and
memory, and reports the first difference. Where the CPU has no AVX-512, the program still checks every
nontrivial function against a scalar definition of the instruction, lane by lane (Intel's pseudo-code)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from metronome.kernels.build import CFLAGS, SOURCE_DIR, KernelBuildError, instruction_set

HARNESS = r"""
#include <algorithm>
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#define METRONOME_AVX2_NO_ALIASES
#include "avx2.h"

// The native half needs every AVX-512 part the kernels' native build uses (build.py's "avx512").
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512VNNI__) && \
    defined(__AVX512DQ__)
#define NATIVE 1
#endif

using namespace metronome;

static uint64_t state = 0x9E3779B97F4A7C15ull;
static uint64_t next() { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state; }
static int failures = 0;

template <class A, class B>
static void same(const char* name, const A& native, const B& emulated) {
  static_assert(sizeof(A) == sizeof(B));
  if (std::memcmp(&native, &emulated, sizeof(A)) != 0 && failures++ < 20) std::printf("DIFFERS %s\n", name);
}
static __m128i r128() { alignas(16) uint64_t v[2] = {next(), next()}; return _mm_load_si128(reinterpret_cast<__m128i*>(v)); }
static __m256i r256() { alignas(32) uint64_t v[4] = {next(), next(), next(), next()}; return _mm256_load_si256(reinterpret_cast<__m256i*>(v)); }

#ifdef NATIVE
// Random registers: any bits (integers), or floats that are finite, with some NaN, infinity and -0 lanes.
static __m512i ri() { alignas(64) uint64_t v[8]; for (auto& x : v) x = next(); return _mm512_load_si512(v); }
static __m512 rf() {
  alignas(64) float v[16];
  for (auto& x : v) {
    uint64_t r = next();
    switch (r % 16) {
      case 0: x = NAN; break;
      case 1: x = (r & 64) ? INFINITY : -INFINITY; break;
      case 2: x = -0.0f; break;
      default: x = static_cast<float>(static_cast<int64_t>(r >> 20) % 2000001 - 1000000) / 977.0f;
    }
  }
  return _mm512_load_ps(v);
}

static avx2::f512 E(__m512 a) { avx2::f512 r; std::memcpy(&r, &a, 64); return r; }
static avx2::i512 E(__m512i a) { avx2::i512 r; std::memcpy(&r, &a, 64); return r; }

static void against_native() {
  for (int round = 0; round < 2000; ++round) {
    __m512 a = rf(), b = rf(), c = rf();
    __m512i x = ri(), y = ri(), z = ri();
    uint16_t k = static_cast<uint16_t>(next());
    uint64_t k64 = next();
    uint8_t k8 = static_cast<uint8_t>(next());
    same("add_ps", _mm512_add_ps(a, b), avx2::add_ps(E(a), E(b)));
    same("sub_ps", _mm512_sub_ps(a, b), avx2::sub_ps(E(a), E(b)));
    same("mul_ps", _mm512_mul_ps(a, b), avx2::mul_ps(E(a), E(b)));
    same("div_ps", _mm512_div_ps(a, b), avx2::div_ps(E(a), E(b)));
    same("min_ps", _mm512_min_ps(a, b), avx2::min_ps(E(a), E(b)));
    same("max_ps", _mm512_max_ps(a, b), avx2::max_ps(E(a), E(b)));
    same("and_ps", _mm512_and_ps(a, b), avx2::and_ps(E(a), E(b)));
    same("xor_ps", _mm512_xor_ps(a, b), avx2::xor_ps(E(a), E(b)));
    same("fmadd_ps", _mm512_fmadd_ps(a, b, c), avx2::fmadd_ps(E(a), E(b), E(c)));
    same("fnmadd_ps", _mm512_fnmadd_ps(a, b, c), avx2::fnmadd_ps(E(a), E(b), E(c)));
    same("add_epi32", _mm512_add_epi32(x, y), avx2::add_epi32(E(x), E(y)));
    same("mullo_epi32", _mm512_mullo_epi32(x, y), avx2::mullo_epi32(E(x), E(y)));
    same("and_si512", _mm512_and_si512(x, y), avx2::and_si512(E(x), E(y)));
    same("or_si512", _mm512_or_si512(x, y), avx2::or_si512(E(x), E(y)));
    same("xor_si512", _mm512_xor_si512(x, y), avx2::xor_si512(E(x), E(y)));
    __m512i shifts = _mm512_and_si512(y, _mm512_set1_epi64(63));
    same("srlv_epi64", _mm512_srlv_epi64(x, shifts), avx2::srlv_epi64(E(x), E(shifts)));
    same("maddubs_epi16", _mm512_maddubs_epi16(x, y), avx2::maddubs_epi16(E(x), E(y)));
    same("shuffle_epi8", _mm512_shuffle_epi8(x, y), avx2::shuffle_epi8(E(x), E(y)));
    same("abs_epi8", _mm512_abs_epi8(x), avx2::abs_epi8(E(x)));
    same("cvtepi32_ps", _mm512_cvtepi32_ps(x), avx2::cvtepi32_ps(E(x)));
    same("cvtps_epi32", _mm512_cvtps_epi32(a), avx2::cvtps_epi32(E(a)));
    same("slli_epi16", _mm512_slli_epi16(x, 4), avx2::slli_epi16<4>(E(x)));
    same("srli_epi16", _mm512_srli_epi16(x, 4), avx2::srli_epi16<4>(E(x)));
    same("slli_epi32", _mm512_slli_epi32(x, 16), avx2::slli_epi32<16>(E(x)));
    same("srli_epi32", _mm512_srli_epi32(x, 16), avx2::srli_epi32<16>(E(x)));
    same("shuffle_ps", _mm512_shuffle_ps(a, b, 0x8D), avx2::shuffle_ps<0x8D>(E(a), E(b)));
    same("roundscale_ps", _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
         avx2::roundscale_ps<_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC>(E(a)));
    same("ternarylogic_epi32", _mm512_ternarylogic_epi32(x, y, z, 0xF8), avx2::ternarylogic_epi32<0xF8>(E(x), E(y), E(z)));
    same("dpbusd_epi32", _mm512_dpbusd_epi32(z, x, y), avx2::dpbusd_epi32(E(z), E(x), E(y)));
    same("dpwssd_epi32", _mm512_dpwssd_epi32(z, x, y), avx2::dpwssd_epi32(E(z), E(x), E(y)));
    same("maskz_mov_ps", _mm512_maskz_mov_ps(k, a), avx2::maskz_mov_ps(k, E(a)));
    same("maskz_mov_epi8", _mm512_maskz_mov_epi8(k64, x), avx2::maskz_mov_epi8(k64, E(x)));
    same("mask_blend_epi32", _mm512_mask_blend_epi32(k, x, y), avx2::mask_blend_epi32(k, E(x), E(y)));
    same("mask_max_ps", _mm512_mask_max_ps(c, k, a, b), avx2::mask_max_ps(E(c), k, E(a), E(b)));
    same("cmp_ps_mask ORD", static_cast<unsigned>(_mm512_cmp_ps_mask(a, b, _CMP_ORD_Q)), avx2::cmp_ps_mask<_CMP_ORD_Q>(E(a), E(b)));
    same("cmp_ps_mask LT", static_cast<unsigned>(_mm512_cmp_ps_mask(a, b, _CMP_LT_OQ)), avx2::cmp_ps_mask<_CMP_LT_OQ>(E(a), E(b)));
    __m256i h = r256(); __m128i q = r128();
    same("cvtph_ps", _mm512_cvtph_ps(h), avx2::cvtph_ps(h));
    same("cvtepu16_epi32", _mm512_cvtepu16_epi32(h), avx2::cvtepu16_epi32(h));
    same("cvtepi8_epi32", _mm512_cvtepi8_epi32(q), avx2::cvtepi8_epi32(q));
    same("cvtepu8_epi32", _mm512_cvtepu8_epi32(q), avx2::cvtepu8_epi32(q));
    same("cvtepu8_epi16", _mm512_cvtepu8_epi16(h), avx2::cvtepu8_epi16(h));
    same("cvtepi32_epi16", _mm512_cvtepi32_epi16(x), avx2::cvtepi32_epi16(E(x)));
    __m512i small = _mm512_srai_epi32(x, static_cast<int>(next() % 32));  // every magnitude, to saturate or not
    same("cvtsepi32_epi8", _mm512_cvtsepi32_epi8(small), avx2::cvtsepi32_epi8(E(small)));
    same("extractf32x8_ps", _mm512_extractf32x8_ps(a, 1), avx2::extractf32x8_ps<1>(E(a)));
    same("extracti64x4_epi64 0", _mm512_extracti64x4_epi64(x, 0), avx2::extracti64x4_epi64<0>(E(x)));
    same("extracti64x4_epi64 1", _mm512_extracti64x4_epi64(x, 1), avx2::extracti64x4_epi64<1>(E(x)));
    same("inserti64x4", _mm512_inserti64x4(x, h, 1), avx2::inserti64x4<1>(E(x), h));
    same("broadcast_i32x4", _mm512_broadcast_i32x4(q), avx2::broadcast_i32x4(q));
    same("broadcast_i64x4", _mm512_broadcast_i64x4(h), avx2::broadcast_i64x4(h));
    same("mask_broadcast_i64x2", _mm512_mask_broadcast_i64x2(x, k8, q), avx2::mask_broadcast_i64x2(E(x), k8, q));
    same("maskz_broadcast_i64x2", _mm512_maskz_broadcast_i64x2(k8, q), avx2::maskz_broadcast_i64x2(k8, q));
    same("maskz_broadcast_i32x2", _mm512_maskz_broadcast_i32x2(k, q), avx2::maskz_broadcast_i32x2(k, q));
    same("shuffle_f32x4", _mm512_shuffle_f32x4(a, b, 0xB4), avx2::shuffle_f32x4<0xB4>(E(a), E(b)));
    same("shuffle_f32x4", _mm512_shuffle_f32x4(a, b, 0x4E), avx2::shuffle_f32x4<0x4E>(E(a), E(b)));
    __m512i idx = ri();  // vpermps reads the low 4 bits
    same("permutexvar_ps", _mm512_permutexvar_ps(idx, a), avx2::permutexvar_ps(E(idx), E(a)));
    same("maskz_permutexvar_ps", _mm512_maskz_permutexvar_ps(k, idx, a), avx2::maskz_permutexvar_ps(k, E(idx), E(a)));
    same("permutexvar_epi32", _mm512_permutexvar_epi32(idx, x), avx2::permutexvar_epi32(E(idx), E(x)));
    __m512 finite = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(a, a, _CMP_ORD_Q), a);
    same("reduce_max_ps", _mm512_reduce_max_ps(finite), avx2::reduce_max_ps(E(finite)));
    same("reduce_add_epi32", _mm512_reduce_add_epi32(x), avx2::reduce_add_epi32(E(x)));
    same("set4_epi32", _mm512_set4_epi32(1, 2, 3, 4), avx2::set4_epi32(1, 2, 3, 4));
    same("setr_epi32", _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
         avx2::setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    same("setr_epi64", _mm512_setr_epi64(1, 2, 3, 4, 5, 6, 7, 8), avx2::setr_epi64(1, 2, 3, 4, 5, 6, 7, 8));
    same("zextps256_ps512", _mm512_zextps256_ps512(_mm512_castps512_ps256(a)), avx2::zextps256_ps512(_mm512_castps512_ps256(a)));
    same("zextsi128_si512", _mm512_zextsi128_si512(q), avx2::zextsi128_si512(q));
    // vexp's scaling: p in [0.5, 2), integral n in [-150, 129]
    alignas(64) float pv[16], nv[16];
    for (int j = 0; j < 16; ++j) {
      pv[j] = 0.5f + static_cast<float>(next() % 1000000) / 666667.0f;
      nv[j] = static_cast<float>(static_cast<int>(next() % 280) - 150);
    }
    __m512 p = _mm512_load_ps(pv), n = _mm512_load_ps(nv);
    same("scale_pow2", _mm512_scalef_ps(p, n), avx2::scale_pow2(E(p), E(n)));
    // memory: masked loads and stores touch only the mask's lanes; the scatter stores in lane order
    alignas(64) float src[16], dst_n[16], dst_e[16];
    std::memcpy(src, &a, 64);
    std::memcpy(dst_n, &b, 64);
    std::memcpy(dst_e, &b, 64);
    same("maskz_loadu_ps", _mm512_maskz_loadu_ps(k, src), avx2::maskz_loadu_ps(k, src));
    _mm512_mask_storeu_ps(dst_n, k, c);
    avx2::mask_storeu_ps(dst_e, k, E(c));
    same("mask_storeu_ps", dst_n, dst_e);
    uint16_t w_n[16], w_e[16];
    std::memcpy(w_n, &y, 32);
    std::memcpy(w_e, &y, 32);
    same("maskz_loadu_epi16", _mm256_maskz_loadu_epi16(k, w_n), avx2::maskz_loadu_epi16(k, w_n));
    _mm256_mask_storeu_epi16(w_n, k, h);
    avx2::mask_storeu_epi16(w_e, k, h);
    same("mask_storeu_epi16", w_n, w_e);
    __m512i at = _mm512_and_si512(ri(), _mm512_set1_epi32(15));  // indices in [0, 16), some repeated
    std::memcpy(dst_n, &b, 64);
    std::memcpy(dst_e, &b, 64);
    _mm512_mask_i32scatter_ps(dst_n, k, at, a, 4);
    avx2::mask_i32scatter_ps(dst_e, k, E(at), E(a), 4);
    same("mask_i32scatter_ps", dst_n, dst_e);
  }
}
#endif

// -- against scalar definitions (Intel's pseudo-code, lane by lane), on any CPU ---------------------------

template <class T, class V>
static std::array<T, sizeof(V) / sizeof(T)> L(const V& v) {
  std::array<T, sizeof(V) / sizeof(T)> r;
  std::memcpy(r.data(), &v, sizeof(V));
  return r;
}
template <class V, class T, size_t N>
static V R(const std::array<T, N>& lanes) {
  static_assert(sizeof(V) == N * sizeof(T));
  V v;
  std::memcpy(&v, lanes.data(), sizeof(V));
  return v;
}
static avx2::f512 rf2() {
  alignas(64) float v[16];
  for (auto& x : v) {
    uint64_t r = next();
    x = r % 16 == 0 ? NAN : r % 16 == 1 ? -0.0f : static_cast<float>(static_cast<int64_t>(r >> 20) % 2000001 - 1000000) / 977.0f;
  }
  return {_mm256_load_ps(v), _mm256_load_ps(v + 8)};
}
static avx2::i512 ri2() { alignas(64) uint64_t v[8]; for (auto& x : v) x = next(); return {_mm256_load_si256((__m256i*)v), _mm256_load_si256((__m256i*)(v + 4))}; }
static bool same_float(float a, float b) {
  return (std::isnan(a) && std::isnan(b)) || std::memcmp(&a, &b, 4) == 0;
}
template <size_t N>
static void same_floats(const char* name, const std::array<float, N>& want, const std::array<float, N>& got) {
  for (size_t j = 0; j < N; ++j)
    if (!same_float(want[j], got[j])) { if (failures++ < 20) std::printf("DIFFERS %s (scalar, lane %zu)\n", name, j); return; }
}
static float x86_max(float a, float b) { return a > b ? a : b; }  // maxps: the second operand unless a > b

static void against_scalar() {
  using F = std::array<float, 16>;
  using I32 = std::array<int32_t, 16>;
  for (int round = 0; round < 2000; ++round) {
    avx2::f512 a = rf2(), b = rf2(), c = rf2();
    avx2::i512 x = ri2(), y = ri2(), z = ri2();
    const unsigned k = static_cast<uint16_t>(next());
    const uint64_t k64 = next();
    const unsigned k8 = static_cast<uint8_t>(next());
    auto fa = L<float>(a), fb = L<float>(b), fc = L<float>(c);
    auto xa = L<int32_t>(x), ya = L<int32_t>(y), za = L<int32_t>(z);
    {  // vpdpbusd, vpdpwssd: exact sums, wrapping to 32 bits
      auto u8 = L<uint8_t>(x); auto s8 = L<int8_t>(y); auto a16 = L<int16_t>(x); auto b16 = L<int16_t>(y);
      I32 dp, dw;
      for (int j = 0; j < 16; ++j) {
        int64_t s = 0, w = 0;
        for (int i = 0; i < 4; ++i) s += int64_t(u8[4 * j + i]) * s8[4 * j + i];
        for (int i = 0; i < 2; ++i) w += int64_t(a16[2 * j + i]) * b16[2 * j + i];
        dp[j] = static_cast<int32_t>(static_cast<uint32_t>(za[j]) + static_cast<uint32_t>(s));
        dw[j] = static_cast<int32_t>(static_cast<uint32_t>(za[j]) + static_cast<uint32_t>(w));
      }
      same("dpbusd_epi32 (scalar)", dp, L<int32_t>(avx2::dpbusd_epi32(z, x, y)));
      same("dpwssd_epi32 (scalar)", dw, L<int32_t>(avx2::dpwssd_epi32(z, x, y)));
      std::array<int16_t, 32> mb;
      for (int j = 0; j < 32; ++j) {
        int32_t v = int32_t(u8[2 * j]) * s8[2 * j] + int32_t(u8[2 * j + 1]) * s8[2 * j + 1];
        mb[j] = static_cast<int16_t>(std::min(32767, std::max(-32768, v)));
      }
      same("maddubs_epi16 (scalar)", mb, L<int16_t>(avx2::maddubs_epi16(x, y)));
      std::array<uint8_t, 64> sh; auto xb = L<uint8_t>(x), yb = L<uint8_t>(y);
      for (int j = 0; j < 64; ++j) sh[j] = yb[j] & 0x80 ? 0 : xb[(j & ~15) + (yb[j] & 15)];
      same("shuffle_epi8 (scalar)", sh, L<uint8_t>(avx2::shuffle_epi8(x, y)));
    }
    {  // narrowing and widening
      std::array<int16_t, 16> t16; std::array<int8_t, 16> s8;
      avx2::i512 small = avx2::i512{_mm256_srai_epi32(x.lo, int(next() % 32)), _mm256_srai_epi32(x.hi, int(next() % 32))};
      auto sa = L<int32_t>(small);
      for (int j = 0; j < 16; ++j) { t16[j] = static_cast<int16_t>(xa[j]); s8[j] = static_cast<int8_t>(std::min(127, std::max(-128, sa[j]))); }
      same("cvtepi32_epi16 (scalar)", t16, L<int16_t>(avx2::cvtepi32_epi16(x)));
      same("cvtsepi32_epi8 (scalar)", s8, L<int8_t>(avx2::cvtsepi32_epi8(small)));
      __m128i q = _mm256_castsi256_si128(y.lo); __m256i h = y.hi;
      auto qb = L<int8_t>(q); auto qu = L<uint8_t>(q); auto hu = L<uint8_t>(h); auto h16 = L<uint16_t>(h);
      I32 e8, u8; std::array<int16_t, 32> u16; I32 w16; F ph;
      for (int j = 0; j < 16; ++j) { e8[j] = qb[j]; u8[j] = qu[j]; w16[j] = h16[j]; ph[j] = _cvtsh_ss(h16[j]); }
      for (int j = 0; j < 32; ++j) u16[j] = hu[j];
      same("cvtepi8_epi32 (scalar)", e8, L<int32_t>(avx2::cvtepi8_epi32(q)));
      same("cvtepu8_epi32 (scalar)", u8, L<int32_t>(avx2::cvtepu8_epi32(q)));
      same("cvtepu8_epi16 (scalar)", u16, L<int16_t>(avx2::cvtepu8_epi16(h)));
      same("cvtepu16_epi32 (scalar)", w16, L<int32_t>(avx2::cvtepu16_epi32(h)));
      same_floats("cvtph_ps (scalar)", ph, L<float>(avx2::cvtph_ps(h)));
      // broadcasts of q under masks
      auto q64 = L<int64_t>(q); auto q32 = L<int32_t>(q); auto x64 = L<int64_t>(x);
      std::array<int64_t, 8> mb; I32 mz;
      for (int j = 0; j < 8; ++j) mb[j] = k8 >> j & 1 ? q64[j % 2] : x64[j];
      for (int j = 0; j < 16; ++j) mz[j] = k >> j & 1 ? q32[j % 2] : 0;
      same("mask_broadcast_i64x2 (scalar)", mb, L<int64_t>(avx2::mask_broadcast_i64x2(x, k8, q)));
      same("maskz_broadcast_i32x2 (scalar)", mz, L<int32_t>(avx2::maskz_broadcast_i32x2(k, q)));
      I32 b4; for (int j = 0; j < 16; ++j) b4[j] = q32[j % 4];
      same("broadcast_i32x4 (scalar)", b4, L<int32_t>(avx2::broadcast_i32x4(q)));
    }
    {  // lanes moved across the register
      F perm, permz, sf, sp; I32 blend, tl; auto idx = L<int32_t>(x);
      for (int j = 0; j < 16; ++j) {
        perm[j] = fa[idx[j] & 15];
        permz[j] = k >> j & 1 ? fa[idx[j] & 15] : 0.0f;
        blend[j] = k >> j & 1 ? ya[j] : xa[j];
        tl[j] = xa[j] | (ya[j] & za[j]);
        const int lane = j / 4, sel = (0xB4 >> (2 * lane)) & 3;
        sf[j] = (lane < 2 ? fa : fb)[4 * sel + j % 4];
        const int e = j % 4, pick = (0x8D >> (2 * e)) & 3;
        sp[j] = (e < 2 ? fa : fb)[4 * lane + pick];
      }
      same_floats("permutexvar_ps (scalar)", perm, L<float>(avx2::permutexvar_ps(x, a)));
      same_floats("maskz_permutexvar_ps (scalar)", permz, L<float>(avx2::maskz_permutexvar_ps(k, x, a)));
      same("mask_blend_epi32 (scalar)", blend, L<int32_t>(avx2::mask_blend_epi32(k, x, y)));
      same("ternarylogic_epi32 0xF8 (scalar)", tl, L<int32_t>(avx2::ternarylogic_epi32<0xF8>(x, y, z)));
      same_floats("shuffle_f32x4 0xB4 (scalar)", sf, L<float>(avx2::shuffle_f32x4<0xB4>(a, b)));
      same_floats("shuffle_ps 0x8D (scalar)", sp, L<float>(avx2::shuffle_ps<0x8D>(a, b)));
      I32 s4; const int four[4] = {4, 3, 2, 1}; for (int j = 0; j < 16; ++j) s4[j] = four[j % 4];
      same("set4_epi32 (scalar)", s4, L<int32_t>(avx2::set4_epi32(1, 2, 3, 4)));
      std::array<uint64_t, 8> sv; auto xu = L<uint64_t>(x), cu = L<uint64_t>(y);
      avx2::i512 counts{_mm256_and_si256(y.lo, _mm256_set1_epi64x(63)), _mm256_and_si256(y.hi, _mm256_set1_epi64x(63))};
      for (int j = 0; j < 8; ++j) sv[j] = xu[j] >> (cu[j] & 63);
      same("srlv_epi64 (scalar)", sv, L<uint64_t>(avx2::srlv_epi64(x, counts)));
    }
    {  // masks
      F mm, mz; std::array<uint8_t, 64> mb; auto xb = L<uint8_t>(x);
      unsigned ord = 0, lt = 0;
      for (int j = 0; j < 16; ++j) {
        mm[j] = k >> j & 1 ? x86_max(fa[j], fb[j]) : fc[j];
        mz[j] = k >> j & 1 ? fa[j] : 0.0f;
        ord |= unsigned(!std::isnan(fa[j]) && !std::isnan(fb[j])) << j;
        lt |= unsigned(fa[j] < fb[j]) << j;
      }
      for (int j = 0; j < 64; ++j) mb[j] = k64 >> j & 1 ? xb[j] : 0;
      same_floats("mask_max_ps (scalar)", mm, L<float>(avx2::mask_max_ps(c, k, a, b)));
      same_floats("maskz_mov_ps (scalar)", mz, L<float>(avx2::maskz_mov_ps(k, a)));
      same("maskz_mov_epi8 (scalar)", mb, L<uint8_t>(avx2::maskz_mov_epi8(k64, x)));
      same("cmp_ps_mask ORD (scalar)", ord, avx2::cmp_ps_mask<_CMP_ORD_Q>(a, b));
      same("cmp_ps_mask LT (scalar)", lt, avx2::cmp_ps_mask<_CMP_LT_OQ>(a, b));
    }
    {  // reductions, rounding, e^x's scaling
      int64_t sum = 0; float mx = -INFINITY; F rs; bool finite = true;
      for (int j = 0; j < 16; ++j) {
        sum += xa[j];
        finite = finite && !std::isnan(fa[j]);
        mx = std::max(mx, fa[j]);
        rs[j] = std::nearbyint(fa[j]);
      }
      same("reduce_add_epi32 (scalar)", static_cast<int32_t>(static_cast<uint32_t>(sum)), avx2::reduce_add_epi32(x));
      if (finite && avx2::reduce_max_ps(a) != mx && failures++ < 20) std::printf("DIFFERS reduce_max_ps (scalar)\n");
      same_floats("roundscale_ps (scalar)", rs, L<float>(avx2::roundscale_ps<_MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC>(a)));
      F p, n, want;
      for (int j = 0; j < 16; ++j) {
        p[j] = 0.5f + static_cast<float>(next() % 1000000) / 666667.0f;
        n[j] = static_cast<float>(static_cast<int>(next() % 280) - 150);
        want[j] = std::ldexp(p[j], static_cast<int>(n[j]));
      }
      same_floats("scale_pow2 (scalar)", want, L<float>(avx2::scale_pow2(R<avx2::f512>(p), R<avx2::f512>(n))));
    }
    {  // memory: only the mask's lanes are read or written; the scatter stores in lane order
      alignas(64) float mem[16], out[16], ref[16];
      std::memcpy(mem, fa.data(), 64); std::memcpy(out, fb.data(), 64); std::memcpy(ref, fb.data(), 64);
      F ld; for (int j = 0; j < 16; ++j) { ld[j] = k >> j & 1 ? mem[j] : 0.0f; if (k >> j & 1) ref[j] = fc[j]; }
      same_floats("maskz_loadu_ps (scalar)", ld, L<float>(avx2::maskz_loadu_ps(k, mem)));
      avx2::mask_storeu_ps(out, k, c);
      same("mask_storeu_ps (scalar)", ref, out);
      uint16_t w[16], wout[16], wref[16]; std::array<uint16_t, 16> wl; auto h16 = L<uint16_t>(y.hi);
      std::memcpy(w, &x.lo, 32); std::memcpy(wout, &z.lo, 32); std::memcpy(wref, &z.lo, 32);
      for (int j = 0; j < 16; ++j) { wl[j] = k >> j & 1 ? w[j] : 0; if (k >> j & 1) wref[j] = h16[j]; }
      same("maskz_loadu_epi16 (scalar)", wl, L<uint16_t>(avx2::maskz_loadu_epi16(k, w)));
      avx2::mask_storeu_epi16(wout, k, y.hi);
      same("mask_storeu_epi16 (scalar)", wref, wout);
      I32 at; for (int j = 0; j < 16; ++j) at[j] = za[j] & 15;
      std::memcpy(out, fb.data(), 64); std::memcpy(ref, fb.data(), 64);
      for (int j = 0; j < 16; ++j) if (k >> j & 1) ref[at[j]] = fa[j];
      avx2::mask_i32scatter_ps(out, k, R<avx2::i512>(at), a, 4);
      same("mask_i32scatter_ps (scalar)", ref, out);
    }
  }
}

int main() {
#ifdef NATIVE
  against_native();
  std::printf("compared with the native instructions\n");
#endif
  against_scalar();
  std::printf("failures %d\n", failures);
  return failures != 0;
}
"""


@pytest.fixture(scope="module")
def isa() -> str:
    try:
        found = instruction_set()
    except KernelBuildError as e:  # another CPU kind: nothing here builds
        pytest.skip(str(e))
    if shutil.which("g++") is None:
        pytest.skip("no g++ to build the comparison")
    return found


def test_avx2_functions_equal_their_definitions(isa: str, tmp_path: Path) -> None:
    """Every avx2.h function against a scalar definition of its instruction (on every x86 CPU), and, where
    the CPU has AVX-512, against the native instruction too (the harness prints which it did)."""
    source = tmp_path / "harness.cpp"
    source.write_text(HARNESS)
    binary = tmp_path / "harness"
    flags = [f for f in CFLAGS if f != "-pthread"]
    subprocess.run(
        ["g++", *flags, "-std=c++20", f"-I{SOURCE_DIR}", str(source), "-o", str(binary)],
        check=True,
        timeout=300,
    )
    run = subprocess.run([str(binary)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "failures 0" in run.stdout
    assert ("compared with the native instructions" in run.stdout) == (isa == "avx512")
