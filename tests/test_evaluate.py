"""Evaluation: held-out loss, JSON task metrics, generation, before/after report, export."""

import math
import os

import pytest
import torch

from lorakern.train import Collator, evaluate_loss, evaluate_model, format_comparison, generate, task_metrics
from lorakern.train.data import tokenize_chat
from lorakern.train.evaluate import format_report, parse_json_object
from lorakern.train.tiny import tiny_llama, tiny_tokenizer
from lorakern.train.trainer import prepare_model


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def chats(n=6):
    return [[{"role": "user", "content": f"item {i}"},
             {"role": "assistant", "content": f'{{"id": {i}, "kind": "{"odd" if i % 2 else "even"}"}}'}]
            for i in range(n)]


def test_parse_json_object():
    assert parse_json_object('Sure! ```json\n{"a": 1, "b": [2]}\n``` done') == {"a": 1, "b": [2]}
    assert parse_json_object("{not json} then {\"x\": true}") == {"x": True}
    assert parse_json_object("no object here [1, 2]") is None
    assert parse_json_object('{"a": 1, "b": ') is None  # truncated generation


def test_task_metrics_exact_match_and_fields():
    refs = ['{"category": "billing", "priority": "high"}'] * 4 + ["plain answer"]
    preds = ['{"priority": "high", "category": "billing"}',  # key order does not matter
             'Here: {"category": "billing", "priority": "low"}',
             '{"category": "shipping"}',
             "I cannot help with that.",
             "  plain answer "]
    m = task_metrics(preds, refs)
    assert m["n"] == 5 and m["exact_match"] == pytest.approx(2 / 5)
    assert m["json_references"] == 4 and m["valid_json"] == pytest.approx(3 / 4)  # the text reference expects no JSON
    assert m["field_accuracy"] == {"category": pytest.approx(2 / 4), "priority": pytest.approx(1 / 4)}
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        task_metrics(["a", "b"], ["a"])


def test_valid_json_counts_only_json_references():
    # two perfect answers, one JSON and one text: every JSON answer expected is valid
    m = task_metrics(['{"a": 1}', "hello"], ['{"a": 1}', "hello"])
    assert m["exact_match"] == 1.0 and m["json_references"] == 1 and m["valid_json"] == 1.0
    assert "valid JSON 100.0% (of 1 JSON references)" in format_report({"task": m})
    m = task_metrics(["hello", "{}"], ["hello", "bye"])  # no JSON reference: no JSON metrics
    assert m == {"n": 2, "exact_match": 0.5}
    assert "valid JSON" not in format_report({"task": m})


def test_a_truncated_object_is_not_valid_json_through_a_nested_one():
    # max_new_tokens cut the answer after a nested object: the nested one alone is not the answer.
    cut = '{"category": "Support", "priority": 1, "product": {"name": "orbit"}'
    assert parse_json_object(cut) is None
    assert parse_json_object(cut + "} and more") == {"category": "Support", "priority": 1, "product": {"name": "orbit"}}
    assert parse_json_object('{"a": "}{"} {"b": 2}') == {"a": "}{"}  # braces inside strings do not count
    assert parse_json_object('{"a": "\\"}", "b": {"c": 1}') is None  # an escaped quote does not close the string
    assert parse_json_object('a 5" screen: {"x": 1}') == {"x": 1}  # quotes in the prose open no string
    ref = '{"category": "billing", "product": "orbit"}'
    m = task_metrics([cut], [ref])
    assert m["valid_json"] == 0.0 and m["exact_match"] == 0.0


def test_task_metrics_compare_json_values_not_python_values():
    # Python has True == 1 and False == 0; JSON true is not the number 1, at any depth.
    m = task_metrics(['{"urgent": true, "count": false, "tags": [1, {"x": true}]}'] * 2,
                     ['{"urgent": 1, "count": 0, "tags": [1, {"x": 1}]}',
                      '{"urgent": true, "count": false, "tags": [1.0, {"x": true}]}'])
    assert m["exact_match"] == pytest.approx(1 / 2)  # the second: 1 and 1.0 are the same JSON number
    assert m["field_accuracy"] == {"urgent": 0.5, "count": 0.5, "tags": 0.5}
    # a missing field is wrong, even when the reference's value is null
    m = task_metrics(['{"a": 1}'], ['{"a": 1, "b": null}'])
    assert m["field_accuracy"] == {"a": 1.0, "b": 0.0} and m["exact_match"] == 0.0


def test_evaluate_loss_matches_hf_mean_loss(tok):
    model = tiny_llama()
    examples = [tokenize_chat(tok, c) for c in chats()]
    result = evaluate_loss(model, examples, batch_size=4, collate=Collator(tok.pad_token_id))
    total, count = 0.0, 0
    for ex in examples:  # one at a time, no padding
        ids = torch.tensor([ex.input_ids])
        n = sum(t != -100 for t in ex.labels[1:])
        with torch.no_grad():
            total += float(model(input_ids=ids, labels=torch.tensor([ex.labels])).loss) * n
        count += n
    assert result["tokens"] == count
    assert result["loss"] == pytest.approx(total / count, rel=1e-5)
    assert result["perplexity"] == pytest.approx(math.exp(total / count), rel=1e-5)
    assert model.training  # restored
    assert math.isnan(evaluate_loss(model, [], collate=Collator(0))["loss"])


def test_generate_left_pads_and_returns_only_new_text(tok):
    model = tiny_llama()
    prompts = [[{"role": "user", "content": "hi"}], [{"role": "user", "content": "a much longer question"}]]
    batched = generate(model, tok, prompts, max_new_tokens=5, batch_size=2)
    single = [generate(model, tok, [p], max_new_tokens=5, batch_size=1)[0] for p in prompts]
    assert batched == single  # left padding does not change greedy outputs
    assert all(isinstance(t, str) and "<|im_start|>" not in t for t in batched)
    with pytest.raises(TypeError, match="generate"):
        generate(torch.nn.Linear(2, 2), tok, prompts)


def test_trained_model_report_before_after(tok):
    """A tiny model learns a JSON task; the report shows the change and the forgetting check."""
    data = chats(2)
    model = tiny_llama(hidden_size=64)
    prepare_model(model, "full")
    examples = [tokenize_chat(tok, c) for c in data]
    general = [tokenize_chat(tok, [{"role": "user", "content": "what is up"},
                                   {"role": "assistant", "content": "the sky"}])]
    before = evaluate_model(model, tok, data, examples, general, max_new_tokens=30, num_samples=2)
    from lorakern.train import TrainConfig, Trainer

    Trainer(model, examples, TrainConfig(steps=60, batch_size=2, lr=3e-3, min_lr_ratio=1.0, progress=False,
                                         mixed_precision="no")).train()
    after = evaluate_model(model, tok, data, examples, general, max_new_tokens=30, num_samples=2)
    assert before["task"]["exact_match"] == 0.0
    assert after["task"]["exact_match"] == 1.0  # memorised both records
    assert after["test"]["loss"] < before["test"]["loss"] / 10
    assert len(after["samples"]) == 2 and after["samples"][0]["prediction"] == data[0][1]["content"]
    table = format_comparison(before, after)
    assert "exact match" in table and "100.0%" in table and "field kind" in table
    assert "forgetting check" in table
    assert "held-out loss" in format_report(after)


def test_save_merge_and_reload_for_chat(tok, tmp_path):
    from transformers import AutoModelForCausalLM

    from lorakern.train.export import chat, load_for_chat, merge_and_save, save_trained

    model = tiny_llama()
    prepare_model(model, "lora", r=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    model.eval()
    ids = torch.tensor([tokenize_chat(tok, chats(1)[0]).input_ids])
    expected = model(input_ids=ids).logits
    save_trained(model, tok, str(tmp_path / "adapter"))
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(
        os.listdir(tmp_path / "adapter"))
    base_dir = str(tmp_path / "base")
    tiny_llama().save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    reloaded, _ = load_for_chat(base_dir, adapter=str(tmp_path / "adapter"))
    torch.testing.assert_close(reloaded(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="quantize='nf4' applies with an adapter"):
        load_for_chat(base_dir, quantize="nf4")  # before, the base model ran dense

    merge_and_save(model, tok, str(tmp_path / "merged"))
    plain = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)

    lines = []
    replies = chat(plain, tok, prompts=["hello"], max_new_tokens=4, out=type("W", (), {
        "write": lambda self, s: lines.append(s), "flush": lambda self: None})())
    assert len(replies) == 1 and lines[0] == replies[0]
    inputs = iter(["first", ""])
    replies = chat(plain, tok, max_new_tokens=3, read=lambda _: next(inputs), out=open(os.devnull, "w"))
    assert len(replies) == 1


def test_comparison_columns_stay_aligned_for_large_values():
    # An untrained model's perplexity is ~100 (the vocabulary size), and up to e^50 when the loss explodes.
    before = {"test": {"loss": 4.6244, "perplexity": 101.9462}, "task": {"exact_match": 0.0, "n": 2},
              "general": {"loss": 4.65}}
    after = {"test": {"loss": 50.0, "perplexity": 5.184705528587072e21}, "task": {"exact_match": 1.0, "n": 2},
             "general": {"loss": 4.64}}
    header, *rows = format_comparison(before, after).splitlines()[:5]
    assert [r.index(" -> ") for r in rows] == [34] * 4, rows
    assert "101.9462 ->" in rows[1] and rows[1].endswith(" 5.185e+21")
    assert all(len(r) == len(header) for r in rows)  # numbers right-aligned under "before" and "after"
    assert header.index("before") + len("before") == rows[0].index(" -> ")


def test_evaluate_loss_scores_packed_examples_apart(tok):
    """Packing changes the layout, not the loss: each packed example is scored as it is alone."""
    from lorakern.train.data import pack_examples

    model = tiny_llama(seed=0)
    examples = [tokenize_chat(tok, c) for c in chats()]
    packed = pack_examples(examples, max_length=3 * max(map(len, examples)))
    assert len(packed) < len(examples)
    collate = Collator(tok.pad_token_id)
    alone = evaluate_loss(model, examples, batch_size=4, collate=collate)
    together = evaluate_loss(model, packed, batch_size=4, collate=collate)
    assert together["tokens"] == alone["tokens"]
    assert together["loss"] == pytest.approx(alone["loss"], rel=1e-5, abs=0)
