"""LoRA on fused MoE expert weights (LoRAExperts, apply_lora(target_parameters=...)).

Unit tests check one expert's fused op against x W_e^T + s (x A_e^T) B_e^T formed
by hand (dense and NF4, both layouts, gradients included). Model tests run tiny
random transformers 5 MoE models and use PEFT's ``target_parameters`` adapters as
the oracle: same logits and the same adapter gradients (after converting PEFT's
layout), adapters loading both ways, merge_lora equal to the adapted model.
"""

import copy
import json

import pytest
import torch
from torch import nn

import lorakern
from lorakern.nn import LoRAExperts
from lorakern.nn.experts import ExpertWeight
from lorakern.patch import lora_modules

from helpers_models import randomize_adapters

E, N, K = 3, 40, 72


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _stack(transposed=False, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(E, N, K, generator=g) / K ** 0.5
    return (w.transpose(1, 2).contiguous() if transposed else w).to(dtype)


def _experts(transposed=False, quantize=None, dtype=torch.float32, r=8, **kw):
    weight = nn.Parameter(_stack(transposed, dtype), requires_grad=False)
    module = LoRAExperts(weight, transposed, r=r, alpha=2 * r, quantize=quantize, **kw)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=g) * 0.2)
    return module


def _reference(module, x, e):
    """x W_e^T + s (x A_e^T) B_e^T from the module's (dequantized) base, in float64."""
    w = module.base_weight(e, torch.float64)
    a, b = module.lora_A[e].double(), module.lora_B[e].double()
    x = x.double()
    return x @ w.T + module.scaling * (x @ a.T) @ b.T


TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("r", [1, 8])
def test_expert_matmul_matches_reference_with_gradients(quantize, transposed, dtype, r):
    module = _experts(transposed, quantize, dtype, r)
    x = torch.randn(7, K, generator=torch.Generator().manual_seed(3)).to(dtype).requires_grad_(True)
    for e in (0, E - 1):
        w = module[e]
        y = x @ w if transposed else nn.functional.linear(x, w)
        ref = _reference(module, x, e)
        tol = TOL[dtype]
        assert y.dtype == dtype and y.shape == (7, N)
        torch.testing.assert_close(y.double(), ref, atol=tol * ref.abs().max().item(), rtol=tol)
        dy = torch.randn(7, N, generator=torch.Generator().manual_seed(4)).to(dtype)
        grads = torch.autograd.grad(y, (x, module.lora_A, module.lora_B), dy)
        refs = torch.autograd.grad(ref, (x, module.lora_A, module.lora_B), dy.double())
        for got, want, what in zip(grads, refs, ("x", "lora_A", "lora_B")):
            assert got.abs().sum() > 0, what
            torch.testing.assert_close(got.double(), want.double(), atol=tol * want.abs().max().item() + 1e-6,
                                       rtol=tol, msg=f"gradient of {what}")
        other = [i for i in range(E) if i != e]
        assert module.lora_A.grad is None  # autograd.grad, not backward
        assert grads[1][other].abs().max() == 0 and grads[2][other].abs().max() == 0


@pytest.mark.parametrize("backend_name", ["reference", "cpu", "composite"])
@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_disabled_experts_give_the_base_output_whatever_the_adapter_holds(quantize, dtype, backend_name, backend):
    """Inside disable_adapters an expert with inf / NaN in its adapter computes its base alone, bit for bit
    (before, scaling 0 went to the fused op and 0 * inf made every output NaN); so does a 2-D (router) weight."""
    stacked = _experts(False, quantize, dtype)
    transposed = _experts(True, quantize, dtype)
    router = LoRAExperts(nn.Parameter(_stack(dtype=dtype)[0], requires_grad=False), r=4)
    for i, module in enumerate((stacked, transposed, router)):
        with torch.no_grad():
            module.lora_B.fill_(float("inf") if i % 2 else float("nan"))
    backend(backend_name)
    x = torch.randn(21, K, dtype=dtype, requires_grad=True)
    bias = torch.randn(N, dtype=dtype)
    with lorakern.disable_adapters(nn.ModuleList([stacked, transposed, router])):
        outputs = [(nn.functional.linear(x, stacked[e], bias), x @ transposed[e]) for e in range(E)]
        outputs.append((nn.functional.linear(x, router), None))
        sum(y.float().sum() for pair in outputs for y in pair if y is not None).backward()
    def base(module, e, bias=None):
        if quantize is None:
            return nn.functional.linear(x.detach(), module.weight[e], bias)
        return lorakern.ops.nf4_matmul(x.detach(), module.quantized_weight(e), bias)

    for e, (y, yt) in enumerate(outputs[:E]):
        assert y.dtype == yt.dtype == dtype
        assert torch.equal(y.detach(), base(stacked, e, bias)), e
        assert torch.equal(yt.detach(), base(transposed, e)), e
    assert torch.equal(outputs[E][0].detach(), nn.functional.linear(x.detach(), router.weight[0]))
    assert torch.isfinite(x.grad).all()
    assert all(not m.lora_A.grad.any() and not m.lora_B.grad.any() for m in (stacked, transposed, router))


def test_the_fast_path_forms_no_dense_weight(monkeypatch):
    """F.linear(x, W[e]) must reach the fused op, not the dense fallback."""
    module = _experts()
    monkeypatch.setattr(LoRAExperts, "dense", lambda *a, **k: pytest.fail("dense weight formed"))
    nn.functional.linear(torch.randn(2, K), module[1])
    transposed = _experts(transposed=True)
    torch.randn(2, K) @ transposed[1]


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_other_uses_get_the_dense_weight_with_the_adapter(quantize):
    """torch.bmm over the stack, .float(), a transposed F.linear: the dense weight plus B @ A, with gradients."""
    module = _experts(quantize=quantize)
    x = torch.randn(E, 5, K)
    y = torch.bmm(x, module.transpose(1, 2))
    ref = torch.stack([_reference(module, x[e], e) for e in range(E)])
    torch.testing.assert_close(y.double(), ref, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    assert module.lora_B.grad.abs().sum() > 0
    w = module[2].float()
    torch.testing.assert_close(w.double(), module.base_weight(2, torch.float64) + module.scaling *
                               module.lora_B[2].double() @ module.lora_A[2].double(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(module[1:3], module.dense()[1:3])


def test_indexing_and_the_shape_of_the_replaced_parameter():
    for transposed in (False, True):
        module = _experts(transposed)
        original = _stack(transposed)
        assert module.shape == original.shape and module.size(1) == original.shape[1] and module.dim() == 3
        assert module.dtype == torch.float32 and module.device == original.device and len(module) == E
        assert module[torch.tensor(1)].index == 1 and module[-1].index == E - 1
        assert isinstance(module[0], ExpertWeight) and module[0].shape == original.shape[1:]
    with pytest.raises(IndexError, match="expert index 3 is out of range for 3 experts"):
        module[3]
    nf4 = _experts(quantize="nf4", dtype=torch.bfloat16)
    assert nf4.weight.dtype == torch.uint8 and nf4.dtype == torch.bfloat16 and nf4.shape == (E, N, K)


def test_model_to_keeps_the_quantization_state_and_state_dict_round_trips():
    module = _experts(quantize="nf4")
    absmax = module.absmax.clone()
    module.to(torch.bfloat16)
    assert module.absmax.dtype == absmax.dtype and torch.equal(module.absmax, absmax)
    x = torch.randn(3, K)
    fresh = LoRAExperts(nn.Parameter(torch.zeros(E, N, K), requires_grad=False), r=8, alpha=16, quantize="nf4")
    fresh.load_state_dict(module.state_dict())
    assert module.compute_dtype == torch.bfloat16 and fresh.compute_dtype == torch.float32  # the move sets it
    fresh.to(torch.bfloat16)
    torch.testing.assert_close(nn.functional.linear(x, fresh[1]), nn.functional.linear(x, module[1]))


def test_dropout_acts_in_training_and_is_refused_where_it_cannot_apply():
    module = _experts(dropout=0.5)
    x = torch.randn(64, K)
    module.eval()
    y_eval = nn.functional.linear(x, module[0])
    module.train()
    y_train = nn.functional.linear(x, module[0])
    assert not torch.allclose(y_train, y_eval)
    with pytest.raises(RuntimeError, match="LoRA dropout cannot be applied"):
        torch.bmm(x.expand(E, -1, -1), module.transpose(1, 2))
    with torch.no_grad():  # no adapter gradient, nothing to drop: allowed
        torch.bmm(x.expand(E, -1, -1), module.transpose(1, 2))


def test_bad_weights_are_refused_clearly():
    with pytest.raises(ValueError, match="weight must be a 3-D floating tensor"):
        LoRAExperts(torch.zeros(4))
    with pytest.raises(ValueError, match="weight must be a 3-D floating tensor"):
        LoRAExperts(torch.zeros(2, 4, 4, dtype=torch.int32))
    with pytest.raises(ValueError, match="a 2-D weight is adapted dense and untransposed"):
        LoRAExperts(torch.zeros(4, 64), quantize="nf4")
    with pytest.raises(ValueError, match="meta device"):
        LoRAExperts(torch.zeros(2, 4, 4, device="meta"))
    with pytest.raises(ValueError, match="compute_dtype applies to quantized experts only"):
        LoRAExperts(torch.zeros(2, 4, 64), compute_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="r .* must be a positive int"):
        LoRAExperts(torch.zeros(2, 4, 64), r=0)


# ----------------------------------------------------------------------------- transformers models

transformers = pytest.importorskip("transformers")

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, head_dim=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=48)
FAMILIES = {
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen3_moe": MOE,
    "qwen2_moe": dict(MOE, shared_expert_intermediate_size=64),
    "olmoe": MOE,
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2),   # [E, in, out] weights, biases, x @ W[e]
    "granitemoe": dict(num_local_experts=4, num_experts_per_tok=2),
    "llama4_text": dict(num_local_experts=4, num_experts_per_tok=1, interleave_moe_layer_step=1),  # torch.bmm
}
_BASES = {}
_IDS = torch.randint(3, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


def _base(family):
    if family not in _BASES:
        torch.manual_seed(0)
        config = transformers.AutoConfig.for_model(family, **COMMON, **FAMILIES[family])
        _BASES[family] = transformers.AutoModelForCausalLM.from_config(config).eval()
    return copy.deepcopy(_BASES[family])


def _logits(model):
    with torch.no_grad():
        return model(_IDS).logits


TARGETS = ["experts.gate_up_proj", "experts.down_proj"]


@pytest.mark.parametrize("family", FAMILIES)
def test_adapters_match_peft_forward_and_backward(family, tmp_path):
    peft = pytest.importorskip("peft")
    ours = _base(family)
    names = lorakern.apply_lora(ours, ["q_proj"], r=4, alpha=8, target_parameters="all-experts")
    assert sum(n.endswith(".gate_up_proj") for n in names) == 2 and sum(n.endswith(".down_proj") for n in names) == 2
    randomize_adapters(ours)
    assert (_logits(ours) - _logits(_base(family))).abs().max() > 1e-2  # the expert adapters act
    lorakern.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(_base(family), tmp_path, is_trainable=True).eval()
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=2e-5, rtol=2e-5)

    ours(_IDS, labels=_IDS).loss.backward()
    theirs(_IDS, labels=_IDS).loss.backward()
    peft_grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.grad is not None}
    from lorakern.patch.adapter import _expert_paths

    experts = {n: m for n, m in lora_modules(ours).items() if isinstance(m, LoRAExperts)}
    for name, path in _expert_paths(list(experts)).items():
        module = experts[name]
        e, r, k = module.lora_A.shape
        ga = peft_grads[f"base_model.model.{path}.lora_A.weight"].reshape(e, r, k)
        gb = peft_grads[f"base_model.model.{path}.lora_B.weight"].reshape(-1, r, e).permute(2, 0, 1)
        assert module.lora_A.grad.abs().max() > 0 and module.lora_B.grad.abs().max() > 0, name
        torch.testing.assert_close(module.lora_A.grad, ga, atol=1e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(module.lora_B.grad, gb, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss", "llama4_text"])
def test_peft_target_parameters_adapters_load_here(family, tmp_path):
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["v_proj"], target_parameters=TARGETS)
    theirs = peft.get_peft_model(_base(family), config).eval()
    with torch.no_grad():
        for n, p in theirs.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    theirs.save_pretrained(tmp_path)
    ours = _base(family)
    names = lorakern.load_adapter(ours, tmp_path)
    assert sorted(n.rpartition(".")[2] for n in names) == ["down_proj"] * 2 + ["gate_up_proj"] * 2 + ["v_proj"] * 2
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=2e-5, rtol=2e-5)
    # an NF4 base: the same adapter on each expert's dequantized weight
    nf4 = _base(family)
    lorakern.load_adapter(nf4, tmp_path, quantize="nf4")
    merged = lorakern.merge_lora(copy.deepcopy(nf4))
    torch.testing.assert_close(_logits(nf4), _logits(merged), atol=2e-5, rtol=2e-5)
    # and equal to PEFT on a base whose adapted weights went through NF4 and back
    rounded = peft.PeftModel.from_pretrained(_nf4_rounded(_base(family), TARGETS + ["v_proj.weight"]), tmp_path)
    torch.testing.assert_close(_logits(nf4), _logits(rounded.eval()), atol=2e-5, rtol=2e-5)


@torch.no_grad()
def _nf4_rounded(model, targets):
    """``model`` with each targeted weight replaced by dequant(quant(W)), expert by expert in [out, in] layout."""
    for name, param in list(model.named_parameters()):
        if not any(name.endswith("." + t) for t in targets):
            continue
        owner = model.get_submodule(name.rpartition(".")[0])
        transposed = param.dim() == 3 and getattr(owner, "is_transposed", False)
        stack = param.transpose(1, 2) if transposed else param
        rounded = [lorakern.nf4_dequantize(lorakern.nf4_quantize(w.contiguous()), torch.float32)
                   for w in (stack if stack.dim() == 3 else [stack])]
        rounded = torch.stack(rounded) if stack.dim() == 3 else rounded[0]
        param.copy_(rounded.transpose(1, 2) if transposed else rounded)
    return model


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_restores_plain_parameters_and_the_experts_implementation(quantize, tmp_path):
    model = _base("mixtral")
    impl = model.config._experts_implementation
    lorakern.apply_lora(model, None, r=4, alpha=8, target_parameters=TARGETS, quantize=quantize)
    experts = model.model.layers[0].mlp.experts
    assert experts.config._experts_implementation == "eager" and model.config._experts_implementation == impl
    if quantize:
        assert experts.gate_up_proj.weight.dtype == torch.uint8
    randomize_adapters(model)
    adapted = _logits(model)
    merged = lorakern.merge_lora(model)
    assert isinstance(merged.model.layers[0].mlp.experts.gate_up_proj, nn.Parameter)
    assert merged.model.layers[0].mlp.experts.config is merged.config
    assert not lora_modules(merged)
    torch.testing.assert_close(_logits(merged), adapted, atol=2e-5, rtol=2e-5)
    merged.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), adapted, atol=2e-5, rtol=2e-5)


def test_staged_quantization_of_experts_equals_the_default():
    """device= builds the NF4 experts from a copy on that device; on the CPU it equals quantizing in place."""
    a, b = _base("mixtral"), _base("mixtral")
    torch.manual_seed(3)
    lorakern.apply_lora(a, None, r=4, quantize="nf4", target_parameters="all-experts")
    torch.manual_seed(3)
    lorakern.apply_lora(b, None, r=4, quantize="nf4", target_parameters="all-experts", device="cpu")
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), name


def test_qlora_experts_train_and_only_adapters_require_grad():
    model = _base("qwen3_moe")
    lorakern.apply_lora(model, "all-linear", r=4, alpha=8, dropout=0.1, quantize="nf4",
                        target_parameters="all-experts")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith(("lora_A", "lora_B")) for n in trainable)
    assert any(".experts.gate_up_proj.lora_A" in n for n in trainable)
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(6):
        loss = model(_IDS, labels=_IDS).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_target_parameter_mistakes_are_named():
    model = _base("mixtral")
    with pytest.raises(TypeError, match=r"'model.layers.0.self_attn.q_proj.weight' is the weight of a Linear;.*"
                                        r"adapt the layer itself with target_modules"):
        lorakern.apply_lora(copy.deepcopy(model), None, target_parameters=["q_proj.weight"])
    with pytest.raises(TypeError, match=r"'model.layers.0.input_layernorm.weight' is a 1-D"):
        lorakern.apply_lora(copy.deepcopy(model), None, target_parameters=["input_layernorm.weight"])
    with pytest.raises(ValueError, match=r"matched no parameter: \['experts.w1'\].*experts.gate_up_proj"):
        lorakern.apply_lora(copy.deepcopy(model), None, target_parameters=["experts.w1"])
    with pytest.raises(TypeError, match="target_parameters must be 'all-experts' or a non-empty list"):
        lorakern.apply_lora(copy.deepcopy(model), None, target_parameters="experts")
    with pytest.raises(ValueError, match="target_modules=None adapts no layer"):
        lorakern.apply_lora(copy.deepcopy(model), None)
    names = lorakern.apply_lora(copy.deepcopy(model), None, target_parameters="all-experts",
                                exclude=["model.layers.0.mlp.experts"])
    assert names == ["model.layers.1.mlp.experts.gate_up_proj", "model.layers.1.mlp.experts.down_proj"]
    dense = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model("llama", **COMMON))
    with pytest.raises(ValueError, match="found no fused MoE expert weights"):
        lorakern.apply_lora(dense, None, target_parameters="all-experts")
    with pytest.raises(ValueError, match="dropout=0.1 cannot apply to .*Llama4TextExperts reads its expert weights"):
        lorakern.apply_lora(_base("llama4_text"), None, dropout=0.1, target_parameters="all-experts")


def test_a_router_weight_takes_a_2d_adapter_on_the_fused_path(monkeypatch):
    """PEFT's all-linear adapts MoE routers through target_parameters ("gate.weight"): F.linear(x, W) on a 2-D
    LoRAExperts runs the fused op (also under dropout), and merge gives back the plain weight."""
    model = _base("mixtral")
    names = lorakern.apply_lora(model, None, r=4, alpha=8, dropout=0.1, quantize="nf4",
                                target_parameters=["gate.weight", "experts.down_proj"])
    router = model.model.layers[0].mlp.gate.weight
    assert isinstance(router, LoRAExperts) and not router.stacked and router.quantize is None  # routers stay dense
    assert router.shape == (4, 64) and router.dim() == 2 and len(router) == 4
    assert model.model.layers[0].mlp.experts.down_proj.quantize == "nf4"
    assert "model.layers.1.mlp.gate.weight" in names
    randomize_adapters(model)
    adapted = _logits(model)
    monkeypatch.setattr(LoRAExperts, "dense", lambda *a, **k: pytest.fail("dense weight formed"))
    model.train()
    model(_IDS, labels=_IDS).loss.backward()
    assert router.lora_B.grad.abs().max() > 0
    monkeypatch.undo()
    merged = lorakern.merge_lora(model)
    assert isinstance(merged.model.layers[0].mlp.gate.weight, nn.Parameter)
    assert merged.model.layers[0].mlp.gate.weight.shape == (4, 64)
    torch.testing.assert_close(_logits(merged.eval()), adapted, atol=2e-5, rtol=2e-5)


def test_checkpointing_and_bf16_autocast_with_nf4_experts_and_dropout():
    """Activation checkpointing recomputes the same dropout masks in the experts (same loss, same gradients);
    under bf16 autocast the NF4 experts train and their adapters get finite gradients."""
    model = _base("qwen3_moe")
    lorakern.apply_lora(model, "all-linear", r=4, alpha=8, dropout=0.1, quantize="nf4", target_parameters="all-experts")
    randomize_adapters(model)
    model.train()

    def step():
        model.zero_grad()
        torch.manual_seed(5)
        loss = model(_IDS, labels=_IDS).loss
        loss.backward()
        return loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad]

    plain = step()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    checkpointed = step()
    model.gradient_checkpointing_disable()
    assert plain[0] == checkpointed[0]
    for a, b in zip(plain[1], checkpointed[1]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    model.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(_IDS, labels=_IDS).loss
    loss.backward()
    experts = model.model.layers[0].mlp.experts.gate_up_proj
    assert torch.isfinite(loss) and torch.isfinite(experts.lora_A.grad).all() and experts.lora_B.grad.abs().max() > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_nf4_experts_on_the_gpu_match_the_merged_model(family):
    """NF4 expert adapters on CUDA (quantized there through device=), bf16 autocast training step, and logits
    equal to the merged dense model's."""
    model = _base(family)
    lorakern.apply_lora(model, "all-linear", r=8, alpha=16, quantize="nf4", target_parameters="all-experts",
                        device="cuda")
    model.cuda()
    randomize_adapters(model)
    ids = _IDS.cuda()
    with torch.no_grad():
        adapted = model(ids).logits
        merged = lorakern.merge_lora(copy.deepcopy(model))(ids).logits
    torch.testing.assert_close(adapted, merged, atol=1e-4, rtol=1e-4)
    model.train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=ids).loss
    loss.backward()
    grads = [m.lora_B.grad for m in lora_modules(model).values() if isinstance(m, LoRAExperts)]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_quantizing_only_the_layers_of_a_moe_model_says_the_experts_stay_dense():
    with pytest.warns(UserWarning, match=r"leaves this model's 4 fused MoE expert weights .* dense.*"
                                         r"target_parameters='all-experts'"):
        lorakern.apply_lora(_base("mixtral"), "all-linear", r=4, quantize="nf4")


def test_a_per_expert_adapter_from_transformers_4_is_refused_with_the_way_to_convert_it(tmp_path):
    """Mixtral adapters trained before transformers 5 name one layer per expert (block_sparse_moe.experts.3.w1);
    the error says so and how PEFT converts them, and the converted adapter loads here with PEFT's logits."""
    import json

    from safetensors.torch import save_file

    peft = pytest.importorskip("peft")
    r, g, tensors = 4, torch.Generator().manual_seed(0), {}
    for layer in range(2):
        for e in range(4):
            for name, (out, k) in {"w1": (96, 64), "w3": (96, 64), "w2": (64, 96)}.items():
                key = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{e}.{name}"
                tensors[f"{key}.lora_A.weight"] = torch.randn(r, k, generator=g) * 0.1
                tensors[f"{key}.lora_B.weight"] = torch.randn(out, r, generator=g) * 0.1
    old = tmp_path / "old"
    old.mkdir()
    save_file(tensors, old / "adapter_model.safetensors")
    (old / "adapter_config.json").write_text(json.dumps(dict(peft_type="LORA", task_type="CAUSAL_LM", r=r,
                                                             lora_alpha=8, target_modules=["w1", "w2", "w3"])))
    with pytest.raises(lorakern.patch.AdapterError, match=r"per-expert layers of the transformers < 5 layout.*"
                                                           r"PeftModel.from_pretrained"):
        lorakern.load_adapter(_base("mixtral"), old)
    theirs = peft.PeftModel.from_pretrained(_base("mixtral"), old).eval()
    theirs.save_pretrained(tmp_path / "converted")
    ours = _base("mixtral")
    lorakern.load_adapter(ours, tmp_path / "converted")
    torch.testing.assert_close(_logits(ours), _logits(theirs), atol=2e-5, rtol=2e-5)


MLA = dict(qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, kv_lora_rank=16, q_lora_rank=16)
MORE_FAMILIES = {  # config keywords on top of the sizes below; a sweep of 37 families passed the same checks
    "deepseek_v3": dict(n_routed_experts=4, first_k_dense_replace=0, n_group=1, topk_group=1, **MLA),
    "qwen3_next": dict(num_experts=4, shared_expert_intermediate_size=64, head_dim=16,
                       layer_types=["linear_attention", "full_attention"], linear_num_value_heads=4,
                       linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16),
    "jamba": dict(num_experts=4, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1,
                  expert_layer_offset=0, mamba_d_state=8, use_mamba_kernels=False),
    "glm4_moe": dict(n_routed_experts=4, first_k_dense_replace=0, n_group=1, topk_group=1, head_dim=16),
    "ernie4_5_moe": dict(moe_num_experts=4, moe_k=2, moe_layer_start_index=0, head_dim=16),
    "minimax": dict(num_local_experts=4, head_dim=16),
    "hunyuan_v1_moe": dict(num_experts=4, head_dim=16),
    "phimoe": dict(num_local_experts=4),
    "lfm2_moe": dict(num_experts=4, num_dense_layers=0, layer_types=["conv", "full_attention"]),
    "dots1": dict(n_routed_experts=4, n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1,
                  head_dim=16),
}


@pytest.mark.parametrize("family", MORE_FAMILIES)
def test_more_moe_families_adapt_train_and_merge(family):
    """Dense and NF4 expert adapters change the logits, every adapter gets a gradient, and merge_lora gives the
    adapted model's logits with plain parameters."""
    config = transformers.AutoConfig.for_model(
        family, vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts_per_tok=2, moe_intermediate_size=48, max_position_embeddings=128,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, **MORE_FAMILIES[family])
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    for quantize in (None, "nf4"):
        model = copy.deepcopy(base)
        names = lorakern.apply_lora(model, None, r=4, alpha=8, quantize=quantize, target_parameters="all-experts")
        assert names and all(isinstance(m, LoRAExperts) for m in lora_modules(model).values())
        randomize_adapters(model)
        adapted = _logits(model)
        assert (adapted - _logits(base)).abs().max() > 1e-3
        model.train()
        model(_IDS, labels=_IDS).loss.backward()
        model.eval()
        assert all(m.lora_B.grad is not None and m.lora_B.grad.any() for m in lora_modules(model).values())
        merged = lorakern.merge_lora(model)
        assert not lora_modules(merged)
        torch.testing.assert_close(_logits(merged), adapted, atol=1e-4, rtol=1e-4)


def test_the_moe_benchmark_runs_and_reports_every_setup(tmp_path):
    """benchmarks/bench_moe.py (run unattended on GPU machines by gpu_check.sh): a short CPU run writes its table."""
    import os
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = tmp_path / "moe.md"
    subprocess.run([sys.executable, os.path.join(root, "benchmarks", "bench_moe.py"), "--tokens", "32", "--repeats",
                    "1", "--out", str(out)], check=True, cwd=root, capture_output=True, timeout=300)
    table = out.read_text()
    for row in ("no adapter, grouped_mm experts", "no adapter, eager experts", "lorakern LoRAExperts (r=16)",
                "lorakern LoRAExperts NF4 (r=16)", "PEFT target_parameters (r=16)"):
        assert f"| {row} |" in table, row


def test_config_rank_is_the_common_one_when_the_last_expert_weight_differs(tmp_path):
    """save_adapter's expert loop must not overwrite the config's r with the rank of the last stack it writes."""
    peft = pytest.importorskip("peft")
    ours = _base("mixtral")
    lorakern.apply_lora(ours, ["q_proj"], r=4, alpha=8, target_parameters=TARGETS,
                        rank_pattern={r"layers\.1\.mlp\.experts\.down_proj": 2})
    randomize_adapters(ours)
    lorakern.save_adapter(ours, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and list(config["rank_pattern"].values()) == [2]
    again = _base("mixtral")
    lorakern.load_adapter(again, tmp_path)
    torch.testing.assert_close(_logits(again), _logits(ours), rtol=0, atol=0)
    theirs = peft.PeftModel.from_pretrained(_base("mixtral"), tmp_path).eval()
    torch.testing.assert_close(_logits(theirs), _logits(ours), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("family", ["llama4_text", "mixtral"])
@pytest.mark.parametrize("model_dtype, compute_dtype", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_nf4_experts_with_a_compute_dtype_other_than_the_model_run_and_merge_in_the_model_dtype(
        family, model_dtype, compute_dtype):
    """Llama 4 reads the stack whole (torch.bmm with the hidden states): it gets it in the model's dtype, not the
    compute dtype; merge_lora gives back a model of one dtype that computes what the patched one did."""
    model = _base(family).to(model_dtype)
    lorakern.apply_lora(model, "all-linear", r=4, alpha=8, target_parameters="all-experts", quantize="nf4",
                        compute_dtype=compute_dtype)
    randomize_adapters(model)
    got = _logits(model)
    assert got.dtype == model_dtype
    merged = lorakern.merge_lora(copy.deepcopy(model))
    assert {p.dtype for p in merged.parameters()} == {model_dtype}
    tol = 3e-2 if torch.bfloat16 in (model_dtype, compute_dtype) else 1e-5
    torch.testing.assert_close(_logits(merged).float(), got.float(), atol=tol * got.abs().max().item(), rtol=tol)


@pytest.mark.parametrize("move", ["double", "half"])
def test_nf4_stacks_read_whole_follow_every_dtype_move(move):
    """model.double() (float64: no NF4 compute dtype, but the stack must come in it for torch.bmm) and
    model.half() under bf16 autocast (CPU autocast refuses to stack fp16 tensors) on Llama 4."""
    model = _base("llama4_text")
    lorakern.apply_lora(model, "all-linear", r=4, alpha=8, target_parameters="all-experts", quantize="nf4")
    randomize_adapters(model)
    getattr(model, move)()
    want = torch.float64 if move == "double" else torch.float16
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=move == "half"):
        got = _logits(model)
    assert torch.isfinite(got).all()
    merged = lorakern.merge_lora(copy.deepcopy(model))
    assert {p.dtype for p in merged.parameters()} == {want}
    if move == "double":
        torch.testing.assert_close(_logits(merged), got, atol=1e-6, rtol=1e-6)


def test_saving_dense_mlp_adapters_of_a_model_peft_converts_warns_that_peft_drops_them(tmp_path):
    """PEFT 0.21 turns target_modules 'down_proj' of a qwen3_moe model into target_parameters of the fused experts
    and drops the dense MLP's adapter (layer 0 here: mlp_only_layers=[0]): save_adapter says so; lorakern's own
    loader still reproduces the model."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model("qwen3_moe", **COMMON, **MOE, mlp_only_layers=[0])
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    ours = copy.deepcopy(base)
    assert lorakern.apply_lora(ours, ["down_proj"], r=4, alpha=8) == ["model.layers.0.mlp.down_proj"]
    randomize_adapters(ours)
    with pytest.warns(UserWarning, match=r"PEFT 0\.21 .*'qwen3_moe'.*model\.layers\.0\.mlp\.down_proj.*dropped"):
        lorakern.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    assert (_logits(theirs) - _logits(ours)).abs().max() > 1e-3  # what the warning is about
    again = copy.deepcopy(base)
    lorakern.load_adapter(again, tmp_path)
    torch.testing.assert_close(_logits(again), _logits(ours), rtol=0, atol=0)
    # attention layers and the expert weights themselves are not affected: no warning
    fine = copy.deepcopy(base)
    lorakern.apply_lora(fine, ["q_proj"], r=4, alpha=8, target_parameters="all-experts")
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lorakern.save_adapter(fine, tmp_path / "fine")


def test_dropout_of_an_adapter_with_expert_weights_survives_save_and_load(tmp_path):
    """PEFT refuses lora_dropout with target_parameters, so the config says 0; the true value travels in the
    weights file's metadata and load_adapter patches with it. PEFT still loads the adapter, with the same logits."""
    peft = pytest.importorskip("peft")
    ours = _base("qwen3_moe")
    lorakern.apply_lora(ours, ["q_proj"], r=4, alpha=8, dropout=0.05, target_parameters="all-experts")
    randomize_adapters(ours)
    ours.eval()
    lorakern.save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["lora_dropout"] == 0.0
    again = _base("qwen3_moe")
    lorakern.load_adapter(again, tmp_path)
    assert {m.dropout for m in lora_modules(again).values()} == {0.05}
    theirs = peft.PeftModel.from_pretrained(_base("qwen3_moe"), tmp_path).eval()
    torch.testing.assert_close(_logits(theirs), _logits(ours), atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(_logits(again), _logits(ours), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_merge_keeps_the_parameter_order(family):
    # state_dict and optimizer order follow registration: merging set the expert Parameters back
    # last-first (down_proj before gate_up_proj in every layer), and after gpt-oss's expert biases
    model = _base(family)
    before = list(model.state_dict())
    lorakern.apply_lora(model, ["q_proj"], r=4, alpha=8, target_parameters="all-experts")
    lorakern.merge_lora(model)
    assert list(model.state_dict()) == before
