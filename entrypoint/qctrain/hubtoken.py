"""The Hub token: where it comes from (HF_TOKEN, or HF_TOKEN_FILE naming a mounted secret). Masking it (and every
other secret) out of what qctrain prints or writes is secretmask's; `redact` is its name for the Hub code."""

import os
from collections.abc import Mapping
from pathlib import Path

from qctrain.atomic import read_regular
from qctrain.errors import InputError
from qctrain.secretmask import MAX_SECRET_FILE_BYTES, TOKEN_PATTERN, mask

__all__ = ["TOKEN_PATTERN", "redact", "resolve_token"]


def resolve_token(env: Mapping[str, str] = os.environ) -> str | None:
    """HF_TOKEN, else the contents of the file named by HF_TOKEN_FILE (a mounted Secret), else None."""
    if token := env.get("HF_TOKEN", "").strip():
        return token
    path = env.get("HF_TOKEN_FILE", "").strip()
    if not path:
        return None
    try:
        token = read_regular(Path(path), MAX_SECRET_FILE_BYTES).decode("utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        reason = (err.strerror or str(err)) if isinstance(err, OSError) else "not a text file"
        raise InputError(f"HF_TOKEN_FILE={path} cannot be read: {reason}") from None
    if not token:
        raise InputError(f"HF_TOKEN_FILE={path} is empty")
    return token


def redact(text: str, token: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    """`text` with the given token and every secret secretmask knows masked."""
    return mask(text, (token,), env)
