"""Which modules of a model get an adapter: PEFT's target_modules semantics, checked strictly.

Forms accepted for ``target_modules`` / ``exclude`` / ``modules_to_save``:

* ``"all-linear"`` (targets only): every ``nn.Linear`` and transformers ``Conv1D``
  except the output head (``model.get_output_embeddings()``) and, on transformers
  task models, the task heads PEFT trains whole as modules_to_save, with every layer
  inside them (``classifier`` / ``score`` of ``*ForSequenceClassification`` and
  ``*ForTokenClassification``, DistilBERT's ``pre_classifier`` too, ``qa_outputs`` of
  ``*ForQuestionAnswering``: see :func:`task_heads`). Also left out: layers whose
  parent reads their weight instead of calling them (``nn.MultiheadAttention``'s
  ``out_proj``, the projections a Mamba mixer hands to its fused kernel:
  ``WEIGHTS_READ_BY_MIXER``), and ``nn.Linear`` subclasses that a
  transformers model defines with a forward of its own (MoE routers such as
  Llama 4's): an adapter on either would be ignored or wrong.
* a list of names: a module matches when its qualified name equals an entry or
  ends with ``"." + entry`` (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``).
* any other string: a regular expression that must match the whole qualified name.

Every list entry must match something, and an explicitly targeted module that
cannot be wrapped is an error naming it and its type: nothing is skipped silently.
"""

from __future__ import annotations

import re
from typing import Iterable, Optional, Sequence, Union

from torch import nn

ALL_LINEAR = "all-linear"

# transformers task models: class-name suffix -> (PEFT task_type, the modules_to_save entries PEFT
# adds for that task type). PEFT's task wrappers train and save the modules these entries match
# whole (see task_heads), so "all-linear" leaves them out (a RoBERTa classifier is a module with
# two Linear children, dense and out_proj: both are left out).
TASK_HEADS = (
    ("ForSequenceClassification", "SEQ_CLS", ("classifier", "score")),
    ("ForTokenClassification", "TOKEN_CLS", ("classifier", "score")),
    ("ForQuestionAnswering", "QUESTION_ANS", ("qa_outputs",)),
)

Selector = Union[str, Sequence[str]]


def is_conv1d(module: nn.Module) -> bool:
    """A transformers ``Conv1D`` (GPT-2 family), recognised without importing transformers."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and hasattr(module, "weight")


# nn.Linear subclasses whose forward computes x @ W^T + b like nn.Linear's (Falcon's
# adds the bias as a separate op, which only changes bf16 rounding), by qualified name.
PLAIN_LINEAR_SUBCLASSES = frozenset({"transformers.models.falcon.modeling_falcon.FalconLinear"})


def _model_specific_forward(module: nn.Module) -> bool:
    """An nn.Linear subclass from a transformers model file with a forward of its own (a MoE router, ...)."""
    cls = type(module)
    return (cls.forward is not nn.Linear.forward and cls.__module__.startswith("transformers.models.")
            and f"{cls.__module__}.{cls.__name__}" not in PLAIN_LINEAR_SUBCLASSES)


# State-space mixers (transformers class name -> child layers) whose weight the mixer reads
# itself: it multiplies by dt_proj.weight, and on a GPU with the mamba_ssm / causal-conv
# kernels installed it hands these weights to one fused kernel. Exact names: Jamba's mixer
# calls its x_proj and out_proj like any layer.
WEIGHTS_READ_BY_MIXER = {
    "MambaMixer": ("x_proj", "dt_proj", "out_proj"),
    "FalconMambaMixer": ("x_proj", "dt_proj", "out_proj"),
    "JambaMambaMixer": ("dt_proj",),
    "Mamba2Mixer": ("out_proj",),
    "FalconH1Mixer": ("out_proj",),
    "BambaMixer": ("out_proj",),
    "NemotronHMamba2Mixer": ("out_proj",),
    "GraniteMoeHybridMambaLayer": ("out_proj",),
    "Zamba2MambaMixer": ("out_proj",),
}


def _weight_read_by_parent(name: str, parent: Optional[nn.Module]) -> Optional[str]:
    leaf = name.rpartition(".")[2]
    if isinstance(parent, nn.MultiheadAttention):
        return (f"{name!r} is the output projection of an nn.MultiheadAttention, which reads its weight "
                f"directly instead of calling it; an adapter there would be ignored")
    kind = type(parent).__name__
    if leaf in WEIGHTS_READ_BY_MIXER.get(kind, ()):
        return (f"{name!r} is a projection of a {kind}, which multiplies by its weight or passes it to a fused "
                f"kernel instead of calling it; an adapter there would be ignored")
    return None


def skipped_by_all_linear(name: str, module: nn.Module, parent: Optional[nn.Module]) -> bool:
    """Linear layers "all-linear" leaves out without an error (see the module docstring)."""
    return _weight_read_by_parent(name, parent) is not None or _model_specific_forward(module)


def unsupported_reason(name: str, module: nn.Module, parent: Optional[nn.Module]) -> Optional[str]:
    """None when ``module`` can be wrapped by LoRALinear / QLoRALinear, else why not."""
    from ..nn.qlora import bnb_linear4bit_reason, is_bnb_linear4bit

    kind = f"{type(module).__module__}.{type(module).__name__}"
    if is_conv1d(module):
        return None
    if is_bnb_linear4bit(module):
        reason = bnb_linear4bit_reason(module)
        return None if reason is None else f"{name!r}: {reason}"
    if not isinstance(module, nn.Linear):
        return f"{name!r} is a {kind}; only nn.Linear and transformers Conv1D layers can take a LoRA adapter"
    if _model_specific_forward(module):
        return (f"{name!r} is a {kind}, an nn.Linear subclass whose forward computes more than x @ W^T + b "
                f"(a router or similar); an adapter cannot be added to its output")
    if type(module).forward is not nn.Linear.forward and kind not in PLAIN_LINEAR_SUBCLASSES:
        return (f"{name!r} is a {kind}, an nn.Linear subclass with its own forward (already quantized or "
                f"adapted?); load the model with plain nn.Linear layers and use apply_lora(quantize=...)")
    return _weight_read_by_parent(name, parent)


def _hf_pattern_matches(name: str, pattern: str) -> bool:
    """transformers' rule for ``_keep_in_fp32_modules`` entries: a regex matching from the start up to
    a ``.`` boundary, or a suffix at a ``.`` boundary."""
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        m = re.match(pattern, name)
    except re.error:
        return False
    return m is not None and (m.end() == len(name) or name[m.end()] == "." or name[m.end() - 1] == ".")


def kept_in_full_precision(model: nn.Module) -> set[str]:
    """Qualified names of the modules a Hugging Face model keeps out of quantization.

    transformers models list them in ``_keep_in_fp32_modules`` (and
    ``_keep_in_fp32_modules_strict``), patterns relative to the model class that
    declares them; T5's feed-forward output ``wo`` is one: its code compares
    ``wo.weight.dtype`` with the activations' and casts to it. Loading such a
    model in 4-bit with bitsandbytes leaves these layers dense; so does
    :func:`lorakern.apply_lora` with ``quantize``. A module inside a matched one
    is matched too.
    """
    named = list(model.named_modules())
    kept: set[str] = set()
    for prefix, owner in named:
        patterns = []
        for attr in ("_keep_in_fp32_modules", "_keep_in_fp32_modules_strict"):
            value = getattr(type(owner), attr, None)
            if isinstance(value, (list, tuple, set)):
                patterns += [p for p in value if isinstance(p, str) and p]
        if not patterns:
            continue
        start = prefix + "." if prefix else ""
        for name, _ in named:
            if name.startswith(start) and name != prefix:
                rel = name[len(start):]
                if any(_hf_pattern_matches(rel, p) or _hf_pattern_matches(rel + ".weight", p) for p in patterns):
                    kept.add(name)
    return {n for n in (name for name, _ in named) if n in kept or any(n.startswith(k + ".") for k in kept)}


def _check_selector(value, what: str, allow_all_linear: bool) -> None:
    if isinstance(value, str):
        if value == ALL_LINEAR and not allow_all_linear:
            raise ValueError(f"{what}={ALL_LINEAR!r} is only meaningful for target_modules")
        if value != ALL_LINEAR:
            try:
                re.compile(value)
            except re.error as e:
                raise ValueError(f"{what} string {value!r} is not a valid regular expression: {e}") from None
        return
    if isinstance(value, (list, tuple, set, frozenset)) and value and all(isinstance(v, str) and v for v in value):
        return
    raise TypeError(f"{what} must be {'all-linear, ' if allow_all_linear else ''}a regular expression string or a "
                    f"non-empty list of module names, got {value!r}")


def name_matches(name: str, entry: str) -> bool:
    return name == entry or name.endswith("." + entry)


def select(names: Iterable[str], selector: Selector, what: str) -> list[str]:
    """The names matched by a list or regex ``selector``; every list entry must match at least one name."""
    names = list(names)
    _check_selector(selector, what, allow_all_linear=False)
    if isinstance(selector, str):
        pattern = re.compile(selector)
        hits = [n for n in names if pattern.fullmatch(n)]
        if not hits:
            raise ValueError(f"{what} regex {selector!r} matched no module name (example names: {_examples(names)})")
        return hits
    entries = list(dict.fromkeys(selector))
    unmatched = [e for e in entries if not any(name_matches(n, e) for n in names)]
    if unmatched:
        raise ValueError(f"{what} entries matched no module: {unmatched} (example names: {_examples(names)})")
    return [n for n in names if any(name_matches(n, e) for e in entries)]


def _examples(names: list[str], limit: int = 6) -> str:
    leaves = list(dict.fromkeys(n for n in names if n))
    shown = ", ".join(leaves[:limit])
    return shown + (", ..." if len(leaves) > limit else "") if shown else "none"


def inside(name: str, roots: Iterable[str]) -> bool:
    """``name`` is one of ``roots`` or a module inside one."""
    return any(name == k or name.startswith(k + ".") for k in roots)


def outermost(names: Sequence[str]) -> list[str]:
    """``names`` without those inside another of them, in order."""
    return [n for n in names if not any(n.startswith(other + ".") for other in names)]


def peft_modules_to_save(names: Iterable[str], entries: Sequence[str]) -> list[str]:
    """The modules PEFT wraps for the ``modules_to_save`` ``entries``: those whose qualified name ends with an
    entry, as a plain string (no ``.`` boundary: ``"classifier"`` matches DistilBERT's ``pre_classifier``),
    outermost only."""
    return outermost([n for n in names if n and any(n.endswith(e) for e in entries)])


def task_heads(model: nn.Module) -> list[str]:
    """The modules PEFT's task wrapper for ``model`` trains and saves whole, in model order:
    ``["classifier"]`` for ``BertForSequenceClassification``, ``["pre_classifier", "classifier"]``
    for DistilBERT's (PEFT matches its entries, :data:`TASK_HEADS`, by plain name suffix:
    :func:`peft_modules_to_save`); empty for other models."""
    kind = type(model).__name__
    for suffix, _, entries in TASK_HEADS:
        if kind.endswith(suffix):
            return peft_modules_to_save((n for n, _ in model.named_modules()), entries)
    return []


def output_heads(model: nn.Module) -> set[str]:
    """Qualified names of the output head(s) that "all-linear" leaves alone, with every layer inside them."""
    modules = {id(m): n for n, m in model.named_modules()}
    heads = set(task_heads(model))
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if isinstance(head, nn.Module) and id(head) in modules:
        heads.add(modules[id(head)])
    return heads


def resolve_targets(model: nn.Module, target_modules, exclude=None, keep=()) -> list[str]:
    """Qualified names to wrap, in ``named_modules`` order.

    ``keep`` lists modules that stay whole and trainable (modules_to_save): they
    and their children are never targets; a target inside one is dropped, as PEFT
    drops it (a RoBERTa ``classifier.dense`` matched by ``"dense"`` trains whole
    with its classifier). ``exclude`` removes the modules it names and every
    module inside them (``exclude=["model.layers.0"]`` leaves that block out).
    """
    _check_selector(target_modules, "target_modules", allow_all_linear=True)
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    parents = {n: modules[n.rpartition(".")[0]] for n in names}

    def inside_kept(n: str) -> bool:
        return inside(n, keep)

    excluded = outermost(select(names, exclude, "exclude")) if exclude is not None else []
    if target_modules == ALL_LINEAR:
        heads = output_heads(model)
        candidates = [n for n in names if isinstance(modules[n], nn.Linear) or is_conv1d(modules[n])]
        chosen = []
        for n in candidates:
            if inside(n, heads) or inside_kept(n) or inside(n, excluded) \
                    or skipped_by_all_linear(n, modules[n], parents[n]):
                continue
            reason = unsupported_reason(n, modules[n], parents[n])
            if reason is not None:
                raise TypeError(f"all-linear: {reason}")
            chosen.append(n)
        if not chosen:
            raise ValueError("target_modules='all-linear' found no nn.Linear or Conv1D layer (outside the output head)")
    else:
        chosen = select(names, target_modules, "target_modules")
        kept = [n for n in chosen if inside_kept(n)]
        chosen = [n for n in chosen if not inside_kept(n)]
        if kept and not chosen:
            raise ValueError(f"every target ({kept[:5]}) lies inside modules_to_save {list(keep)}, which train whole "
                             "and take no LoRA layer")
        bad = [r for n in chosen if (r := unsupported_reason(n, modules[n], parents[n])) is not None]
        if bad:
            raise TypeError("cannot add LoRA to explicitly targeted module(s): " + "; ".join(bad))
    if exclude is not None:
        chosen = [n for n in chosen if not inside(n, excluded)]
        if not chosen:
            raise ValueError(f"exclude={exclude!r} removed every target")
    return chosen


ALL_EXPERTS = "all-experts"


def is_expert_stack(module: nn.Module, param) -> bool:
    """A fused MoE expert weight: a 3-D floating parameter of an experts module.

    transformers 5 marks its experts classes with ``@use_experts_implementation``
    (which sets ``is_transposed`` on them); others are recognised by a class name
    ending in ``Experts`` (Llama 4's ``Llama4TextExperts``).
    """
    return (param.dim() == 3 and param.is_floating_point() and not isinstance(module, nn.modules.conv._ConvNd)
            and (hasattr(module, "is_transposed") or type(module).__name__.endswith("Experts")))


def expert_stacks(model: nn.Module) -> list:
    """Every fused MoE expert weight of ``model`` (see :func:`is_expert_stack`)."""
    return [p for m in model.modules() for p in m.parameters(recurse=False) if is_expert_stack(m, p)]


def resolve_parameters(model: nn.Module, target_parameters, excluded=(), keep=()) -> list[str]:
    """Qualified names (``<module>.<parameter>``) of the expert weights to adapt, in model order.

    ``target_parameters`` is ``"all-experts"`` (every fused expert weight, see
    :func:`is_expert_stack`) or a list of names matched as PEFT matches them: a
    parameter's qualified name equals an entry or ends with ``"." + entry``
    (``"experts.gate_up_proj"``; ``"gate.weight"``, a router's 2-D weight, as PEFT's
    all-linear adds on MoE models). Every entry must match; a matched parameter that
    is not a 3-D or 2-D floating weight, or is an nn.Linear's own weight, is an error
    naming it. Parameters of modules in (or inside)
    ``excluded`` are left out; a parameter inside a ``keep`` module is an error.
    """
    if not (target_parameters == ALL_EXPERTS or (isinstance(target_parameters, (list, tuple, set, frozenset))
                                                  and target_parameters
                                                  and all(isinstance(t, str) and t for t in target_parameters))):
        raise TypeError(f"target_parameters must be {ALL_EXPERTS!r} or a non-empty list of parameter names "
                        f"(e.g. ['experts.gate_up_proj', 'experts.down_proj']), got {target_parameters!r}")
    found: list[tuple[str, nn.Module, str, object]] = []
    for mname, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            found.append((f"{mname}.{pname}" if mname else pname, module, mname, param))
    if target_parameters == ALL_EXPERTS:
        chosen = [(key, m, mn, p) for key, m, mn, p in found if is_expert_stack(m, p)]
        if not chosen:
            raise ValueError(f"target_parameters={ALL_EXPERTS!r} found no fused MoE expert weights (3-D parameters of "
                             "an experts module) in this model")
    else:
        entries = list(dict.fromkeys(target_parameters))
        unmatched = [e for e in entries if not any(name_matches(key, e) for key, *_ in found)]
        if unmatched:
            examples = _examples([key for key, m, _, p in found if is_expert_stack(m, p)] or [k for k, *_ in found])
            raise ValueError(f"target_parameters entries matched no parameter: {unmatched} (example names: {examples})")
        chosen = [f for f in found if any(name_matches(f[0], e) for e in entries)]
        bad = [f"{key!r} is a {p.dim()}-D {p.dtype} parameter of a {type(m).__name__}" for key, m, _, p in chosen
               if not (p.dim() in (2, 3) and p.is_floating_point())]
        if bad:
            raise TypeError("target_parameters takes fused MoE expert weights, 3-D floating parameters "
                            "[num_experts, out, in], or 2-D floating weights of other modules (routers): "
                            + "; ".join(bad))
        layers = [f"{key!r} is the weight of a {type(m).__name__}" for key, m, _, p in chosen
                  if p.dim() == 2 and (isinstance(m, nn.Linear) or is_conv1d(m))]
        if layers:
            raise TypeError("target_parameters: " + "; ".join(layers) + ": adapt the layer itself with "
                            "target_modules (its LoRALinear / QLoRALinear is the faster path)")
    kept = [key for key, _, mn, _ in chosen if any(mn == k or mn.startswith(k + ".") for k in keep)]
    if kept:
        raise ValueError(f"parameters {kept} are both target_parameters and inside modules_to_save; choose one")
    return [key for key, _, mn, _ in chosen if not inside(mn, excluded)]


def leaf_names_or_paths(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """The shortest faithful ``target_modules`` list for an adapter config.

    Leaf names (``["q_proj", "v_proj"]``, what PEFT users write) when they select
    exactly ``targets`` among the model's modules; otherwise the qualified names
    (as PEFT itself writes for "all-linear"), so a loader wraps exactly these modules.
    """
    targets = list(targets)
    leaves = sorted({t.rpartition(".")[2] for t in targets})
    all_names = [n for n, _ in model.named_modules() if n]
    if sorted(n for n in all_names if any(name_matches(n, leaf) for leaf in leaves)) == sorted(targets):
        return leaves
    return sorted(targets)
