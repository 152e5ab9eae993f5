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
    """Every GEMV variant (fp32 FMA; bf16 dot products for 4 <= M <= 8 on AVX512_BF16 CPUs) and the panel path."""
    q = random_nf4(72, 136, dtype, blocksize=32)
    w = nf4.dequantize(q, torch.float64 if dtype == torch.float32 else dtype).double()
    x = torch.randn(m, 136).to(dtype)
    assert_close(cpu.nf4_matmul(x, q, None), x.double() @ w.t(), x.double().abs() @ w.abs().t(), dtype, isa)


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


@pytest.mark.parametrize("m,k,n", [(1, 64, 40), (7, 63, 72), (16, 65, 1), (17, 136, 40), (129, 64, 72)])
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


@pytest.mark.parametrize("m,k,n", [(1, 64, 40), (7, 63, 72), (129, 136, 1)])
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
