"""LoRALinear and QLoRALinear: forward/backward against the float64 reference, dtypes, dropout,
merging, checkpointing, state dicts (bitsandbytes-compatible) and memory."""

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from lorakern import ops
from lorakern import reference as ref
from lorakern.formats import nf4
from lorakern.nn import LoRALinear, QLoRALinear

# Relative error bounds of an output against the float64 reference, scaled to the dtype's epsilon
# (K <= 130 terms per dot product; bf16 eps 2^-8, fp16 2^-11, fp32 2^-24).
RTOL = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


def assert_close_rel(actual, expected, rtol, what=""):
    """max |a - e| <= rtol * max |e|, with a report of where and how many elements differ."""
    actual, expected = actual.detach().double(), expected.detach().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: {int((~torch.isfinite(actual)).sum())} NaN/inf values"
    err = (actual - expected).abs()
    bound = rtol * expected.abs().max().clamp(min=1e-12)
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())}/{err.numel()} elements off, max err {err.max():.3g} "
                           f"at {tuple(int(i) for i in torch.nonzero(bad)[0])}, bound {bound:.3g}")


def make_linear(k=65, n=33, bias=True, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(k, n, bias=bias).to(dtype)


def randomize_b(module, seed=1, std=0.3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * std)


def reference_output(module, x, dense_weight, seed=None, dropout_p=0.0):
    """The module's math in float64 through the pure-torch composition."""
    d = torch.float64
    bias = None if module.bias is None else module.bias.detach().to(d)
    return ref.lora_linear(x.detach().to(d), dense_weight.detach().to(d), bias, module.lora_A.detach().to(d),
                           module.lora_B.detach().to(d), module.scaling, dropout_p, seed)


# ------------------------------------------------------------------------ construction


def test_from_linear_shares_and_freezes_the_base():
    lin = make_linear()
    m = LoRALinear.from_linear(lin, r=8, alpha=16)
    assert m.weight is lin.weight and m.bias is lin.bias
    assert not m.weight.requires_grad and not m.bias.requires_grad
    assert m.lora_A.shape == (8, 65) and m.lora_B.shape == (33, 8)
    assert m.lora_A.requires_grad and m.lora_B.requires_grad
    assert (m.in_features, m.out_features, m.r, m.alpha, m.scaling) == (65, 33, 8, 16.0, 2.0)
    assert torch.count_nonzero(m.lora_B) == 0


def test_init_rules():
    torch.manual_seed(0)
    kaiming = LoRALinear.from_linear(make_linear(k=512, n=8), r=64, init="kaiming")
    # kaiming_uniform(a=sqrt(5)) on [r, K] is U(-1/sqrt(K), 1/sqrt(K))
    bound = 1 / math.sqrt(512)
    assert kaiming.lora_A.abs().max() <= bound and kaiming.lora_A.abs().max() > 0.9 * bound
    gaussian = LoRALinear.from_linear(make_linear(k=512, n=8), r=64, init="gaussian")
    assert abs(gaussian.lora_A.std().item() - 1 / 64) < 0.1 / 64
    zeros_b = LoRALinear.from_linear(make_linear(k=512, n=8), r=64, init="zeros-B")
    assert zeros_b.lora_A.abs().max() <= bound and torch.count_nonzero(zeros_b.lora_B) == 0


def test_rslora_scaling():
    assert LoRALinear.from_linear(make_linear(), r=16, alpha=32, use_rslora=True).scaling == pytest.approx(8.0)
    assert LoRALinear.from_linear(make_linear(), r=16, alpha=32).scaling == pytest.approx(2.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(r=0), "r "), (dict(r=2.0), "r "), (dict(alpha=0), "alpha"), (dict(alpha=float("nan")), "alpha"),
    (dict(dropout=1.0), "dropout"), (dict(dropout=-0.1), "dropout"), (dict(init="xavier"), "init"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear.from_linear(make_linear(), **kwargs)
    with pytest.raises(ValueError, match=match):
        QLoRALinear.from_linear(make_linear(), **kwargs)


def test_from_linear_rejects_other_modules():
    with pytest.raises(TypeError, match="Embedding"):
        LoRALinear.from_linear(nn.Embedding(10, 4))


def test_extra_repr():
    text = repr(LoRALinear.from_linear(make_linear(), r=4, alpha=8, dropout=0.1, use_rslora=True))
    assert "in_features=65" in text and "r=4" in text and "dropout=0.1" in text and "use_rslora=True" in text
    text = repr(QLoRALinear.from_linear(make_linear(), r=4))
    assert "nf4+double_quant(blocksize=64)" in text and "compute_dtype=float32" in text


# ---------------------------------------------------------------------- forward / backward


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("k, n, r, bias", [(63, 33, 1, True), (64, 7, 8, False), (65, 129, 16, True)])
def test_lora_forward_backward_match_reference(dtype, k, n, r, bias):
    m = LoRALinear.from_linear(make_linear(k, n, bias, dtype), r=r, alpha=2 * r)
    randomize_b(m)
    x = torch.randn(3, 5, k, dtype=dtype, requires_grad=True)
    y = m(x)
    assert y.dtype == dtype and y.shape == (3, 5, n)
    x64 = x.detach().double().requires_grad_()
    a64, b64 = m.lora_A.detach().double().requires_grad_(), m.lora_B.detach().double().requires_grad_()
    bias64 = None if m.bias is None else m.bias.detach().double()
    y64 = ref.lora_linear(x64, m.weight.detach().double(), bias64, a64, b64, m.scaling)
    assert_close_rel(y, y64, RTOL[dtype], "y")
    dy = torch.randn_like(y64)
    y.backward(dy.to(dtype))
    y64.backward(dy)
    # A and B stay float32 while the math runs in `dtype`: their grads carry the dtype's error
    assert m.lora_A.grad.dtype == torch.float32
    for got, want, name in ((x.grad, x64.grad, "dx"), (m.lora_A.grad, a64.grad, "dA"), (m.lora_B.grad, b64.grad, "dB")):
        assert_close_rel(got, want, 2 * RTOL[dtype], name)
    assert m.weight.grad is None


def test_input_is_cast_to_the_weight_dtype():
    m = LoRALinear.from_linear(make_linear(dtype=torch.bfloat16), r=4)
    x = torch.randn(4, 65, requires_grad=True)
    y = m(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.float32


def test_autocast_runs_in_the_autocast_dtype():
    m = LoRALinear.from_linear(make_linear(), r=4)
    randomize_b(m)
    x = torch.randn(6, 65)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = m(x)
    assert y.dtype == torch.bfloat16
    assert_close_rel(y, reference_output(m, x, m.weight), RTOL[torch.bfloat16], "autocast y")
    y.float().sum().backward()
    assert m.lora_A.grad.dtype == torch.float32 and torch.isfinite(m.lora_B.grad).all()


def test_dropout_only_in_training_and_fresh_per_forward():
    m = LoRALinear.from_linear(make_linear(), r=8, dropout=0.5)
    randomize_b(m)
    x = torch.randn(9, 65)
    m.eval()
    assert torch.equal(m(x), m(x))
    assert_close_rel(m(x), reference_output(m, x, m.weight), 1e-6, "eval ignores dropout")
    m.train()
    torch.manual_seed(5)
    y1 = m(x)
    y2 = m(x)
    assert not torch.equal(y1, y2), "each training forward must draw a new mask"
    torch.manual_seed(5)
    seed = ops.new_seed(x.device)  # the seed the first training forward drew
    assert_close_rel(y1, reference_output(m, x, m.weight, seed, 0.5), 1e-6, "training forward with its seed")


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("cls", [LoRALinear, QLoRALinear])
def test_gradient_checkpointing_gives_the_same_grads(cls, use_reentrant):
    layers = nn.ModuleList(cls.from_linear(make_linear(48, 48, seed=i), r=4, dropout=0.25) for i in range(2))
    for i, layer in enumerate(layers):
        randomize_b(layer, seed=i)
    layers.train()
    x = torch.randn(5, 48, requires_grad=True)

    def block(h):
        return layers[1](torch.tanh(layers[0](h)))

    def grads(use_checkpoint):
        layers.zero_grad()
        x.grad = None
        torch.manual_seed(11)  # same dropout seeds in both runs
        out = checkpoint(block, x, use_reentrant=use_reentrant) if use_checkpoint else block(x)
        out.square().sum().backward()
        return [x.grad.clone()] + [p.grad.clone() for p in layers.parameters() if p.requires_grad]

    for plain, ckpt in zip(grads(False), grads(True)):
        assert torch.equal(plain, ckpt)


# ------------------------------------------------------------------------------ merging


def test_merge_unmerge_lora():
    m = LoRALinear.from_linear(make_linear(), r=4).eval()
    randomize_b(m)
    x = torch.randn(7, 65)
    before, w0 = m(x), m.weight.detach().clone()
    m.merge()
    assert m.merged
    assert_close_rel(m(x), before, 1e-5, "merged forward")
    with pytest.raises(RuntimeError, match="already merged"):
        m.merge()
    m.train()
    with pytest.raises(RuntimeError, match="unmerge"):
        m(x)
    with torch.no_grad():
        m(x)  # inference while merged is fine
    m.unmerge()
    assert not m.merged
    assert_close_rel(m.weight, w0, 1e-6, "unmerged weight")
    with pytest.raises(RuntimeError, match="not merged"):
        m.unmerge()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("delta_scale", [1e-3, 1e-1, 1.0])
def test_merge_unmerge_error_is_within_the_documented_bound(dtype, delta_scale):
    """unmerge's docstring: each element within eps * max(|W|, |W + dW|) of the original, and no tighter
    bound relative to W alone (elements near 0 come back far off relative to themselves)."""
    torch.manual_seed(0)
    lin = nn.Linear(256, 256).to(dtype)
    with torch.no_grad():
        lin.weight.normal_(0, 0.5)  # normal numbers in every dtype (the bound is stated for those)
    m = LoRALinear.from_linear(lin, r=8, alpha=16)
    with torch.no_grad():
        m.lora_B.normal_(0, delta_scale)
    w0 = m.weight.detach().float().clone()
    dw = m.delta_weight(torch.float32)
    m.merge()
    m.unmerge()
    err = (m.weight.float() - w0).abs()
    bound = torch.finfo(dtype).eps * torch.maximum(w0.abs(), (w0 + dw).abs())
    assert (err <= bound).all(), f"{int((err > bound).sum())} elements beyond the bound, worst {(err / bound).max():.3g}x"
    if dtype != torch.float32:  # an element near 0 under a large update: far off relative to itself
        assert (err / w0.abs().clamp(min=torch.finfo(dtype).tiny)).max() > torch.finfo(dtype).eps


def test_merged_linear_is_a_fresh_plain_linear():
    m = LoRALinear.from_linear(make_linear(), r=4)
    randomize_b(m)
    x = torch.randn(7, 65)
    lin = m.merged_linear()
    assert type(lin) is nn.Linear and lin.weight.data_ptr() != m.weight.data_ptr()
    assert_close_rel(lin(x), m(x), 1e-5, "merged_linear")
    m.merge()
    assert_close_rel(m.merged_linear().weight, m.weight, 0, "merged_linear of a merged layer")


# ------------------------------------------------------------------------------- QLoRA


@pytest.mark.parametrize("k, n, double_quant", [(63, 33, True), (64, 7, False), (130, 65, True)])
def test_qlora_matches_reference_on_the_dequantized_weight(k, n, double_quant):
    lin = make_linear(k, n)
    m = QLoRALinear.from_linear(lin, r=8, alpha=16, double_quant=double_quant)
    randomize_b(m)
    q = m.quantized_weight()
    assert torch.equal(q.packed, nf4.quantize(lin.weight, 64, double_quant).packed)
    dense = nf4.dequantize(q, torch.float64)
    x = torch.randn(2, 4, k, requires_grad=True)
    y = m(x)
    assert_close_rel(y, reference_output(m, x, dense), RTOL[torch.float32], "qlora y")
    y.sum().backward()
    x64 = x.detach().double().requires_grad_()
    a64 = m.lora_A.detach().double().requires_grad_()
    ref.lora_linear(x64, dense, m.bias.detach().double(), a64, m.lora_B.detach().double(), m.scaling).sum().backward()
    assert_close_rel(x.grad, x64.grad, 2e-5, "dx")
    assert_close_rel(m.lora_A.grad, a64.grad, 2e-5, "dA")
    assert not m.weight.requires_grad and m.weight.grad is None


def test_qlora_compute_dtype_and_autocast():
    m = QLoRALinear.from_linear(make_linear(), r=4, compute_dtype=torch.bfloat16)
    randomize_b(m)
    x = torch.randn(5, 65)
    dense = nf4.dequantize(m.quantized_weight(), torch.float64)
    y = m(x)
    assert y.dtype == torch.float32  # the input's dtype (bitsandbytes' Linear4bit does the same); GEMMs in bf16
    assert_close_rel(y, reference_output(m, x, dense), RTOL[torch.bfloat16], "bf16 compute")
    y16 = m(x.bfloat16())
    assert y16.dtype == torch.bfloat16
    assert_close_rel(y16, reference_output(m, x.bfloat16().float(), dense), RTOL[torch.bfloat16], "bf16 in, bf16 out")
    m32 = QLoRALinear.from_linear(make_linear(), r=4)
    assert m32(x.bfloat16()).dtype == torch.bfloat16  # float32 compute, bf16 in and out
    m32.wide_output = False
    m.wide_output = False
    assert m(x).dtype == torch.float32
    m32.wide_output = True
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m32(x).dtype == torch.float32  # wide output: the compute dtype, GEMMs in bf16
        assert m32(x.bfloat16()).dtype == torch.float32
        m32.wide_output = False
        assert m32(x).dtype == torch.bfloat16
    with pytest.raises(TypeError, match="compute_dtype"):
        QLoRALinear.from_linear(make_linear(), compute_dtype=torch.int8)


def test_qlora_frees_the_full_precision_weight_and_stores_4_13_bits():
    lin = make_linear(k=512, n=256, bias=False)
    m = QLoRALinear.from_linear(lin, r=8)
    full_ptr = lin.weight.data_ptr()
    tensors = list(m.parameters()) + list(m.buffers())
    assert all(t.data_ptr() != full_ptr for t in tensors)
    assert all(t.dtype != torch.float32 or t.numel() < 512 * 256 / 8 for t in tensors), "a dense copy survived"
    sizes = m.nbytes()
    base_bits = 8 * sizes["base"] / (512 * 256)
    # 4 bits + 8-bit absmax per 64 (0.125) + fp32 per 256 blocks + 256-entry code table + offset
    assert 4.125 < base_bits < 4.125 + 8 * (4 * 8 + 1024 + 4) / (512 * 256) + 1e-9
    total = sum(t.numel() * t.element_size() for t in tensors)
    assert total == sizes["base"] + sizes["adapter"]


@pytest.mark.parametrize("move", ["half", "bfloat16", "to"])
def test_qlora_dtype_moves_set_the_compute_dtype_and_device_moves_keep_it(move):
    """After model.half() a QLoRA model computes (and outputs) fp16 like its dense layers, which then
    accept what it returns; a device move leaves a chosen compute dtype alone."""
    torch.manual_seed(3)
    model = nn.Sequential(QLoRALinear.from_linear(make_linear(64, 48), r=4), nn.ReLU(), nn.Linear(48, 8))
    randomize_b(model[0])
    want = torch.float16 if move in ("half", "to") else torch.bfloat16
    model = model.half() if move == "half" else model.bfloat16() if move == "bfloat16" else model.to(torch.float16)
    assert model[0].compute_dtype == want and model[0].absmax.dtype == torch.uint8
    x = torch.randn(3, 64, dtype=want)
    y = model(x)
    assert y.dtype == want
    dense = nf4.dequantize(model[0].quantized_weight(), torch.float64)
    assert_close_rel(model[0](x), reference_output(model[0], x.float(), dense), RTOL[want], "after the move")
    model.to("cpu")
    assert model[0].compute_dtype == want
    m = QLoRALinear.from_linear(make_linear(64, 48), r=4, compute_dtype=torch.bfloat16).to("cpu").double()
    assert m.compute_dtype == torch.bfloat16  # float64 is no compute dtype: kept


def test_qlora_on_meta_has_the_state_dict_keys_and_assign_loads_real_tensors():
    """The meta-device workflow: build on meta, list the keys, load_state_dict(assign=True) puts the
    checkpoint's own tensors in (a copy into meta tensors would silently keep no data)."""
    real = QLoRALinear.from_linear(make_linear(64, 48), r=4)
    randomize_b(real)
    meta = copy.deepcopy(real).to("meta")
    assert list(meta.state_dict()) == list(real.state_dict())
    assert all(t.is_meta for t in meta.state_dict().values())
    sd = real.state_dict()
    assert str(meta.load_state_dict(sd, assign=True)) == "<All keys matched successfully>"
    assert not any(t.is_meta for t in [*meta.parameters(), *meta.buffers()])
    assert meta.lora_A.requires_grad and not meta.weight.requires_grad
    x = torch.randn(3, 64)
    torch.testing.assert_close(meta(x), real(x), rtol=0, atol=0)


def test_qlora_from_meta_weight_is_a_clear_error():
    with torch.device("meta"):
        lin = nn.Linear(64, 64)
    with pytest.raises(ValueError, match="meta device"):
        QLoRALinear.from_linear(lin)


def test_qlora_to_dtype_keeps_the_quant_state():
    m = QLoRALinear.from_linear(make_linear(), r=4)
    x = torch.randn(3, 65)
    before = m.quantized_weight()
    y32 = m(x)
    m.to(torch.bfloat16)
    after = m.quantized_weight()
    for a, b in zip(before.tensors(), after.tensors()):
        assert a.dtype == b.dtype and torch.equal(a, b)
    assert m.lora_A.dtype == torch.bfloat16
    m.compute_dtype = torch.float32
    m.to(torch.float32)
    assert_close_rel(m(x), y32, 1e-2, "after a bf16 round trip of the adapter")


def test_qlora_merge_is_refused_and_merged_linear_matches():
    m = QLoRALinear.from_linear(make_linear(), r=4)
    randomize_b(m)
    x = torch.randn(4, 65)
    with pytest.raises(TypeError, match="merged_linear"):
        m.merge()
    lin = m.merged_linear()
    assert type(lin) is nn.Linear
    assert_close_rel(lin(x), m(x), 1e-5, "merged_linear")
    dense = m.to_lora_linear()
    assert dense.lora_A is m.lora_A and isinstance(dense, LoRALinear)
    assert_close_rel(dense(x), m(x), 1e-5, "to_lora_linear")


# --------------------------------------------------------------------------- state dicts


def test_qlora_state_dict_keys_and_round_trip():
    m = QLoRALinear.from_linear(make_linear(), r=4)
    randomize_b(m)
    sd = m.state_dict()
    assert set(sd) == {"weight", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                       "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4", "bias", "lora_A", "lora_B"}
    assert sd["weight"].dtype == torch.uint8 and sd["weight"].shape == ((65 * 33 + 1) // 2, 1)
    other = QLoRALinear.from_linear(make_linear(seed=7), r=4)
    other.load_state_dict(sd)
    x = torch.randn(3, 65)
    assert torch.equal(other(x), m(x))


def test_qlora_load_rejects_bad_state():
    m = QLoRALinear.from_linear(make_linear(), r=4)
    wrong_shape = QLoRALinear.from_linear(make_linear(k=64, n=33), r=4).state_dict()
    with pytest.raises(RuntimeError, match="shape"):
        m.load_state_dict(wrong_shape)
    sd = m.state_dict()
    sd["weight"] = sd["weight"][:-3]
    with pytest.raises(RuntimeError, match="packed bytes"):
        m.load_state_dict(sd)
    sd = m.state_dict()
    sd["extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError, match="Unexpected key"):
        m.load_state_dict(sd)
    sd = m.state_dict()
    del sd["lora_B"]
    with pytest.raises(RuntimeError, match="Missing key"):
        m.load_state_dict(sd)


def _bnb():
    return pytest.importorskip("bitsandbytes")


def _bnb_linear4bit(state_dict, k, n, compute_dtype=torch.float32):
    """A bitsandbytes Linear4bit rebuilt from an NF4 state dict, the way transformers loads checkpoints."""
    bnb_mod = _bnb()
    layer = bnb_mod.nn.Linear4bit(k, n, bias="bias" in state_dict, compute_dtype=compute_dtype, quant_type="nf4",
                                  device="cpu")
    stats = {k[len("weight."):]: v for k, v in state_dict.items() if k.startswith("weight.")}
    layer.weight = bnb_mod.nn.Params4bit.from_prequantized(state_dict["weight"], stats, device="cpu", module=layer)
    if "bias" in state_dict:
        layer.bias = nn.Parameter(state_dict["bias"].clone(), requires_grad=False)
    return layer


def test_state_dict_interoperates_with_bitsandbytes():
    bnb_mod = _bnb()
    lin = make_linear(k=128, n=40)
    # bitsandbytes -> lorakern
    layer = bnb_mod.nn.Linear4bit(128, 40, compute_dtype=torch.float32, quant_type="nf4", device="cpu")
    layer.load_state_dict(lin.state_dict())
    layer = layer.to("cpu")  # bitsandbytes quantizes on the first .to(device)
    assert layer.weight.dtype == torch.uint8
    bnb_sd = layer.state_dict()
    ours = QLoRALinear.from_linear(make_linear(k=128, n=40, seed=3), r=4)
    result = ours.load_state_dict(bnb_sd, strict=False)
    assert sorted(result.missing_keys) == ["lora_A", "lora_B"] and not result.unexpected_keys
    x = torch.randn(6, 128)
    layer.train()  # keep bitsandbytes on its portable path (see test_patch for its eval-mode repack)
    assert_close_rel(ours(x), layer(x), 1e-5, "bnb state dict loaded here")
    # lorakern -> bitsandbytes
    mine = QLoRALinear.from_linear(lin, r=4)
    sd = {k: v for k, v in mine.state_dict().items() if not k.startswith("lora_")}
    theirs = _bnb_linear4bit(sd, 128, 40).train()
    assert_close_rel(theirs(x), mine(x), 1e-5, "our state dict loaded in bitsandbytes")
    assert torch.equal(mine.weight.reshape(-1), layer.weight.reshape(-1)), "packed bytes differ from bitsandbytes"


def _qlora_stack(seed):
    torch.manual_seed(seed)
    m = nn.Sequential(QLoRALinear.from_linear(make_linear(64, 48, seed=seed), r=4), nn.ReLU(),
                      QLoRALinear.from_linear(make_linear(48, 32, bias=False, seed=seed + 1), r=2))
    for layer in (m[0], m[2]):
        randomize_b(layer, seed=seed)
    return m


def test_distributed_checkpoint_state_dict_api_round_trips_qlora(tmp_path):
    """torch.distributed.checkpoint's state-dict API (what DCP, FSDP2 checkpointing and trainers built on
    them call) walks every key by getattr: bitsandbytes' ``weight.absmax``... keys failed with
    "'Parameter' object has no attribute 'absmax'". One process, no process group."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, set_model_state_dict

    a, x = _qlora_stack(0), torch.randn(5, 64)
    assert sorted(get_model_state_dict(a)) == sorted(a.state_dict())
    for options in (StateDictOptions(), StateDictOptions(full_state_dict=True)):
        b = _qlora_stack(1)
        assert not torch.equal(b(x), a(x))
        set_model_state_dict(b, get_model_state_dict(a, options=options), options=options)
        assert torch.equal(b(x), a(x))
    with warnings.catch_warnings():  # "torch.distributed is ... uninitialized, assuming ... a single process"
        warnings.simplefilter("ignore", UserWarning)
        dcp.save({"model": get_model_state_dict(a)}, checkpoint_id=str(tmp_path))
        b = _qlora_stack(1)
        state = {"model": get_model_state_dict(b)}
        dcp.load(state, checkpoint_id=str(tmp_path))
    set_model_state_dict(b, state["model"])
    assert torch.equal(b(x), a(x))


def test_distributed_checkpoint_through_a_compile_wrapper_says_to_unwrap():
    # set_model_state_dict puts the wrapper's prefix back on parameter keys only; the quantization
    # state keys arrive unprefixed, out of the layer's sight: the error says what to do.
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    a, b = torch.compile(_qlora_stack(0), backend="eager"), torch.compile(_qlora_stack(1), backend="eager")
    with pytest.raises(RuntimeError, match=r"_orig_mod.0.weight: missing key .* call them on the model inside the "
                                           r"wrapper \(model.module / model._orig_mod\)"):
        set_model_state_dict(b, get_model_state_dict(a))
    set_model_state_dict(b._orig_mod, get_model_state_dict(a._orig_mod))
    x = torch.randn(3, 64)
    assert torch.equal(b._orig_mod(x), a._orig_mod(x))


def test_a_qlora_model_state_dict_saves_with_safetensors(tmp_path):
    # every layer's weight.quant_map was the one module-level NF4 table: safetensors (and so
    # save_pretrained) refused "shared tensors"
    from safetensors.torch import load_file, save_file

    model = _qlora_stack(0)
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    loaded = _qlora_stack(1)
    loaded.load_state_dict(load_file(tmp_path / "model.safetensors"))
    x = torch.randn(3, 64)
    assert torch.equal(loaded(x), model(x))
    assert model.state_dict()["0.weight.quant_map"] is not nf4.NF4_CODE


def test_a_dense_weight_loaded_into_an_nf4_layer_is_named():
    layer = QLoRALinear.from_linear(make_linear(64, 32), r=4)
    with pytest.raises(RuntimeError, match=r"weight: a dense float32 weight of shape \(32, 64\), but this layer "
                                           r"holds its weight in NF4.*before apply_lora\(quantize='nf4'\)"):
        layer.load_state_dict(make_linear(64, 32).state_dict(), strict=False)


def test_the_shared_input_cast_dies_with_its_source():
    # One cast copy is shared by the layers reading the same activation (q, k, v); it used to
    # stay alive after the activation (and the model) were gone: 64 MB at 8 x 4096 x 1024 bf16.
    import gc

    from lorakern.nn import _base

    layer = LoRALinear.from_linear(make_linear(64, 16), r=4)
    h = torch.randn(3, 64, requires_grad=True) * 2  # an activation: made by autograd
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(h).float().sum().backward()
    assert _base._last_cast.box and _base._last_cast.box[0].shape == (3, 64)
    del h
    gc.collect()
    assert not _base._last_cast.box


# ------------------------------------------------------------------------ torch.compile


@pytest.mark.parametrize("cls", [LoRALinear, QLoRALinear])
def test_compile_fullgraph_module_with_autocast_and_dropout(cls):
    """Dynamo traces the whole forward (autocast query, dtype casts, seed draw, custom op) without a break.

    aot_eager runs the traced graph with eager kernels, so this checks capture and the
    fake implementations quickly; test_patch compiles a whole model with inductor.
    """
    m = cls.from_linear(make_linear(64, 40), r=4, dropout=0.2).train()
    randomize_b(m)
    x = torch.randn(3, 64, requires_grad=True)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            results = []
            for fn in (m, compiled):
                torch.manual_seed(4)
                x.grad, m.lora_A.grad = None, None
                y = fn(x)
                y.float().square().sum().backward()
                results.append((y, x.grad, m.lora_A.grad))
        (y0, dx0, da0), (y1, dx1, da1) = results
        narrow = autocast and cls is LoRALinear  # QLoRALinear: wide output, its compute dtype
        assert y0.dtype == y1.dtype == (torch.bfloat16 if narrow else torch.float32)
        # A traced wide-output QLoRA layer is composed of the nf4_matmul op and torch ops; its
        # bf16 partial gradients are summed in a different order than the fused eager backward
        # (which forms the rank-r products in fp32 at these sizes): bf16 tolerance against the
        # tensor's magnitude, as elements that come from cancellation carry the larger terms' error.
        for got, want in ((y1, y0), (dx1, dx0), (da1, da0)):
            tol = dict(rtol=2e-2, atol=2e-2 * want.abs().max().item()) if autocast and cls is QLoRALinear else {}
            torch.testing.assert_close(got, want, **tol)
    torch._dynamo.reset()


@pytest.mark.parametrize("cls", [LoRALinear, QLoRALinear])
def test_compile_fullgraph_with_dynamic_shapes_and_a_symbolic_scaling(cls):
    """dynamic=True traces Python floats as symbols: the op's scalar checks must trace too."""
    m = cls.from_linear(make_linear(64, 40), r=4).train()
    randomize_b(m)
    compiled = torch.compile(m, fullgraph=True, dynamic=True, backend="aot_eager")
    for rows in (3, 5, 9):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(compiled(x), m(x))
    a, b = m.lora_A.detach(), m.lora_B.detach()
    w = m.weight.detach() if cls is LoRALinear else m.dequantized_weight()
    fn = torch.compile(lambda x, s: ops.lora_linear(x, w, None, a, b, s), fullgraph=True, dynamic=True,
                       backend="aot_eager")
    x = torch.randn(5, 64)
    for scaling in (0.5, 2.0):
        torch.testing.assert_close(fn(x, scaling), ops.lora_linear(x, w, None, a, b, scaling))
    with pytest.raises(Exception, match="scaling must be a finite number"):
        fn(x, float("nan"))
    with pytest.raises(Exception, match="scaling must be a finite number within float32's range"):
        fn(x, 1e39)
    torch._dynamo.reset()


@pytest.mark.parametrize("cls", [LoRALinear, QLoRALinear])
def test_compile_fullgraph_with_autocast_on_an_intermediate_activation(cls):
    # A LoRA layer reading another layer's output (every transformer block: the input is a
    # normalized hidden state) under autocast: the shared-cast check read x.grad_fn before
    # asking whether dynamo traces, which dynamo cannot trace ("Tensor with grad_fn()").
    m = nn.Sequential(nn.LayerNorm(64), cls.from_linear(make_linear(64, 40), r=4))  # float32 out of the norm
    x = torch.randn(3, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = m(x)
        got = torch.compile(m, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, want)
    torch._dynamo.reset()


# ---------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", [LoRALinear, QLoRALinear])
def test_cuda_autocast_matches_reference(cls, dtype):
    m = cls.from_linear(make_linear(256, 192), r=16, dropout=0.1).cuda().train()
    randomize_b(m)
    x = torch.randn(33, 256, device="cuda")
    torch.manual_seed(0)
    with torch.autocast("cuda", dtype=dtype):
        y = m(x)
    assert y.dtype == (torch.float32 if cls is QLoRALinear else dtype)  # QLoRA: wide output, its compute dtype
    torch.manual_seed(0)
    seed = ops.new_seed("cuda")
    dense = m.weight if cls is LoRALinear else nf4.dequantize(m.quantized_weight().to("cuda"), torch.float64)
    expected = reference_output(m, x, dense, seed, 0.1)
    assert_close_rel(y, expected, RTOL[dtype], "cuda autocast y")
    y.float().sum().backward()
    assert m.lora_A.grad.dtype == torch.float32 and torch.isfinite(m.lora_A.grad).all()


def test_layers_reading_one_input_share_its_autocast_copy():
    # q, k, v of an attention block read the same fp32 hidden state: under bf16
    # autocast they must save ONE bf16 copy for backward, and give the gradients
    # of three independent casts.
    from lorakern.nn import QLoRALinear

    torch.manual_seed(0)
    layers = [QLoRALinear.from_linear(nn.Linear(64, n, bias=False), r=4, alpha=8) for n in (64, 32, 32)]
    for layer in layers:
        nn.init.normal_(layer.lora_B)
    x = torch.randn(5, 64, requires_grad=True)
    saved = {}
    h = x * 1.0  # an activation (autograd made it): only those are shared

    def pack(t):
        if t.dtype == torch.bfloat16 and t.shape == (5, 64):
            saved[t.untyped_storage().data_ptr()] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        shared = sum(layer(h).float().sum() for layer in layers)
    assert len(saved) == 1
    shared.backward()
    got = x.grad.clone()
    x.grad = None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        separate = sum(layer(x.clone()).float().sum() for layer in layers)  # distinct sources: no sharing
    separate.backward()
    torch.testing.assert_close(got, x.grad)
    torch.testing.assert_close(shared, separate)


def test_shared_autocast_copy_follows_in_place_changes():
    from lorakern.nn import QLoRALinear

    torch.manual_seed(1)
    layer = QLoRALinear.from_linear(nn.Linear(64, 16, bias=False), r=4, alpha=8)
    x = torch.randn(3, 64, requires_grad=True) * 1.0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = layer(x)
        x.mul_(2.0)  # same tensor object, new contents: must be cast again
        second = layer(x)
    torch.testing.assert_close(second.float(), 2.0 * first.float(), rtol=2e-2, atol=2e-2)
    assert not torch.equal(first, second)


def test_shared_autocast_copy_is_not_carried_across_inference_mode():
    from lorakern.nn import QLoRALinear

    layer = QLoRALinear.from_linear(nn.Linear(64, 16), r=4, alpha=8)
    x = torch.randn(2, 64)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()  # an inference-mode copy cannot be saved for backward
    assert layer.lora_A.grad is not None


@pytest.mark.parametrize("m_rows", [3, 40])  # fused GEMV path and decoded-panel path
@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_qlora_wide_output_keeps_an_adapter_update_below_one_bf16_ulp(m_rows, dropout):
    # Under bf16 autocast with float32 activations the LoRA term is added in float32:
    # a tiny adapter changes the output although it is far below a bf16 ulp of it.
    torch.manual_seed(5)
    m = QLoRALinear.from_linear(make_linear(k=128, n=72), r=4, alpha=4, dropout=dropout)
    m.train()
    with torch.no_grad():
        m.lora_B.normal_(std=1e-5)
    x = torch.randn(m_rows, 128, requires_grad=True)
    rng = torch.get_rng_state()

    def run():
        torch.set_rng_state(rng)  # the same dropout seed every time
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return m(x)

    y = run()
    assert y.dtype == torch.float32
    b = m.lora_B.detach().clone()
    with torch.no_grad():
        m.lora_B.zero_()
    base = run().detach()  # the base GEMM rounded once, plus the bias, in float32
    with torch.no_grad():
        m.lora_B.copy_(b)
    torch.set_rng_state(rng)
    seed = ops.new_seed(x.device)
    xb = x.detach().bfloat16()
    xd = ref.apply_dropout(xb, seed, dropout) if dropout else xb
    xa = (xd.double() @ m.lora_A.detach().bfloat16().double().t()).bfloat16()
    delta = m.scaling * (xa.float() @ b.bfloat16().float().t())
    ulp = base.abs().mean() * 2.0 ** -8
    assert delta.abs().max() < ulp / 20  # far below a bf16 ulp of the output
    torch.testing.assert_close(y.detach() - base, delta, rtol=0.05, atol=0.02 * delta.abs().max())
    m.wide_output = False
    narrow = run()
    assert narrow.dtype == torch.bfloat16
    torch.testing.assert_close(narrow.float(), base, rtol=2 * 2.0 ** -8, atol=float(ulp))  # only bf16 rounding of it
    m.wide_output = True
    y.square().sum().backward()  # gradients flow through the wide output
    assert torch.isfinite(x.grad).all() and m.lora_B.grad.abs().sum() > 0


@pytest.mark.parametrize("cls", [LoRALinear, QLoRALinear])
def test_writes_that_bump_no_version_counter_are_seen_by_the_next_call(cls):
    """A batch buffer refilled through NumPy and an adapter written through ``.data`` change no version
    counter: a cast copy kept from the previous call would give the previous output, silently."""
    m = cls.from_linear(make_linear(64, 48).to(torch.bfloat16), r=4).eval()
    nn.init.normal_(m.lora_B)
    buffer = np.zeros((3, 64), dtype=np.float32)
    x = torch.from_numpy(buffer)  # float32 into a bf16 layer: cast on every call

    def expected():
        base = m.dequantized_weight(torch.float32) if cls is QLoRALinear else m.weight.float()
        w = base + m.scaling * (m.lora_B.bfloat16().float() @ m.lora_A.bfloat16().float())
        return x.bfloat16().float() @ w.t() + m.bias.float()

    for step in range(3):
        buffer[:] = np.random.default_rng(step).standard_normal((3, 64))
        with torch.no_grad():
            torch.testing.assert_close(m(x).float(), expected(), rtol=2e-2, atol=5e-2)
        with torch.no_grad():
            m.lora_B.data.copy_(torch.randn_like(m.lora_B))
            m.lora_A.data.mul_(-1.0)
        torch.testing.assert_close(m(x).detach().float(), expected(), rtol=2e-2, atol=5e-2)


def test_a_buffer_refilled_in_place_under_autocast_is_cast_again():
    from lorakern.nn import QLoRALinear

    m = QLoRALinear.from_linear(make_linear(64, 16), r=4)
    buffer = np.zeros((2, 64), dtype=np.float32)
    x = torch.from_numpy(buffer)
    batches, outputs = [], []
    for step in range(3):  # consecutive calls on the same tensor object, nothing in between
        buffer[:] = np.random.default_rng(step).standard_normal((2, 64))
        batches.append(x.clone())
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs.append(m(x).float())
    for batch, got in zip(batches, outputs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            torch.testing.assert_close(got, m(batch).float())


def test_adapters_created_in_inference_mode_still_run():
    """Parameters made under torch.inference_mode are inference tensors (no version counter): no cached cast."""
    with torch.inference_mode():
        m = LoRALinear.from_linear(make_linear(16, 8).to(torch.bfloat16), r=2).eval()
        y = m(torch.randn(2, 16, dtype=torch.bfloat16))
    assert y.shape == (2, 8)
    with torch.no_grad():
        assert m(torch.randn(2, 16, dtype=torch.bfloat16)).shape == (2, 8)


def _cpu_backends():
    """The backends a test can force on CPU tensors (Triton under the interpreter, see conftest.py)."""
    from lorakern.ops import _registry

    return ["reference", "cpu", "composite"] + (["triton"] if _registry.load("triton")[0] is not None else [])


@pytest.mark.parametrize("backend_name", _cpu_backends())
@pytest.mark.parametrize("poison", [float("inf"), float("nan")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("cls", [LoRALinear, QLoRALinear])
def test_a_disabled_adapter_gives_the_base_output_whatever_it_holds(cls, dtype, poison, backend_name, backend):
    """Inside disable_adapters a diverged adapter (inf / NaN in lora_B) changes nothing: the output is the
    base layer's, bit for bit, and backward reaches x without reading the adapter (its gradients: zero). Before, the layers
    passed scaling 0 to the fused op, and 0 * inf = NaN reached every output element."""
    import lorakern

    lin = make_linear(65, 33, dtype=dtype)
    layer = cls.from_linear(lin, r=4, alpha=8, dropout=0.1)
    with torch.no_grad():
        layer.lora_B.fill_(poison)
    backend(backend_name)
    x = torch.randn(3, 7, 65, dtype=dtype, requires_grad=True)  # M = 21: the GEMM paths, not the GEMVs
    model = nn.Sequential(layer).train()
    with lorakern.disable_adapters(model):
        y = model(x)
        y.float().square().sum().backward()
    if cls is LoRALinear:
        base = nn.functional.linear(x.detach(), lin.weight, lin.bias)
        dense = lin.weight
    else:
        base = ops.nf4_matmul(x.detach(), layer.quantized_weight(), layer.bias)
        dense = layer.dequantized_weight(torch.float32)  # exact: NF4 values are float32 numbers
    assert y.dtype == dtype
    assert torch.equal(y.detach(), base)
    d = torch.float64
    assert_close_rel(y, x.detach().to(d) @ dense.to(d).t() + lin.bias.detach().to(d), RTOL[dtype], "disabled output")
    assert torch.isfinite(x.grad).all()
    assert not layer.lora_A.grad.any() and not layer.lora_B.grad.any()  # zero (DDP waits for every gradient)
    with torch.no_grad():  # enabled again: the poisoned adapter is used
        assert not torch.isfinite(model(x)).all()


@pytest.mark.parametrize("cls", [LoRALinear, QLoRALinear])
def test_backward_inside_disable_adapters_gives_the_adapter_zero_gradients(cls):
    """A frozen base with an input that needs no grad: backward still runs inside disable_adapters (the
    adapter is on the graph, not read) and leaves zero adapter gradients, an accumulated one untouched."""
    import lorakern

    layer = cls.from_linear(make_linear(64, 16), r=4)
    with torch.no_grad():
        layer.lora_B.fill_(float("nan"))
    layer.lora_A.grad = torch.ones_like(layer.lora_A)
    x = torch.randn(5, 64)
    with lorakern.disable_adapters(nn.Sequential(layer)):
        layer(x).sum().backward()
        with torch.no_grad():
            assert layer(x).grad_fn is None
        params = {"lora_A": layer.lora_A.detach(), "lora_B": layer.lora_B.detach()}
        grads = torch.func.grad(lambda p: torch.func.functional_call(layer, p, (x,)).square().sum())(params)
    assert torch.equal(layer.lora_A.grad, torch.ones_like(layer.lora_A)) and not layer.lora_B.grad.any()
    assert not grads["lora_A"].any() and not grads["lora_B"].any()


@pytest.mark.parametrize("cls", [LoRALinear, QLoRALinear])
def test_forward_mode_ad_inside_disable_adapters(cls):
    """jvp / jacfwd / forward_ad through a disabled layer give the base layer's tangent (the base-only
    path's autograd.Function had no jvp: NotImplementedError)."""
    import torch.autograd.forward_ad as fwAD

    import lorakern

    layer = cls.from_linear(make_linear(64, 16), r=4)
    randomize_b(layer)
    x, v = torch.randn(3, 64), torch.randn(3, 64)
    w = layer.dequantized_weight(torch.float32) if cls is QLoRALinear else layer.weight.detach()
    want = v @ w.t()
    with lorakern.disable_adapters(nn.Sequential(layer)):
        _, tangent = torch.func.jvp(layer, (x,), (v,))
        jac = torch.func.jacfwd(layer)(x[0])
        with fwAD.dual_level():
            dual = fwAD.unpack_dual(layer(fwAD.make_dual(x, v))).tangent
    for got in (tangent, dual):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(jac, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compute_dtype, autocast", [(torch.bfloat16, False), (torch.float32, True)])
def test_a_disabled_adapter_keeps_the_qlora_wide_output(compute_dtype, autocast):
    """A disabled QLoRA layer returns what it returns enabled: a float32 output from bf16 GEMMs, the bias
    (in the GEMM dtype) added in float32 (wide_output)."""
    import lorakern

    layer = QLoRALinear.from_linear(make_linear(64, 16), r=4, compute_dtype=compute_dtype)
    with torch.no_grad():
        layer.lora_B.fill_(float("inf"))
    x = torch.randn(20, 64)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast), lorakern.disable_adapters(nn.Sequential(layer)):
        y = layer(x)
    assert y.dtype == torch.float32
    bias = layer.bias.bfloat16().float()
    assert torch.equal(y, ops.nf4_matmul(x.bfloat16(), layer.quantized_weight(), None).float() + bias)

