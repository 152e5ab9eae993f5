// Walking a contiguous run of NF4 elements block by block (CPU kernels).
#pragma once

#include <immintrin.h>

#include <algorithm>

#include "lorakern/common.h"
#include "lorakern/cpu_kernels.h"

namespace lorakern {
namespace cpu {

// Elements are decoded in groups of 32 (16 packed bytes) that start at a
// multiple of 32; every supported blocksize is a multiple of 32, so a group
// never straddles two absmax blocks.
constexpr int64_t kGroup = 32;

// Iterates over the pieces of the element run [e0, e0 + count) that each lie in
// one absmax block. The absmax of up to 256 blocks is decoded at a time into a
// member buffer. (An iterator rather than a callback: lambdas do not inherit the
// target attribute of the AVX function that would call them.)
class BlockWalker {
 public:
  BlockWalker(const NF4View& q, int64_t e0, int64_t count)
      : q_(q), e0_(e0), e_(e0), end_(e0 + count), nblocks_((q.numel + q.blocksize - 1) / q.blocksize),
        b_(e0 / q.blocksize), block_end_((e0 / q.blocksize + 1) * q.blocksize),
        last_block_(count > 0 ? (e0 + count - 1) / q.blocksize : 0) {}

  // The next piece: elements [e, e + n) with absmax a, `done` elements after e0. False at the end.
  // Pieces after the first start on a block boundary, so the block index is a counter
  // (no 64-bit division per 64-element block). Only the blocks of this run are decoded.
  bool next(int64_t& e, int64_t& n, float& a, int64_t& done) {
    if (e_ >= end_) return false;
    if (b_ >= am_b0_ + am_n_) {
      am_b0_ = b_;
      am_n_ = std::min(kBatch, last_block_ + 1 - b_);
      decode_absmax(q_, am_b0_, am_n_, am_);
    }
    const int64_t seg_end = std::min(block_end_, end_);
    e = e_;
    n = seg_end - e_;
    a = am_[b_ - am_b0_];
    done = e_ - e0_;
    e_ = seg_end;
    ++b_;
    block_end_ += q_.blocksize;
    return true;
  }

 private:
  static constexpr int64_t kBatch = 256;
  const NF4View& q_;
  int64_t e0_, e_, end_, nblocks_, b_, block_end_, last_block_;
  int64_t am_b0_ = 0, am_n_ = 0;
  float am_[kBatch];
};

// The 16 values code * absmax, rounded once to the output type (so every ISA path
// stores the same bits: fp32 product, then round to nearest even).
template <class T>
inline void scaled_table(float absmax, DType t, T* table) {
  for (uint32_t i = 0; i < 16; ++i) {
    const float v = nf4_code(i) * absmax;
    if constexpr (sizeof(T) == 4) {
      table[i] = v;
    } else {
      table[i] = t == DType::bf16 ? f32_to_bf16(v) : f32_to_f16(v);
    }
  }
}

// Scalar decode of [e, e + n) with one absmax into out (dtype).
inline void decode_scalar_piece(const uint8_t* packed, int64_t e, int64_t n, float absmax, void* out, DType t) {
  if (t == DType::f32) {
    float table[16];
    scaled_table(absmax, t, table);
    float* o = static_cast<float*>(out);
    for (int64_t i = 0; i < n; ++i) o[i] = table[nf4_nibble(packed, e + i)];
  } else {
    uint16_t table[16];
    scaled_table(absmax, t, table);
    uint16_t* o = static_cast<uint16_t*>(out);
    for (int64_t i = 0; i < n; ++i) o[i] = table[nf4_nibble(packed, e + i)];
  }
}

// A piece [e, e + n) as a scalar head up to the next multiple of 32, whole groups, a scalar tail.
struct PieceSplit {
  int64_t head, groups, tail;
};
inline PieceSplit split_piece(int64_t e, int64_t n) {
  const int64_t head = std::min(n, (kGroup - e % kGroup) % kGroup);
  const int64_t groups = (n - head) / kGroup;
  return {head, groups, n - head - groups * kGroup};
}

// The 16 NF4 code values in one AVX-512 register (lane i = code i), the table every
// AVX-512 decode scales by a block's absmax. Target avx512f only, so it inlines into
// every AVX-512 variant (their target sets all include it).
__attribute__((target("avx512f"))) inline __m512 nf4_code_ps512() {
  alignas(64) float code[16];
  for (int i = 0; i < 16; ++i) code[i] = nf4_code(i);
  return _mm512_load_ps(code);
}

}  // namespace cpu
}  // namespace lorakern
