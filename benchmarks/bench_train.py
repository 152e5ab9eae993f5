"""Training-step throughput and peak memory: lorakern vs PEFT (+ bitsandbytes), LoRA and QLoRA.

    python benchmarks/bench_train.py                  # SmolLM2-135M, batch 4 x 256, r=16, all linear layers
    python benchmarks/bench_train.py --steps 5 --configs lorakern-qlora peft-bnb-qlora

Every configuration runs in its own subprocess on the same batches (the
support-triage data packed into 256-token rows, labels on the replies only),
so peak memory is that process's own: the peak resident set (VmHWM) is reset
after the model is loaded and prepared, and read after the timed steps, so it
measures training, not the GGUF conversion at load time. Tokens/s counts every
token of the batch. Results go to benchmarks/results/train-<device>.md with the
device, versions and git commit.

Baselines are set up as their users do: PEFT ``LoraConfig(target_modules=
"all-linear")`` on the dense model; for QLoRA, ``BitsAndBytesConfig(nf4,
double quant)`` + ``prepare_model_for_kbit_training`` + PEFT, loss from the
model's own ``labels=`` path.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("lorakern-qlora", "peft-bnb-qlora", "lorakern-lora", "peft-lora")
# the same under bf16 autocast (bitsandbytes computing in bf16): lorakern's default on CPUs with AVX512-BF16
CONFIGS_BF16 = tuple(c + "-bf16" for c in CONFIGS)


def _peak_rss_reset() -> None:
    # Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_mb() -> float:
    try:
        import psutil

        info = psutil.Process().memory_full_info()
        if hasattr(info, "peak_wset"):  # Windows
            return info.peak_wset / 2**20
    except ImportError:
        pass
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _batches(tokenizer, batch: int, seq: int, steps: int):
    import torch

    from lorakern.train.data import Collator, prepare_dataset

    data = prepare_dataset(tokenizer, os.path.join(ROOT, "examples", "data", "support_triage_train.jsonl"),
                           max_length=seq, packing=True)
    rows = sorted(data.train, key=len, reverse=True)
    collate = Collator(tokenizer.pad_token_id, pad_to_multiple_of=seq)
    out = []
    for s in range(steps):
        chosen = [rows[(s * batch + i) % len(rows)] for i in range(batch)]
        b = collate(chosen)
        out.append({k: v[:, :seq] for k, v in b.items()})
    return out, torch


def _same_adapter_init(model) -> int:
    """Draw every lora_A from a generator seeded by its layer's name (B stays 0), whatever the library.

    lorakern and PEFT create and initialise adapters in different orders, so the
    same torch seed gives them different A matrices; with this the two start from
    identical adapters and their loss curves can be compared step by step (only
    the dropout masks then differ).
    """
    import re
    import zlib

    import torch

    count = 0
    for name, p in model.named_parameters():
        m = re.search(r"(layers\.\d+\..*?)\.lora_A", name)
        if m is None:
            continue
        g = torch.Generator().manual_seed(zlib.crc32(m.group(1).encode()))
        bound = 1.0 / p.shape[1] ** 0.5  # nn.Linear's kaiming_uniform(a=sqrt(5)) bound
        with torch.no_grad():
            p.copy_(torch.rand(p.shape, generator=g, dtype=torch.float64).mul_(2 * bound).sub_(bound))
        count += 1
    return count


def run_one(name: str, model_dir: str, batch: int, seq: int, steps: int, r: int, checkpointing: bool,
            dropout: float = 0.05) -> dict:
    """Body of one subprocess: prepare the model for ``name``, time ``steps`` optimizer steps."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    bf16 = name.endswith("-bf16")
    name = name.removesuffix("-bf16")
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    batches, _ = _batches(tokenizer, batch, seq, steps + 1)
    torch.manual_seed(0)
    if name.startswith("lorakern"):
        from lorakern.train import causal_lm_loss, prepare_model

        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        prepare_model(model, "qlora" if name.endswith("qlora") else "lora", r=r, alpha=2 * r, dropout=dropout)

        def loss_of(b):
            loss, n = causal_lm_loss(model, b["input_ids"], b["labels"], b["attention_mask"])
            return loss / n
    else:
        from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

        if name.endswith("qlora"):
            from transformers import BitsAndBytesConfig

            quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16 if bf16 else torch.float32)
            model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quant, dtype=torch.float32)
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
        else:
            model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))

        def loss_of(b):
            return model(**b).loss
    n_adapters = _same_adapter_init(model)
    if n_adapters != 210:
        raise RuntimeError(f"{name}: expected 210 LoRA layers, found {n_adapters}")
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)  # large enough that the loss moves within the few steps timed

    def step(b):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_of(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    losses = [step(batches[0])]  # warm-up: allocator, lazy init, first-call dispatch
    _peak_rss_reset()
    times = []
    for b in batches[1:]:
        t0 = time.perf_counter()
        losses.append(step(b))
        times.append(time.perf_counter() - t0)
    tokens = batch * seq
    best = min(times)
    median = sorted(times)[len(times) // 2]
    return {"name": name + ("-bf16" if bf16 else ""), "checkpointing": checkpointing, "step_s": median,
            "best_step_s": best, "tokens_per_s": tokens / median,
            "peak_rss_mb": _peak_rss_mb(), "losses": losses,
            "trainable": sum(p.numel() for p in params)}


def _versions(packages=("torch", "transformers", "peft", "bitsandbytes", "lorakern")) -> dict:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in packages:
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _device() -> str:
    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} logical CPUs"


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS + CONFIGS_BF16)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout (0: loss curves comparable exactly)")
    p.add_argument("--output", default=os.path.join(ROOT, "benchmarks", "results", "train-cpu.md"))
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_model-dir", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args._child:
        result = run_one(args._child, args._model_dir, args.batch_size, args.seq_len, args.steps, args.r,
                         args.gradient_checkpointing, args.dropout)
        print("RESULT " + json.dumps(result))
        return 0

    from lorakern.train.models import load_model_and_tokenizer

    with tempfile.TemporaryDirectory() as model_dir:
        model, tokenizer = load_model_and_tokenizer(None)  # SmolLM2-135M-Instruct, dequantized to fp32
        model.save_pretrained(model_dir)
        tokenizer.save_pretrained(model_dir)
        del model
        # Flush the 540 MB just written: its writeback otherwise competes with the first configuration's steps.
        os.sync()
        results = []
        for name in args.configs:
            cmd = [sys.executable, os.path.abspath(__file__), "--_child", name, "--_model-dir", model_dir,
                   "--batch-size", str(args.batch_size), "--seq-len", str(args.seq_len), "--steps",
                   str(args.steps), "--r", str(args.r), "--dropout", str(args.dropout)] + (["--gradient-checkpointing"]
                                                            if args.gradient_checkpointing else [])
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((x for x in proc.stdout.splitlines() if x.startswith("RESULT ")), None)
            if proc.returncode != 0 or line is None:
                raise RuntimeError(f"{name} failed:\n{proc.stderr[-3000:]}")
            results.append(json.loads(line[len("RESULT "):]))
            print(f"{name:16s} {results[-1]['tokens_per_s']:8.1f} tok/s  peak RSS {results[-1]['peak_rss_mb']:7.0f} MB",
                  flush=True)

    by = {r["name"]: r for r in results}
    lines = [f"# Training step: lorakern vs PEFT (+ bitsandbytes), SmolLM2-135M-Instruct", "",
             f"- device: {_device()}", f"- versions: {json.dumps(_versions())}", f"- commit: {_commit()}",
             f"- batch {args.batch_size} x {args.seq_len} tokens, LoRA r={args.r} alpha={2 * args.r} "
             f"dropout {args.dropout} "
             f"on all linear projections (210 layers), AdamW lr 1e-3, fp32 weights and compute (-bf16: under bf16 "
             f"autocast, bitsandbytes compute dtype bf16), gradient checkpointing "
             f"{'on' if args.gradient_checkpointing else 'off'}; median of {args.steps} steps after a warm-up step",
             f"- peak memory: VmHWM of the configuration's own process, reset after model load",
             f"- date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}", "",
             "| configuration | tokens/s | step (s) | peak RSS (MB) |", "|---|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.1f} | {r['step_s']:.2f} | {r['peak_rss_mb']:.0f} |")
    lines += ["", "Loss per step (identical initial adapters, AdamW lr 1e-3"
              + ("; only the dropout masks differ):" if args.dropout else "):"), "",
              "| configuration | " + " | ".join(f"step {i}" for i in range(len(results[0]["losses"]))) + " |",
              "|---|" + "---:|" * len(results[0]["losses"])]
    for r in results:
        lines.append(f"| {r['name']} | " + " | ".join(f"{x:.4f}" for x in r["losses"]) + " |")
    lines.append("")
    pairs = [("lorakern-qlora", "peft-bnb-qlora"), ("lorakern-lora", "peft-lora")]
    for ours, theirs in pairs + [(a + "-bf16", b + "-bf16") for a, b in pairs]:
        if ours in by and theirs in by:
            a, b = by[ours], by[theirs]
            gap = max(abs(x - y) / abs(y) for x, y in zip(a["losses"], b["losses"]))
            lines.append(f"- {ours} vs {theirs}: {a['tokens_per_s'] / b['tokens_per_s']:.2f}x tokens/s, "
                         f"{a['peak_rss_mb'] / b['peak_rss_mb']:.0%} of the peak memory, losses within "
                         f"{gap:.2%} of each other")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
