"""Data stage: sources -> conversational `messages` -> dedup -> split -> template -> tokens, labels -> packs.

The prepared data sets are cached under `<output.dir>/prepared/<fingerprint>/`, keyed by the data
content, the tokenizer, the chat template and every setting that changes the result.
"""

import csv
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
from qctrain.recipe import DataSection, DataSource, canonical_json

if TYPE_CHECKING:
    from datasets import Dataset

PREP_VERSION = "2"  # bump when the preparation logic changes what it writes
FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet")
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "model": "assistant", "system": "system"}
IGNORE = -100


class BadRecord(ValueError):
    """One record that cannot be used; `where` is file:line or file[index]."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")


@dataclass
class Record:
    where: str
    fields: dict[str, Any]


@dataclass
class PreparedData:
    train: "Dataset"  # datasets is imported where used: preflight imports this module
    eval: "Dataset | None"
    report: dict[str, Any]
    fingerprint: str
    dir: Path
    cached: bool


# --- reading sources ---

def is_hub_source(path: str) -> bool:
    return path.startswith("hub:")


def source_files(src: DataSource) -> list[Path]:
    path = Path(src.path)
    if not path.exists():
        raise InputError(f"{path}: data source not found")
    if path.is_file():
        if path.suffix.lower() not in FILE_TYPES:
            raise InputError(f"{path}: unsupported data file type (use {', '.join(FILE_TYPES)})")
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_TYPES and not p.name.startswith("."))
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


def _read_json(path: Path, text: str) -> Iterator[Record]:
    if not text.strip():
        raise InputError(f"{path}: file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    if isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON array of records, got an object "
                         f"(keys: {', '.join(list(data)[:5])}); for one record per line use .jsonl")
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for index, item in enumerate(data):
        yield Record(f"{path}[{index}]", item)


def _read_jsonl(path: Path, text: str) -> Iterator[Record]:
    if not text.strip():
        raise InputError(f"{path}: file is empty")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield Record(f"{path}:{number}", json.loads(line))
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}:{err.colno}: invalid JSON: {err.msg}") from None


def _read_csv(path: Path, text: str) -> Iterator[Record]:
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
    except Exception as err:  # pyarrow raises several types for a broken file
        raise InputError(f"{path}: cannot read Parquet: {err}") from None
    if not rows:
        raise InputError(f"{path}: file is empty")
    for index, row in enumerate(rows):
        yield Record(f"{path}[{index}]", row)


def read_file(path: Path) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        text = _decode(path, path.read_bytes())
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as err:  # EIO, a folder named like a file, a vanished mount...
        raise InputError(f"{path}: cannot read: {err.strerror or err}") from None
    readers: dict[str, Callable[[Path, str], Iterator[Record]]] = {
        ".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv}
    return readers[suffix](path, text)


def read_hub(src: DataSource) -> Iterator[Record]:
    from datasets import load_dataset

    name = src.path.removeprefix("hub:")
    try:
        ds = load_dataset(name, split=src.split, revision=src.revision)
    except Exception as err:
        raise InputError(f"{src.path}: cannot load Hub data set: {str(err).splitlines()[0]}") from None
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
            except PermissionError:
                raise InputError(f"{path}: permission denied") from None
            except OSError as err:
                raise InputError(f"{path}: cannot read: {err.strerror or err}") from None
    return digest.hexdigest()


# --- normalising to messages ---

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


def _alpaca(fields: dict[str, Any], where: str) -> list[dict[str, str]]:
    instruction = _text(fields, "instruction", where)
    output = _text(fields, "output", where)
    extra = _text(fields, "input", where, required=False)
    system = _text(fields, "system", where, required=False)
    messages = [{"role": "system", "content": system}] if system else []
    history = fields.get("history") or []
    if not isinstance(history, list):
        raise BadRecord(where, "field 'history' must be a list of [user, assistant] pairs")
    for turn in history:
        if not (isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise BadRecord(where, "field 'history' must be a list of [user, assistant] string pairs")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [*messages, {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _turns(fields: dict[str, Any], where: str, list_key: str, role_key: str,
           content_key: str) -> list[dict[str, str]]:
    turns = fields.get(list_key)
    if not isinstance(turns, list) or not turns:
        raise BadRecord(where, f"field '{list_key}' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord(where, f"{list_key}[{i}] must be an object")
        role = ROLE_ALIASES.get(str(turn.get(role_key)))
        if role is None:
            raise BadRecord(where, f"{list_key}[{i}].{role_key}: unknown role {turn.get(role_key)!r}")
        messages.append({"role": role, "content": _text(turn, content_key, f"{where} {list_key}[{i}]")})
    return messages


def _sharegpt(fields: dict[str, Any], where: str) -> list[dict[str, str]]:
    return _turns(fields, where, "conversations", "from", "value")


def _messages(fields: dict[str, Any], where: str) -> list[dict[str, str]]:
    return _turns(fields, where, "messages", "role", "content")


NORMALISERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages}


def detect_format(fields: dict[str, Any], where: str) -> str:
    if "messages" in fields:
        return "messages"
    if "conversations" in fields:
        return "sharegpt"
    if "instruction" in fields:
        return "alpaca"
    raise BadRecord(where, f"cannot tell the format from keys {sorted(fields)[:6]}; "
                           "set format: alpaca|sharegpt|messages or a columns: mapping")


def to_messages(record: Record, fmt: str, columns: dict[str, str]) -> list[dict[str, str]]:
    fields = record.fields
    if not isinstance(fields, dict):
        raise BadRecord(record.where, f"a record must be an object, got {type(fields).__name__}")
    if columns:
        fields = {**fields, **{ours: fields.get(theirs) for ours, theirs in columns.items()}}
    if fmt == "auto":
        fmt = detect_format(fields, record.where)
    messages = NORMALISERS[fmt](fields, record.where)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRecord(record.where, "no assistant turn with text to learn from")
    if messages[-1]["role"] != "assistant":
        raise BadRecord(record.where, "the last turn must be the assistant's")
    return messages


@dataclass
class SourceCounts:
    read: int = 0
    bad: int = 0
    kept: int = 0
    examples: list[str] = field(default_factory=list)


def load_conversations(sources: list[DataSource], on_bad: str) -> tuple[list[list[dict]], dict[str, Any]]:
    conversations: list[list[dict]] = []
    counts: dict[str, Any] = {}
    for src in sources:
        tally = SourceCounts()
        for record in read_source(src):
            tally.read += 1
            try:
                conversations.append(to_messages(record, src.format, src.columns))
                tally.kept += 1
            except BadRecord as err:
                if on_bad == "error":
                    raise InputError(f"{err} (set data.on_bad_record: skip to skip such records)") from None
                tally.bad += 1
                if len(tally.examples) < 5:
                    tally.examples.append(str(err))
        counts[src.path] = tally.__dict__
    return conversations, counts


# --- dedup and split ---

def conversation_id(messages: list[dict[str, str]]) -> str:
    return hashlib.blake2b(canonical_json(messages).encode(), digest_size=8).hexdigest()


def dedup(conversations: list[list[dict]]) -> tuple[list[list[dict]], list[str], int]:
    seen: set[str] = set()
    unique, ids = [], []
    for messages in conversations:
        cid = conversation_id(messages)
        if cid not in seen:
            seen.add(cid)
            unique.append(messages)
            ids.append(cid)
    return unique, ids, len(conversations) - len(unique)


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

        raise InputError(f"data.chat_template: unknown template '{setting}'{did_you_mean(setting, names)}; "
                         f"known: model, {', '.join(names)}, or a .jinja file")
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


def tokenize_reference(conversations: list[list[dict]], tokenizer, template: str, loss_on: str,
                       batch_size: int = 512) -> tuple[list[list[int]], list[list[int]]]:
    """The plain-library way (`apply_chat_template` with the assistant mask): the definition the fast
    path must match, and the path for tokenizers without a Rust backend."""
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    masked = loss_on == "assistant"
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start:start + batch_size]
        out = tokenizer.apply_chat_template(batch, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=masked)
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


def _encode(conversations: list[list[dict]], tokenizer, backend, template: str, masked: bool) -> Tokenized:
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, spans = render_jinja_template(conversations=[_without_none(c) for c in conversations],
                                         chat_template=template, return_assistant_tokens_mask=masked,
                                         **tokenizer.special_tokens_map)
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


_JOB: tuple | None = None  # what forked workers read: (conversations, tokenizer, backend, template, masked)


def _encode_range(bounds: tuple[int, int]) -> Tokenized:
    conversations, tokenizer, backend, template, masked = _JOB
    return _encode(conversations[bounds[0]:bounds[1]], tokenizer, backend, template, masked)


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


def tokenize_flat(conversations: list[list[dict]], tokenizer, template: str, loss_on: str,
                  workers: int | None = None, chunk: int = CHUNK_RECORDS) -> Tokenized:
    """Token ids and labels (IGNORE outside the assistant turns when loss_on is 'assistant') of every
    conversation, the same as `tokenize_reference`, fast."""
    global _JOB
    masked = loss_on == "assistant"
    backend = _rust_backend(tokenizer)
    if backend is None:
        return Tokenized.from_lists(*tokenize_reference(conversations, tokenizer, template, loss_on))
    workers = prep_workers(len(conversations)) if workers is None else workers
    n = len(conversations)
    ranges = [(start, min(start + chunk, n)) for start in range(0, n, chunk)]
    if workers <= 1 or len(ranges) <= 1:
        return Tokenized.concat([_encode(conversations[lo:hi], tokenizer, backend, template, masked)
                                 for lo, hi in ranges])
    # Forked workers inherit the job (nothing is pickled on the way in) and each tokenizes on one thread;
    # the variable keeps tokenizers quiet about the fork and out of its thread pool in the children.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _JOB = (conversations, tokenizer, backend, template, masked)
    try:
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            return Tokenized.concat(pool.map(_encode_range, ranges, chunksize=1))
    finally:
        _JOB = None
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def tokenize(conversations: list[list[dict]], tokenizer, template: str, loss_on: str,
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


def build(cfg: DataSection, tokenizer, template: str) -> tuple["Dataset", "Dataset | None", dict, dict]:
    """Everything that is cached: returns train, eval, report and the recorded split."""
    conversations, per_source = load_conversations(cfg.sources, cfg.on_bad_record)
    read = len(conversations)
    duplicates = 0
    if cfg.dedup:
        conversations, ids, duplicates = dedup(conversations)
    else:
        ids = [conversation_id(m) for m in conversations]
    if not conversations:
        bad = sum(s["bad"] for s in per_source.values())
        examples = [e for s in per_source.values() for e in s["examples"]]
        raise InputError(f"data: no usable records ({sum(s['read'] for s in per_source.values())} read, {bad} bad "
                         f"and skipped, {duplicates} duplicates); sources: {', '.join(s.path for s in cfg.sources)}"
                         + (f"; first bad record: {examples[0]}" if examples else ""))

    split: dict[str, Any] = {"seed": cfg.seed}
    eval_cfg = cfg.eval
    if eval_cfg and eval_cfg.sources:
        eval_conversations, eval_counts = load_conversations(eval_cfg.sources, cfg.on_bad_record)
        per_source.update({f"eval:{k}": v for k, v in eval_counts.items()})
        train_conversations = conversations
        split.update(method="sources", eval_sources=[s.path for s in eval_cfg.sources])
    elif eval_cfg and (eval_cfg.fraction or eval_cfg.count):
        try:
            eval_ids = split_ids(ids, cfg.seed, eval_cfg.fraction, eval_cfg.count)
        except InputError as err:
            raise InputError(f"{err} ({read} records read, {duplicates} duplicates removed)") from None
        train_conversations = [m for m, cid in zip(conversations, ids, strict=True) if cid not in eval_ids]
        eval_conversations = [m for m, cid in zip(conversations, ids, strict=True) if cid in eval_ids]
        split.update(method="fraction" if eval_cfg.fraction else "count",
                     fraction=eval_cfg.fraction, count=eval_cfg.count,
                     eval_ids=[cid for cid in ids if cid in eval_ids])
    else:
        train_conversations, eval_conversations = conversations, []
        split.update(method="none")

    report: dict[str, Any] = {"sources": per_source, "records_read": read, "duplicates": duplicates,
                              "heldout_prompts": [c[:-1] for c in eval_conversations[:3]]}
    datasets: dict[str, Dataset | None] = {}
    for name, convs in (("train", train_conversations), ("eval", eval_conversations)):
        if not convs:
            datasets[name] = None
            continue
        tokens = tokenize_flat(convs, tokenizer, template, cfg.loss_on)
        tokens, fit_counts = fit_length_flat(tokens, cfg.max_seq_length, cfg.on_overlong)
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
    return datasets["train"], datasets["eval"], report, split


def prepare(cfg: DataSection, tokenizer, output_dir: Path, force: bool = False) -> PreparedData:
    from datasets import load_from_disk

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
