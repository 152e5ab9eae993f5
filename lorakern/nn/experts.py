"""LoRAExperts: a fused MoE expert weight (a 3-D parameter, one matrix per expert) with one adapter per expert.

transformers 5 stores the experts of an MoE block (Mixtral, Qwen2/3-MoE, OLMoE,
DeepSeek-V3, GPT-OSS, ...) as 3-D parameters such as ``experts.gate_up_proj``
``[num_experts, out, in]`` and loops over the experts a batch routes to::

    gate, up = F.linear(x_e, self.gate_up_proj[e]).chunk(2, dim=-1)     # or x_e @ W[e] (transposed layouts)

A :class:`LoRAExperts` takes the parameter's place on its module (it also takes a
2-D weight read as ``F.linear(x, W)``, such as a router's, which PEFT's all-linear
adapts on these models: one "expert", used whole). Indexing it gives
an :class:`ExpertWeight` for one expert, and ``F.linear`` / ``@`` on that runs one
fused LoRA (or QLoRA) op for the expert: ``x W_e^T + scaling * dropout(x) A_e^T B_e^T``,
without forming ``W_e + scaling * B_e A_e``. Any other use (``torch.bmm`` over the
whole stack, ``.float()``, ...) gets the dense weight with the adapter added, formed
for that call; dropout cannot apply there and is refused in training.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..formats.nf4 import NF4Weight
from ..ops import _checks as check_ops
from ._base import LoRABase, adapter_dtype, as_dtype, cast_input, check_input, frozen
from .qlora import _COMPUTE_DTYPES, _QUANT_BUFFERS, apply_keeping_quant_state, nf4_base, nf4_dtypes

__all__ = ["LoRAExperts", "ExpertWeight"]

_LINEAR = nn.functional.linear
_MATMULS = (torch.matmul, Tensor.matmul, Tensor.__matmul__)


class LoRAExperts(LoRABase):
    """A stack of ``num_experts`` frozen weights plus one trainable rank-``r`` adapter per expert.

    Layout: the model's parameter is ``[E, out, in]`` (``F.linear(x, W[e])``) or, with
    ``transposed=True``, ``[E, in, out]`` (``x @ W[e]``, GPT-OSS). Either way the base
    is stored here as ``[E, out, in]`` (a transposed one is copied once), and:

        weight  dense: ``[E, out, in]`` frozen, in the parameter's dtype;
                NF4: uint8 ``[E, ceil(out * in / 2)]`` frozen, each expert quantized on its
                own (buffers ``absmax``, ``nested_absmax``, ``nested_code``, ``offset``
                hold one row per expert)
        lora_A  ``[E, r, in]`` trainable, float32 (float64 for a float64 base)
        lora_B  ``[E, out, r]`` trainable, same dtype

    Expert ``e`` computes ``x W_e^T + scaling * dropout(x) A_e^T B_e^T``; PEFT's
    ``target_parameters`` adapters hold the same numbers in another layout
    (:func:`lorakern.save_adapter` converts). ``shape``, ``dtype`` and ``device``
    describe the parameter the model had, so code reading ``W.shape`` keeps working.

    A 2-D ``weight`` ``[out, in]`` (a router's) is held as one expert, ``stacked`` False:
    ``F.linear(x, W)`` on the module itself runs the fused op, and it is never quantized.
    """

    fan_in_fan_out = False
    wide_output: bool = True
    # the experts module's config before apply_lora switched it to the eager loop (restored by merge_lora)
    replaced_config = None

    def __init__(self, weight: Tensor, transposed: bool = False, r: int = 16, alpha: float = 32,
                 dropout: float = 0.0, use_rslora: bool = False, init: str = "kaiming", quantize: Optional[str] = None,
                 compute_dtype: Optional[torch.dtype] = None, blocksize: int = 64, double_quant: bool = True):
        super().__init__()
        if not isinstance(weight, Tensor) or weight.dim() not in (2, 3) or not weight.is_floating_point():
            raise ValueError(f"weight must be a 3-D floating tensor [num_experts, out, in] (or [num_experts, in, out] "
                             f"with transposed=True) or a 2-D [out, in] one, got {type(weight).__name__} "
                             f"{getattr(weight, 'dtype', '')} {tuple(getattr(weight, 'shape', ()))}")
        self.stacked = weight.dim() == 3
        if not self.stacked and (quantize is not None or transposed):
            raise ValueError("a 2-D weight is adapted dense and untransposed (quantize=None, transposed=False)")
        if weight.device.type == "meta":
            raise ValueError(f"cannot adapt an expert weight on the meta device (shape {tuple(weight.shape)}, no "
                             "data); load or materialize the weights first")
        if quantize not in (None, "nf4"):
            raise ValueError(f"quantize must be None or 'nf4', got {quantize!r}")
        if quantize is None and compute_dtype is not None:
            raise ValueError("compute_dtype applies to quantized experts only (quantize='nf4')")
        compute_dtype = weight.dtype if compute_dtype is None else compute_dtype
        if quantize == "nf4" and compute_dtype not in _COMPUTE_DTYPES:
            raise TypeError(f"compute_dtype must be one of {_COMPUTE_DTYPES}, got {compute_dtype!r}")
        self.transposed = bool(transposed)
        w = weight.detach() if self.stacked else weight.detach().unsqueeze(0)
        w = w.transpose(1, 2) if self.transposed else w
        e, n, k = w.shape
        if e == 0 or n == 0 or k == 0:
            raise ValueError(f"weight must have at least one expert, row and column, got shape {tuple(weight.shape)}")
        self.num_experts = e
        self.quantize, self.compute_dtype, self.base_dtype = quantize, compute_dtype, weight.dtype
        # the adapter (and its argument checks) before the quantization, the slow part
        self._init_adapter(k, n, r, alpha, dropout, use_rslora, init, w.device, adapter_dtype(weight.dtype), experts=e)
        if quantize is None:
            self.weight = frozen(w.contiguous() if self.transposed else weight if self.stacked else w)
        else:
            self._quantize(w, blocksize, double_quant)

    def _quantize(self, w: Tensor, blocksize: int, double_quant: bool) -> None:
        parts = [ops.nf4_quantize(w[i], blocksize, double_quant) for i in range(w.shape[0])]
        self.weight = frozen(torch.stack([q.packed for q in parts]))
        for name in _QUANT_BUFFERS:
            self.register_buffer(name, torch.stack([getattr(q, name) for q in parts]))
        self.blocksize = parts[0].blocksize

    # ------------------------------------------------------------------- the parameter it replaces

    @property
    def shape(self) -> torch.Size:
        e, n, k = self.num_experts, self.out_features, self.in_features
        if not self.stacked:
            return torch.Size((n, k))
        return torch.Size((e, k, n) if self.transposed else (e, n, k))

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the replaced parameter had (NF4: the model's, which ``model.to(dtype)`` moves), in which
        code reading the stack whole gets it (``torch.bmm(hidden, W)`` needs the hidden states' dtype)."""
        return self.base_dtype if self.quantize else self.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return self.ndim

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index):
        if not self.stacked:
            return self.dense()[index]
        if isinstance(index, Tensor) and index.dim() == 0 and not index.is_floating_point():
            index = int(index)
        if isinstance(index, int) and not isinstance(index, bool):
            if not -self.num_experts <= index < self.num_experts:
                raise IndexError(f"expert index {index} is out of range for {self.num_experts} experts")
            return ExpertWeight(self, index % self.num_experts)
        return self.dense()[index]

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is _LINEAR:  # a 2-D weight: F.linear(x, W) is its fused op
            x, w, bias = _linear_args(args, kwargs)
            if isinstance(w, LoRAExperts) and not w.stacked and _plain(x, bias):
                return w.linear(x, 0, bias)
        # the whole stack read as a tensor (torch.bmm(x, W), ...)
        return _dense_call(func, args, kwargs)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)  # parameters, buffers, submodules
        except AttributeError:
            # a tensor method on the stack (W.transpose(1, 2), W.float(), ...): on the dense weight
            if name.startswith("_") or not hasattr(Tensor, name):
                raise
        return getattr(self.dense(), name)

    # --------------------------------------------------------------------------- compute

    def quantized_weight(self, expert: int) -> NF4Weight:
        """Expert ``expert``'s base as an :class:`NF4Weight` ``(out, in)`` (views of this module's rows)."""
        b = self._buffers
        return NF4Weight(self.weight[expert], b["absmax"][expert], b["nested_absmax"][expert],
                         b["nested_code"][expert], b["offset"][expert], (self.out_features, self.in_features),
                         self.blocksize, self.base_dtype)

    def base_weight(self, expert: Optional[int] = None, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The frozen base ``[out, in]`` of one expert, or ``[E, out, in]`` of all, in ``dtype`` (default: compute)."""
        dtype = self.dtype if dtype is None else dtype
        if self.quantize is None:
            w = self.weight if expert is None else self.weight[expert]
            return w.to(dtype)
        experts = range(self.num_experts) if expert is None else (expert,)
        ws = [ops.nf4_dequantize(self.quantized_weight(i), dtype) for i in experts]
        if expert is not None:
            return ws[0]
        with torch.autocast(self.device.type, enabled=False):  # CPU autocast refuses to stack fp16 tensors
            return torch.stack(ws)

    def linear(self, x: Tensor, expert: int, bias: Optional[Tensor] = None) -> Tensor:
        """``F.linear(x, W_e, bias)`` with expert ``expert``'s adapter: one fused op.

        Inside :func:`lorakern.disable_adapters` the base alone, the adapter not read.
        """
        check_input(x)
        autocast = self._autocast_dtype(x)
        if self.quantize is None:
            weight = self.weight[expert]
            dtype = autocast or weight.dtype
            x, weight, bias = cast_input(x, dtype), as_dtype(weight, dtype), as_dtype(bias, dtype)
            if not self.adapter_enabled:
                check_ops.dense_weight(weight, x)  # the op's errors naming the argument, not torch's
                check_ops.bias(bias, weight.shape[0], x)
                return _LINEAR(self._base_input(x), weight, bias)
            lora_A, lora_B = self._expert_adapter(expert, dtype)
            return ops.lora_linear(x, weight, bias, lora_A, lora_B, *self._adapter_args(x))
        dtype, out_dtype, cast_to = nf4_dtypes(x, autocast, self.compute_dtype, self.wide_output)
        x, q, bias = cast_input(x, dtype), self.quantized_weight(expert), as_dtype(bias, dtype)
        if not self.adapter_enabled:
            y = nf4_base(self._base_input(x), q, bias, out_dtype)
        else:
            lora_A, lora_B = self._expert_adapter(expert, dtype)
            y = ops.qlora_linear(x, q, bias, lora_A, lora_B, *self._adapter_args(x), out_dtype=out_dtype)
        return y if cast_to is None else y.to(cast_to)

    def _expert_adapter(self, expert: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """Expert ``expert``'s lora_A ``[r, in]`` and lora_B ``[out, r]`` in ``dtype``."""
        return as_dtype(self.lora_A[expert], dtype), as_dtype(self.lora_B[expert], dtype)

    def delta(self, expert: Optional[int] = None) -> Tensor:
        """``scaling * B_e @ A_e`` (``[out, in]``, or ``[E, out, in]`` for all), differentiable in A and B."""
        if expert is None:
            return self.scaling * torch.bmm(self.lora_B, self.lora_A)
        return self.scaling * (self.lora_B[expert] @ self.lora_A[expert])

    def dense(self, expert: Optional[int] = None) -> Tensor:
        """The weight in the model's layout with the adapter added (one expert or the stack), for any other use.

        Gradients reach lora_A / lora_B through it. Dropout acts on the input of a
        matmul, which this weight no longer sees: refused while it would be active.
        """
        if not self.stacked:
            expert = 0
        if not self.adapter_enabled:  # inside disable_adapters: the base alone
            w = self.base_weight(expert)
        else:
            if self.training and self.dropout > 0.0 and torch.is_grad_enabled():
                raise RuntimeError(
                    f"this model reads its expert weights ({type(self).__name__}, shape {tuple(self.shape)}) other "
                    "than through F.linear(x, W[e]) or x @ W[e], so LoRA dropout cannot be applied to their input; "
                    "use dropout=0 with target_parameters for this model")
            w = (self.base_weight(expert, self.lora_A.dtype) + self.delta(expert)).to(self.dtype)
        return w.transpose(-1, -2) if self.transposed else w

    def merged_parameter(self, dtype: Optional[torch.dtype] = None) -> nn.Parameter:
        """A new frozen Parameter in the model's layout: ``W + scaling * B @ A`` per expert, formed in float32."""
        dtype = self.dtype if dtype is None else dtype
        with torch.no_grad():
            w = self.base_weight(None, self.lora_A.dtype) + self.delta()
            w = w.transpose(1, 2) if self.transposed else w if self.stacked else w[0]
            return nn.Parameter(w.to(dtype).contiguous(), requires_grad=False)

    # ------------------------------------------------------------------------- device / dtype

    def _apply(self, fn, recurse=True):
        return apply_keeping_quant_state(self, super()._apply, fn, recurse)

    def extra_repr(self) -> str:
        layout = "[E, in, out]" if self.transposed else "[E, out, in]" if self.stacked else "[out, in]"
        base = f", base=nf4(blocksize={self.blocksize})" if self.quantize else ""
        experts = f"num_experts={self.num_experts}, " if self.stacked else ""
        return (f"{experts}in_features={self.in_features}, out_features={self.out_features}, "
                f"layout={layout}, {self._lora_repr()}{base}")


class ExpertWeight:
    """One expert's weight of a :class:`LoRAExperts`, as the model's forward sees ``W[e]``.

    ``F.linear(x, w)`` (or ``x @ w`` for a transposed stack) runs the expert's fused
    LoRA op; anything else gets :meth:`LoRAExperts.dense` for this expert.
    """

    __slots__ = ("experts", "index")

    def __init__(self, experts: LoRAExperts, index: int):
        self.experts, self.index = experts, index

    @property
    def shape(self) -> torch.Size:
        return self.experts.shape[1:]

    @property
    def dtype(self) -> torch.dtype:
        return self.experts.dtype

    @property
    def device(self) -> torch.device:
        return self.experts.device

    ndim = 2

    def dim(self) -> int:
        return 2

    def size(self, dim: Optional[int] = None):
        return self.shape if dim is None else self.shape[dim]

    def dense(self) -> Tensor:
        return self.experts.dense(self.index)

    def __getattr__(self, name):
        # a tensor method (w.float(), w.t(), ...): on the dense expert weight
        if name.startswith("__"):
            raise AttributeError(name)
        return getattr(self.dense(), name)

    def __repr__(self) -> str:
        return f"ExpertWeight(expert={self.index}, shape={tuple(self.shape)}, of {self.experts.extra_repr()})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _LINEAR:
            x, w, bias = _linear_args(args, kwargs)
            if isinstance(w, ExpertWeight) and not w.experts.transposed and _plain(x, bias):
                return w.experts.linear(x, w.index, bias)
        elif func in _MATMULS and len(args) == 2 and not kwargs:
            x, w = args
            if isinstance(w, ExpertWeight) and w.experts.transposed and _plain(x) and x.dim() >= 1:
                return w.experts.linear(x, w.index)
        return _dense_call(func, args, kwargs)


def _linear_args(args, kwargs):
    named = dict(zip(("input", "weight", "bias"), args), **(kwargs or {}))
    return named.get("input"), named.get("weight"), named.get("bias")


def _plain(*tensors) -> bool:
    return all(t is None or type(t) in (Tensor, nn.Parameter) for t in tensors)


def _densify(a):
    if isinstance(a, (ExpertWeight, LoRAExperts)):
        return a.dense()
    if isinstance(a, (list, tuple)):
        return type(a)(_densify(v) for v in a)
    if isinstance(a, dict):
        return {k: _densify(v) for k, v in a.items()}
    return a


def _dense_call(func, args, kwargs):
    return func(*_densify(tuple(args)), **_densify(kwargs or {}))
