"""Causal-LM loss that projects to the vocabulary only where a label exists.

The standard Hugging Face path computes ``logits = lm_head(hidden)`` for every
position, a ``[B, T, vocab]`` tensor, then ignores the masked ones. In
instruction tuning most positions are prompt: in the shipped triage data 76%
of tokens carry no label, and for SmolLM2 (vocab 49152, hidden 576) the logits
of a 8 x 128 batch alone are 200 MB in fp32, plus as much again for their
gradient. Here the hidden states of labelled positions are gathered first, then
:class:`LinearCrossEntropy` projects them in chunks of rows and computes the
loss AND its gradient with respect to the hidden states in the same pass, so
one ``[rows, vocab]`` block of logits is alive at a time and the logits are
never recomputed. On SmolLM2-135M (4 x 256 tokens, 209 labelled, bf16 autocast,
2 Zen 4 cores) the head and loss went from ~600 ms per step (checkpointed
chunks: two forward projections, an fp32 cast of the 49152 x 576 tied weight
in forward and again in backward, fp32 log-softmax and its backward) to the two
GEMMs it needs.
"""

from __future__ import annotations

import inspect
import math
import warnings
import weakref
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.checkpoint import checkpoint

from ..nn._base import active_autocast_dtype
from ..patch.apply import unwrap

from .data import IGNORE_INDEX

__all__ = ["split_causal_lm", "logit_transform", "check_loss_split", "check_packing", "causal_lm_loss", "CausalLMLoss", "LinearCrossEntropy", "linear_cross_entropy"]


def split_causal_lm(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    """Return (body producing hidden states, output head) of a Hugging Face causal LM.

    Returns ``(None, None)`` for a model that does not expose both (any plain
    torch model): :func:`causal_lm_loss` then falls back to the full logits.
    """
    get_head = getattr(model, "get_output_embeddings", None)
    prefix = getattr(model, "base_model_prefix", None)
    head = get_head() if callable(get_head) else None
    body = getattr(model, prefix, None) if prefix else None
    if head is None or body is None or body is model:
        return None, None
    return body, head


def _configs(model: nn.Module) -> list:
    config = getattr(model, "config", None)
    if config is None:
        return []
    text = config.get_text_config() if callable(getattr(config, "get_text_config", None)) else None
    return [config] if text is None or text is config else [config, text]


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def logit_transform(model: nn.Module) -> tuple[float, float | None]:
    """``(scale, softcap)`` with which ``model``'s own forward turns ``head(hidden)`` into logits.

    ``logits = softcap * tanh(scale * head(hidden) / softcap)`` (no tanh when
    ``softcap`` is None). Known cases: Cohere multiplies by ``logit_scale``,
    Granite divides by ``config.logits_scaling``, Falcon-H1 multiplies by
    ``config.lm_head_multiplier``, Gemma 2/3 cap with
    ``config.final_logit_softcapping``, RecurrentGemma with ``config.logits_soft_cap``. :func:`causal_lm_loss` checks the result
    against the model's forward once per model (:func:`_split_matches_forward`).
    """
    scale, softcap = 1.0, None
    multiplier = _number(getattr(model, "logit_scale", None))
    if multiplier is not None:
        scale *= multiplier
    for config in _configs(model):
        divisor = _number(getattr(config, "logits_scaling", None))
        factor = _number(getattr(config, "lm_head_multiplier", None))
        if divisor or factor is not None:
            scale = scale / (divisor or 1.0) * (1.0 if factor is None else factor)
            break
    for config in _configs(model):
        cap = _number(getattr(config, "final_logit_softcapping", None)) or _number(
            getattr(config, "logits_soft_cap", None))
        if cap:
            softcap = cap
            break
    return scale, softcap


# Rows per chunk are capped so the fp32 logits of a chunk stay under this many
# bytes: 341 rows at SmolLM2's 49152-token vocabulary, 128 at Llama 3's 128256.
LOGITS_BUDGET_BYTES = 64 * 2**20
# Vocabulary rows of a weight cast to the compute dtype at a time (fp32 weight
# under bf16 autocast): a 4.7 MB scratch block at hidden size 576, instead of a
# fresh copy of the whole head per call (56 MB for SmolLM2, whose page faults
# alone cost ~35 ms per copy on the VM these numbers come from).
CAST_BLOCK_ROWS = 4096


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    return active_autocast_dtype(hidden.device.type) or weight.dtype


def _weight_blocks(weight: Tensor, dtype: torch.dtype):
    """(start, block of weight rows in ``dtype``), casting at most CAST_BLOCK_ROWS rows at a time."""
    if weight.dtype == dtype:
        yield 0, weight
        return
    v = weight.shape[0]
    step = min(v, CAST_BLOCK_ROWS)
    buf = torch.empty((step, weight.shape[1]), dtype=dtype, device=weight.device)
    for v0 in range(0, v, step):
        block = buf[: min(step, v - v0)]
        block.copy_(weight[v0:v0 + block.shape[0]])
        yield v0, block


class LinearCrossEntropy(torch.autograd.Function):
    """``sum_i CE(softcap(scale * (h_i W^T + b)), t_i)`` and its gradients, one chunk of rows at a time.

    Forward computes, per chunk of rows: logits in the compute dtype (the autocast
    dtype when autocast is on, else the weight's), their fp32 log-sum-exp and the
    loss, then right away ``p = softmax - onehot`` (times the softcap
    derivative and the scale) and ``dh = p W`` (plus ``dW += p^T h``, ``db += sum p`` when the
    head is trainable). Backward only scales those by the incoming gradient. No
    logits survive a chunk; nothing is recomputed.

    Args (of ``apply``): hidden ``[n, H]``; weight ``[V, H]``; bias ``[V]`` or None;
    targets int64 ``[n]`` in ``[0, V)``; softcap float or None; chunk_rows int;
    scale float.
    Returns an fp32 scalar.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, softcap, chunk_rows, scale):
        n, v = hidden.shape[0], weight.shape[0]
        dtype = _compute_dtype(hidden, weight)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        rows = max(1, min(chunk_rows, LOGITS_BUDGET_BYTES // (4 * v)))
        grad_h = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(v, dtype=torch.float32, device=weight.device) if need_b else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        with torch.autocast(hidden.device.type, enabled=False):
            for r0 in range(0, n, rows):
                h = hidden[r0:r0 + rows].to(dtype)
                t = targets[r0:r0 + rows]
                z = torch.empty((h.shape[0], v), dtype=torch.float32, device=h.device)
                for v0, w in _weight_blocks(weight, dtype):
                    z[:, v0:v0 + w.shape[0]] = h @ w.t()
                if bias is not None:
                    z += bias.float()
                if scale != 1.0:
                    z.mul_(scale)
                squash = None
                if softcap is not None:
                    z.div_(softcap).tanh_()
                    squash = 1.0 - z * z  # d softcap(z) / dz, from tanh before scaling back
                    z.mul_(softcap)
                lse = torch.logsumexp(z, dim=1)
                rows_idx = torch.arange(h.shape[0], device=h.device)
                total += (lse - z[rows_idx, t]).sum()
                if not (need_h or need_w or need_b):
                    continue
                p = z.sub_(lse[:, None]).exp_()
                p[rows_idx, t] -= 1.0
                if squash is not None:
                    p.mul_(squash)
                if scale != 1.0:
                    p.mul_(scale)
                if need_b:
                    grad_b += p.sum(0)
                if need_h:
                    gh = None
                    for v0, w in _weight_blocks(weight, dtype):
                        part = p[:, v0:v0 + w.shape[0]].to(dtype) @ w
                        gh = part if gh is None else gh.add_(part)
                    grad_h[r0:r0 + rows] = gh
                if need_w:
                    grad_w.addmm_(p.t(), h.float())
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.weight_dtype = weight.dtype
        ctx.bias_dtype = bias.dtype if bias is not None else None
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        g = grad_out
        dh = grad_h * g.to(grad_h.dtype) if grad_h is not None else None
        dw = (grad_w * g).to(ctx.weight_dtype) if grad_w is not None else None
        db = (grad_b * g).to(ctx.bias_dtype) if grad_b is not None else None
        return dh, dw, db, None, None, None, None


def linear_cross_entropy(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                         softcap: float | None = None, chunk_rows: int = 1024, scale: float = 1.0) -> Tensor:
    """Summed cross-entropy of ``hidden @ weight^T + bias`` against ``targets`` (fp32 scalar).

    Equal to ``F.cross_entropy(F.linear(hidden, weight, bias).float(), targets,
    reduction="sum")`` (logits times ``scale``, then Gemma-style
    ``softcap * tanh(logits / softcap)`` when ``softcap`` is set), without ever holding more than one chunk of
    logits; see :class:`LinearCrossEntropy`.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [n, H] and weight [V, H]; got {tuple(hidden.shape)} and "
                         f"{tuple(weight.shape)}")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets must be [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if targets.numel():
        lo, hi = (int(v) for v in torch.aminmax(targets))  # one device sync for both bounds
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"targets must be class indices in [0, {weight.shape[0]}) (ignored positions removed "
                             f"beforehand), got values in [{lo}, {hi}]")
    scale = float(scale)
    if not math.isfinite(scale) or scale == 0.0:
        raise ValueError(f"scale must be a finite nonzero number, got {scale}")
    if softcap is not None and not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be a positive number or None, got {softcap}")
    return LinearCrossEntropy.apply(hidden, weight, bias, targets, softcap, chunk_rows, scale)


def _linear_head(head: nn.Module) -> tuple[Tensor, Tensor | None] | None:
    """(weight, bias) when ``head`` is a plain linear projection (nn.Linear or a tied head), else None."""
    weight = getattr(head, "weight", None)
    bias = getattr(head, "bias", None)
    if not isinstance(weight, Tensor) or weight.dim() != 2:
        return None
    if type(head).forward is not nn.Linear.forward and not getattr(head, "is_plain_linear", False):
        return None
    return weight, bias


def _apply_transform(logits: Tensor, scale: float, softcap: float | None) -> Tensor:
    logits = logits.float()
    if scale != 1.0:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_ce_sum(hidden: Tensor, targets: Tensor, head: nn.Module, scale: float, softcap: float | None) -> Tensor:
    return F.cross_entropy(_apply_transform(head(hidden), scale, softcap), targets, reduction="sum")


def _logits(out) -> Tensor:
    return out if isinstance(out, Tensor) else out.logits if hasattr(out, "logits") else out[0]


def _hidden(out) -> Tensor:
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


# Result of _split_matches_forward per model object (weak: a deleted model leaves no entry).
_SPLIT_CHECKED: "weakref.WeakKeyDictionary[nn.Module, bool]" = weakref.WeakKeyDictionary()
CHECK_TOKENS = 16


def _split_matches_forward(model: nn.Module, body: nn.Module, head: nn.Module, input_ids: Tensor) -> bool:
    """Whether ``head(body(ids))`` under :func:`logit_transform` gives the logits of ``model(ids)``.

    Checked once per model, on the first ``CHECK_TOKENS`` tokens of the first row,
    without gradients, without autocast, and with every module in eval mode (no
    dropout, no random numbers drawn; each module's mode is restored after).
    float32 logits must agree to 1e-5 of their largest value (both sides run the
    same GEMMs; only the transform's rounding differs), half-precision ones to 1e-2. This guards against a
    family whose forward changes its logits in a way :func:`logit_transform` does
    not know: its loss then comes from the model's full logits, with a warning,
    instead of being silently wrong. On a 135M model the check costs one forward
    of 16 tokens.
    """
    known = _SPLIT_CHECKED.get(model)
    if known is not None:
        return known
    if any(p.is_meta for p in model.parameters()):
        return True  # not materialized yet (deferred init): nothing to run; checked on a later call
    if any(_is_dtensor(p) for p in model.parameters()):
        # Sharded (FSDP2) before it was checked: its forward may call a submodule past the
        # sharded unit's hooks (OPT calls model.decoder, not model), so it cannot be run
        # here. The Trainer checks before sharding (check_loss_split); a model sharded by
        # hand keeps the known transforms unchecked.
        return True
    ids = input_ids[:1, :CHECK_TOKENS]
    modes = [(m, m.training) for m in model.modules()]
    why = None
    try:
        model.eval()
        with torch.no_grad(), torch.autocast(ids.device.type, enabled=False):
            full = _logits(model(input_ids=ids, use_cache=False))
            rtol = 1e-5 if full.dtype in (torch.float32, torch.float64) else 1e-2
            full = full.float()
            scale, softcap = logit_transform(model)
            split = _apply_transform(head(_hidden(body(input_ids=ids, use_cache=False))), scale, softcap)
            if split.shape != full.shape:
                why = f"the head gives logits of shape {tuple(split.shape)}, the model {tuple(full.shape)}"
            else:
                err = float((split - full).abs().max())
                limit = rtol * float(full.abs().max()) + 1e-6
                if not err <= limit:
                    why = f"head(hidden states) differs from the model's logits by up to {err:.3g}"
    except Exception as e:  # noqa: BLE001 - any failure means the split cannot be trusted
        why = f"comparing them failed ({type(e).__name__}: {e})"
    finally:
        for m, training in modes:
            m.training = training
    if why is not None:
        warnings.warn(f"causal_lm_loss: {type(model).__name__}: {why}; computing the loss from the model's full "
                      f"logits instead (correct, but slower and with more memory)", stacklevel=3)
    _SPLIT_CHECKED[model] = why is None
    return why is None


def _is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch < 2.5 has it elsewhere, and no FSDP2 here
        return False
    return isinstance(t, DTensor)


def check_loss_split(model: nn.Module, input_ids: Tensor) -> bool:
    """Whether :func:`causal_lm_loss` can score ``model`` from its body and head (the fused path).

    Runs :func:`_split_matches_forward` now rather than at the first loss call:
    the :class:`~lorakern.train.Trainer` calls it before wrapping the model for
    FSDP, after which a forward of the whole model may bypass the sharded body.
    False for a model without ``get_output_embeddings`` (always scored from its
    full logits) and for one whose split fails the check.
    """
    body, head = split_causal_lm(model)
    return body is not None and _split_matches_forward(model, body, head, input_ids)


_FORWARD_ARGS: dict[type, frozenset[str] | None] = {}  # per class: forward's named parameters, None = takes **kwargs
_WARNED_UNPACKED: set[type] = set()


def accepts_input(model: nn.Module, name: str) -> bool:
    """Whether ``model``'s forward takes the keyword argument ``name``.

    True when it names the parameter or takes ``**kwargs`` (Hugging Face models),
    or when its signature cannot be read. A DDP or ``torch.compile`` wrapper is
    judged by the model inside it (the compile wrapper declares no forward of its
    own: nn.Module's placeholder took every keyword away). Looked up once per
    class, the loss asks at every micro-batch; a forward set on the instance is
    read each time.
    """
    model = unwrap(model)
    own = vars(model).get("forward")
    cls = type(model)
    if own is not None:
        names = _forward_names(own)
    else:
        if cls not in _FORWARD_ARGS:
            _FORWARD_ARGS[cls] = _forward_names(cls.forward)
        names = _FORWARD_ARGS[cls]
    return names is None or name in names


def _forward_names(forward) -> frozenset[str] | None:
    """The keyword parameters of ``forward``; None when it takes ``**kwargs`` or cannot be read."""
    try:
        params = inspect.signature(forward).parameters.values()
    except (TypeError, ValueError):  # a C-level or otherwise opaque forward: pass what we would pass anyway
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    return frozenset(p.name for p in params if p.kind is not inspect.Parameter.POSITIONAL_ONLY)


def _mask_inputs(model: nn.Module, attention_mask: Tensor | None, position_ids: Tensor | None, **inputs) -> dict:
    """``inputs`` plus the inputs that say what each token sees, those ``model``'s forward takes.

    Packed examples (``position_ids`` restarting at 0 for each): no attention
    mask and no cache, so transformers' masking builds the block-diagonal causal
    mask from the positions; given a 2-D mask (or a cache) it ignores them and
    packed examples see each other. A forward without ``position_ids`` gets the
    attention mask instead (a one-time warning: its packed examples may see
    each other); one without ``attention_mask`` gets none, which for right-padded
    batches of a causal model changes nothing (no token attends to the padding
    after it).
    """
    inputs = {k: v for k, v in inputs.items() if accepts_input(model, k)}
    if position_ids is not None:
        if accepts_input(model, "position_ids"):
            return {**inputs, "position_ids": position_ids,
                    **({"use_cache": False} if accepts_input(model, "use_cache") else {})}
        inner = type(unwrap(model))
        if inner not in _WARNED_UNPACKED:
            _WARNED_UNPACKED.add(inner)
            warnings.warn(f"{inner.__name__}.forward takes no position_ids, so nothing keeps packed examples "
                          f"apart: given the attention mask of the whole row, they may attend to each other and "
                          f"their losses include that; train it without packing to score each example alone",
                          stacklevel=4)
    if attention_mask is None or not accepts_input(model, "attention_mask"):
        return inputs
    return {**inputs, "attention_mask": attention_mask}


PACKING_PROBE_TOKENS = 8  # two segments of 4: one forward of 8 tokens and one of 4


def check_packing(model: nn.Module, tokens: Sequence[int]) -> bool:
    """Whether ``model`` scores packed examples as it scores each alone; warns if not.

    Runs the model (eval mode, no grad, no autocast) on two segments cut from
    ``tokens`` packed into one row, as :func:`causal_lm_loss` passes a packed
    batch, and on the second segment alone, and compares the second segment's
    logits. Position ids keep examples apart only where the model builds its
    attention mask from them: Llama-like transformers do; ALiBi models whose
    forward drops them (Bloom, MPT), OPT and XGLM (their causal mask ignores
    them) and recurrent models (Mamba: the state flows on) do not, and their
    packed losses include attention across examples. Tolerance: relative 1e-4
    in float32 / float64, 1e-2 in half precision (what reordered reductions
    give); at random initialization the float32 probe flags all of those
    families, while in bfloat16 Bloom's and XGLM's small effect there (~5e-3)
    stays below it.
    """
    model = unwrap(model)  # a compile wrapper would recompile for the probe's eval mode and shapes
    tokens = list(tokens)[:PACKING_PROBE_TOKENS]
    half = len(tokens) // 2
    if half == 0 or any(p.is_meta or _is_dtensor(p) for p in model.parameters()):
        return True  # nothing to compare, or nothing that can run here
    device = next(model.parameters(), torch.empty(0)).device
    ids = torch.tensor([tokens[:2 * half]], device=device)
    positions = torch.tensor([[*range(half), *range(half)]], device=device)
    mask = torch.ones_like(ids)
    modes = [(m, m.training) for m in model.modules()]
    _WARNED_UNPACKED.add(type(model))  # this check says more than the signature warning of _mask_inputs
    why = None
    try:
        model.eval()
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            packed = _logits(model(ids, **_mask_inputs(model, mask, positions)))[0, half:]
            alone = _logits(model(ids[:, half:], **_mask_inputs(model, mask[:, half:], None)))[0]
        rtol = 1e-4 if alone.dtype in (torch.float32, torch.float64) else 1e-2
        packed, alone = packed.float(), alone.float()
        err = float((packed - alone).abs().max())
        if not err <= rtol * float(alone.abs().max()) + 1e-6:
            why = (f"a packed example's logits differ from its logits alone by up to {err:.3g} (its attention "
                   f"or state reaches the example before it)")
    except Exception as e:  # noqa: BLE001 - reported below; training itself then raises if the model cannot run
        warnings.warn(f"packing: could not check whether {type(model).__name__} keeps packed examples apart: "
                      f"running it on a packed row failed ({type(e).__name__}: {e})", stacklevel=3)
        return False
    finally:
        for m, training in modes:
            m.training = training
    if why is not None:
        warnings.warn(f"packing: {type(model).__name__} does not keep packed examples apart: {why}; their losses "
                      f"include attention across examples. Train this model without packing to score each "
                      f"example alone", stacklevel=3)
    return why is None


def _full_logits_loss(model: nn.Module, input_ids: Tensor, targets: Tensor, keep: Tensor,
                      attention_mask: Tensor | None, position_ids: Tensor | None) -> Tensor:
    out = model(input_ids, **_mask_inputs(model, attention_mask, position_ids))
    return F.cross_entropy(_logits(out)[:, :-1][keep].float(), targets[keep], reduction="sum")


def causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    chunk_size: int = 1024,
    position_ids: Tensor | None = None,
) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy over labelled positions and their count.

    Args:
        input_ids: int64 ``[B, T]``.
        labels: int64 ``[B, T]``; position ``t`` is the target of the prediction
            made at ``t - 1`` (Hugging Face convention); ``-100`` is ignored.
        attention_mask: ``[B, T]`` (1 = token) or None.
        chunk_size: rows of labelled hidden states projected at once.
        position_ids: int64 ``[B, T]`` of packed batches (:class:`~lorakern.train.data.Collator`),
            or None; when given to a model whose forward takes them, ``attention_mask``
            is not passed, and a model that builds its mask from positions keeps each
            packed example from seeing the others (:func:`check_packing` tells which).

    Returns:
        (loss_sum fp32 scalar, number of labelled positions). ``loss_sum / n``
        equals ``model(input_ids, labels=labels).loss`` of a Hugging Face model;
        callers divide by the label count of a whole accumulated batch so that
        gradient accumulation weights every token equally.

    A Hugging Face causal LM runs as body, then the head on labelled positions
    only, with the logit scale and softcap of its family (:func:`logit_transform`).
    The first call for a model checks that split against the model's own forward
    (:func:`_split_matches_forward`); a model that fails it, or any model without
    ``get_output_embeddings``, is scored from its full logits.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if isinstance(model, DistributedDataParallel) and isinstance(model.module, CausalLMLoss):
        return model(input_ids, labels, attention_mask, chunk_size, position_ids)  # through DDP: gradients sync
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    body, head = split_causal_lm(model)
    if body is None or not _split_matches_forward(model, body, head, input_ids):
        return _full_logits_loss(model, input_ids, targets, keep, attention_mask, position_ids), n
    hidden = _hidden(body(input_ids=input_ids, **_mask_inputs(body, attention_mask, position_ids, use_cache=False)))
    selected = hidden[:, :-1][keep]  # [n, H]: the only rows that ever meet the head
    targets = targets[keep]
    scale, softcap = logit_transform(model)
    # Zero, but attached to the graph: a micro-batch without labels still runs a
    # backward, which DDP / FSDP need (every rank joins each gradient reduction).
    total = hidden[:, :0].float().sum()
    linear = _linear_head(head)
    if linear is not None:
        return total + linear_cross_entropy(selected, linear[0], linear[1], targets, softcap, chunk_size,
                                                    scale), n
    for start in range(0, n, chunk_size):
        h, t = selected[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters())):
            # Recompute this chunk's logits in backward instead of keeping them.
            total = total + checkpoint(_chunk_ce_sum, h, t, head, scale, softcap, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h, t, head, scale, softcap)
    return total, n


class CausalLMLoss(nn.Module):
    """``causal_lm_loss(model, ...)`` as a module's forward.

    DistributedDataParallel synchronises gradients only for computations that run
    inside its own ``forward``; the chunked loss calls the body and the head
    separately, so :func:`lorakern.train.distributed.wrap_model` wraps this module
    (not the bare model) for ``ddp``, and :func:`causal_lm_loss` on that wrapper
    calls through DDP. Without it DDP saw only ``model(input_ids)``: full logits.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: Tensor, labels: Tensor, attention_mask: Tensor | None = None,
                chunk_size: int = 1024, position_ids: Tensor | None = None) -> tuple[Tensor, int]:
        return causal_lm_loss(self.model, input_ids, labels, attention_mask, chunk_size, position_ids)
