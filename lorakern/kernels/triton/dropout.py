"""Dropout applied to a GEMM result and added in place: ``out += drop(t) * scale``.

The composite backend (``lorakern.kernels.composite``) computes the LoRA part of
the input gradient, ``scaling * (g @ A)``, with cuBLAS and then needs the
dropout mask of the LoRA input regenerated on it. In torch the counter hash
costs about ten elementwise passes over ``[M, K]`` int64 values; here it is one
pass that reads ``t`` and ``out`` and writes ``out``.
"""

# Annotations stay evaluated (no ``from __future__ import annotations``): triton 3.0's interpreter
# finds constexpr parameters only by a real ``tl.constexpr`` annotation, not the string.
import torch
import triton
import triton.language as tl

from ...reference.dropout import dropout_threshold
from ._device import cast, dropout_keep, dropout_key
from ._launch import device_guard

# 4096 elements per program: 8 KiB of bf16 per operand, enough in flight to stream.
_BLOCK = 4096


@triton.jit(do_not_specialize=["numel"])
def _dropout_add_kernel(out_ptr, x_ptr, seed_ptr, numel, scaling, threshold, BLOCK: tl.constexpr):
    # Flat index i of a contiguous [M, K] tensor is row * K + col: the dropout counter.
    i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = i < numel
    keep = dropout_keep(dropout_key(seed_ptr), tl.zeros_like(i), i, 0, threshold)
    x = tl.load(x_ptr + i, mask=mask, other=0.0).to(tl.float32)
    out = tl.load(out_ptr + i, mask=mask, other=0.0).to(tl.float32)
    out += tl.where(keep, x * scaling, 0.0)
    tl.store(out_ptr + i, cast(out, out_ptr.dtype.element_ty), mask=mask)


def dropout_add_(out: torch.Tensor, t: torch.Tensor, scale: float, dropout_p: float, seed: torch.Tensor) -> torch.Tensor:
    """``out += where(keep, t * scale / (1 - p), 0)`` in place, ``keep`` the mask of ``reference/dropout.py``.

    ``out`` and ``t``: contiguous, same shape ``[M, K]`` (the mask indexes them
    row-major) and dtype; the sum is formed in fp32 and rounded once. Returns ``out``.
    """
    if out.shape != t.shape or not out.is_contiguous() or not t.is_contiguous():
        raise ValueError(f"out and t must be contiguous and of one shape, got {tuple(out.shape)} and {tuple(t.shape)}")
    numel = out.numel()
    if numel == 0:
        return out
    with device_guard(out):
        _dropout_add_kernel[(triton.cdiv(numel, _BLOCK),)](
            out, t, seed, numel, float(scale) / (1.0 - dropout_p), dropout_threshold(dropout_p), BLOCK=_BLOCK)
    return out
