// LoRA dropout from the counter-based hash of lorakern/reference/dropout.py:
// the mask is regenerated wherever it is needed, never stored.
//
// Element (m, c) of a panel that starts at column col0 of a [rows, K] matrix has
// the global index m * K + col0 + c (mod 2^32), exactly as the reference numbers it.
#include "lorakern/cpu_dropout.h"

#include <algorithm>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "lorakern/common.h"

namespace lorakern {
namespace cpu {

namespace {

// The loops are plain C++ so the compiler vectorizes mix32 (vpmulld) for
// whichever target the including function is compiled for.
template <class In, class Out>
inline void apply_rows(const DropoutArgs& d, const In* x, Out* out) {
  for (int64_t m = 0; m < d.rows; ++m) {
    const uint32_t base = static_cast<uint32_t>(m * d.K + d.col0);
    const In* xr = x + m * d.ld_x;
    Out* orow = out + m * d.ld_out;
    for (int64_t c = 0; c < d.cols; ++c) {
      const bool keep = mix32((base + static_cast<uint32_t>(c)) ^ d.key) >= d.threshold;
      orow[c] = Out::from(keep ? In::to_f32(xr[c]) * d.scale : 0.0f);
    }
  }
}

template <class In, class Out>
inline void add_rows(const DropoutArgs& d, const In* src, Out* dst) {
  for (int64_t m = 0; m < d.rows; ++m) {
    const uint32_t base = static_cast<uint32_t>(m * d.K + d.col0);
    const In* sr = src + m * d.ld_x;
    Out* orow = dst + m * d.ld_out;
    for (int64_t c = 0; c < d.cols; ++c) {
      const bool keep = mix32((base + static_cast<uint32_t>(c)) ^ d.key) >= d.threshold;
      orow[c] = Out::from(Out::to_f32(orow[c]) + (keep ? In::to_f32(sr[c]) * d.scale : 0.0f));
    }
  }
}

struct F32 {
  float v;
  static float to_f32(F32 a) { return a.v; }
  static F32 from(float f) { return {f}; }
};
struct BF16 {
  uint16_t v;
  static float to_f32(BF16 a) { return bf16_to_f32(a.v); }
  static BF16 from(float f) { return {f32_to_bf16(f)}; }
};
struct F16 {
  uint16_t v;
  static float to_f32(F16 a) { return f16_to_f32(a.v); }
  static F16 from(float f) { return {f32_to_f16(f)}; }
};

template <class Fn>
inline void by_dtype(DType in, DType out, Fn&& fn) {
  // in == out for apply; add may take an fp32 source into any destination.
  auto dispatch_out = [&](auto in_tag) {
    using In = decltype(in_tag);
    switch (out) {
      case DType::f32: return fn(In{}, F32{});
      case DType::bf16: return fn(In{}, BF16{});
      default: return fn(In{}, F16{});
    }
  };
  switch (in) {
    case DType::f32: return dispatch_out(F32{});
    case DType::bf16: return dispatch_out(BF16{});
    default: return dispatch_out(F16{});
  }
}

#define LK_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma")))

template <class In, class Out>
LK_AVX512 void apply_avx512(const DropoutArgs& d, const void* x, void* out) {
  apply_rows(d, static_cast<const In*>(x), static_cast<Out*>(out));
}
template <class In, class Out>
void apply_base(const DropoutArgs& d, const void* x, void* out) {
  apply_rows(d, static_cast<const In*>(x), static_cast<Out*>(out));
}
template <class In, class Out>
LK_AVX512 void add_avx512(const DropoutArgs& d, const void* x, void* out) {
  add_rows(d, static_cast<const In*>(x), static_cast<Out*>(out));
}
template <class In, class Out>
void add_base(const DropoutArgs& d, const void* x, void* out) {
  add_rows(d, static_cast<const In*>(x), static_cast<Out*>(out));
}

template <bool kAdd>
void run(const DropoutArgs& d, const void* x, DType in, void* out, DType out_t, Isa isa) {
  // Rows split across threads; each thread runs the loop on its slice.
#pragma omp parallel
  {
#ifdef _OPENMP
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
#else
    const int64_t nt = 1, t = 0;
#endif
    const int64_t per = (d.rows + nt - 1) / nt;
    const int64_t r0 = std::min(d.rows, t * per), r1 = std::min(d.rows, r0 + per);
    if (r1 > r0) {
      DropoutArgs s = d;
      s.rows = r1 - r0;
      s.col0 = d.col0 + r0 * d.K;  // global index of row r0 = (r0 + m) * K + col0
      const char* xs = static_cast<const char*>(x) + r0 * d.ld_x * dtype_size(in);
      char* os = static_cast<char*>(out) + r0 * d.ld_out * dtype_size(out_t);
      by_dtype(in, out_t, [&](auto i_tag, auto o_tag) {
        using I = decltype(i_tag);
        using O = decltype(o_tag);
        if (kAdd) {
          isa == Isa::avx512 ? add_avx512<I, O>(s, xs, os) : add_base<I, O>(s, xs, os);
        } else {
          isa == Isa::avx512 ? apply_avx512<I, O>(s, xs, os) : apply_base<I, O>(s, xs, os);
        }
      });
    }
  }
}

}  // namespace

void dropout_apply(const DropoutArgs& d, const void* x, void* out, DType t, Isa isa) { run<false>(d, x, t, out, t, isa); }

void dropout_add(const DropoutArgs& d, const void* src, DType src_t, void* dst, DType dst_t, Isa isa) {
  run<true>(d, src, src_t, dst, dst_t, isa);
}

}  // namespace cpu
}  // namespace lorakern
