"""Train stage: TRL's SFTTrainer on the prepared (tokenized, masked, packed) data.

Preemption-safe: SIGTERM/SIGINT during training only sets a flag; the step in progress finishes, a
full checkpoint is saved (atomically, see checkpoint.py) and the run exits 75. The next `train` with
the same recipe resumes from the newest complete checkpoint.
"""

import json
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer

from qctrain import checkpoint, publish
from qctrain.checkpoint import checkpoints_dir
from qctrain.data import PreparedData
from qctrain.errors import InputError, Preempted
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
        kwargs.setdefault("dataloader_pin_memory", False)  # pinning needs an accelerator
        kwargs.setdefault("use_cpu", True)  # without it, ranks under torchrun on CPUs each train alone
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


class StopOnSignal:
    """SIGTERM/SIGINT handling for `train`, installed for the whole command.

    Before training starts nothing is worth saving: a signal raises Preempted at once (exit 75).
    Once `defer` is set (training, export), a signal only records itself; PreemptionCallback stops
    training after the current optimizer step and saves a checkpoint. Further signals are ignored,
    so nothing interrupts a checkpoint being written.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signum: int | None = None
        self.defer = False
        self._previous: dict[int, Any] = {}

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "signal"

    def __enter__(self) -> "StopOnSignal":
        for sig in self.SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _say(self, text: str) -> None:
        try:
            os.write(sys.stderr.fileno(), f"qctrain: {text}\n".encode())
        except (OSError, ValueError):
            pass

    def _handle(self, signum: int, frame) -> None:
        if self.signum is not None:
            self._say(f"{signal.Signals(signum).name} again: already stopping, the checkpoint is being saved")
            return
        self.signum = signum
        if not self.defer:
            raise Preempted(f"stopped by {self.name} before training started; nothing to save, "
                            "rerun to start")
        self._say(f"{self.name} received: finishing the current step, saving a checkpoint, then exiting 75")


def _any_rank(flag: bool, device) -> bool:
    """True on every rank if it is true on any (all ranks stop and save at the same step)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


class PreemptionCallback(TrainerCallback):
    """After each optimizer step: stop and save on a signal; save when save_every_minutes have passed."""

    def __init__(self, stop: StopOnSignal | None, save_every_minutes: float | None = None,
                 clock=time.monotonic):
        self.stop = stop
        self.interval = save_every_minutes * 60 if save_every_minutes else None
        self.clock = clock
        self.last_save = clock()

    def on_train_begin(self, args, state, control, **kwargs):
        self.last_save = self.clock()

    def on_step_end(self, args, state, control, **kwargs):
        stopping = self.stop is not None and self.stop.signum is not None
        due = self.interval is not None and self.clock() - self.last_save >= self.interval
        if self.interval is not None:
            due = _any_rank(due, args.device)  # ranks' clocks differ: every rank must save together
        if self.stop is not None and _any_rank(stopping, args.device):
            if self.stop.signum is None:  # another rank was signalled
                self.stop.signum = signal.SIGTERM
            control.should_save = True
            control.should_training_stop = True
        elif due:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self.last_save = self.clock()


class CheckpointPusher(TrainerCallback):
    """hub.push: checkpoints: after each save, push the checkpoint so a lost node loses nothing.
    A failed checkpoint push is reported and training goes on; the final push still happens."""

    def __init__(self, repo_id: str, token: str, private: bool = True, endpoint: str | None = None,
                 stopping: Callable[[], bool] = lambda: False):
        self.repo_id, self.token, self.private, self.endpoint = repo_id, token, private, endpoint
        self.stopping = stopping  # true once a SIGTERM arrived: the grace period is for the local save

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.stopping():
            return
        checkpoint_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        try:
            result = publish.push_checkpoint(checkpoint_dir, self.repo_id, self.token, private=self.private,
                                             endpoint=self.endpoint, retry=publish.CHECKPOINT_RETRY)
            print(f"pushed checkpoint {checkpoint_dir.name} to {result.url}", flush=True)
        except Exception as err:  # noqa: BLE001 - a checkpoint push must never end the training run
            publish.log.warning("checkpoint %s not pushed: %s", checkpoint_dir.name,
                                publish.redact(str(err), self.token))


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class QcTrainer(SFTTrainer):
    """SFTTrainer whose checkpoints are atomic: written into a staging folder, fsynced, marked complete,
    then renamed into place (see checkpoint.py); rotation (save_total_limit) runs after the rename."""

    checkpoint_meta: dict[str, Any] = {}
    last_saved_step: int | None = None
    _staging_root: str | None = None

    def _get_output_dir(self, trial) -> str:
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer import TRAINER_STATE_NAME
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = Path(super()._get_output_dir(trial))
        name = f"{checkpoint.PREFIX}-{self.state.global_step}"
        staging_root = run_dir / f"{checkpoint.PARTIAL_PREFIX}{name}"
        final = run_dir / name
        main = self.args.should_save
        if main:
            shutil.rmtree(staging_root, ignore_errors=True)
        _barrier()
        # Trainer writes <run dir>/checkpoint-N: pointing the run dir at the staging folder makes it
        # write everything (adapter, optimizer, scheduler, RNG, trainer state) there instead.
        self._staging_root = str(staging_root)
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        _barrier()
        if main:
            written = staging_root / name
            best = self.state.best_global_step
            best_dir = run_dir / f"{checkpoint.PREFIX}-{best}"
            if best and (best == self.state.global_step or best_dir.is_dir()):
                self.state.best_model_checkpoint = str(best_dir)
                self.state.save_to_json(str(written / TRAINER_STATE_NAME))  # it recorded the staging path
            marker = {**self.checkpoint_meta, "step": self.state.global_step, "epoch": self.state.epoch,
                      "saved": round(time.time(), 3)}
            checkpoint.commit(written, final, marker)
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint,
                               use_mtime=False)
        _barrier()
        self.last_saved_step = self.state.global_step


def build_trainer(recipe: Recipe, model, tokenizer, prepared: PreparedData, output_dir: Path,
                  stop: StopOnSignal | None = None) -> SFTTrainer:
    args = sft_config(recipe, output_dir, has_eval=prepared.eval is not None)
    set_seed(args.seed)  # before PEFT initialises the adapter weights
    trainer = QcTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        peft_config=lora_config(recipe.lora),
    )
    if not torch.cuda.is_available():
        keep_adapter_in_compute_dtype(trainer.model, model.dtype)
    trainer.checkpoint_meta = {
        "recipe_fingerprint": checkpoint.recipe_fingerprint(recipe),
        "data_fingerprint": prepared.fingerprint,
        "recipe": checkpoint.training_recipe(recipe),
    }
    trainer.add_callback(MetricsLog(output_dir / checkpoint.METRICS))
    trainer.add_callback(PreemptionCallback(stop, recipe.output.save_every_minutes))
    return trainer


def keep_adapter_in_compute_dtype(model, dtype: torch.dtype) -> None:
    """TRL casts QLoRA adapter weights to bf16 (as the paper does on GPUs); CPUs without bf16 matrix
    units run those matmuls 3-4x slower than in the float32 compute dtype, so undo it there."""
    for param in model.parameters():
        if param.requires_grad and param.dtype != dtype:
            param.data = param.data.to(dtype)


def logged_train_loss(log_history: list[dict[str, Any]]) -> float | None:
    """Mean training loss over every logged step of the run, resumed parts included: each logged `loss`
    averages the steps since the previous log, so weight it by that many steps."""
    total, steps, previous = 0.0, 0, 0
    for row in log_history:
        if "loss" in row and "step" in row and row["step"] > previous:
            total += row["loss"] * (row["step"] - previous)
            steps += row["step"] - previous
            previous = row["step"]
    return total / steps if steps else None


def run(trainer: SFTTrainer, plan: checkpoint.ResumePlan | None = None,
        stop: StopOnSignal | None = None) -> TrainResult:
    """Train (resuming as `plan` says); on a signal, save and raise Preempted (exit 75)."""
    if stop is not None:
        stop.defer = True  # from here on a signal stops training cleanly instead of raising
    if plan is not None:
        if trainer.args.should_save:  # one process cleans the (shared) output folder, the others wait
            plan.apply()
            if plan.checkpoint is not None:
                print(f"resuming from {plan.checkpoint} (step {plan.step})", flush=True)
        _barrier()
    started = time.time()
    resume_from = str(plan.checkpoint) if plan is not None and plan.checkpoint is not None else None
    output = trainer.train(resume_from_checkpoint=resume_from)
    if stop is not None and _any_rank(stop.signum is not None, trainer.args.device):
        step = trainer.state.global_step
        if getattr(trainer, "last_saved_step", None) != step:  # signalled after the last step's check
            trainer._save_checkpoint(trainer.model, trial=None)
        saved = Path(trainer.args.output_dir) / f"{checkpoint.PREFIX}-{step}"
        raise Preempted(f"stopped by {stop.name} at step {step}/{trainer.state.max_steps}; checkpoint saved "
                        f"in {saved}; rerun the same command to resume")
    metrics = dict(output.metrics)
    if resume_from is not None and (loss := logged_train_loss(trainer.state.log_history)) is not None:
        metrics["train_loss"] = loss  # the Trainer's covers only the steps since the resume (none on a rerun)
    if trainer.eval_dataset is not None:
        last_eval = [row for row in trainer.state.log_history
                     if "eval_loss" in row and row.get("step") == trainer.state.global_step]
        metrics.update(last_eval[-1] if last_eval else trainer.evaluate())
        metrics.pop("step", None)
    return TrainResult(trainer, metrics, list(trainer.state.log_history), trainer.state.global_step,
                       started, time.time())
