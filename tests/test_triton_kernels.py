"""Triton backend against the float64 reference.

Without a GPU every kernel runs under the Triton interpreter on CPU tensors.
triton decides interpreted-or-compiled when a kernel is defined (when
``lorakern.kernels.triton`` is first imported), so TRITON_INTERPRET=1 must be
set before any module of the session imports it: tests/conftest.py sets it for
the whole pytest process when there is no GPU, and this module sets it too for
runs of this file alone. If the kernels were nevertheless defined compiled on a
machine without CUDA, the module is skipped with that reason rather than failing
on a CPU tensor.

With a GPU the same small-shape tests run compiled on CUDA tensors, and the
``gpu``-marked tests add realistic Llama-3-8B shapes in bf16.

Time on the 2-core development machine (interpreter, ``-m "not slow"``): about 50 s
of CPU time, 35-110 s wall depending on load; the row-split gradient test (M = 1030)
is the longest at ~10 s. The ``slow`` compile test takes ~4 minutes on an empty
triton cache.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton")

import lorakern.reference as ref  # noqa: E402
from lorakern.formats import nf4  # noqa: E402
from lorakern.kernels import triton as tk  # noqa: E402
from lorakern.kernels.triton import _launch  # noqa: E402
from lorakern.kernels.triton.matmul import skinny_matmul  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
if not CUDA and not _launch.interpreting():
    pytest.skip("Triton kernels were defined compiled (TRITON_INTERPRET was not 1 when lorakern.kernels.triton was "
                "first imported) and there is no GPU", allow_module_level=True)
_AVAILABLE, _WHY = tk.availability()
if not _AVAILABLE:  # e.g. triton 3.0's interpreter with numpy 2 (wrong results, see availability())
    pytest.skip(f"Triton backend unavailable here: {_WHY}", allow_module_level=True)

EPS = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}


@pytest.fixture(autouse=True)
def poison_empty(monkeypatch):
    """Every float buffer from torch.empty starts as NaN, so an element a kernel fails to write shows up."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", empty)


def _rand(*shape, dtype, scale=1.0, gen):
    return (torch.randn(*shape, generator=gen, dtype=torch.float32) * scale).to(dtype).to(DEVICE)


def _rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| (want in float64)."""
    return ((got.double() - want).abs().max() / want.abs().max().clamp(min=1e-30)).item()


def _check(name: str, got: torch.Tensor, want64: torch.Tensor, torch_in_dtype: torch.Tensor, dtype: torch.dtype):
    """``got`` must be no worse than 2x PyTorch's own error in ``dtype`` (floor: 8 ulps of the largest value)."""
    assert got.dtype == dtype and got.shape == want64.shape, f"{name}: {got.dtype} {tuple(got.shape)}"
    bad = ~torch.isfinite(got)
    assert not bad.any(), f"{name}: {int(bad.sum())} NaN/inf values (unwritten?), first at {bad.nonzero()[0].tolist()}"
    limit = max(2.0 * _rel_err(torch_in_dtype, want64), 8 * EPS[dtype])
    err = _rel_err(got, want64)
    if err > limit:
        diff = (got.double() - want64).abs()
        where = diff.argmax().item()
        pytest.fail(f"{name}: relative error {err:.3g} > {limit:.3g}; {int((diff > limit * want64.abs().max()).sum())} "
                    f"elements off, worst at flat index {where}")


def _up(*ts):
    return [None if t is None else t.double() for t in ts]


def _seed(value: int) -> torch.Tensor:
    return torch.tensor([value], dtype=torch.int64, device=DEVICE)


# ------------------------------------------------------------------------------------ dropout


@pytest.mark.parametrize("seed,p", [(0, 0.5), (2**40 + 12345, 0.1), (-7, 0.9), (987654321, 0.25)])
def test_dropout_mask_is_bit_exact(seed, p):
    # drop(x) @ I is drop(x) itself (one nonzero term per sum), so the kernel's mask shows exactly.
    m, k = 33, 64
    x = torch.rand(m, k, dtype=torch.float32, device=DEVICE) + 0.5
    eye = torch.eye(k, dtype=torch.float32, device=DEVICE)
    prev = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        got = skinny_matmul(x, eye, p, _seed(seed))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = prev
    want = ref.apply_dropout(x, _seed(seed), p)
    assert torch.equal(got != 0, want != 0), f"mask differs at {int(((got != 0) != (want != 0)).sum())} elements"
    torch.testing.assert_close(got, want, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------------ NF4


@pytest.mark.parametrize("shape,double_quant", [((40, 96), True), ((7, 65), True), ((72, 136), False), ((3, 1000), True)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_nf4_dequantize(shape, double_quant, dtype):
    gen = torch.Generator().manual_seed(1)
    q = nf4.quantize(_rand(*shape, dtype=torch.float32, gen=gen), 64, double_quant)
    got = tk.nf4_dequantize(q, dtype)
    want = nf4.dequantize(q, dtype)
    assert got.shape == tuple(shape) and got.dtype == dtype
    # The interpreter computes exactly the reference's fp32 ops; compiled code may fuse
    # the absmax multiply-add into one FMA: 1 fp32 ulp in the absmax, at most 2 ulps of dtype in the result.
    tol = 0.0 if _launch.interpreting() else 2 * EPS[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=0)


def _run_ptx(asm: str, inputs: dict[str, "np.ndarray"]) -> dict[str, "np.ndarray"]:
    """Run the straight-line PTX of an inline-asm block on one warp per row of ``inputs``.

    Implements exactly the instructions the NF4 lookup uses (mov from %laneid, and, shr, prmt
    in its default mode, shfl.sync.idx) on uint32 registers of shape [warps, 32 lanes]; any
    other instruction fails the test, so the PTX cannot drift away from what is checked here.
    """
    import numpy as np

    regs = {name: np.asarray(v, dtype=np.uint32) for name, v in inputs.items()}
    warps = next(iter(regs.values())).shape[0]
    lane = np.broadcast_to(np.arange(32, dtype=np.uint32), (warps, 32))

    def val(op: str):
        op = op.strip()
        if op == "%laneid":
            return lane
        if op[0] in "0123456789":
            return np.full((warps, 32), int(op, 0), dtype=np.uint32)
        return regs[op]

    for line in asm.splitlines():
        line = line.strip().rstrip(";")
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        opcode, rest = line.split(None, 1)
        dst, *src = [o.strip() for o in rest.split(",")]
        if opcode == "mov.u32":
            out = val(src[0])
        elif opcode == "and.b32":
            out = val(src[0]) & val(src[1])
        elif opcode == "shr.b32":
            out = val(src[0]) >> val(src[1])
        elif opcode == "prmt.b32":
            a, b, c = val(src[0]).astype(np.uint64), val(src[1]).astype(np.uint64), val(src[2])
            pool = a | (b << np.uint64(32))  # bytes 0-3 from a, 4-7 from b
            out = np.zeros((warps, 32), dtype=np.uint32)
            for i in range(4):
                nib = (c >> np.uint32(4 * i)) & np.uint32(0xF)
                byte = ((pool >> ((nib & np.uint32(7)).astype(np.uint64) * np.uint64(8))) & np.uint64(0xFF)).astype(np.uint32)
                sign = np.where(byte & np.uint32(0x80), np.uint32(0xFF), np.uint32(0))
                out |= np.where(nib & np.uint32(8), sign, byte) << np.uint32(8 * i)
        elif opcode == "shfl.sync.idx.b32":
            a, b, c, member = val(src[0]), val(src[1]), val(src[2]), val(src[3])
            assert (member == 0xFFFFFFFF).all(), "the lookup expects the whole warp"
            seg = (c >> np.uint32(8)) & np.uint32(0x1F)
            max_lane = (lane & seg) | (c & np.uint32(0x1F) & ~seg)
            j = (lane & seg) | (b & np.uint32(0x1F) & ~seg)
            j = np.where(j > max_lane, lane, j)
            out = np.take_along_axis(a, j.astype(np.int64), axis=1)
        else:
            pytest.fail(f"instruction not modelled: {line}")
        regs[dst] = out.astype(np.uint32)
    return regs


def test_nf4_register_lookup_ptx_matches_code_table():
    """The PTX that decodes NF4 bytes in compiled kernels (no interpreter runs it), executed on a
    model of a warp for every 16-bit half-word in both halves of the input: each of the 8
    outputs must be the fp32 code of its nibble, bit for bit."""
    import numpy as np

    from lorakern.kernels.triton._device import NF4_LOOKUP_PTX

    rng = np.random.default_rng(0)
    low = np.arange(1 << 16, dtype=np.uint32)
    words = (low | (rng.permutation(low) << np.uint32(16))).reshape(-1, 32)
    regs = _run_ptx(NF4_LOOKUP_PTX.value, {"$8": words})
    code_bits = nf4.NF4_CODE.numpy().view(np.uint32)
    for byte in range(4):
        hi = (words >> np.uint32(8 * byte + 4)) & np.uint32(0xF)
        lo = (words >> np.uint32(8 * byte)) & np.uint32(0xF)
        np.testing.assert_array_equal(regs[f"${byte}"], code_bits[hi], err_msg=f"high nibble of byte {byte}")
        np.testing.assert_array_equal(regs[f"${4 + byte}"], code_bits[lo], err_msg=f"low nibble of byte {byte}")


# --------------------------------------------------------------------------------- LoRA linear

# (M, K, N, r, dtype, dropout_p, bias): a covering subset of M {1, 7, 33} x K {64, 96, 136} x N {40, 72}
# x r {1, 8, 16} x dtypes; r = 72 exercises the loop over 64-wide rank chunks.
LORA_CASES = [
    (1, 64, 40, 1, torch.float32, 0.0, True),
    (7, 96, 72, 8, torch.float16, 0.25, False),
    (33, 136, 40, 16, torch.bfloat16, 0.1, True),
    (33, 64, 72, 16, torch.float32, 0.5, True),
    (7, 136, 40, 8, torch.bfloat16, 0.0, False),
    (33, 96, 72, 1, torch.float16, 0.0, True),
    (33, 96, 40, 72, torch.float32, 0.3, False),
]


def _lora_inputs(m, k, n, r, dtype, with_bias, seed):
    gen = torch.Generator().manual_seed(seed)
    x = _rand(m, k, dtype=dtype, gen=gen)
    weight = _rand(n, k, dtype=dtype, scale=k**-0.5, gen=gen)
    bias = _rand(n, dtype=dtype, gen=gen) if with_bias else None
    lora_A = _rand(r, k, dtype=dtype, scale=k**-0.5, gen=gen)
    lora_B = _rand(n, r, dtype=dtype, scale=r**-0.5, gen=gen)
    dy = _rand(m, n, dtype=dtype, gen=gen)
    return x, weight, bias, lora_A, lora_B, dy


@pytest.mark.parametrize("m,k,n,r,dtype,p,with_bias", LORA_CASES)
def test_lora_linear_fwd_bwd(m, k, n, r, dtype, p, with_bias):
    x, weight, bias, lora_A, lora_B, dy = _lora_inputs(m, k, n, r, dtype, with_bias, seed=m * k + r)
    s, seed = 0.75, _seed(1234 + m)
    y, xa = tk.lora_linear_fwd(x, weight, bias, lora_A, lora_B, s, p, seed)
    y64, xa64 = ref.lora_linear_fwd(*_up(x, weight, bias, lora_A, lora_B), s, p, seed)
    yt, xat = ref.lora_linear_fwd(x, weight, bias, lora_A, lora_B, s, p, seed)
    _check("y", y, y64, yt, dtype)
    _check("xa", xa, xa64, xat, dtype)

    need_dx, need_dw = True, m != 7  # M = 7 runs without the weight gradient
    got = tk.lora_linear_bwd(dy, x, xa, weight, lora_A, lora_B, s, p, seed, need_dx, need_dw)
    want = ref.lora_linear_bwd(*_up(dy, x, xa, weight, lora_A, lora_B), s, p, seed, need_dx, need_dw)
    in_dtype = ref.lora_linear_bwd(dy, x, xa, weight, lora_A, lora_B, s, p, seed, need_dx, need_dw)
    for name, g, w, t in zip(("dx", "dweight", "d_lora_A", "d_lora_B"), got, want, in_dtype):
        if w is None:
            assert g is None, f"{name} returned although not requested"
        else:
            _check(name, g, w, t, dtype)


def test_weight_grads_split_over_rows():
    """M = 1030 splits the dA / dB reductions over rows (2 splits of 515 rows, not a multiple of
    the row tile) into fp32 partial sums; dropout is regenerated per split."""
    m, k, n, r = 1030, 64, 40, 8
    x, weight, bias, lora_A, lora_B, dy = _lora_inputs(m, k, n, r, torch.float16, False, seed=21)
    seed, s, p = _seed(77), 1.5, 0.3
    _, xa = tk.lora_linear_fwd(x, weight, bias, lora_A, lora_B, s, p, seed)
    got = tk.lora_linear_bwd(dy, x, xa, weight, lora_A, lora_B, s, p, seed, True, True)
    want = ref.lora_linear_bwd(*_up(dy, x, xa, weight, lora_A, lora_B), s, p, seed, True, True)
    in_dtype = ref.lora_linear_bwd(dy, x, xa, weight, lora_A, lora_B, s, p, seed, True, True)
    for name, g, w, t in zip(("dx", "dweight", "d_lora_A", "d_lora_B"), got, want, in_dtype):
        _check(name, g, w, t, torch.float16)


def test_strided_operands():
    """Kernels take strides: x with column stride 2, a transposed weight view, a sliced lora_B."""
    m, k, n, r = 7, 64, 40, 8
    x, weight, bias, lora_A, lora_B, dy = _lora_inputs(m, k, n, r, torch.float32, True, seed=5)
    x_strided = torch.stack([x, torch.full_like(x, float("nan"))], dim=2).reshape(m, 2 * k)[:, ::2]
    weight_t = weight.t().contiguous().t()
    lora_B_wide = torch.cat([lora_B, torch.full_like(lora_B, float("nan"))], dim=1)[:, :r]
    assert not x_strided.is_contiguous() and not weight_t.is_contiguous() and not lora_B_wide.is_contiguous()
    seed = _seed(3)
    y, xa = tk.lora_linear_fwd(x_strided, weight_t, bias, lora_A, lora_B_wide, 0.5, 0.2, seed)
    y64, xa64 = ref.lora_linear_fwd(*_up(x, weight, bias, lora_A, lora_B), 0.5, 0.2, seed)
    yt, xat = ref.lora_linear_fwd(x, weight, bias, lora_A, lora_B, 0.5, 0.2, seed)
    _check("y", y, y64, yt, torch.float32)
    _check("xa", xa, xa64, xat, torch.float32)
    got = tk.lora_linear_bwd(dy, x_strided, xa, weight_t, lora_A, lora_B_wide, 0.5, 0.2, seed, True, True)
    want = ref.lora_linear_bwd(*_up(dy, x, xa, weight, lora_A, lora_B), 0.5, 0.2, seed, True, True)
    in_dtype = ref.lora_linear_bwd(dy, x, xa, weight, lora_A, lora_B, 0.5, 0.2, seed, True, True)
    for name, g, w, t in zip(("dx", "dweight", "d_lora_A", "d_lora_B"), got, want, in_dtype):
        _check(name, g, w, t, torch.float32)


def test_lora_linear_bwd_without_dx():
    x, weight, bias, lora_A, lora_B, dy = _lora_inputs(7, 64, 40, 8, torch.float32, False, seed=3)
    seed = _seed(5)
    _, xa = tk.lora_linear_fwd(x, weight, bias, lora_A, lora_B, 2.0, 0.2, seed)
    dx, dw, da, db = tk.lora_linear_bwd(dy, x, xa, weight, lora_A, lora_B, 2.0, 0.2, seed, False, False)
    assert dx is None and dw is None
    want = ref.lora_linear_bwd(*_up(dy, x, xa, weight, lora_A, lora_B), 2.0, 0.2, seed, False, False)
    in_dtype = ref.lora_linear_bwd(dy, x, xa, weight, lora_A, lora_B, 2.0, 0.2, seed, False, False)
    _check("d_lora_A", da, want[2], in_dtype[2], torch.float32)
    _check("d_lora_B", db, want[3], in_dtype[3], torch.float32)


# -------------------------------------------------------------------------------- QLoRA linear

# M <= 16 runs the GEMV kernel, M = 33 the GEMM; K % 64 == 0 takes the aligned NF4 tile path,
# K = 96 / 136 the general one (absmax blocks straddling rows).
QLORA_CASES = [
    (1, 64, 40, 8, torch.float16, 0.0, True, True),
    (7, 136, 72, 16, torch.float32, 0.3, False, True),
    (16, 128, 40, 1, torch.bfloat16, 0.1, True, False),
    (33, 96, 40, 8, torch.float16, 0.2, True, True),
    (33, 128, 72, 16, torch.bfloat16, 0.0, False, True),
    (33, 136, 72, 1, torch.float32, 0.0, True, False),
]


@pytest.mark.parametrize("m,k,n,r,dtype,p,with_bias,double_quant", QLORA_CASES)
def test_qlora_linear_fwd_bwd(m, k, n, r, dtype, p, with_bias, double_quant):
    x, weight, bias, lora_A, lora_B, dy = _lora_inputs(m, k, n, r, dtype, with_bias, seed=7 * m + k)
    q = nf4.quantize(weight, 64, double_quant)
    s, seed = 0.5, _seed(99 + k)
    y, xa = tk.qlora_linear_fwd(x, q, bias, lora_A, lora_B, s, p, seed)
    y64, xa64 = ref.qlora_linear_fwd(*_up(x), q, *_up(bias, lora_A, lora_B), s, p, seed)
    yt, xat = ref.qlora_linear_fwd(x, q, bias, lora_A, lora_B, s, p, seed)
    _check("y", y, y64, yt, dtype)
    _check("xa", xa, xa64, xat, dtype)
    got = tk.qlora_linear_bwd(dy, x, xa, q, lora_A, lora_B, s, p, seed, True)
    want = ref.qlora_linear_bwd(*_up(dy, x, xa), q, *_up(lora_A, lora_B), s, p, seed, True)
    in_dtype = ref.qlora_linear_bwd(dy, x, xa, q, lora_A, lora_B, s, p, seed, True)
    for name, g, w, t in zip(("dx", "d_lora_A", "d_lora_B"), got, want, in_dtype):
        _check(name, g, w, t, dtype)


@pytest.mark.parametrize("m", [8, 33])  # the NF4 GEMV (2 <= M <= 16) and the GEMMs
@pytest.mark.parametrize("base", ["dense", "nf4", "nf4_unaligned"])
@pytest.mark.parametrize("p", [0.0, 0.2])
def test_fp16_lora_terms_stay_finite_where_scaling_times_xa_or_g_overflows(m, base, p):
    """fp16, s = 64, xa ~ 2000 and g = dy B ~ 4000: s * xa and s * g are beyond fp16's 65504 while the LoRA
    terms s * xa B^T and s * g A are a few hundred. The kernels scale the weight-side operand (s * B,
    s * A), so y and dx match the float64 reference; before, s * xa and s * g were rounded to fp16
    ahead of the dot and came out inf."""
    k = 96 if base == "nf4_unaligned" else 64
    n, r, s, dtype = 40, 4, 64.0, torch.float16
    gen = torch.Generator().manual_seed(m + k)

    def rand(*shape, lo=0.0, width=1.0, normal=False):
        t = torch.randn(*shape, generator=gen) if normal else torch.rand(*shape, generator=gen) * width + lo
        return t.to(dtype).to(DEVICE)

    x = rand(m, k, lo=20.0, width=20.0)
    weight = rand(n, k, normal=True) * k**-0.5
    q = None if base == "dense" else nf4.quantize(weight, 64, True)
    seed = _seed(5 + m)
    a_fwd, b_fwd = rand(r, k, lo=0.5), rand(n, r, normal=True) * 1e-3  # xa = x A^T ~ 30 * k
    if q is None:
        y, xa = tk.lora_linear_fwd(x, weight, None, a_fwd, b_fwd, s, p, seed)
        y64, _ = ref.lora_linear_fwd(*_up(x, weight), None, *_up(a_fwd, b_fwd), s, p, seed)
        yt, _ = ref.lora_linear_fwd(x, weight, None, a_fwd, b_fwd, s, p, seed)
    else:
        y, xa = tk.qlora_linear_fwd(x, q, None, a_fwd, b_fwd, s, p, seed)
        y64, _ = ref.qlora_linear_fwd(x.double(), q, None, *_up(a_fwd, b_fwd), s, p, seed)
        yt, _ = ref.qlora_linear_fwd(x, q, None, a_fwd, b_fwd, s, p, seed)
    assert (s * xa.float()).abs().max() > torch.finfo(dtype).max  # the case this test is about
    assert torch.isfinite(yt).all()  # torch in fp16 is finite here (it sets _check's bound)
    _check("y", y, y64, yt, dtype)

    dy = rand(m, n, lo=50.0, width=100.0)
    a_bwd, b_bwd = rand(r, k, normal=True) * 1e-3, rand(n, r, lo=0.5)  # g = dy B ~ 100 * n
    assert (s * (dy.float() @ b_bwd.float())).abs().max() > torch.finfo(dtype).max
    # dA and dB (s * g^T x ~ 1e8) overflow fp16 on every backend: only dx is compared
    if q is None:
        dx = tk.lora_linear_bwd(dy, x, xa, weight, a_bwd, b_bwd, s, p, seed, True, False)[0]
        dx64 = ref.lora_linear_bwd(*_up(dy, x, xa, weight, a_bwd, b_bwd), s, p, seed, True, False)[0]
        dxt = ref.lora_linear_bwd(dy, x, xa, weight, a_bwd, b_bwd, s, p, seed, True, False)[0]
    else:
        dx = tk.qlora_linear_bwd(dy, x, xa, q, a_bwd, b_bwd, s, p, seed, True)[0]
        dx64 = ref.qlora_linear_bwd(*_up(dy, x, xa), q, *_up(a_bwd, b_bwd), s, p, seed, True)[0]
        dxt = ref.qlora_linear_bwd(dy, x, xa, q, a_bwd, b_bwd, s, p, seed, True)[0]
    assert torch.isfinite(dxt).all()
    _check("dx", dx, dx64, dxt, dtype)


@pytest.mark.parametrize("m,k,n,dtype", [(1, 96, 40, torch.float32), (33, 64, 72, torch.float16),
                                         (7, 128, 40, torch.bfloat16), (33, 136, 40, torch.bfloat16)])
def test_nf4_matmul_and_transpose(m, k, n, dtype):
    x, weight, bias, _, _, dy = _lora_inputs(m, k, n, 1, dtype, True, seed=m + n)
    q = nf4.quantize(weight, 64, True)
    _check("y", tk.nf4_matmul(x, q, bias), ref.nf4_matmul(x.double(), q, bias.double()), ref.nf4_matmul(x, q, bias), dtype)
    _check("dx", tk.nf4_matmul_t(dy, q), ref.nf4_matmul_t(dy.double(), q), ref.nf4_matmul_t(dy, q), dtype)


@pytest.mark.parametrize("tile", [(16, 32, 128), (32, 64, 64)])
@pytest.mark.parametrize("m,k,n,dtype,double_quant", [(33, 192, 40, torch.float16, True), (17, 320, 72, torch.float32, False),
                                                     (40, 128, 33, torch.bfloat16, True)])
def test_nf4_gemm_tiles_spanning_absmax_blocks(monkeypatch, tile, m, k, n, dtype, double_quant):
    """NF4 GEMM tiles with BLOCK_K >= blocksize (the compiled configs; the interpreter's default
    tile is 32 wide): several absmax blocks per tile row, absmax entries loaded one tile ahead
    over 2-5 tiles, and the last tile partial (K = 192 with BLOCK_K = 128, N = 33 and 40)."""
    if CUDA:
        pytest.skip("forces interpreter configs")
    from lorakern.kernels.triton import matmul

    block_m, block_n, block_k = tile
    configs = lambda: [_launch._cfg(4, 1, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=2)]  # noqa: E731
    monkeypatch.setattr(matmul, "_lora_fwd_nf4", _launch.Tuned(matmul._lora_fwd_kernel, configs, key=matmul._GEMM_KEY))
    monkeypatch.setattr(matmul, "_lora_dx_nf4", _launch.Tuned(matmul._lora_dx_kernel, configs, key=matmul._GEMM_KEY))
    x, weight, bias, lora_A, lora_B, dy = _lora_inputs(m, k, n, 8, dtype, True, seed=m * k + n)
    q = nf4.quantize(weight, 64, double_quant)
    s, seed = 0.5, _seed(5)
    y, xa = tk.qlora_linear_fwd(x, q, bias, lora_A, lora_B, s, 0.0, seed)
    _check("y", y, ref.qlora_linear_fwd(*_up(x), q, *_up(bias, lora_A, lora_B), s, 0.0, seed)[0],
           ref.qlora_linear_fwd(x, q, bias, lora_A, lora_B, s, 0.0, seed)[0], dtype)
    _check("dx", tk.nf4_matmul_t(dy, q), ref.nf4_matmul_t(dy.double(), q), ref.nf4_matmul_t(dy, q), dtype)
    p = 0.3
    dx = tk.qlora_linear_bwd(dy, x, xa, q, lora_A, lora_B, s, p, seed, True)[0]
    _check("dx with dropout", dx, ref.qlora_linear_bwd(*_up(dy, x, xa), q, *_up(lora_A, lora_B), s, p, seed, True)[0],
           ref.qlora_linear_bwd(dy, x, xa, q, lora_A, lora_B, s, p, seed, True)[0], dtype)


# ---------------------------------------------------------------------------- backend contract


def test_supports_rejects_what_the_kernels_do_not_handle():
    x = torch.randn(4, 64, device=DEVICE)
    q = nf4.quantize(torch.randn(8, 64, device=DEVICE), 64, True)
    assert tk.supports("nf4_matmul", x, q, None) is None
    assert "float64" in tk.supports("nf4_matmul", x.double(), q, None)
    assert "blocksize" in tk.supports("nf4_matmul", x, nf4.quantize(torch.randn(8, 64, device=DEVICE), 128, True), None)
    assert "float64" in tk.supports("nf4_dequantize", q, torch.float64)
    assert tk.supports("nf4_dequantize", q, torch.bfloat16) is None
    assert "empty" in tk.supports("nf4_matmul", x[:0], q, None)
    ok, reason = tk.availability()
    assert ok, reason

def test_backend_entry_points_validate_a_weight_the_op_did_not():
    # Called directly (or by the composite backend), a corrupted NF4 weight is refused by
    # name before any kernel indexes it; the ops pass weights they validated as CheckedNF4Weight.
    x = torch.randn(4, 64, device=DEVICE)
    q = nf4.quantize(torch.randn(8, 64, device=DEVICE), 64, True)
    short = q._replace(absmax=q.absmax[:-1])
    with pytest.raises(ValueError, match="q.absmax has 7 values, expected 8"):
        tk.nf4_dequantize(short, torch.float32)
    with pytest.raises(ValueError, match="q.absmax has 7 values, expected 8"):
        tk.nf4_matmul(x, short, None)
    torch.testing.assert_close(tk.nf4_matmul(x, nf4.CheckedNF4Weight._make(q), None), tk.nf4_matmul(x, q, None))



def test_ops_dispatch_to_triton_with_autograd(backend):
    """The public op with LORAKERN_BACKEND=triton: forward and all gradients equal the reference's."""
    import lorakern.ops as ops

    backend("triton")
    m, k, n, r = 7, 96, 40, 8
    x, weight, bias, lora_A, lora_B, dy = _lora_inputs(m, k, n, r, torch.float32, True, seed=11)
    leaves = [t.clone().requires_grad_(True) for t in (x, weight, bias, lora_A, lora_B)]
    seed = _seed(42)
    y = ops.lora_linear(*leaves, scaling=2.0, dropout_p=0.2, seed=seed)
    y.backward(dy)
    leaves64 = [t.double().requires_grad_(True) for t in (x, weight, bias, lora_A, lora_B)]
    y64 = ref.lora_linear(*leaves64, scaling=2.0, dropout_p=0.2, seed=seed)
    y64.backward(dy.double())
    torch.testing.assert_close(y.double(), y64, rtol=1e-5, atol=1e-5)
    for name, a, b in zip(("x", "weight", "bias", "lora_A", "lora_B"), leaves, leaves64):
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=1e-5, atol=1e-5, msg=lambda s: f"grad {name}: {s}")


# ---------------------------------------------------------------------------- GPU, real shapes

gpu = pytest.mark.gpu


def _gpu_check(name, got, want32, tol):
    err = _rel_err(got, want32.double())
    assert torch.isfinite(got).all(), f"{name}: NaN/inf"
    assert err < tol, f"{name}: relative error {err:.3g} >= {tol}"


@gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,n,k", [(8192, 4096, 4096), (2048, 14336, 4096), (512, 4096, 14336), (4096, 1024, 4096)])
@pytest.mark.parametrize("quantized", [False, True])
def test_gpu_lora_and_qlora_bf16_realistic(m, n, k, quantized):
    dtype, r, s, p = torch.bfloat16, 16, 2.0, 0.1
    x, weight, bias, lora_A, lora_B, dy = _lora_inputs(m, k, n, r, dtype, True, seed=1)
    seed = _seed(7)
    f32 = lambda *ts: [None if t is None else t.float() for t in ts]  # noqa: E731
    if quantized:
        q = nf4.quantize(weight, 64, True)
        y, xa = tk.qlora_linear_fwd(x, q, bias, lora_A, lora_B, s, p, seed)
        want = ref.qlora_linear_fwd(*f32(x), q, *f32(bias, lora_A, lora_B), s, p, seed)
        grads = tk.qlora_linear_bwd(dy, x, xa, q, lora_A, lora_B, s, p, seed, True)
        want_grads = ref.qlora_linear_bwd(*f32(dy, x, xa), q, *f32(lora_A, lora_B), s, p, seed, True)
        names = ("dx", "d_lora_A", "d_lora_B")
    else:
        y, xa = tk.lora_linear_fwd(x, weight, bias, lora_A, lora_B, s, p, seed)
        want = ref.lora_linear_fwd(*f32(x, weight, bias, lora_A, lora_B), s, p, seed)
        grads = tk.lora_linear_bwd(dy, x, xa, weight, lora_A, lora_B, s, p, seed, True, m <= 2048)
        want_grads = ref.lora_linear_bwd(*f32(dy, x, xa, weight, lora_A, lora_B), s, p, seed, True, m <= 2048)
        names = ("dx", "dweight", "d_lora_A", "d_lora_B")
    # bf16 output rounding alone is 2^-9 relative; long reductions (K = 14336) in fp32 add little.
    _gpu_check("y", y, want[0], 2e-2)
    _gpu_check("xa", xa, want[1], 2e-2)
    for name, g, w in zip(names, grads, want_grads):
        if w is not None:
            _gpu_check(name, g, w, 2e-2)


@gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("m", [1, 5, 16])
@pytest.mark.parametrize("n,k", [(4096, 4096), (14336, 4096), (4096, 14336)])
def test_gpu_nf4_gemv_lora_realistic(m, n, k):
    dtype, r = torch.bfloat16, 16
    x, weight, bias, lora_A, lora_B, _ = _lora_inputs(m, k, n, r, dtype, False, seed=m)
    q = nf4.quantize(weight, 64, True)
    y, xa = tk.qlora_linear_fwd(x, q, None, lora_A, lora_B, 1.5, 0.0, _seed(0))
    want = ref.qlora_linear_fwd(x.float(), q, None, lora_A.float(), lora_B.float(), 1.5, 0.0, _seed(0))
    _gpu_check("y", y, want[0], 2e-2)


@gpu
@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("shape", [(4096, 4096), (4096, 14336), (14336, 4096), (1024, 4096)])
def test_gpu_nf4_dequantize_realistic(shape):
    q = nf4.quantize(torch.randn(*shape, device="cuda"), 64, True)
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        torch.testing.assert_close(tk.nf4_dequantize(q, dtype).float(), nf4.dequantize(q, dtype).float(),
                                   rtol=2 * EPS[dtype], atol=0)



@pytest.mark.slow
def test_default_configs_compile_for_sm80_and_sm90():
    """Every kernel variant compiles with its default config for sm_80 and sm_90 and fits in
    shared memory (triton's bundled ptxas needs no GPU). Runs in a subprocess: kernels defined
    under TRITON_INTERPRET=1 cannot be compiled. ~3 minutes on 2 cores."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "lorakern.kernels.triton.compile_check", "--arch", "80", "90"],
                          capture_output=True, text=True, env=env, timeout=1200)
    assert proc.returncode == 0, f"compile check failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"


@pytest.mark.skipif(CUDA, reason="checks the behaviour without a GPU")
def test_gpu_benchmark_exits_cleanly_without_cuda(capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_gpu.py"
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    bench_gpu = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_gpu)
    assert bench_gpu.main(["--out", "unused"]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("transposed", [False, True])
def test_expert_weights_reach_the_kernels_as_views(quantize, transposed, monkeypatch):
    """LoRAExperts hands the backend one expert's rows of a stacked weight (views at a storage offset, NF4 state
    included): forward and gradients through the Triton backend equal the float64 formula per expert."""
    from torch import nn

    from lorakern.nn import LoRAExperts

    g = torch.Generator().manual_seed(0)
    w = torch.randn(3, 40, 72, generator=g) / 9
    w = w.transpose(1, 2).contiguous() if transposed else w
    m = LoRAExperts(nn.Parameter(w.to(DEVICE), requires_grad=False), transposed, r=4, alpha=8, quantize=quantize)
    with torch.no_grad():
        m.lora_B.copy_(torch.randn(m.lora_B.shape, generator=g).to(DEVICE) * 0.2)
    x = torch.randn(7, 72, generator=g).to(DEVICE).requires_grad_(True)
    for e in range(3):
        monkeypatch.setenv("LORAKERN_BACKEND", "triton")
        y = x @ m[e] if transposed else torch.nn.functional.linear(x, m[e])
        dx, da, db = torch.autograd.grad(y.sum(), (x, m.lora_A, m.lora_B))
        monkeypatch.delenv("LORAKERN_BACKEND")
        base = m.base_weight(e, torch.float64)
        xd, a, b = x.detach().double().requires_grad_(True), m.lora_A.double(), m.lora_B.double()
        want = xd @ base.T + m.scaling * (xd @ a[e].T) @ b[e].T
        wdx, wda, wdb = torch.autograd.grad(want.sum(), (xd, m.lora_A, m.lora_B))
        torch.testing.assert_close(y.double(), want.detach(), atol=2e-5, rtol=2e-5)
        for got, ref_ in ((dx, wdx), (da, wda), (db, wdb)):
            torch.testing.assert_close(got.double(), ref_.double(), atol=2e-5, rtol=2e-5)
