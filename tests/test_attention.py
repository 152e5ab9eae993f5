"""lorakern.train.attention: outputs and q/k/v gradients equal float64 attention math and transformers' sdpa."""

import inspect
import math

import pytest
import torch

import helpers_models
from lorakern.train import attention as attn_mod
from lorakern.train.attention import ATTENTION_NAME, attention, lorakern_attention_forward, register, use_fast_attention


def _reference(q, k, v, mask=None, scale=None, is_causal=False):
    """Attention in float64 with repeated KV heads; rows with no visible key give 0 (and no gradient)."""
    q, k, v = q.double(), k.double(), v.double()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = q @ k.transpose(-1, -2) * scale
    sq, skv = scores.shape[-2:]
    if mask is None and is_causal:
        mask = torch.ones(sq, skv, dtype=torch.bool).tril()
    if mask is not None:
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, -math.inf)
        else:
            scores = scores + mask.double()
    alive = (scores > -math.inf).any(-1, keepdim=True)
    p = torch.softmax(scores.masked_fill(~alive, 0.0), -1) * alive
    return (p @ v).transpose(1, 2)  # [B, Sq, H, Dv]


def _bf16_eager(q, k, v, mask=None, scale=None, is_causal=False):
    """What eager attention computes under bf16 autocast: bf16 GEMMs, fp32 softmax. The bf16 error yardstick."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-1, -2)).float() * scale
    sq, skv = scores.shape[-2:]
    if mask is None and is_causal:
        mask = torch.ones(sq, skv, dtype=torch.bool).tril()
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.float()
    alive = (scores > -math.inf).any(-1, keepdim=True)
    p = (torch.softmax(scores.masked_fill(~alive, 0.0), -1) * alive).to(q.dtype)
    return (p @ v).transpose(1, 2)


def _inputs(b, h, hkv, sq, skv, d, dtype, seed, dv=None):
    g = torch.Generator().manual_seed(seed)

    def make(*shape):
        return torch.randn(*shape, generator=g).to(dtype).requires_grad_()

    return make(b, h, sq, d), make(b, hkv, skv, d), make(b, hkv, skv, dv or d)


def _outputs_and_grads(fn, tensors, upstream):
    for t in tensors:
        t.grad = None
    out = fn()
    out.backward(upstream.to(out.dtype))
    return [out.detach()] + [t.grad.detach() for t in tensors]


def _compare(got, want, atol, rtol, what):
    got, want = got.double(), want.double()
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    bad = ~torch.isclose(got, want, atol=atol, rtol=rtol)
    if bad.any():
        where = bad.nonzero()[0].tolist()
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements differ, first at {where} "
                             f"({got[tuple(where)].item():.6g} vs {want[tuple(where)].item():.6g}), "
                             f"max abs diff {(got - want).abs().max().item():.3g}, NaN in result: "
                             f"{bool(got.isnan().any())}, inf: {bool(got.isinf().any())}")


def _check_against_reference(q, k, v, mask=None, scale=None, is_causal=False, block=None, seed=0):
    """Output and q/k/v gradients vs float64; in bf16 no worse than 2x eager-in-bf16's own error (plus one ulp)."""
    upstream = torch.randn(q.shape[0], q.shape[2], q.shape[1], v.shape[3],
                           generator=torch.Generator().manual_seed(seed + 1))
    got = _outputs_and_grads(lambda: attention(q, k, v, mask, scale, is_causal, block), (q, k, v), upstream)
    want = _outputs_and_grads(lambda: _reference(q, k, v, mask, scale, is_causal), (q, k, v), upstream)
    names = ("output", "dq", "dk", "dv")
    for name, x in zip(names, got):
        assert x.dtype == q.dtype, f"{name}: dtype {x.dtype}, expected {q.dtype}"
        assert torch.isfinite(x).all(), f"{name}: non-finite values"
    if q.dtype == torch.float32:
        for name, x, y in zip(names, got, want):
            _compare(x, y, atol=2e-5 * max(1.0, y.abs().max().item()), rtol=1e-4, what=name)
        return got
    yardstick = _outputs_and_grads(lambda: _bf16_eager(q, k, v, mask, scale, is_causal), (q, k, v), upstream)
    for name, x, y, e in zip(names, got, want, yardstick):
        ulp = 2.0 ** -8 * y.abs().max().item()
        ours, eager = (x.double() - y).abs().max().item(), (e.double() - y).abs().max().item()
        assert ours <= 2 * eager + ulp, f"{name}: max error {ours:.3g} vs eager bf16 {eager:.3g} (ulp {ulp:.3g})"
    return got


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h,hkv", [(9, 3), (9, 1), (4, 4)])
@pytest.mark.parametrize("s", [1, 7, 33, 130])
@pytest.mark.parametrize("d", [32, 64, 80])
@pytest.mark.parametrize("is_causal", [False, True])
def test_matches_reference(dtype, h, hkv, s, d, is_causal):
    q, k, v = _inputs(2, h, hkv, s, s, d, dtype, seed=s * 100 + d + h + hkv)
    _check_against_reference(q, k, v, is_causal=is_causal, block=16)  # block 16: several blocks from S = 33


@pytest.mark.parametrize("block", [None, 1, 5, 64, 1000])
def test_block_sizes_agree(block):
    q, k, v = _inputs(2, 6, 2, 130, 130, 64, torch.float32, seed=3)
    _check_against_reference(q, k, v, scale=0.3, is_causal=True, block=block)


def _padding_mask(b, h, sq, skv, per_head, seed):
    """Causal & key padding (left padding on row 0, right on row 1) plus some query rows masked entirely."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.ones(b, skv, dtype=torch.bool)
    keys[0, : skv // 3] = False  # left padding: the first queries see no key at all
    keys[1, skv - skv // 4:] = False  # right padding
    mask = torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq)[None, None] & keys[:, None, None, :]
    mask = mask.expand(b, h if per_head else 1, sq, skv).clone()
    if per_head:
        mask &= torch.rand(b, h, sq, skv, generator=g) > 0.3
    mask[1, :, sq // 2] = False  # a fully masked row in the middle too
    return mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["bool", "float"])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("s", [7, 33, 130])
def test_padding_masks_and_fully_masked_rows(dtype, kind, per_head, s):
    b, h, hkv = 3, 9, 3
    q, k, v = _inputs(b, h, hkv, s, s, 64, dtype, seed=s)
    mask = _padding_mask(b, h, s, s, per_head, seed=s)
    dead = ~mask.any(-1)  # [B, 1|H, S]
    if kind == "float":  # additive: -inf where masked, a random bias elsewhere
        bias = torch.randn(mask.shape, generator=torch.Generator().manual_seed(7))
        mask = torch.where(mask, bias, -math.inf)
    out, dq, _, _ = _check_against_reference(q, k, v, mask=mask, block=16)
    assert dead.any(), "the mask must have fully masked rows for this test"
    dead_rows = dead.expand(b, h, s).transpose(1, 2)  # [B, S, H]
    assert (out[dead_rows] == 0).all(), "fully masked query rows must give 0"
    assert (dq.transpose(1, 2)[dead_rows] == 0).all(), "fully masked query rows must get a zero gradient"


def test_batch_one_mask_and_finite_min_float_mask():
    q, k, v = _inputs(3, 4, 2, 21, 21, 32, torch.float32, seed=5)
    mask = torch.where(torch.ones(21, 21, dtype=torch.bool).tril(), 0.0, torch.finfo(torch.float32).min)
    _check_against_reference(q, k, v, mask=mask[None, None], block=8)
    _check_against_reference(q, k, v, mask=mask, block=8)  # broadcast from 2-D


@pytest.mark.parametrize("sq,skv", [(5, 12), (12, 5), (1, 9)])
@pytest.mark.parametrize("masked", [False, True])
def test_query_and_key_lengths_differ(sq, skv, masked):
    q, k, v = _inputs(2, 6, 3, sq, skv, 64, torch.float32, seed=sq + skv, dv=48)
    mask = None
    if masked:  # a cache-style mask: query i sits at position skv - sq + i
        mask = torch.ones(sq, skv, dtype=torch.bool).tril(skv - sq)[None, None].expand(2, 1, sq, skv)
    _check_against_reference(q, k, v, mask=mask, is_causal=not masked, block=4)


def test_autocast_computes_in_bf16_like_sdpa():
    q, k, v = _inputs(2, 9, 3, 33, 33, 64, torch.float32, seed=11)
    upstream = torch.randn(2, 33, 9, 64, generator=torch.Generator().manual_seed(12))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _outputs_and_grads(lambda: attention(q, k, v, is_causal=True), (q, k, v), upstream)
    assert got[0].dtype == torch.bfloat16 and all(g.dtype == torch.float32 for g in got[1:])
    want = _outputs_and_grads(lambda: _reference(q, k, v, is_causal=True), (q, k, v), upstream)
    for name, x, y in zip(("output", "dq", "dk", "dv"), got, want):
        rel = ((x.double() - y).norm() / y.norm()).item()
        assert rel < 2e-2, f"{name}: relative error {rel:.3g} under bf16 autocast"


class _Attn(torch.nn.Module):
    def __init__(self, groups, is_causal=True):
        super().__init__()
        self.num_key_value_groups, self.is_causal = groups, is_causal


@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("is_causal", [None, False])
def test_matches_transformers_sdpa_function(masked, is_causal):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import sdpa_mask

    q, k, v = _inputs(2, 9, 3, 40, 40, 64, torch.float32, seed=13)
    mask = None
    if masked:
        padding = torch.ones(2, 40, dtype=torch.bool)
        padding[0, :9] = False
        # transformers 5 takes the query length, 4.x (the newest for torch < 2.6) the cache positions
        queries = {"q_length": 40} if "q_length" in inspect.signature(sdpa_mask).parameters else \
            {"cache_position": torch.arange(40)}
        mask = sdpa_mask(batch_size=2, kv_length=40, attention_mask=padding, **queries)
    upstream = torch.randn(2, 40, 9, 64, generator=torch.Generator().manual_seed(14))
    module = _Attn(3)

    def call(fn):
        return lambda: fn(module, q, k, v, mask, dropout=0.0, scaling=0.1, is_causal=is_causal)[0]

    got = _outputs_and_grads(call(lorakern_attention_forward), (q, k, v), upstream)
    want = _outputs_and_grads(call(sdpa_attention_forward), (q, k, v), upstream)
    for name, x, y in zip(("output", "dq", "dk", "dv"), got, want):
        _compare(x, y, atol=1e-5, rtol=1e-4, what=name)
    assert got[0].is_contiguous()


@pytest.mark.parametrize("kwargs", [
    {"dropout": 0.1}, {"softcap": 30.0}, {"s_aux": torch.zeros(9)}, {"output_attentions": True},
    {"position_bias": torch.zeros(1, 9, 8, 8)}, {"device": "meta"}, {"mask_needs_grad": True},
])
def test_unsupported_calls_go_to_sdpa(kwargs, monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa_module

    calls = []

    def spy(module, query, key, value, attention_mask, **kw):
        calls.append(kw)
        return "from sdpa", None

    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", spy)
    kwargs = dict(kwargs)
    device = kwargs.pop("device", "cpu")
    q, k, v = (torch.randn(2, h, 8, 16, device=device) for h in (9, 3, 3))
    mask = None
    if kwargs.pop("mask_needs_grad", False):
        mask = torch.zeros(2, 1, 8, 8, requires_grad=True)
    dropout = kwargs.pop("dropout", 0.0)
    out, _ = lorakern_attention_forward(_Attn(3), q, k, v, mask, dropout=dropout, scaling=0.25, **kwargs)
    assert out == "from sdpa" and len(calls) == 1 and calls[0]["scaling"] == 0.25
    assert calls[0]["dropout"] == dropout


def test_supported_call_does_not_use_sdpa(monkeypatch):
    import transformers.integrations.sdpa_attention as sdpa_module

    monkeypatch.setattr(sdpa_module, "sdpa_attention_forward", lambda *a, **kw: pytest.fail("sdpa was called"))
    q, k, v = (torch.randn(2, h, 8, 16) for h in (9, 3, 3))
    out, weights = lorakern_attention_forward(_Attn(3), q, k, v, None, dropout=0.0, scaling=0.25,
                                              sliding_window=None, position_ids=None)
    assert out.shape == (2, 8, 9, 16) and weights is None


def test_bad_inputs_raise_with_the_argument_name():
    q, k, v = torch.randn(2, 9, 8, 16), torch.randn(2, 3, 8, 16), torch.randn(2, 3, 8, 16)
    with pytest.raises(ValueError, match="query"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="multiple"):
        attention(torch.randn(2, 8, 8, 16), k, v)
    with pytest.raises(ValueError, match="key/value"):
        attention(q, k, v[:, :, :5])
    with pytest.raises(ValueError, match="mask"):
        attention(q, k, v, torch.ones(2, 2, 8, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="mask"):
        attention(q, k, v, torch.zeros(2, 1, 8, 8, requires_grad=True))


def test_saves_no_seq_by_seq_tensor():
    b, h, hkv, s, d = 2, 9, 3, 260, 32  # S = 8 D: one [.., S, S] tensor would outweigh q, k and v together
    q, k, v = _inputs(b, h, hkv, s, s, d, torch.bfloat16, seed=21)
    mask = _padding_mask(b, h, s, s, per_head=False, seed=21)
    for m, causal in ((None, True), (mask, False)):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            out = attention(q, k, v, m, is_causal=causal)
        activations = [t for t in saved if m is None or t.data_ptr() != m.data_ptr()]
        assert all(t.shape[-2:] != (s, s) and t.numel() < b * h * s * s // 4 for t in activations), \
            [tuple(t.shape) for t in activations]
        saved_bytes = sum(t.numel() * t.element_size() for t in activations)
        assert saved_bytes <= sum(t.numel() * t.element_size() for t in (q, k, v)), saved_bytes
        out.sum().backward()


def _models():
    def mistral_sliding():
        from transformers import MistralConfig, MistralForCausalLM

        torch.manual_seed(0)
        config = MistralConfig(vocab_size=helpers_models.VOCAB, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, sliding_window=4)
        return MistralForCausalLM(config).eval()

    def qwen3():
        from transformers import Qwen3Config, Qwen3ForCausalLM

        torch.manual_seed(0)
        config = Qwen3Config(vocab_size=helpers_models.VOCAB, hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=6, num_key_value_heads=2, head_dim=32)
        return Qwen3ForCausalLM(config).eval()

    families = {name: helpers_models.FAMILIES[name][0] for name in ("llama", "qwen2", "mistral", "gemma", "phi3")}
    return dict(families, mistral_sliding=mistral_sliding, qwen3=qwen3)


@pytest.mark.parametrize("family", sorted(_models()))
def test_model_logits_and_gradients_equal_sdpa(family):
    build = _models()[family]
    ids = helpers_models.example_input(batch=3, length=13)
    padding = torch.ones_like(ids)
    padding[0, :4] = 0  # left padding
    padding[1, -3:] = 0  # right padding
    results = []
    for fast in (False, True):
        model = build()
        assert model.config._attn_implementation == "sdpa"
        if fast:
            assert use_fast_attention(model) and model.config._attn_implementation == ATTENTION_NAME
        logits = model(ids, attention_mask=padding).logits
        keep = padding.bool()  # padded positions' logits are meaningless in both
        (logits[keep] * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
        results.append((logits[keep].detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}))
    (want, want_g), (got, got_g) = results
    _compare(got, want, atol=1e-5, rtol=1e-4, what=f"{family} logits")
    assert want_g.keys() == got_g.keys() and any("q_proj" in n or "qkv_proj" in n for n in got_g)
    for name in want_g:
        scale = max(1.0, want_g[name].abs().max().item())
        _compare(got_g[name], want_g[name], atol=2e-5 * scale, rtol=1e-3, what=f"{family} grad {name}")


def test_model_calls_the_registered_function(monkeypatch):
    model = helpers_models.llama()
    assert use_fast_attention(model)
    calls = []
    original = attn_mod._Attention.apply
    monkeypatch.setattr(attn_mod._Attention, "apply", lambda *a: calls.append(a[3]) or original(*a))
    ids = helpers_models.example_input(batch=2, length=9)
    padding = torch.ones_like(ids)
    padding[0, :3] = 0
    model(ids, attention_mask=padding)
    assert len(calls) == model.config.num_hidden_layers
    assert all(m is not None and m.dtype == torch.bool and m.shape == (2, 1, 9, 9) for m in calls)
    calls.clear()
    model(ids)  # no padding: transformers passes no mask and the function goes causal
    assert calls == [None] * model.config.num_hidden_layers


def test_use_fast_attention_only_switches_safe_models():
    assert not use_fast_attention(helpers_models.gpt2())  # not in the checked families
    assert not use_fast_attention(helpers_models.plain())  # not a transformers model
    eager = helpers_models.llama()
    eager.set_attn_implementation("eager")
    assert not use_fast_attention(eager) and eager.config._attn_implementation == "eager"
    model = helpers_models.llama()
    assert use_fast_attention(model)
    assert not use_fast_attention(model)  # already switched: nothing to do


def test_register_is_idempotent_and_registers_the_sdpa_mask():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

    assert register() == register() == ATTENTION_NAME
    assert AttentionInterface()[ATTENTION_NAME] is lorakern_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS[ATTENTION_NAME] is sdpa_mask


def test_generation_with_cache_matches_sdpa():
    ids = helpers_models.example_input(batch=3, length=9)
    padding = torch.ones_like(ids)
    padding[0, :3] = 0  # left padding, as for batched generation
    padding[2, :1] = 0
    results = []
    for fast in (False, True):
        model = helpers_models.llama()
        model.generation_config.pad_token_id = 0
        if fast:
            assert use_fast_attention(model)
        with torch.no_grad():  # one-token queries against the cache: Sq = 1, Skv growing
            results.append(model.generate(ids, attention_mask=padding, max_new_tokens=6, do_sample=False,
                                          output_logits=True, return_dict_in_generate=True))
    want, got = results
    assert torch.equal(got.sequences, want.sequences)
    for step, (x, y) in enumerate(zip(got.logits, want.logits)):
        _compare(x, y, atol=1e-5, rtol=1e-4, what=f"logits of generated token {step}")


def test_mask_reused_across_layers_is_reanalysed_when_it_changes():
    # Layers share one mask (analysis and bias cached); an in-place change, a new
    # mask at possibly the same address, or a different view must not see stale data.
    torch.manual_seed(11)
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    mask = torch.ones(9, 9, dtype=torch.bool).tril().expand(2, 1, 9, 9).clone()
    for step in range(3):
        for _ in range(2):  # two "layers" with the same mask
            torch.testing.assert_close(attention(q, k, v, mask), _reference(q, k, v, mask).float(), rtol=1e-5, atol=1e-5)
        mask[step % 2, 0, :, step] = False  # padding appears in place: row `step` of a batch element dies
    fresh = torch.ones(2, 1, 9, 9, dtype=torch.bool)
    torch.testing.assert_close(attention(q, k, v, fresh), _reference(q, k, v, fresh).float(), rtol=1e-5, atol=1e-5)
    shifted = mask[:, :, :, :]  # another view of the same memory
    torch.testing.assert_close(attention(q, k, v, shifted), _reference(q, k, v, shifted).float(), rtol=1e-5, atol=1e-5)
    other = mask.flip(-1).contiguous()
    torch.testing.assert_close(attention(q, k, v, other), _reference(q, k, v, other).float(), rtol=1e-5, atol=1e-5)


def test_mask_cache_is_per_thread_and_dies_with_the_mask():
    """Two threads running forwards at once each keep their own entry (a shared one paired one
    thread's mask with the other's bias: logits off by 0.29), and an entry holds the mask weakly:
    its bias (72 MB at SmolLM2's 4 x 1024 tokens) does not outlive the model's forward."""
    import gc
    import threading

    cache = attn_mod._MaskCache()
    base = torch.ones(2, 1, 8, 8, dtype=torch.bool)
    mask, key, bias = base[:, :, :, :], ("k",), torch.zeros(4)
    cache.store(mask, key, "analysis", bias)
    assert cache.lookup(base[:, :, :, :], key)[1] is bias  # another view of the same mask
    seen = []
    thread = threading.Thread(target=lambda: seen.append(cache.lookup(mask, key)))
    thread.start()
    thread.join()
    assert seen == [None]
    del mask, base
    gc.collect()
    assert not cache.slot  # emptied by the mask's death: the bias is released
