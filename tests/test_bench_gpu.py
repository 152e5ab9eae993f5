"""benchmarks/bench_gpu.py without a GPU: ``--smoke`` runs every group of the GPU sweep on
CPU tensors (Triton interpreted, the CUDA backend stood in by the reference) and these
tests check the tables it writes; the failure paths (graph capture refused, a backend
missing or raising, the time budget) run on one-point configs in this process.

A bug in the benchmark found on a GPU machine costs a whole GPU session; here it costs a
test run.
"""

from __future__ import annotations

import csv
import dataclasses
import importlib.util
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu_under_test", BENCH)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # imports torch only: no triton, no backend
    return mod


bench = _load_bench()


def _rows(out: Path) -> list[dict]:
    lines = [line for line in (out / "results.csv").read_text().splitlines() if not line.startswith("#")]
    return list(csv.DictReader(lines))


def _key(r: dict) -> tuple:
    return r["group"], r["impl"], int(r["M"]), int(r["N"]), int(r["K"])


def _interpreting() -> bool:
    try:
        from lorakern.kernels.triton import interpreting
    except ImportError:  # triton not installed
        return False
    return interpreting()


needs_interpreter = pytest.mark.skipif(
    torch.cuda.is_available() or not _interpreting(),
    reason="runs the Triton kernels on CPU tensors: needs TRITON_INTERPRET=1 set before triton loaded (conftest "
           "does so without a GPU)")


# ------------------------------------------------------------------------ the --smoke run


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """One ``bench_gpu.py --smoke`` run in a fresh CPU-only process: (completed process, out dir)."""
    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs the real sweep (gpu_check.sh bench step)")
    out = tmp_path_factory.mktemp("bench_gpu_smoke")
    env = {k: v for k, v in os.environ.items() if k != "LORAKERN_BACKEND"}
    env.update(TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([sys.executable, str(BENCH), "--smoke", "--out", str(out)], env=env, capture_output=True,
                          text=True, timeout=600)
    return proc, out


def _expected_smoke_rows(bnb: bool) -> set[tuple]:
    """Every row the smoke configuration must produce, written out (not derived from the script)."""
    with_bnb = (lambda impls: impls) if bnb else (lambda impls: [i for i in impls if i != "bitsandbytes"])
    gemm = {
        "fwd": ["torch_dense", "peft_unfused", "lorakern_triton_lora", "lorakern_composite", "lorakern_auto"],
        "qlora_fwd": ["dequant_cublas", "bitsandbytes", "lorakern_triton_qlora", "lorakern_composite", "lorakern_auto"],
        "bwd": ["peft_unfused", "lorakern_triton_lora", "lorakern_composite", "lorakern_auto"],
        "qlora_bwd": ["dequant_cublas", "lorakern_triton_qlora", "lorakern_composite", "lorakern_auto"],
        "lora_layer": ["peft_unfused", "lorakern_auto"],
        "qlora_layer": ["dequant_cublas", "bitsandbytes", "lorakern_auto"],
    }
    gemv = ["dequant_cublas", "bitsandbytes", "lorakern_triton_qlora_gemv", "lorakern_cuda_qlora_gemv",
            "lorakern_composite", "lorakern_auto"]
    fwd = gemm["fwd"]
    rows = {("dequant", impl, 0, 96, 128) for impl in with_bnb(
        ["torch_reference", "bitsandbytes", "lorakern_triton", "lorakern_cuda", "lorakern_composite", "lorakern_auto"])}
    # M = 24 (GEMM kernels) on both shapes, M = 20 on 96x128 only (64x64 at M = 20 is the skipped point).
    for m, n, k in ((24, 96, 128), (24, 64, 64), (20, 96, 128)):
        rows |= {(group, impl, m, n, k) for group, impls in gemm.items() for impl in with_bnb(impls)}
    # The GEMV sweep on 96x128 at M = 1, 3, 16; the bf16 LoRA forward at M = 1 only.
    rows |= {("qlora_fwd", impl, m, 96, 128) for m in (1, 3, 16) for impl in with_bnb(gemv)}
    rows |= {("fwd", impl, 1, n, k) for n, k in ((96, 128), (64, 64)) for impl in fwd}
    rows |= {("qlora_fwd", impl, 1, 64, 64) for impl in with_bnb(gemv)}
    return rows


def test_smoke_run_succeeds(smoke):
    proc, out = smoke
    assert proc.returncode == 0, f"stdout tail:\n{proc.stdout[-3000:]}\nstderr tail:\n{proc.stderr[-3000:]}"
    assert (out / "results.csv").is_file() and (out / "results.md").is_file()
    assert "FAILED" not in proc.stderr


def test_smoke_rows_are_exactly_the_planned_ones(smoke):
    _, out = smoke
    md = (out / "results.md").read_text()
    bnb = "bitsandbytes not measured" not in md
    rows = _rows(out)
    got = [_key(r) for r in rows]
    assert len(got) == len(set(got)), "a row was measured twice"
    want = _expected_smoke_rows(bnb)
    assert set(got) == want, f"missing: {sorted(want - set(got))}\nunexpected: {sorted(set(got) - want)}"


def test_smoke_columns_filled(smoke):
    _, out = smoke
    header = next(line for line in (out / "results.csv").read_text().splitlines() if not line.startswith("#"))
    assert header.split(",") == bench.FIELDS
    for col in ("backend", "time_us", "graph_us", "graph_pct_matmul_peak", "graph_pct_copy_bw",
                "graph_speedup_vs_baseline"):
        assert col in bench.FIELDS
    for r in _rows(out):
        assert float(r["time_us"]) > 0 and float(r["graph_us"]) > 0, r
        for col in ("pct_matmul_peak", "pct_copy_bw", "graph_pct_matmul_peak", "graph_pct_copy_bw"):
            assert float(r[col]) >= 0, (col, r)
        is_ours = r["impl"].startswith("lorakern_")
        assert bool(r["backend"]) == is_ours, f"backend column: {r}"
        if r["impl"] == bench.BASELINES[r["group"]] or r["impl"] == "torch_dense":
            assert r["speedup_vs_baseline"] == "", r
        else:
            # (>= 0: interpreted Triton against torch rounds to 0.000 here)
            assert float(r["speedup_vs_baseline"]) >= 0 and float(r["graph_speedup_vs_baseline"]) >= 0, r


def test_smoke_results_match_the_reference(smoke):
    """Every lorakern and bitsandbytes row checked its output against the torch computation (bf16)."""
    _, out = smoke
    checked = 0
    for r in _rows(out):
        if r["impl"].startswith("lorakern_") or r["impl"] == "bitsandbytes":
            assert r["max_rel_err"] != "", f"no error check: {r}"
        if r["max_rel_err"]:
            assert float(r["max_rel_err"]) < 2e-2, r  # bf16 rounding of different summation orders
            checked += 1
    assert checked > 50


def test_smoke_auto_rows_name_the_registry_pick(smoke):
    from lorakern.ops import _registry

    _, out = smoke
    rows = _rows(out)
    by_key = {_key(r): r for r in rows}
    autos = [r for r in rows if r["impl"] == "lorakern_auto"]
    assert autos
    for r in autos:
        if r["group"] in ("lora_layer", "qlora_layer"):
            assert r["backend"] in ("cpu", "reference", "cpu+reference", "reference+cpu"), r  # CPU tensors
            continue
        assert r["backend"] in _registry.BACKENDS, r
        # where the picked backend has its own row, lorakern_auto repeats that measurement
        twins = [o for k, o in by_key.items() if k[0] == r["group"] and k[2:] == _key(r)[2:]
                 and o["impl"] != "lorakern_auto" and o["backend"] == r["backend"]]
        if twins:
            assert (twins[0]["time_us"], twins[0]["graph_us"]) == (r["time_us"], r["graph_us"])


def test_smoke_markdown_has_routing_and_gemv_tables(smoke):
    _, out = smoke
    md = (out / "results.md").read_text()
    rows = _rows(out)
    keys = {(r["group"], r["N"], r["K"], r["M"]) for r in rows}
    routing = md.split("## Routing table", 1)[1].split("## QLoRA forward at small M", 1)[0]
    lines = [line for line in routing.splitlines() if line.startswith("| ") and not line.startswith("| group")]
    assert len(lines) == len(keys)
    for group, n, k, m in keys:
        assert any(line.startswith(f"| {group} | {n}x{k} | {m} |") for line in lines), (group, n, k, m)
    gemv = md.split("## QLoRA forward at small M", 1)[1]
    for n, k, m in ((96, 128, 1), (96, 128, 3), (96, 128, 16), (64, 64, 1)):
        assert f"| {n}x{k} | {m} |" in gemv
    assert "lorakern_cuda_qlora_gemv" in gemv and "lorakern_auto" not in gemv
    assert "smoke: cuda rows run lorakern.reference" in md


# ----------------------------------------------------------------------- pure functions


def test_gpu_config_plan():
    cfg = bench.gpu_config()
    assert cfg.device == "cuda" and cfg.dtype == torch.bfloat16
    points = [(m, n, k) for m, n, k, _ in cfg.points]
    assert len(points) == len(set(points))
    assert (8192, 4096, 14336) not in points, "cut to fit the time slice"
    for m in (1, 2, 3, 4, 8, 16):
        for n, k in ((4096, 4096), (14336, 4096)):
            groups = dict(((m_, n_, k_), g) for m_, n_, k_, g in cfg.points)[(m, n, k)]
            assert "qlora_fwd" in groups
    for _, _, _, groups in cfg.points:
        assert set(groups) <= set(bench.GROUPS)
    large = [i for i, (m, _, _) in enumerate(points) if m == 8192]
    assert large and min(large) > max(i for i, (m, _, _) in enumerate(points) if m <= 2048), "M=8192 runs last"
    assert {m for m, *_ in cfg.points if m >= 512} == {512, 2048, 8192}
    layer_points = {m for m, n, k, g in cfg.points if "qlora_layer" in g}
    assert layer_points == {512, 2048, 8192}
    assert cfg.cuts


def _row(group, impl, m, time_us, graph_us, backend=""):
    return dict(group=group, impl=impl, backend=backend, M=m, N=64, K=32, time_us=time_us, graph_us=graph_us)


def test_routing_table_picks_by_each_time():
    rows = [
        _row("qlora_fwd", "dequant_cublas", 1, 30.0, 20.0),
        _row("qlora_fwd", "lorakern_cuda_qlora_gemv", 1, 12.0, 9.0, "cuda"),
        _row("qlora_fwd", "lorakern_composite", 1, 11.0, 15.0, "composite"),
        _row("qlora_fwd", "lorakern_auto", 1, 11.0, 15.0, "composite"),
        _row("qlora_fwd", "bitsandbytes", 1, 10.0, ""),  # capture failed: competes on eager time only
        _row("fwd", "torch_dense", 512, 1.0, 1.0),  # no LoRA term: never the fastest
        _row("fwd", "peft_unfused", 512, 5.0, 4.0),
        _row("fwd", "lorakern_triton_lora", 512, 6.0, 3.0, "triton"),
        _row("fwd", "lorakern_auto", 512, 6.0, 3.0, "triton"),
        _row("qlora_layer", "dequant_cublas", 512, 50.0, 40.0),
        _row("qlora_layer", "lorakern_auto", 512, 45.0, 41.0, "composite"),
    ]
    table = {(t["group"], t["M"]): t for t in bench.routing_table(rows)}
    assert list(table) == [("qlora_fwd", 1), ("fwd", 512), ("qlora_layer", 512)]
    t = table["qlora_fwd", 1]
    assert t["graph"]["impl"] == "lorakern_cuda_qlora_gemv"
    assert t["eager"]["impl"] == "bitsandbytes"
    assert t["ours_graph"]["impl"] == "lorakern_cuda_qlora_gemv" and t["ours_eager"]["impl"] == "lorakern_composite"
    assert t["auto"]["backend"] == "composite" and t["auto_ratio"] == pytest.approx(15.0 / 9.0)
    t = table["fwd", 512]
    assert t["graph"]["impl"] == "lorakern_triton_lora" and t["eager"]["impl"] == "peft_unfused"
    assert t["auto_ratio"] == pytest.approx(1.0)
    t = table["qlora_layer", 512]  # no backend rows here: lorakern_auto competes
    assert t["graph"]["impl"] == "dequant_cublas" and t["eager"]["impl"] == "lorakern_auto"
    assert t["ours_graph"]["impl"] == "lorakern_auto"
    md = "\n".join(bench.routing_markdown(rows))
    assert "| qlora_fwd | 64x32 | 1 | lorakern_cuda_qlora_gemv 9.0 | bitsandbytes 10.0 |" in md
    gemv = "\n".join(bench.gemv_markdown(rows))
    assert "**9.0 (12.0)**" in gemv and "- (10.0)" in gemv


def test_routing_table_without_graph_times():
    rows = [_row("bwd", "peft_unfused", 512, 5.0, ""), _row("bwd", "lorakern_composite", 512, 4.0, "", "composite")]
    (t,) = bench.routing_table(rows)
    assert t["graph"] is None and t["ours_graph"] is None and t["auto"] is None and t["auto_ratio"] is None
    assert t["eager"]["impl"] == "lorakern_composite"
    assert "| bwd | 64x32 | 512 |  | lorakern_composite 4.0 |" in "\n".join(bench.routing_markdown(rows))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the capture failure path on a machine without CUDA")
def test_cuda_graph_failure_is_returned_not_raised():
    ms, why = bench.CudaTimer().graph(lambda: torch.ones(4) * 2)
    assert ms is None and why


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_timing_on_gpu():
    """Replays time a captured matmul; a call that syncs (.item()) fails capture without breaking the device."""
    timer = bench.CudaTimer(warmup_ms=1, rep_ms=5)
    a = torch.randn(256, 256, device="cuda")
    ms, why = timer.graph(lambda: a @ a)
    assert ms is not None and ms > 0 and why == ""
    ms, why = timer.graph(lambda: (a @ a).sum().item())
    assert ms is None and why
    assert torch.cuda.current_stream() == torch.cuda.default_stream()
    torch.testing.assert_close((a @ a).cpu(), a.cpu() @ a.cpu(), rtol=1e-2, atol=1e-2)


# --------------------------------------------------------------- failure paths, one point


def _one_point_config(groups=("fwd", "qlora_fwd"), m=17):
    return dataclasses.replace(bench.smoke_config(), dequant_shapes=(), points=((m, 64, 64, groups),))


class FlakyTimer(bench.WallTimer):
    """Refuses every other graph capture, as a CUDA graph may for one implementation."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def graph(self, fn):
        self.calls += 1
        if self.calls % 2:
            return None, "RuntimeError: refused by the test"
        return super().graph(fn)


@needs_interpreter
def test_failed_graph_capture_leaves_the_cell_empty(tmp_path):
    assert bench.run(_one_point_config(), FlakyTimer(), tmp_path) == 0
    rows = _rows(tmp_path)
    empty = [r for r in rows if r["graph_us"] == ""]
    assert empty and len(empty) < len(rows)
    for r in empty:
        assert r["graph_pct_matmul_peak"] == "" and r["graph_pct_copy_bw"] == "" and float(r["time_us"]) > 0
    md = (tmp_path / "results.md").read_text()
    assert "graph capture failed for" in md and "refused by the test" in md
    assert "## Routing table" in md


@needs_interpreter
def test_missing_composite_backend_is_skipped_with_a_note(tmp_path, monkeypatch):
    monkeypatch.setattr(bench, "COMPOSITE_MODULE", "lorakern.kernels.no_such_backend")
    assert bench.run(_one_point_config(), bench.WallTimer(), tmp_path) == 0
    rows = _rows(tmp_path)
    assert not [r for r in rows if r["impl"] == "lorakern_composite"]
    assert {r["group"] for r in rows if r["impl"] == "lorakern_triton_lora"} == {"fwd"}
    assert len([r for r in rows if r["impl"] == "lorakern_auto"]) == 2  # timed, not repeated from a row
    md = (tmp_path / "results.md").read_text()
    assert "composite backend not measured: import of lorakern.kernels.no_such_backend failed" in md


@needs_interpreter
def test_a_raising_backend_fails_its_rows_only(tmp_path, monkeypatch):
    def broken(*args):
        raise RuntimeError("kernel exploded")

    fake = types.SimpleNamespace(NAME="composite", availability=lambda: (True, "fake"), lora_linear_fwd=broken,
                                 qlora_linear_fwd=broken)
    monkeypatch.setattr(bench.Backends, "_load_composite", staticmethod(lambda: (fake, "fake")))
    assert bench.run(_one_point_config(), bench.WallTimer(), tmp_path) == 1
    rows = _rows(tmp_path)
    impls = {(r["group"], r["impl"]) for r in rows}
    assert ("fwd", "lorakern_composite") not in impls and ("fwd", "lorakern_triton_lora") in impls
    assert ("qlora_fwd", "dequant_cublas") in impls
    md = (tmp_path / "results.md").read_text()
    assert "fwd lorakern_composite at M=17 N=64 K=64 failed: RuntimeError: kernel exploded" in md


@needs_interpreter
def test_time_budget_stops_before_the_points(tmp_path):
    cfg = dataclasses.replace(bench.smoke_config(), dequant_shapes=((64, 64),), points=((17, 64, 64, ("fwd",)),) * 3)
    assert bench.run(cfg, bench.WallTimer(), tmp_path, time_budget=0.0) == 0
    rows = _rows(tmp_path)
    assert rows and {r["group"] for r in rows} == {"dequant"}
    assert "time budget 0s reached: 3 of 3 (M, N, K) points not measured" in (tmp_path / "results.md").read_text()
