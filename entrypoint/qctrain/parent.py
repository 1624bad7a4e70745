"""The adapter a dpo/kto run continues (model.adapter): where it is, what it is, and whether it fits the recipe.
No torch: `check` reads it too.

model.adapter names
- a finished qctrain run folder (its run_manifest.json and adapter/): the usual SFT -> DPO chain;
- a folder holding a PEFT adapter (adapter_config.json and its weights);
- a Hub adapter repo id (org/name; qctrain pushes the adapter at the repo root, with run_manifest.json beside it),
  fetched through huggingface_hub (its cache; offline with HF_HUB_OFFLINE=1 once it is there).

Its identity (`Parent.identity`) goes into the checkpoint marker (a changed adapter under the same name does not
resume), the run's manifest and its card: the chain of runs stays traceable.
"""

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qctrain.errors import InputError
from qctrain.recipe import Recipe

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
MANIFEST = "run_manifest.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Parent:
    ref: str  # model.adapter as the recipe gives it
    kind: str  # "run", "adapter" (a folder), "hub"
    adapter_dir: Path  # the local folder PEFT loads
    adapter_sha256: str
    manifest_sha256: str | None = None
    manifest: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    revision: str | None = None  # hub: the commit the files came from

    @property
    def config(self) -> dict[str, Any]:
        return json.loads((self.adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))

    def identity(self) -> dict[str, Any]:
        """What names this adapter for good: the checkpoint marker, the manifest and the card record it."""
        where = {"run": str(self.adapter_dir.parent), "adapter": str(self.adapter_dir)}.get(self.kind, self.ref)
        recipe = self.manifest.get("recipe") if isinstance(self.manifest.get("recipe"), dict) else {}
        return {"adapter": where, "kind": self.kind, "revision": self.revision,
                "adapter_sha256": self.adapter_sha256, "manifest_sha256": self.manifest_sha256,
                "method": recipe.get("method", "sft") if recipe else None,
                "recipe_sha256": self.manifest.get("recipe_sha256")}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _weights(folder: Path) -> Path | None:
    return next((folder / name for name in ADAPTER_FILES[1:] if (folder / name).is_file()), None)


def _from_folder(ref: str, folder: Path) -> Parent:
    if (folder / MANIFEST).is_file() and (folder / "adapter" / "adapter_config.json").is_file():
        kind, adapter_dir, manifest_path = "run", folder / "adapter", folder / MANIFEST
    elif (folder / "adapter_config.json").is_file():
        kind, adapter_dir = "adapter", folder
        manifest_path = folder / MANIFEST if (folder / MANIFEST).is_file() else None
    else:
        raise InputError(f"model.adapter: {ref} is neither a finished run folder (run_manifest.json and "
                         "adapter/) nor an adapter folder (adapter_config.json)")
    weights = _weights(adapter_dir)
    if weights is None:
        raise InputError(f"model.adapter: {adapter_dir} has adapter_config.json but no adapter weights "
                         "(adapter_model.safetensors)")
    manifest: dict[str, Any] = {}
    if manifest_path is not None:
        try:
            manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise InputError(f"model.adapter: {manifest_path}: cannot read the run's manifest ({err})") from None
    try:
        json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"model.adapter: {adapter_dir / 'adapter_config.json'}: cannot read it ({err})") from None
    return Parent(ref, kind, adapter_dir.resolve(), sha256_file(weights),
                  sha256_file(manifest_path) if manifest_path else None, manifest if isinstance(manifest, dict)
                  else {})


def _from_hub(ref: str) -> Parent:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        folder = Path(snapshot_download(ref, allow_patterns=[*ADAPTER_FILES, MANIFEST]))
    except RepositoryNotFoundError:
        raise InputError(f"model.adapter: {ref}: no such model repo on the Hub (or no access to it)") from None
    except LocalEntryNotFoundError:
        raise InputError(f"model.adapter: {ref}: not in the Hugging Face cache and the Hub is not reachable "
                         "(HF_HUB_OFFLINE?)") from None
    except (HfHubHTTPError, OSError) as err:
        raise InputError(f"model.adapter: {ref}: {str(err).splitlines()[0]}") from None
    parent = _from_folder(ref, folder)
    return Parent(ref, "hub", parent.adapter_dir, parent.adapter_sha256, parent.manifest_sha256, parent.manifest,
                  revision=folder.name)


def resolve(ref: str) -> Parent:
    """model.adapter as a Parent: a local folder where one is there, else a Hub repo id."""
    folder = Path(ref).expanduser()
    if folder.exists():
        return _from_folder(ref, folder)
    if ref.startswith(("/", ".", "~")) or not _HUB_ID.match(ref):
        raise InputError(f"model.adapter: {ref}: not found (a finished run folder, an adapter folder, or a Hub "
                         "adapter repo id org/name)")
    return _from_hub(ref)


def _same_base(recorded: str, name: str) -> bool:
    """Whether the base an adapter records (an absolute folder or a Hub id) is the recipe's model.name."""
    ours, theirs = Path(name).expanduser(), Path(recorded).expanduser()
    if ours.exists() or theirs.exists():
        return ours.exists() and theirs.exists() and ours.resolve() == theirs.resolve()
    return recorded == name


def problems(recipe: Recipe, parent: Parent) -> list[str]:
    """Why the adapter cannot be continued by this recipe: another base, another quantization than it was trained
    on (the reference must be the model it was trained with), or a lora: section that says otherwise."""
    found = []
    config = parent.config
    recorded = config.get("base_model_name_or_path")
    if isinstance(recorded, str) and recorded and not _same_base(recorded, recipe.model.name):
        found.append(f"model.adapter: {parent.ref} was trained on {recorded}, not model.name {recipe.model.name}")
    trained = (parent.manifest.get("recipe") or {}).get("model", {}) if isinstance(parent.manifest, dict) else {}
    if "quantization" in trained and trained["quantization"] != recipe.model.model_dump(mode="json")["quantization"]:
        found.append(f"model.quantization: {parent.ref} was trained on the base quantized as "
                     f"{json.dumps(trained['quantization'])}; the reference must be that same model")
    if "lora" in recipe.model_fields_set:
        lora = recipe.lora
        wanted = {"r": lora.r, "lora_alpha": lora.alpha, "bias": lora.bias, "use_rslora": lora.use_rslora}
        if isinstance(lora.target_modules, list):
            wanted["target_modules"] = sorted(lora.target_modules)
        have = {key: sorted(config[key]) if key == "target_modules" and isinstance(config.get(key), list)
                else config.get(key) for key in wanted}
        differ = [f"{key} {have[key]} (recipe: {value})" for key, value in wanted.items() if have[key] != value]
        if differ:
            found.append(f"lora: the adapter {parent.ref} continued has {', '.join(differ)}; leave lora: out (it "
                         "comes from the adapter's adapter_config.json) or make it match")
    return found
