"""The data stage, streaming: sources are read record by record, normalised and tokenised a chunk at a time by
forked workers, and the tokens written to flat files on disk; dedup (by digests), the split, the length fit,
the counts and the packing then work on small per-record arrays, and the rows are written to Arrow files a
batch at a time. Memory depends on the chunk size, not on the number of records.

The result is cached under `<output.dir>/prepared/<fingerprint>/`, keyed by the data content, the tokenizer,
the chat template and every setting that changes the result.
"""

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import chain, islice, pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from qctrain.atomic import fsync_tree, staging_folder, swap_in_folder, write_json_atomic
from qctrain.data import workers
from qctrain.data.formats import ASSISTANT, BadRecord, conversation_digest, to_conversation
from qctrain.data.pack import (
    KEPT,
    OVERLONG,
    TRUNCATED,
    UNSUPERVISED,
    fit_lengths,
    pack_rows,
    render_marked,
    supervised_within,
    token_stats_of,
)
from qctrain.data.sources import Record, read_source, source_fingerprint
from qctrain.data.template import (
    Rendering,
    extend_template,
    rendering,
    resolve_chat_template,
    split_extension,
    template_inputs,
    training_template,
)
from qctrain.data.tokens import IGNORE, Tokenized, encode_chunk, rust_backend
from qctrain.data.workers import CHUNK_RECORDS, prep_workers
from qctrain.errors import InputError
from qctrain.recipe import DataSection, DataSource, canonical_json, output_data_overlap
from qctrain.rundir import RunDir

if TYPE_CHECKING:
    from datasets import Dataset

PREP_VERSION = "6"  # bump when the preparation logic changes what it writes
PAIR_PREP_VERSION = "1"  # the same for preference data (method dpo, kto: pairs.py)
ROW_BATCH_TOKENS = 1 << 20  # tokens per Arrow record batch written (a writer holds ~25 bytes a token)
PROGRESS_EVERY_S = (0.2, 10.0)  # seconds between progress updates: on a terminal, in a log
FORK_AFTER_CHUNKS = 4  # more chunks than the first and these: worth forking workers (below: in this process)
IN_FLIGHT = 4  # chunks queued per worker: enough that none waits while the reader is off the CPU
PROGRESS_AFTER = (3.0, 16384)  # seconds and records read before any progress shows: short runs stay quiet


@dataclass
class PreparedData:
    train: "Dataset"  # datasets is imported where used: preflight imports this module
    eval: "Dataset | None"
    report: dict[str, Any]
    fingerprint: str
    dir: Path
    cached: bool


# --- dedup and split, on 64-bit conversation digests (the ids of conversation_id) ---

def first_indices(digests: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of each digest, in input order."""
    _, first = np.unique(digests, return_index=True)
    return np.sort(first)


def split_ranks(digests: np.ndarray, seed: int) -> np.ndarray:
    """Each id's seeded hash (blake2b of "seed:id"), what the split ranks by."""
    ranks = np.empty(len(digests), dtype=np.uint64)
    step = 65536  # a slice at a time: one Python string per id only for this slice
    for lo in range(0, len(digests), step):
        ranks[lo:lo + step] = [int.from_bytes(hashlib.blake2b(f"{seed}:{d:016x}".encode(), digest_size=8).digest(),
                                              "big") for d in digests[lo:lo + step].tolist()]
    return ranks


def split_mask(digests: np.ndarray, seed: int, fraction: float | None, count: int | None,
               unique: bool = False, ranks: np.ndarray | None = None) -> np.ndarray:
    """Per record, whether it goes to eval: the ids whose seeded hash (blake2b of "seed:id") ranks lowest, ties
    in input order (what sorting the ids by that hash gives); every copy of an id goes where its rank says
    (unique: the caller knows there are no copies, as after dedup, and no search for them is needed; ranks:
    split_ranks of the digests, if already known)."""
    n = len(digests)
    n_eval = count if count is not None else max(1, round(n * fraction)) if fraction else 0
    if n_eval >= n:
        raise InputError(f"data.eval: {n_eval} eval records would leave none of {n} for training")
    chosen = np.argsort(split_ranks(digests, seed) if ranks is None else ranks, kind="stable")[:n_eval]
    if not unique:
        return np.isin(digests, digests[chosen])
    mask = np.zeros(n, dtype=bool)
    mask[chosen] = True
    return mask


# --- the streaming scan: records -> (forked workers) conversations, digests, tokens -> files ---

@dataclass
class _Job:
    """What the scan needs; the forked workers inherit it (workers.job()): only the records are pickled on the way
    in."""

    sources: list[DataSource]
    tokenizer: Any
    backend: Any
    template: str
    loss_on: str
    max_len: int
    on_bad: str
    split_seed: int | None = None  # the seed of a fraction or count split: the workers hash the ranks too
    reasoning: str = "inline"  # data.reasoning


@dataclass
class Chunk:
    """One chunk of one source's records, normalised and tokenised: the good ones' tokens, digests and supervised
    tokens among their first max_len, and the bad ones as (reason, message) in record order; the keys not read
    (key -> records), and the good ones' assistant turns (supervised, in the context) and reasoning traces."""

    source: int
    read: int
    bad: list[tuple[str, str]]
    tokens: Tokenized
    digests: np.ndarray  # uint64
    supervised: np.ndarray  # int64
    ranks: np.ndarray  # uint64, split_ranks of the digests; empty without a fraction or count split
    unread: dict[str, int]
    turns: tuple[int, int, int]  # assistant turns supervised, left in the context; reasoning traces


def turn_counts(conversations: list[dict]) -> tuple[int, int, int]:
    """Assistant turns supervised and left in the context (weight 0), and reasoning traces, in these conversations."""
    supervised = context = traces = 0
    for conversation in conversations:
        for message in conversation["messages"]:
            if message["role"] == ASSISTANT:
                context += message.get("weight") == 0
                supervised += message.get("weight") != 0
                traces += "reasoning_content" in message
    return supervised, context, traces


def scan_chunk(job: _Job, task: tuple[int, list[Record]]) -> Chunk:
    index, records = task
    src = job.sources[index]
    conversations, bad = [], []
    unread: dict[str, int] | None = None if job.on_bad == "error" else {}  # under error an unread key is bad
    ignore = frozenset(src.ignore_keys)
    for record in records:
        try:
            conversations.append(to_conversation(record, src.format, src.columns, ignore, unread, job.loss_on))
        except BadRecord as err:
            bad.append((err.reason, str(err)))
            if job.on_bad == "error":
                break
    tokens = encode_chunk(conversations, job.tokenizer, job.backend, job.template, job.loss_on, job.reasoning)
    digests = np.fromiter(map(conversation_digest, conversations), dtype=np.uint64,
                          count=len(conversations))
    ranks = split_ranks(digests, job.split_seed) if job.split_seed is not None else np.zeros(0, np.uint64)
    return Chunk(index, len(records), bad, tokens, digests, supervised_within(tokens, job.max_len), ranks,
                 unread or {}, turn_counts(conversations))


def _scan_forked(scan_one, task: tuple[int, list[Record]]):
    return scan_one(workers.job(), task)


def _tasks(job: _Job, indices: range) -> Iterator[tuple[int, list[Record]]]:
    for index in indices:
        records = read_source(job.sources[index])
        while batch := list(islice(records, CHUNK_RECORDS)):
            yield index, batch


def _run(job, tasks: Iterator, scan_one=scan_chunk) -> Iterator:
    """scan_one (scan_chunk; the preference data's: pairs.scan_pair_chunk) over the tasks, in order: in this
    process for small inputs, else on forked workers with a few chunks in flight per worker (the reader waits for
    them: memory stays bounded)."""
    first = next(tasks, None)
    if first is None:
        return
    yield scan_one(job, first)  # in this process: a bad first record (a wrong format) stops the run before any fork
    head = list(islice(tasks, FORK_AFTER_CHUNKS))
    count = prep_workers(len(head) * CHUNK_RECORDS if len(head) < FORK_AFTER_CHUNKS else 1 << 40, CHUNK_RECORDS)
    if count <= 1:
        yield from (scan_one(job, task) for task in chain(head, tasks))
        return
    with workers.pool(count, job) as pool:
        pending: deque = deque()
        for task in chain(head, tasks):
            pending.append(pool.apply_async(_scan_forked, (scan_one, task)))
            if len(pending) >= IN_FLIGHT * count:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


class TokenStore:
    """Every good record's tokens, appended to one flat file of int32: the id, with the sign bit set where the
    token is supervised (a label is its token's id or IGNORE, nothing else), so a record's first n tokens and
    their labels are one contiguous read of 4 bytes a token."""

    SUPERVISED = np.int32(-(1 << 31))  # the sign bit

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "tokens.i32"
        self.file = open(self.path, "wb")  # noqa: SIM115 (closed by close())
        self.size = 0

    def append(self, tok: Tokenized) -> int:
        """Write the records; returns the position of their first token."""
        supervised = tok.labels != IGNORE
        if np.any(tok.ids < 0) or not np.array_equal(tok.labels[supervised], tok.ids[supervised]):
            raise ValueError("token store: a label that is neither its token's id nor IGNORE")
        start = self.size
        self.file.write(np.where(supervised, tok.ids | self.SUPERVISED, tok.ids).astype(np.int32).data)
        self.size += len(tok.ids)
        return start

    def close(self) -> None:
        self.file.close()

    def gather(self, starts: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The first `lengths` tokens of the records at `starts`, one after the other (ids, labels). One
        positioned read per record, in file order: not through a memory map, whose fault-around and read-ahead
        would map megabytes around every record into this process."""
        bounds = np.zeros(len(starts) + 1, dtype=np.int64)
        np.cumsum(lengths, out=bounds[1:])
        tokens = np.empty(int(bounds[-1]), dtype=np.int32)
        view = memoryview(tokens).cast("B")
        order = np.argsort(starts, kind="stable")
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for start, length, at in zip((starts[order] * 4).tolist(), (lengths[order] * 4).tolist(),
                                         (bounds[:-1][order] * 4).tolist(), strict=True):
                if length and os.preadv(fd, [view[at:at + length]], start) != length:
                    raise OSError(f"{self.path}: short read")
        finally:
            os.close(fd)
        ids = tokens & np.int32(0x7FFFFFFF)
        return ids, np.where(tokens < 0, ids, np.int32(IGNORE))


@dataclass
class Scanned:
    """The good records of some sources, in read order: per record its source (index in the scan's list), digest,
    length, supervised tokens among the first max_len, and where its tokens start in the store."""

    source: np.ndarray
    digests: np.ndarray
    lengths: np.ndarray
    supervised: np.ndarray
    starts: np.ndarray
    ranks: np.ndarray  # split_ranks of the digests, or empty

    @classmethod
    def join(cls, columns: list[list[np.ndarray]]) -> "Scanned":
        """One Scanned from each column's parts (in read order); the parts of a column are let go as soon as it is
        joined, so the peak is the result and one column's parts, not twice the result."""
        joined = []
        for column, dtype in zip(columns, (np.int32, np.uint64, np.int32, np.int32, np.int64, np.uint64),
                                 strict=True):
            joined.append(np.concatenate(column) if column else np.zeros(0, dtype))
            column.clear()
        return cls(*joined)


class Progress:
    """Records read and records/s on stderr during a long preparation: redrawn in place on a terminal, a line
    every PROGRESS_EVERY_S[1] seconds in a log; nothing before PROGRESS_AFTER (seconds and records)."""

    def __init__(self, label: str):
        self.label, self.records, self.start = label, 0, time.monotonic()
        self.tty = sys.stderr.isatty()
        self.every = PROGRESS_EVERY_S[0] if self.tty else PROGRESS_EVERY_S[1]
        self.next = self.start + max(PROGRESS_AFTER[0], self.every)
        self.shown = False

    def line(self, now: float) -> str:
        rate = self.records / max(now - self.start, 1e-9)
        return f"{self.label}: {self.records:,} records read, {rate:,.0f} records/s, {now - self.start:.0f}s"

    def add(self, records: int) -> None:
        self.records += records
        now = time.monotonic()
        if now < self.next or self.records < PROGRESS_AFTER[1]:
            return
        self.next = now + self.every
        self.shown = True
        if self.tty:
            bar = "".join("#" if (i - int(now / self.every)) % 10 < 3 else "-" for i in range(20))
            print(f"\r[{bar}] {self.line(now)}\033[K", end="", file=sys.stderr, flush=True)
        else:
            print(self.line(now), file=sys.stderr, flush=True)

    def done(self) -> None:
        if self.shown:
            print(("\r" if self.tty else "") + self.line(time.monotonic()) + (", done\033[K" if self.tty else ""),
                  file=sys.stderr, flush=True)
            self.shown = False


def _new_counts() -> dict[str, Any]:
    return {"read": 0, "kept": 0, "bad": 0, "duplicates": 0, "overlong": 0, "unsupervised": 0, "train": 0,
            "eval": 0, "truncated": 0, "bad_by_reason": {}, "examples": [], "unread_keys": {},
            "supervised_turns": 0, "context_turns": 0, "reasoning_traces": 0}


def scan(job: _Job, indices: range, keys: list[str], counts: dict[str, dict], store: TokenStore,
         progress: Progress) -> Scanned:
    """Read, normalise and tokenise the job's sources `indices`; bad records are counted under keys[i] (i: the
    place in `indices`), or with data.on_bad_record: error the first one stops everything."""
    columns: list[list[np.ndarray]] = [[] for _ in range(6)]  # Scanned's fields, a part per chunk
    for chunk, local in counted_chunks(job, indices, keys, counts, progress):
        first = store.append(chunk.tokens)
        for column, part in zip(columns, (np.full(len(chunk.digests), local, dtype=np.int32), chunk.digests,
                                          chunk.tokens.lengths.astype(np.int32), chunk.supervised.astype(np.int32),
                                          first + chunk.tokens.bounds[:-1], chunk.ranks),
                                strict=True):
            column.append(part)
    return Scanned.join(columns)


def counted_chunks(job, indices: range, keys: list[str], counts: dict[str, dict], progress: Progress,
                   scan_one=scan_chunk) -> Iterator[tuple[Any, int]]:
    """Each scanned chunk of the sources `indices` (scan_one: scan_chunk, or the preference data's) with its
    source's place in `indices`, once its records are counted under keys[place]: read, bad (by reason; under
    data.on_bad_record: error the first one stops everything), keys not read, turns and traces."""
    for key in keys:
        counts.setdefault(key, _new_counts())
    for chunk in _run(job, _tasks(job, indices), scan_one):
        local = chunk.source - indices.start
        tally = counts[keys[local]]
        tally["read"] += chunk.read
        for reason, message in chunk.bad:
            if job.on_bad == "error":
                raise InputError(f"{message} (set data.on_bad_record: skip to skip such records)")
            tally["bad"] += 1
            tally["bad_by_reason"][reason] = tally["bad_by_reason"].get(reason, 0) + 1
            if len(tally["examples"]) < 5:
                tally["examples"].append(message)
        for key, n in chunk.unread.items():
            tally["unread_keys"][key] = tally["unread_keys"].get(key, 0) + n
        for name, n in zip(("supervised_turns", "context_turns", "reasoning_traces"), chunk.turns, strict=True):
            tally[name] += n
        yield chunk, local
        progress.add(chunk.read)
    for key in keys:
        for name in ("bad_by_reason", "unread_keys"):
            counts[key][name] = dict(sorted(counts[key][name].items()))


def per_source(keys: list[str], source: np.ndarray, counts: dict[str, dict], name: str) -> None:
    """Add each source's number of these records (source: the source of each) to counts[key][name]."""
    for index, n in enumerate(np.bincount(source, minlength=len(keys)).tolist()):
        counts[keys[index]][name] += n


def dedup_scanned(scanned: Scanned, keys: list[str], counts: dict[str, dict], enabled: bool) -> np.ndarray:
    """The records kept (indices into scanned): the first of each digest when data.dedup; duplicates counted."""
    if not enabled:
        return np.arange(len(scanned.digests))
    keep = first_indices(scanned.digests)
    duplicate = np.ones(len(scanned.digests), dtype=bool)
    duplicate[keep] = False
    per_source(keys, scanned.source[duplicate], counts, "duplicates")
    return keep


def fit_part(scanned: Scanned, part: np.ndarray, max_len: int, policy: str
             ) -> tuple[np.ndarray, np.ndarray, dict[str, int], np.ndarray]:
    """The length fit (pack.fit_lengths) of the records `part` (indices into scanned): the records kept, their
    lengths after truncation, the counts, and each record's outcome."""
    keep, lengths, counts, outcomes = fit_lengths(scanned.lengths[part], scanned.supervised[part], max_len, policy)
    return part[keep], lengths, counts, outcomes


def write_rows(store: TokenStore, starts: np.ndarray, lengths: np.ndarray, rows: np.ndarray | None,
               path: Path) -> int:
    """The data set as an Arrow file, written a batch of rows at a time: the records (`starts`, `lengths` in the
    store) in order, one per row, or (rows: the record bounds of each row) packed, with seq_lengths. Value types
    as Dataset.from_dict gives them: int32 input_ids, int64 labels; seq_lengths as TRL's pack_dataset writes them.
    Returns the number of rows."""
    packed = rows is not None
    rows = np.arange(len(starts) + 1, dtype=np.int64) if rows is None else rows
    fields = [("input_ids", pa.list_(pa.int32())), ("labels", pa.list_(pa.int64()))]
    schema = pa.schema(fields + ([("seq_lengths", pa.list_(pa.int32()))] if packed else []))
    record_tokens = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=record_tokens[1:])
    row_tokens = record_tokens[rows]
    n_rows = len(rows) - 1
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        lo = 0
        while lo < n_rows:  # rows lo..hi-1: about ROW_BATCH_TOKENS tokens, at least one row
            hi = max(lo + 1, int(np.searchsorted(row_tokens, row_tokens[lo] + ROW_BATCH_TOKENS, side="right")) - 1)
            hi = min(hi, n_rows)
            first, last = int(rows[lo]), int(rows[hi])
            ids, labels = store.gather(starts[first:last], lengths[first:last])
            bounds = pa.array((row_tokens[lo:hi + 1] - row_tokens[lo]).astype(np.int32))
            columns = [pa.ListArray.from_arrays(bounds, pa.array(ids)),
                       pa.ListArray.from_arrays(bounds, pa.array(labels.astype(np.int64)))]
            if packed:
                columns.append(pa.ListArray.from_arrays(pa.array((rows[lo:hi + 1] - first).astype(np.int32)),
                                                        pa.array(lengths[first:last].astype(np.int32))))
            writer.write_batch(pa.record_batch(columns, schema=schema))
            lo = hi
    return n_rows


def _write_shard(index: int) -> int:
    """In a forked worker (workers.job(): store, starts, lengths, rows, packed, ranges, paths): shard `index`."""
    store, starts, lengths, rows, packed, ranges, paths = workers.job()
    lo, hi = ranges[index]
    first, last = int(rows[lo]), int(rows[hi])
    return write_rows(store, starts[first:last], lengths[first:last], rows[lo:hi + 1] - first if packed else None,
                      paths[index])


def write_shards(store: TokenStore, starts: np.ndarray, lengths: np.ndarray, rows: np.ndarray | None,
                 folder: Path, name: str) -> int:
    """write_rows on forked workers, a shard each of about the same number of tokens, in row order:
    folder/name-00000-of-0000N.arrow... (load_prepared reads them back as one set). Returns the number of rows."""
    packed = rows is not None
    rows = np.arange(len(starts) + 1, dtype=np.int64) if rows is None else rows
    n_rows = len(rows) - 1
    record_tokens = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=record_tokens[1:])
    row_tokens = record_tokens[rows]
    shards = max(1, min(prep_workers(len(starts), CHUNK_RECORDS), n_rows))
    cuts = sorted({0, n_rows, *np.searchsorted(row_tokens, [row_tokens[-1] * k // shards
                                                            for k in range(1, shards)]).tolist()})
    ranges = list(pairwise(cuts))
    paths = [folder / f"{name}-{k:05d}-of-{len(ranges):05d}.arrow" for k in range(len(ranges))]
    if len(ranges) == 1:
        return write_rows(store, starts, lengths, rows if packed else None, paths[0])
    with workers.pool(len(ranges), (store, starts, lengths, rows, packed, ranges, paths)) as pool:
        return sum(pool.map(_write_shard, range(len(ranges)), chunksize=1))


def conversation_prompts(job: _Job, src: DataSource, record: Record) -> list[list[dict] | dict]:
    """A record's prompt: all but the last turn, as the template gets them (with its tools as {"messages",
    "tools"}); BadRecord for a bad one."""
    conversation = to_conversation(record, src.format, src.columns, unread={}, loss_on=job.loss_on)
    [messages], [tools], _ = template_inputs([conversation], job.reasoning != "drop")
    return [{"messages": messages[:-1], "tools": tools} if tools else messages[:-1]]


def heldout_prompts(job, indices: range, wanted: np.ndarray, prompts_of=conversation_prompts
                    ) -> list[list[dict] | dict]:
    """The prompts of the good rows at positions `wanted` of the job's sources `indices` (a few, early in the read
    order): read again, only as far as the last of them. prompts_of: a record's rows' prompts
    (conversation_prompts; the preference data's: a pair's, or two for a pair that KTO unpairs)."""
    wanted_set, prompts, good = set(wanted.tolist()), {}, 0
    last = max(wanted_set, default=-1)
    for index in indices:
        src = job.sources[index]
        for record in read_source(src):
            if good > last:
                return [prompts[i] for i in wanted.tolist()]
            try:
                found = prompts_of(job, src, record)
            except BadRecord:
                continue
            for prompt in found:
                if good in wanted_set:
                    prompts[good] = prompt
                good += 1
    return [prompts[i] for i in wanted.tolist()]


# --- the stage ---

def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else canonical_json(tokenizer.get_vocab())
    return hashlib.sha256(text.encode()).hexdigest()


def data_fingerprint(cfg: DataSection, tokenizer, template: str, method: str = "sft") -> str:
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
    if method != "sft":  # (absent for SFT: its fingerprints stay what they were)
        parts.update(method=method, pair_version=PAIR_PREP_VERSION)
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()


COUNT_KEYS = ("read", "kept", "bad", "duplicates", "overlong", "unsupervised")  # read = the sum of the others
TURN_KEYS = ("supervised_turns", "context_turns", "reasoning_traces")  # in the good records (normalised)


def count_totals(per_source: dict[str, dict]) -> dict[str, Any]:
    """All sources together; read = kept + bad + duplicates + overlong + unsupervised, kept = train + eval."""
    totals: dict[str, Any] = {k: sum(s[k] for s in per_source.values())
                              for k in (*COUNT_KEYS, "train", "eval", "truncated", *TURN_KEYS)}
    for name in ("bad_by_reason", "unread_keys"):
        merged: dict[str, int] = {}
        for counts in per_source.values():
            for key, n in counts[name].items():
                merged[key] = merged.get(key, 0) + n
        totals[name] = dict(sorted(merged.items()))
    return totals


def build(cfg: DataSection, tokenizer, template: str, work: Path, how: Rendering | None = None) -> tuple[dict, dict]:
    """Everything that is cached: writes work/train.arrow (and work/eval.arrow); returns the report and the
    recorded split. template: the training template (extended); how: how the template it extends renders tools
    and traces (for the report)."""
    eval_sources = list(cfg.eval.sources) if cfg.eval and cfg.eval.sources else []
    split_seed = cfg.seed if cfg.eval and not cfg.eval.sources and (cfg.eval.fraction or cfg.eval.count) else None
    job = _Job([*cfg.sources, *eval_sources], tokenizer, rust_backend(tokenizer), template, cfg.loss_on,
               cfg.max_seq_length, cfg.on_bad_record, split_seed, cfg.reasoning)
    store = TokenStore(work / "tokens")
    how = how or rendering(template, cfg.reasoning)
    try:
        with workers.forking():  # for the whole stage: the scan's and the shard writers' workers fork from it
            counts: dict[str, dict] = {}
            parts, split = scan_and_split(job, cfg, store, counts)
            eval_part = parts["eval"]
            report: dict[str, Any] = {"sources": counts, "records_read": 0, "duplicates": 0,
                                      "tools_rendered_by": how.tools,
                                      "heldout_prompts": heldout_prompts(job, eval_part.indices, eval_part.records[:3])}
            for name, part in parts.items():
                if len(part.records):
                    _write_part(name, part, cfg, store, tokenizer, work, counts, report)
    finally:
        store.close()
    return report_totals(report, counts, cfg, how), split


@dataclass
class Part:
    """The records of one part (train or eval): which scan they are in, their indices in it, and that scan's keys
    (its sources' names in the report) and source indices."""

    scanned: Scanned
    records: np.ndarray
    keys: list[str]
    indices: range


def scan_and_split(job, cfg: DataSection, store: TokenStore, counts: dict[str, dict],
                   scan_sources=scan) -> tuple[dict[str, Part], dict[str, Any]]:
    """Read, deduplicate and split: the train and eval parts, and the split as split.json records it. scan_sources:
    `scan`, or the preference data's (pairs.scan_rows): anything that gives each record's source and digest."""
    progress = Progress("data")
    train_indices = range(len(cfg.sources))
    keys = [s.path for s in cfg.sources]
    train = scan_sources(job, train_indices, keys, counts, store, progress)
    kept = dedup_scanned(train, keys, counts, cfg.dedup)
    read, duplicates = (sum(c[key] for c in counts.values()) for key in ("read", "duplicates"))
    if not len(kept):
        progress.done()
        examples = [e for c in counts.values() for e in c["examples"]]
        raise InputError(f"data: no usable records ({read} read, {sum(c['bad'] for c in counts.values())} bad and "
                         f"skipped, {duplicates} duplicates); sources: {', '.join(s.path for s in cfg.sources)}"
                         + (f"; first bad record: {examples[0]}" if examples else ""))
    split: dict[str, Any] = {"seed": cfg.seed}
    eval_cfg = cfg.eval
    if eval_cfg and eval_cfg.sources:
        eval_indices = range(len(cfg.sources), len(cfg.sources) + len(eval_cfg.sources))
        eval_keys = ["eval:" + s.path for s in eval_cfg.sources]
        evaluation = scan_sources(job, eval_indices, eval_keys, counts, store, progress)
        eval_kept = dedup_scanned(evaluation, eval_keys, counts, cfg.dedup)
        parts = {"train": Part(train, kept, keys, train_indices),
                 "eval": Part(evaluation, eval_kept, eval_keys, eval_indices)}
        split.update(method="sources", eval_sources=[s.path for s in eval_cfg.sources])
    elif eval_cfg and (eval_cfg.fraction or eval_cfg.count):
        try:
            in_eval = split_mask(train.digests[kept], cfg.seed, eval_cfg.fraction, eval_cfg.count, unique=cfg.dedup,
                                 ranks=train.ranks[kept] if len(train.ranks) == len(train.digests) else None)
        except InputError as err:
            progress.done()
            raise InputError(f"{err} ({read} records read, {duplicates} duplicates removed)") from None
        parts = {"train": Part(train, kept[~in_eval], keys, train_indices),
                 "eval": Part(train, kept[in_eval], keys, train_indices)}
        split.update(method="fraction" if eval_cfg.fraction else "count",
                     fraction=eval_cfg.fraction, count=eval_cfg.count,
                     eval_ids=[f"{d:016x}" for d in train.digests[kept[in_eval]].tolist()])
    else:
        parts = {"train": Part(train, kept, keys, train_indices), "eval": Part(train, kept[:0], keys, train_indices)}
        split.update(method="none")
    progress.done()
    store.close()
    for part in parts.values():  # the digests and ranks have done their work (dedup, split)
        part.scanned.digests = part.scanned.ranks = np.zeros(0, np.uint64)
    return parts, split


def _write_part(name: str, part: Part, cfg: DataSection, store: TokenStore, tokenizer, work: Path,
                counts: dict[str, dict], report: dict[str, Any]) -> None:
    """Fit the part's records to max_seq_length, count what became of them, and write its shards (packed or
    not); report[name]: its statistics (and, for train, report["sample"])."""
    scanned = part.scanned
    records, lengths, fit_counts, outcomes = fit_part(scanned, part.records, cfg.max_seq_length, cfg.on_overlong)
    source = scanned.source[part.records]
    kept_here = (outcomes == KEPT) | (outcomes == TRUNCATED)
    for key, chosen in ((name, kept_here), ("kept", kept_here), ("truncated", outcomes == TRUNCATED),
                        ("overlong", outcomes == OVERLONG), ("unsupervised", outcomes == UNSUPERVISED)):
        per_source(part.keys, source[chosen], counts, key)
    del source, kept_here, outcomes
    supervised = int(scanned.supervised[records].sum())
    report[name] = {"conversations": len(part.records), **fit_counts, **token_stats_of(lengths, supervised)}
    starts = scanned.starts[records]
    if name == "train":
        if not len(records):
            raise InputError(
                "data: no training record left after filtering "
                f"({fit_counts['overlong_dropped']} longer than "
                f"data.max_seq_length={cfg.max_seq_length}, {fit_counts['unsupervised_dropped']} with no "
                "supervised token); raise max_seq_length or set data.on_overlong: truncate")
        ids, labels = store.gather(starts[:1], lengths[:1])
        report["sample"] = render_marked(ids.tolist(), labels.tolist(), tokenizer)
    if not len(records):
        return
    del records
    if not cfg.packing:
        report[name]["sequences"] = write_shards(store, starts, lengths, None, work, name)
        return
    order, packed_lengths, rows = pack_rows(lengths, cfg.max_seq_length, cfg.seed)
    starts, lengths = starts[order], None
    del order
    sequences = report[name]["sequences"] = write_shards(store, starts, packed_lengths, rows, work, name)
    report[name]["packing_efficiency"] = round(report[name]["tokens"] / (sequences * cfg.max_seq_length), 4)


def report_totals(report: dict[str, Any], counts: dict[str, dict], cfg: DataSection,
                  how: Rendering) -> dict[str, Any]:
    """The report's totals over all sources: counts, turns, reasoning traces."""
    if report["train"]["supervised_tokens"] == 0:
        raise InputError("data: no token is supervised; check data.loss_on and the chat template")
    report["counts"] = count_totals(counts)
    report["records_read"], report["duplicates"] = report["counts"]["read"], report["counts"]["duplicates"]
    report["turns"] = {"supervised": report["counts"]["supervised_turns"],
                       "context": report["counts"]["context_turns"]}
    traces = report["counts"]["reasoning_traces"]
    report["reasoning"] = {"setting": cfg.reasoning, "rendered_by": how.reasoning, "traces": traces,
                           "dropped": traces if how.reasoning == "dropped" else 0}
    return report


def load_prepared(folder: Path) -> tuple["Dataset", "Dataset | None"]:
    """The prepared train and eval sets (memory-mapped Arrow files, the shards of each in order)."""
    from datasets import Dataset, concatenate_datasets

    def load(name: str) -> "Dataset | None":
        shards = [Dataset.from_file(str(path)) for path in sorted(folder.glob(f"{name}-*-of-*.arrow"))]
        return None if not shards else shards[0] if len(shards) == 1 else concatenate_datasets(shards)

    return load("train"), load("eval")


def fingerprint(cfg: DataSection, tokenizer, method: str = "sft") -> str:
    """The prepared data's fingerprint (its cache key) without preparing anything: the sources' content hashed,
    the tokenizer, the training template, the settings and (dpo, kto) the method."""
    return data_fingerprint(cfg, tokenizer, _training_template(cfg, tokenizer, method)[0], method)


def _training_template(cfg: DataSection, tokenizer, method: str = "sft") -> tuple[str, Rendering]:
    """The template the data is rendered through (tools and traces as the recipe says; for SFT with the training
    markers, for dpo/kto the template the adapter carries, as TRL's preference trainers render through the
    tokenizer's) and how it renders them."""
    base = resolve_chat_template(cfg.chat_template, tokenizer)
    how = rendering(split_extension(base)[1], cfg.reasoning)
    if method != "sft":
        return extend_template(base, cfg.reasoning), how
    return training_template(base, tokenizer, cfg.loss_on, cfg.reasoning), how


SHARD = re.compile(r"(train|eval)-(\d{5})-of-(\d{5})\.arrow")


def cache_problem(folder: Path, report: dict[str, Any]) -> str | None:
    """What is wrong with a prepared data folder whose report.json is there (None: nothing): a shard missing, of
    another size than recorded, or row counts other than the report's."""
    found: dict[str, list[tuple[int, int]]] = {}
    for path in folder.glob("*-of-*.arrow"):
        if match := SHARD.fullmatch(path.name):
            found.setdefault(match[1], []).append((int(match[2]), int(match[3])))
    for name in ("train", "eval"):
        if not isinstance(report.get(name), dict) or "sequences" not in report[name]:
            continue
        shards = sorted(found.get(name, []))
        total = shards[0][1] if shards else 0
        if not shards or shards != [(k, total) for k in range(total)]:
            return f"{name} shards missing ({len(shards)} of {total or '?'} there)"
    for name, size in (report.get("shards") or {}).items():
        try:
            actual = (folder / name).stat().st_size
        except OSError:
            return f"{name} missing"
        if actual != size:
            return f"{name}: {actual} bytes, the report says {size}"
    return None


def _load_checked(folder: Path) -> tuple[dict[str, Any], "Dataset", "Dataset | None"] | str:
    """The cached report and data sets, or what is wrong with them."""
    try:
        report = json.loads((folder / "report.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        return f"report.json: {err}"
    if not isinstance(report, dict):
        return "report.json holds no report"
    if problem := cache_problem(folder, report):
        return problem
    try:
        train, evaluation = load_prepared(folder)
    except (OSError, ValueError, pa.ArrowException) as err:
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    for name, dataset in (("train", train), ("eval", evaluation)):
        expected = report.get(name, {}).get("sequences") if isinstance(report.get(name), dict) else None
        rows = dataset.num_rows if dataset is not None else None
        if expected is not None and rows != expected:
            return f"{name}: {rows} rows, the report says {expected}"
    return report, train, evaluation


def prepare(cfg: DataSection, tokenizer, output_dir: Path, force: bool = False, method: str = "sft") -> PreparedData:
    """The prepared data of `method`: SFT's packed (or padded) rows, or dpo/kto's tokenized rows (pairs.py)."""
    if problems := output_data_overlap(cfg, output_dir):
        raise InputError("\n".join(problems))
    template, how = _training_template(cfg, tokenizer, method)
    fingerprint = data_fingerprint(cfg, tokenizer, template, method)
    cache_root = RunDir(output_dir).prepared
    target = cache_root / fingerprint[:16]
    if not force and (target / "report.json").is_file():
        cached = _load_checked(target)
        if not isinstance(cached, str):
            report, train, evaluation = cached
            return PreparedData(train, evaluation, report, fingerprint, target, cached=True)
        print(f"data: the prepared data in {target} is damaged ({cached}); preparing it again", flush=True)

    with staging_folder(cache_root / f".tmp-{fingerprint[:16]}-{os.getpid()}") as tmp:
        tmp.mkdir(parents=True)
        if method == "sft":
            report, split = build(cfg, tokenizer, template, tmp, how)
        else:
            from qctrain.data.pairs import build_rows

            report, split = build_rows(cfg, method, tokenizer, template, tmp, how)
        shutil.rmtree(tmp / "tokens")
        report["fingerprint"] = fingerprint
        report["shards"] = {path.name: path.stat().st_size for path in sorted(tmp.glob("*.arrow"))}
        write_json_atomic(tmp / "split.json", split)
        fsync_tree(tmp)  # the shards are on disk before the report that vouches for them
        write_json_atomic(tmp / "report.json", report)  # written last: its presence marks a complete cache
    swap_in_folder(tmp, target, fsync_parent=True)
    return PreparedData(*load_prepared(target), report, fingerprint, target, cached=False)
