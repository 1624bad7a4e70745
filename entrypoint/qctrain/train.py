"""Train stage: TRL's SFTTrainer on the prepared (tokenized, masked, packed) data."""

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from qctrain.data import PreparedData
from qctrain.errors import InputError
from qctrain.model import lora_config
from qctrain.recipe import Recipe


@dataclass
class TrainResult:
    trainer: SFTTrainer
    metrics: dict[str, Any]
    log_history: list[dict[str, Any]]
    global_step: int
    started: float
    finished: float


def checkpoints_dir(output_dir: Path) -> Path:
    return output_dir / "checkpoints"


def sft_config(recipe: Recipe, output_dir: Path, has_eval: bool) -> SFTConfig:
    kwargs = recipe.sft_kwargs()
    kwargs.update(
        output_dir=str(checkpoints_dir(output_dir)),
        max_length=recipe.data.max_seq_length,
        packing=recipe.data.packing,
        packing_strategy="bfd",
        # The data stage already tokenized, masked, truncated and packed: the trainer takes it as is.
        dataset_kwargs={"skip_prepare_dataset": True},
        assistant_only_loss=False,
    )
    if not has_eval:
        kwargs["eval_strategy"] = "no"
    if not torch.cuda.is_available():
        kwargs.setdefault("bf16", False)  # bf16 autocast on CPU is slow and gains nothing here
        kwargs.setdefault("fp16", False)
    try:
        return SFTConfig(**kwargs)
    except (ValueError, TypeError) as err:
        raise InputError(f"train: {str(err).splitlines()[0]}") from None


class MetricsLog(TrainerCallback):
    """Appends every logged step to metrics.jsonl (main process only)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            row = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3), **logs}
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(row) + "\n")


def build_trainer(recipe: Recipe, model, tokenizer, prepared: PreparedData, output_dir: Path) -> SFTTrainer:
    args = sft_config(recipe, output_dir, has_eval=prepared.eval is not None)
    set_seed(args.seed)  # before PEFT initialises the adapter weights
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        peft_config=lora_config(recipe.lora),
    )
    if not torch.cuda.is_available():
        keep_adapter_in_compute_dtype(trainer.model, model.dtype)
    trainer.add_callback(MetricsLog(output_dir / "metrics.jsonl"))
    return trainer


def keep_adapter_in_compute_dtype(model, dtype: torch.dtype) -> None:
    """TRL casts QLoRA adapter weights to bf16 (as the paper does on GPUs); CPUs without bf16 matrix
    units run those matmuls 3-4x slower than in the float32 compute dtype, so undo it there."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def run(trainer: SFTTrainer, resume_from: str | None = None) -> TrainResult:
    started = time.time()
    output = trainer.train(resume_from_checkpoint=resume_from)
    metrics = dict(output.metrics)
    if trainer.eval_dataset is not None:
        last_eval = [row for row in trainer.state.log_history
                     if "eval_loss" in row and row.get("step") == trainer.state.global_step]
        metrics.update(last_eval[-1] if last_eval else trainer.evaluate())
        metrics.pop("step", None)
    return TrainResult(trainer, metrics, list(trainer.state.log_history), trainer.state.global_step,
                       started, time.time())
