"""Plain implementations of what the data stage does fast, streaming or on forked workers: the definitions the
product is checked against (and what bench/ builds its in-memory data sets with). Not part of the package: the
product ships only the fast path.

- dedup / unique_indices: the list way of stage.first_indices over conversation ids;
- fit_length_flat: the length fit on tokens (pack.fit_lengths decides it on per-record counts);
- token_stats_flat: pack.token_stats_of of tokens;
- to_dataset_flat: the data set in memory, as stage.write_shards writes it to disk a batch at a time;
- tokenize_in_workers: tokens.tokenize_flat on forked workers (data.workers), chunk by chunk.
"""

from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import xxhash
from qctrain.data import workers
from qctrain.data.formats import conversation_id
from qctrain.data.pack import pack_rows, token_stats_of
from qctrain.data.template import template_inputs
from qctrain.data.tokens import IGNORE, Tokenized, _encode, rust_backend, tokenize_flat
from qctrain.data.workers import CHUNK_RECORDS

if TYPE_CHECKING:
    from datasets import Dataset


# --- dedup ---

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


# --- the length fit and statistics on tokens ---

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
    if keep.all() and not overlong.any():
        return tok, counts
    token_keep = np.repeat(keep, lengths)
    truncated = keep & overlong
    for start, length in zip(starts[truncated].tolist(), lengths[truncated].tolist(), strict=True):
        token_keep[start + max_len:start + length] = False  # a truncated record loses its tail
    bounds = np.zeros(int(keep.sum()) + 1, dtype=np.int64)
    np.cumsum(kept_lengths[keep], out=bounds[1:])
    return Tokenized(tok.ids[token_keep], tok.labels[token_keep], bounds), counts


def token_stats_flat(tok: Tokenized) -> dict[str, Any]:
    return token_stats_of(tok.lengths, int(np.count_nonzero(tok.labels != IGNORE)))


# --- the data set in memory ---

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


def to_dataset_flat(tok: Tokenized, packing: bool, max_len: int, seed: int) -> "Dataset":
    """The training data set: records as they are, or (packing) shuffled then packed into rows of at most
    max_len tokens with seq_lengths, exactly what TRL's pack_dataset(dataset.shuffle(seed), max_len, "bfd")
    gives when it packs all records in one batch."""
    from datasets import Dataset
    from datasets.table import InMemoryTable

    # The value types Dataset.from_dict gives these columns: int32 token ids (datasets narrows a column
    # named input_ids), int64 labels; seq_lengths as pack_dataset writes them.
    if packing:
        order, lengths, records_per_row = pack_rows(tok.lengths, max_len, seed)
        tok = _gather(tok, order, lengths)
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


# --- tokenizing on forked workers ---

def _encode_range(bounds: tuple[int, int]) -> Tokenized:
    messages, tools, contexts, tokenizer, backend, template, masked = workers.job()
    lo, hi = bounds
    return _encode(messages[lo:hi], tools[lo:hi], contexts[lo:hi], tokenizer, backend, template, masked)


def tokenize_in_workers(conversations: list, tokenizer, template: str, loss_on: str, workers_count: int = 2,
                        chunk: int = CHUNK_RECORDS, reasoning: str = "inline") -> Tokenized:
    """tokenize_flat's result, `chunk` records per task on `workers_count` forked workers."""
    backend = rust_backend(tokenizer)
    if backend is None:
        return tokenize_flat(conversations, tokenizer, template, loss_on, chunk, reasoning)
    messages, tools, contexts = template_inputs(conversations, reasoning != "drop")
    n = len(conversations)
    ranges = [(start, min(start + chunk, n)) for start in range(0, n, chunk)]
    shared = (messages, tools, contexts, tokenizer, backend, template, loss_on == "assistant")
    with workers.pool(workers_count, shared) as pool:
        return Tokenized.concat(pool.map(_encode_range, ranges, chunksize=1))
