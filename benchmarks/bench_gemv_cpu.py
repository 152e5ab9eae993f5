"""Small-M NF4 forward on the CPU (decode, batched decode): lorakern against bitsandbytes and torch dense.

    OMP_NUM_THREADS=1 python benchmarks/bench_gemv_cpu.py [--out benchmarks/results/cpu-gemv.md]

For each dtype (bf16, fp32) and M in {1, 2, 4, 8, 16}, at 4096 x 4096 (one thread,
blocksize 64, double quantization): ``lorakern.ops.nf4_matmul`` against bitsandbytes'
``Linear4bit`` in eval mode (its CPU fast path, weight repacked on the first call;
it rounds fp32 x to bf16) and a dense ``x @ W.T`` in the same dtype. The three are
timed in interleaved rounds (each round: every implementation, 20 calls), and the best
round of each is reported, so a noisy neighbour on a shared VM slows all three alike
instead of one. Rows with a different weight each call are not needed here: at M >= 2
the kernels are compute-bound, and M = 1 is in ``bench_cpu.py`` (weights from DRAM).
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import time

import torch


def _best_round(fns: dict, rounds: int, calls: int) -> dict:
    best = {name: float("inf") for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for _ in range(calls):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t) / calls)
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", default=None, help="write a markdown table here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from lorakern import ops

    try:
        import bitsandbytes as bnb
    except ImportError:
        bnb = None
    n = k = 4096
    g = torch.Generator().manual_seed(0)
    lines = ["# NF4 forward at small M, CPU (4096 x 4096, one thread)", "",
             "Best of interleaved rounds (see `benchmarks/bench_gemv_cpu.py`); `vs lorakern` = baseline time / "
             "lorakern time (above 1: lorakern is faster).", ""]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    versions = f"torch {torch.__version__}" + (f", bitsandbytes {bnb.__version__}" if bnb else "")
    lines += [f"- commit {commit}; {versions}; {platform.machine()}, {_cpu_name()}", "",
              "| dtype | M | lorakern ms | bitsandbytes Linear4bit ms | vs lorakern | torch dense ms | vs lorakern |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for dtype in (torch.bfloat16, torch.float32):
        w = (torch.randn(n, k, generator=g) * 0.02).to(dtype)
        q = ops.nf4_quantize(w)
        layer = None
        if bnb is not None:
            layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4")
            layer.weight = bnb.nn.Params4bit(w, requires_grad=False, quant_type="nf4")
            layer = layer.to("cpu").eval()
        for m in (1, 2, 4, 8, 16):
            x = torch.randn(m, k, generator=g).to(dtype)
            fns = {"lorakern": lambda: ops.nf4_matmul(x, q), "dense": lambda: x @ w.t()}
            if layer is not None:
                fns["bnb"] = lambda: layer(x)
            with torch.no_grad():
                best = _best_round(fns, args.rounds, args.calls)
            ours = best["lorakern"]
            b = best.get("bnb")
            bnb_cells = f"{b * 1e3:.3f} | {b / ours:.2f}x" if b is not None else "- | -"
            lines.append(f"| {str(dtype).removeprefix('torch.')} | {m} | {ours * 1e3:.3f} | {bnb_cells} | "
                         f"{best['dense'] * 1e3:.3f} | {best['dense'] / ours:.2f}x |")
            print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
    else:
        print(text)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
