"""Composite backend (dequantize + torch GEMMs) against the float64 reference, and the routing around it.

The backend runs on CPU tensors when called directly; its dropout pieces run
through the Triton kernels (under the interpreter here, see conftest.py) or,
when Triton cannot take the tensors, through the reference's torch dropout.
Both paths are checked.
"""

from __future__ import annotations

import types

import pytest
import torch

from lorakern import ops
from lorakern import reference as ref
from lorakern.formats import nf4
from lorakern.kernels import composite
from lorakern.ops import _registry

TRITON_OK = _registry.load("triton")[0] is not None
DROPOUT_PATHS = ["triton", "torch"] if TRITON_OK else ["torch"]
# Max error over the largest reference value: 2.5-4x the worst seen across these cases
# (fp32 4.5e-7, fp16 7.9e-4, bf16 6.5e-3: rounding of y, xa and dx to the dtype, fp32 accumulation).
TOL = {torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
SHAPES = [(1, 64, 40, 1), (7, 63, 72, 8), (33, 65, 40, 16), (129, 136, 17, 4)]  # (M, K, N, r)


@pytest.fixture(params=DROPOUT_PATHS)
def dropout_path(request, monkeypatch):
    if request.param == "torch":
        monkeypatch.setattr(composite, "_triton_for", lambda *tensors: None)
    return request.param


def _case(m, k, n, r, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(dtype)

    x, w, b = rand(m, k), rand(n, k), rand(n)
    a, bb = rand(r, k, scale=k**-0.5), rand(n, r)
    return x, w, b, a, bb, rand(m, n)


def _close(got, want, dtype, what):
    """Max error against the largest reference value, scaled to the dtype."""
    assert got.dtype == dtype, what
    assert got.shape == want.shape, what
    scale = want.abs().max().clamp_min(1.0)
    err = (got.double() - want).abs().max() / scale
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} ({dtype})"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_qlora_forward_backward_match_reference(shape, dtype, dropout_p, dropout_path):
    m, k, n, r = shape
    x, w, b, a, bb, dy = _case(m, k, n, r, dtype)
    q = nf4.quantize(w.float(), 64, True)
    w64 = nf4.dequantize(q, torch.float64)
    seed = torch.tensor([11])
    y, xa = composite.qlora_linear_fwd(x, q, b, a, bb, 0.75, dropout_p, seed)
    y_ref, xa_ref = ref.lora_linear_fwd(x.double(), w64, b.double(), a.double(), bb.double(), 0.75, dropout_p, seed)
    _close(y, y_ref, dtype, "y")
    _close(xa, xa_ref, dtype, "xa")
    dx, da, db = composite.qlora_linear_bwd(dy, x, xa, q, a, bb, 0.75, dropout_p, seed, True)
    dx_ref, _, da_ref, db_ref = ref.lora_linear_bwd(dy.double(), x.double(), xa.double(), w64, a.double(), bb.double(),
                                                    0.75, dropout_p, seed, True, False)
    _close(dx, dx_ref, dtype, "dx")
    _close(da, da_ref, dtype, "d_lora_A")
    _close(db, db_ref, dtype, "d_lora_B")
    dx_none, da2, _ = composite.qlora_linear_bwd(dy, x, xa, q, a, bb, 0.75, dropout_p, seed, False)
    assert dx_none is None and torch.equal(da2, da)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES[1:])
@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_lora_forward_backward_match_reference(shape, dtype, dropout_p, dropout_path):
    m, k, n, r = shape
    x, w, b, a, bb, dy = _case(m, k, n, r, dtype, seed=1)
    x = x.t().contiguous().t()  # column-major x: the kernels take any strides
    seed = torch.tensor([2**40 + 5])  # only the low 32 bits key the mask
    f64 = [t.double() for t in (x, w, b, a, bb)]
    y, xa = composite.lora_linear_fwd(x, w, b, a, bb, 2.0, dropout_p, seed)
    y_ref, xa_ref = ref.lora_linear_fwd(*f64, 2.0, dropout_p, seed)
    _close(y, y_ref, dtype, "y")
    _close(xa, xa_ref, dtype, "xa")
    dx, dw, da, db = composite.lora_linear_bwd(dy, x, xa, w, a, bb, 2.0, dropout_p, seed, True, True)
    want = ref.lora_linear_bwd(dy.double(), f64[0], xa.double(), f64[1], f64[3], f64[4], 2.0, dropout_p, seed, True, True)
    for got, exp, name in zip((dx, dw, da, db), want, ("dx", "dW", "dA", "dB")):
        _close(got, exp, dtype, name)


def test_dropout_is_applied_where_the_reference_applies_it(dropout_path):
    """Dropout changes the LoRA terms (a mask that dropped nothing would pass a loose comparison)."""
    x, w, b, a, bb, dy = _case(33, 65, 40, 8, torch.float32, seed=3)
    q = nf4.quantize(w, 64, True)
    seed = torch.tensor([9])
    y0, xa0 = composite.qlora_linear_fwd(x, q, b, a, bb, 1.0, 0.0, seed)
    y5, xa5 = composite.qlora_linear_fwd(x, q, b, a, bb, 1.0, 0.5, seed)
    mask = ref.dropout_mask(seed, 33, 65, 0.5)
    assert 0.3 < mask.float().mean() < 0.7
    torch.testing.assert_close(xa5, (x * mask * 2.0) @ a.t(), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(y0, y5)
    dx0, _, _ = composite.qlora_linear_bwd(dy, x, xa0, q, a, bb, 1.0, 0.0, seed, True)
    dx5, _, _ = composite.qlora_linear_bwd(dy, x, xa5, q, a, bb, 1.0, 0.5, seed, True)
    base = dy @ nf4.dequantize(q, torch.float32)
    lora = (dy @ bb) @ a
    torch.testing.assert_close(dx0, base + lora, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx5, base + lora * mask * 2.0, rtol=1e-5, atol=1e-5)


def test_outputs_are_fresh_and_scaling_zero_skips_the_lora_term():
    x, w, b, a, bb, dy = _case(7, 64, 40, 4, torch.float32, seed=4)
    q = nf4.quantize(w, 64, True)
    seed = torch.tensor([0])
    y, xa = composite.qlora_linear_fwd(x, q, None, a, bb, 0.0, 0.0, seed)
    torch.testing.assert_close(y, x @ nf4.dequantize(q, torch.float32).t())
    torch.testing.assert_close(xa, x @ a.t())
    outs = (y, xa, *composite.qlora_linear_bwd(dy, x, xa, q, a, bb, 0.5, 0.0, seed, True),
            *composite.lora_linear_bwd(dy, x, xa, w, a, bb, 0.5, 0.0, seed, True, True))
    for out in outs:
        for inp in (x, w, b, a, bb, dy, xa if out is not xa else y):
            assert out.untyped_storage().data_ptr() != inp.untyped_storage().data_ptr()


def test_empty_batch():
    x, w, b, a, bb, _ = _case(0, 64, 40, 4, torch.float32)
    q = nf4.quantize(w, 64, True)
    seed = torch.tensor([1])
    y, xa = composite.qlora_linear_fwd(x, q, b, a, bb, 1.0, 0.1, seed)
    assert y.shape == (0, 40) and xa.shape == (0, 4)
    dx, da, db = composite.qlora_linear_bwd(torch.zeros(0, 40), x, xa, q, a, bb, 1.0, 0.1, seed, True)
    assert dx.shape == (0, 64) and torch.equal(da, torch.zeros(4, 64)) and torch.equal(db, torch.zeros(40, 4))


def test_nf4_matmul_and_transpose_match_reference():
    x, w, b, _, _, dy = _case(9, 130, 40, 1, torch.float32, seed=5)
    q = nf4.quantize(w, 64, False)
    torch.testing.assert_close(composite.nf4_matmul(x, q, b), ref.nf4_matmul(x, q, b), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(composite.nf4_matmul_t(dy, q), ref.nf4_matmul_t(dy, q), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not TRITON_OK, reason="the Triton backend is not available (no CUDA and no interpreter)")
@pytest.mark.parametrize("numel_shape", [(1, 1), (3, 1365), (2, 4097), (5, 4096)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_dropout_add_matches_reference(numel_shape, dtype):
    from lorakern.kernels.triton import dropout_add_

    g = torch.Generator().manual_seed(6)
    out = torch.randn(*numel_shape, generator=g).to(dtype)
    t = torch.randn(*numel_shape, generator=g).to(dtype)
    seed = torch.tensor([123456789])
    want = out.double() + ref.apply_dropout(t.double() * 0.5, seed, 0.25)
    got = dropout_add_(out.clone(), t, 0.5, 0.25, seed)
    _close(got, want, dtype, "dropout_add_")
    with pytest.raises(ValueError, match="contiguous and of one shape"):
        dropout_add_(out.t(), t, 0.5, 0.25, seed) if out.shape[0] > 1 else dropout_add_(out, t[:, :0], 0.5, 0.25, seed)


# ------------------------------------------------------------------------------- routing


def _qlora_args(m):
    x, w, b, a, bb, _ = _case(m, 64, 40, 4, torch.float32)
    return (x, nf4.quantize(w, 64, True), b, a, bb, 1.0, 0.0, torch.tensor([0]))


def test_cuda_tensors_go_to_composite_when_no_kernel_backend_wants_them(monkeypatch):
    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)
    fake_cuda = types.SimpleNamespace(qlora_linear_fwd=None, supports=lambda op, *a: None,
                                      declines=lambda op, *a: "measured slower" if a[0].shape[0] > 2 else None)
    monkeypatch.setitem(_registry._loaded, "cuda", (fake_cuda, "test stand-in"))
    assert _registry.pick("qlora_linear_fwd", "cuda", _qlora_args(2)) is fake_cuda
    assert _registry.pick("qlora_linear_fwd", "cuda", _qlora_args(3)) is composite
    assert _registry.pick("qlora_linear_bwd", "cuda", ()) is composite  # the stand-in lacks the op
    # A forced backend ignores the routing preference (it still must support the call).
    monkeypatch.setenv("LORAKERN_BACKEND", "cuda")
    assert _registry.pick("qlora_linear_fwd", "cuda", _qlora_args(3)) is fake_cuda


def test_cuda_gemv_threshold_is_routing_not_capability():
    cuda = pytest.importorskip("lorakern.kernels.cuda")
    assert cuda.declines("qlora_linear_fwd", *_qlora_args(cuda.GEMV_AUTO_MAX_M)) is None
    why = cuda.declines("qlora_linear_fwd", *_qlora_args(cuda.GEMV_AUTO_MAX_M + 1))
    assert why is not None and "cuBLAS measured faster" in why
    assert cuda.declines("nf4_dequantize", nf4.quantize(torch.randn(4, 64)), torch.float16) is None
    assert cuda.GEMV_AUTO_MAX_M <= cuda.GEMV_MAX_M


def test_forced_composite_runs_the_ops_end_to_end(backend):
    backend("composite")
    x, w, b, a, bb, _ = _case(5, 64, 40, 4, torch.float32, seed=7)
    q = nf4.quantize(w, 64, True)
    leaves = [t.clone().requires_grad_() for t in (x, b, a, bb)]
    seed = torch.tensor([3])
    y = ops.qlora_linear(leaves[0].reshape(5, 1, 64), q, leaves[1], leaves[2], leaves[3], 0.5, 0.1, seed)
    want_leaves = [t.detach().double().requires_grad_() for t in (x, b, a, bb)]
    w64 = nf4.dequantize(q, torch.float64)
    want = ref.lora_linear(want_leaves[0], w64, *want_leaves[1:], 0.5, 0.1, seed)
    torch.testing.assert_close(y.reshape(5, 40).double(), want, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(y.sum(), leaves)
    exp = torch.autograd.grad(want.sum(), want_leaves)
    for gg, ee in zip(got, exp):
        torch.testing.assert_close(gg.double(), ee, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("m,n,k,r,p", [(2048, 4096, 4096, 16, 0.0), (512, 14336, 4096, 64, 0.1),
                                       (1030, 4096, 14336, 16, 0.05), (3, 1024, 4096, 8, 0.0)])
def test_gpu_composite_qlora_at_llama_shapes(m, n, k, r, p):
    """bf16 on the GPU against a float32 reference built from the same dequantized weight."""
    torch.manual_seed(m + n)
    dev = "cuda"
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    q = nf4.quantize(torch.randn(n, k, device=dev), 64, True)
    a = (torch.randn(r, k, device=dev) / k**0.5).bfloat16()
    bb = torch.randn(n, r, device=dev, dtype=torch.bfloat16)
    dy = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
    seed = torch.tensor([5], device=dev)
    assert _registry.pick("qlora_linear_fwd", "cuda", (x, q, None, a, bb, 0.5, p, seed)) is composite
    y, xa = composite.qlora_linear_fwd(x, q, None, a, bb, 0.5, p, seed)
    dx, da, db = composite.qlora_linear_bwd(dy, x, xa, q, a, bb, 0.5, p, seed, True)
    w = nf4.dequantize(q, torch.float32)
    f32 = [t.float() for t in (x, a, bb)]
    y_ref, xa_ref = ref.lora_linear_fwd(f32[0], w, None, f32[1], f32[2], 0.5, p, seed)
    dx_ref, _, da_ref, db_ref = ref.lora_linear_bwd(dy.float(), f32[0], xa.float(), w, f32[1], f32[2], 0.5, p, seed,
                                                    True, False)
    for got, want, name in ((y, y_ref, "y"), (xa, xa_ref, "xa"), (dx, dx_ref, "dx"), (da, da_ref, "dA"),
                            (db, db_ref, "dB")):
        assert got.dtype == torch.bfloat16, name
        err = ((got.float() - want).abs().max() / want.abs().max()).item()
        assert err < 2e-2, f"{name}: relative error {err:.3g}"


def test_training_step_of_a_patched_model_matches_the_reference_backend(backend):
    """apply_lora(quantize='nf4') + bf16 autocast (QLoRALinear's wide output: the backend gets
    scaling 0 and no bias) + dropout: one forward/backward under the composite backend gives the
    reference backend's loss and adapter gradients."""
    from lorakern.patch import apply_lora

    def run(name):
        backend(name)
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 96), torch.nn.GELU(), torch.nn.Linear(96, 40))
        apply_lora(model, r=8, alpha=16, dropout=0.1, quantize="nf4")
        with torch.no_grad():  # B = 0 at init would make dA zero in both runs
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn_like(p) * 0.1)
        x = torch.randn(2, 5, 64)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    loss_ref, grads_ref = run("reference")
    loss, grads = run("composite")
    assert grads.keys() == grads_ref.keys() and len(grads) >= 4
    assert all(bool(g.abs().sum() > 0) for g in grads.values())
    torch.testing.assert_close(loss, loss_ref, rtol=2e-2, atol=1e-3)
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=3e-2, atol=3e-3, msg=name)
