// Bodies of the CUDA NF4 kernels (csrc/cuda/*.cu), written as __host__ __device__
// functions of (block index, thread index, shared state) so that tests/host can
// run them on the CPU: the emulation loops over the indices, and a
// __syncthreads() becomes the boundary between two loops. Warp shuffles and
// block reductions stay in the .cu files; the host test sums the per-lane
// partial results instead.
//
// Three kernels:
//   nf4_dequantize   packed NF4 -> dense fp32/fp16/bf16, double quant decoded inline
//   lora_down        xa partial sums: drop(x)[M, K] @ lora_A^T, split along K
//   nf4_gemv         y[M, N] = x W^T + bias + scaling * xa B^T for M <= 16
#pragma once

#include <math.h>
#include <stdint.h>

#include "lorakern/common.h"
#include "lorakern/nf4_decode.h"

namespace lorakern {

// ----------------------------------------------------------------------- dequantize
//
// One CTA decodes one tile of 4096 packed bytes (8192 values). Stage: each
// thread loads 16 bytes (one LDG.128, coalesced) into shared memory and the
// first 128 threads decode one absmax per 64 values. Emit: each thread turns
// nibbles from shared memory into 16-byte output stores. Loading 16 B per
// thread and storing from the same registers would instead leave consecutive
// lanes' stores 64 B (bf16) to 128 B (fp32) apart.

constexpr int kDequantThreads = 256;
constexpr int64_t kDequantTileBytes = 16 * kDequantThreads;
constexpr int64_t kDequantTileValues = 2 * kDequantTileBytes;
constexpr int kDequantTileSlots = static_cast<int>(kDequantTileValues / kNf4BlockAlign);

struct DequantShared {
  Vec16 packed[kDequantThreads];
  float absmax[kDequantTileSlots];
  float code[16];
};

struct DequantArgs {
  NF4View q;
  void* out;    // [numel] of the output dtype
  bool vec_in;  // packed is 16-byte aligned
  bool vec_out; // out is 16-byte aligned
};

LK_HD int64_t dequant_tiles(int64_t numel) {
  return ((numel + 1) / 2 + kDequantTileBytes - 1) / kDequantTileBytes;
}

// Before the barrier: tile bytes and absmax into shared memory.
LK_HD void dequant_stage(const DequantArgs& a, int64_t tile, int tid, DequantShared& s) {
  const int64_t nbytes = (a.q.numel + 1) / 2;
  const int64_t b0 = tile * kDequantTileBytes + 16 * static_cast<int64_t>(tid);
  if (a.vec_in && b0 + 16 <= nbytes) {
    s.packed[tid] = load_vec16(a.q.packed + b0);
  } else {
    Vec16 v{{0u, 0u, 0u, 0u}};
    for (int j = 0; j < 16 && b0 + j < nbytes; ++j) v.w[j >> 2] |= static_cast<uint32_t>(load_ro(a.q.packed + b0 + j)) << (8 * (j & 3));
    s.packed[tid] = v;
  }
  if (tid < kDequantTileSlots) {
    // blocksize >= 64 and a power of two, so the 64 values of a slot share one absmax.
    const int64_t v0 = tile * kDequantTileValues + static_cast<int64_t>(kNf4BlockAlign) * tid;
    s.absmax[tid] = v0 < a.q.numel ? nf4_absmax(a.q, v0 >> a.q.log2_blocksize) : 0.0f;
  }
  if (tid < 16) s.code[tid] = nf4_code(static_cast<uint32_t>(tid));
}

// After the barrier: decode and store. fp32 result = code * absmax (one rounding),
// then rounded to the output dtype: bit-identical to lorakern.formats.nf4.dequantize.
// Each thread emits units of one 16-byte store (8 values, 4 for fp32), units
// strided by the CTA size, so a warp's stores fill 512 contiguous bytes.
template <DType D>
LK_HD void dequant_emit(const DequantArgs& a, int64_t tile, int tid, const DequantShared& s) {
  using T = typename Elem<D>::T;
  constexpr int kVals = kValuesPer16B<D>;
  constexpr int kUnits = static_cast<int>(kDequantTileValues / kVals / kDequantThreads);
  T* out = static_cast<T*>(a.out);
  LK_UNROLL
  for (int i = 0; i < kUnits; ++i) {
    const int u = tid + kDequantThreads * i;
    const int nib0 = kVals * u;  // first value of the unit within the tile
    const int64_t v = tile * kDequantTileValues + nib0;
    if (v >= a.q.numel) return;
    const uint32_t word = s.packed[nib0 >> 5].w[(nib0 >> 3) & 3];
    const float am = s.absmax[nib0 / kNf4BlockAlign];
    float vals[kVals];
    LK_UNROLL
    for (int j = 0; j < kVals; ++j) vals[j] = mul_rn(s.code[word_nibble(word, (nib0 & 7) + j)], am);
    if (a.vec_out && v + kVals <= a.q.numel) {
      store_vec16_values<D>(out, v, vals);
    } else {
      for (int j = 0; j < kVals && v + j < a.q.numel; ++j) out[v + j] = Elem<D>::store(vals[j]);
    }
  }
}

// ------------------------------------------------------------------ LoRA down-projection
//
// xa[m, j] = sum_k drop(x)[m, k] * A[j, k] with M <= 16 and r <= 256 is tiny
// work, but every output row of the GEMV needs all of it. A grid of
// (ceil(r / 4), ksplit) CTAs writes fp32 partial sums [ksplit, M, r]; the GEMV
// launch that follows on the same stream adds them up once per CTA. No atomics,
// so the result does not depend on scheduling.

constexpr int kLoraThreads = 256;
constexpr int kLoraRanksPerCta = 4;
constexpr int kLoraMaxRank = 256;
constexpr int kGemvMaxM = 16;

struct LoraDownArgs {
  const void* x;         // [M, K]
  const void* lora_a;    // [r, K]
  const int64_t* seed;   // [1]; its low 32 bits key the dropout hash
  float* partial;        // [ksplit, M, r]
  int64_t k;
  int64_t kchunk;        // K columns per split
  int m, r, ksplit;
  uint32_t threshold;    // dropout_threshold(p)
  float keep_scale;      // float(1 / (1 - p))
  bool dropout;          // p > 0
};

// Partial sums of one thread: columns k = k0 + tid + 256 i of split `split`,
// ranks j0 .. j0 + 3 of group `jgroup`. Element-strided so that a warp's loads
// of x and A are 64-128 contiguous bytes whatever K's alignment.
template <int MT, DType D>
LK_HD void lora_down_thread(const LoraDownArgs& a, int jgroup, int split, int tid, uint32_t key,
                            float acc[MT][kLoraRanksPerCta]) {
  using T = typename Elem<D>::T;
  const T* x = static_cast<const T*>(a.x);
  const T* lora_a = static_cast<const T*>(a.lora_a);
  const int j0 = jgroup * kLoraRanksPerCta;
  const int64_t k0 = split * a.kchunk;
  const int64_t k1 = k0 + a.kchunk < a.k ? k0 + a.kchunk : a.k;
  for (int64_t k = k0 + tid; k < k1; k += kLoraThreads) {
    float av[kLoraRanksPerCta];
    LK_UNROLL
    for (int jj = 0; jj < kLoraRanksPerCta; ++jj) av[jj] = j0 + jj < a.r ? Elem<D>::load(load_ro(lora_a + (j0 + jj) * a.k + k)) : 0.0f;
    LK_UNROLL
    for (int m = 0; m < MT; ++m) {
      if (m >= a.m) break;
      const int64_t i = m * a.k + k;
      float xv = Elem<D>::load(load_ro(x + i));
      // drop(x) as the reference computes it: x * keep, times 1/(1-p), rounded to x's dtype.
      if (a.dropout) xv = dropout_keep(key, i, a.threshold) ? round_to<D>(xv * a.keep_scale) : 0.0f;
      LK_UNROLL
      for (int jj = 0; jj < kLoraRanksPerCta; ++jj) acc[m][jj] = fmaf(xv, av[jj], acc[m][jj]);
    }
  }
}

// Splits along K for the down-projection: about 512 columns each (enough CTAs
// to hide latency: r = 16, K = 4096 gives 4 x 8 = 32), capped so that every
// GEMV CTA reads at most ~2048 partial floats when summing them.
inline int lora_ksplit(int m, int64_t k, int r) {
  if (m < 1 || r < 1) return 1;
  const int64_t want = (k + 511) / 512;
  int64_t cap = 2048 / (static_cast<int64_t>(m) * r);
  if (cap < 1) cap = 1;
  const int64_t s = want < cap ? want : cap;
  return static_cast<int>(s < 1 ? 1 : s);
}

inline int64_t lora_kchunk(int64_t k, int ksplit) { return (k + ksplit - 1) / ksplit; }

// xa[m, j]: the partial sums added in split order, rounded to x's dtype as the
// reference's xa = drop(x) @ A^T is.
template <DType D>
LK_HD float lora_xa(const float* partial, int ksplit, int m_rows, int r, int m, int j) {
  float s = 0.0f;
  for (int sp = 0; sp < ksplit; ++sp) s += partial[(static_cast<int64_t>(sp) * m_rows + m) * r + j];
  return round_to<D>(s);
}

// ------------------------------------------------------------------------------ GEMV
//
// One warp per output row n (grid-stride over rows). Fast path (K % 64 == 0,
// packed and x 16-byte aligned): lane L takes the 64-value blocks L, L + 32, ...
// of the row: two LDG.128 of packed bytes (32 B in flight per lane), one absmax
// decode per 64 values, factored out of the block's dot product so each value
// costs one shared-memory code lookup and one FMA per row of x. Accumulation is
// fp32. The general path reads one nibble at a time (odd K, misaligned views).
//
// x is read by every row. From global memory, lane L's eight 16-byte pieces of x
// for its block lie 128 B from lane L+1's, so each warp-wide load touches 32
// cache lines: 8 x 32 = 256 L1 wavefronts per 64 weights a lane decodes, 4x the
// cost of the code lookups and packed loads together, and the bound of the
// first GPU measurement (0.63 TB/s of weights at M = 1 on an H200, marginal over
// layer sizes). So when x fits (kGemvSharedLimit), each CTA first copies it into
// shared memory ordered by (row, piece, block) (gemv_stage_x): the warp's 32
// lanes then read 32 consecutive pieces, 4 wavefronts per load instead of 32.

constexpr int kGemvThreads = 256;
constexpr int kGemvWarps = kGemvThreads / 32;

struct GemvArgs {
  NF4View w;            // shape [N, K]
  const void* x;        // [M, K], dtype D
  const void* bias;     // [N] or nullptr
  const void* lora_b;   // [N, r] or nullptr when r == 0
  void* y;              // [M, N]
  int64_t n, k;
  int m, r;
  float scaling;
  bool vec;             // the 16-byte-load path is legal
};

// Staged x (vec path): 8-value pieces, piece (m, c, wi) = x[m, 64 c + 8 wi .. + 8] at
// piece index (m * 8 + wi) * stride + c. An odd stride keeps the copy's 16-byte stores
// of one block's 8 pieces in different banks.
// Dynamic shared memory a launch gets without an opt-in: x is staged when it fits
// next to the code table and xa (bf16 x: K up to ~24000 at M = 1, ~12000 at M = 2).
constexpr int64_t kGemvSharedLimit = 48 * 1024;

LK_HD int64_t gemv_x_stride(int64_t k) { return (k / kNf4BlockAlign) | 1; }

LK_HD int64_t gemv_x_shared_bytes(int m, int64_t k, int elem_bytes) {
  return static_cast<int64_t>(m) * 8 * gemv_x_stride(k) * 8 * elem_bytes;
}

// Before the barrier: thread tid's share of copying x [M, K] into xs. Pieces are
// taken in x's memory order, so the global loads of a warp are contiguous.
template <DType D>
LK_HD void gemv_stage_x(const GemvArgs& a, int tid, typename Elem<D>::T* xs) {
  using T = typename Elem<D>::T;
  constexpr int kVecs = static_cast<int>(8 * sizeof(T) / 16);  // 16-byte vectors per piece
  const T* x = static_cast<const T*>(a.x);
  const int64_t per_row = 8 * (a.k / kNf4BlockAlign);
  const int64_t stride = gemv_x_stride(a.k);
  for (int64_t u = tid; u < a.m * per_row; u += kGemvThreads) {
    const int64_t m = u / per_row, c = (u % per_row) / 8, wi = u % 8;
    const T* src = x + m * a.k + 8 * (u % per_row);
    T* dst = xs + ((m * 8 + wi) * stride + c) * 8;
    LK_UNROLL
    for (int v = 0; v < kVecs; ++v) store_vec16(dst + v * (16 / sizeof(T)), load_vec16(src + v * (16 / sizeof(T))));
  }
}

// Eight values of piece `piece` of the staged x, as floats (load_vec16 reads global memory
// through the read-only path, so shared memory has its own load).
template <DType D>
LK_HD void load8_shared(const typename Elem<D>::T* piece, float out[8]) {
  const Vec16 a = load_shared_vec16(piece);
  unpack8<D>(a, sizeof(typename Elem<D>::T) == 2 ? a : load_shared_vec16(piece + 4), out);
}

// Lane `lane`'s share of row n for rows m < MT of x: acc[m] (summed over the 32
// lanes) is y[m, n]. code: the 16 NF4 values; xa: [M, r] fp32 (x's dtype values);
// xs: x staged by gemv_stage_x when kSharedX (vec path only), else unused.
template <int MT, DType D, bool kVec, bool kSharedX = false>
LK_HD void gemv_row_lane(const GemvArgs& a, int64_t n, int lane, const float* code, const float* xa, float acc[MT],
                         const typename Elem<D>::T* xs = nullptr) {
  using T = typename Elem<D>::T;
  static_assert(kVec || !kSharedX, "x is staged for the vec path only");
  const T* x = static_cast<const T*>(a.x);
  const int64_t x_stride = gemv_x_stride(a.k);
  const int64_t row0 = n * a.k;
  LK_UNROLL
  for (int m = 0; m < MT; ++m) acc[m] = 0.0f;
  if constexpr (kVec) {
    const int64_t nblk = a.k / kNf4BlockAlign;
    // Not unrolled: unrolling hoists the x loads of several blocks and doubles
    // the registers (32 -> 67 at M = 1 on sm_80), halving occupancy; the 64 warps
    // of an SM already keep enough weight bytes in flight.
    LK_NO_UNROLL
    for (int64_t c = lane; c < nblk; c += 32) {
      const int64_t v0 = row0 + kNf4BlockAlign * c;
      const uint8_t* p = a.w.packed + (v0 >> 1);
      const Vec16 lo = load_vec16(p);
      const Vec16 hi = load_vec16(p + 16);
      const float am = nf4_absmax(a.w, v0 >> a.w.log2_blocksize);
      float part[MT];
      LK_UNROLL
      for (int m = 0; m < MT; ++m) part[m] = 0.0f;
      LK_UNROLL
      for (int wi = 0; wi < 8; ++wi) {
        const uint32_t word = wi < 4 ? lo.w[wi] : hi.w[wi - 4];
        float wv[8];
        LK_UNROLL
        for (int j = 0; j < 8; ++j) wv[j] = code[word_nibble(word, j)];
        LK_UNROLL
        for (int m = 0; m < MT; ++m) {
          // Rows past M re-read row 0 (an L1 hit) into a sum nobody stores:
          // cheaper than a branch in the innermost loop.
          const int64_t xm = m < a.m ? m : 0;
          float xv[8];
          if constexpr (kSharedX) {
            load8_shared<D>(xs + ((xm * 8 + wi) * x_stride + c) * 8, xv);
          } else {
            load8<D, true>(x, xm * a.k + kNf4BlockAlign * c + 8 * wi, xv);
          }
          LK_UNROLL
          for (int j = 0; j < 8; ++j) part[m] = fmaf(wv[j], xv[j], part[m]);
        }
      }
      LK_UNROLL
      for (int m = 0; m < MT; ++m) acc[m] = fmaf(am, part[m], acc[m]);
    }
  } else {
    LK_NO_UNROLL
    for (int64_t k = lane; k < a.k; k += 32) {
      const int64_t v = row0 + k;
      const float wv = mul_rn(code[nf4_nibble(a.w.packed, v)], nf4_absmax(a.w, v >> a.w.log2_blocksize));
      LK_UNROLL
      for (int m = 0; m < MT; ++m) {
        const int64_t xm = m < a.m ? m : 0;
        acc[m] = fmaf(wv, Elem<D>::load(load_ro(x + xm * a.k + k)), acc[m]);
      }
    }
  }
  // LoRA up-projection and bias join the lanes' sums before the warp reduction.
  if (a.r > 0) {
    const T* b = static_cast<const T*>(a.lora_b) + n * a.r;
    for (int j = lane; j < a.r; j += 32) {
      const float bj = a.scaling * Elem<D>::load(load_ro(b + j));
      LK_UNROLL
      for (int m = 0; m < MT; ++m) {
        const int xm = m < a.m ? m : 0;
        acc[m] = fmaf(xa[xm * a.r + j], bj, acc[m]);
      }
    }
  }
  if (lane == 0 && a.bias != nullptr) {
    const float bv = Elem<D>::load(load_ro(static_cast<const T*>(a.bias) + n));
    LK_UNROLL
    for (int m = 0; m < MT; ++m) acc[m] += bv;
  }
}

// The smallest compiled row count >= m. Kernels exist for 1, 2, 4 and 16 rows of
// x: an 8-row version needs 128+ registers on sm_80 and ptxas spills it, while
// the 16-row one fits in 156 without spilling; rows past M cost FMAs only, and
// at M > 4 the GEMV is bound by FMA issue, not by the weight bytes, either way.
inline int gemv_rows_tile(int m) { return m <= 1 ? 1 : m <= 2 ? 2 : m <= 4 ? 4 : 16; }

}  // namespace lorakern
