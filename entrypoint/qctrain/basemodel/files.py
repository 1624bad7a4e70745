"""The base model read from its small files, without importing torch: config.json, the tokenizer files, the
safetensors headers (module names and shapes), and the LoRA targets they allow. A local folder or the Hub.

`load.py` loads the real thing for training; this module answers in a fraction of a second, so that
`qctrain check` stays fast.
"""

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qctrain.errors import InputError
from qctrain.recipe import ModelSection

SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "pad_token")


def model_source(cfg: ModelSection) -> str:
    """A local folder if it exists, else a Hub id; a path-looking name that does not exist is an error."""
    if Path(cfg.name).expanduser().exists():
        return str(Path(cfg.name).expanduser())
    if cfg.name.startswith(("/", ".", "~")) or cfg.name.count("/") > 1:
        raise InputError(f"model.name: {cfg.name}: no such folder")
    return cfg.name


def fetch(cfg: ModelSection, filename: str) -> Path | None:
    """The model's file `filename` (downloaded into the Hub cache for a Hub id); None if it has none."""
    source = model_source(cfg)
    if Path(source).is_dir():
        path = Path(source) / filename
        return path if path.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(source, filename, revision=cfg.revision))
    except EntryNotFoundError:
        return None
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as err:
        raise InputError(f"model.name: cannot read {filename} of {cfg.name}: {str(err).splitlines()[0]}") from None


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: cannot read the model's {what}: {err}") from None
    if not isinstance(value, dict):
        raise InputError(f"{path}: the model's {what} is not a JSON object")
    return value


def read_config(cfg: ModelSection) -> dict[str, Any]:
    path = fetch(cfg, "config.json")
    if path is None:
        raise InputError(f"model.name: {cfg.name} has no config.json")
    return _read_json(path, "config.json")


# --- module names from safetensors headers ---

def safetensors_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (8-byte little-endian length, then JSON): names, dtypes, shapes."""
    try:
        with open(path, "rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > 100 << 20:
                raise ValueError(f"header of {length} bytes")
            return json.loads(handle.read(length))
    except (OSError, ValueError, struct.error) as err:
        raise InputError(f"{path}: not a readable safetensors file: {err}") from None


def weight_shapes(cfg: ModelSection) -> dict[str, list[int]] | None:
    """Every tensor's shape, from the safetensors headers alone; None when the model has no safetensors
    (or, offline, none in the Hub cache)."""
    source = model_source(cfg)
    if not Path(source).is_dir():
        return _hub_weight_shapes(cfg, source)
    return _shapes_in_folder(lambda filename: Path(source) / filename)


def _shapes_in_folder(locate) -> dict[str, list[int]] | None:
    """Shapes from the safetensors files that `locate(filename)` finds (a Path, or None if it has none)."""
    index = locate(SAFETENSORS_INDEX)
    if index is not None and index.is_file():
        names = sorted(set(_read_json(index, SAFETENSORS_INDEX).get("weight_map", {}).values()))
    else:
        names = [SAFETENSORS_SINGLE]
    files = [locate(name) for name in names]
    if not all(path is not None and path.is_file() for path in files):
        return None
    shapes: dict[str, list[int]] = {}
    for path in files:
        header = safetensors_header(path)
        shapes.update({k: v["shape"] for k, v in header.items() if k != "__metadata__"})
    return shapes


def _hub_weight_shapes(cfg: ModelSection, repo_id: str) -> dict[str, list[int]] | None:
    from huggingface_hub import constants, get_safetensors_metadata, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, NotASafetensorsRepoError

    def cached(filename: str) -> Path | None:
        found = try_to_load_from_cache(repo_id, filename, revision=cfg.revision)
        return Path(found) if isinstance(found, str) else None

    shapes = _shapes_in_folder(cached)  # a base downloaded before: its files are on disk
    if shapes is not None or constants.HF_HUB_OFFLINE:
        return shapes
    try:  # the headers alone, by HTTP range requests
        metadata = get_safetensors_metadata(repo_id, revision=cfg.revision)
    except NotASafetensorsRepoError:
        return None
    except (HfHubHTTPError, OSError, ValueError) as err:
        raise InputError(f"model.name: cannot read the weight names of {cfg.name}: "
                         f"{str(err).splitlines()[0]}") from None
    return {name: list(info.shape) for file in metadata.files_metadata.values()
            for name, info in file.tensors.items()}


def linear_module_names(shapes: dict[str, list[int]], config: dict[str, Any]) -> list[str]:
    """Short names of the layers LoRA can target: modules with a 2-D weight, less lm_head and the embedding
    tables (first dimension = vocab). shapes: from the safetensors headers (weight_shapes), or a model's
    Linear layers (load.linear_weights)."""
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")
    names = set()
    for tensor, shape in shapes.items():
        if not tensor.endswith(".weight") or len(shape) != 2 or shape[0] == vocab:
            continue
        module = tensor[: -len(".weight")]
        if not module.endswith("lm_head"):
            names.add(module.rsplit(".", 1)[-1])
    return sorted(names)


def check_lora_targets(targets: str | list[str], available: list[str], model_name: str) -> None:
    if targets == "all-linear":
        return
    missing = [t for t in targets if t not in available]
    if missing:
        raise InputError(f"lora.target_modules: {', '.join(missing)} match no module of {model_name}; "
                         f"its Linear modules are: {', '.join(available)}")


# --- the tokenizer from tokenizer.json ---

@dataclass
class TokenizerFiles:
    """Enough of a fast tokenizer for data.tokenize: the Rust tokenizer, special tokens, chat template."""

    backend_tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str | dict[str, str] | None
    special_tokens_map: dict[str, str] = field(default_factory=dict)
    is_fast: bool = True
    split_special_tokens: bool = False


def _token_text(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _chat_template(cfg: ModelSection, tokenizer_config: dict[str, Any]) -> str | dict[str, str] | None:
    jinja = fetch(cfg, "chat_template.jinja")
    if jinja is not None:
        return jinja.read_text(encoding="utf-8")
    template = tokenizer_config.get("chat_template")
    if isinstance(template, list):  # named variants: [{"name": ..., "template": ...}]
        return {t["name"]: t["template"] for t in template if isinstance(t, dict) and "name" in t}
    return template


def load_tokenizer_files(cfg: ModelSection) -> TokenizerFiles | None:
    """The tokenizer from tokenizer.json and tokenizer_config.json; None where there is no tokenizer.json
    (a tokenizer transformers must build: the caller loads it the full way)."""
    from tokenizers import Tokenizer

    tokenizer_json = fetch(cfg, "tokenizer.json")
    if tokenizer_json is None:
        return None
    config_path = fetch(cfg, "tokenizer_config.json")
    tokenizer_config = _read_json(config_path, "tokenizer_config.json") if config_path else {}
    try:
        backend = Tokenizer.from_file(str(tokenizer_json))
    except Exception as err:  # the Rust side raises its own exception type
        raise InputError(f"{tokenizer_json}: cannot load the tokenizer: {str(err).splitlines()[0]}") from None
    special = {name: text for name in SPECIAL_TOKENS if (text := _token_text(tokenizer_config.get(name)))}
    return TokenizerFiles(backend, _chat_template(cfg, tokenizer_config), special)
