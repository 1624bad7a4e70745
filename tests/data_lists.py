"""List-of-lists wrappers around the data package's flat-array functions, for tests that state their cases as
plain lists (the stage itself only works on arrays)."""

import hashlib
from typing import Any

import data_reference
from qctrain import data
from qctrain.errors import InputError


def fit_length(input_ids: list[list[int]], labels: list[list[int]], max_len: int,
               policy: str) -> tuple[list[list[int]], list[list[int]], dict[str, int]]:
    fitted, counts = data_reference.fit_length_flat(data.tokens.Tokenized.from_lists(input_ids, labels), max_len,
                                                    policy)
    return *fitted.to_lists(), counts


def token_stats(input_ids: list[list[int]], labels: list[list[int]]) -> dict[str, Any]:
    return data_reference.token_stats_flat(data.tokens.Tokenized.from_lists(input_ids, labels))


def to_dataset(input_ids: list[list[int]], labels: list[list[int]], packing: bool, max_len: int, seed: int):
    return data_reference.to_dataset_flat(data.tokens.Tokenized.from_lists(input_ids, labels), packing, max_len, seed)


def load_conversations(sources, on_bad: str, loss_on: str = "assistant") -> tuple[list[dict], dict[str, Any]]:
    """Every source's conversations as one list, with per-source counts {read, bad, kept, by_reason, examples,
    unread_keys} (the stage streams them instead)."""
    conversations: list[dict] = []
    counts: dict[str, dict[str, Any]] = {}
    for src in sources:
        tally = counts.setdefault(src.path, {"read": 0, "bad": 0, "kept": 0, "by_reason": {}, "examples": [],
                                             "unread_keys": {}})
        for record in data.sources.read_source(src):
            tally["read"] += 1
            try:
                conversations.append(data.formats.to_conversation(
                    record, src.format, src.columns, frozenset(src.ignore_keys),
                    None if on_bad == "error" else tally["unread_keys"], loss_on))
                tally["kept"] += 1
            except data.formats.BadRecord as err:
                if on_bad == "error":
                    raise InputError(f"{err} (set data.on_bad_record: skip to skip such records)") from None
                tally["bad"] += 1
                tally["by_reason"][err.reason] = tally["by_reason"].get(err.reason, 0) + 1
                if len(tally["examples"]) < 5:
                    tally["examples"].append(str(err))
    return conversations, counts


def split_ids(ids: list[str], seed: int, fraction: float | None, count: int | None) -> set[str]:
    """Eval ids as the list path defined them (the stage's split_mask must agree): the ids whose seeded hash
    ranks lowest, independent of input order."""
    n_eval = count if count is not None else max(1, round(len(ids) * fraction)) if fraction else 0
    if n_eval >= len(ids):
        raise InputError(f"data.eval: {n_eval} eval records would leave none of {len(ids)} for training")
    ranked = sorted(ids, key=lambda cid: hashlib.blake2b(f"{seed}:{cid}".encode(), digest_size=8).digest())
    return set(ranked[:n_eval])
