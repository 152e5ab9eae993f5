// Device math shared by the CPU (C++) and CUDA kernels: NF4 decode, double-quant
// absmax decode, index math and the LoRA dropout hash. Everything here is
// __host__ __device__ so host tests (tests/host) exercise exactly the code the
// GPU runs. The Python ground truth is lorakern/formats/nf4.py and
// lorakern/reference/dropout.py.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#define LK_HD __host__ __device__ __forceinline__
#else
#define LK_HD inline
#endif

namespace lorakern {

// The 16 NF4 code values, index 0..15 (bitsandbytes' table).
LK_HD float nf4_code(uint32_t idx) {
  // A switch compiles to a select chain on GPU (no local-memory table) and a
  // jump table / constant load on CPU.
  switch (idx & 15u) {
    case 0: return -1.0f;
    case 1: return -0.6961928009986877f;
    case 2: return -0.5250730514526367f;
    case 3: return -0.39491748809814453f;
    case 4: return -0.28444138169288635f;
    case 5: return -0.18477343022823334f;
    case 6: return -0.09105003625154495f;
    case 7: return 0.0f;
    case 8: return 0.07958029955625534f;
    case 9: return 0.16093020141124725f;
    case 10: return 0.24611230194568634f;
    case 11: return 0.33791524171829224f;
    case 12: return 0.44070982933044434f;
    case 13: return 0.5626170039176941f;
    case 14: return 0.7229568362236023f;
    default: return 1.0f;
  }
}

// Element i of a packed NF4 tensor: byte i/2, high nibble for even i.
LK_HD uint32_t nf4_nibble(const uint8_t* packed, int64_t i) {
  const uint8_t byte = packed[i >> 1];
  return (i & 1) ? (byte & 15u) : (byte >> 4);
}

// a * b and a + b rounded separately. nvcc contracts `a * b + c` into one FMA
// (single rounding) by default, which changes the last bit and breaks
// bit-exactness with the reference, whose multiply and add are two torch ops.
LK_HD float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

LK_HD float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

// The fp32 absmax of block b. Double quant: code[absmax_q[b]] * nested[b / 256] + offset,
// multiply and add rounded separately as in lorakern.formats.nf4.decode_absmax.
LK_HD float nf4_block_absmax_dq(const uint8_t* absmax_q, const float* nested_absmax, const float* nested_code,
                                float offset, int64_t b) {
  return add_rn(mul_rn(nested_code[absmax_q[b]], nested_absmax[b >> 8]), offset);
}

// Dropout hash (see lorakern/reference/dropout.py): a bijective 32-bit finaliser.
LK_HD uint32_t mix32(uint32_t x) {
  x ^= x >> 16;
  x *= 0x7FEB352Du;
  x ^= x >> 15;
  x *= 0x846CA68Bu;
  x ^= x >> 16;
  return x;
}

// Keep element i (row-major index into the [M, K] LoRA input) for seed key = mix32(seed)?
LK_HD bool dropout_keep(uint32_t key, int64_t i, uint32_t threshold) {
  return mix32(static_cast<uint32_t>(i) ^ key) >= threshold;
}

// threshold(p) = min(floor(p * 2^32), 2^32 - 1); computed on the host and passed in.
inline uint32_t dropout_threshold(double p) {
  const double t = p * 4294967296.0;
  return t >= 4294967295.0 ? 0xFFFFFFFFu : static_cast<uint32_t>(t);
}

}  // namespace lorakern
