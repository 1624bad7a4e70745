"""Where the base model is, named so that it resolves from any folder (what an adapter, a card and a GGUF file
record), and its license. No torch: the card and `qctrain push` read it too."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from qctrain.atomic import read_json_object
from qctrain.recipe import ModelSection


@dataclass(frozen=True)
class BaseReference:
    """Where the base model of an adapter is, in a form that resolves from any folder."""

    source: str  # what from_pretrained takes: an absolute folder, or a Hub id
    revision: str | None  # Hub bases only
    hub_id: str | None  # the Hub id for cards and GGUF metadata; None: not known (never a path)

    @property
    def local(self) -> bool:
        return Path(self.source).is_absolute()


# A snapshot folder in a Hugging Face cache: .../models--{owner}--{name}/snapshots/{commit}
_CACHE_SNAPSHOT = re.compile(r"models--([A-Za-z0-9][\w.-]*?)--([\w.-]+)/snapshots/[0-9a-f]{40}/?$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_id_of_folder(folder: Path) -> str | None:
    """The Hub id a local model folder is a copy of, where the folder itself says so: a snapshot
    inside a Hugging Face cache, or a config.json whose `_name_or_path` is a Hub id (transformers 4
    wrote it when saving a model loaded from the Hub)."""
    if match := _CACHE_SNAPSHOT.search(folder.as_posix()):
        return f"{match.group(1)}/{match.group(2)}"
    try:
        named = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    if isinstance(named, str) and _HUB_ID.match(named) and not (folder.parent / named).exists():
        return named
    return None


def base_reference(cfg: ModelSection) -> BaseReference:
    """The recipe's model as a reference that works from anywhere: a local folder by its absolute
    path (its Hub id from the recipe's model.hub_id or the folder's own metadata), else the Hub id
    and revision."""
    folder = Path(cfg.name).expanduser()
    if folder.exists() or cfg.name.startswith(("/", ".", "~")) or cfg.name.count("/") > 1:
        folder = folder.resolve()
        return BaseReference(str(folder), None, cfg.hub_id or hub_id_of_folder(folder))
    return BaseReference(cfg.name, cfg.revision, cfg.name)


# --- the base's license ---

# Licenses of bases whose own card is often not at hand (from_pretrained does not fetch README.md):
# the default base's, as its Hub card states it.
KNOWN_LICENSES = {
    "microsoft/phi-3.5-mini-instruct": {
        "license": "mit", "license_link": "https://huggingface.co/microsoft/Phi-3.5-mini-instruct/resolve/main/LICENSE"},
}
LICENSE_KEYS = ("license", "license_name", "license_link")


def _base_file(base: BaseReference, filename: str) -> Path | None:
    """A file of the base model: in its folder, else in the Hugging Face cache, else downloaded (Hub
    bases, when online); None when it cannot be had."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    if base.local:
        found = Path(base.source) / filename
        if found.is_file():
            return found
    repo = base.source if not base.local else base.hub_id
    if repo is None:
        return None
    revision = base.revision if not base.local else None
    cached = try_to_load_from_cache(repo, filename, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if base.local or constants.HF_HUB_OFFLINE:
        return None
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, etag_timeout=5))
    except Exception:  # noqa: BLE001 - an unreachable card only means the license stays unknown
        return None


def base_license(base: BaseReference) -> dict[str, str]:
    """license (and license_name, license_link) of the base model: from its model card, else its
    config.json, else KNOWN_LICENSES; empty when none says."""
    from huggingface_hub import metadata_load

    sources = []
    if readme := _base_file(base, "README.md"):
        try:
            sources.append(metadata_load(readme) or {})
        except (OSError, ValueError):
            pass
    if base.local:
        sources.append(read_json_object(Path(base.source) / "config.json"))
    sources.append(KNOWN_LICENSES.get((base.hub_id or "").lower(), {}))
    for meta in sources:
        if isinstance(meta.get("license"), str) and meta["license"]:
            return {k: meta[k] for k in LICENSE_KEYS if isinstance(meta.get(k), str) and meta[k]}
    return {}
