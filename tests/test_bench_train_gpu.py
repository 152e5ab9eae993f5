"""benchmarks/bench_train_gpu.py without a GPU: ``--device cpu --smoke`` runs every configuration's
code path (its own subprocess, a tiny Llama) and these tests read the tables it writes; the
failure paths (missing library, per-configuration timeout, spent budget, a crashing
configuration, no CUDA) run on a saved tiny model, most without starting torch in a child.

The script runs unattended on a GPU machine once per session: a bug found here costs a test
run, one found there costs the session's only GPU measurement.
"""

from __future__ import annotations

import csv
import importlib.metadata
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_gpu.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_train_gpu_under_test", BENCH)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)  # standard library only: the parent never imports torch
    return mod


bench = _load_bench()


def _csv_rows(out: Path) -> dict[str, dict]:
    lines = [line for line in (out / "train_gpu.csv").read_text().splitlines() if not line.startswith("#")]
    return {r["config"]: r for r in csv.DictReader(lines)}


def _json_rows(out: Path) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads((out / "train_gpu.json").read_text())["rows"]}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    rc = bench.main(["--device", "cpu", "--smoke", "--out", str(out)])
    return out, rc


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    made = bench.make_model(str(path), bench.MODEL_SMOKE, "cpu")
    return path, made


# ------------------------------------------------------------------------ the smoke run


def test_smoke_runs_every_configuration(smoke):
    out, rc = smoke
    rows = _json_rows(out)
    assert rc == 0
    assert list(rows) == list(bench.CONFIGS)
    for name, r in rows.items():
        assert r["status"] == "ok", f"{name}: {r['status']} {r.get('reason')} (log: {out / f'train_gpu-{name}.log'})"
        assert len(r["losses"]) == 1 + 3, name  # smoke: 1 warm-up + 3 timed steps
        assert all(math.isfinite(x) for x in r["losses"]), (name, r["losses"])
        assert r["tokens_per_s"] > 0 and r["step_s"] > 0 and r["peak_mb"] > 0, name
        expected = 0 if name == "dense-frozen" else bench.LORA_LAYERS_PER_BLOCK * bench.MODEL_SMOKE["num_hidden_layers"]
        assert r["adapters"] == expected, name
        assert (r["trainable"] > 0) == (name != "dense-frozen"), name


def test_smoke_libraries_train_the_same(smoke):
    """Same batches, same initial adapters (B = 0): step 0 is the same frozen-model loss in every
    configuration; the dense ones agree to bf16 rounding, the NF4 ones to each other."""
    rows = _json_rows(smoke[0])
    first = {name: r["losses"][0] for name, r in rows.items()}
    assert first["lorakern-lora"] == pytest.approx(first["peft-lora"], rel=2e-3)
    assert first["lorakern-lora"] == pytest.approx(first["dense-frozen"], rel=2e-3)
    assert first["lorakern-qlora"] == pytest.approx(first["peft-bnb-qlora"], rel=2e-3)
    for ours, theirs in bench.PAIRS:
        assert rows[ours]["baseline"] == theirs
        assert rows[ours]["loss_gap"] < 0.02, (ours, rows[ours]["losses"], rows[theirs]["losses"])


def test_smoke_tables(smoke):
    out, _ = smoke
    meta = json.loads((out / "train_gpu.json").read_text())["meta"]
    header = [line for line in (out / "train_gpu.csv").read_text().splitlines() if line.startswith("#")]
    for key in ("device", "commit", "versions", "settings", "date"):
        assert any(line.startswith(f"# {key}: ") for line in header), key
    # the installed distribution's version: PyPI's CUDA wheels say 2.4.1 where torch.__version__ says 2.4.1+cu121
    assert meta["commit"] != "unknown" and meta["versions"]["torch"] == importlib.metadata.version("torch")
    rows = _csv_rows(out)
    assert list(rows) == list(bench.CONFIGS)
    for ours, theirs in bench.PAIRS:
        r = rows[ours]
        assert r["baseline"] == theirs and float(r["speedup"]) > 0 and float(r["memory_ratio"]) > 0
        assert len(r["losses"].split()) == 4
    md = (out / "train_gpu.md").read_text()
    for name in bench.CONFIGS:
        assert f"| {name} | " in md
    assert "- lorakern-qlora vs peft-bnb-qlora: " in md and "- lorakern-lora vs peft-lora: " in md
    assert "- lorakern backends available: " in md and "reference" in md
    for name in bench.CONFIGS:
        assert (out / f"train_gpu-{name}.log").exists()
    assert not os.path.exists(meta["settings"]["model_dir"]), "the generated model is removed after the run"


def test_param_count_matches_the_built_model(model_dir):
    assert bench._param_count(bench.MODEL_SMOKE) == model_dir[1]["params"]


# ------------------------------------------------------------------------ failure paths


def test_missing_library_gives_skipped_rows(model_dir, tmp_path, monkeypatch):
    """A peft that cannot be imported (shadowed by one that raises) skips both PEFT rows cleanly."""
    shadow = tmp_path / "shadow" / "peft"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'peft'\", name='peft')\n")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(shadow.parent), os.environ.get("PYTHONPATH")])))
    out = tmp_path / "out"
    rc = bench.main(["--device", "cpu", "--smoke", "--model-dir", str(model_dir[0]), "--out", str(out),
                     "--configs", "peft-lora", "peft-bnb-qlora"])
    rows = _csv_rows(out)
    assert rc == 0
    for name in ("peft-lora", "peft-bnb-qlora"):
        assert rows[name]["status"] == "skipped"
        assert rows[name]["reason"] == "peft not importable (No module named 'peft')"
    assert "| peft-lora | skipped: peft not importable" in (out / "train_gpu.md").read_text()


def test_timeout_kills_the_configuration(model_dir, tmp_path):
    out = tmp_path / "out"
    rc = bench.main(["--device", "cpu", "--smoke", "--model-dir", str(model_dir[0]), "--out", str(out),
                     "--configs", "lorakern-lora", "--config-timeout", "1"])
    row = _csv_rows(out)["lorakern-lora"]
    assert rc == 1
    assert (row["status"], row["reason"]) == ("timeout", "timeout after 1 s")


def test_sigterm_kills_the_running_configuration(model_dir, tmp_path):
    """An outer ``timeout`` signals the driver only (each configuration has its own process group):
    the driver must take the running configuration down with it."""
    cmd = [sys.executable, str(BENCH), "--device", "cpu", "--smoke", "--model-dir", str(model_dir[0]),
           "--out", str(tmp_path), "--configs", "lorakern-lora"]
    driver = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    started = driver.stdout.readline()
    assert started.startswith("lorakern-lora: started (pid "), started
    child = int(started.split("pid ")[1].split(",")[0])
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=60) == 128 + signal.SIGTERM
    with pytest.raises(ProcessLookupError):
        os.kill(child, 0)  # killed and reaped


def test_spent_budget_skips_without_starting(model_dir, tmp_path):
    out = tmp_path / "out"
    rc = bench.main(["--device", "cpu", "--smoke", "--model-dir", str(model_dir[0]), "--out", str(out),
                     "--time-budget", "0"])
    rows = _csv_rows(out)
    assert rc == 0
    assert list(rows) == list(bench.CONFIGS)
    assert all(r["status"] == "skipped" and r["reason"].startswith("time budget spent") for r in rows.values())
    assert not list(out.glob("train_gpu-*.log"))


def test_crashing_configuration_gives_a_failed_row(model_dir, tmp_path):
    """A model directory without weights: the child's exception ends up in the row and the exit status."""
    broken = tmp_path / "no-weights"
    broken.mkdir()
    shutil.copy(model_dir[0] / "config.json", broken / "config.json")
    out = tmp_path / "out"
    rc = bench.main(["--device", "cpu", "--smoke", "--model-dir", str(broken), "--out", str(out),
                     "--configs", "dense-frozen"])
    row = _csv_rows(out)["dense-frozen"]
    assert rc == 1
    assert row["status"] == "failed" and row["reason"].startswith("failed (exit 1): ")
    assert "Error" in row["reason"] and str(broken) in row["reason"], row["reason"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the run on a machine without CUDA")
def test_cuda_requested_without_a_gpu(tmp_path):
    out = tmp_path / "out"
    rc = bench.main(["--device", "cuda", "--smoke", "--out", str(out), "--configs", "lorakern-qlora"])
    row = _csv_rows(out)["lorakern-qlora"]
    assert rc == 1
    assert row["status"] == "not run" and row["reason"].startswith("building the model: failed")
    # a CPU build: "Torch not compiled with CUDA enabled"; a CUDA build on a machine without a GPU: "Found no NVIDIA driver"
    assert "CUDA" in row["reason"] or "NVIDIA driver" in row["reason"], row["reason"]
