"""Causal-LM loss that projects to the vocabulary only where a label exists.

The standard Hugging Face path computes ``logits = lm_head(hidden)`` for every
position, a ``[B, T, vocab]`` tensor, then ignores the masked ones. In
instruction tuning most positions are prompt: in the shipped triage data 76%
of tokens carry no label, and for SmolLM2 (vocab 49152, hidden 576) the logits
of a 8 x 128 batch alone are 200 MB in fp32, plus as much again for their
gradient. Here the hidden states of labelled positions are gathered first, then
the head and the cross-entropy run in chunks of ``chunk_size`` rows under
activation checkpointing, so at most one ``[chunk_size, vocab]`` block of
logits is alive at any time, in forward and in backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .data import IGNORE_INDEX

__all__ = ["split_causal_lm", "causal_lm_loss"]


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


def _logit_softcap(model: nn.Module) -> float | None:
    # Gemma 2/3 squash logits with cap * tanh(logits / cap) before the softmax.
    config = getattr(model, "config", None)
    cap = getattr(config, "final_logit_softcapping", None)
    if config is not None and getattr(config, "get_text_config", None):
        cap = cap or getattr(config.get_text_config(), "final_logit_softcapping", None)
    return float(cap) if cap else None


def _chunk_ce_sum(hidden: Tensor, targets: Tensor, head: nn.Module, softcap: float | None) -> Tensor:
    logits = head(hidden).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, targets, reduction="sum")


def causal_lm_loss(
    model: nn.Module,
    input_ids: Tensor,
    labels: Tensor,
    attention_mask: Tensor | None = None,
    chunk_size: int = 1024,
) -> tuple[Tensor, int]:
    """Summed next-token cross-entropy over labelled positions and their count.

    Args:
        input_ids: int64 ``[B, T]``.
        labels: int64 ``[B, T]``; position ``t`` is the target of the prediction
            made at ``t - 1`` (Hugging Face convention); ``-100`` is ignored.
        attention_mask: ``[B, T]`` (1 = token) or None.
        chunk_size: rows of labelled hidden states projected at once.

    Returns:
        (loss_sum fp32 scalar, number of labelled positions). ``loss_sum / n``
        equals ``model(input_ids, labels=labels).loss`` of a Hugging Face model;
        callers divide by the label count of a whole accumulated batch so that
        gradient accumulation weights every token equally.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    targets = labels[:, 1:]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    body, head = split_causal_lm(model)
    if body is None:
        out = model(input_ids) if attention_mask is None else model(input_ids, attention_mask=attention_mask)
        logits = out if isinstance(out, Tensor) else out.logits if hasattr(out, "logits") else out[0]
        loss = F.cross_entropy(logits[:, :-1][keep].float(), targets[keep], reduction="sum")
        return loss, n
    out = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
    selected = hidden[:, :-1][keep]  # [n, H]: the only rows that ever meet the head
    targets = targets[keep]
    softcap = _logit_softcap(model)
    # Zero, but attached to the graph: a micro-batch without labels still runs a
    # backward, which DDP / FSDP need (every rank joins each gradient reduction).
    total = hidden[:, :0].float().sum()
    for start in range(0, n, chunk_size):
        h, t = selected[start:start + chunk_size], targets[start:start + chunk_size]
        if torch.is_grad_enabled() and (h.requires_grad or any(p.requires_grad for p in head.parameters())):
            # Recompute this chunk's logits in backward instead of keeping them.
            total = total + checkpoint(_chunk_ce_sum, h, t, head, softcap, use_reentrant=False)
        else:
            total = total + _chunk_ce_sum(h, t, head, softcap)
    return total, n
