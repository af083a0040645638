// Block matmuls (see blocks.h): GGUF Q8_0 rows against float32 x, and every block kind against int8 x.

#include "blocks.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <type_traits>
#include <vector>

#include <signal.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

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

// Rows of one segment are read by tiles of NT rows side by side: rows too short for the hardware
// prefetcher to follow, so each block step prefetches its share of the bytes kPrefetchRows rows further
// on (the segment is read front to back, tile after tile).
constexpr int64_t kPrefetchRows = 8;

template <int64_t kBytes>
inline void prefetch_step(const char* p) {
  for (int64_t o = 0; o < kBytes; o += 64) _mm_prefetch(p + o, _MM_HINT_T0);
}

// NT output rows (from local row n0, written at y column n0) x MT rows of x, starting at row m0; y has
// ldy columns.
template <int NT, int MT>
void q8_tile(const uint8_t* wq, int64_t row_bytes, const float* xf, int64_t K, float* y, int64_t ldy, int64_t n0,
             int64_t m0) {
  __m512 acc[NT][MT];
  for (int n = 0; n < NT; ++n)
    for (int m = 0; m < MT; ++m) acc[n][m] = _mm512_setzero_ps();
  const int64_t nblocks = K / kQ8Block;
  const char* pf = reinterpret_cast<const char*>(wq + (n0 + kPrefetchRows) * row_bytes);
  for (int64_t b = 0; b < nblocks; ++b) {
    prefetch_step<NT * kQ8Bytes>(pf + b * NT * kQ8Bytes);  // NT*34 bytes per step cover NT rows over K/32 steps
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
    for (int m = 0; m < MT; ++m) y[(m0 + m) * ldy + n0 + n] = hsum(acc[n][m]);
}

template <int MT>
void q8_columns(const uint8_t* wq, int64_t row_bytes, const float* xf, int64_t K, float* y, int64_t ldy, int64_t n_lo,
                int64_t n_hi, int64_t m0) {
  constexpr int NT = MT <= 4 ? 4 : 2;  // NT * MT accumulators + 2 * NT weights fit the 32 registers
  int64_t n = n_lo;
  for (; n + NT <= n_hi; n += NT) q8_tile<NT, MT>(wq, row_bytes, xf, K, y, ldy, n, m0);
  for (; n < n_hi; ++n) q8_tile<1, MT>(wq, row_bytes, xf, K, y, ldy, n, m0);
}

void q8_columns_any(int64_t mt, const uint8_t* wq, int64_t row_bytes, const float* xf, int64_t K, float* y, int64_t ldy,
                    int64_t n_lo, int64_t n_hi, int64_t m0) {
  switch (mt) {
    case 1: q8_columns<1>(wq, row_bytes, xf, K, y, ldy, n_lo, n_hi, m0); break;
    case 2: q8_columns<2>(wq, row_bytes, xf, K, y, ldy, n_lo, n_hi, m0); break;
    case 3: q8_columns<3>(wq, row_bytes, xf, K, y, ldy, n_lo, n_hi, m0); break;
    case 4: q8_columns<4>(wq, row_bytes, xf, K, y, ldy, n_lo, n_hi, m0); break;
    case 5: q8_columns<5>(wq, row_bytes, xf, K, y, ldy, n_lo, n_hi, m0); break;
    case 6: q8_columns<6>(wq, row_bytes, xf, K, y, ldy, n_lo, n_hi, m0); break;
    case 7: q8_columns<7>(wq, row_bytes, xf, K, y, ldy, n_lo, n_hi, m0); break;
    default: q8_columns<8>(wq, row_bytes, xf, K, y, ldy, n_lo, n_hi, m0); break;
  }
}

// ---------------------------------------------------------------------------------------------------
// Activations quantized to int8, as llama.cpp pairs them with each weight format: per block of 32
// (its Q8_0/Q8_1 activations) for the 32-weight kinds, per block of 256 (its Q8_K) for the K-quants.
// Per block: dx = max|x| / 127, x8 = round(x / dx); and integer sums of x8 that the formats' offsets
// and minimums multiply (exact: the offsets then cancel exactly in integers).

// A block of one x row as the 32-weight packed kinds' tiles read it (the X16 kinds): its 32 int8 values, then
// that block's o16, o128, dx and sx. The records of one block for every row lie side by side (xr is (K/32, M) records),
// so a tile's 8 rows of a block are at fixed distances from one pointer.
constexpr int64_t kRecordBytes = 48, kRecordO16 = 32, kRecordO128 = 36, kRecordDx = 40, kRecordSx = 44;

struct XQuant {
  int8_t* x8;        // (M, K) per-32 blocks
  float* dx;         // (M, K/32)
  float* sx;         // (M, K/32): dx * sum of the block's x8 (packed Q4's and Q5_1's minimum term)
  int32_t* bs;       // (M, K/32): sum of the block's x8
  int32_t* o16;      // (M, K/32): -16 * bs, Q5_0's offset term (the start of its integer sums)
  int32_t* o128;     // (M, K/32): -128 * bs, Q8_0's (codes q + 128)
  int8_t* x8k;       // (M, K) per-256 blocks
  int8_t* x8kp;      // (M, K) the same, 32-value sub-blocks in the order 0, 2, 1, 3, 4, 6, 5, 7 (Q4_K/Q5_K's codes)
  float* dxk;        // (M, K/256)
  int32_t* bs32;     // (M, K/32): sums of x8k over 32 (Q4_K/Q5_K minimums)
  int32_t* bs16;     // (M, K/16): sums of x8k over 16 (Q6_K's offset, per 16-weight scale)
  int32_t* bs32p;    // (M, K/64): bs32 in int16 pairs, (bs32[2k] low, bs32[2k+1] high) (packed Q4_K's minimums)
  int32_t* o32;      // (M, K/16): -32 * bs16, packed Q6_K's offset term (the start of its integer sums)
  float* mk;         // (M, K/256, 16): dxk * bs32 in lanes 0..7, 0 in 8..15 (Q4_K/Q5_K's minimum term)
  float* m6;         // (M, K/16): dxk * bs16 (Q6_K's offset term)
  uint8_t* xr;       // (K/32, M) records of kRecordBytes: x8, o16, o128, dx, sx of one block (packed kinds' tiles)
  int64_t xr_block;  // bytes from a row's record of block b to its record of block b + 1 (M records)
};

inline uint8_t* align64(uint8_t* p) {
  return reinterpret_cast<uint8_t*>((reinterpret_cast<uintptr_t>(p) + 63) & ~static_cast<uintptr_t>(63));
}

XQuant carve(uint8_t* scratch, int64_t M, int64_t K) {
  XQuant q;
  uint8_t* p = align64(scratch);
  auto take = [&](int64_t bytes) {
    uint8_t* r = p;
    p = align64(p + bytes);
    return r;
  };
  q.x8 = reinterpret_cast<int8_t*>(take(M * K));
  q.dx = reinterpret_cast<float*>(take(M * (K / 32) * 4));
  q.sx = reinterpret_cast<float*>(take(M * (K / 32) * 4));
  q.bs = reinterpret_cast<int32_t*>(take(M * (K / 32) * 4));
  q.o16 = reinterpret_cast<int32_t*>(take(M * (K / 32) * 4));
  q.o128 = reinterpret_cast<int32_t*>(take(M * (K / 32) * 4));
  q.x8k = reinterpret_cast<int8_t*>(take(M * K));
  q.x8kp = reinterpret_cast<int8_t*>(take(M * K));
  q.dxk = reinterpret_cast<float*>(take(M * (K / 256) * 4));
  q.bs32 = reinterpret_cast<int32_t*>(take(M * (K / 32) * 4));
  q.bs16 = reinterpret_cast<int32_t*>(take(M * (K / 16) * 4));
  q.bs32p = reinterpret_cast<int32_t*>(take(M * (K / 64) * 4));
  q.o32 = reinterpret_cast<int32_t*>(take(M * (K / 16) * 4));
  q.mk = reinterpret_cast<float*>(take(M * (K / 256) * 64));
  q.m6 = reinterpret_cast<float*>(take(M * (K / 16) * 4));
  q.xr = take(M * (K / 32) * kRecordBytes);
  q.xr_block = M * kRecordBytes;
  return q;
}

inline __m512 abs_ps(__m512 v) { return _mm512_and_ps(v, _mm512_castsi512_ps(_mm512_set1_epi32(0x7FFFFFFF))); }

// Elements of x per parallel chunk of a quantization. A prompt chunk's activations are quantized before every
// matmul, four times a layer; on the calling thread alone that was ~5 % of a 256-row chunk of SmolLM2 while
// the other threads spun (perf, docs/performance.md). Smaller chunks than the plain ops' cost more in hand-offs
// than they save (at 4,096 elements an 8-row decode step ran 3-5 % slower). Blocks are independent, so the split
// never changes a bit.
constexpr int64_t kQuantizeGrainElems = kMinParallelElems;

// x (M, K) -> q.x8, q.dx, q.sx, q.bs, q.o16, q.o128.
void quantize_32(const float* x, int64_t M, int64_t K, const XQuant& q) {
  const int64_t nb = K / 32;
  parallel_for(0, M * nb, grain_for(32, kQuantizeGrainElems), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const __m512 v0 = _mm512_loadu_ps(x + i * 32), v1 = _mm512_loadu_ps(x + i * 32 + 16);
      const float amax = int8_amax(_mm512_reduce_max_ps(_mm512_max_ps(abs_ps(v0), abs_ps(v1))));
      const __m512 s = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(v0, s)), q1 = _mm512_cvtps_epi32(_mm512_mul_ps(v1, s));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q.x8 + i * 32), _mm512_cvtsepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q.x8 + i * 32 + 16), _mm512_cvtsepi32_epi8(q1));
      q.dx[i] = amax / 127.0f;
      q.bs[i] = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));  // exact integer sum
      q.sx[i] = q.dx[i] * static_cast<float>(q.bs[i]);
      q.o16[i] = -16 * q.bs[i];
      q.o128[i] = -128 * q.bs[i];
      uint8_t* r = q.xr + (i % nb) * q.xr_block + (i / nb) * kRecordBytes;
      std::memcpy(r, q.x8 + i * 32, 32);
      std::memcpy(r + kRecordO16, q.o16 + i, 4);
      std::memcpy(r + kRecordO128, q.o128 + i, 4);
      std::memcpy(r + kRecordDx, q.dx + i, 4);
      std::memcpy(r + kRecordSx, q.sx + i, 4);
    }
  });
}

// x (M, K) -> q.x8k, q.x8kp, q.dxk, q.bs32, q.bs16, q.bs32p, q.o32, q.mk, q.m6 (K a multiple of 256).
void quantize_256(const float* x, int64_t M, int64_t K, const XQuant& q) {
  const int64_t nb = K / 256;
  parallel_for(0, M * nb, grain_for(256, kQuantizeGrainElems), [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      const float* xb = x + i * 256;
      __m512 mx = _mm512_setzero_ps();
      for (int j = 0; j < 16; ++j) mx = _mm512_max_ps(mx, abs_ps(_mm512_loadu_ps(xb + 16 * j)));
      const float amax = int8_amax(_mm512_reduce_max_ps(mx));
      const __m512 s = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
      q.dxk[i] = amax / 127.0f;
      for (int j = 0; j < 16; ++j) {
        const __m512i v = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_loadu_ps(xb + 16 * j), s));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q.x8k + i * 256 + 16 * j), _mm512_cvtsepi32_epi8(v));
        q.bs16[i * 16 + j] = _mm512_reduce_add_epi32(v);
      }
      for (int j = 0; j < 8; ++j) q.bs32[i * 8 + j] = q.bs16[i * 16 + 2 * j] + q.bs16[i * 16 + 2 * j + 1];
      for (int j = 0; j < 4; ++j)  // |bs32| <= 32 * 127: an int16 each
        q.bs32p[i * 4 + j] = static_cast<int32_t>((static_cast<uint32_t>(q.bs32[i * 8 + 2 * j]) & 0xFFFFu) |
                                                  (static_cast<uint32_t>(q.bs32[i * 8 + 2 * j + 1]) << 16));
      for (int j = 0; j < 16; ++j) q.o32[i * 16 + j] = -32 * q.bs16[i * 16 + j];
      const __m256 mk =
          _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q.bs32 + i * 8))),
                        _mm256_set1_ps(q.dxk[i]));
      _mm512_storeu_ps(q.mk + i * 16, _mm512_zextps256_ps512(mk));
      _mm512_storeu_ps(q.m6 + i * 16, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(q.bs16 + i * 16)),
                                                    _mm512_set1_ps(q.dxk[i])));
      constexpr int kOrder[8] = {0, 2, 1, 3, 4, 6, 5, 7};
      for (int j = 0; j < 8; ++j) std::memcpy(q.x8kp + i * 256 + 32 * j, q.x8k + i * 256 + 32 * kOrder[j], 32);
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// A thread's rows of a packed matrix are one sequential stream, which the hardware prefetcher here follows
// poorly (it restarts at every 4 KB page): each block step asks for the bytes kQ4Ahead further on. From
// memory this read a one-row Q4 matmul 1.6x faster (docs/moe.md). Those requests go to L2 (hint T1), and a
// second one, kNearAhead on, brings the lines into L1 (T0). With T0 alone at kQ4Ahead, one-row Q4_K, Q5_0
// and Q4_1 matmuls streamed from memory read 1.2-1.4x slower on the Intel Xeon VM; with T1 alone, weights
// held in L3 (SmolLM2's there) read up to 8 % slower (docs/performance.md, 2026-12-03). A likely reason, not
// measured: a T0 request holds one of L1's few fill buffers until its line arrives from memory.
// The far request is kQ4Ahead on, or one block on where a block is longer (Q4_KX16's 2,304 bytes, Q6_KX16's
// 3,360), so that a block's requests reach the whole of the block after it. On AMD 2 KB: on the Zen 4 EPYC,
// from memory at 2 threads, one row of x, 2 KB (or one block) against 4 KB read Q4_K 1.12-1.26x, Q6_K
// 1.05-1.07x, Q5_0 1.12x and Q8_0 1.27x faster, and two blocks on (4.6 and 6.7 KB) 0.86-0.90x. Elsewhere
// 4 KB: on the Intel Xeon VM 4 KB read the 32-weight kinds 1.04-1.09x faster from memory and SmolLM2's
// 8-row step (its weights in L3) ran 1.08x faster (docs/performance.md, 2026-12-05).
constexpr int64_t kQ4Ahead = kAmdCpu ? 2048 : 4096;
constexpr int64_t kNearAhead = 1024;

// ---------------------------------------------------------------------------------------------------
// GGUF blocks repacked 16 rows side by side (pack.cpp, once per plan: compile/quant.py pack_16_rows). In the
// file each row is its own run of blocks, and a kernel over it needs a float step (a conversion and a
// multiply-add) per sub-block of each row. Packed, one int32 lane holds one row's 4 consecutive weights
// per vector, which is what vpdpbusd multiplies against 4 bytes of x broadcast to every lane: a vector of
// codes adds 4 products to each of 16 rows at once, integer sums stay exact, and the float step is paid
// once per block for 16 rows. A row's result is its own lane, summed block after block: the order depends
// only on (row, block), the same whatever M, the tile or the thread split.
//
// Every packed kind stores its codes in the same unit, 64 bytes for 32 weights of 16 rows ("nibble
// vectors"): byte 4r+i holds row r's weight 8v+i in the low nibble and 8v+4+i in the high one (vector v of
// a run), so a vector unpacks into the codes of two consecutive quads of weights.

// Rows of x per pass over a weight tile: a block is unpacked once per pass, so more rows share it.
constexpr int64_t kRowsPerPass = 8;

// The codes of nibble vector p: c[0] = weights 8v..8v+3 of each row, c[1] = 8v+4..8v+7, in [0, 16).
inline void nibble_quads(const uint8_t* p, __m512i* c) {
  const __m512i low4 = _mm512_set1_epi8(0x0F), q = _mm512_loadu_si512(p);
  c[0] = _mm512_and_si512(q, low4);
  c[1] = _mm512_and_si512(_mm512_srli_epi16(q, 4), low4);
}

// 16 fp16 at p as floats (a group's scales: row r's in lane r).
inline __m512 fp16x16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

// Ask for the lines of part `part` of kParts of a packed block kQ4Ahead (or a block of kBytes, rounded up to
// a line) further on into L2, and kNearAhead on into L1 (a thread's groups are one sequential stream). A
// loop over a block's steps can spread its requests over them: all at the block's start, Q4_KX16's 36 lines
// and Q6_KX16's 53 ran one row of x from memory 1.03-1.26x and 1.19-1.46x slower on the Zen 4 EPYC, and
// faster on the Intel Xeon VM (kSpreadRequests below decides; docs/performance.md, 2026-12-05).
template <int64_t kBytes, int kParts = 1>
inline void prefetch_ahead(const uint8_t* p, int part = 0) {
  constexpr int64_t kLines = (kBytes + 63) / 64, kPer = (kLines + kParts - 1) / kParts;
  constexpr int64_t kFar = std::max(kQ4Ahead, kLines * 64);
  const char* c = reinterpret_cast<const char*>(p);
  const int64_t hi = std::min<int64_t>(kLines, (part + 1) * kPer) * 64;
  for (int64_t o = part * kPer * 64; o < hi; o += 64) {
    _mm_prefetch(c + kFar + o, _MM_HINT_T1);
    _mm_prefetch(c + kNearAhead + o, _MM_HINT_T0);
  }
}

// Whether a tile spreads its next block's requests over the block's steps (prefetch_ahead's parts) or asks
// for all of them at the block's start: on AMD. The two machines measured disagree, from memory at 2
// threads, one to four rows of x (tools/ab_blocks.py, the same bits either way): on the Zen 4 EPYC
// spreading read Q4_KX16 1.03-1.26x and Q6_KX16 1.19-1.47x faster; on the Intel Xeon VM 0.86-0.90x and
// 0.70-0.74x as fast (docs/performance.md, 2026-12-05).
constexpr bool kSpreadRequests = kAmdCpu;

// Row r of a group is lane r of acc[m]: written at y[(m0 + m) * ldy + n0 + r] for the group's rows < rows.
template <int MT>
inline void store16(const __m512* acc, float* y, int64_t ldy, int64_t rows, int64_t n0, int64_t m0) {
  const int64_t left = std::min<int64_t>(16, rows - n0);
  const __mmask16 keep = left >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
  for (int m = 0; m < MT; ++m) _mm512_mask_storeu_ps(y + (m0 + m) * ldy + n0, keep, acc[m]);
}

// The 32-weight packed kinds: per group and block, 16 fp16 d (row r in lane r), for Q4_1 16 fp16 m, then
// the codes (at Codes::kCodesAt), which Codes::unpack_pair<v> turns into vectors c[2v], c[2v + 1] (byte 4r+i:
// row r's weight 4g+i, unsigned) for v in [0, 4). Row r, x row m:
//   acc += float(sum_j c_j x8_j + offset) * (d_r * dx) [+ m_r * sx], block after block,
// where the offset term (-16 or -128 times the block's sum of x8: xq.o16, xq.o128; none for Q4_1) starts
// the integer sum, and Q4_1's minimum adds m_r times sx = dx * (the block's sum of x8).
// Where the CPU has no vpdpbusd, Q8_0's codes go back to q (signed) for dpbssd, which needs no offset.
// a | (b & mask) in one instruction (vpternlogd: 0xF8 is the truth table of A | (B & C))
inline __m512i or_and(__m512i a, __m512i b, __m512i mask) { return _mm512_ternarylogic_epi32(a, b, mask, 0xF8); }

// Bit G of every byte of v at bit 4 of that byte (the other bits are left for a mask to clear): a 16-bit
// shift moves both bytes of a lane alike, and bit 4 of each receives a bit of its own byte for G in [0, 8).
template <int G>
inline __m512i bit_to_4(__m512i v) {
  static_assert(G >= 0 && G < 8, "a bit of the byte");
  if constexpr (G < 4)
    return _mm512_slli_epi16(v, 4 - G);
  else if constexpr (G > 4)
    return _mm512_srli_epi16(v, G - 4);
  else
    return v;
}

// The nibble at `p` (low or high, as nibble_quads splits a vector) with bit G of every byte of `planes` as
// its fifth bit. Shifted planes carry their neighbours' bits, so the general form pays a mask: 3 vector
// ops for the low nibble, 4 for the high. With GFNI, vgf2p8affineqb moves bit G to bit 4 and clears the rest
// of each byte (output bit 4 is the parity of the input bits that byte 3 of the 8x8 bit matrix selects), so
// one ternary-logic op merges it: 2 and 3 ops, as many as the 64-bit-mask layout before 2026-12-04 took on
// AVX-512 (a mask register load, a masked move, a merge).
template <int G, bool kHigh>
inline __m512i nibble_with_bit(__m512i q, __m512i planes) {
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  const __m512i nibble = kHigh ? _mm512_srli_epi16(q, 4) : q;
#if defined(__GFNI__) && !defined(METRONOME_AVX2)
  const __m512i bit = _mm512_gf2p8affine_epi64_epi8(planes, _mm512_set1_epi64(int64_t{1} << (G + 24)), 0);
  return or_and(bit, nibble, low4);
#else
  return or_and(_mm512_and_si512(nibble, low4), bit_to_4<G>(planes), _mm512_set1_epi8(0x10));
#endif
}

template <typename Codes>
struct X16Block32 {
  using CodesT = Codes;
  static constexpr int64_t kW = 32, kBytes = Codes::kBytes;
  static constexpr bool kSigned = Codes::kOffset == 128 && kSignedQ8;

  // s[j] += codes of quads 2v, 2v+1 . x row j's, for one code pair
  template <int R>
  static inline void add_pair(const __m512i* c, const int32_t* const* xb, int v, __m512i* s) {
    if constexpr (kSigned) {
      const __m512i top = _mm512_set1_epi8(static_cast<char>(0x80));
      const __m512i q0 = _mm512_xor_si512(c[0], top), q1 = _mm512_xor_si512(c[1], top);
      const __m512i a0 = _mm512_abs_epi8(q0), a1 = _mm512_abs_epi8(q1);
      for (int j = 0; j < R; ++j)
        s[j] = dpbssd_bcst(dpbssd_bcst(s[j], q0, a0, xb[j] + 2 * v), q1, a1, xb[j] + 2 * v + 1);
    } else if constexpr (Codes::kOffset != 128 && kSums16) {
      for (int j = 0; j < R; ++j)
        s[j] = madd16_add(s[j], sums16_bcst<2, Codes::kMaxCode + 1>(c, xb[j] + 2 * v), ones16());
    } else if constexpr (Codes::kOffset != 128) {  // codes below 128
      for (int j = 0; j < R; ++j)
        s[j] = dpbusd_bcst_small(dpbusd_bcst_small(s[j], c[0], xb[j] + 2 * v), c[1], xb[j] + 2 * v + 1);
    } else {
      for (int j = 0; j < R; ++j) s[j] = dpbusd_bcst(dpbusd_bcst(s[j], c[0], xb[j] + 2 * v), c[1], xb[j] + 2 * v + 1);
    }
  }

  // One block's integer sums for R rows of x, code pair by code pair (V = 0..3): the codes of a pair are
  // unpacked once for all R rows. The nibble kinds' unpacking takes V at compile time (Q5_0's shifts), which
  // unrolls the pairs; Q8_0's codes are loaded as stored, in a loop: unrolled, its signed form on AVX2 ran
  // 0.90x (tools/ab_x16.py, 8 and 32 rows of x, 2026-12-04).
  template <int R, int V = 0>
  static inline void sums(const uint8_t* codes, const int32_t* const* xb, __m512i* s) {
    __m512i c[2];
    if constexpr (!Codes::kPairAtCompileTime) {
      for (int v = 0; v < 4; ++v) {
        Codes::unpack_pair(codes, v, c);
        add_pair<R>(c, xb, v, s);
      }
    } else {
      Codes::template unpack_pair<V>(codes, c);
      add_pair<R>(c, xb, V, s);
      if constexpr (V < 3) sums<R, V + 1>(codes, xb, s);
    }
  }

  template <int MT>
  static void tile(const uint8_t* w, int64_t nb, const XQuant& xq, int64_t K, float* y, int64_t ldy, int64_t rows,
                   int64_t n0, int64_t m0) {
    // AVX-512's 32 registers hold the 8 rows' sums at once; AVX2's 16 hold 4 rows' sums (8 registers) and
    // a code pair with its temporaries: 8 at once spills them to the stack (perf annotate, tile<8>).
    constexpr int kBlock = kVectorRegisters < 32 ? 4 : static_cast<int>(kRowsPerPass);
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    // x row m0 + m's record of block b: rec + m * kRecordBytes, every field at a fixed distance from one
    // pointer. With an array per field GCC kept a pointer per row and field, spilled to the stack and to
    // vector registers: Q8_0 tile<8> compiled to 340 instructions, 212 now (objdump; 64 vpdpbusd a block).
    const uint8_t* rec = xq.xr + m0 * kRecordBytes;
    constexpr int64_t kOffsetAt = Codes::kOffset == 16 ? kRecordO16 : kRecordO128;
    for (int64_t b = 0; b < nb; ++b, rec += xq.xr_block) {
      const uint8_t* p = w + b * kBytes;
      prefetch_ahead<kBytes>(p);
      const __m512 d = fp16x16(p);
      const int32_t* xb[MT];
      __m512i s[MT];
      for (int m = 0; m < MT; ++m) {
        const uint8_t* r = rec + m * kRecordBytes;
        xb[m] = reinterpret_cast<const int32_t*>(r);
        s[m] = kSigned || Codes::kOffset == 0 ? _mm512_setzero_si512()  // else the offset starts the sum
                                              : _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(r + kOffsetAt));
      }
      sums<std::min(MT, kBlock)>(p + Codes::kCodesAt, xb, s);
      if constexpr (MT > kBlock) sums<MT - kBlock>(p + Codes::kCodesAt, xb + kBlock, s + kBlock);
      for (int m = 0; m < MT; ++m)
        acc[m] = _mm512_fmadd_ps(
            _mm512_cvtepi32_ps(s[m]),
            _mm512_mul_ps(d, _mm512_set1_ps(*reinterpret_cast<const float*>(rec + m * kRecordBytes + kRecordDx))),
            acc[m]);
      if constexpr (Codes::kMin) {
        const __m512 mn = fp16x16(p + 32);
        for (int m = 0; m < MT; ++m)
          acc[m] = _mm512_fmadd_ps(
              mn, _mm512_set1_ps(*reinterpret_cast<const float*>(rec + m * kRecordBytes + kRecordSx)), acc[m]);
      }
    }
    store16<MT>(acc, y, ldy, rows, n0, m0);
  }
};

// Q5_0 (w = d * (q - 16), q in [0, 32)), 352 bytes: d, then the fifth bits as 64 bytes of bit planes (byte
// 4r+j, bit g: the fifth bit of row r's weight 4g+j), then 4 nibble vectors; codes q, offset -16 x sum(x8).
// Quad g's fifth bits come out of the planes with a shift and a mask (bit g to bit 4 of every byte). Stored
// as a 64-bit mask per quad (until 2026-12-04) they took a mask register on AVX-512, and on AVX2 six
// instructions per 256-bit half to spread the bits to bytes.
struct Q5_0Codes {
  static constexpr int64_t kBytes = kQ5x16Bytes, kCodesAt = 32;
  static constexpr int kOffset = 16, kMaxCode = 31;
  static constexpr bool kMin = false;
  static constexpr bool kPairAtCompileTime = true;
  template <int V>
  static inline void unpack_pair(const uint8_t* p, __m512i* c) {
    const __m512i planes = _mm512_loadu_si512(p), q = _mm512_loadu_si512(p + 64 + 64 * V);
    c[0] = nibble_with_bit<2 * V, false>(q, planes);
    c[1] = nibble_with_bit<2 * V + 1, true>(q, planes);
  }
};
using Q5_0x16 = X16Block32<Q5_0Codes>;

// Q8_0 (w = d * q, q int8), 544 bytes (the file's 16 x 34): d, then the 8 code vectors as stored, q + 128
// (unsigned for vpdpbusd), offset -128 x sum(x8). The file's rows cost a conversion and a multiply-add per
// block for every (row, x row); here one per block covers 16 rows, which is what several rows of x (live
// slots, a verification step) spent their time on: a 151,936-row head at 8 rows of x (docs/models.md).
struct Q8_0Codes {
  static constexpr int64_t kBytes = kQ8x16Bytes, kCodesAt = 32;
  static constexpr int kOffset = 128, kMaxCode = 255;
  static constexpr bool kMin = false;
  static constexpr bool kPairAtCompileTime = false;
  static inline void unpack_pair(const uint8_t* p, int v, __m512i* c) {
    c[0] = _mm512_loadu_si512(p + 128 * v);
    c[1] = _mm512_loadu_si512(p + 128 * v + 64);
  }
};
using Q8_0x16 = X16Block32<Q8_0Codes>;

// Q4_1 (w = d * q + m, q in [0, 16)), 320 bytes (the file's 16 x 20): d, m, then 4 nibble vectors; no offset,
// the minimum term m * sx. Q4_0 (w = d * (q - 8)) is packed as Q4_1 with m = -8d, exact in fp16. For row n
// and block b: sum_j w_j x_j ~= d * dx * sum_j q_j x8_j + m * sx, where sx = dx * sum_j x8_j is the sum of
// the quantized x (the exact float sum would pair a quantized q-term with an exact m-term: the errors then
// no longer cancel, and grew ~4x). Packed four rows side by side (the Q4X4 kind, removed 2026-12-03) a
// block paid a conversion and two multiply-adds per 2 vpdpbusd; here per 8.
struct Q4_1Codes {
  static constexpr int64_t kBytes = kQ41x16Bytes, kCodesAt = 64;
  static constexpr int kOffset = 0, kMaxCode = 15;
  static constexpr bool kMin = true;
  static constexpr bool kPairAtCompileTime = true;
  template <int V>
  static inline void unpack_pair(const uint8_t* p, __m512i* c) {
    nibble_quads(p + 64 * V, c);
  }
};
using Q4_1x16 = X16Block32<Q4_1Codes>;

// AVX2: a Q4_K sub-block (32 weights of 16 rows) against 1-4 rows of x, as int16 sums widened against the
// scale pair (sums16_bcst's scheme). Per quad of weights and row of x: one broadcast, two vpmaddubsw and
// two vpaddw, the rows' int16 sums in registers; four rows of x at a time, since 8 rows' sums with the code
// halves would need more than the 16 ymm registers (four at a time ran the tile 1.10x faster than holding
// all 8 code vectors at 8 and 32 rows of x; two at a time in C, 0.73x). Written out as instructions: GCC
// compiled the C loop four ways from four spellings of it (1.0x-1.5x apart: it reassociated the int16 sums
// into a tree kept on the stack, or spilled them), and a kernel's speed should not hang on that.
//
// The codes come from one of two places. A step of 1-3 rows (decode, a short verification) unpacks the
// sub-block's 4 nibble vectors in registers: per vector its two halves are loaded, masked into quad 2v's
// codes, then shifted and masked in place into quad 2v + 1's (at 3 rows: 6 sums, 2 halves, 2 codes, the
// mask, the broadcast and the product). Before, codes() unpacked all 8 code vectors to the stack for the
// rows to read back (16 stores and 16 loads per sub-block) and 2 and 3 rows ran the C form: 1.34x and 1.41x
// slower from the caches (docs/performance.md, "AVX2 Q4_K decode"); 5 and 6 rows run as 3 + 2 and 3 + 3 of
// these (1.04x). At 4, 7 and 8 rows unpacking twice costs more than the loads (4 rows in registers: 0.96x),
// so the tile unpacks once (codes(), or the group's records for a prompt) and every four rows read the 8
// code vectors from memory. The integers are the same either way.
#ifdef METRONOME_AVX2
// clang-format off
#define METRONOME_Q4KF_ROW_FIRST(xoff, r, t0, t1)          \
  "vpbroadcastd " xoff "(%[x" r "]), %[b]\n\t"             \
  "vpmaddubsw %[b], %[lo], %[" t0 "]\n\t"                  \
  "vpmaddubsw %[b], %[hi], %[" t1 "]\n\t"
#define METRONOME_Q4KF_ROW(xoff, r, t0, t1, lo, hi)        \
  "vpbroadcastd " xoff "(%[x" r "]), %[b]\n\t"             \
  "vpmaddubsw %[b], %[" lo "], %[p]\n\t"                   \
  "vpaddw %[p], %[" t0 "], %[" t0 "]\n\t"                  \
  "vpmaddubsw %[b], %[" hi "], %[p]\n\t"                   \
  "vpaddw %[p], %[" t1 "], %[" t1 "]\n\t"
// quad 2v's rows (lo, hi) and quad 2v + 1's (the halves a, c shifted in place), R = 1..4 rows
#define METRONOME_Q4KF_FIRST1(xo) METRONOME_Q4KF_ROW_FIRST(xo, "0", "t0", "t1")
#define METRONOME_Q4KF_FIRST2(xo) METRONOME_Q4KF_FIRST1(xo) METRONOME_Q4KF_ROW_FIRST(xo, "1", "t2", "t3")
#define METRONOME_Q4KF_FIRST3(xo) METRONOME_Q4KF_FIRST2(xo) METRONOME_Q4KF_ROW_FIRST(xo, "2", "t4", "t5")
#define METRONOME_Q4KF_FIRST4(xo) METRONOME_Q4KF_FIRST3(xo) METRONOME_Q4KF_ROW_FIRST(xo, "3", "t6", "t7")
#define METRONOME_Q4KF_ROWS1(xo, lo, hi) METRONOME_Q4KF_ROW(xo, "0", "t0", "t1", lo, hi)
#define METRONOME_Q4KF_ROWS2(xo, lo, hi) METRONOME_Q4KF_ROWS1(xo, lo, hi) METRONOME_Q4KF_ROW(xo, "1", "t2", "t3", lo, hi)
#define METRONOME_Q4KF_ROWS3(xo, lo, hi) METRONOME_Q4KF_ROWS2(xo, lo, hi) METRONOME_Q4KF_ROW(xo, "2", "t4", "t5", lo, hi)
#define METRONOME_Q4KF_ROWS4(xo, lo, hi) METRONOME_Q4KF_ROWS3(xo, lo, hi) METRONOME_Q4KF_ROW(xo, "3", "t6", "t7", lo, hi)
#define METRONOME_Q4KF_LOAD(off, off32)                    \
  "vmovdqu " off "(%[q]), %[a]\n\t"                        \
  "vmovdqu " off32 "(%[q]), %[c]\n\t"                      \
  "vpand %[a], %[m], %[lo]\n\t"                            \
  "vpand %[c], %[m], %[hi]\n\t"
#define METRONOME_Q4KF_SHIFT                               \
  "vpsrlw $4, %[a], %[a]\n\t"                              \
  "vpand %[a], %[m], %[a]\n\t"                             \
  "vpsrlw $4, %[c], %[c]\n\t"                              \
  "vpand %[c], %[m], %[c]\n\t"
#define METRONOME_Q4KF_BODY(R)                                                                          \
  METRONOME_Q4KF_LOAD("0", "32") METRONOME_Q4KF_FIRST##R("0")                                           \
  METRONOME_Q4KF_SHIFT METRONOME_Q4KF_ROWS##R("4", "a", "c")                                            \
  METRONOME_Q4KF_LOAD("64", "96") METRONOME_Q4KF_ROWS##R("8", "lo", "hi")                               \
  METRONOME_Q4KF_SHIFT METRONOME_Q4KF_ROWS##R("12", "a", "c")                                           \
  METRONOME_Q4KF_LOAD("128", "160") METRONOME_Q4KF_ROWS##R("16", "lo", "hi")                            \
  METRONOME_Q4KF_SHIFT METRONOME_Q4KF_ROWS##R("20", "a", "c")                                           \
  METRONOME_Q4KF_LOAD("192", "224") METRONOME_Q4KF_ROWS##R("24", "lo", "hi")                            \
  METRONOME_Q4KF_SHIFT METRONOME_Q4KF_ROWS##R("28", "a", "c")
// the same rows from the 8 code vectors unpacked at q (512 bytes, codes()'s c[0..7]): per quad its halves
#define METRONOME_Q4KF_CODES(off, off32)                   \
  "vmovdqu " off "(%[q]), %[lo]\n\t"                       \
  "vmovdqu " off32 "(%[q]), %[hi]\n\t"
#define METRONOME_Q4KF_BODY_UNPACKED(R)                                                                 \
  METRONOME_Q4KF_CODES("0", "32") METRONOME_Q4KF_FIRST##R("0")                                          \
  METRONOME_Q4KF_CODES("64", "96") METRONOME_Q4KF_ROWS##R("4", "lo", "hi")                              \
  METRONOME_Q4KF_CODES("128", "160") METRONOME_Q4KF_ROWS##R("8", "lo", "hi")                            \
  METRONOME_Q4KF_CODES("192", "224") METRONOME_Q4KF_ROWS##R("12", "lo", "hi")                           \
  METRONOME_Q4KF_CODES("256", "288") METRONOME_Q4KF_ROWS##R("16", "lo", "hi")                           \
  METRONOME_Q4KF_CODES("320", "352") METRONOME_Q4KF_ROWS##R("20", "lo", "hi")                           \
  METRONOME_Q4KF_CODES("384", "416") METRONOME_Q4KF_ROWS##R("24", "lo", "hi")                           \
  METRONOME_Q4KF_CODES("448", "480") METRONOME_Q4KF_ROWS##R("28", "lo", "hi")
#define METRONOME_Q4KF_SCRATCH                                                                          \
  [a] "=&x"(a), [c] "=&x"(c), [lo] "=&x"(lo), [hi] "=&x"(hi), [b] "=&x"(b), [p] "=&x"(p)
#define METRONOME_Q4KF_SCRATCH_UNPACKED [lo] "=&x"(lo), [hi] "=&x"(hi), [b] "=&x"(b), [p] "=&x"(p)
using XRow = const char (*)[32];

#define METRONOME_Q4KF_OUT1 [t0] "=&x"(t0), [t1] "=&x"(t1)
#define METRONOME_Q4KF_OUT2 METRONOME_Q4KF_OUT1, [t2] "=&x"(t2), [t3] "=&x"(t3)
#define METRONOME_Q4KF_OUT3 METRONOME_Q4KF_OUT2, [t4] "=&x"(t4), [t5] "=&x"(t5)
#define METRONOME_Q4KF_OUT4 METRONOME_Q4KF_OUT3, [t6] "=&x"(t6), [t7] "=&x"(t7)
// row r's pointer, and its 32 bytes as what the instructions read (so the compiler keeps stores before them)
#define METRONOME_Q4KF_X(r) [x##r] "r"(x4 + r * ldx), "m"(*reinterpret_cast<XRow>(x4 + r * ldx))
#define METRONOME_Q4KF_IN1 METRONOME_Q4KF_X(0)
#define METRONOME_Q4KF_IN2 METRONOME_Q4KF_IN1, METRONOME_Q4KF_X(1)
#define METRONOME_Q4KF_IN3 METRONOME_Q4KF_IN2, METRONOME_Q4KF_X(2)
#define METRONOME_Q4KF_IN4 METRONOME_Q4KF_IN3, METRONOME_Q4KF_X(3)
#define METRONOME_Q4KF_ASM(R)                                                                           \
  asm(METRONOME_Q4KF_BODY(R) : METRONOME_Q4KF_OUT##R, METRONOME_Q4KF_SCRATCH                            \
      : [q] "r"(q), [m] "x"(_mm256_set1_epi8(0x0F)), "m"(*reinterpret_cast<Codes>(q)), METRONOME_Q4KF_IN##R)
#define METRONOME_Q4KF_ASM_UNPACKED(R)                                                                  \
  asm(METRONOME_Q4KF_BODY_UNPACKED(R) : METRONOME_Q4KF_OUT##R, METRONOME_Q4KF_SCRATCH_UNPACKED           \
      : [q] "r"(q), "m"(*reinterpret_cast<Codes>(q)), METRONOME_Q4KF_IN##R)
// clang-format on

// acc[r] += (row r's int16 sums of the sub-block's 32 weights against x row r) . w, r < R, row r's 32 bytes
// of x at x4 + r * ldx. q: the sub-block's 4 nibble vectors (256 bytes), or with kCodes its 8 code vectors
// as codes() unpacked them (512 bytes).
template <int R, bool kCodes>
inline void q4k_sub_rows(const uint8_t* q, const int32_t* x4, int64_t ldx, __m512i w, __m512i* acc) {
  static_assert(R >= 1 && R <= 4, "1 to 4 rows of x");
  using Codes = const char (*)[kCodes ? 512 : 256];
  __m256i t0, t1, t2, t3, t4, t5, t6, t7, a, c, lo, hi, b, p;
  // clang-format off
  if constexpr (kCodes) {
    if constexpr (R == 1) METRONOME_Q4KF_ASM_UNPACKED(1);
    else if constexpr (R == 2) METRONOME_Q4KF_ASM_UNPACKED(2);
    else if constexpr (R == 3) METRONOME_Q4KF_ASM_UNPACKED(3);
    else METRONOME_Q4KF_ASM_UNPACKED(4);
  } else {
    if constexpr (R == 1) METRONOME_Q4KF_ASM(1);
    else if constexpr (R == 2) METRONOME_Q4KF_ASM(2);
    else if constexpr (R == 3) METRONOME_Q4KF_ASM(3);
    else METRONOME_Q4KF_ASM(4);
  }
  // clang-format on
  acc[0] = madd16_add(acc[0], __m512i{t0, t1}, w);
  if constexpr (R > 1) acc[1] = madd16_add(acc[1], __m512i{t2, t3}, w);
  if constexpr (R > 2) acc[2] = madd16_add(acc[2], __m512i{t4, t5}, w);
  if constexpr (R > 3) acc[3] = madd16_add(acc[3], __m512i{t6, t7}, w);
}
#undef METRONOME_Q4KF_ASM_UNPACKED
#undef METRONOME_Q4KF_ASM
#undef METRONOME_Q4KF_SCRATCH_UNPACKED
#undef METRONOME_Q4KF_IN4
#undef METRONOME_Q4KF_IN3
#undef METRONOME_Q4KF_IN2
#undef METRONOME_Q4KF_IN1
#undef METRONOME_Q4KF_X
#undef METRONOME_Q4KF_OUT4
#undef METRONOME_Q4KF_OUT3
#undef METRONOME_Q4KF_OUT2
#undef METRONOME_Q4KF_OUT1
#undef METRONOME_Q4KF_SCRATCH
#undef METRONOME_Q4KF_BODY_UNPACKED
#undef METRONOME_Q4KF_CODES
#undef METRONOME_Q4KF_BODY
#undef METRONOME_Q4KF_SHIFT
#undef METRONOME_Q4KF_LOAD
#undef METRONOME_Q4KF_ROWS4
#undef METRONOME_Q4KF_ROWS3
#undef METRONOME_Q4KF_ROWS2
#undef METRONOME_Q4KF_ROWS1
#undef METRONOME_Q4KF_FIRST4
#undef METRONOME_Q4KF_FIRST3
#undef METRONOME_Q4KF_FIRST2
#undef METRONOME_Q4KF_FIRST1
#undef METRONOME_Q4KF_ROW
#undef METRONOME_Q4KF_ROW_FIRST

// acc[m] += (row m's int16 sums of the unpacked codes' 32 weights against x row m) . w for MT rows of x,
// four at a time, then the rest
template <int MT>
inline void q4k_codes_rows(const __m512i* codes, const int32_t* x4, int64_t ldx, __m512i w, __m512i* acc) {
  const uint8_t* u = reinterpret_cast<const uint8_t*>(codes);
  constexpr int kFull = MT / 4 * 4;
  for (int m0 = 0; m0 < kFull; m0 += 4) q4k_sub_rows<4, true>(u, x4 + m0 * ldx, ldx, w, acc + m0);
  if constexpr (MT % 4 != 0) q4k_sub_rows<MT % 4, true>(u, x4 + kFull * ldx, ldx, w, acc + kFull);
}

// The same for sub-block j of the packed super-block at p (its scale pair w from the block's bytes)
template <int MT>
inline void q4k_sub_all_rows(const uint8_t* p, int j, const int32_t* x4, int64_t ldx, __m512i* acc) {
  const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 64 + 16 * j)));
  const __m512i w = _mm512_or_si512(sc, _mm512_slli_epi32(sc, 16));
  if constexpr (MT <= 3) {
    q4k_sub_rows<MT, false>(p + 320 + 256 * j, x4, ldx, w, acc);
  } else if constexpr (MT == 5 || MT == 6) {
    q4k_sub_rows<3, false>(p + 320 + 256 * j, x4, ldx, w, acc);
    q4k_sub_rows<MT - 3, false>(p + 320 + 256 * j, x4 + 3 * ldx, ldx, w, acc + 3);
  } else {
    __m512i c[8];
    for (int v = 0; v < 4; ++v) nibble_quads(p + 320 + 256 * j + 64 * v, c + 2 * v);
    q4k_codes_rows<MT>(c, x4, ldx, w, acc);
  }
}
#else  // AVX2 only: declared so that the AVX-512 build's discarded kSums16 branches compile
template <int MT>
void q4k_codes_rows(const __m512i* codes, const int32_t* x4, int64_t ldx, __m512i w, __m512i* acc);
template <int MT>
void q4k_sub_all_rows(const uint8_t* p, int j, const int32_t* x4, int64_t ldx, __m512i* acc);
#endif

#ifndef METRONOME_AVX2
// lane i: the int16 pair (lo_i, hi_i) from the low halves of two int32 lanes (values that fit an int16)
inline __m512i int16_pairs(__m512i lo, __m512i hi) {
  return _mm512_mask_mov_epi16(lo, 0xAAAAAAAA, _mm512_slli_epi32(hi, 16));
}
#else  // declared so that the AVX2 build's discarded AVX-512 branches compile (no such masked move there)
__m512i int16_pairs(__m512i lo, __m512i hi);
#endif

// AVX2 prompts: a pass over a group takes only 8 rows of x, so a prompt of M rows would unpack each
// super-block's codes, scales and minimums M / 8 times over. Where there is more than one pass, x16_rows
// unpacks the group once into Q4_KUnpacked records (one per super-block; the thread's own buffer) and every
// pass reads them: the 4-row block takes its code vectors from memory in either case.
struct Q4_KUnpacked {
  __m512i c[8][9];  // sub-block j: its 8 code vectors (Q4_Kx16::codes), then its scales as (sc_j, sc_j)
  __m512i mn[4];    // lane r: row r's (m_2k, m_2k+1) as int16
  __m512 d, dmin;
};

// Q4_K (w = d * sc_j * q - dmin * m_j over 8 sub-blocks j of 32, q in [0, 16), 6-bit sc_j and m_j), per
// group and super-block of 256 weights, 2368 bytes: 16 fp16 d, 16 fp16 dmin, the scales as bytes (sub-block
// j: 16 bytes, row r's at 16j + r), the minimums as bytes in pairs (pair k: 32 bytes, row r's m_2k and
// m_2k+1 at 32k + 2r, 32k + 2r + 1), then 32 nibble vectors (sub-block j: vectors 4j..4j+3). x is quantized
// per 256 (x8k, dxk). Row r, x row m, per super-block:
//   isum = sum_j sc_j * (sum of sub-block j's q x8)    vpdpbusd per quad (exact) in two chains of 16 weights;
//                                                     a chain's sum fits an int16 (|s| <= 16 * 15 * 127), so
//                                                     vpdpwssd on the chains' pair (s0, s1) against (sc_j,
//                                                     sc_j) adds sc_j * (s0 + s1) exactly
//   imin = sum_j m_j * bs32_j                         vpdpwssd on (m_2k, m_2k+1) x (bs32_2k, bs32_2k+1)
//   acc += float(isum) * (d_r * dx) - float(imin) * (dmin_r * dx)
// |isum| <= 8 * 63 * 2 * 16 * 15 * 127 < 2^31. (A float step per sub-block, a conversion and a multiply-add
// where vpdpwssd is one instruction, was 1.04-1.10x slower at 8-64 rows of x; an integer multiply per
// sub-block, vpmulld, slower still: two uops on the ports vpdpbusd needs.)
struct Q4_Kx16 {
  static constexpr int64_t kW = 256, kBytes = kQ4Kx16Bytes;
  static constexpr bool kUnpacksGroup = kSums16;  // a tile can read Q4_KUnpacked records (the AVX2 form)
  using Unpacked = Q4_KUnpacked;

  // Sub-block j of the super-block at p: c[0..7] its codes (vectors 4j..4j+3 unpacked), c[8] lane r: row r's
  // sc_j as the int16 pair (sc_j, sc_j).
  static inline void codes(const uint8_t* p, int j, __m512i* c) {
    for (int v = 0; v < 4; ++v) nibble_quads(p + 320 + 256 * j + 64 * v, c + 2 * v);
    const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 64 + 16 * j)));
    c[8] = _mm512_or_si512(sc, _mm512_slli_epi32(sc, 16));
  }
  static inline void minimums(const uint8_t* p, __m512i* mn) {
    for (int k = 0; k < 4; ++k)
      mn[k] = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 192 + 32 * k)));
  }

  // The group's nb super-blocks at w into unpacked[0..nb).
  static void unpack_group(const uint8_t* w, int64_t nb, Unpacked* unpacked) {
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = w + b * kBytes;
      prefetch_ahead<kBytes>(p);
      for (int j = 0; j < 8; ++j) codes(p, j, unpacked[b].c[j]);
      minimums(p, unpacked[b].mn);
      unpacked[b].d = fp16x16(p);
      unpacked[b].dmin = fp16x16(p + 32);
    }
  }

  // kUnpacked: read the group's records from unpack_group at unpacked, not the packed blocks at w.
  template <int MT, bool kUnpacked>
  static void tile(const uint8_t* w, int64_t nb, const XQuant& xq, int64_t K, float* y, int64_t ldy, int64_t rows,
                   int64_t n0, int64_t m0, const Unpacked* unpacked) {
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    // where requests spread, over the sub-blocks up to 4 rows of x; at 8 that ran 0.87-0.89x
    // (tools/ab_blocks.py), and so did one call site in the loop for both (j < kParts, 0.90x), hence two
    constexpr bool spread = MT <= 4 && kSpreadRequests;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = w + b * kBytes;
      if constexpr (!kUnpacked && !spread) prefetch_ahead<kBytes>(p);
      __m512i isum[MT];
      for (int m = 0; m < MT; ++m) isum[m] = _mm512_setzero_si512();
      for (int j = 0; j < 8; ++j) {
        if constexpr (!kUnpacked && spread) prefetch_ahead<kBytes, 8>(p, j);
        if constexpr (kSums16) {  // AVX2: the 32 weights' int16 pair sums, widened against (sc_j, sc_j)
          const int32_t* xb = reinterpret_cast<const int32_t*>(xq.x8k + m0 * K + b * 256 + 32 * j);
          if constexpr (kUnpacked) {
            q4k_codes_rows<MT>(unpacked[b].c[j], xb, K / 4, unpacked[b].c[j][8], isum);
          } else {
            q4k_sub_all_rows<MT>(p, j, xb, K / 4, isum);
          }
        } else {
          // lane r: sub-block j's scale of row r as the int16 pair (sc_j, sc_j)
          const __m512i sc8 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 64 + 16 * j)));
          const __m512i sc = _mm512_or_si512(sc8, _mm512_slli_epi32(sc8, 16));
          __m512i c[8];
          for (int v = 0; v < 4; ++v) nibble_quads(p + 320 + 256 * j + 64 * v, c + 2 * v);
          for (int m = 0; m < MT; ++m) {
            const int32_t* xb = reinterpret_cast<const int32_t*>(xq.x8k + (m0 + m) * K + b * 256 + 32 * j);
            // two chains of 4 (vpdpbusd's latency, not its throughput, would bound one chain of 8)
            __m512i s0 = dpbusd_bcst_small(_mm512_setzero_si512(), c[0], xb);  // nibbles
            __m512i s1 = dpbusd_bcst_small(_mm512_setzero_si512(), c[4], xb + 4);
            for (int g = 1; g < 4; ++g) {
              s0 = dpbusd_bcst_small(s0, c[g], xb + g);
              s1 = dpbusd_bcst_small(s1, c[g + 4], xb + g + 4);
            }
            // each chain sums 16 weights: |s| <= 16 * 15 * 127, an int16, so one vpdpwssd on the pair
            // (s0, s1) against (sc_j, sc_j) adds (s0 + s1) * sc_j exactly. The VNNI ports are what this
            // tile is short of, and the pairing's shift and masked move run beside them: two vpdpwssd,
            // one per chain against (sc_j, 0), ran 1.05-1.10x slower at 8 to 256 rows of x on a Zen 4
            // EPYC (tools/ab_blocks.py, docs/performance.md)
            isum[m] = _mm512_dpwssd_epi32(isum[m], int16_pairs(s0, s1), sc);
          }
        }
      }
      __m512i own_mn[4];
      if constexpr (!kUnpacked) minimums(p, own_mn);
      const __m512i* mn = kUnpacked ? unpacked[b].mn : own_mn;
      const __m512 d = kUnpacked ? unpacked[b].d : fp16x16(p), dmin = kUnpacked ? unpacked[b].dmin : fp16x16(p + 32);
      for (int m = 0; m < MT; ++m) {
        const int64_t i = (m0 + m) * nb + b;
        __m512i imin = dpwssd_bcst(_mm512_setzero_si512(), mn[0], xq.bs32p + i * 4);
        for (int k = 1; k < 4; ++k) imin = dpwssd_bcst(imin, mn[k], xq.bs32p + i * 4 + k);
        const __m512 dx = _mm512_set1_ps(xq.dxk[i]);
        acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum[m]), _mm512_mul_ps(d, dx), acc[m]);
        acc[m] = _mm512_fnmadd_ps(_mm512_cvtepi32_ps(imin), _mm512_mul_ps(dmin, dx), acc[m]);
      }
    }
    store16<MT>(acc, y, ldy, rows, n0, m0);
  }
};

struct Q6_KUnpacked {  // a super-block as Q6_Kx16's AVX2 tile uses it, unpacked once per group (as Q4_KUnpacked)
  __m512i c[16][4];    // group g: its 4 code vectors (Q6_Kx16::codes)
  __m512 sc[16];       // group g: lane r: sc_g * d_r
};

// Q6_K (w = d * sc_g * (q - 32) over 16 groups g of 16, q in [0, 64), int8 sc_g), per group and super-block,
// 3360 bytes (the file's 16 x 210): 16 fp16 d, the scales (group g: 16 bytes, row r's at 32 + 16g + r),
// then per 32 weights t (8 of them, 384 bytes each): 4 nibble vectors, the codes' low 4 bits, then 2
// vectors of their top 2 bits (vector h, byte 4r+i, bits 2e..2e+1: row r's weight 16h + 4e + i of the 32).
// Row r, x row m, per super-block:
//   f    = sum_g float(sum of group g's q x8 - 32 * bs16_g) * (sc_g * d_r)   the offset term starts each
//                                                                            group's integer sum
//   acc += f * dx
// One group's 4 quads are unpacked at a time (half of two nibble vectors and one top-bits vector), so they
// stay in registers beside the 8 rows' sums: unpacking 32 weights at once spilled them to the stack and
// ran 1.16x (8 rows of x) to 1.31x (64) slower.
struct Q6_Kx16 {
  static constexpr int64_t kW = 256, kBytes = kQ6Kx16Bytes;
  static constexpr bool kUnpacksGroup = kSums16;
  using Unpacked = Q6_KUnpacked;

  // 16-weight group g of the super-block at p: quad e in c[e], weights 16g + 4e .. 16g + 4e + 3 of each row,
  // codes in [0, 64) (quads 4(g%2)..4(g%2)+3 of 32-weight run g/2).
  static inline void codes(const uint8_t* p, int g, __m512i* c) {
    const __m512i top2 = _mm512_set1_epi8(0x30);
    const uint8_t* q = p + 288 + 384 * (g / 2);
    const int h = g % 2;
    nibble_quads(q + 128 * h, c);
    nibble_quads(q + 128 * h + 64, c + 2);
    // bits 2e..2e+1 of a top-bits byte move to bits 4..5
    const __m512i hv = _mm512_loadu_si512(q + 256 + 64 * h);
    c[0] = or_and(c[0], _mm512_slli_epi16(hv, 4), top2);
    c[1] = or_and(c[1], _mm512_slli_epi16(hv, 2), top2);
    c[2] = or_and(c[2], hv, top2);
    c[3] = or_and(c[3], _mm512_srli_epi16(hv, 2), top2);
  }
  static inline __m512 scale(const uint8_t* p, int g, __m512 d) {  // sc_g * d_r, exact (8 bits times 11)
    return _mm512_mul_ps(
        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 32 + 16 * g)))),
        d);
  }

  static void unpack_group(const uint8_t* w, int64_t nb, Unpacked* unpacked) {
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = w + b * kBytes;
      prefetch_ahead<kBytes>(p);
      const __m512 d = fp16x16(p);
      for (int g = 0; g < 16; ++g) {
        codes(p, g, unpacked[b].c[g]);
        unpacked[b].sc[g] = scale(p, g, d);
      }
    }
  }

  template <int MT, bool kUnpacked>  // as Q4_Kx16's
  static void tile(const uint8_t* w, int64_t nb, const XQuant& xq, int64_t K, float* y, int64_t ldy, int64_t rows,
                   int64_t n0, int64_t m0, const Unpacked* unpacked) {
    __m512 acc[MT];
    for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
    if constexpr (kUnpacked && kUnpacksGroup) {
      // Two rows of x at a time through a super-block's 16 groups, which share the groups' loads: faster than
      // a group at a time for all 8 rows (the loop below) and than one or four rows (docs/performance.md).
      for (int64_t b = 0; b < nb; ++b) {
        int m = 0;
        for (; m + 2 <= MT; m += 2) rows_unpacked<2>(unpacked[b], xq, K, nb, b, m0 + m, acc + m);
        if constexpr (MT % 2 == 1) rows_unpacked<1>(unpacked[b], xq, K, nb, b, m0 + m, acc + m);
      }
      store16<MT>(acc, y, ldy, rows, n0, m0);
      return;
    }
    constexpr bool spread = kSpreadRequests;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* p = w + b * kBytes;
      if constexpr (!spread) prefetch_ahead<kBytes>(p);
      const __m512 d = fp16x16(p);
      __m512 fsum[MT];
      for (int m = 0; m < MT; ++m) fsum[m] = _mm512_setzero_ps();
      for (int g = 0; g < 16; ++g) {
        if constexpr (spread) prefetch_ahead<kBytes, 16>(p, g);
        __m512i c[4];
        codes(p, g, c);
        const __m512 sc = scale(p, g, d);
        for (int m = 0; m < MT; ++m) {
          const int64_t row = m0 + m;
          const int32_t* xb = reinterpret_cast<const int32_t*>(xq.x8k + row * K + b * 256 + 16 * g);
          __m512i s = _mm512_set1_epi32(xq.o32[row * (K / 16) + b * 16 + g]);
          if constexpr (kSums16) {  // AVX2: two pairs of code vectors, each summed as int16
            s = madd16_add(s, sums16_bcst<2, 64>(c, xb), ones16());
            s = madd16_add(s, sums16_bcst<2, 64>(c + 2, xb + 2), ones16());
          } else {
            for (int e = 0; e < 4; ++e) s = dpbusd_bcst_small(s, c[e], xb + e);  // 6-bit codes
          }
          fsum[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sc, fsum[m]);
        }
      }
      for (int m = 0; m < MT; ++m) acc[m] = _mm512_fmadd_ps(fsum[m], _mm512_set1_ps(xq.dxk[(m0 + m) * nb + b]), acc[m]);
    }
    store16<MT>(acc, y, ldy, rows, n0, m0);
  }

 private:
  // x rows m0 .. m0 + R - 1 against super-block b's records u (AVX2): the same integers and float steps, in
  // the same order per row, as the tile's loop.
  template <int R>
  static inline void rows_unpacked(const Unpacked& u, const XQuant& xq, int64_t K, int64_t nb, int64_t b, int64_t m0,
                                   __m512* acc) {
    const int32_t* xr[R];
    const int32_t* o[R];
    __m512 f[R];
    for (int i = 0; i < R; ++i) {
      xr[i] = reinterpret_cast<const int32_t*>(xq.x8k + (m0 + i) * K + b * 256);
      o[i] = xq.o32 + (m0 + i) * (K / 16) + b * 16;
      f[i] = _mm512_setzero_ps();
    }
    for (int g = 0; g < 16; ++g) {
      for (int i = 0; i < R; ++i) {
        __m512i s = _mm512_set1_epi32(o[i][g]);
        s = madd16_add(s, sums16_bcst<2, 64>(u.c[g], xr[i] + 4 * g), ones16());
        s = madd16_add(s, sums16_bcst<2, 64>(u.c[g] + 2, xr[i] + 4 * g + 2), ones16());
        f[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), u.sc[g], f[i]);
      }
    }
    for (int i = 0; i < R; ++i) acc[i] = _mm512_fmadd_ps(f[i], _mm512_set1_ps(xq.dxk[(m0 + i) * nb + b]), acc[i]);
  }
};

// ---------------------------------------------------------------------------------------------------
// The packed kinds by AMX (Intel's tile unit, where the CPU has it and Linux lets this process use it): the
// 32-weight kinds here, Q4_KX16 below (amx_q4k_rows), Q6_KX16 not (its float step per 16 weights is most of
// its work, and stays: tried, 0.92-0.98x the vector path). A packed block is already what a tile multiply takes as its
// second operand: vector 2v + i of the block's codes (byte 4r + j: row r's weight 4(2v + i) + j) is row 2v + i of an 8
// x 64-byte tile, which `tdpbsud` multiplies against a tile of M rows of x8 (32 signed bytes each, read in place from
// the x records) into M x 16 int32 sums: for every (x row, weight row) the block's sum of products, exactly the integer
// the vpdpbusd tile (X16Block32::tile) builds. The float step after it is the same instructions in the same order, so a
// row's result is bit for bit the same by either path (the kernel tests compare them), and which path runs depends only
// on the CPU and the rows of x, never on what a result holds. Only whole tiles of 16 rows of x take it (prompts, big
// verification steps): per block the float step is the same work by either path, and below 16 rows the tile unit's
// fixed costs ate its gain (docs/performance.md).
#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
constexpr bool kAmxBuilt = true;

struct TileConfig {
  uint8_t palette = 1, start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Two sets of tiles (0-2 and 3-5), each: the sums (16 x 16 int32), x8 (16 rows of a 32-weight block's bytes),
// the codes (8 rows of 16 weight rows x 4 bytes). Loaded at the start of every AMX call, not once per
// process: another library in this thread may have set its own since.
inline void load_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 6; t += 3) {
    cfg.rows[t] = 16, cfg.colsb[t] = 64;
    cfg.rows[t + 1] = 16, cfg.colsb[t + 1] = 32;
    cfg.rows[t + 2] = 8, cfg.colsb[t + 2] = 64;
  }
  _tile_loadconfig(&cfg);
}

// Block p's codes as the tile wants them: Q8_0's as stored, the nibble kinds' unpacked into `unpacked`.
template <typename Codes>
inline const uint8_t* amx_codes(const uint8_t* p, uint8_t* unpacked) {
  if constexpr (Codes::kOffset == 128) {
    return p + Codes::kCodesAt;
  } else {
    const auto store = [&](auto v) {  // pair v's two code vectors (v: a std::integral_constant)
      __m512i c[2];
      Codes::template unpack_pair<v()>(p + Codes::kCodesAt, c);
      _mm512_store_si512(unpacked + 128 * v(), c[0]);
      _mm512_store_si512(unpacked + 128 * v() + 64, c[1]);
    };
    store(std::integral_constant<int, 0>{});
    store(std::integral_constant<int, 1>{});
    store(std::integral_constant<int, 2>{});
    store(std::integral_constant<int, 3>{});
    return unpacked;
  }
}

// Loads a block's codes into tile B and its x8 into tile A, and starts its sums in tile C (the tile
// instructions take their registers as literals).
#define METRONOME_AMX_START(C, A, B, codes, x, x_stride) \
  do {                                                   \
    _tile_loadd(B, codes, 64);                           \
    _tile_loadd(A, x, x_stride);                         \
    _tile_zero(C);                                       \
    _tile_dpbsud(C, A, B);                               \
  } while (0)

// Block b's float step from its integer sums (MT x 16 int32 at `sums`): X16Block32::tile's, op for op.
template <typename Codes, int MT>
inline void amx_finish(const uint8_t* p, const uint8_t* rec, const int32_t* sums, __m512* acc) {
  constexpr int64_t kOffsetAt = Codes::kOffset == 16 ? kRecordO16 : kRecordO128;
  const __m512 d = fp16x16(p);
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) {
    const uint8_t* r = rec + m * kRecordBytes;
    __m512i s = _mm512_load_si512(sums + 16 * m);
    if constexpr (Codes::kOffset != 0)
      s = _mm512_add_epi32(s, _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(r + kOffsetAt)));
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s),
                             _mm512_mul_ps(d, _mm512_set1_ps(*reinterpret_cast<const float*>(r + kRecordDx))), acc[m]);
  }
  if constexpr (Codes::kMin) {
    const __m512 mn = fp16x16(p + 32);
#pragma GCC unroll 16
    for (int m = 0; m < MT; ++m)
      acc[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(*reinterpret_cast<const float*>(rec + m * kRecordBytes + kRecordSx)),
                               acc[m]);
  }
}

// 16 packed rows (from local row n0) x 16 rows of x (from m0), blocks two at a time in two sets of tiles, so
// that the tile unit multiplies the next block while the vector unit does this one's float step. The nibble
// kinds' codes are unpacked a block before their tile load (a tile load waits for the vector stores before
// it to reach the cache: right after them it stalled).
template <typename Codes>
inline void amx_tile(const uint8_t* w, int64_t nb, const XQuant& xq, float* y, int64_t ldy, int64_t rows, int64_t n0,
                     int64_t m0, uint8_t (*unpacked)[512], int32_t* sums) {
  constexpr int MT = 16;
  __m512 acc[MT];
#pragma GCC unroll 16
  for (int m = 0; m < MT; ++m) acc[m] = _mm512_setzero_ps();
  const uint8_t* rec = xq.xr + m0 * kRecordBytes;
  const int64_t step = xq.xr_block;
  auto codes = [&](int64_t b) { return amx_codes<Codes>(w + b * Codes::kBytes, unpacked[b % 3]); };
  const uint8_t* c0 = codes(0);
  const uint8_t* c1 = nb > 1 ? codes(1) : nullptr;
  METRONOME_AMX_START(0, 1, 2, c0, rec, kRecordBytes);
  for (int64_t b = 0; b < nb; b += 2) {
    const uint8_t* p = w + b * Codes::kBytes;
    prefetch_ahead<2 * Codes::kBytes>(p);
    if (b + 1 < nb) METRONOME_AMX_START(3, 4, 5, c1, rec + (b + 1) * step, kRecordBytes);
    const uint8_t* c2 = b + 2 < nb ? codes(b + 2) : nullptr;
    _tile_stored(0, sums, 64);
    amx_finish<Codes, MT>(p, rec + b * step, sums, acc);
    if (b + 1 >= nb) break;
    if (b + 2 < nb) METRONOME_AMX_START(0, 1, 2, c2, rec + (b + 2) * step, kRecordBytes);
    if (b + 3 < nb) c1 = codes(b + 3);
    _tile_stored(3, sums + MT * 16, 64);
    amx_finish<Codes, MT>(p + Codes::kBytes, rec + (b + 1) * step, sums + MT * 16, acc);
  }
  store16<MT>(acc, y, ldy, rows, n0, m0);
}

// Groups [n_lo, n_hi) x rows [m_lo, m_hi) of x (whole tiles of 16 rows) by AMX.
template <typename Codes>
void amx_rows(const uint8_t* w, int64_t nb, const XQuant& xq, float* y, int64_t ldy, int64_t rows, int64_t n_lo,
              int64_t n_hi, int64_t m_lo, int64_t m_hi) {
  load_tile_config();
  alignas(64) uint8_t unpacked[3][512];
  alignas(64) int32_t sums[2 * 16 * 16];
  for (int64_t m0 = m_lo; m0 < m_hi; m0 += 16)  // 16 rows' x records stay in L1; the groups stream past
    for (int64_t n0 = n_lo; n0 < n_hi; n0 += 16)
      amx_tile<Codes>(w + (n0 / 16) * nb * Codes::kBytes, nb, xq, y, ldy, rows, n0, m0, unpacked, sums);
  _tile_release();  // the thread's tile state is back to init: a context switch need not save 8 KB of it
}

// Q4_KX16 (see Q4_Kx16) by AMX. What the vector path builds per x row and 16 weight rows is the integer
// isum = sum_j sc_j s_j, s_j the sum of codes times x8 over sub-block j (32 weights), sc_j its 6-bit scale.
// Taking each s_j from its own tile and multiplying by sc_j with vector instructions (vpmulld and an add per x
// row and sub-block) left the tile unit waiting on the vector unit. Here the scales go into the codes instead:
// with sc = 16 hi + lo (lo < 16, hi < 4), lo * q and hi * q (q < 16) each fit a byte, so
//   isum = sum_k x8_k (lo * q)_k + 16 sum_k x8_k (hi * q)_k
// over the super-block's 256 weights, two sums the tile unit runs as 4 + 4 multiplies of 64 weights, leaving
// the vector unit two tile stores per 16 x rows and a shift-and-add per x row and super-block. The same
// integer, so the minimum term and the float step (Q4_Kx16::tile's, op for op) give the same bits. The scaled
// codes are made once per super-block for every tile of x rows of a call, and a super-block ahead of the tile
// loads that read them (a tile load right after the vector stores it reads waits for them).
struct Q4KScaled {
  alignas(64) uint8_t lo[4096];  // the super-block's 64 rows of 64 bytes (k-quad r, weight rows 0-15): lo * q
  alignas(64) uint8_t hi[4096];  // the same for hi * q
};

inline void q4k_scale(const uint8_t* p, Q4KScaled& out) {
  const __m512i low4 = _mm512_set1_epi16(0x000F);
  for (int j = 0; j < 8; ++j) {
    __m512i c[9];
    Q4_Kx16::codes(p, j, c);  // c[8]: row r's sc_j in both int16 halves of lane r
    const __m512i lo = _mm512_and_si512(c[8], low4), hi = _mm512_srli_epi16(c[8], 4);
    // a 16-bit lane holds two codes of one weight row: (q1 << 8 | q0) * s = (q1 s) << 8 | q0 s, as q0 s < 256
    for (int v = 0; v < 8; ++v) {
      _mm512_store_si512(out.lo + 512 * j + 64 * v, _mm512_mullo_epi16(c[v], lo));
      _mm512_store_si512(out.hi + 512 * j + 64 * v, _mm512_mullo_epi16(c[v], hi));
    }
  }
}

// Every tile 16 rows of 64 bytes: the sums (two sets of lo and hi: 0-1, 2-3), x8 (4) and the scaled codes (5, 6).
inline void load_q4k_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 7; ++t) cfg.rows[t] = 16, cfg.colsb[t] = 64;
  _tile_loadconfig(&cfg);
}

// The tile unit's share of one x tile (16 rows at x, stride K) against one super-block's scaled codes s, into
// sum tiles LO and HI (a macro: the tile instructions take their registers as literals).
#define METRONOME_Q4K_TILES(LO, HI, x, K, s)  \
  do {                                        \
    _tile_zero(LO);                           \
    _tile_zero(HI);                           \
    for (int t_ = 0; t_ < 4; ++t_) {          \
      _tile_loadd(4, (x) + 64 * t_, K);       \
      _tile_loadd(5, (s).lo + 1024 * t_, 64); \
      _tile_loadd(6, (s).hi + 1024 * t_, 64); \
      _tile_dpbsud(LO, 4, 5);                 \
      _tile_dpbsud(HI, 4, 6);                 \
    }                                         \
  } while (0)

// The vector unit's share: isum from the two sums, then the minimum term and the float step into acc (16 x
// rows of 16 floats).
inline void q4k_finish(const uint8_t* p, const XQuant& xq, int64_t nb, int64_t b, int64_t m0, const int32_t* lo,
                       const int32_t* hi, float* acc) {
  const __m512 d = fp16x16(p);
  const __m512 dmin = fp16x16(p + 32);
  __m512i mn[4];
  Q4_Kx16::minimums(p, mn);
#pragma GCC unroll 16
  for (int m = 0; m < 16; ++m) {
    const int64_t i = (m0 + m) * nb + b;
    const __m512i isum =
        _mm512_add_epi32(_mm512_load_si512(lo + 16 * m), _mm512_slli_epi32(_mm512_load_si512(hi + 16 * m), 4));
    __m512i imin = dpwssd_bcst(_mm512_setzero_si512(), mn[0], xq.bs32p + i * 4);
    for (int k = 1; k < 4; ++k) imin = dpwssd_bcst(imin, mn[k], xq.bs32p + i * 4 + k);
    const __m512 dx = _mm512_set1_ps(xq.dxk[i]);
    __m512 a = _mm512_load_ps(acc + 16 * m);
    a = _mm512_fmadd_ps(_mm512_cvtepi32_ps(isum), _mm512_mul_ps(d, dx), a);
    _mm512_store_ps(acc + 16 * m, _mm512_fnmadd_ps(_mm512_cvtepi32_ps(imin), _mm512_mul_ps(dmin, dx), a));
  }
}

// Groups [n_lo, n_hi) x rows [m_lo, m_hi) of x (whole tiles of 16 rows), up to 64 rows of x at a time. The
// work items (super-block b, x tile t) run in order, each one's tile multiplies issued before the previous
// item's vector share, in the other set of sum tiles, so that the two units overlap.
void amx_q4k_rows(const uint8_t* w, int64_t nb, const XQuant& xq, int64_t K, float* y, int64_t ldy, int64_t rows,
                  int64_t n_lo, int64_t n_hi, int64_t m_lo, int64_t m_hi) {
  constexpr int64_t kRows = 64;
  load_q4k_tile_config();
  static thread_local Q4KScaled scaled[3];  // super-block b's in scaled[b % 3]: b's, b + 1's, and b - 1's in flight
  alignas(64) int32_t sums[2][2][256];      // [set][lo, hi]: 16 x rows x 16 weight rows
  alignas(64) float acc[kRows * 16];
  const int8_t* x8 = xq.x8k;
  for (int64_t ms = m_lo; ms < m_hi; ms += kRows) {
    const int64_t tiles = (std::min(m_hi, ms + kRows) - ms) / 16, items = nb * tiles;
    for (int64_t n0 = n_lo; n0 < n_hi; n0 += 16) {
      const uint8_t* g = w + (n0 / 16) * nb * kQ4Kx16Bytes;
      std::memset(acc, 0, sizeof(float) * 256 * tiles);
      q4k_scale(g, scaled[0]);
      auto issue = [&](int64_t i) {  // item i's tile multiplies, into sum set i % 2
        const int64_t b = i / tiles, t = i % tiles;
        if (t == 0 && b + 1 < nb) {  // the next super-block's scaled codes, a super-block ahead
          prefetch_ahead<kQ4Kx16Bytes>(g + (b + 1) * kQ4Kx16Bytes);
          q4k_scale(g + (b + 1) * kQ4Kx16Bytes, scaled[(b + 1) % 3]);
        }
        const int8_t* x = x8 + (ms + 16 * t) * K + b * 256;
        if (i % 2 == 0)
          METRONOME_Q4K_TILES(0, 1, x, K, scaled[b % 3]);
        else
          METRONOME_Q4K_TILES(2, 3, x, K, scaled[b % 3]);
      };
      issue(0);
      for (int64_t i = 0; i < items; ++i) {
        if (i + 1 < items) issue(i + 1);
        const int64_t b = i / tiles, t = i % tiles;
        int32_t* lo = sums[i % 2][0];
        int32_t* hi = sums[i % 2][1];
        if (i % 2 == 0) {
          _tile_stored(0, lo, 64);
          _tile_stored(1, hi, 64);
        } else {
          _tile_stored(2, lo, 64);
          _tile_stored(3, hi, 64);
        }
        q4k_finish(g + b * kQ4Kx16Bytes, xq, nb, b, ms + 16 * t, lo, hi, acc + 256 * t);
      }
      __m512 out[16];
      for (int64_t t = 0; t < tiles; ++t) {
        for (int m = 0; m < 16; ++m) out[m] = _mm512_load_ps(acc + 256 * t + 16 * m);
        store16<16>(out, y, ldy, rows, n0, ms + 16 * t);
      }
    }
  }
  _tile_release();
}

// One 16 x 16 x 32 tile multiply against its sums computed one by one: whether the tile unit works here.
bool amx_works() {
  alignas(64) int8_t a[16 * 32];
  alignas(64) uint8_t b[8 * 64];
  alignas(64) int32_t c[16 * 16];
  for (int i = 0; i < 16 * 32; ++i) a[i] = static_cast<int8_t>(i % 7 - 3);
  for (int i = 0; i < 8 * 64; ++i) b[i] = static_cast<uint8_t>(i % 11 * 23);
  load_tile_config();
  _tile_loadd(1, a, 32);
  _tile_loadd(2, b, 64);
  _tile_zero(0);
  _tile_dpbsud(0, 1, 2);
  _tile_stored(0, c, 64);
  _tile_release();
  for (int m = 0; m < 16; ++m)
    for (int n = 0; n < 16; ++n) {
      int32_t sum = 0;
      for (int k = 0; k < 32; ++k) sum += a[m * 32 + k] * b[(k / 4) * 64 + n * 4 + k % 4];
      if (c[m * 16 + n] != sum) return false;
    }
  return true;
}

// Linux hands a process the tile registers' state only once it asks (arch_prctl); without asking, the first
// tile instruction is an illegal instruction. A hypervisor may list AMX and still trap it, so one multiply is
// tried in a child process first: a trap ends the child, not this process. Called once per process.
bool request_amx() {
  constexpr long kReqXcompPerm = 0x1023, kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  const pid_t child = fork();  // the child runs no library code: the multiply, then _exit
  if (child < 0) return false;
  if (child == 0) _exit(amx_works() ? 0 : 1);
  int status = 0;
  for (int waited_ms = 0; waited_ms < 5000; waited_ms += 5) {  // bounded: a child that hangs is killed
    const pid_t done = waitpid(child, &status, WNOHANG);
    if (done == child) return WIFEXITED(status) && WEXITSTATUS(status) == 0;
    if (done < 0) return false;  // reaped by someone else: not known to work
    usleep(5000);
  }
  kill(child, SIGKILL);
  waitpid(child, &status, 0);
  return false;
}
#else
constexpr bool kAmxBuilt = false;
bool request_amx() { return false; }
#endif

// AMX runs a packed matmul where the CPU and the build have it, Linux granted it, set_amx has not turned it
// off (the tests and benchmarks compare both paths), for x's rows in whole tiles of 16.
std::atomic<bool> amx_wanted{true};

bool amx_granted() {
  static const bool granted = kAmxBuilt && request_amx();  // asked once per process
  return granted;
}

bool amx_enabled() { return amx_wanted.load(std::memory_order_relaxed) && amx_granted(); }

// The packed kinds with an AMX path: the 32-weight kinds where the codes are unsigned (every AMX CPU has
// vpdpbusd, so Q8_0's are q + 128), and Q4_KX16.
template <typename P>
constexpr bool kOnAmx = false;
template <typename Codes>
constexpr bool kOnAmx<X16Block32<Codes>> = !X16Block32<Codes>::kSigned;
template <>
constexpr bool kOnAmx<Q4_Kx16> = true;

// Whether kind P's tile reads records that x16_rows unpacks once per group (P::Unpacked, P::unpack_group):
// the kinds that say so in their kUnpacksGroup.
template <typename P>
constexpr bool unpacks_group() {
  if constexpr (requires { P::kUnpacksGroup; })
    return P::kUnpacksGroup;
  else
    return false;
}

// P::tile<MT> for the n (1..MT) x rows left at m0 (with the group's Unpacked records, where P reads them).
template <typename P, int MT>
inline void x16_tile(int64_t n, const uint8_t* g, int64_t nb, const XQuant& xq, int64_t K, float* y, int64_t ldy,
                     int64_t rows, int64_t n0, int64_t m0, const void* unpacked) {
  if constexpr (MT > 1) {
    if (n < MT) return x16_tile<P, MT - 1>(n, g, nb, xq, K, y, ldy, rows, n0, m0, unpacked);
  }
  if constexpr (requires { typename P::Unpacked; }) {
    // two instances, so that without records the codes can stay in registers (one row of x ran 0.83x when
    // they came through a pointer that might be either)
    const auto* u = static_cast<const typename P::Unpacked*>(unpacked);  // null where unpacks_group<P>() is false
    if (u)
      P::template tile<MT, true>(g, nb, xq, K, y, ldy, rows, n0, m0, u);
    else
      P::template tile<MT, false>(g, nb, xq, K, y, ldy, rows, n0, m0, nullptr);
  } else
    P::template tile<MT>(g, nb, xq, K, y, ldy, rows, n0, m0);
}

// Groups [n_lo, n_hi) (local rows, multiples of 16 but the segment's end) x rows [m_lo, m_hi) of x, kind P.
template <typename P>
void x16_rows(const uint8_t* w, const XQuant& xq, int64_t K, float* y, int64_t ldy, int64_t rows, int64_t n_lo,
              int64_t n_hi, int64_t m_lo, int64_t m_hi) {
  const int64_t nb = K / P::kW;
#if defined(__AMX_INT8__) && defined(__AMX_TILE__)
  if constexpr (kOnAmx<P>) {
    const int64_t full = m_lo + (m_hi - m_lo) / 16 * 16;  // the rows after the last 16 take the vector path
    if (full > m_lo && amx_enabled()) {
      if constexpr (std::is_same_v<P, Q4_Kx16>)
        amx_q4k_rows(w, nb, xq, K, y, ldy, rows, n_lo, n_hi, m_lo, full);
      else
        amx_rows<typename P::CodesT>(w, nb, xq, y, ldy, rows, n_lo, n_hi, m_lo, full);
      m_lo = full;
      if (m_lo == m_hi) return;
    }
  }
#endif
  void* unpacked = nullptr;
  if constexpr (unpacks_group<P>()) {
    // grown, never shrunk: the calls of a prompt's layers reuse it (up to 180 KB at K = 8960) rather than
    // allocate it each time
    thread_local std::vector<typename P::Unpacked> own;
    if (m_hi - m_lo > kRowsPerPass) {
      if (static_cast<int64_t>(own.size()) < nb) own.resize(nb);
      unpacked = own.data();
    }
  }
  for (int64_t n0 = n_lo; n0 < n_hi; n0 += 16) {
    const uint8_t* g = w + (n0 / 16) * nb * P::kBytes;
    if constexpr (unpacks_group<P>()) {
      if (unpacked) P::unpack_group(g, nb, static_cast<typename P::Unpacked*>(unpacked));
    }
    for (int64_t m0 = m_lo; m0 < m_hi; m0 += kRowsPerPass)
      x16_tile<P, kRowsPerPass>(std::min(kRowsPerPass, m_hi - m0), g, nb, xq, K, y, ldy, rows, n0, m0, unpacked);
  }
}

// ---------------------------------------------------------------------------------------------------
// The file's own formats, read in place (row after row of blocks, as the GGUF file stores them: the
// matrix can stay a view of the mapped file). Each kind unpacks a block's codes to unsigned bytes in the
// weights' natural order and multiplies them with the int8 x by VNNI (vpdpbusd: 4 products per int32
// lane); every integer sum is exact, so only the float steps below fix the order. One 16-lane float
// accumulator per (row, x row); a row's result is the fixed-tree sum of its 16 lanes.
//
// 32-weight kinds (x quantized per 32): two blocks per 512-bit step, block b in lanes 0..7 and block
// b+1 in lanes 8..15 (an odd last block alone, the upper half zero). Codes are unsigned:
//   Q8_0  w = d*q, q int8:            codes q+128,  sum q x8 = dot - 128 * bs
//   Q5_0  w = d*(q-16), q in [0,32):  codes q,      sum (q-16) x8 = dot - 16 * bs
//   Q5_1  w = d*q + m:                codes q,      + m * sx
// The offset term starts the integer sum (in the first lane of its block's half); per step
// acc += (d * dx) * float(dot), each half with its own block's d * dx, then m * sx into the first
// lane of each half. (One block per 256-bit step was slower: unpacking and scaling cost per instruction,
// not per weight; docs/models.md has the figures.)
//
// 256-weight kinds (x quantized per 256): a super-block's 64 weights at a time; vpmaddubsw gives 32
// int16 pair sums (at most 2 * 63 * 127, no saturation) and vpdpwssd multiplies each pair by its
// sub-block's integer scale into int32 lanes (4 products each) summed over the super-block, then
//   Q4_K/Q5_K  w = d*sc_j*q - dmin*m_j (8 sub-blocks of 32):  acc += d * (dx * isum) + sum_j (-dmin*m_j) (dx*bs32_j)
//   Q6_K       w = d*sc_g*(q-32) (16 groups of 16):             acc += d * (dx * isum) + sum_g (-32*d*sc_g) (dx*bs16_g)
// The minimum and offset terms are multiply-adds against sums of x computed once per block (q.mk, q.m6),
// not integer products per weight row; the minimum term lands in lanes 0..7.

inline float half_at(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, 2);
  return fp16_to_f32(h);
}

// The fp16 at p and (kTwo) at p + stride -> [f0, f1 or 0, 0, 0].
template <bool kTwo>
inline __m128 two_halves(const uint8_t* p, int64_t stride) {
  uint16_t h0, h1 = 0;
  std::memcpy(&h0, p, 2);
  if constexpr (kTwo) std::memcpy(&h1, p + stride, 2);
  return _mm_cvtph_ps(_mm_cvtsi32_si128(static_cast<int>(h0 | (static_cast<uint32_t>(h1) << 16))));
}

template <bool kTwo>
inline __m128 two_floats(const float* p) {  // [p[0], p[1] or 0, 0, 0]
  if constexpr (kTwo) return _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(p)));
  return _mm_load_ss(p);
}

inline __m512 halves(__m128 s, __mmask16 lanes = 0xFFFF) {  // lanes 0..7 = s[0], 8..15 = s[1] (others 0)
  const __m512i idx = _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1);
  return _mm512_maskz_permutexvar_ps(lanes, idx, _mm512_castps128_ps512(s));
}

// Two blocks' 16 code bytes each (p0, p1) -> 64 bytes in weight order: [low nibbles of p0 (weights
// 0..15), high nibbles of p0 (16..31), the same of p1]; without kTwo the upper 32 bytes are 0.
template <bool kTwo>
inline __m512i nibbles64(const uint8_t* p0, const uint8_t* p1) {
  const __m128i a = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p0));
  __m512i q = _mm512_maskz_broadcast_i64x2(0x0F, a);  // [a a . .]
  if constexpr (kTwo) q = _mm512_mask_broadcast_i64x2(q, 0xF0, _mm_loadu_si128(reinterpret_cast<const __m128i*>(p1)));
  return _mm512_and_si512(_mm512_srlv_epi64(q, _mm512_setr_epi64(0, 0, 4, 4, 0, 0, 4, 4)), _mm512_set1_epi8(0x0F));
}

// Bit j of the little-endian uint32 at p0 (then at p1) -> 0x10 in byte j (32 + j).
template <bool kTwo>
inline __m512i fifth_bits64(const uint8_t* p0, const uint8_t* p1) {
  uint32_t h0, h1 = 0;
  std::memcpy(&h0, p0, 4);
  if constexpr (kTwo) std::memcpy(&h1, p1, 4);
  return _mm512_maskz_mov_epi8(h0 | (static_cast<uint64_t>(h1) << 32), _mm512_set1_epi8(0x10));
}

// Blocks b (and b+1) of one weight row, their codes unpacked, against MT rows of x; kOffset: 16 (Q5_0),
// 128 (Q8_0: codes q + 128, or q itself where kSignedQ8) or 0.
template <int MT, int kOffset, bool kMin, bool kTwo>
inline void pair_dot(__m512i codes, __m128 d, __m128 mn, const XQuant& xq, int64_t K, int64_t m0, int64_t b,
                     __m512* acc) {
  const int64_t nb = K / 32;
  const int32_t* off = kOffset == 16 ? xq.o16 : xq.o128;
  const __m512i abs_codes = kOffset == 128 && kSignedQ8 ? _mm512_abs_epi8(codes) : codes;  // dpbssd's |q|
  for (int m = 0; m < MT; ++m) {
    const int64_t i = (m0 + m) * nb + b;
    const int8_t* xr = xq.x8 + (m0 + m) * K + b * 32;
    const __m512i x = kTwo ? _mm512_loadu_si512(xr)
                           : _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr)));
    __m512i dot;
    if constexpr (kOffset == 128 && kSignedQ8) {  // Q8_0 without vpdpbusd: codes are q itself, no offset
      dot = dpbssd(_mm512_setzero_si512(), codes, abs_codes, x);
    } else {
      __m512i start = _mm512_setzero_si512();  // the offset term, in lane 0 (block b) and lane 9 (block b+1)
      if constexpr (kOffset > 0) {
        if constexpr (kTwo)
          start = _mm512_maskz_broadcast_i32x2(0x0201, _mm_loadl_epi64(reinterpret_cast<const __m128i*>(off + i)));
        else
          start = _mm512_zextsi128_si512(_mm_cvtsi32_si128(off[i]));
      }
      // Q8_0 codes (q + 128) take the exact form for any byte; Q4 and Q5 codes are below 128
      dot = kOffset == 128 ? _mm512_dpbusd_epi32(start, codes, x) : dpbusd_small(start, codes, x);
    }
    acc[m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), halves(_mm_mul_ps(d, two_floats<kTwo>(xq.dx + i))), acc[m]);
    if constexpr (kMin) acc[m] = _mm512_add_ps(acc[m], halves(_mm_mul_ps(mn, two_floats<kTwo>(xq.sx + i)), 0x0101));
  }
}

struct Q8_0x8 {
  static constexpr int64_t kW = 32, kB = 34;
  template <int MT, bool kTwo>
  static inline void pair(const uint8_t* p, const XQuant& xq, int64_t K, int64_t m0, int64_t b, __m512* acc) {
    __m512i q = _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 2)));
    if constexpr (kTwo) q = _mm512_inserti64x4(q, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + kB + 2)), 1);
    // q + 128 (unsigned) for vpdpbusd; without it, q itself for dpbssd
    const __m512i codes = kSignedQ8 ? q : _mm512_xor_si512(q, _mm512_set1_epi8(static_cast<char>(0x80)));
    pair_dot<MT, 128, false, kTwo>(codes, two_halves<kTwo>(p, kB), _mm_setzero_ps(), xq, K, m0, b, acc);
  }
};

struct Q5_0 {
  static constexpr int64_t kW = 32, kB = 22;
  template <int MT, bool kTwo>
  static inline void pair(const uint8_t* p, const XQuant& xq, int64_t K, int64_t m0, int64_t b, __m512* acc) {
    const __m512i codes = _mm512_or_si512(nibbles64<kTwo>(p + 6, p + kB + 6), fifth_bits64<kTwo>(p + 2, p + kB + 2));
    pair_dot<MT, 16, false, kTwo>(codes, two_halves<kTwo>(p, kB), _mm_setzero_ps(), xq, K, m0, b, acc);
  }
};

struct Q5_1 {
  static constexpr int64_t kW = 32, kB = 24;
  template <int MT, bool kTwo>
  static inline void pair(const uint8_t* p, const XQuant& xq, int64_t K, int64_t m0, int64_t b, __m512* acc) {
    const __m512i codes = _mm512_or_si512(nibbles64<kTwo>(p + 8, p + kB + 8), fifth_bits64<kTwo>(p + 4, p + kB + 4));
    pair_dot<MT, 0, true, kTwo>(codes, two_halves<kTwo>(p, kB), two_halves<kTwo>(p + 2, kB), xq, K, m0, b, acc);
  }
};

// Q4_K/Q5_K's 12 scale bytes (three little-endian words u0, u1, u2) -> 8 six-bit scales then 8 six-bit
// minimums as 16 int32: sc[0..4) = u0's low 6 bits per byte, mn[0..4) = u1's; sc[4..8) = u2's low
// nibbles with u0's top 2 bits above them, mn[4..8) = u2's high nibbles with u1's top 2 bits.
inline __m512i k_scales(const uint8_t* s) {
  uint32_t u[3];
  std::memcpy(u, s, 12);
  const uint32_t six = 0x3F3F3F3F, nib = 0x0F0F0F0F, two = 0x03030303;
  const uint32_t sc_lo = u[0] & six, mn_lo = u[1] & six;
  const uint32_t sc_hi = (u[2] & nib) | (((u[0] >> 6) & two) << 4);
  const uint32_t mn_hi = ((u[2] >> 4) & nib) | (((u[1] >> 6) & two) << 4);
  return _mm512_cvtepu8_epi32(_mm_setr_epi32(static_cast<int>(sc_lo), static_cast<int>(sc_hi), static_cast<int>(mn_lo),
                                             static_cast<int>(mn_hi)));
}

inline __m512i lanes_of(int a, int b) {  // lanes 0..7 = a, 8..15 = b
  return _mm512_mask_blend_epi32(0xFF00, _mm512_set1_epi32(a), _mm512_set1_epi32(b));
}

// Int32 lanes holding small scales -> the same scale in both int16 halves of each lane (vpdpwssd's
// operand): kSigned copies the low 16 bits (a sign-extended int8), otherwise the low byte zero-extended.
// (vpshufb picks bytes within each 128-bit lane: dword j of a lane is bytes 4j..4j+3.)
template <bool kSigned>
inline __m512i scale16(__m512i v) {
  const __m512i pick = kSigned ? _mm512_set4_epi32(0x0D0C0D0C, 0x09080908, 0x05040504, 0x01000100)
                               : _mm512_set4_epi32(static_cast<int>(0x800C800C), static_cast<int>(0x80088008),
                                                   static_cast<int>(0x80048004), static_cast<int>(0x80008000));
  return _mm512_shuffle_epi8(v, pick);
}

// Q4_K and Q5_K (kHigh): d, dmin (fp16), 12 scale bytes, [32 high-bit bytes,] 128 code bytes; 32 code
// bytes per 64 weights (low nibbles: sub-block 2j, high: 2j+1). One 64-byte load holds sub-blocks
// 4p..4p+3: low nibbles (4p, 4p+2), high nibbles (4p+1, 4p+3), which x8kp holds side by side.
template <bool kHigh>
struct QK45 {
  static constexpr int64_t kW = 256, kB = kHigh ? 176 : 144;
  template <int MT>
  static inline void block(const uint8_t* p, const XQuant& xq, int64_t K, int64_t m0, int64_t b, __m512* acc) {
    const __m512i sm = k_scales(p + 4);  // lanes 0..7 scales, 8..15 minimums
    // -dmin * m_j in lanes 0..7: against x's dx * bs32_j (q.mk), the minimum term in one multiply-add
    const __m512 mn = _mm512_zextps256_ps512(
        _mm256_mul_ps(_mm256_cvtepi32_ps(_mm512_extracti64x4_epi64(sm, 1)), _mm256_set1_ps(-half_at(p + 2))));
    const uint8_t* qs = p + (kHigh ? 48 : 16);
    const __m512i low4 = _mm512_set1_epi8(0x0F);
    __m512i hb = _mm512_setzero_si512();
    if constexpr (kHigh) hb = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 16)));
    __m512i isum[MT];
    for (int m = 0; m < MT; ++m) isum[m] = _mm512_setzero_si512();
    for (int h = 0; h < 2; ++h) {  // sub-blocks 4h..4h+3
      const __m512i q = _mm512_loadu_si512(qs + 64 * h);
      __m512i lo = _mm512_and_si512(q, low4), hi = _mm512_and_si512(_mm512_srli_epi16(q, 4), low4);
      if constexpr (kHigh) {  // sub-block g's fifth bit is bit g of its byte of qh
        const __m512i one = _mm512_set1_epi8(1);
        const int g = 4 * h;
        const __m512i s_lo = _mm512_setr_epi64(g, g, g, g, g + 2, g + 2, g + 2, g + 2);
        const __m512i s_hi = _mm512_setr_epi64(g + 1, g + 1, g + 1, g + 1, g + 3, g + 3, g + 3, g + 3);
        lo = _mm512_or_si512(lo, _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(hb, s_lo), one), 4));
        hi = _mm512_or_si512(hi, _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(hb, s_hi), one), 4));
      }
      const __m512i sc_lo = scale16<false>(_mm512_permutexvar_epi32(lanes_of(4 * h, 4 * h + 2), sm));
      const __m512i sc_hi = scale16<false>(_mm512_permutexvar_epi32(lanes_of(4 * h + 1, 4 * h + 3), sm));
      for (int m = 0; m < MT; ++m) {
        const int8_t* x = xq.x8kp + (m0 + m) * K + b * 256 + 128 * h;
        isum[m] = _mm512_dpwssd_epi32(isum[m], _mm512_maddubs_epi16(lo, _mm512_loadu_si512(x)), sc_lo);
        isum[m] = _mm512_dpwssd_epi32(isum[m], _mm512_maddubs_epi16(hi, _mm512_loadu_si512(x + 64)), sc_hi);
      }
    }
    const __m512 d = _mm512_set1_ps(half_at(p));
    const int64_t nb = K / 256;
    for (int m = 0; m < MT; ++m) {
      const int64_t i = (m0 + m) * nb + b;
      acc[m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(isum[m]), _mm512_set1_ps(xq.dxk[i])), d, acc[m]);
      acc[m] = _mm512_fmadd_ps(mn, _mm512_loadu_ps(xq.mk + i * 16), acc[m]);
    }
  }
};

// Q6_K: 128 low-nibble bytes, 64 bytes of 2-bit high parts, 16 int8 scales (one per 16 weights), d (fp16).
struct Q6K {
  static constexpr int64_t kW = 256, kB = 210;
  template <int MT>
  static inline void block(const uint8_t* p, const XQuant& xq, int64_t K, int64_t m0, int64_t b, __m512* acc) {
    const __m512i sc = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 192)));
    const __m512 d = _mm512_set1_ps(half_at(p + 208));
    const __m512 off = _mm512_mul_ps(_mm512_cvtepi32_ps(sc), _mm512_mul_ps(d, _mm512_set1_ps(-32.0f)));  // -32 d sc_g
    const int64_t nb = K / 256;
    __m512i isum[MT];
    for (int m = 0; m < MT; ++m) isum[m] = _mm512_setzero_si512();
    const __m512i low4 = _mm512_set1_epi8(0x0F), three = _mm512_set1_epi8(3);
    for (int h = 0; h < 2; ++h) {
      const __m512i ql = _mm512_loadu_si512(p + 64 * h);
      const __m512i qh = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 128 + 32 * h)));
      for (int c = 0; c < 2; ++c) {  // weights 128h + 64c + [0, 64)
        const __m512i lo = c == 0 ? _mm512_and_si512(ql, low4) : _mm512_and_si512(_mm512_srli_epi16(ql, 4), low4);
        const __m512i shift = _mm512_setr_epi64(4 * c, 4 * c, 4 * c, 4 * c, 4 * c + 2, 4 * c + 2, 4 * c + 2, 4 * c + 2);
        const __m512i high = _mm512_slli_epi16(_mm512_and_si512(_mm512_srlv_epi64(qh, shift), three), 4);
        const __m512i codes = _mm512_or_si512(lo, high);
        const int g = 4 * (2 * h + c);  // the chunk's first 16-weight group
        const __m512i idx = _mm512_setr_epi32(g, g, g, g, g + 1, g + 1, g + 1, g + 1, g + 2, g + 2, g + 2, g + 2, g + 3,
                                              g + 3, g + 3, g + 3);
        const __m512i s = scale16<true>(_mm512_permutexvar_epi32(idx, sc));
        for (int m = 0; m < MT; ++m) {
          const __m512i x = _mm512_loadu_si512(xq.x8k + (m0 + m) * K + b * 256 + 128 * h + 64 * c);
          isum[m] = _mm512_dpwssd_epi32(isum[m], _mm512_maddubs_epi16(codes, x), s);
        }
      }
    }
    for (int m = 0; m < MT; ++m) {
      const int64_t i = (m0 + m) * nb + b;
      acc[m] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(isum[m]), _mm512_set1_ps(xq.dxk[i])), d, acc[m]);
      acc[m] = _mm512_fmadd_ps(off, _mm512_loadu_ps(xq.m6 + i * 16), acc[m]);
    }
  }
};

// NT output rows of a segment (local rows n0.., y columns n0..) x MT rows of x (from m0), kind F.
template <typename F, int NT, int MT>
void file_tile(const uint8_t* w, const XQuant& xq, int64_t K, float* y, int64_t ldy, int64_t n0, int64_t m0) {
  const int64_t nb = K / F::kW, row_bytes = nb * F::kB;
  __m512 acc[NT][MT];
  for (int n = 0; n < NT; ++n)
    for (int m = 0; m < MT; ++m) acc[n][m] = _mm512_setzero_ps();
  const char* pf = reinterpret_cast<const char*>(w + (n0 + kPrefetchRows) * row_bytes);
  if constexpr (F::kW == 32) {  // two blocks per step, an odd last block alone
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      prefetch_step<2 * NT * F::kB>(pf + b * NT * F::kB);
      for (int n = 0; n < NT; ++n)
        F::template pair<MT, true>(w + (n0 + n) * row_bytes + b * F::kB, xq, K, m0, b, acc[n]);
    }
    if (b < nb)
      for (int n = 0; n < NT; ++n)
        F::template pair<MT, false>(w + (n0 + n) * row_bytes + b * F::kB, xq, K, m0, b, acc[n]);
  } else {
    for (int64_t b = 0; b < nb; ++b) {
      prefetch_step<NT * F::kB>(pf + b * NT * F::kB);
      for (int n = 0; n < NT; ++n) F::template block<MT>(w + (n0 + n) * row_bytes + b * F::kB, xq, K, m0, b, acc[n]);
    }
  }
  for (int n = 0; n < NT; ++n)
    for (int m = 0; m < MT; ++m) y[(m0 + m) * ldy + n0 + n] = hsum(acc[n][m]);
}

template <typename F, int MT>
void file_rows(const uint8_t* w, const XQuant& xq, int64_t K, float* y, int64_t ldy, int64_t n_lo, int64_t n_hi,
               int64_t m0) {
  // NT * MT accumulators (and a K-quant's MT integer sums), NT codes and the temporaries fit 32 registers
  constexpr int NT = MT <= 4 ? 4 : F::kW == 32 ? 2 : 1;
  int64_t n = n_lo;
  for (; n + NT <= n_hi; n += NT) file_tile<F, NT, MT>(w, xq, K, y, ldy, n, m0);
  for (; n < n_hi; ++n) file_tile<F, 1, MT>(w, xq, K, y, ldy, n, m0);
}

template <typename F>
void file_rows_any(int64_t mt, const uint8_t* w, const XQuant& xq, int64_t K, float* y, int64_t ldy, int64_t n_lo,
                   int64_t n_hi, int64_t m0) {
  switch (mt) {
    case 1: file_rows<F, 1>(w, xq, K, y, ldy, n_lo, n_hi, m0); break;
    case 2: file_rows<F, 2>(w, xq, K, y, ldy, n_lo, n_hi, m0); break;
    case 3: file_rows<F, 3>(w, xq, K, y, ldy, n_lo, n_hi, m0); break;
    case 4: file_rows<F, 4>(w, xq, K, y, ldy, n_lo, n_hi, m0); break;
    case 5: file_rows<F, 5>(w, xq, K, y, ldy, n_lo, n_hi, m0); break;
    case 6: file_rows<F, 6>(w, xq, K, y, ldy, n_lo, n_hi, m0); break;
    case 7: file_rows<F, 7>(w, xq, K, y, ldy, n_lo, n_hi, m0); break;
    default: file_rows<F, 8>(w, xq, K, y, ldy, n_lo, n_hi, m0); break;
  }
}

// Rows [n_lo, n_hi) of segment s (local) for x rows [m_lo, m_hi), written at y columns s.row0 + n.
void segment_rows(const BlockSegment& s, const float* x, const XQuant& xq, int64_t K, float* y, int64_t ldy,
                  int64_t n_lo, int64_t n_hi, int64_t m_lo, int64_t m_hi) {
  float* ys = y + s.row0;
  if (s.kind == kQ8_0) {
    for (int64_t m0 = m_lo; m0 < m_hi; m0 += 8)
      q8_columns_any(std::min<int64_t>(8, m_hi - m0), s.w, K / 32 * kQ8Bytes, x, K, ys, ldy, n_lo, n_hi, m0);
    return;
  }
  switch (s.kind) {  // n_lo is a multiple of 16: chunks are 16 rows
    case kQ5_0x16: x16_rows<Q5_0x16>(s.w, xq, K, ys, ldy, s.rows, n_lo, n_hi, m_lo, m_hi); return;
    case kQ4_Kx16: x16_rows<Q4_Kx16>(s.w, xq, K, ys, ldy, s.rows, n_lo, n_hi, m_lo, m_hi); return;
    case kQ6_Kx16: x16_rows<Q6_Kx16>(s.w, xq, K, ys, ldy, s.rows, n_lo, n_hi, m_lo, m_hi); return;
    case kQ8_0x16: x16_rows<Q8_0x16>(s.w, xq, K, ys, ldy, s.rows, n_lo, n_hi, m_lo, m_hi); return;
    case kQ4_1x16: x16_rows<Q4_1x16>(s.w, xq, K, ys, ldy, s.rows, n_lo, n_hi, m_lo, m_hi); return;
    default: break;
  }
  for (int64_t m0 = m_lo; m0 < m_hi; m0 += kRowsPerPass) {
    const int64_t mt = std::min<int64_t>(kRowsPerPass, m_hi - m0);
    switch (s.kind) {
      case kQ8_0x8: file_rows_any<Q8_0x8>(mt, s.w, xq, K, ys, ldy, n_lo, n_hi, m0); break;
      case kQ5_0: file_rows_any<Q5_0>(mt, s.w, xq, K, ys, ldy, n_lo, n_hi, m0); break;
      case kQ5_1: file_rows_any<Q5_1>(mt, s.w, xq, K, ys, ldy, n_lo, n_hi, m0); break;
      case kQ4_K: file_rows_any<QK45<false>>(mt, s.w, xq, K, ys, ldy, n_lo, n_hi, m0); break;
      case kQ5_K: file_rows_any<QK45<true>>(mt, s.w, xq, K, ys, ldy, n_lo, n_hi, m0); break;
      default: file_rows_any<Q6K>(mt, s.w, xq, K, ys, ldy, n_lo, n_hi, m0); break;
    }
  }
}

}  // namespace

// y (M, N) = x (M, K) @ W.T (+ bias), float32. Chunks of 16 rows of a segment (4 groups of 4) are the
// unit of parallel work; a thread walks its rows once per block of 64 rows of x, so its share of W and
// that block of x stay in L2.
void block_linear_rows(const BlockMatrix& W, const float* x, int64_t M, float* y, uint8_t* scratch) {
  const XQuant xq = carve(scratch, M, W.K);
  bool per32 = false, per256 = false;
  for (int64_t s = 0; s < W.nseg; ++s) {
    const int64_t k = W.seg[s].kind;
    per32 = per32 || (k != kQ8_0 && kKinds[k].weights == 32);
    per256 = per256 || kKinds[k].weights == 256;
  }
  if (per32) quantize_32(x, M, W.K, xq);
  if (per256) quantize_256(x, M, W.K, xq);
  constexpr int64_t kChunk = 16, kRowBlock = 64;
  int64_t first[kMaxSegments + 1] = {0};  // chunk index where each segment starts
  for (int64_t s = 0; s < W.nseg; ++s) first[s + 1] = first[s] + (W.seg[s].rows + kChunk - 1) / kChunk;
  parallel_for(
      0, first[W.nseg], grain_for(kChunk * W.K * std::max<int64_t>(M, 1), 1 << 16), [&](int64_t lo, int64_t hi) {
        for (int64_t s = 0; s < W.nseg; ++s) {
          const int64_t c_lo = std::max(lo, first[s]), c_hi = std::min(hi, first[s + 1]);
          if (c_lo >= c_hi) continue;
          const BlockSegment& seg = W.seg[s];
          const int64_t n_lo = (c_lo - first[s]) * kChunk, n_hi = std::min(seg.rows, (c_hi - first[s]) * kChunk);
          for (int64_t mb = 0; mb < M; mb += kRowBlock)
            segment_rows(seg, x, xq, W.K, y, W.N, n_lo, n_hi, mb, std::min(M, mb + kRowBlock));
          if (W.bias != nullptr)
            for (int64_t m = 0; m < M; ++m)
              for (int64_t n = seg.row0 + n_lo; n < seg.row0 + n_hi; ++n) y[m * W.N + n] += W.bias[n];
        }
      });
}

bool set_amx(bool enabled) {
  amx_wanted.store(enabled, std::memory_order_relaxed);
  return amx_enabled();
}

bool amx_in_use() { return amx_enabled(); }

void block_linear_rows_chunks(const std::vector<BlockMatrix>& Ws, const float* x, int64_t M, float* y,
                              uint8_t* scratch) {
  const int64_t n = static_cast<int64_t>(Ws.size());
  if (n == 0) return;
  const int64_t K = Ws[0].K, N = Ws[0].N;
  const int64_t stride = (scratch_bytes(M, K) + 64 + 63) / 64 * 64;
  constexpr int64_t kChunk = 16, kRowBlock = 64;
  std::vector<XQuant> xq(static_cast<size_t>(n));
  // work units: 16-row groups of every segment of every chunk, chunk after chunk
  std::vector<int64_t> first(1, 0);
  for (int64_t j = 0; j < n; ++j) {
    const BlockMatrix& W = Ws[static_cast<size_t>(j)];
    xq[static_cast<size_t>(j)] = carve(scratch + j * stride, M, K);
    bool per32 = false, per256 = false;
    for (int64_t s = 0; s < W.nseg; ++s) {
      const int64_t k = W.seg[s].kind;
      per32 = per32 || (k != kQ8_0 && kKinds[k].weights == 32);
      per256 = per256 || kKinds[k].weights == 256;
      first.push_back(first.back() + (W.seg[s].rows + kChunk - 1) / kChunk);
    }
    if (per32) quantize_32(x + j * M * K, M, K, xq[static_cast<size_t>(j)]);
    if (per256) quantize_256(x + j * M * K, M, K, xq[static_cast<size_t>(j)]);
  }
  parallel_for(0, first.back(), grain_for(kChunk * K * std::max<int64_t>(M, 1), 1 << 16), [&](int64_t lo, int64_t hi) {
    int64_t unit = 0;  // index into `first` of (chunk j, segment s)
    for (int64_t j = 0; j < n; ++j) {
      const BlockMatrix& W = Ws[static_cast<size_t>(j)];
      for (int64_t s = 0; s < W.nseg; ++s, ++unit) {
        const int64_t c_lo = std::max(lo, first[unit]), c_hi = std::min(hi, first[unit + 1]);
        if (c_lo >= c_hi) continue;
        const BlockSegment& seg = W.seg[s];
        const int64_t n_lo = (c_lo - first[unit]) * kChunk, n_hi = std::min(seg.rows, (c_hi - first[unit]) * kChunk);
        for (int64_t mb = 0; mb < M; mb += kRowBlock)
          segment_rows(seg, x + j * M * K, xq[static_cast<size_t>(j)], K, y + j * M * N, N, n_lo, n_hi, mb,
                       std::min(M, mb + kRowBlock));
      }
    }
  });
}

namespace {

// x's quantized rows from row r on (carve's layout: every field row-major over K's blocks).
XQuant rows_from(const XQuant& q, int64_t r, int64_t K) {
  XQuant o = q;
  o.x8 += r * K;
  o.dx += r * (K / 32);
  o.sx += r * (K / 32);
  o.bs += r * (K / 32);
  o.o16 += r * (K / 32);
  o.o128 += r * (K / 32);
  o.x8k += r * K;
  o.x8kp += r * K;
  o.dxk += r * (K / 256);
  o.bs32 += r * (K / 32);
  o.bs16 += r * (K / 16);
  o.bs32p += r * (K / 64);
  o.o32 += r * (K / 16);
  o.mk += r * (K / 256) * 16;
  o.m6 += r * (K / 16);
  o.xr += r * kRecordBytes;
  return o;
}

// One segment of one job in the group's work list: its chunks start at cost `start`, each costs `unit`.
struct Piece {
  int64_t job, seg, chunks, start, unit;
};
static_assert(sizeof(Piece) <= kGroupPieceBytes, "group_scratch_bytes reserves kGroupPieceBytes per piece");

}  // namespace

void block_linear_rows_group(const BlockJob* jobs, int64_t n, const float* x, int64_t x_rows, float* y,
                             uint8_t* scratch) {
  if (n == 0) return;
  const int64_t N = jobs[0].W->N, K = jobs[0].W->K;
  constexpr int64_t kChunk = 16, kRowBlock = 64;
  bool per32 = false, per256 = false;
  for (int64_t j = 0; j < n; ++j) {
    const BlockMatrix& W = *jobs[j].W;
    TORCH_CHECK(W.N == N && W.K == K, "block_linear_rows_group: every matrix must be (", N, ", ", K, "), got (", W.N,
                ", ", W.K, ")");
    for (int64_t s = 0; s < W.nseg; ++s) {
      const int64_t k = W.seg[s].kind;
      per32 = per32 || (k != kQ8_0 && kKinds[k].weights == 32);
      per256 = per256 || kKinds[k].weights == 256;
    }
  }
  const XQuant xq = carve(scratch, x_rows, K);
  if (per32) quantize_32(x, x_rows, K, xq);
  if (per256) quantize_256(x, x_rows, K, xq);
  // The work list, priced: a chunk's weight bytes times (its job's rows + 7), a rough time at any rows
  // (one row reads the bytes; many rows also multiply them). The price only places chunk boundaries
  // between threads; it never changes what a chunk computes.
  Piece* pieces = reinterpret_cast<Piece*>(align64(scratch + scratch_bytes(x_rows, K) + 64));
  int64_t np = 0, total = 0;
  for (int64_t j = 0; j < n; ++j) {
    const BlockMatrix& W = *jobs[j].W;
    for (int64_t s = 0; s < W.nseg; ++s) {
      const int64_t row_bytes = row_bytes_of(W.seg[s].kind, K);
      const int64_t chunks = (W.seg[s].rows + kChunk - 1) / kChunk;
      pieces[np++] = Piece{j, s, chunks, total, kChunk * row_bytes * (jobs[j].rows + 7)};
      total += chunks * pieces[np - 1].unit;
    }
  }
  // a task holds at least ~32 KB of weights at one row (the thread hand-off costs more than less)
  parallel_for(0, total, int64_t{1} << 18, [&](int64_t lo, int64_t hi) {
    for (int64_t p = 0; p < np; ++p) {
      const Piece& pc = pieces[p];
      // the chunks whose start cost lies in [lo, hi): each chunk belongs to exactly one task
      const int64_t c_lo = std::clamp<int64_t>((lo - pc.start + pc.unit - 1) / pc.unit, 0, pc.chunks);
      const int64_t c_hi = std::clamp<int64_t>((hi - pc.start + pc.unit - 1) / pc.unit, 0, pc.chunks);
      if (c_lo >= c_hi) continue;
      const BlockJob& job = jobs[pc.job];
      const BlockSegment& seg = job.W->seg[pc.seg];
      const float* xj = x + job.x_row * K;
      const XQuant xqj = rows_from(xq, job.x_row, K);
      float* yj = y + job.y_row * N;
      const int64_t n_lo = c_lo * kChunk, n_hi = std::min(seg.rows, c_hi * kChunk);
      for (int64_t mb = 0; mb < job.rows; mb += kRowBlock)
        segment_rows(seg, xj, xqj, K, yj, N, n_lo, n_hi, mb, std::min(job.rows, mb + kRowBlock));
      if (job.W->bias != nullptr)
        for (int64_t m = 0; m < job.rows; ++m)
          for (int64_t c = seg.row0 + n_lo; c < seg.row0 + n_hi; ++c) yj[m * N + c] += job.W->bias[c];
    }
  });
}

BlockMatrix check_segments(const char* op, const std::vector<BlockPart>& parts, int64_t N, int64_t K,
                           const Tensor* bias) {
  TORCH_CHECK(!parts.empty() && static_cast<int64_t>(parts.size()) <= kMaxSegments, op, ": a matrix takes 1 to ",
              kMaxSegments, " (blocks, kind, rows) parts, got ", parts.size());
  BlockMatrix W{};
  W.nseg = static_cast<int64_t>(parts.size());
  W.K = K;
  int64_t row0 = 0;
  for (int64_t s = 0; s < W.nseg; ++s) {
    const auto& [w, kind, rows] = parts[static_cast<size_t>(s)];
    check_cpu(op, "w", w);
    TORCH_CHECK(kind >= 0 && kind < kNumKinds, op, ": kind must be one of BLOCK_KINDS (0..", kNumKinds - 1, "), got ",
                kind);
    const KindInfo& info = kKinds[kind];
    TORCH_CHECK(w.scalar_type() == at::kByte && w.dim() == 2 && w.is_contiguous(), op,
                ": w must be a contiguous 2-D uint8 tensor of blocks, got ", w.scalar_type(), " ", w.sizes());
    TORCH_CHECK(K > 0 && K % info.weights == 0, op, ": K = ", K, " must be a positive multiple of ", info.weights,
                " (the block size of ", info.name, ")");
    TORCH_CHECK(rows > 0, op, ": a part must have rows, got ", rows);
    const int64_t want_rows = (rows + info.group - 1) / info.group;
    const int64_t want_bytes = K / info.weights * info.bytes;
    TORCH_CHECK(w.size(0) == want_rows && w.size(1) == want_bytes, op, ": ", info.name, " blocks must have ",
                want_bytes, " bytes per row for K = ", K, " (", want_rows, " rows for ", rows, " rows), got ",
                w.sizes());
    W.seg[s] = BlockSegment{w.data_ptr<uint8_t>(), kind, rows, row0};
    row0 += rows;
  }
  TORCH_CHECK(N < 0 || row0 == N, op, ": the parts hold ", row0, " rows, expected ", N);
  W.N = row0;
  W.bias = nullptr;
  if (bias != nullptr && bias->defined()) {
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->dim() == 1 && bias->size(0) == W.N && bias->is_contiguous(),
                op, ": bias must be a contiguous float32 (", W.N, ",) tensor, got ", bias->scalar_type(), " ",
                bias->sizes());
    W.bias = bias->data_ptr<float>();
  }
  return W;
}

BlockMatrix check_blocks(const char* op, const Tensor& w, int64_t kind, int64_t rows, int64_t K, const Tensor* bias) {
  return check_segments(op, {BlockPart{w, kind, rows}}, rows, K, bias);
}

Tensor gguf_rows(const Tensor& table, const Tensor& ids, int64_t ggml_type) {
  const char* op = "gguf_rows";
  check_cpu(op, "table", table);
  TORCH_CHECK(ggml_type == 2 || ggml_type == 3 || ggml_type == 8, op,
              ": ggml_type must be 2 (Q4_0), 3 (Q4_1) or 8 (Q8_0), got ", ggml_type);
  const int64_t block_bytes = ggml_type == 2 ? 18 : ggml_type == 3 ? 20 : 34;
  TORCH_CHECK(
      table.scalar_type() == at::kByte && table.dim() == 2 && table.is_contiguous() && table.size(1) % block_bytes == 0,
      op, ": table must be a contiguous 2-D uint8 tensor of ", block_bytes, "-byte blocks per row, got ",
      table.sizes());
  TORCH_CHECK(ids.scalar_type() == at::kLong && ids.dim() == 1 && ids.is_contiguous(), op,
              ": ids must be a contiguous int64 (M,) tensor");
  const int64_t V = table.size(0), nb = table.size(1) / block_bytes, M = ids.size(0);
  Tensor out = at::empty({M, nb * 32}, at::kFloat);
  const int64_t* id = ids.data_ptr<int64_t>();
  for (int64_t r = 0; r < M; ++r) {
    TORCH_CHECK(id[r] >= 0 && id[r] < V, op, ": ids[", r, "] = ", id[r], " is out of range [0, ", V, ")");
    const uint8_t* row = table.data_ptr<uint8_t>() + id[r] * table.size(1);
    float* y = out.data_ptr<float>() + r * nb * 32;
    for (int64_t b = 0; b < nb; ++b, y += 32) {
      const uint8_t* p = row + b * block_bytes;
      const float d = half_at(p);
      if (ggml_type == 8) {
        for (int j = 0; j < 32; ++j) y[j] = d * static_cast<float>(static_cast<int8_t>(p[2 + j]));
      } else if (ggml_type == 2) {  // low nibbles are weights 0..15, high nibbles 16..31
        for (int j = 0; j < 16; ++j) {
          y[j] = d * static_cast<float>((p[2 + j] & 0x0F) - 8);
          y[j + 16] = d * static_cast<float>((p[2 + j] >> 4) - 8);
        }
      } else {
        const float m = half_at(p + 2);
        for (int j = 0; j < 16; ++j) {
          y[j] = d * static_cast<float>(p[4 + j] & 0x0F) + m;
          y[j + 16] = d * static_cast<float>(p[4 + j] >> 4) + m;
        }
      }
    }
  }
  return out;
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
