"""QLoRALinear: an NF4-quantized frozen base weight plus a trainable low-rank adapter."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor, nn

from .. import ops
from ..formats import nf4 as nf4_format
from ..formats.nf4 import NF4Weight, QuantStateError
from ._base import LoRABase, adapter_dtype, as_dtype, cast_input, check_bias, check_input, dense_weight_of, frozen
from .lora import LoRALinear, _new_linear

__all__ = ["QLoRALinear"]

# Quantization-state buffers: float32 (or uint8) tensors whose dtype must survive model.to(dtype).
_QUANT_BUFFERS = ("absmax", "nested_absmax", "nested_code", "offset")
_COMPUTE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Keys bitsandbytes writes next to ``<prefix>weight`` for an NF4 Linear4bit.
_BNB_SUFFIXES = ("absmax", "quant_map", "nested_absmax", "nested_quant_map", nf4_format.QUANT_STATE_KEY)


def _wrapper_hint(prefix: str, state_dict, wkey: str) -> str:
    # torch.distributed.checkpoint's set_model_state_dict on a DDP / torch.compile wrapper puts the
    # wrapper's prefix back on parameter keys only: the quantization-state keys (not parameters)
    # arrive without it, and this layer never sees them.
    wrapped = prefix.startswith("module.") or "_orig_mod." in prefix
    if not wrapped or f"{wkey}.{nf4_format.QUANT_STATE_KEY}" in state_dict:
        return ""
    return ("; if this state dict comes from torch.distributed.checkpoint (get/set_model_state_dict) on a DDP or "
            "torch.compile wrapper, call them on the model inside the wrapper (model.module / model._orig_mod)")


def apply_keeping_quant_state(module: nn.Module, apply, fn, recurse: bool) -> nn.Module:
    """``module._apply`` that never changes the dtype of its quantization-state buffers.

    model.to(torch.bfloat16) must not round the float32 absmax / offset / code tables:
    they are moved as raw bytes (fn changes the device of a uint8 view, never its dtype).

    A move to a floating dtype (``model.half()``, ``model.to(torch.bfloat16)``) sets
    ``compute_dtype``, as it sets the dtype a dense layer computes in; a device move
    leaves it. The target dtype is read from what ``fn`` does to two probes.
    """
    stash = {name: module._buffers.pop(name) for name in _QUANT_BUFFERS if name in module._buffers}
    try:
        apply(fn, recurse)
    finally:
        for name, t in stash.items():
            module._buffers[name] = fn(t.view(torch.uint8)).view(t.dtype)
    target = _target_dtype(fn, next(iter(stash.values())).device if stash else None)
    if target is not None:
        if target in _COMPUTE_DTYPES:
            module.compute_dtype = target
        if hasattr(module, "base_dtype"):  # LoRAExperts: the dtype the model sees the stack in (float64 too)
            module.base_dtype = target
    return module


def _target_dtype(fn, device) -> Optional[torch.dtype]:
    """The floating dtype ``fn`` (an ``nn.Module._apply`` function) casts to, None for a device-only move:
    what it makes of a float32 and a float64 probe (``.double()`` changes the first, ``.float()`` the second)."""
    out32, out64 = (fn(torch.empty(0, dtype=d, device=device)) for d in (torch.float32, torch.float64))
    if not (isinstance(out32, Tensor) and isinstance(out64, Tensor)):
        return None
    if out32.dtype != torch.float32:
        return out32.dtype
    return out64.dtype if out64.dtype != torch.float64 else None


def nf4_dtypes(x: Tensor, autocast: Optional[torch.dtype], compute_dtype: torch.dtype,
               wide_output: bool) -> tuple[torch.dtype, Optional[torch.dtype], Optional[torch.dtype]]:
    """``(dtype, out_dtype, cast_to)`` of an NF4 layer's call: the GEMMs run in ``dtype``; the op's
    ``out_dtype`` (wider: bias and LoRA term added in it); the dtype the result is then cast to.

    The output has the input's dtype, as bitsandbytes' Linear4bit gives (a bf16 model
    loaded in 4-bit with its default float32 compute dtype runs on), except under
    autocast, where it has the autocast dtype, or ``compute_dtype`` when that is wider
    and ``wide_output`` is set.
    """
    dtype = autocast or compute_dtype
    want = compute_dtype if autocast is not None else x.dtype
    if want == dtype:
        return dtype, None, None
    if wide_output and want in _COMPUTE_DTYPES and torch.finfo(want).bits > torch.finfo(dtype).bits:
        return dtype, want, None
    return dtype, None, None if autocast is not None else want


def nf4_base(x: Tensor, q: NF4Weight, bias: Optional[Tensor], out_dtype: Optional[torch.dtype]) -> Tensor:
    """``x dequant(q)^T + bias``: an NF4 layer's output with its adapter disabled, in the dtypes
    :func:`lorakern.ops.qlora_linear` gives (with ``out_dtype`` the GEMM result is rounded to x's
    dtype once and the bias added in ``out_dtype``)."""
    if out_dtype is None:
        return ops.nf4_matmul(x, q, bias)
    y = ops.nf4_matmul(x, q, None).to(out_dtype)
    return y if bias is None else y + bias.to(out_dtype)


def is_bnb_linear4bit(module: nn.Module) -> bool:
    """A bitsandbytes ``Linear4bit`` (or ``LinearNF4`` / ``LinearFP4``), recognised without importing bitsandbytes."""
    return type(module).__module__.startswith("bitsandbytes") and any(
        c.__name__ == "Linear4bit" for c in type(module).__mro__)


def bnb_linear4bit_reason(module: nn.Module) -> Optional[str]:
    """None when ``module`` is a bitsandbytes Linear4bit with an NF4 weight QLoRALinear can take over, else why not."""
    if not is_bnb_linear4bit(module):
        return f"expected a bitsandbytes Linear4bit, got {type(module).__module__}.{type(module).__name__}"
    state = getattr(getattr(module, "weight", None), "quant_state", None)
    if state is None:
        return (f"this {type(module).__name__} holds no quantized weight yet (bitsandbytes quantizes when the layer "
                "moves to a device); load the model with load_in_4bit or move the layer first")
    kind = getattr(state, "quant_type", None)
    if kind != "nf4":
        return (f"this {type(module).__name__} holds {kind!r} weights; lorakern's kernels decode NF4 "
                "(load with bnb_4bit_quant_type='nf4', or load the model unquantized and use quantize='nf4')")
    return None


class QLoRALinear(LoRABase):
    """``y = x dequant(W)^T + b + scaling * (dropout(x) A^T) B^T`` with W stored as NF4.

    Storage (about 4.13 bits per base weight with double quantization):
        weight         uint8 Parameter ``[ceil(N*K/2), 1]``, frozen: the packed NF4 codes,
                       first value in the high nibble (bitsandbytes' layout and shape, and
                       a Parameter so FSDP2 can shard it)
        absmax, nested_absmax, nested_code, offset: buffers of the quantization state
        bias           ``[N]`` or None, frozen, in the original dtype
        lora_A, lora_B as in :class:`LoRALinear` (float32)

    Compute dtype: the autocast dtype when autocast is on, else ``compute_dtype``
    (default: the dtype the weight had before quantization; ``model.half()`` and
    ``model.to(dtype)`` set it). Without autocast the output has the input's dtype,
    as bitsandbytes' Linear4bit gives; an input wider than ``compute_dtype`` gets the
    bias and the LoRA term added in its dtype (``wide_output``).
    Under autocast to a narrower dtype (a float32 model under bf16 autocast) the
    GEMMs run in the autocast dtype but the output stays ``compute_dtype``, with
    the bias and the LoRA term added in it (``wide_output``). In bf16 the adapter's early
    updates are below one ulp of the base output and would round away: on
    SmolLM2-135M the first AdamW step reached loss 1.246 with wide outputs,
    1.289 without (float32: 1.236). ``module.wide_output = False`` gives
    autocast-dtype outputs (less memory where the next layer saves its input).

    ``state_dict()`` uses bitsandbytes' ``Linear4bit`` keys (``weight``,
    ``weight.absmax``, ``weight.quant_map``, ``weight.nested_absmax``,
    ``weight.nested_quant_map``, ``weight.quant_state.bitsandbytes__nf4``) plus
    ``bias``, ``lora_A``, ``lora_B``; a bitsandbytes NF4 state dict loads here
    (``strict=False``: it has no adapter) and ours loads into bitsandbytes.

    Merging: adding ``B @ A`` to an NF4 weight and re-quantizing would lose the
    adapter in rounding, so there is no in-place ``merge()``. :meth:`merged_linear`
    returns a dense ``nn.Linear`` with ``dequant(W) + scaling * B @ A``;
    :meth:`to_lora_linear` returns a dense :class:`LoRALinear` sharing the adapter.
    """

    def __init__(self, q: NF4Weight, bias: Optional[Tensor], r: int = 16, alpha: float = 32, dropout: float = 0.0,
                 use_rslora: bool = False, init: str = "kaiming", compute_dtype: Optional[torch.dtype] = None,
                 fan_in_fan_out: bool = False):
        super().__init__()
        nf4_format.validate(q, "q")
        if len(q.shape) != 2:
            raise ValueError(f"q must be a 2-D [out_features, in_features] weight, got shape {q.shape}")
        compute_dtype = q.dtype if compute_dtype is None else compute_dtype
        if compute_dtype not in _COMPUTE_DTYPES:
            raise TypeError(f"compute_dtype must be one of {_COMPUTE_DTYPES}, got {compute_dtype!r}")
        n, k = q.shape
        check_bias(bias, n, q.packed.device)
        self.blocksize, self.quant_dtype, self.compute_dtype = q.blocksize, q.dtype, compute_dtype
        self.fan_in_fan_out = bool(fan_in_fan_out)
        self.merged = False  # always: an NF4 base is never merged in place (see merged_linear)
        self._set_quantized(q, (n, k))
        self.bias = frozen(bias)
        self._init_adapter(k, n, r, alpha, dropout, use_rslora, init, q.device, adapter_dtype(q.dtype))

    @classmethod
    def from_linear(cls, linear: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                    use_rslora: bool = False, init: str = "kaiming", blocksize: int = 64, double_quant: bool = True,
                    compute_dtype: Optional[torch.dtype] = None,
                    device: Optional[torch.device | str] = None) -> "QLoRALinear":
        """Quantize the weight of ``linear`` (``nn.Linear`` or transformers ``Conv1D``) to NF4 and wrap it.

        The new module keeps no reference to the full-precision weight: once
        ``linear`` is dropped (as :func:`lorakern.apply_lora` does), its memory is freed.
        ``device``: build the layer there (the weight is copied over, quantized there,
        and the copy dropped); default: the weight's device.
        """
        weight, bias, fan_in_fan_out = dense_weight_of(linear)
        if weight.device.type == "meta":
            raise ValueError(f"cannot quantize a {type(linear).__name__} whose weight is on the meta device "
                             f"(shape {tuple(weight.shape)}, no data); load or materialize the weights first")
        if device is not None:
            weight = weight.detach().to(device)
            bias = None if bias is None else bias.detach().to(device)
        q = ops.nf4_quantize(weight.detach(), blocksize, double_quant)
        return cls(q, bias, r, alpha, dropout, use_rslora, init, compute_dtype, fan_in_fan_out)

    @classmethod
    def from_bnb_linear4bit(cls, layer: nn.Module, r: int = 16, alpha: float = 32, dropout: float = 0.0,
                            use_rslora: bool = False, init: str = "kaiming",
                            compute_dtype: Optional[torch.dtype] = None,
                            device: Optional[torch.device | str] = None) -> "QLoRALinear":
        """Wrap a bitsandbytes NF4 ``Linear4bit`` (a model loaded with ``load_in_4bit=True``), keeping its 4-bit weight.

        The format is the same, so nothing is dequantized or re-quantized: the packed
        codes and quantization state are read through the layer's own ``state_dict``
        (which undoes bitsandbytes' CPU inference repacking) and checked. FP4 weights
        are refused (the kernels here decode NF4). ``compute_dtype`` defaults to the
        layer's ``compute_dtype`` (``bnb_4bit_compute_dtype``).
        """
        reason = bnb_linear4bit_reason(layer)
        if reason is not None:
            raise TypeError(reason)
        sd = layer.state_dict()
        try:
            q = nf4_format.from_bnb_state_dict({k: v for k, v in sd.items() if k.startswith("weight")}, "weight")
        except QuantStateError as e:
            raise ValueError(f"cannot read the 4-bit weight of this {type(layer).__name__}: {e}") from None
        bias = sd.get("bias")
        if compute_dtype is None:
            compute_dtype = getattr(layer, "compute_dtype", None)
            compute_dtype = compute_dtype if compute_dtype in _COMPUTE_DTYPES else q.dtype
        if device is not None:
            q, bias = q.to(device), None if bias is None else bias.to(device)
        elif bias is not None:
            bias = bias.to(q.device)
        bias = None if bias is None else bias.detach().to(q.dtype if q.dtype in _COMPUTE_DTYPES else bias.dtype)
        return cls(q, bias, r, alpha, dropout, use_rslora, init, compute_dtype)

    # ------------------------------------------------------------------ quantized weight

    def _set_quantized(self, q: NF4Weight, shape: tuple[int, int], assign: bool = False) -> None:
        """Hold ``q``: copied into the current weight's storage and device, or with ``assign`` (and at
        construction) the tensors of ``q`` themselves, on their device."""
        if tuple(q.shape) != tuple(shape):
            raise ValueError(f"NF4 weight has shape {tuple(q.shape)}, expected {tuple(shape)}")
        old = None if assign else self._parameters.get("weight")
        device = q.device if old is None else old.device
        packed = q.packed.reshape(-1, 1).to(device)
        if old is not None and old.shape == packed.shape:
            with torch.no_grad():
                old.copy_(packed)
        else:
            self.weight = nn.Parameter(packed, requires_grad=False)
        for name in _QUANT_BUFFERS:
            self.register_buffer(name, getattr(q, name).to(device), persistent=False)
        self.blocksize, self.quant_dtype = q.blocksize, q.dtype

    @property
    def double_quant(self) -> bool:
        return self.absmax.dtype == torch.uint8

    def quantized_weight(self) -> NF4Weight:
        """The base weight as an :class:`NF4Weight` of shape ``(out_features, in_features)`` (views, no copy).

        Built on every forward: the buffers are read from ``_buffers`` (where
        :meth:`_apply` keeps them too), not through ``nn.Module.__getattr__``,
        0.5 us each. Nothing is cached across calls: the op validates the
        weight on every call, so a buffer changed in any way (``resize_``,
        ``.data =``, a new tensor) is checked before a kernel reads it.
        """
        buffers = self._buffers
        return NF4Weight(self.weight.reshape(-1), buffers["absmax"], buffers["nested_absmax"], buffers["nested_code"],
                         buffers["offset"], (self.out_features, self.in_features), self.blocksize, self.quant_dtype)

    def dequantized_weight(self, dtype: Optional[torch.dtype] = None) -> Tensor:
        """The dense base weight ``[N, K]`` in ``dtype`` (default: compute dtype)."""
        return ops.nf4_dequantize(self.quantized_weight(), self.compute_dtype if dtype is None else dtype)

    # --------------------------------------------------------------------------- forward

    wide_output: bool = True

    def forward(self, x: Tensor) -> Tensor:
        check_input(x)
        dtype, out_dtype, cast_to = nf4_dtypes(x, self._autocast_dtype(x), self.compute_dtype, self.wide_output)
        bias = as_dtype(self.bias, dtype)
        if not self.adapter_enabled:  # the base layer alone (see LoRABase.adapter_enabled)
            y = nf4_base(self._base_input(cast_input(x, dtype)), self.quantized_weight(), bias, out_dtype)
        else:
            scaling, dropout_p, seed = self._adapter_args(x)
            lora_A, lora_B = self._adapter_in(dtype)
            y = ops.qlora_linear(cast_input(x, dtype), self.quantized_weight(), bias, lora_A, lora_B, scaling,
                                 dropout_p, seed, out_dtype=out_dtype)
        return y if cast_to is None else y.to(cast_to)

    # --------------------------------------------------------------------------- merging

    def merge(self) -> None:
        raise TypeError("QLoRALinear cannot merge in place (re-quantizing W + B@A to NF4 would round the adapter "
                        "away); use merged_linear() for a dense nn.Linear, or lorakern.merge_lora(model)")

    unmerge = merge

    @torch.no_grad()
    def merged_linear(self, dtype: Optional[torch.dtype] = None) -> nn.Linear:
        """A dense ``nn.Linear`` holding ``dequant(W) + scaling * B @ A``.

        The sum is formed in float32 and rounded once to ``dtype`` (default: the
        compute dtype). It equals this module's output up to that rounding: the NF4
        rounding of W is kept, not undone.
        """
        dtype = self.compute_dtype if dtype is None else dtype
        weight = self.dequantized_weight(torch.float32) + self.delta_weight(torch.float32)
        return _new_linear(weight.to(dtype), self.bias, dtype)

    @torch.no_grad()
    def to_lora_linear(self, dtype: Optional[torch.dtype] = None) -> LoRALinear:
        """A :class:`LoRALinear` with the dequantized base in ``dtype`` sharing this module's lora_A / lora_B."""
        dtype = self.compute_dtype if dtype is None else dtype
        bias = None if self.bias is None else self.bias.detach().to(dtype).clone()
        dense = LoRALinear(self.dequantized_weight(dtype), bias, self.r, self.alpha, self.dropout, self.use_rslora,
                           self.init, self.fan_in_fan_out)
        dense.lora_A, dense.lora_B = self.lora_A, self.lora_B
        dense.train(self.training)
        return dense

    def nbytes(self) -> dict[str, int]:
        """Bytes held by the base (packed weight + quantization state) and by the adapter."""
        base = sum(t.numel() * t.element_size() for t in self.quantized_weight().tensors())
        adapter = sum(p.numel() * p.element_size() for p in (self.lora_A, self.lora_B))
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return {"base": base, "bias": bias, "adapter": adapter}

    # ------------------------------------------------------------ device / dtype moves

    def _apply(self, fn, recurse=True):
        return apply_keeping_quant_state(self, super()._apply, fn, recurse)

    # ------------------------------------------------------------------------ state dict

    # torch.distributed.checkpoint (get_model_state_dict, DCP, FSDP2 checkpointing) maps each
    # state-dict key to a name by walking it with getattr: ``weight.quant_state.bitsandbytes__nf4``
    # needs an object path that a plain (or sharded DTensor) weight does not have. Its hook,
    # ``_fqn_modifiers``, sends the walk of ``weight.*`` through this class-level stand-in.
    _bnb_key_names = SimpleNamespace(weight=SimpleNamespace(**{  # each suffix of _BNB_SUFFIXES, as attributes
        suffix.split(".")[0]: SimpleNamespace(**{suffix.split(".")[1]: None}) if "." in suffix else None
        for suffix in _BNB_SUFFIXES}))

    def _fqn_modifiers(self) -> dict[str, str]:
        return {"weight": "_bnb_key_names"}

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        wkey = prefix + "weight"
        destination[wkey] = self.weight if keep_vars else self.weight.detach()
        for key, value in nf4_format.to_bnb_state_dict(self.quantized_weight(), wkey).items():
            if key != wkey:
                destination[key] = value
        for name in ("bias", "lora_A", "lora_B"):
            param = getattr(self, name)
            if param is not None:
                destination[prefix + name] = param if keep_vars else param.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        wkey = prefix + "weight"
        quant_keys = {wkey, *(f"{wkey}.{s}" for s in _BNB_SUFFIXES)}
        assign = bool(local_metadata.get("assign_to_params_buffers", False))  # load_state_dict(..., assign=True)
        dense = state_dict.get(wkey)
        if (isinstance(dense, Tensor) and dense.is_floating_point()
                and f"{wkey}.{nf4_format.QUANT_STATE_KEY}" not in state_dict):
            error_msgs.append(f"{wkey}: a dense {str(dense.dtype).removeprefix('torch.')} weight of shape "
                              f"{tuple(dense.shape)}, but this layer holds its weight in NF4 (bitsandbytes' keys "
                              f"{wkey}.absmax, ..., {wkey}.{nf4_format.QUANT_STATE_KEY}); load dense weights into "
                              "the model before apply_lora(quantize='nf4'), which quantizes them")
        elif wkey in state_dict:
            try:
                q = nf4_format.from_bnb_state_dict({k: state_dict[k] for k in quant_keys if k in state_dict}, wkey)
                self._set_quantized(q, (self.out_features, self.in_features), assign)
            except (QuantStateError, ValueError) as e:
                error_msgs.append(f"{wkey}: {e}{_wrapper_hint(prefix, state_dict, wkey)}")
        else:
            missing_keys.append(wkey)
        local = ("bias", "lora_A", "lora_B")
        for name in local:
            param, key = getattr(self, name), prefix + name
            if key not in state_dict:
                if param is not None:
                    missing_keys.append(key)
                continue
            value = state_dict[key]
            if param is None:
                unexpected_keys.append(key)
            elif not isinstance(value, Tensor) or value.shape != param.shape:
                error_msgs.append(f"size mismatch for {key}: expected {tuple(param.shape)}, "
                                  f"got {tuple(getattr(value, 'shape', ()))}")
            elif assign:  # torch's rule: the module's Parameter-ness and requires_grad are kept
                value = value if isinstance(value, nn.Parameter) else nn.Parameter(value, param.requires_grad)
                setattr(self, name, value.requires_grad_(param.requires_grad))
            else:
                with torch.no_grad():
                    param.copy_(value)
        if strict:
            unexpected_keys.extend(k for k in state_dict
                                   if k.startswith(prefix) and k not in quant_keys and k[len(prefix):] not in local)

    def extra_repr(self) -> str:
        dq = "nf4+double_quant" if self.double_quant else "nf4"
        fifo = ", fan_in_fan_out=True" if self.fan_in_fan_out else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"{self._lora_repr()}, base={dq}(blocksize={self.blocksize}), "
                f"compute_dtype={str(self.compute_dtype).removeprefix('torch.')}{fifo}")
