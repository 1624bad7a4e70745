"""The chat template: resolution, the training twin (with {% generation %} markers), and the fallback that
writes tools, calls and results as text for templates that do not render them.

`training_template` asks TRL itself (the reference); `training_twin` gives the same answer from TRL's template
files without importing TRL (whose template module loads transformers' tokenizers and torch, seconds that
`qctrain check` cannot spend); tests/test_quiet_and_fast.py holds the two equal on every template TRL ships.
"""

import functools
import importlib.util
import json
import os
import re
from importlib import resources
from pathlib import Path
from typing import Any

from qctrain.data.formats import ASSISTANT, SYSTEM, TOOL, USER
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


def training_template(template: str, tokenizer, loss_on: str) -> str:
    """The template used to tokenize: with {% generation %} markers when only assistant tokens train."""
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


def training_twin(template: str, loss_on: str) -> str:
    """The template to tokenize with: as is when every token trains or it marks its assistant turns,
    else TRL's training twin of it."""
    if loss_on == "all" or has_generation_markers(template):
        return template
    twin = _twins().get(template)
    if twin is None:
        raise InputError(NO_TWIN)
    return twin


# --- tools: the template's own way, or one fallback that keeps everything ---
#
# A template that renders `tools=` (Qwen, Llama 3.1...) gets the canonical conversation as it is. Phi-3.5's
# renders only system/user/assistant content and silently drops tools, tool_calls and tool turns, so for
# such a template every conversation that uses tools is rewritten into plain turns first:
#   - the tool definitions go into the system turn (after its text): TOOLS_HEADER, then the list as JSON;
#   - an assistant turn that calls tools says so as JSON after its text: {"tool_calls": [{"name", "arguments"}]}
#     (trained on, like any assistant text);
#   - each tool result is a user turn of its own, {"tool_result": {"name", "content"}} (not trained on).
# Call ids only pair results with calls (check_turns) and are not rendered.

TOOLS_HEADER = ('You can call these tools. To call them, answer with {"tool_calls": [{"name": ..., '
                '"arguments": {...}}]}; each result comes back as {"tool_result": {"name": ..., "content": ...}}.'
                "\nTools: ")


def _uses_tools(conversation: dict[str, Any]) -> bool:
    return bool(conversation["tools"]) or any(m["role"] == TOOL or m.get("tool_calls")
                                              for m in conversation["messages"])


def fallback_messages(conversation: dict[str, Any]) -> list[dict]:
    """Plain system/user/assistant turns that carry the tools, calls and results as text (see above)."""
    if not _uses_tools(conversation):
        return conversation["messages"]
    out = []
    for message in conversation["messages"]:
        if message.get("tool_calls"):
            calls = json.dumps({"tool_calls": [{"name": c["function"]["name"], "arguments": c["function"]["arguments"]}
                                               for c in message["tool_calls"]]}, ensure_ascii=False)
            text = f"{message['content']}\n{calls}" if message["content"].strip() else calls
            out.append({"role": ASSISTANT, "content": text})
        elif message["role"] == TOOL:
            result = {"tool_result": {"name": message["name"], "content": message["content"]}}
            out.append({"role": USER, "content": json.dumps(result, ensure_ascii=False)})
        else:
            out.append({"role": message["role"], "content": message["content"]})
    if conversation["tools"]:
        block = TOOLS_HEADER + json.dumps(conversation["tools"], ensure_ascii=False)
        if out[0]["role"] == SYSTEM:
            out[0] = {"role": SYSTEM, "content": f"{out[0]['content']}\n\n{block}" if out[0]["content"].strip()
                      else block}
        else:
            out.insert(0, {"role": SYSTEM, "content": block})
    return out


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


def template_inputs(conversations: list, native_tools: bool) -> tuple[list[list[dict]], list[list[dict] | None]]:
    """What the template renders for each conversation (a canonical one or a plain list of messages): its
    messages and its tools (None when there are none or the fallback put them into the messages)."""
    messages: list[list[dict]] = []
    tools: list[list[dict] | None] = []
    for conversation in conversations:
        if isinstance(conversation, list):
            messages.append(conversation)
            tools.append(None)
        elif native_tools:
            messages.append(conversation["messages"])
            tools.append(conversation["tools"] or None)
        else:
            messages.append(fallback_messages(conversation))
            tools.append(None)
    return messages, tools
