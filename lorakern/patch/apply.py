"""apply_lora / merge_lora: swap linear layers of any model for LoRA modules in place, and back."""

from __future__ import annotations

import contextlib
import copy
import re
import warnings
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from ..nn import LoRAExperts, LoRALinear, QLoRALinear
from ..nn._base import check_lora_args
from ..nn.qlora import is_bnb_linear4bit
from .targets import (Selector, expert_stacks, kept_in_full_precision, resolve_parameters, resolve_targets,
                      select)

QUANTIZE = (None, "nf4")
# Attribute on a patched model recording how it was patched (read by save_adapter).
STATE_ATTR = "_lorakern_lora"


@dataclass
class LoRAState:
    """What apply_lora did to a model: enough to write a faithful adapter_config.json."""

    targets: list[str]
    r: int
    alpha: float
    dropout: float
    use_rslora: bool
    init: str
    quantize: Optional[str]
    modules_to_save: list[str] = field(default_factory=list)


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> LoRALinear / QLoRALinear / LoRAExperts for every adapted layer or expert weight."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, QLoRALinear, LoRAExperts))}


def lora_state(model: nn.Module) -> Optional[LoRAState]:
    return getattr(model, STATE_ATTR, None)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def apply_lora(model: nn.Module, target_modules: Selector = "all-linear", r: int = 16, alpha: float = 32,
               dropout: float = 0.0, quantize: Optional[str] = None, exclude: Optional[Selector] = None,
               modules_to_save: Optional[Selector] = None, use_rslora: bool = False, init: str = "kaiming",
               compute_dtype: Optional[torch.dtype] = None,
               device: Optional[torch.device | str] = None,
               target_parameters: Optional[Selector] = None, rank_pattern: Optional[dict] = None,
               alpha_pattern: Optional[dict] = None) -> list[str]:
    """Replace the targeted linear layers of ``model`` by LoRA layers, in place; return their qualified names.

    Each target (``nn.Linear`` or transformers ``Conv1D``) becomes a
    :class:`~lorakern.nn.LoRALinear` sharing its weight, or with
    ``quantize="nf4"`` a :class:`~lorakern.nn.QLoRALinear` whose NF4 copy replaces
    the full-precision weight (freed once nothing else holds it; a weight tied to
    another module stays alive through that module). The swap is a ``setattr`` on
    the parent module: no class is modified and no source is rewritten.

    Afterwards only ``lora_A`` / ``lora_B`` and the parameters of ``modules_to_save``
    require gradients; every other parameter is frozen.

    Args:
        target_modules: "all-linear", a list of names (exact or ``.``-suffix match), or a
            full-match regex; see :mod:`lorakern.patch.targets`. None: no layer (with
            ``target_parameters`` only).
        target_parameters: fused MoE expert weights to adapt, as PEFT's option of that
            name: ``"all-experts"`` or names such as ``["experts.gate_up_proj",
            "experts.down_proj"]``. Each becomes a :class:`~lorakern.nn.LoRAExperts`
            (one adapter per expert; NF4 per expert with ``quantize``), and the
            returned names include ``<module>.<parameter>`` for each. transformers
            experts modules are switched to their "eager" implementation (the loop
            over the routed experts), where each expert's matmul is one fused op.
        exclude: names (same forms, no "all-linear") removed from the targets.
        modules_to_save: modules kept whole and trainable (e.g. a new classification head);
            :func:`save_adapter` stores their full weights, as PEFT does.
        r, alpha, dropout, use_rslora, init: the adapter (see :class:`~lorakern.nn.LoRALinear`).
        rank_pattern, alpha_pattern: per-target r / alpha, as PEFT's options of these
            names: ``{regex: value}``; a target whose qualified name ends with a match
            of the regex (at a ``.`` boundary) takes the first such value.
        quantize: None (dense base) or "nf4". Layers a Hugging Face model keeps
            in full precision (``_keep_in_fp32_modules``, e.g. T5's ``wo``) get a
            dense LoRALinear, as when transformers loads the model in 4-bit.
            Layers that already are bitsandbytes NF4 ``Linear4bit`` (a model loaded
            with ``BitsAndBytesConfig(load_in_4bit=True)``) become QLoRALinear
            holding the same 4-bit weight, bit for bit, whatever ``quantize`` says.
        compute_dtype: NF4 layers only; default the weight's original dtype.
        device: NF4 layers only: build each one on this device, one layer's
            full-precision weight copied there at a time. A model loaded on the CPU
            then fits a GPU that could not hold it in full precision (an 8B model:
            ~5 GB of NF4 layers instead of 16 GB in bf16); move the rest with
            ``model.to(device)`` afterwards. Default: where each weight is.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    already = lora_modules(model)
    if already or lora_state(model) is not None:
        raise RuntimeError(f"model already has LoRA layers ({len(already)}, e.g. {next(iter(already), '?')!r}); "
                           "apply_lora works once per model (merge_lora first to start over)")
    check_lora_args(r, alpha, dropout, init)
    for what, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        if patterns is not None and not isinstance(patterns, dict):
            raise TypeError(f"{what} must be a dict {{regex: value}} or None, got {type(patterns).__name__}")
    rank_pattern, alpha_pattern = dict(rank_pattern or {}), dict(alpha_pattern or {})
    for what, patterns in (("rank_pattern", rank_pattern), ("alpha_pattern", alpha_pattern)):
        for key, value in patterns.items():
            if not isinstance(key, str) or not key:
                raise TypeError(f"{what} keys must be non-empty regular expression strings, got {key!r}")
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"{what} key {key!r} is not a valid regular expression: {e}") from None
            try:
                check_lora_args(value if what == "rank_pattern" else r, value if what == "alpha_pattern" else alpha,
                                dropout, init)
            except ValueError as e:
                raise ValueError(f"{what}[{key!r}]: {e}") from None
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
    if device is not None and quantize is None:
        raise ValueError("device applies to quantized layers only (quantize='nf4'); move a dense model with "
                         "model.to(device)")
    if device is not None:
        device = torch.device(device)
    if compute_dtype is not None and quantize is None:
        raise ValueError("compute_dtype applies to quantized layers only (quantize='nf4'); a dense LoRALinear "
                         "computes in its weight's dtype, or the autocast dtype")

    names = [n for n, _ in model.named_modules() if n]
    keep = select(names, modules_to_save, "modules_to_save") if modules_to_save is not None else []
    keep = [k for k in keep if not any(k.startswith(other + ".") for other in keep)]
    if target_modules is None and target_parameters is None:
        raise ValueError("target_modules=None adapts no layer: give target_parameters too, or target_modules")
    targets = resolve_targets(model, target_modules, exclude, keep) if target_modules is not None else []
    excluded = select(names, exclude, "exclude") if exclude is not None else []
    parameters = resolve_parameters(model, target_parameters, excluded, keep) if target_parameters is not None else []
    if target_parameters is not None and not parameters:
        raise ValueError(f"exclude={exclude!r} removed every target parameter")
    for key in parameters if dropout > 0.0 else ():
        owner_name, _, pname = key.rpartition(".")
        owner = model.get_submodule(owner_name)
        if getattr(owner, pname).dim() == 3 and not _loops_over_experts(owner):
            raise ValueError(f"dropout={dropout} cannot apply to {key!r}: {type(owner).__name__} reads its expert "
                             "weights as a whole (e.g. torch.bmm over all experts), not as x @ W[e] per expert, so "
                             "there is no per-expert input to drop; use dropout=0")
    dense = kept_in_full_precision(model) if quantize is not None else set()
    if quantize is not None and target_parameters is None:
        _warn_dense_experts(model)

    def rank_alpha(name):
        return pattern_value(rank_pattern, name, r), pattern_value(alpha_pattern, name, alpha)

    for name in targets:
        old = model.get_submodule(name)
        r_, alpha_ = rank_alpha(name)
        if is_bnb_linear4bit(old):  # already NF4 (load_in_4bit): the same 4-bit weight, whatever quantize says
            new = QLoRALinear.from_bnb_linear4bit(old, r_, alpha_, dropout, use_rslora, init,
                                                  compute_dtype=compute_dtype, device=device)
        elif quantize == "nf4" and name not in dense:
            new = QLoRALinear.from_linear(old, r_, alpha_, dropout, use_rslora, init, compute_dtype=compute_dtype,
                                          device=device)
        else:
            new = LoRALinear.from_linear(old, r_, alpha_, dropout, use_rslora, init)
        new.train(old.training)
        _replace(model, name, new)
        del old  # the last reference to a quantized layer's full-precision weight goes here
    for key in parameters:
        mname, _, pname = key.rpartition(".")
        owner = model.get_submodule(mname)
        weight = getattr(owner, pname)
        # a 2-D weight (a router's) stays dense: bitsandbytes' 4-bit loading leaves routers dense too
        nf4 = quantize == "nf4" and mname not in dense and weight.dim() == 3
        if nf4 and weight.device.type == "meta":
            raise ValueError(f"cannot quantize {key}: it is on the meta device (shape {tuple(weight.shape)}, no "
                             "data); load or materialize the weights first")
        source = weight.detach().to(device) if nf4 and device is not None else weight
        new = LoRAExperts(source, bool(getattr(owner, "is_transposed", False)), *rank_alpha(key), dropout,
                          use_rslora, init, quantize="nf4" if nf4 else None,
                          compute_dtype=compute_dtype if nf4 else None)
        new.train(owner.training)
        new.replaced_config = _eager_experts(owner) if weight.dim() == 3 else None
        del owner._parameters[pname]
        owner.add_module(pname, new)
        del weight, source

    for p in model.parameters():
        p.requires_grad_(False)
    for module in lora_modules(model).values():
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)
    for name in keep:
        for p in model.get_submodule(name).parameters():
            p.requires_grad_(True)

    setattr(model, STATE_ATTR, LoRAState(targets, r, float(alpha), float(dropout), bool(use_rslora), init, quantize,
                                         keep))
    return targets + parameters


def pattern_value(patterns: dict, name: str, default):
    """PEFT's rank_pattern / alpha_pattern lookup: the value of the first key whose regex matches the
    end of ``name`` at a ``.`` boundary (``re.match(rf"(.*\.)?({key})$", name)``), else ``default``."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _warn_dense_experts(model: nn.Module) -> None:
    stacks = expert_stacks(model)
    if stacks:
        size = sum(p.numel() * p.element_size() for p in stacks)
        warnings.warn(f"quantize={'nf4'!r} leaves this model's {len(stacks)} fused MoE expert weights "
                      f"({size / 2**30:.2f} GiB) dense: they are parameters, not layers; "
                      "target_parameters='all-experts' quantizes and adapts them", stacklevel=3)


def _loops_over_experts(module: nn.Module) -> bool:
    """A transformers experts module (``@use_experts_implementation``): its eager forward computes
    ``F.linear(x, W[e])`` or ``x @ W[e]`` for each routed expert ``e``."""
    return hasattr(module, "is_transposed") and hasattr(getattr(module, "config", None), "_experts_implementation")


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Context manager: inside it, every LoRA layer and expert weight of ``model`` computes its base alone.

    For reference outputs of the base model without a second copy of it (DPO and
    other preference losses, KL penalties, before/after comparisons). No dropout
    mask is drawn and the adapter's gradients are zero; on exit each layer is as it
    was (nesting is fine). A merged LoRALinear (``merge()``) cannot drop its
    adapter and raises in forward.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRA layers; call apply_lora (or load_adapter) first")
    before = [(m, m.__dict__.get("adapter_enabled")) for m in modules.values()]
    for m in modules.values():
        m.adapter_enabled = False
    try:
        yield model
    finally:
        for m, value in before:
            if value is None:
                m.__dict__.pop("adapter_enabled", None)
            else:
                m.adapter_enabled = value


def _eager_experts(module: nn.Module):
    """Switch a transformers experts module to its eager loop (where each expert's matmul is one fused
    op) on a private copy of its config; return the config it had, or None when nothing changed."""
    config = getattr(module, "config", None)
    if getattr(config, "_experts_implementation", None) in (None, "eager"):
        return None
    eager = copy.copy(config)
    if hasattr(eager, "_experts_implementation_internal"):
        eager._experts_implementation_internal = "eager"  # not the setter: it would also edit shared sub-configs
    else:
        eager._experts_implementation = "eager"
    module.config = eager
    return config


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear / QLoRALinear of ``model`` by a plain layer with the adapter merged in,
    and every LoRAExperts by a plain Parameter ``W + scaling * B @ A`` (its experts module back on
    the experts implementation it had).

    A layer that was a transformers ``Conv1D`` becomes a ``Conv1D`` again (weight
    ``[in, out]``), so ``save_pretrained`` writes the layout the model class
    expects. Dense layers keep their weight dtype; NF4 layers become dense in
    their compute dtype (``dequant(W) + scaling * B @ A``, formed in float32).
    Returns ``model`` (changed in place) with the patch record removed.
    """
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRA layers to merge")
    for name, module in modules.items():
        if isinstance(module, LoRAExperts):
            owner = model.get_submodule(name.rpartition(".")[0])
            setattr(owner, name.rpartition(".")[2], module.merged_parameter())
            if module.replaced_config is not None:
                owner.config = module.replaced_config
            continue
        linear = module.merged_linear()
        if module.fan_in_fan_out:
            linear = _to_conv1d(linear)
        linear.train(module.training)
        _replace(model, name, linear)
    if hasattr(model, STATE_ATTR):
        delattr(model, STATE_ATTR)
    _drop_hf_quantization(model)
    return model


def _drop_hf_quantization(model: nn.Module) -> None:
    """A transformers model loaded in 4-bit whose every 4-bit layer was merged is dense now: drop its
    quantization record, or ``save_pretrained`` would write a quantization_config for dense weights
    (which from_pretrained then loads as uninitialised 4-bit layers). With 4-bit layers left, keep it."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None or any(is_bnb_linear4bit(m) for m in model.modules()):
        return
    if "bitsandbytes" not in type(quantizer).__module__ and "bnb" not in type(quantizer).__module__:
        return
    remove = getattr(quantizer, "remove_quantization_config", None)
    if callable(remove):
        remove(model)
        return
    for owner, attr in ((model, "hf_quantizer"), (getattr(model, "config", None), "quantization_config"),
                        (model, "quantization_method")):
        if owner is not None and hasattr(owner, attr):
            delattr(owner, attr)
    model.is_quantized = False


def _to_conv1d(linear: nn.Linear) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    n, k = linear.weight.shape
    conv = Conv1D(n, k)
    conv.weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
    bias = linear.bias if linear.bias is not None else torch.zeros(n, dtype=linear.weight.dtype)
    conv.bias = nn.Parameter(bias.detach().to(linear.weight.device), requires_grad=False)
    return conv
