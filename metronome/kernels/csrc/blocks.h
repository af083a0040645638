// Block matmuls: y = x @ W.T with W in one of two block formats (the block kinds), read by
// block_linear_rows (blocks.cpp has the formats' layout and the kernels' reduction order).
//
// The kind codes are part of the Python interface: bindings.cpp exports them (BLOCK_KINDS, BLOCK_BYTES,
// BLOCK_WEIGHTS) and metronome/kernels/blocks.py holds the Python copy that a test checks against them.

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace metronome {

using at::Tensor;

enum BlockKind : int64_t {
  kQ8_0 = 0,  // GGUF Q8_0 rows (N, K/32*34): per 32 weights an fp16 d then 32 int8 q
  kQ4x4 = 1,  // packed Q4 groups (ceil(N/4), K/32*80): four rows side by side (metronome/compile/quant.py, pack_q4)
};

constexpr int64_t kQ8Block = 32;    // weights per Q8_0 block
constexpr int64_t kQ8Bytes = 34;    // bytes per Q8_0 block
constexpr int64_t kQ4Block = 32;    // weights per Q4 block
constexpr int64_t kQ4x4Bytes = 80;  // per 4 rows x 1 block

// A matrix for block_linear_rows: GGUF Q8_0 rows (N, K/32*34) or packed Q4 groups (ceil(N/4), K/32*80).
struct BlockMatrix {
  const uint8_t* w;
  int64_t kind, N, K;
  const float* bias;
};

// Scratch a matmul needs for M rows of input (bytes): the int8 copy of x, dx and sx.
inline int64_t scratch_bytes(int64_t M, int64_t K) {
  return M * K + 2 * M * (K / kQ4Block) * static_cast<int64_t>(sizeof(float));
}

// y (M, N) = x (M, K) @ W.T (+ bias), float32; scratch holds scratch_bytes(M, K) + 64 bytes.
void block_linear_rows(const BlockMatrix& W, const float* x, int64_t M, float* y, uint8_t* scratch);

// w: Q8_0 rows (N, K/32*34), or packed Q4 groups (ceil(N/4), K/32*80) with `rows` = N. Checks w (and the
// optional float32 bias) and returns the matrix view; `op` names the caller in error messages.
BlockMatrix check_blocks(const char* op, const Tensor& w, int64_t kind, int64_t rows, int64_t K, const Tensor* bias);

// The tensor-level op: x (M, K) float32/bfloat16 -> (M, rows) float32.
Tensor block_linear(const Tensor& x, const Tensor& w, int64_t kind, int64_t rows, const std::optional<Tensor>& bias);

}  // namespace metronome
