"""The length fit, token statistics and packing (TRL's best-fit-decreasing), on per-record arrays."""

import math
from bisect import bisect_left, insort
from collections import defaultdict, deque
from fractions import Fraction
from typing import Any

import numpy as np

from qctrain.data.tokens import IGNORE, Tokenized

KEPT, TRUNCATED, OVERLONG, UNSUPERVISED = 0, 1, 2, 3  # what becomes of a record in the length fit


def supervised_within(tok: Tokenized, max_len: int) -> np.ndarray:
    """Per record, its supervised tokens among its first max_len (what is left after truncation)."""
    running = np.zeros(len(tok.labels) + 1, dtype=np.int64)
    np.cumsum(tok.labels != IGNORE, out=running[1:])
    starts = tok.bounds[:-1]
    return running[starts + np.minimum(tok.lengths, max_len)] - running[starts]


def fit_lengths(lengths: np.ndarray, supervised: np.ndarray, max_len: int, policy: str
                ) -> tuple[np.ndarray, np.ndarray, dict[str, int], np.ndarray]:
    """The length fit of records with these lengths and these supervised tokens among their first max_len
    (supervised_within): records longer than max_len dropped or truncated (policy: data.on_overlong), then those
    with no supervised token left dropped. Returns which records are kept, their lengths after truncation, the
    counts, and each record's outcome (KEPT, TRUNCATED: kept; OVERLONG, UNSUPERVISED: dropped)."""
    overlong = lengths > max_len
    keep = ~overlong if policy == "drop" else np.ones(len(lengths), dtype=bool)
    unsupervised = keep & (supervised == 0)
    counts = {"overlong_dropped": int(np.count_nonzero(overlong)) if policy == "drop" else 0,
              "overlong_truncated": int(np.count_nonzero(overlong)) if policy != "drop" else 0,
              "unsupervised_dropped": int(np.count_nonzero(unsupervised))}
    keep &= ~unsupervised
    outcomes = np.select([unsupervised, ~keep, overlong], [UNSUPERVISED, OVERLONG, TRUNCATED], KEPT)
    return keep, np.minimum(lengths, max_len)[keep], counts, outcomes


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
