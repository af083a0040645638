// Block matmuls: y = x @ W.T with W in block formats (the block kinds), read by block_linear_rows
// (blocks.cpp has the formats' layout and the kernels' reduction order).
//
// A matrix is one or more row segments stacked (a fused q/k/v or gate/up matrix whose parts the file
// stores in different formats), each in its own kind. The kind codes are part of the Python interface:
// bindings.cpp exports them (BLOCK_KINDS, BLOCK_BYTES, BLOCK_WEIGHTS) and metronome/kernels/blocks.py
// holds the Python copy that a test checks against them.

#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace metronome {

using at::Tensor;

enum BlockKind : int64_t {
  kQ8_0 = 0,      // Q8_0 rows (N, K/32*34) against float32 x: matrices quantized here from dense weights
  kQ4_1x16 = 1,   // GGUF Q4_0 or Q4_1 repacked 16 rows side by side as Q4_1 (ceil(N/16), K/32*320) (pack.cpp)
  kQ8_0x8 = 2,    // GGUF Q8_0 rows as stored, against int8 x (per-32 activation blocks)
  kQ5_0 = 3,      // GGUF Q5_0 rows as stored (22 bytes per 32 weights), int8 x per 32
  kQ5_1 = 4,      // GGUF Q5_1 rows as stored (24 bytes per 32 weights), int8 x per 32
  kQ4_K = 5,      // GGUF Q4_K rows as stored (144 bytes per 256 weights), int8 x per 256
  kQ5_K = 6,      // GGUF Q5_K rows as stored (176 bytes per 256 weights), int8 x per 256
  kQ6_K = 7,      // GGUF Q6_K rows as stored (210 bytes per 256 weights), int8 x per 256
  kQ5_0x16 = 8,   // GGUF Q5_0 repacked 16 rows side by side (ceil(N/16), K/32*352) (pack.cpp)
  kQ4_Kx16 = 9,   // GGUF Q4_K repacked 16 rows side by side (ceil(N/16), K/256*2368) (pack.cpp)
  kQ6_Kx16 = 10,  // GGUF Q6_K repacked 16 rows side by side (ceil(N/16), K/256*3360) (pack.cpp)
  kQ8_0x16 = 11,  // GGUF Q8_0 repacked 16 rows side by side (ceil(N/16), K/32*544) (pack.cpp)
};
constexpr int64_t kNumKinds = 12;

struct KindInfo {
  const char* name;
  int64_t weights;  // per block along K
  int64_t bytes;    // per block and group of `group` rows
  int64_t group;    // rows side by side in a packed kind (1: rows as the file stores them)
};
inline constexpr KindInfo kKinds[kNumKinds] = {
    {"Q8_0", 32, 34, 1},      {"Q4_1X16", 32, 320, 16},   {"Q8_0_X8", 32, 34, 1},     {"Q5_0", 32, 22, 1},
    {"Q5_1", 32, 24, 1},      {"Q4_K", 256, 144, 1},      {"Q5_K", 256, 176, 1},      {"Q6_K", 256, 210, 1},
    {"Q5_0X16", 32, 352, 16}, {"Q4_KX16", 256, 2368, 16}, {"Q6_KX16", 256, 3360, 16}, {"Q8_0X16", 32, 544, 16},
};

// Bytes of one row of a (., K) matrix in `kind` (a packed group's bytes shared by its rows).
inline int64_t row_bytes_of(int64_t kind, int64_t K) {
  return K / kKinds[kind].weights * kKinds[kind].bytes / kKinds[kind].group;
}

constexpr int64_t kQ8Block = 32;        // weights per Q8_0 block
constexpr int64_t kQ8Bytes = 34;        // bytes per Q8_0 block
constexpr int64_t kQ5x16Bytes = 352;    // per 16 rows x 1 block
constexpr int64_t kQ4Kx16Bytes = 2368;  // per 16 rows x 1 super-block
constexpr int64_t kQ6Kx16Bytes = 3360;  // per 16 rows x 1 super-block
constexpr int64_t kQ8x16Bytes = 544;    // per 16 rows x 1 block
constexpr int64_t kQ41x16Bytes = 320;   // per 16 rows x 1 block
constexpr int64_t kSuperBlock = 256;
constexpr int kMaxSegments = 4;

// Rows [row0, row0 + rows) of a matrix, in one kind: (ceil(rows/group), K/weights*bytes) bytes.
struct BlockSegment {
  const uint8_t* w;
  int64_t kind, rows, row0;
};

struct BlockMatrix {
  BlockSegment seg[kMaxSegments];
  int64_t nseg, N, K;
  const float* bias;
};

// Scratch a matmul needs for M rows of input (bytes): x quantized to int8 per 32 and per 256, with the
// blocks' scales and sums (blocks.cpp, carve: ~6.4 bytes per x value, and up to 63 bytes of alignment
// for each of its 16 fields).
inline int64_t scratch_bytes(int64_t M, int64_t K) { return M * K * 7 + 1024; }

// y (M, N) = x (M, K) @ W.T (+ bias), float32; scratch holds scratch_bytes(M, K) + 64 bytes.
void block_linear_rows(const BlockMatrix& W, const float* x, int64_t M, float* y, uint8_t* scratch);

// Whether the packed kinds Q4_1X16, Q5_0X16, Q8_0X16 and Q4_KX16 run on AMX, 16 rows of x at a time: asks
// for it (`enabled`), returns whether it is in use (false where the CPU, the build or Linux lacks it). Both paths
// give the same bits.
bool set_amx(bool enabled);
bool amx_in_use();  // what set_amx last returned (asking Linux for the tile state if no one has yet)

// y_j (M, N) = x_j (M, K) @ W_j.T for every chunk j in one parallel region (tensor parallel's row-parallel
// K ranges: each chunk has the same N and K, no bias). x and y hold the chunks one after another (x_j at
// x + j*M*K, y_j at y + j*M*N); scratch holds n * (scratch_bytes(M, K) + 128) bytes. Each y_j has the bits
// block_linear_rows gives it alone.
void block_linear_rows_chunks(const std::vector<BlockMatrix>& Ws, const float* x, int64_t M, float* y,
                              uint8_t* scratch);

// One matmul of a group (block_linear_rows_group): rows [x_row, x_row + rows) of the group's x through W,
// into rows [y_row, y_row + rows) of the group's y.
struct BlockJob {
  const BlockMatrix* W;
  int64_t x_row, y_row, rows;
};

// Scratch block_linear_rows_group needs (bytes) for `jobs` jobs over x (x_rows, K).
constexpr int64_t kGroupPieceBytes = 64;  // per segment of a job (its place in the work list)
inline int64_t group_scratch_bytes(int64_t jobs, int64_t x_rows, int64_t K) {
  return scratch_bytes(x_rows, K) + 128 + jobs * kMaxSegments * kGroupPieceBytes;
}

// Every job in one parallel region: y (., N) rows of a job = its x (x_rows, K) rows @ its W.T (+ bias);
// every W has the same N and K. x is quantized once, row by row. The work list is every job's 16-row
// chunks, job after job; the pool's threads split it by cost (weight bytes times the job's rows of x),
// whole chunks each. Each y element has the bits block_linear_rows gives it for that job alone, whatever
// the split and the thread count. scratch: group_scratch_bytes(n, x_rows, K) bytes.
void block_linear_rows_group(const BlockJob* jobs, int64_t n, const float* x, int64_t x_rows, float* y,
                             uint8_t* scratch);

// One segment per (blocks, kind, rows) part, stacked in order; the rows must add up to N. Checks every
// part (and the optional float32 bias) and returns the matrix view; `op` names the caller in errors.
using BlockPart = std::tuple<Tensor, int64_t, int64_t>;
BlockMatrix check_segments(const char* op, const std::vector<BlockPart>& parts, int64_t N, int64_t K,
                           const Tensor* bias);

// A single-segment matrix of `rows` rows (check_segments with one part).
BlockMatrix check_blocks(const char* op, const Tensor& w, int64_t kind, int64_t rows, int64_t K, const Tensor* bias);

// Rows of a GGUF table (an embedding) as float32, exactly the gguf package's dequantization: Q8_0 d*q,
// Q4_0 d*(q-8), Q4_1 d*q + m (each product exact in float32; Q4_1 rounds once, at the add). table (V,
// K/32*bytes) uint8 in the file's type `ggml_type` (GGUF's codes: 2 Q4_0, 3 Q4_1, 8 Q8_0); ids (M,) int64
// -> (M, K). One call per step instead of a dozen small numpy ones (docs/moe.md has the figure).
Tensor gguf_rows(const Tensor& table, const Tensor& ids, int64_t ggml_type);

// A GGUF matrix's rows (rows, K/w*file bytes) uint8 in Q5_0, Q4_K, Q6_K or Q8_0 -> the packed kind `kind`
// (kQ5_0x16, kQ4_Kx16, kQ6_Kx16, kQ8_0x16): (ceil(rows/16), K/w*bytes) uint8, the missing rows of the last group zero
// (pack.cpp).
Tensor pack_x16(const Tensor& raw, int64_t kind, int64_t rows, int64_t K);

// The tensor-level op: x (M, K) float32/bfloat16 -> (M, rows) float32.
Tensor block_linear(const Tensor& x, const Tensor& w, int64_t kind, int64_t rows, const std::optional<Tensor>& bias);

}  // namespace metronome
