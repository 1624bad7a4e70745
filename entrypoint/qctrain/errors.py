"""Exit codes and the one error type every stage raises for bad input.

The codes are part of the interface: the Kubernetes Job's podFailurePolicy and CI read them.
"""

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1  # a bug or an unexpected library failure (traceback with --debug)
    BAD_INPUT = 2  # recipe, data, template, paths, too little free disk: fix the input, retrying will not help
    ENVIRONMENT = 3  # the machine cannot run this: broken CUDA/bitsandbytes stack
    NOT_PUSHED = 4  # training finished and outputs are complete locally, the Hub push failed
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


class Preempted(QcError):
    exit_code = ExitCode.PREEMPTED


def shorten(text: str, limit: int = 60) -> str:
    """text cut to `limit` characters: an error line stays short whatever it quotes."""
    return text if len(text) <= limit else f"{text[:limit - 1]}…"
