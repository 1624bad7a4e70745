"""Train stage for method dpo and kto: TRL's DPOTrainer / KTOTrainer, 4-bit base, LoRA, on the rows the data stage
tokenized (data/pairs.py), with the SFT stage's checkpoints, metrics and stop handling (train.py).

Two starting points, one 4-bit base in memory either way:
- a bare base: a new LoRA adapter (peft_config), and the reference is the base itself (TRL disables the adapter);
- model.adapter (an SFT run's adapter): loaded trainable as the adapter "default"; TRL itself adds a frozen copy,
  "ref", and computes the reference through it (DPOTrainer.__init__ when handed a PeftModel and no peft_config).

What TRL 1.16 needs around it (each verified on the tiny model, notes in the tests):
- its own tokenizing has no switch to skip it: `_prepare_dataset` is overridden to take the prepared rows as they
  are (they equal its own processing: tests/test_preference_data.py);
- it copies "default" into "ref" before casting the trainable weights of a quantized model to bf16, so policy and
  reference differ at step 0 (rewards not 0, held-out accuracy 1.0 before any step): `align_reference`;
- KTO's KL completions are made per batch by the collator (KLRotation) instead of a dataset map over batches of
  per_device_train_batch_size, so the prepared rows do not depend on the batch size;
- it saves every adapter; the run's adapter is "default" alone (`outputs.save_trained_adapter`).
"""

from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import set_seed
from trl import DPOConfig, DPOTrainer, KTOConfig, KTOTrainer
from trl.trainer.kto_trainer import DataCollatorForUnpairedPreference

from qctrain.data import PreparedData
from qctrain.errors import InputError
from qctrain.recipe import Recipe
from qctrain.signals import StopOnSignal
from qctrain.train import (
    AtomicCheckpoints,
    keep_adapter_in_compute_dtype,
    lora_config,
    sft_config_kwargs,
    with_run_callbacks,
)

CONFIGS = {"dpo": DPOConfig, "kto": KTOConfig}
POLICY, REFERENCE = "default", "ref"  # the adapter trained, TRL's frozen copy of it (when continuing one)
# SFTConfig's keys (train.sft_config_kwargs) that the preference configs do not have.
SFT_ONLY = ("packing", "packing_strategy", "dataset_kwargs", "assistant_only_loss")


def preference_config_kwargs(recipe: Recipe, checkpoints_dir: Path, has_eval: bool, cuda: bool) -> dict[str, Any]:
    """What DPOConfig / KTOConfig get: the SFT stage's settings (train.sft_config_kwargs: output folder, CPU
    settings, defaults, seed) less SFT's own, with the length the data stage fitted every row to (so the collator
    never truncates) and the held-out metrics of step 0 (policy = reference) logged first."""
    kwargs = sft_config_kwargs(recipe, checkpoints_dir, has_eval, cuda)
    for key in SFT_ONLY:
        kwargs.pop(key, None)
    kwargs["max_length"] = recipe.data.max_seq_length
    if recipe.method == "dpo":
        kwargs["truncation_mode"] = "keep_start"
    if has_eval:
        # Inside the training loop, after DDP has wrapped the model: an evaluate() before train() would keep the
        # model out of DDP's wrapper, and every rank would train alone.
        kwargs.setdefault("eval_on_start", True)
    return kwargs


def preference_config(recipe: Recipe, checkpoints_dir: Path, has_eval: bool) -> DPOConfig | KTOConfig:
    kwargs = preference_config_kwargs(recipe, checkpoints_dir, has_eval, cuda=torch.cuda.is_available())
    try:
        return CONFIGS[recipe.method](**kwargs)
    except (ValueError, TypeError) as err:
        raise InputError(f"train: {str(err).splitlines()[0]}") from None


class QcDPOTrainer(AtomicCheckpoints, DPOTrainer):
    """DPOTrainer on the prepared rows (prompt_ids, chosen_ids, rejected_ids), with atomic checkpoints."""

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset  # tokenized, checked and fitted by the data stage, as TRL's own processing would


class KLRotation(DataCollatorForUnpairedPreference):
    """KTO's collator, making each row's KL completion as TRL's dataset map does (kto_trainer.py: the completions
    rotated by one within the batch), per batch: the same pairs under KTO's sequential sampler."""

    def torch_call(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        completions = [example["completion_ids"] for example in examples]
        rotated = completions[-1:] + completions[:-1]
        return super().torch_call([{**example, "KL_completion_ids": kl}
                                   for example, kl in zip(examples, rotated, strict=True)])


class QcKTOTrainer(AtomicCheckpoints, KTOTrainer):
    """KTOTrainer on the prepared rows (prompt_ids, completion_ids, label), with atomic checkpoints."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.calculate_KL:
            collator = self.data_collator
            self.data_collator = KLRotation(pad_token_id=collator.pad_token_id, max_length=collator.max_length,
                                            pad_to_multiple_of=collator.pad_to_multiple_of)

    def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
        return dataset


TRAINERS = {"dpo": QcDPOTrainer, "kto": QcKTOTrainer}


def policy_model(base, adapter_dir: Path | str | None, recipe: Recipe):
    """(model, peft_config) for the trainer: the adapter at adapter_dir continued as "default" (TRL adds the frozen
    "ref" copy), or the base with the recipe's new LoRA (the reference: the adapter disabled)."""
    if adapter_dir is None:
        return base, lora_config(recipe.lora)
    try:
        model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=POLICY, is_trainable=True)
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f"model.adapter: cannot load {adapter_dir} onto {recipe.model.name}: "
                         f"{str(err).splitlines()[0]}") from None
    return model, None


def align_reference(model) -> int:
    """Make TRL's "ref" adapter an exact copy of the policy as it starts training. TRL copies "default" into "ref"
    and only then casts a quantized model's trainable weights to bf16 (dpo_trainer.py, kto_trainer.py), so the two
    differ by that rounding. Where the policy was cast back (CPU: float32, keep_adapter_in_compute_dtype) it takes
    the exact copy's values again; where it stays in bf16 (CUDA) the reference takes the policy's values and dtype.
    Returns the number of weights aligned (0: no "ref", the reference is the base)."""
    aligned = 0
    for name, param in model.named_parameters():
        if f".{POLICY}." not in name:
            continue
        try:
            reference = model.get_parameter(name.replace(f".{POLICY}.", f".{REFERENCE}."))
        except AttributeError:
            return 0
        with torch.no_grad():
            if param.dtype == reference.dtype:
                param.data.copy_(reference.data)
            else:
                reference.data = param.data.detach().clone()
        aligned += 1
    return aligned


def compact_head_on_cpu() -> bool:
    """TRL's fused LM head scores only the completion positions where its Triton kernels run (CUDA, XPU) and every
    position of the padded batch elsewhere; on CPU the compact path gives the same log-probabilities (tests/
    test_preference_train.py) at a fraction of the CPU time (bench/dpo_cpu.py). It is chosen by a private TRL
    function (private_api.TRL_FUSED_HEAD), here made to say yes for the CPU. False where it was not changed (CUDA,
    or TRL without it)."""
    import trl.trainer.utils as trl_utils

    decide = getattr(trl_utils, "_use_triton", None)
    if torch.cuda.is_available() or not callable(decide):
        return False
    if not getattr(decide, "qctrain_compact_on_cpu", False):
        def compact(device: torch.device, original=decide) -> bool:
            return device.type == "cpu" or original(device)

        compact.qctrain_compact_on_cpu = True
        trl_utils._use_triton = compact
    return True


def build_preference_trainer(recipe: Recipe, base, tokenizer, prepared: PreparedData, checkpoints_dir: Path,
                             output_dir: Path, stop: StopOnSignal | None = None, adapter_dir: Path | str | None = None,
                             parent: dict[str, Any] | None = None):
    """The method's trainer, ready to train: the policy (a new adapter, or adapter_dir continued), the config from
    the recipe, the prepared rows, the reference aligned with the policy, and the run's callbacks."""
    args = preference_config(recipe, checkpoints_dir, has_eval=prepared.eval is not None)
    set_seed(args.seed)  # before PEFT initialises a new adapter's weights
    model, peft_config = policy_model(base, adapter_dir, recipe)
    trainer = TRAINERS[recipe.method](model=model, args=args, train_dataset=prepared.train,
                                      eval_dataset=prepared.eval, processing_class=tokenizer, peft_config=peft_config)
    if not torch.cuda.is_available():
        keep_adapter_in_compute_dtype(trainer.model, base.dtype)
        compact_head_on_cpu()
    align_reference(trainer.model)
    return with_run_callbacks(trainer, recipe, prepared, output_dir, stop, parent)

