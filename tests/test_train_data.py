"""Data preparation: loading, bad-record reports, cleaning, templates, masking, packing, splits."""

import json

import pytest

from lorakern.train.data import (IGNORE_INDEX, Collator, DataError, Example, clean_records, fit_length, format_chat,
                                 load_records, pack_examples, prepare_dataset, split_records, tokenize_chat,
                                 tokenize_each, tokenize_records)
from lorakern.train.tiny import tiny_tokenizer


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def write_jsonl(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


def test_field_names_and_chat_records(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "Add", "input": "2 and 3", "output": "5"},
        {"prompt": "p", "completion": "c"},
        {"question": "q", "answer": "a", "system": "be brief"},
        {"input": "i", "response": "r"},
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                      {"role": "user", "content": "bye"}, {"role": "assistant", "content": "ciao"}]},
    ])
    data = load_records(path)
    assert not data.issues
    assert data.chats[0] == [{"role": "user", "content": "Add\n\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert data.chats[1][0]["content"] == "p" and data.chats[1][1]["content"] == "c"
    assert data.chats[2][0] == {"role": "system", "content": "be brief"}
    assert data.chats[3] == [{"role": "user", "content": "i"}, {"role": "assistant", "content": "r"}]
    assert [m["role"] for m in data.chats[4]] == ["user", "assistant", "user", "assistant"]
    assert data.sources == [(path, i) for i in range(1, 6)]


def test_bad_rows_reported_with_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "bad.jsonl", [
        {"prompt": "ok", "response": "fine"},
        "{not json",
        {"prompt": "no response"},
        {"prompt": 3, "response": "x"},
        "",
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]},
        "[1, 2]",
        {"prompt": "ok2", "response": "fine2"},
    ])
    data = load_records(path)
    assert len(data) == 2
    lines = {i.line: i.reason for i in data.issues}
    assert sorted(lines) == [2, 3, 4, 6, 7, 8]
    assert "invalid JSON" in lines[2]
    assert "no response field" in lines[3]
    assert "'prompt' must be a string" in lines[4]
    assert "last message must have role 'assistant'" in lines[6]
    assert "'robot'" in lines[7]
    assert "expected a JSON object" in lines[8]
    assert all(i.file == path for i in data.issues)
    with pytest.raises(DataError, match=r"6 bad record\(s\)") as err:
        load_records(path, strict=True)
    assert f"{path}:2: invalid JSON" in str(err.value)


def test_json_and_csv_files(tmp_path):
    jpath = tmp_path / "d.json"
    jpath.write_text(json.dumps([{"prompt": "a", "response": "b"}, {"prompt": "c"}]))
    data = load_records(str(jpath))
    assert len(data) == 1 and data.issues[0].line == 2
    cpath = tmp_path / "d.csv"
    cpath.write_text('instruction,output\n"multi\nline prompt",yes\nonly,\n')
    data = load_records(str(cpath))
    assert data.chats[0][0]["content"] == "multi\nline prompt"
    cleaned = clean_records(data)
    assert len(cleaned) == 1 and "empty assistant message" in cleaned.issues[0].reason
    (tmp_path / "x.txt").write_text("prompt,response\n")
    with pytest.raises(DataError, match="unsupported extension"):
        load_records(str(tmp_path / "x.txt"))
    with pytest.raises(FileNotFoundError, match="data file not found"):
        load_records(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("ext", ["jsonl", "json", "csv"])
def test_files_saved_with_a_byte_order_mark_and_crlf(tmp_path, ext):
    # Spreadsheet programs and some editors on Windows write UTF-8 with a BOM and CRLF.
    rows = [{"instruction": "héllo", "response": "wörld"}, {"instruction": "a", "response": "b"}]
    if ext == "jsonl":
        text = "\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\r\n"
    elif ext == "json":
        text = json.dumps(rows, ensure_ascii=False)
    else:
        text = "instruction,response\r\n" + "".join(f"{r['instruction']},{r['response']}\r\n" for r in rows)
    path = tmp_path / f"d.{ext}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    data = load_records(str(path))
    assert not data.issues and len(data) == 2
    assert data.chats[0] == [{"role": "user", "content": "héllo"}, {"role": "assistant", "content": "wörld"}]


@pytest.mark.parametrize("ext", ["jsonl", "csv"])
def test_lines_that_are_not_utf8_are_reported_and_skipped(tok, tmp_path, ext):
    # A file saved as Latin-1 (caf\xe9) among UTF-8 lines: that record is bad, the others load.
    if ext == "jsonl":
        raw = b'{"instruction": "ok", "output": "fine"}\n{"instruction": "caf\xe9", "output": "x"}\n' \
              b'{"instruction": "b\xc3\xa9", "output": "c"}\n'
        line, reason = 2, "not valid UTF-8 (byte 0xe9 at column 21); save the file as UTF-8"
    else:
        raw = b'instruction,output\nok,fine\n"caf\xe9",x\nb\xc3\xa9,c\n'
        line, reason = 3, "not valid UTF-8 (byte 0xe9); save the file as UTF-8"  # line 1: the header
    path = tmp_path / f"d.{ext}"
    path.write_bytes(raw)
    data = load_records(str(path))
    assert [c[0]["content"] for c in data.chats] == ["ok", "bé"]
    assert [str(i) for i in data.issues] == [f"{path}:{line}: {reason}"]
    with pytest.raises(DataError, match=rf"d\.{ext}:{line}: not valid UTF-8"):
        load_records(str(path), strict=True)
    prepare_dataset(tok, str(path))  # nothing downstream sees the bad bytes


def test_a_json_file_that_is_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_bytes(b'[{"instruction": "a", "output": "b"},\n {"instruction": "caf\xe9", "output": "x"}]')
    with pytest.raises(DataError, match=r"d\.json:2: not valid UTF-8 \(byte 0xe9 at column 22\)"):
        load_records(str(path))


def test_a_lone_surrogate_is_a_bad_record(tok, tmp_path):
    # JSON can escape half a UTF-16 pair; such a string cannot be encoded, hashed for the split or tokenized.
    path = write_jsonl(tmp_path / "d.jsonl", ['{"instruction": "a\\ud800b", "output": "ok"}',
                                              {"instruction": "b", "output": "c"},
                                              {"instruction": "c", "output": "d"}])
    data = load_records(path)
    assert len(data) == 2 and [i.line for i in data.issues] == [1]
    assert "user message holds a lone surrogate (U+D800 at character 2)" in data.issues[0].reason
    prepared = prepare_dataset(tok, path, val_fraction=0.5)
    assert len(prepared.train) + len(prepared.validation) == 2


def test_no_training_example_left_is_an_error_saying_why(tok, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(DataError, match="no training records in .*empty.jsonl"):
        prepare_dataset(tok, str(empty))
    bad = write_jsonl(tmp_path / "bad.jsonl", ["not json", {"instruction": "x", "response": " "}])
    with pytest.raises(DataError, match=r"(?s)2 bad record.*bad.jsonl:1: invalid JSON.*bad.jsonl:2: empty assistant"):
        prepare_dataset(tok, bad)


def test_clean_strips_dedups_and_reports(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"prompt": "  same  ", "response": "x\n"},
        {"prompt": "same", "response": "x"},
        {"prompt": "   ", "response": "x"},
        {"prompt": "other", "response": "y", "system": "  "},
    ])
    data = clean_records(load_records(path))
    assert data.chats == [[{"role": "user", "content": "same"}, {"role": "assistant", "content": "x"}],
                          [{"role": "user", "content": "other"}, {"role": "assistant", "content": "y"}]]
    reasons = {i.line: i.reason for i in data.issues}
    assert reasons[2] == f"duplicate of {path}:1; dropped"
    assert "empty user message" in reasons[3]


@pytest.mark.parametrize("template", ["chatml", None])
def test_labels_cover_exactly_the_replies(template):
    tok = tiny_tokenizer() if template else tiny_tokenizer(chat_template=None)
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "A1"}, {"role": "user", "content": "q2"},
            {"role": "assistant", "content": "A2!"}]
    ex = tokenize_chat(tok, chat)
    full = format_chat(tok, chat)
    assert tok.decode(ex.input_ids) == full
    assert len(ex.labels) == len(ex.input_ids)
    # the prompt fed at generation time is a token prefix of the training example
    prompt = tok(format_chat(tok, chat[:-1], add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    assert ex.input_ids[:len(prompt)] == prompt
    assert ex.labels[len(prompt):] == ex.input_ids[len(prompt):]  # the last reply is learned whole
    eos, end = tok.eos_token, "\n" if template else "\n\n"
    assert tok.decode([t for t in ex.labels[:len(prompt)] if t != IGNORE_INDEX]) == f"A1{eos}{end}"
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == f"A1{eos}{end}A2!{eos}{end}"
    if not template:
        assert "### Assistant:\n" in full


def test_overlong_rows_reported_not_silently_cut(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"prompt": "short", "response": "ok"},
                                              {"prompt": "x" * 200, "response": "long one"}])
    data = load_records(path)
    kept, issues = tokenize_records(tok, data, max_length=100, overlong="drop")
    assert len(kept) == 1 and issues[0].line == 2 and "> max_length 100" in issues[0].reason
    kept, issues = tokenize_records(tok, data, max_length=100, overlong="truncate")
    # the reply sits after the 200 prompt characters: nothing to learn survives, so it is dropped too
    assert len(kept) == 1 and len(issues) == 2 and "no trainable tokens" in issues[1].reason
    full = len(tokenize_chat(tok, data.chats[1]))
    kept, issues = tokenize_records(tok, data, max_length=full - 3, overlong="truncate")
    assert len(kept) == 2 and len(kept[1]) == full - 3 and len(issues) == 1
    assert kept[1].labels[-1] != IGNORE_INDEX
    with pytest.raises(DataError, match="max_length 100"):
        tokenize_records(tok, data, max_length=100, overlong="error")
    with pytest.raises(ValueError, match="overlong must be"):
        tokenize_records(tok, data, max_length=100, overlong="cut")


def test_split_is_deterministic_and_independent_of_row_order(tmp_path):
    rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(50)]
    a = load_records(write_jsonl(tmp_path / "a.jsonl", rows))
    b = load_records(write_jsonl(tmp_path / "b.jsonl", rows[::-1]))
    train_a, val_a, test_a = split_records(a, 0.1, 0.2, seed=3)
    train_b, val_b, test_b = split_records(b, 0.1, 0.2, seed=3)
    assert (len(train_a), len(val_a), len(test_a)) == (35, 5, 10)
    for x, y in ((train_a, train_b), (val_a, val_b), (test_a, test_b)):
        assert sorted(map(json.dumps, x.chats)) == sorted(map(json.dumps, y.chats))
    assert split_records(a, 0.1, 0.2, seed=3)[2].chats == test_a.chats
    assert split_records(a, 0.1, 0.2, seed=4)[2].chats != test_a.chats
    everything = {json.dumps(c) for part in (train_a, val_a, test_a) for c in part.chats}
    assert len(everything) == 50
    with pytest.raises(ValueError, match="val_fraction"):
        split_records(a, 1.5, 0.0)


def test_packing_keeps_every_example_whole():
    examples = [Example(list(range(n)), [IGNORE_INDEX] * (n - 1) + [1]) for n in (5, 9, 1, 7, 3, 8, 2, 5)]
    packed = pack_examples(examples, max_length=10)
    assert all(len(p) <= 10 for p in packed)
    assert sum(len(p) for p in packed) == sum(len(e) for e in examples)
    # the targets are kept: every labelled token but a first one (nothing precedes it, alone or packed)
    assert sum(p.num_labels for p in packed) == sum(e.num_labels - (e.labels[0] != IGNORE_INDEX) for e in examples)
    assert len(packed) == 4  # 40 tokens in bins of 10: first-fit decreasing fills every bin here
    with pytest.raises(ValueError, match="does not fit"):
        pack_examples([Example([1] * 11, [1] * 11)], 10)


def test_collator_pads_right_and_masks():
    batch = Collator(pad_token_id=0, pad_to_multiple_of=4)([Example([5, 6, 7], [-100, 6, 7]), Example([8], [8])])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7, -100], [8, -100, -100, -100]]


def test_prepare_dataset_end_to_end(tok, tmp_path):
    rows = [{"prompt": f"question {i}", "response": f"answer {i}"} for i in range(40)]
    rows += ["{broken", {"prompt": "question 0", "response": "answer 0"}]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    data = prepare_dataset(tok, path, max_length=128, val_fraction=0.1, test_fraction=0.1, seed=0, packing=True)
    assert len(data.validation) == 4 and len(data.test) == 4
    assert sum(e.num_labels for e in data.train) == sum(
        e.num_labels for e in tokenize_records(tok, data.raw["train"], 128)[0])
    assert all(len(e) <= 128 for e in data.train) and len(data.train) <= 16  # ~45 tokens each: 2 per sequence
    report = data.report()
    assert "2 record(s) skipped" in report and "invalid JSON" in report and "duplicate" in report
    with pytest.raises(DataError):
        prepare_dataset(tok, path, strict=True)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0])
def test_mixture_weights_must_be_finite_and_non_negative(bad):
    from lorakern.train.sampler import MixtureSampler

    with pytest.raises(ValueError,
                       match=r"weights must be 2 finite non-negative numbers .* got \[1\.0, (nan|inf|-1\.0)\]"):
        MixtureSampler([3, 3], [1.0, bad])


@pytest.mark.parametrize("scale", [1e308, 1e-320, 1.0])
def test_mixture_weights_of_any_finite_scale_draw_in_proportion(scale):
    """Equal weights whose sum overflows float64 (2e308), or subnormal ones, still draw half and half."""
    from lorakern.train.sampler import MixtureSampler

    drawn = [k for k, _ in MixtureSampler([3, 4], weights=[scale, scale], seed=0).take(2000)]
    assert 0.45 < drawn.count(0) / 2000 < 0.55
    drawn = [k for k, _ in MixtureSampler([3, 4], weights=[scale, scale / 3], seed=0).take(2000)]
    assert 0.7 < drawn.count(0) / 2000 < 0.8


# DeepSeek-R1 distills: the generation header opens a thought ("<think>\n") that a rendered reply does not hold.
THINK_TEMPLATE = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n<think>\n' }}{% endif %}")


def test_a_generation_header_that_a_reply_does_not_start_with():
    tok = tiny_tokenizer(THINK_TEMPLATE)
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "3+3?"},
            {"role": "assistant", "content": "6"}]
    ex = tokenize_chat(tok, chat)
    assert tok.decode(ex.input_ids) == format_chat(tok, chat)  # the conversation once, as the template renders it
    eos = tok.eos_token
    assert tok.decode([t for t in ex.labels if t != IGNORE_INDEX]) == f"4{eos}\n6{eos}\n"
    # a template that renders the earlier messages differently once a reply follows cannot be split: refused
    tok = tiny_tokenizer(THINK_TEMPLATE.replace("{% endif %}", "{% else %}{{ '(your turn)' }}{% endif %}"))
    with pytest.raises(ValueError, match="^the chat template renders the messages before assistant turn 3 differently"):
        tokenize_chat(tok, chat[:3])


@pytest.mark.parametrize("template,header", [
    (THINK_TEMPLATE, "<|im_start|>assistant\n"),
    ("{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}{% else %}<|Assistant|>"
     "{{ m['content'] }}<|end|>{% endif %}{% endfor %}{% if add_generation_prompt %}<|Assistant|><think>\n{% endif %}",
     "<|Assistant|>"),
])
@pytest.mark.parametrize("reply", ["<tool>call()</tool>", "<thinking aloud", "<|im_end|> or <|end|>", "plain"])
def test_a_reply_that_starts_like_the_generation_headers_extra_text_keeps_its_characters(template, header, reply):
    """The generation header appends "<think>\n": a reply starting "<t..." is still labelled whole."""
    tok = tiny_tokenizer(template)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": reply}]
    ex = tokenize_chat(tok, chat)
    prompt = tok.decode([t for t, label in zip(ex.input_ids, ex.labels) if label == IGNORE_INDEX])
    labelled = tok.decode([t for t in ex.labels if t != IGNORE_INDEX])
    assert prompt.endswith(header) and labelled.startswith(reply)
    assert prompt + labelled == format_chat(tok, chat)
    # a template that puts the reply's content nowhere its placeholder shows: refused, not guessed
    tok = tiny_tokenizer(template.replace("m['content']", "(m['content'] | length | string)"))
    with pytest.raises(ValueError, match="does not render assistant turn 2's content after a header"):
        tokenize_chat(tok, chat)


def test_a_chat_must_open_with_a_prompt(tok, tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [
        {"instruction": "a", "response": "b"},
        {"messages": [{"role": "assistant", "content": "I open"}]},
        {"messages": [{"role": "assistant", "content": "I open"}, {"role": "user", "content": "q"},
                      {"role": "assistant", "content": "r"}]},
        {"messages": [{"role": "system", "content": "S"}, {"role": "assistant", "content": "r"}]},
    ])
    data = load_records(path)
    assert [i.line for i in data.issues] == [2, 3]
    assert all("messages[0] has role 'assistant'" in i.reason for i in data.issues)
    assert len(prepare_dataset(tok, path).train) == 2


def test_records_the_chat_template_refuses_are_reported_and_skipped(tmp_path):
    from lorakern.train.tiny import CHATML_TEMPLATE

    # Gemma's template has no system role; Mistral's checks that users and assistants alternate.
    tok = tiny_tokenizer("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}" + CHATML_TEMPLATE)
    path = write_jsonl(tmp_path / "d.jsonl", [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(4)]
                       + [{"system": "be brief", "instruction": "q", "response": "a"}])
    data = prepare_dataset(tok, path, val_fraction=0.25)
    assert len(data.train) + len(data.validation) == 4  # the split sees only the records that render
    assert [str(i) for i in data.issues] == [f"{path}:5: the chat template refused this record: "
                                             "System role not supported"]
    assert "System role not supported" in data.report()
    examples, issues = tokenize_records(tok, load_records(path), max_length=64)
    assert len(examples) == 4 and [i.line for i in issues] == [5]
    kept, examples = tokenize_each(tok, load_records(path))  # what generation can be asked
    assert [s[1] for s in kept.sources] == [1, 2, 3, 4] and len(examples) == 4 and kept.issues == issues
    with pytest.raises(DataError, match=r"(?s)2 bad record.*d.jsonl:5: the chat template refused.*d.jsonl:6: invalid"):
        prepare_dataset(tok, write_jsonl(tmp_path / "d.jsonl", [
            *[{"instruction": f"q{i}", "response": f"a{i}"} for i in range(4)],
            {"system": "be brief", "instruction": "q", "response": "a"}, "{broken"]), strict=True)


def test_an_eval_set_leaves_out_records_the_template_refuses(tmp_path, capsys):
    # Generation renders each held-out chat again: a refused one used to end the run with a
    # jinja2 traceback after training.
    from lorakern.train.pipeline import load_eval_set
    from lorakern.train.tiny import CHATML_TEMPLATE

    tok = tiny_tokenizer("{% for m in messages %}{% if m['role'] == 'system' %}"
                         "{{ raise_exception('System role not supported') }}{% endif %}{% endfor %}" + CHATML_TEMPLATE)
    path = write_jsonl(tmp_path / "test.jsonl", [{"instruction": "q1", "response": "a1"},
                                                 {"system": "be brief", "instruction": "q", "response": "a"}])
    chats, examples = load_eval_set(tok, path, 64, "--test-data", "test set")
    assert len(chats) == len(examples) == 1 and chats[0][0]["content"] == "q1"
    assert f"{path}:2: the chat template refused this record: System role not supported" in capsys.readouterr().out


def test_split_sizes_round_half_up_and_must_leave_training_records(tok, tmp_path):
    def sizes(n, val, test):
        rows = [{"prompt": f"q{i}", "response": f"a{i}"} for i in range(n)]
        return [len(p) for p in split_records(load_records(write_jsonl(tmp_path / f"{n}.jsonl", rows)), val, test)]

    assert sizes(4, 0.125, 0.125) == [2, 1, 1]  # 0.5 -> 1 both times (round() gave 0 and 0)
    assert sizes(5, 0.0, 0.1) == [4, 0, 1] and sizes(4, 0.0, 0.1) == [4, 0, 0]
    assert sizes(10, 0.25, 0.35) == [3, 3, 4]  # 2.5 -> 3 and 3.5 -> 4 (round() gave 2 and 4)
    assert sizes(5, 0.0, 0.7) == [1, 0, 4]  # 0.7 * 5 is 3.4999999999999996 in binary
    with pytest.raises(DataError, match=r"val_fraction 0\.3 and test_fraction 0\.3 of 2 record\(s\) leave no "
                                        r"training record \(1 validation, 1 test"):
        prepare_dataset(tok, write_jsonl(tmp_path / "two.jsonl", [{"prompt": f"q{i}", "response": f"a{i}"}
                                                                  for i in range(2)]), val_fraction=0.3,
                        test_fraction=0.3)


def test_a_split_test_set_with_no_record_is_an_error(tiny_model_dir, tmp_path, capsys):
    from lorakern.train.pipeline import main

    data = write_jsonl(tmp_path / "four.jsonl", [{"instruction": f"say {i}", "response": f"{i}"} for i in range(4)])
    code = main(["--model", tiny_model_dir, "--data", data, "--test-data", "split", "--general-data", "none",
                 "--steps", "1", "--method", "lora", "--output-dir", str(tmp_path / "run"), "--no-progress"])
    assert code == 1
    assert ("--test-data split: --test-fraction 0.1 of 4 usable record(s) leaves no test record (sizes round half "
            "up: at least 0.125 for one); raise --test-fraction or pass a held-out file as --test-data"
            ) in capsys.readouterr().err


def test_packed_positions_restart_for_each_example_and_the_padding():
    import torch

    packed = pack_examples([Example([5] * 3, [5] * 3), Example([6] * 2, [6] * 2), Example([7] * 4, [7] * 4)], 6)
    assert [p.input_ids for p in packed] == [[7, 7, 7, 7, 6, 6], [5, 5, 5]]
    assert [p.position_ids for p in packed] == [[0, 1, 2, 3, 0, 1], [0, 1, 2]]
    batch = Collator(0)(packed)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 1, 2]]  # padding: a segment of its own
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    assert batch["position_ids"].dtype == torch.long
    assert "position_ids" not in Collator(0)([Example([5], [5])])  # unpacked batches as before
    repacked = pack_examples(packed + [Example([8], [8])], 7)  # packing packed sequences keeps their boundaries
    assert repacked[0].position_ids == [0, 1, 2, 3, 0, 1, 0]
    # An example's first token is never a target alone, so it is none packed either (it would be
    # predicted from the example before it).
    assert [p.labels for p in packed] == [[7, 7, 7, 7, IGNORE_INDEX, 6], [5, 5, 5]]
    cut, issues = fit_length(packed, [("f", 1), ("f", 2)], 5, "truncate")  # keeps the packed positions
    assert cut[0].position_ids == [0, 1, 2, 3, 0] and len(issues) == 1
    with pytest.raises(ValueError, match="sources has 1 entries for 2 examples"):
        fit_length(packed, [("f", 1)], 5)
    assert repacked[0].labels == [7, 7, 7, 7, IGNORE_INDEX, 6, IGNORE_INDEX]


@pytest.mark.parametrize("implementation", ["sdpa", "eager", "lorakern"])
def test_a_packed_example_scores_as_it_does_alone(tok, implementation):
    import torch
    import torch.nn.functional as F

    from lorakern.train.attention import use_fast_attention
    from lorakern.train.tiny import tiny_llama

    examples = [tokenize_chat(tok, [{"role": "user", "content": f"question {i} " * (1 + i % 3)},
                                    {"role": "assistant", "content": "AB" * (1 + i)}]) for i in range(5)]
    model = tiny_llama(hidden_size=64, seed=1).eval()
    if implementation == "lorakern":
        assert use_fast_attention(model)
    else:
        model.set_attn_implementation(implementation)

    def token_losses(batch):
        inputs = {k: v for k, v in batch.items() if k != "labels"}
        if "position_ids" in inputs:  # transformers builds the block-diagonal mask from the positions
            inputs["attention_mask"] = None
        with torch.no_grad():
            logits = model(**inputs, use_cache=False).logits[:, :-1]
        return F.cross_entropy(logits.transpose(1, 2), batch["labels"][:, 1:], reduction="none")

    packed = pack_examples(examples, max_length=3 * max(map(len, examples)))
    assert [p.position_ids.count(0) for p in packed] == [3, 2]  # 5 examples in 2 rows
    losses = token_losses(Collator(0)(packed))
    by_content = {}
    for row, p in enumerate(packed):  # each example's predictions sit between its start and the next one's
        starts = [i for i, pos in enumerate(p.position_ids) if pos == 0] + [len(p)]
        for a, b in zip(starts, starts[1:]):
            by_content[tuple(p.input_ids[a:b])] = losses[row, a:b - 1]
    assert len(by_content) == len(examples)
    for ex in examples:
        alone = token_losses(Collator(0)([ex]))[0]
        torch.testing.assert_close(by_content[tuple(ex.input_ids)], alone, rtol=1e-5, atol=1e-5)


def test_an_eval_set_is_tokenized_once_and_its_long_records_left_out_of_the_loss_only(tok, tmp_path, monkeypatch,
                                                                                      capsys):
    from lorakern.train import data as data_mod
    from lorakern.train.pipeline import load_eval_set

    rows = [{"instruction": f"q{i}", "response": f"a{i}"} for i in range(3)] + [
        {"instruction": "long " * 40, "response": "x"}]
    path = write_jsonl(tmp_path / "eval.jsonl", rows)
    calls = []
    monkeypatch.setattr(data_mod, "tokenize_chat", lambda t, chat: calls.append(chat) or tokenize_chat(t, chat))
    chats, examples = load_eval_set(tok, path, max_length=64, option="--test-data", title="test set")
    assert len(calls) == len(rows)  # once per chat
    assert len(chats) == 4 and examples == [tokenize_chat(tok, c) for c in chats[:3]]
    assert "test set: 4 records from" in capsys.readouterr().out
