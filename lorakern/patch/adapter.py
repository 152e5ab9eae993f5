"""Adapters in PEFT's on-disk format: ``adapter_config.json`` + ``adapter_model.safetensors``.

Key layout of ``adapter_model.safetensors`` (what ``peft.PeftModel.from_pretrained`` reads):

    base_model.model.<path>.lora_A.weight    [r, in_features]   for each adapted layer <path>
    base_model.model.<path>.lora_B.weight    [out_features, r]
    base_model.model.<w>.lora_A.weight       [r * E, in_features]    for each adapted expert weight
    base_model.model.<w>.lora_B.weight       [out_features, r * E]   (PEFT's target_parameters layout:
                                             row e*r + j of lora_A and column j*E + e of lora_B
                                             are expert e's); <w> is the experts module's path
                                             plus ".base_layer" once per adapted weight that module
                                             registered after this one (PEFT nests one wrapper per weight)
    base_model.model.<path>.<param>          every parameter of each modules_to_save module
                                             (PEFT keeps them under ``modules_to_save.<adapter>``
                                             in memory and strips that part when saving), and of
                                             each module tied to one (a head's input embeddings)
    base_model.model.<path>.base_layer.weight   the base weight of an adapted layer, which PEFT
                                             writes for an adapted ``lm_head``
                                             (``save_embedding_layers="auto"``); written here
                                             for a LoRA layer tied to a modules_to_save module
    base_model.model.<embeddings>.weight     read only: the whole input / output embeddings,
                                             which PEFT writes with ``save_embedding_layers``

``<path>`` is the qualified module name in the model given to :func:`apply_lora`.
An adapter with expert weights is written with ``lora_dropout`` 0 (PEFT refuses dropout
with ``target_parameters``); its true dropout is kept in the safetensors metadata
(``"lorakern.lora_dropout"``), which :func:`load_adapter` reads back.
Only JSON and safetensors are read: never pickle (a ``.bin`` adapter is refused).
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from typing import NamedTuple, Optional

import torch
from torch import nn

from .. import ops
from ..nn import LoRAExperts, LoRALinear, QLoRALinear
from ..nn.qlora import is_bnb_linear4bit
from .apply import lora_modules, lora_state, patch_reversibly, pattern_value, unwrap
from .targets import (TASK_HEADS, expert_stacks, is_conv1d, kept_in_full_precision, leaf_names_or_paths,
                      name_matches, peft_modules_to_save, resolve_parameters, task_heads, unsupported_reason)

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_SUFFIXES = (".lora_A.weight", ".lora_B.weight")
# safetensors metadata key holding the lora_dropout of an adapter with expert weights, whose config
# says 0 for PEFT (see save_adapter); load_adapter prefers it to the config's 0
DROPOUT_METADATA = "lorakern.lora_dropout"
# PEFT's LoRA on nn.Embedding (ParameterDict entries, no ".weight")
_EMBEDDING_SUFFIXES = (".lora_embedding_A", ".lora_embedding_B")

# Class-name suffix -> PEFT task_type (PeftModel.from_pretrained picks the wrapper class by it);
# *ForConditionalGeneration models: see _task_type.
_TASK_TYPES = (
    ("ForCausalLM", "CAUSAL_LM"),
    *((suffix, task) for suffix, task, _ in TASK_HEADS),
)

# Config fields whose non-default value means an adapter this loader cannot reproduce exactly:
# field -> (values that mean "off", what the field asks for).
_UNSUPPORTED = {
    "use_dora": ((False, None), "DoRA"),
    "layer_replication": ((None,), "layer replication"),
    "lora_bias": ((False, None), "LoRA biases"),
    "trainable_token_indices": ((None,), "trainable tokens"),
    "use_qalora": ((False, None), "QA-LoRA"),
    "alora_invocation_tokens": ((None,), "activated LoRA"),
    "use_bdlora": ((None, False), "block-diagonal LoRA"),
}

# init_lora_weights values (lower case; "pissa_niter_<n>" too) whose initialisation rewrote the base
# weights when the adapter was created: PiSSA, OLoRA, CorDA and LoRA-GA subtract the initial
# scaling * B @ A from W, LoftQ replaces W by a quantized residual. The saved lora_A / lora_B then
# reproduce the trained model only on that rewritten base, not on the original checkpoint.
_BASE_REWRITING_INITS = {"pissa": "PiSSA", "olora": "OLoRA", "corda": "CorDA", "lora_ga": "LoRA-GA", "loftq": "LoftQ"}
# The others leave the base as it is (how lora_A / lora_B started does not matter once trained).
_PLAIN_INITS = ("gaussian", "orthogonal", "eva", "mica")


# PEFT 0.21 rewrites, when it loads an adapter into a transformers 5 model whose experts were fused
# (the model types transformers' conversion mapping sends to these families), every target_modules
# entry ending in one of these leaf names into a target_parameters entry of the fused experts: a
# layer of that name outside the experts (a dense first MLP, a shared expert) loses its adapter there.
# Family -> leaf names (PEFT's _MOE_TARGET_MODULE_MAPPING, which adds "mixtral" itself).
_PEFT_MOE_RENAMED = {
    "qwen2_moe": ("gate", "gate_proj", "up_proj", "down_proj"),
    "mixtral": ("gate", "w1", "w2", "w3"),
}


class AdapterError(ValueError):
    """An adapter directory this library cannot load faithfully."""


def _task_type(model: nn.Module) -> Optional[str]:
    """The PEFT task_type whose wrapper runs ``model`` as transformers does, or None (PEFT's generic PeftModel).

    ``*ForConditionalGeneration`` covers three kinds of model. Text encoder-decoders
    (T5, BART) are SEQ_2_SEQ_LM. PEFT's seq2seq wrapper passes ``input_ids`` to the
    encoder, which breaks one that reads ``input_features`` (Whisper) or pixels: None.
    Decoder-only models with an image or audio encoder in front (Llava, Gemma 3) run
    and generate under PEFT's CAUSAL_LM wrapper, which passes ``pixel_values`` through.
    """
    name = type(model).__name__
    if name.endswith("ForConditionalGeneration"):
        if getattr(model, "main_input_name", "input_ids") != "input_ids":
            return None
        encoder_decoder = getattr(getattr(model, "config", None), "is_encoder_decoder", False)
        return "SEQ_2_SEQ_LM" if encoder_decoder else "CAUSAL_LM"
    return next((task for suffix, task in _TASK_TYPES if name.endswith(suffix)), None)


def _number(x: float):
    return int(x) if float(x).is_integer() else float(x)


def save_adapter(model: nn.Module, directory: str, adapter_name: str = "default") -> str:
    """Write the adapter of a patched ``model`` in PEFT's format; return the directory written.

    As PEFT's ``save_pretrained``, the "default" adapter goes to ``directory`` and
    any other name to ``directory/<adapter_name>``. Tensors are saved in their
    training dtype (float32), contiguous, on CPU.
    """
    from safetensors.torch import save_file

    model = unwrap(model)
    modules = lora_modules(model)
    if not modules:
        raise ValueError("model has no LoRA layers; call apply_lora (or load_adapter) first")
    if not isinstance(adapter_name, str) or not adapter_name or "/" in adapter_name or adapter_name.startswith("."):
        raise ValueError(f"adapter_name must be a plain non-empty name, got {adapter_name!r}")
    first = next(iter(modules.values()))
    settings = {(m.dropout, m.use_rslora) for m in modules.values()}
    if len(settings) != 1:
        raise ValueError(f"LoRA layers differ in (dropout, use_rslora): {sorted(settings)}; an adapter file holds "
                         "one value of each")
    # r and alpha may differ per layer: the most common pair is the config's, the others its
    # rank_pattern / alpha_pattern, one exact (escaped) name each
    ranks = [m.r for m in modules.values()]
    alphas = [m.alpha for m in modules.values()]
    r, alpha = max(ranks, key=ranks.count), max(alphas, key=alphas.count)
    rank_pattern = {re.escape(n): m.r for n, m in modules.items() if m.r != r}
    alpha_pattern = {re.escape(n): _number(m.alpha) for n, m in modules.items() if m.alpha != alpha}
    keep, tied_bases = _stored_modules(model, modules)
    task_type = _task_type(model)
    if any(_kept_root(head, keep) is None for head in task_heads(model)):
        # PEFT's task models (SEQ_CLS, TOKEN_CLS, QUESTION_ANS) add the task heads to modules_to_save,
        # load their weights from the file and skip every LoRA layer inside them; an adapter that did
        # not train a head whole (modules_to_save=[], or a list without it) is written for PEFT's generic
        # PeftModel (task_type None), which keeps the head as the base model has it.
        task_type = None

    experts = {n: m for n, m in modules.items() if isinstance(m, LoRAExperts)}
    layers = [n for n in modules if n not in experts]
    _warn_peft_moe_rename(model, layers)
    tensors = {}
    for name in layers:
        tensors[f"{PREFIX}{name}.lora_A.weight"] = modules[name].lora_A.detach()
        tensors[f"{PREFIX}{name}.lora_B.weight"] = modules[name].lora_B.detach()
    for name, path in _expert_paths(list(experts)).items():
        lora_A, lora_B = experts[name].lora_A.detach(), experts[name].lora_B.detach()
        e, rank, k = lora_A.shape  # (not r: the config's rank, written below)
        tensors[f"{PREFIX}{path}.lora_A.weight"] = lora_A.reshape(e * rank, k)
        tensors[f"{PREFIX}{path}.lora_B.weight"] = lora_B.permute(1, 2, 0).reshape(lora_B.shape[1], rank * e)
    for name in keep:
        for key, value in model.get_submodule(name).state_dict().items():
            tensors[f"{PREFIX}{name}.{key}"] = value.detach()
    for name in tied_bases:
        # an adapted layer's base weight trained as part of a kept module (a tied lm_head with the input
        # embeddings in modules_to_save): PEFT writes it as <layer>.base_layer.weight, in the layout of the
        # layer it wraps (a Conv1D's [in, out])
        layer = modules[name]
        tensors[f"{PREFIX}{name}.base_layer.weight"] = layer.weight.detach().t() if layer.fan_in_fan_out \
            else layer.weight.detach()
    # fresh CPU copies: safetensors refuses tensors that share memory (tied weights in modules_to_save)
    tensors = {k: v.to("cpu").clone(memory_format=torch.contiguous_format) for k, v in tensors.items()}

    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": getattr(getattr(model, "config", None), "_name_or_path", None) or None,
        "r": r,
        "lora_alpha": _number(alpha),
        # PEFT refuses lora_dropout with target_parameters (its ParamWrapper raises for lora_dropout != 0);
        # dropout acts in training only, so an adapter with expert weights is written with 0 to stay
        # loadable there, and its true value goes to the weights file's metadata (DROPOUT_METADATA)
        "lora_dropout": 0.0 if experts else first.dropout,
        "use_rslora": first.use_rslora,
        "target_modules": leaf_names_or_paths(model, layers) if layers else [],
        "target_parameters": _parameter_names_or_paths(model, list(experts)) if experts else None,
        "fan_in_fan_out": any(m.fan_in_fan_out for m in modules.values()),
        "bias": "none",
        "modules_to_save": list(keep) or None,
        "init_lora_weights": "gaussian" if first.init == "gaussian" else True,
        "use_dora": False,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "inference_mode": True,
    }
    out = os.fspath(directory) if adapter_name == "default" else os.path.join(directory, adapter_name)
    os.makedirs(out, exist_ok=True)
    # each file is written under a temporary name and renamed: an interrupted save never
    # leaves a truncated adapter that a later load would read
    weights_path, config_path = os.path.join(out, WEIGHTS_NAME), os.path.join(out, CONFIG_NAME)
    metadata = {"format": "pt"}
    if experts and first.dropout:
        metadata[DROPOUT_METADATA] = repr(float(first.dropout))
    save_file(tensors, weights_path + ".tmp", metadata=metadata)
    os.replace(weights_path + ".tmp", weights_path)
    with open(config_path + ".tmp", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    os.replace(config_path + ".tmp", config_path)
    return out


def _peft_moe_family(model: nn.Module) -> Optional[str]:
    """The family (a :data:`_PEFT_MOE_RENAMED` key) whose target names PEFT rewrites for ``model``'s type, or None."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if not isinstance(model_type, str):
        return None
    try:
        from transformers import conversion_mapping
    except ImportError:  # transformers < 5 has no conversion mapping, and PEFT converts nothing
        return None
    families = dict(getattr(conversion_mapping, "_MODEL_TO_CONVERSION_PATTERN", None) or {}, mixtral="mixtral")
    family = families.get(model_type)
    return family if family in _PEFT_MOE_RENAMED else None


def _warn_peft_moe_rename(model: nn.Module, layers: list[str]) -> None:
    """Warn when PEFT will move the adapters of ``layers`` (dense layers named like the fused experts' old
    per-expert layers: a dense MLP's or shared expert's ``down_proj``) onto the experts, dropping them."""
    family = _peft_moe_family(model)
    if family is None:
        return
    affected = [n for n in layers if n.rpartition(".")[2] in _PEFT_MOE_RENAMED[family]]
    if affected:
        model_type = model.config.model_type
        warnings.warn(f"PEFT 0.21 loads adapters for {model_type!r} models by converting the target_modules "
                      f"entries {list(_PEFT_MOE_RENAMED[family])} into target_parameters of the fused experts: the "
                      f"adapters of the dense layers {affected[:6]}{' ...' if len(affected) > 6 else ''} "
                      f"({len(affected)}) are dropped there (PeftModel.from_pretrained gives other outputs). "
                      "lorakern.load_adapter loads this adapter exactly", UserWarning, stacklevel=3)


def read_adapter_config(directory: str) -> dict:
    """``adapter_config.json`` of ``directory``, checked for options this library reproduces exactly."""
    path = os.path.join(directory, CONFIG_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory!r}")
    with open(path, encoding="utf-8") as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as e:
            raise AdapterError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(config, dict):
        raise AdapterError(f"{path} must hold a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only 'LORA')")
    for key, (defaults, feature) in _UNSUPPORTED.items():
        if key in config and config[key] not in defaults:
            raise AdapterError(f"{path}: {key}={config[key]!r} is not supported: {feature} cannot be loaded exactly")
    if config.get("bias", "none") != "none":
        raise AdapterError(f"{path}: bias={config['bias']!r} is not supported (only 'none')")
    _check_init(config.get("init_lora_weights", True), path)
    dropout = config.get("lora_dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise AdapterError(f"{path}: lora_dropout must be a number in [0, 1), got {dropout!r}")
    if not isinstance(config.get("use_rslora", False), bool):
        raise AdapterError(f"{path}: use_rslora must be true or false, got {config['use_rslora']!r}")
    keep = config.get("modules_to_save")
    if keep is not None and not (isinstance(keep, list) and all(isinstance(k, str) and k for k in keep)):
        raise AdapterError(f"{path}: modules_to_save must be a list of module names or null, got {keep!r}")
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise AdapterError(f"{path}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"{path}: lora_alpha must be a positive number, got {alpha!r}")
    params = config.get("target_parameters")
    if params is not None and not (isinstance(params, list) and all(isinstance(p, str) and p for p in params)):
        raise AdapterError(f"{path}: target_parameters must be a list of parameter names, got {params!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or not all(isinstance(k, str) and k for k in patterns):
            raise AdapterError(f"{path}: {key} must map regular expressions to numbers, got {patterns!r}")
        for k, v in patterns.items():
            try:
                re.compile(k)
            except re.error as e:
                raise AdapterError(f"{path}: {key} key {k!r} is not a valid regular expression: {e}") from None
            good = (isinstance(v, int) and v >= 1) if key == "rank_pattern" else \
                (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)
            if isinstance(v, bool) or not good:
                raise AdapterError(f"{path}: {key}[{k!r}] must be a positive "
                                   f"{'integer' if key == 'rank_pattern' else 'number'}, got {v!r}")
    targets = config.get("target_modules")
    if not (isinstance(targets, str) or (isinstance(targets, list) and (targets or params))):
        raise AdapterError(f"{path}: target_modules must be a string or a non-empty list, got {targets!r}")
    return config


def _check_init(init, path: str) -> None:
    """Refuse an ``init_lora_weights`` whose adapter only fits a base model rewritten at its creation."""
    kind = init.lower() if isinstance(init, str) else None
    if isinstance(init, bool) or kind in _PLAIN_INITS:
        return
    method = next((m for m in _BASE_REWRITING_INITS if kind is not None and kind.startswith(m)), None)
    if method is None:
        raise AdapterError(f"{path}: init_lora_weights={init!r} is not an initialisation this library knows "
                           f"(true, false, {', '.join(map(repr, _PLAIN_INITS))})")
    if method == "loftq":
        how = ("LoftQ replaced the base weights by a quantized residual when the adapter was created; the adapter "
               "reproduces the trained model only on that residual base, saved beside it")
    else:
        how = (f"{_BASE_REWRITING_INITS[method]} initialisation subtracted the adapter's initial value from the "
               "base weights when the adapter was created, so its lora_A / lora_B reproduce the trained model only on "
               "that modified base. "
               "PEFT converts it into a plain LoRA adapter (init_lora_weights true, twice the rank) that loads on "
               "the original model: save_pretrained(directory, path_initial_model_for_weight_conversion=<the "
               "adapter as saved before training>)")
    raise AdapterError(f"{path}: init_lora_weights={init!r} cannot be loaded onto the original model: {how}. If "
                       f"the model given is that modified base itself, set init_lora_weights to true in {CONFIG_NAME}")


def _read_weights(directory: str) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = os.path.join(directory, WEIGHTS_NAME)
    if not os.path.isfile(path):
        pickled = os.path.join(directory, "adapter_model.bin")
        hint = (" (found adapter_model.bin: pickle files are never loaded; convert it to safetensors "
                "with a tool you trust)") if os.path.exists(pickled) else ""
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory!r}{hint}")
    try:
        return load_file(path)
    except SafetensorError as e:
        raise AdapterError(f"{path} is not a readable safetensors file (truncated or corrupt?): {e}") from None


def _metadata_dropout(directory: str) -> Optional[float]:
    """The lora_dropout that :func:`save_adapter` keeps in the weights file's metadata (adapters with expert
    weights), or None."""
    from safetensors import safe_open

    path = os.path.join(directory, WEIGHTS_NAME)
    with safe_open(path, "pt") as f:
        value = (f.metadata() or {}).get(DROPOUT_METADATA)
    if value is None:
        return None
    try:
        dropout = float(value)
    except ValueError:
        dropout = math.nan
    if not 0.0 <= dropout < 1.0:
        raise AdapterError(f"{path}: metadata {DROPOUT_METADATA} must be a number in [0, 1), got {value!r}")
    return dropout


def load_adapter(model: nn.Module, directory: str, quantize: Optional[str] = None,
                 compute_dtype: Optional[torch.dtype] = None, device: Optional[torch.device | str] = None) -> list[str]:
    """Load a PEFT-format LoRA adapter from ``directory`` into ``model``; return the adapted layer names.

    An unpatched model is first patched on exactly the layers that have
    ``lora_A`` / ``lora_B`` tensors in the file (the layers PEFT's target_modules,
    exclude_modules and layers_to_transform selected when it saved), with the
    config's r, lora_alpha, lora_dropout, use_rslora and modules_to_save (matched as
    PEFT matches them: every module whose qualified name ends with an entry, so
    ``"classifier"`` takes DistilBERT's ``pre_classifier`` too);
    ``quantize="nf4"`` puts the adapter on an NF4 base (``device``: built there layer
    by layer, see :func:`lorakern.apply_lora`). A patched model must
    already have exactly the adapter's layers, ranks and scaling. As in PEFT,
    each modules_to_save module gets its own copy of a weight it shares with
    another module (a head tied to the input embeddings loads apart from them).
    An adapted layer's ``base_layer.weight`` (PEFT writes it for an adapted
    ``lm_head``) is checked against the layer's weight (see :func:`_base_value`).
    The tensors of a module tied to a modules_to_save one (what :func:`save_adapter`
    and PEFT's ``ensure_weight_tying=True`` store) load into that module, and the
    whole input / output embeddings PEFT writes with ``save_embedding_layers``
    (after a vocabulary resize) into the base model's, as PEFT loads them; a model
    of another vocabulary size is refused, naming the resize it needs.

    All or nothing: the file's keys and shapes are checked against the model's
    layers (and, for an unpatched model, against the layers it is about to patch)
    before anything changes; a key that belongs to no layer, a layer without
    weights, or a shape mismatch is an :class:`AdapterError` naming it, and the
    model is left as it was. Refused: adapters whose initialisation rewrote the
    base weights (PiSSA, OLoRA, CorDA, LoRA-GA, LoftQ: ``init_lora_weights``), LoRA
    weights for a layer inside a modules_to_save module (PEFT would ignore them),
    a modules_to_save module the config lists but the file has no tensors of, and
    LoRA on ``nn.Embedding`` layers (``lora_embedding_A`` / ``lora_embedding_B``).
    """
    model = unwrap(model)
    config = read_adapter_config(directory)
    weights = _read_weights(directory)
    dropout = _metadata_dropout(directory)
    if dropout is not None and config.get("lora_dropout", 0.0) == 0.0:
        config = dict(config, lora_dropout=dropout)
    embedding = sorted(k for k in weights if k.endswith(_EMBEDDING_SUFFIXES))
    if embedding:
        raise AdapterError(f"{directory}: the adapter has LoRA weights for nn.Embedding layers ({embedding[:4]}); "
                           "LoRA on nn.Embedding is not supported here (only nn.Linear / Conv1D layers and expert "
                           "weights)")
    names = [n for n, _ in model.named_modules() if n]
    revert = None
    # PEFT adds both "classifier" and "score" for SEQ_CLS adapters; keep the ones this model has.
    listed = peft_modules_to_save(names, config.get("modules_to_save") or [])
    if not lora_modules(model):
        keep = listed + _stored_partners(model, listed, {}, weights)
        options = _patch_options(model, config, weights, names, keep, directory)
        layers = _planned_layers(model, options)
        _check_tensors(model, weights, layers, keep, directory, listed)
        if quantize == "nf4":
            _check_nf4_base_weights(model, weights, layers, directory)
        _, revert = patch_reversibly(model, quantize=quantize, compute_dtype=compute_dtype, device=device,
                                     **options)
    elif quantize is not None or compute_dtype is not None or device is not None:
        raise ValueError("quantize / compute_dtype / device apply only when load_adapter patches an unpatched model")
    try:
        modules = lora_modules(model)
        state = lora_state(model)
        own = list(state.modules_to_save) if state is not None else []
        keep = own + _stored_partners(model, own, modules, weights)
        if revert is None:
            _check_layers(modules, config, directory)
            _check_tensors(model, weights, _patched_layers(modules), keep, directory, listed)
        _copy_in(model, modules, keep, own, weights, directory)
    except BaseException as e:
        if revert is not None:
            revert(e)
        raise
    return list(modules)


class _Layer(NamedTuple):
    """An adapted layer (``experts == 0``) or expert weight, as the adapter file holds its tensors."""

    name: str  # qualified layer name, or ``<experts module>.<parameter>``
    path: str  # where PEFT keeps its lora_A / lora_B (an expert weight: see _expert_paths)
    out_features: int
    in_features: int
    r: int
    experts: int
    bias: bool  # (layers) the base layer has a bias
    conv1d: bool  # (layers) a transformers Conv1D, whose base weight PEFT writes as [in, out]


def _patch_options(model: nn.Module, config: dict, weights: dict, names: list[str], keep: list[str],
                   directory: str) -> dict:
    """apply_lora's arguments that give an unpatched ``model`` exactly the adapter's layers."""
    # The layers that have weights in the file are the adapter, exactly: PEFT's matching
    # (target_modules, exclude_modules, layers_to_transform) already chose them when it saved.
    targets = _adapted_paths(weights)
    if not targets:
        raise AdapterError(f"{directory}: {WEIGHTS_NAME} holds no '*.lora_A.weight' / '*.lora_B.weight' tensors")
    params = []
    if config.get("target_parameters"):
        try:
            params = resolve_parameters(model, config["target_parameters"])
        except (TypeError, ValueError) as e:
            raise AdapterError(f"{directory}: {e}") from None
        expert_paths = set(_expert_paths(params).values())
        targets = [t for t in targets if t not in expert_paths]
    absent = [t for t in targets if t not in names]
    if absent:
        raise AdapterError(f"{directory}: the adapter has weights for layers this model does not have: "
                           f"{absent[:5]}{_per_expert_hint(model, absent)}")
    within = [t for t in targets if _kept_root(t, keep) is not None]
    if within:
        raise AdapterError(f"{directory}: the adapter has LoRA weights for {within[:5]}, inside its "
                           f"modules_to_save {keep}, which are trained and saved whole: PEFT ignores "
                           "LoRA weights there, so the adapter does not hold one model")
    modules = dict(model.named_modules())
    bad = [r for t in targets if (r := unsupported_reason(t, modules[t], modules[t.rpartition(".")[0]])) is not None]
    if bad:
        raise AdapterError(f"{directory}: the adapter has LoRA weights for layers that cannot take one here: "
                           + "; ".join(bad[:3]))
    return dict(target_modules=targets or None, r=config["r"], alpha=config["lora_alpha"],
                dropout=config.get("lora_dropout", 0.0), modules_to_save=keep,
                use_rslora=bool(config.get("use_rslora", False)), target_parameters=params or None,
                rank_pattern=config.get("rank_pattern") or None, alpha_pattern=config.get("alpha_pattern") or None)


def _planned_layers(model: nn.Module, options: dict) -> list[_Layer]:
    """The :class:`_Layer` of each layer and expert weight ``apply_lora(model, **options)`` will adapt."""
    layers = []
    for name in options["target_modules"] or []:
        module = model.get_submodule(name)
        conv1d = is_conv1d(module)
        out_features, in_features = (module.nf, module.weight.shape[0]) if conv1d else \
            (module.out_features, module.in_features)
        layers.append(_Layer(name, name, out_features, in_features,
                             pattern_value(options["rank_pattern"] or {}, name, options["r"]), 0,
                             getattr(module, "bias", None) is not None, conv1d))
    params = options["target_parameters"] or []
    for name, path in _expert_paths(params).items():
        owner_name, _, pname = name.rpartition(".")
        weight = model.get_parameter(name)
        if weight.dim() == 3:
            e, a, b = weight.shape
            n, k = (b, a) if getattr(model.get_submodule(owner_name), "is_transposed", False) else (a, b)
        else:
            (n, k), e = weight.shape, 1
        layers.append(_Layer(name, path, n, k, pattern_value(options["rank_pattern"] or {}, name, options["r"]), e,
                             False, False))
    return layers


def _patched_layers(modules: dict) -> list[_Layer]:
    """The :class:`_Layer` of each LoRA module of a patched model."""
    paths = _expert_paths([n for n, m in modules.items() if isinstance(m, LoRAExperts)])
    return [_Layer(n, paths.get(n, n), m.out_features, m.in_features, m.r,
                   m.num_experts if isinstance(m, LoRAExperts) else 0,
                   not isinstance(m, LoRAExperts) and m.bias is not None,
                   not isinstance(m, LoRAExperts) and m.fan_in_fan_out)
            for n, m in modules.items()]


def _expected_shapes(model: nn.Module, layers: list[_Layer], keep: list[str]) -> tuple[dict, dict]:
    """(adapter key -> the shape the model takes, for LoRA and base-layer keys) and (the same for the
    modules_to_save keys, with the module each belongs to)."""
    lora, kept = {}, {}
    for layer in layers:
        rank = layer.r * max(layer.experts, 1)  # PEFT's target_parameters layout: [r * E, in] / [out, r * E]
        lora[f"{PREFIX}{layer.path}.lora_A.weight"] = (rank, layer.in_features)
        lora[f"{PREFIX}{layer.path}.lora_B.weight"] = (layer.out_features, rank)
        if not layer.experts:
            lora[f"{PREFIX}{layer.name}.base_layer.weight"] = (layer.in_features, layer.out_features) \
                if layer.conv1d else (layer.out_features, layer.in_features)
            if layer.bias:
                lora[f"{PREFIX}{layer.name}.base_layer.bias"] = (layer.out_features,)
    for name in keep:
        for key, value in model.get_submodule(name).state_dict().items():
            kept[f"{PREFIX}{name}.{key}"] = (tuple(value.shape), name)
    return lora, kept


def _check_tensors(model: nn.Module, weights: dict, layers: list[_Layer], keep: list[str], directory: str,
                   listed=()) -> None:
    """Every key of the file belongs to a layer or modules_to_save module with the shape the model takes, every
    layer has its lora_A and lora_B, and each module of ``keep`` has all its tensors in the file or (unless the
    config lists it: ``listed``) none."""
    lora, kept = _expected_shapes(model, layers, keep)
    embedding = _embedding_tensors(model, keep, [layer.name for layer in layers])
    _check_embeddings(model, weights, embedding, directory)
    unexpected = sorted(k for k in weights if k not in lora and k not in kept and k not in embedding)
    if unexpected:
        raise AdapterError(f"{directory}: {len(unexpected)} key(s) match no LoRA layer or modules_to_save module of "
                           f"the model: {unexpected[:5]}")
    missing = sorted(k for k in lora if k.endswith(_LORA_SUFFIXES) and k not in weights)
    if missing:
        raise AdapterError(f"{directory}: the model has LoRA layers the adapter has no weights for: {missing[:5]}")
    experts = {f"{PREFIX}{layer.path}{s}": layer for layer in layers if layer.experts for s in _LORA_SUFFIXES}
    for key, value in weights.items():
        if key in embedding:
            continue
        shape = lora[key] if key in lora else kept[key][0]
        if tuple(value.shape) != shape:
            layer = experts.get(key)
            extra = f" ({layer.experts} experts, r={layer.r})" if layer is not None else ""
            raise AdapterError(f"{directory}: {key} has shape {tuple(value.shape)}, the model expects {shape}{extra}")
        if key in lora and not value.is_floating_point():
            raise AdapterError(f"{directory}: {key} has dtype {value.dtype}, expected a floating dtype")
    for name in keep:
        keys = [k for k, (_, owner) in kept.items() if owner == name]
        absent = [k for k in keys if k not in weights]
        if absent and len(absent) == len(keys) and name in listed:
            raise AdapterError(f"{directory}: {CONFIG_NAME} lists {name!r} in modules_to_save, but "
                               f"{WEIGHTS_NAME} holds none of its tensors ({absent[:3]}): the trained module is "
                               "not in the adapter")
        if absent and len(absent) < len(keys):
            raise AdapterError(f"{directory}: the adapter holds part of the modules_to_save module {name!r}: "
                               f"{absent[:5]} are missing")


def _embedding_tensors(model: nn.Module, keep: list[str], adapted: list[str]) -> dict[str, tuple[str, str]]:
    """Adapter key -> (module, tensor name) for every tensor of the model's input and output embeddings
    (transformers' ``get_input_embeddings`` / ``get_output_embeddings``) outside ``keep`` and the ``adapted``
    layers: PEFT writes their whole state with ``save_embedding_layers=True`` (or on its own when the
    vocabulary was resized) and loads it into the base model."""
    found = {}
    names = {id(m): n for n, m in model.named_modules()}
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        get = getattr(model, getter, None)
        try:
            layer = get() if callable(get) else None
        except NotImplementedError:  # a transformers model class without that embedding declares so
            layer = None
        name = names.get(id(layer)) if isinstance(layer, nn.Module) else None
        if not name or _kept_root(name, keep) is not None or _kept_root(name, adapted) is not None:
            continue
        for key in layer.state_dict():
            found[f"{PREFIX}{name}.{key}"] = (name, key)
    return found


def _check_embeddings(model: nn.Module, weights: dict, embedding: dict, directory: str) -> None:
    """The embedding tensors of the file (see :func:`_embedding_tensors`) fit the model, and tied ones agree."""
    seen: dict[int, tuple[str, torch.Tensor]] = {}
    for key, (name, attr) in embedding.items():
        if key not in weights:
            continue
        value, current = weights[key], model.get_submodule(name).state_dict(keep_vars=True)[attr]
        if tuple(value.shape) != tuple(current.shape):
            raise AdapterError(f"{directory}: {key} (the whole {name!r}, written by PEFT's save_embedding_layers, "
                               f"e.g. after resizing the vocabulary) has shape {tuple(value.shape)}, the model's is "
                               f"{tuple(current.shape)}: resize the model's token embeddings to the adapter's "
                               "vocabulary first (model.resize_token_embeddings)")
        if not value.is_floating_point():
            raise AdapterError(f"{directory}: {key} has dtype {value.dtype}, expected a floating dtype")
        other = seen.setdefault(id(current), (key, value))
        if other[0] != key and not torch.equal(other[1], value):
            raise AdapterError(f"{directory}: {other[0]} and {key} are one tied tensor in the model but differ in "
                               "the adapter")


def _check_nf4_base_weights(model: nn.Module, weights: dict, layers: list[_Layer], directory: str) -> None:
    """A base weight in the file (PEFT's ``<lm_head>.base_layer.weight``) for a layer about to be quantized in
    place must quantize to what the layer's own weight does: the check after patching would come too late to
    put the layer back."""
    dense = kept_in_full_precision(model)
    for layer in layers:
        key = f"{PREFIX}{layer.name}.base_layer.weight"
        module = model.get_submodule(layer.name) if key in weights else None
        if module is None or layer.name in dense or is_bnb_linear4bit(module):
            continue
        current, value = module.weight.detach(), weights[key].to(module.weight.device, module.weight.dtype)
        if layer.conv1d:
            current, value = current.t(), value.t()
        if torch.equal(value, current):
            continue
        mine, theirs = ops.nf4_quantize(current.contiguous()), ops.nf4_quantize(value.contiguous())
        if not all(torch.equal(a, b) for a, b in zip(mine[:5], theirs[:5])):
            raise AdapterError(_nf4_base_message(directory, key))


def _nf4_base_message(directory: str, key: str) -> str:
    return (f"{directory}: {key} is a base weight that differs from this model's, and the layer is NF4: it cannot "
            "take a new base weight without re-quantizing it. Load the adapter into a dense model (quantize=None), "
            "merge, then quantize")


def _copy_in(model: nn.Module, modules: dict, keep: list[str], untie: list[str], weights: dict,
             directory: str) -> None:
    """Copy the checked tensors of an adapter file into a patched ``model``; the ``untie`` modules first get their
    own copy of any weight they share with another module (see :func:`_untie_modules_to_save`)."""
    paths = {n: n for n in modules if not isinstance(modules[n], LoRAExperts)}
    paths.update(_expert_paths([n for n in modules if isinstance(modules[n], LoRAExperts)]))
    lora_keys = {f"{PREFIX}{path}{s}": (n, s) for n, path in paths.items() for s in _LORA_SUFFIXES}
    base_keys = {f"{PREFIX}{n}.base_layer.{attr}": (n, attr) for n, m in modules.items()
                 if not isinstance(m, LoRAExperts) for attr in ("weight", "bias")}
    # every value is formed (and _base_value's checks run) before the first copy
    new_base = [(getattr(modules[name], attr), _base_value(modules[name], attr, weights[key], key, directory))
                for key, (name, attr) in base_keys.items() if key in weights]
    new_lora = []
    for key, (name, suffix) in lora_keys.items():
        module, is_a = modules[name], suffix == _LORA_SUFFIXES[0]
        value = weights[key]
        if isinstance(module, LoRAExperts):
            value = _expert_layout(value, module, is_a, key, directory)
        new_lora.append((module.lora_A if is_a else module.lora_B, value))
    embedding = _embedding_tensors(model, keep, list(modules))
    _untie_modules_to_save(model, untie)
    with torch.no_grad():
        for param, value in new_base:
            if value is not None:
                param.copy_(value)
        for param, value in new_lora:
            param.copy_(value)
        for name in keep:
            sub = {k: weights[f"{PREFIX}{name}.{k}"] for k in model.get_submodule(name).state_dict()
                   if f"{PREFIX}{name}.{k}" in weights}
            if sub:
                model.get_submodule(name).load_state_dict(sub, strict=True)
        for key, (name, attr) in embedding.items():
            if key in weights:
                model.get_submodule(name).state_dict(keep_vars=True)[attr].copy_(weights[key])


def _per_expert_hint(model: nn.Module, absent: list[str]) -> str:
    """Why per-expert layers (``...experts.3.w1``) are missing from a transformers 5 MoE model, and the way out."""
    if not any(re.search(r"\.experts\.\d+\.", f".{name}.") for name in absent):
        return ""
    if not expert_stacks(model):
        return ""
    return (". They are per-expert layers of the transformers < 5 layout; this model holds its experts in fused "
            "3-D parameters (experts.gate_up_proj, experts.down_proj). PEFT converts such an adapter when it loads "
            "it: peft.PeftModel.from_pretrained(model, directory).save_pretrained(new_directory) writes one that "
            "loads here")


def _expert_paths(names: list[str]) -> dict[str, str]:
    """Adapted expert weight ``<module>.<param>`` -> the module path PEFT gives its wrapper.

    PEFT wraps an experts module once per targeted weight, in the order the module
    registered them, each wrapper around the previous one: the last weight's adapter
    sits at ``<module>``, the one before at ``<module>.base_layer``, and so on.
    ``names`` lists them in that order (as :func:`resolve_parameters` and the
    module order of a patched model give them).
    """
    by_module: dict[str, list[str]] = {}
    for name in names:
        by_module.setdefault(name.rpartition(".")[0], []).append(name)
    paths = {}
    for module, params in by_module.items():
        for i, name in enumerate(params):
            paths[name] = module + ".base_layer" * (len(params) - 1 - i)
    return paths


def _expert_layout(value: torch.Tensor, module: LoRAExperts, is_a: bool, key: str, directory: str) -> torch.Tensor:
    """A PEFT ``target_parameters`` tensor in :class:`LoRAExperts`' layout (``[E, r, in]`` / ``[E, out, r]``)."""
    e, r, n, k = module.num_experts, module.r, module.out_features, module.in_features
    expected = (e * r, k) if is_a else (n, r * e)
    if tuple(value.shape) != expected:
        raise AdapterError(f"{directory}: {key} has shape {tuple(value.shape)}, the model expects {expected} "
                           f"({e} experts, r={r})")
    return value.reshape(e, r, k) if is_a else value.reshape(n, r, e).permute(2, 0, 1)


def _parameter_names_or_paths(model: nn.Module, names: list[str]) -> list[str]:
    """``target_parameters`` for an adapter config: ``<module leaf>.<param>`` entries (``"experts.down_proj"``)
    when they select exactly ``names``, else the qualified names."""
    short = sorted({".".join(n.split(".")[-2:]) for n in names})
    adapted = [m for m in lora_modules(model).values() if isinstance(m, LoRAExperts)]
    inside = {id(p) for m in adapted for p in m.parameters()}
    others = [n for n, p in model.named_parameters() if id(p) not in inside]
    if not any(name_matches(n, s) for n in others for s in short):
        return short
    return sorted(names)


def _kept_root(name: str, keep) -> Optional[str]:
    return next((k for k in keep if name == k or name.startswith(k + ".")), None)


def _parameter_owners(model: nn.Module) -> dict[int, list[tuple[str, nn.Module, str]]]:
    """id(parameter) -> every (module name, module, attribute) that holds it directly."""
    owners: dict[int, list] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module.named_parameters(recurse=False):
            owners.setdefault(id(param), []).append((name, module, attr))
    return owners


def _tied_partners(model: nn.Module, keep, lora_layers: dict) -> tuple[list[str], list[str]]:
    """Modules outside ``keep`` that hold a parameter of a ``keep`` module (tied weights), in model order, and
    the LoRA layers (of ``lora_layers``) whose base weight is such a parameter."""
    partners, bases = {}, {}
    for entries in _parameter_owners(model).values():
        roots = {_kept_root(name, keep) for name, _, _ in entries}
        if len(roots) < 2 or roots == {None}:
            continue
        for name, _, attr in entries:
            if _kept_root(name, keep) is not None:
                continue
            owner = _kept_root(name, lora_layers) or name
            if owner in lora_layers:
                if owner != name or attr != "weight":
                    raise ValueError(f"modules_to_save shares the parameter {name}.{attr} with the LoRA layer "
                                     f"{owner!r} (tied weights); PEFT's format holds only a base weight")
                bases[owner] = None
            else:
                partners[name] = None
    return list(partners), list(bases)


def _stored_modules(model: nn.Module, lora_layers: dict) -> tuple[list[str], list[str]]:
    """The modules whose weights the adapter of a patched ``model`` stores whole, and the LoRA layers whose base
    weight it stores (``<layer>.base_layer.weight``); :func:`save_adapter` writes them, and :func:`load_adapter`
    accepts them back into a patched model.

    These are the patch's modules_to_save (the task heads by default) and every module
    tied to one: a kept module trained here still shares its weights with its partners (an
    output head with the input embeddings); PEFT gives each modules_to_save entry its own
    copy, so the partners are stored too, or PEFT would run the trained head with the
    original embeddings. A partner that is an adapted layer (a tied ``lm_head`` with LoRA)
    has its base weight stored, as PEFT stores it.
    """
    state = lora_state(model)
    keep = list(state.modules_to_save) if state is not None else []
    partners, bases = _tied_partners(model, keep, lora_layers)
    return keep + partners, bases


def _stored_partners(model: nn.Module, keep: list[str], lora_layers: dict, weights: dict) -> list[str]:
    """The modules tied to a ``keep`` module whose tensors the adapter file holds: the partners
    :func:`save_adapter` stores, and the tied head PEFT stores with ``ensure_weight_tying=True``."""
    partners, _ = _tied_partners(model, keep, lora_layers)
    return [name for name in partners
            if any(f"{PREFIX}{name}.{key}" in weights for key in model.get_submodule(name).state_dict())]


def _untie_modules_to_save(model: nn.Module, keep) -> None:
    """Give each modules_to_save module its own copy of any parameter it shares with another module.

    PEFT keeps a copy of every modules_to_save module, so an adapter that trained a
    head tied to the input embeddings holds a new head and leaves the embeddings as
    they were; loaded into the tied model as is, the head's weights would overwrite
    the embeddings too. Modules outside ``keep`` keep the original parameter, frozen.
    A module registered under two names (one kept, one not) stays one module with
    one weight for both names, as it was when trained here: it cannot hold two copies.
    """
    for entries in _parameter_owners(model).values():
        roots = {_kept_root(name, keep) for name, _, _ in entries}
        if len(roots) < 2:
            continue
        aliases: dict[tuple[int, str], set] = {}
        for name, module, attr in entries:
            aliases.setdefault((id(module), attr), set()).add(_kept_root(name, keep))
        if any(len(r) > 1 for r in aliases.values()):
            continue
        original = getattr(entries[0][1], entries[0][2])
        copies: dict[str, nn.Parameter] = {}
        for name, module, attr in entries:
            root = _kept_root(name, keep)
            if root is not None:
                if root not in copies:
                    copies[root] = nn.Parameter(original.detach().clone(), requires_grad=True)
                setattr(module, attr, copies[root])
        if None in roots:
            original.requires_grad_(False)


def _adapted_paths(weights: dict) -> list[str]:
    """Module paths that have LoRA tensors in an adapter file, in file order, without duplicates."""
    paths = {}
    for key in weights:
        for suffix in _LORA_SUFFIXES:
            if key.startswith(PREFIX) and key.endswith(suffix):
                paths[key[len(PREFIX):-len(suffix)]] = None
    return list(paths)


def _check_layers(modules: dict, config: dict, directory: str) -> None:
    rslora = bool(config.get("use_rslora", False))
    for name, module in modules.items():
        r = pattern_value(config.get("rank_pattern") or {}, name, config["r"])
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, name, config["lora_alpha"]))
        if (module.r, module.alpha, module.use_rslora) != (r, alpha, rslora):
            raise AdapterError(f"{directory}: layer {name!r} has r={module.r}, alpha={module.alpha:g}, "
                               f"use_rslora={module.use_rslora} but the adapter has r={r}, lora_alpha={alpha:g}, "
                               f"use_rslora={rslora}")


def _base_value(module: nn.Module, attr: str, value: torch.Tensor, key: str, directory: str) -> Optional[torch.Tensor]:
    """The tensor to copy into an adapted layer's base ``weight`` / ``bias`` from a ``<path>.base_layer.<attr>``
    entry, or None when the layer already holds it.

    PEFT writes the base weight of an adapted ``lm_head`` into the adapter (its
    ``save_embedding_layers="auto"``) and loads it back into the base layer. It is
    usually the checkpoint's own weight: then nothing changes. A different one is
    copied into a dense layer (a head tied to the input embeddings changes them too,
    as in PEFT); an NF4 base cannot take it without re-quantizing, which is an error.
    """
    current = getattr(module, attr)
    if current is None:
        raise AdapterError(f"{directory}: {key} is a base-layer {attr} for a layer that has none")
    if not value.is_floating_point():
        raise AdapterError(f"{directory}: {key} has dtype {value.dtype}, expected a floating dtype")
    if attr == "weight" and module.fan_in_fan_out:
        value = value.t()  # a Conv1D weight [in, out], held transposed here
    shape = (module.out_features, module.in_features) if attr == "weight" else tuple(current.shape)
    if tuple(value.shape) != shape:
        raise AdapterError(f"{directory}: {key} has shape {tuple(value.shape)}, the layer's base {attr} is {shape}")
    if isinstance(module, QLoRALinear) and attr == "weight":
        q, mine = ops.nf4_quantize(value.to(module.weight.device, module.quant_dtype), module.blocksize,
                                   module.double_quant), module.quantized_weight()
        if all(torch.equal(a, b) for a, b in zip(q[:5], mine[:5])):
            return None
        raise AdapterError(_nf4_base_message(directory, key))
    value = value.to(current.device, current.dtype)
    if torch.equal(value, current):
        return None
    if isinstance(module, LoRALinear) and module.merged:
        raise AdapterError(f"{directory}: {key} is a new base weight but the layer is merged (its weight holds the "
                           "adapter); unmerge it first")
    return value


__all__ = ["save_adapter", "load_adapter", "read_adapter_config", "AdapterError", "CONFIG_NAME", "WEIGHTS_NAME"]
