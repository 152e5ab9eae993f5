"""Pure-torch semantics of every lorakern op: the ground truth every backend is tested against.

Every backend (``lorakern.kernels.cpu``, ``.triton``, ``.cuda``) exposes functions
with these exact names and signatures; ``lorakern.ops`` dispatches to them.
All matrices are 2-D here (the ops flatten leading batch dimensions):

    x  [M, K]   input                     weight [N, K]  base weight (dense)
    q  NF4Weight of shape (N, K)          bias   [N] or None
    lora_A [r, K]   lora_B [N, r]         (PEFT's lora_A / lora_B layout)
    xa = drop(x) @ lora_A^T   [M, r]      saved by forward for backward
    seed: int64 tensor with one element   (dropout mask, see ``dropout.py``)

Forward::

    y = x W^T + bias + scaling * xa B^T

Backward, with g = dy B ([M, r]) and drop'(.) the same mask and 1/(1-p) scale::

    dx = dy W + scaling * drop'(g A)
    dA = scaling * g^T drop(x)
    dB = scaling * dy^T xa
    dW = dy^T x                  (only when the base weight is trainable)
    db = sum_rows(dy)            (computed by the op layer)

Math runs in the dtype of the inputs, as a plain PyTorch layer would.

``scaling == 0.0`` means no LoRA term at all, on every backend: y is the base
output, dx the base input gradient, dA and dB zero, whatever lora_A / lora_B
hold (not ``0 * term``, which an inf or NaN in the adapter would make NaN).
"""

from __future__ import annotations

import torch

from ..formats import nf4 as _nf4
from ..formats.nf4 import NF4Weight
from .dropout import apply_dropout, dropout_mask

__all__ = [
    "availability",
    "nf4_quantize",
    "nf4_dequantize",
    "nf4_matmul",
    "nf4_matmul_t",
    "lora_linear_fwd",
    "lora_linear_bwd",
    "qlora_linear_fwd",
    "qlora_linear_bwd",
    "lora_linear",
    "qlora_linear",
    "dropout_mask",
    "apply_dropout",
]

NAME = "reference"


def availability() -> tuple[bool, str]:
    return True, "pure torch, always available"


def nf4_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    return _nf4.quantize(w, blocksize, double_quant)


def nf4_dequantize(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    return _nf4.dequantize(q, dtype)


def nf4_matmul(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x @ dequant(W)^T + bias."""
    y = x @ _nf4.dequantize(q, x.dtype).t()
    return y if bias is None else y + bias


def nf4_matmul_t(dy: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """dx = dy @ dequant(W): the input gradient of :func:`nf4_matmul`."""
    return dy @ _nf4.dequantize(q, dy.dtype)


def _lora_fwd(base: torch.Tensor, x, lora_A, lora_B, scaling, dropout_p, seed):
    xa = apply_dropout(x, seed, dropout_p) @ lora_A.t()
    if scaling == 0.0:  # no LoRA term (see the module docstring)
        return base, xa
    return base + scaling * (xa @ lora_B.t()), xa


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    base = x @ weight.t()
    if bias is not None:
        base = base + bias
    return _lora_fwd(base, x, lora_A, lora_B, scaling, dropout_p, seed)


def qlora_linear_fwd(x, q: NF4Weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    return _lora_fwd(nf4_matmul(x, q, bias), x, lora_A, lora_B, scaling, dropout_p, seed)


def _lora_grads(dy, x, xa, lora_A, lora_B, scaling, dropout_p, seed, need_dx):
    if scaling == 0.0:  # no LoRA term (see the module docstring)
        return None, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    g = dy @ lora_B  # [M, r]
    d_lora_A = scaling * (g.t() @ apply_dropout(x, seed, dropout_p))
    d_lora_B = scaling * (dy.t() @ xa)
    dx_lora = apply_dropout(scaling * (g @ lora_A), seed, dropout_p) if need_dx else None
    return dx_lora, d_lora_A, d_lora_B


def lora_linear_bwd(dy, x, xa, weight, lora_A, lora_B, scaling: float, dropout_p: float, seed, need_dx: bool, need_dweight: bool):
    dx_lora, d_lora_A, d_lora_B = _lora_grads(dy, x, xa, lora_A, lora_B, scaling, dropout_p, seed, need_dx)
    dx = _plus(dy @ weight, dx_lora) if need_dx else None
    dweight = dy.t() @ x if need_dweight else None
    return dx, dweight, d_lora_A, d_lora_B


def qlora_linear_bwd(dy, x, xa, q: NF4Weight, lora_A, lora_B, scaling: float, dropout_p: float, seed, need_dx: bool):
    dx_lora, d_lora_A, d_lora_B = _lora_grads(dy, x, xa, lora_A, lora_B, scaling, dropout_p, seed, need_dx)
    dx = _plus(nf4_matmul_t(dy, q), dx_lora) if need_dx else None
    return dx, d_lora_A, d_lora_B


def _plus(t: torch.Tensor, term: torch.Tensor | None) -> torch.Tensor:
    return t if term is None else t + term


# ---------------------------------------------------------------- differentiable compositions


def lora_linear(x, weight, bias, lora_A, lora_B, scaling: float = 1.0, dropout_p: float = 0.0, seed=None):
    """The LoRA layer as plain autograd-traced torch ops (for gradcheck and as the oracle).

    Accepts ``x [..., K]``. Equal to ``nn.Linear`` + PEFT's LoRA branch with the
    dropout mask of ``dropout.py``.
    """
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if seed is None:
        seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    y = torch.nn.functional.linear(x2, weight, bias)
    if scaling != 0.0:  # no LoRA term at scaling 0 (see the module docstring)
        y = y + scaling * (apply_dropout(x2, seed, dropout_p) @ lora_A.t() @ lora_B.t())
    return y.reshape(*shape[:-1], weight.shape[0])


def qlora_linear(x, q: NF4Weight, bias, lora_A, lora_B, scaling: float = 1.0, dropout_p: float = 0.0, seed=None):
    """:func:`lora_linear` with an NF4 base (dequantized to ``x.dtype``)."""
    return lora_linear(x, _nf4.dequantize(q, x.dtype), bias, lora_A, lora_B, scaling, dropout_p, seed)
