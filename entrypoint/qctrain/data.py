"""Data stage: sources -> conversational `messages` -> dedup -> split -> template -> tokens, labels -> packs.

The prepared data sets are cached under `<output.dir>/prepared/<fingerprint>/`, keyed by the data
content, the tokenizer, the chat template and every setting that changes the result.
"""

import csv
import dataclasses
import errno
import functools
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import statistics
from bisect import bisect_left, insort
from collections import defaultdict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from itertools import chain
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import xxhash

from qctrain.atomic import write_json_atomic
from qctrain.errors import InputError
from qctrain.recipe import DataSection, DataSource, abbreviate, canonical_json, output_data_overlap

if TYPE_CHECKING:
    from datasets import Dataset

PREP_VERSION = "3"  # bump when the preparation logic changes what it writes
FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet")
IGNORE = -100


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


@dataclass
class Record:
    where: str
    fields: Any
    problem: str | None = None  # set when the record could not even be parsed (a bad JSONL line)


@dataclass
class PreparedData:
    train: "Dataset"  # datasets is imported where used: preflight imports this module
    eval: "Dataset | None"
    report: dict[str, Any]
    fingerprint: str
    dir: Path
    cached: bool


def os_error_text(err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "symbolic link loop (a link that leads back to itself)"
    if err.errno == errno.EACCES:
        return "permission denied"
    if err.errno == errno.ENOENT:
        return "not found"
    return f"cannot read: {err.strerror or err}"


# --- reading sources ---

def is_hub_source(path: str) -> bool:
    return path.startswith("hub:")


def source_files(src: DataSource) -> list[Path]:
    path = Path(src.path)
    try:
        path.stat()
    except FileNotFoundError:
        raise InputError(f"{path}: data source not found") from None
    except OSError as err:  # a symlink loop, a folder we may not enter...
        raise InputError(f"{path}: {os_error_text(err)}") from None
    if path.is_file():
        if path.suffix.lower() not in FILE_TYPES:
            raise InputError(f"{path}: unsupported data file type (use {', '.join(FILE_TYPES)})")
        return [path]
    try:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_TYPES and not p.name.startswith("."))
    except OSError as err:
        raise InputError(f"{path}: {os_error_text(err)}") from None
    if not files:
        raise InputError(f"{path}: folder holds no {', '.join(FILE_TYPES)} files")
    kinds = sorted({".json" if p.suffix.lower() == ".jsonl" else p.suffix.lower() for p in files})
    if len(kinds) > 1:
        raise InputError(f"{path}: folder mixes {' and '.join(kinds)} files; keep one format per folder "
                         "or list the files as separate sources")
    return files


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: invalid UTF-8 (byte {err.start}); save the file as UTF-8") from None


def _read_json(path: Path, raw: bytes) -> Iterator[Record]:
    text = _decode(path, raw)
    if not text.strip():
        raise InputError(f"{path}: file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:  # one document: nothing after the error can be trusted
        raise InputError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    if isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON array of records, got an object "
                         f"(keys: {abbreviate(list(data)[:5])}); for one record per line use .jsonl")
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for index, item in enumerate(data):
        yield Record(f"{path}[{index}]", item)


def _read_jsonl(path: Path, raw: bytes) -> Iterator[Record]:
    """One record per line; a line that is not UTF-8 JSON is a bad record (data.on_bad_record), not the end."""
    if not raw.strip():
        raise InputError(f"{path}: file is empty")
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    for number, line in enumerate(raw.split(b"\n"), start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            yield Record(where, json.loads(line.decode("utf-8")))
        except UnicodeDecodeError as err:
            yield Record(where, None, f"invalid UTF-8 (byte {err.start} of the line); save the file as UTF-8")
        except json.JSONDecodeError as err:
            yield Record(where, None, f"invalid JSON: {err.msg} (column {err.colno})")


def _read_csv(path: Path, raw: bytes) -> Iterator[Record]:
    text = _decode(path, raw)
    if not text.strip():
        raise InputError(f"{path}: file is empty")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    _ = reader.fieldnames  # reads the header line
    first_line = reader.line_num + 1
    for row in reader:
        yield Record(f"{path}:{first_line}", row)  # where the record starts; quoted fields may span lines
        first_line = reader.line_num + 1


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except OSError as err:
        if err.errno is not None:
            raise InputError(f"{path}: {os_error_text(err)}") from None
        raise InputError(f"{path}: cannot read Parquet: {abbreviate(str(err), 200)}") from None
    except Exception as err:  # pyarrow raises several types for a broken file
        raise InputError(f"{path}: cannot read Parquet: {abbreviate(str(err), 200)}") from None
    if not rows:
        raise InputError(f"{path}: file is empty")
    for index, row in enumerate(rows):
        yield Record(f"{path}[{index}]", row)


def read_file(path: Path) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        raw = path.read_bytes()
    except OSError as err:  # EACCES, ELOOP, EIO, a folder named like a file, a vanished mount...
        raise InputError(f"{path}: {os_error_text(err)}") from None
    readers: dict[str, Callable[[Path, bytes], Iterator[Record]]] = {
        ".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv}
    return readers[suffix](path, raw)


def read_hub(src: DataSource) -> Iterator[Record]:
    from datasets import load_dataset

    name = src.path.removeprefix("hub:")
    try:
        ds = load_dataset(name, split=src.split, revision=src.revision)
    except Exception as err:
        raise InputError(f"{src.path}: cannot load Hub data set: {abbreviate(str(err).splitlines()[0], 200)}") \
            from None
    for index, row in enumerate(ds):
        yield Record(f"{src.path}[{index}]", row)


def read_source(src: DataSource) -> Iterator[Record]:
    if is_hub_source(src.path):
        yield from read_hub(src)
        return
    for path in source_files(src):
        yield from read_file(path)


def source_fingerprint(src: DataSource) -> str:
    digest = hashlib.sha256(canonical_json(src.model_dump(mode="json")).encode())
    if not is_hub_source(src.path):
        for path in source_files(src):
            digest.update(path.name.encode())
            try:
                with open(path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
            except OSError as err:
                raise InputError(f"{path}: {os_error_text(err)}") from None
    return digest.hexdigest()


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


NORMALISERS: dict[str, Callable[[dict[str, Any], str], dict[str, Any]]] = {
    "alpaca": alpaca_conversation, "sharegpt": sharegpt_conversation, "messages": messages_conversation}


def detect_format(fields: dict[str, Any], where: str) -> str:
    if "messages" in fields:
        return "messages"
    if "conversations" in fields:
        return "sharegpt"
    if "instruction" in fields:
        return "alpaca"
    raise BadRecord(where, f"cannot tell the format from keys {abbreviate(sorted(fields)[:6])}; "
                           "set format: alpaca|sharegpt|messages or a columns: mapping", "unknown_format")


def to_conversation(record: Record, fmt: str, columns: dict[str, str]) -> dict[str, Any]:
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


to_messages = to_conversation  # the older name (bench/packing.py)


def conversation_messages(conversation: dict[str, Any] | list[dict]) -> list[dict]:
    return conversation["messages"] if isinstance(conversation, dict) else conversation


@dataclass
class SourceCounts:
    """What became of one source's records: read = kept + bad + duplicates + overlong + unsupervised."""

    read: int = 0
    bad: int = 0
    kept: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)


def load_sources(sources: list[DataSource], on_bad: str) -> tuple[list[dict], list[int], dict[str, SourceCounts]]:
    """The conversations of every source, the index of the source each came from, and per-source counts."""
    conversations: list[dict] = []
    origins: list[int] = []
    counts: dict[str, SourceCounts] = {}
    for index, src in enumerate(sources):
        tally = counts.setdefault(src.path, SourceCounts())
        for record in read_source(src):
            tally.read += 1
            try:
                conversations.append(to_conversation(record, src.format, src.columns))
                origins.append(index)
                tally.kept += 1
            except BadRecord as err:
                if on_bad == "error":
                    raise InputError(f"{err} (set data.on_bad_record: skip to skip such records)") from None
                tally.bad += 1
                tally.by_reason[err.reason] = tally.by_reason.get(err.reason, 0) + 1
                if len(tally.examples) < 5:
                    tally.examples.append(str(err))
    return conversations, origins, counts


def load_conversations(sources: list[DataSource], on_bad: str) -> tuple[list[dict], dict[str, Any]]:
    conversations, _, counts = load_sources(sources, on_bad)
    return conversations, {path: dataclasses.asdict(tally) for path, tally in counts.items()}


# --- dedup and split ---

def conversation_id(conversation: dict[str, Any] | list[dict]) -> str:
    """A content hash; a conversation without tools hashes as its messages (the ids of PREP_VERSION 2)."""
    key = conversation["messages"] if isinstance(conversation, dict) and not conversation["tools"] else conversation
    return hashlib.blake2b(canonical_json(key).encode(), digest_size=8).hexdigest()


def unique_indices(ids: list[str]) -> list[int]:
    """Positions of the first occurrence of each id."""
    seen: set[str] = set()
    first = []
    for index, cid in enumerate(ids):
        if cid not in seen:
            seen.add(cid)
            first.append(index)
    return first


def dedup(conversations: list) -> tuple[list, list[str], int]:
    ids = [conversation_id(c) for c in conversations]
    keep = unique_indices(ids)
    return [conversations[i] for i in keep], [ids[i] for i in keep], len(conversations) - len(keep)


def split_ids(ids: list[str], seed: int, fraction: float | None, count: int | None) -> set[str]:
    """Eval ids: the records whose seeded hash ranks lowest. Independent of input order."""
    n_eval = count if count is not None else max(1, round(len(ids) * fraction)) if fraction else 0
    if n_eval >= len(ids):
        raise InputError(f"data.eval: {n_eval} eval records would leave none of {len(ids)} for training")
    ranked = sorted(ids, key=lambda cid: hashlib.blake2b(f"{seed}:{cid}".encode(), digest_size=8).digest())
    return set(ranked[:n_eval])


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


# --- tokenizing ---
#
# The fast path renders the chat template with transformers' own jinja machinery (the function that
# `apply_chat_template` calls, so the text and the {% generation %} spans are the same), encodes the texts
# with one batched call to the Rust tokenizer, and turns spans into labels with array operations on the
# token offsets, reproducing `apply_chat_template(..., return_assistant_tokens_mask=True)` exactly. Large
# inputs are split into chunks that worker processes (forked, one per core) render and encode in parallel.
# Records travel as flat arrays (`Tokenized`), never as one Python list per record.

PREP_WORKERS_ENV = "QCTRAIN_PREP_WORKERS"  # worker processes for tokenizing; default: one per usable core
CHUNK_RECORDS = 2048  # records rendered and encoded per task
MIN_RECORDS_PER_WORKER = 4096  # below this, forking costs more than it saves


@dataclass
class Tokenized:
    """Token ids and labels of many records, flat: record i is ids[bounds[i]:bounds[i + 1]]."""

    ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where not supervised
    bounds: np.ndarray  # int64, len(records) + 1

    def __len__(self) -> int:
        return len(self.bounds) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.bounds)

    def record(self, i: int) -> tuple[list[int], list[int]]:
        lo, hi = self.bounds[i], self.bounds[i + 1]
        return self.ids[lo:hi].tolist(), self.labels[lo:hi].tolist()

    def to_lists(self) -> tuple[list[list[int]], list[list[int]]]:
        cuts = self.bounds[1:-1]
        return ([part.tolist() for part in np.split(self.ids, cuts)] if len(self) else [],
                [part.tolist() for part in np.split(self.labels, cuts)] if len(self) else [])

    @classmethod
    def from_lists(cls, input_ids: list[list[int]], labels: list[list[int]]) -> "Tokenized":
        lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
        bounds = np.zeros(len(input_ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=bounds[1:])
        total = int(bounds[-1])
        return cls(np.fromiter(chain.from_iterable(input_ids), dtype=np.int32, count=total),
                   np.fromiter(chain.from_iterable(labels), dtype=np.int32, count=total), bounds)

    @classmethod
    def concat(cls, parts: list["Tokenized"]) -> "Tokenized":
        if not parts:
            return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64))
        offsets = np.cumsum([0] + [int(p.bounds[-1]) for p in parts[:-1]])
        bounds = np.concatenate([parts[0].bounds[:1]]
                                + [p.bounds[1:] + o for p, o in zip(parts, offsets, strict=True)])
        return cls(np.concatenate([p.ids for p in parts]), np.concatenate([p.labels for p in parts]), bounds)


def tokenize_reference(conversations: list, tokenizer, template: str, loss_on: str,
                       batch_size: int = 512) -> tuple[list[list[int]], list[list[int]]]:
    """The plain-library way (`apply_chat_template` with the assistant mask, and `tools=` per record): the
    definition the fast path must match, and the path for tokenizers without a Rust backend."""
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    masked = loss_on == "assistant"
    all_messages, all_tools = template_inputs(conversations, template_renders_tools(template))
    for start in range(0, len(all_messages), batch_size):
        batch, batch_tools = all_messages[start:start + batch_size], all_tools[start:start + batch_size]
        groups = [(batch, None)] if not any(batch_tools) else [([m], t) for m, t in zip(batch, batch_tools,
                                                                                          strict=True)]
        for group, tools in groups:
            out = tokenizer.apply_chat_template(group, tools=tools, chat_template=template, tokenize=True,
                                                return_dict=True, return_assistant_tokens_mask=masked)
            for i, ids in enumerate(out["input_ids"]):
                input_ids.append(ids)
                if masked:
                    mask = out["assistant_masks"][i]
                    labels.append([t if m else IGNORE for t, m in zip(ids, mask, strict=True)])
                else:
                    labels.append(list(ids))
    return input_ids, labels


def _rust_backend(tokenizer):
    """The tokenizers.Tokenizer behind a fast tokenizer, set up as `tokenizer(text)` would use it (no
    padding, no truncation, special tokens as the tokenizer says); None for a Python-only tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or not hasattr(backend, "encode_batch"):
        return None
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    split_special = getattr(tokenizer, "split_special_tokens", False)
    if hasattr(backend, "encode_special_tokens") and backend.encode_special_tokens != split_special:
        backend.encode_special_tokens = split_special
    return backend


def _assistant_mask(encodings, spans: list[list[tuple[int, int]]], total: int) -> np.ndarray:
    """Per token: does it overlap a {% generation %} span, exactly as apply_chat_template decides (one pass
    over the tokens with a span pointer that only moves forward), computed on arrays for a whole chunk."""
    n = len(encodings)
    offsets = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encodings)),
                          dtype=np.int64, count=2 * total).reshape(-1, 2)
    span_counts = np.fromiter(map(len, spans), dtype=np.int64, count=n)
    flat_spans = np.fromiter(chain.from_iterable(chain.from_iterable(spans)), dtype=np.int64,
                             count=2 * int(span_counts.sum())).reshape(-1, 2)
    span_record = np.repeat(np.arange(n, dtype=np.int64), span_counts)
    if len(flat_spans) > 1:
        same = span_record[1:] == span_record[:-1]
        if np.any(same & (flat_spans[1:, 1] < flat_spans[:-1, 1])):  # spans out of order: the plain loop
            return _assistant_mask_loop(encodings, spans, total)
    if total == 0 or len(flat_spans) == 0:
        return np.zeros(total, dtype=bool)
    lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=n)
    token_record = np.repeat(np.arange(n, dtype=np.int64), lengths)
    # One key space for the whole chunk: record i's positions live in [i * stride, (i + 1) * stride).
    stride = int(max(offsets.max(initial=0), flat_spans.max(initial=0))) + 1
    # The pointer moves past a span once a token starts at or after its end: it follows the running max start.
    reached = np.maximum.accumulate(token_record * stride + offsets[:, 0])
    span_keys = span_record * stride + flat_spans[:, 1]
    pointer = np.searchsorted(span_keys, reached, side="right")  # first span ending after it
    valid = pointer < len(span_keys)
    pointer = np.minimum(pointer, len(span_keys) - 1)
    return valid & (span_record[pointer] == token_record) & (offsets[:, 1] > flat_spans[pointer, 0])


def _assistant_mask_loop(encodings, spans, total: int) -> np.ndarray:
    mask = np.zeros(total, dtype=bool)
    at = 0
    for encoding, record_spans in zip(encodings, spans, strict=True):
        span_idx = 0
        for token_id, (token_start, token_end) in enumerate(encoding.offsets):
            while span_idx < len(record_spans) and token_start >= record_spans[span_idx][1]:
                span_idx += 1
            if span_idx == len(record_spans):
                break
            if token_end > record_spans[span_idx][0]:
                mask[at + token_id] = True
        at += len(encoding)
    return mask


def _without_none(conversation: list[dict]) -> list[dict]:
    # What apply_chat_template does to each message before rendering (drops keys whose value is None).
    if all(isinstance(m, dict) and None not in m.values() for m in conversation):
        return conversation
    return [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in conversation]


def _render(messages: list[list[dict]], tools: list[list[dict] | None], template: str, masked: bool,
            special_tokens: dict) -> tuple[list[str], list]:
    from transformers.utils.chat_template_utils import render_jinja_template

    kwargs = {"chat_template": template, "return_assistant_tokens_mask": masked, **special_tokens}
    if not any(tools):
        return render_jinja_template(conversations=[_without_none(c) for c in messages], **kwargs)
    texts, spans = [], []
    for conversation, record_tools in zip(messages, tools, strict=True):
        (text,), (span,) = render_jinja_template(conversations=[_without_none(conversation)], tools=record_tools,
                                                 **kwargs)
        texts.append(text)
        spans.append(span)
    return texts, spans


def _encode(messages: list[list[dict]], tools: list[list[dict] | None], tokenizer, backend, template: str,
            masked: bool) -> Tokenized:
    texts, spans = _render(messages, tools, template, masked, tokenizer.special_tokens_map)
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
    bounds = np.zeros(len(encodings) + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    total = int(bounds[-1])
    ids = np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=total)
    if masked:
        labels = np.where(_assistant_mask(encodings, spans, total), ids, np.int32(IGNORE)).astype(np.int32)
    else:
        labels = ids.copy()
    return Tokenized(ids, labels, bounds)


_JOB: tuple | None = None  # what forked workers read: (messages, tools, tokenizer, backend, template, masked)


def _encode_range(bounds: tuple[int, int]) -> Tokenized:
    messages, tools, tokenizer, backend, template, masked = _JOB
    lo, hi = bounds
    return _encode(messages[lo:hi], tools[lo:hi], tokenizer, backend, template, masked)


def prep_workers(records: int) -> int:
    """Worker processes for tokenizing `records`: QCTRAIN_PREP_WORKERS, else one per usable core, and
    none (in process) for small inputs or where fork is not available."""
    setting = os.environ.get(PREP_WORKERS_ENV, "").strip()
    if setting:
        try:
            wanted = int(setting)
        except ValueError:
            raise InputError(f"{PREP_WORKERS_ENV}={setting!r}: expected a whole number") from None
    else:
        wanted = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        wanted = min(wanted, records // MIN_RECORDS_PER_WORKER)
    if "fork" not in multiprocessing.get_all_start_methods():
        return 1
    return max(1, min(wanted, -(-records // CHUNK_RECORDS)))


def tokenize_flat(conversations: list, tokenizer, template: str, loss_on: str,
                  workers: int | None = None, chunk: int = CHUNK_RECORDS) -> Tokenized:
    """Token ids and labels (IGNORE outside the assistant turns when loss_on is 'assistant') of every
    conversation (canonical, or a plain list of messages), the same as `tokenize_reference`, fast."""
    global _JOB
    masked = loss_on == "assistant"
    backend = _rust_backend(tokenizer)
    if backend is None:
        return Tokenized.from_lists(*tokenize_reference(conversations, tokenizer, template, loss_on))
    workers = prep_workers(len(conversations)) if workers is None else workers
    messages, tools = template_inputs(conversations, template_renders_tools(template))
    n = len(conversations)
    ranges = [(start, min(start + chunk, n)) for start in range(0, n, chunk)]
    if workers <= 1 or len(ranges) <= 1:
        return Tokenized.concat([_encode(messages[lo:hi], tools[lo:hi], tokenizer, backend, template, masked)
                                 for lo, hi in ranges])
    # Forked workers inherit the job (nothing is pickled on the way in) and each tokenizes on one thread;
    # the variable keeps tokenizers quiet about the fork and out of its thread pool in the children.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _JOB = (messages, tools, tokenizer, backend, template, masked)
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return Tokenized.concat(pool.map(_encode_range, ranges, chunksize=1))
    finally:
        _JOB = None
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def tokenize(conversations: list, tokenizer, template: str, loss_on: str,
             batch_size: int = 512) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and labels per conversation, as lists (see tokenize_flat)."""
    return tokenize_flat(conversations, tokenizer, template, loss_on).to_lists()


def _any_per_record(flags: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """For each record, whether flags[starts[i]:ends[i]] has a True (ends[i] <= starts[i + 1])."""
    out = np.zeros(len(starts), dtype=bool)
    nonempty = ends > starts
    if not len(flags) or not nonempty.any():
        return out
    cuts = np.empty(2 * int(nonempty.sum()), dtype=np.int64)
    cuts[0::2], cuts[1::2] = starts[nonempty], ends[nonempty]
    # logical_or.reduceat over [start, end) at the even cuts; the odd ones cover the gaps between records.
    out[nonempty] = np.logical_or.reduceat(flags, np.minimum(cuts, len(flags) - 1))[0::2]
    return out


def fit_length_flat(tok: Tokenized, max_len: int, policy: str) -> tuple[Tokenized, dict[str, int]]:
    """Drop or truncate records longer than max_len, then drop records with no supervised token."""
    fitted, counts, _ = fit_length_outcomes(tok, max_len, policy)
    return fitted, counts


def fit_length_outcomes(tok: Tokenized, max_len: int, policy: str) -> tuple[Tokenized, dict[str, int], np.ndarray]:
    """fit_length_flat, and per input record what became of it: KEPT, TRUNCATED (kept), OVERLONG (dropped) or
    UNSUPERVISED (dropped: no supervised token left)."""
    lengths = tok.lengths
    overlong = lengths > max_len
    keep = ~overlong if policy == "drop" else np.ones(len(tok), dtype=bool)
    kept_lengths = np.minimum(lengths, max_len)
    starts = tok.bounds[:-1]
    unsupervised = keep & ~_any_per_record(tok.labels != IGNORE, starts, starts + kept_lengths)
    counts = {"overlong_dropped": int(np.count_nonzero(overlong)) if policy == "drop" else 0,
              "overlong_truncated": int(np.count_nonzero(overlong)) if policy != "drop" else 0,
              "unsupervised_dropped": int(np.count_nonzero(unsupervised))}
    keep &= ~unsupervised
    outcomes = np.select([unsupervised, ~keep, overlong], [UNSUPERVISED, OVERLONG, TRUNCATED], KEPT).astype(np.int8)
    if keep.all() and not overlong.any():
        return tok, counts, outcomes
    token_keep = np.repeat(keep, lengths)
    truncated = keep & overlong
    for start, length in zip(starts[truncated].tolist(), lengths[truncated].tolist(), strict=True):
        token_keep[start + max_len:start + length] = False  # a truncated record loses its tail
    bounds = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(kept_lengths[keep], out=bounds[1:])
    return Tokenized(tok.ids[token_keep], tok.labels[token_keep], bounds), counts, outcomes


KEPT, TRUNCATED, OVERLONG, UNSUPERVISED = 0, 1, 2, 3  # record outcomes of fit_length_outcomes


def fit_length(input_ids: list[list[int]], labels: list[list[int]], max_len: int,
               policy: str) -> tuple[list[list[int]], list[list[int]], dict[str, int]]:
    fitted, counts = fit_length_flat(Tokenized.from_lists(input_ids, labels), max_len, policy)
    return *fitted.to_lists(), counts


def token_stats_flat(tok: Tokenized) -> dict[str, Any]:
    if not len(tok):
        return {"records": 0, "tokens": 0, "supervised_tokens": 0, "supervised_fraction": 0.0}
    lengths = np.sort(tok.lengths).tolist()
    total = sum(lengths)
    supervised = int(np.count_nonzero(tok.labels != IGNORE))
    return {
        "records": len(lengths),
        "tokens": total,
        "supervised_tokens": supervised,
        "supervised_fraction": round(supervised / total, 4),
        "length_min": lengths[0],
        "length_mean": round(total / len(lengths), 1),
        "length_p50": lengths[len(lengths) // 2],
        "length_p95": lengths[min(len(lengths) - 1, int(len(lengths) * 0.95))],
        "length_max": lengths[-1],
        "length_stdev": round(statistics.pstdev(lengths), 1),
    }


def token_stats(input_ids: list[list[int]], labels: list[list[int]]) -> dict[str, Any]:
    return token_stats_flat(Tokenized.from_lists(input_ids, labels))


def render_marked(ids: list[int], labels: list[int], tokenizer, start: str = "⟦", end: str = "⟧") -> str:
    """Decode one record, with the supervised (trained-on) spans between markers."""
    pieces, run, run_supervised = [], [], None
    for token, label in zip(ids, labels, strict=True):
        supervised = label != IGNORE
        if run and supervised != run_supervised:
            text = tokenizer.decode(run)
            pieces.append(f"{start}{text}{end}" if run_supervised else text)
            run = []
        run.append(token)
        run_supervised = supervised
    if run:
        text = tokenizer.decode(run)
        pieces.append(f"{start}{text}{end}" if run_supervised else text)
    return "".join(pieces)


def _list_array(values: np.ndarray, bounds: np.ndarray, dtype) -> pa.Array:
    values = pa.array(values.astype(dtype, copy=False))
    if bounds[-1] < 2**31:
        return pa.ListArray.from_arrays(pa.array(bounds.astype(np.int32)), values)
    return pa.LargeListArray.from_arrays(pa.array(bounds), values)


def _gather(tok: Tokenized, order: np.ndarray, lengths: np.ndarray) -> Tokenized:
    """Records `order` (the first `lengths` tokens of each), in that order."""
    bounds = np.zeros(len(order) + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    index = np.int32 if max(int(bounds[-1]), int(tok.bounds[-1])) < 2**31 else np.int64  # half the memory
    positions = np.arange(int(bounds[-1]), dtype=index)
    positions += np.repeat((tok.bounds[:-1][order] - bounds[:-1]).astype(index), lengths)
    return Tokenized(tok.ids[positions], tok.labels[positions], bounds)


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """TRL's best-fit-decreasing packing (trl.data_utils._pack_bfd), the same bins, without its per-record
    segment tree: longest record first (ties in input order), each into the bin with the least room that
    still fits it (the first opened among equals), else a new bin. Returns the record order (bin after
    bin) and the number of records per bin. Lengths must be 1..capacity."""
    order = np.argsort(-lengths, kind="stable")
    open_rooms: list[int] = []  # sorted rooms (< capacity) that some bin has left
    by_room: dict[int, deque] = defaultdict(deque)
    bins: list[list[int]] = []
    for index, length in zip(order.tolist(), lengths[order].tolist(), strict=True):
        at = bisect_left(open_rooms, length)
        if at < len(open_rooms):
            room = open_rooms[at]
            waiting = by_room[room]
            members = waiting.popleft()
            if not waiting:
                del open_rooms[at]
        else:
            room, members = capacity, []
            bins.append(members)
        members.append(index)
        room -= length
        waiting = by_room[room]
        waiting.append(members)
        if room > 0 and len(waiting) == 1:
            insort(open_rooms, room)
    counts = np.fromiter(map(len, bins), dtype=np.int64, count=len(bins))
    return np.fromiter(chain.from_iterable(bins), dtype=np.int64, count=len(order)), counts


def to_dataset_flat(tok: Tokenized, packing: bool, max_len: int, seed: int) -> "Dataset":
    """The training data set: records as they are, or (packing) shuffled then packed into rows of at most
    max_len tokens with seq_lengths, exactly what TRL's pack_dataset(dataset.shuffle(seed), max_len, "bfd")
    gives when it packs all records in one batch."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    # The value types Dataset.from_dict gives these columns: int32 token ids (datasets narrows a column
    # named input_ids), int64 labels; seq_lengths as pack_dataset writes them.
    if packing:
        # Shuffle first (the permutation Dataset.shuffle(seed) draws) so each pack mixes records; BFD over all.
        shuffled = np.random.default_rng(seed).permutation(len(tok))
        lengths = np.minimum(tok.lengths[shuffled], max_len)  # pack_dataset truncates, and drops empty records
        shuffled, lengths = shuffled[lengths > 0], lengths[lengths > 0]
        order, counts = best_fit_decreasing(lengths, max_len)
        lengths = lengths[order]
        tok = _gather(tok, shuffled[order], lengths)
        records_per_row = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=records_per_row[1:])
        bounds = tok.bounds[records_per_row]
        columns = {"input_ids": _list_array(tok.ids, bounds, np.int32),
                   "labels": _list_array(tok.labels, bounds, np.int64),
                   "seq_lengths": _list_array(lengths, records_per_row, np.int32)}
    else:
        bounds = tok.bounds
        columns = {"input_ids": _list_array(tok.ids, bounds, np.int32),
                   "labels": _list_array(tok.labels, bounds, np.int64)}
    # A content fingerprint given up front: left to datasets, it would pickle the whole table to make one.
    digest = xxhash.xxh3_128()
    for array in (tok.ids, tok.labels, bounds):
        digest.update(np.ascontiguousarray(array).data)
    return Dataset(InMemoryTable(pa.table(columns)), fingerprint=digest.hexdigest())


def to_dataset(input_ids: list[list[int]], labels: list[list[int]], packing: bool, max_len: int,
               seed: int) -> "Dataset":
    return to_dataset_flat(Tokenized.from_lists(input_ids, labels), packing, max_len, seed)


# --- the stage ---

def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else canonical_json(tokenizer.get_vocab())
    return hashlib.sha256(text.encode()).hexdigest()


def data_fingerprint(cfg: DataSection, tokenizer, template: str) -> str:
    settings = cfg.model_dump(mode="json", exclude={"sources"})
    eval_sources = [source_fingerprint(s) for s in (cfg.eval.sources if cfg.eval else [])]
    parts = {
        "version": PREP_VERSION,
        "sources": [source_fingerprint(s) for s in cfg.sources],
        "eval_sources": eval_sources,
        "settings": settings,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": hashlib.sha256(template.encode()).hexdigest(),
    }
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()


COUNT_KEYS = ("read", "kept", "bad", "duplicates", "overlong", "unsupervised")  # read = the sum of the others


def _source_counts(tally: SourceCounts) -> dict[str, Any]:
    return {"read": tally.read, "kept": 0, "bad": tally.bad, "duplicates": 0, "overlong": 0, "unsupervised": 0,
            "train": 0, "eval": 0, "truncated": 0, "bad_by_reason": dict(sorted(tally.by_reason.items())),
            "examples": tally.examples}


def _load_split(sources: list[DataSource], cfg: DataSection, prefix: str
                ) -> tuple[list[dict], list[str], list[str], int, dict[str, dict]]:
    """Conversations (deduplicated when data.dedup), their ids, the report key of the source each came from,
    the number read from all sources, and per-source counts."""
    conversations, origins, tallies = load_sources(sources, cfg.on_bad_record)
    counts = {prefix + path: _source_counts(tally) for path, tally in tallies.items()}
    keys = [prefix + sources[i].path for i in origins]
    ids = [conversation_id(c) for c in conversations]
    if cfg.dedup:
        keep = unique_indices(ids)
        kept = set(keep)
        for index, key in enumerate(keys):
            if index not in kept:
                counts[key]["duplicates"] += 1
        conversations, ids, keys = ([values[i] for i in keep] for values in (conversations, ids, keys))
    return conversations, ids, keys, sum(c["read"] for c in counts.values()), counts


def _count_outcomes(counts: dict[str, dict], keys: list[str], outcomes: np.ndarray, split: str) -> None:
    names = {KEPT: split, TRUNCATED: split, OVERLONG: "overlong", UNSUPERVISED: "unsupervised"}
    for key, outcome in zip(keys, outcomes.tolist(), strict=True):
        counts[key][names[outcome]] += 1
        counts[key]["kept"] += outcome in (KEPT, TRUNCATED)
        counts[key]["truncated"] += outcome == TRUNCATED


def count_totals(per_source: dict[str, dict]) -> dict[str, Any]:
    """All sources together; read = kept + bad + duplicates + overlong + unsupervised, kept = train + eval."""
    totals: dict[str, Any] = {k: sum(s[k] for s in per_source.values())
                              for k in (*COUNT_KEYS, "train", "eval", "truncated")}
    reasons: dict[str, int] = {}
    for counts in per_source.values():
        for reason, n in counts["bad_by_reason"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    totals["bad_by_reason"] = dict(sorted(reasons.items()))
    return totals


def build(cfg: DataSection, tokenizer, template: str) -> tuple["Dataset", "Dataset | None", dict, dict]:
    """Everything that is cached: returns train, eval, report and the recorded split."""
    conversations, ids, keys, read, per_source = _load_split(cfg.sources, cfg, "")
    duplicates = sum(c["duplicates"] for c in per_source.values())
    if not conversations:
        bad = sum(s["bad"] for s in per_source.values())
        examples = [e for s in per_source.values() for e in s["examples"]]
        raise InputError(f"data: no usable records ({read} read, {bad} bad and skipped, {duplicates} duplicates); "
                         f"sources: {', '.join(s.path for s in cfg.sources)}"
                         + (f"; first bad record: {examples[0]}" if examples else ""))

    split: dict[str, Any] = {"seed": cfg.seed}
    eval_cfg = cfg.eval
    parts: dict[str, tuple[list[dict], list[str]]]
    if eval_cfg and eval_cfg.sources:
        eval_conversations, _, eval_keys, _, eval_counts = _load_split(eval_cfg.sources, cfg, "eval:")
        per_source.update(eval_counts)
        parts = {"train": (conversations, keys), "eval": (eval_conversations, eval_keys)}
        split.update(method="sources", eval_sources=[s.path for s in eval_cfg.sources])
    elif eval_cfg and (eval_cfg.fraction or eval_cfg.count):
        try:
            eval_ids = split_ids(ids, cfg.seed, eval_cfg.fraction, eval_cfg.count)
        except InputError as err:
            raise InputError(f"{err} ({read} records read, {duplicates} duplicates removed)") from None
        in_eval = [cid in eval_ids for cid in ids]
        parts = {name: ([c for c, e in zip(conversations, in_eval, strict=True) if e == wanted],
                        [k for k, e in zip(keys, in_eval, strict=True) if e == wanted])
                 for name, wanted in (("train", False), ("eval", True))}
        split.update(method="fraction" if eval_cfg.fraction else "count",
                     fraction=eval_cfg.fraction, count=eval_cfg.count,
                     eval_ids=[cid for cid in ids if cid in eval_ids])
    else:
        parts = {"train": (conversations, keys), "eval": ([], [])}
        split.update(method="none")

    native_tools = template_renders_tools(template)
    report: dict[str, Any] = {"sources": per_source, "records_read": 0, "duplicates": 0,
                              "tools_rendered_by": "template" if native_tools else "fallback",
                              "heldout_prompts": [template_inputs([c], native_tools)[0][0][:-1]
                                                  for c in parts["eval"][0][:3]]}
    datasets: dict[str, Dataset | None] = {}
    for name, (convs, origin_keys) in parts.items():
        if not convs:
            datasets[name] = None
            continue
        tokens = tokenize_flat(convs, tokenizer, template, cfg.loss_on)
        tokens, fit_counts, outcomes = fit_length_outcomes(tokens, cfg.max_seq_length, cfg.on_overlong)
        _count_outcomes(per_source, origin_keys, outcomes, name)
        report[name] = {"conversations": len(convs), **fit_counts, **token_stats_flat(tokens)}
        if name == "train":
            if not len(tokens):
                raise InputError(
                    "data: no training record left after filtering "
                    f"({fit_counts['overlong_dropped']} longer than "
                    f"data.max_seq_length={cfg.max_seq_length}, {fit_counts['unsupervised_dropped']} with no "
                    "supervised token); raise max_seq_length or set data.on_overlong: truncate")
            report["sample"] = render_marked(*tokens.record(0), tokenizer)
        if not len(tokens):
            datasets[name] = None
            continue
        dataset = to_dataset_flat(tokens, cfg.packing, cfg.max_seq_length, cfg.seed)
        report[name]["sequences"] = len(dataset)
        if cfg.packing:
            report[name]["packing_efficiency"] = round(
                report[name]["tokens"] / (len(dataset) * cfg.max_seq_length), 4)
        datasets[name] = dataset
    if report["train"]["supervised_tokens"] == 0:
        raise InputError("data: no token is supervised; check data.loss_on and the chat template")
    report["counts"] = count_totals(per_source)
    report["records_read"], report["duplicates"] = report["counts"]["read"], report["counts"]["duplicates"]
    return datasets["train"], datasets["eval"], report, split


def prepare(cfg: DataSection, tokenizer, output_dir: Path, force: bool = False) -> PreparedData:
    from datasets import load_from_disk

    if problems := output_data_overlap(cfg, output_dir):
        raise InputError("\n".join(problems))
    template = training_template(resolve_chat_template(cfg.chat_template, tokenizer), tokenizer, cfg.loss_on)
    fingerprint = data_fingerprint(cfg, tokenizer, template)
    cache_root = output_dir / "prepared"
    target = cache_root / fingerprint[:16]
    if not force and (target / "report.json").is_file():
        report = json.loads((target / "report.json").read_text(encoding="utf-8"))
        eval_path = target / "eval"
        return PreparedData(load_from_disk(str(target / "train")),
                            load_from_disk(str(eval_path)) if eval_path.exists() else None,
                            report, fingerprint, target, cached=True)

    train, evaluation, report, split = build(cfg, tokenizer, template)
    report["fingerprint"] = fingerprint
    tmp = cache_root / f".tmp-{fingerprint[:16]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train.save_to_disk(str(tmp / "train"))
    if evaluation is not None:
        evaluation.save_to_disk(str(tmp / "eval"))
    write_json_atomic(tmp / "split.json", split)
    write_json_atomic(tmp / "report.json", report)  # written last: its presence marks a complete cache
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    eval_path = target / "eval"
    return PreparedData(load_from_disk(str(target / "train")),
                        load_from_disk(str(eval_path)) if eval_path.exists() else None,
                        report, fingerprint, target, cached=False)
