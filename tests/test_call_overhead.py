"""The shortcuts that keep the Python cost of a LoRA / QLoRA call low change no result and no error.

What the eager path of ``lorakern.ops`` skips, and what each test pins down:

* no ``autograd.Function`` when nothing is recorded (no grad mode or no input that
  requires grad): the same output bit for bit; under forward AD the tangent is carried;
* a 2-D ``x`` is not reshaped: the same output and gradients as a 3-D one, and the
  output stays modifiable in place;
* one shared int64 zero per device as the seed of a call without dropout: never
  written by any backend, never an inference tensor;
* :class:`~lorakern.formats.nf4.CheckedNF4Weight`: the op validates an NF4 weight
  once and the backend of the same call does not validate it again; a weight
  changed in any way between calls, or between forward and backward, is still
  refused with the usual message (nothing is cached across calls);
* the fast "all in order" tests of the argument checks: with two things wrong the
  first in the documented order is named, as before;
* ``LORAKERN_BACKEND`` is still read on every call, on the direct path too.

Speed itself is measured in benchmarks/bench_cpu.py (``overhead`` groups), never here.
"""

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch import nn

from lorakern import ops
from lorakern.formats import nf4
from lorakern.formats.nf4 import CheckedNF4Weight, NF4Weight
from lorakern.kernels import cpu as cpu_backend
from lorakern.nn import LoRALinear, QLoRALinear
from lorakern.ops import _registry

CPU_BACKENDS = [name for name in ("reference", "cpu", "composite") if _registry.load(name)[0] is not None]
K, N, R = 65, 40, 8  # K: one full 64-block plus one value


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _layer(cls, seed=0, **kw):
    torch.manual_seed(seed)
    layer = cls.from_linear(nn.Linear(K, N), r=R, **kw)
    nn.init.normal_(layer.lora_B)  # B = 0 would hide the adapter term
    return layer


def _op_inputs(quantized: bool):
    w, bias = _randn(N, K, seed=1), _randn(N, seed=2)
    base = ops.nf4_quantize(w) if quantized else w
    return base, bias, _randn(R, K, seed=3) / 8, _randn(N, R, seed=4)


def _op(quantized, x, base, bias, a, b, **kw):
    fn = ops.qlora_linear if quantized else ops.lora_linear
    return fn(x, base, bias, a, b, 0.5, **kw)


# ---------------------------------------------------------------- direct call vs autograd.Function


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("shape", [(7, K), (2, 3, K), (K,)], ids=["2d", "3d", "1d"])
def test_untracked_call_equals_the_autograd_function(backend_name, quantized, dropout_p, shape, backend):
    backend(backend_name)
    base, bias, a, b = _op_inputs(quantized)
    x = _randn(*shape, seed=5)
    seed = torch.tensor([77])
    tracked = _op(quantized, x.clone().requires_grad_(), base, bias, a, b, dropout_p=dropout_p, seed=seed)
    assert tracked.grad_fn is not None
    with torch.no_grad():
        no_grad = _op(quantized, x, base, bias, a, b, dropout_p=dropout_p, seed=seed)
    untracked = _op(quantized, x, base, bias, a, b, dropout_p=dropout_p, seed=seed)  # grad on, nothing requires it
    with torch.inference_mode():
        inference = _op(quantized, x, base, bias, a, b, dropout_p=dropout_p, seed=seed)
    for y in (no_grad, untracked, inference):
        assert y.shape == (*shape[:-1], N) and y.grad_fn is None and not y.requires_grad
        assert torch.equal(y, tracked.detach())
    assert inference.is_inference()


def test_wide_output_untracked_equals_tracked():
    base, bias, a, b = _op_inputs(True)
    x, bias, a, b = (t.bfloat16() for t in (_randn(5, K, seed=6), bias, a, b))
    tracked = ops.qlora_linear(x.clone().requires_grad_(), base, bias, a, b, 0.5, out_dtype=torch.float32)
    with torch.no_grad():
        untracked = ops.qlora_linear(x, base, bias, a, b, 0.5, out_dtype=torch.float32)
    assert untracked.dtype == torch.float32 and torch.equal(untracked, tracked.detach())


@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("grad_mode", [True, False])
def test_forward_ad_carries_the_tangent(quantized, grad_mode):
    # The direct call would silently drop the tangent, and the Function has no jvp (torch's
    # NotImplementedError): under forward AD the ops compute with the reference composition.
    base, bias, a, b = _op_inputs(quantized)
    x, v = _randn(3, K), _randn(3, K, seed=1)
    w = nf4.dequantize(base, torch.float32) if quantized else base
    with fwAD.dual_level(), torch.set_grad_enabled(grad_mode):
        tangent = fwAD.unpack_dual(_op(quantized, fwAD.make_dual(x, v), base, bias, a, b)).tangent
        nf4_tangent = fwAD.unpack_dual(ops.nf4_matmul(fwAD.make_dual(x, v), ops.nf4_quantize(w))).tangent
    torch.testing.assert_close(tangent, v @ w.t() + 0.5 * (v @ a.t()) @ b.t(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(nf4_tangent, v @ nf4.dequantize(ops.nf4_quantize(w), torch.float32).t(),
                               rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------- 2-D inputs


@pytest.mark.parametrize("cls", [LoRALinear, QLoRALinear])
def test_2d_input_gives_the_3d_results_and_gradients(cls):
    layer = _layer(cls).train()
    x = _randn(6, K, seed=7)
    grads = []
    for xin in (x.clone().requires_grad_(), x.reshape(2, 3, K).clone().requires_grad_()):
        y = layer(xin)
        assert y.shape == (*xin.shape[:-1], N)
        (y.reshape(6, N) * _randn(6, N, seed=8)).sum().backward()
        grads.append((y.detach().reshape(6, N), xin.grad.reshape(6, K), layer.lora_A.grad.clone(),
                      layer.lora_B.grad.clone()))
        layer.zero_grad(set_to_none=True)
    for got, want in zip(*grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("cls", [LoRALinear, QLoRALinear])
@pytest.mark.parametrize("shape", [(4, K), (2, 2, K)], ids=["2d", "3d"])
def test_output_can_be_modified_in_place_under_autograd(cls, shape):
    # a layer output that were a view made inside the autograd.Function could not be (torch refuses it)
    layer = _layer(cls).train()
    x = _randn(*shape, seed=9).requires_grad_()
    y = layer(x)
    y.mul_(2).add_(1)
    y.sum().backward()
    want = torch.autograd.grad(layer(x).mul(2).sum(), x)[0]
    assert torch.equal(x.grad, want)


# ---------------------------------------------------------------------------- the shared seed


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("quantized", [False, True])
def test_shared_zero_seed_is_never_written(backend_name, quantized, backend):
    backend(backend_name)
    base, bias, a, b = _op_inputs(quantized)
    x = _randn(9, K).requires_grad_()
    a.requires_grad_()
    _op(quantized, x, base, bias, a, b).sum().backward()
    with torch.no_grad():
        _op(quantized, x, base, bias, a, b)
    seed = ops._ZERO_SEEDS[torch.device("cpu")]
    assert seed.dtype == torch.int64 and seed.tolist() == [0] and seed._version == 0


def test_first_call_in_inference_mode_does_not_break_training_calls():
    # the shared seed made by a first call under inference_mode was an inference tensor,
    # which a later training call cannot save for backward
    ops._ZERO_SEEDS.pop(torch.device("cpu"), None)
    layer = _layer(LoRALinear)
    with torch.inference_mode():
        layer(_randn(3, K))
    assert not ops._ZERO_SEEDS[torch.device("cpu")].is_inference()
    layer(_randn(3, K)).sum().backward()
    assert layer.lora_A.grad is not None


# ------------------------------------------------------------------------- NF4 validation


def _count_validations(monkeypatch) -> list:
    calls = []
    real = nf4.validate
    monkeypatch.setattr(nf4, "validate", lambda q, name="qweight": calls.append(name) or real(q, name))
    return calls


def test_nf4_weight_is_validated_once_per_call(monkeypatch):
    if _registry.load("cpu")[0] is None:
        pytest.skip("lorakern._C is not built")
    monkeypatch.delenv("LORAKERN_BACKEND", raising=False)
    layer = _layer(QLoRALinear).train()
    x = _randn(3, K).requires_grad_()
    calls = _count_validations(monkeypatch)
    y = layer(x)
    assert calls == ["qweight"]  # by the op; the backend trusts its CheckedNF4Weight
    y.sum().backward()
    assert calls == ["qweight", "q"]  # backward validates the plain weight again
    with torch.no_grad():
        layer(x)
    assert calls == ["qweight", "q", "qweight"]


def test_a_checked_weight_from_outside_is_validated_by_the_public_op():
    q = ops.nf4_quantize(_randn(N, K))
    bad = CheckedNF4Weight._make(q._replace(absmax=q.absmax[:-1]))
    with pytest.raises(ValueError, match="qweight.absmax has 40 values, expected 41"):
        ops.qlora_linear(_randn(2, K), bad, None, _randn(R, K), _randn(N, R))


def test_editing_a_checked_weight_gives_an_unchecked_one():
    q = CheckedNF4Weight._make(ops.nf4_quantize(_randn(N, K)))
    edited = q._replace(absmax=q.absmax[:-1])
    assert type(edited) is NF4Weight and type(q.to("cpu")) is NF4Weight
    if cpu_backend._C is not None:
        with pytest.raises(ValueError, match="q.absmax has 40 values, expected 41"):
            cpu_backend.nf4_dequantize(edited, torch.float32)


@pytest.mark.parametrize("change, match", [
    (lambda m: m.absmax.resize_(3), "absmax has 3 values, expected 41"),
    (lambda m: setattr(m.weight, "data", m.weight.data[:-1]), "packed has 1299 bytes, expected 1300"),
    (lambda m: setattr(m.nested_code, "data", m.nested_code.data.double()), "nested_code must be 256 float32"),
    (lambda m: m.register_buffer("offset", torch.zeros(2), persistent=False), "offset must be a float32 tensor"),
])
def test_module_buffers_changed_between_calls_are_refused(change, match):
    # nothing about the quantization state is cached across calls
    layer = _layer(QLoRALinear)
    layer(_randn(2, K))
    change(layer)
    with pytest.raises(ValueError, match=match):
        layer(_randn(2, K))


def test_buffer_changed_between_forward_and_backward_is_refused():
    layer = _layer(QLoRALinear).train()
    y = layer(_randn(2, K).requires_grad_())
    layer.absmax.resize_(5)
    with pytest.raises(ValueError, match="q.absmax has 5 values, expected 41"):
        y.sum().backward()


# --------------------------------------------------------------------------- check ordering


@pytest.mark.parametrize("a_change, b_change, match", [
    (lambda a: a.double(), lambda b: b[0], "lora_B must be 2-D"),  # both tensor checks come before any dtype check
    (lambda a: a, lambda b: b.double(), "lora_B has dtype torch.float64 but x has torch.float32"),
    (lambda a: a[:0], lambda b: b[:, :3], "lora_A must have rank r >= 1"),
    (lambda a: a[:, :-1], lambda b: b[:-1], "lora_A must have shape \\[r, 65\\]"),
])
def test_two_bad_adapter_arguments_name_the_first_in_order(a_change, b_change, match):
    x, w = _randn(3, K), _randn(N, K, seed=1)
    a, b = a_change(_randn(R, K, seed=2)), b_change(_randn(N, R, seed=3))
    with pytest.raises((TypeError, ValueError), match=match):
        ops.lora_linear(x, w, None, a, b)


@pytest.mark.parametrize("bias, match", [
    (torch.zeros(N, dtype=torch.float64), "bias has dtype torch.float64"),
    (torch.zeros(N + 1, dtype=torch.float64), "bias has dtype torch.float64"),  # dtype named before the shape
    (torch.zeros(1, N), "bias must be 1-D"),
])
def test_bias_errors_keep_their_order(bias, match):
    with pytest.raises((TypeError, ValueError), match=match):
        ops.lora_linear(_randn(3, K), _randn(N, K), bias, _randn(R, K), _randn(N, R))


@pytest.mark.parametrize("scaling, dropout_p, exc, match", [
    (2, 0.0, None, None),  # an int scaling is a real number
    (float("nan"), 0.0, ValueError, "scaling must be a finite number"),
    (1.0, 1.0, ValueError, "dropout_p must be in \\[0, 1\\)"),
    (1.0, torch.tensor(0.1), TypeError, "dropout_p must be a real number"),
])
def test_scalar_checks_off_the_float_fast_path(scaling, dropout_p, exc, match):
    args = (_randn(3, K), _randn(N, K), None, _randn(R, K), _randn(N, R), scaling, dropout_p)
    if exc is None:
        assert ops.lora_linear(*args).shape == (3, N)
    else:
        with pytest.raises(exc, match=match):
            ops.lora_linear(*args)


def test_cpu_supports_names_tensors_before_nf4_weights():
    q = ops.nf4_quantize(_randn(N, K))
    meta_q = q._replace(packed=q.packed.to("meta"))
    x, meta_x = _randn(2, K), torch.empty(2, K, device="meta")
    assert cpu_backend.supports("nf4_matmul", x, meta_q, None) == "tensor on meta; this backend runs CPU tensors"
    assert cpu_backend.supports("nf4_matmul", meta_x, q, None) == "tensor on meta; this backend runs CPU tensors"
    assert cpu_backend.supports("nf4_matmul", x.double(), q, None).startswith("dtype torch.float64")
    assert cpu_backend.supports("nf4_matmul", x, q._replace(blocksize=48), None).startswith("blocksize 48")
    assert cpu_backend.supports("nf4_matmul", x, q, None) is None


# ---------------------------------------------------------------------------------- env var


@pytest.mark.parametrize("cls", [LoRALinear, QLoRALinear])
def test_backend_env_var_is_read_on_every_untracked_call(cls, monkeypatch):
    layer = _layer(cls).eval()
    x = _randn(2, K)
    with torch.no_grad():
        layer(x)
        monkeypatch.setenv("LORAKERN_BACKEND", "cuda")
        with pytest.raises(ops.BackendUnavailable, match="LORAKERN_BACKEND=cuda"):
            layer(x)
        monkeypatch.setenv("LORAKERN_BACKEND", "reference")
        torch.testing.assert_close(layer(x), layer.merged_linear()(x), rtol=2e-6, atol=2e-6)
