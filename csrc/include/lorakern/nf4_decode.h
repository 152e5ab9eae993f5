// Host/device building blocks for NF4 kernels on top of common.h: a view of an
// NF4 weight in raw pointers, the absmax of any block (with or without double
// quant), rounding fp32 to bf16 / fp16 exactly as torch does, 16-byte vector
// loads and stores, and element access for the three activation dtypes.
//
// Everything is __host__ __device__ (LK_HD): the CUDA kernels call it on the
// GPU and tests/host runs the same code on the CPU under ASan/UBSan.
#pragma once

#include <stdint.h>
#include <string.h>

#include "lorakern/common.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

// Loop unrolling hints for the device pass only: host compilers (g++ -Wall,
// also when nvcc drives them on a .cpp file) warn about the unknown pragma.
#if defined(__CUDA_ARCH__)
#define LK_UNROLL _Pragma("unroll")
#define LK_NO_UNROLL _Pragma("unroll 1")
#else
#define LK_UNROLL
#define LK_NO_UNROLL
#endif

namespace lorakern {

// dtype codes shared with Python (lorakern/kernels/cuda.py) and the bindings.
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

constexpr int kNf4BlockAlign = 64;  // the kernels decode one absmax per 64 values

// An NF4 weight as raw pointers (see lorakern/formats/nf4.py for the layout).
// Exactly one of absmax_q (uint8 codes, double quant) and absmax_f32 is set.
struct NF4View {
  const uint8_t* packed;         // [ceil(numel / 2)], first value in the high nibble
  const uint8_t* absmax_q;       // [nblocks] or nullptr
  const float* absmax_f32;       // [nblocks] or nullptr
  const float* nested_absmax;    // [ceil(nblocks / 256)] (double quant)
  const float* nested_code;      // [256] (double quant)
  const float* offset;           // [1] (double quant); read on the device, never copied to the host
  int64_t numel;
  int log2_blocksize;            // blocksize = 1 << log2_blocksize
};

// The fp32 absmax of block b.
LK_HD float nf4_absmax(const NF4View& q, int64_t b) {
  if (q.absmax_q != nullptr) return nf4_block_absmax_dq(q.absmax_q, q.nested_absmax, q.nested_code, *q.offset, b);
  return q.absmax_f32[b];
}

// ------------------------------------------------------------------ bit casts and rounding

LK_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  memcpy(&u, &f, 4);
  return u;
#endif
}

LK_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  memcpy(&f, &u, 4);
  return f;
#endif
}

// fp32 -> bf16, round to nearest even (torch's rule; any NaN -> torch's 0x7FC0).
LK_HD uint16_t float_to_bf16_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
  const uint32_t u = float_to_bits(f);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0u;
  return static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
#endif
}

LK_HD float bf16_bits_to_float(uint16_t h) { return bits_to_float(static_cast<uint32_t>(h) << 16); }

// fp32 -> fp16, round to nearest even, overflow to inf, subnormals kept (IEEE, as torch).
LK_HD uint16_t float_to_half_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __half_as_ushort(__float2half_rn(f));
#else
  uint32_t u = float_to_bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  u &= 0x7FFFFFFFu;
  if (u > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u);  // NaN
  if (u >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // >= 65520 rounds to inf
  if (u < 0x38800000u) {
    // Below 2^-14 the result is subnormal: adding 0.5 (exponent of 2^-1) lines the
    // fp16 subnormal grid (step 2^-24) up with the fp32 mantissa's last bit, so the
    // FPU's own round-to-nearest-even does the rounding.
    const float magic = bits_to_float(126u << 23);
    const uint32_t r = float_to_bits(bits_to_float(u) + magic) - (126u << 23);
    return static_cast<uint16_t>(sign | r);
  }
  const uint32_t odd = (u >> 13) & 1u;
  u += (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + odd;  // rebias exponent, round half to even
  return static_cast<uint16_t>(sign | (u >> 13));
#endif
}

LK_HD float half_bits_to_float(uint16_t h) {
#if defined(__CUDA_ARCH__)
  return __half2float(__ushort_as_half(h));
#else
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1Fu;
  const uint32_t mant = h & 0x3FFu;
  if (exp == 0) {
    const float v = static_cast<float>(mant) * 5.9604644775390625e-8f;  // mant * 2^-24, exact
    return bits_to_float(sign | float_to_bits(v));
  }
  if (exp == 31) return bits_to_float(sign | 0x7F800000u | (mant << 13));
  return bits_to_float(sign | ((exp + 112u) << 23) | (mant << 13));
#endif
}

// Storage type and float conversions of a dtype. 16-bit types are stored as
// their raw bits so host and device share one representation.
template <DType D>
struct Elem;

template <>
struct Elem<DType::kFloat32> {
  using T = float;
  static LK_HD float load(T v) { return v; }
  static LK_HD T store(float f) { return f; }
};

template <>
struct Elem<DType::kFloat16> {
  using T = uint16_t;
  static LK_HD float load(T v) { return half_bits_to_float(v); }
  static LK_HD T store(float f) { return float_to_half_bits(f); }
};

template <>
struct Elem<DType::kBFloat16> {
  using T = uint16_t;
  static LK_HD float load(T v) { return bf16_bits_to_float(v); }
  static LK_HD T store(float f) { return float_to_bf16_bits(f); }
};

// f rounded to dtype D and back: what a tensor of dtype D would hold.
template <DType D>
LK_HD float round_to(float f) {
  return Elem<D>::load(Elem<D>::store(f));
}

// -------------------------------------------------------------------- 16-byte accesses

struct alignas(16) Vec16 {
  uint32_t w[4];
};

// 16 bytes from a 16-byte aligned address of read-only data (one LDG.128 via the
// non-coherent cache on the GPU).
LK_HD Vec16 load_vec16(const void* p) {
#if defined(__CUDA_ARCH__)
  const uint4 v = __ldg(reinterpret_cast<const uint4*>(p));
  return Vec16{{v.x, v.y, v.z, v.w}};
#else
  Vec16 v;
  memcpy(&v, p, 16);
  return v;
#endif
}

// 16 bytes from a 16-byte aligned address in shared memory (plain load: LDS.128).
LK_HD Vec16 load_shared_vec16(const void* p) {
#if defined(__CUDA_ARCH__)
  const uint4 v = *reinterpret_cast<const uint4*>(p);
  return Vec16{{v.x, v.y, v.z, v.w}};
#else
  Vec16 v;
  memcpy(&v, p, 16);
  return v;
#endif
}

LK_HD void store_vec16(void* p, const Vec16& v) {
#if defined(__CUDA_ARCH__)
  *reinterpret_cast<uint4*>(p) = make_uint4(v.w[0], v.w[1], v.w[2], v.w[3]);
#else
  memcpy(p, &v, 16);
#endif
}

// Read-only scalar load (through the non-coherent cache on the GPU).
template <typename T>
LK_HD T load_ro(const T* p) {
#if defined(__CUDA_ARCH__)
  return __ldg(p);
#else
  return *p;
#endif
}

// Eight values of dtype D as floats, from one 16-byte vector (fp16 / bf16: `b` unused)
// or two (fp32).
template <DType D>
LK_HD void unpack8(const Vec16& a, const Vec16& b, float out[8]) {
  using T = typename Elem<D>::T;
  if constexpr (sizeof(T) == 2) {
    LK_UNROLL
    for (int j = 0; j < 4; ++j) {
      out[2 * j] = Elem<D>::load(static_cast<T>(a.w[j] & 0xFFFFu));
      out[2 * j + 1] = Elem<D>::load(static_cast<T>(a.w[j] >> 16));
    }
  } else {
    LK_UNROLL
    for (int j = 0; j < 4; ++j) {
      out[j] = bits_to_float(a.w[j]);
      out[4 + j] = bits_to_float(b.w[j]);
    }
  }
}

// Eight consecutive elements of dtype D starting at element i, as floats.
// kVec: base is 16-byte aligned and i a multiple of 8, so 16-byte loads are legal.
template <DType D, bool kVec>
LK_HD void load8(const typename Elem<D>::T* base, int64_t i, float out[8]) {
  using T = typename Elem<D>::T;
  if constexpr (kVec && sizeof(T) == 2) {
    const Vec16 a = load_vec16(base + i);
    unpack8<D>(a, a, out);
  } else if constexpr (kVec) {
    unpack8<D>(load_vec16(base + i), load_vec16(base + i + 4), out);
  } else {
    LK_UNROLL
    for (int j = 0; j < 8; ++j) out[j] = Elem<D>::load(load_ro(base + i + j));
  }
}

// Values of dtype D in one 16-byte store: 4 fp32 or 8 fp16 / bf16.
template <DType D>
constexpr int kValuesPer16B = static_cast<int>(16 / sizeof(typename Elem<D>::T));

// Store kValuesPer16B<D> floats as dtype D at element i with one 16-byte store
// (base 16-byte aligned, i a multiple of kValuesPer16B<D>).
template <DType D>
LK_HD void store_vec16_values(typename Elem<D>::T* base, int64_t i, const float* v) {
  Vec16 a;
  if constexpr (D == DType::kFloat32) {
    LK_UNROLL
    for (int j = 0; j < 4; ++j) a.w[j] = float_to_bits(v[j]);
  } else {
    LK_UNROLL
    for (int j = 0; j < 4; ++j) {
      a.w[j] = static_cast<uint32_t>(Elem<D>::store(v[2 * j])) | (static_cast<uint32_t>(Elem<D>::store(v[2 * j + 1])) << 16);
    }
  }
  store_vec16(base + i, a);
}

// Nibble j (0..7) of a little-endian 32-bit word of packed NF4: byte j/2, the
// high nibble first, so value order matches the flat element order.
LK_HD uint32_t word_nibble(uint32_t w, int j) { return (w >> (8 * (j >> 1) + ((j & 1) ? 0 : 4))) & 15u; }

}  // namespace lorakern
