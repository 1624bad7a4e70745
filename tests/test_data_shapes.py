"""Real-world record shapes on Phi-3.5's tokenizer: each file in tests/data/shapes/ is prepared the way a run
prepares it, and the prepared tokens are decoded to check what the model sees and what it is trained on:
system prompts and tool definitions present but not trained on, tool calls trained on, tool results and
prompts not. Bad shapes are skipped and counted by reason (or refused, one line naming file, line and turn)."""

import json
import re
from pathlib import Path

import data_lists
import data_reference
import pytest
from conftest import write_json
from qctrain import data
from qctrain.errors import InputError
from qctrain.recipe import DataSection

SHAPES = Path(__file__).resolve().parent / "data" / "shapes"


def prepared_records(tokenizer, tmp_path, *paths, **settings) -> tuple[list[tuple[str, list[str]]], dict]:
    """Per prepared record (in input order): the decoded text and its supervised spans; and the report."""
    cfg = DataSection.model_validate({"sources": [{"path": str(p)} for p in paths], "eval": None,
                                      "max_seq_length": 1024, "packing": False, "dedup": False, **settings})
    prepared = data.prepare(cfg, tokenizer, tmp_path / "out")
    records = []
    for ids, labels in zip(prepared.train["input_ids"], prepared.train["labels"], strict=True):
        marked = data.pack.render_marked(ids, labels, tokenizer)
        records.append((marked.replace("⟦", "").replace("⟧", ""), re.findall(r"⟦(.*?)⟧", marked, flags=re.S)))
    return records, prepared.report


def supervised(spans: list[str]) -> str:
    return "\n".join(spans)


def test_sharegpt_system_top_level_and_first_turn(tokenizer, tmp_path):
    (pirate, pirate_spans), (oneword, oneword_spans) = prepared_records(tokenizer, tmp_path,
                                                                        SHAPES / "sharegpt_system.json")[0]
    assert pirate.startswith("<|system|>You are a pirate. Answer in pirate speech.<|end|><|user|>Where is")
    assert pirate_spans == ["Arr, buried under the old palm tree!<|end|><|endoftext|>"]
    assert oneword.startswith("<|system|>You answer in one word.<|end|><|user|>Capital of France?<|end|>")
    assert oneword_spans == ["Paris.<|end|>", "Rome.<|end|><|endoftext|>"]


def test_glaive_function_call_observation_and_tools_string(tokenizer, tmp_path):
    (tools_record, spans), (plain, plain_spans) = prepared_records(tokenizer, tmp_path,
                                                                   SHAPES / "glaive_toolcall.json")[0]
    system = tools_record.split("<|end|>")[0]
    assert system.startswith("<|system|>You are a careful geometry assistant.\n\n" + data.template.TOOLS_HEADER)
    tools = json.loads(system.split(data.template.TOOLS_HEADER)[1])
    assert [t["function"]["name"] for t in tools] == ["calculate_area"] and tools[0]["type"] == "function"
    assert tools[0]["function"]["parameters"]["required"] == ["shape", "dimensions"]
    call = '{"tool_calls": [{"name": "calculate_area", "arguments": {"shape": "rectangle", "dimensions": [5, 3]}}]}'
    result = '<|user|>{"tool_result": {"name": "calculate_area", "content": {"area": 15}}}<|end|>'  # JSON as JSON
    assert spans == [f"{call}<|end|>", "The rectangle's area is 15 square units.<|end|><|endoftext|>"]
    assert result in tools_record and '"area": 15' not in supervised(spans) and "\\" not in tools_record
    assert "calculate_area" not in supervised(spans).replace(call, "")  # the definitions are not trained on
    # "tools": "[]" adds nothing: a plain conversation
    assert plain.startswith("<|user|>Tell me a joke") and "Tools" not in plain
    assert plain_spans == ["Why do ducks have feathers? To cover their butt quacks.<|end|><|endoftext|>"]


def test_openai_tool_calls_string_and_object_arguments(tokenizer, tmp_path):
    (oslo, oslo_spans), (maths, maths_spans) = prepared_records(tokenizer, tmp_path,
                                                                SHAPES / "openai_tools.jsonl")[0]
    assert oslo.startswith("<|system|>You check the weather.\n\n" + data.template.TOOLS_HEADER)
    assert '"name": "get_weather", "description": "Current weather in a city"' in oslo
    assert oslo_spans == ['{"tool_calls": [{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "celsius"}}]}'
                          "<|end|>", "Yes: light rain in Oslo, 9 °C.<|end|><|endoftext|>"]
    assert '<|user|>{"tool_result": {"name": "get_weather", "content": "light rain, 9 degrees"}}<|end|>' in oslo
    assert "call_7" not in oslo  # ids only pair results with calls
    calls = ('Two calls.\n{"tool_calls": [{"name": "multiply", "arguments": {"a": 6, "b": 7}}, '
             '{"name": "add", "arguments": {"a": 2, "b": 5}}]}')
    assert maths_spans == [f"{calls}<|end|>", "6 x 7 = 42 and 2 + 5 = 7.<|end|><|endoftext|>"]
    assert ('{"tool_result": {"name": "multiply", "content": "42"}}<|end|><|user|>'
            '{"tool_result": {"name": "add", "content": "7"}}') in maths
    assert "Multiply 6 by 7" not in supervised(maths_spans)


def test_typed_text_parts_with_text_and_value_keys(tokenizer, tmp_path):
    (first, first_spans), (second, second_spans) = prepared_records(tokenizer, tmp_path,
                                                                    SHAPES / "typed_parts.jsonl")[0]
    assert first.startswith("<|system|>Reply briefly.<|end|><|user|>Summarise: the cat sat on the mat.<|end|>")
    assert first_spans == ["A cat sat.<|end|><|endoftext|>"]
    assert second.startswith("<|user|>Translate 'hello' into French.<|end|>")
    assert second_spans == ["Bonjour.<|end|><|endoftext|>"]


def test_alpaca_system_and_history(tokenizer, tmp_path):
    [(text, spans)], _ = prepared_records(tokenizer, tmp_path, SHAPES / "alpaca_system_history.json")
    assert text.startswith("<|system|>You are a librarian.<|end|><|user|>Recommend a novel by Dickens.<|end|>")
    assert spans == ["Great Expectations.<|end|>", "War and Peace.<|end|><|endoftext|>"]


BAD_REASONS = {2: "non_text_content", 3: "non_text_content", 4: "empty_assistant_turn", 5: "empty_assistant_turn",
               6: "orphan_tool_result", 7: "no_user_before_assistant", 8: "bad_tool_call", 9: "invalid_json"}
BAD_MESSAGES = {2: "messages[0].content[1]: a content part of type 'image_url'; only text",
                3: "messages[0].content[0]: a content part of type 'input_audio'",
                4: "conversations[1]: empty assistant turn", 5: "conversations[1]: empty assistant turn",
                6: "messages[1]: a tool result with no tool call before it",
                7: "conversations[1]: an assistant turn before any user turn",
                8: "messages[1].tool_calls[0].arguments: not valid JSON",
                9: "invalid JSON: Unterminated string starting at (column 43)"}


def test_bad_shapes_are_skipped_and_counted_by_reason(tokenizer, tmp_path):
    path = SHAPES / "bad_shapes.jsonl"
    [(text, spans)], report = prepared_records(tokenizer, tmp_path, path, on_bad_record="skip")
    assert spans == ["Hello! (the one good record)<|end|><|endoftext|>"]
    source = report["sources"][str(path)]
    expected = {}
    for reason in BAD_REASONS.values():
        expected[reason] = expected.get(reason, 0) + 1
    assert source["bad_by_reason"] == dict(sorted(expected.items())) == report["counts"]["bad_by_reason"]
    assert (source["read"], source["kept"], source["bad"]) == (9, 1, 8)
    assert source["examples"][0] == f"{path}:2: {BAD_MESSAGES[2]} can be trained on (this is a text model)"


@pytest.mark.parametrize("line", sorted(BAD_MESSAGES))
def test_each_bad_shape_is_refused_with_file_line_and_turn(tmp_path, line):
    lines = (SHAPES / "bad_shapes.jsonl").read_text(encoding="utf-8").splitlines()
    path = tmp_path / "one.jsonl"
    path.write_text(lines[0] + "\n" + lines[line - 1] + "\n", encoding="utf-8")
    cfg = DataSection.model_validate({"sources": [{"path": str(path)}]})
    with pytest.raises(InputError) as err:
        data_lists.load_conversations(cfg.sources, "error")
    message = str(err.value)
    assert message.startswith(f"{path}:2: {BAD_MESSAGES[line]}") and "\n" not in message and len(message) < 300


@pytest.mark.parametrize("record, message", [
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "function_call", "value": "[1]"}]},
     "conversations[1].value: a tool call needs a function \"name\""),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": "{bad"},
     "tools: not valid JSON"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}], "tools": [{"x": 1}]},
     "tools[0]: a function schema needs a \"name\""),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                   {"role": "user", "content": "more?"}]}, "messages[2]: the last turn must be the assistant's"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]},
     "messages[1]: field 'content' is null"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                   {"role": "assistant", "content": " "}]}, "no assistant turn with text"),
    ({"messages": [{"role": "user", "content": [{"text": "q"}]}, {"role": "assistant", "content": "a"}]},
     "messages[0].content[0]: a content part must be an object with a \"type\""),
    ({"messages": [{"role": "user", "content": "q"},
                   {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "f"}, "id": "1"}]},
                   {"role": "tool", "tool_call_id": "2", "content": "r"}, {"role": "assistant", "content": "a"}]},
     "messages[2]: a tool result with no tool call before it"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a" * 5000, "x": 1},
                   {"role": "robot" * 1000, "content": "a"}]}, "messages[2].role: unknown role 'robotrobot"),
])
def test_more_bad_shapes(tmp_path, record, message):
    path = write_json(tmp_path / "r.json", [record])
    cfg = DataSection.model_validate({"sources": [{"path": str(path)}]})
    with pytest.raises(InputError) as err:
        data_lists.load_conversations(cfg.sources, "error")
    assert str(err.value).startswith(f"{path}[0]: {message}") and len(str(err.value)) < 300


def test_tool_results_pair_with_calls_by_id_name_or_order():
    convs = data.formats.messages_conversation({"messages": [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "f", "arguments": "{}"}},
            {"id": "b", "type": "function", "function": {"name": "g", "arguments": {"k": [1]}}}]},
        {"role": "tool", "tool_call_id": "b", "content": "from g"},
        {"role": "tool", "content": "from f"},
        {"role": "assistant", "content": "done"}]}, "r[0]")
    assert [m.get("name") for m in convs["messages"]] == [None, None, "g", "f", None]
    assert convs["messages"][1]["tool_calls"][1] == {"type": "function", "id": "b",
                                                     "function": {"name": "g", "arguments": {"k": [1]}}}


def test_native_tool_template_gets_the_canonical_conversation(tokenizer):
    """A template that renders tools itself (TRL's Qwen3 training template) gets tools=, tool_calls and the
    tool role as they are; the fast path equals apply_chat_template(..., tools=...) record by record."""
    conversations, _ = data_lists.load_conversations(DataSection.model_validate({"sources": [
        {"path": str(SHAPES / name)} for name in ("openai_tools.jsonl", "glaive_toolcall.json",
                                                   "sharegpt_system.json")]}).sources, "error")
    qwen = data.template.training_template(data.resolve_chat_template("qwen3", tokenizer), tokenizer, "assistant")
    phi = data.template.training_template(data.resolve_chat_template("model", tokenizer), tokenizer, "assistant")
    assert data.template.rendering(data.resolve_chat_template("qwen3", tokenizer), "inline") == \
        data.template.Rendering("template", "template")
    assert data.template.rendering(data.resolve_chat_template("model", tokenizer), "inline") == data.template.Rendering(
        "fallback", "think_block")
    assert not qwen.startswith(data.template.template_extension(True, True)[:30])  # Qwen3 as it is; Phi-3.5 extended
    assert phi.startswith(data.template.template_extension(True, True))
    assert data.template.template_renders_tools(qwen) and data.template.template_renders_tools(phi)
    for template in (qwen, phi):
        expected = data.tokens.tokenize_reference(conversations, tokenizer, template, "assistant")
        assert data.tokenize(conversations, tokenizer, template, "assistant") == expected
        in_workers = data_reference.tokenize_in_workers(conversations, tokenizer, template, "assistant", 2, chunk=2)
        assert in_workers.to_lists() == expected
    ids, labels = data.tokenize(conversations[:1], tokenizer, qwen, "assistant")
    marked = data.pack.render_marked(ids[0], labels[0], tokenizer)
    assert "<tools>" in marked and '"name": "get_weather", "description": "Current weather in a city"' in marked
    assert '"arguments": {"city": "Oslo", "unit": "celsius"}' in "".join(re.findall(r"⟦(.*?)⟧", marked, re.S))
    assert "light rain, 9 degrees" in re.sub(r"⟦.*?⟧", "", marked, flags=re.S)


def test_counts_add_up_per_source_and_in_total(tokenizer, tmp_path):
    long_text = "word " * 400
    records = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(12)]
    records += records[:3]  # 3 duplicates
    records += [{"instruction": "long", "output": long_text}, {"instruction": "bad"}]  # 1 overlong, 1 bad
    first = write_json(tmp_path / "a.json", records)
    second = SHAPES / "bad_shapes.jsonl"
    _, report = prepared_records(tokenizer, tmp_path, first, second, on_bad_record="skip", dedup=True,
                                 max_seq_length=128, eval={"count": 2})
    for name, counts in {**report["sources"], "total": report["counts"]}.items():
        parts = ("kept", "bad", "duplicates", "overlong", "unsupervised")
        assert counts["read"] == sum(counts[k] for k in parts), name
        assert counts["kept"] == counts["train"] + counts["eval"], name
    a = report["sources"][str(first)]
    assert (a["read"], a["duplicates"], a["overlong"], a["bad"], a["kept"]) == (17, 3, 1, 1, 12)
    assert report["counts"]["read"] == report["records_read"] == 26 and report["eval"]["conversations"] == 2
    assert report["counts"]["train"] == report["train"]["records"]
    assert report["counts"]["eval"] == report["eval"]["records"]


def test_the_recipe_offers_exactly_the_formats_there_are_normalisers_for():
    import typing

    from qctrain.data.formats import NORMALISERS
    from qctrain.data.preference import PAIR_NORMALISERS
    from qctrain.recipe import DataSource

    assert typing.get_args(DataSource.model_fields["format"].annotation) == ("auto", *NORMALISERS, *PAIR_NORMALISERS)
