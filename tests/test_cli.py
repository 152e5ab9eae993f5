"""python -m lorakern: train with a YAML/JSON config, eval, generate, merge, env."""

import json
import os

import pytest

from lorakern.cli import main
from lorakern.train.pipeline import read_config


def test_read_config_yaml_and_json(tmp_path):
    (tmp_path / "c.yaml").write_text("batch-size: 4\nmethod: lora\n")
    (tmp_path / "c.json").write_text(json.dumps({"steps": 3}))
    assert read_config(str(tmp_path / "c.yaml")) == {"batch_size": 4, "method": "lora"}
    assert read_config(str(tmp_path / "c.json")) == {"steps": 3}
    (tmp_path / "c.toml").write_text("")
    with pytest.raises(ValueError, match="yaml"):
        read_config(str(tmp_path / "c.toml"))
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(ValueError, match="mapping"):
        read_config(str(tmp_path / "list.yaml"))


def test_train_eval_generate_merge(tiny_model_dir, tmp_path, capsys):
    out = str(tmp_path / "run")
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_model_dir}\nmethod: lora\nsteps: 5\nbatch_size: 2\neval_limit: 2\n"
                      f"max_new_tokens: 3\nmax_length: 512\noutput_dir: {out}\nno_progress: true\n"
                      "mixed_precision: 'no'\n")
    assert main(["train", "--config", str(config), "--steps", "2"]) == 0  # the flag wins over the file
    assert [json.loads(line)["step"] for line in open(os.path.join(out, "metrics.jsonl"))] == [1, 2]
    adapter = os.path.join(out, "adapter")

    data = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "data",
                        "support_triage_test.jsonl")
    report = str(tmp_path / "eval.json")
    capsys.readouterr()
    assert main(["eval", "--model", tiny_model_dir, "--adapter", adapter, "--data", data, "--limit", "2",
                 "--max-new-tokens", "3", "--output", report]) == 0
    assert "exact match" in capsys.readouterr().out
    assert json.load(open(report))["task"]["n"] == 2

    assert main(["generate", "--model", tiny_model_dir, "--adapter", adapter, "--prompt", "hi", "--prompt", "yo",
                 "--max-new-tokens", "3"]) == 0
    assert len(capsys.readouterr().out.splitlines()) >= 2

    merged = str(tmp_path / "merged")
    assert main(["merge", "--model", tiny_model_dir, "--adapter", adapter, "--output", merged]) == 0
    assert "model.safetensors" in os.listdir(merged)


def test_train_rejects_unknown_config_keys(tmp_path, capsys):
    config = tmp_path / "bad.json"
    config.write_text(json.dumps({"stepz": 3}))
    with pytest.raises(SystemExit):
        main(["train", "--config", str(config)])
    err = capsys.readouterr().err
    assert "unknown option(s)" in err and "stepz" in err


@pytest.mark.parametrize("flags,message", [
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--batch-size", "0"], "--batch-size must be >= 1"),
    (["--grad-accum", "-1"], "--grad-accum must be >= 1"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0"),
    (["--save-every", "-2"], "--save-every must be >= 0"),
    (["--r", "0"], "--r (the LoRA rank) must be a positive int"),
    (["--alpha", "-2"], "--alpha must be a positive finite number"),
    (["--dropout", "1.0"], "--dropout must be a probability in [0, 1)"),
    (["--val-fraction", "1.5"], "--val-fraction must be in [0, 1)"),
    (["--max-length", "1"], "--max-length must be >= 2"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be >= 1"),
    (["--data", "/nonexistent/train.jsonl"], "--data: no such file: /nonexistent/train.jsonl"),
    (["--test-data", "/nonexistent/test.jsonl"], "--test-data: no such file"),
    (["--adapter", "/nonexistent/adapter"], "--adapter: no such directory"),
    (["--method", "full", "--adapter", "."], "--adapter continues LoRA training"),
    (["--method", "full", "--merge"], "--merge folds LoRA adapters into the base model; --method full has none"),
    (["--adapter", ".", "--r", "4"],
     "--r does not apply with --adapter: the adapter's own r (from its adapter_config.json) is used; drop --r 4"),
    (["--adapter", ".", "--alpha", "1"], "--alpha does not apply with --adapter: the adapter's own lora_alpha"),
    (["--adapter", ".", "--dropout", "0.5"], "--dropout does not apply with --adapter"),
    (["--adapter", ".", "--target-modules", "q_proj"], "--target-modules does not apply with --adapter"),
    (["--adapter", ".", "--target-parameters", "none"], "--target-parameters does not apply with --adapter"),
    (["--method", "full", "--r", "8"], "--r does not apply with --method full, which trains every weight"),
    (["--method", "full", "--dropout", "0.1"], "--dropout does not apply with --method full"),
    (["--target-modules", "q_proj|("], "--target-modules 'q_proj|(' is neither a list of names nor a valid regular"),
    (["--target-parameters", " , "], "--target-parameters must be auto, all-experts, none or a comma-separated"),
    (["--config", "/nonexistent/run.yaml"], "--config: .*No such file"),
    (["--config", "run.toml"], "--config: --config must be a .yaml, .yml or .json file"),
    (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    (["--seed", str(2**32)], "--seed must be in [0, 2**32)"),
    (["--test-data", "split", "--val-fraction", "0.5", "--test-fraction", "0.6"],
     "--val-fraction + --test-fraction must be < 1"),
    (["--resume", "--overwrite"], "--resume continues the run in --output-dir and --overwrite deletes it"),
])
def test_train_refuses_bad_options_before_loading_anything(flags, message, monkeypatch, capsys):
    import re

    from lorakern.train import models

    def no_load(*a, **k):
        raise AssertionError("the model must not load for a bad option")

    monkeypatch.setattr(models, "load_model_and_tokenizer", no_load)
    with pytest.raises(SystemExit) as e:
        main(["train", *flags])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert re.search(message if message.startswith("--config") else re.escape(message), err), err


def test_targets_the_model_lacks_end_with_one_line(tiny_model_dir, tmp_path, capsys):
    base = ["train", "--model", tiny_model_dir, "--output-dir", str(tmp_path), "--no-progress"]
    assert main(base + ["--target-modules", "nonexistent_proj"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the model-loading progress bars
    assert last.startswith("error: --target-modules nonexistent_proj: target_modules entries matched no module")
    assert main(base + ["--target-modules", ".*mlp"]) == 1  # matches the MLP containers, not linear layers
    err = capsys.readouterr().err
    assert "Traceback" not in err and "LlamaMLP; only nn.Linear and transformers Conv1D" in err


def test_a_model_that_is_not_a_causal_lm_is_one_error_line(tmp_path, capsys):
    from transformers import T5Config, T5ForConditionalGeneration

    from lorakern.train.tiny import tiny_tokenizer

    path = str(tmp_path / "t5")
    T5ForConditionalGeneration(T5Config(vocab_size=300, d_model=16, d_ff=32, num_layers=1, num_heads=2, d_kv=8,
                                        decoder_start_token_id=0, pad_token_id=0)).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    for argv in (["train", "--model", path, "--output-dir", str(tmp_path / "run")],
                 ["generate", "--model", path, "--prompt", "hi"]):
        assert main(argv) == 1
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith(f"error: {path} holds a 't5' model, which is not a causal language model"), last


def test_bad_values_in_a_config_file_are_usage_errors(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("steps: 0\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(config)])
    assert e.value.code == 2 and "--steps must be >= 1, got 0" in capsys.readouterr().err
    config.write_text("steps: [1, 2]\n")  # wrong type from YAML
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(config)])
    assert e.value.code == 2


def test_data_files_of_other_types_are_refused_before_loading_anything(tmp_path, monkeypatch, capsys):
    from lorakern.train import models

    monkeypatch.setattr(models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("no model may load"))
    (tmp_path / "train.txt").write_text("hello\n")
    for option in ("--data", "--test-data", "--general-data"):
        with pytest.raises(SystemExit) as e:
            main(["train", option, str(tmp_path / "train.txt")])
        assert e.value.code == 2
        assert (f"{option} {tmp_path / 'train.txt'}: unsupported extension '.txt'; expected .jsonl, .json or .csv"
                in capsys.readouterr().err)


def test_help_shows_every_default(capsys):
    import re

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines anywhere
    for option, default in (("--method", "qlora"), ("--warmup-steps", "5"), ("--mixed-precision", "auto"),
                            ("--seed", "0"), ("--r", "16")):
        # the option's entry: not the usage line's "[--seed SEED]", up to the next entry
        help_text = re.search(rf"(?<!\[){option} (?:\{{[a-z0-9,]+\}}|[A-Z_]+) (.*?)(?= -[-a-z]|$)", text).group(1)
        assert f"(default: {default})" in help_text, (option, help_text)
    assert "(default: None)" not in text


def test_adapter_refuses_lora_options_from_a_config_file(tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(f"adapter: {tmp_path}\ndropout: 0.5\n")
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(config)])
    assert e.value.code == 2 and "--dropout does not apply with --adapter" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["eval", "--data", "/nonexistent.jsonl"], "--data: no such file"),
    (["eval", "--data", __file__, "--limit", "-1"], "--limit must be >= 0"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["merge", "--adapter", "/nonexistent", "--output", "out"], "--adapter: no such directory"),
    (["merge", "--adapter", os.path.dirname(__file__), "--output", os.path.dirname(__file__) + "/"],
     "is the --adapter directory; the merged model would overwrite what it is built from"),
])
def test_other_commands_refuse_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_quantize_needs_an_adapter(capsys):
    for argv in (["eval", "--data", __file__, "--quantize", "nf4"], ["generate", "--quantize", "nf4", "--prompt", "hi"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "--quantize nf4 applies with --adapter (it puts the adapter on an NF4 base)" in capsys.readouterr().err


def test_merge_with_quantize_merges_into_the_nf4_base_qlora_trained_on(tiny_model_dir, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file

    from lorakern.patch import apply_lora, merge_lora, save_adapter
    from lorakern.train.export import load_for_chat
    from lorakern.train.tiny import tiny_llama

    model = tiny_llama()
    apply_lora(model, r=4, alpha=8, quantize="nf4")
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if name.endswith("lora_B"):
            p.data.normal_(0, 0.1)
    save_adapter(model, str(tmp_path / "adapter"))
    trained, _ = load_for_chat(tiny_model_dir, str(tmp_path / "adapter"), quantize="nf4")
    expected = merge_lora(trained).state_dict()
    key = "model.layers.0.self_attn.q_proj.weight"
    for quantize, same in ((["--quantize", "nf4"], True), ([], False)):
        out = tmp_path / f"merged{len(quantize)}"
        assert main(["merge", "--model", tiny_model_dir, "--adapter", str(tmp_path / "adapter"), "--output", str(out),
                     *quantize]) == 0
        merged = load_file(out / "model.safetensors")
        assert torch.equal(merged[key], expected[key]) is same
        assert ("into the dequantized NF4 base" in capsys.readouterr().out) is same


def test_env_command(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "backends" in out
    assert "cuda tensors: cuda -> composite -> triton -> reference" in out


def test_device_flag(capsys, monkeypatch):
    import torch

    from lorakern.train.pipeline import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available()
                                      else torch.device("cpu"))
    for bad in ("tpu", "cuda:x", "meta"):
        with pytest.raises(ValueError, match="--device must be auto, cpu, cuda or cuda:N"):
            resolve_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="sees no CUDA GPU"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    # The command lines say so before loading anything.
    for argv in (["train", "--device", "cuda:1"], ["generate", "--device", "cuda", "--prompt", "hi"],
                 ["eval", "--device", "cuda", "--data", "x.jsonl"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        assert "sees no CUDA GPU" in capsys.readouterr().err


def test_a_damaged_gguf_file_is_a_clear_error(tmp_path, capsys):
    # an empty file failed in numpy ("cannot mmap an empty file"), a cut-off one in the GGUF reader
    # ("cannot reshape array ..."), with a traceback; an upper-case .GGUF was taken for a directory
    from lorakern.train.models import ModelError, default_gguf, resolve_model

    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(ModelError, match=r"empty.gguf is not a GGUF file \(it starts with b'', not b'GGUF'\)"):
        resolve_model(str(tmp_path / "empty.gguf"))
    directory, name = default_gguf()
    with open(os.path.join(directory, name), "rb") as f:
        (tmp_path / "cut.gguf").write_bytes(f.read(2 << 20))  # an interrupted download
    (tmp_path / "Model.GGUF").write_bytes(b"GGUF")
    assert resolve_model(str(tmp_path / "Model.GGUF")) == (str(tmp_path), "Model.GGUF")
    assert main(["generate", "--model", str(tmp_path / "cut.gguf"), "--prompt", "hi", "--max-new-tokens", "1"]) == 1
    assert "cut.gguf could not be loaded as a GGUF model (truncated or damaged?)" in capsys.readouterr().err
    (tmp_path / "header.gguf").write_bytes((tmp_path / "cut.gguf").read_bytes()[:300])  # cut inside its header
    assert main(["generate", "--model", str(tmp_path / "header.gguf"), "--prompt", "hi"]) == 1
    assert "header.gguf could not be loaded as a GGUF model (truncated or damaged?)" in capsys.readouterr().err


def test_missing_or_unreachable_model_is_a_clear_error(tmp_path, capsys, monkeypatch):
    import transformers

    from lorakern.train.models import load_model_and_tokenizer

    assert main(["train", "--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "run")]) == 1
    assert "model directory not found" in capsys.readouterr().err

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files.")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", offline)
    with pytest.raises(OSError, match="cannot load model 'some-hub-id': there is no such local directory"):
        load_model_and_tokenizer("some-hub-id")


def test_qlora_on_a_moe_model_adapts_and_quantizes_the_experts(tmp_path, capsys):
    """--target-parameters auto: a Mixtral's fused expert weights get NF4 bases and adapters, saved and reloaded."""
    import torch
    from safetensors.torch import load_file
    from transformers import MixtralConfig, MixtralForCausalLM

    from lorakern.train.tiny import tiny_tokenizer

    model_dir, out = str(tmp_path / "moe"), str(tmp_path / "run")
    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(vocab_size=104, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                     num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                     num_experts_per_tok=2, pad_token_id=0, eos_token_id=3, bos_token_id=2)
                       ).save_pretrained(model_dir)
    tiny_tokenizer().save_pretrained(model_dir)
    common = ["--model", model_dir, "--no-progress", "--eval-limit", "2", "--max-new-tokens", "3",
              "--mixed-precision", "no", "--eval-every", "0", "--save-every", "0"]
    assert main(["train", *common, "--method", "qlora", "--steps", "2", "--batch-size", "2",
                 "--output-dir", out]) == 0
    assert "qlora: adapters on 12 layers" in capsys.readouterr().out  # 4 attention projections + 2 expert weights, x2
    adapter = os.path.join(out, "adapter")
    config = json.load(open(os.path.join(adapter, "adapter_config.json")))
    assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    assert config["lora_dropout"] == 0.0  # trained with 0.05; PEFT refuses dropout with target_parameters
    keys = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    assert keys["base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight"].shape == (4 * 16, 32)
    assert main(["train", *common, "--target-parameters", "model.layers.0.mlp.experts.down_proj", "--steps", "1",
                 "--output-dir", str(tmp_path / "one")]) == 0
    assert "lora: adapters on 9 layers" in capsys.readouterr().out
    assert main(["train", *common, "--target-parameters", "experts.w1", "--output-dir", str(tmp_path / "bad")]) == 1
    assert "error: --target-parameters experts.w1: target_parameters entries matched no parameter" in \
        capsys.readouterr().err


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def small_run(tiny_model_dir, tmp_path):
    """``train`` flags for a run of seconds: 24 training and 3 test records, no forgetting check."""
    with open(os.path.join(ROOT, "examples", "data", "support_triage_train.jsonl")) as f:
        lines = f.readlines()
    (tmp_path / "train.jsonl").write_text("".join(lines[:24]))
    (tmp_path / "test.jsonl").write_text("".join(lines[24:27]))
    return ["train", "--model", tiny_model_dir, "--data", str(tmp_path / "train.jsonl"), "--test-data",
            str(tmp_path / "test.jsonl"), "--general-data", "none", "--method", "lora", "--steps", "2",
            "--batch-size", "2", "--eval-limit", "1", "--max-new-tokens", "2", "--max-length", "1024",
            "--val-fraction", "0", "--no-progress", "--mixed-precision", "no", "--num-samples", "0",
            "--output-dir", str(tmp_path / "run")]


def _steps(run_dir) -> list[int]:
    return [json.loads(line)["step"] for line in open(os.path.join(run_dir, "metrics.jsonl"))]


def test_train_refuses_an_output_dir_holding_a_previous_run(tmp_path, monkeypatch, capsys):
    from lorakern.train import models

    monkeypatch.setattr(models, "load_model_and_tokenizer", lambda *a, **k: pytest.fail("no model may load"))
    (tmp_path / "notes.txt").write_text("not a run")
    (tmp_path / "checkpoint-6").mkdir()
    (tmp_path / "metrics.jsonl").write_text('{"step": 6, "loss": 1.0}\n')
    with pytest.raises(SystemExit) as e:
        main(["train", "--output-dir", str(tmp_path)])
    assert e.value.code == 2
    assert (f"--output-dir {tmp_path} holds a previous run (checkpoint-6, metrics.jsonl): pass --resume to continue "
            "it, --overwrite to delete it and start over, or another --output-dir") in capsys.readouterr().err


def test_overwrite_replaces_the_previous_run_and_keeps_other_files(small_run, tmp_path, capsys):
    run = tmp_path / "run"
    (run / "checkpoint-9").mkdir(parents=True)
    (run / "checkpoint-9" / "trainer_state.json").write_text("{}")
    (run / "adapter").mkdir()
    (run / "metrics.jsonl").write_text('{"step": 9, "loss": 1.0}\n')
    (run / "notes.txt").write_text("mine")
    assert main(small_run + ["--save-every", "1", "--overwrite"]) == 0
    assert "--overwrite: deleted adapter, checkpoint-9, metrics.jsonl from" in capsys.readouterr().out
    # checkpoint-9 would have outranked this run's checkpoints in the rotation (2 kept)
    assert sorted(os.listdir(run)) == ["adapter", "checkpoint-1", "checkpoint-2", "loss_curve.png", "metrics.jsonl",
                                       "notes.txt", "report.json"]
    assert _steps(run) == [1, 2]


@pytest.mark.parametrize("text,message", [
    ("steps: 2.5\n", "steps: expected an integer, got 2.5"),
    ('merge: "false"\n', "merge: expected true or false, got 'false'"),
    ("method: bogus\n", "method: expected one of qlora, lora, full, got 'bogus'"),
    ("mixed_precision: no\n", "mixed_precision: expected one of auto, bf16, fp16, no, got false (quote yes, no"),
    ("lr: fast\n", "lr: expected a number, got 'fast'"),
    ("data: {a: 1}\n", "data: expected a string, got {'a': 1}"),
    ("target_modules: [q_proj, [v_proj]]\n", "target_modules: expected a list of names, got ['q_proj', ['v_proj']]"),
])
def test_config_values_are_checked_like_flags(text, message, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as e:
        main(["train", "--config", str(config)])
    assert e.value.code == 2
    assert f"{config}: {message}" in capsys.readouterr().err


def test_config_values_convert_like_flags(tmp_path):
    from lorakern.train.pipeline import parse_args

    data = os.path.join(ROOT, "examples", "data", "support_triage_train.jsonl")
    config = tmp_path / "run.yaml"
    config.write_text(f"lr: 5e-4\nsteps: 3\ndata: {data}\ntarget_modules: [q_proj, v_proj]\nmerge: true\n"
                      f"alpha: 16\noutput_dir: {tmp_path / 'run'}\n")
    args = parse_args(["--config", str(config)])
    assert (args.lr, args.steps, args.data, args.target_modules, args.merge) == \
        (5e-4, 3, [data], "q_proj,v_proj", True)  # YAML 1.1 reads 5e-4 (no dot) as a string
    assert isinstance(args.alpha, float)


def test_resume_continues_from_the_base_models_report_and_refuses_other_runs(small_run, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(small_run + ["--steps", "4", "--save-every", "2"]) == 0
    first = json.load(open(run / "report.json"))
    capsys.readouterr()

    def resume(*flags):
        code = main(small_run + ["--steps", "4", "--resume", *flags])
        return code, capsys.readouterr()

    # Another global batch, rank or data: refused before the first evaluation (minutes on a real model).
    for flags, message in ((["--batch-size", "4"], ": global batch is 2 samples per step"),
                           (["--r", "8"], "lora_A has shape (16, 32), model has (8, 32): resume with the method"),
                           (["--data", str(tmp_path / "test.jsonl")],
                            "was trained on 24 examples in 'train' but this run has 3 examples in 'train'"),
                           (["--alpha", "8"], "this run has LoRALinear on a dense base, scaling 0.5, dropout 0.05: "
                                              "resume with the LoRA alpha and rank (scaling = alpha / r)"),
                           (["--method", "qlora"], "this run has QLoRALinear on a nf4 base, scaling 2, dropout 0.05")):
        code, out = resume(*flags)
        assert code == 1 and f"error: --resume: checkpoint {run / 'checkpoint-4'}" in out.err and message in out.err
        assert "before-training evaluation" not in out.out

    # Resumed halfway: "before" is still the base model's report, not the checkpoint's.
    os.rename(run / "checkpoint-4", tmp_path / "spare")
    code, out = resume()
    assert code == 0 and f"resumed at step 2 from {run / 'checkpoint-2'}" in out.out
    assert json.load(open(run / "report.json"))["before"] == first["before"]
    assert _steps(run) == [1, 2, 3, 4]


def test_resume_without_a_checkpoint_says_it_starts_over(small_run, tmp_path, capsys):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "lo')
    with pytest.warns(UserWarning, match="metrics.jsonl:2: dropped a torn last line"):
        assert main(small_run + ["--resume"]) == 0
    assert f"--resume: no checkpoint in {tmp_path / 'run'} yet; starting from step 0" in capsys.readouterr().out
    assert _steps(tmp_path / "run") == [1, 2]


def test_ctrl_c_saves_a_checkpoint_and_says_how_to_resume(small_run, tmp_path, monkeypatch, capsys):
    import signal

    from lorakern.train.trainer import Trainer

    log = Trainer._log

    def ctrl_c_after_step_1(self, record):
        log(self, record)
        if record["step"] == 1:
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(Trainer, "_log", ctrl_c_after_step_1)
    try:
        code = main(small_run + ["--steps", "5"])
    except KeyboardInterrupt:  # would end the whole test session
        pytest.fail("Ctrl-C escaped as a raw KeyboardInterrupt")
    assert code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert (f"interrupted after step 1: {tmp_path / 'run' / 'checkpoint-1'} holds the last saved step; run the same "
            "command with --resume to continue from it") in err
    monkeypatch.setattr(Trainer, "_log", log)
    assert main(small_run + ["--steps", "5", "--resume"]) == 0
    assert "resumed at step 1" in capsys.readouterr().out and _steps(tmp_path / "run") == [1, 2, 3, 4, 5]


def test_skipped_evaluation_records_are_reported(small_run, tiny_model_dir, tmp_path, capsys):
    test = tmp_path / "test.csv"
    test.write_text('instruction,output\n"Say, hi",ok\nonly\n,empty\nb,c\n')
    argv = small_run + ["--steps", "1"]
    argv[argv.index("--test-data") + 1] = str(test)
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"held-out test set: 2 records from {test}\n  2 record(s) skipped or changed:\n    {test}:3: no response " \
        "field" in out and f"{test}:4: empty user message; dropped" in out

    # Nothing usable: an error, not an empty report.
    none = tmp_path / "none.jsonl"
    none.write_text('{"x": 1}\n')
    assert main(["eval", "--model", tiny_model_dir, "--data", str(none)]) == 1
    err = capsys.readouterr().err
    assert f"error: --data {none}: no usable record; 1 record(s) skipped:\n  {none}:1: no prompt field" in err
    argv[argv.index("--general-data") + 1] = str(none)
    assert main(argv + ["--overwrite"]) == 1
    assert f"error: --general-data {none}: no usable record" in capsys.readouterr().err


def test_overlong_held_out_records_are_generated_for_and_left_out_of_the_loss(small_run, tiny_model_dir, tmp_path,
                                                                                capsys):
    import re

    # the tiny tokenizer has one token per character: over --max-length 400, within the model's 512 positions
    long = [json.dumps({"prompt": "long " * 80 + str(i), "response": '{"a": 2}'}) + "\n" for i in range(4)]
    test = tmp_path / "held_out.jsonl"
    test.write_text(json.dumps({"prompt": "short", "response": '{"a": 1}'}) + "\n" + long[0])
    report = tmp_path / "eval.json"
    assert main(["eval", "--model", tiny_model_dir, "--data", str(test), "--max-length", "400", "--max-new-tokens",
                 "2", "--num-samples", "0", "--output", str(report)]) == 0
    out = capsys.readouterr().out
    assert f"evaluation set: 2 records from {test} (1 of them in the loss)" in out
    assert re.search(rf"{re.escape(str(test))}:2: 4\d\d tokens > max_length 400; left out of the held-out loss, "
                     "still generated for and scored", out), out
    result = json.load(open(report))
    assert result["task"]["n"] == 2 and result["test"]["tokens"] < 400

    # --test-data split: the test split's over-long records too; the training split's are dropped
    data = tmp_path / "train.jsonl"
    data.write_text(data.read_text() + "".join(long))
    argv = small_run + ["--steps", "1", "--test-fraction", "0.5", "--eval-limit", "0", "--max-length", "400"]
    argv[argv.index("--test-data") + 1] = "split"
    assert main(argv) == 0
    out = capsys.readouterr().out
    n_test = int(re.search(r"data: train \d+, validation 0, test (\d+) examples", out).group(1))
    kept = out.count("tokens > max_length 400; left out of the held-out loss, still generated for and scored\n")
    dropped = out.count("tokens > max_length 400; drop\n")
    assert kept > 0 and dropped > 0 and kept + dropped == 4, out
    after = json.load(open(tmp_path / "run" / "report.json"))["after"]
    assert after["task"]["n"] == n_test + kept
