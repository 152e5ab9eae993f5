"""apply_lora / merge_lora on every supported model family and on plain torch modules."""

import copy

import pytest
import torch
from torch import nn

import lorakern
from lorakern.nn import LoRALinear, QLoRALinear
from lorakern.patch import lora_modules
from lorakern.patch.targets import is_conv1d

from helpers_models import FAMILIES, PlainMLP, example_input, logits, randomize_adapters


def _linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) or is_conv1d(m)]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_all_linear_patches_every_linear_but_the_head(family):
    build, inner, head = FAMILIES[family]
    model = build()
    if family == "gpt_neox" and hasattr(model, "embed_out"):
        head = "embed_out"  # GPT-NeoX's head before transformers 5 (the newest for torch < 2.6 is 4.57)
    base = copy.deepcopy(model)
    expected = [n for n in _linear_names(model) if n != head]
    names = lorakern.apply_lora(model, r=4, alpha=8)
    assert names == expected and inner in names
    if head is not None:
        assert not isinstance(model.get_submodule(head), (LoRALinear, QLoRALinear))
    assert set(lora_modules(model)) == set(names)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # a classification model's head (new, random) trains whole, as under PEFT's SEQ_CLS wrapper
    head_params = {f"{head}.weight", f"{head}.bias"} if family == "bert" else set()
    assert trainable == {f"{n}.lora_{ab}" for n in names for ab in "AB"} | head_params
    ids = example_input()
    with torch.no_grad():  # B = 0: the patched model computes exactly what the base did
        assert torch.equal(logits(model, ids), logits(base, ids))


def test_gpt2_conv1d_is_transposed_and_merged_back_in_conv1d_layout(tmp_path):
    build, _, _ = FAMILIES["gpt2"]
    model = build()
    conv = model.transformer.h[0].attn.c_attn
    lorakern.apply_lora(model, ["c_attn", "c_fc"], r=4)
    layer = model.transformer.h[0].attn.c_attn
    assert layer.fan_in_fan_out and torch.equal(layer.weight, conv.weight.t())
    randomize_adapters(model)
    ids = example_input()
    with torch.no_grad():
        patched = logits(model, ids)
        lorakern.merge_lora(model)
        assert is_conv1d(model.transformer.h[0].attn.c_attn)
        assert torch.allclose(logits(model, ids), patched, atol=1e-5, rtol=1e-5)
    model.save_pretrained(tmp_path)  # the merged checkpoint loads as a plain GPT-2
    reloaded = type(model).from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(logits(reloaded, ids), patched, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["llama", "phi3", "opt", "gpt2", "plain"])
@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_merge_lora_gives_plain_layers_with_the_same_outputs(family, quantize):
    model = FAMILIES[family][0]()
    names = lorakern.apply_lora(model, r=4, quantize=quantize)
    randomize_adapters(model)
    ids = example_input()
    with torch.no_grad():
        patched = logits(model, ids)
        merged = lorakern.merge_lora(model)
        assert merged is model and not lora_modules(model)
        plain_type = "Conv1D" if family == "gpt2" else "Linear"
        assert all(type(model.get_submodule(n)).__name__ == plain_type for n in names)
        torch.testing.assert_close(logits(model, ids), patched, atol=2e-5, rtol=2e-5)
    lorakern.apply_lora(model, r=2)  # a merged model can be patched again


def test_merge_lora_frees_each_layer_as_it_goes(monkeypatch):
    # The peak of a merge is the model plus one layer: every swapped-out layer (its dense weight)
    # is gone before the next merges. Before, all were held to the end (+229 MB against +85 MB
    # on a bf16 model with 196 MB of adapted layers).
    import gc
    import weakref

    model = FAMILIES["llama"][0]()
    lorakern.apply_lora(model, r=4)
    merged, alive = [], []
    original = LoRALinear.merged_linear

    def merged_linear(self, *args, **kwargs):
        gc.collect()
        alive.append(sum(ref() is not None for ref in merged))
        merged.append(weakref.ref(self))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(LoRALinear, "merged_linear", merged_linear)
    lorakern.merge_lora(model)
    assert len(alive) == 14 and alive == [0] * 14


def test_list_and_regex_targets_follow_peft_semantics():
    model = FAMILIES["llama"][0]()
    names = lorakern.apply_lora(copy.deepcopy(model), ["q_proj", "self_attn.v_proj"])
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    names = lorakern.apply_lora(copy.deepcopy(model), r"model\.layers\.1\..*_proj")
    assert names and all(n.startswith("model.layers.1.") for n in names) and len(names) == 7
    # a plain string is a full-match regex, as in PEFT: "q_proj" alone matches no qualified name
    with pytest.raises(ValueError, match="regex 'q_proj' matched no module"):
        lorakern.apply_lora(copy.deepcopy(model), "q_proj")
    names = lorakern.apply_lora(copy.deepcopy(model), "all-linear", exclude=["mlp.down_proj", "o_proj"])
    assert len(names) == 10 and not any(n.endswith(("down_proj", "o_proj")) for n in names)


@pytest.mark.parametrize("exclude, left_out", [(["model.layers.0"], "model.layers.0."), (["mlp"], ".mlp.")])
def test_exclude_naming_a_parent_module_leaves_out_every_layer_inside_it(exclude, left_out):
    model = FAMILIES["llama"][0]()
    everything = lorakern.apply_lora(copy.deepcopy(model), "all-linear")
    for targets in ("all-linear", ["q_proj", "down_proj"]):
        names = lorakern.apply_lora(copy.deepcopy(model), targets, exclude=exclude)
        assert names and not [n for n in names if left_out in n]
        if targets == "all-linear":
            assert names == [n for n in everything if left_out not in n]


def test_unmatched_targets_are_listed():
    model = FAMILIES["llama"][0]()
    with pytest.raises(ValueError, match=r"\['qproj', 'c_attn'\]"):
        lorakern.apply_lora(model, ["q_proj", "qproj", "c_attn"])
    assert not lora_modules(model), "a failed call must not leave the model half patched"


@pytest.mark.parametrize("target, kind", [(["embed_tokens"], "Embedding"), (["input_layernorm"], "RMSNorm"),
                                          (["self_attn"], "Attention")])
def test_explicit_unsupported_target_names_module_and_type(target, kind):
    model = FAMILIES["llama"][0]()
    with pytest.raises(TypeError, match=f"{target[0]}.*{kind}"):
        lorakern.apply_lora(model, target)


def test_second_apply_is_an_error():
    model = PlainMLP()
    lorakern.apply_lora(model, ["up"])
    with pytest.raises(RuntimeError, match="already has LoRA"):
        lorakern.apply_lora(model, ["down"])


def test_quantize_meta_model_is_a_clear_error():
    with torch.device("meta"):
        model = PlainMLP()
    with pytest.raises(ValueError, match="meta device"):
        lorakern.apply_lora(model, quantize="nf4")
    names = lorakern.apply_lora(model)  # dense LoRA on a meta model is fine (materialize later)
    assert names
    out = model(torch.zeros(2, 3, dtype=torch.long, device="meta"))  # shape inference runs on meta
    assert out.shape == (2, 3, 128) and out.device.type == "meta"


def _state(model):
    """Every module and parameter object of ``model`` with its requires_grad flag."""
    return [(n, m) for n, m in model.named_modules()], [(n, p, p.requires_grad) for n, p in model.named_parameters()]


def _same_state(a, b):
    return [(n, id(m)) for n, m in a[0]] == [(n, id(m)) for n, m in b[0]] and \
        [(n, id(p), g) for n, p, g in a[1]] == [(n, id(p), g) for n, p, g in b[1]]


@pytest.mark.parametrize("case", ["meta", "float64", "nan", "empty"])
def test_failed_apply_leaves_the_model_as_it_was(case):
    """All or nothing: a target that cannot be built leaves every module, parameter and requires_grad flag as it
    was, whether the check runs before any swap (meta, float64 with NF4) or the build fails after others were
    swapped (a NaN found while quantizing the last layer; a dense layer of zero in_features); apply_lora then works
    once the layer is fixed."""
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64), nn.Linear(64, 64))
    model[0].bias.requires_grad_(False)  # a flag apply_lora must give back as it found it
    quantize, exc, match = {"meta": ("nf4", ValueError, "cannot quantize '3'.*meta device"),
                            "float64": ("nf4", TypeError, "cannot quantize '3'.*float64"),
                            "nan": ("nf4", ValueError, "NaN"),
                            "empty": (None, ValueError, "in_features >= 1")}[case]
    broken = {"meta": lambda: nn.Linear(64, 64, device="meta"), "float64": lambda: nn.Linear(64, 64).double(),
              "nan": lambda: nn.Linear(64, 64), "empty": lambda: nn.Linear(0, 64)}[case]()
    if case == "nan":
        with torch.no_grad():
            broken.weight[5, 7] = float("nan")
    model[3] = broken
    before = _state(model)
    with pytest.raises(exc, match=match):
        lorakern.apply_lora(model, r=2, quantize=quantize)
    assert _same_state(_state(model), before) and not lora_modules(model)
    model[3] = nn.Linear(64, 64)
    assert lorakern.apply_lora(model, r=2, quantize=quantize) == ["0", "2", "3"]


def test_failed_in_place_quantization_says_to_reload_and_keeps_no_full_precision_copies(monkeypatch):
    """Quantizing where the weights lie frees each full-precision weight as its layer is built (the peak stays
    the model's size); a failure after that (out of memory) cannot undo them and says so."""
    import weakref

    from lorakern.nn import QLoRALinear

    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    freed = [weakref.ref(layer.weight) for layer in model]
    built = []
    from_linear = QLoRALinear.from_linear.__func__

    def fail_third(cls, linear, *args, **kwargs):
        if len(built) == 2:
            assert freed[0]() is None and freed[1]() is None  # already released, one by one
            raise RuntimeError("out of memory (simulated)")
        built.append(from_linear(cls, linear, *args, **kwargs))
        return built[-1]

    monkeypatch.setattr(QLoRALinear, "from_linear", classmethod(fail_third))
    with pytest.raises(RuntimeError, match=r"after quantizing 2 layer\(s\) in place.*reload it.*simulated"):
        lorakern.apply_lora(model, r=2, quantize="nf4")


def test_failed_apply_puts_expert_weights_back(monkeypatch):
    """A failure after fused expert weights were swapped gives them back, with the experts implementation."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import lorakern.patch.apply as apply_module

    config = AutoConfig.for_model("mixtral", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                  num_experts_per_tok=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    experts = model.model.layers[0].mlp.experts
    implementation = experts.config._experts_implementation
    assert implementation != "eager"  # apply_lora switches it, so putting it back is tested
    before = _state(model)
    switched = []

    def fail_second(module):
        if switched:
            raise RuntimeError("out of memory (simulated)")
        switched.append(eager_experts(module))
        return switched[-1]

    eager_experts = apply_module._eager_experts
    monkeypatch.setattr(apply_module, "_eager_experts", fail_second)
    with pytest.raises(RuntimeError, match="simulated"):
        lorakern.apply_lora(model, "all-linear", r=2, target_parameters="all-experts")
    assert switched and _same_state(_state(model), before) and not lora_modules(model)
    assert experts.config._experts_implementation == implementation


def test_bad_arguments():
    with pytest.raises(ValueError, match="quantize"):
        lorakern.apply_lora(PlainMLP(), quantize="int8")
    with pytest.raises(TypeError, match="target_modules"):
        lorakern.apply_lora(PlainMLP(), [])
    with pytest.raises(ValueError, match="compute_dtype"):
        lorakern.apply_lora(PlainMLP(), compute_dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="model"):
        lorakern.apply_lora("not a model")


def test_multihead_attention_out_proj():
    model = nn.Sequential(nn.Linear(16, 16))
    model.append(nn.MultiheadAttention(16, 2))
    assert lorakern.apply_lora(copy.deepcopy(model)) == ["0"]  # out_proj is read directly by MHA: not a target
    with pytest.raises(TypeError, match="MultiheadAttention"):
        lorakern.apply_lora(model, ["out_proj"])


def test_linear_subclasses_with_their_own_forward_are_refused_unless_known_plain():
    class Squared(nn.Linear):  # changes the function: an adapter beside it would be wrong
        def forward(self, x):
            return super().forward(x) ** 2

    class Init(nn.Linear):  # only a different initializer: nn.Linear's forward
        pass

    model = nn.Sequential(Squared(8, 8), Init(8, 8))
    for targets in ("all-linear", ["0"]):  # never skipped silently: it may be a quantized layer
        with pytest.raises(TypeError, match=r"'0' is a .*Squared, an nn.Linear subclass with its own forward"):
            lorakern.apply_lora(copy.deepcopy(model), targets)
    assert lorakern.apply_lora(model, exclude=["0"]) == ["1"]  # excluding it is the way past
    # Falcon's FalconLinear has its own forward computing x @ W^T + b: adapted like nn.Linear.
    falcon = FAMILIES["falcon"][0]()
    layer = falcon.transformer.h[0].self_attention.query_key_value
    assert type(layer).__name__ == "FalconLinear" and type(layer).forward is not nn.Linear.forward
    assert "transformer.h.0.self_attention.query_key_value" in lorakern.apply_lora(falcon, quantize="nf4")


def _tiny(model_type, auto="AutoModelForCausalLM", **kw):
    import transformers

    config = transformers.AutoConfig.for_model(model_type, vocab_size=128, pad_token_id=0, bos_token_id=1,
                                               eos_token_id=2, **kw)
    torch.manual_seed(0)
    return getattr(transformers, auto).from_config(config).eval()


def test_all_linear_skips_layers_an_adapter_cannot_serve_and_explicit_targets_say_why():
    # Mamba multiplies by dt_proj.weight directly; Llama 4's router is an nn.Linear
    # subclass returning routing scores. Neither is an "all-linear" target.
    mamba = _tiny("mamba", hidden_size=64, state_size=8, num_hidden_layers=2)
    names = lorakern.apply_lora(copy.deepcopy(mamba), quantize="nf4")
    assert names and not [n for n in names if n.endswith("dt_proj")]
    assert "backbone.layers.0.mixer.in_proj" in names and not [n for n in names if n.endswith(("x_proj", "out_proj"))]
    with pytest.raises(TypeError, match=r"'backbone.layers.0.mixer.dt_proj' is a projection of a "
                                        r"MambaMixer, which multiplies by its weight or passes it to a fused kernel"):
        lorakern.apply_lora(copy.deepcopy(mamba), ["dt_proj"])
    ids = torch.randint(3, 128, (2, 12))
    patched = copy.deepcopy(mamba)
    lorakern.apply_lora(patched, r=4)
    randomize_adapters(patched)
    assert not torch.equal(logits(patched, ids), logits(mamba, ids))  # the adapters are used
    torch.testing.assert_close(logits(lorakern.merge_lora(copy.deepcopy(patched)), ids), logits(patched, ids),
                               rtol=1e-5, atol=1e-5)

    llama4 = _tiny("llama4_text", hidden_size=64, intermediate_size=128, intermediate_size_mlp=128,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                   num_local_experts=2)
    names = lorakern.apply_lora(copy.deepcopy(llama4))
    assert "model.layers.0.self_attn.q_proj" in names and not [n for n in names if "router" in n]
    with pytest.raises(TypeError, match=r"Llama4Router, an nn.Linear subclass whose forward computes more than"):
        lorakern.apply_lora(llama4, ["router"])


def test_quantize_keeps_the_layers_hf_keeps_in_full_precision():
    # T5 lists its feed-forward output "wo" in _keep_in_fp32_modules: its code casts the
    # activations to wo.weight.dtype, which would be the packed uint8 of an NF4 layer.
    from lorakern.nn import LoRALinear, QLoRALinear

    t5 = _tiny("t5", auto="AutoModelForSeq2SeqLM", d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16,
               dropout_rate=0.0, decoder_start_token_id=0)
    ids, labels = torch.randint(3, 128, (2, 10)), torch.randint(3, 128, (2, 6))
    patched = copy.deepcopy(t5)
    names = lorakern.apply_lora(patched, quantize="nf4", r=4)
    kinds = {n: type(patched.get_submodule(n)) for n in names}
    assert {n for n, k in kinds.items() if k is LoRALinear} == {n for n in names if n.endswith(".wo")}
    assert sum(k is QLoRALinear for k in kinds.values()) == len(names) - 4  # one wo per block, 2 + 2 blocks
    randomize_adapters(patched)
    got = patched(input_ids=ids, labels=labels).loss
    merged = lorakern.merge_lora(copy.deepcopy(patched))  # dequantized weights + adapters, plain layers
    torch.testing.assert_close(got, merged(input_ids=ids, labels=labels).loss, rtol=1e-5, atol=1e-5)
    got.backward()
    assert all(m.lora_B.grad is not None for m in lora_modules(patched).values())


@pytest.mark.parametrize("patterns,want", [
    (["wo"], {"blocks.0.ff.wo", "blocks.1.ff.wo"}),                 # suffix at a boundary
    (["blocks.1"], {"blocks.1", "blocks.1.ff", "blocks.1.ff.wo", "blocks.1.ff.wi"}),  # prefix: the subtree
    (["blocks\\.\\d\\.ff\\.wi"], {"blocks.0.ff.wi", "blocks.1.ff.wi"}),      # regex from the start
    (["ff.wi.weight"], {"blocks.0.ff.wi", "blocks.1.ff.wi"}),         # a parameter name means its module
    (["o"], set()),                                                   # no match inside a name ("wo")
])
def test_kept_in_full_precision_follows_transformers_patterns(patterns, want):
    from lorakern.patch.targets import kept_in_full_precision

    class Model(nn.Module):
        _keep_in_fp32_modules = patterns

        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(nn.ModuleDict({"ff": nn.ModuleDict({"wi": nn.Linear(4, 4),
                                                                           "wo": nn.Linear(4, 4)})})
                                        for _ in range(2))

    assert kept_in_full_precision(Model()) == want
    outer = nn.ModuleDict({"inner": Model()})  # patterns are relative to the class declaring them
    assert kept_in_full_precision(outer) == {"inner." + n for n in want}


def test_quantize_device_builds_nf4_layers_there():
    model = FAMILIES["llama"][0]()
    with pytest.raises(ValueError, match="device applies to quantized layers only"):
        lorakern.apply_lora(copy.deepcopy(model), device="cpu")
    here, there = copy.deepcopy(model), copy.deepcopy(model)
    torch.manual_seed(0)
    lorakern.apply_lora(here, quantize="nf4", r=4)
    torch.manual_seed(0)
    lorakern.apply_lora(there, quantize="nf4", r=4, device="cpu")
    ids = example_input()
    assert torch.equal(logits(here, ids), logits(there, ids))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_quantize_device_stages_a_host_model_onto_the_gpu():
    # What `lorakern train --method qlora` does on a GPU: the model stays in host memory,
    # each NF4 layer is built on the GPU, then the rest moves.
    model = FAMILIES["llama"][0]()
    staged, moved = copy.deepcopy(model), copy.deepcopy(model).cuda()
    torch.manual_seed(0)
    names = lorakern.apply_lora(staged, quantize="nf4", r=4, device="cuda")
    for name in names:
        layer = staged.get_submodule(name)
        assert all(t.is_cuda for t in (*layer.parameters(), *layer.buffers()))
    assert staged.get_input_embeddings().weight.device.type == "cpu"
    staged.cuda()
    torch.manual_seed(0)
    lorakern.apply_lora(moved, quantize="nf4", r=4)
    randomize_adapters(staged)
    randomize_adapters(moved)
    ids = example_input().cuda()
    assert torch.equal(logits(staged, ids), logits(moved, ids))


def test_modules_to_save_stay_trainable():
    model = FAMILIES["bert"][0]()
    names = lorakern.apply_lora(model, ["query", "value"], modules_to_save=["classifier"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"classifier.weight", "classifier.bias"} <= trainable
    assert len(trainable) == 2 + 2 * len(names)
    # a target inside a kept module is dropped, as PEFT drops it
    model = FAMILIES["bert"][0]()
    names = lorakern.apply_lora(model, ["query", "classifier"], modules_to_save=["classifier"])
    assert "classifier" not in names and model.classifier.weight.requires_grad


def test_nf4_patching_frees_full_precision_weights():
    """Memory of the patched layers' tensors: about 4.13 bits per quantized weight plus the adapters."""
    model = PlainMLP(dim=256)
    r = 4
    shapes = {n: m.weight.shape for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "head"}
    names = lorakern.apply_lora(model, r=r, quantize="nf4", exclude=["head"])
    assert set(names) == set(shapes)
    weights = sum(s.numel() for s in shapes.values())
    adapters = sum(4 * r * (s[0] + s[1]) for s in shapes.values())
    held = 0
    for name in names:
        module = model.get_submodule(name)
        held += sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers())
                    if t is not module.bias)
    # per layer, whatever its size: the 256-entry float32 dynamic map and the float32 offset
    fixed = len(names) * (256 * 4 + 4)
    bits = 8 * (held - adapters - fixed) / weights
    # 4 (codes) + 8/64 (uint8 absmax per block) + 32/(64*256) (float32 scale per 256 blocks) = 4.127
    assert bits == pytest.approx(4 + 8 / 64 + 32 / (64 * 256), abs=1e-9), bits
    assert not any(p.dtype == torch.float32 and p.dim() == 2 and p.numel() >= 256 * 256
                   for n, p in model.named_parameters() if n != "head.weight" and "lora" not in n)


def test_eval_and_generate_do_not_change_training_gradients():
    """An eval forward / generate between steps leaves the next step's LoRA gradients unchanged.

    (bitsandbytes 0.50.2 repacks a 4-bit weight on the first eval forward on AVX-512-BF16 CPUs
    and its later training forwards lose the LoRA gradient; nothing here changes a layout.)
    """
    model = FAMILIES["llama"][0]()
    lorakern.apply_lora(model, r=4, quantize="nf4")
    randomize_adapters(model)
    ids = example_input()

    def lora_grads():
        model.train()
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    before = lora_grads()
    model.eval()
    with torch.no_grad():
        model(ids)
        model.generate(ids[:, :3], max_new_tokens=3, do_sample=False, pad_token_id=0)
    after = lora_grads()
    assert before.keys() == after.keys()
    for name in before:
        assert torch.equal(before[name], after[name]), name


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_hf_gradient_checkpointing_gives_the_same_grads(use_reentrant):
    model = FAMILIES["llama"][0]()
    lorakern.apply_lora(model, r=4, dropout=0.1)
    randomize_adapters(model)
    ids = example_input()

    def grads():
        model.zero_grad()
        torch.manual_seed(3)
        model(ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    model.train()
    plain = grads()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": use_reentrant})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    if use_reentrant:
        model.enable_input_require_grads()  # reentrant checkpointing needs an input that requires grad
    calls = []
    model.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *_: calls.append(1))
    ckpt = grads()
    assert len(calls) == 2, "checkpointing is not active: the layer was not recomputed in backward"
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], atol=1e-6, rtol=1e-5, msg=name)


def _old_stack() -> bool:
    import transformers

    return torch.__version__ < (2, 5) and int(transformers.__version__.split(".")[0]) < 5


@pytest.mark.slow  # about 30 s of inductor compilation on 2 CPU cores
@pytest.mark.skipif(_old_stack(), reason="transformers 4.x's Llama does not compile with fullgraph=True on torch 2.4 "
                                         "even without lorakern (dynamo fails in PretrainedConfig.get_text_config)")
def test_torch_compile_fullgraph_forward_backward():
    model = FAMILIES["llama"][0]()
    lorakern.apply_lora(model, r=4, dropout=0.1)
    randomize_adapters(model)
    model.train()
    ids = example_input()

    def step(m):
        torch.manual_seed(0)
        loss = m(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    eager_loss, eager_grads = step(model)
    model.zero_grad()
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)  # fullgraph: any graph break is an error
    # fallback_random: inductor draws the dropout seed with torch's eager generator, as eager did
    with torch._inductor.config.patch(fallback_random=True):
        loss, grads = step(compiled)
    torch.testing.assert_close(loss, eager_loss, atol=1e-5, rtol=1e-5)
    for name in eager_grads:
        torch.testing.assert_close(grads[name], eager_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_patched_model_state_dict_round_trip_and_deepcopy(quantize):
    """Full checkpoints of a patched model (what a trainer saves) load into a freshly patched one."""
    build = FAMILIES["llama"][0]
    model = build()
    lorakern.apply_lora(model, r=4, quantize=quantize)
    randomize_adapters(model)
    ids = example_input()
    with torch.no_grad():
        expected = logits(model, ids)
    fresh = build(seed=5)
    lorakern.apply_lora(fresh, r=4, quantize=quantize)
    fresh.load_state_dict(model.state_dict(), strict=True)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        assert torch.equal(logits(fresh, ids), expected)
        assert torch.equal(logits(twin, ids), expected)
    if quantize:
        assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in model.state_dict()


@pytest.mark.parametrize("quantize", [None, "nf4"])
def test_disable_adapters_gives_the_base_model_and_restores_them(quantize):
    """Inside disable_adapters every LoRA layer computes its base alone (no RNG drawn, zero adapter gradients);
    on exit the adapted outputs come back; nesting restores the state it found."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("mixtral", vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                  num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                  num_experts_per_tok=2)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    model = copy.deepcopy(base)
    lorakern.apply_lora(model, "all-linear", r=4, dropout=0.2, quantize=quantize, target_parameters="all-experts")
    randomize_adapters(model)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for m in lorakern.lora_modules(zeroed).values():
            m.lora_B.zero_()
        adapted, want = model(ids).logits, zeroed(ids).logits
    model.train()
    with lorakern.disable_adapters(model):
        with lorakern.disable_adapters(model):
            pass
        state = torch.random.get_rng_state()
        loss = model(ids, labels=ids).loss
        assert torch.equal(torch.random.get_rng_state(), state)  # no dropout mask drawn
        loss.backward()
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(ids).logits, want, atol=1e-6, rtol=1e-6)
            if quantize is None:
                torch.testing.assert_close(model(ids).logits, base(ids).logits, atol=1e-5, rtol=1e-5)
    for m in lorakern.lora_modules(model).values():
        assert m.lora_B.grad is None or not m.lora_B.grad.any()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, adapted, atol=0, rtol=0)
    with pytest.raises(ValueError, match="no LoRA layers"):
        with lorakern.disable_adapters(base):
            pass
    layer = LoRALinear.from_linear(nn.Linear(8, 8), r=2)
    layer.merge()
    holder = nn.Sequential(layer)
    with pytest.raises(RuntimeError, match="merged: its weight holds the adapter"), lorakern.disable_adapters(holder):
        holder(torch.randn(1, 8))
