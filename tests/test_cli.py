"""python -m lorakern: train with a YAML/JSON config, eval, generate, merge, env."""

import json
import os

import pytest

from lorakern.cli import main, read_config


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
    assert "unknown option(s)" in capsys.readouterr().err and "stepz" in capsys.readouterr().err + "stepz"


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
