"""Triton backend: GPU kernels (also runnable on CPU tensors under TRITON_INTERPRET=1).

Implements the interface of :mod:`lorakern.reference` (same names, signatures,
shapes) except ``nf4_quantize``, which the registry gives to the next backend,
even under ``LORAKERN_BACKEND=triton`` (see :mod:`lorakern.ops._registry`):

    nf4_dequantize     one launch, double quant decoded in the kernel          (nf4.py)
    nf4_matmul         GEMM with NF4 tiles decoded in registers; GEMV at M<=16 (matmul.py, gemv.py)
    nf4_matmul_t       dx = dy @ W with the same in-register decode            (matmul.py)
    lora_linear_fwd    xa = drop(x) A^T, then y = [x | xa] @ [W | s*B]^T + bias
    lora_linear_bwd    g = dy B, dx = [dy | g] @ [W ; s*A] (dropout mask regenerated
                       for the LoRA part), dA, dB (and dW) from reduction-over-M GEMMs
    qlora_linear_fwd / qlora_linear_bwd   the same with an NF4 base

Kernels are defined when this package is imported; whether they run compiled
or interpreted is decided then (``TRITON_INTERPRET=1``).

On CUDA the automatic dispatch prefers ``lorakern.kernels.composite`` (dequantize,
then cuBLAS), which measured faster than these fused GEMMs on the first GPU run;
they run when forced with ``LORAKERN_BACKEND=triton``. The composite backend
uses :func:`skinny_matmul`, :func:`tn_matmul` and :func:`dropout_add_` from here
for the dropout-masked LoRA pieces.
"""

from __future__ import annotations

import os

import torch

NAME = "triton"

try:
    import triton  # noqa: F401
except ImportError as _e:  # reported by availability(); the registry then skips this backend
    _IMPORT_ERROR: ImportError | None = _e
else:
    _IMPORT_ERROR = None
    from ._launch import interpreting
    from .dropout import dropout_add_
    from .gemv import GEMV_MAX_M, nf4_gemv
    from .matmul import lora_matmul, lora_matmul_t, skinny_matmul, tn_matmul
    from .nf4 import nf4_dequantize

__all__ = [
    "availability",
    "supports",
    "nf4_dequantize",
    "nf4_matmul",
    "nf4_matmul_t",
    "lora_linear_fwd",
    "lora_linear_bwd",
    "qlora_linear_fwd",
    "qlora_linear_bwd",
]

_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def availability() -> tuple[bool, str]:
    if _IMPORT_ERROR is not None:
        return False, f"triton not installed ({_IMPORT_ERROR})"
    import triton

    if torch.cuda.is_available():
        return True, f"triton {triton.__version__} on CUDA"
    if os.environ.get("TRITON_INTERPRET") == "1":
        import numpy
        from torch.torch_version import TorchVersion  # a version string that compares with tuples

        if TorchVersion(triton.__version__) < (3, 1) and TorchVersion(numpy.__version__) >= (2,):
            # Seen with triton 3.0.0 (torch 2.4's) and numpy 2: a plain store kernel wrote zeros.
            return False, (f"triton {triton.__version__}'s interpreter computes wrong results with numpy "
                           f"{numpy.__version__}; use numpy < 2 or triton >= 3.1 to run the kernels on CPU")
        return True, f"triton {triton.__version__} interpreter (TRITON_INTERPRET=1, CPU tensors)"
    return False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"


def supports(op: str, *args) -> str | None:
    """None when the kernels handle ``op(*args)``, else the reason (the registry then falls back)."""
    from ...formats.nf4 import NF4Weight

    if args and isinstance(args[0], torch.Tensor) and args[0].numel() == 0:
        return f"empty input of shape {tuple(args[0].shape)} (nothing to launch)"
    for a in args:
        if isinstance(a, torch.dtype) and a not in _DTYPES:
            return f"output dtype {a} (kernels produce float16, bfloat16, float32)"
        if isinstance(a, NF4Weight):
            if a.blocksize != 64:
                return f"NF4 blocksize {a.blocksize} (kernels are built and tested for 64)"
            if len(a.shape) != 2 and op != "nf4_dequantize":
                return f"NF4 weight of shape {a.shape} (matmul kernels need a 2-D [N, K] weight)"
            if not a.packed.is_contiguous():
                return "non-contiguous NF4 packed tensor"
            a = a.packed
        if isinstance(a, torch.Tensor) and a.dtype.is_floating_point and a.dtype not in _DTYPES:
            return f"{a.dtype} tensors (kernels take float16, bfloat16, float32)"
        if isinstance(a, torch.Tensor) and a.device.type != "cuda" and not (interpreting() and a.device.type == "cpu"):
            return f"{a.device.type} tensors (compiled Triton kernels need CUDA; CPU only under TRITON_INTERPRET=1)"
    return None


def nf4_matmul(x: torch.Tensor, q, bias: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(q)^T + bias, the weight never dequantized in memory."""
    if x.shape[0] <= GEMV_MAX_M:
        return nf4_gemv(x, q, bias, None, None, 0.0)
    return lora_matmul(x, None, q, bias, None, None, 0.0)


def nf4_matmul_t(dy: torch.Tensor, q) -> torch.Tensor:
    """dx [M, K] = dy [M, N] @ dequant(q), decoded in registers."""
    return lora_matmul_t(dy, None, q, None, None, 0.0, 0.0, None)


def _xa(x, lora_A, dropout_p, seed):
    return skinny_matmul(x, lora_A.t(), dropout_p, seed)  # drop(x) [M, K] @ A^T [K, r]


def _term(xa, lora_B, scaling: float):
    """The (xa, lora_B) the GEMMs add, or (None, None) at scaling 0: no LoRA term (see :mod:`lorakern.reference`)."""
    return (None, None) if scaling == 0.0 else (xa, lora_B)


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    """(y [M, N], xa [M, r]): y = x W^T + bias + s * xa B^T with xa = drop(x) A^T."""
    xa = _xa(x, lora_A, dropout_p, seed)
    return lora_matmul(x, weight, None, bias, *_term(xa, lora_B, scaling), scaling), xa


def qlora_linear_fwd(x, q, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    """:func:`lora_linear_fwd` with an NF4 base; M <= 16 takes the GEMV kernel."""
    xa = _xa(x, lora_A, dropout_p, seed)
    if x.shape[0] <= GEMV_MAX_M:
        return nf4_gemv(x, q, bias, *_term(xa, lora_B, scaling), scaling), xa
    return lora_matmul(x, None, q, bias, *_term(xa, lora_B, scaling), scaling), xa


def _lora_grads(dy, x, xa, lora_A, lora_B, scaling, dropout_p, seed):
    """(g, dA, dB); at scaling 0 (no LoRA term) g is None and dA, dB are zero."""
    if scaling == 0.0:
        return None, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    g = skinny_matmul(dy, lora_B)  # dy [M, N] @ B [N, r]
    d_lora_A = tn_matmul(g, x, scaling, dropout_p, seed)  # s * g^T drop(x)    [r, K]
    d_lora_B = tn_matmul(dy, xa, scaling)  # s * dy^T xa                       [N, r]
    return g, d_lora_A, d_lora_B


def lora_linear_bwd(dy, x, xa, weight, lora_A, lora_B, scaling: float, dropout_p: float, seed, need_dx: bool,
                    need_dweight: bool):
    """(dx | None, dW | None, dA, dB); see :mod:`lorakern.reference` for the math."""
    g, d_lora_A, d_lora_B = _lora_grads(dy, x, xa, lora_A, lora_B, scaling, dropout_p, seed)
    dx = lora_matmul_t(dy, weight, None, g, lora_A, scaling, dropout_p, seed) if need_dx else None
    dweight = tn_matmul(dy, x) if need_dweight else None
    return dx, dweight, d_lora_A, d_lora_B


def qlora_linear_bwd(dy, x, xa, q, lora_A, lora_B, scaling: float, dropout_p: float, seed, need_dx: bool):
    """(dx | None, dA, dB) with the NF4 base decoded inside the dx GEMM."""
    g, d_lora_A, d_lora_B = _lora_grads(dy, x, xa, lora_A, lora_B, scaling, dropout_p, seed)
    dx = lora_matmul_t(dy, None, q, g, lora_A, scaling, dropout_p, seed) if need_dx else None
    return dx, d_lora_A, d_lora_B
