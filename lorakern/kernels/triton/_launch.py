"""Launch-side helpers: interpreter detection, autotune configs per architecture, small utilities.

Autotuned kernels are built lazily, on the first launch, for the architecture
of the device in use, so importing this package never initialises CUDA.
Under ``TRITON_INTERPRET=1`` every kernel gets one small config: benchmarking
configs in the interpreter would take minutes and prove nothing.
``LORAKERN_TRITON_AUTOTUNE=0`` uses the first (default) config of each list
instead of autotuning: tests that check results at many shapes then compile each
kernel variant once instead of once per config.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os

import torch
import triton
import triton.testing

from ...formats import nf4 as nf4_format
from ...formats.nf4 import NF4_CODE

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
AUTOTUNE = os.environ.get("LORAKERN_TRITON_AUTOTUNE", "1") != "0"


def interpreting() -> bool:
    """True when the kernels were defined in interpreter mode (they then run on CPU tensors)."""
    return INTERPRET


def upcast_dot(dtype: torch.dtype) -> bool:
    """Whether dot operands must be upcast to fp32: bf16 in the interpreter (it multiplies raw bits)."""
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 GEMMs follow torch's TF32 switch, so a float32 layer gives what ``x @ w.t()`` gives."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"


def device_guard(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the device of ``t``."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@functools.lru_cache(maxsize=None)
def nf4_code(device: torch.device) -> torch.Tensor:
    """The 16 NF4 code values on ``device`` (read-only; one small tensor per device)."""
    return NF4_CODE.to(device)


def nf4_operands(q) -> tuple[torch.Tensor, ...]:
    """(absmax, nested_absmax, nested_code, code table, offset) of NF4 weight ``q`` as kernel arguments.

    Contiguous (kernels index them as flat arrays). Without double quantization the nested
    tensors are empty and never read; the absmax stands in for them, since an empty CUDA
    tensor may have a null data pointer, which triton's launcher refuses.
    A weight that is not a :class:`~lorakern.formats.nf4.CheckedNF4Weight` (validated
    by the op in the same call) is validated here: the kernels index it unchecked.
    """
    if type(q) is not nf4_format.CheckedNF4Weight:
        nf4_format.validate(q, "q")
    absmax = q.absmax.contiguous()
    nested_absmax = q.nested_absmax.contiguous() if q.nested_absmax.numel() else absmax
    nested_code = q.nested_code.contiguous() if q.nested_code.numel() else absmax
    return absmax, nested_absmax, nested_code, nf4_code(q.device), q.offset.contiguous()


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def rank_block(r: int) -> int:
    """Tile width over the LoRA rank: tl.dot needs >= 16; ranks above 64 loop over 64-wide chunks."""
    return min(64, max(16, next_pow2(r)))


def m_bucket(m: int) -> int:
    """Autotune key for the row count: the next power of two. Training with variable sequence
    lengths changes M every step; keying on the exact M would re-benchmark every config each time."""
    return next_pow2(m)


@functools.lru_cache(maxsize=None)
def num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(t: torch.Tensor) -> int:
    return num_sms(t.device.index if t.device.index is not None else torch.cuda.current_device()) if t.is_cuda else 4


def _cfg(warps: int, stages: int, **blocks) -> triton.Config:
    return triton.Config(blocks, num_warps=warps, num_stages=stages)


# GEMM tiles (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages). sm_90 has 227 KiB of shared
# memory per block, sm_80 163 KiB: with bf16 operands a 128x256x64 tile needs 48 KiB
# per stage, so sm_90 takes 4 stages of it where sm_80 takes 3 of BLOCK_K = 32.
# The 16- and 32-row tiles serve decode-sized batches (M <= 32) without padding waste.
# The first entry of every list is the default when autotuning is off; it fits fp32 operands too.
_GEMM_TILES = {
    90: [(128, 128, 64, 4, 3), (128, 256, 64, 8, 3), (128, 128, 64, 8, 4), (64, 128, 64, 4, 4),
         (128, 64, 64, 4, 4), (64, 64, 64, 4, 4), (32, 128, 64, 4, 4), (16, 64, 128, 4, 4)],
    80: [(128, 128, 32, 4, 4), (128, 256, 32, 8, 3), (256, 128, 32, 8, 3), (64, 128, 32, 4, 4),
         (128, 64, 32, 4, 4), (64, 64, 32, 4, 4), (32, 128, 64, 4, 3), (16, 64, 128, 4, 3)],
}

# GEMM tiles when the weight is NF4, decoded in registers each iteration: the tile of
# BLOCK_N x BLOCK_K weights is decoded once per BLOCK_M rows of x, so tall tiles amortise it.
# Every entry compiles without spills (sm_90: 128x128x64 at 8 warps needs 128 registers a
# thread and 74 KiB of shared memory, so two programs share an SM and one decodes while the
# other's wgmma runs; 4 warps held the 128x128 fp32 accumulator in 128 registers a thread
# beside the decoded tile and reached the 255 cap). See benchmarks/results/triton-sass-analysis.md.
_NF4_GEMM_TILES = {
    90: [(128, 128, 64, 8, 3), (256, 128, 64, 8, 3), (128, 64, 64, 4, 4), (64, 128, 64, 4, 4),
         (64, 64, 64, 4, 4), (32, 128, 64, 4, 4), (16, 64, 128, 4, 4)],
    80: [(128, 128, 32, 8, 4), (256, 128, 32, 8, 3), (128, 128, 64, 8, 3), (64, 128, 32, 4, 4),
         (64, 64, 64, 4, 4), (32, 128, 32, 4, 4), (16, 64, 128, 4, 3)],
}

# NF4 GEMV tiles (BLOCK_N, BLOCK_K, warps): each program streams BLOCK_N rows of 4-bit weights;
# 16-128 rows keep 32-256 programs in flight for N = 1024..14336 on 132 SMs.
_GEMV_TILES = [(32, 256, 4), (16, 256, 4), (32, 128, 4), (64, 128, 8), (64, 256, 8), (128, 64, 8)]

# Transposed-operand GEMM (gradients, reduction over M): (BLOCK_J, BLOCK_L, BLOCK_M, warps, stages).
_TN_TILES = [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (128, 128, 32, 8, 3),
             (16, 128, 64, 4, 3), (128, 16, 64, 4, 3), (16, 64, 128, 4, 3), (64, 16, 128, 4, 3)]

# Skinny GEMM (x A^T, dy B: N = r): (BLOCK_M, BLOCK_K, warps, stages).
_SKINNY_TILES = [(64, 128, 4, 3), (128, 64, 4, 3), (32, 256, 4, 3), (16, 256, 4, 3)]


def _tuned_or_default(configs: list[triton.Config]) -> list[triton.Config]:
    return configs if AUTOTUNE else configs[:1]


def _arch() -> int:
    major, _ = torch.cuda.get_device_capability()
    return 90 if major >= 9 else 80


def gemm_configs() -> list[triton.Config]:
    if INTERPRET:
        return [_cfg(4, 1, BLOCK_M=16, BLOCK_N=64, BLOCK_K=32, GROUP_M=4)]
    return _tuned_or_default([_cfg(w, s, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8) for m, n, k, w, s in _GEMM_TILES[_arch()]])


def nf4_gemm_configs() -> list[triton.Config]:
    """GEMM configs for an NF4 weight with K % blocksize == 0 (decoded per tile in registers)."""
    if INTERPRET:
        return gemm_configs()
    return _tuned_or_default([_cfg(w, s, BLOCK_M=m, BLOCK_N=n, BLOCK_K=k, GROUP_M=8)
                              for m, n, k, w, s in _NF4_GEMM_TILES[_arch()]])


def gemm_configs_unpipelined() -> list[triton.Config]:
    """The NF4 GEMM tiles with one pipeline stage, for NF4 weights whose K is not a multiple of
    the blocksize: their per-weight gathers (6 bytes of indices and scales per weight), when
    multi-buffered, need up to 260 KB of shared memory for a 128x128 fp32 tile on sm_80."""
    return [triton.Config(c.kwargs, num_warps=c.num_warps, num_stages=1) for c in nf4_gemm_configs()]


def gemv_configs() -> list[triton.Config]:
    if INTERPRET:
        return [_cfg(4, 1, BLOCK_N=16, BLOCK_K=128)]
    return _tuned_or_default([_cfg(w, 2, BLOCK_N=n, BLOCK_K=k) for n, k, w in _GEMV_TILES])


def tn_configs() -> list[triton.Config]:
    if INTERPRET:
        return [_cfg(4, 1, BLOCK_J=16, BLOCK_L=32, BLOCK_M=16)]
    return _tuned_or_default([_cfg(w, s, BLOCK_J=j, BLOCK_L=l, BLOCK_M=m) for j, l, m, w, s in _TN_TILES])


def skinny_configs() -> list[triton.Config]:
    if INTERPRET:
        return [_cfg(4, 1, BLOCK_M=16, BLOCK_K=32)]
    return _tuned_or_default([_cfg(w, s, BLOCK_M=m, BLOCK_K=k) for m, k, w, s in _SKINNY_TILES])


# 5 ms warm-up and 20 ms of timing per config instead of triton's 25 + 100: a new
# shape is tuned in ~0.3 s over 8 configs instead of ~1 s, and the tiles that win
# do so by more than the noise of a 20 ms run.
_AUTOTUNE_WARMUP_MS, _AUTOTUNE_REP_MS = 5, 20


def _autotune_bench(kernel_call, quantiles):
    return triton.testing.do_bench(kernel_call, warmup=_AUTOTUNE_WARMUP_MS, rep=_AUTOTUNE_REP_MS, quantiles=quantiles)


def _autotune_timing() -> dict:
    """The ``triton.autotune`` keywords that set the timing: ``do_bench`` where it exists
    (triton >= 3.2, which deprecates ``warmup``/``rep``), else ``warmup``/``rep`` (triton 3.0, torch 2.4's)."""
    if "do_bench" in inspect.signature(triton.autotune).parameters:
        return {"do_bench": _autotune_bench}
    return {"warmup": _AUTOTUNE_WARMUP_MS, "rep": _AUTOTUNE_REP_MS}


class Tuned:
    """An autotuned kernel built on first use, for the device architecture then current.

    ``Tuned(jit_fn, configs_fn, key)[grid](*args, **constexprs)`` launches it.
    """

    def __init__(self, fn, configs, key):
        self.fn, self.configs, self.key = fn, configs, key
        self._kernels: dict[int, object] = {}

    def __getitem__(self, grid):
        arch = 0 if INTERPRET else _arch()
        kernel = self._kernels.get(arch)
        if kernel is None:
            kernel = triton.autotune(configs=self.configs(), key=self.key, **_autotune_timing())(self.fn)
            self._kernels[arch] = kernel
        return kernel[grid]

    def best_config(self):
        """The configs chosen so far, per architecture (for benchmarks reports)."""
        return {arch: getattr(k, "best_config", None) for arch, k in self._kernels.items()}
