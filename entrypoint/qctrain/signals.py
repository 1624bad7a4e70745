"""SIGTERM/SIGINT: every command and every stage stops the same way, with one line, exit 75 and nothing left running.

`StopOnSignal` is installed by cli.main for the whole command. Where nothing is worth saving (preflight, data,
model load, push) a signal raises Preempted at once, and each stage's own clean-up runs as it unwinds (the data
cache's temporary folder is removed, a worker pool is terminated). While `defer` is set (training, export) a
signal only records itself: PreemptionCallback (train.py) stops training after the current optimizer step and
saves a checkpoint. A second signal never interrupts anything and never prints a traceback.

An exception raised from a signal handler lands wherever the main thread is: `critical()` marks the few places
where that would leave things broken (a worker pool being started or stopped: its threads' bookkeeping); a signal
there raises at the end of the section instead.

Processes forked by the data stage call `worker_init` first: they leave the signals to their parent (which
terminates the pool) and die with it, however it ends (Linux: PR_SET_PDEATHSIG).
"""

import contextlib
import ctypes
import os
import signal
import sys
from collections.abc import Iterator
from typing import Any

from qctrain.console import say
from qctrain.errors import Preempted

SIGNALS = (signal.SIGTERM, signal.SIGINT)
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
_active: list["StopOnSignal"] = []  # the installed handler, innermost last


class StopOnSignal:
    """The command's SIGTERM/SIGINT handler (see the module docstring). `stage` says, in the message, where a
    signal that raises at once stopped the command."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.defer = False
        self.stage = "before training started; nothing to save"
        self._previous: dict[int, Any] = {}
        self._critical = 0
        self._pending = False  # a signal came inside a critical section: raise at its end

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "signal"

    def __enter__(self) -> "StopOnSignal":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        _active.append(self)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
        with contextlib.suppress(ValueError):
            _active.remove(self)

    def release(self) -> None:
        """The command is over: the previous handlers come back, unless a stop signal came. Then the process is on
        its way out with exit 75, and further signals are ignored: a launcher's follow-up SIGTERM (torchrun sends
        one to every worker once one has exited) or a second Ctrl-C must not turn that into death by signal."""
        if self.signum is None:
            self.__exit__()
            return
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)
        self._previous.clear()
        with contextlib.suppress(ValueError):
            _active.remove(self)

    def interrupt_now(self) -> None:
        """From here on a signal raises at once (after training and export: the push, the exit); one that came
        while deferred raises now."""
        self.defer = False
        if self.signum is not None:
            raise Preempted(self._message())

    def _message(self) -> str:
        return f"stopped by {self.name} {self.stage}; rerun the same command to continue"

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            if self.defer:
                say(f"qctrain: {signal.Signals(signum).name} again: already stopping, the checkpoint is being "
                    "saved\n")
            return  # already unwinding: the first signal's line is the one that counts
        self.signum = signum
        if not self.defer:
            if self._critical:
                self._pending = True  # raised as the critical section ends
                return
            raise Preempted(self._message())
        say(f"qctrain: {self.name} received: finishing the current step, saving a checkpoint, then exiting 75\n")


@contextlib.contextmanager
def critical() -> Iterator[None]:
    """A section no stop signal interrupts: one that comes inside raises as it ends (where it would have raised)."""
    stop = _active[-1] if _active else None
    if stop is None:
        yield
        return
    stop._critical += 1
    try:
        yield
    finally:
        stop._critical -= 1
        if not stop._critical and stop._pending:
            stop._pending = False
            if not stop.defer:
                raise Preempted(stop._message())


def worker_init(parent: int) -> None:
    """First thing in a forked worker: SIGTERM kills it (the pool's terminate), SIGINT is its parent's to handle
    (a terminal sends it to the whole process group), and it dies with the parent."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)
