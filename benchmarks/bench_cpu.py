"""CPU benchmarks: lorakern's C++ backend against torch dense, bitsandbytes and PEFT, in one run.

    python -m pytest benchmarks/bench_cpu.py --benchmark-enable -q

On a shared machine, time CPU seconds of one thread instead of wall time (other
processes' load then changes the numbers far less):

    OMP_NUM_THREADS=1 python -m pytest benchmarks/bench_cpu.py --benchmark-enable \
        --benchmark-timer=time.process_time -q

Every group times lorakern and its baselines side by side on the same inputs and
writes the medians, ratios, GB/s and % of the copy bandwidth measured in the same
run to benchmarks/results/cpu.md (and cpu.json). Bandwidth-bound cases rotate
through several weights whose total exceeds the 32 MiB L3, so the numbers are
DRAM numbers, not cache numbers.

The ``overhead`` groups time one layer call at decode-sized shapes, where Python
and dispatch, not the kernels, set the time; they go to results/cpu-overhead.md
(and .json), so they can be rerun alone (``-k overhead``) without clobbering cpu.md.
"""

from __future__ import annotations

import json
import math
import os
import platform
import subprocess
from importlib import metadata

import pytest
import torch

import lorakern.ops as ops
from lorakern.kernels import cpu as cpu_backend

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")

if cpu_backend._C is None:
    pytest.skip("lorakern._C is not built", allow_module_level=True)

HERE = os.path.dirname(os.path.abspath(__file__))
ROTATE_BYTES = 96 * 2**20  # 3x the L3: each timed call reads weights from DRAM
RANK, ALPHA = 16, 32
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DECODE_SHAPES = [(1, 4096, 4096), (16, 4096, 4096), (1, 576, 1536)]
TRAIN_SHAPES = [(512, 4096, 4096), (2048, 576, 1536)]
WEIGHT_SHAPES = [(4096, 4096), (1536, 576)]

RESULTS: list[dict] = []


def rounds_for(flops_or_bytes: float, big: float, small_rounds: int = 40, big_rounds: int = 5) -> int:
    """Fewer rounds for the big cases so the whole run stays under ~10 minutes on 2 cores."""
    return big_rounds if flops_or_bytes >= big else small_rounds


def run(benchmark, fn, group: str, impl: str, rounds: int, nbytes: float = 0.0, flops: float = 0.0,
        iterations: int = 1):
    benchmark.group = group
    benchmark.extra_info.update(impl=impl)
    benchmark.pedantic(fn, rounds=rounds, iterations=iterations, warmup_rounds=1)
    if benchmark.disabled:
        return
    RESULTS.append(dict(group=group, impl=impl, median_s=benchmark.stats.stats.median, rounds=rounds, bytes=nbytes,
                        flops=flops))


class Rotation:
    """Cycles through ``items`` on each call (several weights, so the working set exceeds L3)."""

    def __init__(self, items):
        self.items, self.i = items, 0

    def next(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def n_copies(bytes_each: int) -> int:
    return max(1, min(64, math.ceil(ROTATE_BYTES / bytes_each)))


def bnb_quantize(w: torch.Tensor):
    return bnb.functional.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)


def _bnb_linear4bit(weight: torch.Tensor, dtype: torch.dtype) -> torch.nn.Module:
    """A bitsandbytes NF4 layer (double quant, blocksize 64) holding ``weight`` [N, K], computing in ``dtype``."""
    n, k = weight.shape
    layer = bnb.nn.Linear4bit(k, n, bias=False, compute_dtype=dtype, quant_type="nf4", compress_statistics=True)
    layer.weight = bnb.nn.Params4bit(weight.detach().clone(), requires_grad=False, quant_type="nf4", blocksize=64,
                                     compress_statistics=True)
    return layer.to("cpu")


# -------------------------------------------------------------------------- copy bandwidth


def test_copy_bandwidth(benchmark):
    src = torch.randn(64 * 2**20)  # 256 MiB
    dst = torch.empty_like(src)
    run(benchmark, lambda: dst.copy_(src), "copy 256 MiB fp32", "torch copy_", 10, nbytes=2 * src.numel() * 4)


# ------------------------------------------------------------------------------ dequantize


@pytest.mark.parametrize("shape", WEIGHT_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("impl", ["lorakern", "lorakern, preallocated out", "bitsandbytes"])
def test_dequantize(benchmark, shape, dname, impl):
    """Both library calls allocate their output, and on this VM first-touch page faults of
    a fresh 32-64 MiB tensor can cost more than the decode; the preallocated row times
    the kernel alone (the C++ call the panel matmuls use)."""
    dtype = DTYPES[dname]
    n, k = shape
    numel = n * k
    copies = n_copies(numel * (dtype.itemsize + 1))
    group = f"dequantize {n}x{k} -> {dname}"
    nbytes = numel // 2 + numel // 64 + numel * dtype.itemsize
    weights = [torch.randn(n, k, dtype=dtype) for _ in range(copies)]
    if impl == "lorakern":
        rot = Rotation([ops.nf4_quantize(w) for w in weights])
        fn = lambda: ops.nf4_dequantize(rot.next(), dtype)
    elif impl == "lorakern, preallocated out":
        rot = Rotation([(cpu_backend._view(q), q) for q in (ops.nf4_quantize(w) for w in weights)])
        out = torch.empty(numel, dtype=dtype)
        code = cpu_backend._DTYPE_CODE[dtype]
        fn = lambda: cpu_backend._C.nf4_dequantize_2d(rot.next()[0], 0, 1, 0, numel, numel, out.data_ptr(), numel, code,
                                                      cpu_backend.isa(), numel * dtype.itemsize > 2**21)
    else:
        rot = Rotation([bnb_quantize(w) for w in weights])
        fn = lambda: bnb.functional.dequantize_4bit(*rot.next())
    del weights
    run(benchmark, fn, group, impl, rounds_for(numel, 2**24, 30, 15), nbytes=nbytes)


# ------------------------------------------------------------------ NF4 forward (decode)


@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("impl", ["lorakern", "bitsandbytes Linear4bit", "bitsandbytes matmul_4bit", "torch dense"])
def test_nf4_forward(benchmark, shape, dname, impl):
    """y = x W^T with a frozen NF4 weight (decode-sized M); dense = the unquantized GEMV for reference.

    bitsandbytes has two CPU paths: ``Linear4bit`` in eval mode repacks its weight on the
    first call (rows interleaved, absmax decoded once, fp32 x rounded to bf16) for an
    AVX512_BF16 kernel; the function ``matmul_4bit`` on an unpacked weight dequantizes
    and multiplies. The module row is the one to compare with.
    """
    m, k, n = shape
    dtype = DTYPES[dname]
    x = torch.randn(m, k, dtype=dtype)
    io = (m * k + m * n) * dtype.itemsize
    group = f"nf4 forward {m}x{k}x{n} {dname}"
    with torch.no_grad():
        if impl == "torch dense":
            rot = Rotation([torch.randn(n, k, dtype=dtype) for _ in range(n_copies(n * k * dtype.itemsize))])
            fn = lambda: torch.nn.functional.linear(x, rot.next())
            nbytes = n * k * dtype.itemsize + io
        elif impl == "lorakern":
            rot = Rotation([ops.nf4_quantize(torch.randn(n, k)) for _ in range(n_copies(n * k // 2))])
            fn = lambda: ops.nf4_matmul(x, rot.next())
            nbytes = rot.items[0].nbytes() + io
        elif impl == "bitsandbytes Linear4bit":
            # eval mode: the serving path (see the docstring)
            rot = Rotation([_bnb_linear4bit(torch.randn(n, k), dtype).eval() for _ in range(n_copies(n * k // 2))])
            for layer in rot.items:
                layer(x)  # the first eval call repacks the weight
            fn = lambda: rot.next()(x)
            nbytes = n * k // 2 + n * k // 64 + io
        else:
            rot = Rotation([bnb_quantize(torch.randn(n, k, dtype=dtype)) for _ in range(n_copies(n * k // 2))])
            fn = lambda: bnb.matmul_4bit(x, rot.items[rot.i][0].t(), rot.next()[1])
            nbytes = n * k // 2 + n * k // 64 + io
    run(benchmark, fn, group, impl, rounds_for(m * n * k, 2**26, 40, 15), nbytes=nbytes)


# ------------------------------------------------------------------- training fwd + bwd


class _Wrap(torch.nn.Module):
    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, x):
        return self.lin(x)


def _peft_model(base: torch.nn.Module, dtype):
    cfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["lin"], lora_dropout=0.0)
    model = peft.get_peft_model(_Wrap(base), cfg)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.to(dtype)  # adapters in the compute dtype, as lorakern keeps them
    return model


def _lora_params(n, k, dtype):
    a = (torch.randn(RANK, k) / math.sqrt(k)).to(dtype).requires_grad_()
    b = (torch.randn(n, RANK) * 0.01).to(dtype).requires_grad_()
    return a, b


@pytest.mark.parametrize("shape", TRAIN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("impl", ["lorakern", "torch dense frozen", "peft on bnb Linear4bit"])
def test_qlora_train_step(benchmark, shape, dname, impl):
    """QLoRA layer forward + backward (dx, dA, dB) vs a frozen dense layer (dx only) and PEFT + bitsandbytes."""
    m, k, n = shape
    dtype = DTYPES[dname]
    torch.manual_seed(0)
    w = torch.randn(n, k, dtype=dtype) * 0.02
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, dtype=dtype)
    group = f"qlora fwd+bwd r={RANK} {m}x{k}x{n} {dname}"
    if impl == "lorakern":
        q = ops.nf4_quantize(w)
        a, b = _lora_params(n, k, dtype)
        seed = torch.zeros(1, dtype=torch.int64)
        fn = lambda: torch.autograd.grad(ops.qlora_linear(x, q, None, a, b, ALPHA / RANK, 0.0, seed), [x, a, b], dy)
    elif impl == "torch dense frozen":
        fn = lambda: torch.autograd.grad(torch.nn.functional.linear(x, w), [x], dy)
    else:
        model = _peft_model(_bnb_linear4bit(w, dtype), dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        fn = lambda: torch.autograd.grad(model(x), [x, *params], dy)
    run(benchmark, fn, group, impl, rounds_for(m * n * k, 2**31, 10, 4), flops=4.0 * m * n * k)


@pytest.mark.parametrize("shape", TRAIN_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("impl", ["lorakern", "torch dense frozen", "peft on nn.Linear"])
def test_lora_train_step(benchmark, shape, dname, impl):
    """LoRA layer forward + backward on a dense frozen base vs the frozen layer alone and PEFT."""
    m, k, n = shape
    dtype = DTYPES[dname]
    torch.manual_seed(0)
    w = torch.randn(n, k, dtype=dtype) * 0.02
    x = torch.randn(m, k, dtype=dtype, requires_grad=True)
    dy = torch.randn(m, n, dtype=dtype)
    group = f"lora fwd+bwd r={RANK} {m}x{k}x{n} {dname}"
    if impl == "lorakern":
        a, b = _lora_params(n, k, dtype)
        seed = torch.zeros(1, dtype=torch.int64)
        fn = lambda: torch.autograd.grad(ops.lora_linear(x, w, None, a, b, ALPHA / RANK, 0.0, seed), [x, a, b], dy)
    elif impl == "torch dense frozen":
        fn = lambda: torch.autograd.grad(torch.nn.functional.linear(x, w), [x], dy)
    else:
        lin = torch.nn.Linear(k, n, bias=False, dtype=dtype)
        lin.weight.data.copy_(w)
        model = _peft_model(lin, dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        fn = lambda: torch.autograd.grad(model(x), [x, *params], dy)
    run(benchmark, fn, group, impl, rounds_for(m * n * k, 2**31, 10, 4), flops=4.0 * m * n * k)


# ---------------------------------------------------------------------------- LoRA dropout


@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("impl", ["lorakern", "lorakern scalar path", "torch dropout (PEFT)"])
def test_lora_dropout(benchmark, monkeypatch, dname, impl):
    """drop(x) of a LoRA input [M, K] at p = 0.05: lorakern's hashed mask (the kernel the forward and,
    twice, the backward run) vs its scalar fallback and torch.nn.functional.dropout (a stored Bernoulli
    mask, what PEFT's lora_dropout runs)."""
    m, k, _ = TRAIN_SHAPES[1]
    dtype = DTYPES[dname]
    x = torch.randn(m, k, dtype=dtype)
    group = f"lora dropout p=0.05 {m}x{k} {dname}"
    if impl == "torch dropout (PEFT)":
        fn = lambda: torch.nn.functional.dropout(x, 0.05, training=True)
    else:
        if impl == "lorakern scalar path":
            monkeypatch.setenv(cpu_backend.ISA_ENV_VAR, "scalar")
        params = cpu_backend._dropout_params(torch.tensor([1234], dtype=torch.int64), 0.05)
        fn = lambda: cpu_backend._dropped(x, params)
    run(benchmark, fn, group, impl, 100, nbytes=2 * x.numel() * dtype.itemsize)


# --------------------------------------------------------------------------- call overhead

# (M, K, N): a layer small enough that the kernels take a few us and the Python around them
# is the time, and SmolLM2-135M's MLP up-projection at decode (M = 1), where the same
# Python runs once per layer and token.
OVERHEAD_SHAPES = [(1, 64, 64), (1, 576, 1536)]
OVERHEAD_IMPLS = {
    "lora": ["lorakern", "torch nn.Linear", "peft on nn.Linear"],
    "qlora": ["lorakern", "torch nn.Linear", "bitsandbytes Linear4bit", "peft on bnb Linear4bit"],
}


def _overhead_layer(kind: str, impl: str, k: int, n: int, dtype: torch.dtype) -> torch.nn.Module:
    """One layer as a model calls it: the module itself (PEFT's LoRA layer, not the PeftModel around it)."""
    from lorakern.nn import LoRALinear, QLoRALinear

    torch.manual_seed(0)
    dense = torch.nn.Linear(k, n, bias=False, dtype=dtype)
    if impl == "torch nn.Linear":
        return dense  # trained in full: dx, dW
    if impl == "lorakern":
        layer = (LoRALinear if kind == "lora" else QLoRALinear).from_linear(dense, r=RANK, alpha=ALPHA)
        torch.nn.init.normal_(layer.lora_B)
        return layer
    base = dense
    if kind == "qlora":
        base = _bnb_linear4bit(dense.weight, dtype)
        if impl == "bitsandbytes Linear4bit":
            return base
    for p in dense.parameters():
        p.requires_grad_(False)
    return _peft_model(base, dtype).base_model.model.lin


@pytest.mark.parametrize("shape", OVERHEAD_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dname", list(DTYPES))
@pytest.mark.parametrize("mode", ["fwd no_grad", "fwd+bwd"])
@pytest.mark.parametrize("kind, impl", [(kind, impl) for kind, impls in OVERHEAD_IMPLS.items() for impl in impls])
def test_layer_call_overhead(benchmark, shape, dname, mode, kind, impl):
    """One LoRA / QLoRA layer call at decode size, module to module: lorakern's LoRALinear / QLoRALinear
    against nn.Linear (the floor a LoRA layer adds to), PEFT's LoRA layer and bitsandbytes' Linear4bit.

    ``fwd no_grad`` is a generation step; ``fwd+bwd`` returns the gradients of x and of every trained
    parameter (LoRA A and B; nn.Linear's weight; x alone for the frozen Linear4bit)."""
    m, k, n = shape
    dtype = DTYPES[dname]
    layer = _overhead_layer(kind, impl, k, n, dtype)
    x = torch.randn(1, m, k, dtype=dtype)  # [batch, tokens, K], as a model passes it
    group = f"overhead {kind} {mode} r={RANK} {m}x{k}x{n} {dname}"
    if mode == "fwd no_grad":
        layer.eval()

        def fn():
            with torch.no_grad():
                return layer(x)
    else:
        layer.train()
        x.requires_grad_()
        dy = torch.randn(1, m, n, dtype=dtype)
        params = [x] + [p for p in layer.parameters() if p.requires_grad]
        fn = lambda: torch.autograd.grad(layer(x), params, dy)
    iterations = 100 if k * n <= 2**16 else 10
    run(benchmark, fn, group, impl, 30, iterations=iterations)


# ------------------------------------------------------------------------------- report


def _machine() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        model = info.get("Model name", "?").strip()
        cores = info.get("CPU(s)", "?").strip()
        l3 = info.get("L3 cache", "?").strip()
        return f"{model}, {cores} CPUs, L3 {l3}, {torch.get_num_threads()} torch threads"
    except (OSError, subprocess.CalledProcessError):
        return platform.processor()


def _commit() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
        # the kernels, and the Python every call runs through on its way to them
        paths = ["csrc/cpu", "lorakern/kernels/cpu.py", "lorakern/ops", "lorakern/nn", "lorakern/formats/nf4.py"]
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], capture_output=True, text=True,
                               cwd=os.path.dirname(HERE)).stdout.strip()
        return rev + (" (sources modified)" if dirty else "")
    except OSError:
        return "?"


def _version(pkg: str) -> str:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return "?"


def _time(results: list[dict], group: str, impl: str) -> float | None:
    return next((r["median_s"] for r in results if r["group"] == group and r["impl"] == impl), None)


def target_lines(results: list[dict], copy_bw: float) -> list[str]:
    """Where the run lands against the project's CPU targets (bf16, 4096 x 4096)."""
    out = []
    g = "dequantize 4096x4096 -> bf16"
    t, tk, tb = _time(results, g, "lorakern"), _time(results, g, "lorakern, preallocated out"), _time(results, g, "bitsandbytes")
    if t and tk and tb:
        pct = 100 * 2.5 * 4096 * 4096 / tk / copy_bw
        out.append(f"- dequantize 4096x4096 -> bf16 (target >= 70% of copy bandwidth, ~4x bitsandbytes): kernel "
                   f"{pct:.0f}% of copy; {tb / t:.2f}x bitsandbytes with both allocating their output")
    g = "nf4 forward 1x4096x4096 bf16"
    t, tb = _time(results, g, "lorakern"), _time(results, g, "bitsandbytes Linear4bit")
    if t and tb:
        r = next(r for r in results if r["group"] == g and r["impl"] == "lorakern")
        out.append(f"- M = 1 NF4 forward 4096x4096 bf16 (target >= 1.3x bitsandbytes, >= 80% of read bandwidth): "
                   f"{tb / t:.2f}x bitsandbytes Linear4bit (eval), {100 * r['bytes'] / t / copy_bw:.0f}% of copy bandwidth")
    for kind, impl_peft, goal in (("qlora", "peft on bnb Linear4bit", "1.15"), ("lora", "peft on nn.Linear", "1.05")):
        g = f"{kind} fwd+bwd r={RANK} 512x4096x4096 bf16"
        t, td, tp = _time(results, g, "lorakern"), _time(results, g, "torch dense frozen"), _time(results, g, impl_peft)
        if t and td and tp:
            out.append(f"- {'LoRA' if kind == 'lora' else 'QLoRA'} fwd+bwd r=16 512x4096x4096 bf16 (target <= {goal}x "
                       f"torch dense frozen): {t / td:.2f}x dense; {impl_peft} {tp / td:.2f}x dense")
    return out


def write_report(results: list[dict], path_md: str, path_json: str, timer: str, commit: str | None = None) -> None:
    commit = commit or _commit()
    copy = [r for r in results if r["impl"] == "torch copy_"]
    copy_bw = copy[0]["bytes"] / copy[0]["median_s"] if copy else float("nan")
    header = [
        "# lorakern CPU benchmarks",
        "",
        "Generated by `python -m pytest benchmarks/bench_cpu.py --benchmark-enable`. Median time per call (timer "
        "below: wall clock by default, or CPU seconds of the process); "
        "`vs lorakern` = that row's time / lorakern's time (above 1: lorakern is faster). GB/s counts the bytes a "
        "call must move (4-bit codes + absmax + activations + output); % copy is against the torch copy_ bandwidth "
        "measured in the same run. Training rows: GFLOP/s counts the two base GEMMs (4 M N K). Overhead rows: one "
        "layer call, module to module, at decode size (M = 1), where Python and dispatch set the time.",
        "",
        f"- machine: {_machine()}",
        f"- versions: torch {torch.__version__}, bitsandbytes {_version('bitsandbytes')}, peft {_version('peft')}, "
        f"lorakern {_version('lorakern')}",
        f"- git commit: {commit}",
        f"- timer: {timer}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}",
        *([f"- copy bandwidth (read + write): {copy_bw / 1e9:.1f} GB/s"] if copy else []),
        "",
        *(["Targets:", "", *targets, ""] if (targets := target_lines(results, copy_bw)) else []),
        "| group | impl | median ms | vs lorakern | GB/s | % copy | GFLOP/s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    rows = []
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(r["group"], []).append(r)
    for group, rs in groups.items():
        mine = next((r for r in rs if r["impl"] == "lorakern"), None)
        for r in rs:
            t = r["median_s"]
            ratio = f"{t / mine['median_s']:.2f}x" if mine else ""
            gbs = r["bytes"] / t / 1e9 if r["bytes"] else None
            gb_cell = f"{gbs:.1f}" if gbs else ""
            pct_cell = f"{100 * gbs * 1e9 / copy_bw:.0f}%" if gbs else ""
            flop_cell = f"{r['flops'] / t / 1e9:.0f}" if r["flops"] else ""
            rows.append(f"| {group} | {r['impl']} | {t * 1e3:.3f} | {ratio} | {gb_cell} | {pct_cell} | {flop_cell} |")
    with open(path_md, "w", encoding="utf-8") as f:
        f.write("\n".join(header + rows) + "\n")
    with open(path_json, "w", encoding="utf-8") as f:
        json.dump(dict(machine=_machine(), commit=commit, timer=timer, copy_bandwidth=copy_bw, results=results), f, indent=1)


@pytest.fixture(scope="module", autouse=True)
def _report(request):
    yield
    timer = str(request.config.getoption("benchmark_timer", default="?"))
    overhead = [r for r in RESULTS if r["group"].startswith("overhead ")]
    for name, results in (("cpu", [r for r in RESULTS if r not in overhead]), ("cpu-overhead", overhead)):
        if results:
            path = os.path.join(HERE, "results", name)
            write_report(results, path + ".md", path + ".json", timer)
