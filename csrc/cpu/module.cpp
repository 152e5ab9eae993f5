// pybind11 bindings of lorakern._C. Torch-free: tensors arrive as data_ptr()
// integers with sizes; lorakern/kernels/cpu.py checks shapes, dtypes and
// contiguity and allocates every output before calling in.
#include <pybind11/pybind11.h>
#if defined(__linux__)
#include <sys/mman.h>
#endif

#include <algorithm>
#include <stdexcept>
#include <string>

#include "lorakern/common.h"
#include "lorakern/cpu_dropout.h"
#include "lorakern/cpu_kernels.h"

namespace py = pybind11;
using namespace lorakern::cpu;

namespace {

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

DType to_dtype(int t) {
  if (t < 0 || t > 2) throw std::invalid_argument("dtype code must be 0 (f32), 1 (bf16) or 2 (f16), got " + std::to_string(t));
  return static_cast<DType>(t);
}

Isa to_isa(int i) {
  if (i < 0 || i > static_cast<int>(best_isa()))
    throw std::invalid_argument("ISA path " + std::to_string(i) + " is not supported by this CPU (best: " +
                                std::to_string(static_cast<int>(best_isa())) + ")");
  return static_cast<Isa>(i);
}

NF4View make_view(uintptr_t packed, uintptr_t absmax, bool double_quant, uintptr_t nested_absmax, uintptr_t nested_code,
                  uintptr_t offset, int64_t numel, int64_t blocksize) {
  if (blocksize < 32 || blocksize > 4096 || blocksize % 32)
    throw std::invalid_argument("blocksize must be a multiple of 32 in [32, 4096], got " + std::to_string(blocksize));
  NF4View v{};
  v.packed = ptr<const uint8_t>(packed);
  v.absmax_f32 = double_quant ? nullptr : ptr<const float>(absmax);
  v.absmax_u8 = double_quant ? ptr<const uint8_t>(absmax) : nullptr;
  v.nested_absmax = ptr<const float>(nested_absmax);
  v.nested_code = ptr<const float>(nested_code);
  v.offset = *ptr<const float>(offset);
  v.numel = numel;
  v.blocksize = blocksize;
  return v;
}

// A freshly allocated multi-MiB output is first touched here; with 4 KiB pages that
// is one page fault per 4 KiB, which on the KVM guest the benchmarks ran on cost
// more than the decode itself (17 ms of page faults against 2.6 ms of decoding for
// a 32 MiB bf16 output). Transparent huge pages cut the faults 512-fold. Advisory
// only: where THP is off or the range is not eligible, madvise fails and nothing
// changes, so its result is deliberately not checked.
void advise_huge_pages(char* p, int64_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr uintptr_t kHuge = uintptr_t{2} << 20;
  const uintptr_t beg = (reinterpret_cast<uintptr_t>(p) + kHuge - 1) & ~(kHuge - 1);
  const uintptr_t end = (reinterpret_cast<uintptr_t>(p) + static_cast<uintptr_t>(bytes)) & ~(kHuge - 1);
  if (end > beg) (void)madvise(reinterpret_cast<void*>(beg), end - beg, MADV_HUGEPAGE);
#else
  (void)p;
  (void)bytes;
#endif
}

// Decode the [rows, cols] sub-matrix at (row0, col0) of the [*, K] weight into out (row stride ld_out).
// A full-width panel is one contiguous run, cut into chunks of 16384 elements (a
// multiple of every blocksize, so chunks never share an absmax block); otherwise
// each thread decodes whole rows.
void dequantize_2d(const NF4View& q, int64_t row0, int64_t rows, int64_t col0, int64_t cols, int64_t K, uintptr_t out,
                   int64_t ld_out, int dtype, int isa, bool stream) {
  const DType t = to_dtype(dtype);
  const Isa is = to_isa(isa);
  if (row0 < 0 || col0 < 0 || rows < 0 || cols < 0 || col0 + cols > K || (row0 + rows) * K > q.numel)
    throw std::out_of_range("dequantize_2d: panel outside the weight");
  char* o = ptr<char>(out);
  const int64_t sz = dtype_size(t);
  py::gil_scoped_release nogil;
  if (col0 == 0 && cols == K && ld_out == K) {
    constexpr int64_t kChunk = 16384;
    const int64_t e0 = row0 * K, count = rows * K;
    const int64_t nchunks = (count + kChunk - 1) / kChunk;
#pragma omp parallel for schedule(static) if (nchunks > 1)
    for (int64_t c = 0; c < nchunks; ++c) {
      const int64_t s = c * kChunk, n = std::min(kChunk, count - s);
      nf4_decode_run(q, e0 + s, n, o + s * sz, t, is, stream);
    }
    return;
  }
  // Small panels decode on the calling thread (a fork/join costs microseconds).
#pragma omp parallel for schedule(static) if (rows > 1 && rows * cols >= 16384)
  for (int64_t r = 0; r < rows; ++r) nf4_decode_run(q, (row0 + r) * K + col0, cols, o + r * ld_out * sz, t, is, stream);
}

void gemv(const NF4View& q, uintptr_t x, int64_t M, int64_t N, int64_t K, uintptr_t xas, uintptr_t lora_B, int b_dtype,
          int64_t r, uintptr_t bias, int bias_dtype, uintptr_t y, int y_dtype, int64_t ldy, int isa, uintptr_t x_bf16) {
  if (M < 1 || M > kGemvMaxM) throw std::invalid_argument("nf4_gemv: M must be in [1, 16], got " + std::to_string(M));
  if (N * K > q.numel) throw std::out_of_range("nf4_gemv: [N, K] larger than the weight");
  GemvArgs g{ptr<const float>(x), M, N, K, ptr<const float>(xas), ptr<const void>(lora_B), to_dtype(b_dtype), r,
             ptr<const void>(bias), to_dtype(bias_dtype), ptr<void>(y), to_dtype(y_dtype), ldy,
             ptr<const uint16_t>(x_bf16)};
  const Isa is = to_isa(isa);
  py::gil_scoped_release nogil;
  nf4_gemv(q, g, is);
}

DropoutArgs dropout_args(int64_t rows, int64_t cols, int64_t ld_x, int64_t ld_out, int64_t K, int64_t col0, uint32_t key,
                         uint32_t threshold, float scale) {
  return DropoutArgs{rows, cols, ld_x, ld_out, K, col0, key, threshold, scale};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lorakern CPU kernels (torch-free; pointers are tensor.data_ptr() integers)";
  m.def("advise_huge_pages", [](uintptr_t p, int64_t bytes) { advise_huge_pages(ptr<char>(p), bytes); },
        "ask for transparent huge pages on a fresh, untouched buffer (advisory)", py::arg("ptr"), py::arg("bytes"));
  m.def("best_isa", [] { return static_cast<int>(best_isa()); }, "0 scalar, 1 AVX2, 2 AVX-512: the best path this CPU runs");
  m.def("has_bf16_dot", &has_bf16_dot, "AVX512_BF16: bf16 x takes the bf16 dot-product GEMV kernels");

  py::class_<NF4View>(m, "NF4View", "Read-only view of an NF4Weight's tensors")
      .def(py::init(&make_view), py::arg("packed"), py::arg("absmax"), py::arg("double_quant"), py::arg("nested_absmax"),
           py::arg("nested_code"), py::arg("offset"), py::arg("numel"), py::arg("blocksize"));

  m.def(
      "nf4_quantize",
      [](uintptr_t w, int dtype, int64_t numel, int64_t blocksize, uintptr_t packed, uintptr_t absmax) {
        const DType t = to_dtype(dtype);
        if (t == DType::f16) throw std::invalid_argument("nf4_quantize takes f32 or bf16 input");
        if (blocksize < 32 || blocksize > 4096 || blocksize % 32) throw std::invalid_argument("bad blocksize");
        py::gil_scoped_release nogil;
        nf4_quantize(ptr<const void>(w), t, numel, blocksize, ptr<uint8_t>(packed), ptr<float>(absmax));
      },
      "packed codes and fp32 absmax per block of numel values", py::arg("w"), py::arg("dtype"), py::arg("numel"),
      py::arg("blocksize"), py::arg("packed"), py::arg("absmax"));

  m.def("nf4_dequantize_2d", &dequantize_2d, "decode a [rows, cols] panel of an [*, K] NF4 weight", py::arg("q"),
        py::arg("row0"), py::arg("rows"), py::arg("col0"), py::arg("cols"), py::arg("K"), py::arg("out"), py::arg("ld_out"),
        py::arg("dtype"), py::arg("isa"), py::arg("stream") = false);

  m.def("nf4_gemv", &gemv, "y = x W^T + bias + xas B^T for M <= 16 (x, xas fp32)", py::arg("q"), py::arg("x"), py::arg("M"),
        py::arg("N"), py::arg("K"), py::arg("xas"), py::arg("lora_B"), py::arg("b_dtype"), py::arg("r"), py::arg("bias"),
        py::arg("bias_dtype"), py::arg("y"), py::arg("y_dtype"), py::arg("ldy"), py::arg("isa"), py::arg("x_bf16") = 0);

  m.def("dropout_key", [](int64_t seed) { return lorakern::mix32(static_cast<uint32_t>(seed & 0xFFFFFFFF)); },
        "mix32 of the low 32 bits of the seed");
  m.def("dropout_threshold", [](double p) { return lorakern::dropout_threshold(p); });

  py::class_<DropoutArgs>(m, "DropoutArgs", "A [rows, cols] panel at column col0 of a [*, K] matrix")
      .def(py::init(&dropout_args), py::arg("rows"), py::arg("cols"), py::arg("ld_x"), py::arg("ld_out"), py::arg("K"),
           py::arg("col0"), py::arg("key"), py::arg("threshold"), py::arg("scale"));
  m.def(
      "dropout_apply",
      [](const DropoutArgs& d, uintptr_t x, uintptr_t out, int dtype, int isa) {
        const DType t = to_dtype(dtype);
        const Isa is = to_isa(isa);
        py::gil_scoped_release nogil;
        dropout_apply(d, ptr<const void>(x), ptr<void>(out), t, is);
      },
      "out = drop(x) * scale", py::arg("args"), py::arg("x"), py::arg("out"), py::arg("dtype"), py::arg("isa"));
  m.def(
      "dropout_add",
      [](const DropoutArgs& d, uintptr_t src, int src_dtype, uintptr_t dst, int dst_dtype, int isa) {
        const DType st = to_dtype(src_dtype), dt = to_dtype(dst_dtype);
        const Isa is = to_isa(isa);
        py::gil_scoped_release nogil;
        dropout_add(d, ptr<const void>(src), st, ptr<void>(dst), dt, is);
      },
      "dst += drop(src) * scale", py::arg("args"), py::arg("src"), py::arg("src_dtype"), py::arg("dst"),
      py::arg("dst_dtype"), py::arg("isa"));
}
