"""JSON files: written atomically (beside the target, fsynced, then renamed over it: readers see old or new),
with secrets masked, and read leniently where a missing or broken file means "nothing recorded"; small input
files (a recipe, a token file) read with a bound, regular files only. Folders: written in a staging folder
beside their place (removed when a write fails), then swapped in whole. Outputs made readable by other users."""

import contextlib
import json
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qctrain.errors import writing
from qctrain.secretmask import mask_json_text


def write_json_atomic(path: Path, value: Any, shared: bool = False) -> None:
    """shared: 0644, readable by a serving process under another uid whatever the umask (an output); else the
    umask decides (checkpoint markers, the data cache's files)."""
    text = json.dumps(value, indent=2, ensure_ascii=False)
    if (masked := mask_json_text(value, text)) is not value:
        text = json.dumps(masked, indent=2, ensure_ascii=False)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.write("\n")
        handle.flush()
        os.fsync(handle.fileno())
    if shared:
        os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def read_json_object(path: Path) -> dict[str, Any]:
    """The JSON object in `path`; {} when the file is missing, unreadable or holds no object."""
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


class NotRegularFile(OSError):
    """A FIFO, a device, a socket or a folder where a regular file was expected (reading could block forever
    or never end)."""


class FileTooLarge(OSError):
    """More bytes than the caller's bound."""


def kind_of(mode: int) -> str:
    kinds = {stat.S_ISDIR: "a folder", stat.S_ISFIFO: "a FIFO (named pipe)", stat.S_ISCHR: "a character device",
             stat.S_ISBLK: "a block device", stat.S_ISSOCK: "a socket"}
    return next((name for test, name in kinds.items() if test(mode)), "not a regular file")


def check_regular(info: os.stat_result, limit: int | None = None) -> None:
    if not stat.S_ISREG(info.st_mode):
        raise NotRegularFile(f"{kind_of(info.st_mode)}, not a regular file")
    if limit is not None and info.st_size > limit:
        raise FileTooLarge(f"{info.st_size:,} bytes, more than the limit of {limit:,}")


def read_regular(path: Path, limit: int) -> bytes:
    """The bytes of a regular file of at most `limit` bytes (links followed). Checked with stat before it is
    opened (a FIFO would block the open), opened non-blocking, checked again, and never read past limit + 1."""
    check_regular(os.stat(path), limit)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        check_regular(os.fstat(fd), limit)  # replaced between the stat and the open
        chunks, size = [], 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:  # grew after the stat
        raise FileTooLarge(f"more than the limit of {limit:,} bytes")
    return b"".join(chunks)


# --- folders: staged beside their place, then swapped in whole ---

def aside_of(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.old"


def staging_beside(dest: Path) -> Path:
    """The staging folder for `dest`, beside it (a dead run's are removed by name: rundir.LEFTOVERS)."""
    return dest.parent / f".{dest.name}.staging-{os.getpid()}"


def restore_interrupted_swap(dest: Path, aside: Path | None = None) -> None:
    """A crash between the two renames of swap_in_folder leaves the good folder aside: put it back."""
    aside = aside or aside_of(dest)
    if not dest.exists() and aside.exists():
        os.replace(aside, dest)


@contextlib.contextmanager
def staging_folder(staging: Path, needed: int | None = None) -> Iterator[Path]:
    """Where outputs are written before they move into place: removed if anything fails (nothing half-written
    stays, and a full disk gets its space back), a full disk named with the space needed (exit 74)."""
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with writing(staging, needed):
            yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def swap_in_folder(new: Path, dest: Path, aside: Path | None = None, fsync_parent: bool = False) -> None:
    """Put the finished folder `new` at `dest` whole: the old one is moved aside first, removed after, never
    half-overwritten (two renames cannot swap folders atomically; between them the old one waits aside)."""
    aside = aside or aside_of(dest)
    restore_interrupted_swap(dest, aside)
    shutil.rmtree(aside, ignore_errors=True)
    if dest.exists():
        os.replace(dest, aside)
    os.replace(new, dest)
    if fsync_parent:
        fd = os.open(dest.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    shutil.rmtree(aside, ignore_errors=True)


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path, files: bool = True) -> None:
    """fsync every file under root, then every folder (deepest first), so a rename publishes data on disk
    (files=False: the folders only)."""
    for folder, _dirs, names in os.walk(root, topdown=False):
        for name in names if files else ():
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder), directory=True)


def make_shareable(root: Path) -> None:
    """root (a file, or a folder and everything under it) 0644 for files and 0755 for folders (safetensors writes
    0600 whatever the umask), so a serving process under another uid on a shared volume can read the outputs.
    Only ever called on what this run wrote: its staging folders and its own files."""
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        try:
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                path.chmod(0o755)
            elif stat.S_ISREG(mode):
                path.chmod(0o644)
        except (PermissionError, FileNotFoundError):  # another user's file, or gone meanwhile
            pass
