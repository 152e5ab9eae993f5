// NF4 -> dense fp32 / fp16 / bf16 with double quant decoded in the same kernel.
// The kernel body lives in lorakern/cuda_nf4_bodies.h (also run on the host by
// tests/host); this file adds the CTA shape, the barrier and the launcher.
//
// Traffic per value: 0.5 B read + 2 B (bf16) or 4 B (fp32) written, plus one
// absmax byte per 64 values: a copy-bound kernel, so the design goal is that
// every load and store is a full 16-byte access, coalesced across the warp.
#include "launch.h"

namespace lorakern {
namespace {

template <DType D>
__global__ void __launch_bounds__(kDequantThreads) nf4_dequantize_kernel(DequantArgs args) {
  __shared__ DequantShared s;
  dequant_stage(args, blockIdx.x, static_cast<int>(threadIdx.x), s);
  __syncthreads();
  dequant_emit<D>(args, blockIdx.x, static_cast<int>(threadIdx.x), s);
}

}  // namespace

void launch_nf4_dequantize(const DequantArgs& args, DType dtype, cudaStream_t stream) {
  const int64_t tiles = dequant_tiles(args.q.numel);
  if (tiles > 0x7FFFFFFF) throw std::invalid_argument("nf4_dequantize: tensor too large for one launch");
  const dim3 grid(static_cast<unsigned>(tiles));
  switch (dtype) {
    case DType::kFloat32:
      nf4_dequantize_kernel<DType::kFloat32><<<grid, kDequantThreads, 0, stream>>>(args);
      break;
    case DType::kFloat16:
      nf4_dequantize_kernel<DType::kFloat16><<<grid, kDequantThreads, 0, stream>>>(args);
      break;
    case DType::kBFloat16:
      nf4_dequantize_kernel<DType::kBFloat16><<<grid, kDequantThreads, 0, stream>>>(args);
      break;
  }
  check_launch("nf4_dequantize_kernel", stream);
}

}  // namespace lorakern
