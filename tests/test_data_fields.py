"""Every field of a record is honoured or refused by name (issue 21), on Phi-3.5's tokenizer, decoding what the
data stage prepares: per-turn training flags (OpenAI's and Mistral's weight, axolotl's train, AgentInstruct's loss,
Mistral's only_last), reasoning traces (rendered by the template, written as think blocks, or dropped and
counted), OpenAI's legacy functions, unknown keys (named per source, or refused), and the chat template the adapter
carries reproducing the training text token for token."""

import json
from pathlib import Path

import data_lists
import data_reference
import pytest
import torch
from conftest import run_cli, write_json
from qctrain import data, outputs
from qctrain.data import template as templates
from qctrain.data import tokens
from qctrain.errors import InputError
from qctrain.finished.generate import generate_replies
from qctrain.recipe import DataSection
from test_data_shapes import SHAPES, prepared_records
from transformers import AutoTokenizer


def sources(*paths: Path, **settings) -> DataSection:
    return DataSection.model_validate({"sources": [{"path": str(p)} for p in paths], **settings})


def phi_template(tokenizer, reasoning: str = "inline") -> str:
    return data.template.training_template(data.resolve_chat_template("model", tokenizer), tokenizer, "assistant",
                                           reasoning)


# --- per-turn training flags ---

def test_weight_0_turns_stay_in_the_context_unsupervised(tokenizer, tmp_path):
    path = SHAPES / "training_flags.jsonl"
    records, report = prepared_records(tokenizer, tmp_path, path)
    (openai, openai_spans), (axolotl, axolotl_spans), (agent, agent_spans), (mistral, mistral_spans) = records
    # OpenAI's documented example: the weight-0 reply is in the context, the weight-1 reply is trained on
    assert "<|user|>What's the capital of France?<|end|><|assistant|>Paris<|end|><|user|>Can you be" in openai
    assert openai_spans == ["Paris, as if everyone doesn't know that already.<|end|><|endoftext|>"]
    # axolotl's train: false / true (and on non-assistant turns false, as they are anyway)
    assert "<|assistant|>Hello there.<|end|>" in axolotl
    assert axolotl_spans == ["I'm doing very well, thank you!<|end|><|endoftext|>"]
    # AgentInstruct's loss: false / true (null on the human turns)
    assert "<|assistant|>OK. I'll follow your instructions.<|end|>" in agent
    assert agent_spans == ["Thought: use ls.\nAction: ls<|end|><|endoftext|>"]
    # Mistral's only_last: every assistant turn but the last is context
    assert "<|assistant|>4<|end|>" in mistral and mistral_spans == ["12<|end|><|endoftext|>"]
    assert report["turns"] == {"supervised": 4, "context": 4}
    assert (report["sources"][str(path)]["supervised_turns"], report["sources"][str(path)]["context_turns"]) == (4, 4)


def test_weights_fast_path_equals_the_reference(tokenizer):
    conversations, _ = data_lists.load_conversations(sources(SHAPES / "training_flags.jsonl").sources, "error")
    for template in (phi_template(tokenizer),
                     data.template.training_template(data.resolve_chat_template("qwen3", tokenizer), tokenizer,
                                                     "assistant")):
        expected = data.tokens.tokenize_reference(conversations, tokenizer, template, "assistant")
        assert data.tokenize(conversations, tokenizer, template, "assistant") == expected
        assert data_reference.tokenize_in_workers(conversations, tokenizer, template, "assistant", 2,
                                                  chunk=2).to_lists() == expected
        # the flags are what leaves those turns out: without them every assistant turn is supervised
        flagless = [{**c, "messages": [{k: v for k, v in m.items() if k != "weight"} for m in c["messages"]]}
                    for c in conversations]
        ids, labels = data.tokenize(flagless, tokenizer, template, "assistant")
        assert ids == expected[0]
        for with_flags, without in zip(expected[1], labels, strict=True):
            assert sum(x != data.IGNORE for x in with_flags) < sum(x != data.IGNORE for x in without)
        decoded = tokenizer.decode([t for t in expected[1][0] if t != data.IGNORE])
        assert "Paris," in decoded and not decoded.lstrip().startswith("Paris<")


def test_weights_need_one_generation_block_per_assistant_turn(tokenizer):
    """A template whose {% generation %} blocks do not pair with the turns cannot honour a weight: refused."""
    two_blocks = ("{% for m in messages %}{% if m.role == 'assistant' %}{% generation %}{{ m.content }}"
                  "{% endgeneration %}{% generation %}<end>{% endgeneration %}{% else %}{{ m.content }}{% endif %}"
                  "{% endfor %}")
    conversation = data_lists.load_conversations(sources(SHAPES / "training_flags.jsonl").sources, "error")[0][0]
    with pytest.raises(InputError, match=r"\{% generation %\} blocks \(4\) do not pair with the 2 assistant turns"):
        data.tokenize([conversation], tokenizer, two_blocks, "assistant")
    with pytest.raises(InputError, match="do not pair"):
        data.tokens.tokenize_reference([conversation], tokenizer, two_blocks, "assistant")


@pytest.mark.parametrize("turn, reason, message", [
    ({"role": "user", "content": "q", "weight": 1}, "unhonoured_weight",
     "messages[0]: a training flag (weight 1, train/loss true) on a user turn"),
    ({"role": "assistant", "content": "a", "weight": 2}, "bad_field", "messages[1].weight: must be 0 or 1, got 2"),
    ({"role": "assistant", "content": "a", "weight": 0, "train": True}, "bad_field",
     "messages[1]: the training flags disagree (weight: 0, train: True)"),
    ({"role": "assistant", "content": "a", "loss": "no"}, "bad_field", "messages[1].loss: must be true or false"),
])
def test_bad_training_flags(turn, reason, message):
    messages = [turn, {"role": "assistant", "content": "ok"}] if turn["role"] == "user" else \
        [{"role": "user", "content": "q"}, turn]
    with pytest.raises(data.formats.BadRecord) as err:
        data.formats.to_conversation(data.sources.Record("r.jsonl:1", {"messages": messages}), "auto", {})
    assert err.value.reason == reason and str(err.value).startswith(f"r.jsonl:1: {message}")


def test_weight_0_cannot_be_honoured_when_every_token_trains(tokenizer, tmp_path):
    path = write_json(tmp_path / "flags.json", [
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "context", "weight": 0},
                      {"role": "user", "content": "q2"}, {"role": "assistant", "content": "trained"}]},
        {"messages": [{"role": "user", "content": "plain"}, {"role": "assistant", "content": "answer"}]}])
    [(text, _)], report = prepared_records(tokenizer, tmp_path, path, loss_on="all", on_bad_record="skip")
    assert text.startswith("<|user|>plain") and report["counts"]["bad_by_reason"] == {"unhonoured_weight": 1}
    with pytest.raises(InputError, match=r"flags.json\[0\]: a turn with weight 0 .* data.loss_on: all"):
        prepared_records(tokenizer, tmp_path / "error", path, loss_on="all")


# --- reasoning traces ---

TRACE_91 = "91 = 7 x 13, so it has divisors besides 1 and itself."


def test_traces_inline_as_think_blocks_and_supervised(tokenizer, tmp_path):
    path = SHAPES / "reasoning.jsonl"
    records, report = prepared_records(tokenizer, tmp_path, path, on_bad_record="skip")
    spans = [s for _, s in records]
    assert spans == [[f"<think>\n{TRACE_91}\n</think>\n\nNo: 91 = 7 x 13.<|end|><|endoftext|>"],
                     ["<think>\n10 / 2 = 5.\n</think>\n\n5.<|end|><|endoftext|>"],  # under "reasoning"
                     ["<think>\nItaly's capital is Rome.\n</think>\n\nRome.<|end|><|endoftext|>"],  # "thinking"
                     ["<think>\nA greeting is wanted.\n</think>\n\nHi!<|end|><|endoftext|>"]]  # as written
    assert report["reasoning"] == {"setting": "inline", "rendered_by": "think_block", "traces": 3, "dropped": 0}
    source = report["sources"][str(path)]
    assert source["bad_by_reason"] == {"misplaced_reasoning": 1} and source["reasoning_traces"] == 3
    assert source["examples"] == [f"{path}:5: messages[0]: a reasoning trace on a user turn; only assistant turns "
                                  "reason"]


def test_traces_dropped_and_counted(tokenizer, tmp_path):
    path = SHAPES / "reasoning.jsonl"
    records, report = prepared_records(tokenizer, tmp_path, path, on_bad_record="skip", reasoning="drop")
    (first, first_spans), *_, (as_written, as_written_spans) = records
    assert first_spans == ["No: 91 = 7 x 13.<|end|><|endoftext|>"] and TRACE_91 not in first
    assert as_written_spans == ["<think>\nA greeting is wanted.\n</think>\n\nHi!<|end|><|endoftext|>"]
    assert report["reasoning"] == {"setting": "drop", "rendered_by": "dropped", "traces": 3, "dropped": 3}
    assert not phi_template(tokenizer, "drop").startswith(data.template.template_extension(True, True))


def test_a_template_that_renders_traces_gets_them(tokenizer, tmp_path):
    records, report = prepared_records(tokenizer, tmp_path, SHAPES / "reasoning.jsonl", on_bad_record="skip",
                                       chat_template="qwen3")
    assert report["reasoning"]["rendered_by"] == "template"
    assert TRACE_91 in records[0][1][0]  # Qwen3's own think block, supervised
    assert "<|im_start|>assistant\n<think>\n" + TRACE_91 in records[0][0]


def test_a_trace_next_to_a_think_block_is_refused():
    record = {"messages": [{"role": "user", "content": "q"},
                           {"role": "assistant", "reasoning_content": "r", "content": "<think>r</think>a"}]}
    with pytest.raises(data.formats.BadRecord, match="the trace would be there twice") as err:
        data.formats.to_conversation(data.sources.Record("r[0]", record), "auto", {})
    assert err.value.reason == "misplaced_reasoning"


# --- OpenAI's legacy functions ---

WEATHER = {"name": "get_current_weather", "description": "Get the current weather in a location",
           "parameters": {"type": "object", "properties": {"location": {"type": "string"}}, "required": ["location"]}}


def test_legacy_functions_map_to_tools_calls_and_results(tokenizer, tmp_path):
    [(text, spans)], _ = prepared_records(tokenizer, tmp_path, SHAPES / "openai_functions.jsonl")
    system = text.split("<|end|>")[0]
    assert system == "<|system|>" + data.template.TOOLS_HEADER + json.dumps([{"type": "function", "function": WEATHER}],
                                                                   ensure_ascii=False)
    call = '{"tool_calls": [{"name": "get_current_weather", "arguments": {"location": "Oslo"}}]}'
    assert spans == [f"{call}<|end|>", "It is 9 °C in Oslo.<|end|><|endoftext|>"]  # the call is trained on
    result = '{"tool_result": {"name": "get_current_weather", "content": {"temperature": 9, "unit": "celsius"}}}'
    assert f"<|user|>{result}<|end|>" in text and "temperature" not in "".join(spans)  # the result is not


def test_legacy_functions_give_what_the_newer_form_gives(tokenizer):
    [legacy], _ = data_lists.load_conversations(sources(SHAPES / "openai_functions.jsonl").sources, "error")
    newer = data.formats.to_conversation(data.sources.Record("r[0]", {
        "messages": [{"role": "user", "content": "What is the weather in Oslo?"},
                     {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                         "name": "get_current_weather", "arguments": {"location": "Oslo"}}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": '{"temperature": 9, "unit": "celsius"}'},
                     {"role": "assistant", "content": "It is 9 °C in Oslo."}],
        "tools": [{"type": "function", "function": WEATHER}]}), "auto", {})
    template = phi_template(tokenizer)
    assert data.tokenize([legacy], tokenizer, template, "assistant") == \
        data.tokenize([newer], tokenizer, template, "assistant")


# --- keys we do not read ---

def test_unknown_keys_are_named_per_source_with_counts(tokenizer, tmp_path, capsys):
    path = SHAPES / "unknown_keys.jsonl"
    records, report = prepared_records(tokenizer, tmp_path, path, on_bad_record="skip")
    assert [spans for _, spans in records] == [["It ships tomorrow.<|end|><|endoftext|>"],
                                               ["See the manual.<|end|><|endoftext|>"],
                                               ["You're welcome.<|end|><|endoftext|>"]]
    source = report["sources"][str(path)]
    # metadata (id, created, model, source, name, timestamp) and empty values (refusal: null, annotations: [],
    # audio: null) are not named; an image beside the text makes the record bad
    assert source["unread_keys"] == {"customer_tier": 1, "messages[].annotations": 2}
    assert report["counts"]["unread_keys"] == source["unread_keys"]
    assert source["bad_by_reason"] == {"non_text_content": 1}
    assert source["examples"] == [f"{path}:4: image: an image beside the text; only text can be trained on (this "
                                  "is a text model)"]
    from qctrain.cli import _print_data_summary

    _print_data_summary(report, cached=False)
    assert (f"data: {path}: keys not read, ignored: customer_tier (1 records), messages[].annotations (2 records)"
            in capsys.readouterr().out)


def test_unknown_keys_are_refused_under_on_bad_record_error(tokenizer, tmp_path):
    lines = (SHAPES / "unknown_keys.jsonl").read_text(encoding="utf-8").splitlines()
    path = tmp_path / "keys.jsonl"
    path.write_text(lines[0] + "\n" + lines[1] + "\n", encoding="utf-8")
    with pytest.raises(InputError) as err:
        prepared_records(tokenizer, tmp_path, path)
    assert str(err.value).startswith(f"{path}:2: keys 'customer_tier', 'messages[].annotations' not read (not a "
                                     "field of the messages format nor known metadata); name them in this source's "
                                     "ignore_keys")
    # named in ignore_keys, they are neither refused nor reported
    cfg = DataSection.model_validate({"sources": [{"path": str(path), "ignore_keys": ["customer_tier",
                                                                                       "annotations"]}],
                                      "eval": None, "packing": False})
    prepared = data.prepare(cfg, tokenizer, tmp_path / "ignored")
    assert prepared.report["sources"][str(path)]["unread_keys"] == {} and len(prepared.train) == 2


def test_every_format_reads_its_documented_keys():
    """Each format's keys as the README lists them: a record with only those keys has no unread key."""
    alpaca = {"instruction": "i", "input": "", "output": "o", "system": "s", "history": [["a", "b"]], "text": "t",
              "id": 1}
    sharegpt = {"conversations": [{"from": "human", "value": "q", "train": False},
                                  {"from": "gpt", "value": "a", "weight": 1, "loss": True, "reasoning": "r"}],
                "system": "s", "tools": [], "id": "x"}
    messages = {"messages": [{"role": "user", "content": "q", "name": "u", "id": "m1"},
                             {"role": "assistant", "content": "a", "weight": 1, "reasoning_content": "r"}],
                "tools": [], "functions": [], "only_last": False, "parallel_tool_calls": False}
    for fmt, record in (("alpaca", alpaca), ("sharegpt", sharegpt), ("messages", messages)):
        assert data.formats.unread_keys(record, fmt) == [], fmt
        assert data.formats.unread_keys({**record, "extra": 1}, fmt) == ["extra"]


# --- the template the adapter carries ---

@pytest.fixture
def tuned_tokenizer(tiny_model_dir, tmp_path):
    """The tokenizer as a run saves it in adapter/ (export.save_tokenizer with the inference template)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)  # a copy: saving sets its template
    template = data.extend_template(data.resolve_chat_template("model", tokenizer), "inline")
    outputs.save_tokenizer(tokenizer, template, tmp_path / "adapter")
    return AutoTokenizer.from_pretrained(tmp_path / "adapter")


def test_the_adapter_template_gives_the_training_text_token_for_token(tokenizer, tuned_tokenizer, tmp_path):
    paths = [SHAPES / n for n in ("openai_tools.jsonl", "openai_functions.jsonl", "reasoning.jsonl",
                                  "glaive_toolcall.json", "sharegpt_system.json", "training_flags.jsonl")]
    cfg = sources(*paths, eval=None, packing=False, dedup=False, max_seq_length=1024, on_bad_record="skip")
    prepared = data.prepare(cfg, tokenizer, tmp_path / "out")
    conversations, _ = data_lists.load_conversations(cfg.sources, "skip")
    assert len(conversations) == len(prepared.train) == 15
    assert (tmp_path / "adapter" / "chat_template.jinja").read_text().startswith(
        data.template.template_extension(True, True))
    for conversation, ids in zip(conversations, prepared.train["input_ids"], strict=True):
        messages = [{k: v for k, v in m.items() if k != "weight"} for m in conversation["messages"]]
        got = tuned_tokenizer.apply_chat_template(messages, tools=conversation["tools"] or None, tokenize=True,
                                                  return_dict=True)["input_ids"]
        assert got == ids, tuned_tokenizer.decode(ids)
    # and an OpenAI client's request as it sends it (arguments as a JSON string, results paired by tool_call_id,
    # content null): the same tokens
    first = json.loads((SHAPES / "openai_tools.jsonl").read_text(encoding="utf-8").splitlines()[0])
    got = tuned_tokenizer.apply_chat_template(first["messages"], tools=first["tools"], tokenize=True,
                                              return_dict=True)["input_ids"]
    assert got == prepared.train["input_ids"][0]


def test_generation_renders_the_tools_through_the_adapter_template(tuned_tokenizer):
    class Echo:  # a stand-in model: remembers its prompt and answers one token
        device = "cpu"

        def eval(self):
            return self

        def generate(self, input_ids, attention_mask=None, **_):
            self.prompt = input_ids
            return torch.cat([input_ids, input_ids[:, :1]], dim=1)

    model = Echo()
    tools = [{"type": "function", "function": WEATHER}]
    generate_replies(model, tuned_tokenizer, [[{"role": "user", "content": "Weather in Oslo?"}]], tools=tools)
    prompt = tuned_tokenizer.decode(model.prompt[0])
    assert prompt == ("<|system|>" + data.template.TOOLS_HEADER + json.dumps(tools, ensure_ascii=False)
                      + "<|end|><|user|>Weather in Oslo?<|end|><|assistant|>")


@pytest.mark.slow
def test_generate_refuses_a_bad_tools_file_before_loading_anything(tmp_path):
    bad = write_json(tmp_path / "tools.json", [{"description": "no name"}])
    result = run_cli("generate", str(tmp_path / "no-run"), "--prompt", "hi", "--tools", str(bad))
    assert result.returncode == 2
    assert result.stderr.startswith(f'qctrain: error: {bad}: tools[0]: a function schema needs a "name"')
    assert len(result.stderr.splitlines()) == 1
    assert data.read_tools_file(write_json(tmp_path / "ok.json", [WEATHER])) == [{"type": "function",
                                                                                "function": WEATHER}]


def test_conversations_the_extension_leaves_alone_render_as_through_it(tokenizer):
    """The fast path renders conversations without tools, calls, results or traces with the template the extension
    extends: the same text and spans as through the extended template."""
    conversations, _ = data_lists.load_conversations(sources(*[SHAPES / n for n in (
        "openai_tools.jsonl", "reasoning.jsonl", "sharegpt_system.json", "alpaca_system_history.json",
        "typed_parts.jsonl")]).sources, "skip")
    template = phi_template(tokenizer)
    messages, tools, _ = data.template.template_inputs(conversations)
    plain = [templates.passes_through(m, t, True, True) for m, t in zip(messages, tools, strict=True)]
    assert any(plain) and not all(plain)
    special = tokenizer.special_tokens_map
    assert tokens._render_all(messages, tools, template, True, special) == \
        tokens._render_with(messages, tools, template, True, special)


def test_new_settings_enter_the_fingerprint(tokenizer):
    base = DataSection.model_validate({"sources": [{"path": str(SHAPES / "reasoning.jsonl")}]})
    template = phi_template(tokenizer)
    fingerprints = {data.stage.data_fingerprint(cfg, tokenizer, template) for cfg in (
        base, base.model_copy(update={"reasoning": "drop"}),
        DataSection.model_validate({"sources": [{"path": str(SHAPES / "reasoning.jsonl"), "ignore_keys": ["x"]}]}))}
    assert len(fingerprints) == 3
