"""Model stage: tokenizer, 4-bit base model (BitsAndBytesConfig) and the LoRA config."""

import os
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from qctrain.errors import InputError
from qctrain.modelfiles import check_lora_targets, model_source  # noqa: F401 - part of this stage's API
from qctrain.recipe import LoraSection, ModelSection


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
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
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


def run_model_section(output_dir: Path) -> ModelSection:
    """The model: section of a finished run, from its run_manifest.json."""
    import json

    manifest_path = output_dir / "run_manifest.json"
    if not manifest_path.is_file():
        raise InputError(f"{manifest_path}: not found; is {output_dir} the output.dir of a finished run?")
    return ModelSection.model_validate(json.loads(manifest_path.read_text(encoding="utf-8"))["recipe"]["model"])


def load_adapter_model(output_dir: Path):
    """The base named in the run's manifest with the trained adapter on top, and the adapter's tokenizer."""
    from peft import PeftModel

    cfg = run_model_section(output_dir)
    tokenizer = AutoTokenizer.from_pretrained(output_dir / "adapter")
    return PeftModel.from_pretrained(load_base_model(cfg), output_dir / "adapter"), tokenizer
