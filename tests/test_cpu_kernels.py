"""The C++ CPU backend (lorakern._C via lorakern.kernels.cpu) against lorakern.reference.

NF4 quantize / dequantize must be bit-identical to lorakern.formats.nf4 on every
ISA path; matmuls are compared with the reference in float64 with a tolerance
scaled to the dtype and to sum_k |x||w| (the size of the rounding it can see).
"""

from __future__ import annotations

import pytest
import torch

from lorakern import reference as ref
from lorakern.formats import nf4
from lorakern.reference import dropout as reference_dropout
from lorakern.reference.dropout import apply_dropout, dropout_mask

cpu = pytest.importorskip("lorakern.kernels.cpu")
if cpu._C is None:
    pytest.skip("lorakern._C is not built", allow_module_level=True)
_C = cpu._C

ISAS = [name for i, name in enumerate(cpu.ISA_NAMES) if i <= _C.best_isa()]
DTYPES = [torch.float32, torch.bfloat16]
# Relative to sum_k |x| |w|: fp32 accumulates in fp32; bf16 rounds inputs of the
# lora term and the output to 8 bits (2^-8 = 3.9e-3), plus fp32 accumulation.
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 4e-3}


@pytest.fixture(params=ISAS)
def isa(request, monkeypatch):
    monkeypatch.setenv(cpu.ISA_ENV_VAR, request.param)
    return request.param


def assert_close(out: torch.Tensor, want: torch.Tensor, bound: torch.Tensor, dtype: torch.dtype, what: str = ""):
    """|out - want| <= TOL[dtype] * bound elementwise (bound = the magnitude the rounding sees)."""
    assert out.shape == want.shape, f"{what}: shape {tuple(out.shape)} != {tuple(want.shape)}"
    assert out.dtype == dtype, f"{what}: dtype {out.dtype} != {dtype}"
    err = (out.double() - want).abs()
    lim = TOL[dtype] * bound.double() + 1e-30
    bad = ~(err <= lim)
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        nonfinite = int((~torch.isfinite(out)).sum())
        pytest.fail(f"{what}: {int(bad.sum())}/{out.numel()} elements off (first at {idx}: got {out[tuple(idx)].item()}, "
                    f"want {want[tuple(idx)].item()}, tol {lim[tuple(idx)].item():.3g}); {nonfinite} NaN/inf")


def random_nf4(n: int, k: int, dtype=torch.float32, double_quant=True, blocksize=64):
    return ref.nf4_quantize(torch.randn(n, k) * 0.5, blocksize, double_quant)._replace(dtype=dtype)


# ------------------------------------------------------------------------------ quantize


@pytest.mark.parametrize("shape", [(64, 64), (7, 65), (40, 136), (1, 4097), (3, 1), (129, 63)])
@pytest.mark.parametrize("blocksize", [32, 64, 256])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_quantize_bit_exact(shape, blocksize, dtype):
    w = torch.randn(shape, dtype=dtype) * 3
    if w.numel() >= 9:  # a zero stretch, a value at a code midpoint and a tiny one: the clamp and tie rules
        w.view(-1)[:7] = 0
        w.view(-1)[7:9] = torch.tensor([0.5 * (0.07958029955625534 + 0.16093020141124725), -1e-30], dtype=dtype)
    for dq in (True, False):
        got, want = cpu.nf4_quantize(w, blocksize, dq), nf4.quantize(w, blocksize, dq)
        for name in ("packed", "absmax", "nested_absmax", "nested_code", "offset"):
            assert torch.equal(getattr(got, name), getattr(want, name)), f"{name} differs (double_quant={dq})"
        assert (got.shape, got.blocksize, got.dtype) == (want.shape, want.blocksize, want.dtype)


def test_quantize_all_zero_block_and_partial_tail():
    w = torch.zeros(3 * 64 + 5)
    w[64:128] = torch.randn(64)
    w[-5:] = torch.tensor([1e-3, -2e-3, 0.0, 5e-4, 1e-3])  # trailing partial block divides by its absmax
    for dq in (True, False):
        got, want = cpu.nf4_quantize(w, 64, dq), nf4.quantize(w, 64, dq)
        assert all(torch.equal(a, b) for a, b in zip(got.tensors(), want.tensors()))


# ---------------------------------------------------------------------------- dequantize


@pytest.mark.parametrize("shape,blocksize", [((64, 64), 64), ((7, 65), 64), ((40, 136), 32), ((1, 4097), 128), ((3, 1), 64),
                                             ((33, 96), 4096)])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("double_quant", [True, False])
def test_dequantize_bit_exact(isa, shape, blocksize, out_dtype, double_quant):
    q = nf4.quantize(torch.randn(shape) * 2, blocksize, double_quant)
    got = cpu.nf4_dequantize(q, out_dtype)
    want = nf4.dequantize(q, out_dtype)
    assert got.dtype == out_dtype and got.shape == want.shape
    bits = torch.int16 if out_dtype != torch.float32 else torch.int32
    mismatched = int((got.view(bits) != want.view(bits)).sum())
    assert mismatched == 0, f"{mismatched} of {got.numel()} values differ bitwise from the reference ({isa})"


def test_dequantize_isa_paths_give_identical_bytes(monkeypatch):
    q = nf4.quantize(torch.randn(77, 333) * 4, 64, True)  # numel odd, rows start mid-block and mid-byte
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        outs = {}
        for name in ISAS:
            monkeypatch.setenv(cpu.ISA_ENV_VAR, name)
            outs[name] = cpu.nf4_dequantize(q, dtype)
        first = outs[ISAS[0]]
        for name, out in outs.items():
            assert torch.equal(out.view(torch.uint8), first.view(torch.uint8)), f"{name} != {ISAS[0]} for {dtype}"


def test_bf16_rounding_is_round_to_nearest_even():
    # absmax chosen so code * absmax lands exactly halfway between two bf16 values.
    q = nf4.quantize(torch.ones(64), 64, False)._replace(absmax=torch.tensor([1.0 + 2.0**-8 + 2.0**-9]))
    q = q._replace(packed=torch.full((32,), 0xFF, dtype=torch.uint8))
    for name in ISAS:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(cpu.ISA_ENV_VAR, name)
            got = cpu.nf4_dequantize(q, torch.bfloat16)
        assert torch.equal(got, nf4.dequantize(q, torch.bfloat16)), name


def test_dequantize_panel_writes_only_its_window(isa):
    """The panel kernel (used by the matmuls) decodes a sub-matrix into a strided buffer; poison the rest."""
    n, k = 50, 136
    q = random_nf4(n, k)
    dense = nf4.dequantize(q, torch.float32)
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full((20, 100), float("nan"), dtype=dtype)
        _C.nf4_dequantize_2d(cpu._view(q), 7, 20, 33, 70, k, out.data_ptr(), 100, cpu._DTYPE_CODE[dtype], cpu.isa())
        assert torch.equal(out[:, :70], dense[7:27, 33:103].to(dtype))
        assert out[:, 70:].isnan().all(), "the kernel wrote outside its panel"


# ------------------------------------------------------------------------------- matmuls


MS = [1, 7, 16, 17, 129]
KS = [63, 64, 65, 136]
NS = [40, 72, 1]


@pytest.mark.parametrize("m", MS)
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4_matmul_and_transpose(m, k, dtype):
    for n in NS:
        q = random_nf4(n, k, dtype)
        w = nf4.dequantize(q, torch.float64)
        x, dy = torch.randn(m, k, dtype=dtype), torch.randn(m, n, dtype=dtype)
        bias = torch.randn(n, dtype=dtype)
        for b in (None, bias):
            want = x.double() @ w.t() + (0 if b is None else b.double())
            bound = x.double().abs() @ w.abs().t() + (0 if b is None else b.double().abs())
            assert_close(cpu.nf4_matmul(x, q, b), want, bound, dtype, f"nf4_matmul m={m} k={k} n={n}")
        assert_close(cpu.nf4_matmul_t(dy, q), dy.double() @ w, dy.double().abs() @ w.abs(), dtype, f"nf4_matmul_t m={m} k={k} n={n}")


@pytest.mark.parametrize("m", [1, 5, 8, 16, 17])
@pytest.mark.parametrize("dtype", DTYPES)
def test_nf4_matmul_every_isa(isa, m, dtype):
    """Every GEMV variant (fp32 FMA; bf16 dot products from M = 4 on AVX512_BF16 CPUs) and the panel path."""
    q = random_nf4(72, 136, dtype, blocksize=32)
    w = nf4.dequantize(q, torch.float64 if dtype == torch.float32 else dtype).double()
    x = torch.randn(m, 136).to(dtype)
    assert_close(cpu.nf4_matmul(x, q, None), x.double() @ w.t(), x.double().abs() @ w.abs().t(), dtype, isa)


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
def test_gemv_decode_shapes(isa, dtype, double_quant):
    """M = 1, blocksize 64, K a multiple of 64 (the permuted-x kernel on AVX-512): pairs of rows and an odd
    last one, chunks of 16 rows, absmax runs across nested blocks of 256, K over 256 groups; bias and LoRA
    (ranks below, at and above the 16 products of one vector step)."""
    g = torch.Generator().manual_seed(7)
    for n, k, r in ((1, 64, 4), (37, 576, 20), (18, 1088, 16), (3, 16448, 4)):
        q = random_nf4(n, k, dtype, double_quant)
        w = nf4.dequantize(q, torch.float64 if dtype == torch.float32 else dtype).double()
        x, bias = torch.randn(1, k, generator=g).to(dtype), torch.randn(n, generator=g).to(dtype)
        a, b = (torch.randn(r, k, generator=g) * 0.3).to(dtype), (torch.randn(n, r, generator=g) * 0.3).to(dtype)
        want, bound = x.double() @ w.t() + bias.double(), x.double().abs() @ w.abs().t() + bias.double().abs()
        assert_close(cpu.nf4_matmul(x, q, bias), want, bound, dtype, f"nf4_matmul n={n} k={k}")
        y, xa = cpu.qlora_linear_fwd(x, q, bias, a, b, 0.5, 0.0, torch.tensor([1], dtype=torch.int64))
        lora = 0.5 * xa.double() @ b.double().t()
        assert_close(y, want + lora, bound + lora.abs(), dtype, f"qlora_linear_fwd n={n} k={k}")
        # fp32 x, fp32 output with a row stride: fp32 weights, fp32 tolerance, nothing written past N.
        xf, w64 = x.float(), nf4.dequantize(q, torch.float64)
        yp = torch.full((1, n + 5), float("nan"))
        _C.nf4_gemv(cpu._view(q), xf.data_ptr(), 1, n, k, 0, 0, 0, 0, 0, 0, yp.data_ptr(), 0, n + 5, cpu.isa())
        assert yp[:, n:].isnan().all(), "the GEMV wrote past N"
        assert_close(yp[:, :n], xf.double() @ w64.t(), xf.double().abs() @ w64.abs().t(), torch.float32, f"fp32 n={n} k={k}")


def _has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512_bf16" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not _has_avx512_bf16() or _C.best_isa() < 2, reason="needs AVX512_BF16")
def test_gemv_decode_bf16_rounds_weights_to_bf16():
    """bf16 x at M = 1 on AVX512_BF16: y = sum x bf16(code * absmax) with exact products and fp32 sums, so with an
    fp32 output it matches the bf16-dequantized weight at fp32 tolerance (fp32 weights would be ~1e-4 off)."""
    n, k = 24, 576
    q = random_nf4(n, k, torch.bfloat16)
    x = torch.randn(1, k).to(torch.bfloat16)
    xf = x.float()
    y = torch.full((1, n), float("nan"))
    _C.nf4_gemv(cpu._view(q), xf.data_ptr(), 1, n, k, 0, 0, 0, 0, 0, 0, y.data_ptr(), 0, n, 2, x.data_ptr())
    w = nf4.dequantize(q, torch.bfloat16).double()
    assert_close(y, xf.double() @ w.t(), xf.double().abs() @ w.abs().t(), torch.float32, "bf16 weights")


@pytest.mark.skipif(not _has_avx512_bf16() or _C.best_isa() < 2, reason="needs AVX512_BF16")
@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("m", [2, 3, 5, 8, 9, 13, 16])
def test_gemv_batched_decode_bf16(m, double_quant):
    """2 <= M <= 16 rows of bf16 x, blocksize 64 (the multi-row permuted-x kernel): every row of x meets the
    bf16-rounded weights with exact products and fp32 sums. Shapes: pairs of W rows and an odd one, several
    chunks of 16 rows, k split into L1 chunks (1600 and 4160 cross them for 8 and 3 rows of x), absmax runs
    across nested blocks of 256; passes of 8 rows of x (M = 9, 13, 16). Also through the op with bias and LoRA."""
    g = torch.Generator().manual_seed(m)
    for n, k in ((37, 576), (18, 1600), (3, 4160)):
        q = random_nf4(n, k, torch.bfloat16, double_quant)
        x = torch.randn(m, k, generator=g).to(torch.bfloat16)
        xf = x.float()
        y = torch.full((m, n + 3), float("nan"))
        _C.nf4_gemv(cpu._view(q), xf.data_ptr(), m, n, k, 0, 0, 0, 0, 0, 0, y.data_ptr(), 0, n + 3, 2, x.data_ptr())
        assert y[:, n:].isnan().all(), "the GEMV wrote past N"
        w = nf4.dequantize(q, torch.bfloat16).double()
        assert_close(y[:, :n], xf.double() @ w.t(), xf.double().abs() @ w.abs().t(), torch.float32,
                     f"bf16 weights m={m} n={n} k={k}")
        r = 12
        bias = torch.randn(n, generator=g).to(torch.bfloat16)
        a, b = (torch.randn(r, k, generator=g) * 0.3).bfloat16(), (torch.randn(n, r, generator=g) * 0.3).bfloat16()
        out, xa = cpu.qlora_linear_fwd(x, q, bias, a, b, 0.5, 0.0, torch.tensor([1], dtype=torch.int64))
        lora = 0.5 * xa.double() @ b.double().t()
        want = x.double() @ w.t() + bias.double() + lora
        bound = x.double().abs() @ w.abs().t() + bias.double().abs() + lora.abs()
        assert_close(out, want, bound, torch.bfloat16, f"qlora_linear_fwd m={m} n={n} k={k}")


@pytest.mark.parametrize("double_quant", [True, False])
@pytest.mark.parametrize("m", [2, 3, 5, 8, 9, 13, 16])
def test_gemv_batched_decode_fp32(isa, m, double_quant):
    """The same shapes with fp32 (and fp16) x: fp32 weights code * absmax and FMAs (the multi-row permuted-x kernel
    on AVX-512; k chunks of 24 KiB of x cross at 1600 for 8 rows and 4160 for 3), fp32 tolerance."""
    g = torch.Generator().manual_seed(100 + m)
    for n, k in ((37, 576), (18, 1600), (3, 4160)):
        q = random_nf4(n, k, torch.float32, double_quant)
        x = torch.randn(m, k, generator=g)
        y = torch.full((m, n + 3), float("nan"))
        _C.nf4_gemv(cpu._view(q), x.data_ptr(), m, n, k, 0, 0, 0, 0, 0, 0, y.data_ptr(), 0, n + 3, cpu.isa())
        assert y[:, n:].isnan().all(), "the GEMV wrote past N"
        w = nf4.dequantize(q, torch.float64)
        assert_close(y[:, :n], x.double() @ w.t(), x.double().abs() @ w.abs().t(), torch.float32, f"m={m} n={n} k={k}")
        xh = x.half()
        wh = nf4.dequantize(q._replace(dtype=torch.float16), torch.float16).double()
        assert_close(cpu.nf4_matmul(xh, q._replace(dtype=torch.float16), None), xh.double() @ wh.t(),
                     xh.double().abs() @ wh.abs().t(), torch.float16, f"fp16 m={m} n={n} k={k}")


def _lora_inputs(m, k, n, r, dtype):
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)
    return mk(m, k), mk(n, k, scale=0.3), mk(n), mk(r, k, scale=0.3), mk(n, r, scale=0.3), mk(m, n)


def _lora_reference(x, w, bias, a, b, dy, scaling, p, seed):
    """Forward output, xa and all gradients in float64 (reference math), plus magnitude bounds."""
    d = lambda t: t.double()
    y, xa = ref.lora_linear_fwd(d(x), w, d(bias), d(a), d(b), scaling, p, seed)
    dx, dw, da, db = ref.lora_linear_bwd(d(dy), d(x), xa, w, d(a), d(b), scaling, p, seed, True, True)
    ab = lambda t: t.abs()
    yb, xab = ref.lora_linear_fwd(ab(d(x)), ab(w), ab(d(bias)), ab(d(a)), ab(d(b)), abs(scaling), p, seed)
    dxb, dwb, dab, dbb = ref.lora_linear_bwd(ab(d(dy)), ab(d(x)), xab, ab(w), ab(d(a)), ab(d(b)), abs(scaling), p, seed, True, True)
    return (y, xa, dx, dw, da, db), (yb, xab, dxb, dwb, dab, dbb)


# (1, 576, 520) and (16, 520, 576): bf16 / fp16 form the rank-r products in fp32 there (cpu.SMALL_M_FP32_LORA,
# WIDE_FP32_LORA); (17, 576, 520) is the first M past that path.
WIDE = [(1, 576, 520), (16, 520, 576), (17, 576, 520)]


@pytest.mark.parametrize("m,k,n", [(1, 64, 40), (7, 63, 72), (16, 65, 1), (17, 136, 40), (129, 64, 72), *WIDE])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_qlora_linear_fwd_bwd(m, k, n, dtype, dropout_p):
    r, scaling, seed = 4, 0.75, torch.tensor([987654321987], dtype=torch.int64)
    x, _, bias, a, b, dy = _lora_inputs(m, k, n, r, dtype)
    q = random_nf4(n, k, dtype)
    w = nf4.dequantize(q, torch.float64)
    want, bound = _lora_reference(x, w, bias, a, b, dy, scaling, dropout_p, seed)
    y, xa = cpu.qlora_linear_fwd(x, q, bias, a, b, scaling, dropout_p, seed)
    assert_close(y, want[0], bound[0], dtype, "y")
    assert_close(xa, want[1], bound[1], dtype, "xa")
    dx, da, db = cpu.qlora_linear_bwd(dy, x, xa, q, a, b, scaling, dropout_p, seed, True)
    for name, got, i in (("dx", dx, 2), ("dA", da, 4), ("dB", db, 5)):
        assert_close(got, want[i], bound[i], dtype, name)
    none_dx, _, _ = cpu.qlora_linear_bwd(dy, x, xa, q, a, b, scaling, dropout_p, seed, False)
    assert none_dx is None


@pytest.mark.parametrize("m,k,n", [(1, 64, 40), (7, 63, 72), (129, 136, 1), *WIDE])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.25])
def test_lora_linear_fwd_bwd(m, k, n, dtype, dropout_p):
    r, scaling, seed = 8, 2.0, torch.tensor([42], dtype=torch.int64)
    x, w, bias, a, b, dy = _lora_inputs(m, k, n, r, dtype)
    want, bound = _lora_reference(x, w.double(), bias, a, b, dy, scaling, dropout_p, seed)
    y, xa = cpu.lora_linear_fwd(x, w, bias, a, b, scaling, dropout_p, seed)
    assert_close(y, want[0], bound[0], dtype, "y")
    assert_close(xa, want[1], bound[1], dtype, "xa")
    grads = cpu.lora_linear_bwd(dy, x, xa, w, a, b, scaling, dropout_p, seed, True, True)
    for name, got, i in zip(("dx", "dW", "dA", "dB"), grads, range(2, 6)):
        assert_close(got, want[i], bound[i], dtype, name)
    dx, dw, _, _ = cpu.lora_linear_bwd(dy, x, xa, w, a, b, scaling, dropout_p, seed, False, False)
    assert dx is None and dw is None


def test_outputs_are_fresh_and_scratch_is_not_leaked():
    q = random_nf4(300, 64)
    x = torch.randn(40, 64)
    y1 = cpu.nf4_matmul(x, q, None)
    for buf in cpu._scratch.bufs.values():
        buf.fill_(float("nan"))  # a stale panel must never be read
    y2 = cpu.nf4_matmul(x, q, None)
    assert torch.equal(y1, y2) and y1.data_ptr() != y2.data_ptr()


def test_gemv_poisoned_output_and_row_stride(isa):
    m, n, k = 3, 40, 128
    q = random_nf4(n, k)
    x = torch.randn(m, k)
    y = torch.full((m, n + 9), float("nan"))
    _C.nf4_gemv(cpu._view(q), x.data_ptr(), m, n, k, 0, 0, 0, 0, 0, 0, y.data_ptr(), 0, n + 9, cpu.isa())
    w = nf4.dequantize(q, torch.float64)
    assert_close(y[:, :n], x.double() @ w.t(), x.double().abs() @ w.abs().t(), torch.float32, "gemv")
    assert y[:, n:].isnan().all(), "the GEMV wrote past N"


# ------------------------------------------------------------------------------- dropout


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dropout_bit_identical_to_reference(isa, p, dtype):
    m, k = 37, 129
    seed = torch.tensor([(1 << 40) + 12345], dtype=torch.int64)  # only the low 32 bits count
    x = torch.randn(m, k).to(dtype)
    got = cpu._dropped(x, cpu._dropout_params(seed, p))
    want = apply_dropout(x, seed, p)
    assert torch.equal(got, want)
    keep = dropout_mask(seed, m, k, p)
    ones = cpu._dropped(torch.ones(m, k, dtype=dtype), cpu._dropout_params(seed, p))
    assert torch.equal(ones != 0, keep), "mask bits differ from the reference"


def test_dropout_panel_indices_match_the_full_matrix(isa):
    """dropout_add on a column panel uses the global index m * K + col0 + c."""
    m, k, col0, cols, p = 9, 200, 64, 72, 0.3
    seed = torch.tensor([7], dtype=torch.int64)
    key, thr, inv_keep = cpu._dropout_params(seed, p)
    dst = torch.zeros(m, k)
    src = torch.ones(m, cols)
    _C.dropout_add(_C.DropoutArgs(m, cols, cols, k, k, col0, key, thr, 1.0), src.data_ptr(), 0,
                   dst.data_ptr() + col0 * 4, 0, cpu.isa())
    keep = dropout_mask(seed, m, k, p)
    assert torch.equal(dst[:, col0:col0 + cols] != 0, keep[:, col0:col0 + cols])
    assert (dst[:, :col0] == 0).all() and (dst[:, col0 + cols:] == 0).all()


# The kernels against the hash itself: every index m * K + col0 + c (mod 2^32) of
# a panel, strided rows, fp32 arithmetic as the C++ contract states it (one
# multiply by the fp32 scale, for add one fp32 add, each rounded once).
DROPOUT_ROWS = [1, 7, 33, 129]
DROPOUT_COLS = [1, 15, 16, 17, 31, 32, 33, 63, 576, 1000]
DROPOUT_PS = [0.05, 0.25, 0.5, 0.75, 1.0 - 2.0**-33]  # the last: threshold 2^32 - 1 (keep only h == 2^32 - 1)
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _hash(key: int, rows: int, cols: int, k: int, col0: int) -> torch.Tensor:
    """The reference hash over a [rows, cols] panel at column col0 of a [*, k] matrix (kept: >= threshold)."""
    m = torch.arange(rows, dtype=torch.int64)[:, None]
    c = torch.arange(cols, dtype=torch.int64)[None, :]
    idx = (m * k + col0 + c) & reference_dropout.MASK32
    return reference_dropout.mix32(idx ^ key)


def _keep(key: int, threshold: int, rows: int, cols: int, k: int, col0: int) -> torch.Tensor:
    return _hash(key, rows, cols, k, col0) >= threshold


def _dropout_values(n: int, dtype: torch.dtype, specials: bool, gen: torch.Generator) -> torch.Tensor:
    """n values in dtype; with specials, a fifth are NaN, +-inf, -0, subnormal or raw random bits."""
    sign = torch.randint(0, 2, (n,), generator=gen).float() * 2 - 1  # |x| in [2^-9, 2^8): never 0 in any dtype
    x = sign * (torch.rand(n, generator=gen) + 1.0) * torch.exp2(torch.randint(-9, 7, (n,), generator=gen).float())
    if specials:
        r = torch.rand(n, generator=gen)
        for lo, value in ((0.0, float("nan")), (0.03, float("inf")), (0.06, -float("inf")), (0.09, -0.0), (0.12, 3e-39)):
            x[(r >= lo) & (r < lo + 0.03)] = value
    x = x.to(dtype)
    if specials:  # every NaN payload, subnormals of the 16-bit types, huge values that overflow when scaled
        bits = torch.randint(-2**31, 2**31 - 1, (n,), generator=gen, dtype=torch.int64).to(BITS[dtype])
        x = torch.where(torch.rand(n, generator=gen) < 0.05, bits.view(dtype), x)
    return x


def _assert_same_bits(got: torch.Tensor, want: torch.Tensor, what: str):
    """Equal bit patterns, except that NaN only has to meet NaN (torch's own NaN bits vary by kernel)."""
    g, w = got.view(BITS[got.dtype]), want.view(BITS[want.dtype])
    nan = want.isnan()
    bad = (g != w) & ~nan | (nan != got.isnan())
    if bad.any():
        i = bad.nonzero()[0].tolist()
        pytest.fail(f"{what}: {int(bad.sum())}/{got.numel()} elements differ, first at {i}: got {got[tuple(i)].item()!r} "
                    f"({int(g[tuple(i)]) & 0xFFFFFFFF:#x}), want {want[tuple(i)].item()!r} ({int(w[tuple(i)]) & 0xFFFFFFFF:#x})")


def _assert_canonical_nan(out: torch.Tensor, what: str):
    """NaNs stored as common.h's f32_to_bf16 (0x7FC0) and f32_to_f16 (sign | 0x7E00) write them."""
    want = {torch.bfloat16: (0x7FC0,), torch.float16: (0x7E00, 0xFE00)}.get(out.dtype)
    if want is None:  # fp32 NaNs carry their payload through the multiply and add
        return
    bits = out.view(torch.int16)[out.isnan()].int() & 0xFFFF
    if not all(b in want for b in bits.unique().tolist()):
        pytest.fail(f"{what}: NaN bits {[hex(b) for b in bits.unique().tolist()]}, want {[hex(b) for b in want]}")


def _panel(rows, cols, dtype, specials, gen, pad=3):
    """A [rows, cols] view with row stride cols + pad; the padding is NaN to catch stray writes."""
    full = torch.full((rows, cols + pad), float("nan"), dtype=dtype)
    full[:, :cols] = _dropout_values(rows * cols, dtype, specials, gen).view(rows, cols)
    return full


def _run_apply(x_full, cols, k, col0, key, threshold, scale):
    rows, ld = x_full.shape
    out = torch.full((rows, cols + 5), float("nan"), dtype=x_full.dtype)
    args = _C.DropoutArgs(rows, cols, ld, cols + 5, k, col0, key, threshold, scale)
    _C.dropout_apply(args, x_full.data_ptr(), out.data_ptr(), cpu._DTYPE_CODE[x_full.dtype], cpu.isa())
    assert out[:, cols:].isnan().all(), "dropout_apply wrote past the panel"
    return out[:, :cols]


def _run_add(src_full, dst_full, cols, k, col0, key, threshold, scale):
    rows = src_full.shape[0]
    out = dst_full.clone()
    args = _C.DropoutArgs(rows, cols, src_full.shape[1], dst_full.shape[1], k, col0, key, threshold, scale)
    _C.dropout_add(args, src_full.data_ptr(), cpu._DTYPE_CODE[src_full.dtype], out.data_ptr(),
                   cpu._DTYPE_CODE[out.dtype], cpu.isa())
    assert torch.equal(out[:, cols:].view(BITS[out.dtype]), dst_full[:, cols:].view(BITS[out.dtype])), \
        "dropout_add wrote past the panel"
    return out[:, :cols]


def _want_apply(x, keep, scale, dtype):
    return torch.where(keep, x.float() * torch.tensor(scale, dtype=torch.float32), 0.0).to(dtype)


def _want_add(src, dst, keep, scale):
    t = torch.where(keep, src.float() * torch.tensor(scale, dtype=torch.float32), 0.0)
    return (dst.float() + t).to(dst.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dropout_apply_shapes_and_probabilities(isa, dtype):
    gen = torch.Generator().manual_seed(11)
    seed = torch.tensor([0x1234_5678_9ABC], dtype=torch.int64)
    key = int(reference_dropout.mix32(seed & reference_dropout.MASK32))
    assert key == _C.dropout_key(int(seed))
    for rows in DROPOUT_ROWS:
        for cols in DROPOUT_COLS:
            x = _panel(rows, cols, dtype, False, gen)
            h = _hash(key, rows, cols, cols, 0)
            for p in DROPOUT_PS:
                threshold, scale = reference_dropout.dropout_threshold(p), 1.0 / (1.0 - p)
                assert threshold == _C.dropout_threshold(p)
                got = _run_apply(x, cols, cols, 0, key, threshold, scale)
                _assert_same_bits(got, _want_apply(x[:, :cols], h >= threshold, scale, dtype), f"p={p} {rows}x{cols}")
                if p == 0.25:  # kept <=> nonzero (x has no zeros), against the reference's own mask
                    assert torch.equal(got != 0, dropout_mask(seed, rows, cols, p)), f"mask {rows}x{cols}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dropout_add_panels_and_source_dtypes(isa, dtype):
    """dst[:, col0:col0+cols] += drop(src) * scale, src fp32 or dst's dtype, panels of a wider matrix."""
    gen = torch.Generator().manual_seed(12)
    key = _C.dropout_key(99)
    for rows, cols, k, col0 in [(1, 1, 1, 0), (7, 17, 40, 23), (33, 63, 200, 64), (129, 576, 1000, 424), (7, 1000, 1000, 0)]:
        h = _hash(key, rows, cols, k, col0)
        for p in (0.05, 0.5, 0.75):
            threshold, scale = _C.dropout_threshold(p), 0.37 / (1.0 - p)
            keep = h >= threshold
            for src_dtype in {torch.float32, dtype}:
                src = _panel(rows, cols, src_dtype, False, gen, pad=2)
                dst = _panel(rows, cols, dtype, False, gen, pad=7)
                got = _run_add(src, dst, cols, k, col0, key, threshold, scale)
                want = _want_add(src[:, :cols], dst[:, :cols], keep, scale)
                _assert_same_bits(got, want, f"{rows}x{cols} at {col0} of K={k}, p={p}, {src_dtype} -> {dtype}")


def test_dropout_index_wraps_mod_2_32(isa):
    """col0 near 2^32, and a K so large that m * K passes 2^32 and 2^33: the index is taken mod 2^32."""
    gen = torch.Generator().manual_seed(13)
    key, threshold = _C.dropout_key(-5), _C.dropout_threshold(0.5)
    for rows, cols, k, col0 in [(3, 100, 1000, 2**32 - 1500), (5, 40, 2**31 + 17, 0), (4, 33, 2**33 + 5, 2**32 + 7)]:
        keep = _keep(key, threshold, rows, cols, k, col0)
        for dtype in (torch.float32, torch.bfloat16):
            x = _panel(rows, cols, dtype, False, gen)
            _assert_same_bits(_run_apply(x, cols, k, col0, key, threshold, 2.0),
                              _want_apply(x[:, :cols], keep, 2.0, dtype), f"apply {rows}x{cols} K={k} col0={col0}")
            dst = _panel(rows, cols, dtype, False, gen)
            _assert_same_bits(_run_add(x, dst, cols, k, col0, key, threshold, 2.0),
                              _want_add(x[:, :cols], dst[:, :cols], keep, 2.0), f"add {rows}x{cols} K={k} col0={col0}")
    # threshold 0 keeps everything: the unsigned compare has no wrong-signed corner
    x = _panel(9, 37, torch.float32, False, gen)
    assert torch.equal(_run_apply(x, 37, 37, 0, key, 0, 1.0), x[:, :37])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dropout_nan_inf_subnormal(isa, dtype):
    """NaN, inf, -0, subnormals and overflow: kept ones propagate (rounded as common.h), dropped ones are +0."""
    gen = torch.Generator().manual_seed(14)
    key, threshold = _C.dropout_key(3), _C.dropout_threshold(0.25)
    rows, cols, k, col0 = 33, 577, 600, 11
    keep = _keep(key, threshold, rows, cols, k, col0)
    for scale in (1.0 / 0.75, 2.0**20, 2.0**-20):
        x = _panel(rows, cols, dtype, True, gen)
        got = _run_apply(x, cols, k, col0, key, threshold, scale)
        _assert_same_bits(got, _want_apply(x[:, :cols], keep, scale, dtype), f"apply scale={scale}")
        assert (got[~keep].view(BITS[dtype]) == 0).all(), "dropped elements must be +0, whatever x holds"
        _assert_canonical_nan(got, "apply")
        for src_dtype in {torch.float32, dtype}:
            src, dst = _panel(rows, cols, src_dtype, True, gen), _panel(rows, cols, dtype, True, gen)
            got = _run_add(src, dst, cols, k, col0, key, threshold, scale)
            _assert_same_bits(got, _want_add(src[:, :cols], dst[:, :cols], keep, scale), f"add {src_dtype} scale={scale}")
            _assert_canonical_nan(got, "add")


def test_dropout_isa_paths_store_identical_bytes(monkeypatch):
    """Every ISA path writes the scalar path's bytes (a NaN added to a NaN may keep either one's bits)."""
    gen = torch.Generator().manual_seed(15)
    key, threshold, scale = _C.dropout_key(8), _C.dropout_threshold(0.3), 1.0 / 0.7
    rows, cols, k, col0 = 129, 1000, 1003, 3  # 129K elements: the multi-threaded row split
    keep = _keep(key, threshold, rows, cols, k, col0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        x, dst = _panel(rows, cols, dtype, True, gen), _panel(rows, cols, dtype, True, gen)
        src = _panel(rows, cols, torch.float32, True, gen)
        outs = {}
        for name in ISAS:
            monkeypatch.setenv(cpu.ISA_ENV_VAR, name)
            outs[name] = (_run_apply(x, cols, k, col0, key, threshold, scale),
                          _run_add(x, dst, cols, k, col0, key, threshold, scale),
                          _run_add(src, dst, cols, k, col0, key, threshold, scale))
        both_nan = dst[:, :cols].isnan() & keep
        for name in ISAS[1:]:
            for i, (got, first) in enumerate(zip(outs[name], outs[ISAS[0]])):
                same = got.view(BITS[dtype]) == first.view(BITS[dtype])
                if i > 0:
                    same |= both_nan & (x if i == 1 else src)[:, :cols].isnan()
                assert same.all(), f"{name} != {ISAS[0]} for {dtype}, call #{i}: {int((~same).sum())} elements"


# ------------------------------------------------------------------- through lorakern.ops


def test_ops_gradients_cpu_backend_match_reference(monkeypatch):
    import lorakern.ops as ops
    from lorakern.ops import _registry

    m, k, n, r = 19, 72, 40, 4
    torch.manual_seed(3)
    x0, w0 = torch.randn(2, m, k), torch.randn(n, k) * 0.2
    a0, b0, bias0 = torch.randn(r, k) * 0.2, torch.randn(n, r) * 0.2, torch.randn(n)
    q = ops.nf4_quantize(w0)
    seed = torch.tensor([5], dtype=torch.int64)

    def run(name):
        monkeypatch.setenv("LORAKERN_BACKEND", name)
        assert _registry.pick("qlora_linear_fwd", "cpu", ()) is _registry.load(name)[0]
        x, w, a, b, bias = (t.clone().requires_grad_() for t in (x0, w0, a0, b0, bias0))
        y1 = ops.lora_linear(x, w, bias, a, b, 0.5, 0.2, seed)
        y2 = ops.qlora_linear(x, q, bias, a, b, 0.5, 0.2, seed)
        y3 = ops.nf4_matmul(x, q, bias)
        (y1.square().sum() + y2.sin().sum() + y3.cos().sum()).backward()
        return [t.detach() for t in (y1, y2, y3, x.grad, w.grad, a.grad, b.grad, bias.grad)]

    got, want = run("cpu"), run("reference")
    for i, (g, w) in enumerate(zip(got, want)):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda s: f"output/grad #{i}: {s}")


# ----------------------------------------------------------------------------- bad input


def test_supports_rejects_what_the_kernels_cannot_run():
    q = random_nf4(8, 64)
    assert cpu.supports("nf4_matmul", torch.randn(2, 64, dtype=torch.float64), q, None) is not None
    assert cpu.supports("nf4_dequantize", q, torch.float64) is not None
    assert cpu.supports("nf4_matmul", torch.randn(2, 64), q, None) is None
    assert cpu.supports("nf4_quantize", torch.randn(8, 64), 64, True) is None


def test_registry_falls_back_for_float64_and_forced_cpu_raises(monkeypatch):
    import lorakern.ops as ops

    q = ops.nf4_quantize(torch.randn(8, 64))
    x = torch.randn(3, 64, dtype=torch.float64)
    torch.testing.assert_close(ops.nf4_matmul(x, q), ref.nf4_matmul(x, q, None))  # served by the reference
    monkeypatch.setenv("LORAKERN_BACKEND", "cpu")
    with pytest.raises(ops.BackendUnavailable, match="float64"):
        ops.nf4_matmul(x, q)


def test_bad_inputs_give_clear_errors(monkeypatch):
    q = random_nf4(8, 64)
    with pytest.raises(TypeError, match="x must be float32, bfloat16 or float16"):
        cpu.nf4_matmul(torch.randn(2, 64, dtype=torch.float64), q, None)
    with pytest.raises(ValueError, match=r"x must be \[M, 64\]"):
        cpu.nf4_matmul(torch.randn(2, 63), q, None)
    strided = torch.empty(q.packed.numel() * 2, dtype=torch.uint8)[::2]
    strided.copy_(q.packed)
    with pytest.raises(ValueError, match="q.packed must be contiguous"):
        cpu.nf4_dequantize(q._replace(packed=strided), torch.float32)
    with pytest.raises(ValueError, match="packed has"):
        cpu.nf4_dequantize(q._replace(packed=q.packed[:-1]), torch.float32)
    with pytest.raises(TypeError, match="dtype must be"):
        cpu.nf4_dequantize(q, torch.float64)
    with pytest.raises(ValueError, match="blocksize"):
        _C.NF4View(q.packed.data_ptr(), q.absmax.data_ptr(), True, q.nested_absmax.data_ptr(), q.nested_code.data_ptr(),
                   q.offset.data_ptr(), q.numel, 48)
    with pytest.raises(ValueError, match="M must be in"):
        _C.nf4_gemv(cpu._view(q), 0, 17, 8, 64, 0, 0, 0, 0, 0, 0, 0, 0, 8, 0)
    with pytest.raises(TypeError, match="bias has dtype"):
        cpu.nf4_matmul(torch.randn(2, 64), q, torch.randn(8, dtype=torch.bfloat16))
    monkeypatch.setenv(cpu.ISA_ENV_VAR, "sse9")
    with pytest.raises(ValueError, match="LORAKERN_CPU_ISA"):
        cpu.nf4_dequantize(q, torch.float32)
    x_nc = torch.randn(64, 5).t()  # non-contiguous x is accepted (copied), results unchanged
    monkeypatch.delenv(cpu.ISA_ENV_VAR)
    torch.testing.assert_close(cpu.nf4_matmul(x_nc, q, None), cpu.nf4_matmul(x_nc.contiguous(), q, None))
