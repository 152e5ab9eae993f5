"""Evaluation: held-out loss / perplexity, generation, task metrics, before/after reports.

The same :func:`evaluate_model` runs before and after training, so the two
reports differ only by the weights. Task metrics assume structured answers:
when the reference reply is a JSON object, the prediction's first JSON object
is compared to it as a whole (exact match) and field by field; otherwise the
stripped texts are compared.
"""

from __future__ import annotations

import json
import math
from typing import Sequence

import torch
from torch import nn

from .data import Collator, Example, format_chat
from .loss import causal_lm_loss
from .sampler import World

__all__ = [
    "evaluate_loss",
    "generate",
    "parse_json_object",
    "task_metrics",
    "evaluate_model",
    "format_report",
    "format_comparison",
]


@torch.no_grad()
def evaluate_loss(model: nn.Module, examples: Sequence[Example], batch_size: int = 8,
                  collate: Collator | None = None, world: World | None = None,
                  chunk_size: int = 1024) -> dict:
    """Mean next-token loss over every labelled token of ``examples`` and its perplexity.

    Returns ``{"loss", "perplexity", "tokens"}`` (loss in nats per token; NaN
    when there is nothing to evaluate). Batches are sorted by length to waste
    little on padding; the model is put in eval mode and restored afterwards.
    Packed examples (:func:`~lorakern.train.data.pack_examples`) are scored
    apart, as in training steps.
    """
    world = world or World()
    if collate is None:
        pad = getattr(getattr(model, "config", None), "pad_token_id", None)
        collate = Collator(pad if pad is not None else 0)
    device = next(model.parameters()).device
    order = sorted(range(len(examples)), key=lambda i: len(examples[i]))
    mine = world.shard(order)
    # Every rank runs as many batches as the largest shard needs: under FSDP each
    # forward is a collective, and shards differ by up to one example.
    n_batches = -(-(-(-len(order) // world.world_size)) // batch_size)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, n_batches * batch_size, batch_size):
            rows = mine[i:i + batch_size]
            batch = collate([examples[j] for j in (rows or order[:1])])
            batch = {k: v.to(device) for k, v in batch.items()}
            loss, n = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"],
                                     chunk_size=chunk_size, position_ids=batch.get("position_ids"))
            if rows:  # a rank whose share ran out ran that forward only to keep step
                total += float(loss)
                count += n
    finally:
        model.train(was_training)
    total, count = world.all_reduce_sum(total), world.all_reduce_sum(float(count))
    loss = total / count if count else float("nan")
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)) if count else float("nan"), "tokens": int(count)}


@torch.no_grad()
def generate(model: nn.Module, tokenizer, chats: Sequence[list[dict]], max_new_tokens: int = 64,
             batch_size: int = 8) -> list[str]:
    """Greedy replies to each chat (a list of messages ending with a user turn).

    Prompts are rendered with the same template as training (generation header
    appended) and left-padded so a batch decodes in lock step. Returns the
    decoded new text only, without special tokens.
    """
    if not hasattr(model, "generate"):
        raise TypeError(f"generate() needs a Hugging Face model with .generate(), got {type(model).__name__}")
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    outputs: list[str] = []
    try:
        for i in range(0, len(chats), batch_size):
            prompts = [tokenizer(format_chat(tokenizer, c, add_generation_prompt=True),
                                 add_special_tokens=False)["input_ids"] for c in chats[i:i + batch_size]]
            width = max(len(p) for p in prompts)
            ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(prompts), width), dtype=torch.long)
            for row, p in enumerate(prompts):
                ids[row, width - len(p):] = torch.tensor(p)
                mask[row, width - len(p):] = 1
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                 eos_token_id=tokenizer.eos_token_id)
            outputs += tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
    finally:
        model.train(was_training)
    return [o.strip() for o in outputs]


def parse_json_object(text: str) -> dict | None:
    """The first JSON object in ``text`` (models often wrap it in prose or code fences), or None.

    Only a ``{`` outside every brace pair is a candidate: an object nested in a
    cut-off one (``{"a": 1, "b": {"c": 2}`` at the token limit) is not an answer.
    Braces inside JSON strings are not counted.
    """
    decoder = json.JSONDecoder()
    depth, in_string, escaped = 0, False, False
    for i, ch in enumerate(text):
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"' and depth > 0:  # quotes in the prose around an object open no string
            in_string = True
        elif ch == "{":
            if depth == 0:
                try:
                    return decoder.raw_decode(text, i)[0]  # starts with "{": always a dict
                except json.JSONDecodeError:
                    pass  # braces around prose ("{not json}"): the next top-level brace may open the answer
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
    return None


def _json_equal(a, b) -> bool:
    """Equality of parsed JSON values: ``true`` is not ``1`` nor ``false`` ``0`` (Python's ``True == 1``),
    at any depth. ``1`` and ``1.0`` stay equal: JSON has one number type."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return isinstance(b, list) and len(a) == len(b) and all(map(_json_equal, a, b))
    return a == b


def task_metrics(predictions: Sequence[str], references: Sequence[str]) -> dict:
    """Exact match, valid-JSON rate and per-field accuracy of predictions against references.

    A JSON reference matches when the prediction's first JSON object equals it
    (key order and whitespace ignored; ``true`` differs from ``1``); each of the
    reference's fields counts as correct when the prediction has the same value
    (a missing field is wrong, even where the reference's value is ``null``). Non-JSON references are
    compared as stripped text.

    Returns ``{"n", "exact_match"}`` over all references and, when some reference
    is a JSON object, ``"json_references"`` (their count), ``"valid_json"`` (the
    share of those whose prediction holds a JSON object; text references expect
    none and are left out) and ``"field_accuracy"`` (per reference field).
    """
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    n = len(references)
    exact, valid, n_json = 0, 0, 0
    fields: dict[str, list[int]] = {}
    for pred, ref in zip(predictions, references):
        ref_obj = parse_json_object(ref) if ref.lstrip().startswith("{") else None
        if ref_obj is None:
            exact += int(pred.strip() == ref.strip())
            continue
        n_json += 1
        pred_obj = parse_json_object(pred)
        valid += pred_obj is not None
        exact += int(pred_obj is not None and _json_equal(pred_obj, ref_obj))
        for key, value in ref_obj.items():
            hit = int(pred_obj is not None and key in pred_obj and _json_equal(pred_obj[key], value))
            fields.setdefault(key, []).append(hit)
    out = {"n": n, "exact_match": exact / n if n else float("nan")}
    if n_json:  # a text reference expects no JSON: it counts for neither side of the rate
        out["json_references"] = n_json
        out["valid_json"] = valid / n_json
        out["field_accuracy"] = {k: sum(v) / len(v) for k, v in fields.items()}
    return out


def evaluate_model(model: nn.Module, tokenizer, test_chats: Sequence[list[dict]] = (),
                   test_examples: Sequence[Example] = (), general_examples: Sequence[Example] = (),
                   max_new_tokens: int = 64, batch_size: int = 8, num_samples: int = 3) -> dict:
    """One evaluation report: task loss, generation metrics, general-text loss, sample outputs.

    Args:
        test_chats: held-out chats ending with the reference assistant reply;
            the model answers each chat without its last message.
        test_examples: the tokenized held-out set (loss / perplexity).
        general_examples: tokenized general text, unrelated to the task: its loss
            rising after training is forgetting.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = Collator(pad)
    report: dict = {}
    if test_examples:
        report["test"] = evaluate_loss(model, test_examples, batch_size, collate)
    if general_examples:
        report["general"] = evaluate_loss(model, general_examples, batch_size, collate)
    if test_chats:
        prompts = [c[:-1] for c in test_chats]
        references = [c[-1]["content"] for c in test_chats]
        predictions = generate(model, tokenizer, prompts, max_new_tokens, batch_size)
        report["task"] = task_metrics(predictions, references)
        report["samples"] = [{"prompt": p[-1]["content"], "reference": r, "prediction": o}
                             for p, r, o in list(zip(prompts, references, predictions))[:num_samples]]
    return report


def format_report(report: dict, title: str = "evaluation") -> str:
    """Human-readable summary of one :func:`evaluate_model` report."""
    lines = [title]
    lines += _metric_lines(report)
    return "\n".join(lines)


def _metric_lines(report: dict) -> list[str]:
    lines = []
    if "test" in report:
        lines.append(f"  held-out loss {report['test']['loss']:.4f}  perplexity {report['test']['perplexity']:.2f}")
    if "task" in report:
        t = report["task"]
        lines.append(f"  exact match {t['exact_match']:.1%} ({t['n']} examples)")
        if "valid_json" in t:
            of = f" (of {t['json_references']} JSON references)" if "json_references" in t else ""
            lines.append(f"  valid JSON {t['valid_json']:.1%}{of}")
            lines += [f"  field {k}: {v:.1%}" for k, v in t["field_accuracy"].items()]
    if "general" in report:
        lines.append(f"  general-text loss {report['general']['loss']:.4f}")
    return lines


def format_comparison(before: dict, after: dict) -> str:
    """Side-by-side table of two reports (before and after training), with the forgetting check."""
    rows = []

    def add(name, key_path, pct=False):
        b, a = _get(before, key_path), _get(after, key_path)
        if b is None or a is None:
            return
        rows.append(f"  {name:<22}{_cell(b, pct)} -> {_cell(a, pct)}")

    add("held-out loss", ("test", "loss"))
    add("held-out perplexity", ("test", "perplexity"))
    add("exact match", ("task", "exact_match"), pct=True)
    add("valid JSON", ("task", "valid_json"), pct=True)
    for key in (_get(after, ("task", "field_accuracy")) or {}):
        add(f"field {key}", ("task", "field_accuracy", key), pct=True)
    add("general-text loss", ("general", "loss"))
    lines = [f"  {'':<22}{'before':>10}    {'after':>10}", *rows]
    b, a = _get(before, ("general", "loss")), _get(after, ("general", "loss"))
    if b is not None and a is not None:
        change = (a - b) / b
        verdict = "no sign of forgetting" if change < 0.05 else "general-text loss rose: some forgetting"
        lines.append(f"  forgetting check: general-text loss {change:+.1%} ({verdict})")
    return "\n".join(lines)


def _cell(value: float, pct: bool) -> str:
    """One table cell, 10 characters wide for any value (perplexity runs up to e^50 ~ 5e21)."""
    if pct:
        return f"{value:10.1%}"
    return f"{value:10.4f}" if abs(value) < 1e5 else f"{value:10.3e}"


def _get(d: dict, path: tuple):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d
