"""Exit codes, the one error type every stage raises for bad input, and what a failed write means.

The codes are part of the interface: the Kubernetes Job's podFailurePolicy and CI read them.
"""

import contextlib
import errno
import os
import shutil
from collections.abc import Iterator
from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1  # a bug or an unexpected library failure (traceback with --debug)
    BAD_INPUT = 2  # recipe, data, template, paths, too little free disk: fix the input, retrying will not help
    ENVIRONMENT = 3  # the machine cannot run this: broken CUDA/bitsandbytes stack, or another rank was lost
    NOT_PUSHED = 4  # training finished and outputs are complete locally, the Hub push failed
    NOT_BETTER = 5  # trained and evaluated, outputs complete locally; evaluate.gate refused the push (if_better)
    DISK_FULL = 74  # a write failed: no space left, quota exceeded or read-only (EX_IOERR); free space, then rerun
    PREEMPTED = 75  # stopped by SIGTERM/SIGINT after saving a checkpoint: rerun to resume (EX_TEMPFAIL)


class QcError(Exception):
    """An error the user can act on: printed as one line, no traceback unless --debug."""

    exit_code = ExitCode.BAD_INPUT

    def __init__(self, message: str, exit_code: ExitCode | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class InputError(QcError):
    """Bad recipe, data, template or path (exit 2)."""


class PushFailed(QcError):
    exit_code = ExitCode.NOT_PUSHED


class NotBetter(QcError):
    """The tuned model is worse than its base beyond evaluate.gate's tolerance: nothing pushed (exit 5)."""

    exit_code = ExitCode.NOT_BETTER


class Preempted(QcError):
    exit_code = ExitCode.PREEMPTED


def shorten(text: str, limit: int = 60) -> str:
    """text cut to `limit` characters: an error line stays short whatever it quotes."""
    return text if len(text) <= limit else f"{text[:limit - 1]}…"


class DiskFull(QcError):
    """A write failed for want of space, quota or a writable filesystem (exit 74)."""

    exit_code = ExitCode.DISK_FULL


# --- a failed write: ENOSPC, EDQUOT, EROFS wherever they come from ---

DISK_ERRNOS = {errno.ENOSPC: "no space left on the device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "the filesystem is read-only"}
PROBE_BYTES = 1 << 20  # written (and removed) to learn whether a failed write's filesystem takes data


def _chain(err: BaseException) -> Iterator[BaseException]:
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def disk_errno(err: BaseException) -> int | None:
    """ENOSPC, EDQUOT or EROFS behind `err`: an OSError in its chain, or the system's text for one in a message
    (safetensors and pyarrow wrap the OSError in their own error and keep only its text)."""
    for link in _chain(err):
        if isinstance(link, OSError) and link.errno in DISK_ERRNOS:
            return link.errno
        text = str(link)
        for code in DISK_ERRNOS:
            if os.strerror(code) in text or f"os error {code})" in text:
                return code
    return None


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def probe_errno(folder: Path) -> int | None:
    """ENOSPC, EDQUOT or EROFS when a small file cannot be written (and fsynced) in `folder` now: what a write
    failed for where the library's error lost the errno (torch.save says only "unexpected pos")."""
    folder = _nearest_existing(folder)
    path = folder / f".qctrain-probe-{os.getpid()}"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        return err.errno if err.errno in DISK_ERRNOS else None
    try:
        os.write(fd, b"\0" * PROBE_BYTES)
        os.fsync(fd)
    except OSError as err:
        return err.errno if err.errno in DISK_ERRNOS else None
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
    return None


def disk_full(err: BaseException, path: Path | str | None = None, needed: int | None = None,
              probe: bool = False) -> DiskFull | None:
    """The one-line DiskFull for a failed write (None: it failed for another reason). `path`: where it wrote, if
    the writer knows (else the error's own filename); `needed`: about how many bytes it needed, if known;
    `probe`: where the error carries no errno, try a small write there to learn whether the disk is the cause."""
    code = disk_errno(err)
    where = Path(path) if path is not None else None
    if where is None:
        filename = next((link.filename for link in _chain(err) if isinstance(link, OSError) and link.filename), None)
        where = Path(os.fsdecode(filename)) if filename is not None else None
    if code is None and probe and where is not None:
        code = probe_errno(where if where.is_dir() else where.parent)
    if code is None:
        return None
    facts = []
    if where is not None and code != errno.EROFS:
        with contextlib.suppress(OSError):
            facts.append(f"{shutil.disk_usage(_nearest_existing(where)).free / 2**20:,.0f} MiB free there")
    if needed:
        facts.append(f"about {needed / 2**20:,.0f} MiB needed")
    shown = f" writing {where}" if where is not None else ""
    fix = ("make it writable or set output.dir elsewhere" if code == errno.EROFS
           else "free some space (or raise the quota) or set output.dir elsewhere")
    return DiskFull(f"{DISK_ERRNOS[code]} ({errno.errorcode[code]}){shown}"
                    + (f" ({', '.join(facts)})" if facts else "")
                    + f"; {fix}, then rerun the same command: it resumes from the last complete checkpoint")


@contextlib.contextmanager
def writing(path: Path, needed: int | None = None) -> Iterator[None]:
    """Around a write into `path` (a file or folder): a failure for want of space, quota or a writable filesystem
    becomes DiskFull naming it, whatever library wrapped the OSError."""
    try:
        yield
    except QcError:
        raise
    except Exception as err:
        fault = disk_full(err, path, needed, probe=True)
        if fault is None:
            raise
        raise fault from err
