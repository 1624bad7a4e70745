"""Secrets: which values are secret, and masking them out of every text qctrain prints or writes.

A secret is the value of an environment variable whose name says so (a word TOKEN, SECRET, PASSWORD,
PASSWD, PASSPHRASE, KEY, APIKEY, CREDENTIAL(S), or a word ending in TOKEN/KEY/SECRET/PASSWORD: HF_TOKEN,
WANDB_API_KEY, MLFLOW_TRACKING_PASSWORD, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN...), the contents of the
file a *_FILE or *_PATH twin of such a name points at (HF_TOKEN_FILE, a mounted Secret), the Hub's own
token file, anything shaped like a Hub token (hf_..., api_org_...) and the credentials in a URL
(https://user:pass@host). Values are matched literally, wherever they stand in a line, not by word.

One mechanism for every way out: the console (`say`), the CLI's stdout and stderr (`masked_streams`), JSON
files (atomic.write_json_atomic), model cards, metrics and Hub commit messages all call `mask`; the
recipe loader refuses a recipe that holds a secret (`find_secret`), since recipe values also reach places
no mask covers (a tracker's run name).
"""

import contextlib
import functools
import json
import os
import re
import stat
import sys
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

MASK = "***"
MIN_SECRET_CHARS = 6  # shorter values (flags such as HF_HUB_DISABLE_IMPLICIT_TOKEN=1) are not masked
MAX_SECRET_FILE_BYTES = 64 << 10  # a token or key file; a bigger file is not a secret we could match whole

SECRET_WORDS = frozenset({"TOKEN", "SECRET", "SECRETS", "PASSWORD", "PASSWD", "PASSPHRASE", "KEY", "APIKEY",
                          "CREDENTIAL", "CREDENTIALS"})
SECRET_SUFFIXES = ("TOKEN", "KEY", "SECRET", "PASSWORD")  # HFTOKEN, APIKEY, CLIENTSECRET
FILE_WORDS = frozenset({"FILE", "PATH"})  # HF_TOKEN_FILE=/run/secrets/token: the file holds the secret

# Hub user access tokens ("hf_" and 34 letters today; 20 or more covers older and test tokens) and the old
# organisation API tokens, anywhere in a text: run_hf_XXXX is as much a leak as hf_XXXX alone.
TOKEN_PATTERN = re.compile(r"(hf_|api_org_)[A-Za-z0-9]{20,}")
# user:password@ (or a token as user@) in a URL: https://x-access-token:ghs_XXXX@github.com/... The lookbehind
# starts a match only where a scheme can start (linear in a long run of letters, such as hex digests).
URL_CREDENTIALS = re.compile(r"(?<![A-Za-z0-9+.-])([A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")


@functools.cache
def is_secret_name(name: str) -> bool:
    """Whether an environment variable of this name holds a secret (or, named *_FILE/*_PATH, points at one)."""
    words = [w for w in re.split(r"[^A-Z0-9]+", name.upper()) if w]
    if words and words[-1] in FILE_WORDS:
        words = words[:-1]
    return any(w in SECRET_WORDS or w.endswith(SECRET_SUFFIXES) for w in words)


def _holds_a_path(name: str) -> bool:
    return name.upper().rsplit("_", 1)[-1] in FILE_WORDS


_file_cache: dict[str, tuple[tuple[int, int, int], str]] = {}


def read_secret_file(path: str) -> str:
    """The stripped text of a regular file of at most MAX_SECRET_FILE_BYTES ("" otherwise: a FIFO, a device,
    a folder, a missing or unreadable file). Never blocks: opened non-blocking, checked before reading."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError):
        return ""
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_SECRET_FILE_BYTES:
            return ""
        key = (info.st_ino, info.st_size, info.st_mtime_ns)
        cached = _file_cache.get(path)
        if cached is not None and cached[0] == key:
            return cached[1]
        text = os.read(fd, MAX_SECRET_FILE_BYTES + 1).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    finally:
        os.close(fd)
    _file_cache[path] = (key, text)
    return text


def hub_token_file(env: Mapping[str, str]) -> str:
    """Where huggingface_hub keeps a token saved by `hf auth login` (HF_TOKEN_PATH is covered by its name)."""
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                                              "huggingface")
    return os.path.join(home, "token")


def known_secrets(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Secret value -> where it came from (a variable's name, or NAME's file), longest value first."""
    env = os.environ if env is None else env
    found: dict[str, str] = {}
    for name, value in list(env.items()):
        if not is_secret_name(name):
            continue
        if _holds_a_path(name):
            found.setdefault(read_secret_file(value.strip()), f"the file {name} names")
        else:
            found.setdefault(value, name)
            found.setdefault(value.strip(), name)
    found.setdefault(read_secret_file(hub_token_file(env)), "the Hub token file")
    return {v: found[v] for v in sorted(found, key=len, reverse=True) if len(v) >= MIN_SECRET_CHARS}


def mask(text: str, extra: Iterable[str | None] = (), env: Mapping[str, str] | None = None) -> str:
    """`text` with every known secret (and `extra` values) replaced by ***, token-shaped strings by hf_***
    (api_org_***) and URL credentials by ***@."""
    for value in [*(v for v in extra if v and len(v) >= MIN_SECRET_CHARS), *known_secrets(env)]:
        if value in text:
            text = text.replace(value, MASK)
    if _may_hold_token(text):
        text = TOKEN_PATTERN.sub(lambda m: m.group(1) + MASK, text)
    if _may_hold_url(text):
        text = URL_CREDENTIALS.sub(lambda m: m.group(1) + MASK + "@", text)
    return text


# Substring tests (memchr speed) before the patterns: most texts, and megabytes of JSON, hold neither.
def _may_hold_token(text: str) -> bool:
    return "hf_" in text or "api_org_" in text


def _may_hold_url(text: str) -> bool:
    return "://" in text and "@" in text


def _escaped(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)[1:-1]


def mask_json_text(value: Any, text: str, env: Mapping[str, str] | None = None) -> Any:
    """`value` with secrets masked in every string (keys included), if `text` (its JSON) shows one; else
    `value` itself (the common case costs one scan of the text per secret)."""
    secrets = known_secrets(env)
    if not (any(s in text or _escaped(s) in text for s in secrets)
            or (_may_hold_token(text) and TOKEN_PATTERN.search(text))
            or (_may_hold_url(text) and URL_CREDENTIALS.search(text))):
        return value
    return mask_value(value, env)


def mask_value(value: Any, env: Mapping[str, str] | None = None) -> Any:
    """A JSON-like value with secrets masked in every string, keys included."""
    if isinstance(value, str):
        return mask(value, env=env)
    if isinstance(value, dict):
        return {mask_value(k, env) if isinstance(k, str) else k: mask_value(v, env) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [mask_value(v, env) for v in value]
    return value


def find_secret(text: str, env: Mapping[str, str] | None = None) -> str | None:
    """What makes `text` secret (the variable whose value it holds, or "a Hub token"), None if nothing."""
    for value, source in known_secrets(env).items():
        if value in text:
            return source
    return "a Hub token" if _may_hold_token(text) and TOKEN_PATTERN.search(text) else None


class MaskedStream:
    """A text stream whose writes pass through `mask` (everything else is the wrapped stream's)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(mask(text))
        return len(text)

    def writelines(self, lines: Iterable[str]) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


@contextlib.contextmanager
def masked_streams() -> Iterator[None]:
    """sys.stdout and sys.stderr masked for the duration (what print, logging and tracebacks write)."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = (s if s is None or isinstance(s, MaskedStream) else MaskedStream(s) for s in saved)
    try:
        yield
    finally:
        sys.stdout, sys.stderr = saved


def write_text(path: Path, text: str) -> None:
    """path.write_text(mask(text)): a card or note that might quote a secret."""
    path.write_text(mask(text), encoding="utf-8")
