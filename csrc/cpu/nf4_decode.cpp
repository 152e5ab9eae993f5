// NF4 dequantize: scalar, AVX2 and AVX-512 paths, chosen at run time.
//
// Per absmax block the 16 possible outputs (code * absmax, rounded once to the
// output type) form a table; each 4-bit code is then a table lookup done with a
// register permute (AVX-512: vpermw / vpermps; AVX2: pshufb on split bytes, or
// two vpermps + blend). All paths store identical bits.
#include <immintrin.h>

#include "lorakern/cpu_nf4_walk.h"

namespace lorakern {
namespace cpu {

void nf4_decode_run_scalar(const NF4View& q, int64_t e0, int64_t count, void* out, DType t) {
  char* o = static_cast<char*>(out);
  const int64_t sz = dtype_size(t);
  BlockWalker walk(q, e0, count);
  int64_t e, n, done;
  float a;
  while (walk.next(e, n, a, done)) decode_scalar_piece(q.packed, e, n, a, o + done * sz, t);
}

// ------------------------------------------------------------------------- AVX-512

#define LK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

// 16 packed bytes -> the 32 codes in element order (high nibble first), as bytes.
LK_AVX512 static inline void unpack_codes_512(const uint8_t* p, __m128i& i0, __m128i& i1) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(15);
  i0 = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
  i1 = _mm_unpackhi_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}

// 16 fp32 table entries -> 16 bf16 / f16 (round to nearest even) in the low 256 bits.
LK_AVX512 static inline __m512i table16_512(__m512 t, DType dt) {
  if (dt == DType::f16) return _mm512_zextsi256_si512(_mm512_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  const __m512i bits = _mm512_castps_si512(t);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(t, t, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_zextsi256_si512(_mm512_cvtepi32_epi16(r));
}

LK_AVX512 void nf4_decode_run_avx512(const NF4View& q, int64_t e0, int64_t count, void* out, DType t, bool stream) {
  const __m512 code_v = nf4_code_ps512();
  char* o = static_cast<char*>(out);
  const int64_t sz = dtype_size(t);
  BlockWalker walk(q, e0, count);
  int64_t e, n, done;
  float a;
  while (walk.next(e, n, a, done)) {
    const PieceSplit s = split_piece(e, n);
    char* dst = o + done * sz;
    if (s.head) decode_scalar_piece(q.packed, e, s.head, a, dst, t);
    const uint8_t* p = q.packed + (e + s.head) / 2;
    const __m512 table = _mm512_mul_ps(code_v, _mm512_set1_ps(a));
    if (t == DType::f32) {
      float* d = reinterpret_cast<float*>(dst) + s.head;
      for (int64_t g = 0; g < s.groups; ++g, p += 16, d += 32) {
        __m128i i0, i1;
        unpack_codes_512(p, i0, i1);
        const __m512 v0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(i0), table);
        const __m512 v1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(i1), table);
        if (stream && (reinterpret_cast<uintptr_t>(d) & 63) == 0) {
          _mm512_stream_ps(d, v0);
          _mm512_stream_ps(d + 16, v1);
        } else {
          _mm512_storeu_ps(d, v0);
          _mm512_storeu_ps(d + 16, v1);
        }
      }
    } else {
      const __m512i table16 = table16_512(table, t);
      uint16_t* d = reinterpret_cast<uint16_t*>(dst) + s.head;
      for (int64_t g = 0; g < s.groups; ++g, p += 16, d += 32) {
        __m128i i0, i1;
        unpack_codes_512(p, i0, i1);
        const __m512i idx = _mm512_cvtepu8_epi16(_mm256_set_m128i(i1, i0));
        const __m512i v = _mm512_permutexvar_epi16(idx, table16);
        if (stream && (reinterpret_cast<uintptr_t>(d) & 63) == 0) {
          _mm512_stream_si512(reinterpret_cast<__m512i*>(d), v);
        } else {
          _mm512_storeu_si512(d, v);
        }
      }
    }
    if (s.tail) decode_scalar_piece(q.packed, e + n - s.tail, s.tail, a, dst + (n - s.tail) * sz, t);
  }
  if (stream) _mm_sfence();
}

// ---------------------------------------------------------------------------- AVX2

#define LK_AVX2 __attribute__((target("avx2,fma,f16c")))

LK_AVX2 static inline void unpack_codes_256(const uint8_t* p, __m128i& i0, __m128i& i1) {
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m128i m = _mm_set1_epi8(15);
  i0 = _mm_unpacklo_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
  i1 = _mm_unpackhi_epi8(_mm_and_si128(_mm_srli_epi16(b, 4), m), _mm_and_si128(b, m));
}

// 8 codes (low 8 bytes) -> 8 fp32 table values: two 8-entry permutes, blended on bit 3.
LK_AVX2 static inline __m256 lookup8_ps(__m128i codes8, __m256 t_lo, __m256 t_hi) {
  const __m256i idx = _mm256_cvtepu8_epi32(codes8);
  const __m256 a = _mm256_permutevar8x32_ps(t_lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(t_hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

// 8 fp32 -> 8 bf16 / f16 (round to nearest even).
LK_AVX2 static inline __m128i round8(__m256 t, DType dt) {
  if (dt == DType::f16) return _mm256_cvtps_ph(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256i bits = _mm256_castps_si256(t);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(t, t, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

LK_AVX2 void nf4_decode_run_avx2(const NF4View& q, int64_t e0, int64_t count, void* out, DType t) {
  alignas(32) float code[16];
  for (int i = 0; i < 16; ++i) code[i] = nf4_code(i);
  const __m256 code_lo = _mm256_load_ps(code), code_hi = _mm256_load_ps(code + 8);
  // Gathers the low bytes of 8 16-bit values into bytes 0-7 and the high bytes into 8-15.
  const __m128i even_odd = _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  char* o = static_cast<char*>(out);
  const int64_t sz = dtype_size(t);
  BlockWalker walk(q, e0, count);
  int64_t e, n, done;
  float a;
  while (walk.next(e, n, a, done)) {
    const PieceSplit s = split_piece(e, n);
    char* dst = o + done * sz;
    if (s.head) decode_scalar_piece(q.packed, e, s.head, a, dst, t);
    const uint8_t* p = q.packed + (e + s.head) / 2;
    const __m256 av = _mm256_set1_ps(a);
    const __m256 t_lo = _mm256_mul_ps(code_lo, av), t_hi = _mm256_mul_ps(code_hi, av);
    if (t == DType::f32) {
      float* d = reinterpret_cast<float*>(dst) + s.head;
      for (int64_t g = 0; g < s.groups; ++g, p += 16, d += 32) {
        __m128i i0, i1;
        unpack_codes_256(p, i0, i1);
        _mm256_storeu_ps(d, lookup8_ps(i0, t_lo, t_hi));
        _mm256_storeu_ps(d + 8, lookup8_ps(_mm_srli_si128(i0, 8), t_lo, t_hi));
        _mm256_storeu_ps(d + 16, lookup8_ps(i1, t_lo, t_hi));
        _mm256_storeu_ps(d + 24, lookup8_ps(_mm_srli_si128(i1, 8), t_lo, t_hi));
      }
    } else {
      const __m128i a0 = _mm_shuffle_epi8(round8(t_lo, t), even_odd);
      const __m128i a1 = _mm_shuffle_epi8(round8(t_hi, t), even_odd);
      const __m128i tab_lo = _mm_unpacklo_epi64(a0, a1), tab_hi = _mm_unpackhi_epi64(a0, a1);
      __m128i* d = reinterpret_cast<__m128i*>(reinterpret_cast<uint16_t*>(dst) + s.head);
      for (int64_t g = 0; g < s.groups; ++g, p += 16, d += 4) {
        __m128i i0, i1;
        unpack_codes_256(p, i0, i1);
        const __m128i l0 = _mm_shuffle_epi8(tab_lo, i0), h0 = _mm_shuffle_epi8(tab_hi, i0);
        const __m128i l1 = _mm_shuffle_epi8(tab_lo, i1), h1 = _mm_shuffle_epi8(tab_hi, i1);
        _mm_storeu_si128(d, _mm_unpacklo_epi8(l0, h0));
        _mm_storeu_si128(d + 1, _mm_unpackhi_epi8(l0, h0));
        _mm_storeu_si128(d + 2, _mm_unpacklo_epi8(l1, h1));
        _mm_storeu_si128(d + 3, _mm_unpackhi_epi8(l1, h1));
      }
    }
    if (s.tail) decode_scalar_piece(q.packed, e + n - s.tail, s.tail, a, dst + (n - s.tail) * sz, t);
  }
}

void nf4_decode_run(const NF4View& q, int64_t e0, int64_t count, void* out, DType t, Isa isa, bool stream) {
  switch (isa) {
    case Isa::avx512: return nf4_decode_run_avx512(q, e0, count, out, t, stream);
    case Isa::avx2: return nf4_decode_run_avx2(q, e0, count, out, t);
    default: return nf4_decode_run_scalar(q, e0, count, out, t);
  }
}

}  // namespace cpu
}  // namespace lorakern
