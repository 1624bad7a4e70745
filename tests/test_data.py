"""Data stage: formats and file types, bad records, dedup, split, masking, over-long records, cache."""

import csv
import json

import data_lists
import data_reference
import numpy as np
import pytest
from conftest import alpaca_records, write_json
from qctrain import data
from qctrain.errors import InputError
from qctrain.recipe import DataSection


def section(*paths, **settings) -> DataSection:
    sources = [p if isinstance(p, dict) else {"path": str(p)} for p in paths]
    return DataSection.model_validate({"sources": sources, "max_seq_length": 256, **settings})


def conversations(*paths, **settings):
    cfg = section(*paths, **settings)
    return data_lists.load_conversations(cfg.sources, cfg.on_bad_record)


EXPECTED_FIRST = [{"role": "user", "content": "Explain item 0 briefly.\n\nContext line 0\nsecond line"},
                  {"role": "assistant", "content": "Item 0 is explained here.\nIt has two lines."}]


def test_alpaca_json_with_system_and_history(tmp_path):
    path = write_json(tmp_path / "a.json", [{
        "instruction": "And now?", "input": "", "output": "Now this.", "system": "Be brief.",
        "history": [["First?", "First answer."]]}])
    convs, counts = conversations(path)
    assert convs == [{"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "First?"}, {"role": "assistant", "content": "First answer."},
        {"role": "user", "content": "And now?"}, {"role": "assistant", "content": "Now this."}], "tools": []}]
    assert counts[str(path)] == {"read": 1, "bad": 0, "kept": 1, "by_reason": {}, "examples": [],
                                 "unread_keys": {}}


def test_jsonl_csv_parquet_and_folder_give_the_same_conversations(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = alpaca_records(6)
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in records) + "\n",
                                      encoding="utf-8")
    with open(tmp_path / "a.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "a.parquet")
    folder = tmp_path / "parts"
    write_json(folder / "1.json", records[:3])
    write_json(folder / "2.json", records[3:])
    results = [conversations(tmp_path / name)[0] for name in ("a.jsonl", "a.csv", "a.parquet", "parts")]
    assert results[0][0] == {"messages": EXPECTED_FIRST, "tools": []}
    assert all(result == results[0] for result in results) and len(results[0]) == 6


def test_sharegpt_messages_and_auto_detection(tmp_path):
    sharegpt = write_json(tmp_path / "s.json", [{"conversations": [
        {"from": "system", "value": "S"}, {"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]}])
    messages = write_json(tmp_path / "m.json", [{"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"}]}])
    expected = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
                              {"role": "assistant", "content": "A"}], "tools": []}]
    assert conversations({"path": str(sharegpt), "format": "sharegpt"})[0] == expected
    assert conversations({"path": str(messages), "format": "messages"})[0] == expected
    assert conversations(sharegpt)[0] == expected and conversations(messages)[0] == expected


def test_column_mapping(tmp_path):
    path = write_json(tmp_path / "r.json", [{"question": "Q", "answer": "A"}])
    convs, _ = conversations({"path": str(path), "format": "alpaca",
                              "columns": {"instruction": "question", "output": "answer"}})
    assert convs == [{"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
                      "tools": []}]


@pytest.mark.parametrize("record, message", [
    ({"instruction": "Q"}, "field 'output' is missing"),
    ({"instruction": "Q", "output": None}, "field 'output' is null"),
    ({"instruction": 3, "output": "A"}, "field 'instruction' must be a string, got int"),
    ({"instruction": ["Q"], "output": "A"}, "field 'instruction' must be a string, got list"),
    ({"instruction": "Q", "output": "   "}, "no assistant turn with text"),
    ({"prompt": "Q"}, "cannot tell the format"),
])
def test_bad_record_error_names_file_index_and_field(tmp_path, record, message):
    path = write_json(tmp_path / "bad.json", [*alpaca_records(2), record])
    with pytest.raises(InputError) as err:
        conversations(path)
    assert str(err.value).startswith(f"{path}[2]: ") and message in str(err.value)


def test_bad_jsonl_line_is_reported_by_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "Q", "output": "A"}\n\n{"instruction": "Q2"}\n', encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{path}:3: field 'output' is missing"):
        conversations(path)


def test_skip_policy_counts_bad_records(tmp_path):
    path = write_json(tmp_path / "bad.json", [*alpaca_records(3), {"instruction": "Q"}, {"output": 1}])
    convs, counts = conversations(path, on_bad_record="skip")
    assert len(convs) == 3
    assert counts[str(path)]["bad"] == 2 and counts[str(path)]["read"] == 5
    assert counts[str(path)]["examples"][0].startswith(f"{path}[3]: field 'output' is missing")


def test_dedup_is_exact():
    convs = [[{"role": "user", "content": c}, {"role": "assistant", "content": "A"}] for c in "xyxzx"]
    unique, ids, removed = data_reference.dedup(convs)
    assert removed == 2 and [c[0]["content"] for c in unique] == ["x", "y", "z"]
    assert len(set(ids)) == 3


def test_split_is_deterministic_and_order_independent():
    """The stage's split (on digest arrays) picks the ids the list definition picks, whatever the order."""
    ids = [f"{i:016x}" for i in range(200)]
    digests = np.array([int(cid, 16) for cid in ids], dtype=np.uint64)

    def chosen(values, seed, fraction, count) -> set[str]:
        return {f"{d:016x}" for d in values[data.stage.split_mask(values, seed, fraction, count)].tolist()}

    first = chosen(digests, 42, 0.1, None)
    assert len(first) == 20 and first == data_lists.split_ids(ids, seed=42, fraction=0.1, count=None)
    assert chosen(digests[::-1], 42, 0.1, None) == first
    assert chosen(digests, 7, 0.1, None) != first
    assert chosen(digests, 7, 0.1, None) == data_lists.split_ids(ids, seed=7, fraction=0.1, count=None)
    assert len(chosen(digests, 42, None, 5)) == 5
    for seed, fraction, count in ((42, 0.1, None), (7, None, 5)):  # the no-copies shortcut picks the same
        np.testing.assert_array_equal(data.stage.split_mask(digests, seed, fraction, count, unique=True),
                                      data.stage.split_mask(digests, seed, fraction, count))
    with pytest.raises(InputError, match="would leave none"):
        data.stage.split_mask(digests[:3], seed=1, fraction=None, count=3)


def labels_of(tokenizer, messages, loss_on):
    template = data.template.training_template(data.resolve_chat_template("model", tokenizer), tokenizer, loss_on)
    ids, labels = data.tokenize([messages], tokenizer, template, loss_on)
    return ids[0], labels[0]


def test_assistant_only_masking(tokenizer):
    messages = [{"role": "system", "content": "Sys"}, {"role": "user", "content": "Question"},
                {"role": "assistant", "content": "First"}, {"role": "user", "content": "Again"},
                {"role": "assistant", "content": "Second answer"}]
    ids, labels = labels_of(tokenizer, messages, "assistant")
    supervised = tokenizer.decode([t for t, label in zip(ids, labels, strict=True) if label != data.IGNORE])
    # Phi-3.5's <|end|>, <|assistant|>... strip the whitespace after them (rstrip): the "\n" after each is
    # part of the special token, so decoding shows none.
    assert supervised == "First<|end|>Second answer<|end|><|endoftext|>"
    # Exactly the tokens from after each <|assistant|> through its <|end|>, and the final <|endoftext|>.
    assistant, end = (tokenizer.convert_tokens_to_ids(t) for t in ("<|assistant|>", "<|end|>"))
    expected = set()
    for start in (i for i, t in enumerate(ids) if t == assistant):
        expected.update(range(start + 1, ids.index(end, start) + 1))
    assert ids[-1] == tokenizer.eos_token_id
    assert {i for i, label in enumerate(labels) if label != data.IGNORE} == expected | {len(ids) - 1}
    assert all(labels[i] == ids[i] for i in expected)
    marked = data.pack.render_marked(ids, labels, tokenizer)
    assert marked.startswith("<|system|>Sys<|end|><|user|>Question<|end|><|assistant|>⟦First<|end|>⟧")


def test_loss_on_all_supervises_every_token(tokenizer):
    ids, labels = labels_of(tokenizer, EXPECTED_FIRST, "all")
    assert labels == ids


def test_named_file_and_unknown_templates(tokenizer, tmp_path):
    named = data.resolve_chat_template("phi3_5", tokenizer)
    assert named == tokenizer.chat_template
    jinja = tmp_path / "t.jinja"
    jinja.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}", encoding="utf-8")
    assert data.resolve_chat_template(str(jinja), tokenizer) == jinja.read_text()
    with pytest.raises(InputError, match=r"unknown template 'phi35' \(did you mean 'phi3_5'\?\)"):
        data.resolve_chat_template("phi35", tokenizer)
    with pytest.raises(InputError, match="no {% generation %} markers"):
        data.template.training_template(jinja.read_text(), tokenizer, "assistant")


def test_overlong_records_dropped_or_truncated():
    ids = [[1] * 5, [1] * 20, [1] * 20]
    labels = [[1] * 5, [1] * 20, [data.IGNORE] * 15 + [1] * 5]
    kept, _, counts = data_lists.fit_length(ids, labels, 10, "drop")
    assert len(kept) == 1 and counts["overlong_dropped"] == 2
    kept, kept_labels, counts = data_lists.fit_length(ids, labels, 10, "truncate")
    assert [len(k) for k in kept] == [5, 10] and counts["overlong_truncated"] == 2
    assert counts["unsupervised_dropped"] == 1  # its answer lay past the cut


def test_prepare_reports_packs_and_caches(tokenizer, tmp_path):
    path = write_json(tmp_path / "d.json", alpaca_records(40) + alpaca_records(5))  # 5 duplicates
    cfg = section(path, eval={"count": 4})
    first = data.prepare(cfg, tokenizer, tmp_path / "out")
    report = first.report
    assert not first.cached
    assert report["records_read"] == 45 and report["duplicates"] == 5
    assert report["train"]["records"] == 36 and report["eval"]["records"] == 4
    assert 0 < report["train"]["supervised_fraction"] < 1
    assert 0.7 < report["train"]["packing_efficiency"] <= 1
    assert set(first.train.column_names) == {"input_ids", "labels", "seq_lengths"}
    assert sum(sum(s) for s in first.train["seq_lengths"]) == report["train"]["tokens"]
    split = json.loads((first.dir / "split.json").read_text())
    assert split["method"] == "count" and len(split["eval_ids"]) == 4

    second = data.prepare(cfg, tokenizer, tmp_path / "out")
    assert second.cached and second.fingerprint == first.fingerprint
    assert second.train["input_ids"] == first.train["input_ids"]

    write_json(path, alpaca_records(41))  # changed content: a new fingerprint
    assert not data.prepare(cfg, tokenizer, tmp_path / "out").cached


def test_prepare_refuses_when_nothing_left(tokenizer, tmp_path):
    path = write_json(tmp_path / "d.json", alpaca_records(10))
    with pytest.raises(InputError, match="no training record left.*longer than data.max_seq_length=8"):
        data.prepare(section(path, max_seq_length=8), tokenizer, tmp_path / "out")
    assert not list((tmp_path / "out").glob("prepared/*"))


def test_csv_errors_name_the_line_where_the_record_starts(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('instruction,output\n"multi\nline",ok\nQ,\n', encoding="utf-8")
    with pytest.raises(InputError, match=rf"^{path}:4: no assistant turn"):
        conversations(path, on_bad_record="error")
