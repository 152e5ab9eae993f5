// Fused NF4 GEMV for small M (decode, M <= 16): y = x W^T + bias + xas B^T.
//
// Each thread owns a range of output features n; for each row of W it streams
// the packed codes once, decodes 32 weights at a time into registers (the same
// per-block table lookup as nf4_decode.cpp) and accumulates all M dot products
// in fp32 registers, so W is read exactly once whatever M is. The LoRA term
// (xas [M, r] times row n of B) and the bias are added in the same pass. M = 1
// with blocksize 64 (decode) has its own kernel; see "M = 1, blocksize 64" below.
#include <immintrin.h>

#include <array>
#include <cmath>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <utility>
#include <vector>

#include "lorakern/cpu_nf4_walk.h"

namespace lorakern {
namespace cpu {

namespace {

// acc[m] += sum over elements [e, e + n) of row `row` of x[m, k] * w_k, one element at a time.
inline void accumulate_scalar(const NF4View& q, const GemvArgs& g, int64_t row, int64_t e, int64_t n, float absmax,
                              float* acc) {
  float table[16];
  scaled_table(absmax, DType::f32, table);
  const int64_t k0 = e - row * g.K;
  for (int64_t i = 0; i < n; ++i) {
    const float w = table[nf4_nibble(q.packed, e + i)];
    for (int64_t m = 0; m < g.M; ++m) acc[m] += g.x[m * g.K + k0 + i] * w;
  }
}

// Columns of x per pass: the MT rows of an x chunk (MT * kc * 4 bytes <= 24 KiB)
// stay in L1 while the 16 W rows of a thread's chunk stream past them, instead of
// MT * K * 4 bytes (128 KiB at M = 8, K = 4096) cycling through L2 for each W row.
inline int64_t k_chunk(int mt, int64_t K) {
  const int64_t kc = (int64_t{6144} / mt) & ~int64_t{255};
  return mt <= 2 || kc >= K ? K : std::max<int64_t>(256, kc);
}

}  // namespace

void nf4_gemv_rows_scalar(const NF4View& q, const GemvArgs& g, int64_t n0, int64_t n1, float* acc) {
  for (int64_t row = n0; row < n1; ++row) {
    float* a = acc + (row - n0) * g.M;
    for (int64_t m = 0; m < g.M; ++m) a[m] = 0.0f;
    BlockWalker walk(q, row * g.K, g.K);
    int64_t e, n, done;
    float am;
    while (walk.next(e, n, am, done)) accumulate_scalar(q, g, row, e, n, am, a);
  }
}

// ------------------------------------------------------------------------- AVX-512

#define LK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx2,fma,f16c")))

// MT rows of x at once. Two accumulator chains per row while MT <= 4 hide the
// FMA latency (M = 1 would otherwise be latency bound at 4 cycles per 16 weights).
template <int MT>
LK_AVX512 void gemv_rows_512(const NF4View& q, const GemvArgs& g, int64_t n0, int64_t n1, float* acc) {
  constexpr int NA = MT <= 4 ? 2 : 1;
  const __m512 code_v = nf4_code_ps512();
  const __m128i low4 = _mm_set1_epi8(15);
  for (int64_t i = 0; i < (n1 - n0) * MT; ++i) acc[i] = 0.0f;
  const int64_t kc = k_chunk(MT, g.K);
  for (int64_t k0 = 0; k0 < g.K; k0 += kc)
  for (int64_t row = n0; row < n1; ++row) {
    __m512 s[MT][NA];
    for (int m = 0; m < MT; ++m)
      for (int j = 0; j < NA; ++j) s[m][j] = _mm512_setzero_ps();
    float* out = acc + (row - n0) * MT;
    BlockWalker walk(q, row * g.K + k0, std::min(kc, g.K - k0));
    int64_t e, n, done;
    float am;
    while (walk.next(e, n, am, done)) {
      const PieceSplit sp = split_piece(e, n);
      if (sp.head) accumulate_scalar(q, g, row, e, sp.head, am, out);
      const __m512 table = _mm512_mul_ps(code_v, _mm512_set1_ps(am));
      const uint8_t* p = q.packed + (e + sp.head) / 2;
      const float* xk = g.x + (e + sp.head - row * g.K);
      for (int64_t gi = 0; gi < sp.groups; ++gi, p += 16, xk += 32) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4), lo = _mm_and_si128(b, low4);
        const __m512 w0 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpacklo_epi8(hi, lo)), table);
        const __m512 w1 = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(_mm_unpackhi_epi8(hi, lo)), table);
        for (int m = 0; m < MT; ++m) {
          s[m][0] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xk + m * g.K), s[m][0]);
          s[m][NA - 1] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xk + m * g.K + 16), s[m][NA - 1]);
        }
      }
      if (sp.tail) accumulate_scalar(q, g, row, e + n - sp.tail, sp.tail, am, out);
    }
    for (int m = 0; m < MT; ++m) {
      __m512 t = s[m][0];
      if (NA > 1) t = _mm512_add_ps(t, s[m][NA - 1]);
      out[m] += _mm512_reduce_add_ps(t);
    }
  }
}

// bf16 x on CPUs with AVX512_BF16: the weights decode straight to bf16 (one vpermw
// per 32, the same rounded values nf4_dequantize(q, bf16) gives) and vdpbf16ps
// multiplies pairs exactly and accumulates in fp32: half the FMAs and half the x
// bytes of the fp32 path, which is the same math torch's bf16 GEMM does.
#define LK_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))

template <int MT>
LK_AVX512BF16 void gemv_rows_512bf16(const NF4View& q, const GemvArgs& g, int64_t n0, int64_t n1, float* acc) {
  constexpr int NA = MT <= 4 ? 2 : 1;
  const __m512 code_v = nf4_code_ps512();
  const __m128i low4 = _mm_set1_epi8(15);
  const uint16_t* xb = g.x_bf16;
  for (int64_t i = 0; i < (n1 - n0) * MT; ++i) acc[i] = 0.0f;
  for (int64_t row = n0; row < n1; ++row) {
    __m512 s[MT][NA];
    for (int m = 0; m < MT; ++m)
      for (int j = 0; j < NA; ++j) s[m][j] = _mm512_setzero_ps();
    float* out = acc + (row - n0) * MT;
    BlockWalker walk(q, row * g.K, g.K);
    int64_t e, n, done;
    float am;
    int flip = 0;
    while (walk.next(e, n, am, done)) {
      const PieceSplit sp = split_piece(e, n);
      if (sp.head) accumulate_scalar(q, g, row, e, sp.head, am, out);
      const __m512 table = _mm512_mul_ps(code_v, _mm512_set1_ps(am));
      const __m512i bits = _mm512_castps_si512(table);
      const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
      const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
      const __m512i table16 = _mm512_zextsi256_si512(_mm512_cvtepi32_epi16(rounded));
      const uint8_t* p = q.packed + (e + sp.head) / 2;
      const uint16_t* xk = xb + (e + sp.head - row * g.K);
      for (int64_t gi = 0; gi < sp.groups; ++gi, p += 16, xk += 32, flip ^= 1) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4), lo = _mm_and_si128(b, low4);
        const __m512i idx = _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_unpackhi_epi8(hi, lo), _mm_unpacklo_epi8(hi, lo)));
        const __m512bh w = (__m512bh)_mm512_permutexvar_epi16(idx, table16);
        const int j = NA > 1 ? flip : 0;
        for (int m = 0; m < MT; ++m)
          s[m][j] = _mm512_dpbf16_ps(s[m][j], w, (__m512bh)_mm512_loadu_si512(xk + m * g.K));
      }
      if (sp.tail) accumulate_scalar(q, g, row, e + n - sp.tail, sp.tail, am, out);
    }
    for (int m = 0; m < MT; ++m) {
      __m512 t = s[m][0];
      if (NA > 1) t = _mm512_add_ps(t, s[m][NA - 1]);
      out[m] += _mm512_reduce_add_ps(t);
    }
  }
}

// ---------------------------------------------------------------------------- AVX2

#define LK_AVX2 __attribute__((target("avx2,fma,f16c")))

LK_AVX2 static inline __m256 lookup8(__m128i codes8, __m256 t_lo, __m256 t_hi) {
  const __m256i idx = _mm256_cvtepu8_epi32(codes8);
  const __m256 a = _mm256_permutevar8x32_ps(t_lo, idx);
  const __m256 b = _mm256_permutevar8x32_ps(t_hi, idx);
  return _mm256_blendv_ps(a, b, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

template <int MT>
LK_AVX2 void gemv_rows_256(const NF4View& q, const GemvArgs& g, int64_t n0, int64_t n1, float* acc) {
  constexpr int NA = MT <= 4 ? 2 : 1;
  alignas(32) float code[16];
  for (int i = 0; i < 16; ++i) code[i] = nf4_code(i);
  const __m256 code_lo = _mm256_load_ps(code), code_hi = _mm256_load_ps(code + 8);
  const __m128i low4 = _mm_set1_epi8(15);
  for (int64_t i = 0; i < (n1 - n0) * MT; ++i) acc[i] = 0.0f;
  const int64_t kc = k_chunk(MT, g.K);
  for (int64_t k0 = 0; k0 < g.K; k0 += kc)
  for (int64_t row = n0; row < n1; ++row) {
    __m256 s[MT][NA];
    for (int m = 0; m < MT; ++m)
      for (int j = 0; j < NA; ++j) s[m][j] = _mm256_setzero_ps();
    float* out = acc + (row - n0) * MT;
    BlockWalker walk(q, row * g.K + k0, std::min(kc, g.K - k0));
    int64_t e, n, done;
    float am;
    while (walk.next(e, n, am, done)) {
      const PieceSplit sp = split_piece(e, n);
      if (sp.head) accumulate_scalar(q, g, row, e, sp.head, am, out);
      const __m256 av = _mm256_set1_ps(am);
      const __m256 t_lo = _mm256_mul_ps(code_lo, av), t_hi = _mm256_mul_ps(code_hi, av);
      const uint8_t* p = q.packed + (e + sp.head) / 2;
      const float* xk = g.x + (e + sp.head - row * g.K);
      for (int64_t gi = 0; gi < sp.groups; ++gi, p += 16, xk += 32) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
        const __m128i hi = _mm_and_si128(_mm_srli_epi16(b, 4), low4), lo = _mm_and_si128(b, low4);
        const __m128i i0 = _mm_unpacklo_epi8(hi, lo), i1 = _mm_unpackhi_epi8(hi, lo);
        const __m256 w[4] = {lookup8(i0, t_lo, t_hi), lookup8(_mm_srli_si128(i0, 8), t_lo, t_hi),
                             lookup8(i1, t_lo, t_hi), lookup8(_mm_srli_si128(i1, 8), t_lo, t_hi)};
        for (int m = 0; m < MT; ++m)
          for (int j = 0; j < 4; ++j)
            s[m][j % NA] = _mm256_fmadd_ps(w[j], _mm256_loadu_ps(xk + m * g.K + 8 * j), s[m][j % NA]);
      }
      if (sp.tail) accumulate_scalar(q, g, row, e + n - sp.tail, sp.tail, am, out);
    }
    for (int m = 0; m < MT; ++m) {
      __m256 t = s[m][0];
      if (NA > 1) t = _mm256_add_ps(t, s[m][NA - 1]);
      const __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
      const __m128 h2 = _mm_add_ps(h, _mm_movehl_ps(h, h));
      out[m] += _mm_cvtss_f32(_mm_add_ss(h2, _mm_shuffle_ps(h2, h2, 1)));
    }
  }
}

// ------------------------------------------------------------ M = 1, blocksize 64

// Decode (M = 1, blocksize 64, K a multiple of 64; one row of x, the shape of
// token-by-token generation). Each 64-element group of a W row is one absmax block
// and 32 packed bytes. The general kernels spend most of their time putting the
// nibbles back into k order (shift, mask, two unpacks, two widenings per 32) and
// walking blocks (a call, a division and scalar head/tail checks per 64). Here x
// is permuted instead, once per call, into the order the nibbles come out of a
// plain widening: byte i of a group holds elements 2i (high nibble) and 2i + 1
// (low nibble), so the low nibbles meet x[1], x[3], ... and the high nibbles
// x[0], x[2], ... The sum is the same, in another order. The absmax of a chunk's
// blocks is decoded into a buffer up front, and two rows of W share each load of x
// (four rows measured no faster). Each step prefetches the matching line of the next
// rows: weights larger than the cache (14336 x 4096: 29 MiB) ran at half speed
// without (3.9 -> 2.0 ms bf16), the hardware prefetcher starting over on every
// short row. One Zen 4 core, general kernel -> this one (bitsandbytes 0.50.2's
// AVX512_BF16 kernel on its repacked weight, measured in the same process): 4096 x
// 4096 bf16 1.47 -> 0.47 ms (0.47), fp32 1.48 -> 0.68 ms; 14336 x 4096 bf16 5.6 ->
// 1.66 ms (1.67), fp32 5.6 -> 2.5 ms; 1536 x 576 bf16 0.11 -> 0.041 ms (0.051). bf16
// x uses bf16 dot products (the general path used fp32 FMAs at M = 1); fp32 x keeps
// fp32 weights and FMAs (bitsandbytes rounds fp32 x to bf16 and runs its bf16 kernel).
namespace {

constexpr int64_t kFastGroup = 64;

bool fast_m1(const NF4View& q, const GemvArgs& g, Isa isa) {
  return isa == Isa::avx512 && g.M == 1 && q.blocksize == kFastGroup && g.K % kFastGroup == 0;
}

// The nested code as four byte planes (plane j: byte j of each of the 256 floats), for
// decode_absmax_vbmi.
struct NestedPlanes {
  alignas(64) uint8_t b[4][256];
};

#define LK_AVX512VBMI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi")))

// Double-quant absmax of blocks [b0, b0 + count) into out, bit for bit as
// decode_absmax (the explicitly rounded multiply and add are never contracted into an
// FMA). The per-block lookup nested_code[u] is the cost: the scalar loop, or a
// 16-wide gather, took about a cycle per block, 0.075-0.09 of 0.54 ms at 4096 x 4096
// bf16 on a Zen 4 core; this takes no measurable time there. 64 blocks per step: each
// byte of nested_code[u] comes from two vpermi2b (128 entries each) and a blend on
// bit 7 of u, then the four byte planes are interleaved back into floats. The
// interleave (unpacks within 128-bit lanes) scatters blocks; one vpermb of the
// indices first puts them where the unpacks bring them back in order.
LK_AVX512VBMI void decode_absmax_vbmi(const NF4View& q, const NestedPlanes& np, int64_t b0, int64_t count, float* out) {
  __m512i plane[4][4];
  for (int j = 0; j < 4; ++j)
    for (int h = 0; h < 4; ++h) plane[j][h] = _mm512_load_si512(np.b[j] + 64 * h);
  // Byte 16L + 4k + i (128-bit lane L, i < 4) of the unpacked results is block 16k + 4L + i.
  alignas(64) uint8_t order[64];
  for (int L = 0; L < 4; ++L)
    for (int k = 0; k < 4; ++k)
      for (int i = 0; i < 4; ++i) order[16 * L + 4 * k + i] = static_cast<uint8_t>(16 * k + 4 * L + i);
  const __m512i order_v = _mm512_load_si512(order);
  const __m512 offset = _mm512_set1_ps(q.offset);
  constexpr int kRne = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  for (int64_t i = 0; i < count;) {
    const int64_t b = b0 + i, n = std::min(count - i, ((b >> 8) + 1) * 256 - b);
    const __m512 nested = _mm512_set1_ps(q.nested_absmax[b >> 8]);
    for (int64_t j = 0; j < n; j += 64) {
      const __mmask64 m = n - j >= 64 ? ~__mmask64{0} : (__mmask64{1} << (n - j)) - 1;
      const __m512i u = _mm512_permutexvar_epi8(order_v, _mm512_maskz_loadu_epi8(m, q.absmax_u8 + b + j));
      const __mmask64 hi = _mm512_movepi8_mask(u);
      __m512i by[4];
      for (int p = 0; p < 4; ++p)
        by[p] = _mm512_mask_blend_epi8(hi, _mm512_permutex2var_epi8(plane[p][0], u, plane[p][1]),
                                       _mm512_permutex2var_epi8(plane[p][2], u, plane[p][3]));
      const __m512i lo01 = _mm512_unpacklo_epi8(by[0], by[1]), hi01 = _mm512_unpackhi_epi8(by[0], by[1]);
      const __m512i lo23 = _mm512_unpacklo_epi8(by[2], by[3]), hi23 = _mm512_unpackhi_epi8(by[2], by[3]);
      const __m512i d[4] = {_mm512_unpacklo_epi16(lo01, lo23), _mm512_unpackhi_epi16(lo01, lo23),
                            _mm512_unpacklo_epi16(hi01, hi23), _mm512_unpackhi_epi16(hi01, hi23)};
      for (int k = 0; k < 4; ++k) {
        const __mmask16 mk = static_cast<__mmask16>(m >> (16 * k));
        const __m512 a = _mm512_add_round_ps(_mm512_mul_round_ps(_mm512_castsi512_ps(d[k]), nested, kRne), offset, kRne);
        _mm512_mask_storeu_ps(out + i + j + 16 * k, mk, a);
      }
    }
    i += n;
  }
}

// fp32: per group, [x[2i + 1]]_{i < 16}, [x[2i]]_{i < 16}, then the same for the
// second 32 elements (one 16-byte widening to 16 lanes per half).
void permute_x_f32(const float* x, int64_t K, float* xp) {
  for (int64_t h = 0; h < K; h += 32, x += 32, xp += 32)
    for (int i = 0; i < 16; ++i) {
      xp[i] = x[2 * i + 1];
      xp[16 + i] = x[2 * i];
    }
}

// bf16: per group, [x[2i + 1]]_{i < 32}, then [x[2i]]_{i < 32} (one 32-byte widening to 32 words).
void permute_x_bf16(const uint16_t* x, int64_t K, uint16_t* xp) {
  for (int64_t h = 0; h < K; h += 64, x += 64, xp += 64)
    for (int i = 0; i < 32; ++i) {
      xp[i] = x[2 * i + 1];
      xp[32 + i] = x[2 * i];
    }
}

template <int R, int MT>
LK_AVX512 inline void zero_sums(__m512 (&s)[R][MT]) {
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) s[r][m] = _mm512_setzero_ps();
}

template <int R, int MT>
LK_AVX512 inline void add_sums(const __m512 (&s)[R][MT], float* out) {
  for (int r = 0; r < R; ++r)
    for (int m = 0; m < MT; ++m) out[r * MT + m] += _mm512_reduce_add_ps(s[r][m]);
}

// R rows of W into out[0, R): packed bytes p (row stride K / 2), absmax am (row
// stride K / 64). fp32 weights code * absmax as the general path; four accumulator
// chains per row against the 4-cycle FMA latency.
template <int R>
LK_AVX512 void rows_m1_f32(const float* xp, int64_t K, const uint8_t* p, const float* am, float* out) {
  const __m512 code_v = nf4_code_ps512();
  const int64_t G = K / kFastGroup;
  __m512 s[R][4];
  zero_sums<R, 4>(s);
  // The next R rows, one line per step (R * 32 bytes), K / 2 * R bytes ahead (see rows_m1).
  const char* pf = reinterpret_cast<const char*>(p) + R * K / 2;
  for (int64_t gi = 0; gi < G; ++gi, xp += kFastGroup, p += kFastGroup / 2, pf += R * kFastGroup / 2) {
    _mm_prefetch(pf, _MM_HINT_T0);
    __m512 x0 = _mm512_loadu_ps(xp), x1 = _mm512_loadu_ps(xp + 16);
    __m512 x2 = _mm512_loadu_ps(xp + 32), x3 = _mm512_loadu_ps(xp + 48);
    // One load of x for all R rows (left alone, the compiler folds a load into every FMA).
    asm("" : "+v"(x0), "+v"(x1), "+v"(x2), "+v"(x3));
    for (int r = 0; r < R; ++r) {
      const uint8_t* pr = p + r * K / 2;
      const __m512 t = _mm512_mul_ps(code_v, _mm512_set1_ps(am[r * G + gi]));
      // vpermps reads the low 4 bits of each lane: the low nibble, no mask needed.
      const __m512i d0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pr)));
      const __m512i d1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pr + 16)));
      s[r][0] = _mm512_fmadd_ps(_mm512_permutexvar_ps(d0, t), x0, s[r][0]);
      s[r][1] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(d0, 4), t), x1, s[r][1]);
      s[r][2] = _mm512_fmadd_ps(_mm512_permutexvar_ps(d1, t), x2, s[r][2]);
      s[r][3] = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(d1, 4), t), x3, s[r][3]);
    }
  }
  for (int r = 0; r < R; ++r)
    out[r] = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s[r][0], s[r][1]), _mm512_add_ps(s[r][2], s[r][3])));
}

// R rows of W, bf16 x (same arguments as rows_m1_f32): weights rounded to bf16 as
// nf4_dequantize(q, bf16) rounds them, exact pair products and fp32 sums (vdpbf16ps).
// The table is bf16(code * absmax) twice over in 32 words (vpermw reads 5 index bits,
// and bit 4 of an unmasked low nibble is the neighbouring nibble's), rounded to
// nearest even by vcvtne2ps2bf16. Like vdpbf16ps, which counts denormal inputs as
// zero (as the M >= 4 path does), it flushes weights below 2^-126 (absmax < 1.5e-37).
template <int R>
LK_AVX512BF16 void rows_m1_bf16(const uint16_t* xp, int64_t K, const uint8_t* p, const float* am, float* out) {
  const __m512 code_v = nf4_code_ps512();
  const int64_t G = K / kFastGroup;
  __m512 s[R][2];
  zero_sums<R, 2>(s);
  const char* pf = reinterpret_cast<const char*>(p) + R * K / 2;
  for (int64_t gi = 0; gi < G; ++gi, xp += kFastGroup, p += kFastGroup / 2, pf += R * kFastGroup / 2) {
    _mm_prefetch(pf, _MM_HINT_T0);
    const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xp), x1 = (__m512bh)_mm512_loadu_si512(xp + 32);
    for (int r = 0; r < R; ++r) {
      const __m512 t = _mm512_mul_ps(code_v, _mm512_set1_ps(am[r * G + gi]));
      const __m512i t16 = (__m512i)_mm512_cvtne2ps_pbh(t, t);
      const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + r * K / 2)));
      s[r][0] = _mm512_dpbf16_ps(s[r][0], (__m512bh)_mm512_permutexvar_epi16(w, t16), x0);
      s[r][1] = _mm512_dpbf16_ps(s[r][1], (__m512bh)_mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), t16), x1);
    }
  }
  for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(_mm512_add_ps(s[r][0], s[r][1]));
}

// A per-thread scratch buffer of at least n floats.
float* scratch_floats(int64_t n) {
  thread_local std::unique_ptr<float[]> buf;
  thread_local int64_t cap = 0;
  if (cap < n) {
    buf.reset(new float[n]);
    cap = n;
  }
  return buf.get();
}

// ------------------------------------------------------------ 2 <= M <= 16 rows of x, blocksize 64
//
// Batched decode (a few sequences generated together) and small-batch serving. The
// general AVX-512 kernels decode every 32 weights through nibble unpacking, a block
// walker and fp32 FMAs below M = 4, which made M = 2 take 2.1 ms at 4096 x 4096 bf16 on
// one Zen 4 core (bitsandbytes' Linear4bit: 0.67 ms), and fp32 M = 16 11.1 ms. These are
// the M = 1 kernels with MT rows of x: every row of x permuted once per call, absmax
// decoded up front, the weights of R rows of W decoded once per 64 into registers (bf16
// for bf16 x on AVX512_BF16 CPUs, fp32 otherwise, as at M = 1) and multiplied into
// R * MT accumulators (16 at R = 2, MT = 8), so the decode is shared by MT rows and
// each load of x by R rows of W. Passes of at most 8 rows of x over the chunk's W
// rows; k in chunks that keep the pass's x (<= 24 KiB) in L1.

// Group gi's bytes of the next R rows of W (the hardware prefetcher restarts on every short row).
template <int R>
inline void prefetch_next_rows(const uint8_t* p, int64_t row_bytes, int64_t gi) {
  for (int r = 0; r < R; ++r) _mm_prefetch(reinterpret_cast<const char*>(p + (R + r) * row_bytes + gi * 32), _MM_HINT_T0);
}

// out[r * MT + m] += sum over groups [0, gn) of row r of W (packed p, row stride K / 2;
// absmax am, row stride G) times row m of permuted x (xp, row stride K).
template <int R, int MT>
LK_AVX512BF16 void rows_mt_bf16(const uint16_t* xp, int64_t K, int64_t gn, const uint8_t* p, const float* am,
                                int64_t G, float* out) {
  const __m512 code_v = nf4_code_ps512();
  __m512 s[R][MT];
  zero_sums<R, MT>(s);
  const int64_t row_bytes = K / 2;
  for (int64_t gi = 0; gi < gn; ++gi) {
    prefetch_next_rows<R>(p, row_bytes, gi);
    __m512i wl[R], wh[R];
    for (int r = 0; r < R; ++r) {
      const __m512 t = _mm512_mul_ps(code_v, _mm512_set1_ps(am[r * G + gi]));
      const __m512i t16 = (__m512i)_mm512_cvtne2ps_pbh(t, t);
      const __m512i w = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + r * row_bytes + gi * 32)));
      wl[r] = _mm512_permutexvar_epi16(w, t16);
      wh[r] = _mm512_permutexvar_epi16(_mm512_srli_epi16(w, 4), t16);
    }
    for (int m = 0; m < MT; ++m) {
      const __m512bh x0 = (__m512bh)_mm512_loadu_si512(xp + m * K + gi * kFastGroup);
      const __m512bh x1 = (__m512bh)_mm512_loadu_si512(xp + m * K + gi * kFastGroup + 32);
      for (int r = 0; r < R; ++r) {
        s[r][m] = _mm512_dpbf16_ps(s[r][m], (__m512bh)wl[r], x0);
        s[r][m] = _mm512_dpbf16_ps(s[r][m], (__m512bh)wh[r], x1);
      }
    }
  }
  add_sums<R, MT>(s, out);
}

// The same with fp32 x (rows_m1_f32's decode: fp32 weights code * absmax, FMAs).
template <int R, int MT>
LK_AVX512 void rows_mt_f32(const float* xp, int64_t K, int64_t gn, const uint8_t* p, const float* am, int64_t G,
                           float* out) {
  const __m512 code_v = nf4_code_ps512();
  __m512 s[R][MT];
  zero_sums<R, MT>(s);
  const int64_t row_bytes = K / 2;
  for (int64_t gi = 0; gi < gn; ++gi) {
    prefetch_next_rows<R>(p, row_bytes, gi);
    __m512 w[R][4];
    for (int r = 0; r < R; ++r) {
      const __m512 t = _mm512_mul_ps(code_v, _mm512_set1_ps(am[r * G + gi]));
      const uint8_t* pr = p + r * row_bytes + gi * 32;
      const __m512i d0 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pr)));
      const __m512i d1 = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(pr + 16)));
      w[r][0] = _mm512_permutexvar_ps(d0, t);
      w[r][1] = _mm512_permutexvar_ps(_mm512_srli_epi32(d0, 4), t);
      w[r][2] = _mm512_permutexvar_ps(d1, t);
      w[r][3] = _mm512_permutexvar_ps(_mm512_srli_epi32(d1, 4), t);
    }
    for (int m = 0; m < MT; ++m)
      for (int j = 0; j < 4; ++j) {
        const __m512 x = _mm512_loadu_ps(xp + m * K + gi * kFastGroup + 16 * j);
        for (int r = 0; r < R; ++r) s[r][m] = _mm512_fmadd_ps(w[r][j], x, s[r][m]);
      }
  }
  add_sums<R, MT>(s, out);
}

template <typename T>
using MtFn = void (*)(const T*, int64_t, int64_t, const uint8_t*, const float*, int64_t, float*);
template <int R, std::size_t... I>
constexpr std::array<MtFn<uint16_t>, sizeof...(I)> table_mt_bf16(std::index_sequence<I...>) {
  return {&rows_mt_bf16<R, static_cast<int>(I) + 1>...};
}
template <int R, std::size_t... I>
constexpr std::array<MtFn<float>, sizeof...(I)> table_mt_f32(std::index_sequence<I...>) {
  return {&rows_mt_f32<R, static_cast<int>(I) + 1>...};
}
constexpr auto kMtBf16 = std::array{table_mt_bf16<1>(std::make_index_sequence<8>()),
                                    table_mt_bf16<2>(std::make_index_sequence<8>())};
constexpr auto kMtF32 = std::array{table_mt_f32<1>(std::make_index_sequence<8>()),
                                   table_mt_f32<2>(std::make_index_sequence<8>())};

bool fast_mt(const NF4View& q, const GemvArgs& g, Isa isa) {
  return isa == Isa::avx512 && g.M >= 2 && q.blocksize == kFastGroup && g.K % kFastGroup == 0;
}

// One pass (mt rows of permuted x, T = uint16_t bf16 or float) over rows [n0, n1) into part.
template <typename T>
void pass_mt(const std::array<std::array<MtFn<T>, 8>, 2>& fns, const NF4View& q, int64_t K, const T* xp, int mt,
             const float* am, int64_t n0, int64_t n1, float* part) {
  const int64_t G = K / kFastGroup;
  const int64_t kc = std::max<int64_t>(kFastGroup, 24576 / (mt * static_cast<int64_t>(sizeof(T))) / kFastGroup * kFastGroup);
  for (int64_t k0 = 0; k0 < K; k0 += kc) {
    const int64_t g0 = k0 / kFastGroup, gn = std::min(kc, K - k0) / kFastGroup;
    int64_t row = n0;
    for (; row + 2 <= n1; row += 2)
      fns[1][mt - 1](xp + k0, K, gn, q.packed + row * K / 2 + g0 * 32, am + (row - n0) * G + g0, G, part + (row - n0) * mt);
    if (row < n1)
      fns[0][mt - 1](xp + k0, K, gn, q.packed + row * K / 2 + g0 * 32, am + (row - n0) * G + g0, G, part + (row - n0) * mt);
  }
}

// Rows [n0, n1) for all M rows of permuted x (xp, [M, K], bf16 or fp32) into acc laid out as
// the general path's: pass m0 (8 rows of x each) at acc + m0 * chunk, [(row - n0) * mt + m - m0].
void rows_mt(const NF4View& q, const GemvArgs& g, const void* xp, bool bf16, const NestedPlanes* planes, int64_t n0,
             int64_t n1, int64_t chunk, float* acc) {
  const int64_t K = g.K, G = K / kFastGroup, rows = n1 - n0;
  float* am = scratch_floats(rows * G);
  if (planes != nullptr)
    decode_absmax_vbmi(q, *planes, n0 * G, rows * G, am);
  else
    decode_absmax(q, n0 * G, rows * G, am);
  for (int64_t m0 = 0; m0 < g.M; m0 += 8) {
    const int mt = static_cast<int>(std::min<int64_t>(8, g.M - m0));
    float* part = acc + m0 * chunk;
    std::fill(part, part + rows * mt, 0.0f);
    if (bf16)
      pass_mt(kMtBf16, q, K, static_cast<const uint16_t*>(xp) + m0 * K, mt, am, n0, n1, part);
    else
      pass_mt(kMtF32, q, K, static_cast<const float*>(xp) + m0 * K, mt, am, n0, n1, part);
  }
}


// sum_j xas[j] B[row, j] for fp32 or bf16 B (the LoRA term of one output at M = 1):
// 16 products per FMA instead of a scalar loop with a dtype switch per element,
// which took 18 of 60 us at 1536 x 576, r = 16 (the GEMV itself 38).
LK_AVX512 float lora_dot_512(const float* xas, const void* B, DType t, int64_t r, int64_t row) {
  __m512 s = _mm512_setzero_ps();
  for (int64_t j = 0; j < r; j += 16) {
    const __mmask16 m = r - j >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (r - j)) - 1);
    const __m512 b = t == DType::f32
                         ? _mm512_maskz_loadu_ps(m, static_cast<const float*>(B) + row * r + j)
                         : _mm512_castsi512_ps(_mm512_slli_epi32(
                               _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, static_cast<const uint16_t*>(B) + row * r + j)), 16));
    s = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, xas + j), b, s);
  }
  return _mm512_reduce_add_ps(s);
}

// Rows [n0, n1) into acc[n - n0]: the absmax of all their blocks at once (one
// contiguous run), then pairs of rows and the odd one.
// planes: the nested code for decode_absmax_vbmi, or nullptr (no VBMI, or no double quant).
void rows_m1(const NF4View& q, const GemvArgs& g, const void* xp, bool bf16, const NestedPlanes* planes, int64_t n0,
             int64_t n1, float* acc) {
  const int64_t K = g.K, G = K / kFastGroup;
  float* am = scratch_floats((n1 - n0) * G);
  if (planes != nullptr)
    decode_absmax_vbmi(q, *planes, n0 * G, (n1 - n0) * G, am);
  else
    decode_absmax(q, n0 * G, (n1 - n0) * G, am);
  int64_t row = n0;
  const uint8_t* p = q.packed + n0 * K / 2;
  if (bf16) {
    const auto* x = static_cast<const uint16_t*>(xp);
    for (; row + 2 <= n1; row += 2, p += K, am += 2 * G) rows_m1_bf16<2>(x, K, p, am, acc + (row - n0));
    if (row < n1) rows_m1_bf16<1>(x, K, p, am, acc + (row - n0));
  } else {
    const auto* x = static_cast<const float*>(xp);
    for (; row + 2 <= n1; row += 2, p += K, am += 2 * G) rows_m1_f32<2>(x, K, p, am, acc + (row - n0));
    if (row < n1) rows_m1_f32<1>(x, K, p, am, acc + (row - n0));
  }
}

}  // namespace

// ------------------------------------------------------------------------ dispatch

namespace {

using RowsFn = void (*)(const NF4View&, const GemvArgs&, int64_t, int64_t, float*);

template <std::size_t... I>
constexpr std::array<RowsFn, sizeof...(I)> table_512(std::index_sequence<I...>) {
  return {&gemv_rows_512<static_cast<int>(I) + 1>...};
}
template <std::size_t... I>
constexpr std::array<RowsFn, sizeof...(I)> table_512bf16(std::index_sequence<I...>) {
  return {&gemv_rows_512bf16<static_cast<int>(I) + 1>...};
}
template <std::size_t... I>
constexpr std::array<RowsFn, sizeof...(I)> table_256(std::index_sequence<I...>) {
  return {&gemv_rows_256<static_cast<int>(I) + 1>...};
}
constexpr auto kRows512 = table_512(std::make_index_sequence<8>());
constexpr auto kRows256 = table_256(std::make_index_sequence<8>());
constexpr auto kRows512bf16 = table_512bf16(std::make_index_sequence<8>());

bool has_avx512bf16() {
  static const bool yes = __builtin_cpu_supports("avx512bf16");
  return yes;
}
bool has_avx512vbmi() {
  static const bool yes = __builtin_cpu_supports("avx512vbmi");
  return yes;
}

}  // namespace

bool has_bf16_dot() { return has_avx512bf16(); }

void nf4_gemv_rows_avx512(const NF4View& q, const GemvArgs& g, int64_t n0, int64_t n1, float* acc) {
  // From 4 rows of x on, the bf16 dot products win (one core, K = N = 4096: 3.2 vs
  // 3.7 ms at M = 4, 3.3 vs 6.2 ms at M = 8); at M = 1-2 the fp32 FMAs are as fast
  // or faster here (1.6 vs 1.8 ms at M = 1), the decode dominating. (M = 1 with
  // blocksize 64 does not come here: its own kernel decodes cheaply enough that
  // bf16 dot products win, 0.47 vs 0.68 ms.)
  if (g.x_bf16 != nullptr && g.M >= 4 && has_avx512bf16()) return kRows512bf16[g.M - 1](q, g, n0, n1, acc);
  kRows512[g.M - 1](q, g, n0, n1, acc);
}
void nf4_gemv_rows_avx2(const NF4View& q, const GemvArgs& g, int64_t n0, int64_t n1, float* acc) {
  kRows256[g.M - 1](q, g, n0, n1, acc);
}

// Below this many multiply-adds one thread runs the whole GEMV.
constexpr int64_t kParallelMinMacs = 1 << 15;

void nf4_gemv(const NF4View& q, const GemvArgs& args, Isa isa) {
  // 16 output features per chunk: small enough to balance 2-64 threads at N = 576,
  // large enough that the per-chunk epilogue is noise.
  constexpr int64_t kChunk = 16;
  constexpr int64_t kRowsPerPass = 8;
  GemvArgs g = args;
  const int64_t nchunks = (g.N + kChunk - 1) / kChunk;
  const bool m1 = fast_m1(q, g, isa), m1_bf16 = m1 && g.x_bf16 != nullptr && has_avx512bf16();
  const bool mt = fast_mt(q, g, isa), mt_bf16 = mt && g.x_bf16 != nullptr && has_avx512bf16();
  // bf16 x may come without its fp32 copy (the M = 1 bf16 kernel reads only x_bf16);
  // the other paths get one here.
  if (g.x == nullptr && g.x_bf16 == nullptr) throw std::invalid_argument("nf4_gemv: x is null");
  std::vector<float> x_f32;
  if (g.x == nullptr && !m1_bf16 && !mt_bf16) {
    x_f32.resize(g.M * g.K);
    for (int64_t i = 0; i < g.M * g.K; ++i) x_f32[i] = bf16_to_f32(g.x_bf16[i]);
    g.x = x_f32.data();
  }
  std::vector<float> xp_f32;
  std::vector<uint16_t> xp_bf16;
  if (m1_bf16 || mt_bf16) {
    xp_bf16.resize(g.M * g.K);
    for (int64_t m = 0; m < g.M; ++m) permute_x_bf16(g.x_bf16 + m * g.K, g.K, xp_bf16.data() + m * g.K);
  } else if (m1 || mt) {
    xp_f32.resize(g.M * g.K);
    for (int64_t m = 0; m < g.M; ++m) permute_x_f32(g.x + m * g.K, g.K, xp_f32.data() + m * g.K);
  }
  const void* xp = m1_bf16 || mt_bf16 ? static_cast<const void*>(xp_bf16.data()) : xp_f32.data();
  NestedPlanes planes;
  const bool vbmi = (m1 || mt) && q.absmax_u8 != nullptr && has_avx512vbmi();
  if (vbmi)
    for (int i = 0; i < 256; ++i) {
      uint32_t bits;
      std::memcpy(&bits, q.nested_code + i, 4);
      for (int j = 0; j < 4; ++j) planes.b[j][i] = static_cast<uint8_t>(bits >> (8 * j));
    }
  // A fork/join costs microseconds, far more when the cores are busy: a 64 x 64 weight
  // took 300 us on 2 threads of the loaded 2-core machine, 18 us on 1 (Python call
  // included). Small products run on the calling thread; the bound (not tuned for the
  // GEMV) is the one measured for the dropout kernel.
#pragma omp parallel for schedule(static) if (nchunks > 1 && g.M * g.N * g.K >= kParallelMinMacs)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t n0 = c * kChunk, n1 = std::min(g.N, n0 + kChunk);
    float acc[kChunk * kGemvMaxM];
    // At most 8 rows of x per pass over the chunk's W rows (which stay in L2): 16
    // accumulators plus the decode registers spill, and M = 16 in one pass ran at
    // half the FMA rate of two passes of 8 (0.087 vs 0.046 ns per MAC on one core).
    if (m1) rows_m1(q, g, xp, m1_bf16, vbmi ? &planes : nullptr, n0, n1, acc);
    if (mt) rows_mt(q, g, xp, mt_bf16, vbmi ? &planes : nullptr, n0, n1, kChunk, acc);
    for (int64_t m0 = 0; m0 < g.M && !m1 && !mt; m0 += kRowsPerPass) {
      GemvArgs part = g;
      part.x = g.x + m0 * g.K;
      if (g.x_bf16 != nullptr) part.x_bf16 = g.x_bf16 + m0 * g.K;
      part.M = std::min(kRowsPerPass, g.M - m0);
      float* part_acc = acc + m0 * kChunk;
      switch (isa) {
        case Isa::avx512: nf4_gemv_rows_avx512(q, part, n0, n1, part_acc); break;
        case Isa::avx2: nf4_gemv_rows_avx2(q, part, n0, n1, part_acc); break;
        default: nf4_gemv_rows_scalar(q, part, n0, n1, part_acc); break;
      }
    }
    for (int64_t row = n0; row < n1; ++row) {
      for (int64_t m = 0; m < g.M; ++m) {
        const int64_t m0 = m - m % kRowsPerPass, rows = std::min(kRowsPerPass, g.M - m0);
        float v = acc[m0 * kChunk + (row - n0) * rows + (m - m0)];
        if (g.bias != nullptr) v += load_as_f32(g.bias, g.bias_dtype, row);
        if (g.xas != nullptr) {
          float lora = 0.0f;
          if (m1 && g.b_dtype != DType::f16)
            lora = lora_dot_512(g.xas, g.lora_B, g.b_dtype, g.r, row);
          else
            for (int64_t j = 0; j < g.r; ++j) lora += g.xas[m * g.r + j] * load_as_f32(g.lora_B, g.b_dtype, row * g.r + j);
          v += lora;
        }
        store_from_f32(g.y, g.y_dtype, m * g.ldy + row, v);
      }
    }
  }
}

}  // namespace cpu
}  // namespace lorakern
