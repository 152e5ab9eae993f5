"""Three Trainer steps of QLoRA on tiny models of several families, for tests/test_distributed.py.

    python tests/dist_scripts/train_families.py none RESULT.json FAMILY...                       # one process
    torchrun --nproc_per_node=2 tests/dist_scripts/train_families.py fsdp RESULT.json FAMILY...  # two

RESULT.json (written by rank 0) maps each family to its three losses. The
families are the ones whose layout differs from Llama in a way sharding meets:
OPT's forward calls ``model.decoder`` past the body (the loss check must run
before sharding), Mamba lists a block and a part of it in ``_no_split_modules``,
Gemma 2 caps its logits, Cohere scales them, Mixtral and Qwen3-MoE hold their
experts in 3-D parameters (adapted and quantized through target_parameters).
"""

from __future__ import annotations

import json
import sys

import torch

from lorakern.train import Trainer, TrainConfig, prepare_model
from lorakern.train.data import tokenize_chat
from lorakern.train.distributed import init_world
from lorakern.train.tiny import tiny_tokenizer

SIZES = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
CONFIGS = {
    "opt": dict(ffn_dim=64, word_embed_proj_dim=32, dropout=0.0, attention_dropout=0.0),
    "mamba": dict(state_size=8),
    "gemma2": dict(head_dim=8, final_logit_softcapping=5.0),
    "cohere": dict(logit_scale=0.25),
    # fused expert weights (LoRAExperts, NF4 per expert) sharded along the expert dimension
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=8),
}
MOE = {"mixtral", "qwen3_moe"}


def losses(family: str, strategy: str, world) -> list[float]:
    from transformers import AutoConfig, AutoModelForCausalLM

    tok = tiny_tokenizer()
    examples = [tokenize_chat(tok, [{"role": "user", "content": f"add {i} and {3 * i}" + " pad" * (i % 5)},
                                    {"role": "assistant", "content": str(4 * i)}]) for i in range(16)]
    config = AutoConfig.for_model(family, vocab_size=len(tok), **SIZES, **CONFIGS[family])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    torch.manual_seed(1)
    prepare_model(model, "qlora", r=4, alpha=8, dropout=0.0,
                  target_parameters="all-experts" if family in MOE else None)
    two = world.world_size == 2
    # batch 2 x accumulation 1 x 2 ranks = the one-process batch 2 x accumulation 2
    cfg = TrainConfig(steps=3, batch_size=2, grad_accum=1 if two else 2, lr=1e-2, progress=False,
                      mixed_precision="no")
    trainer = Trainer(model, examples, cfg, world=world, strategy=strategy)
    return [trainer.train_step()["loss"] for _ in range(3)]


def main(strategy: str, result_path: str, families: list[str]) -> None:
    torch.set_num_threads(1)
    world = init_world(device="cpu")
    out = {family: losses(family, strategy, world) for family in families}
    if world.is_main:
        with open(result_path, "w") as f:
            json.dump(out, f)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3:])
