"""qctrain's own lines on stderr: one system call per message, so the lines of parallel ranks never
interleave, with every secret (secretmask) a library or an input put into a message masked first."""

import contextlib
import logging
import os
import sys

from qctrain.secretmask import mask


def say(text: str) -> None:
    """Write `text` (whole lines, newline included) to stderr."""
    text = mask(text)
    with contextlib.suppress(RuntimeError, OSError, ValueError):  # in a signal handler: a reentrant flush
        sys.stderr.flush()
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (AttributeError, OSError, ValueError):  # a captured stderr (tests) has no file descriptor
        sys.stderr.write(text)


class SayHandler(logging.Handler):
    """Log records as `say` lines: masked, one write each, to whatever stderr is when the record comes (a
    handler holding the stream it was made with would outlive a replaced or closed one)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            say(self.format(record) + "\n")
        except Exception:  # noqa: BLE001 - logging's own contract: report, never raise
            self.handleError(record)


def log_to_stderr(logger: logging.Logger, fmt: str) -> None:
    """`logger` writes through one SayHandler with this format (set up again on every call, never twice)."""
    for handler in [h for h in logger.handlers if isinstance(h, SayHandler)]:
        logger.removeHandler(handler)
    handler = SayHandler()
    handler.setFormatter(logging.Formatter(fmt))
    logger.addHandler(handler)
