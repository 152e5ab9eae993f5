// LoRA dropout kernels of lorakern._C (see csrc/cpu/dropout.cpp).
#pragma once

#include <stdint.h>

#include "lorakern/cpu_kernels.h"

namespace lorakern {
namespace cpu {

// A [rows, cols] panel starting at column col0 of a row-major [*, K] matrix.
struct DropoutArgs {
  int64_t rows, cols;
  int64_t ld_x, ld_out;  // row strides (elements) of the source and destination
  int64_t K, col0;       // element (m, c) has dropout index m * K + col0 + c
  uint32_t key;          // mix32(low 32 bits of the seed)
  uint32_t threshold;    // dropout_threshold(p)
  float scale;           // kept values are multiplied by this (1 / (1 - p), times any LoRA scaling)
};

// out = drop(x): kept elements x * scale (rounded once to t), dropped ones +0.
// Every ISA path stores the same bits (common.h's rounding and NaN encoding).
void dropout_apply(const DropoutArgs& d, const void* x, void* out, DType t, Isa isa);
// dst += drop(src) * scale: the fp32 product and the fp32 sum each rounded once
// (never fused), then rounded to dst_t. A kept NaN added to a NaN dst gives
// one of the two NaNs, which one unspecified.
void dropout_add(const DropoutArgs& d, const void* src, DType src_t, void* dst, DType dst_t, Isa isa);

}  // namespace cpu
}  // namespace lorakern
