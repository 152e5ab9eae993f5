"""GPU microbenchmarks of the lorakern backends against the baselines, in one run.

    python benchmarks/bench_gpu.py [--out DIR] [--time-budget SECONDS] [--quick]
    python benchmarks/bench_gpu.py --smoke [--out DIR]     (CPU, tiny shapes: checks the code, measures nothing)

Baselines, measured side by side at every point:
  torch_dense      x @ W^T in bf16 (cuBLAS), no LoRA: the floor for any fused kernel
  peft_unfused     x @ W^T + s * (x @ A^T) @ B^T in torch (PEFT's LoRA layer)
  dequant_cublas   NF4 dequantize (Triton kernel) to bf16, then the unfused LoRA layer (the QLoRA recipe)
  bitsandbytes     bnb.matmul_4bit + unfused LoRA, when bitsandbytes imports and runs here
lorakern rows: each backend's function of the backend interface (``lorakern_triton_*``,
``lorakern_cuda_*``, ``lorakern_composite``), and ``lorakern_auto``, the backend
``lorakern.ops._registry.pick`` chooses for the op and shape (named in the ``backend``
column). The ``lora_layer`` / ``qlora_layer`` groups time forward + backward (dx, dA, dB)
through the public autograd ops, as a model runs them.

Shapes are Llama-3-8B's linear layers (N x K): 4096x4096 (q/o), 14336x4096 (gate/up),
4096x14336 (down), 1024x4096 (k/v), r = 16. M (tokens): 512, 2048 and 8192 for every
group (8192 not on 4096x14336, for time); the QLoRA forward at M in {1, 2, 3, 4, 8, 16}
on 4096x4096 and 14336x4096 (where the GEMV hands over to dequantize + GEMM); the QLoRA
and bf16 LoRA forwards at M in {1, 16} on every shape. What was cut to fit the time slice
of gpu_check.sh is listed in the results' notes.

Every row has two times: ``time_us``, the do_bench median of eager calls (what a
Python loop pays, CPU launch overhead included when the GPU outruns it), and
``graph_us``, the median replay of the same call captured in a CUDA graph (GPU time
alone: what a CUDA-graphed or compiled model pays). TFLOP/s, GB/s (minimum bytes
moved) and the % of the copy bandwidth and bf16 matmul peak measured at the start of
the run come from both. ``results.md`` ends with a routing table: the fastest
implementation per (group, shape, M) by each time. Results: ``results.csv`` and
``results.md`` in --out, with device, versions and commit. Without a GPU (and
without --smoke) it exits with status 2 and says so.
"""

import argparse
import contextlib
import csv
import dataclasses
import datetime as dt
import importlib
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from importlib import metadata
from pathlib import Path
from typing import Callable, Optional

import torch

REPO = Path(__file__).resolve().parents[1]
RANK = 16
SCALING = 2.0
COMPOSITE_MODULE = "lorakern.kernels.composite"
# do_bench per timing: a 25 ms window is >= 100 calls up to ~150 us per call (the L2 flush
# between calls included), enough for a stable median, and half the first run's 50 ms.
WARMUP_MS, REP_MS = 5, 25
FIELDS = ["group", "impl", "backend", "M", "N", "K", "r", "time_us", "graph_us", "tflops", "gbps", "pct_matmul_peak",
          "pct_copy_bw", "graph_pct_matmul_peak", "graph_pct_copy_bw", "speedup_vs_baseline",
          "graph_speedup_vs_baseline", "max_rel_err"]
BASELINES = {"dequant": "torch_reference", "fwd": "peft_unfused", "bwd": "peft_unfused", "qlora_fwd": "dequant_cublas",
             "qlora_bwd": "dequant_cublas", "lora_layer": "peft_unfused", "qlora_layer": "dequant_cublas"}
# Rows that compute something else than the group's op (no LoRA term): never "the fastest".
NOT_CANDIDATES = {"torch_dense"}


# ----------------------------------------------------------------------------- configuration


@dataclasses.dataclass(frozen=True)
class Config:
    """What one run measures. ``points`` are (M, N, K, groups), in the order they run:
    the most informative first, since the time budget cuts the tail."""

    device: str
    dtype: torch.dtype
    dequant_shapes: tuple
    points: tuple
    peak_copy_numel: int
    peak_matmul_n: int
    smoke: bool = False
    cuts: tuple = ()


GEMM_GROUPS = ("fwd", "qlora_fwd", "bwd", "qlora_bwd", "lora_layer", "qlora_layer")
SMALL_M_GROUPS = ("fwd", "qlora_fwd")


def _points(shapes, gemv_shapes, large, gemv_tokens, small, last, skip=()) -> tuple:
    """Every group at M in ``large`` (all shapes); the QLoRA forward at M in ``gemv_tokens``
    on ``gemv_shapes`` (the GEMV -> GEMM threshold sweep); the bf16 LoRA forward too at M in
    ``small`` (all shapes); every group at M in ``last`` (slowest, so the budget cuts them
    first) except the (M, N, K) in ``skip``."""
    pts = [(m, n, k, GEMM_GROUPS) for m in large for n, k in shapes]
    pts += [(m, n, k, SMALL_M_GROUPS if m in small else ("qlora_fwd",)) for m in gemv_tokens for n, k in gemv_shapes]
    pts += [(m, n, k, SMALL_M_GROUPS) for m in small for n, k in shapes if (n, k) not in gemv_shapes]
    pts += [(m, n, k, GEMM_GROUPS) for m in last for n, k in shapes if (m, n, k) not in skip]
    return tuple(pts)


def gpu_config(quick: bool = False) -> Config:
    shapes = ((4096, 4096), (14336, 4096), (4096, 14336), (1024, 4096))  # (N, K) = (out, in) features
    if quick:
        points = _points(shapes[:1], shapes[:1], (2048,), (1, 4, 16), (1,), ())
        return Config("cuda", torch.bfloat16, shapes[:1], points, 2**29, 8192)
    # Cut to fit the bench step's slice of gpu_check.sh: the first run's sweep (eager timing
    # only, ~190 rows, rep 50 ms) took 91 s; this one times ~340 rows twice.
    points = _points(shapes, shapes[:2], (512, 2048), (1, 2, 3, 4, 8, 16), (1, 16), (8192,), skip=((8192, 4096, 14336),))
    cuts = (f"do_bench warmup {WARMUP_MS} ms, rep {REP_MS} ms per timing (the first run: 10 / 50); each row is timed "
            "twice (eager, graph)",
            "4096x14336 (down) at M=8192 not measured",
            "bwd, qlora_bwd and the layer groups only at M >= 512; bf16 LoRA fwd at small M only at M in {1, 16}; "
            "the M = 2..8 sweep on 4096x4096 and 14336x4096 only")
    return Config("cuda", torch.bfloat16, shapes, points, 2**29, 8192, cuts=cuts)


def smoke_config() -> Config:
    """Tiny CPU shapes through every code path of the GPU sweep (Triton under TRITON_INTERPRET=1).

    M = 24 takes the GEMM kernels, 1..16 the GEMV; N = 96 is not a power of two; the
    skipped point checks that ``skip`` drops exactly it.
    """
    shapes = ((96, 128), (64, 64))
    return Config("cpu", torch.bfloat16, shapes[:1],
                  _points(shapes, shapes[:1], (24,), (1, 3, 16), (1,), (20,), skip=((20, 64, 64),)),
                  2**16, 64, smoke=True, cuts=("smoke run: tiny CPU shapes, perf_counter timings",))


# ---------------------------------------------------------------------------------- timing


class CudaTimer:
    """Medians of ``triton.testing.do_bench`` (L2 cleared before each timed call)."""

    def __init__(self, warmup_ms: float = WARMUP_MS, rep_ms: float = REP_MS):
        self.warmup_ms, self.rep_ms = warmup_ms, rep_ms

    def eager(self, fn: Callable[[], object]) -> float:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=self.warmup_ms, rep=self.rep_ms, return_mode="median")

    def graph(self, fn: Callable[[], object]) -> tuple[Optional[float], str]:
        """(median ms of replaying ``fn`` captured in a CUDA graph, "") or (None, why capture failed).

        Call after ``eager`` on the same ``fn``: Triton autotuning, lazy initialisation
        and first allocations must happen outside the capture.
        """
        try:
            graph = capture_graph(fn)
        except Exception as e:  # reported in the row (empty graph_us) and the notes
            return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        try:
            return self.eager(graph.replay), ""
        finally:
            del graph  # frees its private memory pool before the next capture


def capture_graph(fn: Callable[[], object], warmup_calls: int = 1) -> "torch.cuda.CUDAGraph":
    """``fn`` captured in a CUDA graph, after a warm-up call on the side stream that captures.

    ``capture_begin``/``capture_end`` rather than ``torch.cuda.graph``: that context empties
    the caching allocator at every capture (~250 of them in a sweep), and when ending an
    invalidated capture raises it leaves its capture stream current for whatever runs next.
    """
    prev = torch.cuda.current_stream()
    side = torch.cuda.Stream()
    side.wait_stream(prev)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):
        for _ in range(warmup_calls):
            fn()
        graph.capture_begin()
        try:
            fn()
        except BaseException:
            # Ending a capture that fn invalidated raises as well; fn's error is the one to report.
            with contextlib.suppress(RuntimeError):
                graph.capture_end()
            raise
        graph.capture_end()
    prev.wait_stream(side)
    return graph


class WallTimer:
    """--smoke timings: perf_counter medians of a few calls after one warm-up. ``graph``
    times one more call (CUDA graphs need a GPU) so every column and the routing table fill."""

    def __init__(self, repeats: int = 1):
        self.repeats = repeats

    def eager(self, fn: Callable[[], object]) -> float:
        fn()
        return self._median(fn)

    def graph(self, fn: Callable[[], object]) -> tuple[Optional[float], str]:
        return self._median(fn), ""

    def _median(self, fn) -> float:
        times = []
        for _ in range(self.repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return 1e3 * statistics.median(times)


class Call:
    """A benchmarked call. ``rotating()`` cycles over copies of the inputs that together
    exceed L2 (eager timing); ``fixed()`` always uses the first copy (a graph bakes in its
    input addresses; do_bench clears L2 before every replay anyway)."""

    def __init__(self, fn, make_inputs, bytes_per_set: int, l2_bytes: int, max_sets: int = 8):
        sets = max(1, min(max_sets, -(-2 * l2_bytes // max(bytes_per_set, 1))))
        self.inputs = [make_inputs(i) for i in range(sets)]
        self.fn, self.i = fn, 0

    def rotating(self):
        args = self.inputs[self.i]
        self.i = (self.i + 1) % len(self.inputs)
        return self.fn(*args)

    def fixed(self):
        return self.fn(*self.inputs[0])


@dataclasses.dataclass
class Timing:
    eager_ms: float
    graph_ms: Optional[float]


# ------------------------------------------------------------------------------- environment


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


def environment(cfg: Config) -> dict[str, str]:
    if cfg.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        device = (f"{props.name} (sm_{props.major}{props.minor}, {props.multi_processor_count} SMs, "
                  f"{props.total_memory / 2**30:.0f} GiB)")
    else:
        device = f"{cfg.device} ({platform.processor() or platform.machine()}), smoke run: timings mean nothing"
    return {
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "device": device,
        "commit": _git_commit(),
        "python": platform.python_version(),
        "torch": f"{torch.__version__} (CUDA {torch.version.cuda})",
        "triton": _version("triton"),
        "bitsandbytes": _version("bitsandbytes"),
        "lorakern": _version("lorakern"),
    }


def measure_peaks(cfg: Config, timer) -> tuple[float, float]:
    """(copy GB/s, bf16 matmul TFLOP/s) of this device, measured now."""
    src = torch.empty(cfg.peak_copy_numel, dtype=torch.bfloat16, device=cfg.device).normal_()
    dst = torch.empty_like(src)
    ms = timer.eager(lambda: dst.copy_(src))
    copy_gbps = 2 * src.numel() * 2 / ms / 1e6
    del src, dst
    n = cfg.peak_matmul_n
    a = torch.randn(n, n, dtype=torch.bfloat16, device=cfg.device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=cfg.device)
    ms = timer.eager(lambda: a @ b)
    return copy_gbps, 2 * n**3 / ms / 1e9


# ---------------------------------------------------------------------------------- backends


class Backends:
    """The implementations available here, each with the reason when missing.

    ``stand_ins`` (--smoke): the CUDA backend, which cannot run without a GPU, is replaced
    by ``lorakern.reference`` under the same row names, so its rows' code runs; the notes
    say so. A missing composite backend is skipped, as on a GPU.
    """

    def __init__(self, device: str, stand_ins: bool = False):
        from lorakern.kernels import triton as tk
        from lorakern.ops import _registry

        ok, reason = tk.availability()
        if not ok:
            raise RuntimeError(f"Triton backend unavailable: {reason}")
        self.device, self.triton, self._registry = device, tk, _registry
        self._notes: list[str] = []
        self.cuda, self.cuda_reason = _registry.load("cuda")
        if self.cuda is None and stand_ins:
            self.cuda = self._stand_in("cuda", self.cuda_reason)
        self.composite, self.composite_reason = self._load_composite()
        self.bnb, self.bnb_reason = None, ""
        try:
            import bitsandbytes as bnb
            import bitsandbytes.functional as bnbf

            w = torch.randn(128, 128, dtype=torch.bfloat16, device=device)
            qw, state = bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
            bnb.matmul_4bit(torch.randn(2, 128, dtype=torch.bfloat16, device=device), qw.t(), quant_state=state)
            self.bnb, self.bnbf = bnb, bnbf
        except Exception as e:  # optional baseline; the reason goes into the report
            self.bnb_reason = f"{type(e).__name__}: {e}"

    @staticmethod
    def _load_composite():
        """Imported here, not at the top: the backend may be missing or broken; its rows are then skipped."""
        try:
            mod = importlib.import_module(COMPOSITE_MODULE)
            ok, reason = mod.availability()
            return (mod if ok else None), reason
        except Exception as e:
            return None, f"import of {COMPOSITE_MODULE} failed: {type(e).__name__}: {e}"

    def _stand_in(self, name: str, reason: str):
        import lorakern.reference as ref

        self._notes.append(f"smoke: {name} rows run lorakern.reference ({name}: {reason})")
        return ref

    def runs(self, mod, op: str, *args) -> bool:
        """Whether backend ``mod`` implements ``op`` and accepts these arguments."""
        if mod is None or not hasattr(mod, op):
            return False
        supports = getattr(mod, "supports", None)
        return supports is None or supports(op, *args) is None

    def pick(self, op: str, args: tuple, device_type: str = "cuda"):
        """The backend the default dispatch runs ``op(*args)`` on for ``device_type`` tensors."""
        return self._registry.pick(op, device_type, args)

    def notes(self) -> list[str]:
        out = list(self._notes)
        if self.cuda is None:
            out.append(f"CUDA backend not measured: {self.cuda_reason}")
        if self.composite is None:
            out.append(f"composite backend not measured: {self.composite_reason}")
        if self.bnb is None:
            out.append(f"bitsandbytes not measured: {self.bnb_reason}")
        forced = os.environ.get(self._registry.ENV_VAR)
        if forced:
            out.append(f"{self._registry.ENV_VAR}={forced} is set: lorakern_auto rows follow it")
        return out


def backend_name(mod) -> str:
    return getattr(mod, "NAME", mod.__name__.rsplit(".", 1)[-1])


# ------------------------------------------------------------------------------------- sweep


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.float() - want.float()).abs().max() / want.float().abs().max().clamp(min=1e-30)).item()


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def _round(value: Optional[float], digits: int):
    return "" if value is None else round(value, digits)


class Sweep:
    """Collects rows; times each call eagerly and as a graph replay. A row whose call
    raises, or whose capture fails, is logged in the notes; the sweep goes on."""

    def __init__(self, timer, peaks: tuple[float, float], l2_bytes: int):
        self.timer = timer
        self.copy_gbps, self.peak_tflops = peaks
        self.l2 = l2_bytes
        self.rows: list[dict] = []
        self.notes: list[str] = []
        self._graph_failures: dict[tuple[str, str], list] = {}
        self.point = (0, 0, 0)

    def call(self, fn, make_inputs, bytes_per_set: int) -> Call:
        return Call(fn, make_inputs, bytes_per_set, self.l2)

    def row(self, group: str, impl: str, call: Call, flops: float, nbytes: float, base: Optional[dict] = None,
            reference: Optional[Callable] = None, backend: str = "") -> Optional[dict]:
        """Time ``call`` and append its row. ``base``: the baseline's row (for the speedups);
        ``reference(*inputs)``: what the call's first output should be on its first input set."""
        m, n, k = self.point
        try:
            eager = self.timer.eager(call.rotating)
            graph, why = self.timer.graph(call.fixed)
            err = None
            if reference is not None:
                err = _rel_err(_first(call.fixed()), reference(*call.inputs[0]))
        except Exception as e:  # one broken implementation must not end the sweep
            self.fail(f"{group} {impl} at M={m} N={n} K={k}", e)
            return None
        if graph is None:
            self._graph_failures.setdefault((group, impl), [why, 0])[1] += 1
            print(f"graph capture failed: {group} {impl} M={m} N={n} K={k}: {why}", flush=True)
        return self._append(group, impl, backend, Timing(eager, graph), flops, nbytes, base, err)

    def copy(self, row: dict, impl: str, backend: str) -> dict:
        """A row that repeats ``row``'s measurement under another name (the same call)."""
        new = dict(row, impl=impl, backend=backend)
        self.rows.append(new)
        self._print(new)
        return new

    @staticmethod
    def _print(row: dict) -> None:
        print(" ".join(f"{key}={value}" for key, value in row.items() if not key.startswith("_")), flush=True)

    def _append(self, group, impl, backend, t: Timing, flops, nbytes, base, err) -> dict:
        m, n, k = self.point
        peak = {}
        for prefix, ms in (("", t.eager_ms), ("graph_", t.graph_ms)):
            tflops = None if ms is None else flops / ms / 1e9
            gbps = None if ms is None else nbytes / ms / 1e6
            peak[prefix + "tflops"], peak[prefix + "gbps"] = tflops, gbps
            peak[prefix + "pct_matmul_peak"] = None if ms is None else 100 * tflops / self.peak_tflops
            peak[prefix + "pct_copy_bw"] = None if ms is None else 100 * gbps / self.copy_gbps
        base_eager = base["_eager_ms"] if base else None
        base_graph = base["_graph_ms"] if base else None
        row = dict(group=group, impl=impl, backend=backend, M=m, N=n, K=k, r=RANK, time_us=round(t.eager_ms * 1e3, 2),
                   graph_us=_round(t.graph_ms and t.graph_ms * 1e3, 2), tflops=round(peak["tflops"], 2),
                   gbps=round(peak["gbps"], 1), pct_matmul_peak=round(peak["pct_matmul_peak"], 1),
                   pct_copy_bw=round(peak["pct_copy_bw"], 1),
                   graph_pct_matmul_peak=_round(peak["graph_pct_matmul_peak"], 1),
                   graph_pct_copy_bw=_round(peak["graph_pct_copy_bw"], 1),
                   speedup_vs_baseline=_round(base_eager and base_eager / t.eager_ms, 3),
                   graph_speedup_vs_baseline=_round(base_graph and t.graph_ms and base_graph / t.graph_ms, 3),
                   max_rel_err=f"{err:.2e}" if err is not None else "",
                   _eager_ms=t.eager_ms, _graph_ms=t.graph_ms)
        self.rows.append(row)
        self._print(row)
        return row

    def fail(self, what: str, e: BaseException) -> None:
        self.notes.append(f"{what} failed: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        print(f"FAILED {what}:", file=sys.stderr, flush=True)
        traceback.print_exc()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def graph_notes(self) -> list[str]:
        return [f"graph capture failed for {impl} ({group}, {count} rows; graph_us empty): {why}"
                for (group, impl), (why, count) in self._graph_failures.items()]


class Point:
    """The operands of one (M, N, K): a bf16 weight, its NF4 form, LoRA factors, input makers."""

    def __init__(self, cfg: Config, m: int, n: int, k: int):
        from lorakern.formats import nf4

        self.m, self.n, self.k = m, n, k
        self.opts = dict(dtype=cfg.dtype, device=cfg.device)
        self.w = torch.randn(n, k, **self.opts) * k**-0.5
        self.q = nf4.quantize(self.w, 64, True)
        self.wq = nf4.dequantize(self.q, cfg.dtype)
        self.lora_a = torch.randn(RANK, k, **self.opts) * k**-0.5
        self.lora_b = torch.randn(n, RANK, **self.opts) * RANK**-0.5
        self.seed = torch.zeros(1, dtype=torch.int64, device=cfg.device)
        self.x_bytes, self.y_bytes, self.w_bytes, self.q_bytes = 2 * m * k, 2 * m * n, 2 * n * k, self.q.nbytes()
        self.flops = 2 * m * n * k
        self.lora_flops = 2 * m * RANK * (n + k)

    def xs(self, i: int) -> tuple:
        return (torch.randn(self.m, self.k, **self.opts),)

    def dy_x_xas(self, i: int) -> tuple:
        """(dy, x, xa = x A^T): the inputs of a LoRA backward."""
        x = torch.randn(self.m, self.k, **self.opts)
        return torch.randn(self.m, self.n, **self.opts), x, x @ self.lora_a.t()

    def x_dys(self, i: int) -> tuple:
        """(x that requires grad, dy): the inputs of a layer's forward + backward."""
        return torch.randn(self.m, self.k, **self.opts).requires_grad_(), torch.randn(self.m, self.n, **self.opts)

    def lora(self, x, w):
        """PEFT's LoRA layer in torch: base GEMM, then the two skinny GEMMs, then the add."""
        return x @ w.t() + SCALING * ((x @ self.lora_a.t()) @ self.lora_b.t())

    def lora_bwd(self, dy, x, w):
        """(dx, dA, dB) of :meth:`lora` in torch, the base frozen."""
        g = dy @ self.lora_b
        dx = dy @ w + SCALING * (g @ self.lora_a)
        return dx, SCALING * (g.t() @ x), SCALING * (dy.t() @ (x @ self.lora_a.t()))


def _auto(sweep: Sweep, be: Backends, measured: dict, group: str, op: str, args: tuple, make_call, flops, nbytes,
          base, reference) -> None:
    """The lorakern_auto row: the registry's pick for ``op(*args)`` on CUDA tensors. When that
    backend already has a row at this point, its measurement is repeated (the same call)."""
    try:
        mod = be.pick(op, args)
    except Exception as e:
        sweep.fail(f"{group} lorakern_auto (registry pick for {op})", e)
        return
    name = backend_name(mod)
    if name in measured:
        if measured[name] is not None:
            sweep.copy(measured[name], "lorakern_auto", name)
        return  # that backend's own row failed, and the notes say why
    sweep.row(group, "lorakern_auto", make_call(mod), flops, nbytes, base, reference, backend=name)


def _backend_rows(sweep: Sweep, be: Backends, group: str, op: str, args: tuple, impls, make_call, flops, nbytes, base,
                  reference) -> None:
    """One row per (backend name, impl, module) in ``impls`` that runs ``op(*args)``, then lorakern_auto."""
    measured = {}
    for name, impl, mod in impls:
        if be.runs(mod, op, *args):
            measured[name] = sweep.row(group, impl, make_call(mod), flops, nbytes, base, reference, backend=name)
    _auto(sweep, be, measured, group, op, args, make_call, flops, nbytes, base, reference)


def group_fwd(s: Sweep, be: Backends, p: Point) -> None:
    """bf16 base + LoRA forward: y = x W^T + s * (x A^T) B^T."""
    flops, nbytes = p.flops + p.lora_flops, p.x_bytes + p.w_bytes + p.y_bytes
    s.row("fwd", "torch_dense", s.call(lambda x: x @ p.w.t(), p.xs, p.x_bytes), p.flops, nbytes)
    reference = lambda x: p.lora(x, p.w)  # noqa: E731
    base = s.row("fwd", "peft_unfused", s.call(reference, p.xs, p.x_bytes), flops, nbytes)

    def make_call(mod):
        return s.call(lambda x: mod.lora_linear_fwd(x, p.w, None, p.lora_a, p.lora_b, SCALING, 0.0, p.seed), p.xs,
                      p.x_bytes)

    args = (p.xs(0)[0], p.w, None, p.lora_a, p.lora_b, SCALING, 0.0, p.seed)
    impls = (("triton", "lorakern_triton_lora", be.triton), ("composite", "lorakern_composite", be.composite))
    _backend_rows(s, be, "fwd", "lora_linear_fwd", args, impls, make_call, flops, nbytes, base, reference)


def group_qlora_fwd(s: Sweep, be: Backends, p: Point) -> None:
    """NF4 base + LoRA forward; at M <= 16 the GEMV kernels (the GEMV -> GEMM threshold sweep)."""
    tk = be.triton
    flops, nbytes = p.flops + p.lora_flops, p.x_bytes + p.q_bytes + p.y_bytes
    reference = lambda x: p.lora(x, p.wq)  # noqa: E731
    base = s.row("qlora_fwd", "dequant_cublas", s.call(lambda x: p.lora(x, tk.nf4_dequantize(p.q, p.wq.dtype)), p.xs,
                                                       p.x_bytes), flops, nbytes, reference=reference)
    if be.bnb is not None:
        qw, state = be.bnbf.quantize_4bit(p.w, blocksize=64, quant_type="nf4", compress_statistics=True)

        def bnb_fwd(x):
            return be.bnb.matmul_4bit(x, qw.t(), quant_state=state) + SCALING * ((x @ p.lora_a.t()) @ p.lora_b.t())

        s.row("qlora_fwd", "bitsandbytes", s.call(bnb_fwd, p.xs, p.x_bytes), flops, nbytes, base, reference)

    def make_call(mod):
        return s.call(lambda x: mod.qlora_linear_fwd(x, p.q, None, p.lora_a, p.lora_b, SCALING, 0.0, p.seed), p.xs,
                      p.x_bytes)

    gemv = p.m <= tk.GEMV_MAX_M
    impls = [("triton", "lorakern_triton_qlora" + ("_gemv" if gemv else ""), tk)]
    if gemv:  # (a --smoke stand-in for the CUDA backend would also run at larger M)
        impls.append(("cuda", "lorakern_cuda_qlora_gemv", be.cuda))
    impls.append(("composite", "lorakern_composite", be.composite))
    args = (p.xs(0)[0], p.q, None, p.lora_a, p.lora_b, SCALING, 0.0, p.seed)
    _backend_rows(s, be, "qlora_fwd", "qlora_linear_fwd", args, impls, make_call, flops, nbytes, base, reference)


def _bwd_cost(p: Point, weight_bytes: int) -> tuple[int, int]:
    """(flops, minimum bytes) of dx, dA, dB: dy, x read; dx written; the weight read once."""
    return p.flops + 3 * p.lora_flops, p.y_bytes + 2 * p.x_bytes + weight_bytes


def group_bwd(s: Sweep, be: Backends, p: Point) -> None:
    """bf16 base + LoRA backward: dx, dA, dB (the base frozen)."""
    flops, nbytes = _bwd_cost(p, p.w_bytes)
    set_bytes = p.y_bytes + 2 * p.x_bytes
    reference = lambda dy, x, xa: p.lora_bwd(dy, x, p.w)[0]  # noqa: E731
    base = s.row("bwd", "peft_unfused", s.call(lambda dy, x, xa: p.lora_bwd(dy, x, p.w), p.dy_x_xas, set_bytes),
                 flops, nbytes)

    def make_call(mod):
        return s.call(lambda dy, x, xa: mod.lora_linear_bwd(dy, x, xa, p.w, p.lora_a, p.lora_b, SCALING, 0.0, p.seed,
                                                            True, False), p.dy_x_xas, set_bytes)

    dy, x, xa = p.dy_x_xas(0)
    args = (dy, x, xa, p.w, p.lora_a, p.lora_b, SCALING, 0.0, p.seed, True, False)
    impls = (("triton", "lorakern_triton_lora", be.triton), ("composite", "lorakern_composite", be.composite))
    _backend_rows(s, be, "bwd", "lora_linear_bwd", args, impls, make_call, flops, nbytes, base, reference)


def group_qlora_bwd(s: Sweep, be: Backends, p: Point) -> None:
    """NF4 base + LoRA backward: dx, dA, dB."""
    tk = be.triton
    flops, nbytes = _bwd_cost(p, p.q_bytes)
    set_bytes = p.y_bytes + 2 * p.x_bytes
    reference = lambda dy, x, xa: p.lora_bwd(dy, x, p.wq)[0]  # noqa: E731
    base = s.row("qlora_bwd", "dequant_cublas",
                 s.call(lambda dy, x, xa: p.lora_bwd(dy, x, tk.nf4_dequantize(p.q, p.wq.dtype)), p.dy_x_xas, set_bytes),
                 flops, nbytes, reference=reference)

    def make_call(mod):
        return s.call(lambda dy, x, xa: mod.qlora_linear_bwd(dy, x, xa, p.q, p.lora_a, p.lora_b, SCALING, 0.0, p.seed,
                                                             True), p.dy_x_xas, set_bytes)

    dy, x, xa = p.dy_x_xas(0)
    args = (dy, x, xa, p.q, p.lora_a, p.lora_b, SCALING, 0.0, p.seed, True)
    impls = (("triton", "lorakern_triton_qlora", tk), ("composite", "lorakern_composite", be.composite))
    _backend_rows(s, be, "qlora_bwd", "qlora_linear_bwd", args, impls, make_call, flops, nbytes, base, reference)


def _layer(s: Sweep, be: Backends, p: Point, quantized: bool) -> None:
    """Forward + backward (dx, dA, dB) of one layer as a model runs it: lorakern.ops' autograd
    against the torch layer (dense W, or W dequantized per call) and bitsandbytes."""
    from lorakern import ops

    group = "qlora_layer" if quantized else "lora_layer"
    lora_a = p.lora_a.detach().clone().requires_grad_()
    lora_b = p.lora_b.detach().clone().requires_grad_()
    weight_bytes = p.q_bytes if quantized else p.w_bytes
    flops = 2 * p.flops + 4 * p.lora_flops
    nbytes = 2 * (p.x_bytes + p.y_bytes + weight_bytes)  # x, y, dy, dx; the weight read in each pass
    set_bytes = p.x_bytes + p.y_bytes
    w_ref = p.wq if quantized else p.w
    reference = lambda x, dy: p.lora_bwd(dy, x.detach(), w_ref)[0]  # noqa: E731

    def grads(y, x, dy):
        return torch.autograd.grad(y, (x, lora_a, lora_b), dy)

    def torch_layer(x, dy):
        w = be.triton.nf4_dequantize(p.q, p.wq.dtype) if quantized else p.w
        return grads(x @ w.t() + SCALING * ((x @ lora_a.t()) @ lora_b.t()), x, dy)

    base = s.row(group, BASELINES[group], s.call(torch_layer, p.x_dys, set_bytes), flops, nbytes, reference=reference)
    if quantized and be.bnb is not None:
        qw, state = be.bnbf.quantize_4bit(p.w, blocksize=64, quant_type="nf4", compress_statistics=True)

        def bnb_layer(x, dy):
            y = be.bnb.matmul_4bit(x, qw.t(), quant_state=state) + SCALING * ((x @ lora_a.t()) @ lora_b.t())
            return grads(y, x, dy)

        s.row(group, "bitsandbytes", s.call(bnb_layer, p.x_dys, set_bytes), flops, nbytes, base, reference)

    def ours(x, dy):
        if quantized:
            return grads(ops.qlora_linear(x, p.q, None, lora_a, lora_b, SCALING, 0.0, p.seed), x, dy)
        return grads(ops.lora_linear(x, p.w, None, lora_a, lora_b, SCALING, 0.0, p.seed), x, dy)

    x, dy = p.x_dys(0)
    x = x.detach()
    xa = x @ p.lora_a.t()
    base_operand = p.q if quantized else p.w
    fwd_op, bwd_op = ("qlora_linear_fwd", "qlora_linear_bwd") if quantized else ("lora_linear_fwd", "lora_linear_bwd")
    bwd_flags = (True,) if quantized else (True, False)
    try:
        device_type = x.device.type
        fwd_args = (x, base_operand, None, p.lora_a, p.lora_b, SCALING, 0.0, p.seed)
        fwd = backend_name(be.pick(fwd_op, fwd_args, device_type))
        bwd = backend_name(be.pick(bwd_op, (dy, x, xa, base_operand, p.lora_a, p.lora_b, SCALING, 0.0, p.seed,
                                            *bwd_flags), device_type))
    except Exception as e:
        s.fail(f"{group} lorakern_auto (registry pick)", e)
        return
    s.row(group, "lorakern_auto", s.call(ours, p.x_dys, set_bytes), flops, nbytes, base, reference,
          backend=fwd if fwd == bwd else f"{fwd}+{bwd}")


def group_lora_layer(s: Sweep, be: Backends, p: Point) -> None:
    _layer(s, be, p, quantized=False)


def group_qlora_layer(s: Sweep, be: Backends, p: Point) -> None:
    _layer(s, be, p, quantized=True)


GROUPS = {"fwd": group_fwd, "qlora_fwd": group_qlora_fwd, "bwd": group_bwd, "qlora_bwd": group_qlora_bwd,
          "lora_layer": group_lora_layer, "qlora_layer": group_qlora_layer}


def run_dequant(s: Sweep, be: Backends, cfg: Config, n: int, k: int) -> None:
    """NF4 -> bf16 dequantization of an (N, K) weight."""
    from lorakern.formats import nf4

    s.point = (0, n, k)
    w = torch.randn(n, k, dtype=cfg.dtype, device=cfg.device)
    q = nf4.quantize(w, 64, True)
    nbytes = q.nbytes() + 2 * n * k
    want = nf4.dequantize(q, cfg.dtype)
    reference = lambda: want  # noqa: E731

    def make_call(mod):
        return s.call(lambda: mod.nf4_dequantize(q, cfg.dtype), lambda i: (), nbytes)

    base = s.row("dequant", "torch_reference", s.call(lambda: nf4.dequantize(q, cfg.dtype), lambda i: (), nbytes), 0,
                 nbytes)
    if be.bnb is not None:
        qw, state = be.bnbf.quantize_4bit(w, blocksize=64, quant_type="nf4", compress_statistics=True)
        s.row("dequant", "bitsandbytes", s.call(lambda: be.bnbf.dequantize_4bit(qw, state), lambda i: (), nbytes), 0,
              nbytes, base, reference)
    impls = (("triton", "lorakern_triton", be.triton), ("cuda", "lorakern_cuda", be.cuda),
             ("composite", "lorakern_composite", be.composite))
    _backend_rows(s, be, "dequant", "nf4_dequantize", (q, cfg.dtype), impls, make_call, 0, nbytes, base, reference)


# ------------------------------------------------------------------------------------ report


def _num(value) -> Optional[float]:
    return None if value in ("", None) else float(value)


def routing_table(rows: list[dict]) -> list[dict]:
    """Per (group, N, K, M), in order of appearance: the fastest implementation by graph
    time and by eager time, the fastest lorakern backend by each, and what lorakern_auto runs.

    ``lorakern_auto`` competes only where no backend has its own row (the layer groups);
    elsewhere it repeats one of them. ``torch_dense`` (no LoRA term) never competes.
    """
    keyed: dict[tuple, list[dict]] = {}
    for r in rows:
        keyed.setdefault((r["group"], int(r["N"]), int(r["K"]), int(r["M"])), []).append(r)
    table = []
    for (group, n, k, m), rs in keyed.items():
        cands = [r for r in rs if r["impl"] not in NOT_CANDIDATES]
        if any(r["impl"].startswith("lorakern_") and r["impl"] != "lorakern_auto" for r in cands):
            cands = [r for r in cands if r["impl"] != "lorakern_auto"]
        ours = [r for r in cands if r["impl"].startswith("lorakern_")]
        auto = next((r for r in rs if r["impl"] == "lorakern_auto"), None)

        def fastest(candidates, column):
            timed = [r for r in candidates if _num(r[column]) is not None]
            return min(timed, key=lambda r: _num(r[column])) if timed else None

        best_ours_graph = fastest(ours, "graph_us")
        ratio = None
        if auto is not None and best_ours_graph is not None and _num(auto["graph_us"]) is not None:
            ratio = _num(auto["graph_us"]) / _num(best_ours_graph["graph_us"])
        table.append(dict(group=group, N=n, K=k, M=m, graph=fastest(cands, "graph_us"), eager=fastest(cands, "time_us"),
                          ours_graph=best_ours_graph, ours_eager=fastest(ours, "time_us"), auto=auto, auto_ratio=ratio))
    return table


def _cell(row: Optional[dict], column: str) -> str:
    return "" if row is None else f"{row['impl']} {row[column]}"


def routing_markdown(rows: list[dict]) -> list[str]:
    lines = ["## Routing table", "",
             "Fastest per (group, shape, M): by graph_us (GPU time; what a graphed or compiled model pays) and by "
             "time_us (eager, launch overhead included); the fastest lorakern backend by each; the backend "
             "lorakern_auto runs and its graph time over the fastest lorakern backend's (1.00: the dispatch "
             "already picks the best). Times in us.", "",
             "| group | N x K | M | fastest (graph) | fastest (eager) | fastest lorakern (graph) | "
             "fastest lorakern (eager) | lorakern_auto runs | auto / best lorakern (graph) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for t in routing_table(rows):
        auto = "" if t["auto"] is None else f"{t['auto']['backend']} {t['auto']['graph_us'] or t['auto']['time_us']}"
        ratio = "" if t["auto_ratio"] is None else f"{t['auto_ratio']:.2f}"
        lines.append(f"| {t['group']} | {t['N']}x{t['K']} | {t['M']} | {_cell(t['graph'], 'graph_us')} | "
                     f"{_cell(t['eager'], 'time_us')} | {_cell(t['ours_graph'], 'graph_us')} | "
                     f"{_cell(t['ours_eager'], 'time_us')} | {auto} | {ratio} |")
    return lines


def gemv_markdown(rows: list[dict], max_m: int = 16) -> list[str]:
    """The QLoRA forward at M <= ``max_m``, one line per (shape, M), one column per implementation."""
    small = [r for r in rows if r["group"] == "qlora_fwd" and int(r["M"]) <= max_m and r["impl"] != "lorakern_auto"]
    if not small:
        return []
    impls = list(dict.fromkeys(r["impl"] for r in small))
    cells: dict[tuple, dict] = {}
    for r in small:
        cells.setdefault((int(r["N"]), int(r["K"]), int(r["M"])), {})[r["impl"]] = r
    lines = ["## QLoRA forward at small M (GEMV -> GEMM threshold)", "",
             "graph_us (time_us) per implementation; the lowest graph time in bold.", "",
             "| N x K | M | " + " | ".join(impls) + " |", "|---|---|" + "---|" * len(impls)]
    for (n, k, m), by_impl in sorted(cells.items()):
        graphs = [_num(r["graph_us"]) for r in by_impl.values() if _num(r["graph_us"]) is not None]
        best = min(graphs) if graphs else None
        out = []
        for impl in impls:
            r = by_impl.get(impl)
            if r is None:
                out.append("")
                continue
            g = _num(r["graph_us"])
            text = f"{r['graph_us'] if g is not None else '-'} ({r['time_us']})"
            out.append(f"**{text}**" if g is not None and g == best else text)
        lines.append(f"| {n}x{k} | {m} | " + " | ".join(out) + " |")
    return lines


def write_results(out: Path, env: dict, peaks: tuple[float, float], rows: list[dict], notes: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "results.csv", "w", newline="") as f:
        for key, value in env.items():
            f.write(f"# {key}: {value}\n")
        f.write(f"# copy_gbps: {peaks[0]:.1f}\n# bf16_matmul_tflops: {peaks[1]:.1f}\n")
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# lorakern GPU benchmarks", ""]
    lines += [f"- {key}: {value}" for key, value in env.items()]
    lines += [f"- measured copy bandwidth: {peaks[0]:.0f} GB/s; bf16 matmul: {peaks[1]:.0f} TFLOP/s", ""]
    lines += [f"- note: {n_}" for n_ in notes]
    lines += ["", "time_us: do_bench median of eager calls; graph_us: median replay of the same call captured in a "
              "CUDA graph (empty: capture failed, see the notes). tflops, gbps, pct_* come from time_us, graph_pct_* "
              "from graph_us. Baselines (speedup_vs_baseline, graph_speedup_vs_baseline): "
              + ", ".join(f"{g} vs {b}" for g, b in BASELINES.items())
              + ". lorakern_auto is the backend the default dispatch picks (column backend); where that backend has "
              "its own row at the point, lorakern_auto repeats its measurement.", ""]
    lines.append("| " + " | ".join(FIELDS) + " |")
    lines.append("|" + "---|" * len(FIELDS))
    lines += ["| " + " | ".join(str(r[f_]) for f_ in FIELDS) + " |" for r in rows]
    lines += [""] + routing_markdown(rows)
    gemv = gemv_markdown(rows)
    lines += [""] + gemv if gemv else []
    (out / "results.md").write_text("\n".join(lines) + "\n")


# -------------------------------------------------------------------------------------- main


def run(cfg: Config, timer, out: Path, time_budget: float = float("inf")) -> int:
    """Measure ``cfg`` and write ``out``/results.{csv,md} (after every point, so a hang keeps
    what was measured). 0 when every row ran (failed graph captures are not failures), else 1."""
    start = time.monotonic()
    torch.manual_seed(0)
    env = environment(cfg)
    print("\n".join(f"{k}: {v}" for k, v in env.items()), flush=True)
    peaks = measure_peaks(cfg, timer)
    print(f"copy {peaks[0]:.0f} GB/s, bf16 matmul {peaks[1]:.0f} TFLOP/s", flush=True)
    l2 = getattr(torch.cuda.get_device_properties(0), "L2_cache_size", 50 * 2**20) if cfg.device == "cuda" else 0
    sweep = Sweep(timer, peaks, l2)
    be = Backends(cfg.device, stand_ins=cfg.smoke)
    fixed_notes = be.notes() + [f"cut: {c}" for c in cfg.cuts]

    def notes(extra=()):
        return fixed_notes + sweep.notes + sweep.graph_notes() + list(extra)

    for n, k in cfg.dequant_shapes:
        try:
            run_dequant(sweep, be, cfg, n, k)
        except Exception as e:
            sweep.fail(f"dequant N={n} K={k}", e)
    stopped = []
    for i, (m, n, k, groups) in enumerate(cfg.points):
        elapsed = time.monotonic() - start
        if elapsed > time_budget:
            stopped = [f"time budget {time_budget:.0f}s reached: {len(cfg.points) - i} of {len(cfg.points)} "
                       f"(M, N, K) points not measured"]
            break
        sweep.point = (m, n, k)
        try:
            point = Point(cfg, m, n, k)
        except Exception as e:
            sweep.fail(f"operands of M={m} N={n} K={k}", e)
            continue
        for group in groups:
            try:
                GROUPS[group](sweep, be, point)
            except Exception as e:
                sweep.fail(f"{group} at M={m} N={n} K={k}", e)
        del point
        if cfg.device == "cuda":
            torch.cuda.empty_cache()
        print(f"[{time.monotonic() - start:.0f}s] point {i + 1}/{len(cfg.points)} M={m} N={n} K={k} "
              f"({', '.join(groups)}) took {time.monotonic() - start - elapsed:.1f}s", flush=True)
        write_results(out, env, peaks, sweep.rows, notes())
    total = time.monotonic() - start
    write_results(out, env, peaks, sweep.rows, notes(stopped + [f"sweep wall time {total:.0f}s"]))
    print("\n".join(routing_markdown(sweep.rows)), flush=True)
    print(f"wrote {out / 'results.csv'} and results.md in {total:.0f}s")
    for line in sweep.notes:
        print(f"FAILED: {line}", file=sys.stderr)
    return 1 if sweep.notes else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="lorakern GPU benchmarks (triton.testing.do_bench)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results directory (default benchmarks/results/gpu-<UTC date>; --smoke: a new temp dir)")
    parser.add_argument("--time-budget", type=float, default=None,
                        help="seconds; the sweep stops starting new points after this (results so far are written); "
                             "default 240 on a GPU, none with --smoke")
    parser.add_argument("--quick", action="store_true", help="one shape (4096x4096), M in {2048, 1, 4, 16}")
    parser.add_argument("--smoke", action="store_true",
                        help="run every code path on CPU tensors with tiny shapes (Triton interpreted, perf_counter "
                             "timings, no CUDA graphs): a test of this script, not a measurement")
    args = parser.parse_args(argv)
    if args.smoke:
        import tempfile

        # Triton decides compiled-or-interpreted when its kernels are defined: before lorakern.kernels.triton loads.
        os.environ.setdefault("TRITON_INTERPRET", "1")
        from lorakern.kernels.triton import interpreting

        if not interpreting():
            print("--smoke needs the Triton kernels interpreted: TRITON_INTERPRET=1 before lorakern.kernels.triton "
                  "is imported", file=sys.stderr)
            return 2
        out = args.out or Path(tempfile.mkdtemp(prefix="bench_gpu_smoke_"))
        return run(smoke_config(), WallTimer(), out, args.time_budget or float("inf"))
    if not torch.cuda.is_available():
        print("bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); CPU benchmarks are the "
              "pytest-benchmark files in benchmarks/ (--smoke checks this script on CPU).", file=sys.stderr)
        return 2
    out = args.out or REPO / "benchmarks" / "results" / f"gpu-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M}"
    return run(gpu_config(args.quick), CudaTimer(), out, args.time_budget or 240.0)


if __name__ == "__main__":
    # The caching allocator's default segments, not expandable ones: CUDA graphs' private
    # pools have had gaps and bugs with expandable segments across torch releases, and the
    # largest operand here (dy of 8192 x 14336 bf16, 235 MB) fragments little on an 80+ GB card.
    raise SystemExit(main())
