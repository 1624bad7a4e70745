"""The run folder (output.dir): the names under it (RunDir), the manifest reader, which folders a run may write
into (claim), one run at a time in it (a lock that a run holds while it writes there), and the clean-up of the
temporary files a dead run left.

A run writes only into a folder of its own: a new or empty one (a fresh volume's lost+found aside), or one an
earlier run wrote (recognised by the marker file `.qctrain-run` written at first use, or, for folders of older
versions, by their manifest, checkpoints or prepared data). `/`, system folders and the home folder are refused,
and so is a folder holding anything else, before anything is written. Inside it, a run changes only what it
creates.

The lock is an flock on `<output.dir>/.qctrain.lock`, held by the run's main process (the ranks of one
distributed run are one run) and removed when the run ends. The kernel drops the flock when that process
ends, however it ends, so a lock file left by a dead run never blocks; its content (host, pid, start
time) only names the holder. A filesystem that cannot lock (NFS without lockd, some CIFS and FUSE mounts) is
named as such; QCTRAIN_NO_LOCK=1 runs without the lock there.
"""

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from qctrain import __version__
from qctrain.atomic import read_json_object, swap_in_folder, write_json_atomic
from qctrain.console import say
from qctrain.errors import InputError, disk_errno
from qctrain.recipe import Recipe

LOCK_NAME = ".qctrain.lock"
MARKER_NAME = ".qctrain-run"  # written at first use: this folder is a qctrain run folder


@dataclass(frozen=True)
class RunDir:
    """Every name under an output.dir (or a staging folder laid out like one)."""

    root: Path
    # Written by the outputs writer at the end, beside adapter/, and pushed with it (metrics.jsonl grows during
    # training).
    FINAL_FILES: ClassVar[tuple[str, ...]] = ("README.md", "run_manifest.json", "loss.png", "data_report.json")
    PUSHED_FILES: ClassVar[tuple[str, ...]] = (*FINAL_FILES, "metrics.jsonl")

    @classmethod
    def of(cls, recipe: Recipe) -> "RunDir":
        """The run folder a recipe names (output.dir)."""
        return cls(Path(recipe.output.dir))

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

    @property
    def marker(self) -> Path:
        return self.root / MARKER_NAME

    @property
    def staging(self) -> Path:
        """Where this process writes the final outputs before they move into place (swap_in_outputs)."""
        return self.root / f".staging-{os.getpid()}"

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



def swap_in_outputs(staged: RunDir, final: RunDir) -> None:
    """Move the outputs written into `staged` into place; a good old adapter is only replaced by a whole new one."""
    swap_in_folder(staged.adapter, final.adapter)
    if staged.gguf.is_dir():
        swap_in_folder(staged.gguf, final.gguf)
    # run_manifest.json last: its presence says the outputs beside it are complete (checkpoint.ResumePlan)
    for name in sorted(RunDir.FINAL_FILES, key=lambda name: name == "run_manifest.json"):
        if (staged.root / name).exists():
            os.replace(staged.root / name, final.root / name)
    shutil.rmtree(staged.root, ignore_errors=True)


# --- which folders a run may write into ---

# Refused with everything under them (the operating system's own trees), and refused as themselves (folders that
# hold other people's things; a folder inside them is fine where it holds nothing foreign).
SYSTEM_TREES = ("/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/boot", "/dev", "/proc",
                "/sys", "/run", "/var")
SYSTEM_EXCEPT = ("/var/tmp",)  # scratch space inside a system tree
SYSTEM_FOLDERS = ("/", "/home", "/root", "/tmp", "/mnt", "/media", "/opt", "/srv")
NOT_FOREIGN = ("lost+found",)  # a fresh filesystem's own folder (a new volume mounted at output.dir)
# The temporary names our writers use (atomic.write_json_atomic, the outputs', merge's and GGUF's staging folders,
# checkpoint.trim_metrics, the data cache): the only leftovers the start of a run removes, and only in these folders
# of a run folder.
ROOT_FILES = (*RunDir.PUSHED_FILES, "push.json")
LEFTOVERS = {
    ".": re.compile(r"\.staging-\d+|\.(merged|gguf)\.staging-\d+|\.metrics\.jsonl\.tmp"
                    rf"|\.({'|'.join(re.escape(name) for name in ROOT_FILES)})\.tmp-\d+"),
    "prepared": re.compile(r"\.tmp-[0-9a-f]{16}-\d+"),
}
OWN_NAMES = frozenset({*ROOT_FILES, "adapter", "checkpoints", "prepared", "gguf", "merged", ".adapter.old",
                       ".gguf.old", ".merged.old", LOCK_NAME, MARKER_NAME})


def _inside(path: Path, folder: str) -> bool:
    return path == Path(folder) or Path(folder) in path.parents


def _homes() -> set[Path]:
    homes = {Path(os.path.realpath(Path.home()))}
    with contextlib.suppress(KeyError, ImportError):
        import pwd

        homes.add(Path(os.path.realpath(pwd.getpwuid(os.getuid()).pw_dir)))
    return homes


def system_folder_problem(output_dir: Path) -> str | None:
    """output.dir is / , a system folder (or inside one) or the home folder itself, also through symbolic links."""
    real = Path(os.path.realpath(output_dir))
    shown = f"{output_dir}" + (f" (that is {real})" if real != Path(os.path.abspath(output_dir)) else "")
    if real in _homes():
        return f"output.dir: {shown} is the home folder; use a folder of its own, e.g. {real / 'qctrain-out'}"
    if str(real) in SYSTEM_FOLDERS or (any(_inside(real, tree) for tree in SYSTEM_TREES)
                                       and not any(_inside(real, ok) for ok in SYSTEM_EXCEPT)):
        return f"output.dir: {shown} is a system folder; use a folder of its own"
    return None


def _recognised(root: Path) -> bool:
    """Written by a qctrain run: our marker, or (a run folder of a version before the marker) its manifest, a
    checkpoint or a prepared data set."""
    run = RunDir(root)
    if run.marker.is_file():
        return True
    manifest = read_json_object(run.manifest)
    if "qctrain_version" in manifest and isinstance(manifest.get("recipe"), dict):
        return True
    with contextlib.suppress(OSError):
        if any((p / "qctrain_checkpoint.json").is_file() for p in run.checkpoints.iterdir()):
            return True
    with contextlib.suppress(OSError):
        if any((p / "report.json").is_file() for p in run.prepared.iterdir()):
            return True
    return False


def foreign_entries(root: Path, limit: int = 3) -> list[str]:
    """Up to `limit` names in `root` that no qctrain run writes ([] for a run folder, recognised or not)."""
    found = []
    with os.scandir(root) as entries:
        for entry in entries:
            if entry.name in OWN_NAMES or entry.name in NOT_FOREIGN or LEFTOVERS["."].fullmatch(entry.name):
                continue
            found.append(entry.name)
            if len(found) >= limit:
                break
    return found


def output_dir_problem(output_dir: Path) -> str | None:
    """Why a run may not write into output.dir (None: it may): a system folder or the home folder, or a folder
    holding files that no qctrain run wrote. Reads only; `check` and every writing command ask it first."""
    if problem := system_folder_problem(output_dir):
        return problem
    if not output_dir.is_dir():
        return None  # to be created (or not a folder: preflight says so)
    try:
        foreign = foreign_entries(output_dir)
    except OSError as err:
        return f"output.dir: {output_dir} cannot be listed ({err.strerror})"
    if foreign and not _recognised(output_dir):
        shown = ", ".join(foreign) + (", ..." if len(foreign) >= 3 else "")
        return (f"output.dir: {output_dir} is not empty and not a qctrain run folder (it holds {shown}); use a new "
                "or empty folder: a run writes only into a folder of its own")
    return None


def claim(output_dir: Path) -> None:
    """Make output.dir this run's folder: refused (InputError) before anything is written when
    output_dir_problem says so; created (0755: others may read the outputs) if missing; a new or empty folder is
    marked as ours (a run folder of an earlier version is left as it is: it is recognised without the marker)."""
    if problem := output_dir_problem(output_dir):
        raise InputError(problem)
    if output_dir.exists() and not output_dir.is_dir():
        raise InputError(f"output.dir: {output_dir} is a file, not a folder")
    if not output_dir.is_dir():
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            if disk_errno(err) is not None:
                raise  # a full or read-only disk: exit 74, named as such
            raise InputError(f"output.dir: {output_dir} cannot be created ({err.strerror})") from None
        output_dir.chmod(0o755)  # the folder is ours: whatever the umask, a server under another uid reaches it
    if all(entry.name in NOT_FOREIGN for entry in os.scandir(output_dir)):
        write_json_atomic(RunDir(output_dir).marker, {
            "qctrain_run_folder": 1, "created_by": f"qctrain {__version__}",
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}, shared=True)


# --- one run at a time ---

NO_LOCK_ENV = "QCTRAIN_NO_LOCK"  # "1": run without the lock, on a filesystem that cannot lock files
BUSY_ERRNOS = (errno.EWOULDBLOCK, errno.EAGAIN)  # flock's "held by another"; any other errno: cannot lock


def _holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
        return f"host {holder['host']}, pid {holder['pid']}, started {holder['started']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "holder unknown"


@contextmanager
def hold(output_dir: Path, enabled: bool = True) -> Iterator[None]:
    """Hold output_dir for this run (a no-op where not enabled: the other ranks of a distributed run): claim
    it, lock it, and remove what a dead run left there. Another live run's hold is an InputError naming its
    host and pid."""
    if not enabled:
        yield
        return
    claim(output_dir)
    path = output_dir / LOCK_NAME
    if os.environ.get(NO_LOCK_ENV, "").strip() == "1":
        say(f"qctrain: warning: {NO_LOCK_ENV}=1: {output_dir} is not locked; make sure no other run uses it\n")
        remove_leftovers(output_dir)
        yield
        return
    fd = _lock(path)
    try:
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        remove_leftovers(output_dir)
        yield
    finally:
        path.unlink(missing_ok=True)  # before the lock goes: a run that opens the path now gets a new file
        os.close(fd)


def _lock(path: Path) -> int:
    """An fd holding the flock of the file at `path`; InputError if a live run holds it, or if the filesystem
    cannot lock files at all (NFS without lockd, some CIFS and FUSE mounts)."""
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno in BUSY_ERRNOS:
                raise InputError(f"output.dir: {path.parent} is in use by another run ({_holder(path)}); wait for "
                                 "it to end or set another output.dir") from None
            path.unlink(missing_ok=True)  # no run can hold a lock here: the file only stood for one
            name = errno.errorcode.get(err.errno or 0, str(err.errno))
            raise InputError(f"output.dir: {path.parent} is on a filesystem that cannot lock files (flock: {name}, "
                             f"{err.strerror}); put output.dir on a local disk or a filesystem with locking, or set "
                             f"{NO_LOCK_ENV}=1 to run without the lock (then no other run may use this folder)"
                             ) from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder unlinked this file as we opened it: lock the new one


def remove_leftovers(output_dir: Path) -> list[Path]:
    """Remove the temporary files and folders a dead run left, by our own names in our own folders (LEFTOVERS);
    call while holding the lock."""
    removed = []
    for folder, pattern in LEFTOVERS.items():
        try:
            names = sorted(entry.name for entry in os.scandir(output_dir / folder) if pattern.fullmatch(entry.name))
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            path = output_dir / folder / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        print(f"removed {len(removed)} temporary file(s) of an earlier run that did not finish: "
              f"{', '.join(p.name for p in removed[:5])}{' ...' if len(removed) > 5 else ''}", flush=True)
    return removed
