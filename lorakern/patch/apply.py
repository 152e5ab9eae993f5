"""apply_lora / merge_lora: swap linear layers of any model for LoRA modules in place, and back."""

from __future__ import annotations

import contextlib
import copy
import functools
import re
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from ..nn import LoRAExperts, LoRALinear, QLoRALinear
from ..nn._base import check_lora_args
from ..nn.qlora import is_bnb_linear4bit
from .targets import (Selector, expert_stacks, kept_in_full_precision, outermost, resolve_parameters,
                      resolve_targets, select, task_heads)

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
    # "<module_to_save>.<tensor name>" -> a frozen copy of that parameter or buffer as apply_lora found it
    # (the base model's), for disable_adapters; PEFT keeps the same copy as its ``original_module``
    base_copies: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)


def lora_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> LoRALinear / QLoRALinear / LoRAExperts for every adapted layer or expert weight."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (LoRALinear, QLoRALinear, LoRAExperts))}


def lora_state(model: nn.Module) -> Optional[LoRAState]:
    return getattr(model, STATE_ATTR, None)


def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside (DistributedData)Parallel (``.module``) or torch.compile (``._orig_mod``).

    Layer names, the patch record and adapter keys belong to the user's model; a wrapper
    would add its own prefix (``_orig_mod.model.layers.0...``).
    """
    while True:
        kind = type(model).__name__
        if kind in ("DistributedDataParallel", "DataParallel") and isinstance(getattr(model, "module", None), nn.Module):
            model = model.module
        elif kind == "OptimizedModule" and isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _is_peft_tuner_layer(module: nn.Module) -> bool:
    """A layer PEFT injected (``peft.tuners.*``: LoRA layers, modules_to_save wrappers), recognised without
    importing peft; a LoRA layer from elsewhere by PEFT's layout (``base_layer`` beside ``lora_A``)."""
    return type(module).__module__.startswith("peft.tuners") or \
        (isinstance(getattr(module, "base_layer", None), nn.Module) and hasattr(module, "lora_A"))


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
        exclude: names (same forms, no "all-linear") removed from the targets, with every
            layer inside them (``["model.layers.0"]`` leaves that block out).
        modules_to_save: modules kept whole and trainable (e.g. a new classification head);
            :func:`save_adapter` stores their full weights, as PEFT does. Targets inside them
            are dropped, as PEFT drops them (``"dense"`` on RoBERTa adapts the encoder's
            dense layers; its ``classifier.dense`` trains whole with the classifier).
            Default (None): on a transformers task model, its task heads
            (:func:`~lorakern.patch.targets.task_heads`: ``classifier`` / ``score``, and
            DistilBERT's ``pre_classifier``; ``qa_outputs``), as PEFT's task wrappers
            (task_type SEQ_CLS, TOKEN_CLS, QUESTION_ANS) train them; elsewhere none.
            ``[]``: none (a LoRA target inside a task head is then adapted as any
            other, and the adapter is one for PEFT's generic model).
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

    All or nothing: every target is checked before any is swapped (with ``quantize``:
    a weight on the meta device, in float64, empty, or holding NaN/inf; an error
    names the layer), and if building a layer still fails, the layers swapped so far
    are put back with their ``requires_grad`` flags before the error is raised.
    Layers quantized where they lie (``quantize`` without ``device``) free their
    full-precision weight one by one, so the peak stays the model's own size; those
    cannot be put back, and a failure after one of them (out of memory) is an error
    saying the model must be reloaded.

    A ``torch.compile`` or (DistributedData)Parallel wrapper is patched inside:
    the names returned are the wrapped model's. Each ``modules_to_save`` module's
    weights are copied once (frozen, beside the model, as PEFT's
    ``original_module``) so that :func:`disable_adapters` gives the base model.

    A transformers model with gradient checkpointing already on gets its input
    embeddings' outputs marked as requiring grad (``enable_input_require_grads``, as
    PEFT's ``get_peft_model`` does): with ``use_reentrant=True`` a checkpointed block
    whose inputs do not require grad gives its LoRA layers no gradient, and a model
    whose first block is checkpointed (ViT, Whisper) fails in backward.
    """
    names, _ = _patch(model, target_modules, r, alpha, dropout, quantize, exclude, modules_to_save, use_rslora, init,
                      compute_dtype, device, target_parameters, rank_pattern, alpha_pattern, reversible=False)
    return names


def patch_reversibly(model: nn.Module, **options) -> tuple[list[str], Callable[[BaseException], None]]:
    """:func:`apply_lora` with ``options``; also return ``revert(cause)``, which puts the model back as it was
    (layers, expert weights, ``requires_grad`` flags, the patch record) for a caller whose own later step failed.

    Layers quantized in place cannot be put back: then ``revert`` raises a RuntimeError
    saying the model must be reloaded (chained to ``cause``). Until ``revert`` is dropped
    it holds the replaced layers, which share their weights with the new dense ones.
    """
    return _patch(unwrap(model), reversible=True, **options)


def _patch(model: nn.Module, target_modules: Selector = "all-linear", r: int = 16, alpha: float = 32,
           dropout: float = 0.0, quantize: Optional[str] = None, exclude: Optional[Selector] = None,
           modules_to_save: Optional[Selector] = None, use_rslora: bool = False, init: str = "kaiming",
           compute_dtype: Optional[torch.dtype] = None, device: Optional[torch.device | str] = None,
           target_parameters: Optional[Selector] = None, rank_pattern: Optional[dict] = None,
           alpha_pattern: Optional[dict] = None, *, reversible: bool):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    model = unwrap(model)
    already = lora_modules(model)
    if already or lora_state(model) is not None:
        raise RuntimeError(f"model already has LoRA layers ({len(already)}, e.g. {next(iter(already), '?')!r}); "
                           "apply_lora works once per model (merge_lora first to start over)")
    peft_layers = [n for n, m in model.named_modules() if _is_peft_tuner_layer(m)]
    if peft_layers:
        raise RuntimeError(f"the model already has PEFT adapters ({len(peft_layers)} layers, e.g. "
                           f"{peft_layers[0]!r}); merge_and_unload() them first, or load the adapter with "
                           "lorakern.load_adapter into the plain base model")
    check_lora_args(r, alpha, dropout, init, use_rslora)
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
    if modules_to_save is None:
        # as PEFT's task wrappers: the task head (new, randomly initialised) trains whole, and targets
        # inside it are dropped (a RoBERTa classifier's dense layer, matched by "dense")
        keep = task_heads(model)
    elif isinstance(modules_to_save, (list, tuple)) and not modules_to_save:
        keep = []
    else:
        keep = outermost(select(names, modules_to_save, "modules_to_save"))
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

    def nf4(name: str) -> bool:
        return quantize == "nf4" and name not in dense

    def nf4_stack(key: str, weight: torch.Tensor) -> bool:
        # a 2-D weight (a router's) stays dense: bitsandbytes' 4-bit loading leaves routers dense too
        return nf4(key.rpartition(".")[0]) and weight.dim() == 3

    _check_targets(model, targets, parameters, nf4, nf4_stack)

    def build(name: str, old: nn.Module) -> nn.Module:
        r_, alpha_ = pattern_value(rank_pattern, name, r), pattern_value(alpha_pattern, name, alpha)
        if is_bnb_linear4bit(old):  # already NF4 (load_in_4bit): the same 4-bit weight, whatever quantize says
            return QLoRALinear.from_bnb_linear4bit(old, r_, alpha_, dropout, use_rslora, init,
                                                   compute_dtype=compute_dtype, device=device)
        if nf4(name):
            return QLoRALinear.from_linear(old, r_, alpha_, dropout, use_rslora, init, compute_dtype=compute_dtype,
                                           device=device)
        return LoRALinear.from_linear(old, r_, alpha_, dropout, use_rslora, init)

    def build_experts(key: str, weight: torch.Tensor, transposed: bool) -> LoRAExperts:
        quantized = nf4_stack(key, weight)
        source = weight.detach().to(device) if quantized and device is not None else weight
        return LoRAExperts(source, transposed, pattern_value(rank_pattern, key, r),
                           pattern_value(alpha_pattern, key, alpha), dropout, use_rslora, init,
                           quantize="nf4" if quantized else None, compute_dtype=compute_dtype if quantized else None)

    def in_place(name: str) -> bool:  # quantized on the weight's own device: keeping the original costs memory
        return device is None and nf4(name) and not is_bnb_linear4bit(model.get_submodule(name))

    undo = _Undo(model)
    try:
        for name in targets:
            undo.steps.append(_swap_layer(model, name, build, keep_original=not in_place(name)))
        for key in parameters:  # (the stack is not held in a local: it would outlive its swap)
            in_place_stack = device is None and nf4_stack(key, model.get_parameter(key))
            undo.steps.append(_swap_parameter(model, key, build_experts, keep_original=not in_place_stack))
        for p in model.parameters():
            p.requires_grad_(False)
        for module in lora_modules(model).values():
            module.lora_A.requires_grad_(True)
            module.lora_B.requires_grad_(True)
        for name in keep:
            for p in model.get_submodule(name).parameters():
                p.requires_grad_(True)
        base_copies = {f"{name}.{key}": t.detach().clone() for name in keep
                       for key, t in _tensors(model.get_submodule(name))}
        setattr(model, STATE_ATTR, LoRAState(targets, r, float(alpha), float(dropout), bool(use_rslora), init,
                                             quantize, keep, base_copies))
        undo.enabled_input_grads = _checkpointed_inputs_require_grad(model)
    except BaseException as e:
        undo.revert(e, "apply_lora")
        raise
    if not reversible:  # (the replaced layers are freed with ``undo`` on return)
        return targets + parameters, None
    return targets + parameters, functools.partial(undo.revert, what="load_adapter")


class _Undo:
    """The changes :func:`apply_lora` made to a model, to put back if a later step fails."""

    def __init__(self, model: nn.Module):
        self.model = model
        # by name, not the tensors: a list of them would keep every replaced full-precision weight alive
        self.requires_grad = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
        self.steps: list = []  # one callable per swap, run in reverse (None: a layer quantized in place)
        self.enabled_input_grads = False

    def revert(self, cause: BaseException, what: str) -> None:
        lost = sum(step is None for step in self.steps)
        if lost:
            raise RuntimeError(f"{what} failed after quantizing {lost} layer(s) in place, whose full-precision "
                               "weights are freed: the model cannot be put back as it was; reload it "
                               f"({type(cause).__name__}: {cause})") from cause
        for step in reversed(self.steps):
            step()
        for n, p in self.model.named_parameters(remove_duplicate=False):
            if n in self.requires_grad:
                p.requires_grad_(self.requires_grad[n])
        if self.enabled_input_grads:
            self.model.disable_input_require_grads()
        if hasattr(self.model, STATE_ATTR):
            delattr(self.model, STATE_ATTR)
        self.steps.clear()


def _checkpointed_inputs_require_grad(model: nn.Module) -> bool:
    """Call ``enable_input_require_grads`` on a transformers model with gradient checkpointing on, unless its
    hooks are already there; return whether it was called."""
    # (transformers' is_activation_checkpointing, read directly: its older name warns)
    checkpointing = any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())
    enable = getattr(model, "enable_input_require_grads", None)
    if not checkpointing or not callable(enable) or getattr(model, "_require_grads_hooks", None) \
            or getattr(model, "_require_grads_hook", None) is not None:
        return False
    enable()
    return True


def _check_quantizable(name: str, weight: torch.Tensor) -> None:
    """What NF4 quantization needs of a weight, checked on every target before any layer is swapped."""
    if weight.device.type == "meta":
        raise ValueError(f"cannot quantize {name!r}: its weight is on the meta device (shape "
                         f"{tuple(weight.shape)}, no data); load or materialize the weights first")
    if weight.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"cannot quantize {name!r}: its weight is {weight.dtype}; NF4 quantizes float32, float16 or "
                        "bfloat16 weights (cast the model, or leave the layer out with exclude=)")
    if weight.numel() == 0:
        raise ValueError(f"cannot quantize {name!r}: its weight is empty (shape {tuple(weight.shape)})")
    # (from_linear checks this again while quantizing; found only there, it would come after layers
    # quantized in place, which cannot be put back)
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"cannot quantize {name!r}: its weight holds NaN/inf values, which NF4 cannot represent")


def _check_targets(model: nn.Module, targets: list[str], parameters: list[str], nf4, nf4_stack) -> None:
    """What building each layer needs of its weight, checked on every target before any is swapped."""
    for name in targets:
        module = model.get_submodule(name)
        if nf4(name) and not is_bnb_linear4bit(module):
            _check_quantizable(name, module.weight)
    for key in parameters:
        weight = model.get_parameter(key)
        if weight.device.type == "meta":
            raise ValueError(f"cannot adapt {key!r}: it is on the meta device (shape {tuple(weight.shape)}, no "
                             "data); load or materialize the weights first")
        if nf4_stack(key, weight):
            _check_quantizable(key, weight)


def _swap_layer(model: nn.Module, name: str, build, keep_original: bool = True):
    """Replace the layer ``name`` by ``build(name, layer)``; return the undo (None without ``keep_original``:
    the last reference to the old layer, and a quantized layer's full-precision weight, is dropped here)."""
    old = model.get_submodule(name)
    new = build(name, old)
    new.train(old.training)
    _replace(model, name, new)
    return functools.partial(_replace, model, name, old) if keep_original else None


def _swap_parameter(model: nn.Module, key: str, build, keep_original: bool = True):
    """Replace the expert weight ``key`` (``<module>.<parameter>``) by ``build(key, weight, transposed)``, a
    LoRAExperts registered as a submodule of that name; return the undo (None without ``keep_original``)."""
    mname, _, pname = key.rpartition(".")
    owner = model.get_submodule(mname)
    weight = owner.get_parameter(pname)
    new = build(key, weight, bool(getattr(owner, "is_transposed", False)))
    new.train(owner.training)
    new.replaced_config = _eager_experts(owner) if weight.dim() == 3 else None
    # The owner's registration order before any of its weights was swapped (an earlier swap of
    # the same owner recorded it): undo and merge_lora set weights back in it.
    earlier = [m.parameter_order for m in owner.children() if getattr(m, "parameter_order", None)]
    order = list(earlier[0]) if earlier else list(owner._parameters)
    new.parameter_order = tuple(order)
    del owner._parameters[pname]
    owner.add_module(pname, new)

    def undo():
        del owner._modules[pname]
        owner._parameters[pname] = weight
        _restore_order(owner, order)
        if new.replaced_config is not None:
            owner.config = new.replaced_config
    if not keep_original:
        del weight
        return None
    return undo


def _restore_order(owner: nn.Module, order) -> None:
    """Put ``owner``'s parameters in the registration ``order`` they had (those present; others after):
    state_dict and optimizer order follow it."""
    params = dict(owner._parameters)
    owner._parameters.clear()
    owner._parameters.update((name, params.pop(name)) for name in order if name in params)
    owner._parameters.update(params)


def _tensors(module: nn.Module):
    """(name, tensor) for every parameter and buffer of ``module``."""
    yield from module.named_parameters()
    yield from ((n, b) for n, b in module.named_buffers() if b is not None)


def pattern_value(patterns: dict, name: str, default):
    r"""PEFT's rank_pattern / alpha_pattern lookup: the value of the first key whose regex matches the
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
    """Context manager: inside it, ``model`` computes the base model's outputs.

    Every LoRA layer and expert weight computes its base alone, and every
    ``modules_to_save`` module (trained whole) runs with the weights it had when
    :func:`apply_lora` patched the model (the frozen copy kept then, as PEFT's
    ``disable_adapter`` runs its ``original_module``). For reference outputs of the
    base model without a second copy of it (DPO and other preference losses, KL
    penalties, before/after comparisons). No dropout mask is drawn and the adapter's
    gradients are zero; on exit each layer is as it was, the trained modules_to_save
    parameters included (nesting is fine). A merged LoRALinear (``merge()``) cannot
    drop its adapter and raises in forward.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = unwrap(model)
    modules = lora_modules(inner)
    if not modules:
        raise ValueError("model has no LoRA layers; call apply_lora (or load_adapter) first")
    before = [(m, m.__dict__.get("adapter_enabled")) for m in modules.values()]
    restore = _swap_in_base_copies(inner)
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
        for slots, attr, tensor in restore:
            slots[attr] = tensor


def _swap_in_base_copies(model: nn.Module) -> list:
    """Put the base copies of the modules_to_save weights in place of the trained ones, in every module that
    holds a trained one (a tied partner such as the input embeddings too); return ``(slots, name, trained)``
    to put back."""
    state = lora_state(model)
    if state is None or not state.modules_to_save:
        return []
    base: dict[int, torch.Tensor] = {}  # id(trained tensor) -> its base copy, on its device and in its dtype
    for name in state.modules_to_save:
        for key, tensor in _tensors(model.get_submodule(name)):
            copy_key = f"{name}.{key}"
            original = state.base_copies.get(copy_key)
            if original is None or original.shape != tensor.shape:
                change = "is new" if original is None else \
                    f"changed shape from {tuple(original.shape)} to {tuple(tensor.shape)}"
                raise RuntimeError(f"disable_adapters: modules_to_save tensor {copy_key!r} {change} since apply_lora; "
                                   "the base model's value of it is unknown")
            if (original.device, original.dtype) != (tensor.device, tensor.dtype):
                original = state.base_copies[copy_key] = original.to(tensor.device, tensor.dtype)
            base[id(tensor)] = original
    swapped, done = [], set()
    for module in model.modules():
        for slots in (module._parameters, module._buffers):
            for attr, tensor in list(slots.items()):
                if tensor is None or id(tensor) not in base or (id(slots), attr) in done:
                    continue
                original = base[id(tensor)]
                slots[attr] = nn.Parameter(original, requires_grad=False) if slots is module._parameters else original
                swapped.append((slots, attr, tensor))
                done.add((id(slots), attr))
    return swapped


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
    expects. Dense layers keep their weight dtype; NF4 layers become dense
    (``dequant(W) + scaling * B @ A``, formed in float32) in the dtype of the rest
    of the model (the most common among its other floating parameters: a float32
    model quantized with a bf16 compute dtype, or a bf16 model loaded in 4-bit with
    bitsandbytes' float32 default, stays one dtype), else their compute dtype; NF4
    expert stacks in the dtype their parameter had.
    Returns ``model`` (changed in place) with the patch record removed.
    """
    wrapper, model = model, unwrap(model)
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRA layers to merge")
    dtype = _rest_dtype(model, modules)
    # Popped one by one: a layer swapped out is freed before the next is merged, so the peak is
    # the model plus one layer (a dict holding them all kept every old dense weight alive until
    # the end: +229 MB against +85 MB on a bf16 model with 196 MB of adapted layers). First to
    # last: an expert Parameter set back is appended to its owner's parameters, and state_dict
    # and optimizer order follow the order they are set back in.
    for name in list(modules):
        module = modules.pop(name)
        if isinstance(module, LoRAExperts):
            owner = model.get_submodule(name.rpartition(".")[0])
            setattr(owner, name.rpartition(".")[2], module.merged_parameter())
            _restore_order(owner, getattr(module, "parameter_order", ()))  # (setattr appends it last)
            if module.replaced_config is not None:
                owner.config = module.replaced_config
            del module
            continue
        linear = module.merged_linear(dtype if isinstance(module, QLoRALinear) else None)
        if module.fan_in_fan_out:
            linear = _to_conv1d(linear)
        linear.train(module.training)
        _replace(model, name, linear)
        del module, linear
    if hasattr(model, STATE_ATTR):
        delattr(model, STATE_ATTR)
    _drop_hf_quantization(model)
    return wrapper


def _rest_dtype(model: nn.Module, modules: dict) -> Optional[torch.dtype]:
    """The most common floating dtype among ``model``'s parameters outside its LoRA modules (None: none)."""
    inside = {id(p) for m in modules.values() for p in m.parameters()}
    counts: dict = {}
    for p in model.parameters():
        if id(p) not in inside and p.is_floating_point():
            counts[p.dtype] = counts.get(p.dtype, 0) + p.numel()
    return max(counts, key=counts.get) if counts else None


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
    else:
        for owner, attr in ((model, "hf_quantizer"), (getattr(model, "config", None), "quantization_config"),
                            (model, "quantization_method")):
            if owner is not None and hasattr(owner, attr):
                delattr(owner, attr)
        model.is_quantized = False
    if getattr(model, "is_loaded_in_4bit", False):  # read by e.g. PEFT's prepare_model_for_kbit_training
        model.is_loaded_in_4bit = False


def _to_conv1d(linear: nn.Linear) -> nn.Module:
    from transformers.pytorch_utils import Conv1D

    n, k = linear.weight.shape
    conv = Conv1D(n, k)
    conv.weight = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
    bias = linear.bias if linear.bias is not None else torch.zeros(n, dtype=linear.weight.dtype)
    conv.bias = nn.Parameter(bias.detach().to(linear.weight.device), requires_grad=False)
    return conv
