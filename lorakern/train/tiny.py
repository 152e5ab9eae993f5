"""Tiny offline models for tests and smoke runs: a character tokenizer and a small Llama.

Both are built from code (no download, no file), deterministic for a seed, and
small enough that a training step takes milliseconds on a CPU.
"""

from __future__ import annotations

import string

__all__ = ["CHATML_TEMPLATE", "tiny_tokenizer", "tiny_llama"]

# ChatML, the layout SmolLM2 and Qwen2 use.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer(chat_template: str | None = CHATML_TEMPLATE):
    """A character-level ``PreTrainedTokenizerFast`` (printable ASCII + ChatML specials, 101 ids).

    ``chat_template=None`` gives a tokenizer without a template (exercises the
    fallback format). EOS is ``<|im_end|>``, padding ``<pad>``.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = sorted(set(string.printable) - set("\x0b\x0c\r"))
    vocab = {tok: i for i, tok in enumerate(_SPECIALS + chars)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one piece per character
    backend.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>",
                                  eos_token="<|im_end|>", bos_token="<|im_start|>")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = chat_template
    return tok


def tiny_llama(vocab_size: int = 104, hidden_size: int = 32, layers: int = 2, seed: int = 0,
               tie_word_embeddings: bool = False, pad_token_id: int = 0, eos_token_id: int = 3):
    """A randomly initialised ``LlamaForCausalLM`` (fp32, 2 layers, hidden 32 by default)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=tie_word_embeddings,
                         pad_token_id=pad_token_id, eos_token_id=eos_token_id, bos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).float()
