"""The chat template: resolution, the training twin (with {% generation %} markers), and the extension that
writes tools, calls, results and reasoning traces as text for templates that do not render them.

`training_template` asks TRL itself (the reference); `training_twin` gives the same answer from TRL's template
files without importing TRL (whose template module loads transformers' tokenizers and torch, seconds that
`qctrain check` cannot spend); tests/test_quiet_and_fast.py holds the two equal on every template TRL ships.
"""

import functools
import importlib.util
import json
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from qctrain.data.formats import ASSISTANT, TOOL
from qctrain.errors import InputError
from qctrain.recipe import abbreviate

# --- chat template ---


def trl_template_names() -> list[str]:
    folder = resources.files("trl").joinpath("chat_templates")
    return sorted(p.name[:-6] for p in folder.iterdir()
                  if p.name.endswith(".jinja") and not p.name.endswith("_training.jinja"))


def resolve_chat_template(setting: str, tokenizer) -> str:
    if setting == "model":
        template = tokenizer.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if not template:
            raise InputError("data.chat_template: the model has no chat template; name one of TRL's "
                             f"({', '.join(trl_template_names()[:8])}, ...) or a .jinja file")
        return template
    if setting.endswith(".jinja") or os.sep in setting:
        path = Path(setting)
        if not path.is_file():
            raise InputError(f"data.chat_template: {path}: file not found")
        return path.read_text(encoding="utf-8")
    names = trl_template_names()
    if setting not in names:
        from qctrain.recipe import did_you_mean

        shown = ", ".join(names[:12]) + (f", ... ({len(names)} TRL templates)" if len(names) > 12 else "")
        raise InputError(f"data.chat_template: unknown template {abbreviate(setting)}"
                         f"{did_you_mean(setting[:100], names)}; known: model, {shown}, or a .jinja file")
    return resources.files("trl").joinpath(f"chat_templates/{setting}.jinja").read_text(encoding="utf-8")


def training_template(template: str, tokenizer, loss_on: str, reasoning: str = "inline") -> str:
    """The template used to tokenize: with {% generation %} markers when only assistant tokens train, extended
    (extend_template) for what it does not render itself."""
    preamble, template = split_extension(template)
    twin = _trl_twin(template, tokenizer, loss_on)
    return preamble + twin if preamble else extend_template(twin, reasoning)


def _trl_twin(template: str, tokenizer, loss_on: str) -> str:
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if loss_on == "all" or has_generation_markers(template):
        return template
    original = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        return get_training_chat_template(tokenizer) or template
    except ValueError:
        raise InputError("data.chat_template: the template has no {% generation %} markers around assistant "
                         "turns and TRL knows no training version of it; add the markers or set "
                         "data.loss_on: all") from None
    finally:
        tokenizer.chat_template = original


_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")  # trl.chat_template_utils.has_generation_markers
NO_TWIN = ("data.chat_template: the template has no {% generation %} markers around assistant turns and TRL "
           "knows no training version of it; add the markers or set data.loss_on: all")


@functools.cache
def trl_templates_dir() -> Path:
    spec = importlib.util.find_spec("trl")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise InputError("TRL is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "chat_templates"


def has_generation_markers(template: str) -> bool:
    return _GENERATION.search(template) is not None


@functools.cache
def _twins() -> dict[str, str]:
    """Each TRL template's text -> the text of its `_training` twin."""
    folder = trl_templates_dir()
    twins = {}
    for twin in folder.glob("*_training.jinja"):
        original = folder / twin.name.replace("_training.jinja", ".jinja")
        if original.is_file():
            twins[original.read_text(encoding="utf-8")] = twin.read_text(encoding="utf-8")
    return twins


def training_twin(template: str, loss_on: str, reasoning: str = "inline") -> str:
    """The template to tokenize with (training_template's answer without importing TRL): as is when every token
    trains or it marks its assistant turns, else TRL's training twin of it; extended (extend_template)."""
    preamble, template = split_extension(template)
    if loss_on == "all" or has_generation_markers(template):
        twin = template
    else:
        twin = _twins().get(template)
        if twin is None:
            raise InputError(NO_TWIN)
    return preamble + twin if preamble else extend_template(twin, reasoning)


# --- tools and reasoning: the template's own way, or an extension of it that keeps everything ---
#
# A template that renders `tools=` (Qwen, Llama 3.1...) gets the canonical conversation as it is. Phi-3.5's
# renders only system/user/assistant content and silently drops tools, tool_calls and tool turns, so for such a
# template a Jinja preamble (template_extension) is put in front of it that rewrites the messages into plain turns
# before the template's own text runs:
#   - the tool definitions go into the system turn (after its text): TOOLS_HEADER, then the list as JSON;
#   - an assistant turn that calls tools says so as JSON after its text: {"tool_calls": [{"name", "arguments"}]}
#     (trained on, like any assistant text);
#   - each tool result is a user turn of its own, {"tool_result": {"name", "content"}} (not trained on); a result
#     that is a JSON object or array (its text, trimmed, starts and ends with {} or []) goes in as JSON, other
#     text as a JSON string.
# Likewise, where the template does not render an assistant turn's reasoning_content and data.reasoning is
# `inline`, the trace goes before the answer as a think block, as Qwen3's and DeepSeek-R1's templates write it:
# "<think>\n" + trace + "\n</think>\n\n" + answer (trained on).
# The data stage renders through the extended template and the adapter carries it, so apply_chat_template(messages,
# tools=...) with the tuned model's tokenizer gives the training text. Call ids only pair results with calls
# (check_turns; at inference the preamble pairs a result with its call by name, tool_call_id or order).

TOOLS_HEADER = ('You can call these tools. To call them, answer with {"tool_calls": [{"name": ..., '
                '"arguments": {...}}]}; each result comes back as {"tool_result": {"name": ..., "content": ...}}.'
                "\nTools: ")
THINK_OPEN, THINK_CLOSE = "<think>\n", "\n</think>\n\n"
EXTENSION_MARK = "{#- qctrain template extension"

# Dict keys are read as m['key'] (one lookup) rather than m.key (an attribute lookup that fails first), and the
# loop keeps no state between turns but the output list: a namespace read costs the sandbox's safety checks.
_EXTENSION_HEAD = EXTENSION_MARK + r""" (FEATURES): rewrites the messages the way the model was trained, then
    the model's own template (below) renders them. -#}
{%- set qc = namespace(out=[]) -%}
{%- for m in messages -%}
{%- if m['role'] == 'assistant' and (CHANGES) -%}
{%- set text = m['content'] if m['content'] is defined and m['content'] is string else '' -%}
"""
_CHANGES_CALLS = "m['tool_calls'] is defined and m['tool_calls']"
_CHANGES_THINK = "m['reasoning_content'] is string and m['reasoning_content'] | trim"
_EXTENSION_CALLS = r"""{%- if m['tool_calls'] is defined and m['tool_calls'] -%}
{%- set calls -%}
{"tool_calls": [
{%- for c in m['tool_calls'] -%}
{%- set f = c['function'] if c['function'] is defined else c -%}
{%- set args = f['arguments'] if f['arguments'] is defined and f['arguments'] is not none else {} -%}
{{- '' if loop.first else ', ' -}}
{"name": {{ f['name'] | tojson }}, "arguments": {{ ((args | trim) or '{}') if args is string else args | tojson }}}
{%- endfor -%}
]}
{%- endset -%}
{%- set text = (text + '\n' + calls) if text | trim else calls -%}
{%- endif -%}
"""
_EXTENSION_THINK = r"""{%- if m['reasoning_content'] is string and m['reasoning_content'] | trim -%}
{%- set text = THINK_OPEN + m['reasoning_content'] + THINK_CLOSE + text -%}
{%- endif -%}
"""
_EXTENSION_ASSISTANT_END = r"""{%- set qc.out = qc.out + [{'role': 'assistant', 'content': text}] -%}
"""
_EXTENSION_RESULTS = r"""{%- elif m['role'] == 'tool' -%}
{%- set name = m['name'] if m['name'] is defined and m['name'] is string else '' -%}
{%- if not name and m['tool_call_id'] is defined -%}
{%- set name -%}
{%- for p in messages[:loop.index0] if p['role'] == 'assistant' and p['tool_calls'] is defined -%}
{%- for c in p['tool_calls'] if c['id'] is defined and c['id'] == m['tool_call_id'] -%}
{{- (c['function'] if c['function'] is defined else c)['name'] -}}
{%- endfor -%}
{%- endfor -%}
{%- endset -%}
{%- endif -%}
{%- if not name -%}
{%- set tail = namespace(k=0, calls=[]) -%}
{%- for p in messages[:loop.index0] | reverse -%}
{%- if p['role'] == 'tool' -%}
{%- set tail.k = tail.k + 1 -%}
{%- else -%}
{%- if p['role'] == 'assistant' and p['tool_calls'] is defined and p['tool_calls'] -%}
{%- set tail.calls = p['tool_calls'] -%}
{%- endif -%}
{%- break -%}
{%- endif -%}
{%- endfor -%}
{%- if tail.k < tail.calls | length -%}
{%- set c = tail.calls[tail.k] -%}
{%- set name = (c['function'] if c['function'] is defined else c)['name'] -%}
{%- endif -%}
{%- endif -%}
{%- set body = m['content'] if m['content'] is defined else '' -%}
{%- if body is string -%}
{%- set t = body | trim -%}
{%- set body = t if (t[:1] == '{' and t[-1:] == '}') or (t[:1] == '[' and t[-1:] == ']') else body | tojson -%}
{%- else -%}
{%- set body = body | tojson -%}
{%- endif -%}
{%- set result = '{"tool_result": {"name": ' + (name | string | tojson) + ', "content": ' + body + '}}' -%}
{%- set qc.out = qc.out + [{'role': 'user', 'content': result}] -%}
"""
_EXTENSION_LOOP_END = r"""{%- else -%}
{%- set qc.out = qc.out + [m] -%}
{%- endif -%}
{%- endfor -%}
"""
_EXTENSION_TOOLS = r"""{%- if tools -%}
{%- if tools | rejectattr('function', 'defined') | list -%}
{%- set defs = namespace(parts=[]) -%}
{%- for t in tools -%}
{%- set defs.parts = defs.parts + [t if t['function'] is defined else {'type': 'function', 'function': t}] -%}
{%- endfor -%}
{%- set block = TOOLS_HEADER + (defs.parts | tojson) -%}
{%- else -%}
{%- set block = TOOLS_HEADER + (tools | tojson) -%}
{%- endif -%}
{%- set out = qc.out -%}
{%- if out and out[0]['role'] == 'system' -%}
{%- set first = out[0]['content'] if out[0]['content'] is string else '' -%}
{%- set first = (first + '\n\n' + block) if first | trim else block -%}
{%- set qc.out = [{'role': 'system', 'content': first}] + out[1:] -%}
{%- else -%}
{%- set qc.out = [{'role': 'system', 'content': block}] + out -%}
{%- endif -%}
{%- endif -%}
"""
_EXTENSION_END = r"""{%- set messages = qc.out -%}
{%- set tools = none %}"""


def _literal(text: str) -> str:
    """A Jinja string literal of the text (JSON's escapes are Jinja's)."""
    return json.dumps(text)


def template_extension(tools: bool, think: bool) -> str:
    """The preamble that makes a template render tools (tools) and reasoning traces as think blocks (think)."""
    features = ", ".join(name for name, on in (("tools", tools), ("reasoning think blocks", think)) if on)
    changes = " or ".join(c for c, on in ((_CHANGES_CALLS, tools), (_CHANGES_THINK, think)) if on)
    text = (_EXTENSION_HEAD.replace("FEATURES", features).replace("CHANGES", changes)
            + (_EXTENSION_CALLS if tools else "") + (_EXTENSION_THINK if think else "") + _EXTENSION_ASSISTANT_END
            + (_EXTENSION_RESULTS if tools else "") + _EXTENSION_LOOP_END + (_EXTENSION_TOOLS if tools else "")
            + _EXTENSION_END)
    return (text.replace("TOOLS_HEADER", _literal(TOOLS_HEADER)).replace("THINK_OPEN", _literal(THINK_OPEN))
            .replace("THINK_CLOSE", _literal(THINK_CLOSE)))


_PROBE = "qctrain_probe"


@functools.lru_cache(maxsize=16)
def template_renders_tools(template: str) -> bool:
    """Whether the template renders `tools=`, assistant tool_calls and tool results itself: `tools=` changes
    its output, and the tool, the call, its arguments and the result all show in the text."""
    from transformers.utils.chat_template_utils import render_jinja_template

    tool = {"type": "function", "function": {"name": f"{_PROBE}_tool", "description": "probe",
                                             "parameters": {"type": "object", "properties": {}}}}
    call = {"type": "function", "function": {"name": f"{_PROBE}_call", "arguments": {"x": f"{_PROBE}_argument"}}}
    messages = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "", "tool_calls": [call]},
                {"role": "tool", "name": f"{_PROBE}_call", "content": f"{_PROBE}_result"},
                {"role": "assistant", "content": "pong"}]
    try:
        (with_tools,), _ = render_jinja_template(conversations=[messages], tools=[tool], chat_template=template)
        (without,), _ = render_jinja_template(conversations=[messages], chat_template=template)
    except Exception:  # a template that raises on tools or on the tool role cannot render them
        return False
    marks = ("tool", "call", "argument", "result")
    return with_tools != without and all(f"{_PROBE}_{mark}" in with_tools for mark in marks)


@functools.lru_cache(maxsize=16)
def template_renders_reasoning(template: str) -> bool:
    """Whether the template renders an assistant turn's reasoning_content (the trace shows in the text)."""
    from transformers.utils.chat_template_utils import render_jinja_template

    messages = [{"role": "user", "content": "ping"},
                {"role": "assistant", "content": "pong", "reasoning_content": f"{_PROBE}_trace"}]
    try:
        (text,), _ = render_jinja_template(conversations=[messages], chat_template=template)
    except Exception:
        return False
    return f"{_PROBE}_trace" in text


@dataclass(frozen=True)
class Rendering:
    """How a template renders what the data holds: tools and reasoning traces by the template itself, or by the
    extension (tools: "fallback"; reasoning: "think_block"), or traces dropped (data.reasoning: drop)."""

    tools: str  # "template" | "fallback"
    reasoning: str  # "template" | "think_block" | "dropped"


def rendering(template: str, reasoning: str) -> Rendering:
    """How the (unextended) template renders tools and traces with data.reasoning set to `reasoning`."""
    if reasoning == "drop":
        traces = "dropped"
    else:
        traces = "template" if template_renders_reasoning(template) else "think_block"
    return Rendering("template" if template_renders_tools(template) else "fallback", traces)


def split_extension(template: str) -> tuple[str, str]:
    """An extended template's preamble and the template it extends ("" and the template when not extended)."""
    if not template.startswith(EXTENSION_MARK):
        return "", template
    end = template.index(_EXTENSION_END) + len(_EXTENSION_END)
    return template[:end], template[end:]


@functools.lru_cache(maxsize=16)
def unextended(template: str) -> tuple[str, bool, bool] | None:
    """For an extended template: the template it extends and the preamble's features (tools, think blocks),
    where the preamble leaves a conversation that uses neither exactly as the extended template would; else None."""
    preamble, base = split_extension(template)
    if not preamble or base.startswith(("\n", "\r")):  # a block tag before it would eat that newline
        return None
    features = preamble[len(EXTENSION_MARK):].split(")", 1)[0]
    return base, "tools" in features, "think blocks" in features


def passes_through(messages: list[dict], tools: list[dict] | None, tools_mode: bool, think_mode: bool) -> bool:
    """Whether the extension's preamble (with these features) leaves the conversation as it is."""
    if tools_mode and (tools or any(m.get("tool_calls") or m.get("role") == TOOL for m in messages)):
        return False
    return not (think_mode and any(isinstance(m.get("reasoning_content"), str) and m["reasoning_content"].strip()
                                   for m in messages if m.get("role") == ASSISTANT))


def extend_template(template: str, reasoning: str) -> str:
    """The template as the model is trained and used: with the preamble for what it does not render itself
    (tools; reasoning traces when data.reasoning is inline). A template already extended is returned as is."""
    if template.startswith(EXTENSION_MARK):
        return template
    how = rendering(template, reasoning)
    if how.tools == "template" and how.reasoning != "think_block":
        return template
    return template_extension(how.tools == "fallback", how.reasoning == "think_block") + template


def template_inputs(conversations: list, keep_reasoning: bool = True
                    ) -> tuple[list[list[dict]], list[list[dict] | None], list[tuple[int, ...]]]:
    """What the template renders for each conversation (a canonical one or a plain list of messages): its
    messages (without training flags; without reasoning traces unless keep_reasoning), its tools (None when
    there are none), and the assistant turns left in the context (indices among its assistant turns)."""
    messages: list[list[dict]] = []
    tools: list[list[dict] | None] = []
    contexts: list[tuple[int, ...]] = []
    for conversation in conversations:
        if isinstance(conversation, list):
            messages.append(conversation)
            tools.append(None)
            contexts.append(())
            continue
        turns = conversation["messages"]
        if any("weight" in m or (not keep_reasoning and "reasoning_content" in m) for m in turns):
            assistant = [m for m in turns if m["role"] == ASSISTANT]
            contexts.append(tuple(i for i, m in enumerate(assistant) if m.get("weight") == 0))
            turns = [{k: v for k, v in m.items() if k != "weight" and (keep_reasoning or k != "reasoning_content")}
                     for m in turns]
        else:
            contexts.append(())
        messages.append(turns)
        tools.append(conversation["tools"] or None)
    return messages, tools, contexts


def _owners(spans: list[tuple[int, int]], text: str, assistant: list[dict]) -> list[int] | None:
    """The assistant turn each {% generation %} span belongs to: one span per turn in order, and perhaps one more
    at the very end of the text (Phi-3's end-of-text token) that belongs to the last; None where the spans do not
    pair with the turns that way, or a turn's text is not where its span says."""
    n = len(assistant)
    if len(spans) == n:
        owners = list(range(n))
    elif len(spans) == n + 1 and n and spans[-1][1] == len(text):
        owners = [*range(n), n - 1]
    else:
        return None
    for turn, message in enumerate(assistant):
        tail = message["content"].strip()[-40:] if isinstance(message.get("content"), str) else ""
        end = spans[turn + 1][0] if turn + 1 < n else len(text)
        if tail and tail not in text[spans[turn][0]:end]:
            return None
    return owners


def supervised_spans(spans: list[tuple[int, int]], text: str, messages: list[dict],
                     context: tuple[int, ...]) -> list[tuple[int, int]]:
    """The generation spans without those of the assistant turns left in the context."""
    if not context:
        return spans
    assistant = [m for m in messages if m["role"] == ASSISTANT]
    owners = _owners(spans, text, assistant)
    if owners is None:
        raise InputError(f"data.chat_template: its {{% generation %}} blocks ({len(spans)}) do not pair with the "
                         f"{len(assistant)} assistant turns of a conversation, so a turn's weight 0 (train/loss "
                         "false) cannot be honoured; use a template with one block per assistant turn")
    return [span for span, owner in zip(spans, owners, strict=True) if owner not in context]
