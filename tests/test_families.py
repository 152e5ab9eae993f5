"""The whole adapter lifecycle on Hugging Face model families beyond helpers_models.FAMILIES.

For each family, dense and NF4: apply_lora("all-linear") -> one training step
(every adapter gets a gradient) -> save_adapter -> PEFT loads it on a fresh
dense base and computes the same logits -> load_adapter into a fresh model
gives the same logits -> merge_lora / merged_copy / merge_and_save give plain
layers with the same logits, and the merged model survives save_pretrained +
from_pretrained (safetensors). Also: "all-linear" picks PEFT's layers, PEFT's
all-linear adapters load here, and a trained tied head (modules_to_save) travels
both ways.

Every model is a tiny random one built from its config (hidden 64, 2 layers,
vocab 128, dropout off), once per module and deep-copied by each test.
"""

import copy
import json
import os

import pytest
import torch
from torch import nn

import lorakern
from lorakern.nn import LoRALinear, QLoRALinear
from lorakern.patch import lora_modules
from lorakern.patch.targets import kept_in_full_precision
from lorakern.train.export import merge_and_save, merged_copy, save_trained

from helpers_models import perturb_trainable, randomize_adapters

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

VOCAB = 128
COMMON = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2)
GPT_STYLE = dict(n_embd=64, n_layer=2, n_head=4)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

# family (transformers model_type) -> config keywords on top of COMMON
CONFIGS = {
    "qwen3": {},
    "gemma2": dict(head_dim=16),
    "gemma3_text": dict(head_dim=16),
    "phi": dict(num_key_value_heads=4),
    "stablelm": {},
    "olmo2": {},
    # multipliers away from 1: they live in the config, which the merged model's save_pretrained must carry
    "granite": dict(logits_scaling=4.0, residual_multiplier=0.5, embedding_multiplier=2.0, attention_multiplier=0.1),
    "cohere": dict(logit_scale=0.25),
    "starcoder2": {},
    "mixtral": dict(num_local_experts=4, num_experts_per_tok=2),
    "qwen2_moe": dict(MOE, shared_expert_intermediate_size=64),
    "qwen3_moe": MOE,
    "bloom": dict(n_head=4, n_layer=2),
    "gptj": dict(GPT_STYLE, rotary_dim=8),
    "codegen": dict(GPT_STYLE, rotary_dim=8),
    "gpt_bigcode": GPT_STYLE,
    "mpt": dict(d_model=64, n_heads=4, n_layers=2),
    "smollm3": {},
    "mamba": dict(state_size=8),
    "falcon_h1": dict(head_dim=16, mamba_d_ssm=128, mamba_n_heads=8, mamba_d_head=16, mamba_d_state=8,
                      mamba_chunk_size=16),
    "t5": dict(d_model=64, d_ff=128, num_layers=2, num_heads=4, d_kv=16, decoder_start_token_id=0),
}
SEQ2SEQ = {"t5"}

# In training mode with mamba_ssm installed, MambaMixer.forward passes x_proj.weight and out_proj.weight
# to one fused kernel (mamba_inner_fn) and FalconH1Mixer passes out_proj.weight (outproj_weight=...)
# instead of calling the layers, so an adapter there would be ignored; PEFT refuses out_proj on these
# model types, and "all-linear" leaves them out (lorakern.patch.targets.WEIGHTS_READ_BY_MIXER).
EXCLUDE = {"mamba": ["x_proj", "out_proj"], "falcon_h1": ["out_proj"]}

# float32 everywhere; PEFT adds the adapter as a separate GEMM (another summation order)
ATOL, RTOL = 2e-5, 2e-5


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny GEMMs (14 x 64 x 128) gain nothing from threads and, with the cores shared, two OpenMP
    threads spin-waiting made each forward ~100x slower (250 ms instead of 2 ms) in a measurement here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _auto_class(family):
    return transformers.AutoModelForSeq2SeqLM if family in SEQ2SEQ else transformers.AutoModelForCausalLM


def _config(family):
    config = transformers.AutoConfig.for_model(family, **{**COMMON, **CONFIGS[family]})
    for key, value in config.to_dict().items():  # every dropout off: train and eval mode compute the same
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):
            setattr(config, key, 0.0)
    return config


_BASES = {}


def _base(family):
    """A fresh copy of the family's tiny random model (built once per module, in eval mode)."""
    if family not in _BASES:
        torch.manual_seed(0)
        _BASES[family] = _auto_class(family).from_config(_config(family)).eval()
    return copy.deepcopy(_BASES[family])


_IDS = torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(1))
_DECODER_IDS = torch.randint(3, VOCAB, (2, 5), generator=torch.Generator().manual_seed(2))


def _logits(model, family):
    extra = dict(decoder_input_ids=_DECODER_IDS) if family in SEQ2SEQ else {}
    with torch.no_grad():
        return model(_IDS, **extra).logits


def _loss(model, family):
    labels = _DECODER_IDS if family in SEQ2SEQ else _IDS
    return model(_IDS, labels=labels).loss


def _patched(family, quantize):
    """The family's model with all-linear adapters, nonzero B, after one SGD step; returns (model, names)."""
    model = _base(family)
    names = lorakern.apply_lora(model, "all-linear", r=4, alpha=8, quantize=quantize)
    randomize_adapters(model)
    model.train()
    _loss(model, family).backward()
    adapters = [p for m in lora_modules(model).values() for p in (m.lora_A, m.lora_B)]
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert len(trainable) == len(adapters) == 2 * len(names)
    assert {id(p) for p in trainable} == {id(p) for p in adapters}
    for name, module in lora_modules(model).items():
        for which in ("lora_A", "lora_B"):
            grad = getattr(module, which).grad
            assert grad is not None, f"{name}.{which} got no gradient"
            assert torch.isfinite(grad).all() and grad.abs().sum() > 0, f"{name}.{which}: gradient {grad}"
    with torch.no_grad():
        for p in adapters:
            p -= 0.1 * p.grad
            p.grad = None
    return model.eval(), names


def _assert_merged(model, family, names):
    """Plain layers where the adapters were, the base model's exact state-dict layout, untouched elsewhere."""
    assert not lora_modules(model) and not hasattr(model, "_lorakern_lora")
    for name in names:
        assert type(model.get_submodule(name)) is nn.Linear, (name, type(model.get_submodule(name)))
    merged, base = model.state_dict(), _base(family).state_dict()
    assert sorted(merged) == sorted(base)
    for key, value in base.items():
        assert merged[key].shape == value.shape and merged[key].dtype == value.dtype, key
        if key.rpartition(".")[0] not in names:
            assert torch.equal(merged[key], value), f"{key} changed by merging"


@pytest.mark.parametrize("quantize", [None, "nf4"])
@pytest.mark.parametrize("family", list(CONFIGS))
def test_adapter_lifecycle(family, quantize, tmp_path):
    model, names = _patched(family, quantize)
    head = model.get_output_embeddings()
    assert names and all(model.get_submodule(n) is not head for n in names)
    if quantize == "nf4":  # layers the model class keeps in full precision (T5's wo) stay dense
        dense = kept_in_full_precision(model)
        for name, module in lora_modules(model).items():
            assert isinstance(module, LoRALinear if name in dense else QLoRALinear), (name, type(module))
        if family == "t5":
            assert {n for n in names if n in dense} == {n for n in names if n.endswith(".wo")} != set()
    expected = _logits(model, family)

    # 1. save in PEFT's format; PEFT reproduces the logits on a fresh dense base
    adapter = tmp_path / "adapter"
    lorakern.save_adapter(model, adapter)
    theirs = peft.PeftModel.from_pretrained(_base(family), adapter).eval()
    assert sorted(n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")) == sorted(names)
    if quantize is None:
        torch.testing.assert_close(_logits(theirs, family), expected, atol=ATOL, rtol=RTOL)
    else:
        _check_nf4_against_peft(model, family, adapter, expected, _logits(theirs, family))

    # 2. load_adapter into a fresh model: the very same logits
    fresh = _base(family)
    assert sorted(lorakern.load_adapter(fresh, adapter, quantize=quantize)) == sorted(names)
    assert {n: type(m) for n, m in lora_modules(fresh).items()} == {n: type(m) for n, m in lora_modules(model).items()}
    assert torch.equal(_logits(fresh, family), expected)

    # 3. save_trained writes the same adapter
    save_trained(model, None, tmp_path / "trained")
    again = _base(family)
    lorakern.load_adapter(again, tmp_path / "trained", quantize=quantize)
    assert torch.equal(_logits(again, family), expected)

    # 4. merged: plain layers, same logits, through save_pretrained / from_pretrained
    copied = merged_copy(model)
    assert lora_modules(model), "merged_copy changed the model it copied"
    _assert_merged(copied, family, names)
    torch.testing.assert_close(_logits(copied, family), expected, atol=ATOL, rtol=RTOL)

    merge_and_save(fresh, None, tmp_path / "merged")
    _assert_merged(fresh, family, names)
    assert torch.equal(_logits(fresh, family), _logits(copied, family))
    files = os.listdir(tmp_path / "merged")
    assert "model.safetensors" in files and not any(f.endswith(".bin") for f in files), files
    reloaded = _auto_class(family).from_pretrained(tmp_path / "merged").eval()
    _assert_same_state(reloaded, fresh)
    _assert_reloaded_close(_logits(reloaded, family), _logits(fresh, family))

    lorakern.merge_lora(model)
    _assert_merged(model, family, names)
    assert torch.equal(_logits(model, family), _logits(copied, family))
    model.save_pretrained(tmp_path / "merged_in_place")
    reloaded = _auto_class(family).from_pretrained(tmp_path / "merged_in_place").eval()
    _assert_same_state(reloaded, model)
    _assert_reloaded_close(_logits(reloaded, family), _logits(model, family))


def _assert_reloaded_close(reloaded, saved):
    """Same weights (checked bit for bit before), same function up to summation order: safetensors hands
    back tensors at other alignments (address % 64 = 40 seen for a [1, 64] gate), and the GEMM then
    takes another vectorized path (differences of 3e-8 to 1.2e-7 in the logits seen)."""
    torch.testing.assert_close(reloaded, saved, atol=1e-6, rtol=1e-6)


def _assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    different = [k for k in sa if sa[k].dtype != sb[k].dtype or not torch.equal(sa[k], sb[k])]
    assert not different, f"reloaded tensors differ from the saved model's: {different[:5]}"


def _check_nf4_against_peft(model, family, adapter, expected, peft_dense):
    """An NF4 model against PEFT with the same adapter, on three bases.

    On the original dense base, the difference is NF4's rounding of the base weights. On a dense
    base holding exactly the dequantized NF4 weights, and on bitsandbytes 4-bit layers holding the
    very same NF4 bytes, PEFT computes our function up to float32 summation order.
    """
    reference = _logits(_base(family), family)
    adapter_effect = (peft_dense - reference).norm()
    nf4_error = (expected - peft_dense).norm()
    # Seen: NF4 error 0.02-0.22 (T5) of the adapter's effect on the logits over these families. Well
    # under 1, so an adapter that was dropped, doubled or put on the wrong layers fails here.
    assert nf4_error <= 0.35 * adapter_effect, (nf4_error.item(), adapter_effect.item())

    quantized = {n: m for n, m in lora_modules(model).items() if isinstance(m, QLoRALinear)}
    dequantized = _base(family)
    with torch.no_grad():
        for name, module in quantized.items():
            weight = module.dequantized_weight(torch.float32)
            dequantized.get_submodule(name).weight.copy_(weight.t() if module.fan_in_fan_out else weight)
    theirs = peft.PeftModel.from_pretrained(dequantized, adapter).eval()
    torch.testing.assert_close(_logits(theirs, family), expected, atol=ATOL, rtol=RTOL)

    on_bnb = _base(family)
    for name, module in quantized.items():
        parent, _, leaf = name.rpartition(".")
        setattr(on_bnb.get_submodule(parent), leaf, _bitsandbytes_copy(module))
    # train mode (model dropout is off): bitsandbytes' eval path repacks the weight on AVX-512-BF16 CPUs
    theirs = peft.PeftModel.from_pretrained(on_bnb, adapter, is_trainable=True).train()
    torch.testing.assert_close(_logits(theirs, family), expected, atol=ATOL, rtol=RTOL)


def _bitsandbytes_copy(module):
    """A bitsandbytes Linear4bit loaded from a QLoRALinear's state dict (the same NF4 bytes and state)."""
    bnb = pytest.importorskip("bitsandbytes")
    # bitsandbytes 0.50.2 decodes NF4 wrongly on CPU unless in_features is a multiple of the block size
    assert module.in_features % module.blocksize == 0 and not module.fan_in_fan_out
    state = {k: v for k, v in module.state_dict().items() if not k.startswith("lora_")}
    layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias="bias" in state,
                              compute_dtype=torch.float32, quant_type="nf4", device="cpu")
    stats = {k[len("weight."):]: v for k, v in state.items() if k.startswith("weight.")}
    layer.weight = bnb.nn.Params4bit.from_prequantized(state["weight"], stats, device="cpu", module=layer)
    if "bias" in state:
        layer.bias = nn.Parameter(state["bias"].clone(), requires_grad=False)
    return layer


# PEFT's "all-linear" also wraps these, lorakern's leaves them out: the routers (an adapter on a top-k
# router's logits) and, on transformers 5, the fused expert weights (3-D parameters, no nn.Linear).
PEFT_ONLY = {"mixtral": ("mlp.gate", "mlp.experts"), "qwen3_moe": ("mlp.gate", "mlp.experts")}
PEFT_FAMILIES = [f for f in CONFIGS if f not in EXCLUDE]  # PEFT refuses LoRA on the Mamba mixers' out_proj


def _peft_all_linear(family):
    """A PEFT model with all-linear adapters whose B (and A) are random and nonzero."""
    theirs = peft.get_peft_model(_base(family), peft.LoraConfig(r=2, lora_alpha=4, target_modules="all-linear"))
    perturb_trainable(theirs)
    return theirs.eval()


def _only_in_peft(name, family):
    return any(f".{part}." in f".{name}." for part in PEFT_ONLY.get(family, ()))


@pytest.mark.parametrize("family", PEFT_FAMILIES)
def test_all_linear_selects_what_peft_selects(family):
    """An all-linear adapter saved here has the layers PEFT's own all-linear would train, and no others."""
    ours = lorakern.apply_lora(_base(family), "all-linear", r=2)
    theirs = _peft_all_linear(family)
    wrapped = [n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A")]
    expected = [n for n in wrapped if not _only_in_peft(n, family)]
    assert sorted(ours) == sorted(expected)
    assert (len(expected) < len(wrapped)) == (family in PEFT_ONLY)


@pytest.mark.parametrize("family", PEFT_FAMILIES)
def test_peft_all_linear_adapter_loads_here(family, tmp_path):
    """PEFT -> lorakern: an adapter PEFT trained on all-linear gives PEFT's logits, or a clear refusal."""
    theirs = _peft_all_linear(family)
    theirs.save_pretrained(tmp_path)
    ours = _base(family)
    names = lorakern.load_adapter(ours, tmp_path)
    wrapped = sorted(n for n, m in theirs.base_model.model.named_modules() if hasattr(m, "lora_A"))
    if family in PEFT_ONLY:
        # transformers 5 MoE: PEFT's all-linear adds target_parameters for the expert weights (gate_up_proj at
        # twice the rank, through rank_pattern) and the routers' 2-D weights; ours names the parameters
        assert sorted(n for n in names if not _only_in_peft(n, family)) == \
            sorted(n for n in wrapped if not _only_in_peft(n, family))
        assert sorted(n.rpartition(".")[2] for n in names if _only_in_peft(n, family)) == \
            ["down_proj", "down_proj", "gate_up_proj", "gate_up_proj", "weight", "weight"]
        assert {m.r for n, m in lora_modules(ours).items() if n.endswith("gate_up_proj")} == {4}
    else:
        assert sorted(names) == wrapped
    torch.testing.assert_close(_logits(ours, family), _logits(theirs, family), atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("family", ["mamba", "falcon_h1"])
def test_all_linear_leaves_out_layers_the_fused_mamba_path_reads(family):
    names = lorakern.apply_lora(_base(family), "all-linear", r=2)
    assert not [n for n in names if n.rpartition(".")[2] in EXCLUDE[family]]


@pytest.mark.parametrize("family", ["gemma2", "t5"])
def test_trained_tied_head_travels_both_ways(family, tmp_path):
    """modules_to_save on a head tied to the input embeddings (T5: to three embedding modules).

    Here the kept head still shares its weight with the embeddings, so training it trains
    them too; PEFT trains a copy of the head alone. Each side's adapter must load into the
    other with the same logits.
    """
    ours = _base(family)
    assert ours.get_output_embeddings().weight is ours.get_input_embeddings().weight
    lorakern.apply_lora(ours, "all-linear", r=4, alpha=8, modules_to_save=["lm_head"])
    randomize_adapters(ours)
    with torch.no_grad():
        ours.lm_head.weight.add_(torch.randn(ours.lm_head.weight.shape, generator=torch.Generator().manual_seed(4)))
    lorakern.save_adapter(ours, tmp_path / "ours")
    theirs = peft.PeftModel.from_pretrained(_base(family), tmp_path / "ours").eval()
    torch.testing.assert_close(_logits(theirs, family), _logits(ours, family), atol=ATOL, rtol=RTOL)
    again = _base(family)
    lorakern.load_adapter(again, tmp_path / "ours")
    assert torch.equal(_logits(again, family), _logits(ours, family))

    theirs = peft.get_peft_model(_base(family), peft.LoraConfig(r=2, target_modules=["v_proj", "v"][family in SEQ2SEQ:],
                                                                 modules_to_save=["lm_head"]))
    with torch.no_grad():
        for p in theirs.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    theirs.save_pretrained(tmp_path / "theirs")
    loaded = _base(family)
    lorakern.load_adapter(loaded, tmp_path / "theirs")
    torch.testing.assert_close(_logits(loaded, family), _logits(theirs.eval(), family), atol=ATOL, rtol=RTOL)
    untrained = _base(family).get_input_embeddings().weight
    assert torch.equal(loaded.get_input_embeddings().weight, untrained)  # PEFT trained the head alone
    trainable = sorted(n for n, p in loaded.named_parameters() if p.requires_grad and ".lora_" not in n)
    assert trainable == ["lm_head.weight"]
    # the merged model keeps the untied head through save_pretrained / from_pretrained
    merge_and_save(loaded, None, tmp_path / "merged")
    reloaded = _auto_class(family).from_pretrained(tmp_path / "merged").eval()
    assert reloaded.get_output_embeddings().weight is not reloaded.get_input_embeddings().weight
    _assert_reloaded_close(_logits(reloaded, family), _logits(loaded, family))


def _whisper():
    config = transformers.WhisperConfig(vocab_size=VOCAB, d_model=64, encoder_layers=1, decoder_layers=1,
                                        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                                        decoder_ffn_dim=128, num_mel_bins=16, max_source_positions=8,
                                        max_target_positions=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                        decoder_start_token_id=1)
    torch.manual_seed(0)
    features = torch.randn(1, 16, 16, generator=torch.Generator().manual_seed(1))
    return (transformers.WhisperForConditionalGeneration(config).eval(),
            dict(input_features=features, decoder_input_ids=torch.tensor([[1, 5, 6]])), dict(input_features=features))


def _vision_language(kind):
    """A decoder-only model with a vision encoder in front; inputs: text with 4 image tokens and one image."""
    text = dict(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2, image_size=28,
                  patch_size=14)
    if kind == "gemma3":
        config = transformers.Gemma3Config(text_config=dict(text, head_dim=16), vision_config=vision,
                                           mm_tokens_per_image=4, image_token_index=299, boi_token_index=297,
                                           eoi_token_index=298)
        cls = transformers.Gemma3ForConditionalGeneration
    else:
        config = transformers.LlavaConfig(text_config=dict(text, model_type="llama"),
                                          vision_config=dict(vision, model_type="clip_vision_model", projection_dim=32),
                                          image_token_index=299, vision_feature_layer=-1)
        cls = transformers.LlavaForConditionalGeneration
    torch.manual_seed(0)
    pixels = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(1))
    inputs = dict(input_ids=torch.tensor([[5, 299, 299, 299, 299, 6, 7]]), pixel_values=pixels)
    return cls(config).eval(), inputs, inputs


@pytest.mark.parametrize("kind, task_type", [("whisper", None), ("gemma3", "CAUSAL_LM"), ("llava", "CAUSAL_LM")])
def test_multimodal_generation_models_get_a_task_type_peft_runs(kind, task_type, tmp_path):
    """*ForConditionalGeneration is not always a text encoder-decoder: PEFT's SEQ_2_SEQ_LM wrapper feeds
    input_ids to Whisper's encoder (a TypeError); decoder-only models with a vision encoder run under CAUSAL_LM.
    PEFT's forward and generate on the saved adapter give this model's logits and tokens."""
    build = _whisper if kind == "whisper" else lambda: _vision_language(kind)
    model, inputs, prompt = build()
    lorakern.apply_lora(model, "all-linear", r=4, alpha=8)
    randomize_adapters(model)
    lorakern.save_adapter(model, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["task_type"] == task_type
    theirs = peft.PeftModel.from_pretrained(build()[0], tmp_path).eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        assert not torch.allclose(build()[0](**inputs).logits, expected, atol=1e-3)
        torch.testing.assert_close(theirs(**inputs).logits, expected, atol=ATOL, rtol=RTOL)
        generated = model.generate(**prompt, max_new_tokens=4, do_sample=False)
        assert torch.equal(theirs.generate(**prompt, max_new_tokens=4, do_sample=False), generated)


def test_reentrant_checkpointing_enabled_before_patching_trains_every_layer():
    """Checkpointing (use_reentrant=True) switched on before apply_lora: a checkpointed block whose input does
    not require grad gets no gradient, and ViT's first block takes the patch embeddings' output. apply_lora marks
    the input embeddings' output as requiring grad, as PEFT's get_peft_model does: the gradients are the ones
    without checkpointing."""
    config = transformers.ViTConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                    num_attention_heads=4, image_size=32, patch_size=8, num_labels=3,
                                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    torch.manual_seed(0)
    base = transformers.ViTForImageClassification(config)
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))

    def grads(checkpointing):
        model = copy.deepcopy(base)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        torch.manual_seed(1)  # the same lora_A
        lorakern.apply_lora(model, ["q_proj", "v_proj"], r=4, alpha=8)
        randomize_adapters(model)
        model.train()
        model(pixel_values=pixels, labels=torch.tensor([0, 1])).loss.backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = grads(False), grads(True)
    assert plain.keys() == checkpointed.keys() and len(plain) == 2 * 2 * 2  # 2 layers x (q_proj, v_proj) x (A, B)
    for name, grad in plain.items():
        assert checkpointed[name] is not None, name
        torch.testing.assert_close(checkpointed[name], grad, atol=1e-6, rtol=1e-5, msg=name)
