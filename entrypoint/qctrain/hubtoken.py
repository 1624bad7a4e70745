"""The Hub token: where it comes from (HF_TOKEN, or HF_TOKEN_FILE naming a mounted secret), what one looks
like, and masking it out of every text qctrain prints or writes."""

import os
import re
from collections.abc import Mapping
from pathlib import Path

from qctrain.errors import InputError

# Hub user access tokens: "hf_" and 34 letters and digits today; 20 or more covers older and test tokens.
TOKEN_PATTERN = re.compile(r"\bhf_[A-Za-z0-9]{20,}\b")


def resolve_token(env: Mapping[str, str] = os.environ) -> str | None:
    """HF_TOKEN, else the contents of the file named by HF_TOKEN_FILE (a mounted Secret), else None."""
    if token := env.get("HF_TOKEN", "").strip():
        return token
    path = env.get("HF_TOKEN_FILE", "").strip()
    if not path:
        return None
    try:
        token = Path(path).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) else "not a text file"
        raise InputError(f"HF_TOKEN_FILE={path} cannot be read: {reason}") from None
    if not token:
        raise InputError(f"HF_TOKEN_FILE={path} is empty")
    return token


def known_tokens(env: Mapping[str, str] = os.environ) -> list[str]:
    """The token values this process can see (HF_TOKEN and HF_TOKEN_FILE's), for masking; never raises."""
    try:
        from_file = Path(env["HF_TOKEN_FILE"]).read_text(encoding="utf-8").strip()
    except (KeyError, OSError, UnicodeDecodeError):
        from_file = ""
    return [t for t in (env.get("HF_TOKEN", "").strip(), from_file) if t]


def redact(text: str, token: str | None = None, env: Mapping[str, str] = os.environ) -> str:
    """`text` with the given token, the environment's tokens and anything shaped like a Hub token masked."""
    for known in [token, *known_tokens(env)] if token else known_tokens(env):
        text = text.replace(known, "***")
    return TOKEN_PATTERN.sub("hf_***", text)
