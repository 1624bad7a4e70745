"""One canonical conversation per record: a pure function per format (alpaca, sharegpt, messages), then
the same turn checks for all."""

import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from qctrain.data.sources import Record, parse_line
from qctrain.errors import InputError
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
    "unhonoured_weight": "a training flag that cannot be honoured: weight 1 (train/loss true) on a turn that is not "
                         "the assistant's, or weight 0 with data.loss_on: all",
    "misplaced_reasoning": "a reasoning trace on a turn that is not the assistant's, or next to a think block in "
                           "its content",
    "unknown_key": "a key that is neither read nor known metadata (with data.on_bad_record: error)",
}


# --- normalising: one canonical conversation per record ---
#
# Every format maps a record's fields to the shape `tokenizer.apply_chat_template(messages, tools=tools)`
# takes: {"messages": [...], "tools": [...]}. Roles system / user / assistant / tool; an assistant message
# may carry "tool_calls": [{"type": "function", "function": {"name", "arguments": {...}}}] (its content is
# "" when it only calls); a tool message carries the result as content and the "name" of the function it
# answers. tools: JSON schemas, {"type": "function", "function": {"name", "description", "parameters"}}.
# A message may also carry "weight": 0 or 1 (the turn's training flag as the record gave it: OpenAI's and
# Mistral's weight, axolotl's train, AgentInstruct's and ms-swift's loss; an assistant turn with weight 0 stays
# in the context, unsupervised) and an assistant message "reasoning_content" (its reasoning trace).
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


def _is_typed_parts(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(p, dict) and "type" in p for p in value)


def _content(value: Any, where: str, at: str, role: str = USER) -> str:
    """A turn's text: a string, or typed parts that are all text ({"type": "text", "text"|"value": ...}), joined
    as chat templates join them (nothing in between). A tool result given as a JSON value (an object, a list, a
    number) is its JSON text."""
    if isinstance(value, str):
        return value
    if role == TOOL and not _is_typed_parts(value):
        return json.dumps(value, ensure_ascii=False)
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


def read_tools_file(path: Path) -> list[dict]:
    """A JSON file of tool schemas (a list, as a record's `tools`), for generating with tools."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise InputError(f"{path}: {err.strerror or err}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: not a JSON file of tool schemas ({err})") from None
    if not isinstance(value, list) or not value:
        raise InputError(f"{path}: expected a JSON list of tool (function) schemas, got {abbreviate(value)}")
    try:
        return _tools(value, str(path))
    except BadRecord as err:
        raise InputError(str(err)) from None


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


# A turn's training flag: OpenAI's and Mistral's `weight` (0 or 1), axolotl's `train` and AgentInstruct's and
# ms-swift's `loss` (true or false).
FLAG_KEYS = ("weight", "train", "loss")
# Where a reasoning trace is given: the first is what chat templates read (transformers aliases the others).
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")


def _training_flag(turn: dict[str, Any], where: str, at: str) -> int | None:
    """The turn's training flag as 0 or 1, or None when it gives none; flags that disagree make the record bad."""
    given: dict[str, int] = {}
    for key in FLAG_KEYS:
        value = turn.get(key)
        if value is None:
            continue
        if key == "weight" and (type(value) is not int or value not in (0, 1)):
            raise BadRecord(where, f"{at}.weight: must be 0 or 1, got {abbreviate(value)}")
        if key != "weight" and not isinstance(value, bool):
            raise BadRecord(where, f"{at}.{key}: must be true or false, got {abbreviate(value)}")
        given[key] = int(value)
    if len(set(given.values())) > 1:
        flags = ", ".join(f"{key}: {abbreviate(turn[key])}" for key in given)
        raise BadRecord(where, f"{at}: the training flags disagree ({flags})")
    return next(iter(given.values()), None)


def _reasoning(turn: dict[str, Any], where: str, at: str) -> str | None:
    """The turn's reasoning trace (under any of REASONING_KEYS), or None when it has none or an empty one."""
    traces = {}
    for key in REASONING_KEYS:
        value = turn.get(key)
        if value is None:
            continue
        if not isinstance(value, str):
            raise BadRecord(where, f"{at}.{key}: must be a string, got {type(value).__name__}")
        traces[key] = value
    if len(set(traces.values())) > 1:
        raise BadRecord(where, f"{at}: different reasoning traces under {' and '.join(traces)}")
    trace = next(iter(traces.values()), "")
    return trace if trace.strip() else None


def _flags_and_trace(message: dict[str, Any], turn: dict[str, Any], where: str, at: str) -> dict[str, Any]:
    """The message with the turn's training flag and reasoning trace, where it has them."""
    flag, trace = _training_flag(turn, where, at), _reasoning(turn, where, at)
    if flag is not None:
        if flag == 1 and message["role"] != ASSISTANT:
            raise BadRecord(where, f"{at}: a training flag (weight 1, train/loss true) on a {message['role']} turn; "
                                   "only assistant turns are trained on", "unhonoured_weight")
        message["weight"] = flag
    if trace is not None:
        if message["role"] != ASSISTANT:
            raise BadRecord(where, f"{at}: a reasoning trace on a {message['role']} turn; only assistant turns "
                                   "reason", "misplaced_reasoning")
        if "</think>" in message["content"]:
            raise BadRecord(where, f"{at}: a reasoning trace and a think block in the content: the trace would "
                                   "be there twice", "misplaced_reasoning")
        message["reasoning_content"] = trace
    return message


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
    messages, turns = alpaca_prompt(fields, where)
    output = _text(fields, "output", where)
    messages.append({"role": ASSISTANT, "content": output})
    return check_turns(messages, [], where, [*turns, "output"])


def alpaca_prompt(fields: dict[str, Any], where: str) -> tuple[list[dict], list[str]]:
    """An alpaca record's messages before its answer (system, history, the instruction with its input), and where
    each comes from."""
    instruction = _text(fields, "instruction", where)
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
    messages.append({"role": USER, "content": prompt})
    return messages, [*turns, "instruction"]


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
        messages.append(sharegpt_message(turn, where, at))
        turns.append(at)
    return check_turns(messages, _tools(fields.get("tools"), where), where, turns)


def sharegpt_message(turn: Any, where: str, at: str) -> dict[str, Any]:
    """One ShareGPT turn ({from, value, ...}) as a message; `at` names it in the record."""
    if not isinstance(turn, dict):
        raise BadRecord(where, f"{at} must be an object")
    role = _role(turn.get("from"), where, f"{at}.from")
    if turn.get("value") is None:
        raise BadRecord(where, f"{at}: field 'value' is " + ("null" if "value" in turn else "missing"))
    if role == CALL:
        message = {"role": ASSISTANT, "content": "", "tool_calls": _tool_calls(turn["value"], where, f"{at}.value")}
    else:
        message = {"role": role, "content": _content(turn["value"], where, f"{at}.value", role)}
    return _flags_and_trace(message, turn, where, at)


def messages_conversation(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """{messages: [{role, content, tool_calls?, name?, tool_call_id?, weight?, reasoning_content?}], tools?,
    functions?, only_last?} (OpenAI, HF, TRL, Mistral): content a string or typed text parts; assistant tool_calls
    (or OpenAI's older function_call); tool (or function) results; OpenAI's older top-level functions join the
    tools; Mistral's only_last: true leaves every assistant turn but the last in the context."""
    conversation = fields.get("messages")
    if not isinstance(conversation, list) or not conversation:
        raise BadRecord(where, "field 'messages' must be a non-empty list of turns")
    messages, turns = [], []
    for i, turn in enumerate(conversation):
        at = f"messages[{i}]"
        messages.append(message_of(turn, where, at))
        turns.append(at)
    if fields.get("only_last") is not None and not isinstance(fields["only_last"], bool):
        raise BadRecord(where, f"field 'only_last' must be true or false, got {abbreviate(fields['only_last'])}")
    if fields.get("only_last"):
        assistant_turns = [m for m in messages if m["role"] == ASSISTANT]
        for message in assistant_turns[:-1]:
            message["weight"] = 0
    tools = _tools(fields.get("tools"), where) + _tools(fields.get("functions"), where, "functions")
    return check_turns(messages, tools, where, turns)


def message_of(turn: Any, where: str, at: str) -> dict[str, Any]:
    """One message of a `messages` list ({role, content, tool_calls?, ...}) in canonical form; `at` names it."""
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
    message: dict[str, Any] = {"role": role, "content": "" if content is None else _content(
        content, where, f"{at}.content", role)}
    if calls:
        message["tool_calls"] = calls
    if role == TOOL:
        for key in ("name", "tool_call_id"):
            if isinstance(turn.get(key), str) and turn[key]:
                message[key] = turn[key]
    return _flags_and_trace(message, turn, where, at)


NORMALISERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = dict(zip(
    DATA_FORMATS, (alpaca_conversation, sharegpt_conversation, messages_conversation), strict=True))


# --- keys: read, ignored on purpose, or unknown (named, or refused under data.on_bad_record: error) ---

# What each format reads, on the record and on each turn.
READ_KEYS = {
    "alpaca": ({"instruction", "input", "output", "system", "history"}, set()),
    "sharegpt": ({"conversations", "system", "tools"}, {"from", "value", *FLAG_KEYS, *REASONING_KEYS}),
    "messages": ({"messages", "tools", "functions", "only_last"},
                 {"role", "content", "tool_calls", "function_call", "name", "tool_call_id", *FLAG_KEYS,
                  *REASONING_KEYS}),
}
TURNS_KEY = {"sharegpt": "conversations", "messages": "messages"}
# Metadata we ignore on purpose, on a record or a turn: ids, times, provenance, labels, scores. Also `name` (a
# participant's name: the templates here do not render it; a tool result's name pairs it with its call).
IGNORED_KEYS = frozenset({
    "id", "uuid", "idx", "index", "conversation_id", "prompt_id", "message_id", "name",
    "created", "created_at", "updated_at", "timestamp", "date", "time",
    "source", "dataset", "origin", "url", "license", "split", "model", "hash",
    "category", "categories", "task", "tags", "topic", "lang", "language",
    "score", "scores", "rating", "ratings", "quality", "metadata", "meta",
})
# Per format, fields that repeat others: Alpaca copies' rendered prompt; OpenAI's parallel_tool_calls (the calls
# in the record are trained as they are).
IGNORED_FORMAT_KEYS = {"alpaca": frozenset({"text"}), "sharegpt": frozenset(),
                       "messages": frozenset({"parallel_tool_calls"})}
# Images, audio and video that come as keys beside the text (LLaVA, LLaMA-Factory, OpenAI's audio replies).
MEDIA_KEYS = ("images", "image", "videos", "video", "audios", "audio")


def _has_value(value: Any) -> bool:
    """A key whose value is null or empty carries nothing: ignoring it drops nothing."""
    return value is not None and value != "" and value != [] and value != {}


def _media(fields: dict[str, Any], where: str, at: str = "") -> None:
    for key in MEDIA_KEYS:
        if _has_value(fields.get(key)):
            raise BadRecord(where, f"{at}{key}: {'an' if key[0] in 'aeiou' else 'a'} {key} beside the text; only "
                                   "text can be trained on (this is a text model)", "non_text_content")


def unread_keys(fields: dict[str, Any], fmt: str, ignore: frozenset[str] = frozenset()) -> list[str]:
    """The keys of a (normalised, so well-formed) record that its format does not read and that are not known
    metadata, with a value: `key` on the record, `messages[].key` on a turn. `ignore`: more names to ignore."""
    record_keys, turn_keys = READ_KEYS[fmt]
    skip = IGNORED_KEYS | IGNORED_FORMAT_KEYS[fmt] | ignore
    unread = [k for k, v in fields.items() if k not in record_keys and k not in skip and _has_value(v)]
    if fmt in TURNS_KEY:
        turns = fields[TURNS_KEY[fmt]]
        found = {k for turn in turns for k, v in turn.items() if k not in turn_keys and k not in skip
                 and _has_value(v)}
        unread += [f"{TURNS_KEY[fmt]}[].{k}" for k in sorted(found)]
    return unread


def detect_format(fields: dict[str, Any], where: str) -> str:
    if "messages" in fields:
        return "messages"
    if "conversations" in fields:
        return "sharegpt"
    if "instruction" in fields:
        return "alpaca"
    raise BadRecord(where, f"cannot tell the format from keys {abbreviate(sorted(fields)[:6])}; "
                           f"set format: {'|'.join(NORMALISERS)} or a columns: mapping", "unknown_format")


def to_conversation(record: Record, fmt: str, columns: dict[str, str], ignore: frozenset[str] = frozenset(),
                    unread: dict[str, int] | None = None, loss_on: str = "assistant") -> dict[str, Any]:
    """The record's canonical conversation. Keys it does not read (unread_keys) make it bad, or with `unread`
    given are counted there (key -> records) and ignored; `ignore`: more key names to ignore. With loss_on "all"
    (every token trains) a turn with weight 0 cannot be honoured: the record is bad."""
    fields, ignore = record_fields(record, columns, ignore)
    if fmt == "auto":
        fmt = detect_format(fields, record.where)
    _media(fields, record.where)
    conversation = NORMALISERS[fmt](fields, record.where)
    if fmt in TURNS_KEY:
        for i, turn in enumerate(fields[TURNS_KEY[fmt]]):
            _media(turn, record.where, f"{TURNS_KEY[fmt]}[{i}].")
    if loss_on == "all" and any(m.get("weight") == 0 for m in conversation["messages"]):
        raise BadRecord(record.where, "a turn with weight 0 (or train/loss false), but data.loss_on: all trains on "
                                      "every token; set data.loss_on: assistant to keep such turns as context",
                        "unhonoured_weight")
    refuse_or_count(unread_keys(fields, fmt, ignore), fmt, record.where, unread)
    return conversation


def record_fields(record: Record, columns: dict[str, str], ignore: frozenset[str]) -> tuple[dict, frozenset[str]]:
    """A record's fields (a JSONL line parsed; bad when it is no JSON object), with the source's columns: mapping
    applied, and the names to ignore with the columns it renamed."""
    if record.raw is not None:
        record = parse_line(record)
    if record.problem is not None:
        raise BadRecord(record.where, record.problem, "invalid_json")
    fields = record.fields
    if not isinstance(fields, dict):
        raise BadRecord(record.where, f"a record must be an object, got {type(fields).__name__}", "not_an_object")
    if columns:
        fields = {**fields, **{ours: fields.get(theirs) for ours, theirs in columns.items()}}
        ignore = ignore | frozenset(columns.values())
    return fields, ignore


def refuse_or_count(keys: list[str], fmt: str, where: str, unread: dict[str, int] | None) -> None:
    """Keys a record's format does not read: the record is bad (unread None: data.on_bad_record: error), or each is
    counted in `unread` (key -> records)."""
    if keys and unread is None:
        raise BadRecord(where, f"{'keys' if len(keys) > 1 else 'key'} {', '.join(map(repr, keys[:5]))} not "
                               f"read (not a field of the {fmt} format nor known metadata); name "
                               f"{'them' if len(keys) > 1 else 'it'} in this source's ignore_keys, or set "
                               "data.on_bad_record: skip to ignore and count such keys", "unknown_key")
    for key in keys:
        unread[key] = unread.get(key, 0) + 1


def conversation_digest(conversation: dict[str, Any] | list[dict]) -> int:
    """A 64-bit content hash; a conversation without tools hashes as its messages (the ids of PREP_VERSION 2)."""
    key = conversation["messages"] if isinstance(conversation, dict) and not conversation["tools"] else conversation
    return int.from_bytes(hashlib.blake2b(canonical_json(key).encode(), digest_size=8).digest(), "big")


def conversation_id(conversation: dict[str, Any] | list[dict]) -> str:
    """conversation_digest as 16 hex digits."""
    return f"{conversation_digest(conversation):016x}"
