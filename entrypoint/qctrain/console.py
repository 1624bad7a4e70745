"""qctrain's own lines on stderr: one system call per message, so the lines of parallel ranks never
interleave, with any Hub token a library put into a message masked first."""

import sys

from qctrain.hubtoken import redact


def say(text: str) -> None:
    """Write `text` (whole lines, newline included) to stderr."""
    text = redact(text)
    sys.stderr.flush()
    try:
        import os

        os.write(sys.stderr.fileno(), text.encode())
    except (AttributeError, OSError, ValueError):  # a captured stderr (tests) has no file descriptor
        sys.stderr.write(text)
