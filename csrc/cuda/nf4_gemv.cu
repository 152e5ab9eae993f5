// Small-M NF4 GEMV with the LoRA term: y[M, N] = x W^T + bias + scaling * xa B^T,
// xa = drop(x) A^T, for M <= 16 (decoding: the weight is read once, at close to
// memory bandwidth). Kernel bodies: lorakern/cuda_nf4_bodies.h.
//
// Two launches on the caller's stream when r > 0:
//   lora_down_kernel   fp32 partial sums of xa, split along K (reads x and A once)
//   nf4_gemv_kernel    streams W; each CTA first adds up the partials into shared
//                      memory (and CTA 0 writes xa), then LoRA up-projection and
//                      bias join every row's sum before the warp reduction.
// xa needs all of K before any row can finish, so a single launch would need an
// inter-CTA wait; two stream-ordered launches keep the kernels free of spin-waits.
#include <cmath>

#include "launch.h"

namespace lorakern {
namespace {

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xFFFFFFFFu, v, off);
  return v;
}

template <int MT, DType D>
__global__ void __launch_bounds__(kLoraThreads) lora_down_kernel(LoraDownArgs args) {
  __shared__ float red[kLoraThreads / 32][MT * kLoraRanksPerCta];
  const int tid = static_cast<int>(threadIdx.x);
  const uint32_t key = args.dropout ? mix32(static_cast<uint32_t>(*args.seed)) : 0u;
  float acc[MT][kLoraRanksPerCta];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int jj = 0; jj < kLoraRanksPerCta; ++jj) acc[m][jj] = 0.0f;
  lora_down_thread<MT, D>(args, static_cast<int>(blockIdx.x), static_cast<int>(blockIdx.y), tid, key, acc);
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int jj = 0; jj < kLoraRanksPerCta; ++jj) {
      const float v = warp_sum(acc[m][jj]);
      if ((tid & 31) == 0) red[tid >> 5][m * kLoraRanksPerCta + jj] = v;
    }
  __syncthreads();
  if (tid < MT * kLoraRanksPerCta) {
    const int m = tid / kLoraRanksPerCta;
    const int j = static_cast<int>(blockIdx.x) * kLoraRanksPerCta + tid % kLoraRanksPerCta;
    if (m < args.m && j < args.r) {
      float s = 0.0f;
#pragma unroll
      for (int w = 0; w < kLoraThreads / 32; ++w) s += red[w][tid];
      args.partial[(static_cast<int64_t>(blockIdx.y) * args.m + m) * args.r + j] = s;
    }
  }
}

// Dynamic shared memory: x staged when kSharedX (x_bytes, a multiple of 16), then
// 16 code values, then xa [M, r] fp32.
template <int MT, DType D, bool kSharedX>
__global__ void __launch_bounds__(kGemvThreads) nf4_gemv_kernel(GemvArgs args, const float* partial, int ksplit,
                                                                void* xa_out, int x_bytes) {
  extern __shared__ __align__(16) unsigned char smem_bytes[];
  using T = typename Elem<D>::T;
  T* xs = reinterpret_cast<T*>(smem_bytes);
  float* code = reinterpret_cast<float*>(smem_bytes + x_bytes);
  float* xa = code + 16;
  const int tid = static_cast<int>(threadIdx.x);
  if constexpr (kSharedX) gemv_stage_x<D>(args, tid, xs);
  if (tid < 16) code[tid] = nf4_code(static_cast<uint32_t>(tid));
  for (int i = tid; i < args.m * args.r; i += kGemvThreads) {
    const float v = lora_xa<D>(partial, ksplit, args.m, args.r, i / args.r, i % args.r);
    xa[i] = v;
    if (blockIdx.x == 0) static_cast<typename Elem<D>::T*>(xa_out)[i] = Elem<D>::store(v);
  }
  __syncthreads();

  const int lane = tid & 31;
  auto* y = static_cast<typename Elem<D>::T*>(args.y);
  for (int64_t n = static_cast<int64_t>(blockIdx.x) * kGemvWarps + (tid >> 5); n < args.n;
       n += static_cast<int64_t>(gridDim.x) * kGemvWarps) {
    float acc[MT];
    if constexpr (kSharedX) {
      gemv_row_lane<MT, D, true, true>(args, n, lane, code, xa, acc, xs);
    } else if (args.vec) {
      gemv_row_lane<MT, D, true>(args, n, lane, code, xa, acc);
    } else {
      gemv_row_lane<MT, D, false>(args, n, lane, code, xa, acc);
    }
    // Every lane ends with every sum; lane m stores row m (a select chain, so acc
    // stays in registers rather than being indexed by lane from local memory).
    float mine = 0.0f;
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const float s = warp_sum(acc[m]);
      if (lane == m) mine = s;
    }
    if (lane < args.m) y[static_cast<int64_t>(lane) * args.n + n] = Elem<D>::store(mine);
  }
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

template <int MT, DType D>
void launch_typed(const GemvArgs& args, const LoraLaunch* lora, cudaStream_t stream) {
  int ksplit = 0;
  if (args.r > 0) {
    ksplit = lora_ksplit(args.m, args.k, args.r);
    LoraDownArgs down{};
    down.x = args.x;
    down.lora_a = lora->lora_a;
    down.seed = lora->seed;
    down.partial = lora->workspace;
    down.k = args.k;
    down.kchunk = lora_kchunk(args.k, ksplit);
    down.m = args.m;
    down.r = args.r;
    down.ksplit = ksplit;
    down.dropout = lora->dropout_p > 0.0f;
    down.threshold = dropout_threshold(lora->dropout_p);
    down.keep_scale = static_cast<float>(1.0 / (1.0 - static_cast<double>(lora->dropout_p)));
    const dim3 grid((args.r + kLoraRanksPerCta - 1) / kLoraRanksPerCta, ksplit);
    lora_down_kernel<MT, D><<<grid, kLoraThreads, 0, stream>>>(down);
    check_launch("lora_down_kernel", stream);
  }
  int device = 0, sms = 0;
  check_cuda(cudaGetDevice(&device), "cudaGetDevice");
  check_cuda(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device), "cudaDeviceGetAttribute");
  // One warp per row; 8 CTAs of 8 warps per SM at most (64 warps x 32 B in flight
  // per lane = 64 KiB per SM, several times the ~18 KiB that 3.35 TB/s x ~700 ns
  // of latency asks of each of an H100's 132 SMs). Larger N loops over rows.
  const int64_t want = (args.n + kGemvWarps - 1) / kGemvWarps;
  const int64_t cap = static_cast<int64_t>(sms > 0 ? sms : 1) * 8;
  const unsigned grid = static_cast<unsigned>(want < cap ? want : cap);
  const size_t tail = (16 + static_cast<size_t>(args.m) * args.r) * sizeof(float);
  const int64_t x_bytes = gemv_x_shared_bytes(args.m, args.k, static_cast<int>(sizeof(typename Elem<D>::T)));
  float* workspace = lora ? lora->workspace : nullptr;
  void* xa_out = lora ? lora->xa_out : nullptr;
  if (args.vec && x_bytes + static_cast<int64_t>(tail) <= kGemvSharedLimit) {
    nf4_gemv_kernel<MT, D, true><<<grid, kGemvThreads, static_cast<size_t>(x_bytes) + tail, stream>>>(
        args, workspace, ksplit, xa_out, static_cast<int>(x_bytes));
  } else {
    nf4_gemv_kernel<MT, D, false><<<grid, kGemvThreads, tail, stream>>>(args, workspace, ksplit, xa_out, 0);
  }
  check_launch("nf4_gemv_kernel", stream);
}

template <DType D>
void launch_rows(const GemvArgs& args, const LoraLaunch* lora, cudaStream_t stream) {
  switch (gemv_rows_tile(args.m)) {
    case 1: return launch_typed<1, D>(args, lora, stream);
    case 2: return launch_typed<2, D>(args, lora, stream);
    case 4: return launch_typed<4, D>(args, lora, stream);
    default: return launch_typed<16, D>(args, lora, stream);
  }
}

}  // namespace

void launch_nf4_gemv(const GemvArgs& args_in, DType dtype, const LoraLaunch* lora, cudaStream_t stream) {
  GemvArgs args = args_in;
  args.vec = args.k % kNf4BlockAlign == 0 && aligned16(args.w.packed) && aligned16(args.x);
  switch (dtype) {
    case DType::kFloat32: return launch_rows<DType::kFloat32>(args, lora, stream);
    case DType::kFloat16: return launch_rows<DType::kFloat16>(args, lora, stream);
    case DType::kBFloat16: return launch_rows<DType::kBFloat16>(args, lora, stream);
  }
}

}  // namespace lorakern
