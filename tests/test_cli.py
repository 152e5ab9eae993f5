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
    (["--target-modules", "q_proj|("], "--target-modules 'q_proj|(' is neither a list of names nor a valid regular"),
    (["--target-parameters", " , "], "--target-parameters must be auto, all-experts, none or a comma-separated"),
    (["--config", "/nonexistent/run.yaml"], "--config: .*No such file"),
    (["--config", "run.toml"], "--config: --config must be a .yaml, .yml or .json file"),
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


@pytest.mark.parametrize("argv,message", [
    (["eval", "--data", "/nonexistent.jsonl"], "--data: no such file"),
    (["eval", "--data", __file__, "--limit", "-1"], "--limit must be >= 0"),
    (["generate", "--max-new-tokens", "0"], "--max-new-tokens must be >= 1"),
    (["merge", "--adapter", "/nonexistent", "--output", "out"], "--adapter: no such directory"),
])
def test_other_commands_refuse_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


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
