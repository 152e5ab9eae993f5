"""CUDA backend: hand-written kernels from csrc/cuda (module ``lorakern._cuda``).

The bandwidth-bound NF4 paths, where 16-byte loads and register-level decode
matter more than tiling:

* :func:`nf4_dequantize`: NF4 -> dense fp32 / fp16 / bf16, double quant decoded
  in the same kernel; bit-identical to the reference. The default for CUDA
  tensors: on an H200 it took 17 / 45 / 8 us for 4096x4096 / 14336x4096 /
  1024x4096 to bf16, against 25 / 75 / 10 us for the Triton kernel
  (benchmarks/results/gpu-20261126-h200).
* :func:`nf4_matmul` and :func:`qlora_linear_fwd` for ``M <= 16`` rows (decoding):
  a warp-per-row GEMV that streams the 4-bit weight once, fp32 accumulation,
  bias and the LoRA up-projection folded into the row sums. Larger M is left
  to the tensor-core kernels of other backends (:func:`supports` says so).

Every launch goes to torch's current stream of the tensors' device. The native
module is torch-free: it receives ``data_ptr()`` integers, sizes, dtype codes
and the stream handle; this file checks the tensors and allocates the outputs.
"""

from __future__ import annotations

import functools

import torch

from ..formats import nf4 as _nf4
from ..formats.nf4 import NF4Weight

try:
    from lorakern import _cuda
except ImportError as e:  # not built (no nvcc at install): other backends serve CUDA tensors
    _cuda = None
    _IMPORT_ERROR = str(e)

NAME = "cuda"

# dtype codes of csrc/include/lorakern/nf4_decode.h (DType).
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
GEMV_MAX_M = 16  # rows of x the GEMV kernel takes (lorakern._cuda.GEMV_MAX_M)
# Rows up to which the automatic dispatch picks the GEMV. H200, bf16, r = 16, do_bench
# medians (benchmarks/results/gpu-20261126-h200), GEMV + LoRA against dequantize + cuBLAS
# for 4096x4096, 14336x4096, 4096x14336: M = 1, 24 / 59 / 53 us against 66 / 129 / 128 us;
# M = 16, 174 / 541 / 563 us against 54 / 131 / 129 us. The GEMV grows about linearly with
# M (the 16-row kernel re-reads x per weight row and issues 16 FMAs per weight), so the
# lines cross near M = 3 on the large layers. M = 2..8 were not measured; the next GPU
# check sweeps them (benchmarks/bench_gpu.py) and this threshold follows that data.
GEMV_AUTO_MAX_M = 2
LORA_MAX_RANK = 256  # LoRA rank the GEMV keeps in shared memory (lorakern._cuda.LORA_MAX_RANK)
MIN_BLOCKSIZE = 64  # the kernels decode one absmax per 64 values

__all__ = ["availability", "supports", "declines", "nf4_dequantize", "nf4_matmul", "qlora_linear_fwd"]


def availability() -> tuple[bool, str]:
    if _cuda is None:
        return False, f"native module lorakern._cuda not built ({_IMPORT_ERROR})"
    if not torch.cuda.is_available():
        return False, "lorakern._cuda built, but torch sees no CUDA device"
    return True, "lorakern._cuda loaded"


def supports(op: str, *args) -> str | None:
    """None when this backend runs ``op(*args)``; else why not (the registry then falls back)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    qs = [a for a in args if isinstance(a, NF4Weight)]
    for t in tensors + [q.packed for q in qs]:
        if not t.is_cuda:  # not t.device.type: 0.3 us a tensor, on every op call
            return f"tensor on {t.device}; the CUDA kernels need CUDA tensors"
    for q in qs:
        if q.blocksize < MIN_BLOCKSIZE:
            return f"NF4 blocksize {q.blocksize} (the CUDA kernels decode one absmax per {MIN_BLOCKSIZE} values)"
    if op == "nf4_dequantize":
        return None if args[1] in _DTYPE_CODE else f"output dtype {args[1]} (float32, float16 or bfloat16 only)"
    if op not in ("nf4_matmul", "qlora_linear_fwd"):
        return f"{op} has no CUDA kernel"
    x, q = args[0], args[1]
    if x.dtype not in _DTYPE_CODE:
        return f"x of dtype {x.dtype} (float32, float16 or bfloat16 only)"
    if x.dim() != 2 or not 1 <= x.shape[0] <= GEMV_MAX_M:
        return f"x of shape {tuple(x.shape)}: the CUDA GEMV takes 1..{GEMV_MAX_M} rows (larger M belongs to a GEMM)"
    if len(q.shape) != 2:
        return f"NF4 weight of shape {q.shape} (needs [N, K])"
    for t in tensors[1:]:
        if t.is_floating_point() and t.dtype != x.dtype:
            return f"mixed dtypes ({t.dtype} with x {x.dtype})"
    if op == "qlora_linear_fwd" and args[3].shape[0] > LORA_MAX_RANK:
        return f"LoRA rank {args[3].shape[0]} > {LORA_MAX_RANK}"
    return None


def declines(op: str, *args) -> str | None:
    """Why the automatic dispatch should not pick this backend for a call it supports (None: pick it)."""
    if op in ("nf4_matmul", "qlora_linear_fwd") and args[0].shape[0] > GEMV_AUTO_MAX_M:
        return (f"{args[0].shape[0]} rows: dequantize + cuBLAS measured faster above {GEMV_AUTO_MAX_M} "
                "(see GEMV_AUTO_MAX_M)")
    return None


# ---------------------------------------------------------------------------------- helpers


def _module():
    if _cuda is None:
        raise RuntimeError(f"lorakern._cuda is not built ({_IMPORT_ERROR}); rebuild with nvcc available")
    return _cuda


def _stream(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _nf4_args(q: NF4Weight) -> tuple[dict, list[torch.Tensor]]:
    """Pointer arguments of ``q`` for the native calls, and the tensors to keep alive until the launch.

    A :class:`~lorakern.formats.nf4.CheckedNF4Weight` was validated by the op that
    called this backend, in the same call; every other weight is validated here.
    """
    if type(q) is not _nf4.CheckedNF4Weight:
        _nf4.validate(q, "q")
    if q.packed.device.type != "cuda":
        raise ValueError(f"q.packed is on {q.packed.device}; the cuda backend needs CUDA tensors")
    keep = [t.contiguous() for t in q.tensors()]
    packed, absmax, nested_absmax, nested_code, offset = keep
    dq = q.double_quant
    args = dict(
        packed=packed.data_ptr(),
        absmax=absmax.data_ptr(),
        nested_absmax=nested_absmax.data_ptr() if dq else 0,
        nested_code=nested_code.data_ptr() if dq else 0,
        offset=offset.data_ptr() if dq else 0,
        double_quant=dq,
        blocksize=q.blocksize,
    )
    return args, keep


def _operand(t: torch.Tensor, name: str, shape: tuple, x: torch.Tensor) -> torch.Tensor:
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must have shape {list(shape)}, got {tuple(t.shape)}")
    if t.dtype != x.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {x.dtype}")
    if t.device != x.device:
        raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
    return t.contiguous()


# -------------------------------------------------------------------------------------- ops


def nf4_dequantize(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``q.shape`` tensor of ``dtype`` (float32 / float16 / bfloat16), equal bit for bit to the reference."""
    if dtype not in _DTYPE_CODE:
        raise TypeError(f"dtype must be float32, float16 or bfloat16, got {dtype}")
    args, keep = _nf4_args(q)
    out = torch.empty(q.numel, dtype=dtype, device=q.device)
    _module().nf4_dequantize(**args, numel=q.numel, out=out.data_ptr(), out_dtype=_DTYPE_CODE[dtype],
                             device=out.device.index, stream=_stream(out.device))
    del keep  # the launch is enqueued on the stream the tensors were made on
    return out.reshape(q.shape)


def _gemv(x, q, bias, lora_A, lora_B, scaling, dropout_p, seed):
    if x.dim() != 2 or not 1 <= x.shape[0] <= GEMV_MAX_M:
        raise ValueError(f"x must be [M, K] with 1 <= M <= {GEMV_MAX_M} for the CUDA GEMV, got {tuple(x.shape)}")
    if x.dtype not in _DTYPE_CODE:
        raise TypeError(f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if len(q.shape) != 2 or q.shape[1] != x.shape[1]:
        raise ValueError(f"q must have shape [N, {x.shape[1]}] (K of x), got {list(q.shape)}")
    m, k = x.shape
    n = q.shape[0]
    args, keep = _nf4_args(q)
    if q.packed.device != x.device:
        raise ValueError(f"q is on {q.packed.device} but x is on {x.device}")
    x = x.contiguous()
    bias = None if bias is None else _operand(bias, "bias", (n,), x)
    y = torch.empty(m, n, dtype=x.dtype, device=x.device)
    lora = dict(r=0, lora_a=0, lora_b=0, scaling=0.0, dropout_p=0.0, seed=0, xa_out=0, workspace=0)
    xa = None
    if lora_A is not None:
        r = lora_A.shape[0]
        lora_A = _operand(lora_A, "lora_A", (r, k), x)
        lora_B = _operand(lora_B, "lora_B", (n, r), x)
        if seed.dtype != torch.int64 or seed.numel() != 1 or seed.device != x.device:
            raise ValueError(f"seed must be one int64 value on {x.device}, got {seed.dtype} {tuple(seed.shape)} on {seed.device}")
        seed = seed.contiguous()
        xa = torch.empty(m, r, dtype=x.dtype, device=x.device)
        workspace = torch.empty(_module().lora_workspace_floats(m, k, r), dtype=torch.float32, device=x.device)
        lora = dict(r=r, lora_a=lora_A.data_ptr(), lora_b=lora_B.data_ptr(), scaling=float(scaling),
                    dropout_p=float(dropout_p), seed=seed.data_ptr(), xa_out=xa.data_ptr(),
                    workspace=workspace.data_ptr())
    _module().nf4_gemv(x=x.data_ptr(), x_dtype=_DTYPE_CODE[x.dtype], m=m, n=n, k=k, **args,
                       bias=0 if bias is None else bias.data_ptr(), y=y.data_ptr(), **lora,
                       device=x.device.index, stream=_stream(x.device))
    del keep
    return y, xa


def nf4_matmul(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(q)^T + bias, for 1 <= M <= 16 (x, bias: one of fp32 / fp16 / bf16)."""
    return _gemv(x, q, bias, None, None, 0.0, 0.0, None)[0]


def qlora_linear_fwd(x, q: NF4Weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    """(y, xa) for 1 <= M <= 16: y = x W^T + bias + scaling * xa B^T, xa = drop(x) A^T ([M, r], x's dtype).

    x [M, K], lora_A [r, K] (r <= 256), lora_B [N, r], bias [N] or None, all one
    dtype; seed: int64 tensor with one element (the dropout mask of
    ``lorakern.reference.dropout``, generated in the kernel). ``scaling == 0``: no
    LoRA term (see :mod:`lorakern.reference`); the kernel's ``0 * xa B^T`` would be NaN
    where B is not finite, so it reads a zero B instead, and still writes xa in the
    same launch (the wide-output path of ``lorakern.ops.qlora_linear`` calls it so).
    """
    if scaling == 0.0 and lora_B.shape == (q.shape[0], lora_A.shape[0]):
        lora_B = _zeros(tuple(lora_B.shape), lora_B.dtype, lora_B.device)
    return _gemv(x, q, bias, lora_A, lora_B, scaling, dropout_p, seed)


@functools.lru_cache(maxsize=16)
def _zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # Read only, never written: one per layer shape (a model has a handful), no fill per call.
    return torch.zeros(shape, dtype=dtype, device=device)
