"""CPU backend: C++ kernels from csrc/cpu (module ``lorakern._C``) orchestrated with torch GEMMs.

Same functions and signatures as :mod:`lorakern.reference` (2-D inputs). What runs where:

* ``nf4_quantize`` / ``nf4_dequantize``: C++ (OpenMP over blocks; scalar, AVX2 and
  AVX-512 paths picked at run time; ``LORAKERN_CPU_ISA=scalar|avx2|avx512`` forces one).
  Bit-identical to :mod:`lorakern.formats.nf4`.
* NF4 matmul, small ``M`` (decode; see ``GEMV_MAX_M``): one fused C++ GEMV that reads the 4-bit weight
  once, decodes it in registers and adds bias and the LoRA term in the same pass.
* NF4 matmul, larger ``M`` (training): C++ decodes one cache-sized panel of W into a
  reusable buffer and torch's GEMM multiplies it straight into a slice of the output,
  so the dense weight never exists in full. Forward panels are rows of W (slices of
  y's columns); the input gradient ``dy @ W`` uses column panels of W (slices of dx's
  columns), so every output element is written by one GEMM with one rounding.
* LoRA: the base GEMM, then the low-rank term accumulated into the same output with
  ``addmm_`` (one small GEMM, no separate pass to add two full-size tensors).
* Dropout: the counter-based hash of :mod:`lorakern.reference.dropout`, computed in
  C++ (``drop(x)`` into a buffer for the ``A`` GEMM, regenerated in backward, and
  ``drop'`` fused into the accumulation of the LoRA input gradient). No mask is stored.
"""

from __future__ import annotations

import math
import os
import threading

import torch

from ..formats import nf4 as _nf4
from ..formats.nf4 import NF4Weight

try:
    from lorakern import _C
except ImportError as e:  # not built: the reference backend serves CPU tensors
    _C = None
    _IMPORT_ERROR = str(e)

NAME = "cpu"
ISA_ENV_VAR = "LORAKERN_CPU_ISA"
ISA_NAMES = ("scalar", "avx2", "avx512")
_DTYPE_CODE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

# Up to this many rows of x the fused GEMV beats decode-a-panel + torch GEMM.
# Measured at K = N = 4096 on one Zen 4 core: fp32 GEMV 1.8 / 4.1 / 11.5 ms at
# M = 1 / 4 / 16 against 6.9 / 10.7 / 16.6 ms for panels; bf16 GEMV (AVX512_BF16
# dot products) 2.3 / 3.4 / 3.6 / 6.6 ms at M = 1 / 4 / 8 / 16 against 3.8 / 5.9 /
# 5.5 / 6.1 ms. Since then M = 1 has its own kernel (0.68 ms fp32, 0.47 ms bf16), and
# so has bf16 x at 2 <= M <= 16 with blocksize 64 on AVX512_BF16 CPUs: 0.70 / 1.10 /
# 2.0 / 3.0 / 4.0 ms at M = 2 / 4 / 8 / 12 / 16 (panels at M = 12 / 16: 4.8 / 5.4 ms;
# bitsandbytes' Linear4bit 0.67 / 0.99 / 1.94 / 2.86 / 3.88 ms), so there bf16 takes
# the GEMV up to 16 rows (GEMV_MAX_M_BF16_DOT); elsewhere up to 8. fp32 x at 2 <= M <= 16
# has the same kernel with fp32 weights and FMAs: 1.04 / 1.75 / 3.57 / 7.16 ms at M = 2 / 4
# / 8 / 16 (the general kernel: 11.1 ms at M = 16; bitsandbytes rounds fp32 x to bf16
# and runs its bf16 kernel, 0.68 / 1.01 / 1.98 / 3.87 ms).
GEMV_MAX_M = {torch.float32: 16, torch.bfloat16: 8, torch.float16: 16}
GEMV_MAX_M_BF16_DOT = 16


def _gemv_max_m(dtype: torch.dtype, q: NF4Weight) -> int:
    if dtype == torch.bfloat16 and q.blocksize == 64 and q.shape[1] % 64 == 0 and _C.has_bf16_dot() and isa() == 2:
        return GEMV_MAX_M_BF16_DOT
    return GEMV_MAX_M[dtype]

# Decoded panel size, in weight elements (8 MiB in bf16): 1024 rows of W at
# K = 4096. Measured at 512 x 4096 x 4096 bf16, one Zen 4 core, fwd + bwd vs the
# dense frozen layer: 256-row panels 1.18-1.23x, 1024 rows 1.13x, 2048 rows 1.09x,
# the whole weight 1.05x (noisy: +-5%). Every panel is a separate GEMM call with its
# own setup and packing of x, which small panels pay N / rows times; 1024 rows
# caps the scratch buffer at a quarter of a 4096 x 4096 weight.
PANEL_ELEMENTS = 1024 * 4096


def _panel_rows(n: int, k: int) -> int:
    """Rows (forward) or columns (backward) of W per decoded panel: PANEL_ELEMENTS / width, at least 64."""
    return min(n, max(64, PANEL_ELEMENTS // k))


# Decoded panels live in a per-thread scratch buffer reused across calls: a fresh
# 8 MiB tensor costs 2048 page faults per call (several ms on the VM the numbers
# above come from). Panels never leave this module.
_scratch = threading.local()


# Outputs of at least this many bytes get transparent huge pages before their first
# touch: on the KVM guest of the measurements, the 4 KiB page faults of a fresh
# 32 MiB bf16 dequantize output cost 17 ms against a 2.6 ms decode (5.6 ms in all
# with huge pages); a 4 MiB activation output costs ~4 ms of faults.
HUGE_PAGE_MIN_BYTES = 4 * 2**20


def _empty(shape, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty for an output this module writes first (huge pages when large)."""
    out = torch.empty(shape, dtype=dtype)
    nbytes = out.numel() * out.element_size()
    if nbytes >= HUGE_PAGE_MIN_BYTES:
        _C.advise_huge_pages(out.data_ptr(), nbytes)
    return out


def _panel_buffer(numel: int, dtype: torch.dtype) -> torch.Tensor:
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get(dtype)
    if buf is None or buf.numel() < numel:
        buf = bufs[dtype] = torch.empty(numel, dtype=dtype)
    return buf[:numel]


def availability() -> tuple[bool, str]:
    if _C is None:
        return False, f"native module lorakern._C not built ({_IMPORT_ERROR})"
    return True, f"lorakern._C loaded (best ISA path: {ISA_NAMES[_C.best_isa()]})"


def isa() -> int:
    """The ISA path to run: ``LORAKERN_CPU_ISA`` if set (read on every call), else the best one."""
    best = _C.best_isa()
    name = os.environ.get(ISA_ENV_VAR, "").strip().lower()
    if not name or name == "auto":
        return best
    if name not in ISA_NAMES:
        raise ValueError(f"{ISA_ENV_VAR}={name!r}: expected one of {ISA_NAMES} or 'auto'")
    if ISA_NAMES.index(name) > best:
        raise RuntimeError(f"{ISA_ENV_VAR}={name} but this CPU supports at most {ISA_NAMES[best]}")
    return ISA_NAMES.index(name)


# ---------------------------------------------------------------------------- argument checks


def supports(op: str, *args) -> str | None:
    """None when this backend runs ``op`` on ``args``; else why not (the registry then falls back).

    The registry asks on every op call, so this is one pass over ``args`` with
    ``is_cpu`` (``t.device.type`` builds a device and a string: 0.3 us a tensor).
    """
    tensors = []
    qs = ()
    for a in args:
        if isinstance(a, torch.Tensor):
            if not a.is_cpu:
                return f"tensor on {a.device}; this backend runs CPU tensors"
            tensors.append(a)
        elif isinstance(a, NF4Weight):
            qs += (a,)
    for q in qs:
        if not q.packed.is_cpu:
            return f"tensor on {q.packed.device}; this backend runs CPU tensors"
    for q in qs:
        if q.blocksize % 32 or not 32 <= q.blocksize <= 4096:
            return f"blocksize {q.blocksize} is not a multiple of 32 in [32, 4096]"
    if op == "nf4_quantize":
        return None if args[0].dtype in _DTYPE_CODE else f"cannot quantize {args[0].dtype}"
    if op == "nf4_dequantize":
        return None if args[1] in _DTYPE_CODE else f"output dtype {args[1]} (float32, bfloat16 or float16 only)"
    for t in tensors:
        if t.dtype not in _DTYPE_CODE and t.is_floating_point():
            return f"dtype {t.dtype} (float32, bfloat16 or float16 only)"
    return None


def _check_dtype(t: torch.Tensor, name: str) -> int:
    if t.dtype not in _DTYPE_CODE:
        raise TypeError(f"{name} must be float32, bfloat16 or float16 for the cpu backend, got {t.dtype}")
    return _DTYPE_CODE[t.dtype]


def _view(q: NF4Weight):
    """The C++ view of ``q``, after checking what the kernels read blindly.

    A :class:`~lorakern.formats.nf4.CheckedNF4Weight` was validated by the op that
    called this backend, in the same call; every other weight is validated here.
    """
    if type(q) is not _nf4.CheckedNF4Weight:
        _nf4.validate(q, "q")
    packed, absmax, nested_absmax, nested_code, offset = q.tensors()
    for name, t in zip(("packed", "absmax", "nested_absmax", "nested_code", "offset"), q.tensors()):
        if not t.is_cpu:
            raise ValueError(f"q.{name} is on {t.device}; the cpu backend needs CPU tensors")
        if not t.is_contiguous():
            raise ValueError(f"q.{name} must be contiguous")
    dq = absmax.dtype == torch.uint8
    return _C.NF4View(packed.data_ptr(), absmax.data_ptr(), dq, nested_absmax.data_ptr() if dq else 0,
                      nested_code.data_ptr() if dq else 0, offset.data_ptr(), math.prod(q.shape), q.blocksize)


def _check_x(x: torch.Tensor, k: int, name: str = "x") -> torch.Tensor:
    _check_dtype(x, name)
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"{name} must be [M, {k}], got {tuple(x.shape)}")
    return x.contiguous()


# ---------------------------------------------------------------------------------------- NF4


def nf4_quantize(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> NF4Weight:
    """NF4 of ``w`` (fp32/bf16/fp16, any shape): bit-identical to :func:`lorakern.formats.nf4.quantize`."""
    _nf4.check_weight_for_quantize(w, "weight")
    _nf4._check_blocksize(blocksize)
    flat = w.detach().reshape(-1)
    flat = (flat.float() if flat.dtype == torch.float16 else flat).contiguous()  # the kernel reads f32 / bf16
    n = flat.numel()
    packed = torch.empty((n + 1) // 2, dtype=torch.uint8)
    absmax = torch.empty(-(-n // blocksize), dtype=torch.float32)
    _C.nf4_quantize(flat.data_ptr(), _DTYPE_CODE[flat.dtype], n, blocksize, packed.data_ptr(), absmax.data_ptr())
    return _nf4.assemble(packed, absmax, tuple(w.shape), blocksize, w.dtype, double_quant)


def nf4_dequantize(q: NF4Weight, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``q.shape`` tensor in ``dtype`` (fp32/bf16/fp16); bit-identical to the reference."""
    view = _view(q)
    if dtype not in _DTYPE_CODE:
        raise TypeError(f"dtype must be float32, bfloat16 or float16 for the cpu backend, got {dtype}")
    out = _empty(q.shape, dtype)
    n = q.numel
    # Non-temporal stores once the output outgrows L2: it is not read back soon.
    _C.nf4_dequantize_2d(view, 0, 1, 0, n, n, out.data_ptr(), n, _DTYPE_CODE[dtype], isa(), n * out.element_size() > 2**21)
    return out


def _same_dtype(t: torch.Tensor | None, name: str, dtype: torch.dtype) -> None:
    if t is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but x has {dtype}; the cpu backend needs one dtype")


def _gemv(x, q, view, bias, xa=None, lora_B=None, scaling=0.0) -> torch.Tensor:
    """y = x W^T + bias + scaling * xa B^T with the fused C++ GEMV (M <= 16)."""
    _same_dtype(bias, "bias", x.dtype)
    _same_dtype(lora_B, "lora_B", x.dtype)
    m, k = x.shape
    n = q.shape[0]
    # bf16 x goes in as is: the C++ side makes the fp32 copy only for the paths that
    # read it (not the M = 1 bf16 kernel; the copy took 1.8 us of a 40 us 1536 x 576 call).
    xf = None if x.dtype == torch.bfloat16 else x.float().contiguous()
    y = torch.empty((m, n), dtype=x.dtype)
    xas = (xa.float() * scaling).contiguous() if xa is not None else None
    lb = lora_B.contiguous() if lora_B is not None else None
    b = bias.contiguous() if bias is not None else None
    _C.nf4_gemv(view, xf.data_ptr() if xf is not None else 0, m, n, k, xas.data_ptr() if xas is not None else 0,
                lb.data_ptr() if lb is not None else 0, _DTYPE_CODE[x.dtype], lb.shape[1] if lb is not None else 0,
                b.data_ptr() if b is not None else 0, _DTYPE_CODE[x.dtype], y.data_ptr(), _DTYPE_CODE[y.dtype], n, isa(),
                x.data_ptr() if x.dtype == torch.bfloat16 else 0)
    return y


def _panel_forward(x, q, view, bias, xa=None, lora_B=None, scaling=0.0) -> torch.Tensor:
    """y = x W^T + bias (+ scaling * xa B^T), one decoded panel of W rows at a time."""
    m, k = x.shape
    n = q.shape[0]
    code, path = _DTYPE_CODE[x.dtype], isa()
    y = _empty((m, n), x.dtype)
    rows = _panel_rows(n, k)
    buf = _panel_buffer(rows * k, x.dtype).view(rows, k)
    for n0 in range(0, n, rows):
        p = min(rows, n - n0)
        w = buf[:p]
        _C.nf4_dequantize_2d(view, n0, p, 0, k, k, w.data_ptr(), k, code, path)
        yp = y[:, n0:n0 + p]
        if bias is None:
            torch.mm(x, w.t(), out=yp)
        else:
            torch.addmm(bias[n0:n0 + p], x, w.t(), out=yp)
        if xa is not None:
            yp.addmm_(xa, lora_B[n0:n0 + p].t(), alpha=scaling)
    return y


def _panel_backward(dy, q, view, g=None, lora_A=None, scaling=0.0, dropout=None) -> torch.Tensor:
    """dx = dy W (+ scaling * drop'(g A)), one decoded panel of W columns at a time.

    ``dropout`` is None or (key, threshold, 1 / (1 - p)).
    """
    m, n = dy.shape
    k = q.shape[1]
    code, path = _DTYPE_CODE[dy.dtype], isa()
    dx = _empty((m, k), dy.dtype)
    cols = _panel_rows(k, n)
    buf = _panel_buffer(n * cols, dy.dtype)
    for k0 in range(0, k, cols):
        p = min(cols, k - k0)
        w = buf[: n * p].view(n, p)
        _C.nf4_dequantize_2d(view, 0, n, k0, p, k, w.data_ptr(), p, code, path)
        dxp = dx[:, k0:k0 + p]
        torch.mm(dy, w, out=dxp)
        if g is None:
            continue
        if dropout is None:
            dxp.addmm_(g, lora_A[:, k0:k0 + p], alpha=scaling)
        else:
            key, threshold, inv_keep = dropout
            t = torch.mm(g, lora_A[:, k0:k0 + p])
            args = _C.DropoutArgs(m, p, p, k, k, k0, key, threshold, scaling * inv_keep)
            _C.dropout_add(args, t.data_ptr(), code, dx.data_ptr() + k0 * dx.element_size(), code, path)
    return dx


def nf4_matmul(x: torch.Tensor, q: NF4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """y [M, N] = x [M, K] @ dequant(q)^T + bias [N]; x fp32/bf16/fp16."""
    view = _view(q)
    x = _check_x(x, q.shape[1])
    if x.shape[0] <= _gemv_max_m(x.dtype, q):
        return _gemv(x, q, view, bias)
    return _panel_forward(x, q, view, bias)


def nf4_matmul_t(dy: torch.Tensor, q: NF4Weight) -> torch.Tensor:
    """dx [M, K] = dy [M, N] @ dequant(q)."""
    view = _view(q)
    dy = _check_x(dy, q.shape[0], "dy")
    return _panel_backward(dy, q, view)


# --------------------------------------------------------------------------------------- LoRA


def _dropout_params(seed: torch.Tensor, p: float):
    """(key, threshold, 1 / (1 - p)) for the C++ dropout kernels; None when p == 0."""
    if p == 0.0:
        return None
    return _C.dropout_key(int(seed.reshape(-1)[0])), _C.dropout_threshold(p), 1.0 / (1.0 - p)


def _dropped(x: torch.Tensor, dropout) -> torch.Tensor:
    """drop(x) (x itself when there is no dropout)."""
    if dropout is None:
        return x
    key, threshold, inv_keep = dropout
    m, k = x.shape
    out = torch.empty_like(x)
    _C.dropout_apply(_C.DropoutArgs(m, k, k, k, k, 0, key, threshold, inv_keep), x.data_ptr(), out.data_ptr(),
                     _DTYPE_CODE[x.dtype], isa())
    return out


# A bf16 / fp16 call with at most this many rows, on a layer at least this wide both ways,
# does its rank-r GEMMs in float32: there torch's bf16 CPU GEMM costs ~17-28 us a call
# whatever M and r (1 x 576 x 16 included; one Zen 4 core), fp32 ~3-14 us with the casts.
# At 1 x 576 x 1536, r = 16 that was ~130 us of a 720 us LoRA forward + backward. Below
# ~512 the bf16 GEMM is the cheaper one (1 x 64 x 16: 2.5 against 5.3 us with the casts);
# by M = 64 the two are equal. Sums are fp32 either way; the forward's LoRA term and the
# input gradient's LoRA term are rounded to the input dtype before they are added (one
# rounding more than the fused bf16 addmm_, within the dtype's tolerance).
SMALL_M_FP32_LORA = 16
WIDE_FP32_LORA = 512


def _fp32_lora(t: torch.Tensor, k: int, n: int) -> bool:
    return t.dtype != torch.float32 and t.shape[0] <= SMALL_M_FP32_LORA and min(k, n) >= WIDE_FP32_LORA


def _lora_in(x: torch.Tensor, lora_A: torch.Tensor, dropout, n: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(xa = drop(x) A^T in x's dtype, the same in float32 or None); ``n``: the layer's output features."""
    xd = _dropped(x, dropout)
    if _fp32_lora(x, x.shape[1], n):
        xa32 = torch.mm(xd.float(), lora_A.float().t())
        return xa32.to(x.dtype), xa32
    return torch.mm(xd, lora_A.t()), None


def _lora_param_grads(dy, x, xa, lora_A, lora_B, scaling, dropout):
    """g = dy B, dA = scaling g^T drop(x), dB = scaling dy^T xa (g float32 at decode sizes, see SMALL_M_FP32_LORA).

    At scaling 0 there is no LoRA term (see :mod:`lorakern.reference`): g is None, dA and dB zero.
    """
    if scaling == 0.0:
        return None, torch.zeros_like(lora_A), torch.zeros_like(lora_B)
    if _fp32_lora(dy, x.shape[1], dy.shape[1]):
        dyf = dy.float()
        g = torch.mm(dyf, lora_B.float())
        d_lora_A = torch.mm(g.t(), _dropped(x, dropout).float()).mul_(scaling).to(lora_B.dtype)
        d_lora_B = torch.mm(dyf.t(), xa.float()).mul_(scaling).to(lora_B.dtype)
        return g, d_lora_A, d_lora_B
    g = torch.mm(dy, lora_B)
    d_lora_A = torch.mm(g.t(), _dropped(x, dropout)).mul_(scaling)
    d_lora_B = torch.mm(dy.t(), xa).mul_(scaling)
    return g, d_lora_A, d_lora_B


def lora_linear_fwd(x, weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    """y = x W^T + bias + scaling * xa B^T, xa = drop(x) A^T; returns (y [M, N], xa [M, r])."""
    x = _check_x(x, weight.shape[1])
    y = _empty((x.shape[0], weight.shape[0]), x.dtype)
    if bias is None:
        torch.mm(x, weight.t(), out=y)
    else:
        torch.addmm(bias, x, weight.t(), out=y)
    xa, xa32 = _lora_in(x, lora_A, _dropout_params(seed, dropout_p), weight.shape[0])
    if scaling == 0.0:  # no LoRA term (see lorakern.reference): addmm_'s 0 * inf would be NaN
        return y, xa
    if xa32 is not None:
        y.add_(torch.mm(xa32, lora_B.float().t()).mul_(scaling).to(y.dtype))
    else:
        y.addmm_(xa, lora_B.t(), alpha=scaling)
    return y, xa


def _add_lora_dx_(dx, g, lora_A, scaling: float, dropout) -> None:
    """dx += drop'(scaling * g A) in place."""
    if dropout is None and g.dtype == dx.dtype:
        dx.addmm_(g, lora_A, alpha=scaling)
    elif dropout is None:  # g in fp32 (see SMALL_M_FP32_LORA)
        dx.add_(torch.mm(g, lora_A.to(g.dtype)).mul_(scaling).to(dx.dtype))
    else:
        m, k = dx.shape
        t = torch.mm(g, lora_A.to(g.dtype))
        _C.dropout_add(_C.DropoutArgs(m, k, k, k, k, 0, dropout[0], dropout[1], scaling * dropout[2]), t.data_ptr(),
                       _DTYPE_CODE[t.dtype], dx.data_ptr(), _DTYPE_CODE[dx.dtype], isa())


def lora_linear_bwd(dy, x, xa, weight, lora_A, lora_B, scaling: float, dropout_p: float, seed, need_dx: bool,
                    need_dweight: bool):
    """(dx | None, dW | None, dA, dB); see :mod:`lorakern.reference` for the math."""
    x = _check_x(x, weight.shape[1])
    dy = _check_x(dy, weight.shape[0], "dy")
    dropout = _dropout_params(seed, dropout_p)
    g, d_lora_A, d_lora_B = _lora_param_grads(dy, x, xa, lora_A, lora_B, scaling, dropout)
    dx = None
    if need_dx:
        dx = torch.mm(dy, weight, out=_empty(x.shape, x.dtype))
        if g is not None:
            _add_lora_dx_(dx, g, lora_A, scaling, dropout)
    dweight = torch.mm(dy.t(), x) if need_dweight else None
    return dx, dweight, d_lora_A, d_lora_B


def qlora_linear_fwd(x, q: NF4Weight, bias, lora_A, lora_B, scaling: float, dropout_p: float, seed):
    """lora_linear_fwd with an NF4 base: fused GEMV for M <= 16, decoded panels above."""
    view = _view(q)
    x = _check_x(x, q.shape[1])
    xa, _ = _lora_in(x, lora_A, _dropout_params(seed, dropout_p), q.shape[0])
    # scaling 0: no LoRA term (see lorakern.reference; ops.qlora_linear with out_dtype adds it itself)
    term = (xa, lora_B, scaling) if scaling != 0.0 else ()
    if x.shape[0] <= _gemv_max_m(x.dtype, q):
        return _gemv(x, q, view, bias, *term), xa
    return _panel_forward(x, q, view, bias, *term), xa


def qlora_linear_bwd(dy, x, xa, q: NF4Weight, lora_A, lora_B, scaling: float, dropout_p: float, seed, need_dx: bool):
    """(dx | None, dA, dB): the LoRA input gradient is folded into each panel of dy W."""
    view = _view(q)
    x = _check_x(x, q.shape[1])
    dy = _check_x(dy, q.shape[0], "dy")
    dropout = _dropout_params(seed, dropout_p)
    g, d_lora_A, d_lora_B = _lora_param_grads(dy, x, xa, lora_A, lora_B, scaling, dropout)
    g = None if g is None else g.to(dy.dtype)
    dx = _panel_backward(dy, q, view, g, lora_A, scaling, dropout) if need_dx else None
    return dx, d_lora_A, d_lora_B
