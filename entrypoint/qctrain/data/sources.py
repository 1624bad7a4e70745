"""Reading sources: files (JSON, JSONL, CSV, Parquet) and Hub data sets, record by record, in bounded memory:
JSONL by line, JSON arrays with an incremental parser, CSV by line, Parquet by row group, Hub sets row by row
from their memory-mapped Arrow tables. Nothing holds a whole file."""

import codecs
import csv
import errno
import json
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xxhash

from qctrain.atomic import NotRegularFile, check_regular, kind_of
from qctrain.errors import InputError
from qctrain.recipe import DataSource, abbreviate, canonical_json

FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet")
BLOCK = 1 << 20  # bytes read at a time
MAX_RECORD_CHARS = 64 << 20  # one JSON array item larger than this is refused (or it is an unterminated string)
MAX_LINE_BYTES = 64 << 20  # one JSONL line longer than this is a bad record, one CSV line an error


@dataclass
class Record:
    where: str
    fields: Any
    problem: str | None = None  # set when the record could not even be parsed (a bad JSONL line)
    raw: bytes | None = None  # a JSONL line not parsed yet (the workers parse it): fields is then None

    def __reduce__(self):  # pickled as a plain tuple of its fields: a chunk of records goes to a worker ~1.5x faster
        return Record, (self.where, self.fields, self.problem, self.raw)


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
    if not path.is_dir():
        raise InputError(f"{path}: {_not_regular(path)}; a data source is a file or a folder of files")
    try:
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_TYPES and not p.name.startswith("."))
    except OSError as err:
        raise InputError(f"{path}: {os_error_text(err)}") from None
    for file in files:
        if (problem := _not_regular(file)) is not None:  # a FIFO or a link to /dev/zero named *.jsonl
            raise InputError(f"{file}: {problem}; a data file is a regular file")
    if not files:
        raise InputError(f"{path}: folder holds no {', '.join(FILE_TYPES)} files")
    kinds = sorted({".json" if p.suffix.lower() == ".jsonl" else p.suffix.lower() for p in files})
    if len(kinds) > 1:
        raise InputError(f"{path}: folder mixes {' and '.join(kinds)} files; keep one format per folder "
                         "or list the files as separate sources")
    return files


def _not_regular(path: Path) -> str | None:
    """What `path` is when it is not a regular file (a FIFO would block the reader, /dev/zero never ends); None
    for a regular file, or when it cannot be looked at (the reader names that error)."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    return None if stat.S_ISREG(mode) else f"{kind_of(mode)}, not a regular file"


def _open(path: Path):
    """Opened without blocking (a FIFO put in place after the check) and refused unless a regular file."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:  # EACCES, ELOOP, EIO, a vanished mount...
        raise InputError(f"{path}: {os_error_text(err)}") from None
    try:
        check_regular(os.fstat(fd))
    except NotRegularFile as err:
        os.close(fd)
        raise InputError(f"{path}: {err}; a data file is a regular file") from None
    return os.fdopen(fd, "rb")


def _read_blocks(path: Path, handle) -> Iterator[bytes]:
    while True:
        try:
            block = handle.read(BLOCK)
        except OSError as err:
            raise InputError(f"{path}: {os_error_text(err)}") from None
        if not block:
            return
        yield block


class _JsonText:
    """A JSON document's text, decoded and held one window at a time: `text` from file position `start`, with
    the line and column that position has (so errors name the place in the whole file)."""

    def __init__(self, path: Path, handle):
        self.path, self.blocks = path, _read_blocks(path, handle)
        self.decoder = codecs.getincrementaldecoder("utf-8-sig")()
        self.text, self.eof = "", False
        self.line, self.column = 1, 0  # of text[0]: line (1-based) and characters before it on that line
        self.bytes_read = 0

    def more(self) -> bool:
        """Append the next block; False at the end of the file."""
        if self.eof:
            return False
        block = next(self.blocks, None)
        final = block is None
        try:
            self.text += self.decoder.decode(block or b"", final=final)
        except UnicodeDecodeError as err:
            seen = self.line + self.text.count("\n") + (block or b"")[:max(err.start, 0)].count(b"\n")
            raise InputError(f"{self.path}:{seen}: invalid UTF-8 (byte {self.bytes_read + err.start}); "
                             "save the file as UTF-8") from None
        self.bytes_read += len(block or b"")
        self.eof = final
        return not final

    def drop(self, upto: int) -> None:
        """Forget text[:upto] (parsed), keeping the line and column of what remains."""
        done = self.text[:upto]
        newlines = done.count("\n")
        self.line += newlines
        self.column = len(done) - done.rfind("\n") - 1 if newlines else self.column + len(done)
        self.text = self.text[upto:]

    def place(self, at: int) -> str:
        before = self.text.rfind("\n", 0, at)
        if before >= 0:
            return f"{self.line + self.text.count(chr(10), 0, at)}:{at - before}"
        return f"{self.line}:{self.column + at + 1}"

    def skip_space(self, at: int) -> int:
        """The position of the next non-space character (reading on as needed); len(text) at the end."""
        while True:
            while at < len(self.text) and self.text[at] in " \t\r\n":
                at += 1
            if at < len(self.text) or not self.more():
                return at

    def error(self, at: int, message: str) -> InputError:
        return InputError(f"{self.path}:{self.place(at)}: invalid JSON: {message}")

    def value(self, decoder: json.JSONDecoder, at: int) -> tuple[Any, int]:
        """Decode one value at `at`, reading on while the text ends inside it."""
        while True:
            try:
                return decoder.raw_decode(self.text, at)
            except json.JSONDecodeError as err:
                # Cut by the end of the window (not a real error) when it fails at the window's end, or in a
                # string still open there; read on, up to MAX_RECORD_CHARS for one value.
                cut = err.pos >= len(self.text) - 16 or err.msg.startswith("Unterminated string")
                if cut and len(self.text) - at <= MAX_RECORD_CHARS and self.more():
                    continue
                if cut and not self.eof:
                    raise InputError(f"{self.path}:{self.place(at)}: a record larger than "
                                     f"{MAX_RECORD_CHARS >> 20} MiB (or a string that never ends)") from None
                raise self.error(err.pos, err.msg) from None


def _read_json(path: Path) -> Iterator[Record]:
    """A JSON array of records, parsed item by item (json's own C decoder on a moving window of the file)."""
    decoder = json.JSONDecoder()
    with _open(path) as handle:
        doc = _JsonText(path, handle)
        at = doc.skip_space(0)
        if at == len(doc.text):
            raise InputError(f"{path}: file is empty")
        if doc.text[at] != "[":
            data, end = doc.value(decoder, at)
            if doc.skip_space(end) < len(doc.text):  # what json.loads says of `{...} {...}` (JSONL named .json)
                raise doc.error(doc.skip_space(end), "Extra data")
            if isinstance(data, dict):
                raise InputError(f"{path}: expected a JSON array of records, got an object "
                                 f"(keys: {abbreviate(list(data)[:5])}); for one record per line use .jsonl")
            raise InputError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
        at = doc.skip_space(at + 1)
        index = 0
        if at < len(doc.text) and doc.text[at] == "]":
            at += 1
        else:
            while True:
                item, at = doc.value(decoder, at)
                yield Record(f"{path}[{index}]", item)
                index += 1
                at = doc.skip_space(at)
                if at < len(doc.text) and doc.text[at] == ",":
                    at = doc.skip_space(at + 1)
                elif at < len(doc.text) and doc.text[at] == "]":
                    at += 1
                    break
                else:
                    raise doc.error(at, "Expecting ',' delimiter")
                if at > BLOCK:
                    doc.drop(at)
                    at = 0
        end = doc.skip_space(at)
        if end < len(doc.text):
            raise doc.error(end, "Extra data")


def _lines(path: Path, handle) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line); a line longer than MAX_LINE_BYTES comes as None, the rest of it read past, never held."""
    number = 0
    while line := handle.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            while (rest := handle.readline(MAX_LINE_BYTES + 1)) and not rest.endswith(b"\n"):
                pass
            yield number, None
            continue
        yield number, line.removeprefix(b"\xef\xbb\xbf") if number == 1 else line


LINE_TOO_LONG = f"line longer than {MAX_LINE_BYTES >> 20} MiB"


def _read_jsonl(path: Path) -> Iterator[Record]:
    """One record per line; a line that is not UTF-8 JSON is a bad record (data.on_bad_record), not the end.
    Lines travel unparsed (Record.raw): the workers parse them."""
    with _open(path) as handle:
        empty = True
        try:
            for number, line in _lines(path, handle):
                if line is None:
                    empty = False
                    yield Record(f"{path}:{number}", None, f"{LINE_TOO_LONG} (the limit for one JSONL record)")
                    continue
                if not line.strip():
                    continue
                empty = False
                yield Record(f"{path}:{number}", None, raw=line.removesuffix(b"\n"))
        except OSError as err:
            raise InputError(f"{path}: {os_error_text(err)}") from None
        if empty:
            raise InputError(f"{path}: file is empty")


def parse_line(record: Record) -> Record:
    """A JSONL record with its line parsed: its fields, or the problem with the line."""
    try:
        return Record(record.where, json.loads(record.raw.decode("utf-8")))
    except UnicodeDecodeError as err:
        return Record(record.where, None, f"invalid UTF-8 (byte {err.start} of the line); save the file as UTF-8")
    except json.JSONDecodeError as err:
        return Record(record.where, None, f"invalid JSON: {err.msg} (column {err.colno})")


def _text_lines(path: Path, handle) -> Iterator[str]:
    offset = 0
    for number, line in _lines(path, handle):
        if line is None:
            raise InputError(f"{path}:{number}: {LINE_TOO_LONG} (the limit for one CSV line)")
        try:
            yield line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise InputError(f"{path}:{number}: invalid UTF-8 (byte {offset + err.start}); "
                             "save the file as UTF-8") from None
        offset += len(line)


def _read_csv(path: Path) -> Iterator[Record]:
    csv.field_size_limit(MAX_LINE_BYTES)  # csv's own default (128 KiB a field) would refuse a long answer
    with _open(path) as handle:
        reader = csv.DictReader(_text_lines(path, handle))
        try:
            fields = reader.fieldnames  # reads the header line
        except OSError as err:
            raise InputError(f"{path}: {os_error_text(err)}") from None
        except csv.Error as err:
            raise InputError(f"{path}:1: invalid CSV: {err}") from None
        if not fields or not any(f.strip() for f in fields):
            raise InputError(f"{path}: file is empty")
        first_line = reader.line_num + 1
        rows = iter(reader)
        while True:
            try:
                row = next(rows)
            except StopIteration:
                return
            except csv.Error as err:  # a quoted field longer than MAX_LINE_BYTES, a NUL byte...
                raise InputError(f"{path}:{first_line}: invalid CSV: {err}") from None
            yield Record(f"{path}:{first_line}", row)  # where the record starts; quoted fields may span lines
            first_line = reader.line_num + 1


def _parquet_error(path: Path, err: Exception) -> InputError:
    if isinstance(err, OSError) and err.errno is not None:
        return InputError(f"{path}: {os_error_text(err)}")
    return InputError(f"{path}: cannot read Parquet: {abbreviate(str(err), 200)}")


def _read_parquet(path: Path) -> Iterator[Record]:
    """Row group by row group."""
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a broken file
        raise _parquet_error(path, err) from None
    if parquet.metadata.num_rows == 0:
        raise InputError(f"{path}: file is empty")
    index = 0
    for group in range(parquet.num_row_groups):
        try:
            rows = parquet.read_row_group(group).to_pylist()
        except Exception as err:
            raise _parquet_error(path, err) from None
        for row in rows:
            yield Record(f"{path}[{index}]", row)
            index += 1


def read_file(path: Path) -> Iterator[Record]:
    readers = {".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv, ".parquet": _read_parquet}
    return readers[path.suffix.lower()](path)


def read_hub(src: DataSource) -> Iterator[Record]:
    from datasets import load_dataset

    name = src.path.removeprefix("hub:")
    try:
        ds = load_dataset(name, split=src.split, revision=src.revision)
    except Exception as err:
        raise InputError(f"{src.path}: cannot load Hub data set: {abbreviate(str(err).splitlines()[0], 200)}") \
            from None
    index = 0
    for batch in ds.iter(batch_size=1024):  # rows from the memory-mapped table, a batch at a time
        for row in (dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)):
            yield Record(f"{src.path}[{index}]", row)
            index += 1


def read_source(src: DataSource) -> Iterator[Record]:
    if is_hub_source(src.path):
        yield from read_hub(src)
        return
    for path in source_files(src):
        yield from read_file(path)


def source_fingerprint(src: DataSource) -> str:
    digest = xxhash.xxh3_128(canonical_json(src.model_dump(mode="json")).encode())
    if not is_hub_source(src.path):
        for path in source_files(src):
            digest.update(path.name.encode())
            with _open(path) as handle:
                for block in _read_blocks(path, handle):
                    digest.update(block)
    return digest.hexdigest()
