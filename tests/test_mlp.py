"""lorakern.train.mlp: the lean gated MLP gives the same outputs and gradients, and saves less."""

import pytest
import torch
from torch import nn

import helpers_models
from lorakern.train.mlp import GatedProduct, gated_product, use_lean_mlp


@pytest.mark.parametrize("act", [nn.SiLU(), nn.GELU(approximate="tanh"), torch.sigmoid])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gated_product_matches_autograd(act, dtype):
    torch.manual_seed(0)
    gate = torch.randn(7, 33, dtype=dtype, requires_grad=True)
    up = torch.randn(7, 33, dtype=dtype, requires_grad=True)
    w = torch.randn(7, 33, dtype=dtype)
    (gated_product(gate, up, act) * w).sum().backward()
    got = gate.grad.clone(), up.grad.clone()
    gate.grad = up.grad = None
    (act(gate) * up * w).sum().backward()
    tol = dict(rtol=1e-6, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[0], gate.grad, **tol)
    torch.testing.assert_close(got[1], up.grad, **tol)
    assert torch.autograd.gradcheck(lambda g, u: GatedProduct.apply(g, u, act, None),
                                    (gate.detach().double().requires_grad_(), up.detach().double().requires_grad_()))


def test_under_autocast_saves_bf16_copies_and_keeps_the_forward_exact():
    torch.manual_seed(1)
    gate = torch.randn(64, 96, requires_grad=True)
    up = torch.randn(64, 96, requires_grad=True)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = gated_product(gate, up, nn.SiLU())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, nn.functional.silu(gate) * up, rtol=0, atol=0)
    assert [t.dtype for t in saved] == [torch.bfloat16, torch.bfloat16]
    assert sum(t.numel() * t.element_size() for t in saved) == 2 * 64 * 96 * 2  # vs 3 fp32 tensors unfused
    out.square().sum().backward()
    g_ref, u_ref = torch.autograd.grad((nn.functional.silu(gate) * up).square().sum(), (gate, up))
    torch.testing.assert_close(gate.grad, g_ref, rtol=2e-2, atol=2e-2 * float(g_ref.abs().max()) / 100)
    torch.testing.assert_close(up.grad, u_ref, rtol=2e-2, atol=2e-2 * float(u_ref.abs().max()) / 100)


def test_no_grad_and_shape_errors():
    g, u = torch.randn(3, 4), torch.randn(3, 4)
    with torch.no_grad():
        assert not gated_product(g.requires_grad_(), u, torch.tanh).requires_grad
    with pytest.raises(ValueError, match="same shape|one shape"):
        gated_product(torch.randn(3, 4), torch.randn(3, 5), torch.tanh)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma"])
def test_lean_mlp_models_match_the_original(family):
    model = getattr(helpers_models, family)(seed=3)
    ids = torch.randint(0, 100, (2, 11))
    reference = model(input_ids=ids, labels=ids)
    reference.loss.backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    assert use_lean_mlp(model) == model.config.num_hidden_layers
    assert use_lean_mlp(model) == 0  # idempotent
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    torch.testing.assert_close(out.logits, reference.logits, rtol=1e-6, atol=1e-6)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, want[n], rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.parametrize("family", ["phi3", "gpt2", "gpt_neox", "opt"])
def test_other_mlps_are_left_alone(family):
    assert use_lean_mlp(getattr(helpers_models, family)(seed=0)) == 0


def test_an_mlp_with_more_in_its_forward_is_not_recognised():
    class Extra(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj, self.up_proj, self.down_proj = nn.Linear(4, 8), nn.Linear(4, 8), nn.Linear(8, 4)
            self.act_fn, self.dropout = nn.SiLU(), nn.Dropout(0.5)

        def forward(self, x):
            down_proj = self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
            down_proj = self.dropout(down_proj)
            return down_proj

    assert use_lean_mlp(nn.Sequential(Extra())) == 0


def test_autocast_output_is_the_rounded_product_and_its_gradient_flows():
    torch.manual_seed(2)
    gate = torch.randn(16, 40, requires_grad=True)
    up = torch.randn(16, 40, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = gated_product(gate, up, nn.SiLU(), autocast_output=True)
    assert out.dtype == torch.bfloat16
    exact = nn.functional.silu(gate) * up
    torch.testing.assert_close(out, exact.detach().bfloat16(), rtol=0, atol=0)
    out.float().sum().backward()
    g_ref, u_ref = torch.autograd.grad(exact.sum(), (gate, up))
    torch.testing.assert_close(gate.grad, g_ref, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(up.grad, u_ref, rtol=2e-2, atol=2e-2)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):  # no autocast: the inputs' dtype
        assert gated_product(gate, up, nn.SiLU(), autocast_output=True).dtype == torch.float32


def test_a_pickled_model_with_lean_mlps_loads_with_the_class_forward(tmp_path):
    # torch.save(model) of a switched model: the instance forward pickled as getattr(module,
    # "_lean_forward"), which torch.load could not resolve (AttributeError).
    model = helpers_models.llama(seed=3)
    use_lean_mlp(model)
    torch.save(model, tmp_path / "model.pt")
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)  # the test's own file
    mlp = loaded.model.layers[0].mlp
    assert "forward" not in vars(mlp) or vars(mlp)["forward"].__func__ is type(mlp).forward
    ids = torch.randint(0, 100, (2, 7))
    torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
