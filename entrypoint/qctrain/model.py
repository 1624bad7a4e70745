"""Model stage: tokenizer, 4-bit base model (BitsAndBytesConfig) and the LoRA config."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from qctrain import distributed
from qctrain.atomic import read_json_object
from qctrain.errors import InputError
from qctrain.modelfiles import model_source
from qctrain.recipe import LoraSection, ModelSection
from qctrain.rundir import RunDir


def _pretrained_kwargs(cfg: ModelSection) -> dict:
    return {"revision": cfg.revision, "trust_remote_code": cfg.trust_remote_code}


def load_config(cfg: ModelSection):
    try:
        return AutoConfig.from_pretrained(model_source(cfg), **_pretrained_kwargs(cfg))
    except (OSError, ValueError) as err:
        raise InputError(f"model.name: cannot load the config of {cfg.name}: {str(err).splitlines()[0]}") from None


def load_tokenizer(cfg: ModelSection):
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_source(cfg), **_pretrained_kwargs(cfg))
    except (OSError, ValueError) as err:
        raise InputError(f"model.name: cannot load the tokenizer of {cfg.name}: {str(err).splitlines()[0]}") from None
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def compute_dtype(cfg: ModelSection) -> torch.dtype:
    name = cfg.quantization.compute_dtype if cfg.quantization else "bfloat16"
    return getattr(torch, name)


def bnb_config(cfg: ModelSection) -> BitsAndBytesConfig | None:
    quant = cfg.quantization
    if quant is None:
        return None
    if quant.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, quant.compute_dtype),
        bnb_4bit_quant_storage=getattr(torch, quant.storage_dtype or "uint8"),
    )


def device_map() -> dict[str, int | str]:
    """Each rank's whole model on its own device (DDP), or the CPU when there is no GPU."""
    if torch.cuda.is_available():
        return {"": distributed.local_rank()}
    return {"": "cpu"}


def disable_avx512bf16_repack(model: torch.nn.Module) -> int:
    """bitsandbytes on AVX512-BF16 CPUs repacks a Linear4bit weight on any eval-mode forward, after
    which training steps lose their gradients through it. Turning the fast path off keeps them."""
    import bitsandbytes as bnb

    layers = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    for layer in layers:
        layer.support_avx512bf16_for_cpu = False
    return len(layers)


def load_base_model(cfg: ModelSection):
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_source(cfg),
            quantization_config=bnb_config(cfg),
            dtype=compute_dtype(cfg),
            attn_implementation=cfg.attn_implementation,
            device_map=device_map(),
            **_pretrained_kwargs(cfg),
        )
    except (OSError, ValueError) as err:
        raise InputError(f"model.name: cannot load {cfg.name}: {str(err).splitlines()[0]}") from None
    if cfg.quantization is not None and not torch.cuda.is_available():
        disable_avx512bf16_repack(model)
    return model


def linear_module_names(model: torch.nn.Module) -> list[str]:
    """Short names of the Linear layers LoRA can target (lm_head excluded, as PEFT's all-linear does)."""
    import bitsandbytes as bnb

    linear_types = (torch.nn.Linear, bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                   if isinstance(module, linear_types) and not name.endswith("lm_head")})


def lora_config(cfg: LoraSection) -> LoraConfig:
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=cfg.target_modules,
        bias=cfg.bias,
        use_rslora=cfg.use_rslora,
        task_type="CAUSAL_LM",
    )


def meta_model(cfg: ModelSection):
    """The model's module tree without weights (for preflight checks)."""
    from accelerate import init_empty_weights

    config = load_config(cfg)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)


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


def run_model_section(output_dir: Path) -> ModelSection:
    """The model: section of a finished run, its name replaced by a base that resolves from here:
    the absolute folder or Hub id recorded in the adapter, else the Hub id the base is a copy of."""
    run = RunDir(output_dir)
    manifest = run.read_manifest()
    try:
        cfg = ModelSection.model_validate(manifest["recipe"]["model"])
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{run.manifest}: not a run manifest of qctrain ({type(err).__name__})") from None
    adapter_config = read_json_object(run.adapter / "adapter_config.json")
    recorded = adapter_config.get("base_model_name_or_path") or cfg.name
    hub_id = (manifest.get("base_model") or {}).get("hub_id") or cfg.hub_id
    folder = Path(recorded).expanduser()
    if folder.exists():
        return cfg.model_copy(update={"name": str(folder.resolve()), "hub_id": hub_id})
    if folder.is_absolute():
        if hub_id:  # the local copy is not here: its Hub original is the same model
            return cfg.model_copy(update={"name": hub_id, "revision": None})
        raise InputError(f"{output_dir}: its base model {recorded} is not there (the adapter was trained on "
                         "it); put it back, or name the Hub model it is a copy of with model.hub_id")
    if recorded.startswith((".", "~")) or recorded.count("/") > 1:
        raise InputError(f"{output_dir}: its base model {recorded} is a path relative to where it was "
                         "trained and is not found from here: run from that folder")
    return cfg.model_copy(update={"name": recorded, "revision": adapter_config.get("revision") or cfg.revision})


def load_adapter_model(output_dir: Path):
    """The run's base with the trained adapter on top, and the adapter's tokenizer; the base is the
    one recorded in the adapter, so this works from any folder. Loading problems are input errors."""
    from peft import PeftModel

    cfg = run_model_section(output_dir)
    adapter = output_dir / "adapter"
    try:
        tokenizer = AutoTokenizer.from_pretrained(adapter)
    except (OSError, ValueError) as err:
        raise InputError(f"{adapter}: cannot load the tokenizer: {str(err).splitlines()[0]}") from None
    base = load_base_model(cfg)
    try:
        return PeftModel.from_pretrained(base, adapter), tokenizer
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f"{adapter}: cannot load the adapter onto {cfg.name}: {str(err).splitlines()[0]}") from None
