"""The base model loaded with torch and transformers: its config and tokenizer, the 4-bit (or plain) model that
training puts the adapter on, the unquantized model a merge writes, and the module tree without weights."""

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from qctrain import distributed
from qctrain.basemodel.files import model_source
from qctrain.errors import InputError
from qctrain.recipe import ModelSection


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
    """The base as training takes it: quantized as the recipe says, on this rank's device."""
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


def load_unquantized(cfg: ModelSection, dtype: torch.dtype):
    """The base in `dtype`, not quantized (what an adapter is merged into)."""
    try:
        return AutoModelForCausalLM.from_pretrained(model_source(cfg), dtype=dtype, **_pretrained_kwargs(cfg))
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load the base model {cfg.name}: {str(err).splitlines()[0]}") from None


def meta_model(cfg: ModelSection):
    """The model's module tree without weights (for preflight checks)."""
    from accelerate import init_empty_weights

    config = load_config(cfg)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)


def linear_weights(model: torch.nn.Module) -> dict[str, list[int]]:
    """The weight shape of every Linear layer (4- and 8-bit ones are Linear too), keyed as in a safetensors
    header: what files.linear_module_names reads, for a model in memory."""
    return {f"{name}.weight": [module.out_features, module.in_features] for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear)}
