"""NF4 dequantization in one launch (double-quantized absmax decoded in the same kernel)."""

# Annotations stay evaluated (no ``from __future__ import annotations``): triton 3.0's interpreter
# finds constexpr parameters only by a real ``tl.constexpr`` annotation, not the string.
import torch
import triton
import triton.language as tl

from ...formats.nf4 import NF4Weight
from ._device import cast, nf4_absmax, nf4_codes
from ._launch import device_guard, nf4_operands

# 1024 bytes (2048 weights) per program: 4 KiB of bf16 output each, enough loads in
# flight to stream at bandwidth; a 4096x14336 weight is 28672 programs.
DEQUANT_BYTES_PER_PROGRAM = 1024


@triton.jit
def _nf4_dequantize_kernel(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset_ptr, out_ptr,
                           numel, BLOCKSIZE: tl.constexpr, DOUBLE_QUANT: tl.constexpr, BLOCK: tl.constexpr):
    # Each program decodes BLOCK packed bytes, read once as vectors: the high nibbles are the
    # even weights, the low nibbles the odd ones; both halves of a byte share one absmax block
    # (blocksizes are even), and the two streams are interleaved back for one store.
    pid = tl.program_id(0)
    byte_idx = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    even = 2 * byte_idx
    in_range = even < numel
    byte = tl.load(packed_ptr + byte_idx, mask=in_range, other=0)
    hi, lo = nf4_codes(byte, code_ptr)
    absmax = nf4_absmax(absmax_ptr, nested_absmax_ptr, nested_code_ptr, tl.load(offset_ptr), even // BLOCKSIZE,
                        in_range, DOUBLE_QUANT)
    values = tl.interleave(hi * absmax, lo * absmax)
    idx = pid.to(tl.int64) * (2 * BLOCK) + tl.arange(0, 2 * BLOCK)
    tl.store(out_ptr + idx, cast(values, out_ptr.dtype.element_ty), mask=idx < numel)


def nf4_dequantize(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``q.shape`` tensor in ``dtype`` (fp32 / fp16 / bf16) from NF4 weight ``q``."""
    out = torch.empty(q.shape, dtype=dtype, device=q.device)
    numel = q.numel
    grid = (triton.cdiv(numel, 2 * DEQUANT_BYTES_PER_PROGRAM),)
    with device_guard(out):
        _nf4_dequantize_kernel[grid](q.packed, *nf4_operands(q), out,
                                     numel, BLOCKSIZE=q.blocksize, DOUBLE_QUANT=q.double_quant,
                                     BLOCK=DEQUANT_BYTES_PER_PROGRAM)
    return out
