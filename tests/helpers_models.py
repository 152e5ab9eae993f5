"""Tiny models for patching tests: every supported family from a small config (hidden 64, 2 layers, vocab 128).

Every in_features is a multiple of 64: bitsandbytes 0.50.2 dequantizes NF4 wrongly
on CPU when in_features is not a multiple of the block size (a [40, 32] weight
decodes with the absmax of the wrong block, errors up to 1.5 for N(0, 1) weights,
although its packed bytes equal ours), and the QLoRA tests compare against it.

Model-level dropout is off everywhere so that train mode and eval mode compute the
same function (comparisons with PEFT run in train mode, see test_peft_interop).

Each builder returns a model in eval mode with a fixed seed, so two calls give
identical weights. ``FAMILIES`` maps a family name to (builder, example input
maker, the layer names a LoRA on "all-linear" must touch in layer 0).
"""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 128


class PlainMLP(nn.Module):
    """A model with no transformers in it: two blocks of Linear layers and a head."""

    def __init__(self, dim: int = 48):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, dim)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"up": nn.Linear(dim, 2 * dim), "down": nn.Linear(2 * dim, dim, bias=False)}) for _ in range(2))
        self.head = nn.Linear(dim, VOCAB)

    def forward(self, input_ids):
        h = self.embed(input_ids)
        for block in self.blocks:
            h = h + block["down"](torch.nn.functional.gelu(block["up"](h)))
        return self.head(h)


def _causal(config_cls, model_cls, **kw):
    def build(seed: int = 0):
        torch.manual_seed(seed)
        model = model_cls(config_cls(vocab_size=VOCAB, **kw))
        return model.eval()

    return build


def llama(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    return _causal(LlamaConfig, LlamaForCausalLM, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)(seed)


def qwen2(seed=0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return _causal(Qwen2Config, Qwen2ForCausalLM, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)(seed)


def mistral(seed=0):
    from transformers import MistralConfig, MistralForCausalLM

    return _causal(MistralConfig, MistralForCausalLM, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)(seed)


def gemma(seed=0):
    from transformers import GemmaConfig, GemmaForCausalLM

    return _causal(GemmaConfig, GemmaForCausalLM, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=16)(seed)


def phi3(seed=0):
    from transformers import Phi3Config, Phi3ForCausalLM

    return _causal(Phi3Config, Phi3ForCausalLM, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)(seed)


def gpt2(seed=0):
    from transformers import GPT2Config, GPT2LMHeadModel

    return _causal(GPT2Config, GPT2LMHeadModel, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)(seed)


def gpt_neox(seed=0):
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    return _causal(GPTNeoXConfig, GPTNeoXForCausalLM, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=64, hidden_dropout=0.0,
                   attention_dropout=0.0)(seed)


def falcon(seed=0):
    from transformers import FalconConfig, FalconForCausalLM

    # new_decoder_architecture: grouped KV heads and parallel attention/MLP (Falcon-40B/180B layout);
    # its query_key_value, dense and MLP layers are FalconLinear (an nn.Linear subclass).
    return _causal(FalconConfig, FalconForCausalLM, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_kv_heads=2, new_decoder_architecture=True, hidden_dropout=0.0, attention_dropout=0.0)(seed)


def opt(seed=0):
    from transformers import OPTConfig, OPTForCausalLM

    return _causal(OPTConfig, OPTForCausalLM, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                   word_embed_proj_dim=64, max_position_embeddings=64, dropout=0.0,
                   attention_dropout=0.0)(seed)


def bert(seed=0):
    from transformers import BertConfig, BertForSequenceClassification

    return _causal(BertConfig, BertForSequenceClassification, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64, num_labels=3,
                   hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)(seed)


def plain(seed=0):
    torch.manual_seed(seed)
    return PlainMLP().eval()


# family -> (builder, a qualified name "all-linear" must adapt, the output head it must leave alone)
FAMILIES = {
    "llama": (llama, "model.layers.0.self_attn.q_proj", "lm_head"),
    "qwen2": (qwen2, "model.layers.0.mlp.down_proj", "lm_head"),
    "mistral": (mistral, "model.layers.1.self_attn.o_proj", "lm_head"),
    "gemma": (gemma, "model.layers.0.mlp.gate_proj", "lm_head"),
    "phi3": (phi3, "model.layers.0.self_attn.qkv_proj", "lm_head"),
    "gpt2": (gpt2, "transformer.h.0.attn.c_attn", "lm_head"),
    "gpt_neox": (gpt_neox, "gpt_neox.layers.0.attention.query_key_value", "lm_head"),
    "falcon": (falcon, "transformer.h.0.self_attention.query_key_value", "lm_head"),
    "opt": (opt, "model.decoder.layers.0.self_attn.q_proj", "lm_head"),
    "bert": (bert, "bert.encoder.layer.0.attention.self.query", "classifier"),
    "plain": (plain, "blocks.0.up", None),
}


def example_input(seed: int = 1, batch: int = 2, length: int = 9) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, VOCAB, (batch, length), generator=g)


def logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    out = model(ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def loss_of(model: nn.Module, ids: torch.Tensor, family: str) -> torch.Tensor:
    """Next-token loss for the language models, a 3-class loss for the BERT classifier."""
    if family == "bert":
        return model(ids, labels=torch.arange(ids.shape[0]) % 3).loss
    if family == "plain":
        return nn.functional.cross_entropy(model(ids)[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    return model(ids, labels=ids).loss


def perturb_trainable(model: nn.Module, seed: int = 3, std: float = 0.1) -> nn.Module:
    """Add noise to every parameter that requires grad (a PEFT model "trained"); returns ``model``."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)
    return model


def randomize_adapters(model: nn.Module, seed: int = 2, std: float = 0.2) -> None:
    """Give every lora_B a nonzero value (a fresh adapter is a no-op, which would hide bugs)."""
    from lorakern.patch import lora_modules

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * std)
