"""Preference data (method dpo and kto, issue 23) on the tiny model's Phi-3.5 tokenizer: every shape normalised to
TRL's standard rows, tokenized exactly as TRL's own DPOTrainer / KTOTrainer processing tokenizes the same rows
(tokens, the prompt/completion split, decoded in the failure message), and every check counted by reason."""

import json
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO, write_json
from qctrain.data import extend_template, pairs, resolve_chat_template
from qctrain.data.preference import PAIR_BAD_REASONS, to_preference_rows
from qctrain.data.sources import Record, read_source
from qctrain.data.stage import prepare
from qctrain.data.tokens import rust_backend
from qctrain.errors import InputError
from qctrain.recipe import DataSection, DataSource

SHAPES = REPO / "tests" / "data" / "preference"
DPO_FILES = ("trl_strings.jsonl", "trl_messages.jsonl", "implicit.jsonl", "ultrafeedback.jsonl",
             "llamafactory_ranking.json", "alpaca_ranking.json")
KTO_FILES = ("kto.jsonl", "kto_messages.json")


def rows_of(name: str, method: str) -> list[dict]:
    src = DataSource(path=str(SHAPES / name))
    return [row for record in read_source(src) for row in to_preference_rows(record, "auto", method, {})]


def template_of(name: str, tokenizer) -> str:
    return extend_template(resolve_chat_template(name, tokenizer), "inline")


def trl_ids(row: dict, method: str, tokenizer, template: str, tmp_path: Path) -> dict[str, list[int]]:
    """TRL's own processing (DPOTrainer/KTOTrainer._prepare_dataset) of one normalised row, with the template as the
    tokenizer's (one row per data set: Arrow would merge the tool-call arguments of different rows into one struct)."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer

    trainer, config = (DPOTrainer, DPOConfig) if method == "dpo" else (KTOTrainer, KTOConfig)
    probe = trainer.__new__(trainer)
    probe._tokenizer, probe.calculate_KL = tokenizer, False
    dataset = Dataset.from_list([{**{k: v for k, v in row.items() if k != "tools"}, "tools": json.dumps(row["tools"])}])
    original = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        out = trainer._prepare_dataset(probe, dataset, tokenizer, config(
            output_dir=str(tmp_path / "trl"), max_length=None, report_to="none", use_cpu=True), "eval")[0]
    finally:
        tokenizer.chat_template = original
    return {name: out[name] for name in pairs.ID_COLUMNS[method]}


def decoded(ids: dict[str, list[int]], tokenizer) -> dict[str, str]:
    return {name: tokenizer.decode(value) for name, value in ids.items()}


# --- shapes ---

def test_every_shape_normalises_to_trl_standard_rows():
    strings, explicit_tools = rows_of("trl_strings.jsonl", "dpo"), rows_of("trl_messages.jsonl", "dpo")[1]
    assert strings[0] == {"prompt": [{"role": "user", "content": "The sky is"}],
                          "chosen": [{"role": "assistant", "content": " blue."}],
                          "rejected": [{"role": "assistant", "content": " green."}], "tools": []}
    assert [m["role"] for m in explicit_tools["chosen"]] == ["assistant", "tool", "assistant"]
    assert explicit_tools["chosen"][0]["tool_calls"][0]["function"] == {"name": "weather",
                                                                         "arguments": {"city": "Oslo"}}
    multi_turn, implicit_text = rows_of("implicit.jsonl", "dpo")
    assert [m["content"] for m in multi_turn["prompt"]] == ["What is 2+2?", "4.", "And 3+3?"]
    assert multi_turn["chosen"] == [{"role": "assistant", "content": "6."}]
    # TRL's extract_prompt on strings: the shared text, less the space before the difference
    assert (implicit_text["prompt"][0]["content"], implicit_text["chosen"][0]["content"]) == ("The grass is", " green.")
    [ultrafeedback] = rows_of("ultrafeedback.jsonl", "dpo")  # prompt_id, scores and messages ignored
    assert ultrafeedback["prompt"] == [{"role": "user", "content": "What is 2+2?"}]
    assert ultrafeedback["chosen"] == [{"role": "assistant", "content": "2+2 is 4."}]
    _, multi, function_call = rows_of("llamafactory_ranking.json", "dpo")
    assert [m["role"] for m in multi["prompt"]] == ["system", "user", "assistant", "user"]
    assert function_call["chosen"][0]["tool_calls"][0]["function"]["name"] == "area"
    assert function_call["tools"][0]["function"]["name"] == "area"
    [alpaca] = rows_of("alpaca_ranking.json", "dpo")
    assert alpaca["prompt"] == [{"role": "system", "content": "Be terse."}, {
        "role": "user", "content": "Summarise in one word.\n\nThe cat sat on the mat all afternoon."}]
    messages, sharegpt = rows_of("kto_messages.json", "kto")
    assert (messages["label"], sharegpt["label"]) == (True, False)
    assert sharegpt["completion"] == [{"role": "assistant", "content": "No."}]
    # a pair under method kto: two labelled completions
    unpaired = rows_of("trl_strings.jsonl", "kto")
    assert [(r["completion"][0]["content"], r["label"]) for r in unpaired[:2]] == [(" blue.", True),
                                                                                   (" green.", False)]


# Phi-3.5's template (tools written by our extension), and one that renders tools itself
@pytest.mark.parametrize("template_name", ["model", "qwen3"])
@pytest.mark.parametrize(("name", "method"), [*((f, "dpo") for f in DPO_FILES), *((f, "kto") for f in KTO_FILES),
                                              ("llamafactory_ranking.json", "kto")])
def test_each_shape_tokenizes_as_trls_own_processing(tokenizer, tmp_path, name, method, template_name):
    template = template_of(template_name, tokenizer)
    rows = rows_of(name, method)
    fast = pairs.encode_rows(rows, method, tokenizer, rust_backend(tokenizer), template)
    for i, row in enumerate(rows):
        expected = trl_ids(row, method, tokenizer, template, tmp_path)
        got = fast.row(i)
        assert got == expected, f"{name}[{i}]: ours {decoded(got, tokenizer)} != TRL's {decoded(expected, tokenizer)}"
        assert got == pairs.reference_ids(row, method, tokenizer, template)
        # the split: the prompt ends with the assistant's header, each completion is the reply and its end tokens
        assert decoded(got, tokenizer)["prompt_ids"].rstrip().endswith(
            "<|assistant|>" if template_name == "model" else "<|im_start|>assistant")
        assert not fast.merged[i]


def test_a_prompt_that_merges_into_its_completion_is_split_as_trl_splits_it_and_counted(tokenizer, tmp_path):
    # a template whose generation prompt ends with text its assistant turns do not have: the prompt's last tokens
    # are not a prefix of prompt + completion (TRL warns once; we count it)
    template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
                "{% if add_generation_prompt %}<|assistant|>Reply:{% endif %}")
    rows = rows_of("trl_strings.jsonl", "dpo")
    fast = pairs.encode_rows(rows, "dpo", tokenizer, rust_backend(tokenizer), template)
    assert fast.merged.all()
    for i, row in enumerate(rows):
        assert fast.row(i) == trl_ids(row, "dpo", tokenizer, template, tmp_path)
    path = write_json(tmp_path / "p.json", [json.loads(line) for line in (SHAPES / "trl_strings.jsonl").open()])
    template_file = tmp_path / "t.jinja"
    template_file.write_text(template)
    report = prepare(DataSection.model_validate({"sources": [{"path": str(path)}], "eval": None, "packing": False,
                                                 "chat_template": str(template_file)}),
                     tokenizer, tmp_path / "out", method="dpo").report
    assert report["train"]["boundary_merged"] == 2


def test_prepare_writes_the_rows_trl_would_make_from_every_shape(tokenizer, tmp_path):
    """The data stage end to end (several sources, streamed, cached): every row it writes is TRL's processing of
    one normalised record, and every record read is accounted for."""
    cfg = DataSection.model_validate({"sources": [{"path": str(SHAPES / f)} for f in DPO_FILES], "eval": None,
                                      "packing": False})
    prepared = prepare(cfg, tokenizer, tmp_path / "out", method="dpo")
    template = template_of("model", tokenizer)
    expected = Counter(json.dumps(trl_ids(row, "dpo", tokenizer, template, tmp_path))
                       for name in DPO_FILES for row in rows_of(name, "dpo"))
    assert Counter(json.dumps(row) for row in prepared.train) == expected
    assert prepared.train.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    counts = prepared.report["counts"]
    assert counts["read"] == counts["kept"] == counts["train"] == sum(expected.values()) == 11
    assert prepare(cfg, tokenizer, tmp_path / "out", method="dpo").cached
    assert prepare(cfg, tokenizer, tmp_path / "out", method="kto").fingerprint != prepared.fingerprint


def test_kto_rows_carry_their_labels_and_the_balance(tokenizer, tmp_path):
    cfg = DataSection.model_validate({"sources": [{"path": str(SHAPES / f)} for f in (*KTO_FILES,
                                                                                      "trl_strings.jsonl")],
                                      "eval": None, "packing": False})
    prepared = prepare(cfg, tokenizer, tmp_path / "out", method="kto")
    assert prepared.train.column_names == ["prompt_ids", "completion_ids", "label"]
    # kto.jsonl's ("The sky is", " green.", false) is the rejected half of trl_strings.jsonl's first pair: one copy
    assert sorted(prepared.train["label"]) == [False] * 3 + [True] * 4
    assert prepared.report["kto"] == {"desirable": 4, "undesirable": 3,
                                      "desirable_weight_range": [0.75, 1.0], "undesirable_weight_range": [1.0, 1.33]}
    # a pair is two rows read: read = kept + bad + duplicates + overlong holds in rows
    assert prepared.report["sources"][str(SHAPES / "trl_strings.jsonl")]["read"] == 4
    counts = prepared.report["counts"]
    assert (counts["read"], counts["kept"], counts["duplicates"]) == (8, 7, 1)


# --- the counted checks ---

BAD = [  # (record, the reason it is bad under method dpo)
    ({"prompt": "Hi", "chosen": "Hello.", "rejected": "Hello."}, "identical_sides"),
    ({"prompt": "Hi", "chosen": "   ", "rejected": "Hello."}, "empty_side"),
    ({"prompt": "Hi", "chosen": [], "rejected": "Hello."}, "empty_side"),
    ({"chosen": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A"}],
      "rejected": [{"role": "user", "content": "Q2"}, {"role": "assistant", "content": "B"}]},
     "implicit_prompt_mismatch"),  # nothing shared
    ({"chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                 {"role": "user", "content": "More?"}, {"role": "assistant", "content": "B"}],
      "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "C"},
                   {"role": "user", "content": "More?"}, {"role": "assistant", "content": "D"}]},
     "implicit_prompt_mismatch"),  # they differ before their last user turn
    ({"prompt": "Something else?", "chosen": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}],
      "rejected": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "B"}]},
     "implicit_prompt_mismatch"),  # UltraFeedback's prompt is not the shared user turn
    ({"chosen": "Apples.", "rejected": "Pears."}, "implicit_prompt_mismatch"),  # strings sharing no text
    ({"prompt": [{"role": "system", "content": "Be kind."}], "chosen": "A", "rejected": "B"}, "no_user_prompt"),
    ({"prompt": "Hi", "chosen": [{"role": "assistant", "content": "A"}, {"role": "user", "content": "And?"},
                                  {"role": "assistant", "content": "B"}], "rejected": "C"},
     "completion_not_assistant"),
    ({"prompt": "Hi", "chosen": [{"role": "assistant", "content": "A", "weight": 0}], "rejected": "B"},
     "unhonoured_weight"),
    ({"prompt": "Hi", "chosen": 3, "rejected": "B"}, "bad_field"),
    ({"prompt": "Hi", "chosen": [{"role": "wizard", "content": "A"}], "rejected": "B"}, "unknown_role"),
    ({"question": "Hi", "answer": "A"}, "unknown_format"),
]
KTO_BAD = [
    ({"prompt": "Hi", "completion": "Hello.", "label": "true"}, "bad_field"),  # a JSON boolean, not text
    ({"prompt": "Hi", "completion": "Hello.", "label": 1}, "bad_field"),
    ({"prompt": "Hi", "completion": "Hello."}, "bad_field"),
    ({"messages": [{"role": "user", "content": "Hi"}], "label": True}, "empty_side"),
    ({"messages": [{"role": "assistant", "content": "Hi"}], "label": True}, "no_user_prompt"),
]


def test_pair_reasons_are_documented():
    assert set(PAIR_BAD_REASONS) <= {reason for _, reason in BAD + KTO_BAD}  # each has its test case


@pytest.mark.parametrize(("method", "cases"), [("dpo", BAD), ("kto", KTO_BAD)])
def test_each_check_is_a_counted_reason(tokenizer, tmp_path, method, cases):
    for record, reason in cases:  # one record at a time: each is bad for exactly its reason
        with pytest.raises(Exception) as err:
            to_preference_rows(Record("f.jsonl:1", record), "auto", method, {})
        assert getattr(err.value, "reason", None) == reason, (record, str(err.value))
    good = {"prompt": "Hi", "chosen": "Hello there.", "rejected": "Go away."} if method == "dpo" else \
        {"prompt": "Hi", "completion": "Hello there.", "label": True}
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [good, good, *(record for record, _ in cases)]) + "\n")
    cfg = DataSection.model_validate({"sources": [{"path": str(path)}], "eval": None, "packing": False,
                                      "on_bad_record": "skip"})
    report = prepare(cfg, tokenizer, tmp_path / "out", method=method).report
    counts = report["counts"]
    assert counts["bad_by_reason"] == dict(sorted(Counter(reason for _, reason in cases).items()))
    assert (counts["kept"], counts["duplicates"], counts["bad"]) == (1, 1, len(cases))
    assert counts["read"] == counts["kept"] + counts["bad"] + counts["duplicates"] + counts["overlong"]
    # under on_bad_record: error the first bad record stops the run, named by file, line and reason
    with pytest.raises(InputError) as err:
        prepare(cfg.model_copy(update={"on_bad_record": "error"}), tokenizer, tmp_path / "out2", method=method)
    assert str(err.value).startswith(f"{path}:3: ") and "on_bad_record: skip" in str(err.value)


def test_unread_keys_are_refused_or_counted_like_sft_data(tokenizer, tmp_path):
    path = write_json(tmp_path / "p.json", [{"prompt": "Hi", "chosen": "Hello.", "rejected": "Go.", "votes": 3,
                                             "score_chosen": 8, "chosen_model": "x"}])
    cfg = DataSection.model_validate({"sources": [{"path": str(path)}], "eval": None, "packing": False})
    with pytest.raises(InputError, match=r"key 'votes' not read \(not a field of the preference format"):
        prepare(cfg, tokenizer, tmp_path / "out", method="dpo")
    skip = cfg.model_copy(update={"on_bad_record": "skip"})
    assert prepare(skip, tokenizer, tmp_path / "out", method="dpo").report["counts"]["unread_keys"] == {"votes": 1}


def _long_pair(words: int) -> dict:
    return {"prompt": " ".join(f"word{i}" for i in range(words)), "chosen": "Yes.", "rejected": "No, never."}


def test_overlong_pairs_are_dropped_or_their_prompt_cut_from_the_left(tokenizer, tmp_path):
    path = write_json(tmp_path / "p.json", [_long_pair(3), _long_pair(60),
                                            {"prompt": "Hi", "chosen": "x " * 80, "rejected": "No."}])
    cfg = DataSection.model_validate({"sources": [{"path": str(path)}], "eval": None, "packing": False,
                                      "max_seq_length": 48})
    dropped = prepare(cfg, tokenizer, tmp_path / "a", method="dpo")
    assert dropped.report["counts"]["overlong"] == 2 and dropped.train.num_rows == 1
    truncated = prepare(cfg.model_copy(update={"on_overlong": "truncate"}), tokenizer, tmp_path / "b", method="dpo")
    counts = truncated.report["counts"]
    # the long prompt is cut; the pair whose chosen reply alone does not fit cannot be, and is dropped
    assert (counts["truncated"], counts["overlong"], truncated.train.num_rows) == (1, 1, 2)
    template = template_of("model", tokenizer)
    full = trl_ids(rows_of_record(_long_pair(60)), "dpo", tokenizer, template, tmp_path)
    short = trl_ids(rows_of_record(_long_pair(3)), "dpo", tokenizer, template, tmp_path)
    [cut] = [row for row in truncated.train if row != short]
    longest = max(len(full["chosen_ids"]), len(full["rejected_ids"]))
    assert len(cut["prompt_ids"]) + longest == 48  # exactly the excess went
    assert cut["prompt_ids"] == full["prompt_ids"][-len(cut["prompt_ids"]):]  # from the left
    assert (cut["chosen_ids"], cut["rejected_ids"]) == (full["chosen_ids"], full["rejected_ids"])  # both alike


def rows_of_record(record: dict) -> dict:
    [row] = to_preference_rows(Record("r", record), "auto", "dpo", {})
    return row


def test_held_out_pairs_are_split_off_and_their_prompts_kept_for_the_card(tokenizer, tmp_path):
    path = REPO / "data" / "style_pairs.json"
    cfg = DataSection.model_validate({"sources": [{"path": str(path)}], "eval": {"count": 8}, "packing": False})
    prepared = prepare(cfg, tokenizer, tmp_path / "out", method="dpo")
    assert (prepared.train.num_rows, prepared.eval.num_rows) == (32, 8)
    prompts = prepared.report["heldout_prompts"]
    assert len(prompts) == 3 and all(p[-1]["role"] == "user" for p in prompts)
    split = json.loads((prepared.dir / "split.json").read_text())
    assert split["method"] == "count" and len(split["eval_ids"]) == 8
    eval_prompts = {tokenizer.decode(row["prompt_ids"]) for row in prepared.eval}
    assert all(any(p[-1]["content"] in text for text in eval_prompts) for p in prompts)
