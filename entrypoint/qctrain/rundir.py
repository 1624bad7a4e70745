"""The run folder (output.dir): the names under it (RunDir), the manifest reader, one run at a time in it (a
lock that a run holds while it writes there), and the clean-up of the temporary files a dead run left.

The lock is an flock on `<output.dir>/.qctrain.lock`, held by the run's main process (the ranks of one
distributed run are one run) and removed when the run ends. The kernel drops the flock when that process
ends, however it ends, so a lock file left by a dead run never blocks; its content (host, pid, start
time) only names the holder.
"""

import fcntl
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from qctrain.atomic import read_json_object
from qctrain.errors import InputError
from qctrain.recipe import Recipe

LOCK_NAME = ".qctrain.lock"


@dataclass(frozen=True)
class RunDir:
    """Every name under an output.dir (or a staging folder laid out like one)."""

    root: Path
    # Written by export at the end, beside adapter/, and pushed with it (metrics.jsonl grows during training).
    FINAL_FILES: ClassVar[tuple[str, ...]] = ("README.md", "run_manifest.json", "loss.png", "data_report.json")
    PUSHED_FILES: ClassVar[tuple[str, ...]] = (*FINAL_FILES, "metrics.jsonl")

    @property
    def adapter(self) -> Path:
        return self.root / "adapter"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def prepared(self) -> Path:
        return self.root / "prepared"

    @property
    def gguf(self) -> Path:
        return self.root / "gguf"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    @property
    def manifest(self) -> Path:
        return self.root / "run_manifest.json"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def data_report(self) -> Path:
        return self.root / "data_report.json"

    @property
    def card(self) -> Path:
        return self.root / "README.md"

    @property
    def loss_plot(self) -> Path:
        return self.root / "loss.png"

    @property
    def push_record(self) -> Path:
        return self.root / "push.json"

    def read_manifest(self, strict: bool = True) -> dict[str, Any]:
        """run_manifest.json of a finished run, with the recipe in it (InputError if there is none); with
        strict=False whatever it holds, {} when it is missing or broken."""
        if not strict:
            return read_json_object(self.manifest)
        if not self.manifest.is_file():
            raise InputError(f"{self.manifest}: not found; is {self.root} the output.dir of a finished run?")
        manifest = read_json_object(self.manifest)
        if not isinstance(manifest.get("recipe"), dict):
            raise InputError(f"{self.manifest}: not a run manifest of qctrain (no recipe in it)")
        return manifest

    def read_recipe(self) -> Recipe:
        """The recipe the finished run was trained with."""
        try:
            return Recipe.model_validate(self.read_manifest()["recipe"])
        except ValueError as err:
            raise InputError(f"{self.manifest}: not a run manifest of qctrain ({type(err).__name__}: "
                             f"{str(err).splitlines()[0] if str(err) else ''})") from None
# What a crashed run can leave, by writer: export's staging folders, a merge's staging folder, the data
# cache's unfinished folder, atomic JSON and metrics rewrites. (`.adapter.old` is not here: it can be the
# good adapter of an interrupted swap, which atomic.restore_interrupted_swap puts back.)
LEFTOVERS = {".": (".staging-*", ".*.staging-*", ".*.tmp-*", ".*.tmp"), "prepared": (".tmp-*",)}


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


@contextmanager
def hold(output_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold output_dir for this run (a no-op where not enabled: the other ranks of a distributed run).
    Another live run's hold is an InputError naming its host and pid."""
    if not enabled:
        yield
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    path = output_dir / LOCK_NAME
    fd = _lock(path)
    try:
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock goes: a run that opens the path now gets a new file
        os.close(fd)


def _lock(path: Path) -> int:
    """An fd holding the flock of the file at `path`, or InputError if a live run holds it."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise InputError(f"output.dir: {path.parent} is in use by another run ({_holder(path)}); wait for "
                             "it to end or set another output.dir") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder unlinked this file as we opened it: lock the new one


def remove_leftovers(output_dir: Path) -> list[Path]:
    """Remove the temporary files and folders of a dead run (call while holding the lock)."""
    removed = []
    for folder, patterns in LEFTOVERS.items():
        for pattern in patterns:
            for path in sorted((output_dir / folder).glob(pattern)):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
                removed.append(path)
    if removed:
        print(f"removed {len(removed)} temporary file(s) of an earlier run that did not finish: "
              f"{', '.join(p.name for p in removed[:5])}{' ...' if len(removed) > 5 else ''}", flush=True)
    return removed
