"""NF4 GEMV for decode-sized batches (M <= 16), the LoRA term added in the same launch.

At M <= 16 the work is reading the 4-bit weight once: each program streams
BLOCK_N weight rows, decodes them in registers and multiplies every row of x
against them, then adds ``s * xa @ B^T`` and the bias for its output columns.
M = 1 reduces in fp32 on the CUDA cores; 2 <= M <= 16 pads the rows to 16 and
uses tl.dot (a per-row loop unrolled 16 times took 80 s to compile).
"""

# Annotations stay evaluated (no ``from __future__ import annotations``): triton 3.0's interpreter
# finds constexpr parameters only by a real ``tl.constexpr`` annotation, not the string.
import torch
import triton
import triton.language as tl

from ...formats.nf4 import NF4Weight
from ._device import cast, dot, nf4_decode, nf4_rows
from ._launch import Tuned, device_guard, dot_precision, gemv_configs, nf4_operands, rank_block, upcast_dot

GEMV_MAX_M = 16


@triton.jit(do_not_specialize=["M", "R"])
def _nf4_gemv_kernel(
    x_ptr, packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset_ptr,
    bias_ptr, xa_ptr, b_ptr, y_ptr,
    M, N, K, R, scaling,
    stride_xm, stride_xk, stride_xam, stride_xar, stride_bn, stride_br, stride_ym, stride_yn,
    DOUBLE_QUANT: tl.constexpr, NF4_BLOCKSIZE: tl.constexpr, NF4_ALIGNED: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_LORA: tl.constexpr, UPCAST_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # BLOCK_M == 1: a multiply-and-reduce in fp32. BLOCK_M == 16 (2 <= M <= 16): tl.dot with
    # rows padded to 16, the tensor cores' minimum; the kernel stays bound by the weight stream.
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    cols = offs_n.to(tl.int64)
    rows = tl.arange(0, BLOCK_M)
    mask_m = rows < M
    dtype = y_ptr.dtype.element_ty
    offset = tl.load(offset_ptr)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        mask_k = kk < K
        if NF4_ALIGNED:
            w = nf4_rows(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset, cols, mask_n, k0, K,
                         BLOCK_K, NF4_BLOCKSIZE, DOUBLE_QUANT)
        else:
            w = nf4_decode(packed_ptr, absmax_ptr, nested_absmax_ptr, nested_code_ptr, code_ptr, offset,
                           cols[:, None] * K + kk[None, :], mask_n[:, None] & mask_k[None, :], NF4_BLOCKSIZE, DOUBLE_QUANT)
        x = tl.load(x_ptr + rows[:, None] * stride_xm + kk[None, :] * stride_xk,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        if BLOCK_M == 1:
            acc += tl.sum(w * x.to(tl.float32), axis=1)[None, :]
        else:
            acc = dot(x, tl.trans(cast(w, dtype)), acc, UPCAST_DOT, DOT_PRECISION)
    if HAS_LORA:
        for r0 in range(0, R, BLOCK_R):
            rr = r0 + tl.arange(0, BLOCK_R)
            mask_r = rr < R
            b = tl.load(b_ptr + cols[:, None] * stride_bn + rr[None, :] * stride_br,
                        mask=mask_n[:, None] & mask_r[None, :], other=0.0)
            xa = tl.load(xa_ptr + rows[:, None] * stride_xam + rr[None, :] * stride_xar,
                         mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            if BLOCK_M == 1:
                acc += (tl.sum(b.to(tl.float32) * xa.to(tl.float32), axis=1) * scaling)[None, :]
            else:  # s on B, not on xa: s * xa rounded to fp16 can overflow (see _lora_fwd_kernel)
                acc = dot(xa, tl.trans(cast(b.to(tl.float32) * scaling, dtype)), acc, UPCAST_DOT, DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :] * stride_yn, cast(acc, dtype),
             mask=mask_m[:, None] & mask_n[None, :])


_nf4_gemv = Tuned(_nf4_gemv_kernel, gemv_configs, key=["M", "N", "K", "NF4_ALIGNED", "HAS_LORA"])


def nf4_gemv(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None, xa: torch.Tensor | None,
             lora_B: torch.Tensor | None, scaling: float) -> torch.Tensor:
    """``y [M, N] = x [M, K] @ dequant(q)^T + s * xa [M, r] @ lora_B [N, r]^T + bias`` for M <= 16."""
    m, k = x.shape
    if m > GEMV_MAX_M:
        raise ValueError(f"nf4_gemv handles at most {GEMV_MAX_M} rows, got x with {m}")
    n = q.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    bias = bias.contiguous() if bias is not None else None
    has_lora = xa is not None
    r = xa.shape[1] if has_lora else 0
    xa_ = xa if has_lora else x
    b_ = lora_B if has_lora else x
    grid = lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)  # noqa: E731
    with device_guard(x):
        _nf4_gemv[grid](
            x, q.packed, *nf4_operands(q),
            bias if bias is not None else x, xa_, b_, y,
            m, n, k, r, float(scaling),
            x.stride(0), x.stride(1), xa_.stride(0), xa_.stride(1), b_.stride(0), b_.stride(1), y.stride(0), y.stride(1),
            DOUBLE_QUANT=q.double_quant, NF4_BLOCKSIZE=q.blocksize, NF4_ALIGNED=k % q.blocksize == 0,
            HAS_BIAS=bias is not None, HAS_LORA=has_lora,
            UPCAST_DOT=upcast_dot(x.dtype), DOT_PRECISION=dot_precision(x.dtype),
            BLOCK_M=1 if m == 1 else 16, BLOCK_R=rank_block(r),
        )
    return y
