"""Adversarial inputs to the public API.

Bad input is a TypeError / ValueError naming the argument and what was expected;
odd but valid input (strided views, expanded batches, NaN / Inf, autocast,
inference mode, second derivatives, meta tensors) gives the float64 reference's
result on every CPU backend. The basic argument checks live in test_ops.py,
test_nn.py and test_nf4_format.py; this file covers what they do not.
"""

import json

import numpy as np
import pytest
import torch
from torch import nn

import lorakern
from lorakern import ops
from lorakern import reference as ref
from lorakern.formats import nf4
from lorakern.formats.nf4 import QuantStateError
from lorakern.nn import LoRALinear, QLoRALinear
from lorakern.ops import _registry

CPU_BACKENDS = [name for name in ("reference", "cpu") if _registry.load(name)[0] is not None]
K, N, R = 65, 40, 8  # K: one full 64-block plus one value, so every row straddles a block boundary
# Relative error (max |got - want| / max |want|) allowed against the float64 reference:
# 3.5-3.8x the largest seen in this file (float32 5.4e-7, bfloat16 6.6e-3, float16 7.1e-4).
RTOL = {torch.float32: 2e-6, torch.bfloat16: 2.5e-2, torch.float16: 2.5e-3}


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def assert_rel(got: torch.Tensor, want: torch.Tensor, rtol: float, what: str) -> None:
    """``got`` has ``want``'s NaN and +-Inf positions exactly and its finite values within ``rtol`` (relative to max)."""
    assert got.shape == want.shape, (what, got.shape, want.shape)
    got, want = got.double(), want.double()
    assert torch.equal(got.isnan(), want.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(got == float("inf"), want == float("inf")), f"{what}: +Inf positions differ"
    assert torch.equal(got == -float("inf"), want == -float("inf")), f"{what}: -Inf positions differ"
    finite = want.isfinite()
    if finite.any():
        err = (got[finite] - want[finite]).abs().max().item()
        scale = want[finite].abs().max().item()
        assert err <= rtol * scale, f"{what}: max error {err:.3e} > {rtol:g} * {scale:.3e}"


def _q_and_ref(weight):
    """NF4 of ``weight`` and the float64 dense weight it decodes to."""
    q = ops.nf4_quantize(weight)
    return q, nf4.dequantize(q, torch.float64)


# ----------------------------------------------------------------- odd layouts, correct results


def _strided_inputs(m: int):
    """x, weight, bias, lora_A, lora_B as non-contiguous views with unusual strides and offsets."""
    x = _randn(K + 1, 2 * m + 1, seed=1).t()[1::2, 1:]  # [m, K], strides (2, 2m + 1), storage offset 2m + 2
    weight = _randn(K, N, seed=2).t()  # column-major
    bias = _randn(2 * N + 1, seed=3)[1::2]  # stride 2, offset 1
    lora_A = _randn(K, R, seed=4).t() / K**0.5
    lora_B = _randn(R, N, seed=5).t()
    for t in (x, weight, bias, lora_A, lora_B):
        assert not t.is_contiguous()
    return x, weight, bias, lora_A, lora_B


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("m", [1, 33])  # cpu backend: 1 takes the fused GEMV, 33 the decoded panels
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_strided_views_give_reference_results(backend_name, m, quantized, dropout_p, backend):
    backend(backend_name)
    x, weight, bias, lora_A, lora_B = _strided_inputs(m)
    seed = torch.tensor([11])
    dy = _randn(N, m, seed=6).t()  # a non-contiguous incoming gradient
    leaves = [t.detach().requires_grad_() for t in (x, bias, lora_A, lora_B)]
    leaves64 = [t.detach().double().requires_grad_() for t in (x, bias, lora_A, lora_B)]
    if quantized:
        q, w64 = _q_and_ref(weight)
        assert torch.equal(q.packed, nf4.quantize(weight.contiguous()).packed)
        y = ops.qlora_linear(leaves[0], q, leaves[1], leaves[2], leaves[3], 1.5, dropout_p, seed)
    else:
        w64 = weight.double()
        y = ops.lora_linear(leaves[0], weight, leaves[1], leaves[2], leaves[3], 1.5, dropout_p, seed)
    want = ref.lora_linear(leaves64[0], w64, leaves64[1], leaves64[2], leaves64[3], 1.5, dropout_p, seed)
    y.backward(dy)
    want.backward(dy.double())
    assert_rel(y, want, RTOL[torch.float32], "y")
    for name, got, exp in zip(("dx", "dbias", "dA", "dB"), leaves, leaves64):
        assert_rel(got.grad, exp.grad, RTOL[torch.float32], name)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("m", [1, 33])
def test_expanded_batch_and_expanded_gradient(backend_name, m, backend):
    # x broadcast from one row (stride 0) in a 3-D batch; y.sum().backward() hands in an expanded dy
    backend(backend_name)
    q, w64 = _q_and_ref(_randn(N, K))
    row = _randn(1, 1, K, seed=1)
    x = row.expand(2, m, K).requires_grad_()
    lora_A, lora_B = _randn(R, K, seed=2).requires_grad_(), _randn(N, R, seed=3)
    y = ops.qlora_linear(x, q, None, lora_A, lora_B, 0.5)
    y.sum().backward()
    x64, a64 = row.double().expand(2, m, K).requires_grad_(), lora_A.detach().double().requires_grad_()
    want = ref.lora_linear(x64, w64, None, a64, lora_B.double(), 0.5)
    want.sum().backward()
    assert y.shape == (2, m, N)
    assert_rel(y, want, RTOL[torch.float32], "y")
    assert_rel(x.grad, x64.grad, RTOL[torch.float32], "dx")
    assert_rel(lora_A.grad, a64.grad, RTOL[torch.float32], "dA")
    z = ops.nf4_matmul(x.detach(), q)
    assert_rel(z, x64.detach() @ w64.t(), RTOL[torch.float32], "nf4_matmul y")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("m", [1, 33])
def test_nf4_state_at_a_storage_offset(backend_name, m, backend):
    # contiguous views that do not start their storage (slices of a larger buffer)
    backend(backend_name)
    q = ops.nf4_quantize(_randn(N, K))
    want = nf4.dequantize(q, torch.float64)

    def shifted(t):
        buf = torch.empty(t.numel() + 3, dtype=t.dtype)
        buf[3:] = t
        return buf[3:]

    q = q._replace(**{f: shifted(getattr(q, f)) for f in ("packed", "absmax", "nested_absmax", "nested_code", "offset")})
    assert q.packed.storage_offset() == 3
    x = _randn(m, K, seed=1)
    assert_rel(ops.nf4_dequantize(q, torch.float32), want, RTOL[torch.float32], "dequantize")
    assert_rel(ops.nf4_matmul(x, q), x.double() @ want.t(), RTOL[torch.float32], "nf4_matmul")


# ----------------------------------------------------------------------- NaN / Inf propagate


def _poisoned_x(m: int, dtype: torch.dtype) -> torch.Tensor:
    x = _randn(m, K, seed=7)
    x[0, 3] = float("nan")
    x[-1, 5] = float("inf")
    if m > 2:
        x[1, 7] = -float("inf")
    return x.to(dtype)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [1, 33])
def test_nan_and_inf_in_x_propagate_like_the_reference(backend_name, dtype, m, backend):
    backend(backend_name)
    x = _poisoned_x(m, dtype)
    weight, bias = _randn(N, K, seed=1).to(dtype), _randn(N, seed=2).to(dtype)
    lora_A, lora_B = (_randn(R, K, seed=3) / 8).to(dtype), _randn(N, R, seed=4).to(dtype)
    q, w64 = _q_and_ref(weight.float())
    x64, b64, a64, bb64 = (t.double() for t in (x, bias, lora_A, lora_B))
    tol = RTOL[dtype]
    assert_rel(ops.nf4_matmul(x, q, bias), x64 @ w64.t() + b64, tol, "nf4_matmul")
    assert_rel(ops.qlora_linear(x, q, bias, lora_A, lora_B, 1.5), ref.lora_linear(x64, w64, b64, a64, bb64, 1.5), tol,
               "qlora_linear")
    assert_rel(ops.lora_linear(x, weight, bias, lora_A, lora_B, 1.5),
               ref.lora_linear(x64, weight.double(), b64, a64, bb64, 1.5), tol, "lora_linear")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("m", [1, 33])
def test_nan_in_weight_absmax_and_adapter_propagate(backend_name, m, backend):
    backend(backend_name)
    x = _randn(m, K)
    weight = _randn(N, K, seed=1)
    q = nf4.quantize(weight, double_quant=False)
    q.absmax[5] = float("nan")  # block 5 = flat 320..383: the end of row 4 and most of row 5
    lora_A, lora_B = _randn(R, K, seed=3) / 8, _randn(N, R, seed=4)
    lora_A[2, 10] = float("inf")
    got = ops.qlora_linear(x, q, None, lora_A, lora_B, 1.5)
    want = ref.lora_linear(x.double(), nf4.dequantize(q, torch.float64), None, lora_A.double(), lora_B.double(), 1.5)
    assert got.isnan().any() and not got.isnan().all()
    assert_rel(got, want, RTOL[torch.float32], "qlora_linear")
    weight[2, 2] = float("nan")
    got = ops.lora_linear(x, weight, None, lora_A, lora_B, 1.5)
    assert_rel(got, ref.lora_linear(x.double(), weight.double(), None, lora_A.double(), lora_B.double(), 1.5),
               RTOL[torch.float32], "lora_linear")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_double_quant_overflow_is_an_error_not_an_inf_weight(backend_name, backend):
    # finite weights whose float32 mean block absmax overflows: before, every weight decoded to +-inf
    backend(backend_name)
    big = torch.full((3, 64), 2e38)
    big[0, 0] = -2e38
    with pytest.raises(ValueError, match="mean of the 3 block absmax values overflows float32 .* double_quant=False"):
        ops.nf4_quantize(big)
    torch.testing.assert_close(ops.nf4_dequantize(ops.nf4_quantize(big, double_quant=False)), big, rtol=0, atol=0)


# ------------------------------------------------------------------ autocast, grad modes


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("op", ["lora", "qlora", "nf4_matmul"])
@pytest.mark.parametrize("m", [7, 33])
def test_ops_compute_in_their_inputs_dtype_under_autocast(backend_name, op, m, backend):
    # Autocast is the nn modules' business; the ops run in the dtype they are given.
    # Before: the cpu backend raised "mat1 and mat2 must have the same dtype" (a bf16 xa
    # met the float32 output), the reference returned float32 with bf16 error (2.7e-3).
    backend(backend_name)
    x = _randn(m, K).requires_grad_()
    weight, bias = _randn(N, K, seed=1), _randn(N, seed=2)
    lora_A, lora_B = (_randn(R, K, seed=3) / 8).requires_grad_(), _randn(N, R, seed=4)
    q, w64 = _q_and_ref(weight)
    dy = _randn(m, N, seed=5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if op == "lora":
            y = ops.lora_linear(x, weight, bias, lora_A, lora_B, 1.5, 0.2, torch.tensor([3]))
        elif op == "qlora":
            y = ops.qlora_linear(x, q, bias, lora_A, lora_B, 1.5, 0.2, torch.tensor([3]))
        else:
            y = ops.nf4_matmul(x, q, bias)
        y.backward(dy)  # backward inside the autocast region too
    x64, a64 = x.detach().double().requires_grad_(), lora_A.detach().double().requires_grad_()
    if op == "nf4_matmul":
        want = x64 @ w64.t() + bias.double()
    else:
        w = weight.double() if op == "lora" else w64
        want = ref.lora_linear(x64, w, bias.double(), a64, lora_B.double(), 1.5, 0.2, torch.tensor([3]))
    want.backward(dy.double())
    assert y.dtype == x.grad.dtype == torch.float32
    assert_rel(y, want, RTOL[torch.float32], "y")
    assert_rel(x.grad, x64.grad, RTOL[torch.float32], "dx")
    if op != "nf4_matmul":
        assert_rel(lora_A.grad, a64.grad, RTOL[torch.float32], "dA")


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_custom_ops_return_their_schema_dtypes_under_autocast(backend_name, backend):
    # the fake implementations (what torch.compile plans with) say x's dtype for y and xa
    backend(backend_name)
    x, w, b = _randn(33, K), _randn(N, K, seed=1), _randn(N, seed=2)
    a, bb = _randn(R, K, seed=3), _randn(N, R, seed=4)
    q = ops.nf4_quantize(w)
    seed = torch.zeros(1, dtype=torch.int64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, xa = torch.ops.lorakern.lora_linear_fwd(x, w, b, a, bb, 1.0, 0.0, seed)
        yq, xaq = torch.ops.lorakern.qlora_linear_fwd(x, *q.tensors(), list(q.shape), q.blocksize, b, a, bb, 1.0, 0.0, seed)
    assert [t.dtype for t in (y, xa, yq, xaq)] == [torch.float32] * 4


@pytest.mark.parametrize("cls", [LoRALinear, QLoRALinear])
def test_no_grad_and_inference_mode_give_the_grad_mode_output(cls):
    layer = cls.from_linear(nn.Linear(K, N), r=4, dropout=0.1).eval()
    nn.init.normal_(layer.lora_B)
    x = _randn(5, K)
    y = layer(x)
    with torch.no_grad():
        y_no_grad = layer(x)
    with torch.inference_mode():
        y_inference = layer(x)
    assert y.requires_grad and not y_no_grad.requires_grad and y_inference.is_inference()
    torch.testing.assert_close(y_no_grad, y.detach(), rtol=0, atol=0)
    torch.testing.assert_close(y_inference, y.detach(), rtol=0, atol=0)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.5])
def test_second_derivative_matches_reference(backend_name, quantized, dropout_p, backend):
    # d/dA of sum(d/dx sum(y^2)): before, the cpu backend failed in torch
    # ("mm(): functions with out=... arguments don't support automatic differentiation")
    backend(backend_name)
    weight, bias = _randn(N, K, seed=1), _randn(N, seed=2)
    q, w64 = _q_and_ref(weight)
    seed = torch.tensor([4])

    def second(x, lora_A, lora_B, w, is_ref):
        if is_ref:
            y = ref.lora_linear(x, w, bias.double(), lora_A, lora_B, 1.5, dropout_p, seed)
        elif quantized:
            y = ops.qlora_linear(x, q, bias, lora_A, lora_B, 1.5, dropout_p, seed)
        else:
            y = ops.lora_linear(x, w, bias, lora_A, lora_B, 1.5, dropout_p, seed)
        gx, = torch.autograd.grad((y * y).sum(), x, create_graph=True)
        return torch.autograd.grad(gx.sum(), lora_A)[0]

    x, lora_A, lora_B = _randn(7, K, seed=3), _randn(R, K, seed=4) / 8, _randn(N, R, seed=5)
    got = second(x.requires_grad_(), lora_A.requires_grad_(), lora_B, weight, False)
    want = second(x.detach().double().requires_grad_(), lora_A.detach().double().requires_grad_(), lora_B.double(),
                  w64 if quantized else weight.double(), True)
    assert_rel(got, want, RTOL[torch.float32], "d2")


def test_second_derivative_through_the_custom_op_is_a_named_error(monkeypatch):
    monkeypatch.setattr(ops, "_eager_fast_path", lambda *t: False)  # the path torch.compile takes
    x, lora_A = _randn(7, K).requires_grad_(), _randn(R, K, seed=1).requires_grad_()
    y = ops.lora_linear(x, _randn(N, K, seed=2), None, lora_A, _randn(N, R, seed=3), 1.0)
    gx, = torch.autograd.grad((y * y).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="lorakern.lora_linear_bwd"):
        torch.autograd.grad(gx.sum(), lora_A)


def test_nf4_state_that_requires_grad_is_treated_as_frozen():
    # a float absmax (no double quant) flagged requires_grad: before, nf4_dequantize's output
    # required grad and backward failed in torch ("no autograd formula was registered")
    q = nf4.quantize(_randn(N, K), double_quant=False)
    q = q._replace(absmax=q.absmax.clone().requires_grad_())
    assert not ops.nf4_dequantize(q).requires_grad
    x, lora_A = _randn(3, K, seed=1).requires_grad_(), _randn(R, K, seed=2).requires_grad_()
    ops.qlora_linear(x, q, None, lora_A, _randn(N, R, seed=3), 1.0).sum().backward()
    assert x.grad is not None and lora_A.grad is not None and q.absmax.grad is None


# ----------------------------------------------------------------------------- meta tensors


def test_all_meta_inputs_give_meta_outputs_of_the_right_shape():
    x, w, b = torch.empty(2, 7, K, device="meta"), torch.empty(N, K, device="meta"), torch.empty(N, device="meta")
    a, bb = torch.empty(R, K, device="meta"), torch.empty(N, R, device="meta")
    q = ops.nf4_quantize(_randn(N, K)).to("meta")
    for y in (ops.lora_linear(x, w, b, a, bb, 1.0, 0.1), ops.qlora_linear(x, q, b, a, bb, 1.0, 0.1), ops.nf4_matmul(x, q, b)):
        assert y.device.type == "meta" and y.shape == (2, 7, N) and y.dtype == torch.float32


def test_meta_seed_or_weight_with_cpu_x_is_an_error():
    x = _randn(3, K)
    q = ops.nf4_quantize(_randn(N, K))
    with pytest.raises(ValueError, match="qweight is on meta but x is on cpu"):
        ops.nf4_matmul(x, q.to("meta"))
    with pytest.raises(ValueError, match="seed is on meta but x is on cpu"):
        ops.qlora_linear(x, q, None, _randn(R, K), _randn(N, R), 1.0, 0.1, torch.tensor([1], device="meta"))


# ----------------------------------------------------------------------- ops: bad arguments


def _lora(**over):
    kw = dict(x=_randn(7, K), weight=_randn(N, K, seed=1), bias=None, lora_A=_randn(R, K, seed=2),
              lora_B=_randn(N, R, seed=3), scaling=1.0, dropout_p=0.0, seed=None)
    kw.update(over)
    return ops.lora_linear(**kw)


@pytest.mark.parametrize("over, exc, match", [
    (dict(scaling="2"), TypeError, "scaling must be a real number"),
    (dict(scaling=torch.tensor(2.0)), TypeError, "scaling must be a real number .*got Tensor"),
    (dict(scaling=float("nan")), ValueError, "scaling must be a finite number"),
    (dict(scaling=float("-inf")), ValueError, "scaling must be a finite number"),
    (dict(scaling=True), TypeError, "scaling must be a real number .*got bool"),
    (dict(dropout_p=False), TypeError, "dropout_p must be a real number .*got bool"),
    (dict(dropout_p=None), TypeError, "dropout_p must be a real number"),
    (dict(dropout_p=torch.tensor(0.1)), TypeError, "dropout_p must be a real number"),
    (dict(dropout_p=float("nan")), ValueError, r"dropout_p must be in \[0, 1\)"),
    (dict(x=torch.randn(3, 0), weight=torch.randn(N, 0), lora_A=torch.randn(R, 0)), ValueError,
     "x has no features .* K must be >= 1"),
    (dict(x=torch.randn(7, K).to(torch.complex64)), TypeError, "x must have dtype in"),
    (dict(seed=torch.tensor([[3]], dtype=torch.int32)), TypeError, "seed must have dtype in"),
])
def test_lora_linear_rejects(over, exc, match):
    with pytest.raises(exc, match=match):
        _lora(**over)


@pytest.mark.parametrize("backend_name", ["reference", "cpu", "composite"])
@pytest.mark.parametrize("scaling", [1e39, -1e39, 3.5e38])
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_scaling_beyond_float32_is_refused_by_name(dtype, quantized, scaling, backend_name, backend):
    """A finite |scaling| above float32's 3.4e38: before, it passed the check and the cpu and composite
    backends failed inside torch ("value cannot be converted to type float without overflow")."""
    backend(backend_name)
    x, a, b = _randn(7, K).to(dtype), _randn(R, K, seed=2).to(dtype), _randn(N, R, seed=3).to(dtype)
    w = _randn(N, K, seed=1).to(dtype)
    with pytest.raises(ValueError, match=r"scaling must be a finite number within float32's range "
                                         r"\(\|scaling\| <= 3\.40282e\+38\), got "):
        if quantized:
            ops.qlora_linear(x, ops.nf4_quantize(w), None, a, b, scaling, 0.0)
        else:
            ops.lora_linear(x, w, None, a, b, scaling, 0.0)
    top = float(torch.finfo(torch.float32).max)  # the largest accepted: runs (its output overflows, as torch's)
    y = ops.lora_linear(x, w, None, a, b, top, 0.0)
    assert y.shape == (7, N)


def test_numpy_scalars_are_accepted_as_scaling_and_dropout():
    y = _lora(scaling=np.float32(0.5), dropout_p=np.float64(0.25), seed=torch.tensor([2]))
    torch.testing.assert_close(y, _lora(scaling=0.5, dropout_p=0.25, seed=torch.tensor([2])), rtol=0, atol=0)


@pytest.mark.parametrize("quantize", [ops.nf4_quantize, nf4.quantize])
def test_quantize_options_accept_numpy_and_refuse_non_booleans(quantize):
    w = _randn(N, K)
    q = quantize(w, np.int64(128), np.bool_(False))
    assert type(q.blocksize) is int and q.blocksize == 128 and not q.double_quant
    assert torch.equal(q.packed, quantize(w, 128, False).packed)
    for bad in ("no", "False", 2, None):
        with pytest.raises(TypeError, match="double_quant must be True or False"):
            quantize(w, 64, bad)


@pytest.mark.parametrize("field", ["absmax", "nested_absmax", "nested_code"])
def test_non_contiguous_nf4_state_is_named_by_the_op(field):
    # before: only the cpu backend noticed, naming "q.<field>"; the ops now check every tensor
    q = ops.nf4_quantize(_randn(N, 8 * K))  # 325 blocks: 2 nested_absmax values, so a strided view exists
    t = getattr(q, field)
    strided = torch.empty(t.numel(), 2, dtype=t.dtype)[:, 0]
    strided.copy_(t)
    assert not strided.is_contiguous()
    with pytest.raises(ValueError, match=f"qweight.{field} must be contiguous"):
        ops.nf4_matmul(_randn(3, 8 * K), q._replace(**{field: strided}))


def test_new_seed_rejects_a_tensor():
    with pytest.raises(TypeError, match="pass x.device, not the tensor"):
        ops.new_seed(torch.zeros(1))
    assert ops.new_seed("cpu").dtype == torch.int64 and ops.new_seed(None).numel() == 1


# -------------------------------------------------------------- formats.nf4: corrupted weights


@pytest.mark.parametrize("change, exc, match", [
    (dict(packed=[0] * 1300), TypeError, "qweight.packed must be a torch.Tensor, got list"),
    (dict(absmax=None), TypeError, "qweight.absmax must be a torch.Tensor, got NoneType"),
    (dict(offset=0.0), TypeError, "qweight.offset must be a torch.Tensor, got float"),
    (dict(shape=(-40, 65)), ValueError, "qweight.shape must be a tuple of positive ints"),
    (dict(shape=(0, 65)), ValueError, "qweight.shape must be a tuple of positive ints"),
    (dict(shape=(40.0, 65.0)), ValueError, "qweight.shape must be a tuple of positive ints"),
    (dict(shape=(True, 2600)), ValueError, "qweight.shape must be a tuple of positive ints"),
    (dict(shape=2600), ValueError, "qweight.shape must be a tuple of positive ints"),
    (dict(blocksize=64.0), ValueError, "qweight.blocksize must be one of"),
    (dict(blocksize=128), ValueError, "qweight.absmax has 41 values, expected 21"),
    (dict(dtype=torch.int8), TypeError, r"qweight.dtype \(the dtype before quantization\) must be a floating"),
    (dict(dtype="float32"), TypeError, r"qweight.dtype .* must be a floating torch.dtype"),
])
def test_validate_names_the_corrupted_field(change, exc, match):
    q = nf4.quantize(_randn(N, K))
    with pytest.raises(exc, match=match):
        nf4.validate(q._replace(**change))
    with pytest.raises(exc, match=match):
        ops.nf4_matmul(_randn(3, K), q._replace(**change))


@pytest.mark.parametrize("change, exc, match", [
    (dict(absmax=torch.empty(40, dtype=torch.uint8)), ValueError, "q.absmax has 40 values, expected 41"),
    (dict(packed=torch.zeros(2600, dtype=torch.uint8)), ValueError, "q.packed has 2600 bytes, expected 1300"),
    (dict(nested_code=torch.empty(256, dtype=torch.float64)), ValueError, "q.nested_code must be 256 float32"),
])
def test_format_dequantize_validates_first(change, exc, match):
    # before: a short absmax was "The size of tensor a (2600) must match ...", a long packed was read silently
    q = nf4.quantize(_randn(N, K))
    with pytest.raises(exc, match=match):
        nf4.dequantize(q._replace(**change))
    with pytest.raises(exc, match=match):
        nf4.decode_absmax(q._replace(**change))


def test_bnb_export_of_a_corrupted_weight_is_refused():
    # before: written silently, failing only when the checkpoint was loaded
    q = nf4.quantize(_randn(N, K))
    with pytest.raises(ValueError, match="q.absmax has 40 values, expected 41"):
        nf4.to_bnb_state_dict(q._replace(absmax=q.absmax[:-1]), "w")


@pytest.mark.parametrize("dtype", [torch.int32, torch.bool, torch.complex64, "float32"])
def test_format_dequantize_rejects_non_floating_dtype(dtype):
    # before: torch.int32 returned truncated integers
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        nf4.dequantize(nf4.quantize(_randn(N, K)), dtype)


def _bnb_sd(double_quant=True):
    return nf4.to_bnb_state_dict(nf4.quantize(_randn(10, 70), double_quant=double_quant), "w")


def _with_info(sd, **changes):
    key = "w." + nf4.QUANT_STATE_KEY
    info = json.loads(bytes(sd[key].tolist()).decode())
    info.update(changes)
    sd[key] = torch.tensor(list(json.dumps(info).encode()), dtype=torch.uint8)
    return sd


@pytest.mark.parametrize("make, match", [
    (lambda: {**_bnb_sd(), "w.quant_map": [0.0] * 16}, "'w.quant_map' must be a tensor, got list"),
    (lambda: {**_bnb_sd(), "w.quant_map": torch.arange(16, dtype=torch.int32)}, "not the NF4 code table"),
    (lambda: _with_info(_bnb_sd(), blocksize=64.0), "blocksize must be one of .* got 64.0"),
    (lambda: _with_info(_bnb_sd(), shape=[True, 700]), "shape must be a list of positive integers"),
    (lambda: {**_bnb_sd(), "w.nested_absmax": torch.ones(1, dtype=torch.int64)}, "nested_absmax must be floating point"),
    (lambda: {**_bnb_sd(), "w.nested_absmax": torch.ones(1, dtype=torch.complex64)}, "nested_absmax must be floating"),
    (lambda: {**_bnb_sd(), "w.nested_quant_map": torch.ones(256, dtype=torch.complex64)},
     "nested_quant_map must be floating point"),
])
def test_malformed_bnb_state_dict_is_a_quant_state_error(make, match):
    with pytest.raises(QuantStateError, match=match):
        nf4.from_bnb_state_dict(make(), "w")


# ------------------------------------------------------------------------------- nn modules


@pytest.mark.parametrize("cls", [LoRALinear, QLoRALinear])
@pytest.mark.parametrize("bias, exc, match", [
    ([0.0] * N, TypeError, "bias must be None or a floating tensor"),
    (torch.zeros(N, dtype=torch.int64), TypeError, "bias must be None or a floating tensor .* torch.int64"),
    (torch.zeros(N, dtype=torch.complex64), TypeError, "bias must be None or a floating tensor"),
    (torch.zeros(N, device="meta"), ValueError, "bias is on meta but the base weight is on cpu"),
])
def test_module_bias_is_checked_at_construction(cls, bias, exc, match):
    weight = _randn(N, K)
    with pytest.raises(exc, match=match):
        LoRALinear(weight, bias) if cls is LoRALinear else QLoRALinear(nf4.quantize(weight), bias)


def test_lora_linear_without_input_features_is_refused():
    with pytest.raises(ValueError, match=r"weight must have in_features >= 1, got shape \(4, 0\)"):
        LoRALinear.from_linear(nn.Linear(0, 4))


@pytest.mark.parametrize("cls", [LoRALinear, QLoRALinear])
@pytest.mark.parametrize("x, match", [
    (torch.ones(3, K, dtype=torch.int64), "x must be a floating tensor .* got torch.int64"),
    (torch.ones(3, K, dtype=torch.bool), "x must be a floating tensor .* got torch.bool"),
    (torch.ones(3, K, dtype=torch.complex64), "x must be a floating tensor .* got torch.complex64"),
    ([[1.0] * K], "x must be a torch.Tensor, got list"),
])
def test_module_forward_refuses_non_floating_input(cls, x, match):
    # before: cast silently to the compute dtype (a complex x lost its imaginary part)
    with pytest.raises(TypeError, match=match):
        cls.from_linear(nn.Linear(K, N), r=4)(x)


def test_numpy_hyperparameters_are_accepted_and_stored_as_python_numbers():
    layer = LoRALinear.from_linear(nn.Linear(K, N), r=np.int64(4), alpha=np.float32(8.0), dropout=np.float64(0.1))
    assert type(layer.r) is int and layer.r == 4 and layer.lora_A.shape == (4, K)
    assert type(layer.alpha) is float and layer.scaling == 2.0 and type(layer.dropout) is float


def test_an_alpha_beyond_float32_is_refused_where_it_is_given():
    # alpha / r beyond float32 failed only at the first forward, naming the op's 'scaling'
    with pytest.raises(ValueError, match=r"alpha must be a positive finite number within float32's range, got 1e\+39"):
        LoRALinear.from_linear(nn.Linear(K, N), r=4, alpha=1e39)
    assert LoRALinear.from_linear(nn.Linear(K, N), r=1, alpha=3e38).scaling == 3e38


@pytest.mark.parametrize("value", ["false", 0, None])
def test_use_rslora_must_be_a_bool(value):
    # the string "false" is truthy: it silently turned rsLoRA on (scaling 4.0 instead of 2.0)
    with pytest.raises(TypeError, match="use_rslora must be a bool"):
        LoRALinear.from_linear(nn.Linear(K, N), r=4, alpha=8, use_rslora=value)
    assert LoRALinear.from_linear(nn.Linear(K, N), r=4, alpha=8, use_rslora=np.bool_(True)).scaling == 4.0
    model = nn.Sequential(nn.Linear(K, N))
    with pytest.raises(TypeError, match="use_rslora must be a bool"):  # before any layer is swapped
        lorakern.apply_lora(model, ["0"], use_rslora=value)
    assert type(model[0]) is nn.Linear


# --------------------------------------------------------------------------------- compile


def test_compiled_qlora_on_a_strided_input_and_a_bad_one():
    q, w64 = _q_and_ref(_randn(N, K))
    lora_A, lora_B = _randn(R, K, seed=1) / 8, _randn(N, R, seed=2)
    fn = torch.compile(lambda x: ops.qlora_linear(x, q, None, lora_A, lora_B, 1.5))
    x = _randn(K, 66, seed=3).t()[::2]  # [33, K], strides (2, 66)
    assert_rel(fn(x), ref.lora_linear(x.double(), w64, None, lora_A.double(), lora_B.double(), 1.5),
               RTOL[torch.float32], "compiled y")
    with pytest.raises(ValueError, match="x has 64 features"):
        fn(_randn(33, 64))


def test_new_adapter_options_name_what_is_wrong():
    """rank_pattern / alpha_pattern, target_parameters and disable_adapters refuse bad values by name."""
    import lorakern
    from lorakern.train.tiny import tiny_llama

    with pytest.raises(TypeError, match="rank_pattern must be a dict"):
        lorakern.apply_lora(tiny_llama(), ["q_proj"], rank_pattern="q_proj")
    with pytest.raises(ValueError, match=r"alpha_pattern\['q_proj'\]: alpha must be a positive finite number"):
        lorakern.apply_lora(tiny_llama(), ["q_proj"], alpha_pattern={"q_proj": -1})
    with pytest.raises(ValueError, match="rank_pattern key 'q_\\(' is not a valid regular expression"):
        lorakern.apply_lora(tiny_llama(), ["q_proj"], rank_pattern={"q_(": 2})
    with pytest.raises(TypeError, match="target_parameters must be 'all-experts' or a non-empty list"):
        lorakern.apply_lora(tiny_llama(), None, target_parameters=[""])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        with lorakern.disable_adapters("model"):
            pass
