// Drawing sampled rows' tokens (sample.h). Per row, with m its largest logit and s the inverse temperature:
//
//   w_i = e^((x_i - m) * s)  for a finite x_i (float32, simd.h's vexp: the top token's weight is exactly 1)
//   w_i = 0                  where x_i is -inf (a masked token is never drawn)
//
// and S the row's total weight: the sums of its 16-token chunks (simd.h's hsum tree, float32) added in
// order in float64. The token drawn is the first whose running sum of weights, in float64, passes u * S'
// over the tokens a row keeps (S' their total), in this order:
//   - no cut: every token, by id. The walk adds whole chunks until the running sum would pass u * S, then
//     that chunk's weights one by one (where rounding leaves the target past the chunk's last token, its
//     last token of positive weight is drawn; past the row's end, the row's last such token).
//   - top_k > 0: the tokens at or above the k-th largest weight (ties with it too); top-p and min-p then apply
//     to them, top-p to their mass.
//   - top_p < 1: the most likely tokens, by weight descending and ties by id, up to and including the first
//     whose preceding mass reaches top_p * S; min-p applies to what is left.
//   - min_p > 0: tokens below min_p times the top token's weight (1) are dropped.
// Sorting the whole vocabulary for top-p is the slow part, so only the tokens at or above a bound are
// sorted when they already hold top_p * S (they are the first ones in the descending order, ties and all,
// so the nucleus is the full sort's): 2^-10, then 2^-20, then every token of positive weight.
//
// A zero weight is never drawn: the running sum only passes the target at a token that adds to it.
// torch's softmax, cumsum and searchsorted did the same per row in Python at ~115 us a row over SmolLM2's
// 49,152 tokens (warm), plus a top-p row's sort; this reads the row three times (docs/performance.md,
// "Sampled rows in one call").

#include "sample.h"

#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <utility>
#include <vector>

#include "checks.h"
#include "pool.h"
#include "simd.h"

namespace metronome {
namespace {

struct RowScratch {
  std::vector<float> w;                         // the row's weights, padded to whole chunks (zeros)
  std::vector<float> chunk;                     // each 16-token chunk's sum
  std::vector<std::pair<float, int32_t>> kept;  // (weight, id) of the tokens a cut keeps
  std::vector<uint64_t> keys;                   // top-p's sort keys
  std::vector<float> top;                       // top-k's candidate weights
};

inline __mmask16 lanes_below(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << left) - 1);
}

// The tokens with weight >= bound (> 0 when bound is 0), by id, into kept; their total in float64.
double collect(const RowScratch& sc, int64_t V, float bound, std::vector<std::pair<float, int32_t>>& kept) {
  kept.clear();
  double mass = 0.0;
  const __m512 b = _mm512_set1_ps(bound);
  for (int64_t c = 0; c * 16 < V; ++c) {
    const __m512 v = _mm512_loadu_ps(sc.w.data() + c * 16);
    unsigned hit = bound > 0.0f ? _mm512_cmp_ps_mask(v, b, _CMP_GE_OQ) : _mm512_cmp_ps_mask(v, b, _CMP_GT_OQ);
    while (hit) {  // the padding's zeros never pass a positive bound, nor > 0
      const int j = __builtin_ctz(hit);
      hit &= hit - 1;
      const float wj = sc.w[c * 16 + j];
      kept.emplace_back(wj, static_cast<int32_t>(c * 16 + j));
      mass += wj;
    }
  }
  return mass;
}

// The k-th largest weight of the row (0 where fewer than k are positive). Most of a model's row is far below
// its top weight, so the weights at or above 2^-10 of it (then 2^-20, then all) are searched when there
// are k of them.
float kth_weight(RowScratch& sc, int64_t V, int64_t k) {
  for (const float bound : {0x1p-10f, 0x1p-20f, 0.0f}) {
    sc.top.clear();
    const __m512 b = _mm512_set1_ps(bound);
    for (int64_t c = 0; c * 16 < V; ++c) {  // a chunk at a time: most hold no candidate
      const __m512 v = _mm512_loadu_ps(sc.w.data() + c * 16);
      unsigned hit = bound > 0.0f ? _mm512_cmp_ps_mask(v, b, _CMP_GE_OQ) : _mm512_cmp_ps_mask(v, b, _CMP_GT_OQ);
      while (hit) {
        sc.top.push_back(sc.w[c * 16 + __builtin_ctz(hit)]);
        hit &= hit - 1;
      }
    }
    if (static_cast<int64_t>(sc.top.size()) >= k) break;
  }
  if (static_cast<int64_t>(sc.top.size()) < k) return 0.0f;
  std::nth_element(sc.top.begin(), sc.top.begin() + (k - 1), sc.top.end(), std::greater<float>());
  return sc.top[k - 1];
}

// The first kept token whose running sum passes u times the kept total (the last one, where rounding
// leaves the target past it).
int64_t draw_kept(const std::vector<std::pair<float, int32_t>>& kept, double u) {
  if (kept.empty()) return -1;  // never here: every cut keeps the top token (weight 1)
  double total = 0.0;
  for (const auto& k : kept) total += k.first;
  const double t = u * total;
  double run = 0.0;
  for (const auto& k : kept) {
    run += k.first;
    if (run > t) return k.second;
  }
  return kept.back().second;
}

int64_t sample_row(const float* x, int64_t V, float s, int64_t top_k, float top_p, float min_p, double u,
                   RowScratch& sc) {
  const int64_t nc = (V + 15) / 16;
  // the largest logit; a NaN anywhere leaves nothing to draw from
  __m512 vm = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  unsigned nan = 0;
  for (int64_t c = 0; c < nc; ++c) {
    const __mmask16 k = lanes_below(V - c * 16);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + c * 16);
    nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    vm = _mm512_mask_max_ps(vm, k, v, vm);
  }
  const float m = _mm512_reduce_max_ps(vm);
  if (nan || !std::isfinite(m)) return -1;  // NaN, every logit -inf, or a +inf one

  // the weights and the chunks' sums
  sc.w.resize(nc * 16);
  sc.chunk.resize(nc);
  const __m512 top = _mm512_set1_ps(m), scale = _mm512_set1_ps(s);
  const __m512 minus_inf = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  double S = 0.0;
  for (int64_t c = 0; c < nc; ++c) {
    const __mmask16 k = lanes_below(V - c * 16);
    const __m512 v = _mm512_maskz_loadu_ps(k, x + c * 16);
    const __mmask16 finite = static_cast<__mmask16>(_mm512_cmp_ps_mask(v, minus_inf, _CMP_GT_OQ) & k);
    const __m512 e = _mm512_maskz_mov_ps(finite, vexp(_mm512_mul_ps(_mm512_sub_ps(v, top), scale)));
    _mm512_storeu_ps(sc.w.data() + c * 16, e);
    sc.chunk[c] = hsum(e);
    S += sc.chunk[c];
  }

  // top-k: the tokens at or above the k-th largest weight, ties with it included (as masking the logits
  // below the k-th does), by id; the cuts below then read their total, not the row's
  const bool cut_k = top_k > 0 && top_k < V;
  const double total = cut_k ? collect(sc, V, kth_weight(sc, V, top_k), sc.kept) : S;
  if (top_p < 1.0f) {
    const double goal = static_cast<double>(top_p) * total;
    if (!cut_k) {
      for (const float bound : {0x1p-10f, 0x1p-20f, 0.0f}) {
        if (collect(sc, V, bound, sc.kept) >= goal || bound == 0.0f) break;
      }
    }
    // by weight descending, ties by id: one 64-bit key a token (a positive float's bits order as its value),
    // which sorted a flat row's 49k tokens 2x faster than a stable sort of the pairs
    sc.keys.resize(sc.kept.size());
    for (size_t i = 0; i < sc.kept.size(); ++i) {
      uint32_t bits;
      std::memcpy(&bits, &sc.kept[i].first, 4);
      sc.keys[i] = static_cast<uint64_t>(~bits) << 32 | static_cast<uint32_t>(sc.kept[i].second);
    }
    std::sort(sc.keys.begin(), sc.keys.end());
    for (size_t i = 0; i < sc.keys.size(); ++i) {
      const uint32_t bits = ~static_cast<uint32_t>(sc.keys[i] >> 32);
      std::memcpy(&sc.kept[i].first, &bits, 4);
      sc.kept[i].second = static_cast<int32_t>(sc.keys[i] & 0xFFFFFFFFu);
    }
    double before = 0.0;  // the mass ahead of the next token
    size_t n = 0;
    while (n < sc.kept.size() && before < goal) before += sc.kept[n++].first;
    sc.kept.resize(n);  // n >= 1: goal > 0 (S >= 1, top_p > 0)
  } else if (cut_k) {
    // kept as collected
  } else if (min_p > 0.0f) {
    collect(sc, V, min_p, sc.kept);
  } else {
    const double t = u * S;
    double run = 0.0;
    for (int64_t c = 0; c < nc; ++c) {
      const double next = run + sc.chunk[c];
      if (next > t) {
        double a = run;
        int64_t last = -1;
        for (int64_t i = c * 16; i < std::min(V, c * 16 + 16); ++i) {
          if (sc.w[i] > 0.0f) {
            a += sc.w[i];
            last = i;
            if (a > t) return i;
          }
        }
        if (last >= 0) return last;
      }
      run = next;
    }
    for (int64_t i = V - 1; i >= 0; --i)
      if (sc.w[i] > 0.0f) return i;
    return -1;  // unreachable: the top token's weight is 1
  }
  if (min_p > 0.0f)  // the top token (weight 1) always stays
    sc.kept.erase(std::remove_if(sc.kept.begin(), sc.kept.end(), [&](const auto& k) { return k.first < min_p; }),
                  sc.kept.end());
  return draw_kept(sc.kept, u);
}

}  // namespace

Tensor sample_rows(const Tensor& logits, const Tensor& rows, int64_t vocab, const Tensor& inv_temp, const Tensor& top_k,
                   const Tensor& top_p, const Tensor& min_p, const Tensor& u) {
  constexpr const char* op = "sample_rows";
  check_cpu(op, "logits", logits);
  TORCH_CHECK_VALUE(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.stride(1) == 1, op,
                    ": logits must be a 2-D float32 tensor with contiguous rows, got ", logits.scalar_type(), " ",
                    logits.sizes());
  TORCH_CHECK_VALUE(vocab >= 1 && vocab <= logits.size(1), op, ": vocab must be in [1, ", logits.size(1), "], got ",
                    vocab);
  const int64_t n = rows.numel();
  const std::pair<const Tensor*, const char*> per_row[] = {
      {&rows, "rows"}, {&inv_temp, "inv_temp"}, {&top_k, "top_k"}, {&top_p, "top_p"}, {&min_p, "min_p"}, {&u, "u"}};
  for (const auto& [t, name] : per_row) {
    check_cpu(op, name, *t);
    TORCH_CHECK_VALUE(t->dim() == 1 && t->numel() == n && t->is_contiguous(), op, ": ", name,
                      " must be a contiguous 1-D tensor of one entry per row (", n, "), got ", t->sizes());
  }
  TORCH_CHECK_VALUE(rows.scalar_type() == at::kLong && top_k.scalar_type() == at::kLong &&
                        u.scalar_type() == at::kDouble && inv_temp.scalar_type() == at::kFloat &&
                        top_p.scalar_type() == at::kFloat && min_p.scalar_type() == at::kFloat,
                    op, ": rows and top_k must be int64, u float64, inv_temp/top_p/min_p float32");
  const int64_t *r = rows.data_ptr<int64_t>(), *k = top_k.data_ptr<int64_t>();
  const float *s = inv_temp.data_ptr<float>(), *p = top_p.data_ptr<float>(), *mp = min_p.data_ptr<float>();
  const double* uu = u.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK_INDEX(r[i] >= 0 && r[i] < logits.size(0), op, ": rows[", i, "] = ", r[i], " is not a row of logits (",
                      logits.size(0), ")");
    TORCH_CHECK_VALUE(std::isfinite(s[i]) && s[i] > 0.0f, op, ": inv_temp[", i, "] must be positive, got ", s[i]);
    TORCH_CHECK_VALUE(k[i] >= 0, op, ": top_k[", i, "] must be 0 (off) or positive, got ", k[i]);
    TORCH_CHECK_VALUE(p[i] > 0.0f && p[i] <= 1.0f, op, ": top_p[", i, "] must be in (0, 1], got ", p[i]);
    TORCH_CHECK_VALUE(mp[i] >= 0.0f && mp[i] <= 1.0f, op, ": min_p[", i, "] must be in [0, 1], got ", mp[i]);
    TORCH_CHECK_VALUE(uu[i] >= 0.0 && uu[i] < 1.0, op, ": u[", i, "] must be in [0, 1), got ", uu[i]);
  }
  Tensor out = at::empty({n}, rows.options());
  int64_t* o = out.data_ptr<int64_t>();
  const float* base = logits.data_ptr<float>();
  const int64_t ld = logits.stride(0);
  // a row is one unit of work, whole on one thread
  parallel_for(0, n, 1, [&](int64_t lo, int64_t hi) {
    thread_local RowScratch scratch;
    for (int64_t i = lo; i < hi; ++i)
      o[i] = sample_row(base + r[i] * ld, vocab, s[i], k[i], p[i], mp[i], uu[i], scratch);
  });
  return out;
}

}  // namespace metronome
