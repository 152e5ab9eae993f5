"""GPU microbenchmarks of the Triton (and CUDA) kernels against the baselines, in one run.

    python benchmarks/bench_gpu.py [--out DIR] [--time-budget SECONDS] [--quick]

Baselines, measured side by side at every point:
  torch_dense      x @ W^T in bf16 (cuBLAS), no LoRA: the floor for any fused kernel
  peft_unfused     x @ W^T + s * (x @ A^T) @ B^T in torch (PEFT's LoRA forward)
  dequant_cublas   NF4 dequantize to bf16, then the unfused LoRA forward (the QLoRA recipe)
  bitsandbytes     bnb.matmul_4bit + unfused LoRA, when bitsandbytes imports and runs here
Shapes are Llama-3-8B's linear layers (N x K): 4096x4096 (q/o), 4096x14336 (down),
14336x4096 (gate/up), 1024x4096 (k/v) at M in {1, 16, 512, 2048, 8192} tokens, r = 16.

Copy bandwidth (device-to-device copy of 1 GiB) and a bf16 8192^3 matmul are
measured first in the same run; every row reports time (do_bench median),
TFLOP/s, GB/s (minimum bytes moved), % of those two peaks, the ratio to the
group's baseline, and the max relative error against it. Results:
``results.csv`` and ``results.md`` in --out, with device, versions and commit.
Needs a CUDA GPU; without one it exits with status 2 and says so.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SHAPES = [(4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096)]  # (N, K) = (out, in) features
TOKENS = [512, 2048, 1, 16, 8192]  # most informative first, in case the time budget cuts the sweep
RANK = 16
DEVICE = "cuda"
SCALING = 2.0


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "not installed"


def _git_commit() -> str:
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return (sha or "unknown") + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError) as e:
        return f"unknown ({e})"


def environment() -> dict[str, str]:
    props = torch.cuda.get_device_properties(0)
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                  f"{props.total_memory / 2**30:.0f} GiB)",
        "commit": _git_commit(),
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
        "triton": _version("triton"),
        "bitsandbytes": _version("bitsandbytes"),
        "lorakern": _version("lorakern"),
    }


class Rotating:
    """Call ``fn(*inputs[i])`` cycling over copies of the inputs, so that together they
    exceed L2 (do_bench also clears L2 between calls; rotation keeps the input reads
    cold for back-to-back launches inside one call, e.g. the three GEMMs of PEFT)."""

    def __init__(self, fn, make_inputs, bytes_per_set: int, l2_bytes: int, max_sets: int = 8):
        sets = max(1, min(max_sets, -(-2 * l2_bytes // max(bytes_per_set, 1))))
        self.inputs = [make_inputs(i) for i in range(sets)]
        self.fn, self.i = fn, 0

    def __call__(self):
        args = self.inputs[self.i]
        self.i = (self.i + 1) % len(self.inputs)
        return self.fn(*args)


def bench(fn) -> float:
    """Median milliseconds (triton.testing.do_bench)."""
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median")


def measure_peaks() -> tuple[float, float]:
    """(copy GB/s, bf16 matmul TFLOP/s) of this device, measured now."""
    n = 2**29  # 1 GiB of bf16
    src = torch.empty(n, dtype=torch.bfloat16, device=DEVICE).normal_()
    dst = torch.empty_like(src)
    ms = bench(lambda: dst.copy_(src))
    copy_gbps = 2 * src.numel() * 2 / ms / 1e6
    del src, dst
    a = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEVICE)
    b = torch.randn(8192, 8192, dtype=torch.bfloat16, device=DEVICE)
    ms = bench(lambda: a @ b)
    return copy_gbps, 2 * 8192**3 / ms / 1e9


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30)).item()


class Backends:
    """The implementations available on this machine, each with the reason when missing."""

    def __init__(self):
        from lorakern.kernels import triton as tk
        from lorakern.ops import _registry

        self.triton = tk
        self.cuda, self.cuda_reason = _registry.load("cuda")
        self.bnb, self.bnb_reason = None, ""
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional as bnbf

            w = torch.randn(128, 128, dtype=torch.bfloat16, device=DEVICE)
            qw, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            bnb.matmul_4bit(torch.randn(2, 128, dtype=torch.bfloat16, device=DEVICE), qw.t(), quant_state=state)
            self.bnb, self.bnbf = bnb, bnbf
        except Exception as e:  # optional baseline; the reason goes into the report
            self.bnb_reason = f"{type(e).__name__}: {e}"

    def cuda_runs(self, op: str, *args) -> bool:
        """Whether the CUDA backend implements ``op`` and accepts these arguments."""
        if self.cuda is None or not hasattr(self.cuda, op):
            return False
        supports = getattr(self.cuda, "supports", None)
        return supports is None or supports(op, *args) is None

    def notes(self) -> list[str]:
        out = []
        if self.cuda is None:
            out.append(f"CUDA backend not measured: {self.cuda_reason}")
        if self.bnb is None:
            out.append(f"bitsandbytes not measured: {self.bnb_reason}")
        return out


class Sweep:
    def __init__(self, peaks: tuple[float, float], l2_bytes: int):
        self.copy_gbps, self.peak_tflops = peaks
        self.l2 = l2_bytes
        self.rows: list[dict] = []

    def add(self, group, impl, m, n, k, ms, flops, nbytes, baseline_ms=None, err=None):
        tflops = flops / ms / 1e9
        gbps = nbytes / ms / 1e6
        row = dict(group=group, impl=impl, M=m, N=n, K=k, r=RANK, time_us=round(ms * 1e3, 2), tflops=round(tflops, 2),
                   gbps=round(gbps, 1), pct_matmul_peak=round(100 * tflops / self.peak_tflops, 1),
                   pct_copy_bw=round(100 * gbps / self.copy_gbps, 1),
                   speedup_vs_baseline=round(baseline_ms / ms, 3) if baseline_ms else "",
                   max_rel_err=f"{err:.2e}" if err is not None else "")
        self.rows.append(row)
        print(" ".join(f"{key}={value}" for key, value in row.items()), flush=True)
        return ms


def run_point(sweep: Sweep, be: Backends, n: int, k: int, m: int, with_backward: bool) -> None:
    from lorakern.formats import nf4

    tk = be.triton
    bf16 = dict(dtype=torch.bfloat16, device=DEVICE)
    w = torch.randn(n, k, **bf16) * k**-0.5
    q = nf4.quantize(w, 64, True)
    lora_a = torch.randn(RANK, k, **bf16) * k**-0.5
    lora_b = torch.randn(n, RANK, **bf16) * RANK**-0.5
    seed = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    xbytes, ybytes, wbytes, qbytes = 2 * m * k, 2 * m * n, 2 * n * k, q.nbytes()
    flops = 2 * m * n * k
    lora_flops = 2 * m * RANK * (n + k)
    xs = lambda i: (torch.randn(m, k, **bf16),)  # noqa: E731

    def peft(x, w_):
        return x @ w_.t() + SCALING * ((x @ lora_a.t()) @ lora_b.t())

    # ---- forward
    group = "fwd"
    ref_y = peft(xs(0)[0], w)
    base = sweep.add(group, "torch_dense", m, n, k, bench(Rotating(lambda x: x @ w.t(), xs, xbytes, sweep.l2)),
                     flops, xbytes + wbytes + ybytes)
    peft_ms = sweep.add(group, "peft_unfused", m, n, k, bench(Rotating(lambda x: peft(x, w), xs, xbytes, sweep.l2)),
                        flops + lora_flops, xbytes + wbytes + ybytes, base)
    x0 = xs(0)[0]
    err = _rel_err(tk.lora_linear_fwd(x0, w, None, lora_a, lora_b, SCALING, 0.0, seed)[0], peft(x0, w))
    sweep.add(group, "lorakern_triton_lora", m, n, k,
              bench(Rotating(lambda x: tk.lora_linear_fwd(x, w, None, lora_a, lora_b, SCALING, 0.0, seed), xs, xbytes,
                             sweep.l2)), flops + lora_flops, xbytes + wbytes + ybytes, peft_ms, err)
    del ref_y

    group = "qlora_fwd"
    wq = nf4.dequantize(q, torch.bfloat16)
    want = peft(x0, wq)
    deq_ms = sweep.add(group, "dequant_cublas", m, n, k,
                       bench(Rotating(lambda x: peft(x, tk.nf4_dequantize(q, torch.bfloat16)), xs, xbytes, sweep.l2)),
                       flops + lora_flops, xbytes + qbytes + ybytes)
    if be.bnb is not None:
        qw, state = be.bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)

        def bnb_fwd(x):
            return be.bnb.matmul_4bit(x, qw.t(), quant_state=state) + SCALING * ((x @ lora_a.t()) @ lora_b.t())

        sweep.add(group, "bitsandbytes", m, n, k, bench(Rotating(bnb_fwd, xs, xbytes, sweep.l2)), flops + lora_flops,
                  xbytes + qbytes + ybytes, deq_ms, _rel_err(bnb_fwd(x0), want))
    err = _rel_err(tk.qlora_linear_fwd(x0, q, None, lora_a, lora_b, SCALING, 0.0, seed)[0], want)
    sweep.add(group, "lorakern_triton_qlora" + ("_gemv" if m <= 16 else ""), m, n, k,
              bench(Rotating(lambda x: tk.qlora_linear_fwd(x, q, None, lora_a, lora_b, SCALING, 0.0, seed), xs, xbytes,
                             sweep.l2)), flops + lora_flops, xbytes + qbytes + ybytes, deq_ms, err)
    if m <= 16 and be.cuda_runs("qlora_linear_fwd", x0, q, None, lora_a, lora_b, SCALING, 0.0, seed):
        cu = be.cuda
        err = _rel_err(cu.qlora_linear_fwd(x0, q, None, lora_a, lora_b, SCALING, 0.0, seed)[0], want)
        sweep.add(group, "lorakern_cuda_qlora_gemv", m, n, k,
                  bench(Rotating(lambda x: cu.qlora_linear_fwd(x, q, None, lora_a, lora_b, SCALING, 0.0, seed), xs,
                                 xbytes, sweep.l2)), flops + lora_flops, xbytes + qbytes + ybytes, deq_ms, err)

    if not with_backward:
        return
    # ---- backward (dx, dA, dB; the base weight frozen)
    dys = lambda i: (torch.randn(m, n, **bf16), torch.randn(m, k, **bf16))  # noqa: E731
    dy0, xb0 = dys(0)
    xa0 = xb0 @ lora_a.t()

    def peft_bwd(dy, x, w_):
        g = dy @ lora_b
        dx = dy @ w_ + SCALING * (g @ lora_a)
        return dx, SCALING * (g.t() @ x), SCALING * (dy.t() @ (x @ lora_a.t()))

    bwd_flops = 2 * m * n * k + 3 * lora_flops
    bwd_bytes = 2 * m * n + 2 * 2 * m * k
    group = "bwd"
    peft_ms = sweep.add(group, "peft_unfused", m, n, k, bench(Rotating(lambda dy, x: peft_bwd(dy, x, w), dys,
                                                                       bwd_bytes, sweep.l2)),
                        bwd_flops, bwd_bytes + wbytes)
    want = peft_bwd(dy0, xb0, w)[0]
    err = _rel_err(tk.lora_linear_bwd(dy0, xb0, xa0, w, lora_a, lora_b, SCALING, 0.0, seed, True, False)[0], want)
    sweep.add(group, "lorakern_triton_lora", m, n, k,
              bench(Rotating(lambda dy, x: tk.lora_linear_bwd(dy, x, xa0, w, lora_a, lora_b, SCALING, 0.0, seed, True,
                                                              False), dys, bwd_bytes, sweep.l2)),
              bwd_flops, bwd_bytes + wbytes, peft_ms, err)
    group = "qlora_bwd"
    deq_ms = sweep.add(group, "dequant_cublas", m, n, k,
                       bench(Rotating(lambda dy, x: peft_bwd(dy, x, tk.nf4_dequantize(q, torch.bfloat16)), dys,
                                      bwd_bytes, sweep.l2)), bwd_flops, bwd_bytes + qbytes)
    want = peft_bwd(dy0, xb0, wq)[0]
    err = _rel_err(tk.qlora_linear_bwd(dy0, xb0, xa0, q, lora_a, lora_b, SCALING, 0.0, seed, True)[0], want)
    sweep.add(group, "lorakern_triton_qlora", m, n, k,
              bench(Rotating(lambda dy, x: tk.qlora_linear_bwd(dy, x, xa0, q, lora_a, lora_b, SCALING, 0.0, seed, True),
                             dys, bwd_bytes, sweep.l2)), bwd_flops, bwd_bytes + qbytes, deq_ms, err)


def run_dequant(sweep: Sweep, be: Backends, n: int, k: int) -> None:
    from lorakern.formats import nf4

    q = nf4.quantize(torch.randn(n, k, dtype=torch.bfloat16, device=DEVICE), 64, True)
    nbytes = q.nbytes() + 2 * n * k
    want = nf4.dequantize(q, torch.bfloat16)
    base = sweep.add("dequant", "torch_reference", 0, n, k, bench(lambda: nf4.dequantize(q, torch.bfloat16)), 0, nbytes)
    sweep.add("dequant", "lorakern_triton", 0, n, k, bench(lambda: be.triton.nf4_dequantize(q, torch.bfloat16)), 0, nbytes,
              base, _rel_err(be.triton.nf4_dequantize(q, torch.bfloat16), want))
    if be.cuda_runs("nf4_dequantize", q, torch.bfloat16):
        sweep.add("dequant", "lorakern_cuda", 0, n, k, bench(lambda: be.cuda.nf4_dequantize(q, torch.bfloat16)), 0, nbytes,
                  base, _rel_err(be.cuda.nf4_dequantize(q, torch.bfloat16), want))
    if be.bnb is not None:
        qw, state = be.bnbf.quantize_4bit(want, blocksize=64, quant_type="nf4", compress_statistics=True)
        sweep.add("dequant", "bitsandbytes", 0, n, k, bench(lambda: be.bnbf.dequantize_4bit(qw, state)), 0, nbytes, base)


def write_results(out: Path, env: dict, peaks: tuple[float, float], rows: list[dict], notes: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = list(rows[0]) if rows else ["group"]
    with open(out / "results.csv", "w", newline="") as f:
        for key, value in env.items():
            f.write(f"# {key}: {value}\n")
        f.write(f"# copy_gbps: {peaks[0]:.1f}\n# bf16_matmul_tflops: {peaks[1]:.1f}\n")
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# lorakern GPU benchmarks", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += [f"- measured copy bandwidth: {peaks[0]:.0f} GB/s; bf16 8192^3 matmul: {peaks[1]:.0f} TFLOP/s", ""]
    lines += [f"- note: {n_}" for n_ in notes]
    lines += ["", "speedup_vs_baseline: fwd vs peft_unfused (torch_dense row vs nothing), qlora_* vs dequant_cublas, "
              "bwd vs peft_unfused, dequant vs torch_reference. Times are do_bench medians.", ""]
    lines.append("| " + " | ".join(fields) + " |")
    lines.append("|" + "---|" * len(fields))
    lines += ["| " + " | ".join(str(r[f_]) for f_ in fields) + " |" for r in rows]
    (out / "results.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="lorakern GPU benchmarks (triton.testing.do_bench)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" /
                        f"gpu-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M}")
    parser.add_argument("--time-budget", type=float, default=240.0,
                        help="seconds; the sweep stops starting new points after this (results so far are written)")
    parser.add_argument("--quick", action="store_true", help="one shape (4096x4096) and M in {1, 2048}")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); CPU benchmarks are the "
              "pytest-benchmark files in benchmarks/.", file=sys.stderr)
        return 2
    start = time.monotonic()
    torch.manual_seed(0)
    env = environment()
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    peaks = measure_peaks()
    print(f"copy {peaks[0]:.0f} GB/s, bf16 matmul {peaks[1]:.0f} TFLOP/s", flush=True)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20)
    sweep = Sweep(peaks, l2)
    be = Backends()
    notes = be.notes()
    shapes = SHAPES[:1] if args.quick else SHAPES
    tokens = [2048, 1] if args.quick else TOKENS
    for n, k in shapes:
        run_dequant(sweep, be, n, k)
    points = [(n, k, m) for m in tokens for (n, k) in shapes]
    done = 0
    for n, k, m in points:
        if time.monotonic() - start > args.time_budget:
            notes.append(f"time budget {args.time_budget:.0f}s reached: {len(points) - done} of {len(points)} "
                         f"(N, K, M) points not measured")
            break
        run_point(sweep, be, n, k, m, with_backward=m >= 512)
        done += 1
        write_results(args.out, env, peaks, sweep.rows, notes)  # keep partial results if a later point hangs
        torch.cuda.empty_cache()
    write_results(args.out, env, peaks, sweep.rows, notes)
    print(f"wrote {args.out / 'results.csv'} and results.md in {time.monotonic() - start:.0f}s")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    raise SystemExit(main())
