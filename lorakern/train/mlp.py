"""Gated MLPs (``down(act(gate(x)) * up(x))``) that keep less for backward.

Why: in a Llama-style MLP autograd keeps three ``[tokens, intermediate]``
tensors per layer for the elementwise part: ``gate(x)`` (for the activation's
gradient), ``act(gate(x))`` and ``up(x)`` (for the product's). With QLoRA under
bf16 autocast the gate and up outputs are float32 (the layers return their
input's dtype, see :class:`lorakern.nn.QLoRALinear`), so on SmolLM2-135M at
4 x 256 tokens that is 18 MB per layer, 540 MB per step. :class:`GatedProduct`
saves ``gate(x)`` and ``up(x)`` only, in the autocast dtype when autocast is on
(bf16: 6 MB per layer), and recomputes the activation in backward, which is
cheap elementwise work. The forward result is unchanged (computed from the
full-precision inputs); only the gradient of the product sees the bf16 copies,
the precision every bf16 autocast GEMM gradient has anyway.

:func:`use_lean_mlp` switches the MLP modules of a model whose ``forward`` is
exactly ``self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))``
(Llama, Mistral, Qwen2/3, Gemma and the many families that copy them); any
other MLP is left alone.
"""

from __future__ import annotations

import functools
import inspect
import re
import types
from typing import Callable

import torch
from torch import Tensor, nn

from ..nn._base import active_autocast_dtype

__all__ = ["GatedProduct", "gated_product", "use_lean_mlp"]

# The forward body this module knows how to replace, whitespace removed.
_GATED_FORWARD = "self.down_proj(self.act_fn(self.gate_proj(x))*self.up_proj(x))"


class GatedProduct(torch.autograd.Function):
    """``act(gate) * up``, saving only ``gate`` and ``up`` (in ``save_dtype``) for backward."""

    @staticmethod
    def forward(ctx, gate: Tensor, up: Tensor, act: Callable[[Tensor], Tensor], save_dtype: torch.dtype | None,
                out_dtype: torch.dtype | None = None):
        out = act(gate) * up
        save = (lambda t: t) if save_dtype is None or save_dtype == gate.dtype else (lambda t: t.to(save_dtype))
        ctx.save_for_backward(save(gate), save(up))
        ctx.act, ctx.dtypes = act, (gate.dtype, up.dtype)
        return out if out_dtype is None else out.to(out_dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):
        gate, up = ctx.saved_tensors
        gate_dtype, up_dtype = ctx.dtypes
        with torch.enable_grad():
            g = gate.detach().to(gate_dtype).requires_grad_()
            a = ctx.act(g)
            grad = grad.to(gate_dtype)
            (d_gate,) = torch.autograd.grad(a, g, grad * up.to(gate_dtype))
        d_up = grad * a.detach()
        return d_gate, d_up.to(up_dtype), None, None, None


def gated_product(gate: Tensor, up: Tensor, act: Callable[[Tensor], Tensor], autocast_output: bool = False) -> Tensor:
    """``act(gate) * up`` (same shapes), lean on saved memory under autocast.

    Under CPU/CUDA autocast the saved copies of ``gate`` and ``up`` are in the
    autocast dtype; otherwise in their own dtype. ``act`` is any differentiable
    elementwise callable (``nn.SiLU()``, a GELU, ...). ``autocast_output``: under
    autocast, return the result in the autocast dtype (for a consumer that casts
    its input to it anyway, like the down projection: one cast fewer each way).
    """
    if gate.shape != up.shape:
        raise ValueError(f"gate and up must have one shape, got {tuple(gate.shape)} and {tuple(up.shape)}")
    if not (torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad)) or torch.compiler.is_compiling():
        return act(gate) * up
    save_dtype = None
    low = active_autocast_dtype(gate.device.type)
    if low is not None and gate.is_floating_point() and torch.finfo(low).bits < torch.finfo(gate.dtype).bits:
        save_dtype = low
    return GatedProduct.apply(gate, up, act, save_dtype, save_dtype if autocast_output else None)


def _lean_forward(self, x: Tensor) -> Tensor:
    # down_proj computes in the autocast dtype: hand it the product already in it
    return self.down_proj(gated_product(self.gate_proj(x), self.up_proj(x), self.act_fn, autocast_output=True))


# A bound method pickles as getattr(module, its __name__): under this name a pickled model
# (torch.save(model)) loads with the class's own forward, as use_lean_mlp promises; under
# "_lean_forward", a name the module lacks, torch.load failed with an AttributeError.
_lean_forward.__name__ = "forward"


def _is_gated_mlp(module: nn.Module) -> bool:
    if not all(isinstance(getattr(module, n, None), nn.Module) for n in ("gate_proj", "up_proj", "down_proj")):
        return False
    return callable(getattr(module, "act_fn", None)) and _has_gated_forward(type(module))


@functools.lru_cache(maxsize=None)
def _has_gated_forward(cls: type) -> bool:
    """Whether ``cls.forward`` is exactly the gated expression (read once per class, not per layer)."""
    try:
        source = inspect.getsource(cls.forward)
    except (OSError, TypeError):
        return False
    lines = [re.sub(r"#.*", "", line) for line in source.splitlines()[1:]]  # the body, comments removed
    body = re.sub(r"\s+", "", "".join(lines))
    return body in ("return" + _GATED_FORWARD, "down_proj=" + _GATED_FORWARD + "returndown_proj")


def use_lean_mlp(model: nn.Module) -> int:
    """Give every recognised gated MLP of ``model`` the lean forward; return how many were switched.

    Idempotent. The switch is an instance attribute (``module.forward``), so it
    is not saved with the model and ``del module.forward`` undoes it.
    """
    count = 0
    for module in model.modules():
        if "forward" in module.__dict__ or not _is_gated_mlp(module):
            continue
        module.forward = types.MethodType(_lean_forward, module)
        count += 1
    return count
