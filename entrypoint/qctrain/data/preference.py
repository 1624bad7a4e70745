"""Preference records (method dpo and kto): one canonical pair, or labelled completion, per record, in the shapes
people have, with the same turn parsing and checks as SFT data (formats.py) and counted reasons of their own.

A pair (dpo) is {"prompt": [messages], "chosen": [messages], "rejected": [messages], "tools": [...]}: the prompt
ends with a user (or tool) turn, each side is the assistant's reply (text, tool calls and their results). A
labelled completion (kto) is {"prompt": [...], "completion": [...], "label": bool, "tools": [...]}. Strings become
chat turns (a prompt one user turn, a side one assistant turn), as alpaca records do for SFT: the chat template
applies to every shape. Shapes (format -> what it reads):

- `preference`: TRL's forms, `prompt`/`chosen`/`rejected` as strings or message lists; the implicit-prompt form
  (no `prompt`: the shared leading turns of `chosen` and `rejected`, or for strings their shared leading text, as
  TRL's extract_prompt takes it); UltraFeedback-binarized (`prompt` a string, `chosen`/`rejected` whole
  conversations: the prompt must be their shared user turn; `messages` and scores are ignored); the alpaca
  ranking form (`instruction`, `input`, `system`, `history` with `chosen`/`rejected` strings).
- `sharegpt_ranking`: LLaMA-Factory's ranking form, `conversations` (ShareGPT turns) with `chosen`/`rejected`
  turn objects, optional `system` and `tools`.
- `kto`: `prompt`/`completion` (strings or message lists) with a boolean `label`; or a `messages` (or ShareGPT
  `conversations`) list with `label` or `kto_tag`, whose completion is every turn after the last user turn.
  Under method kto, `preference` and `sharegpt_ranking` records are unpaired: chosen -> true, rejected -> false.
"""

import hashlib
from typing import Any

from qctrain.data.formats import (
    ASSISTANT,
    BAD_REASONS,
    FLAG_KEYS,
    IGNORED_KEYS,
    REASONING_KEYS,
    SYSTEM,
    TOOL,
    USER,
    BadRecord,
    _has_value,
    _media,
    _text,
    _tools,
    alpaca_prompt,
    check_turns,
    message_of,
    record_fields,
    refuse_or_count,
    sharegpt_message,
)
from qctrain.data.sources import Record
from qctrain.recipe import PREFERENCE_FORMATS, abbreviate, canonical_json

# Why a preference record is bad, beyond the reasons every record can have (formats.BAD_REASONS).
PAIR_BAD_REASONS = {
    "identical_sides": "chosen identical to rejected: nothing to prefer",
    "empty_side": "a chosen, rejected or completion side with no assistant text or tool call",
    "implicit_prompt_mismatch": "implicit prompt: chosen and rejected share no prompt, or differ before their last "
                                "user turn, or share an assistant turn at its end; or a prompt field other than the "
                                "prompt they share",
    "no_user_prompt": "a prompt without a user turn",
    "completion_not_assistant": "a side or completion that is not the assistant's reply: a user or system turn in "
                                "it, or a prompt that ends with the assistant",
}
REASONS = {**BAD_REASONS, **PAIR_BAD_REASONS}

SIDES = ("chosen", "rejected")
LABEL_KEYS = ("label", "kto_tag")  # TRL's, LLaMA-Factory's (its kto_tag column)

# What each format reads on the record, and on every turn of its turn lists.
READ_KEYS = {
    "preference": {"prompt", "chosen", "rejected", "tools", "system", "instruction", "input", "history"},
    "sharegpt_ranking": {"conversations", "chosen", "rejected", "system", "tools"},
    "kto": {"prompt", "completion", "label", "kto_tag", "messages", "conversations", "system", "tools"},
}
TURN_KEYS = {"role", "content", "tool_calls", "function_call", "name", "tool_call_id", "from", "value",
             *FLAG_KEYS, *REASONING_KEYS}
TURN_LISTS = ("prompt", "chosen", "rejected", "completion", "messages", "conversations")
# Metadata of preference data sets ignored on purpose: the scores and models that ranked the sides
# (UltraFeedback-binarized, Argilla's mixes).
IGNORED_PAIR_KEYS = frozenset({"score_chosen", "score_rejected", "chosen_score", "rejected_score", "chosen_rating",
                               "rejected_rating", "chosen_model", "rejected_model", "chosen_ratings",
                               "rejected_ratings"})
# UltraFeedback-binarized's `messages` repeats the chosen conversation.
IGNORED_FORMAT_KEYS = {"preference": frozenset({"messages"}), "sharegpt_ranking": frozenset(),
                       "kto": frozenset()}


# --- turns ---

def _turn(turn: Any, where: str, at: str) -> dict[str, Any]:
    """A message given as {role, content, ...} or as a ShareGPT {from, value} turn."""
    if isinstance(turn, dict) and "from" in turn and "role" not in turn:
        return sharegpt_message(turn, where, at)
    return message_of(turn, where, at)


def _turns(value: Any, where: str, at: str, text_role: str) -> tuple[list[dict], list[str]]:
    """A field that holds turns: a string (one turn of `text_role`), one turn object (LLaMA-Factory's chosen) or a
    list of turns; with where each turn comes from."""
    if isinstance(value, str):
        return [{"role": text_role, "content": value}], [at]
    if isinstance(value, dict):
        return [_turn(value, where, at)], [at]
    if not isinstance(value, list):
        raise BadRecord(where, f"field '{at}' must be a string or a list of turns, got {type(value).__name__}")
    names = [f"{at}[{i}]" for i in range(len(value))]
    return [_turn(turn, where, name) for turn, name in zip(value, names, strict=True)], names


def _has_reply(messages: list[dict]) -> bool:
    return any(m["role"] == ASSISTANT and (m["content"].strip() or m.get("tool_calls")) for m in messages)


def _same(a: list[dict], b: list[dict]) -> bool:
    return canonical_json(a) == canonical_json(b)


def _with_system(system: str, prompt: list[dict], names: list[str]) -> tuple[list[dict], list[str]]:
    return ([{"role": SYSTEM, "content": system}, *prompt], ["system", *names]) if system else (prompt, names)


# --- the prompt and the sides ---

def _check_prompt(prompt: list[dict], names: list[str], where: str) -> None:
    if not any(m["role"] == USER and m["content"].strip() for m in prompt):
        raise BadRecord(where, f"{names[0] if names else 'prompt'}: the prompt has no user turn with text",
                        "no_user_prompt")
    if prompt[-1]["role"] == ASSISTANT:
        raise BadRecord(where, f"{names[-1]}: the prompt ends with an assistant turn; the completion is the "
                               "assistant's reply to the last user (or tool) turn", "completion_not_assistant")
    for message, name in zip(prompt, names, strict=True):
        if message.get("weight") == 1:
            raise BadRecord(where, f"{name}: a training flag (weight 1, train/loss true) on a prompt turn; the prompt "
                                   "is never trained on", "unhonoured_weight")


def _check_side(side: list[dict], names: list[str], where: str, at: str) -> None:
    if not side or not _has_reply(side):
        raise BadRecord(where, f"{at}: no assistant text or tool call", "empty_side")
    for message, name in zip(side, names, strict=True):
        if message["role"] in (USER, SYSTEM):
            raise BadRecord(where, f"{name}: a {message['role']} turn in the completion; it is the assistant's "
                                   "reply (put the conversation before it in the prompt)", "completion_not_assistant")
        if message.get("weight") == 0:
            raise BadRecord(where, f"{name}: weight 0 (train/loss false) on a completion turn; the completion is "
                                   "scored whole", "unhonoured_weight")
    if side[0]["role"] == TOOL:
        raise BadRecord(where, f"{names[0]}: the completion starts with a tool result; it is the assistant's reply",
                        "completion_not_assistant")


def _conversation(prompt: list[dict], prompt_names: list[str], side: list[dict], side_names: list[str],
                  tools: list[dict], where: str) -> None:
    """The turn checks of SFT data (formats.check_turns) on the prompt followed by this side."""
    check_turns([*prompt, *side], tools, where, [*prompt_names, *side_names])


def _without_flags(messages: list[dict]) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "weight"} if "weight" in m else m for m in messages]


def extract_prompt_text(chosen: str, rejected: str) -> tuple[str, str, str]:
    """TRL's extract_prompt on two strings (trl/data_utils.py): the text up to where they first differ, less a
    space just before it (kept with the completions); as TRL, a side that is a prefix of the other leaves the
    last shared character to the completions."""
    index = 0
    for index in range(min(len(chosen), len(rejected))):  # noqa: B007 - the index after the loop is TRL's answer
        if chosen[index] != rejected[index]:
            if chosen[index - 1] == " ":
                index -= 1
            break
    return chosen[:index], chosen[index:], rejected[index:]


def _shared_turns(chosen: list[dict], rejected: list[dict]) -> int:
    """How many leading turns the two sides share (TRL's extract_prompt on message lists)."""
    shared = 0
    for a, b in zip(chosen, rejected, strict=False):
        if canonical_json(a) != canonical_json(b):
            break
        shared += 1
    return shared


def _implicit(chosen: Any, rejected: Any, where: str) -> tuple[list[dict], list[str], list[dict], list[str],
                                                                 list[dict], list[str]]:
    """The prompt and the two completions of an implicit-prompt pair (no prompt field, or UltraFeedback's)."""
    if isinstance(chosen, str) and isinstance(rejected, str):
        for side, text in (("chosen", chosen), ("rejected", rejected)):
            if not text.strip():
                raise BadRecord(where, f"{side}: empty text", "empty_side")
        if chosen == rejected:
            raise BadRecord(where, "chosen and rejected are the same text", "identical_sides")
        prompt, chosen_rest, rejected_rest = extract_prompt_text(chosen, rejected)
        if not prompt.strip():
            raise BadRecord(where, "chosen and rejected share no leading text to take as the prompt (give a "
                                   "prompt field)", "implicit_prompt_mismatch")
        return ([{"role": USER, "content": prompt}], ["prompt"], [{"role": ASSISTANT, "content": chosen_rest}],
                ["chosen"], [{"role": ASSISTANT, "content": rejected_rest}], ["rejected"])
    c_msgs, c_names = _turns(chosen, where, "chosen", ASSISTANT)
    r_msgs, r_names = _turns(rejected, where, "rejected", ASSISTANT)
    if _same(c_msgs, r_msgs):
        raise BadRecord(where, "chosen and rejected are the same conversation", "identical_sides")
    shared = _shared_turns(c_msgs, r_msgs)
    if shared == 0:
        raise BadRecord(where, "chosen and rejected share no leading turns to take as the prompt (give a prompt "
                               "field)", "implicit_prompt_mismatch")
    for side, names in ((c_msgs, c_names), (r_msgs, r_names)):
        later_user = next((n for m, n in zip(side[shared:], names[shared:], strict=True) if m["role"] == USER), None)
        if later_user is not None:
            raise BadRecord(where, f"{later_user}: chosen and rejected differ before their last user turn; the "
                                   "prompt is the turns they share", "implicit_prompt_mismatch")
    if c_msgs[shared - 1]["role"] == ASSISTANT:
        raise BadRecord(where, f"{c_names[shared - 1]}: chosen and rejected share an assistant turn at the end of "
                               "their prompt; the completions must start where they differ", "implicit_prompt_mismatch")
    return (c_msgs[:shared], c_names[:shared], c_msgs[shared:], c_names[shared:], r_msgs[shared:], r_names[shared:])


def _given_prompt_matches(given: Any, prompt: list[dict], where: str) -> None:
    """UltraFeedback-binarized: its `prompt` string is the user turn the conversations share."""
    if isinstance(given, str):
        last_user = next(m for m in reversed(prompt) if m["role"] == USER)
        if given != last_user["content"]:
            raise BadRecord(where, f"prompt: {abbreviate(given)} is not the user turn chosen and rejected share "
                                   f"({abbreviate(last_user['content'])})", "implicit_prompt_mismatch")
        return
    given_msgs, _ = _turns(given, where, "prompt", USER)
    if not _same(given_msgs, prompt):
        raise BadRecord(where, "prompt: not the turns chosen and rejected share", "implicit_prompt_mismatch")


def _starts_a_conversation(value: Any) -> bool:
    """A side given as a whole conversation (its first turn a user or system turn): the implicit-prompt form."""
    if not isinstance(value, list) or not value or not isinstance(value[0], dict):
        return False
    role = value[0].get("role", value[0].get("from"))
    return role in ("user", "human", "system")


def preference_pair(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """A `preference` record as a canonical pair (see the module's docstring for the shapes)."""
    for side in SIDES:
        if fields.get(side) is None:
            raise BadRecord(where, f"field '{side}' is " + ("null" if side in fields else "missing"))
    chosen, rejected = fields["chosen"], fields["rejected"]
    tools = _tools(fields.get("tools"), where)
    if "instruction" in fields:  # the alpaca ranking form
        prompt, p_names = alpaca_prompt(fields, where)
        c_msgs, c_names = _turns(chosen, where, "chosen", ASSISTANT)
        r_msgs, r_names = _turns(rejected, where, "rejected", ASSISTANT)
    elif fields.get("prompt") is None or _starts_a_conversation(chosen) or _starts_a_conversation(rejected):
        prompt, p_names, c_msgs, c_names, r_msgs, r_names = _implicit(chosen, rejected, where)
        if fields.get("prompt") is not None:
            _given_prompt_matches(fields["prompt"], prompt, where)
        prompt, p_names = _with_system(_text(fields, "system", where, required=False), prompt, p_names)
    else:
        prompt, p_names = _turns(fields["prompt"], where, "prompt", USER)
        prompt, p_names = _with_system(_text(fields, "system", where, required=False), prompt, p_names)
        c_msgs, c_names = _turns(chosen, where, "chosen", ASSISTANT)
        r_msgs, r_names = _turns(rejected, where, "rejected", ASSISTANT)
    return _pair(prompt, p_names, c_msgs, c_names, r_msgs, r_names, tools, where)


def sharegpt_ranking_pair(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """LLaMA-Factory's ranking form: {conversations: [{from, value}], chosen: {from, value}, rejected: {...},
    system?, tools?}."""
    conversation = fields.get("conversations")
    if not isinstance(conversation, list) or not conversation:
        raise BadRecord(where, "field 'conversations' must be a non-empty list of turns")
    names = [f"conversations[{i}]" for i in range(len(conversation))]
    prompt = [sharegpt_message(turn, where, name) for turn, name in zip(conversation, names, strict=True)]
    prompt, names = _with_system(_text(fields, "system", where, required=False), prompt, names)
    sides = []
    for side in SIDES:
        if fields.get(side) is None:
            raise BadRecord(where, f"field '{side}' is " + ("null" if side in fields else "missing"))
        sides += _turns(fields[side], where, side, ASSISTANT)
    return _pair(prompt, names, *sides, _tools(fields.get("tools"), where), where)


def _pair(prompt: list[dict], p_names: list[str], chosen: list[dict], c_names: list[str], rejected: list[dict],
          r_names: list[str], tools: list[dict], where: str) -> dict[str, Any]:
    _check_prompt(prompt, p_names, where)
    _check_side(chosen, c_names, where, "chosen")
    _check_side(rejected, r_names, where, "rejected")
    if _same(chosen, rejected):
        raise BadRecord(where, "chosen and rejected are the same reply", "identical_sides")
    _conversation(prompt, p_names, chosen, c_names, tools, where)
    _conversation(prompt, p_names, rejected, r_names, tools, where)
    return {"prompt": _without_flags(prompt), "chosen": _without_flags(chosen), "rejected": _without_flags(rejected),
            "tools": tools}


def _label(fields: dict[str, Any], where: str) -> bool:
    given = {key: fields[key] for key in LABEL_KEYS if fields.get(key) is not None}
    if not given:
        raise BadRecord(where, "field 'label' (or 'kto_tag') is missing: is the completion desirable, true or false?")
    for key, value in given.items():
        if not isinstance(value, bool):
            raise BadRecord(where, f"field '{key}' must be true or false, got {abbreviate(value)}")
    if len(set(given.values())) > 1:
        raise BadRecord(where, "fields 'label' and 'kto_tag' disagree")
    return next(iter(given.values()))


def kto_row(fields: dict[str, Any], where: str) -> dict[str, Any]:
    """A `kto` record as a labelled completion: {prompt, completion, label} or a conversation with a label."""
    label = _label(fields, where)
    tools = _tools(fields.get("tools"), where)
    if fields.get("completion") is not None:
        if fields.get("prompt") is None:
            raise BadRecord(where, "field 'prompt' is " + ("null" if "prompt" in fields else "missing"))
        prompt, p_names = _turns(fields["prompt"], where, "prompt", USER)
        completion, c_names = _turns(fields["completion"], where, "completion", ASSISTANT)
    else:
        key = "messages" if fields.get("messages") is not None else "conversations"
        turns = fields.get(key)
        if not isinstance(turns, list) or not turns:
            raise BadRecord(where, "a kto record holds prompt and completion, or a messages (or conversations) list "
                                   "with a label")
        messages, names = _turns(turns, where, key, USER)
        last_user = max((i for i, m in enumerate(messages) if m["role"] == USER), default=-1)
        if last_user < 0:
            raise BadRecord(where, f"{key}: no user turn to take as the prompt", "no_user_prompt")
        prompt, p_names = messages[:last_user + 1], names[:last_user + 1]
        completion, c_names = messages[last_user + 1:], names[last_user + 1:]
    prompt, p_names = _with_system(_text(fields, "system", where, required=False), prompt, p_names)
    _check_prompt(prompt, p_names, where)
    _check_side(completion, c_names, where, "completion")
    _conversation(prompt, p_names, completion, c_names, tools, where)
    return {"prompt": _without_flags(prompt), "completion": _without_flags(completion), "label": label,
            "tools": tools}


PAIR_NORMALISERS = {"preference": preference_pair, "sharegpt_ranking": sharegpt_ranking_pair, "kto": kto_row}
assert tuple(PAIR_NORMALISERS) == PREFERENCE_FORMATS


def detect_preference_format(fields: dict[str, Any], method: str, where: str) -> str:
    if method == "kto" and ("completion" in fields or any(key in fields for key in LABEL_KEYS)):
        return "kto"
    if "chosen" in fields and "rejected" in fields:
        return "sharegpt_ranking" if "conversations" in fields else "preference"
    wanted = ("prompt/chosen/rejected, chosen/rejected, conversations/chosen/rejected" if method == "dpo" else
              "prompt/completion/label, messages/label, or a pair (chosen/rejected)")
    raise BadRecord(where, f"cannot tell the {method} format from keys {abbreviate(sorted(fields)[:6])}; a {method} "
                           f"record holds {wanted}", "unknown_format")


def unread_pair_keys(fields: dict[str, Any], fmt: str, ignore: frozenset[str] = frozenset()) -> list[str]:
    """Keys of a (normalised, so well-formed) preference record its format does not read and that are not known
    metadata, with a value: `key` on the record, `chosen[].key` on a turn."""
    skip = IGNORED_KEYS | IGNORED_PAIR_KEYS | IGNORED_FORMAT_KEYS[fmt] | ignore
    read = READ_KEYS[fmt]
    unread = [k for k, v in fields.items() if k not in read and k not in skip and _has_value(v)]
    for key in TURN_LISTS:
        if key not in read or key in skip:
            continue
        turns = fields.get(key)
        turns = [turns] if isinstance(turns, dict) else turns if isinstance(turns, list) else []
        found = {k for turn in turns if isinstance(turn, dict) for k, v in turn.items()
                 if k not in TURN_KEYS and k not in skip and _has_value(v)}
        unread += [f"{key}[].{k}" for k in sorted(found)]
    return unread


def unpaired(pair: dict[str, Any]) -> list[dict[str, Any]]:
    """A pair as KTO's two labelled completions: chosen desirable, rejected not."""
    return [{"prompt": pair["prompt"], "completion": pair["chosen"], "label": True, "tools": pair["tools"]},
            {"prompt": pair["prompt"], "completion": pair["rejected"], "label": False, "tools": pair["tools"]}]


def to_preference_rows(record: Record, fmt: str, method: str, columns: dict[str, str],
                       ignore: frozenset[str] = frozenset(), unread: dict[str, int] | None = None) -> list[dict]:
    """The record's canonical rows: one pair (dpo), or one or two labelled completions (kto: a pair is unpaired).
    Keys it does not read make it bad, or with `unread` given are counted there and ignored (as to_conversation)."""
    fields, ignore = record_fields(record, columns, ignore)
    if fmt == "auto":
        fmt = detect_preference_format(fields, method, record.where)
    _media(fields, record.where)
    normalised = PAIR_NORMALISERS[fmt](fields, record.where)
    for key in TURN_LISTS:
        if isinstance(fields.get(key), list):
            for i, turn in enumerate(fields[key]):
                if isinstance(turn, dict):
                    _media(turn, record.where, f"{key}[{i}].")
    refuse_or_count(unread_pair_keys(fields, fmt, ignore), fmt, record.where, unread)
    if method == "kto" and fmt != "kto":
        return unpaired(normalised)
    return [normalised]


def row_digest(row: dict[str, Any]) -> int:
    """A 64-bit content hash of a canonical row (what dedup and the train/eval split go by)."""
    return int.from_bytes(hashlib.blake2b(canonical_json(row).encode(), digest_size=8).digest(), "big")


def row_turn_counts(rows: list[dict]) -> tuple[int, int, int]:
    """Completion turns of the assistant (scored), assistant turns in the prompts (context), and reasoning traces."""
    scored = context = traces = 0
    for row in rows:
        completions = [row[k] for k in ("chosen", "rejected", "completion") if k in row]
        for messages, in_prompt in ((row["prompt"], True), *((c, False) for c in completions)):
            for message in messages:
                if message["role"] == ASSISTANT:
                    context += in_prompt
                    scored += not in_prompt
                    traces += "reasoning_content" in message
    return scored, context, traces
