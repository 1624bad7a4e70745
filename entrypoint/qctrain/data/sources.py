"""Reading sources: files (JSON, JSONL, CSV, Parquet) and Hub data sets, record by record."""

import csv
import errno
import hashlib
import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qctrain.errors import InputError
from qctrain.recipe import DataSource, abbreviate, canonical_json

if TYPE_CHECKING:
    pass




FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet")

@dataclass
class Record:
    where: str
    fields: Any
    problem: str | None = None  # set when the record could not even be parsed (a bad JSONL line)

def os_error_text(err: OSError) -> str:
    if err.errno == errno.ELOOP:
        return "symbolic link loop (a link that leads back to itself)"
    if err.errno == errno.EACCES:
        return "permission denied"
    if err.errno == errno.ENOENT:
        return "not found"
    return f"cannot read: {err.strerror or err}"

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
