"""LoRA / QLoRA on fused MoE expert weights: one training step of a Qwen3-MoE-shaped model.

Side by side in one process, on the same model and tokens (CPU: fp32, one thread, a small
shape; CUDA: bf16, a larger one):

* the model without adapters (grouped_mm experts, transformers' default) and in its eager loop;
* PEFT ``target_parameters`` adapters (materializes ``W + B @ A`` for the whole stack each forward);
* lorakern ``apply_lora(target_parameters="all-experts")``, dense and NF4.

Reports the median forward + backward time and its ratio to PEFT, and the bytes held by the
expert weights. Usage::

    python benchmarks/bench_moe.py [--out benchmarks/results/moe-cpu.md]
    python benchmarks/bench_moe.py --device cuda --out OUTDIR/moe.md        # (gpu_check.sh)
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import subprocess
import time

import torch


# (hidden, experts, expert width, top-k, layers): CPU small enough for one thread; CUDA at the width of
# Qwen3-30B-A3B's experts (2048 hidden, 768 per expert, top-8) with fewer experts and layers
SHAPES = {"cpu": (512, 16, 256, 2, 2), "cuda": (2048, 32, 768, 8, 2)}


def _model(device, experts_implementation=None):
    from transformers import AutoConfig, AutoModelForCausalLM

    hidden, experts, width, top_k, layers = SHAPES[device.type]
    config = AutoConfig.for_model("qwen3_moe", vocab_size=1024, hidden_size=hidden, intermediate_size=2 * hidden,
                                  moe_intermediate_size=width, num_experts=experts, num_experts_per_tok=top_k,
                                  num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=4,
                                  head_dim=hidden // 8)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    if experts_implementation:
        model.config._experts_implementation_internal = experts_implementation
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return model.to(device=device, dtype=dtype).train()


def _step_time(model, ids, repeats):
    cuda = ids.is_cuda

    def step():
        loss = model(ids, labels=ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter() if cuda else time.process_time()
        step()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() if cuda else time.process_time()) - t)
    return statistics.median(times)


def _expert_bytes(model):
    from lorakern.nn import LoRAExperts

    total = 0
    for module in model.modules():
        if isinstance(module, LoRAExperts):
            total += sum(t.numel() * t.element_size() for t in (module.weight, *module.buffers()))
        elif hasattr(module, "is_transposed"):
            total += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False) if p.dim() == 3)
    return total


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=512, help="tokens per step (batch 2)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--out", default=None, help="write a markdown table here")
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    import lorakern

    ids = torch.randint(0, 1024, (2, args.tokens // 2), generator=torch.Generator().manual_seed(0)).to(device)
    rows = []
    base = _model(device)
    for p in base.parameters():
        p.requires_grad_(False)
    base.model.embed_tokens.weight.requires_grad_(True)  # something to differentiate
    rows.append(("no adapter, grouped_mm experts", base))
    eager = _model(device, "eager")
    for p in eager.parameters():
        p.requires_grad_(False)
    eager.model.embed_tokens.weight.requires_grad_(True)
    rows.append(("no adapter, eager experts", eager))
    try:
        import peft

        config = peft.LoraConfig(r=16, lora_alpha=32, target_modules=[],
                                 target_parameters=["experts.gate_up_proj", "experts.down_proj"])
        rows.append(("PEFT target_parameters (r=16)", peft.get_peft_model(_model(device), config)))
    except ImportError:
        pass
    ours = _model(device)
    lorakern.apply_lora(ours, None, r=16, alpha=32, target_parameters="all-experts")
    rows.append(("lorakern LoRAExperts (r=16)", ours))
    nf4 = _model(device)
    lorakern.apply_lora(nf4, None, r=16, alpha=32, target_parameters="all-experts", quantize="nf4")
    rows.append(("lorakern LoRAExperts NF4 (r=16)", nf4))

    results = []
    for name, model in rows:
        # alternate: each model timed twice, interleaved, the better median kept
        results.append([name, model, float("inf")])
    for _ in range(2):
        for row in results:
            row[2] = min(row[2], _step_time(row[1], ids, args.repeats))
    peft_time = next((t for n, _, t in results if n.startswith("PEFT")), None)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    hidden, experts, width, top_k, layers = SHAPES[device.type]
    if device.type == "cuda":
        where = f"{torch.cuda.get_device_name(device)}, bf16, wall time (synchronized)"
    else:
        where = f"{platform.processor() or platform.machine()}, fp32, one thread, process time"
    lines = [f"# MoE expert adapters, {device.type.upper()} training step (fwd + bwd)",
             "",
             f"Qwen3-MoE shape: hidden {hidden}, {experts} experts of {width}, top-{top_k}, {layers} layers, "
             f"{args.tokens} tokens; {where}; median of {args.repeats} (best of 2 interleaved rounds).",
             f"Commit {commit}; torch {torch.__version__}.",
             "",
             "| setup | step ms | vs PEFT | expert weight bytes |",
             "|---|---:|---:|---:|"]
    for name, model, t in results:
        ratio = f"{peft_time / t:.2f}x" if peft_time else "-"
        lines.append(f"| {name} | {t * 1e3:.1f} | {ratio} | {_expert_bytes(model) / 2**20:.1f} MiB |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
