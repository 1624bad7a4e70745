"""One canonical conversation per record: a pure function per format (alpaca, sharegpt, messages), then
the same turn checks for all."""

import hashlib
import json
from collections.abc import Callable
from typing import Any

from qctrain.data.sources import Record, parse_line
from qctrain.recipe import DATA_FORMATS, abbreviate, canonical_json


class BadRecord(ValueError):
    """One record that cannot be used; `where` is file:line or file[index], `reason` a short key counted in
    data_report.json (see BAD_REASONS)."""

    def __init__(self, where: str, message: str, reason: str = "bad_field"):
        super().__init__(f"{where}: {message}")
        self.reason = reason


# Why a record is bad: the keys the report counts them under.
BAD_REASONS = {
    "invalid_json": "a JSONL line that is not JSON (or not UTF-8)",
    "not_an_object": "a record that is not an object",
    "unknown_format": "keys that match no format",
    "bad_field": "a field missing, null or of the wrong type",
    "unknown_role": "a turn with a role we do not know",
    "non_text_content": "an image, audio or other non-text content part",
    "bad_tools": "a tools field that is not a list of function schemas",
    "bad_tool_call": "a tool call without a name or with arguments that are not a JSON object",
    "no_assistant_text": "no assistant turn with text or a tool call",
    "empty_assistant_turn": "an empty or blank assistant turn",
    "no_user_before_assistant": "an assistant turn before any user turn",
    "orphan_tool_result": "a tool result with no tool call before it",
    "last_turn_not_assistant": "a conversation that does not end with the assistant",
}


# --- normalising: one canonical conversation per record ---
#
# Every format maps a record's fields to the shape `tokenizer.apply_chat_template(messages, tools=tools)`
# takes: {"messages": [...], "tools": [...]}. Roles system / user / assistant / tool; an assistant message
# may carry "tool_calls": [{"type": "function", "function": {"name", "arguments": {...}}}] (its content is
# "" when it only calls); a tool message carries the result as content and the "name" of the function it
# answers. tools: JSON schemas, {"type": "function", "function": {"name", "description", "parameters"}}.
# One pure function per format (record fields -> conversation), then the same turn checks for all.

USER, ASSISTANT, SYSTEM, TOOL, CALL = "user", "assistant", "system", "tool", "call"
ROLE_ALIASES = {"human": USER, "user": USER, "gpt": ASSISTANT, "assistant": ASSISTANT, "model": ASSISTANT,
                "system": SYSTEM, "tool": TOOL, "function": TOOL, "observation": TOOL, "function_call": CALL}


def _text(fields: dict[str, Any], name: str, where: str, required: bool = True) -> str:
    value = fields.get(name)
    if value is None:
        if required:
            raise BadRecord(where, f"field '{name}' is missing" if name not in fields
                            else f"field '{name}' is null")
        return ""
    if not isinstance(value, str):
        raise BadRecord(where, f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def _content(value: Any, where: str, at: str) -> str:
    """A turn's text: a string, or typed parts that are all text ({"type": "text", "text"|"value": ...}), joined
    as chat templates join them (nothing in between)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise BadRecord(where, f"{at}: must be a string or a list of text parts, got {type(value).__name__}")
    texts = []
    for i, part in enumerate(value):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind is None:
            raise BadRecord(where, f"{at}[{i}]: a content part must be an object with a \"type\", "
                                   f"got {abbreviate(part)}")
        if kind != "text":
            raise BadRecord(where, f"{at}[{i}]: a content part of type {abbreviate(kind)}; only text can be "
                                   "trained on (this is a text model)", "non_text_content")
        text = part["text"] if part.get("text") is not None else part.get("value")
        if not isinstance(text, str):
            raise BadRecord(where, f"{at}[{i}]: a text part needs a string \"text\" (or \"value\")")
        texts.append(text)
    return "".join(texts)


def _json_value(value: Any, where: str, at: str, reason: str) -> Any:
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as err:
        raise BadRecord(where, f"{at}: not valid JSON ({err.msg}): {abbreviate(value)}", reason) from None


def _tools(value: Any, where: str, at: str = "tools") -> list[dict]:
    """Function schemas, given as a list or a JSON string of one; bare {"name", "parameters"} objects (glaive,
    LLaMA-Factory) get the {"type": "function", "function": ...} wrapper."""
    if value is None or value == "":
        return []
    value = _json_value(value, where, at, "bad_tools")
    if not isinstance(value, list):
        raise BadRecord(where, f"{at}: must be a list of function schemas, got {type(value).__name__}", "bad_tools")
    tools = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or (tool.get("type") or "function") != "function":
            raise BadRecord(where, f"{at}[{i}]: a tool must be a function schema, got {abbreviate(tool)}",
                            "bad_tools")
        function = (tool["function"] if isinstance(tool.get("function"), dict)
                    else {k: v for k, v in tool.items() if k != "type"})  # bare, or {"type": "function", "name"...}
        if not (isinstance(function.get("name"), str) and function["name"]):
            raise BadRecord(where, f"{at}[{i}]: a function schema needs a \"name\", got {abbreviate(tool)}",
                            "bad_tools")
        tools.append({"type": "function", "function": function})
    return tools


def _tool_call(call: Any, where: str, at: str) -> dict:
    """{"type": "function", "function": {"name", "arguments"}} (OpenAI, HF) or {"name", "arguments"} (glaive);
    arguments as an object or as a JSON string of one."""
    function = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else call
    if not (isinstance(function, dict) and isinstance(function.get("name"), str) and function["name"]):
        raise BadRecord(where, f"{at}: a tool call needs a function \"name\", got {abbreviate(call)}",
                        "bad_tool_call")
    arguments = function.get("arguments")
    arguments = {} if arguments is None or arguments == "" else _json_value(arguments, where, f"{at}.arguments",
                                                                            "bad_tool_call")
    if not isinstance(arguments, dict):
        raise BadRecord(where, f"{at}.arguments: must be a JSON object, got {abbreviate(arguments)}",
                        "bad_tool_call")
    canonical: dict[str, Any] = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call, dict) and isinstance(call.get("id"), str):
        canonical["id"] = call["id"]
    return canonical


def _tool_calls(value: Any, where: str, at: str) -> list[dict]:
    calls = _json_value(value, where, at, "bad_tool_call")
    calls = calls if isinstance(calls, list) else [calls]
    return [_tool_call(call, where, f"{at}[{i}]" if len(calls) > 1 else at) for i, call in enumerate(calls)]


def _role(value: Any, where: str, at: str) -> str:
    role = ROLE_ALIASES.get(value) if isinstance(value, str) else None
    if role is None:
        raise BadRecord(where, f"{at}: unknown role {abbreviate(value)}", "unknown_role")
    return role


def check_turns(messages: list[dict], tools: list[dict], where: str, turns: list[str]) -> dict[str, Any]:
    """The conversation, once its turns make sense for training: it ends with a non-empty assistant turn,
    every assistant turn says something (text or a tool call) and follows a user turn, and every tool result
    answers an earlier call (whose function name it takes). `turns` names each message's place in the record."""
    if not any(m["role"] == ASSISTANT and (m["content"].strip() or m.get("tool_calls")) for m in messages):
        raise BadRecord(where, "no assistant turn with text to learn from", "no_assistant_text")
    prompted = False
    pending: list[dict] = []  # calls not yet answered, oldest first
    for message, at in zip(messages, turns, strict=True):
        role = message["role"]
        if role == ASSISTANT:
            if not prompted:
                raise BadRecord(where, f"{at}: an assistant turn before any user turn", "no_user_before_assistant")
            if not message["content"].strip() and not message.get("tool_calls"):
                raise BadRecord(where, f"{at}: empty assistant turn (nothing to learn; drop the turn or fill it)",
                                "empty_assistant_turn")
            pending += message.get("tool_calls", [])
        elif role == USER:
            prompted = True
        elif role == TOOL:
            answered = _answered_call(message, pending)
            if answered is None:
                raise BadRecord(where, f"{at}: a tool result with no tool call before it", "orphan_tool_result")
            pending.remove(answered)
            message.setdefault("name", answered["function"]["name"])
            prompted = True
    if messages[-1]["role"] != ASSISTANT:
        raise BadRecord(where, f"{turns[-1]}: the last turn must be the assistant's", "last_turn_not_assistant")
    return {"messages": messages, "tools": tools}


def _answered_call(result: dict, pending: list[dict]) -> dict | None:
    """The call a tool result answers: by tool_call_id, else by function name, else the oldest open one."""
    if "tool_call_id" in result:
        return next((c for c in pending if c.get("id") == result["tool_call_id"]), None)
    if "name" in result:
        return next((c for c in pending if c["function"]["name"] == result["name"]), None)
    return pending[0] if pending else None


def alpaca_conversation(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """{instruction, input?, output, system?, history?: [[user, assistant], ...]}"""
    instruction = _text(fields, "instruction", where)
    output = _text(fields, "output", where)
    extra = _text(fields, "input", where, required=False)
    system = _text(fields, "system", where, required=False)
    messages = [{"role": SYSTEM, "content": system}] if system else []
    turns = ["system"] if system else []
    history = fields.get("history") or []
    if not isinstance(history, list):
        raise BadRecord(where, "field 'history' must be a list of [user, assistant] pairs")
    for i, turn in enumerate(history):
        if not (isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise BadRecord(where, "field 'history' must be a list of [user, assistant] string pairs")
        messages += [{"role": USER, "content": turn[0]}, {"role": ASSISTANT, "content": turn[1]}]
        turns += [f"history[{i}][0]", f"history[{i}][1]"]
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    messages += [{"role": USER, "content": prompt}, {"role": ASSISTANT, "content": output}]
    return check_turns(messages, [], where, [*turns, "instruction", "output"])


def sharegpt_conversation(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """{conversations: [{from, value}], system?, tools?}: from human/user, gpt/assistant/model, system,
    function_call (value: JSON {"name", "arguments"} or a list of them), observation/tool (a tool result);
    tools as a list or a JSON string."""
    system = _text(fields, "system", where, required=False)
    messages = [{"role": SYSTEM, "content": system}] if system else []
    turns = ["system"] if system else []
    conversation = fields.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        raise BadRecord(where, "field 'conversations' must be a non-empty list of turns")
    for i, turn in enumerate(conversation):
        at = f"conversations[{i}]"
        if not isinstance(turn, dict):
            raise BadRecord(where, f"{at} must be an object")
        role = _role(turn.get("from"), where, f"{at}.from")
        if turn.get("value") is None:
            raise BadRecord(where, f"{at}: field 'value' is " + ("null" if "value" in turn else "missing"))
        if role == CALL:
            messages.append({"role": ASSISTANT, "content": "", "tool_calls": _tool_calls(turn["value"], where,
                                                                                          f"{at}.value")})
        else:
            messages.append({"role": role, "content": _content(turn["value"], where, f"{at}.value")})
        turns.append(at)
    return check_turns(messages, _tools(fields.get("tools"), where), where, turns)


def messages_conversation(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """{messages: [{role, content, tool_calls?, name?, tool_call_id?}], tools?} (OpenAI, HF, TRL): content a
    string or typed text parts; assistant tool_calls (or the older function_call); tool (or function) results."""
    conversation = fields.get("messages")
    if not isinstance(conversation, list) or not conversation:
        raise BadRecord(where, "field 'messages' must be a non-empty list of turns")
    messages, turns = [], []
    for i, turn in enumerate(conversation):
        at = f"messages[{i}]"
        if not isinstance(turn, dict):
            raise BadRecord(where, f"{at} must be an object")
        role = _role(turn.get("role"), where, f"{at}.role")
        if role == CALL:
            raise BadRecord(where, f"{at}.role: unknown role 'function_call' (use an assistant turn with "
                                   "tool_calls)", "unknown_role")
        calls = []
        if role == ASSISTANT and turn.get("tool_calls") is not None:
            if not isinstance(turn["tool_calls"], list):
                raise BadRecord(where, f"{at}.tool_calls: must be a list, got {type(turn['tool_calls']).__name__}",
                                "bad_tool_call")
            calls = [_tool_call(c, where, f"{at}.tool_calls[{j}]") for j, c in enumerate(turn["tool_calls"])]
        elif role == ASSISTANT and turn.get("function_call") is not None:
            calls = [_tool_call(turn["function_call"], where, f"{at}.function_call")]
        if turn.get("content") is None and not calls:
            raise BadRecord(where, f"{at}: field 'content' is " + ("null" if "content" in turn else "missing"))
        content = turn.get("content")
        message: dict[str, Any] = {"role": role, "content": "" if content is None else _content(content, where,
                                                                                              f"{at}.content")}
        if calls:
            message["tool_calls"] = calls
        if role == TOOL:
            for key in ("name", "tool_call_id"):
                if isinstance(turn.get(key), str) and turn[key]:
                    message[key] = turn[key]
        messages.append(message)
        turns.append(at)
    return check_turns(messages, _tools(fields.get("tools"), where), where, turns)


NORMALISERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = dict(zip(
    DATA_FORMATS, (alpaca_conversation, sharegpt_conversation, messages_conversation), strict=True))


def detect_format(fields: dict[str, Any], where: str) -> str:
    if "messages" in fields:
        return "messages"
    if "conversations" in fields:
        return "sharegpt"
    if "instruction" in fields:
        return "alpaca"
    raise BadRecord(where, f"cannot tell the format from keys {abbreviate(sorted(fields)[:6])}; "
                           f"set format: {'|'.join(NORMALISERS)} or a columns: mapping", "unknown_format")


def to_conversation(record: Record, fmt: str, columns: dict[str, str]) -> dict[str, Any]:
    if record.raw is not None:
        record = parse_line(record)
    if record.problem is not None:
        raise BadRecord(record.where, record.problem, "invalid_json")
    fields = record.fields
    if not isinstance(fields, dict):
        raise BadRecord(record.where, f"a record must be an object, got {type(fields).__name__}", "not_an_object")
    if columns:
        fields = {**fields, **{ours: fields.get(theirs) for ours, theirs in columns.items()}}
    if fmt == "auto":
        fmt = detect_format(fields, record.where)
    return NORMALISERS[fmt](fields, record.where)


def conversation_messages(conversation: dict[str, Any] | list[dict]) -> list[dict]:
    return conversation["messages"] if isinstance(conversation, dict) else conversation


def conversation_digest(conversation: dict[str, Any] | list[dict]) -> int:
    """A 64-bit content hash; a conversation without tools hashes as its messages (the ids of PREP_VERSION 2)."""
    key = conversation["messages"] if isinstance(conversation, dict) and not conversation["tools"] else conversation
    return int.from_bytes(hashlib.blake2b(canonical_json(key).encode(), digest_size=8).digest(), "big")


def conversation_id(conversation: dict[str, Any] | list[dict]) -> str:
    """conversation_digest as 16 hex digits."""
    return f"{conversation_digest(conversation):016x}"
