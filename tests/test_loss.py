"""LinearCrossEntropy: loss and gradients equal the unfused projection + cross-entropy."""

import datetime

import pytest
import torch
import torch.nn.functional as F

from lorakern.train import loss as loss_mod
from lorakern.train.loss import linear_cross_entropy


def _reference(h, w, b, t, softcap, scale=1.0):
    logits = F.linear(h.double(), w.double(), None if b is None else b.double()) * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, t, reduction="sum")


def _grads(fn, *tensors):
    for x in tensors:
        if x is not None:
            x.grad = None
    out = fn()
    (out * 0.37).backward()  # a non-unit upstream gradient
    return out, [None if x is None else x.grad for x in tensors]


@pytest.mark.parametrize("n,v,h", [(1, 5, 3), (7, 97, 16), (33, 130, 24)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("softcap,scale", [(None, 1.0), (3.0, 1.0), (None, 0.0625), (3.0, 4.0)])
@pytest.mark.parametrize("train_head", [False, True])
def test_matches_unfused_fp32(n, v, h, bias, softcap, scale, train_head, monkeypatch):
    monkeypatch.setattr(loss_mod, "CAST_BLOCK_ROWS", 32)  # several weight blocks (unused in fp32, kept honest)
    g = torch.Generator().manual_seed(n * 1000 + v)
    hid = torch.randn(n, h, generator=g, requires_grad=True)
    w = torch.randn(v, h, generator=g).requires_grad_(train_head)
    b = torch.randn(v, generator=g).requires_grad_(train_head) if bias else None
    t = torch.randint(0, v, (n,), generator=g)
    got, got_g = _grads(lambda: linear_cross_entropy(hid, w, b, t, softcap, chunk_rows=5, scale=scale), hid, w, b)
    want, want_g = _grads(lambda: _reference(hid, w, b, t, softcap, scale), hid, w, b)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    for a, e in zip(got_g, want_g):
        if e is None:
            assert a is None
        else:
            assert a.dtype == torch.float32
            torch.testing.assert_close(a, e, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("block", [7, 64, 4096])
def test_bf16_autocast_with_fp32_weight_cast_in_blocks(block, monkeypatch):
    # fp32 weight under bf16 autocast: cast in blocks of `block` vocabulary rows;
    # must match the unfused path run under the same autocast (bf16 logits).
    monkeypatch.setattr(loss_mod, "CAST_BLOCK_ROWS", block)
    g = torch.Generator().manual_seed(block)
    hid = torch.randn(19, 40, generator=g, requires_grad=True)
    w = torch.randn(301, 40, generator=g) * 0.2
    t = torch.randint(0, 301, (19,), generator=g)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, (gh,) = _grads(lambda: linear_cross_entropy(hid, w, None, t, chunk_rows=8), hid)
        want, (wh,) = _grads(lambda: F.cross_entropy(F.linear(hid, w).float(), t, reduction="sum"), hid)
    assert gh.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=2e-3, atol=1e-2)
    torch.testing.assert_close(gh, wh, rtol=2e-2, atol=2e-2)
    exact = _reference(hid.detach(), w, None, t, None)
    torch.testing.assert_close(got.double(), exact, rtol=2e-2, atol=0.5)  # bf16 logits: ~3 significant digits


def test_chunking_caps_rows_by_logit_budget(monkeypatch):
    seen = []
    real = torch.logsumexp

    def spy(z, dim):
        seen.append(z.shape[0])
        return real(z, dim)

    monkeypatch.setattr(loss_mod, "LOGITS_BUDGET_BYTES", 4 * 50 * 10)  # 10 rows of a 50-token vocabulary
    monkeypatch.setattr(loss_mod.torch, "logsumexp", spy)
    hid = torch.randn(25, 8, requires_grad=True)
    w = torch.randn(50, 8)
    t = torch.randint(0, 50, (25,))
    out = linear_cross_entropy(hid, w, None, t, chunk_rows=1024)
    assert seen == [10, 10, 5]
    torch.testing.assert_close(out.double(), _reference(hid, w, None, t, None), rtol=1e-5, atol=1e-5)


def test_no_grad_and_frozen_inputs_build_no_graph():
    hid, w = torch.randn(6, 4), torch.randn(9, 4)
    t = torch.randint(0, 9, (6,))
    out = linear_cross_entropy(hid, w, None, t)
    assert not out.requires_grad
    torch.testing.assert_close(out.double(), _reference(hid, w, None, t, None), rtol=1e-5, atol=1e-5)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="hidden must be"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 6), None, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets must be"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), None, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\)"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), None, torch.tensor([0, -100, 2]))
    with pytest.raises(ValueError, match=r"class indices in \[0, 5\)"):
        linear_cross_entropy(torch.randn(3, 4), torch.randn(5, 4), None, torch.tensor([0, 5, 2]))
    ok = (torch.randn(3, 4), torch.randn(5, 4), None, torch.tensor([0, 1, 2]))
    for bad in (0.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="scale must be a finite nonzero number"):
            linear_cross_entropy(*ok, scale=bad)
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="softcap must be a positive number"):
            linear_cross_entropy(*ok, softcap=bad)


def _batch():
    from lorakern.train.data import Collator, tokenize_chat
    from lorakern.train.tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    chats = [[{"role": "user", "content": f"add {i} and 3"}, {"role": "assistant", "content": str(i + 3)}]
             for i in range(4)]
    return Collator(0)([tokenize_chat(tok, c) for c in chats])


def test_causal_lm_loss_fuses_a_linear_head_and_falls_back_for_others(monkeypatch):
    from torch import nn

    from lorakern.train import causal_lm_loss
    from lorakern.train.tiny import tiny_llama

    calls = []
    real = loss_mod.LinearCrossEntropy.apply
    monkeypatch.setattr(loss_mod.LinearCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    batch = _batch()
    model = tiny_llama(tie_word_embeddings=False)
    want = model(**batch).loss
    got, n = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    assert calls == [1]
    torch.testing.assert_close(got / n, want, rtol=1e-6, atol=1e-6)

    class ScaledHead(nn.Linear):  # its own forward: the loss must call it, not read its weight
        def forward(self, x):
            return super().forward(x) * 0.5

    head = model.get_output_embeddings()
    scaled = ScaledHead(head.in_features, head.out_features, bias=False)
    scaled.weight = head.weight
    model.set_output_embeddings(scaled)
    got, n = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    assert calls == [1]
    torch.testing.assert_close(got / n, model(**batch).loss, rtol=1e-6, atol=1e-6)


def test_loss_through_ddp_runs_the_fused_chunked_path(tmp_path, monkeypatch):
    # DDP(CausalLMLoss(model)), as wrap_model builds it: the loss goes through DDP's
    # forward (so gradients would synchronise) and still projects only labelled rows.
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from lorakern.train import causal_lm_loss
    from lorakern.train.distributed import unwrap_model
    from lorakern.train.loss import CausalLMLoss
    from lorakern.train.tiny import tiny_llama

    calls = []
    real = loss_mod.LinearCrossEntropy.apply
    monkeypatch.setattr(loss_mod.LinearCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    batch = _batch()
    model = tiny_llama()
    want, n_want = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
    want.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad()
    # an in-memory store, and a timeout that turns a stuck collective into an error (a one-rank
    # group on a file store hung once in CI)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1,
                            timeout=datetime.timedelta(seconds=60))
    try:
        ddp = DistributedDataParallel(CausalLMLoss(model))
        got, n = causal_lm_loss(ddp, batch["input_ids"], batch["labels"], batch["attention_mask"])
        got.backward()
    finally:
        dist.destroy_process_group()
    assert calls == [1, 1] and n == n_want and unwrap_model(ddp) is model
    torch.testing.assert_close(got, want)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[k], msg=k)


def _tiny_family(model_type, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                  **extra)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


# Families whose forward changes head(hidden) before the softmax: Granite divides by
# logits_scaling, Cohere multiplies by logit_scale, Gemma 2 caps with tanh.
LOGIT_FAMILIES = [
    ("granite", dict(logits_scaling=4.0)),
    ("cohere", dict(logit_scale=0.25)),
    ("gemma2", dict(head_dim=16, final_logit_softcapping=5.0)),
    ("llama", {}),
]


@pytest.mark.parametrize("model_type,extra", LOGIT_FAMILIES, ids=[f[0] for f in LOGIT_FAMILIES])
def test_causal_lm_loss_applies_the_family_logit_transform(model_type, extra, monkeypatch):
    import warnings

    from lorakern.patch import apply_lora
    from lorakern.train import causal_lm_loss

    calls = []
    real = loss_mod.LinearCrossEntropy.apply
    monkeypatch.setattr(loss_mod.LinearCrossEntropy, "apply", lambda *a: calls.append(1) or real(*a))
    model = _tiny_family(model_type, **extra)
    apply_lora(model, r=4, alpha=8)
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.05)
    batch = _batch()
    ids, labels, mask = batch["input_ids"] % 128, batch["labels"].clone(), batch["attention_mask"]
    labels[labels >= 0] %= 128
    want = model(input_ids=ids, attention_mask=mask, labels=labels).loss
    want.backward()
    want_g = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fused path is taken: no fallback warning
        got, n = causal_lm_loss(model, ids, labels, mask)
    (got / n).backward()
    assert calls == [1]
    torch.testing.assert_close(got / n, want, rtol=1e-5, atol=1e-6)
    for k, g in want_g.items():
        torch.testing.assert_close(dict(model.named_parameters())[k].grad, g, rtol=1e-4, atol=1e-6, msg=k)


def test_logit_transform_reads_each_family_convention():
    from types import SimpleNamespace

    from torch import nn

    from lorakern.train.loss import logit_transform

    def model(logit_scale=None, **config):
        m = nn.Module()
        m.config = SimpleNamespace(**config)
        if logit_scale is not None:
            m.logit_scale = logit_scale
        return m

    assert logit_transform(model()) == (1.0, None)
    assert logit_transform(model(logit_scale=0.0625)) == (0.0625, None)                 # Cohere
    assert logit_transform(model(logits_scaling=8.0)) == (0.125, None)                  # Granite
    assert logit_transform(model(lm_head_multiplier=0.5)) == (0.5, None)                # Falcon-H1
    assert logit_transform(model(final_logit_softcapping=30.0)) == (1.0, 30.0)          # Gemma 2/3
    assert logit_transform(model(logits_soft_cap=30.0)) == (1.0, 30.0)                  # RecurrentGemma
    assert logit_transform(model(final_logit_softcapping=None, logits_scaling=None)) == (1.0, None)
    text = SimpleNamespace(logits_scaling=4.0)
    m = model(get_text_config=lambda: text)                                             # multimodal: text config
    assert logit_transform(m) == (0.25, None)


def test_causal_lm_loss_falls_back_to_full_logits_for_an_unknown_transform():
    from transformers import LlamaForCausalLM

    from lorakern.train import causal_lm_loss

    class OffsetLogits(LlamaForCausalLM):  # a family whose forward changes the logits in an unknown way
        def forward(self, *args, **kwargs):
            labels = kwargs.pop("labels", None)
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 3.0 + torch.arange(out.logits.shape[-1]) * 0.01
            if labels is not None:
                out.loss = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(),
                                           ignore_index=-100)
            return out

    model = _tiny_family("llama")
    odd = OffsetLogits(model.config).eval()
    odd.load_state_dict(model.state_dict())
    odd.train()
    odd.model.layers[0].eval()  # a mixed train/eval state the check must leave as it was
    modes = [m.training for m in odd.modules()]
    batch = _batch()
    ids, labels, mask = batch["input_ids"] % 128, batch["labels"].clone(), batch["attention_mask"]
    labels[labels >= 0] %= 128
    rng = torch.get_rng_state()
    with pytest.warns(UserWarning, match="OffsetLogits: head.*differs from the model's logits.*full logits"):
        got, n = causal_lm_loss(odd, ids, labels, mask)
    assert torch.equal(torch.get_rng_state(), rng)  # the check draws no random numbers
    assert [m.training for m in odd.modules()] == modes
    torch.testing.assert_close(got / n, odd(input_ids=ids, attention_mask=mask, labels=labels).loss,
                               rtol=1e-5, atol=1e-6)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # checked once per model: no second warning
        causal_lm_loss(odd, ids, labels, mask)


def test_split_check_waits_for_a_model_on_the_meta_device():
    from lorakern.train.loss import _SPLIT_CHECKED, check_loss_split

    with torch.device("meta"):
        model = _tiny_family("llama")
    assert check_loss_split(model, torch.zeros(1, 4, dtype=torch.long, device="meta"))
    assert model not in _SPLIT_CHECKED  # decided once its weights exist
