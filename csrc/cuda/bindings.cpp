// pybind11 module lorakern._cuda: torch-free entry points of the CUDA kernels.
//
// Tensors arrive as data_ptr() integers, with sizes, dtype codes (DType) and the
// CUDA stream as an integer (torch.cuda.current_stream().cuda_stream). The
// Python side (lorakern/kernels/cuda.py) checks tensors against each other;
// this file checks every scalar it is given, so a bad call is a ValueError
// naming the argument, never a kernel reading out of bounds. The module is
// linked against the static CUDA runtime and imports without a driver; the
// first call then raises RuntimeError saying CUDA is unusable and why.
#include <pybind11/pybind11.h>

#include <cmath>
#include <cstdint>
#include <sstream>
#include <stdexcept>
#include <string>

#include "launch.h"

namespace py = pybind11;
using lorakern::DType;

namespace {

template <typename... Parts>
[[noreturn]] void fail(const Parts&... parts) {
  std::ostringstream os;
  (os << ... << parts);
  throw std::invalid_argument(os.str());
}

// Selects `device` for the duration of a call and restores the caller's device
// (torch's current device belongs to torch).
class DeviceScope {
 public:
  explicit DeviceScope(int device) {
    int count = 0;
    const cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess) {
      cudaGetLastError();  // clear the sticky error so a later call reports afresh
      throw std::runtime_error(std::string("lorakern._cuda: CUDA is not usable here: cudaGetDeviceCount failed with ") +
                               cudaGetErrorName(err) + " (" + cudaGetErrorString(err) +
                               "); these kernels need an NVIDIA driver and GPU");
    }
    if (device < 0 || device >= count) fail("device must be in [0, ", count, "), got ", device);
    lorakern::check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) lorakern::check_cuda(cudaSetDevice(device), "cudaSetDevice");
  }
  ~DeviceScope() {
    int now = previous_;
    if (cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }
  DeviceScope(const DeviceScope&) = delete;
  DeviceScope& operator=(const DeviceScope&) = delete;

 private:
  int previous_ = 0;
};

DType dtype_arg(int code, const char* name) {
  if (code < 0 || code > 2) fail(name, " must be a dtype code 0 (float32), 1 (float16) or 2 (bfloat16), got ", code);
  return static_cast<DType>(code);
}

template <typename T>
const T* ptr_arg(uintptr_t p, const char* name) {
  if (p == 0) fail(name, " is a null pointer");
  if (p % alignof(T) != 0) fail(name, " (0x", std::hex, p, ") is not aligned to ", std::dec, alignof(T), " bytes");
  return reinterpret_cast<const T*>(p);
}

int log2_blocksize_arg(int64_t blocksize) {
  // 64 .. 4096 and a power of two: each 64-value slot then lies in one block.
  if (blocksize < 64 || blocksize > 4096 || (blocksize & (blocksize - 1)) != 0)
    fail("blocksize must be a power of two in [64, 4096], got ", blocksize);
  int l = 0;
  while ((int64_t{1} << l) < blocksize) ++l;
  return l;
}

lorakern::NF4View nf4_view(uintptr_t packed, uintptr_t absmax, uintptr_t nested_absmax, uintptr_t nested_code,
                           uintptr_t offset, bool double_quant, int64_t numel, int64_t blocksize) {
  if (numel <= 0) fail("numel must be positive, got ", numel);
  lorakern::NF4View q{};
  q.packed = ptr_arg<uint8_t>(packed, "packed");
  if (double_quant) {
    q.absmax_q = ptr_arg<uint8_t>(absmax, "absmax");
    q.nested_absmax = ptr_arg<float>(nested_absmax, "nested_absmax");
    q.nested_code = ptr_arg<float>(nested_code, "nested_code");
    q.offset = ptr_arg<float>(offset, "offset");
  } else {
    q.absmax_f32 = ptr_arg<float>(absmax, "absmax");
  }
  q.numel = numel;
  q.log2_blocksize = log2_blocksize_arg(blocksize);
  return q;
}

cudaStream_t stream_arg(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

void nf4_dequantize(uintptr_t packed, uintptr_t absmax, uintptr_t nested_absmax, uintptr_t nested_code,
                    uintptr_t offset, bool double_quant, int64_t numel, int64_t blocksize, uintptr_t out,
                    int out_dtype, int device, uintptr_t stream) {
  const DType dtype = dtype_arg(out_dtype, "out_dtype");
  lorakern::DequantArgs args{};
  args.q = nf4_view(packed, absmax, nested_absmax, nested_code, offset, double_quant, numel, blocksize);
  args.out = const_cast<void*>(static_cast<const void*>(ptr_arg<uint16_t>(out, "out")));
  args.vec_in = packed % 16 == 0;
  args.vec_out = out % 16 == 0;
  DeviceScope scope(device);
  lorakern::launch_nf4_dequantize(args, dtype, stream_arg(stream));
}

void nf4_gemv(uintptr_t x, int x_dtype, int64_t m, int64_t n, int64_t k, uintptr_t packed, uintptr_t absmax,
              uintptr_t nested_absmax, uintptr_t nested_code, uintptr_t offset, bool double_quant, int64_t blocksize,
              uintptr_t bias, uintptr_t y, int64_t r, uintptr_t lora_a, uintptr_t lora_b, double scaling,
              double dropout_p, uintptr_t seed, uintptr_t xa_out, uintptr_t workspace, int device, uintptr_t stream) {
  const DType dtype = dtype_arg(x_dtype, "x_dtype");
  if (m < 1 || m > lorakern::kGemvMaxM) fail("M (rows of x) must be in [1, ", lorakern::kGemvMaxM, "], got ", m);
  if (n < 1) fail("N (rows of the weight) must be positive, got ", n);
  if (k < 1) fail("K (columns of x and the weight) must be positive, got ", k);
  if (r < 0 || r > lorakern::kLoraMaxRank) fail("r (LoRA rank) must be in [0, ", lorakern::kLoraMaxRank, "], got ", r);
  if (n > INT64_MAX / k) fail("N * K overflows: N = ", n, ", K = ", k);
  lorakern::GemvArgs args{};
  args.w = nf4_view(packed, absmax, nested_absmax, nested_code, offset, double_quant, n * k, blocksize);
  args.x = ptr_arg<uint16_t>(x, "x");
  args.bias = bias == 0 ? nullptr : ptr_arg<uint16_t>(bias, "bias");
  args.y = const_cast<uint16_t*>(ptr_arg<uint16_t>(y, "y"));
  args.n = n;
  args.k = k;
  args.m = static_cast<int>(m);
  args.r = static_cast<int>(r);
  args.scaling = static_cast<float>(scaling);
  lorakern::LoraLaunch lora{};
  if (r > 0) {
    if (!std::isfinite(scaling)) fail("scaling must be finite, got ", scaling);
    if (!(dropout_p >= 0.0 && dropout_p < 1.0)) fail("dropout_p must be in [0, 1), got ", dropout_p);
    args.lora_b = ptr_arg<uint16_t>(lora_b, "lora_b");
    lora.lora_a = ptr_arg<uint16_t>(lora_a, "lora_a");
    lora.seed = ptr_arg<int64_t>(seed, "seed");
    lora.xa_out = const_cast<uint16_t*>(ptr_arg<uint16_t>(xa_out, "xa_out"));
    lora.workspace = const_cast<float*>(ptr_arg<float>(workspace, "workspace"));
    lora.dropout_p = static_cast<float>(dropout_p);
  }
  DeviceScope scope(device);
  lorakern::launch_nf4_gemv(args, dtype, r > 0 ? &lora : nullptr, stream_arg(stream));
}

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "lorakern CUDA kernels (torch-free): NF4 dequantize and the small-M NF4 GEMV with LoRA.";
  m.attr("FLOAT32") = static_cast<int>(DType::kFloat32);
  m.attr("FLOAT16") = static_cast<int>(DType::kFloat16);
  m.attr("BFLOAT16") = static_cast<int>(DType::kBFloat16);
  m.attr("GEMV_MAX_M") = lorakern::kGemvMaxM;
  m.attr("LORA_MAX_RANK") = lorakern::kLoraMaxRank;

  m.def("nf4_dequantize", &nf4_dequantize, py::call_guard<py::gil_scoped_release>(),
        "Decode NF4 (double quant decoded inline) into out[numel] of out_dtype.", py::arg("packed"), py::arg("absmax"),
        py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"), py::arg("double_quant"),
        py::arg("numel"), py::arg("blocksize"), py::arg("out"), py::arg("out_dtype"), py::arg("device"),
        py::arg("stream"));
  m.def("nf4_gemv", &nf4_gemv, py::call_guard<py::gil_scoped_release>(),
        "y[M, N] = x[M, K] W^T + bias + scaling * xa B^T with xa = drop(x) A^T written to xa_out (r > 0); M <= 16.",
        py::arg("x"), py::arg("x_dtype"), py::arg("m"), py::arg("n"), py::arg("k"), py::arg("packed"),
        py::arg("absmax"), py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"),
        py::arg("double_quant"), py::arg("blocksize"), py::arg("bias"), py::arg("y"), py::arg("r"),
        py::arg("lora_a"), py::arg("lora_b"), py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"),
        py::arg("xa_out"), py::arg("workspace"), py::arg("device"), py::arg("stream"));
  m.def("lora_workspace_floats", &lorakern::lora_workspace_floats, py::arg("m"), py::arg("k"), py::arg("r"),
        "float32 elements of workspace nf4_gemv needs for a LoRA rank r (0 when r == 0).");
}
