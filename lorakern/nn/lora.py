"""LoRALinear: a frozen dense linear layer plus a trainable low-rank adapter, one fused op per call."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..ops import _checks as check_ops
from ._base import (INITS, LoRABase, adapter_dtype, as_dtype, cast_input, check_bias, check_input, dense_weight_of,
                    frozen)

__all__ = ["LoRALinear", "INITS"]


class LoRALinear(LoRABase):
    """``y = x W^T + b + scaling * (dropout(x) A^T) B^T`` with W and b frozen.

    Parameters (PEFT's layout, so adapter files map one to one):
        weight  ``[out_features, in_features]``, frozen (requires_grad False)
        bias    ``[out_features]`` or None, frozen
        lora_A  ``[r, in_features]``, trainable, float32 (float64 for a float64 base)
        lora_B  ``[out_features, r]``, trainable, same dtype as lora_A

    Compute dtype: the autocast dtype when autocast is on for the input's device,
    otherwise the base weight's dtype. x, weight, bias, A and B are cast to it
    (autograd carries the gradients back through the casts) and the output has it.

    ``fan_in_fan_out`` records that the base came from a transformers ``Conv1D``
    (GPT-2), whose ``[in, out]`` weight was transposed once on wrapping; the
    adapter is the same as for a Linear, and :func:`lorakern.merge_lora` puts the
    merged weight back in Conv1D orientation.
    """

    def __init__(self, weight: Tensor, bias: Optional[Tensor], r: int = 16, alpha: float = 32, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", fan_in_fan_out: bool = False):
        super().__init__()
        if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            raise ValueError(f"weight must be a 2-D floating tensor [out_features, in_features], got "
                             f"{type(weight).__name__} {getattr(weight, 'dtype', '')} {tuple(getattr(weight, 'shape', ()))}")
        n, k = weight.shape
        if k == 0:  # x [..., 0] would be refused at every forward
            raise ValueError(f"weight must have in_features >= 1, got shape {tuple(weight.shape)}")
        check_bias(bias, n, weight.device)
        self.weight = frozen(weight)
        self.bias = frozen(bias)
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.merged = False
        self._init_adapter(k, n, r, alpha, dropout, use_rslora, init, weight.device, adapter_dtype(weight.dtype))

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                    use_rslora: bool = False, init: str = "kaiming") -> "LoRALinear":
        """Wrap ``linear`` (an ``nn.Linear`` or transformers ``Conv1D``), sharing its weight and bias tensors.

        For an ``nn.Linear`` no memory is copied: the new module holds the same
        Parameter objects (now frozen). A ``Conv1D`` weight is transposed once.
        """
        weight, bias, fan_in_fan_out = dense_weight_of(linear)
        return cls(weight, bias, r, alpha, dropout, use_rslora, init, fan_in_fan_out)

    def forward(self, x: Tensor) -> Tensor:
        check_input(x)
        weight = self.weight
        dtype = self._autocast_dtype(x) or weight.dtype
        bias = as_dtype(self.bias, dtype)
        if self.merged:
            if not self.adapter_enabled:
                raise RuntimeError("LoRALinear is merged: its weight holds the adapter, which cannot be disabled; "
                                   "call unmerge() first")
            if self.training and torch.is_grad_enabled() and self.lora_A.requires_grad:
                raise RuntimeError("LoRALinear is merged: a training forward would give the adapter no gradient; "
                                   "call unmerge() before training")
            return nn.functional.linear(x.to(dtype), weight.to(dtype), bias)
        if not self.adapter_enabled:  # the base layer alone (see LoRABase.adapter_enabled)
            x, weight = cast_input(x, dtype), as_dtype(weight, dtype)
            check_ops.dense_weight(weight, x)  # the op's error naming x, not torch's "mat1 and mat2 shapes"
            return nn.functional.linear(self._base_input(x), weight, bias)
        scaling, dropout_p, seed = self._adapter_args(x)
        lora_A, lora_B = self._adapter_in(dtype)
        return ops.lora_linear(cast_input(x, dtype), as_dtype(weight, dtype), bias, lora_A, lora_B, scaling, dropout_p,
                               seed)

    @torch.no_grad()
    def merge(self) -> None:
        """Add ``scaling * B @ A`` into ``weight`` in place; forward then runs a plain linear.

        The sum is formed in float32 (float64 for a float64 base) and rounded once to
        the weight's dtype. A weight shared with another module (tied embeddings)
        changes there too; :func:`lorakern.merge_lora` builds new tensors instead.
        """
        if self.merged:
            raise RuntimeError("LoRALinear is already merged")
        math_dtype = adapter_dtype(self.weight.dtype)
        self.weight.copy_(self.weight.to(math_dtype) + self.delta_weight(math_dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Subtract the adapter back out of ``weight``.

        Not exact: :meth:`merge` rounded ``W + dW`` (``dW = scaling * B @ A``) to the
        weight's dtype, and that rounding stays. Per element the restored weight is
        within about one ulp of ``W + dW`` of the original (half an ulp from the
        merge's rounding, up to as much again from this one's): at most
        ``eps * max(|W|, |W + dW|)`` for normal numbers, eps = 2^-23 (float32),
        2^-7 (bfloat16), 2^-10 (float16). The error scales with ``W + dW``, not
        with ``W``: an element of W much smaller than the adapter's update there
        (near 0) can come back with a large relative error (3.2 measured in
        bfloat16 with dW about 1% of W).
        """
        if not self.merged:
            raise RuntimeError("LoRALinear is not merged")
        math_dtype = adapter_dtype(self.weight.dtype)
        self.weight.copy_(self.weight.to(math_dtype) - self.delta_weight(math_dtype))
        self.merged = False

    @torch.no_grad()
    def merged_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A new ``nn.Linear`` holding ``W + scaling * B @ A`` (fresh tensors; this module is unchanged).

        ``dtype`` defaults to the base weight's dtype; the sum is formed in float32
        (float64 for float64) and rounded once.
        """
        dtype = self.weight.dtype if dtype is None else dtype
        math_dtype = adapter_dtype(self.weight.dtype)
        weight = self.weight.to(math_dtype)
        weight = weight.clone() if self.merged else weight + self.delta_weight(math_dtype)
        return _new_linear(weight.to(dtype), self.bias, dtype)

    def extra_repr(self) -> str:
        merged = ", merged=True" if self.merged else ""
        fifo = ", fan_in_fan_out=True" if self.fan_in_fan_out else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._lora_repr()}{fifo}{merged}")


def _new_linear(weight: Tensor, bias: Optional[Tensor], dtype: torch.dtype) -> nn.Linear:
    n, k = weight.shape
    linear = nn.Linear(k, n, bias=bias is not None, device="meta", dtype=dtype)
    linear.weight = nn.Parameter(weight.contiguous(), requires_grad=False)
    if bias is not None:
        linear.bias = nn.Parameter(bias.detach().to(dtype).clone(), requires_grad=False)
    return linear
