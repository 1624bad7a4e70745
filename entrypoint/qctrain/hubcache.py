"""The base model's files in the Hugging Face cache: what an offline run (HF_HUB_OFFLINE=1) will find there.

Offline, the Hub cannot list a repository's files, so the set a training run reads is derived from what is
cached: config.json, tokenizer_config.json, a tokenizer (tokenizer.json or tokenizer.model) and the weights
(model.safetensors, or the index and every shard it names). A file the Hub recorded as absent (.no_exist)
counts as answered. `qctrain check` reports the first missing file in one line; `qctrain doctor RECIPE`
prints the whole status.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from qctrain.recipe import ModelSection

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
REQUIRED = ("config.json", "tokenizer_config.json")
TOKENIZERS = ("tokenizer.json", "tokenizer.model")


@dataclass
class CacheStatus:
    repo_id: str
    revision: str | None
    cache_dir: str
    paths: dict[str, str] = field(default_factory=dict)  # file -> its cached path
    missing: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return not self.missing

    @property
    def bytes(self) -> int:
        return sum(os.path.getsize(path) for path in self.paths.values())

    @property
    def weight_bytes(self) -> int:
        return sum(os.path.getsize(path) for name, path in self.paths.items() if name.endswith(".safetensors"))


def is_hub_model(cfg: ModelSection) -> bool:
    from qctrain.basemodel.files import model_source

    return not Path(model_source(cfg)).is_dir()


def offline(env: Mapping[str, str] | None = None) -> bool:
    value = (os.environ if env is None else env).get("HF_HUB_OFFLINE", "")
    return value.strip().upper() in ("1", "ON", "YES", "TRUE")


def model_status(cfg: ModelSection) -> CacheStatus:
    """Which of the files a run of `cfg` (a Hub id) reads are in the HF cache."""
    from huggingface_hub import constants, try_to_load_from_cache

    status = CacheStatus(cfg.name, cfg.revision, constants.HF_HUB_CACHE)

    def look(filename: str) -> str | None | bool:
        """The cached path, False when the Hub said the file does not exist, None when it is not cached."""
        found = try_to_load_from_cache(cfg.name, filename, revision=cfg.revision)
        if isinstance(found, str):
            status.paths[filename] = found
            return found
        return None if found is None else False

    for filename in REQUIRED:
        if look(filename) is None:
            status.missing.append(filename)
    tokenizers = [look(name) for name in TOKENIZERS]
    if not any(isinstance(found, str) for found in tokenizers):
        status.missing.append(" or ".join(TOKENIZERS))
    status.missing += _missing_weights(look)
    return status


def _missing_weights(look) -> list[str]:
    index = look(INDEX)
    if isinstance(index, str):
        import json

        try:
            weight_map = json.loads(Path(index).read_text(encoding="utf-8")).get("weight_map", {})
        except (OSError, ValueError):
            return [f"{INDEX} (unreadable)"]
        return [shard for shard in sorted(set(weight_map.values())) if look(shard) is None]
    return [] if isinstance(look(SINGLE), str) else [f"{SINGLE} (or {INDEX} and its shards)"]


def check_offline(cfg: ModelSection, env: Mapping[str, str] | None = None) -> list[str]:
    """With HF_HUB_OFFLINE set and a Hub id: one line naming the first file the cache lacks."""
    if not offline(env) or not is_hub_model(cfg):
        return []
    status = model_status(cfg)
    if status.complete:
        return []
    more = f" (and {len(status.missing) - 1} more)" if len(status.missing) > 1 else ""
    at = f"@{cfg.revision}" if cfg.revision else ""
    return [f"model.name: {cfg.name}{at}: {status.missing[0]}{more} is not in the HF cache ({status.cache_dir}) "
            f"and HF_HUB_OFFLINE=1 forbids downloading it: fill the cache first (hf download {cfg.name}) or unset "
            "HF_HUB_OFFLINE"]
