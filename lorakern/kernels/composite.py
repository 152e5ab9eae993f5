"""Composite backend: NF4 dequantized by the fastest kernel, every GEMM by cuBLAS.

This is the automatic choice for CUDA tensors wherever it measured fastest,
which on the first GPU run was everywhere except the small-M GEMV. NVIDIA H200,
bf16, r = 16 (``benchmarks/results/gpu-20261126-h200/results.md``, do_bench
medians; "dequant + cuBLAS" is this recipe):

    QLoRA forward, M = 512 .. 8192      fused Triton kernel (NF4 decoded in the GEMM
                                        loop) 0.06-0.13x dequant + cuBLAS
    QLoRA backward (dx, dA, dB)         fused Triton 0.05-0.51x
    LoRA forward + backward, bf16 base  fused Triton 0.37-1.05x PEFT's unfused
                                        torch layer, which this backend improves on
                                        (the LoRA terms are accumulated in place)
    NF4 GEMV + LoRA, M = 1              CUDA kernel 2.2-3.8x dequant + cuBLAS (kept)
                  M = 16                CUDA kernel 0.23-0.31x, Triton GEMV 0.47-0.53x

So the registry tries ``cuda`` (the GEMV, for the few rows where it wins; see
``lorakern.kernels.cuda.declines``), then this backend; the fused Triton
kernels run only when asked for (``LORAKERN_BACKEND=triton``) until they
measure faster. What this backend launches per QLoRA layer:

    forward    dequantize W (CUDA kernel: 77% of copy bandwidth at 14336 x 4096),
               y = x W^T + bias (cuBLAS), xa = drop(x) A^T (fused Triton kernel
               when dropout is on, else cuBLAS), y += s * xa B^T in place
    backward   g = dy B, dB = s * dy^T xa, dA = s * g^T drop(x), W dequantized
               again (not kept: it is as large as the bf16 layer QLoRA avoids
               storing), dx = dy W, dx += drop'(s * g A) in place

The dequantized weight lives only for its GEMM: one layer's worth of transient
memory, as in bitsandbytes. Runs on CPU tensors too when forced with
``LORAKERN_BACKEND=composite`` (tests use that); the automatic dispatch uses
it for CUDA tensors only.
"""

from __future__ import annotations

import functools
from types import ModuleType

import torch

from ..formats.nf4 import NF4Weight
from ..reference import dropout as _dropout
from . import load, unsupported

NAME = "composite"

__all__ = ["availability", "supports", "nf4_quantize", "nf4_dequantize", "nf4_matmul", "nf4_matmul_t",
           "lora_linear_fwd", "lora_linear_bwd", "qlora_linear_fwd", "qlora_linear_bwd"]

# Backends asked for quantization and dequantization, fastest first.
_KERNEL_ORDER = ("cuda", "triton", "cpu", "reference")


def availability() -> tuple[bool, str]:
    return True, "dequantize + torch GEMMs (cuBLAS on CUDA); runs wherever torch does"


def supports(op: str, *args) -> str | None:
    """None when this backend runs ``op(*args)``, else why not."""
    if op not in __all__:
        return f"{op} has no composite implementation"
    if args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        return f"{args[0].dtype} input"
    return None


# ------------------------------------------------------------------------------------ pieces


def _kernel_backend(op: str, args: tuple) -> ModuleType:
    """The first backend of _KERNEL_ORDER that runs ``op(*args)`` (LORAKERN_BACKEND ignored: this is
    the composite's own choice of parts); the reference runs everything."""
    for name in _KERNEL_ORDER:
        mod = load(name)[0]
        if mod is not None and unsupported(mod, op, args) is None:
            return mod
    raise AssertionError(f"the reference backend implements {op}")


def _dequantize(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    return _kernel_backend("nf4_dequantize", (q, dtype)).nf4_dequantize(q, dtype)


def _triton_for(*tensors: torch.Tensor):
    """The Triton backend module when it can run on these tensors (CUDA, or CPU under the interpreter)."""
    mod = load("triton")[0]
    if mod is None or any(t.numel() == 0 for t in tensors):
        return None
    return mod if mod.supports("composite", *tensors) is None else None


@functools.lru_cache(maxsize=None)
def _zero(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.zeros((), device=device, dtype=dtype)


def _scaled_mm(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling * (a @ b) in one GEMM (alpha in its epilogue: one launch, one rounding)."""
    if scaling == 1.0:
        return torch.mm(a, b)
    return torch.addmm(_zero(a.device, a.dtype), a, b, beta=0, alpha=scaling)


def _linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.mm(x, w.t()) if bias is None else torch.addmm(bias, x, w.t())


def _xa(x, lora_A, dropout_p: float, seed) -> torch.Tensor:
    """xa = drop(x) A^T [M, r]: one Triton pass when dropout is on (no dropped copy of x)."""
    if dropout_p == 0.0:
        return torch.mm(x, lora_A.t())
    tk = _triton_for(x, lora_A)
    if tk is not None:
        return tk.skinny_matmul(x, lora_A.t(), dropout_p, seed)
    return torch.mm(_dropout.apply_dropout(x, seed, dropout_p), lora_A.t())


def _lora_grads(dy, x, xa, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    """(g = dy B, dA = s g^T drop(x), dB = s dy^T xa); at scaling 0 (no LoRA term, see
    :mod:`lorakern.reference`) g is None and dA, dB are zero."""
    if scaling == 0.0:
        return None, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    g = torch.mm(dy, lora_B)
    d_lora_B = _scaled_mm(dy.t(), xa, scaling)
    if dropout_p == 0.0:
        d_lora_A = _scaled_mm(g.t(), x, scaling)
    else:
        tk = _triton_for(g, x)
        if tk is not None:
            d_lora_A = tk.tn_matmul(g, x, scaling, dropout_p, seed)
        else:
            d_lora_A = _scaled_mm(g.t(), _dropout.apply_dropout(x, seed, dropout_p), scaling)
    return g, d_lora_A, d_lora_B


def _add_lora_dx_(dx, g, lora_A, scaling: float, dropout_p: float, seed) -> torch.Tensor:
    """dx += drop'(s * g A) in place; without dropout one addmm_ into dx. g None: no LoRA term."""
    if g is None:
        return dx
    if dropout_p == 0.0:
        return dx.addmm_(g, lora_A, alpha=scaling)
    ga = torch.mm(g, lora_A)
    tk = _triton_for(dx, ga)
    if tk is not None and dx.is_contiguous():
        return tk.dropout_add_(dx, ga, scaling, dropout_p, seed)
    return dx.add_(_dropout.apply_dropout(ga.mul_(scaling), seed, dropout_p))


# --------------------------------------------------------------------------------------- ops


def nf4_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """Delegated to the fastest backend that quantizes ``w`` (there is nothing to compose)."""
    return _kernel_backend("nf4_quantize", (w, blocksize, double_quant)).nf4_quantize(w, blocksize, double_quant)


def nf4_dequantize(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """Delegated to the fastest backend that dequantizes ``q``: the CUDA kernel on a GPU."""
    return _dequantize(q, dtype)


def nf4_matmul(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(q)^T + bias."""
    return _linear(x, _dequantize(q, x.dtype), bias)


def nf4_matmul_t(dy: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """dx [M, K] = dy [M, N] @ dequant(q)."""
    return torch.mm(dy, _dequantize(q, dy.dtype))


def _add_lora_(y, x, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    """(y += s * xa B^T in place, xa); nothing added at scaling 0 (see :mod:`lorakern.reference`)."""
    xa = _xa(x, lora_A, dropout_p, seed)
    if scaling != 0.0:
        y.addmm_(xa, lora_B.t(), alpha=scaling)
    return y, xa


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    """(y, xa): y = x W^T + bias + s * xa B^T, the LoRA term added into y in place."""
    return _add_lora_(_linear(x, weight, bias), x, lora_A, lora_B, scaling, dropout_p, seed)


def qlora_linear_fwd(x, q: NF4Weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    """:func:`lora_linear_fwd` with W dequantized for the base GEMM only (freed before the LoRA term)."""
    return _add_lora_(_linear(x, _dequantize(q, x.dtype), bias), x, lora_A, lora_B, scaling, dropout_p, seed)


def lora_linear_bwd(dy, x, xa, weight, lora_A, lora_B, scaling: float, dropout_p: float, seed, need_dx: bool,
                    need_dweight: bool):
    """(dx | None, dW | None, dA, dB); see :mod:`lorakern.reference` for the math."""
    g, d_lora_A, d_lora_B = _lora_grads(dy, x, xa, lora_A, lora_B, scaling, dropout_p, seed)
    dx = _add_lora_dx_(torch.mm(dy, weight), g, lora_A, scaling, dropout_p, seed) if need_dx else None
    dweight = torch.mm(dy.t(), x) if need_dweight else None
    return dx, dweight, d_lora_A, d_lora_B


def qlora_linear_bwd(dy, x, xa, q: NF4Weight, lora_A, lora_B, scaling: float, dropout_p: float, seed, need_dx: bool):
    """(dx | None, dA, dB), W dequantized again for dx = dy W (not saved from the forward)."""
    g, d_lora_A, d_lora_B = _lora_grads(dy, x, xa, lora_A, lora_B, scaling, dropout_p, seed)
    dx = None
    if need_dx:
        dx = _add_lora_dx_(torch.mm(dy, _dequantize(q, dy.dtype)), g, lora_A, scaling, dropout_p, seed)
    return dx, d_lora_A, d_lora_B
