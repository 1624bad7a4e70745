"""JSON files: written atomically (beside the target, fsynced, then renamed over it: readers see old or new),
and read leniently where a missing or broken file means "nothing recorded". Folders: written in a staging folder
beside their place (removed when a write fails), then swapped in whole."""

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from qctrain.errors import writing


def write_json_atomic(path: Path, value: Any, shared: bool = False) -> None:
    """shared: 0644, readable by a serving process under another uid whatever the umask (an output); else the
    umask decides (checkpoint markers, the data cache's files)."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, ensure_ascii=False)
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


# --- folders: staged beside their place, then swapped in whole ---

def aside_of(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.old"


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
