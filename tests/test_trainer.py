"""Trainer: chunked loss vs Hugging Face, accumulation, exact resume, checkpoints, mixtures, methods."""

import json
import os
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from lorakern.train import Example, MixtureSampler, TrainConfig, Trainer, World, causal_lm_loss, cosine_lr
from lorakern.train.data import Collator, tokenize_chat
from lorakern.train.tiny import tiny_llama, tiny_tokenizer
from lorakern.train.trainer import prepare_model


@pytest.fixture(scope="module")
def examples():
    tok = tiny_tokenizer()
    chats = [[{"role": "user", "content": f"add {i} and {j}"}, {"role": "assistant", "content": str(i + j)}]
             for i in range(6) for j in range(6)]
    return [tokenize_chat(tok, c) for c in chats]


def batch_of(examples, n=4):
    return Collator(0)(examples[:n])


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("chunk_size", [1, 7, 1024])
def test_chunked_loss_equals_hf_loss_and_gradients(examples, tied, chunk_size):
    model = tiny_llama(tie_word_embeddings=tied)
    batch = batch_of(examples)
    reference = model(**batch).loss
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss_sum, n = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"], chunk_size)
    assert n == int((batch["labels"][:, 1:] != -100).sum())
    (loss_sum / n).backward()
    torch.testing.assert_close(loss_sum / n, reference, rtol=1e-6, atol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_loss_of_plain_torch_model_uses_full_logits(examples):
    class TinyLM(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb, self.out = nn.Embedding(101, 16), nn.Linear(16, 101)

        def forward(self, input_ids):
            return self.out(self.emb(input_ids))

    torch.manual_seed(0)
    model, batch = TinyLM(), batch_of(examples)
    loss_sum, n = causal_lm_loss(model, batch["input_ids"], batch["labels"])
    logits = model(batch["input_ids"])[:, :-1].reshape(-1, 101)
    expected = nn.functional.cross_entropy(logits, batch["labels"][:, 1:].reshape(-1), reduction="sum")
    torch.testing.assert_close(loss_sum, expected)


def test_cosine_schedule():
    assert [round(cosine_lr(s, 10, 2, 0.1), 4) for s in (0, 1, 2)] == [0.3333, 0.6667, 1.0]
    assert cosine_lr(10, 10, 2, 0.1) == pytest.approx(0.1)
    assert cosine_lr(6, 10, 2, 0.0) == pytest.approx(0.5)


def test_sampler_is_deterministic_resumable_and_weighted():
    a = MixtureSampler([5, 100], weights=[3, 1], seed=1)
    first = a.take(40)
    state = a.state_dict()
    rest = a.take(400)
    b = MixtureSampler([5, 100], weights=[3, 1], seed=1)
    b.load_state_dict(state)
    assert b.take(400) == rest
    share = sum(k == 0 for k, _ in first + rest) / 440
    assert 0.68 < share < 0.82  # weight 3:1
    # every row of dataset 0 appears once per epoch of 5
    rows0 = [j for k, j in first + rest if k == 0][:15]
    assert sorted(rows0[:5]) == sorted(rows0[5:10]) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="at least one row"):
        MixtureSampler([3, 0])


def test_world_shards_without_overlap():
    items = list(range(10))
    shards = [World(r, 3).shard(items) for r in range(3)]
    assert sorted(sum(shards, [])) == items
    with pytest.raises(ValueError, match="rank"):
        World(3, 3)


def _train(examples, steps, method="lora", out=None, resume=False, total=None, accum=1, batch=4, **cfg):
    model = tiny_llama(seed=0)
    torch.manual_seed(0)
    if method == "full":
        prepare_model(model, "full")
    else:
        prepare_model(model, method, r=4, alpha=8, dropout=0.1)
    config = TrainConfig(steps=total or steps, batch_size=batch, grad_accum=accum, lr=5e-3, warmup_steps=2,
                         output_dir=out, progress=False, mixed_precision="no", seed=0, **cfg)
    trainer = Trainer(model, examples, config, eval_data=examples[:6])
    if resume:
        assert trainer.resume()
    records = []
    while trainer.step < steps:
        records.append(trainer.train_step())
        if out and trainer.step == steps:
            trainer.save()
    return trainer, [r["loss"] for r in records]


@pytest.mark.parametrize("method", ["lora", "qlora", "full"])
def test_exact_resume_bit_identical(examples, tmp_path, method):
    _, straight = _train(examples, 6, method, total=6)
    _, head = _train(examples, 3, method, out=str(tmp_path), total=6)
    trainer, tail = _train(examples, 6, method, out=str(tmp_path), resume=True, total=6)
    assert trainer.step == 6
    assert head + tail == straight  # bit for bit, dropout included
    assert straight[-1] < straight[0]


def test_each_rank_and_step_draws_its_own_dropout_seeds(examples, monkeypatch):
    # In a data-parallel job every rank must draw different dropout masks (a generator
    # state shared by all ranks drops the same units of every rank's rows), while a
    # given (seed, step, rank) always draws the same ones (exact resume).
    from lorakern import ops

    drawn = []
    real = ops.new_seed
    monkeypatch.setattr(ops, "new_seed", lambda device: drawn.append(int(real(device))) or torch.tensor(
        [drawn[-1]], dtype=torch.int64))

    def seeds(rank, prior, steps=2):
        model = tiny_llama(seed=0)
        prepare_model(model, "lora", r=4, alpha=8, dropout=0.1)
        config = TrainConfig(steps=steps, batch_size=2, lr=1e-3, progress=False, mixed_precision="no", seed=0)
        trainer = Trainer(model, examples, config, world=World(rank, 2))
        torch.manual_seed(prior)  # a job seeds every rank alike
        per_step = []
        for _ in range(steps):
            drawn.clear()
            trainer.train_step()
            per_step.append(list(drawn))
        return per_step

    r0, r1, r0_again = seeds(0, prior=123), seeds(1, prior=123), seeds(0, prior=7)
    assert r0 == r0_again and len(r0[0]) > 0      # the step decides, not the state before it
    assert not set(r0[0]) & set(r1[0])            # ranks differ
    assert not set(r0[0]) & set(r0[1])            # steps differ


def test_checkpoint_files_are_safe_formats_and_atomic(examples, tmp_path):
    trainer, _ = _train(examples, 2, "lora", out=str(tmp_path), total=4, keep_checkpoints=1)
    trainer.train_step()
    trainer.save()
    names = sorted(os.listdir(tmp_path))
    assert names == ["checkpoint-3"]  # keep_checkpoints=1 removed checkpoint-2; no temporary directory left
    files = sorted(os.listdir(tmp_path / "checkpoint-3"))
    assert files == ["optimizer.safetensors", "rng.safetensors", "trainable.safetensors", "trainer_state.json"]
    state = json.loads((tmp_path / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["sampler"]["drawn"] == 12
    # an incomplete directory (no trainer_state.json) is never picked up
    os.makedirs(tmp_path / "checkpoint-9")
    fresh, _ = _train(examples, 0, "lora", out=str(tmp_path), resume=True, total=4)
    assert fresh.step == 3


def test_resume_rejects_a_different_adapter(examples, tmp_path):
    _train(examples, 1, "lora", out=str(tmp_path), total=2)
    model = tiny_llama()
    prepare_model(model, "lora", r=8, alpha=8)
    trainer = Trainer(model, examples, TrainConfig(steps=2, batch_size=4, output_dir=str(tmp_path), progress=False))
    with pytest.raises(ValueError, match="shape"):
        trainer.resume()


def test_gradient_accumulation_matches_one_big_batch(examples):
    a, loss_a = _train(examples, 3, "full", batch=4, accum=1, max_grad_norm=None)
    b, loss_b = _train(examples, 3, "full", batch=2, accum=2, max_grad_norm=None)
    torch.testing.assert_close(torch.tensor(loss_a), torch.tensor(loss_b), rtol=1e-5, atol=1e-6)
    for pa, pb in zip(a.model.parameters(), b.model.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-4, atol=1e-6)


def test_gradient_checkpointing_same_gradients(examples):
    batch = batch_of(examples)
    grads = []
    for checkpointing in (False, True):
        model = tiny_llama()
        prepare_model(model, "lora", r=4, alpha=8)
        with torch.no_grad():  # nonzero B so every adapter gets a gradient through later layers
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.1, generator=torch.Generator().manual_seed(len(name)))
        trainer = Trainer(model, examples, TrainConfig(steps=1, progress=False, mixed_precision="no",
                                                       gradient_checkpointing=checkpointing))
        loss, n = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        (loss / n).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad})
        assert any(getattr(m, "gradient_checkpointing", False) for m in model.modules()) == checkpointing
    assert grads[0].keys() == grads[1].keys() and all(g.abs().sum() > 0 for g in grads[1].values())
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], msg=k)


def test_eval_and_generate_do_not_change_training_gradients(examples):
    """A training step after evaluation and generate() gives the same gradients as one without."""
    tok = tiny_tokenizer()
    batch = batch_of(examples)
    grads = []
    for run_eval in (False, True):
        model = tiny_llama()
        prepare_model(model, "qlora", r=4, alpha=8)
        trainer = Trainer(model, examples, TrainConfig(steps=1, progress=False, mixed_precision="no"),
                          eval_data=examples[:4])
        if run_eval:
            from lorakern.train.evaluate import generate

            trainer.evaluate()
            generate(model, tok, [[{"role": "user", "content": "add 1 and 2"}]], max_new_tokens=3)
        model.train()
        loss, n = causal_lm_loss(model, batch["input_ids"], batch["labels"], batch["attention_mask"])
        (loss / n).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for g0, g1 in zip(*grads):
        torch.testing.assert_close(g1, g0, rtol=0, atol=0)


def test_train_writes_metrics_plot_and_final_checkpoint(examples, tmp_path):
    model = tiny_llama()
    prepare_model(model, "lora", r=4, alpha=8)
    config = TrainConfig(steps=4, batch_size=4, lr=5e-3, eval_every=2, output_dir=str(tmp_path), progress=True,
                         mixed_precision="no")
    seen = []
    records = Trainer(model, examples, config, eval_data=examples[:4], callbacks=[lambda t, r: seen.append(r)]).train()
    assert [r["step"] for r in records] == [1, 2, 3, 4] and seen == records
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert "eval_loss" in lines[1] and "eval_loss" in lines[3] and "eval_loss" not in lines[0]
    assert all(r["tokens_per_s"] > 0 and r["loss"] > 0 for r in lines)
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.path.isdir(tmp_path / "checkpoint-4")


def test_mixture_of_datasets_and_sequential_adapter(examples, tmp_path):
    from lorakern.patch import load_adapter, save_adapter

    short = [e for e in examples if len(e) < 40]
    model = tiny_llama()
    prepare_model(model, "lora", r=4, alpha=8)
    config = TrainConfig(steps=3, batch_size=4, lr=5e-3, progress=False, mixed_precision="no",
                         mixture_weights=[1.0, 3.0])
    trainer = Trainer(model, {"all": examples, "short": short}, config)
    trainer.train()
    assert sum(trainer.sampler.per_dataset) == 12 and trainer.sampler.per_dataset[1] > 0
    save_adapter(model, str(tmp_path / "stage1"))

    # stage 2 starts from the saved adapter (same weights), then trains on
    second = tiny_llama()
    load_adapter(second, str(tmp_path / "stage1"))
    before = {n: p.clone() for n, p in second.named_parameters() if p.requires_grad}
    for n, p in model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(before[n], p.detach())
    Trainer(second, short, TrainConfig(steps=2, batch_size=4, lr=5e-3, progress=False)).train()
    assert any(not torch.equal(before[n], p) for n, p in second.named_parameters() if p.requires_grad)


def test_bad_configuration_errors(examples):
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="mixed_precision"):
        TrainConfig(mixed_precision="fp8")
    # counts are whole numbers: steps=2.5 trained 3 steps and never reached its final checkpoint
    for name, value in (("steps", 2.5), ("batch_size", 2.5), ("grad_accum", True), ("keep_checkpoints", 1.5),
                        ("save_every", "2")):
        with pytest.raises(ValueError, match=rf"TrainConfig.{name} must be a whole number"):
            TrainConfig(**{name: value})
    config = TrainConfig(steps=4.0, batch_size=np.int64(2), keep_checkpoints=np.int32(1), grad_accum=np.float32(2),
                         seed=np.int64(1))
    assert all(type(getattr(config, n)) is int for n in ("steps", "batch_size", "keep_checkpoints", "grad_accum", "seed"))
    with pytest.raises(ValueError, match="TrainConfig.seed must be a whole number"):
        TrainConfig(seed=2.5)
    with pytest.raises(ValueError, match=r"TrainConfig.seed must be in \[0, 2\*\*32\), got 9007199254740993"):
        TrainConfig(seed=2**53 + 1)
    with pytest.raises(ValueError, match="TrainConfig.steps must be >= 1"):
        TrainConfig(steps=-10**400)
    with pytest.raises(ValueError, match="no trainable parameters"):
        model = tiny_llama()
        model.requires_grad_(False)
        Trainer(model, examples)
    with pytest.raises(ValueError, match="empty"):
        Trainer(tiny_llama(), [])
    with pytest.raises(ValueError, match="method"):
        prepare_model(tiny_llama(), "prefix")
    assert Example([1, 2], [-100, 2]).num_labels == 1


def test_qlora_prepare_copies_frozen_tensors_out_of_the_checkpoint_mapping(tmp_path, examples):
    # The kept fp32 tensors of a model loaded from safetensors view the file's memory
    # map; prepare_model must give them their own memory (and keep ties and values).
    from transformers import AutoModelForCausalLM

    tiny_llama(tie_word_embeddings=True).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    before = {n: (t.data_ptr(), t.clone()) for n, t in model.state_dict(keep_vars=True).items()
              if "proj" not in n and t.is_floating_point()}
    batch = batch_of(examples)
    prepare_model(model, "qlora", r=4, alpha=8)
    state = model.state_dict(keep_vars=True)
    for name, (ptr, value) in before.items():
        assert state[name].data_ptr() != ptr, name
        torch.testing.assert_close(state[name], value, rtol=0, atol=0, msg=name)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert torch.isfinite(model(**batch).loss)


def test_prepare_model_switches_cpu_attention_unless_asked_not_to():
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    prepare_model(model, "lora", r=4, alpha=8)
    assert model.config._attn_implementation == "lorakern_cpu"
    other = tiny_llama()
    other.set_attn_implementation("sdpa")
    prepare_model(other, "lora", fast_attention=False, r=4, alpha=8)
    assert other.config._attn_implementation == "sdpa"


def test_prepare_model_switches_gated_mlps_unless_asked_not_to():
    model = tiny_llama()
    prepare_model(model, "qlora", r=4, alpha=8)
    assert all("forward" in layer.mlp.__dict__ for layer in model.model.layers)
    other = tiny_llama()
    prepare_model(other, "qlora", lean_mlp=False, r=4, alpha=8)
    assert not any("forward" in layer.mlp.__dict__ for layer in other.model.layers)


def test_fp16_mixed_precision_scales_the_loss_and_checkpoints_the_scale(examples, tmp_path):
    """float16 autocast runs with a GradScaler: gradients are unscaled before clipping (the
    norm matches a float32 run's), the scale is saved in checkpoints and restored on resume."""

    def trainer_for(precision, out=None):
        model = tiny_llama(seed=0)
        torch.manual_seed(0)
        prepare_model(model, "lora", r=4, alpha=8, dropout=0.0)
        config = TrainConfig(steps=4, batch_size=4, lr=5e-3, warmup_steps=0, output_dir=out, progress=False,
                             mixed_precision=precision, seed=0)
        return Trainer(model, examples, config)

    fp32 = trainer_for("no")
    assert fp32.scaler is None
    ref = [fp32.train_step() for _ in range(2)]
    trainer = trainer_for("fp16", str(tmp_path))
    assert trainer.amp_dtype == torch.float16 and trainer.scaler is not None
    records = [trainer.train_step() for _ in range(2)]
    for got, want in zip(records, ref):
        assert abs(got["loss"] - want["loss"]) < 2e-2 * want["loss"]
        assert 0.8 < got["grad_norm"] / want["grad_norm"] < 1.25  # unscaled: not 65536x
    trainer.scaler.update(1234.0)  # a scale no fresh trainer starts with
    path = trainer.save()
    with open(os.path.join(path, "trainer_state.json")) as f:
        assert json.load(f)["grad_scaler"]["scale"] == 1234.0
    resumed = trainer_for("fp16", str(tmp_path))
    assert resumed.resume() and resumed.scaler.get_scale() == 1234.0
    assert resumed.train_step()["loss"] > 0


def test_fp16_with_fsdp_is_refused(examples):
    model = tiny_llama(seed=0)
    prepare_model(model, "lora", r=4, alpha=8)
    with pytest.raises(ValueError, match="loss scaling"):
        Trainer(model, examples, TrainConfig(steps=1, progress=False, mixed_precision="fp16"), strategy="fsdp")


def test_fast_attention_keeps_sdpa_on_a_transformers_without_mask_registries(monkeypatch):
    from lorakern.train import attention

    def missing():
        raise ImportError("cannot import name 'AttentionMaskInterface' from 'transformers.masking_utils'")

    monkeypatch.setattr(attention, "register", missing)
    model = tiny_llama()
    model.set_attn_implementation("sdpa")
    assert attention.use_fast_attention(model) is False
    assert model.config._attn_implementation == "sdpa"


def test_ctrl_c_saves_the_last_whole_step_and_resumes_exactly(examples, tmp_path):
    """The first SIGINT stops after the step in progress with a checkpoint of it; a second one stops at once."""
    import signal

    from lorakern.train import TrainingInterrupted

    def trainer_for(out, callbacks=()):
        model = tiny_llama(seed=0)
        torch.manual_seed(0)
        prepare_model(model, "lora", r=4, alpha=8, dropout=0.1)
        config = TrainConfig(steps=5, batch_size=4, lr=5e-3, warmup_steps=2, output_dir=str(out), progress=False,
                             mixed_precision="no", seed=0)
        return Trainer(model, examples, config, callbacks=callbacks)

    def ctrl_c_at(step, times=1):
        def callback(trainer, record):
            if record["step"] == step:
                for _ in range(times):
                    signal.raise_signal(signal.SIGINT)
        return callback

    straight = [r["loss"] for r in trainer_for(tmp_path / "straight").train()]
    interrupted = trainer_for(tmp_path / "run", [ctrl_c_at(2)])
    with pytest.raises(KeyboardInterrupt) as e:  # not TrainingInterrupted alone: a bare one would end the session
        interrupted.train()
    assert isinstance(e.value, TrainingInterrupted), repr(e.value)
    assert e.value.step == 2 and e.value.checkpoint == str(tmp_path / "run" / "checkpoint-2")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    resumed = trainer_for(tmp_path / "run")
    assert resumed.resume() and resumed.step == 2
    resumed.train()
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert losses == straight  # bit for bit: the checkpoint is a consistent step boundary

    # Pressed twice: KeyboardInterrupt at once (mid-step: nothing consistent to save).
    with pytest.raises(KeyboardInterrupt) as e:
        trainer_for(tmp_path / "twice", [ctrl_c_at(1, times=2)]).train()
    assert not isinstance(e.value, TrainingInterrupted)
    assert not list(tmp_path.glob("twice/checkpoint-*"))
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_drops_a_torn_last_metrics_line_and_refuses_a_damaged_file(examples, tmp_path):
    from lorakern.train.plot import plot_loss_curve

    _train(examples, 2, "lora", out=str(tmp_path), total=4)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("".join(f'{{"step": {s}, "loss": 1.0}}\n' for s in (1, 2)) + '{"step": 3, "lo')
    with pytest.warns(UserWarning, match=r"metrics.jsonl:3: dropped a torn last line"):
        plot_loss_curve(str(metrics), str(tmp_path / "curve.png"))
    with pytest.warns(UserWarning, match="torn last line"):
        trainer, _ = _train(examples, 2, "lora", out=str(tmp_path), resume=True, total=4)
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2]
    metrics.write_text('{"step": 1, "lo\n{"step": 2, "loss": 1.0}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: not a metrics record \(invalid JSON"):
        _train(examples, 2, "lora", out=str(tmp_path), resume=True, total=4)


def test_resume_refuses_other_data_or_adapter_before_loading_weights(examples, tmp_path, monkeypatch):
    from lorakern.train import checkpoint

    _train(examples, 2, "lora", out=str(tmp_path), total=4)
    monkeypatch.setattr(checkpoint, "load_file", lambda *a, **k: pytest.fail("no tensor may load"))
    model = tiny_llama(seed=0)
    prepare_model(model, "lora", r=4, alpha=8)
    config = TrainConfig(steps=4, batch_size=4, output_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match=r"trained on 36 examples in 'train' but this run has 30 examples in 'train'"):
        Trainer(model, examples[:30], config).resume()
    with pytest.raises(ValueError, match="global batch is 4 samples per step"):
        Trainer(model, examples, TrainConfig(steps=4, batch_size=2, output_dir=str(tmp_path))).resume()
    # Same count, one token changed (a data file edited, another tokenizer): the sampler's
    # saved position would index other examples.
    edited = list(examples)
    edited[7] = Example(input_ids=[*edited[7].input_ids[:-1], edited[7].input_ids[-1] + 1], labels=edited[7].labels)
    with pytest.raises(ValueError, match=r"trained on other examples in 'train' \(same sizes, different tokens\)"):
        Trainer(model, edited, config).resume()
    reordered = [examples[1], examples[0], *examples[2:]]
    with pytest.raises(ValueError, match="different tokens"):
        Trainer(model, reordered, config).resume()
    other = tiny_llama(seed=0)
    prepare_model(other, "lora", r=8, alpha=8)
    with pytest.raises(ValueError, match=r"has shape \(4, 32\), model has \(8, 32\): resume with the method"):
        Trainer(other, examples, config).resume()
    # Same parameter names and shapes, another function trained: alpha, dropout, NF4 base
    # (the checkpoint's layers: LoRALinear, dense base, scaling 8 / 4 = 2, dropout 0.1)
    for method, alpha, dropout, message in [
            ("lora", 32, 0.1, r"as LoRALinear on a dense base, scaling 2, dropout 0.1; this run has LoRALinear on a "
                              r"dense base, scaling 8, dropout 0.1: resume with the LoRA alpha and rank \(scaling = "
                              r"alpha / r\) and rsLoRA setting \(alpha / sqrt\(r\) with it\) it was trained with"),
            ("lora", 8, 0.0, r"this run has LoRALinear on a dense base, scaling 2, dropout 0: resume with the LoRA "
                             r"dropout it was trained with"),
            ("qlora", 8, 0.1, r"this run has QLoRALinear on a nf4 base, scaling 2, dropout 0.1: resume with the "
                              r"LoRA layer kind and base weights \(method 'lora' for a dense base, 'qlora' for "
                              r"NF4\) it was trained with")]:
        other = tiny_llama(seed=0)
        prepare_model(other, method, r=4, alpha=alpha, dropout=dropout)
        with pytest.raises(ValueError, match=message):
            Trainer(other, examples, config).resume()
    # a checkpoint written before the settings were stored still resumes
    same = tiny_llama(seed=0)
    prepare_model(same, "qlora", r=4, alpha=8, dropout=0.1)
    state_file = tmp_path / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    assert [g["layer"] for g in state["adapters"]] == ["LoRALinear"]
    del state["adapters"]
    state_file.write_text(json.dumps(state))
    assert Trainer(same, examples, config).check_checkpoint(str(tmp_path / "checkpoint-2"))["step"] == 2


def test_a_fresh_run_or_an_older_resume_never_loses_checkpoints_to_another_run(examples, tmp_path):
    """The rotation keeps the highest steps: a fresh run in a used output_dir, or a resume from an older
    checkpoint with later ones present, had its own new checkpoints deleted and the old run's kept
    (and metrics.jsonl mixing both runs). Both are refused now, before anything is written."""
    _train(examples, 1, "lora", out=str(tmp_path), total=4)
    _train(examples, 2, "lora", out=str(tmp_path), total=4, resume=True)
    model = tiny_llama(seed=0)
    prepare_model(model, "lora", r=4, alpha=8, dropout=0.1)
    config = TrainConfig(steps=4, batch_size=4, lr=5e-3, warmup_steps=2, output_dir=str(tmp_path), progress=False,
                         mixed_precision="no", seed=0, save_every=1)
    with pytest.raises(ValueError, match=r"holds a previous run \(checkpoint-1, checkpoint-2.*call resume\(\)"):
        Trainer(model, examples, config).train()
    with pytest.raises(ValueError, match=r"holds checkpoints after step 1 \(checkpoint-2\): continuing"):
        Trainer(model, examples, config).resume(str(tmp_path / "checkpoint-1"))
    assert sorted(d for d in os.listdir(tmp_path) if d.startswith("checkpoint-")) == ["checkpoint-1", "checkpoint-2"]
    trainer = Trainer(model, examples, config)
    assert trainer.resume() and trainer.step == 2  # the newest: fine
    # a refused resume leaves the directory refused; a trainer's own checkpoint never is
    refused = Trainer(model, examples, TrainConfig(**{**vars(config), "seed": 1}))
    with pytest.raises(ValueError, match="trained with seed 0"):
        refused.resume()
    with pytest.raises(ValueError, match="holds a previous run"):
        refused.train()
    own = tmp_path / "own"
    first = Trainer(model, examples, TrainConfig(**{**vars(config), "output_dir": str(own), "steps": 2}))
    first.save()  # a snapshot of the starting adapter, a manual step, then train
    first.train_step()
    first.train()
    assert sorted(os.listdir(own)) >= ["checkpoint-0", "checkpoint-2"]
    # neither a save() nor steps taken by hand get a fresh trainer past a used directory
    for act in (lambda t: t.save(), lambda t: (t.train_step(), t.train())):
        with pytest.raises(ValueError, match="holds a previous run"):
            act(Trainer(model, examples, config))
    # nor does continuing a checkpoint from elsewhere
    with pytest.raises(ValueError, match="holds a previous run"):
        Trainer(model, examples, TrainConfig(**{**vars(config), "output_dir": str(tmp_path)})).resume(
            str(own / "checkpoint-2"))


def test_resume_refuses_another_seed_or_mixture(examples, tmp_path):
    # the sampler's permutations come from the seed: with another one, the restored position saw some
    # examples twice and others never in the epoch
    _train(examples, 2, "lora", out=str(tmp_path), total=4)
    model = tiny_llama(seed=0)
    prepare_model(model, "lora", r=4, alpha=8, dropout=0.1)
    for change, message in (({"seed": 1}, "trained with seed 0 but this run has 1"),
                            ({"mixture_weights": [1.0]}, "trained with mixture_weights None but this run has")):
        config = TrainConfig(steps=4, batch_size=4, lr=5e-3, warmup_steps=2, output_dir=str(tmp_path),
                             progress=False, mixed_precision="no", **{"seed": 0, **change})
        with pytest.raises(ValueError, match=message):
            Trainer(model, examples, config).resume()


def test_resume_without_a_checkpoint_starts_over_and_drops_stale_metrics(examples, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 9.0}\n')
    model = tiny_llama(seed=0)
    prepare_model(model, "lora", r=4, alpha=8)
    trainer = Trainer(model, examples, TrainConfig(steps=1, batch_size=4, output_dir=str(tmp_path), progress=False,
                                                   mixed_precision="no"))
    assert trainer.resume() is False and trainer.step == 0
    trainer.train()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1] and records[0]["loss"] != 9.0


@pytest.mark.parametrize("fused_head", [True, False])
def test_packed_training_step_equals_the_unpacked_one(examples, fused_head, monkeypatch):
    """--packing changes the batch layout, not the loss: each packed example sees only itself
    (position_ids restart per example; the model builds a block-diagonal mask from them)."""
    from lorakern.train import loss as loss_mod
    from lorakern.train.data import pack_examples

    if not fused_head:  # the full-logits path, taken by models whose logits are not head(hidden)
        monkeypatch.setattr(loss_mod, "split_causal_lm", lambda model: (None, None))
    subset = examples[:6]
    packed = pack_examples(subset, max_length=3 * max(map(len, subset)))
    assert len(packed) < len(subset)
    losses = {}
    for name, data in (("unpacked", subset), ("packed", packed)):
        model = tiny_llama(seed=0)
        prepare_model(model, "lora", r=4, alpha=8)
        trainer = Trainer(model, data, TrainConfig(steps=1, batch_size=len(data), lr=1e-3, progress=False))
        losses[name] = trainer.train_step()["loss"]
    assert losses["packed"] == pytest.approx(losses["unpacked"], rel=1e-5, abs=0)


class _TokenwiseLM(nn.Module):
    """No attention: each token's logits depend on that token only (packing cannot leak)."""

    def __init__(self, vocab=101, hidden=16):
        super().__init__()
        self.emb, self.proj, self.out = nn.Embedding(vocab, hidden), nn.Linear(hidden, hidden), nn.Linear(hidden, vocab)

    def forward(self, input_ids, attention_mask=None):
        return self.out(torch.relu(self.proj(self.emb(input_ids))))


class _InputIdsOnlyLM(_TokenwiseLM):
    def forward(self, input_ids):
        return super().forward(input_ids)


class _PrefixMeanLM(_TokenwiseLM):
    """Each token sees the mean of all tokens up to it: packed examples see the ones before them."""

    def forward(self, input_ids, attention_mask=None):
        h = self.emb(input_ids).cumsum(1) / torch.arange(1, input_ids.shape[1] + 1).view(1, -1, 1)
        return self.out(torch.relu(self.proj(h)))


def _train_one_step(model, data):
    import lorakern

    lorakern.apply_lora(model, r=2, target_modules=["proj"])
    trainer = Trainer(model, data, TrainConfig(steps=1, batch_size=len(data), progress=False, mixed_precision="no"))
    return trainer.train_step()["loss"]


def test_plain_torch_models_train_packed_and_without_an_attention_mask(examples, recwarn):
    """A forward without position_ids (or without attention_mask) gets only what it takes."""
    from lorakern.train.data import pack_examples

    subset = examples[:6]
    packed = pack_examples(subset, max_length=3 * max(map(len, subset)))
    losses = {}
    for name, cls, data in (("unpacked", _TokenwiseLM, subset), ("packed", _TokenwiseLM, packed),
                            ("ids only", _InputIdsOnlyLM, subset)):
        torch.manual_seed(0)
        losses[name] = _train_one_step(cls(), data)
    # Right padding comes after every token, so a causal model needs no mask; this one has no attention.
    assert losses["packed"] == pytest.approx(losses["unpacked"], rel=1e-5, abs=0)
    assert losses["ids only"] == pytest.approx(losses["unpacked"], rel=1e-6, abs=0)
    assert not [w for w in recwarn if "packing" in str(w.message)]  # tokenwise: packing is exact


def test_packing_warns_once_for_a_model_whose_examples_see_each_other(examples):
    import transformers

    from lorakern.train.data import pack_examples
    from lorakern.train.loss import check_packing

    packed = pack_examples(examples[:6], max_length=3 * max(map(len, examples[:6])))
    torch.manual_seed(0)
    with pytest.warns(UserWarning, match=r"packing: _PrefixMeanLM does not keep packed examples apart"):
        _train_one_step(_PrefixMeanLM(), packed)
    # OPT takes position_ids but builds its attention mask without them.
    opt = transformers.OPTForCausalLM(transformers.OPTConfig(
        vocab_size=101, hidden_size=32, ffn_dim=64, num_hidden_layers=1, num_attention_heads=4, word_embed_proj_dim=32))
    with pytest.warns(UserWarning, match=r"packing: OPTForCausalLM does not keep packed examples apart"):
        assert not check_packing(opt, packed[0].input_ids)
    assert opt.training  # the probe restores the train / eval mode it found
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a model that isolates them passes silently
        assert check_packing(tiny_llama(seed=0), packed[0].input_ids)


def test_a_compiled_model_gets_the_inputs_its_forward_takes():
    """torch.compile's wrapper declares no forward of its own: the loss read nn.Module's placeholder,
    dropped position_ids and attention_mask (packed loss 28.03 instead of 28.82) and blamed the wrapper;
    the Trainer's packing probe warned for a compiled Llama that keeps examples apart."""
    import warnings

    from lorakern.train.loss import accepts_input, causal_lm_loss, check_packing

    class PositionalLM(nn.Module):  # no get_output_embeddings: scored from its full logits
        def __init__(self):
            super().__init__()
            self.tok, self.pos, self.out = nn.Embedding(64, 16), nn.Embedding(16, 16), nn.Linear(16, 64)

        def forward(self, input_ids, attention_mask=None, position_ids=None):
            if position_ids is None:
                position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
            return self.out(self.tok(input_ids) + self.pos(position_ids))

    torch.manual_seed(0)
    model = PositionalLM()
    compiled = torch.compile(model, backend="eager")
    assert accepts_input(compiled, "position_ids") and not accepts_input(compiled, "use_cache")
    ids = torch.randint(0, 64, (1, 8))
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2, 3]])
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        want = causal_lm_loss(model, ids, ids, torch.ones_like(ids), position_ids=positions)[0]
        got = causal_lm_loss(compiled, ids, ids, torch.ones_like(ids), position_ids=positions)[0]
        assert check_packing(torch.compile(tiny_llama(seed=0), backend="eager"), list(range(4, 12)))
    assert torch.equal(got, want)
    torch._dynamo.reset()


def test_resume_of_a_checkpoint_from_before_half_up_split_rounding_says_how_to_match_it(examples, tmp_path):
    """Older checkpoints rounded held-out sizes half to even: one example more in 'train' on the same file."""
    _train(examples, 2, "lora", out=str(tmp_path), total=4)
    model = tiny_llama(seed=0)
    prepare_model(model, "lora", r=4, alpha=8)
    config = TrainConfig(steps=4, batch_size=4, output_dir=str(tmp_path), progress=False)
    current = r"trained on 36 examples in 'train' but this run has 35 examples in 'train': resume with the same"
    with pytest.raises(ValueError, match=current) as refused:
        Trainer(model, examples[:35], config).resume()
    assert "predate" not in str(refused.value)  # this checkpoint rounded as this run does
    state_file = tmp_path / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    for key in ("adapters", "data_fingerprints"):  # what older checkpoints lack
        del state[key]
    state_file.write_text(json.dumps(state))
    with pytest.raises(ValueError, match=current + r".*may predate split sizes rounded half up \(it rounded them half "
                       r"to even: 0.05 of 50 records held out 2, now 3\).*hold out 1 record fewer, as then$"):
        Trainer(model, examples[:35], config).resume()
    with pytest.raises(ValueError, match=r"this run has 37 examples .*hold out 1 record more, as then$"):
        Trainer(model, [*examples, examples[0]], config).resume()
    with pytest.raises(ValueError, match=r"this run has 30 examples in 'train': resume with the same training data, "
                                         r"prepared the same way \(files, max length, validation split, packing\)$"):
        Trainer(model, examples[:30], config).resume()  # 6 fewer: not a rounding difference
