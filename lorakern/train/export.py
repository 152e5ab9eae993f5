"""Shipping a fine-tuned model: the adapter (PEFT format), a merged full model, a chat loop.

* :func:`save_trained`: LoRA / QLoRA runs write ``adapter_config.json`` +
  ``adapter_model.safetensors`` (loads in PEFT and in :func:`lorakern.load_adapter`);
  full fine-tuning writes the whole model with ``save_pretrained`` (safetensors).
* :func:`merge_and_save`: fold the adapter into the base weights and write a
  plain Hugging Face model directory that needs neither lorakern nor PEFT.
* :func:`load_for_chat` + :func:`chat`: load a base model (+ adapter) and talk to it.
"""

from __future__ import annotations

import os
import sys

from torch import nn

__all__ = ["save_trained", "merge_and_save", "merged_copy", "load_for_chat", "chat"]


def _has_lora(model: nn.Module) -> bool:
    from ..patch import lora_modules

    return bool(lora_modules(model))


def save_trained(model: nn.Module, tokenizer, directory: str) -> str:
    """Save what was trained: the adapter when ``model`` has LoRA layers, else the full model.

    The tokenizer is saved next to it, so the directory is self-contained for
    :func:`load_for_chat`. Returns ``directory``.
    """
    os.makedirs(directory, exist_ok=True)
    if _has_lora(model):
        from ..patch import save_adapter

        save_adapter(model, directory)
    else:
        model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def merge_and_save(model: nn.Module, tokenizer, directory: str) -> str:
    """Merge LoRA layers into the base weights (in place) and ``save_pretrained`` the result.

    NF4 layers become dense in their compute dtype. The saved directory loads
    with the model's auto class alone: ``AutoModelForCausalLM.from_pretrained(directory)``
    (``AutoModelForSeq2SeqLM`` for T5 and other encoder-decoders).
    """
    from ..patch import merge_lora

    if _has_lora(model):
        merge_lora(model)
    os.makedirs(directory, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def merged_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with its LoRA layers merged into plain dense layers (``model`` is untouched).

    Numerically the same function as the adapted model (``dequant(W) + scaling *
    B A``, formed in fp32), but it runs on dense GEMMs: for generation with an
    NF4 base on CPU, where every decode step would dequantize or stream 4-bit
    weights through a small-M path, this is the faster way to evaluate. Costs
    one dense copy of the weights (540 MB for SmolLM2-135M in fp32).
    """
    import copy

    from ..patch import merge_lora

    clone = copy.deepcopy(model)
    return merge_lora(clone) if _has_lora(clone) else clone


def load_for_chat(model_spec: str | None = None, adapter: str | None = None, quantize: str | None = None,
                  device="cpu"):
    """Load a base model (see :func:`lorakern.train.models.resolve_model`) and optionally an adapter.

    ``quantize="nf4"`` (with ``adapter`` only) puts the adapter on an NF4 base (as it was trained with QLoRA),
    each layer quantized on ``device`` from a host copy, so the full-precision model
    never has to fit the GPU. Returns (model, tokenizer) in eval mode.
    """
    import torch

    from .models import load_model_and_tokenizer

    if quantize is not None and adapter is None:  # NF4 layers come with an adapter: QLoRALinear
        raise ValueError(f"quantize={quantize!r} applies with an adapter (it puts the adapter on an NF4 base); "
                         "without one the base model loads unquantized")
    staged = adapter is not None and quantize is not None and torch.device(device).type != "cpu"
    model, tokenizer = load_model_and_tokenizer(model_spec, device="cpu" if staged else device)
    if adapter is not None:
        from ..patch import load_adapter

        load_adapter(model, adapter, quantize=quantize, **(dict(device=device) if staged else {}))
    if staged:
        model.to(device)
    return model.eval(), tokenizer


def chat(model: nn.Module, tokenizer, prompts=None, max_new_tokens: int = 128, system: str | None = None,
         out=None, read=input) -> list[str]:
    """Answer ``prompts`` one by one, or talk interactively (empty line or EOF ends) when None.

    Each prompt is a fresh conversation (greedy decoding); returns the replies.
    """
    from .evaluate import generate

    out = sys.stdout if out is None else out  # looked up per call: sys.stdout may be replaced

    def answer(text: str) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return generate(model, tokenizer, [messages], max_new_tokens=max_new_tokens, batch_size=1)[0]

    replies = []
    if prompts is not None:
        for text in prompts:
            replies.append(answer(text))
            print(replies[-1], file=out)
        return replies
    while True:
        try:
            text = read("> ")
        except EOFError:
            break
        if not text.strip():
            break
        replies.append(answer(text))
        print(replies[-1], file=out)
    return replies
