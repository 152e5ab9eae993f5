"""lorakern against PEFT (and PEFT + bitsandbytes NF4) on every supported model family.

With identical adapter weights the two compute the same outputs, a few optimizer
steps move the loss identically, and adapters travel both ways through PEFT's
on-disk format. Comparisons run in train mode with model dropout off: the
bitsandbytes 4-bit layer takes a different (repacking) path in eval mode on
AVX-512-BF16 CPUs.
"""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import lorakern
from lorakern.patch import AdapterError, lora_modules

from helpers_models import FAMILIES, VOCAB, example_input, logits, loss_of, perturb_trainable, randomize_adapters

peft = pytest.importorskip("peft")

HF_FAMILIES = [f for f in FAMILIES if f != "plain"]
# float32 everywhere: same math, different summation order (PEFT runs base and adapter as separate GEMMs)
ATOL, RTOL = 2e-5, 2e-5


def _peft_model(base, names, r=4, alpha=8, **kw):
    config = peft.LoraConfig(r=r, lora_alpha=alpha, target_modules=list(names), lora_dropout=0.0, **kw)
    return peft.get_peft_model(base, config)


def _peft_layer(peft_model, name):
    return peft_model.base_model.model.get_submodule(name)


def _copy_adapters_to_peft(ours, peft_model):
    with torch.no_grad():
        for name, module in lora_modules(ours).items():
            layer = _peft_layer(peft_model, name)
            layer.lora_A["default"].weight.copy_(module.lora_A)
            layer.lora_B["default"].weight.copy_(module.lora_B)


def _bnb_from(qlora_module):
    """A bitsandbytes Linear4bit holding exactly the NF4 bytes of a QLoRALinear (loaded from its state dict)."""
    bnb = pytest.importorskip("bitsandbytes")
    sd = {k: v for k, v in qlora_module.state_dict().items() if not k.startswith("lora_")}
    n, k = qlora_module.out_features, qlora_module.in_features
    layer = bnb.nn.Linear4bit(k, n, bias="bias" in sd, compute_dtype=torch.float32, quant_type="nf4", device="cpu")
    stats = {key[len("weight."):]: v for key, v in sd.items() if key.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(sd["weight"], stats, device="cpu", module=layer)
    if "bias" in sd:
        layer.bias = nn.Parameter(sd["bias"].clone(), requires_grad=False)
    return layer


def _pair(family, quantize):
    """(lorakern model, PEFT model) with the same base and identical, nonzero adapters, in train mode."""
    base = FAMILIES[family][0]()
    ours = copy.deepcopy(base)
    names = lorakern.apply_lora(ours, r=4, alpha=8, quantize=quantize)
    randomize_adapters(ours)
    theirs = copy.deepcopy(base)
    if quantize == "nf4":
        for name in names:  # the PEFT side gets bitsandbytes layers with the very same NF4 bytes
            parent, _, leaf = name.rpartition(".")
            setattr(theirs.get_submodule(parent) if parent else theirs, leaf, _bnb_from(ours.get_submodule(name)))
    fan_in_fan_out = family == "gpt2" and quantize is None
    # a classification model: both train its head whole (apply_lora's default, PEFT's SEQ_CLS wrapper)
    task = {"task_type": "SEQ_CLS"} if family == "bert" else {}
    theirs = _peft_model(theirs, names, fan_in_fan_out=fan_in_fan_out, **task)
    _copy_adapters_to_peft(ours, theirs)
    return ours.train(), theirs.train(), names


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("family", HF_FAMILIES)
def test_outputs_and_training_match_peft(family, quantize):
    ours, theirs, names = _pair(family, quantize)
    ids = example_input()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=RTOL)

    params_ours = [p for p in ours.parameters() if p.requires_grad]
    params_theirs = [p for p in theirs.parameters() if p.requires_grad]
    head = 2 if family == "bert" else 0  # classifier.weight and .bias
    assert len(params_ours) == len(params_theirs) == 2 * len(names) + head
    opt_ours = torch.optim.AdamW(params_ours, lr=1e-2)
    opt_theirs = torch.optim.AdamW(params_theirs, lr=1e-2)
    losses = []
    batch = example_input(seed=10)
    for _ in range(3):
        pair = []
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad()
            loss = loss_of(model, batch, family)
            loss.backward()
            opt.step()
            pair.append(loss.item())
        losses.append(pair)
    for ours_loss, theirs_loss in losses:
        assert ours_loss == pytest.approx(theirs_loss, rel=1e-4, abs=1e-5), losses
    assert losses[-1][0] < losses[0][0], f"three steps did not reduce the loss: {losses}"
    for name in names:  # after training the adapters themselves agree
        layer = _peft_layer(theirs, name)
        torch.testing.assert_close(ours.get_submodule(name).lora_B, layer.lora_B["default"].weight,
                                   atol=1e-4, rtol=1e-3)


def test_bf16_model_matches_peft_within_bf16_rounding():
    base = FAMILIES["llama"][0]().to(torch.bfloat16)
    ours = copy.deepcopy(base)
    names = lorakern.apply_lora(ours, r=4, alpha=8)
    randomize_adapters(ours)
    theirs = _peft_model(copy.deepcopy(base), names)
    _copy_adapters_to_peft(ours, theirs)
    ids = example_input()
    with torch.no_grad():
        a, b = logits(ours, ids).float(), logits(theirs, ids).float()
    # both keep adapters in float32; PEFT adds the adapter term in float32, lorakern in bf16 (eps 2^-8)
    assert (a - b).abs().max() <= 0.03 * b.abs().max()


# ------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("family", ["llama", "gpt2", "phi3", "bert"])
def test_lorakern_to_peft_to_lorakern(family, tmp_path):
    build = FAMILIES[family][0]
    ours = build()
    lorakern.apply_lora(ours, r=4, alpha=8)
    randomize_adapters(ours)
    ids = example_input()
    with torch.no_grad():
        expected = logits(ours, ids)
    lorakern.save_adapter(ours, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["fan_in_fan_out"] == (family == "gpt2")
    keys = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.") for k in keys)

    theirs = peft.PeftModel.from_pretrained(build(), tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs, ids), expected, atol=ATOL, rtol=RTOL)
    theirs.save_pretrained(tmp_path / "theirs")

    again = build()
    lorakern.load_adapter(again, tmp_path / "theirs")
    with torch.no_grad():
        assert torch.equal(logits(again, ids), expected)


@pytest.mark.parametrize("options", [dict(), dict(use_rslora=True), dict(init_lora_weights="gaussian"),
                                     dict(modules_to_save=["lm_head"]), dict(layers_to_transform=[1]),
                                     dict(exclude_modules=["model.layers.0.mlp.down_proj"])])
def test_peft_adapter_loads_here(options, tmp_path):
    build = FAMILIES["llama"][0]
    theirs = _peft_model(build(), ["q_proj", "v_proj", "down_proj"], r=8, alpha=16, task_type="CAUSAL_LM", **options)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path)
    ids = example_input()
    with torch.no_grad():
        expected = logits(theirs.eval(), ids)
    ours = build()
    names = lorakern.load_adapter(ours, tmp_path)
    assert sorted(names) == sorted(n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A"))
    assert len(names) == {"layers_to_transform": 3, "exclude_modules": 5}.get(next(iter(options), None), 6)
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), expected, atol=ATOL, rtol=RTOL)
    if "modules_to_save" in options:
        assert ours.lm_head.weight.requires_grad
        lorakern.save_adapter(ours, tmp_path / "again")  # and the head travels on
        assert "base_model.model.lm_head.weight" in load_file(tmp_path / "again" / "adapter_model.safetensors")


def test_peft_adapter_on_an_nf4_base(tmp_path):
    build = FAMILIES["qwen2"][0]
    theirs = _peft_model(build(), ["q_proj", "o_proj", "up_proj"], r=4, alpha=8)
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path)
    dense = build()
    lorakern.load_adapter(dense, tmp_path)
    quantized = build()
    lorakern.load_adapter(quantized, tmp_path, quantize="nf4")
    ids = example_input()
    with torch.no_grad():
        a, b = logits(quantized, ids), logits(dense, ids)
    # NF4 rounding of the base: about 10% relative error per weight, averaged down in the logits
    assert (a - b).abs().max() <= 0.1 * b.abs().max()
    for name, module in lora_modules(quantized).items():
        assert torch.equal(module.lora_A, dense.get_submodule(name).lora_A)


def test_load_into_an_already_patched_model(tmp_path):
    build = FAMILIES["llama"][0]
    ours = build()
    lorakern.apply_lora(ours, ["q_proj", "v_proj"], r=4, alpha=8)
    randomize_adapters(ours)
    lorakern.save_adapter(ours, tmp_path)
    target = build()
    lorakern.apply_lora(target, ["q_proj", "v_proj"], r=4, alpha=8)
    lorakern.load_adapter(target, tmp_path)
    ids = example_input()
    with torch.no_grad():
        assert torch.equal(logits(target, ids), logits(ours, ids))
    other_rank = build()
    lorakern.apply_lora(other_rank, ["q_proj", "v_proj"], r=2, alpha=8)
    with pytest.raises(AdapterError, match="r=2"):
        lorakern.load_adapter(other_rank, tmp_path)
    fewer = build()
    lorakern.apply_lora(fewer, ["q_proj"], r=4, alpha=8)
    with pytest.raises(AdapterError, match="match no LoRA layer"):
        lorakern.load_adapter(fewer, tmp_path)


def _model_state(model):
    """Every module and parameter object of ``model`` with its requires_grad flag and value, and its patch record."""
    return ([(n, id(m)) for n, m in model.named_modules()],
            [(n, id(p), p.requires_grad, p.detach().clone()) for n, p in model.named_parameters()],
            hasattr(model, "_lorakern_lora"))


def _assert_unchanged(model, before):
    after = _model_state(model)
    assert after[0] == before[0] and after[2] == before[2]
    assert [a[:3] for a in after[1]] == [b[:3] for b in before[1]]
    assert all(torch.equal(a[3], b[3]) for a, b in zip(after[1], before[1]))


def _llama_adapter(directory, targets, r=2, **config_kwargs):
    """A PEFT adapter (nonzero B) for ``helpers_models.llama`` or another base given as ``base=``."""
    base = config_kwargs.pop("base", None) or FAMILIES["llama"][0]()
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=r, lora_alpha=8, target_modules=targets, **config_kwargs))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name or "lora_embedding_B" in name:
                p.normal_(std=0.2)
    theirs.save_pretrained(directory)
    return theirs.eval()


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("case", ["embedding", "shape", "rank", "partial_module_to_save"])
def test_refused_adapter_leaves_the_model_as_it_was(case, quantize, tmp_path):
    """Every key and shape is checked before the model is patched: a refused adapter leaves an unpatched model
    exactly as it was (not patched, not quantized, same requires_grad), so a right adapter loads after it."""
    import transformers

    bad, good = tmp_path / "bad", tmp_path / "good"
    if case == "embedding":  # PEFT's LoRA on nn.Embedding: lora_embedding_A / _B
        _llama_adapter(bad, ["embed_tokens", "q_proj"])
        match = "nn.Embedding is not supported"
    elif case == "shape":  # an adapter for a model with another intermediate size
        config = FAMILIES["llama"][0]().config
        config.intermediate_size = 256
        _llama_adapter(bad, ["up_proj", "q_proj"], base=transformers.LlamaForCausalLM(config))
        match = r"up_proj.lora_B.weight has shape \(256, 2\), the model expects \(128, 2\)"
    elif case == "rank":  # the config says r=8, the tensors have r=2
        _llama_adapter(bad, ["q_proj"])
        _edit_config(bad, r=8)
        match = r"q_proj.lora_A.weight has shape \(2, 64\), the model expects \(8, 64\)"
    else:  # a modules_to_save module with one of its weights missing from the file
        _llama_adapter(bad, ["q_proj"], modules_to_save=["mlp"])
        path = bad / "adapter_model.safetensors"
        tensors = load_file(path)
        del tensors["base_model.model.model.layers.1.mlp.down_proj.weight"]
        save_file(tensors, path)
        match = r"part of the modules_to_save module 'model.layers.1.mlp': .*down_proj.weight"
    theirs = _llama_adapter(good, ["v_proj"], r=8)
    model = FAMILIES["llama"][0]()
    before = _model_state(model)
    with pytest.raises(AdapterError, match=match):
        lorakern.load_adapter(model, bad, quantize=quantize)
    _assert_unchanged(model, before)
    lorakern.load_adapter(model, good)
    ids = example_input()
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), logits(theirs, ids), atol=ATOL, rtol=RTOL)


def test_a_failure_after_patching_puts_the_model_back(monkeypatch, tmp_path):
    """A load that fails after patching (here: the copy of the tensors) undoes the patch on a dense model; a
    model quantized in place cannot be put back, and the error says to reload it."""
    from lorakern.patch import adapter

    _llama_adapter(tmp_path, ["q_proj", "v_proj"])

    def fail(*args):
        raise RuntimeError("copy failed")

    monkeypatch.setattr(adapter, "_copy_in", fail)
    model = FAMILIES["llama"][0]()
    before = _model_state(model)
    with pytest.raises(RuntimeError, match="copy failed"):
        lorakern.load_adapter(model, tmp_path)
    _assert_unchanged(model, before)
    with pytest.raises(RuntimeError, match="cannot be put back as it was; reload it"):
        lorakern.load_adapter(FAMILIES["llama"][0](), tmp_path, quantize="nf4")


def test_save_through_compile_wrapper_uses_the_model_paths(tmp_path):
    model = FAMILIES["llama"][0]()
    lorakern.apply_lora(model, ["q_proj"], r=2)
    lorakern.save_adapter(torch.compile(model), tmp_path)  # wrapping compiles nothing until called
    keys = sorted(load_file(tmp_path / "adapter_model.safetensors"))
    assert keys[0] == "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" and len(keys) == 4


def test_apply_through_compile_wrapper_patches_the_model_inside(tmp_path):
    """apply_lora on a torch.compile wrapper records the wrapped model's names, so save / disable / merge work."""
    model = FAMILIES["llama"][0]()
    compiled = torch.compile(model)
    names = lorakern.apply_lora(compiled, ["q_proj"], r=2, modules_to_save=["lm_head"])
    assert names == [f"model.layers.{i}.self_attn.q_proj" for i in range(2)]
    lorakern.save_adapter(compiled, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["lm_head"] and config["target_modules"] == ["q_proj"]
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "adapter_model.safetensors")
    with lorakern.disable_adapters(compiled):
        assert all(not m.adapter_enabled for m in lora_modules(model).values())
    assert lorakern.merge_lora(compiled) is compiled and not lora_modules(model)


def _task_model(kind):
    """Tiny transformers task models (dropout off): "bert-seq-cls", "roberta-seq-cls", "bert-token-cls", "bert-qa"."""
    import transformers

    family, task = kind.split("-", 1)
    auto = {"seq-cls": transformers.AutoModelForSequenceClassification,
            "token-cls": transformers.AutoModelForTokenClassification,
            "qa": transformers.AutoModelForQuestionAnswering}[task]
    config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                                               num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64,
                                               hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                               num_labels=2 if task == "qa" else 3)  # qa: start and end logits
    torch.manual_seed(0)
    return auto.from_config(config).eval()


def _task_outputs(model, ids):
    out = model(input_ids=ids)
    return torch.cat([out.start_logits, out.end_logits]) if hasattr(out, "start_logits") else out.logits


@pytest.mark.parametrize("kind, head", [("roberta-seq-cls", "classifier"), ("bert-seq-cls", "classifier"),
                                        ("bert-token-cls", "classifier"), ("bert-qa", "qa_outputs")])
def test_all_linear_on_task_models_leaves_the_head_to_modules_to_save(kind, head, tmp_path):
    """PEFT's task wrappers train the head whole (modules_to_save) and skip LoRA targets inside it: "all-linear"
    leaves the head and its layers out (RoBERTa's classifier.dense / out_proj too), and the adapter loads in PEFT."""
    base = _task_model(kind)
    model = copy.deepcopy(base)
    names = lorakern.apply_lora(model, "all-linear", r=4, alpha=8)
    assert names and not [n for n in names if n == head or n.startswith(head + ".")]
    randomize_adapters(model)
    lorakern.save_adapter(model, tmp_path)  # with the head, which PEFT's task wrapper will read
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == [head] and config["task_type"] is not None
    _check_both_load(base, model, tmp_path)


@pytest.mark.parametrize("kind, head", [("bert-seq-cls", "classifier"), ("roberta-seq-cls", "classifier"),
                                        ("bert-qa", "qa_outputs")])
def test_task_head_trains_whole_by_default(kind, head, tmp_path):
    """As under PEFT's task wrappers, the task head that "all-linear" leaves out (new, randomly initialised)
    trains whole: it gets gradients, an optimizer step changes it, the adapter carries it to PEFT and back, and
    disable_adapters runs the head it started from."""
    base = _task_model(kind)
    model = copy.deepcopy(base)
    names = lorakern.apply_lora(model, "all-linear", r=4, alpha=8)
    head_params = dict(model.get_submodule(head).named_parameters())
    assert head_params and all(p.requires_grad for p in head_params.values())
    assert {n for n, p in model.named_parameters() if p.requires_grad} == \
        {f"{n}.lora_{ab}" for n in names for ab in "AB"} | {f"{head}.{n}" for n in head_params}
    before = {n: p.detach().clone() for n, p in head_params.items()}
    ids = example_input()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    _task_outputs(model, ids).pow(2).mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head_params.values())
    optimizer.step()
    model.eval()
    assert all(not torch.equal(p, before[n]) for n, p in head_params.items())
    with torch.no_grad(), lorakern.disable_adapters(model):
        assert torch.equal(_task_outputs(model, ids), _task_outputs(base, ids))
    lorakern.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] == [head] and config["task_type"] is not None
    _check_both_load(base, model, tmp_path)


def test_explicit_modules_to_save_replace_the_default_heads():
    model = _task_model("bert-seq-cls")
    lorakern.apply_lora(model, "all-linear", modules_to_save=["pooler"])
    assert model.bert.pooler.dense.weight.requires_grad and not model.classifier.weight.requires_grad
    model = _task_model("bert-seq-cls")
    lorakern.apply_lora(model, "all-linear", modules_to_save=[])
    assert not model.classifier.weight.requires_grad
    model = _task_model("bert-seq-cls")  # a target inside the head is dropped, as PEFT's SEQ_CLS wrapper drops it
    assert "classifier" not in lorakern.apply_lora(model, ["query", "classifier"])
    assert model.classifier.weight.requires_grad
    with pytest.raises(ValueError, match="every target .*classifier.* lies inside modules_to_save"):
        lorakern.apply_lora(_task_model("bert-seq-cls"), ["classifier"])


def _check_both_load(base, model, directory):
    """PEFT and load_adapter, each on a fresh copy of ``base``, give ``model``'s task outputs."""
    ids = example_input()
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), directory).eval()
    again = copy.deepcopy(base)
    lorakern.load_adapter(again, directory)
    with torch.no_grad():
        want = _task_outputs(model, ids)
        torch.testing.assert_close(_task_outputs(theirs, ids), want, atol=ATOL, rtol=RTOL)
        assert torch.equal(_task_outputs(again, ids), want)


def _distilbert():
    import transformers

    config = transformers.DistilBertConfig(vocab_size=VOCAB, dim=64, hidden_dim=128, n_layers=2, n_heads=4,
                                           num_labels=3, pad_token_id=0, dropout=0.0, attention_dropout=0.0,
                                           seq_classif_dropout=0.0)
    torch.manual_seed(0)
    return transformers.DistilBertForSequenceClassification(config).eval()


def _perturb(model, names, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in names:
            for p in model.get_submodule(name).parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_distilbert_classifier_head_includes_pre_classifier_both_ways(tmp_path):
    """PEFT matches modules_to_save entries by plain name suffix: its SEQ_CLS wrapper trains DistilBERT's
    pre_classifier whole along with classifier. A PEFT adapter with both loads here with PEFT's logits;
    "all-linear" here leaves pre_classifier out and trains and saves it whole, and PEFT loads that adapter."""
    base = _distilbert()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8,
                                                                       target_modules=["q_lin", "v_lin"]))
    perturb_trainable(theirs)
    theirs.eval().save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    lorakern.load_adapter(ours, tmp_path / "peft")
    ids = example_input()
    with torch.no_grad():
        assert not torch.allclose(base(ids).logits, theirs(ids).logits, atol=1e-3)
        torch.testing.assert_close(ours(ids).logits, theirs(ids).logits, atol=ATOL, rtol=RTOL)

    model = copy.deepcopy(base)
    names = lorakern.apply_lora(model, "all-linear", r=4, alpha=8)
    assert "pre_classifier" not in names and "classifier" not in names and "distilbert.transformer.layer.0.ffn.lin1" \
        in names
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"pre_classifier.weight", "pre_classifier.bias", "classifier.weight", "classifier.bias"} <= trainable
    randomize_adapters(model)
    _perturb(model, ["pre_classifier", "classifier"])
    lorakern.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["pre_classifier", "classifier"]
    _check_both_load(base, model, tmp_path / "ours")


@pytest.mark.parametrize("kind, targets, head_layer", [
    ("bert-seq-cls", ["query", "classifier"], "classifier"),
    ("roberta-seq-cls", ["query", "out_proj"], "classifier.out_proj"),
])
def test_lora_inside_a_task_head_is_saved_for_peft_generic_model(kind, targets, head_layer, tmp_path):
    """A LoRA target inside the classifier head with modules_to_save=[]: the adapter is written as PEFT writes one
    made without a task type (task_type null, no modules_to_save), which PEFT's PeftModel loads with the same
    logits."""
    base = _task_model(kind)
    model = copy.deepcopy(base)
    assert head_layer in lorakern.apply_lora(model, targets, r=4, alpha=8, modules_to_save=[])
    randomize_adapters(model)
    lorakern.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] is None and config["modules_to_save"] is None
    _check_both_load(base, model, tmp_path)
    # the same weights under a task wrapper's config: PEFT would drop the head's LoRA, so it is refused here
    _edit_config(tmp_path, task_type="SEQ_CLS", modules_to_save=["classifier", "score"])
    fresh = copy.deepcopy(base)
    with pytest.raises(AdapterError, match=f"LoRA weights for .*{head_layer}.*inside its modules_to_save"):
        lorakern.load_adapter(fresh, tmp_path)
    assert not lora_modules(fresh)


def _llama(tie):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        tie_word_embeddings=tie)).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_peft_adapter_on_lm_head_with_its_base_weight(tie, tmp_path):
    """PEFT saves an adapted lm_head's base weight too (base_layer.weight): the checkpoint's own weight changes
    nothing (dense or NF4); a different one replaces the dense head weight (and the tied embeddings) as in PEFT,
    and is refused on an NF4 head."""
    base = _llama(tie)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"], init_lora_weights=False)).eval()
    theirs.save_pretrained(tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    tensors = load_file(path)
    key = "base_model.model.lm_head.base_layer.weight"
    assert key in tensors
    ids = example_input()
    ours = copy.deepcopy(base)
    lorakern.load_adapter(ours, tmp_path)
    assert torch.equal(ours.lm_head.weight, base.lm_head.weight)
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=RTOL)
    lorakern.load_adapter(copy.deepcopy(base), tmp_path, quantize="nf4")  # quantizes to the very NF4 the head holds

    tensors[key] = tensors[key] + 0.01
    save_file(tensors, path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ours = copy.deepcopy(base)
    lorakern.load_adapter(ours, tmp_path)
    assert torch.equal(ours.lm_head.weight, tensors[key])
    assert torch.equal(ours.model.embed_tokens.weight, tensors[key] if tie else base.model.embed_tokens.weight)
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=RTOL)
    refused = copy.deepcopy(base)
    before = _model_state(refused)
    with pytest.raises(AdapterError, match="lm_head.base_layer.weight is a base weight that differs.*NF4"):
        lorakern.load_adapter(refused, tmp_path, quantize="nf4")
    _assert_unchanged(refused, before)  # refused before any layer was quantized (in place: no way back)


@pytest.mark.parametrize("tie", [False, True])
def test_disable_adapters_runs_the_base_modules_to_save_as_peft_does(tie, tmp_path):
    """A trained modules_to_save head (tied to the input embeddings or not): inside disable_adapters the model
    gives the base model's logits, as PEFT's disable_adapter does; on exit the trained parameters are back."""
    base = _llama(tie)
    model = copy.deepcopy(base)
    lorakern.apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, modules_to_save=["lm_head"])
    randomize_adapters(model)
    trained = model.lm_head.weight
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    ids = example_input()
    model(ids, labels=ids).loss.backward()
    optimizer.step()  # the head (and, tied, the embeddings) move away from the base
    with torch.no_grad():
        want_base, want_trained = logits(base, ids), logits(model, ids)
        assert not torch.allclose(want_trained, want_base, atol=1e-2)
        with lorakern.disable_adapters(model):
            torch.testing.assert_close(logits(model, ids), want_base, atol=1e-5, rtol=1e-5)
            assert not model.lm_head.weight.requires_grad
        assert model.lm_head.weight is trained and trained.requires_grad
        assert (model.model.embed_tokens.weight is trained) == tie
        assert torch.equal(logits(model, ids), want_trained)
    lorakern.save_adapter(model, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad(), theirs.disable_adapter():
        torch.testing.assert_close(logits(theirs, ids), want_base, atol=1e-5, rtol=1e-5)


def test_pissa_adapter_is_refused_and_its_peft_conversion_loads(tmp_path):
    """PiSSA rewrites the base weights when the adapter is made: its adapter only fits that base and is refused;
    PEFT's conversion (path_initial_model_for_weight_conversion) gives a plain one that loads with its logits."""
    base = FAMILIES["llama"][0]()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")).eval()
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe: the initial adapter as a plain LoRA one
    theirs.save_pretrained(tmp_path / "initial")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    g = torch.Generator().manual_seed(3)
    ids = example_input()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_" in name:  # "training"
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        want = logits(theirs, ids)
    theirs.save_pretrained(tmp_path / "trained")
    model = copy.deepcopy(base)
    with pytest.raises(AdapterError, match="PiSSA initialisation.*path_initial_model_for_weight_conversion"):
        lorakern.load_adapter(model, tmp_path / "trained")
    assert not lora_modules(model)
    theirs.save_pretrained(tmp_path / "converted", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    lorakern.load_adapter(model, tmp_path / "converted")
    with torch.no_grad():
        torch.testing.assert_close(logits(model, ids), want, atol=ATOL, rtol=RTOL)


def test_save_uses_leaf_names_only_when_they_are_exact(tmp_path):
    model = FAMILIES["bert"][0]()
    lorakern.apply_lora(model, ["attention.output.dense"], r=2)  # leaf "dense" would also hit other layers
    lorakern.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["target_modules"] == [f"bert.encoder.layer.{i}.attention.output.dense" for i in range(2)]
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    lorakern.save_adapter(model, tmp_path, adapter_name="second")
    assert os.path.isfile(tmp_path / "second" / "adapter_config.json")


# ------------------------------------------------------------------------------ errors


@pytest.fixture
def saved(tmp_path):
    model = FAMILIES["llama"][0]()
    lorakern.apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
    lorakern.save_adapter(model, tmp_path)
    return tmp_path


def _edit_config(directory, **changes):
    path = directory / "adapter_config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


@pytest.mark.parametrize("changes, match", [
    (dict(use_dora=True), "use_dora"),
    (dict(rank_pattern={"q_proj": 0}), r"rank_pattern\['q_proj'\] must be a positive integer"),
    (dict(alpha_pattern={"q_(": 2}), "alpha_pattern key 'q_\\(' is not a valid regular expression"),
    (dict(rank_pattern=[8]), "rank_pattern must map regular expressions to numbers"),
    (dict(use_qalora=True), "use_qalora"),
    (dict(peft_type="IA3"), "peft_type"),
    (dict(bias="all"), "bias"),
    (dict(r=0), "r must be"),
    (dict(init_lora_weights="pissa_niter_4"), "PiSSA initialisation"),
    (dict(init_lora_weights="olora"), "OLoRA initialisation"),
    (dict(init_lora_weights="corda"), "CorDA initialisation"),
    (dict(init_lora_weights="lora_ga"), "LoRA-GA initialisation"),
    (dict(init_lora_weights="loftq"), "LoftQ replaced the base weights"),
    (dict(init_lora_weights="fancy"), "'fancy' is not an initialisation this library knows"),
    (dict(lora_dropout=None), r"lora_dropout must be a number in \[0, 1\), got None"),
    (dict(lora_dropout="0.1"), "lora_dropout must be a number"),
    (dict(use_rslora="false"), "use_rslora must be true or false"),
    (dict(modules_to_save="lm_head"), "modules_to_save must be a list"),
])
def test_unsupported_configs_are_refused(saved, changes, match):
    _edit_config(saved, **changes)
    model = FAMILIES["llama"][0]()
    with pytest.raises(AdapterError, match=match):
        lorakern.load_adapter(model, saved)
    assert not lora_modules(model)


@pytest.mark.parametrize("init", [False, "gaussian", "orthogonal", "eva", "mica"])
def test_inits_that_leave_the_base_alone_load(saved, init):
    _edit_config(saved, init_lora_weights=init)
    assert len(lorakern.load_adapter(FAMILIES["llama"][0](), saved)) == 4


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage"])
def test_corrupt_weights_file_is_named(saved, damage):
    path = saved / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:len(data) // 2], "empty": b"", "garbage": b"\xff" * 100}[damage])
    with pytest.raises(AdapterError, match="adapter_model.safetensors is not a readable safetensors file"):
        lorakern.load_adapter(FAMILIES["llama"][0](), saved)


def test_missing_files(saved, tmp_path_factory):
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        lorakern.load_adapter(FAMILIES["llama"][0](), empty)
    os.rename(saved / "adapter_model.safetensors", saved / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="pickle"):
        lorakern.load_adapter(FAMILIES["llama"][0](), saved)


def test_bad_weights(saved):
    path = saved / "adapter_model.safetensors"
    good = load_file(path)
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"

    def load_with(tensors):
        save_file(tensors, path)
        lorakern.load_adapter(FAMILIES["llama"][0](), saved)

    with pytest.raises(AdapterError, match="shape"):
        load_with({**good, key: torch.zeros(3, 64)})
    with pytest.raises(AdapterError, match="no weights for"):
        load_with({k: v for k, v in good.items() if k != key})
    with pytest.raises(AdapterError, match="no weights for"):
        load_with({**good, "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)})
    with pytest.raises(AdapterError, match="match no LoRA layer"):
        load_with({**good, "base_model.model.model.layers.0.mlp.up_proj.weight": torch.zeros(4, 64)})
    with pytest.raises(AdapterError, match="does not have"):
        load_with({**good, "base_model.model.model.layers.7.mlp.up_proj.lora_A.weight": torch.zeros(4, 64)})


def test_save_errors(tmp_path):
    with pytest.raises(ValueError, match="no LoRA layers"):
        lorakern.save_adapter(FAMILIES["plain"][0](), tmp_path)


def test_save_tied_modules_to_save(tmp_path):
    model = FAMILIES["plain"][0]()
    model.head.weight = model.embed.weight  # tied input/output embeddings, both kept trainable
    lorakern.apply_lora(model, ["up"], r=2, modules_to_save=["embed", "head"])
    randomize_adapters(model)
    with torch.no_grad():
        model.embed.weight.add_(1.0)  # "trained" kept modules: loading must bring them over
    lorakern.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.head.weight"], saved["base_model.model.embed.weight"])
    assert not any(name.endswith(".tmp") for name in os.listdir(tmp_path))
    fresh = FAMILIES["plain"][0]()
    fresh.head.weight = fresh.embed.weight
    lorakern.load_adapter(fresh, tmp_path)
    ids = example_input()
    with torch.no_grad():
        assert torch.equal(logits(fresh, ids), logits(model, ids))


def test_per_layer_ranks_and_alphas_travel_both_ways(tmp_path):
    """rank_pattern / alpha_pattern (PEFT's per-layer r and alpha): applied here, saved, loaded by PEFT and back."""
    model = FAMILIES["llama"][0]()
    base = copy.deepcopy(model)
    lorakern.apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8, rank_pattern={r"layers\.0\.self_attn\.q_proj": 2},
                        alpha_pattern={"v_proj": 3})
    modules = lora_modules(model)
    assert modules["model.layers.0.self_attn.q_proj"].r == 2 and modules["model.layers.1.self_attn.q_proj"].r == 4
    assert all(m.alpha == (3 if n.endswith("v_proj") else 8) for n, m in modules.items())
    randomize_adapters(model)
    lorakern.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["rank_pattern"] == {r"model\.layers\.0\.self_attn\.q_proj": 2}
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    ids = torch.randint(0, 100, (2, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(ids).logits
        torch.testing.assert_close(theirs(ids).logits, want, atol=2e-5, rtol=2e-5)
        again = copy.deepcopy(base)
        lorakern.load_adapter(again, tmp_path)
        torch.testing.assert_close(again.eval()(ids).logits, want, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"rank_pattern\['q_proj'\]: r \(the LoRA rank\) must be a positive int"):
        lorakern.apply_lora(copy.deepcopy(base), ["q_proj"], rank_pattern={"q_proj": 0})


@pytest.mark.parametrize("modules_to_save", [None, ["classifier"]])
def test_roberta_dense_target_trains_the_classifier_whole_as_peft_seq_cls(modules_to_save, tmp_path):
    """target_modules=["query", "value", "dense"] on RoBERTa also matches classifier.dense: PEFT's SEQ_CLS wrapper
    (and PEFT with modules_to_save=["classifier"]) trains the whole classifier and puts no LoRA inside it; so does
    apply_lora, by default and with the head named. Same trainable set, same logits, and the adapter goes both ways."""
    base = _task_model("roberta-seq-cls")
    targets = ["query", "value", "dense"]
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                                       task_type="SEQ_CLS"))
    model = copy.deepcopy(base)
    names = lorakern.apply_lora(model, targets, r=4, alpha=8, modules_to_save=modules_to_save)
    assert not [n for n in names if n.startswith("classifier")]
    peft_trainable = {n.replace("base_model.model.", "").replace(".default", "").replace("modules_to_save.", "")
                      .replace("lora_A.weight", "lora_A").replace("lora_B.weight", "lora_B")
                      for n, p in theirs.named_parameters() if p.requires_grad}
    assert {n for n, p in model.named_parameters() if p.requires_grad} == peft_trainable
    assert {"classifier.dense.weight", "classifier.out_proj.weight"} <= peft_trainable
    randomize_adapters(model)
    _perturb(model, ["classifier"])
    lorakern.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == ["classifier"]
    _check_both_load(base, model, tmp_path)


def test_a_tied_head_in_modules_to_save_reloads_into_a_patched_model(tmp_path):
    """save_adapter stores the tied partner (the input embeddings) of a kept head; a model patched the same way, and
    the model that saved it, take that adapter back."""
    model = _llama(True)
    lorakern.apply_lora(model, ["q_proj"], r=4, alpha=8, modules_to_save=["lm_head"])
    randomize_adapters(model)
    _perturb(model, ["lm_head"])
    ids = example_input()
    with torch.no_grad():
        want = logits(model, ids)
    lorakern.save_adapter(model, tmp_path)
    for target in (model, _llama(True)):
        if target is not model:
            lorakern.apply_lora(target, ["q_proj"], r=4, alpha=8, modules_to_save=["lm_head"])
        lorakern.load_adapter(target, tmp_path)
        with torch.no_grad():
            assert torch.equal(logits(target, ids), want)


def test_modules_to_save_empty_stores_no_task_head_and_reloads(tmp_path):
    """modules_to_save=[] trains no head: the adapter does not list or store the classifier (PEFT's generic model
    keeps the base head), and the patched model takes its own adapter back."""
    base = _task_model("bert-seq-cls")
    model = copy.deepcopy(base)
    lorakern.apply_lora(model, ["query", "value"], r=4, alpha=8, modules_to_save=[])
    randomize_adapters(model)
    lorakern.save_adapter(model, tmp_path)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["modules_to_save"] is None and config["task_type"] is None
    assert not [k for k in load_file(tmp_path / "adapter_model.safetensors") if "classifier" in k]
    lorakern.load_adapter(model, tmp_path)
    _check_both_load(base, model, tmp_path)


def test_tied_lm_head_lora_with_the_embeddings_kept_saves_its_base_weight(tmp_path):
    """GPT-2: LoRA on the lm_head tied to wte, wte in modules_to_save: training changes the head's base weight too;
    the adapter holds it as PEFT does (lm_head.base_layer.weight), and PEFT and load_adapter give the same logits."""
    import transformers

    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).eval()
    model = copy.deepcopy(base)
    lorakern.apply_lora(model, ["c_attn", "lm_head"], r=4, alpha=8, modules_to_save=["wte"])
    randomize_adapters(model)
    _perturb(model, ["transformer.wte"])  # the tied lm_head's weight moves with it
    ids = example_input()
    with torch.no_grad():
        want = logits(model, ids)
        assert not torch.allclose(want, logits(base, ids), atol=1e-3)
    lorakern.save_adapter(model, tmp_path)
    saved = load_file(tmp_path / "adapter_model.safetensors")
    assert torch.equal(saved["base_model.model.lm_head.base_layer.weight"],
                       saved["base_model.model.transformer.wte.weight"])
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    again = copy.deepcopy(base)
    lorakern.load_adapter(again, tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(logits(theirs, ids), want, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(logits(again, ids), want, atol=0, rtol=0)
    # and PEFT's adapter made the same way loads here
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["c_attn", "lm_head"], modules_to_save=["wte"], fan_in_fan_out=True))
    perturb_trainable(theirs, seed=5)
    theirs.eval().save_pretrained(tmp_path / "peft")
    ours = copy.deepcopy(base)
    lorakern.load_adapter(ours, tmp_path / "peft")
    with torch.no_grad():
        assert not torch.allclose(logits(theirs, ids), logits(base, ids), atol=1e-3)
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=RTOL)


def test_peft_adapter_saved_with_ensure_weight_tying_loads(tmp_path):
    """PEFT's ensure_weight_tying=True keeps a trained lm_head tied to the embeddings and stores both (config:
    modules_to_save=["model.embed_tokens"]); load_adapter takes the tied head's tensors too."""
    base = _llama(True)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj"], modules_to_save=["lm_head"], ensure_weight_tying=True))
    perturb_trainable(theirs)
    theirs.eval().save_pretrained(tmp_path)
    assert "base_model.model.lm_head.weight" in load_file(tmp_path / "adapter_model.safetensors")
    ours = copy.deepcopy(base)
    lorakern.load_adapter(ours, tmp_path)
    ids = example_input()
    with torch.no_grad():
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=RTOL)


def test_modules_to_save_listed_but_absent_from_the_weights_is_refused(tmp_path):
    base = _task_model("bert-seq-cls")
    model = copy.deepcopy(base)
    lorakern.apply_lora(model, ["query", "value"], r=4, alpha=8)
    lorakern.save_adapter(model, tmp_path)
    path = tmp_path / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if "classifier" not in k}, path)
    fresh = copy.deepcopy(base)
    with pytest.raises(AdapterError, match="lists 'classifier' in modules_to_save.*none of its tensors"):
        lorakern.load_adapter(fresh, tmp_path)
    assert not lora_modules(fresh)


@pytest.mark.parametrize("how", ["get_peft_model", "inject_adapter_in_model"])
def test_apply_lora_refuses_a_model_that_has_peft_adapters(how):
    """LoRA on PEFT's own lora_A.default / base_layer layers would be LoRA on LoRA, saved under keys no loader
    reads: refused up front, with the ways out, and the model left as it was."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"])
    model = getattr(peft, how)(config, FAMILIES["llama"][0]()) if how == "inject_adapter_in_model" else \
        peft.get_peft_model(FAMILIES["llama"][0](), config)
    for targets in ("all-linear", ["v_proj"]):
        with pytest.raises(RuntimeError, match="already has PEFT adapters.*merge_and_unload.*load_adapter"):
            lorakern.apply_lora(model, targets, r=4)
        assert not lora_modules(model)


def test_peft_adapter_with_saved_embedding_layers_loads_into_the_base_embeddings(tmp_path):
    """PEFT's save_embedding_layers=True (its default after a vocabulary resize) writes the whole input and output
    embeddings; load_adapter copies them into the base model as PEFT does, and names the resize a model of the
    old vocabulary needs."""
    base = FAMILIES["llama"][0]()
    base.resize_token_embeddings(VOCAB + 8)
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad or "embed_tokens" in name or "lm_head" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)  # the new token rows trained
    theirs.eval().save_pretrained(tmp_path, save_embedding_layers=True)
    assert {"base_model.model.model.embed_tokens.weight", "base_model.model.lm_head.weight"} <= \
        set(load_file(tmp_path / "adapter_model.safetensors"))
    ours = copy.deepcopy(base)
    lorakern.load_adapter(ours, tmp_path)
    ids = example_input()
    with torch.no_grad():
        assert not torch.allclose(logits(base, ids), logits(theirs, ids), atol=1e-3)
        torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), atol=ATOL, rtol=RTOL)
    old_vocab = FAMILIES["llama"][0]()
    with pytest.raises(AdapterError, match=r"embed_tokens.*save_embedding_layers.*resize_token_embeddings"):
        lorakern.load_adapter(old_vocab, tmp_path)
    assert not lora_modules(old_vocab)
