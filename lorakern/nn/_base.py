"""What LoRALinear and QLoRALinear share: the adapter parameters, scaling, dtypes, dropout seed."""

from __future__ import annotations

import math
import numbers
import threading
import weakref
from typing import Optional

import numpy as np
import torch
from torch import Tensor, nn

from .. import ops

# "kaiming":  A ~ kaiming_uniform(a=sqrt(5)) (PEFT's default, the nn.Linear init), B = 0.
# "gaussian": A ~ N(0, 1/r^2) (std 1/r, PEFT's init_lora_weights="gaussian"), B = 0.
# "zeros-B":  another name for "kaiming": A random, B zero, so the adapter starts as a no-op.
INITS = ("kaiming", "gaussian", "zeros-B")


class _LastCast(threading.local):
    source: Optional[weakref.ref] = None
    key: tuple = ()
    # [the cast copy]: emptied by the source's weakref callback, so the copy (64 MB at
    # 8 x 4096 x 1024 bf16) does not outlive the activation it was cast from
    box: Optional[list] = None


_last_cast = _LastCast()


class _SharedCast(torch.autograd.Function):
    """Hands out ``cast`` (a detached copy of ``x`` in another dtype) with its own autograd node.

    Each consumer gets a separate node whose backward casts the gradient back to
    ``x``'s dtype, so the gradients of q, k and v are summed in fp32 on ``x``, as
    with three separate casts, and not in bf16 on a shared copy.
    """

    @staticmethod
    def forward(ctx, x, cast):
        ctx.dtype = x.dtype
        return cast.view_as(cast)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.dtype), None


def cast_input(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x.to(dtype)``, one copy shared by consecutive layers that read the same input.

    Under autocast the q, k and v projections of an attention block (and the
    gate and up projections of an MLP) each cast the same fp32 normalized hidden
    state to bf16, and each LoRA layer saves its cast input for the adapter's
    gradient: three copies of one tensor kept until backward. Reusing the last
    cast while the source is the same unmodified tensor keeps one: 101 MB less
    saved for backward on SmolLM2-135M at 4 x 256 tokens. One entry per thread,
    replaced by the next different input.

    Only an activation that autograd produced (``x.grad_fn`` set) is shared. A
    leaf, such as a batch buffer refilled in place through NumPy or ``.data``,
    can change without a version-counter bump, and a stale copy would be a
    silently wrong output; it is cast afresh on every call. (Writing into an
    activation through ``.data`` between two layers that read it is not seen.)
    """
    if x.dtype == dtype:
        return x
    if torch.compiler.is_compiling() or x.grad_fn is None:  # in this order: dynamo cannot trace grad_fn
        return x.to(dtype)
    last = _last_cast
    key = (x._version, x.untyped_storage().data_ptr(), dtype, torch.is_inference_mode_enabled())
    if last.source is None or last.source() is not x or last.key != key:
        with torch.no_grad():
            box = [x.to(dtype)]
        last.source, last.key, last.box = weakref.ref(x, lambda _, box=box: box.clear()), key, box
    out = last.box[0]  # x is alive, so its box is full
    if torch.is_grad_enabled():
        return _SharedCast.apply(x, out)
    return out


class _ZeroGrads(torch.autograd.Function):
    """``x`` unchanged, on the autograd graph of ``params`` with zero gradients for them.

    (``setup_context`` kept apart from ``forward``: the form torch.func's transforms take.)
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(x, *params):
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.likes = [(p.shape, p.dtype, p.device) for p in inputs[1:]]

    @staticmethod
    def backward(ctx, dx):
        return (dx, *(torch.zeros(shape, dtype=dtype, device=device) for shape, dtype, device in ctx.likes))

    @staticmethod
    def jvp(ctx, x_tangent, *param_tangents):
        # forward mode (torch.func.jvp / jacfwd, forward_ad): the output is x, the params do not reach it
        return x_tangent.view_as(x_tangent)


def as_dtype(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    """``t.to(dtype)`` (None stays None), skipping the call when ``t`` already has ``dtype``.

    ``to`` then returns ``t`` itself, but still costs 1.5 us of dispatch (one core
    of the 2-core CI VM): 6 us of a LoRA layer's forward, which casts four tensors.
    """
    return t if t is None or t.dtype == dtype else t.to(dtype)


def active_autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast casts matmuls to on ``device_type`` right now, or None when it is off."""
    if device_type in ("cpu", "cuda"):
        # Dynamo in torch 2.11 cannot trace torch.amp.is_autocast_available (a graph
        # break under fullgraph=True, seen on the GPU machines); these two always have autocast.
        enabled = torch.is_autocast_enabled(device_type)
    else:
        enabled = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    return torch.get_autocast_dtype(device_type) if enabled else None


def check_lora_args(r, alpha, dropout, init, use_rslora=False) -> None:
    # numbers.Integral / Real admit NumPy scalars (hyperparameter sweeps); bool is refused (True is not a rank)
    if isinstance(r, bool) or not isinstance(r, numbers.Integral) or r < 1:
        raise ValueError(f"r (the LoRA rank) must be a positive int, got {r!r}")
    # alpha <= float32's largest value keeps alpha / r (or / sqrt(r)) in the range the ops take
    if (isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0
            or alpha > torch.finfo(torch.float32).max):
        raise ValueError(f"alpha must be a positive finite number within float32's range, got {alpha!r}")
    if isinstance(dropout, bool) or not isinstance(dropout, numbers.Real) or not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {dropout!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    # a bool (NumPy's too): the string "false" is truthy and silently turned rsLoRA on
    if not isinstance(use_rslora, (bool, np.bool_)):
        raise TypeError(f"use_rslora must be a bool, got {type(use_rslora).__name__} {use_rslora!r}")


def check_bias(bias, out_features: int, device: torch.device) -> None:
    """``bias`` is None or a floating ``[out_features]`` tensor on the base weight's ``device``."""
    if bias is None:
        return
    if not isinstance(bias, Tensor) or not bias.is_floating_point():
        raise TypeError(f"bias must be None or a floating tensor [{out_features}], got "
                        f"{type(bias).__name__} {getattr(bias, 'dtype', '')}".rstrip())
    if tuple(bias.shape) != (out_features,):
        raise ValueError(f"bias must have shape [{out_features}], got {tuple(bias.shape)}")
    if bias.device != device:
        raise ValueError(f"bias is on {bias.device} but the base weight is on {device}; move them to the same device")


def check_input(x) -> None:
    """Forward input: a floating tensor. An int, bool or complex ``x`` was cast silently (a complex
    one losing its imaginary part); ``nn.Linear`` refuses them too."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor (float32, float16, bfloat16 or float64), got {x.dtype}")


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """alpha / r, or alpha / sqrt(r) with rsLoRA (Kalajdzievski 2023: keeps the update size rank-independent)."""
    return float(alpha) / (math.sqrt(r) if use_rslora else r)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """Adapters are kept in float32 (float64 for a float64 base) whatever the base dtype.

    They are the only trained weights and are tiny (r * (K + N) values), so full
    precision costs little memory and keeps optimizer updates from rounding away;
    forward casts them to the compute dtype.
    """
    return torch.float64 if base_dtype == torch.float64 else torch.float32


def dense_weight_of(module: nn.Module) -> tuple[Tensor, Optional[Tensor], bool]:
    """``(weight [N, K], bias, fan_in_fan_out)`` of an ``nn.Linear`` or a transformers ``Conv1D``.

    ``Conv1D`` (GPT-2) stores its weight as ``[in, out]`` and computes ``x @ W + b``;
    the transpose is returned (one copy) and ``fan_in_fan_out`` is True.
    The check is by duck type so this layer never imports transformers.
    """
    if isinstance(module, nn.Linear):
        return module.weight, module.bias, False
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(getattr(module, "weight", None), Tensor):
        w = module.weight
        if w.dim() != 2 or w.shape[1] != module.nf:
            raise ValueError(f"Conv1D weight must be [in_features, nf={module.nf}], got {tuple(w.shape)}")
        return w.detach().t().contiguous(), module.bias, True
    raise TypeError(f"expected an nn.Linear or a transformers Conv1D, got {type(module).__module__}.{type(module).__name__}")


def frozen(t: Optional[Tensor]) -> Optional[nn.Parameter]:
    if t is None:
        return None
    p = t if isinstance(t, nn.Parameter) else nn.Parameter(t, requires_grad=False)
    p.requires_grad_(False)
    return p


class LoRABase(nn.Module):
    """Adapter parameters and the per-call plumbing (compute dtype, dropout seed) of a LoRA layer."""

    lora_A: nn.Parameter
    lora_B: nn.Parameter

    def _init_adapter(self, in_features: int, out_features: int, r: int, alpha: float, dropout: float,
                      use_rslora: bool, init: str, device, dtype: torch.dtype, experts: Optional[int] = None) -> None:
        """lora_A ``[r, in]`` and lora_B ``[out, r]``, or ``[experts, r, in]`` / ``[experts, out, r]``: one adapter
        per expert (:class:`~lorakern.nn.LoRAExperts`)."""
        check_lora_args(r, alpha, dropout, init, use_rslora)
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.r, self.alpha, self.dropout = int(r), float(alpha), float(dropout)
        self.use_rslora, self.init = bool(use_rslora), init
        self.scaling = lora_scaling(self.r, self.alpha, use_rslora)
        lead = () if experts is None else (int(experts),)
        self.lora_A = nn.Parameter(torch.empty(*lead, self.r, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.empty(*lead, out_features, self.r, device=device, dtype=dtype))
        self.reset_lora_parameters()

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """Re-draw A with the module's ``init`` rule and zero B (the adapter starts as a no-op).

        Per expert when A is ``[experts, r, in]``, so each expert's A has a LoRALinear's fan-in.
        """
        if self.lora_A.device.type == "meta":
            return
        for a in (self.lora_A if self.lora_A.dim() == 3 else (self.lora_A,)):
            if self.init == "gaussian":
                nn.init.normal_(a, std=1.0 / self.r)
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def delta_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """``scaling * B @ A`` ([N, K]) computed in ``dtype``: what the adapter adds to the base weight."""
        return self.scaling * (self.lora_B.detach().to(dtype) @ self.lora_A.detach().to(dtype))

    @staticmethod
    def _autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
        # is_cuda / is_cpu first: x.device.type builds a device and a string (0.3 us) on every forward
        return active_autocast_dtype("cuda" if x.is_cuda else "cpu" if x.is_cpu else x.device.type)

    def _adapter_in(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """lora_A and lora_B in the compute dtype, cast on every call.

        A cast copy kept between calls would save 9 us of a 190 us bf16 decode
        call (576 -> 1536, r = 16), but a write through ``p.data`` (``.copy_``,
        loading code, some optimizers) bumps no version counter and would leave
        it stale: a silently wrong output. ``merge_lora`` is the way to decode
        without the adapter's cost.
        """
        a, b = self.lora_A, self.lora_B
        return as_dtype(a, dtype), as_dtype(b, dtype)

    # False inside lorakern.disable_adapters(model): forward computes the base layer alone, without
    # reading lora_A / lora_B, as PEFT's disable_adapter does: a diverged adapter (inf in lora_B)
    # cannot reach the output, and no adapter work (xa, the LoRA GEMMs) is done.
    adapter_enabled: bool = True

    def _base_input(self, x: Tensor) -> Tensor:
        """The input of a disabled adapter's base computation: ``x``, on the adapter's autograd graph.

        The adapter is not read, yet ``loss.backward()`` inside ``disable_adapters``
        gives it zero gradients, as the fused op at scaling 0 did: without them a
        frozen base model has nothing that requires grad (backward raises), and DDP
        waits for a gradient of every trainable parameter. Nothing is recorded
        under ``no_grad`` (a reference model's pass).
        """
        a, b = self.lora_A, self.lora_B
        if torch.is_grad_enabled() and (a.requires_grad or b.requires_grad):
            return _ZeroGrads.apply(x, a, b)
        return x

    def _adapter_args(self, x: Tensor) -> tuple[float, float, Optional[Tensor]]:
        """(scaling, dropout_p, seed) of an enabled adapter's call (a fresh dropout seed when training)."""
        return (self.scaling, *self._dropout_args(x))

    def _dropout_args(self, x: Tensor) -> tuple[float, Optional[Tensor]]:
        """Dropout is active only in training mode; each training forward draws a fresh seed.

        The seed comes from torch's generator, so activation checkpointing (which
        restores the RNG state before recomputing) regenerates the same mask.
        """
        if self.training and self.dropout > 0.0:
            return self.dropout, ops.new_seed(x.device)
        return 0.0, None

    def _lora_repr(self) -> str:
        rs = ", use_rslora=True" if self.use_rslora else ""
        drop = f", dropout={self.dropout}" if self.dropout else ""
        return f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}{drop}{rs}"
