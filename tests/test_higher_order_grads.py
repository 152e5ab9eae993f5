"""Second derivatives through the LoRA ops and layers (``create_graph=True``), against plain torch in float64.

Meta-learning (an inner SGD step on the adapter, then an outer loss), gradient
penalties and Hessian-vector products differentiate a gradient again. Every term
must be there: the ones through ``xa = drop(x) A^T`` (which forward saves for
backward) included, e.g. d/dA of dL/dB.
"""

import pytest
import torch
import torch.nn.functional as F

from lorakern import ops
from lorakern.formats import nf4
from lorakern.nn import LoRAExperts
from lorakern.ops import _registry
from lorakern.reference.dropout import apply_dropout

CPU_BACKENDS = [name for name in ("reference", "cpu") if _registry.load(name)[0] is not None]
K, N, R = 65, 40, 8  # K straddles an NF4 block boundary
SCALING = 1.5
# max |got - want| / max |want| for float32 against float64: ~5x the largest seen (8.4e-7)
RTOL = 4e-6


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _rel(got, want):
    return ((got.double() - want).abs().max() / want.abs().max()).item()


def _torch_lora(x, w, bias, lora_A, lora_B, dropout_p, seed):
    return F.linear(x, w, bias) + SCALING * (apply_dropout(x, seed, dropout_p) @ lora_A.t()) @ lora_B.t()


def _meta_gradients(layer, x, lora_A, lora_B):
    """One inner SGD step on the adapter (create_graph), then d(outer loss)/d(x, A, B) through that step."""
    y = layer(x, lora_A, lora_B)
    ga, gb = torch.autograd.grad(y.square().mean(), (lora_A, lora_B), create_graph=True)
    fast_A, fast_B = lora_A - 0.1 * ga, lora_B - 0.1 * gb
    outer = layer(x, fast_A, fast_B).tanh().mean()
    return torch.autograd.grad(outer, (x, lora_A, lora_B))


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("quantized", [False, True])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
def test_meta_gradient_through_an_inner_adapter_step(backend_name, quantized, dropout_p, backend):
    # Before, the saved xa (computed outside autograd) fed backward's dB = s dy^T xa, so the
    # terms of dB through x and A were missing: d/dA off by up to 40% of its largest value.
    backend(backend_name)
    weight, bias, seed = _randn(N, K, seed=1), _randn(N, seed=2), torch.tensor([7])
    q = ops.nf4_quantize(weight)
    w64 = nf4.dequantize(q, torch.float64) if quantized else weight.double()

    def ours(x, lora_A, lora_B):
        if quantized:
            return ops.qlora_linear(x, q, bias, lora_A, lora_B, SCALING, dropout_p, seed)
        return ops.lora_linear(x, weight, bias, lora_A, lora_B, SCALING, dropout_p, seed)

    def plain(x, lora_A, lora_B):
        return _torch_lora(x, w64, bias.double(), lora_A, lora_B, dropout_p, seed)

    x, lora_A, lora_B = _randn(7, K, seed=3), _randn(R, K, seed=4) / 8, _randn(N, R, seed=5) / 4
    got = _meta_gradients(ours, *(t.clone().requires_grad_() for t in (x, lora_A, lora_B)))
    want = _meta_gradients(plain, *(t.double().requires_grad_() for t in (x, lora_A, lora_B)))
    for name, g, w in zip(("x", "lora_A", "lora_B"), got, want):
        assert _rel(g, w) < RTOL, (name, _rel(g, w))


@pytest.mark.parametrize("quantized", [False, True])
def test_d_lora_A_of_d_lora_B(quantized):
    # The term of the test above in isolation: d/dA sum(dL/dB), L = sum(y^2).
    weight = _randn(N, K, seed=1)
    q = ops.nf4_quantize(weight)
    w64 = nf4.dequantize(q, torch.float64) if quantized else weight.double()
    x, lora_A, lora_B = _randn(5, K, seed=3), _randn(R, K, seed=4) / 8, _randn(N, R, seed=5)

    def second(forward, x, lora_A, lora_B):
        gb, = torch.autograd.grad(forward(x, lora_A, lora_B).square().sum(), lora_B, create_graph=True)
        return torch.autograd.grad(gb.sum(), (x, lora_A))

    def ours(x, a, b):
        if quantized:
            return ops.qlora_linear(x, q, None, a, b, SCALING)
        return ops.lora_linear(x, weight, None, a, b, SCALING)

    got = second(ours, *(t.clone().requires_grad_() for t in (x, lora_A, lora_B)))
    want = second(lambda x, a, b: _torch_lora(x, w64, None, a, b, 0.0, None),
                  *(t.double().requires_grad_() for t in (x, lora_A, lora_B)))
    for name, g, w in zip(("x", "lora_A"), got, want):
        assert _rel(g, w) < RTOL, (name, _rel(g, w))


def test_expert_adapters_second_derivative():
    W = _randn(3, 8, 16, seed=1)
    experts = LoRAExperts(W, r=2, alpha=2)
    with torch.no_grad():
        experts.lora_B.copy_(_randn(*experts.lora_B.shape, seed=2))
    x = _randn(5, 16, seed=3)
    gb, = torch.autograd.grad(F.linear(x, experts[1]).square().sum(), experts.lora_B, create_graph=True)
    got, = torch.autograd.grad(gb.sum(), experts.lora_A)

    A, B = (p.detach().double().requires_grad_() for p in (experts.lora_A, experts.lora_B))
    y = x.double() @ W[1].double().t() + experts.scaling * (x.double() @ A[1].t()) @ B[1].t()
    gb_ref, = torch.autograd.grad(y.square().sum(), B, create_graph=True)
    want, = torch.autograd.grad(gb_ref.sum(), A)
    assert _rel(got, want) < RTOL
