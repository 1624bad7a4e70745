"""The streaming preparation (readers -> forked workers -> token files -> dedup, split, fit, pack from arrays ->
Arrow files) against the reference path (every source read into one list, deduplicated, tokenized the library
way: tokenizer.apply_chat_template with the assistant mask), record by record, on a mixed corpus: every format
and file type, tools, Chinese, bad records skipped; and the streaming readers' bounded memory and errors."""

import csv
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import data_lists
import data_reference
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import alpaca_records, write_json
from qctrain import data
from qctrain.data import stage
from qctrain.errors import InputError
from qctrain.recipe import DataSection

SHAPES = Path(__file__).resolve().parent / "data" / "shapes"


def mixed_corpus(folder: Path) -> list[Path]:
    """Every shape file (alpaca with system and history, sharegpt, glaive and OpenAI tools, typed parts, bad
    shapes) and generated alpaca records (English and Chinese, with duplicates) as JSON, JSONL, CSV and Parquet."""
    folder.mkdir(parents=True)
    paths = [Path(shutil.copy(SHAPES / name, folder / name)) for name in sorted(p.name for p in SHAPES.iterdir())]
    records = alpaca_records(120)
    paths.append(write_json(folder / "alpaca.json", records[:60] + records[:5]))  # 5 duplicates
    lines = [json.dumps(r, ensure_ascii=False) for r in records[60:90]] + ["{not json", '"a string"']
    (folder / "more.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    paths.append(folder / "more.jsonl")
    with open(folder / "table.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, ["instruction", "input", "output"])
        writer.writeheader()
        writer.writerows(records[90:105])
    paths.append(folder / "table.csv")
    pq.write_table(pa.Table.from_pylist(records[105:120]), folder / "rows.parquet", row_group_size=4)
    paths.append(folder / "rows.parquet")
    return paths


def reference(sources, tokenizer, template: str) -> tuple[list[list[int]], list[list[int]], dict]:
    conversations, counts = data_lists.load_conversations(sources, "skip")
    conversations, _, _ = data_reference.dedup(conversations)
    return *data.tokens.tokenize_reference(conversations, tokenizer, template, "assistant"), counts


@pytest.fixture(params=["model", "qwen3"])  # Phi-3.5's template (tools by the fallback), a template with tools
def small_chunks(request, monkeypatch):
    """Chunks of 7 records and two forked workers, so a small corpus goes through the whole worker path (and is
    written as two shards)."""
    monkeypatch.setattr(stage, "CHUNK_RECORDS", 7)
    monkeypatch.setattr(data.tokens, "CHUNK_RECORDS", 7)
    monkeypatch.setenv(data.workers.PREP_WORKERS_ENV, "2")
    return request.param


def test_streaming_equals_the_reference_record_by_record(tokenizer, tmp_path, small_chunks):
    paths = mixed_corpus(tmp_path / "corpus")
    cfg = DataSection.model_validate({"sources": [{"path": str(p)} for p in paths], "eval": None,
                                      "chat_template": small_chunks, "max_seq_length": 4096, "packing": False,
                                      "on_bad_record": "skip"})
    prepared = data.prepare(cfg, tokenizer, tmp_path / "out")
    template = data.template.training_template(data.resolve_chat_template(small_chunks, tokenizer), tokenizer,
                                               "assistant")
    ids, labels, counts = reference(cfg.sources, tokenizer, template)
    assert len(ids) > 120 and any("\u4e00" <= ch <= "\u9fff" for ch in tokenizer.decode(ids[-1]))
    assert prepared.train["input_ids"] == ids
    assert prepared.train["labels"] == labels
    assert [p.name for p in sorted(prepared.dir.glob("train-*"))] == ["train-00000-of-00002.arrow",
                                                                      "train-00001-of-00002.arrow"]
    report = prepared.report
    for path, tally in counts.items():
        assert report["sources"][path]["read"] == tally["read"]
        assert report["sources"][path]["bad"] == tally["bad"]
        assert report["sources"][path]["bad_by_reason"] == dict(sorted(tally["by_reason"].items()))
        assert report["sources"][path]["examples"] == tally["examples"]
    totals = report["counts"]
    assert totals["duplicates"] == 5 and totals["bad"] > 8
    assert totals["read"] == totals["kept"] + totals["bad"] + totals["duplicates"] + totals["overlong"] \
        + totals["unsupervised"]
    assert totals["kept"] == totals["train"] == len(ids)


def test_streaming_packs_split_and_truncates_as_the_list_path(tokenizer, tmp_path, small_chunks):
    """Packing, a fraction split and truncation: the same rows as the list functions give on the reference
    tokens (pack.to_dataset_flat over fit_length_flat), and the eval ids those of split_ids."""
    paths = mixed_corpus(tmp_path / "corpus")
    cfg = DataSection.model_validate({"sources": [{"path": str(p)} for p in paths], "eval": {"fraction": 0.2},
                                      "chat_template": small_chunks, "max_seq_length": 64, "packing": True,
                                      "on_overlong": "truncate", "on_bad_record": "skip", "seed": 7})
    prepared = data.prepare(cfg, tokenizer, tmp_path / "out")
    template = data.template.training_template(data.resolve_chat_template(small_chunks, tokenizer), tokenizer,
                                               "assistant")
    conversations, _ = data_lists.load_conversations(cfg.sources, "skip")
    conversations, ids, _ = data_reference.dedup(conversations)
    eval_ids = data_lists.split_ids(ids, 7, 0.2, None)
    split = json.loads((prepared.dir / "split.json").read_text())
    assert split["eval_ids"] == [cid for cid in ids if cid in eval_ids]
    for name, wanted in (("train", False), ("eval", True)):
        part = [c for c, cid in zip(conversations, ids, strict=True) if (cid in eval_ids) == wanted]
        tokens = data.tokens.Tokenized.from_lists(*data.tokens.tokenize_reference(part, tokenizer, template,
                                                                                   "assistant"))
        fitted, fit_counts = data_reference.fit_length_flat(tokens, 64, "truncate")
        expected = data_reference.to_dataset_flat(fitted, True, 64, 7)
        got = getattr(prepared, name)
        assert len(list(prepared.dir.glob(f"{name}-*-of-00002.arrow"))) == 2
        assert got.column_names == expected.column_names == ["input_ids", "labels", "seq_lengths"]
        assert got.features == expected.features
        for column in expected.column_names:
            assert got[column] == expected[column], (name, column)
        assert prepared.report[name]["overlong_truncated"] == fit_counts["overlong_truncated"] > 0
        assert {k: v for k, v in prepared.report[name].items() if k not in ("sequences", "packing_efficiency",
                                                                            "conversations")} \
            == {**fit_counts, **data_reference.token_stats_flat(fitted)}
    first_eval = next(c for c, cid in zip(conversations, ids, strict=True) if cid in eval_ids)
    [messages], [tools], _ = data.template.template_inputs([first_eval])
    assert tools, "the first held-out record calls tools: its prompt carries them"
    assert prepared.report["heldout_prompts"][0] == {"messages": messages[:-1], "tools": tools}
    cached = data.prepare(cfg, tokenizer, tmp_path / "out")
    assert cached.cached and cached.train["input_ids"] == prepared.train["input_ids"]


def test_first_bad_record_in_read_order_stops_the_workers(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setattr(stage, "CHUNK_RECORDS", 5)
    monkeypatch.setenv(data.workers.PREP_WORKERS_ENV, "2")
    records = alpaca_records(40)
    records[23] = {"instruction": "no output"}
    records[31] = {"output": "no instruction"}
    path = write_json(tmp_path / "d.json", records)
    cfg = DataSection.model_validate({"sources": [{"path": str(path)}], "on_bad_record": "error"})
    with pytest.raises(InputError, match=r"d\.json\[23\]: field 'output' is missing \(set data.on_bad_record"):
        data.prepare(cfg, tokenizer, tmp_path / "out")
    assert not list((tmp_path / "out" / "prepared").iterdir())  # nothing half-written left behind


@pytest.mark.parametrize("text", [
    '[{"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}]',
    '[{"instruction": "a", "output": "b"}] x',
    '{"instruction": "a", "output": "b"}\n{"instruction": "c"}',
    '[{"instruction": "a", "output": "b"}, ',
    '[{"instruction": "a", "output": "b"},]',
    '[{"instruction": "a", "output": "b"} {"instruction": "c"}]',
    '[{"instruction": "a\nb", "output": "b"}]',
])
def test_json_array_errors_name_the_place_json_names(tmp_path, text):
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(InputError) as err:
        list(data.sources.read_file(path))
    place = expected.value
    assert str(err.value) == f"{path}:{place.lineno}:{place.colno}: invalid JSON: {place.msg}"


@pytest.mark.parametrize(("text", "message"), [
    ('{"instruction": "a", "output": "b"}', "expected a JSON array of records, got an object (keys: "),
    ('"text"', "expected a JSON array of records, got str"),
    ("  \n ", "file is empty"),
])
def test_json_that_is_not_an_array(tmp_path, text, message):
    path = tmp_path / "d.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(InputError, match=re.escape(f"{path}: {message}")):
        list(data.sources.read_file(path))


def test_json_array_read_across_block_edges(tmp_path, monkeypatch):
    """Records cut by the edge of the window, long strings and escapes: the same records json.loads reads."""
    monkeypatch.setattr(data.sources, "BLOCK", 37)
    records = [{"instruction": "é" * (i * 7 % 50) + '\\"x\\u00e9', "output": "中文" * i, "n": [i, {"k": None}]}
               for i in range(60)]
    path = tmp_path / "d.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    assert [r.fields for r in data.sources.read_file(path)] == records
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(records).encode())
    assert [r.fields for r in data.sources.read_file(path)] == records


def test_broken_big_file_refused_at_once_in_bounded_memory(tmp_path):
    """A JSON array broken near its start, 300 MB long: refused in well under the time to read it, without
    holding it (the reader stops at the error)."""
    path = tmp_path / "big.json"
    with open(path, "wb") as handle:
        handle.write(b'[{"instruction": "a", "output": "b"}, {"instruction": oops}')
        line = b', {"instruction": "' + b"x" * 1000 + b'", "output": "y"}\n'
        for _ in range(300):
            handle.write(line * 1000)
        handle.write(b"]")
    # VmHWM, not ru_maxrss: the latter keeps the peak of the forked pytest process across exec
    code = ("import re, sys; from pathlib import Path; from qctrain import data\n"
            "try:\n    list(data.sources.read_file(Path(sys.argv[1])))\nexcept Exception as err:\n    print(err)\n"
            "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read())[1]) // 1024)")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    message, peak_mib = out.stdout.splitlines()
    assert message.startswith(f"{path}:1:55: invalid JSON: Expecting value")
    assert int(peak_mib) < 300


def test_hub_rows_come_a_batch_at_a_time_as_they_are(monkeypatch):
    """A Hub set is iterated from its (memory-mapped) table in batches, never listed whole: each row arrives
    as datasets gives it, numbered in order."""
    import datasets

    rows = [{"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}],
             "system": None if i % 2 else "be brief"} for i in range(2500)]
    calls = []

    def load_dataset(name, split, revision):
        calls.append((name, split, revision))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    src = DataSection.model_validate({"sources": [{"path": "hub:acme/chats", "split": "train"}]}).sources[0]
    records = list(data.sources.read_source(src))
    assert calls == [("acme/chats", "train", None)]
    assert [r.fields for r in records] == rows
    assert records[2499].where == "hub:acme/chats[2499]"


def test_worker_pipes_are_widened():
    import fcntl

    if not hasattr(fcntl, "F_GETPIPE_SZ"):
        pytest.skip("no pipe sizes on this platform")
    with data.workers.pool(1) as pool:  # every pool the data stage forks
        for queue in (pool._inqueue, pool._outqueue):
            assert fcntl.fcntl(queue._writer.fileno(), fcntl.F_GETPIPE_SZ) == data.workers.PIPE_BYTES


def test_token_store_gives_back_ids_and_labels(tmp_path):
    store = stage.TokenStore(tmp_path / "tokens")
    ids = np.array([5, 0, 32063, 7, 1, 2**31 - 1], dtype=np.int32)
    labels = np.array([data.IGNORE, 0, 32063, data.IGNORE, 1, 2**31 - 1], dtype=np.int32)
    first = store.append(data.tokens.Tokenized(ids[:3], labels[:3], np.array([0, 3])))
    second = store.append(data.tokens.Tokenized(ids[3:], labels[3:], np.array([0, 3])))
    with pytest.raises(ValueError, match="neither"):
        store.append(data.tokens.Tokenized(ids[:2], np.array([5, 9], dtype=np.int32), np.array([0, 2])))
    store.close()
    got_ids, got_labels = store.gather(np.array([second, first]), np.array([3, 2]))
    assert got_ids.tolist() == [7, 1, 2**31 - 1, 5, 0]
    assert got_labels.tolist() == [data.IGNORE, 1, 2**31 - 1, data.IGNORE, 0]
