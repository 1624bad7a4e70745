"""Length fitting, token statistics and packing (TRL's best-fit-decreasing) on flat arrays."""

import math
from bisect import bisect_left, insort
from collections import defaultdict, deque
from fractions import Fraction
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import xxhash

from qctrain.data.tokens import IGNORE, Tokenized

if TYPE_CHECKING:
    from datasets import Dataset


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


def token_stats_flat(tok: Tokenized) -> dict[str, Any]:
    return token_stats_of(tok.lengths, int(np.count_nonzero(tok.labels != IGNORE)))


def token_stats_of(lengths: np.ndarray, supervised: int) -> dict[str, Any]:
    """Statistics of records with these lengths and this many supervised tokens in all."""
    if not len(lengths):
        return {"records": 0, "tokens": 0, "supervised_tokens": 0, "supervised_fraction": 0.0}
    lengths = np.sort(lengths)
    total = int(lengths.sum())
    return {
        "records": len(lengths),
        "tokens": total,
        "supervised_tokens": supervised,
        "supervised_fraction": round(supervised / total, 4),
        "length_min": int(lengths[0]),
        "length_mean": round(total / len(lengths), 1),
        "length_p50": int(lengths[len(lengths) // 2]),
        "length_p95": int(lengths[min(len(lengths) - 1, int(len(lengths) * 0.95))]),
        "length_max": int(lengths[-1]),
        "length_stdev": round(_pstdev(lengths), 1),
    }


def _pstdev(lengths: np.ndarray) -> float:
    """statistics.pstdev, from two exact integer sums instead of a Python list."""
    n, total = len(lengths), int(lengths.sum())
    squares = int(np.square(lengths.astype(np.int64)).sum())
    return math.sqrt(Fraction(n * squares - total * total, n * n))


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


BFD_BLOCK = 1 << 16  # records whose lengths are Python ints at a time


def best_fit_decreasing(lengths: np.ndarray, capacity: int) -> tuple[np.ndarray, np.ndarray]:
    """TRL's best-fit-decreasing packing (trl.data_utils._pack_bfd), the same bins, without its per-record
    segment tree: longest record first (ties in input order), each into the bin with the least room that
    still fits it (the first opened among equals), else a new bin. Returns the record order (bin after
    bin) and the number of records per bin. Lengths must be 1..capacity. Memory: a bin number per record
    (no Python object per record), the records read a block at a time."""
    order = np.argsort(-lengths, kind="stable")
    bin_of = np.empty(len(order), dtype=np.int32)  # the bin of each record, in packing order
    open_rooms: list[int] = []  # sorted rooms (< capacity) that some bin has left
    by_room: dict[int, deque] = defaultdict(deque)  # room -> the bins with that room left, first opened first
    bins = 0
    for block in range(0, len(order), BFD_BLOCK):
        lengths_here = lengths[order[block:block + BFD_BLOCK]].tolist()
        for at_record, length in enumerate(lengths_here, start=block):
            at = bisect_left(open_rooms, length)
            if at < len(open_rooms):
                room = open_rooms[at]
                waiting = by_room[room]
                chosen = waiting.popleft()
                if not waiting:
                    del open_rooms[at]
            else:
                room, chosen = capacity, bins
                bins += 1
            bin_of[at_record] = chosen
            room -= length
            waiting = by_room[room]
            waiting.append(chosen)
            if room > 0 and len(waiting) == 1:
                insort(open_rooms, room)
    # bins in the order they were opened, each one's records in the order they went in
    return order[np.argsort(bin_of, kind="stable")], np.bincount(bin_of, minlength=bins).astype(np.int64)


def pack_rows(lengths: np.ndarray, max_len: int, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Which records go into which packed row: the record order (row after row), each record's length in its row
    (truncated to max_len), and the bounds of each row in that order (row r holds records bounds[r]:bounds[r+1]).
    Shuffled first (the permutation Dataset.shuffle(seed) draws) so each pack mixes records; BFD over all."""
    shuffled = np.random.default_rng(seed).permutation(len(lengths))
    fitted = np.minimum(lengths[shuffled], max_len)  # pack_dataset truncates, and drops empty records
    shuffled, fitted = shuffled[fitted > 0], fitted[fitted > 0]
    order, counts = best_fit_decreasing(fitted, max_len)
    records_per_row = np.zeros(len(counts) + 1, dtype=np.int64)
    np.cumsum(counts, out=records_per_row[1:])
    return shuffled[order], fitted[order], records_per_row


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


def to_dataset(input_ids: list[list[int]], labels: list[list[int]], packing: bool, max_len: int,
               seed: int) -> "Dataset":
    return to_dataset_flat(Tokenized.from_lists(input_ids, labels), packing, max_len, seed)
