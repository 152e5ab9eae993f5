// Launchers of the NF4 CUDA kernels (torch-free): the .cu files define them, the
// pybind11 bindings (bindings.cpp) check arguments and call them. Every CUDA
// error becomes a std::runtime_error naming the kernel or call that failed,
// which pybind11 raises in Python as RuntimeError.
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <stdexcept>
#include <string>

#include "lorakern/cuda_nf4_bodies.h"

namespace lorakern {

[[noreturn]] inline void throw_cuda_error(const char* what, cudaError_t err) {
  throw std::runtime_error(std::string("lorakern._cuda: ") + what + " failed: " + cudaGetErrorName(err) + " (" +
                           cudaGetErrorString(err) + ")");
}

inline void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw_cuda_error(what, err);
}

// LORAKERN_CUDA_SYNC=1 synchronizes after every launch, so a fault inside a
// kernel (an illegal address, say) is reported with that kernel's name rather
// than by whichever CUDA call happens to run next.
inline bool sync_after_launch() {
  static const bool on = [] {
    const char* v = std::getenv("LORAKERN_CUDA_SYNC");
    return v != nullptr && v[0] == '1';
  }();
  return on;
}

// After a <<<...>>> launch: configuration errors and missing kernel images
// (e.g. a GPU architecture the module was not built for) show up here.
inline void check_launch(const char* kernel, cudaStream_t stream) {
  check_cuda(cudaGetLastError(), kernel);
  if (sync_after_launch()) check_cuda(cudaStreamSynchronize(stream), kernel);
}

// x / W / LoRA operands of the GEMV launch beyond GemvArgs.
struct LoraLaunch {
  const void* lora_a;    // [r, K]
  const int64_t* seed;   // [1]
  void* xa_out;          // [M, r], x's dtype
  float* workspace;      // lora_workspace_floats(M, K, r) floats
  float dropout_p;
};

// Floats of workspace the LoRA down-projection needs (0 when r == 0).
inline int64_t lora_workspace_floats(int m, int64_t k, int r) {
  return r > 0 ? static_cast<int64_t>(lora_ksplit(m, k, r)) * m * r : 0;
}

void launch_nf4_dequantize(const DequantArgs& args, DType dtype, cudaStream_t stream);

// y = x W^T + bias (+ scaling * (drop(x) A^T) B^T when args.r > 0, using `lora`).
void launch_nf4_gemv(const GemvArgs& args, DType dtype, const LoraLaunch* lora, cudaStream_t stream);

}  // namespace lorakern
