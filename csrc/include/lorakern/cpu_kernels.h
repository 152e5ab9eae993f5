// CPU kernels of lorakern._C: declarations shared by the csrc/cpu translation units.
//
// Everything is torch-free: tensors arrive as raw pointers plus sizes. Element
// types are named by DType; ISA paths by Isa (chosen at run time, never by -march).
#pragma once

#include <stdint.h>

#include <cstring>

namespace lorakern {
namespace cpu {

enum class DType : int { f32 = 0, bf16 = 1, f16 = 2 };
enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2 };

// The best ISA path this CPU runs (AVX-512 needs F+BW; AVX2 needs AVX2+FMA+F16C).
Isa best_isa();

// A read-only view of an NF4Weight (lorakern/formats/nf4.py).
struct NF4View {
  const uint8_t* packed;        // [ceil(numel / 2)], first value in the high nibble
  const float* absmax_f32;      // [nblocks] without double quant, else nullptr
  const uint8_t* absmax_u8;     // [nblocks] with double quant, else nullptr
  const float* nested_absmax;   // [ceil(nblocks / 256)] (double quant)
  const float* nested_code;     // [256] (double quant)
  float offset;                 // double-quant offset
  int64_t numel;
  int64_t blocksize;            // a multiple of 32 (32 .. 4096)
};

// absmax of blocks [b0, b0 + count) in fp32. Lives in its own translation unit,
// compiled for baseline x86-64, so `code * scale + offset` is never contracted
// into an FMA: the result is bit-identical to the two-op torch reference.
void decode_absmax(const NF4View& q, int64_t b0, int64_t count, float* out);

// Quantize numel values (f32 or bf16) into packed codes and fp32 absmax per block.
void nf4_quantize(const void* w, DType dtype, int64_t numel, int64_t blocksize, uint8_t* packed, float* absmax);

// Decode the contiguous elements [e0, e0 + count) of q into out (dtype). stream: use
// non-temporal stores (AVX-512 path) for outputs larger than the cache that are
// not read back soon (a full dequantize, not a GEMM panel).
void nf4_decode_run(const NF4View& q, int64_t e0, int64_t count, void* out, DType dtype, Isa isa, bool stream);
void nf4_decode_run_scalar(const NF4View& q, int64_t e0, int64_t count, void* out, DType dtype);
void nf4_decode_run_avx2(const NF4View& q, int64_t e0, int64_t count, void* out, DType dtype);
void nf4_decode_run_avx512(const NF4View& q, int64_t e0, int64_t count, void* out, DType dtype, bool stream);

// y[m, n] = sum_k x[m, k] W[n, k] + bias[n] + sum_j xas[m, j] B[n, j] for M <= 16, W = q [N, K].
// x: fp32 [M, K] contiguous (x_bf16: the same values in bf16 when the input was bf16; x may then be nullptr,
// and nf4_gemv converts x_bf16 when its path needs fp32); xas: fp32 [M, r] (already scaled) or nullptr; B: [N, r] in b_dtype;
// bias: [N] in bias_dtype or nullptr; y: [M, N] in y_dtype, row stride ldy.
struct GemvArgs {
  const float* x;
  int64_t M, N, K;
  const float* xas;
  const void* lora_B;
  DType b_dtype;
  int64_t r;
  const void* bias;
  DType bias_dtype;
  void* y;
  DType y_dtype;
  int64_t ldy;
  const uint16_t* x_bf16;  // x as bf16 [M, K] when the input is bf16 (else nullptr): the AVX512_BF16 path
};
constexpr int64_t kGemvMaxM = 16;
void nf4_gemv(const NF4View& q, const GemvArgs& a, Isa isa);
// The CPU has AVX512_BF16 (vdpbf16ps): bf16 x takes the bf16 dot-product GEMV kernels.
bool has_bf16_dot();
// Rows [n0, n1) of the GEMV into acc[(n - n0) * M + m] (fp32 dot products only), M <= 8; per ISA.
void nf4_gemv_rows_scalar(const NF4View& q, const GemvArgs& a, int64_t n0, int64_t n1, float* acc);
void nf4_gemv_rows_avx2(const NF4View& q, const GemvArgs& a, int64_t n0, int64_t n1, float* acc);
void nf4_gemv_rows_avx512(const NF4View& q, const GemvArgs& a, int64_t n0, int64_t n1, float* acc);

// ------------------------------------------------------------------ scalar conversions

inline float bits_to_f32(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}
inline uint32_t f32_to_bits(float f) {
  uint32_t b;
  std::memcpy(&b, &f, 4);
  return b;
}

// float -> bfloat16, round to nearest even; NaN -> 0x7FC0 (as torch's c10::BFloat16).
inline uint16_t f32_to_bf16(float f) {
  const uint32_t b = f32_to_bits(f);
  if ((b & 0x7FFFFFFFu) > 0x7F800000u) return 0x7FC0;
  return static_cast<uint16_t>((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
inline float bf16_to_f32(uint16_t h) { return bits_to_f32(static_cast<uint32_t>(h) << 16); }

// float -> IEEE half, round to nearest even, subnormals and overflow to inf handled.
inline uint16_t f32_to_f16(float f) {
  const uint32_t b = f32_to_bits(f);
  const uint16_t sign = static_cast<uint16_t>((b >> 16) & 0x8000u);
  const uint32_t ax = b & 0x7FFFFFFFu;
  if (ax >= 0x7F800000u) return sign | (ax > 0x7F800000u ? 0x7E00 : 0x7C00);
  if (ax >= 0x477FF000u) return sign | 0x7C00;  // >= 65520 rounds to inf
  if (ax < 0x38800000u) {                       // below 2^-14: a half subnormal, unit 2^-24
    const float scaled = bits_to_f32(ax) * 16777216.0f;  // exact (power of two)
    uint32_t i = static_cast<uint32_t>(scaled);
    const float frac = scaled - static_cast<float>(i);
    if (frac > 0.5f || (frac == 0.5f && (i & 1u))) ++i;
    return sign | static_cast<uint16_t>(i);
  }
  uint32_t h = (ax >> 13) - (112u << 10);
  const uint32_t rem = ax & 0x1FFFu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
  return sign | static_cast<uint16_t>(h);
}
inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 31u, m = h & 1023u;
  if (e == 31) return bits_to_f32(sign | 0x7F800000u | (m << 13));
  if (e == 0) {
    const float v = static_cast<float>(m) * (1.0f / 16777216.0f);
    return sign ? -v : v;
  }
  return bits_to_f32(sign | ((e + 112u) << 23) | (m << 13));
}

inline float load_as_f32(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::f32: return static_cast<const float*>(p)[i];
    case DType::bf16: return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
    default: return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  }
}
inline void store_from_f32(void* p, DType t, int64_t i, float v) {
  switch (t) {
    case DType::f32: static_cast<float*>(p)[i] = v; break;
    case DType::bf16: static_cast<uint16_t*>(p)[i] = f32_to_bf16(v); break;
    default: static_cast<uint16_t*>(p)[i] = f32_to_f16(v); break;
  }
}
inline int64_t dtype_size(DType t) { return t == DType::f32 ? 4 : 2; }

}  // namespace cpu
}  // namespace lorakern
