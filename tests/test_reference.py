"""The pure-torch reference: gradients, the dropout hash, agreement with nn.Linear + LoRA."""

import pytest
import torch

from lorakern import reference as ref
from lorakern.formats import nf4
from lorakern.reference import dropout as drop

M, K, N, R = 7, 65, 40, 8


def _inputs(dtype=torch.float64, seed=0, m=M, k=K, n=N, r=R):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    return rand(m, k), rand(n, k), rand(n), rand(r, k) / k**0.5, rand(n, r) / r**0.5


# ------------------------------------------------------------------------------ dropout


def _mix32_python(x: int) -> int:
    """Independent check of the hash with Python integers."""
    m = 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x7FEB352D) & m
    x ^= x >> 15
    x = (x * 0x846CA68B) & m
    return x ^ (x >> 16)


def test_mix32_matches_python_integers():
    xs = [0, 1, 2, 12345, 0x7FFFFFFF, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF] + torch.randint(0, 2**32, (200,)).tolist()
    got = drop.mix32(torch.tensor(xs, dtype=torch.int64)).tolist()
    assert got == [_mix32_python(x) for x in xs]


def test_dropout_mask_definition():
    seed = torch.tensor([987654321])
    mask = drop.dropout_mask(seed, 5, 13, 0.3)
    key = _mix32_python(987654321)
    thr = int(0.3 * 2**32)
    expected = [[_mix32_python((r * 13 + c) ^ key) >= thr for c in range(13)] for r in range(5)]
    assert mask.tolist() == expected


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_dropout_rate_and_seed_dependence(p):
    a = drop.dropout_mask(torch.tensor([1]), 256, 512, p)
    b = drop.dropout_mask(torch.tensor([2]), 256, 512, p)
    assert abs(1 - a.float().mean().item() - p) < 0.01
    assert torch.equal(a, drop.dropout_mask(torch.tensor([1]), 256, 512, p)), "same seed, same mask"
    assert (a != b).float().mean() > 0.5 * 2 * p * (1 - p), "different seeds give independent masks"


def test_dropout_threshold_edges():
    assert drop.dropout_threshold(0.0) == 0
    assert drop.dropout_threshold(0.5) == 2**31
    assert drop.dropout_threshold(0.999999999999) == 2**32 - 1
    with pytest.raises(ValueError, match="dropout_p"):
        drop.dropout_threshold(1.0)
    x = torch.randn(4, 9)
    assert drop.apply_dropout(x, torch.tensor([3]), 0.0) is x
    y = drop.apply_dropout(x, torch.tensor([3]), 0.25)
    kept = y != 0
    torch.testing.assert_close(y[kept], x[kept] / 0.75)


# ----------------------------------------------------------------------- forward/backward


@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("bias", [True, False])
def test_fwd_bwd_functions_match_autograd(dropout_p, bias):
    x, w, b, a, bb = _inputs()
    b = b if bias else None
    seed = torch.tensor([11])
    s = 0.75
    y, xa = ref.lora_linear_fwd(x, w, b, a, bb, s, dropout_p, seed)
    leaves = [t.clone().requires_grad_() for t in (x, w, a, bb)]
    y_auto = ref.lora_linear(leaves[0], leaves[1], b, leaves[2], leaves[3], s, dropout_p, seed)
    torch.testing.assert_close(y, y_auto, rtol=0, atol=1e-12)
    torch.testing.assert_close(xa, drop.apply_dropout(x, seed, dropout_p) @ a.t())
    dy = torch.randn_like(y)
    grads = torch.autograd.grad(y_auto, leaves, dy)
    dx, dw, da, db = ref.lora_linear_bwd(dy, x, xa, w, a, bb, s, dropout_p, seed, True, True)
    for got, want in zip((dx, dw, da, db), grads):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)
    dx2, dw2, _, _ = ref.lora_linear_bwd(dy, x, xa, w, a, bb, s, dropout_p, seed, False, False)
    assert dx2 is None and dw2 is None


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
def test_gradcheck_lora(dropout_p):
    x, w, b, a, bb = (t.requires_grad_() for t in _inputs(m=3, k=9, n=5, r=2))
    seed = torch.tensor([5])
    assert torch.autograd.gradcheck(lambda *t: ref.lora_linear(*t, 1.5, dropout_p, seed), (x, w, b, a, bb))


def test_gradcheck_qlora():
    q = nf4.quantize(torch.randn(5, 70))
    x, _, b, a, bb = (t.requires_grad_() for t in _inputs(m=3, k=70, n=5, r=2))
    assert torch.autograd.gradcheck(lambda *t: ref.qlora_linear(t[0], q, *t[1:], 2.0, 0.1, torch.tensor([9])), (x, b, a, bb))


def test_qlora_equals_lora_on_the_dequantized_weight():
    x, w, b, a, bb = _inputs(torch.float32)
    q = nf4.quantize(w)
    seed = torch.tensor([4])
    y_q, xa_q = ref.qlora_linear_fwd(x, q, b, a, bb, 2.0, 0.1, seed)
    y_l, xa_l = ref.lora_linear_fwd(x, nf4.dequantize(q, torch.float32), b, a, bb, 2.0, 0.1, seed)
    torch.testing.assert_close(y_q, y_l)
    torch.testing.assert_close(xa_q, xa_l)
    dy = torch.randn_like(y_q)
    dx_q, da_q, db_q = ref.qlora_linear_bwd(dy, x, xa_q, q, a, bb, 2.0, 0.1, seed, True)
    dx_l, _, da_l, db_l = ref.lora_linear_bwd(dy, x, xa_l, nf4.dequantize(q, torch.float32), a, bb, 2.0, 0.1, seed, True, False)
    for got, want in ((dx_q, dx_l), (da_q, da_l), (db_q, db_l)):
        torch.testing.assert_close(got, want)


def test_nf4_matmul_and_transpose():
    x, w, b, _, _ = _inputs(torch.float32)
    q = nf4.quantize(w)
    wd = nf4.dequantize(q, torch.float32)
    torch.testing.assert_close(ref.nf4_matmul(x, q, b), x @ wd.t() + b)
    dy = torch.randn(M, N)
    torch.testing.assert_close(ref.nf4_matmul_t(dy, q), dy @ wd)


# ----------------------------------------------------------- agreement with nn.Linear + LoRA


def test_matches_nn_linear_plus_lora_branch():
    """y = Linear(x) + s * lora_B(lora_A(dropout(x))), the PEFT composition, with the same mask."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(K, N)
    lora_a = torch.nn.Linear(K, R, bias=False)
    lora_b = torch.nn.Linear(R, N, bias=False)
    torch.nn.init.normal_(lora_b.weight)
    x = torch.randn(2, M, K)
    seed = torch.tensor([77])
    p, s = 0.25, 16 / R
    keep = drop.dropout_mask(seed, 2 * M, K, p).reshape(2, M, K)
    want = lin(x) + s * lora_b(lora_a(x * keep / (1 - p)))
    got = ref.lora_linear(x, lin.weight, lin.bias, lora_a.weight, lora_b.weight, s, p, seed)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_matches_peft_lora_layer():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(K, N))
    cfg = peft.LoraConfig(r=R, lora_alpha=16, target_modules=["0"], lora_dropout=0.0, init_lora_weights=False)
    model = peft.get_peft_model(base, cfg)
    layer = model.base_model.model[0]
    x = torch.randn(5, K)
    want = model(x)
    got = ref.lora_linear(x, layer.base_layer.weight, layer.base_layer.bias, layer.lora_A["default"].weight,
                          layer.lora_B["default"].weight, layer.scaling["default"])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_reference_dropout_zeroes_dropped_non_finite_values_like_the_kernels():
    from lorakern.kernels import cpu
    from lorakern.reference.dropout import apply_dropout, dropout_mask

    if cpu.availability()[0] is False:
        pytest.skip("native CPU module not built")
    seed = torch.tensor([77])
    x = torch.tensor([[float("nan"), float("inf"), -float("inf"), -1.0] * 16] * 8)
    keep = dropout_mask(seed, 8, 64, 0.5)
    want = apply_dropout(x, seed, 0.5)
    assert bool((want[~keep] == 0).all()) and not bool(torch.signbit(want[~keep]).any())
    got = cpu._dropped(x, cpu._dropout_params(seed, 0.5))
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
