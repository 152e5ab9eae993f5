// NF4 quantize and the double-quant absmax decode. Compiled for baseline x86-64
// (no target attributes in this file), so no float expression here can be
// contracted into an FMA: results are bit-identical to lorakern/formats/nf4.py.
#include <algorithm>
#include <cmath>

#include "lorakern/common.h"
#include "lorakern/cpu_kernels.h"

namespace lorakern {
namespace cpu {

Isa best_isa() {
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw")) return Isa::avx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::avx2;  // F16C comes with both
  return Isa::scalar;
}

void decode_absmax(const NF4View& q, int64_t b0, int64_t count, float* out) {
  if (q.absmax_u8 == nullptr) {
    std::memcpy(out, q.absmax_f32 + b0, count * sizeof(float));
    return;
  }
  for (int64_t i = 0; i < count; ++i) {
    const int64_t b = b0 + i;
    const float scaled = q.nested_code[q.absmax_u8[b]] * q.nested_absmax[b >> 8];
    out[i] = scaled + q.offset;
  }
}

namespace {

// Midpoints between neighbouring NF4 codes, in fp32 as torch computes (a + b) / 2.
struct Bounds {
  float v[15];
  Bounds() {
    for (int i = 0; i < 15; ++i) v[i] = (nf4_code(i) + nf4_code(i + 1)) / 2.0f;
  }
};

// Index of the nearest code: the number of midpoints strictly below s (torch.bucketize, right=False).
inline uint32_t nearest_code(float s, const Bounds& bd) {
  uint32_t idx = 0;
  for (int i = 0; i < 15; ++i) idx += s > bd.v[i];
  return idx;
}

inline float clamp1(float v) { return std::min(std::max(v, -1.0f), 1.0f); }

}  // namespace

void nf4_quantize(const void* w, DType dtype, int64_t numel, int64_t blocksize, uint8_t* packed, float* absmax) {
  const Bounds bounds;
  const int64_t nblocks = (numel + blocksize - 1) / blocksize;
  const int64_t full = numel / blocksize;
  // Small weights quantize on the calling thread (a fork/join costs microseconds).
#pragma omp parallel for schedule(static) if (numel >= (1 << 15))
  for (int64_t b = 0; b < nblocks; ++b) {
    const int64_t e0 = b * blocksize;
    const int64_t n = std::min(blocksize, numel - e0);
    float vals[4096];
    float amax = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      vals[i] = load_as_f32(w, dtype, e0 + i);
      amax = std::max(amax, std::fabs(vals[i]));
    }
    const float clamped = std::max(amax, 1e-38f);
    uint8_t codes[4096 + 1];
    if (b < full) {  // full block: multiply by the reciprocal; the stored absmax is not clamped
      const float inv = 1.0f / clamped;
      for (int64_t i = 0; i < n; ++i) codes[i] = nearest_code(clamp1(vals[i] * inv), bounds);
      absmax[b] = amax;
    } else {  // trailing partial block: divide; the stored absmax is the clamped one
      for (int64_t i = 0; i < n; ++i) codes[i] = nearest_code(clamp1(vals[i] / clamped), bounds);
      absmax[b] = clamped;
    }
    int64_t padded = n;
    if (n & 1) codes[padded++] = nearest_code(0.0f, bounds);  // numel odd: pad with a zero value
    for (int64_t i = 0; i < padded; i += 2) packed[(e0 + i) >> 1] = static_cast<uint8_t>((codes[i] << 4) | codes[i + 1]);
  }
}

}  // namespace cpu
}  // namespace lorakern
