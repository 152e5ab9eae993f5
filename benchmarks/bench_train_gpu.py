"""Training step on a GPU: lorakern vs PEFT (+ bitsandbytes), QLoRA and LoRA, a ~1B Llama, side by side.

    python benchmarks/bench_train_gpu.py --out DIR --time-budget 90      # H100/H200: ~70-90 s
    python benchmarks/bench_train_gpu.py --device cpu --smoke --out DIR  # every path, tiny model, CPU

There are no model files on the GPU machines and no network, so the model is a
``LlamaConfig`` with random weights (hidden 2048, 16 layers, MLP 8192, 32 query /
8 KV heads, vocabulary 32000: 1.1B parameters, 2.2 GB in bf16), built once by a
setup process, saved as safetensors (under /dev/shm when it has room) and loaded by every
configuration the way its users load a model (``--model-dir`` benchmarks a real
checkpoint instead). Why this size: Llama-3.2-1B's blocks, the largest model class
that leaves a 90 s budget room for six processes that each import torch and
transformers (+ PEFT), load 2.2 GB and compile their first kernels (estimated
8-15 s each on the GPU machines, where importing torch and lorakern alone took 4 s). A step of
4 x 1024 tokens is ~18 TFLOP of frozen-base forward + backward (4 x 1.04B
projection weights x 4096 tokens, plus attention): 25 ms at the 736 TFLOP/s bf16
an H200 measured (``gpu-20261126-h200``), so 10 timed steps cost about a second
per configuration and loading dominates.

Every configuration runs in its own subprocess (its peak memory is its own, and a
crash or hang loses only its row), under a per-configuration timeout and the
remaining total budget; a configuration whose library is not importable gives a
``skipped: <why>`` row. Fairness, as in ``benchmarks/bench_train.py``:

- bf16 base weights on the device and bf16 autocast, for every configuration (what
  a GPU user of either library runs: ``Trainer(mixed_precision="auto")`` /
  transformers' ``bf16=True``); adapters in float32 (both libraries' default);
- PEFT ``LoraConfig(target_modules="all-linear")``, lorakern ``prepare_model``'s
  all-linear default: r=16, alpha=32, dropout 0.05, 7 layers per block;
- QLoRA: bitsandbytes NF4 + double quantization, bf16 compute dtype, loaded with
  ``from_pretrained(quantization_config=...)`` and ``prepare_model_for_kbit_training``
  (which casts the unquantized embeddings, norms and head to float32, as its users
  get); lorakern quantizes the bf16 model already on the GPU (``prepare_model``);
- identical initial adapters (A drawn per layer name, B = 0; only dropout masks
  differ), identical batches, AdamW lr 1e-3, loss from the model's own ``labels=``
  path for PEFT and ``causal_lm_loss`` (fused head + cross-entropy) for lorakern;
- every token is labelled (the least favourable case for lorakern's loss, which
  projects only labelled rows); tokens are drawn from a 1024-token subset of the
  vocabulary, so the loss can fall (ln 32000 = 10.37 at the start, ln 1024 = 6.93 once
  the model has learnt the subset), and the loss columns show whether both libraries
  train the same way;
- warm-up steps excluded; each timed step ends with ``torch.cuda.synchronize()``,
  median of the timed steps reported; peak memory is ``max_memory_allocated``
  over the timed steps, counters reset after the warm-up (weights, adapters and
  AdamW state included). On CPU (``--device cpu``) the peak resident set instead.

``dense-frozen`` is a floor, not a competitor: transformers' own forward+backward
of the bf16 model with every weight frozen (input gradients only, no adapters,
no optimizer step).

Results: ``train_gpu.md``, ``train_gpu.csv``, ``train_gpu.json`` and one log per
configuration (``train_gpu-<config>.log``) in ``--out``, with device, versions,
git commit and settings. Exit status 1 when a configuration failed or timed out
(skips for a missing library or a spent budget are not failures).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Reported in this order; each PEFT baseline right after the lorakern configuration it is compared with.
CONFIGS = ("lorakern-qlora", "peft-bnb-qlora", "lorakern-lora", "peft-lora", "dense-frozen")
PAIRS = (("lorakern-qlora", "peft-bnb-qlora"), ("lorakern-lora", "peft-lora"))
# Libraries a configuration needs beyond torch + transformers (PEFT's bnb loading goes through accelerate).
REQUIRES = {"lorakern-qlora": ("lorakern",), "lorakern-lora": ("lorakern",),
            "peft-bnb-qlora": ("peft", "bitsandbytes", "accelerate"), "peft-lora": ("peft",), "dense-frozen": ()}

# Llama-3.2-1B's blocks with Llama 2's 32000-token vocabulary: Llama 3's 128256 would put a fifth
# of the step's GEMM work (263M of 1.24B weights) in the head, which lorakern's fused loss is best at.
MODEL_1B = dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=8192, num_attention_heads=32,
                num_key_value_heads=8, vocab_size=32000, max_position_embeddings=4096)
# --smoke: every code path in seconds on CPU; odd MLP width so nothing relies on powers of two.
MODEL_SMOKE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=176, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)
LORA_LAYERS_PER_BLOCK = 7  # q, k, v, o, gate, up, down
ACTIVE_VOCAB = 1024
# A configuration is not started with less of the budget left: it could not even import torch.
MIN_SLICE_S = 5.0


@dataclass
class Settings:
    """What every configuration of one run shares (passed to the subprocesses as JSON)."""

    device: str
    model_dir: str
    batch_size: int
    seq_len: int
    warmup: int
    steps: int
    r: int
    dropout: float
    lr: float
    gradient_checkpointing: bool
    vocab_size: int
    num_layers: int
    seed: int = 0


# ------------------------------------------------------------------ subprocess bodies


def make_model(model_dir: str, config: dict, device: str, seed: int = 0) -> dict:
    """Build a random-weight bf16 ``LlamaForCausalLM`` from ``config`` on ``device`` and save it to ``model_dir``.

    Built on the device (a GPU draws 1.1B normal values in well under a second),
    saved from there. Returns the parameter count and device name.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**config, tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    with torch.device(device):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    return {"params": sum(p.numel() for p in model.parameters()), "device_name": _device_name(device)}


def run_config(name: str, s: Settings) -> dict:
    """Body of one configuration's subprocess: prepare the model, time ``s.steps`` optimizer steps."""
    import importlib

    for pkg in REQUIRES[name]:  # first, before any slow import: a missing library costs nothing
        try:
            importlib.import_module(pkg)
        except ImportError as e:
            return {"name": name, "status": "skipped", "reason": f"{pkg} not importable ({e})"}

    import torch

    device = torch.device(s.device)
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)
    t_setup = time.perf_counter()
    batches = _batches(s, device)
    model, loss_of, info = _prepare(name, s, device)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=s.lr) if name != "dense-frozen" else None
    setup_mb = _allocated_mb(device)
    setup_s = time.perf_counter() - t_setup

    def step(b):
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = loss_of(b)
        loss.backward()
        if opt is not None:
            opt.step()
            opt.zero_grad(set_to_none=True)
        return loss.detach()

    losses, times = [], []
    for i, b in enumerate(batches):
        if i == s.warmup:
            _sync(device)
            _reset_peak(device)
        t0 = time.perf_counter()
        loss = step(b)
        _sync(device)
        if i >= s.warmup:
            times.append(time.perf_counter() - t0)
        losses.append(float(loss))
    median = statistics.median(times)
    return {"name": name, "status": "ok", "reason": "", "step_s": median, "min_step_s": min(times),
            "tokens_per_s": s.batch_size * s.seq_len / median, "peak_mb": _peak_mb(device), "setup_mb": setup_mb,
            "reserved_mb": torch.cuda.max_memory_reserved(device) / 2**20 if device.type == "cuda" else None,
            "memory": "max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)",
            "losses": losses, "setup_s": setup_s, "trainable": sum(p.numel() for p in params),
            "device_name": _device_name(s.device), **info}


def _batches(s: Settings, device) -> list[dict]:
    """``warmup + steps`` batches, the same for every configuration: tokens from a fixed vocabulary subset."""
    import torch

    g = torch.Generator().manual_seed(s.seed + 1)
    active = torch.randperm(s.vocab_size, generator=g)[:min(ACTIVE_VOCAB, s.vocab_size // 4)]
    out = []
    for _ in range(s.warmup + s.steps):
        ids = active[torch.randint(len(active), (s.batch_size, s.seq_len), generator=g)]
        out.append({"input_ids": ids.to(device), "labels": ids.to(device),
                    "attention_mask": torch.ones_like(ids, device=device)})
    return out


def _prepare(name: str, s: Settings, device):
    """(model ready to train, batch -> mean loss, facts for the report) for configuration ``name``."""
    import torch
    from transformers import AutoModelForCausalLM

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_train import _same_adapter_init

    alpha = 2 * s.r
    if name == "peft-bnb-qlora":
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
        # bitsandbytes quantizes while loading onto the device the map names
        device_map = {"": torch.cuda.current_device()} if device.type == "cuda" else None
        model = AutoModelForCausalLM.from_pretrained(s.model_dir, quantization_config=quant, dtype=torch.bfloat16,
                                                     device_map=device_map)
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=s.gradient_checkpointing)
    else:
        model = AutoModelForCausalLM.from_pretrained(s.model_dir, dtype=torch.bfloat16).to(device)

    if name.startswith("lorakern"):
        from lorakern.train import causal_lm_loss, prepare_model

        # On the device already: prepare_model quantizes there and leaves sdpa in place
        # (its CPU attention switches only an all-CPU model).
        prepare_model(model, name.removeprefix("lorakern-"), r=s.r, alpha=alpha, dropout=s.dropout)

        def loss_of(b):
            loss, n = causal_lm_loss(model, b["input_ids"], b["labels"], b["attention_mask"])
            return loss / n
    elif name.startswith("peft"):
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=s.r, lora_alpha=alpha, lora_dropout=s.dropout,
                                                 target_modules="all-linear", task_type="CAUSAL_LM"))

        def loss_of(b):
            return model(**b).loss
    else:  # dense-frozen: gradients reach the inputs of every layer, no weight gets one
        for p in model.parameters():
            p.requires_grad_(False)
        model.enable_input_require_grads()

        def loss_of(b):
            return model(**b).loss

    adapters = _same_adapter_init(model)
    expected = 0 if name == "dense-frozen" else LORA_LAYERS_PER_BLOCK * s.num_layers
    if adapters != expected:
        raise RuntimeError(f"{name}: expected {expected} LoRA layers, found {adapters}")
    if s.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    config = getattr(model, "config", None)
    info = {"adapters": adapters, "attention": getattr(config, "_attn_implementation", "?")}
    if name.startswith("lorakern"):
        from lorakern.ops import _registry

        # which kernels could run (a CUDA module that failed to build shows here)
        info["lorakern_backends"] = {k: ok for k, (ok, _) in _registry.status().items()}
        info["lorakern_backend_env"] = os.environ.get("LORAKERN_BACKEND", "auto")
    return model, loss_of, info


def _device_name(device: str) -> str:
    import torch

    if torch.device(device).type == "cuda":
        p = torch.cuda.get_device_properties(torch.device(device))
        return f"{p.name} ({p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor})"
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_train import _device

    return _device()


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _reset_peak(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        with open("/proc/self/clear_refs", "w") as f:  # 5: reset VmHWM to the current RSS (Linux >= 4.0)
            f.write("5")


def _peak_mb(device) -> float | None:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        return None


def _allocated_mb(device) -> float | None:
    import torch

    return torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else None


# ------------------------------------------------------------------------ the driver


def _spawn(label: str, args: list[str], log_path: str, timeout: float) -> tuple[dict | None, str]:
    """Run this script with ``args`` in a process group of its own; (its RESULT dict or None, why not).

    The group is killed on timeout and whenever this process leaves early (an
    exception, or SIGTERM from an outer ``timeout``, see :func:`_exit_on_sigterm`):
    being in its own group, the child would otherwise outlive us and keep the GPU.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    cmd = [sys.executable, os.path.abspath(__file__), *args]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True)
        try:
            print(f"{label}: started (pid {proc.pid}, limit {timeout:.0f} s)", flush=True)
            stdout, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc)
            return None, f"timeout after {timeout:.0f} s"
        except BaseException:
            _kill_group(proc)
            raise
        log.write(stdout)
    line = next((x for x in reversed(stdout.splitlines()) if x.startswith("RESULT ")), None)
    if proc.returncode == 0 and line is not None:
        return json.loads(line[len("RESULT "):]), ""
    return None, f"failed (exit {proc.returncode}): {_last_error(log_path)}"


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:  # it ended on its own meanwhile
        pass
    proc.communicate()


def _exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so the running child is killed and the model files removed on the way out."""

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


def _last_error(log_path: str) -> str:
    """The last line of a traceback in ``log_path`` (the exception), or its last line."""
    with open(log_path, errors="replace") as f:
        lines = [line.rstrip() for line in f if line.strip()]
    errors = [line for line in lines if not line.startswith((" ", "Traceback"))]
    text = (errors or lines or ["no output"])[-1]
    return text if len(text) <= 300 else text[:297] + "..."


def _model_tmpdir(min_free: int) -> str:
    # /dev/shm: the model is written once and read by five processes; RAM beats a disk's writeback.
    base = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > min_free else None
    return tempfile.mkdtemp(prefix="lorakern-bench-model-", dir=base)


def _versions() -> dict:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_train import _versions as versions

    return versions(("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate", "lorakern"))


def _commit() -> str:
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, text=True,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=ROOT, stderr=subprocess.DEVNULL).returncode
        return sha + (" (uncommitted changes)" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _loss_gap(a: list[float], b: list[float]) -> float:
    """Largest relative difference of two loss curves, step by step."""
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b))


def _ratios(rows: dict[str, dict]) -> None:
    """Add each lorakern row's ratios to its PEFT baseline (same run), in place."""
    for ours, theirs in PAIRS:
        a, b = rows.get(ours), rows.get(theirs)
        if not (a and b and a["status"] == b["status"] == "ok"):
            continue
        a["baseline"] = theirs
        a["speedup"] = a["tokens_per_s"] / b["tokens_per_s"]
        if a.get("peak_mb") and b.get("peak_mb"):
            a["memory_ratio"] = a["peak_mb"] / b["peak_mb"]
        a["loss_gap"] = _loss_gap(a["losses"], b["losses"])


CSV_FIELDS = ("config", "status", "reason", "tokens_per_s", "step_ms", "min_step_ms", "peak_mb", "reserved_mb",
              "setup_mb", "memory", "baseline", "speedup", "memory_ratio", "loss_gap", "trainable", "adapters",
              "attention", "setup_s", "wall_s", "losses")


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def _csv_row(r: dict) -> dict:
    ms = lambda key: r.get(key) and r[key] * 1e3  # noqa: E731
    return {"config": r["name"], "status": r["status"], "reason": r.get("reason", ""),
            "tokens_per_s": _fmt(r.get("tokens_per_s"), ".1f"), "step_ms": _fmt(ms("step_s"), ".2f"),
            "min_step_ms": _fmt(ms("min_step_s"), ".2f"), "peak_mb": _fmt(r.get("peak_mb"), ".0f"),
            "reserved_mb": _fmt(r.get("reserved_mb"), ".0f"), "setup_mb": _fmt(r.get("setup_mb"), ".0f"),
            "memory": r.get("memory", ""), "baseline": r.get("baseline", ""), "speedup": _fmt(r.get("speedup"), ".3f"),
            "memory_ratio": _fmt(r.get("memory_ratio"), ".3f"), "loss_gap": _fmt(r.get("loss_gap"), ".2e"),
            "trainable": r.get("trainable", ""), "adapters": r.get("adapters", ""), "attention": r.get("attention", ""),
            "setup_s": _fmt(r.get("setup_s"), ".1f"), "wall_s": _fmt(r.get("wall_s"), ".1f"),
            "losses": " ".join(f"{x:.5f}" for x in r.get("losses", []))}


def _backend_lines(rows: list[dict]) -> list[str]:
    r = next((r for r in rows if "lorakern_backends" in r), None)
    if r is None:
        return []
    available = ", ".join(k for k, ok in r["lorakern_backends"].items() if ok)
    return [f"- lorakern backends available: {available}; LORAKERN_BACKEND={r['lorakern_backend_env']}"]


def write_results(out: str, rows: list[dict], meta: dict) -> str:
    """Write train_gpu.{md,csv,json} to ``out``; return the markdown."""
    with open(os.path.join(out, "train_gpu.json"), "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out, "train_gpu.csv"), "w", newline="") as f:
        for key in ("device", "commit", "versions", "settings", "date"):
            f.write(f"# {key}: {json.dumps(meta[key]) if isinstance(meta[key], dict) else meta[key]}\n")
        w = csv.DictWriter(f, CSV_FIELDS)
        w.writeheader()
        w.writerows(_csv_row(r) for r in rows)

    s = meta["settings"]
    lines = [f"# Training step on {meta['device']}: lorakern vs PEFT (+ bitsandbytes)", "",
             f"- model: {meta['model']}", f"- device: {meta['device']}", f"- commit: {meta['commit']}",
             f"- versions: {json.dumps(meta['versions'])}", f"- date: {meta['date']}",
             f"- batch {s['batch_size']} x {s['seq_len']} tokens (all labelled), LoRA r={s['r']} alpha={2 * s['r']} "
             f"dropout {s['dropout']} on all linear layers of every block, AdamW lr {s['lr']}, bf16 weights + bf16 "
             f"autocast, gradient checkpointing {'on' if s['gradient_checkpointing'] else 'off'}; median of "
             f"{s['steps']} timed steps after {s['warmup']} warm-up steps",
             f"- memory: {meta['memory']}, counters reset after the warm-up steps",
             *_backend_lines(rows), "",
             "| configuration | tokens/s | step (ms) | peak memory (MB) | after setup (MB) | vs baseline | "
             "attention | setup (s) |", "|---|---:|---:|---:|---:|---|---|---:|"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['name']} | {r['status']}: {r.get('reason', '')} | | | | | | |")
            continue
        vs = ""
        if "speedup" in r:
            mem = f", {r['memory_ratio']:.0%} memory" if "memory_ratio" in r else ""
            vs = f"{r['speedup']:.2f}x tokens/s{mem} vs {r['baseline']}"
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.0f} | {r['step_s'] * 1e3:.1f} | "
                     f"{_fmt(r.get('peak_mb'), '.0f') or 'n/a'} | {_fmt(r.get('setup_mb'), '.0f') or 'n/a'} | {vs} | "
                     f"{r.get('attention', '')} | {r.get('setup_s', 0):.1f} |")
    ok = [r for r in rows if r["status"] == "ok"]
    if ok:
        n = max(len(r["losses"]) for r in ok)
        warm = "none" if not s["warmup"] else "0" if s["warmup"] == 1 else f"0-{s['warmup'] - 1}"
        lines += ["", f"Loss per step (warm-up steps: {warm}; same batches and initial adapters, only the dropout "
                  "masks differ):", "",
                  "| configuration | " + " | ".join(str(i) for i in range(n)) + " |", "|---|" + "---:|" * n]
        lines += [f"| {r['name']} | " + " | ".join(f"{x:.4f}" for x in r["losses"]) + " |" for r in ok]
    summary = [f"- {r['name']} vs {r['baseline']}: {r['speedup']:.2f}x tokens/s"
               + (f", {r['memory_ratio']:.0%} of its peak memory" if "memory_ratio" in r else "")
               + f", losses within {r['loss_gap']:.2%} step by step" for r in ok if "speedup" in r]
    if summary:
        lines += [""] + summary
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out, "train_gpu.md"), "w") as f:
        f.write(text)
    return text


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", help="directory for train_gpu.{md,csv,json} and the logs")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 x 64 tokens, 1 + 3 steps: checks every path")
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    p.add_argument("--model-dir", help="benchmark this saved causal LM instead of building a random 1B Llama")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--warmup", type=int, help="untimed steps first (default 3; smoke 1)")
    p.add_argument("--steps", type=int, help="timed steps, median reported (default 10; smoke 3)")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--dropout", type=float, default=0.05)
    p.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate (large: the loss moves in a few steps)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--time-budget", type=float, default=90.0, help="seconds for the whole run, setup included")
    p.add_argument("--config-timeout", type=float, default=60.0, help="seconds for one configuration's process")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    p.add_argument("--_make-model", help=argparse.SUPPRESS)
    p.add_argument("--_settings", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args._child or args._make_model:  # subprocess bodies
        spec = json.loads(args._settings)
        if args._make_model:
            result = make_model(args._make_model, spec["config"], spec["device"])
        else:
            result = run_config(args._child, Settings(**spec))
        print("RESULT " + json.dumps(result), flush=True)
        return 0

    if not args.out:
        raise SystemExit("--out is required")
    t_start = time.monotonic()
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    model_config = MODEL_SMOKE if args.smoke else MODEL_1B
    defaults = (2, 64, 1, 3) if args.smoke else (4, 1024, 3, 10)
    batch, seq, warmup, steps = (v if v is not None else d for v, d in
                                 zip((args.batch_size, args.seq_len, args.warmup, args.steps), defaults))
    if min(batch, seq, steps, args.r) < 1 or warmup < 0:
        raise SystemExit("--batch-size, --seq-len, --steps and --r must be >= 1, --warmup >= 0")
    if args.model_dir:
        model_dir, tmp = os.path.abspath(args.model_dir), None
        vocab, layers = _saved_shape(model_dir)
        model_desc = f"{model_dir} (saved model)"
    else:
        params = _param_count(model_config)
        model_dir = tmp = _model_tmpdir(min_free=4 * params)
        vocab, layers = model_config["vocab_size"], model_config["num_hidden_layers"]
        model_desc = ("random-weight LlamaForCausalLM: " + ", ".join(f"{k} {v}" for k, v in model_config.items())
                      + f" ({params / 1e9:.2f}B parameters, bf16)")
    settings = Settings(args.device, model_dir, batch, seq, warmup, steps, args.r, args.dropout, args.lr,
                        args.gradient_checkpointing, vocab, layers)

    def left() -> float:
        return args.time_budget - (time.monotonic() - t_start)

    rows, device_name = [], None
    meta = {"device": args.device, "model": model_desc, "commit": _commit(), "versions": _versions(),
            "settings": asdict(settings),
            "memory": "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else
            "peak resident set of the configuration's process (VmHWM)"}

    def report() -> str:  # after every configuration: a run stopped from outside keeps what it measured
        _ratios({r["name"]: r for r in rows})
        meta.update(device=device_name or args.device, date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                    total_s=time.monotonic() - t_start)
        return write_results(out, rows, meta)

    try:
        if tmp is not None:
            spec = json.dumps({"config": model_config, "device": args.device})
            made, why = _spawn("model", ["--_make-model", model_dir, "--_settings", spec],
                               os.path.join(out, "train_gpu-setup.log"), max(min(left(), args.config_timeout), 1.0))
            if made is None:
                rows = [{"name": n, "status": "not run", "reason": f"building the model: {why}"} for n in args.configs]
            else:
                device_name = made["device_name"]
        for name in args.configs if not rows else ():
            if left() < MIN_SLICE_S:
                rows.append({"name": name, "status": "skipped",
                             "reason": f"time budget spent ({max(left(), 0):.0f} of {args.time_budget:.0f} s left)"})
                continue
            t0 = time.monotonic()
            result, why = _spawn(name, ["--_child", name, "--_settings", json.dumps(asdict(settings))],
                                 os.path.join(out, f"train_gpu-{name}.log"), min(args.config_timeout, left()))
            if result is None:
                result = {"name": name, "status": "timeout" if why.startswith("timeout") else "failed", "reason": why}
            result["wall_s"] = time.monotonic() - t0
            device_name = device_name or result.get("device_name")
            rows.append(result)
            print(_progress_line(result), flush=True)
            report()
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(report())
    print(f"total {meta['total_s']:.0f} s")
    return 1 if any(r["status"] in ("failed", "timeout", "not run") for r in rows) else 0


def _progress_line(r: dict) -> str:
    if r["status"] != "ok":
        return f"{r['name']:16s} {r['status']}: {r['reason']}"
    peak = _fmt(r.get("peak_mb"), "8.0f") or "     n/a"
    return f"{r['name']:16s} {r['tokens_per_s']:9.0f} tok/s  step {r['step_s'] * 1e3:8.1f} ms  peak {peak} MB"


def _param_count(c: dict) -> int:
    h, i, layers, v = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    return 2 * v * h + h + layers * (2 * h * h + 2 * h * kv + 3 * h * i + 2 * h)


def _saved_shape(model_dir: str) -> tuple[int, int]:
    """(vocab size, number of layers) from a saved model's config.json."""
    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg = cfg.get("text_config", cfg)
    return int(cfg["vocab_size"]), int(cfg["num_hidden_layers"])


if __name__ == "__main__":
    _exit_on_sigterm()
    raise SystemExit(main())
