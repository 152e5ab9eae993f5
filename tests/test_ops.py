"""The public ops: opcheck, autograd through dispatch, backend selection, input validation, compile."""

import os
import subprocess
import sys

import pytest
import torch

from lorakern import ops
from lorakern import reference as ref
from lorakern.formats import nf4
from lorakern.ops import _registry

CPU_BACKENDS = [name for name in ("reference", "cpu", "composite") if _registry.load(name)[0] is not None]


def _triton_on_cpu() -> list[str]:
    """["triton"] where its kernels run on CPU tensors (the interpreter, see conftest.py), else []."""
    return ["triton"] if _registry.load("triton")[0] is not None else []


def _lora_args(dtype=torch.float32, m=7, k=65, n=40, r=8, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(dtype)

    return rand(m, k), rand(n, k), rand(n), rand(r, k) / k**0.5, rand(n, r)


# --------------------------------------------------------------------------- opcheck


def _opcheck_cases():
    x, w, b, a, bb = _lora_args()
    q = nf4.quantize(torch.randn(40, 65))
    qargs = (*q.tensors(), list(q.shape), q.blocksize)
    seed = torch.tensor([3])
    for t in (x, a, bb, b):
        t.requires_grad_()
    return {
        "nf4_quantize": (torch.ops.lorakern.nf4_quantize.default, (torch.randn(33, 70), 64, True)),
        "nf4_quantize_plain": (torch.ops.lorakern.nf4_quantize.default, (torch.randn(33, 70).bfloat16(), 64, False)),
        "nf4_dequantize": (torch.ops.lorakern.nf4_dequantize.default, (*qargs, torch.bfloat16)),
        "nf4_matmul": (torch.ops.lorakern.nf4_matmul.default, (x, *qargs, b)),
        "nf4_matmul_t": (torch.ops.lorakern.nf4_matmul_t.default, (torch.randn(7, 40), *qargs)),
        "lora_linear_fwd": (torch.ops.lorakern.lora_linear_fwd.default, (x, w, b, a, bb, 0.5, 0.2, seed)),
        "lora_linear_fwd_trainable_base": (torch.ops.lorakern.lora_linear_fwd.default,
                                           (x, w.clone().requires_grad_(), None, a, bb, 2.0, 0.0, seed)),
        "lora_linear_bwd": (torch.ops.lorakern.lora_linear_bwd.default,
                            (torch.randn(7, 40), x.detach(), torch.randn(7, 8), w, a.detach(), bb.detach(), 0.5, 0.2, seed, True, False)),
        "qlora_linear_fwd": (torch.ops.lorakern.qlora_linear_fwd.default, (x, *qargs, b, a, bb, 0.5, 0.1, seed)),
        "qlora_linear_bwd": (torch.ops.lorakern.qlora_linear_bwd.default,
                             (torch.randn(7, 40), x.detach(), torch.randn(7, 8), *qargs, a.detach(), bb.detach(), 0.5, 0.1, seed, True)),
    }


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case, backend_name, backend):
    backend(backend_name)
    op, args = _opcheck_cases()[case]
    torch.library.opcheck(op, args)


# ---------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("dropout_p", [0.0, 0.1])
@pytest.mark.parametrize("trainable_base", [False, True])
def test_lora_linear_matches_reference_autograd(backend_name, dropout_p, trainable_base, backend):
    """Through the op's autograd, every backend matches the float64 reference composition."""
    backend(backend_name)
    dtype = torch.float64 if backend_name == "reference" else torch.float32
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    x, w, b, a, bb = _lora_args(dtype)
    x = x.reshape(7, 1, 65).expand(7, 3, 65)  # non-contiguous, batched input
    leaves = [t.clone().requires_grad_() for t in (x, w, b, a, bb)]
    leaves[1].requires_grad_(trainable_base)
    seed = torch.tensor([42])
    y = ops.lora_linear(*leaves, 0.5, dropout_p, seed)
    want_leaves = [t.detach().double().requires_grad_(t.requires_grad) for t in leaves]
    want = ref.lora_linear(*want_leaves, 0.5, dropout_p, seed)
    torch.testing.assert_close(y.double(), want, **tol)
    dy = torch.randn_like(want)
    got = torch.autograd.grad(y, [t for t in leaves if t.requires_grad], dy.to(dtype))
    exp = torch.autograd.grad(want, [t for t in want_leaves if t.requires_grad], dy)
    assert len(got) == (5 if trainable_base else 4)
    for gg, ee in zip(got, exp):
        torch.testing.assert_close(gg.double(), ee, **tol)


def test_forced_backend_rejecting_dtype_is_an_error(backend):
    if "cpu" not in CPU_BACKENDS:
        pytest.skip("cpu backend not built")
    backend("cpu")
    with pytest.raises(ops.BackendUnavailable, match="LORAKERN_BACKEND=cpu: lora_linear_fwd not supported here"):
        ops.lora_linear(*_lora_args(torch.float64))


def test_gradcheck_through_ops(backend):
    backend("reference")  # gradcheck needs float64, which only the reference runs
    x, w, b, a, bb = (t.requires_grad_() for t in _lora_args(torch.float64, m=3, k=9, n=5, r=2))
    seed = torch.tensor([8])
    assert torch.autograd.gradcheck(lambda *t: ops.lora_linear(*t, 1.5, 0.2, seed), (x, w, b, a, bb))
    q = nf4.quantize(torch.randn(5, 9))
    assert torch.autograd.gradcheck(lambda x, b, a, bb: ops.qlora_linear(x, q, b, a, bb, 1.5, 0.2, seed), (x, b, a, bb))
    assert torch.autograd.gradcheck(lambda x, b: ops.nf4_matmul(x, q, b), (x, b))


def test_qlora_and_nf4_ops_match_reference():
    x, w, b, a, bb = _lora_args(torch.float32)
    q = ops.nf4_quantize(w)
    ref_q = nf4.quantize(w)
    for got, want in zip(q.tensors(), ref_q.tensors()):
        assert torch.equal(got, want)
    assert q.shape == ref_q.shape and q.dtype == w.dtype
    torch.testing.assert_close(ops.nf4_dequantize(q, torch.bfloat16), nf4.dequantize(q, torch.bfloat16), rtol=0, atol=0)
    torch.testing.assert_close(ops.nf4_matmul(x, q, b), ref.nf4_matmul(x, q, b))
    seed = torch.tensor([1])
    torch.testing.assert_close(ops.qlora_linear(x, q, b, a, bb, 2.0, 0.1, seed), ref.qlora_linear(x, q, b, a, bb, 2.0, 0.1, seed))


def test_dropout_seed_none_draws_from_torch_generator():
    x, w, b, a, bb = _lora_args()
    torch.manual_seed(0)
    y1 = ops.lora_linear(x, w, b, a, bb, 1.0, 0.5)
    torch.manual_seed(0)
    y2 = ops.lora_linear(x, w, b, a, bb, 1.0, 0.5)
    y3 = ops.lora_linear(x, w, b, a, bb, 1.0, 0.5)
    assert torch.equal(y1, y2) and not torch.equal(y2, y3)


# ------------------------------------------------------------------------------ dispatch


def test_forced_backend_that_cannot_run_raises(monkeypatch):
    x, w, b, a, bb = _lora_args()
    monkeypatch.setenv("LORAKERN_BACKEND", "cuda")
    with pytest.raises(ops.BackendUnavailable, match="LORAKERN_BACKEND=cuda"):
        ops.lora_linear(x, w, b, a, bb)
    monkeypatch.setenv("LORAKERN_BACKEND", "tpu")
    with pytest.raises(ops.BackendUnavailable, match="not a backend"):
        ops.lora_linear(x, w, b, a, bb)


def test_forced_backend_missing_op_raises(monkeypatch):
    class Partial:
        @staticmethod
        def availability():
            return True, "test"

    monkeypatch.setitem(_registry._loaded, "cpu", (Partial, "test"))
    monkeypatch.setenv("LORAKERN_BACKEND", "cpu")
    x, w, b, a, bb = _lora_args()
    with pytest.raises(ops.BackendUnavailable, match="does not implement lora_linear_fwd"):
        ops.lora_linear(x, w, b, a, bb)
    monkeypatch.setenv("LORAKERN_BACKEND", "auto")  # auto falls back to the next backend
    torch.testing.assert_close(ops.lora_linear(x, w, b, a, bb), ref.lora_linear(x, w, b, a, bb))


def test_a_forced_backend_without_nf4_quantize_hands_it_on(monkeypatch):
    """nf4_quantize (a storage conversion, bit-identical everywhere) is the one op a forced backend that lacks
    it leaves to the automatic choice; the compute ops stay refused."""
    class Partial:
        @staticmethod
        def availability():
            return True, "test"

    monkeypatch.setitem(_registry._loaded, "composite", (Partial, "test"))
    monkeypatch.setenv("LORAKERN_BACKEND", "composite")
    w = torch.randn(40, 65)
    q = ops.nf4_quantize(w)
    assert all(torch.equal(got, want) for got, want in zip(q.tensors(), nf4.quantize(w).tensors()))
    with pytest.raises(ops.BackendUnavailable, match="does not implement nf4_dequantize"):
        ops.nf4_dequantize(q)


@pytest.mark.skipif(not _triton_on_cpu(), reason="the Triton backend is not available (no CUDA and no interpreter)")
def test_forced_triton_builds_a_qlora_layer_and_runs_it(monkeypatch):
    """LORAKERN_BACKEND=triton: QLoRALinear.from_linear quantizes (on the automatic choice: Triton has no
    quantizer) and the forward runs the Triton kernels. Before, the quantization raised BackendUnavailable."""
    from lorakern.kernels import triton as tk
    from lorakern.nn import QLoRALinear

    monkeypatch.setenv("LORAKERN_BACKEND", "triton")
    lin = torch.nn.Linear(64, 32).half()
    layer = QLoRALinear.from_linear(lin, r=4)
    assert all(torch.equal(got, want) for got, want in zip(layer.quantized_weight().tensors(),
                                                           nf4.quantize(lin.weight.detach()).tensors()))
    calls = []
    real = tk.qlora_linear_fwd
    monkeypatch.setattr(tk, "qlora_linear_fwd", lambda *args: calls.append(1) or real(*args))
    x = torch.randn(3, 64, dtype=torch.float16)
    y = layer(x)
    assert calls == [1]
    want = ref.qlora_linear(x.double(), layer.quantized_weight(), lin.bias.detach().double(),
                            layer.lora_A.detach().double(), layer.lora_B.detach().double(), layer.scaling)
    torch.testing.assert_close(y.double(), want, rtol=2e-3, atol=2e-3 * want.abs().max().item())


def test_auto_skips_backend_that_rejects_arguments(monkeypatch):
    calls = []

    class Picky:
        @staticmethod
        def supports(op, *args):
            calls.append(op)
            return "float64 not supported"

        lora_linear_fwd = staticmethod(lambda *a: pytest.fail("must not be called"))

    monkeypatch.setitem(_registry._loaded, "cpu", (Picky, "test"))
    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)
    x, w, b, a, bb = _lora_args()
    ops.lora_linear(x, w, b, a, bb)
    assert calls == ["lora_linear_fwd"]


def test_status_reports_every_backend():
    st = ops.status()
    assert set(st) == {"cuda", "composite", "triton", "cpu", "reference"}
    assert st["reference"][0] is True
    for ok, reason in st.values():
        assert isinstance(reason, str) and reason


# ---------------------------------------------------------------------------- validation


def _call_lora(**over):
    x, w, b, a, bb = _lora_args()
    kw = dict(x=x, weight=w, bias=b, lora_A=a, lora_B=bb, scaling=1.0, dropout_p=0.0, seed=None)
    kw.update(over)
    return ops.lora_linear(**kw)


@pytest.mark.parametrize(
    "over, exc, match",
    [
        (dict(x=torch.randn(7, 64)), ValueError, "x has 64 features .* expects K = 65"),
        (dict(x=torch.tensor(1.0)), ValueError, "at least 1 dimension"),
        (dict(x=torch.ones(7, 65, dtype=torch.int64)), TypeError, "x must have dtype in"),
        (dict(x=[[1.0]]), TypeError, "x must be a torch.Tensor"),
        (dict(weight=torch.randn(40, 65, 1)), ValueError, "weight must be 2-D"),
        (dict(weight=torch.randn(40, 65).double()), TypeError, "weight has dtype torch.float64 but x has torch.float32"),
        (dict(weight=torch.randn(40, 65, device="meta")), ValueError, "weight is on meta but x is on cpu"),
        (dict(bias=torch.randn(41)), ValueError, r"bias must have shape \[40\]"),
        (dict(lora_A=torch.randn(8, 64)), ValueError, r"lora_A must have shape \[r, 65\]"),
        (dict(lora_A=torch.randn(0, 65)), ValueError, "rank r >= 1"),
        (dict(lora_B=torch.randn(40, 4)), ValueError, r"lora_B must have shape \[40, 8\]"),
        (dict(lora_B=torch.randn(39, 8)), ValueError, r"lora_B must have shape \[40, 8\]"),
        (dict(lora_B=torch.randn(40, 8).half()), TypeError, "lora_B has dtype torch.float16"),
        (dict(scaling=float("inf")), ValueError, "scaling must be a finite number"),
        (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\)"),
        (dict(seed=torch.tensor([1.0])), TypeError, "seed must have dtype"),
        (dict(seed=torch.tensor([1, 2])), ValueError, "seed must hold exactly one"),
    ],
)
def test_lora_linear_bad_inputs(over, exc, match):
    with pytest.raises(exc, match=match):
        _call_lora(**over)


def test_nf4_ops_bad_inputs():
    q = ops.nf4_quantize(torch.randn(40, 65))
    x = torch.randn(3, 65)
    with pytest.raises(ValueError, match="NaN/inf"):
        ops.nf4_quantize(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="qweight expects K = 65"):
        ops.nf4_matmul(torch.randn(3, 64), q)
    with pytest.raises(ValueError, match="qweight.absmax has 40 values, expected 41"):
        ops.nf4_matmul(x, q._replace(absmax=q.absmax[:-1]))
    with pytest.raises(ValueError, match="2-D"):
        ops.nf4_matmul(x, ops.nf4_quantize(torch.randn(65)))
    with pytest.raises(ValueError, match="packed must be contiguous"):
        strided = torch.empty(2 * q.packed.numel(), dtype=torch.uint8)[::2]
        strided.copy_(q.packed)
        ops.nf4_matmul(x, q._replace(packed=strided))
    with pytest.raises(TypeError, match="floating dtype"):
        ops.nf4_dequantize(q, torch.int8)
    with pytest.raises(ValueError, match="x has no features"):
        ops.qlora_linear(torch.randn(3, 0), q, None, torch.randn(4, 65), torch.randn(40, 4))


@pytest.mark.parametrize("lead", [(0,), (2, 0), (0, 3)])
def test_a_batch_without_rows_gives_an_empty_result_and_zero_gradients(lead):
    # As nn.Linear: an MoE expert no token was routed to calls its layers with such a batch.
    from lorakern.nn import LoRALinear, QLoRALinear

    torch.manual_seed(0)
    base = torch.nn.Linear(65, 40)
    for layer in (LoRALinear.from_linear(base, r=4, alpha=8), QLoRALinear.from_linear(base, r=4, alpha=8)):
        x = torch.randn(*lead, 65, requires_grad=True)
        y = layer(x)
        assert y.shape == (*lead, 40) and y.dtype == torch.float32
        y.sum().backward()
        assert x.grad.shape == x.shape
        for p in (layer.lora_A, layer.lora_B):
            assert p.grad is not None and p.grad.shape == p.shape and not p.grad.any()
    q = ops.nf4_quantize(base.weight.detach())
    assert ops.nf4_matmul(torch.randn(*lead, 65), q, base.bias).shape == (*lead, 40)
    y = ops.qlora_linear(torch.randn(*lead, 65, dtype=torch.bfloat16), q, None, torch.randn(4, 65, dtype=torch.bfloat16),
                         torch.randn(40, 4, dtype=torch.bfloat16), out_dtype=torch.float32)
    assert y.shape == (*lead, 40) and y.dtype == torch.float32


# ------------------------------------------------------------------------------- compile


def test_torch_compile_fullgraph_module():
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            g = torch.Generator().manual_seed(0)
            self.weight = torch.nn.Parameter(torch.randn(40, 65, generator=g), requires_grad=False)
            self.q = nf4.quantize(torch.randn(40, 40, generator=g))
            self.lora_A = torch.nn.Parameter(torch.randn(8, 65, generator=g) * 0.1)
            self.lora_B = torch.nn.Parameter(torch.randn(40, 8, generator=g) * 0.1)
            self.lora_A2 = torch.nn.Parameter(torch.randn(4, 40, generator=g) * 0.1)
            self.lora_B2 = torch.nn.Parameter(torch.randn(40, 4, generator=g) * 0.1)

        def forward(self, x, seed):
            h = ops.lora_linear(x, self.weight, None, self.lora_A, self.lora_B, 2.0, 0.1, seed)
            return ops.qlora_linear(torch.relu(h), self.q, None, self.lora_A2, self.lora_B2, 0.5, 0.0, seed)

    torch._dynamo.reset()
    m = Tiny()
    x = torch.randn(2, 5, 65)
    seed = torch.tensor([3])
    eager = m(x, seed)
    eager.square().sum().backward()
    grads = [p.grad.clone() for p in (m.lora_A, m.lora_B, m.lora_A2, m.lora_B2)]
    m.zero_grad()
    compiled = torch.compile(m, fullgraph=True)
    out = compiled(x, seed)
    out.square().sum().backward()
    torch.testing.assert_close(out, eager)
    for p, g in zip((m.lora_A, m.lora_B, m.lora_A2, m.lora_B2), grads):
        torch.testing.assert_close(p.grad, g)


def test_import_is_lean():
    """import lorakern loads no backend, no triton, no transformers and does not touch CUDA."""
    code = (
        "import sys, lorakern; "
        "bad = [m for m in ('triton', 'transformers', 'peft', 'bitsandbytes', 'lorakern._C', 'lorakern._cuda', "
        "'lorakern.kernels.cpu', 'lorakern.ops') if m in sys.modules]; "
        "import torch; assert not torch.cuda.is_initialized(); print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_env_report_runs():
    out = subprocess.run([sys.executable, "-m", "lorakern.env"], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "reference  available" in out.stdout and "cpu features:" in out.stdout


def _eager_vs_custom_op(fn, inputs, monkeypatch):
    """(outputs, grads) of fn through the eager fast path and through the custom op."""
    results = []
    for fast in (True, False):
        if not fast:
            monkeypatch.setattr(ops, "_eager_fast_path", lambda *t: False)
        leaves = [t.detach().clone().requires_grad_(t.requires_grad) for t in inputs]
        y = fn(*leaves)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        results.append((y.detach(), [t.grad for t in leaves if t.requires_grad]))
    return results


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_eager_fast_path_equals_custom_op(quantized, dropout_p, monkeypatch):
    torch.manual_seed(3)
    x = torch.randn(2, 5, 64, requires_grad=True)
    w = torch.randn(40, 64, requires_grad=not quantized)
    bias = torch.randn(40, requires_grad=True)
    a, b = torch.randn(8, 64, requires_grad=True), torch.randn(40, 8, requires_grad=True)
    seed = torch.tensor([1234])
    q = ops.nf4_quantize(w.detach())
    if quantized:
        def fn(x, w, bias, a, b):
            return ops.qlora_linear(x, q, bias, a, b, 0.5, dropout_p, seed)
    else:
        def fn(x, w, bias, a, b):
            return ops.lora_linear(x, w, bias, a, b, 0.5, dropout_p, seed)
    (y_fast, g_fast), (y_op, g_op) = _eager_vs_custom_op(fn, [x, w, bias, a, b], monkeypatch)
    torch.testing.assert_close(y_fast, y_op, rtol=0, atol=0)
    assert len(g_fast) == len(g_op) == (4 if quantized else 5)
    for got, want in zip(g_fast, g_op):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_fake_tensors_take_the_custom_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    w = torch.randn(40, 64)
    q = ops.nf4_quantize(w)
    with FakeTensorMode(allow_non_fake_inputs=True) as mode:
        x = mode.from_tensor(torch.randn(3, 64))
        a, b = torch.randn(8, 64), torch.randn(40, 8)
        assert not ops._eager_fast_path(x)
        y = ops.qlora_linear(x, q, None, a, b, 1.0)
        z = ops.lora_linear(x, w, None, a, b, 1.0)
    assert y.shape == z.shape == (3, 40)


@pytest.mark.parametrize("m_rows", [2, 33])
def test_qlora_wide_output_eager_equals_traceable_composite(m_rows, monkeypatch):
    torch.manual_seed(9)
    x = torch.randn(m_rows, 64, dtype=torch.bfloat16, requires_grad=True)
    q = ops.nf4_quantize(torch.randn(40, 64))
    bias = torch.randn(40, dtype=torch.bfloat16, requires_grad=True)
    a = torch.randn(8, 64, dtype=torch.bfloat16, requires_grad=True)
    b = torch.randn(40, 8, dtype=torch.bfloat16, requires_grad=True)
    seed = torch.tensor([31])

    def fn(x, bias, a, b):
        return ops.qlora_linear(x, q, bias, a, b, 0.5, 0.25, seed, out_dtype=torch.float32)

    (y_fast, g_fast), (y_op, g_op) = _eager_vs_custom_op(fn, [x, bias, a, b], monkeypatch)
    assert y_fast.dtype == y_op.dtype == torch.float32
    torch.testing.assert_close(y_fast, y_op, rtol=0, atol=0)
    for got, want in zip(g_fast, g_op):  # bf16 partial gradients summed in another order: ~1 ulp
        torch.testing.assert_close(got, want, rtol=2e-2, atol=float(want.abs().max()) * 2.0 ** -6)


def test_qlora_out_dtype_must_be_wider():
    x = torch.randn(3, 64)
    q = ops.nf4_quantize(torch.randn(40, 64))
    a, b = torch.randn(8, 64), torch.randn(40, 8)
    with pytest.raises(ValueError, match="out_dtype"):
        ops.qlora_linear(x.bfloat16(), q, None, a.bfloat16(), b.bfloat16(), out_dtype=torch.float16)
    with pytest.raises(ValueError, match="out_dtype"):
        ops.qlora_linear(x.bfloat16(), q, None, a.bfloat16(), b.bfloat16(), out_dtype=torch.int32)
    assert ops.qlora_linear(x, q, None, a, b, out_dtype=torch.float32).dtype == torch.float32  # same dtype: no-op


# --------------------------------------------------------------------------- torch.func


def _func_cases():
    x, w, b, a, bb = _lora_args(torch.float64, m=5, k=20, n=12, r=4)
    q = nf4.quantize(torch.randn(12, 20))
    seed = torch.tensor([7])
    return x, {
        "lora_linear": lambda x: ops.lora_linear(x, w, b, a, bb, 0.5, 0.25, seed),
        "lora_linear_in_A": lambda a_: ops.lora_linear(x, w, b, a_, bb, 0.5, 0.25, seed),
        "qlora_linear": lambda x: ops.qlora_linear(x, q, b, a, bb, 0.5, 0.25, seed),
        "nf4_matmul": lambda x: ops.nf4_matmul(x, q, b),
    }, {
        "lora_linear": lambda x: ref.lora_linear(x, w, b, a, bb, 0.5, 0.25, seed),
        "lora_linear_in_A": lambda a_: ref.lora_linear(x, w, b, a_, bb, 0.5, 0.25, seed),
        "qlora_linear": lambda x: ref.qlora_linear(x, q, b, a, bb, 0.5, 0.25, seed),
        "nf4_matmul": lambda x: x @ nf4.dequantize(q, x.dtype).t() + b,
    }, a


@pytest.mark.parametrize("case", ["lora_linear", "lora_linear_in_A", "qlora_linear", "nf4_matmul"])
@pytest.mark.parametrize("transform", ["jvp", "jacfwd", "jacrev", "vjp", "grad"])
def test_torch_func_transforms_differentiate_the_ops(case, transform):
    """torch.func's grad / vjp / jacrev / jvp / jacfwd give the reference's derivatives (the custom ops'
    autograd does not serve them: jvp gave all-zero tangents, grad a torch-internal error)."""
    x, ours, theirs, a = _func_cases()
    primal = a if case.endswith("_in_A") else x
    f, g = ours[case], theirs[case]
    tangent = torch.randn_like(primal)
    if transform == "jvp":
        got, want = torch.func.jvp(f, (primal,), (tangent,))[1], torch.func.jvp(g, (primal,), (tangent,))[1]
        assert want.abs().max() > 0
    elif transform in ("jacfwd", "jacrev"):
        got, want = getattr(torch.func, transform)(f)(primal), torch.func.jacrev(g)(primal)
    elif transform == "vjp":
        cot = torch.randn_like(g(primal))
        got, want = torch.func.vjp(f, primal)[1](cot)[0], torch.func.vjp(g, primal)[1](cot)[0]
    else:
        got, want = torch.func.grad(lambda p: f(p).square().sum())(primal), torch.func.grad(
            lambda p: g(p).square().sum())(primal)
    assert want.abs().max() > 0
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_torch_func_grad_of_a_layer_through_functional_call():
    from lorakern.nn import LoRALinear

    m = LoRALinear.from_linear(torch.nn.Linear(20, 12), r=4, dropout=0.0)
    torch.nn.init.normal_(m.lora_B)
    params = {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}
    x = torch.randn(3, 20)
    grads = torch.func.grad(lambda p: torch.func.functional_call(m, p, (x,)).square().sum())(params)
    m(x).square().sum().backward()
    for name, g in grads.items():
        torch.testing.assert_close(g, getattr(m, name).grad)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS + _triton_on_cpu())
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [5, 21])  # the NF4 GEMVs (M <= 16) and the GEMMs
@pytest.mark.parametrize("quantized", [False, True])
def test_scaling_zero_is_no_lora_term_on_every_backend(quantized, m, dtype, backend_name, backend):
    """At scaling 0 the ops add no LoRA term, whatever the adapter holds: y and dx are the base layer's,
    dA and dB zero, on every backend (before, 0 * inf = NaN came out of some backends and not others)."""
    x, w, b, a, bb = _lora_args(dtype, m=m)
    q = nf4.quantize(w)
    a = a.clone().fill_(float("nan"))
    bb = bb.clone().fill_(float("inf"))
    x.requires_grad_()
    a.requires_grad_()
    bb.requires_grad_()
    backend(backend_name)
    for dropout_p in (0.0, 0.25):
        if quantized:
            y = ops.qlora_linear(x, q, b, a, bb, 0.0, dropout_p)
            base = ops.nf4_matmul(x.detach(), q, b)
        else:
            y = ops.lora_linear(x, w, b, a, bb, 0.0, dropout_p)
            base = x.detach() @ w.t() + b
        dy = torch.randn_like(y)
        dx, da, db = torch.autograd.grad(y, (x, a, bb), dy)
        dense = nf4.dequantize(q, torch.float64) if quantized else w.double()
        tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
        want = x.detach().double() @ dense.t() + b.double()
        torch.testing.assert_close(y.detach().double(), want, rtol=tol, atol=tol * want.abs().max().item())
        if quantized:
            assert torch.equal(y.detach(), base)  # the same backend's base GEMM, nothing added
        want_dx = dy.double() @ dense
        torch.testing.assert_close(dx.double(), want_dx, rtol=tol, atol=tol * want_dx.abs().max().item())
        assert not da.any() and not db.any()


@pytest.mark.parametrize("compiled", [False, True])
def test_scaling_zero_with_a_wide_qlora_output(compiled):
    """The wide-output path (bf16 x, float32 out: QLoRALinear under autocast) adds the LoRA term
    itself, eagerly and in the traceable composition torch.compile takes: at scaling 0 nothing
    is added either (before, the compiled path gave 0 * inf = NaN everywhere)."""
    x, w, b, a, bb = _lora_args(torch.bfloat16, m=5)
    q = nf4.quantize(w)
    bb = bb.clone().fill_(float("inf"))

    def call(x, a, bb):
        return ops.qlora_linear(x, q, b, a, bb, 0.0, 0.0, out_dtype=torch.float32)

    fn = torch.compile(call, fullgraph=True) if compiled else call
    y = fn(x, a, bb)
    want = ops.nf4_matmul(x, q, None).float() + b.float()
    assert y.dtype == torch.float32 and torch.equal(y, want)
