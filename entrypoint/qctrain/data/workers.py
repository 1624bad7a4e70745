"""Forked workers for the data stage, and everything forking needs, in one place: how many (QCTRAIN_PREP_WORKERS,
else one per usable core, none for small inputs), the job they read (inherited at the fork, never pickled: `job()`),
the environment (tokenizers on one thread each, quiet about the fork), the garbage collector (the objects alive at
the fork out of its view), the signals (workers leave them to this process and die with it; the pool is started and
stopped where no stop signal interrupts) and the pipes (1 MiB: a chunk passes in one write)."""

import contextlib
import fcntl
import gc
import multiprocessing
import multiprocessing.pool
import os
from collections.abc import Iterator
from typing import Any

from qctrain.errors import InputError

PREP_WORKERS_ENV = "QCTRAIN_PREP_WORKERS"  # worker processes for tokenizing; default: one per usable core
CHUNK_RECORDS = 512  # records rendered and encoded per task: small, so no worker idles long at the end
MIN_RECORDS_PER_WORKER = 4096  # below this, forking costs more than it saves
PIPE_BYTES = 1 << 20  # the workers' pipes (Linux's pipe-max-size by default)

_JOB: Any = None  # what the workers of the pool being started read (job())
_forking = 0  # depth of forking() sections: only the outermost sets up and restores


def prep_workers(records: int, per_task: int = CHUNK_RECORDS) -> int:
    """Worker processes for tokenizing `records` in tasks of `per_task`: QCTRAIN_PREP_WORKERS, else one per usable
    core, and none (in process) for small inputs or where fork is not available."""
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
    return max(1, min(wanted, -(-records // per_task)))


def job() -> Any:
    """In a worker: the job its pool was started with."""
    return _JOB


@contextlib.contextmanager
def forking() -> Iterator[None]:
    """A section that may fork workers: tokenizers run on one thread in each (TOKENIZERS_PARALLELISM=false, which
    also keeps them quiet about the fork), and the objects alive now leave the garbage collector's view (its full
    collections walked them all again, some 15 us a record in the workers, and forked workers stop copying their
    pages when it touches them). Both as they were after the outermost section."""
    global _forking
    if _forking:
        _forking += 1
        try:
            yield
        finally:
            _forking -= 1
        return
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _forking = 1
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        _forking = 0
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


@contextlib.contextmanager
def pool(workers: int, shared: Any = None) -> Iterator[multiprocessing.pool.Pool]:
    """A pool of `workers` forked processes that read `shared` through job(), leave SIGTERM/SIGINT to this process
    and die with it (signals.worker_init), started and stopped where no stop signal interrupts (signals.critical):
    a signal ends the command at once, with no worker left behind and no traceback from one."""
    from qctrain.signals import critical, worker_init

    global _JOB
    previous, _JOB = _JOB, shared
    try:
        with forking():
            with critical():
                started = multiprocessing.get_context("fork").Pool(workers, initializer=worker_init,
                                                                   initargs=(os.getpid(),))
            try:
                _widen_pipes(started)
                yield started
            finally:
                with critical():
                    started.terminate()
    finally:
        _JOB = previous


def _widen_pipes(started: multiprocessing.pool.Pool) -> None:
    """The pool's pipes at 1 MiB instead of 64 KiB (Linux; where refused, left as they are): a chunk's records
    and its tokens then pass in one write, not in a dozen handoffs between the main process's threads, which
    left the workers idle some 7 ms a chunk (measured: their idle time 0.75 -> 0.42 s per 100k records).
    Pool keeps its pipes private (private_api.POOL_PIPES)."""
    set_size = getattr(fcntl, "F_SETPIPE_SZ", None)
    for queue in (getattr(started, "_inqueue", None), getattr(started, "_outqueue", None)):
        writer = getattr(queue, "_writer", None)
        if set_size is None or writer is None:
            continue
        try:
            fcntl.fcntl(writer.fileno(), set_size, PIPE_BYTES)
        except (OSError, ValueError):
            pass
