"""Tiny data-parallel training runs for tests/test_distributed.py.

    python tests/dist_scripts/train_tiny.py PLAN.json RESULT.json                       # one process
    torchrun --nproc_per_node=2 tests/dist_scripts/train_tiny.py PLAN.json RESULT.json  # two

PLAN.json is a list of runs (keys of :func:`run`); RESULT.json (written by rank
0) maps each run's name to its losses, gradient norms and per-rank parameter
bytes. The loop is the trainer's step (global batch drawn from the seeded
sampler and sharded by rank, loss normalised by the global label count,
gradient clipping, AdamW, cosine schedule) on a 2-layer Llama with hidden size
32, so a step takes milliseconds and the run time is the process start-up.
"""

from __future__ import annotations

import json
import os
import sys

import torch

from lorakern.train.checkpoint import load_checkpoint, save_checkpoint
from lorakern.train.data import Collator, Example
from lorakern.train.distributed import (check_resume, full_state, init_world, local_parameter_bytes, no_sync,
                                        save_adapter, unwrap_model, wrap_model)
from lorakern.train.loss import causal_lm_loss
from lorakern.train.sampler import MixtureSampler
from lorakern.train.tiny import tiny_llama
from lorakern.train.trainer import cosine_lr, prepare_model


def make_data(n: int = 48, seed: int = 123) -> list[Example]:
    """Random token rows of 6..14 tokens; the first two are prompt (no label)."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        length = int(torch.randint(6, 15, (1,), generator=g))
        ids = torch.randint(4, 100, (length,), generator=g).tolist()
        rows.append(Example(ids, [-100, -100] + ids[2:]))
    return rows


def build(method: str, tied: bool, grad_ckpt: bool, hidden: int):
    model = tiny_llama(hidden_size=hidden, seed=0, tie_word_embeddings=tied)
    if method == "full":
        prepare_model(model, "full")
    else:
        prepare_model(model, method, r=4, alpha=8)
    if grad_ckpt:
        # transformers 5 names it activation_checkpointing_enable (the old name is a deprecated alias)
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def model_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def run(world, name: str, method: str = "lora", strategy: str = "ddp", steps: int = 6, batch_size: int = 2,
        grad_accum: int = 1, save_dir: str | None = None, save_at: int | None = None, resume: str | None = None,
        grad_ckpt: bool = False, mixed_precision: str | None = None, tied: bool = False,
        adapter_dir: str | None = None, lr: float = 1e-2, hidden: int = 32) -> dict:
    torch.manual_seed(0)
    model = build(method, tied, grad_ckpt, hidden)
    full_bytes = model_bytes(model)
    mp = {"bf16": torch.bfloat16, None: None}[mixed_precision]
    model = wrap_model(model, world, strategy, mixed_precision=mp)
    local_bytes = local_parameter_bytes(model)
    sharded = [p for p in model.parameters() if hasattr(p, "to_local")]
    sharded_full = sum(p.numel() * p.element_size() for p in sharded)
    sharded_local = sum(p.to_local().numel() * p.element_size() for p in sharded)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [g for g in ({"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0})
              if g["params"]]
    optimizer = torch.optim.AdamW(groups, lr=lr)
    data = make_data()
    sampler = MixtureSampler([len(data)], seed=0)
    collate = Collator(0)
    step = 0
    if resume:
        with full_state(model, optimizer, load=True) as (m, opt):
            state = load_checkpoint(resume, m, opt)
        check_resume(state, batch_size, grad_accum, world.world_size)
        sampler.load_state_dict(state["sampler"])
        step = int(state["step"])
    losses, grad_norms = [], []
    model.train()
    while step < steps:
        rows = world.shard(sampler.take(batch_size * grad_accum * world.world_size))
        batches = [collate([data[j] for _, j in rows[i:i + batch_size]]) for i in range(0, len(rows), batch_size)]
        n_labels = world.all_reduce_sum(float(sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches)))
        for group in optimizer.param_groups:
            group["lr"] = lr * cosine_lr(step, steps, 1, 0.1)
        loss_sum = 0.0
        for i, b in enumerate(batches):
            with no_sync(model, i < len(batches) - 1):
                loss, _ = causal_lm_loss(model, b["input_ids"], b["labels"], b["attention_mask"], chunk_size=16)
                (loss / n_labels).backward()
            loss_sum += float(loss.detach())
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, 1.0)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(world.all_reduce_sum(loss_sum) / n_labels)
        if save_dir and step == save_at:
            state = {"sampler": sampler.state_dict(), "world_size": world.world_size,
                     "config": {"batch_size": batch_size, "grad_accum": grad_accum}}
            with full_state(model, optimizer) as (m, opt):
                if world.is_main:
                    save_checkpoint(save_dir, step, m, opt, state)
            world.barrier()
    if adapter_dir:
        save_adapter(model, adapter_dir, world)
    per_rank = [local_bytes]
    if world.world_size > 1:
        per_rank = [None] * world.world_size
        torch.distributed.all_gather_object(per_rank, local_bytes)
    inner = unwrap_model(model)
    q = next((m for m in inner.modules() if type(m).__name__ == "QLoRALinear"), None)
    return {"losses": losses, "grad_norms": grad_norms, "full_bytes": full_bytes, "local_bytes": per_rank,
            "sharded_full_bytes": sharded_full, "sharded_local_bytes": sharded_local,
            "nf4_weight_dtype": str(q.weight.dtype) if q is not None else None}


def main(plan_path: str, result_path: str) -> None:
    torch.set_num_threads(1)
    world = init_world(device="cpu")
    plan = None
    if world.is_main:
        with open(plan_path) as f:
            plan = json.load(f)
    plan = world.broadcast_object(plan)  # the other ranks get rank 0's plan
    ranks = world.all_reduce_mean(torch.tensor([float(world.rank)], dtype=torch.float64))
    results = {"world": {"world_size": world.world_size, "mean_rank": float(ranks)}}
    for spec in plan:
        results[spec["name"]] = run(world, **spec)
    world.close()  # not after an error: torchrun ends the other ranks
    if world.is_main:
        tmp = result_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f)
        os.replace(tmp, result_path)


if __name__ == "__main__":
    main(*sys.argv[1:3])
