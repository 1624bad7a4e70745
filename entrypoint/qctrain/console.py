"""qctrain's own lines on stderr: one system call per message, so the lines of parallel ranks never
interleave, with every secret (secretmask) a library or an input put into a message masked first."""

import contextlib
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
