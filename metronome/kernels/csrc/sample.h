// Drawing the next token of sampled rows (temperature, top-k, top-p, min-p) from their logits, one row per
// request, rows in parallel (sample.cpp has the arithmetic). A row's token depends only on its own logits,
// settings and uniform number: never on the other rows, their count or the thread that ran it.

#pragma once

#include <ATen/core/Tensor.h>

namespace metronome {

using at::Tensor;

// For each i: the token drawn from row rows[i] of logits (R, W) float32 (its first `vocab` entries) at
// inverse temperature inv_temp[i], top_k[i] (0: no cut), top_p[i] (1: no cut), min_p[i] (0: no cut), by the
// uniform number u[i] in [0, 1) (float64). rows, top_k (n,) int64; inv_temp, top_p, min_p (n,) float32; u (n,)
// float64 -> (n,) int64, -1 for a row with nothing to draw (every logit -inf, or a NaN or +inf among them).
Tensor sample_rows(const Tensor& logits, const Tensor& rows, int64_t vocab, const Tensor& inv_temp, const Tensor& top_k,
                   const Tensor& top_p, const Tensor& min_p, const Tensor& u);

}  // namespace metronome
