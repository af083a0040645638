// GGUF rows repacked 16 rows side by side (blocks.h: kQ5_0x16, kQ4_Kx16, kQ6_Kx16, kQ8_0x16, kQ4_1x16; blocks.cpp has
// each layout and the kernels that read it). Packing only moves the file's bits: scales, minimums and codes come out as
// stored, unpacked to bytes where the kernels want bytes. Each group of 16 rows is independent, so groups are the unit
// of parallel work (a 1.5B model's ~1 GB packs in about a second, where numpy took 15).

#include <ATen/ops/zeros.h>

#include <immintrin.h>

#include <cstring>

#include "blocks.h"
#include "checks.h"
#include "pool.h"

namespace metronome {

namespace {

// One block of one row, its codes in weight order.
struct Q5_0Block {
  static constexpr int64_t kW = 32, kFile = 22, kPacked = kQ5x16Bytes;
  static void codes(const uint8_t* b, uint8_t* q) {  // d, 4 bytes of fifth bits, 16 nibble bytes
    uint32_t qh;
    std::memcpy(&qh, b + 2, 4);
    for (int j = 0; j < 16; ++j) {
      q[j] = static_cast<uint8_t>((b[6 + j] & 0x0F) | (((qh >> j) & 1) << 4));
      q[j + 16] = static_cast<uint8_t>((b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4));
    }
  }
};

struct Q4_KBlock {
  static constexpr int64_t kW = 256, kFile = 144, kPacked = kQ4Kx16Bytes;
  // d, dmin, 12 bytes of 6-bit scales and minimums (sub-blocks 0..3 in the low 6 bits of bytes 0..7; 4..7 in
  // the nibbles of bytes 8..11 with their top 2 bits in the top bits of bytes 0..7), 128 code bytes (per 64
  // weights 32 bytes: low nibbles the first 32, high nibbles the next).
  static void scales(const uint8_t* b, uint8_t* sc, uint8_t* mn) {
    const uint8_t* s = b + 4;
    for (int j = 0; j < 4; ++j) {
      sc[j] = s[j] & 63;
      mn[j] = s[j + 4] & 63;
      sc[j + 4] = static_cast<uint8_t>((s[j + 8] & 0x0F) | ((s[j] >> 6) << 4));
      mn[j + 4] = static_cast<uint8_t>((s[j + 8] >> 4) | ((s[j + 4] >> 6) << 4));
    }
  }
  static void codes(const uint8_t* b, uint8_t* q) {
    for (int c = 0; c < 4; ++c)
      for (int l = 0; l < 32; ++l) {
        q[64 * c + l] = b[16 + 32 * c + l] & 0x0F;
        q[64 * c + 32 + l] = b[16 + 32 * c + l] >> 4;
      }
  }
};

struct Q6_KBlock {
  static constexpr int64_t kW = 256, kFile = 210, kPacked = kQ6Kx16Bytes;
  // 128 bytes of low 4 bits, 64 of top 2 bits, 16 int8 scales, d. Per 128 weights (half h): weight l and
  // l + 64 share low byte l (low, high nibble), l + 32 and l + 96 share byte l + 32; top-bit byte l holds
  // weights l, l + 32, l + 64, l + 96 in bits 0-1, 2-3, 4-5, 6-7.
  static void codes(const uint8_t* b, uint8_t* q) {
    for (int h = 0; h < 2; ++h) {
      const uint8_t *ql = b + 64 * h, *qh = b + 128 + 32 * h;
      for (int l = 0; l < 32; ++l) {
        q[128 * h + l] = static_cast<uint8_t>((ql[l] & 0x0F) | ((qh[l] & 3) << 4));
        q[128 * h + l + 32] = static_cast<uint8_t>((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4));
        q[128 * h + l + 64] = static_cast<uint8_t>((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4));
        q[128 * h + l + 96] = static_cast<uint8_t>((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4));
      }
    }
  }
};

struct Q8_0Block {
  static constexpr int64_t kW = 32, kFile = 34, kPacked = kQ8x16Bytes;  // d, 32 int8 codes
};

// Q4_1: d, m, 16 code bytes (byte j: weight j in the low nibble, j + 16 in the high one). Q4_0: d and the 16
// code bytes; its m = -8d (exact in fp16), so both pack as Q4_1X16.
template <bool kHasMin>
struct Q4Block {
  static constexpr int64_t kW = 32, kFile = kHasMin ? 20 : 18, kPacked = kQ41x16Bytes;
  static constexpr int64_t kCodes = kHasMin ? 4 : 2;
  static uint16_t min(const uint8_t* b) {
    uint16_t m;
    if constexpr (kHasMin) {
      std::memcpy(&m, b + 2, 2);
    } else {
      uint16_t d;
      std::memcpy(&d, b, 2);
      m = _cvtss_sh(-8.0f * _cvtsh_ss(d), _MM_FROUND_TO_NEAREST_INT);  // a power of two: exact
    }
    return m;
  }
};

// 16 rows' codes (q[r * stride + w]) for weights [w0, w0 + 8n) -> n nibble vectors: vector v, byte 4r+i =
// row r's weight w0 + 8v + i in the low nibble, w0 + 8v + 4 + i in the high one.
void nibble_vectors(const uint8_t* q, int64_t stride, int64_t w0, int64_t n, uint8_t* out) {
  for (int64_t v = 0; v < n; ++v)
    for (int r = 0; r < 16; ++r)
      for (int i = 0; i < 4; ++i) {
        const uint8_t* row = q + r * stride + w0 + 8 * v;
        out[64 * v + 4 * r + i] = static_cast<uint8_t>((row[i] & 0x0F) | ((row[4 + i] & 0x0F) << 4));
      }
}

// Block b of the 16 rows (file blocks f[r], nullptr for the rows past the matrix's end: zeros) -> out.
void pack_block(const Q5_0Block&, const uint8_t* const* f, uint8_t* out) {
  uint8_t q[16][32] = {};
  for (int r = 0; r < 16; ++r)
    if (f[r] != nullptr) {
      std::memcpy(out + 2 * r, f[r], 2);  // d
      Q5_0Block::codes(f[r], q[r]);
    }
  for (int r = 0; r < 16; ++r)  // bit planes: byte 4r+j, bit g = the fifth bit of row r's weight 4g+j
    for (int j = 0; j < 4; ++j) {
      uint8_t planes = 0;
      for (int g = 0; g < 8; ++g) planes |= static_cast<uint8_t>((q[r][4 * g + j] >> 4) << g);
      out[32 + 4 * r + j] = planes;
    }
  nibble_vectors(&q[0][0], 32, 0, 4, out + 96);
}

void pack_block(const Q4_KBlock&, const uint8_t* const* f, uint8_t* out) {
  uint8_t q[16][256] = {};
  for (int r = 0; r < 16; ++r) {
    if (f[r] == nullptr) continue;
    std::memcpy(out + 2 * r, f[r], 2);           // d
    std::memcpy(out + 32 + 2 * r, f[r] + 2, 2);  // dmin
    uint8_t sc[8], mn[8];
    Q4_KBlock::scales(f[r], sc, mn);
    for (int j = 0; j < 8; ++j) {
      out[64 + 16 * j + r] = sc[j];
      out[192 + 32 * (j / 2) + 2 * r + j % 2] = mn[j];
    }
    Q4_KBlock::codes(f[r], q[r]);
  }
  nibble_vectors(&q[0][0], 256, 0, 32, out + 320);
}

void pack_block(const Q6_KBlock&, const uint8_t* const* f, uint8_t* out) {
  uint8_t q[16][256] = {};
  for (int r = 0; r < 16; ++r) {
    if (f[r] == nullptr) continue;
    std::memcpy(out + 2 * r, f[r] + 208, 2);  // d
    for (int g = 0; g < 16; ++g) out[32 + 16 * g + r] = f[r][192 + g];
    Q6_KBlock::codes(f[r], q[r]);
  }
  for (int t = 0; t < 8; ++t) {  // per 32 weights: 4 nibble vectors, then 2 vectors of the top 2 bits
    uint8_t* run = out + 288 + 384 * t;
    nibble_vectors(&q[0][0], 256, 32 * t, 4, run);
    for (int h = 0; h < 2; ++h)
      for (int r = 0; r < 16; ++r)
        for (int i = 0; i < 4; ++i) {
          uint8_t top = 0;
          for (int e = 0; e < 4; ++e) top |= static_cast<uint8_t>((q[r][32 * t + 16 * h + 4 * e + i] >> 4) << (2 * e));
          run[256 + 64 * h + 4 * r + i] = top;
        }
  }
}

void pack_block(const Q8_0Block&, const uint8_t* const* f, uint8_t* out) {
  for (int r = 0; r < 16; ++r) {
    if (f[r] == nullptr) continue;      // a missing row: d = 0 and codes 0 (its lane is never stored)
    std::memcpy(out + 2 * r, f[r], 2);  // d
    for (int g = 0; g < 8; ++g)
      for (int i = 0; i < 4; ++i) out[32 + 64 * g + 4 * r + i] = static_cast<uint8_t>(f[r][2 + 4 * g + i] ^ 0x80);
  }
}

template <bool kHasMin>
void pack_block(const Q4Block<kHasMin>&, const uint8_t* const* f, uint8_t* out) {
  uint8_t q[16][32] = {};
  for (int r = 0; r < 16; ++r) {
    if (f[r] == nullptr) continue;      // a missing row: d = m = 0 and codes 0 (its lane is never stored)
    std::memcpy(out + 2 * r, f[r], 2);  // d
    const uint16_t m = Q4Block<kHasMin>::min(f[r]);
    std::memcpy(out + 32 + 2 * r, &m, 2);
    for (int j = 0; j < 16; ++j) {
      q[r][j] = f[r][Q4Block<kHasMin>::kCodes + j] & 0x0F;
      q[r][j + 16] = f[r][Q4Block<kHasMin>::kCodes + j] >> 4;
    }
  }
  nibble_vectors(&q[0][0], 32, 0, 4, out + 64);
}

template <typename B>
void pack_rows(const uint8_t* raw, int64_t rows, int64_t K, uint8_t* out) {
  const int64_t nb = K / B::kW, groups = (rows + 15) / 16;
  parallel_for(0, groups, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t g = lo; g < hi; ++g)
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* f[16];
        for (int64_t r = 0; r < 16; ++r)
          f[r] = 16 * g + r < rows ? raw + (16 * g + r) * nb * B::kFile + b * B::kFile : nullptr;
        pack_block(B{}, f, out + (g * nb + b) * B::kPacked);
      }
  });
}

}  // namespace

Tensor pack_x16(const Tensor& raw, int64_t kind, int64_t rows, int64_t K) {
  const char* op = "pack_x16";
  check_cpu(op, "raw", raw);
  TORCH_CHECK(kind == kQ5_0x16 || kind == kQ4_Kx16 || kind == kQ6_Kx16 || kind == kQ8_0x16 || kind == kQ4_1x16, op,
              ": kind must be Q5_0X16 (", kQ5_0x16, "), Q4_KX16 (", kQ4_Kx16, "), Q6_KX16 (", kQ6_Kx16, "), Q8_0X16 (",
              kQ8_0x16, ") or Q4_1X16 (", kQ4_1x16, "), got ", kind);
  const int64_t weights = kKinds[kind].weights;
  // Q4_1X16 takes Q4_0 (18 bytes a block) or Q4_1 (20) rows: told apart by the rows' width
  const bool q4_0 = kind == kQ4_1x16 && raw.dim() == 2 && raw.size(1) == K / 32 * Q4Block<false>::kFile;
  const int64_t file_bytes = kind == kQ5_0x16   ? Q5_0Block::kFile
                             : kind == kQ4_Kx16 ? Q4_KBlock::kFile
                             : kind == kQ6_Kx16 ? Q6_KBlock::kFile
                             : kind == kQ8_0x16 ? Q8_0Block::kFile
                             : q4_0             ? Q4Block<false>::kFile
                                                : Q4Block<true>::kFile;
  TORCH_CHECK(rows > 0 && K > 0 && K % weights == 0, op, ": rows = ", rows, " must be positive and K = ", K,
              " a positive multiple of ", weights);
  TORCH_CHECK(raw.scalar_type() == at::kByte && raw.is_contiguous() && raw.numel() == rows * (K / weights) * file_bytes,
              op, ": raw must be the file's contiguous uint8 blocks, ", rows, " rows of ", K / weights * file_bytes,
              " bytes, got ", raw.scalar_type(), " ", raw.sizes());
  Tensor out = at::zeros({(rows + 15) / 16, K / weights * kKinds[kind].bytes}, at::kByte);
  const uint8_t* src = raw.data_ptr<uint8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  if (kind == kQ5_0x16)
    pack_rows<Q5_0Block>(src, rows, K, dst);
  else if (kind == kQ4_Kx16)
    pack_rows<Q4_KBlock>(src, rows, K, dst);
  else if (kind == kQ6_Kx16)
    pack_rows<Q6_KBlock>(src, rows, K, dst);
  else if (kind == kQ8_0x16)
    pack_rows<Q8_0Block>(src, rows, K, dst);
  else if (q4_0)
    pack_rows<Q4Block<false>>(src, rows, K, dst);
  else
    pack_rows<Q4Block<true>>(src, rows, K, dst);
  return out;
}

}  // namespace metronome
