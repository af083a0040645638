// The row kernels (see ops.h): RMSNorm, RoPE, gated activations, decode attention.

#include "ops.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>
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
// Queries that read the same keys are computed together, so each key and value row is loaded (from L2 on
// a long span) and widened once for all of them: the heads that share a kv head (GQA), and the rows of one
// prompt (same slot and window start; each with its own end), up to kMaxQueries query vectors a unit. Each query
// still runs exactly the sequence of operations above, so its result depends neither on the heads nor on
// the rows it was computed with. The unit of parallel work is (tile of rows, kv head, heads of the group).
//
// An int8 cache (simd.h: a row of Dh bytes and a scale for each 16) runs the same passes on each chunk
// of 16 widened to float and multiplied by its scale as it is loaded (load_chunk), from 5/8 of bfloat16's
// bytes: where many users sit deep in their contexts, the cache is most of what a step reads from memory.

namespace {

// Query vectors per unit: pass 1 keeps an accumulator for each, beside a key chunk and a query chunk. With
// AVX2's 16 ymm registers (8 __m512) 16 queries spilled every accumulator to the stack: 6 ran the 1.5B's
// prompt attention 1.3x faster and SmolLM2's 1.25x (docs/performance.md).
constexpr int kMaxQueries = kVectorRegisters == 32 ? 16 : 6;

// A unit's keys, and then its values, are each one sequential stream of rows, which the hardware prefetcher
// follows poorly from memory (it restarts at every 4 KB page; blocks.cpp, kQ4Ahead): every block of 16 rows
// asks for the bytes kAttAhead further on into L2 and kAttNear on into L1, as the weights' kernels do. Only
// for a decode row's unit with a span of at least kStreamKeys: its keys come from memory (each decode row
// reads its own slot once a layer), where a prompt's tiles of rows read one slot's keys again and again
// from cache, and there the requests were pure cost (a 256-row chunk's attention took 1.13x as long).
// On AMD 2 KB ahead, not 4 (2026-12-05, the Zen 4 EPYC): eight SmolLM2 slots at 1,900 keys over 30 layers
// took 18.2-18.7 ms against 20.3-20.9 (bf16 cache) and 17.6 against 18.5-19.2 (int8); the 1.5B's shape alike
// or faster (tools/bench_attention.py). Elsewhere 4 KB: on the Intel Xeon VM a stream's longest gap while a
// 1,300-token prompt arrives was 23.9 ms against 27.7 (medians of 8 runs; docs/performance.md, 2026-12-05).
constexpr int64_t kAttAhead = kAmdCpu ? 2048 : 4096;
constexpr int64_t kAttNear = 1024, kStreamKeys = 256;
inline void prefetch_rows(const void* rows, int64_t bytes) {
  const char* c = static_cast<const char*>(rows);
  for (int64_t o = 0; o < bytes; o += 64) {
    _mm_prefetch(c + kAttAhead + o, _MM_HINT_T1);
    _mm_prefetch(c + kAttNear + o, _MM_HINT_T0);
  }
}

// NQ query vectors qf (Dh / 16, NQ, 16: chunk-major, 64-byte aligned), query i over keys [0, L[i]) of kb/vb
// (L[i] >= 1), into of (NQ, Dh).
template <typename TC, int NQ>
void attend(const float* qf, float* of, const TC* kb, const TC* vb, int64_t kstride, int64_t vstride, const int64_t* L,
            int64_t Dh, float scale, bool stream, std::vector<float>& scores) {
  const int64_t nchunks = Dh / 16;
  int64_t lmin = L[0], lmax = L[0];
  for (int i = 1; i < NQ; ++i) lmin = std::min(lmin, L[i]), lmax = std::max(lmax, L[i]);
  // query i's scores at i * lmax, then pass 2's p in whole blocks of 16 keys
  const size_t need = static_cast<size_t>(NQ * lmax + NQ * 16 * ((lmax + 15) / 16));
  if (scores.size() < need) scores.resize(need);  // grown, never shrunk: shrinking and growing again zero-fills
  // Pass 1, keys 16 at a time: every query's (key) accumulator is kept, then hsum16 sums a query's 16 (the
  // bits hsum gives each one, in a third of the instructions). Keys past a query's end (the tail of a
  // tile of rows) are computed for all and never stored.
  alignas(64) float part[NQ][16][16];
  __m512 vmax[NQ];
  for (int i = 0; i < NQ; ++i) vmax[i] = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t j0 = 0; j0 < lmax; j0 += 16) {
    const int64_t n = std::min<int64_t>(16, lmax - j0);
    if (stream) prefetch_rows(kb + j0 * kstride, 16 * kstride * static_cast<int64_t>(sizeof(TC)));
    // KP keys per step: each query chunk loaded feeds KP multiply-adds (KP x NQ accumulators in registers)
    constexpr int KP = 2 * NQ + 3 <= kVectorRegisters ? 2 : 1;
    int64_t jj = 0;
    auto keys = [&](auto kp) {
      constexpr int P = decltype(kp)::value;
      const TC* k[P];
      for (int e = 0; e < P; ++e) k[e] = kb + (j0 + jj + e) * kstride;
      __m512 acc[P][NQ];
      for (int e = 0; e < P; ++e) {
        const __m512 k0 = load_chunk(k[e], 0, Dh);
        for (int i = 0; i < NQ; ++i) acc[e][i] = _mm512_mul_ps(_mm512_load_ps(qf + i * 16), k0);
      }
      for (int64_t c = 1; c < nchunks; ++c) {
        __m512 kc[P];
        for (int e = 0; e < P; ++e) kc[e] = load_chunk(k[e], c, Dh);
        for (int i = 0; i < NQ; ++i) {
          const __m512 qc = _mm512_load_ps(qf + (c * NQ + i) * 16);
          for (int e = 0; e < P; ++e) acc[e][i] = _mm512_fmadd_ps(qc, kc[e], acc[e][i]);
        }
      }
      for (int e = 0; e < P; ++e)
        for (int i = 0; i < NQ; ++i) _mm512_store_ps(part[i][jj + e], acc[e][i]);
      jj += P;
    };
    while (jj + KP <= n) keys(std::integral_constant<int, KP>{});
    while (jj < n) keys(std::integral_constant<int, 1>{});
    for (; jj < 16; ++jj)  // a short last batch: the missing keys' sums are zeros (and never stored)
      for (int i = 0; i < NQ; ++i) _mm512_store_ps(part[i][jj], _mm512_setzero_ps());
    for (int i = 0; i < NQ; ++i) {
      const int64_t valid = std::clamp<int64_t>(L[i] - j0, 0, n);
      if (valid == 0) continue;
      const __mmask16 m = tail_mask(valid);
      const __m512 sj = _mm512_mul_ps(hsum16(part[i][0]), vscale);
      _mm512_mask_storeu_ps(scores.data() + i * lmax + j0, m, sj);
      vmax[i] = _mm512_mask_max_ps(vmax[i], m, sj, vmax[i]);  // a NaN score leaves the maximum as it was
    }
  }
  // Pass 2: p = e^(s - max) and its sum, per query. p is written a block of 16 keys at a time, query after
  // query: key j = 16 b + l of query i at pt[(b * NQ + i) * 16 + l]. Each store is one whole vector (a
  // scatter into key-major order cost a quarter of the kernel), and pass 3 still finds a key's NQ weights
  // at fixed offsets (64 bytes apart) from one pointer. A query's lanes past its end hold zeros; its blocks
  // past its end are never written, and pass 3 never reads either.
  float* pt = scores.data() + NQ * lmax;
  __m512 denom[NQ];
  for (int i = 0; i < NQ; ++i) {
    const float* si = scores.data() + i * lmax;
    const __m512 vm = _mm512_set1_ps(_mm512_reduce_max_ps(vmax[i]));
    __m512 vsum = _mm512_setzero_ps();
    for (int64_t j = 0; j < L[i]; j += 16) {
      const __mmask16 m = tail_mask(L[i] - j);
      __m512 p = _mm512_maskz_mov_ps(m, vexp(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, si + j), vm)));
      _mm512_storeu_ps(pt + (j / 16 * NQ + i) * 16, p);
      vsum = _mm512_add_ps(vsum, p);
    }
    denom[i] = _mm512_set1_ps(hsum(vsum));
  }
  // Pass 3: out = sum_j p_j v_j / sum, NC chunks of 16 dims per pass (NQ x NC accumulators in registers).
  // The query loop is unrolled by pragma: left to itself, gcc kept the accumulators on the stack and stored
  // them after every key or two (61 stack stores in attend<float, 15> against 16 with the pragma).
  constexpr int NC = std::min(4, std::max(1, kMaxQueries / NQ));
  for (int64_t c0 = 0; c0 < nchunks; c0 += NC) {
    const int64_t nc = std::min<int64_t>(NC, nchunks - c0);
    __m512 a[NQ][NC];
    for (int i = 0; i < NQ; ++i)
      for (int c = 0; c < NC; ++c) a[i][c] = _mm512_setzero_ps();
    const int64_t block_bytes = 16 * vstride * static_cast<int64_t>(sizeof(TC));
    const bool ask = stream && c0 == 0;  // later passes find the values in L2
    auto add_key = [&a, nc, c0, vb, vstride, Dh, pt, L, ask, block_bytes](int64_t j, bool all) {
      if (ask && j % 16 == 0) prefetch_rows(vb + j * vstride, block_bytes);
      const float* pj = pt + (j / 16 * NQ) * 16 + j % 16;  // query i's weight at pj[16 i]
      const TC* vj = vb + j * vstride;
      __m512 vc[NC];
#pragma GCC unroll 4
      for (int c = 0; c < NC; ++c) vc[c] = c < nc ? load_chunk(vj, c0 + c, Dh) : _mm512_setzero_ps();
#pragma GCC unroll 16
      for (int i = 0; i < NQ; ++i) {
        if (!all && j >= L[i]) continue;  // past this query's end: its sums stay as they are
        const __m512 p = _mm512_set1_ps(pj[16 * i]);
#pragma GCC unroll 4
        for (int c = 0; c < NC; ++c)
          if (c < nc) a[i][c] = _mm512_fmadd_ps(p, vc[c], a[i][c]);
      }
    };
    int64_t j = 0;
    for (; j < lmin; ++j) add_key(j, true);
    for (; j < lmax; ++j) add_key(j, false);
    for (int i = 0; i < NQ; ++i)
      for (int c = 0; c < nc; ++c) _mm512_storeu_ps(of + i * Dh + (c0 + c) * 16, _mm512_div_ps(a[i][c], denom[i]));
  }
}

// attend<TC, NQ> for the nq (1..MQ) queries of a unit.
template <typename TC, int MQ>
void attend_n(int64_t nq, const float* qf, float* of, const TC* kb, const TC* vb, int64_t kstride, int64_t vstride,
              const int64_t* L, int64_t Dh, float scale, bool stream, std::vector<float>& scores) {
  if constexpr (MQ > 1) {
    if (nq < MQ) return attend_n<TC, MQ - 1>(nq, qf, of, kb, vb, kstride, vstride, L, Dh, scale, stream, scores);
  }
  attend<TC, MQ>(qf, of, kb, vb, kstride, vstride, L, Dh, scale, stream, scores);
}

}  // namespace

template <typename TQ, typename TC>
void attention_rows(const TQ* q, TQ* out, const TC* kc, const TC* vc, const int64_t* ks, const int64_t* vs,
                    const int64_t* slots, const int64_t* ends, int64_t B, int64_t H, int64_t Hkv, int64_t Dh,
                    int64_t window, float scale, int64_t total_keys) {
  const int64_t group = H / Hkv;
  int64_t heads = std::min<int64_t>(group, kMaxQueries);  // heads per unit
  int64_t hsplits = (group + heads - 1) / heads;
  const int64_t tile_rows = std::max<int64_t>(1, kMaxQueries / heads);
  auto first_of = [&](int64_t b) { return window > 0 ? std::max<int64_t>(0, ends[b] - window) : 0; };
  // Tiles [b0, b1): runs of up to tile_rows consecutive rows with the same slot and window start; a row
  // with an empty span gets zeros and joins no tile.
  std::vector<std::pair<int64_t, int64_t>> tiles;
  for (int64_t b = 0; b < B; ++b) {
    if (ends[b] - first_of(b) <= 0) {
      for (int64_t i = 0; i < H * Dh; i += 16) store16(out + b * H * Dh + i, _mm512_setzero_ps());
      continue;
    }
    if (!tiles.empty()) {
      auto& [b0, b1] = tiles.back();
      if (b1 == b && slots[b] == slots[b0] && first_of(b) == first_of(b0) && b - b0 < tile_rows) {
        b1 = b + 1;
        continue;
      }
    }
    tiles.emplace_back(b, b + 1);
  }
  // Fewer units than threads (a row or two of a model with fewer kv heads than the pool has threads: Gemma 3's
  // one row was one unit, run by one thread while the other waited): a kv head's query heads are split among
  // more units, each loading the keys again. Only then: where the units already keep every thread busy, a key
  // is loaded once for all its heads (Gemma's one row in 4 units of one head ran slower than in 2 of two, and
  // SmolLM2's one row, 3 units on 2 threads, gained nothing measurable in 6). A query's bits never depend on
  // the heads it is computed with.
  const int64_t threads = get_threads(), kv_units = static_cast<int64_t>(tiles.size()) * Hkv;
  const bool long_spans = total_keys * Dh * 2 * H >= threads * 4 * kMinParallelElems;  // worth a hand-off
  if (kv_units * hsplits < threads && group > 1 && long_spans) {
    const int64_t per_kv = std::min(group, (threads + kv_units - 1) / kv_units);
    heads = (group + per_kv - 1) / per_kv;
    hsplits = (group + heads - 1) / heads;
  }
  const int64_t units = static_cast<int64_t>(tiles.size()) * Hkv * hsplits;
  const int64_t unit_work = std::max<int64_t>(1, total_keys / std::max<int64_t>(1, B)) * Dh * 2 * kMaxQueries;
  // Units differ in cost by orders of magnitude: a decode row deep into its context beside a prompt's rows
  // near its start (a chunked prefill step), or slots at different positions. Taken in index order, a
  // contiguous chunk held one row's kv heads, and one thread ran all of them while the other ran out of
  // work: one decode row at 1,300 keys beside 32 prompt rows cost 4 ms more than at 10 keys, twice what it
  // cost in a step of its own (docs/performance.md, "Attention's units dealt by cost"). So the units are sorted
  // by cost (key rows read, times one more than the queries they serve: a key costs its load and a
  // multiply-add per query) and dealt round-robin into bins, bin i holding the i-th, (i + bins)-th, ...
  // costliest, and the bins are the parallel work. Which thread runs a unit never changes its bits.
  std::vector<int64_t> order(static_cast<size_t>(units)), cost(static_cast<size_t>(units));
  for (int64_t u = 0; u < units; ++u) {
    const auto [b0, b1] = tiles[static_cast<size_t>(u / (Hkv * hsplits))];
    const int64_t hs = u % hsplits, nh = std::min<int64_t>(heads, group - hs * heads);
    int64_t span = 0;
    for (int64_t b = b0; b < b1; ++b) span = std::max(span, ends[b] - first_of(b0));
    cost[static_cast<size_t>(u)] = span * (1 + (b1 - b0) * nh);
    order[static_cast<size_t>(u)] = u;
  }
  std::stable_sort(order.begin(), order.end(), [&cost](int64_t a, int64_t b) {
    return cost[static_cast<size_t>(a)] > cost[static_cast<size_t>(b)];
  });
  const int64_t grain = grain_for(unit_work, 4 * kMinParallelElems);
  // at most the pool's chunks, so that one chunk is one bin (a chunk of several bins would hold the costliest)
  const int64_t bins = std::min({units, (units + grain - 1) / grain, threads * kChunksPerThread});
  parallel_for(0, bins, 1, [&](int64_t bin_lo, int64_t bin_hi) {
    // per thread, grown, never shrunk: allocated per job, the scores (156 KB for a tile at 1,300 keys) were
    // zero-filled and page-faulted in again in every layer (1-2 % of a 16-row prompt step, perf)
    thread_local std::vector<float> qbuf, of, scores;
    if (qbuf.size() < static_cast<size_t>(kMaxQueries * Dh + 16)) qbuf.resize(kMaxQueries * Dh + 16);
    if (of.size() < static_cast<size_t>(kMaxQueries * Dh)) of.resize(kMaxQueries * Dh);
    float* qf = qbuf.data() + (16 - reinterpret_cast<uintptr_t>(qbuf.data()) / 4 % 16) % 16;  // 64-byte aligned
    int64_t L[kMaxQueries];
    for (int64_t bin = bin_lo; bin < bin_hi; ++bin)
      for (int64_t k = bin; k < units; k += bins) {
        const int64_t u = order[static_cast<size_t>(k)];
        const size_t t = static_cast<size_t>(u / (Hkv * hsplits));
        const int64_t kvh = (u / hsplits) % Hkv, hs = u % hsplits;
        const int64_t h0 = kvh * group + hs * heads, nh = std::min<int64_t>(heads, group - hs * heads);
        const auto [b0, b1] = tiles[t];
        const int64_t first = first_of(b0), nq_all = (b1 - b0) * nh;
        int64_t nq = 0;
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t h = 0; h < nh; ++h, ++nq) {
            L[nq] = ends[b] - first;
            const TQ* qh = q + (b * H + h0 + h) * Dh;
            for (int64_t c = 0; c < Dh / 16; ++c)  // chunk-major: chunk c of query i at (c * nq_all + i) * 16
              _mm512_store_ps(qf + (c * nq_all + nq) * 16, load16(qh + c * 16));
          }
        const TC* kb = kc + slots[b0] * ks[0] + kvh * ks[1] + first * ks[2];
        const TC* vb = vc + slots[b0] * vs[0] + kvh * vs[1] + first * vs[2];
        const bool stream = b1 - b0 == 1 && L[0] >= kStreamKeys;  // a decode row, far into its context
        attend_n<TC, kMaxQueries>(nq, qf, of.data(), kb, vb, ks[2], vs[2], L, Dh, scale, stream, scores);
        nq = 0;
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t h = 0; h < nh; ++h, ++nq) {
            TQ* o = out + (b * H + h0 + h) * Dh;
            for (int64_t i = 0; i < Dh; i += 16) store16(o + i, _mm512_loadu_ps(of.data() + nq * Dh + i));
          }
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
  const bool int8 = k_cache.scalar_type() == at::kChar;  // rows of Dh bytes and their scales (simd.h)
  if (!int8) check_float_dtype(op, "k_cache", k_cache);
  TORCH_CHECK(v_cache.scalar_type() == k_cache.scalar_type(), op, ": v_cache dtype ", v_cache.scalar_type(),
              " must equal k_cache's ", k_cache.scalar_type());
  TORCH_CHECK(q_in.dim() == 3, op, ": q must be (B, H, Dh), got shape ", q_in.sizes());
  TORCH_CHECK(k_cache.dim() == 4, op, ": k_cache must be (slots, kv_heads, ctx, Dh), got shape ", k_cache.sizes());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache shape ", v_cache.sizes(), " must equal k_cache's ",
              k_cache.sizes());
  const int64_t B = q_in.size(0), H = q_in.size(1), Dh = q_in.size(2);
  const int64_t S = k_cache.size(0), Hkv = k_cache.size(1), C = k_cache.size(2);
  TORCH_CHECK(Dh > 0 && Dh % 16 == 0, op, ": head dim must be a positive multiple of 16, got ", Dh);
  const int64_t row = int8 ? int8_row_bytes(Dh) : Dh;
  TORCH_CHECK(k_cache.size(3) == row, op, ": cache rows of ", k_cache.size(3), " must hold q's head dim ", Dh,
              int8 ? " int8 values and a float32 scale for each 16" : " values");
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
  if (int8 && q32)
    METRONOME_ATTN(float, int8_t);
  else if (int8)
    METRONOME_ATTN(BFloat16, int8_t);
  else if (q32 && c32)
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
METRONOME_ATTN_INSTANCE(float, int8_t)
METRONOME_ATTN_INSTANCE(BFloat16, int8_t)
#undef METRONOME_ATTN_INSTANCE

}  // namespace metronome
