"""Train stage: TRL's SFTTrainer on the prepared (tokenized, masked, packed) data.

Faster than TRL as it comes, with TRL's loss as the reference (tests/test_loss_path.py):
- the loss: a plain cross entropy over the supervised positions only (transformers' boolean
  `logits_to_keep` keeps the LM head off the others); on CUDA with Liger, its fused linear cross
  entropy; on CUDA without it, TRL's own chunked head. Entropy and token accuracy are computed only
  for the steps that are logged (never in training with Liger's fused loss, where they would cost a pass);
  evaluation always takes the plain cross entropy, on every device.
- the batch layout: with sdpa or eager attention, a batch of N packs stays N rows (position ids
  restarting per record, so each row gets a block-diagonal causal mask); one padding-free row only
  with flash-attention kernels, which take variable-length sequences.
- Liger's kernels on Phi-3 on CUDA, unless the recipe turns them off.

Preemption-safe: SIGTERM/SIGINT during training only sets a flag; the step in progress finishes, a
full checkpoint is saved (atomically, see checkpoint.py) and the run exits 75. The next `train` with
the same recipe resumes from the newest complete checkpoint.
"""

import importlib.util
import json
import logging
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from peft import LoraConfig
from transformers import TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from qctrain import checkpoint, distributed
from qctrain.checkpoint import checkpoints_dir
from qctrain.data import IGNORE, PreparedData
from qctrain.errors import InputError, Preempted, writing
from qctrain.hubtoken import redact
from qctrain.recipe import LoraSection, Recipe
from qctrain.rundir import RunDir
from qctrain.signals import StopOnSignal

log = logging.getLogger("qctrain.train")


@dataclass
class TrainResult:
    trainer: SFTTrainer
    metrics: dict[str, Any]
    log_history: list[dict[str, Any]]
    global_step: int
    started: float
    finished: float


def sft_config_kwargs(recipe: Recipe, checkpoints: Path, has_eval: bool, cuda: bool) -> dict[str, Any]:
    """What TRL's SFTConfig gets: the recipe's train: section with its defaults (Recipe.sft_kwargs) plus what the
    other sections decide, with the settings that differ on a machine without CUDA."""
    kwargs = recipe.sft_kwargs()
    # Liger is applied by build_trainer (TRL's switch would leave out its fused linear cross entropy).
    kwargs.pop("use_liger_kernel", None)
    kwargs.pop("liger_kernel_config", None)
    kwargs.update(
        output_dir=str(checkpoints),
        max_length=recipe.data.max_seq_length,
        packing=recipe.data.packing,
        packing_strategy="bfd",
        # The data stage already tokenized, masked, truncated and packed: the trainer takes it as is.
        dataset_kwargs={"skip_prepare_dataset": True},
        assistant_only_loss=False,
    )
    if not has_eval:
        kwargs["eval_strategy"] = "no"
    if not cuda:
        if not {"activation_checkpointing", "gradient_checkpointing"} & set(recipe.train):
            kwargs["activation_checkpointing"] = False  # recomputing costs a third of the forward; RAM is not short
        kwargs.setdefault("bf16", False)  # bf16 autocast on CPU is slow and gains nothing here
        kwargs.setdefault("fp16", False)
        kwargs.setdefault("dataloader_pin_memory", False)  # pinning needs an accelerator
        kwargs.setdefault("use_cpu", True)  # without it, ranks under torchrun on CPUs each train alone
    return kwargs


def sft_config(recipe: Recipe, output_dir: Path, has_eval: bool) -> SFTConfig:
    kwargs = sft_config_kwargs(recipe, checkpoints_dir(output_dir), has_eval, cuda=torch.cuda.is_available())
    try:
        return SFTConfig(**kwargs)
    except (ValueError, TypeError) as err:
        raise InputError(f"train: {str(err).splitlines()[0]}") from None


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


class MetricsLog(TrainerCallback):
    """Appends every logged step to metrics.jsonl (main process only)."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            row = {"step": state.global_step, "epoch": state.epoch, "time": round(time.time(), 3), **logs}
            with writing(self.path), open(self.path, "a", encoding="utf-8") as handle:
                handle.write(redact(json.dumps(row)) + "\n")


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
            due = distributed.any_rank(due, args.device)  # ranks' clocks differ: every rank must save together
        if self.stop is not None and distributed.any_rank(stopping, args.device):
            if self.stop.signum is None:  # another rank was signalled
                self.stop.signum = signal.SIGTERM
            control.should_save = True
            control.should_training_stop = True
        elif due:
            control.should_save = True

    def on_save(self, args, state, control, **kwargs):
        self.last_save = self.clock()


class CheckpointPusher(TrainerCallback):
    """After each save, push the checkpoint where the run goes (a publish.Publisher: hub.push: checkpoints),
    so a lost node loses nothing. A failed push is reported and training goes on; the final push still
    happens."""

    def __init__(self, publisher, stopping: Callable[[], bool] = lambda: False):
        self.publisher = publisher
        self.stopping = stopping  # true once a SIGTERM arrived: the grace period is for the local save

    def on_save(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or self.stopping():
            return
        checkpoint_dir = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        try:
            where = self.publisher.push_checkpoint(checkpoint_dir)
            print(f"pushed checkpoint {checkpoint_dir.name} to {where}", flush=True)
        except Exception as err:  # noqa: BLE001 - a checkpoint push must never end the training run
            log.warning("checkpoint %s not pushed: %s", checkpoint_dir.name, redact(str(err)))


# --- the batch layout ---

VARLEN_ATTENTION = ("flash_attention_2", "flash_attention_3")  # kernels that take variable-length sequences


def packs_as_rows(recipe: Recipe) -> bool:
    """With sdpa or eager a padding-free row of N packs costs a dense (N x pack)^2 attention mask and
    matmul; N rows cost N x pack^2. Flash-attention kernels skip across record boundaries either way."""
    return recipe.data.packing and recipe.model.attn_implementation not in VARLEN_ATTENTION


@dataclass
class PackedRows:
    """A batch of N packs as N rows: TRL's collator with position ids restarting per record, right-padded to
    the longest pack, and without an attention mask, so transformers reads each row's record boundaries from
    the position ids and builds its block-diagonal causal mask (a padding token has position 0: a record of
    its own that nothing attends to). Labels as TRL's padding-free collator leaves them: a record's first
    token is not predicted from the record before it."""

    pad_token_id: int

    def __post_init__(self) -> None:
        self.collate = DataCollatorForLanguageModeling(pad_token_id=self.pad_token_id, return_position_ids=True)

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = self.collate(examples)
        del batch["attention_mask"]  # with a 2D mask transformers would not look for records in the rows
        batch["labels"][batch["position_ids"] == 0] = IGNORE
        return batch


# --- the loss ---

def supervised_logits(model, inputs: dict[str, Any], every_position: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at the positions whose next token is supervised ([n, vocab]) and those tokens ([n]): a boolean
    `logits_to_keep` makes the model run its LM head on those positions only. every_position: the model's forward
    slices logits_to_keep the old way (positions, no boolean mask: Liger's fused-loss forward), so it computes
    every position's logits and the supervised ones are picked here."""
    labels = inputs["labels"]
    supervised = labels[:, 1:] != IGNORE
    keep = torch.zeros_like(labels, dtype=torch.bool)
    keep[:, :-1] = supervised
    model_inputs = {key: value for key, value in inputs.items() if key != "labels"}
    if every_position:
        logits = model(**model_inputs, use_cache=False, logits_to_keep=0).logits[keep]
    else:
        logits = model(**model_inputs, use_cache=False, logits_to_keep=keep).logits
    return logits, labels[:, 1:][supervised]


class AtomicCheckpoints:
    """Atomic checkpoints for a transformers Trainer: written into a staging folder, fsynced, marked complete,
    then renamed into place (see checkpoint.py); rotation (save_total_limit) runs after the rename.

    No public hook serves (a callback's on_save runs after the Trainer has already rotated the old
    checkpoints away, and nothing lets it choose where a checkpoint is written), so this adapter overrides
    two private Trainer methods, and only these: `_save_checkpoint(model, trial)`, and `_get_output_dir(trial)`,
    which `_save_checkpoint` calls for the folder it writes `checkpoint-N` into (private_api.TRAINER_CHECKPOINTS).
    """

    checkpoint_meta: dict[str, Any] = {}
    last_saved_step: int | None = None
    _staging_root: str | None = None

    def save_checkpoint_now(self) -> None:
        """Save a complete checkpoint of the current step (a stop signal came after the last step's check)."""
        self._save_checkpoint(self.model, trial=None)

    def _get_output_dir(self, trial) -> str:
        return self._staging_root or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        from transformers.trainer_utils import rotate_checkpoints

        run_dir = Path(super()._get_output_dir(trial))
        name = f"{checkpoint.PREFIX}-{self.state.global_step}"
        staging_root = run_dir / f"{checkpoint.PARTIAL_PREFIX}{name}"
        final = run_dir / name
        main = self.args.should_save
        if main:
            shutil.rmtree(staging_root, ignore_errors=True)
        distributed.barrier()
        # Trainer writes <run dir>/checkpoint-N: pointing the run dir at the staging folder makes it
        # write everything (adapter, optimizer, scheduler, RNG, trainer state) there instead.
        self._staging_root = str(staging_root)
        try:
            with writing(staging_root, checkpoint.newest_size(run_dir)):
                try:
                    super()._save_checkpoint(model, trial)
                finally:
                    self._staging_root = None
                distributed.barrier()
                if main:
                    self._commit(run_dir, staging_root / name, final)
        except BaseException:
            if main:  # nothing half-written stays, and a full disk gets the space back
                shutil.rmtree(staging_root, ignore_errors=True)
            raise
        if main:
            shutil.rmtree(staging_root, ignore_errors=True)
            rotate_checkpoints(str(run_dir), self.args.save_total_limit, self.state.best_model_checkpoint,
                               use_mtime=False)
        distributed.barrier()
        self.last_saved_step = self.state.global_step

    def _commit(self, run_dir: Path, written: Path, final: Path) -> None:
        from transformers.trainer import TRAINER_STATE_NAME

        best = self.state.best_global_step
        best_dir = run_dir / f"{checkpoint.PREFIX}-{best}"
        if best and (best == self.state.global_step or best_dir.is_dir()):
            self.state.best_model_checkpoint = str(best_dir)
            self.state.save_to_json(str(written / TRAINER_STATE_NAME))  # it recorded the staging path
        marker = {**self.checkpoint_meta, "step": self.state.global_step, "epoch": self.state.epoch,
                  "saved": round(time.time(), 3)}
        checkpoint.commit(written, final, marker)


class QcTrainer(AtomicCheckpoints, SFTTrainer):
    """SFTTrainer with a lean loss (see compute_loss) and atomic checkpoints (AtomicCheckpoints)."""

    # "lean": cross entropy over the supervised positions; "model": the model's own loss (Liger's fused
    # linear cross entropy); "trl": SFTTrainer's chunked LM head (Triton on CUDA).
    loss_path: str = "trl"

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The same loss as SFTTrainer.compute_loss (the sum of the supervised tokens' negative
        log-likelihoods over num_items_in_batch), without its per-step entropy and accuracy pass. It keeps
        SFTTrainer's metrics as SFTTrainer does, in its private state (private_api.SFT_TRAINER_METRICS)."""
        mode = "train" if self.model.training else "eval"
        # Evaluation always takes the lean path (whatever training takes): no gradients, token accuracy from the
        # logits of the supervised positions alone (what evaluate.gate's heldout.mean_token_accuracy reads, never
        # computed by Liger's fused loss), and the same numbers on every device, for `qctrain eval` too.
        lean = self.loss_path == "lean" or mode == "eval"
        if return_outputs or (not lean and self.loss_path == "trl") or not self._plain_nll():
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        if not lean:
            loss = model(**inputs, use_cache=False, num_items_in_batch=num_items_in_batch).loss
        else:
            # Liger's forward (loss path "model") takes no boolean logits_to_keep; an evaluation has no gradients
            logits, targets = supervised_logits(model, inputs, every_position=self.loss_path == "model")
            count = torch.tensor(targets.numel(), device=logits.device) if num_items_in_batch is None \
                else num_items_in_batch
            loss = F.cross_entropy(logits.float(), targets, reduction="sum") / torch.as_tensor(count).clamp(min=1)
            if mode == "eval" or self._step_is_logged():
                self._log_token_metrics(mode, logits.detach(), targets)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())  # as SFTTrainer does
        if mode == "train":
            self._total_train_tokens += self._tokens_in(inputs)
        self._metrics[mode]["num_tokens"] = [self._total_train_tokens]
        return loss

    def _plain_nll(self) -> bool:
        """No loss variant that only SFTTrainer.compute_loss implements (DFT, label smoothing, a custom loss
        function, an MoE router loss)."""
        return (self.args.loss_type == "nll" and self.label_smoother is None and self.compute_loss_func is None
                and not self.aux_loss_enabled)

    def _step_is_logged(self) -> bool:
        """Whether the optimizer step in progress will be logged (DefaultFlowCallback's rule)."""
        step, strategy = self.state.global_step + 1, self.args.logging_strategy
        if strategy == "steps":
            return step % self.state.logging_steps == 0 or (step == 1 and self.args.logging_first_step)
        return strategy == "epoch"

    def _log_token_metrics(self, mode: str, logits: torch.Tensor, targets: torch.Tensor) -> None:
        """SFTTrainer's entropy and mean_token_accuracy of the next-token distributions."""
        log_probs = logits.float().log_softmax(-1).flatten()
        entropy_sum = -torch.dot(log_probs.exp(), log_probs)
        correct = (logits.argmax(-1) == targets).sum()
        gather = self.accelerator.gather_for_metrics
        valid = gather(torch.tensor(targets.numel(), device=logits.device)).sum()
        entropy_sum, correct = gather(entropy_sum).sum(), gather(correct).sum()
        self._metrics[mode]["entropy"].append((entropy_sum / valid).item() if valid > 0 else 0.0)
        self._metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)

    def _tokens_in(self, inputs: dict[str, Any]) -> int:
        """SFTTrainer's num_tokens metric: the tokens of a batch that are not padding."""
        if "attention_mask" in inputs:
            tokens = inputs["attention_mask"].sum()
        elif inputs["position_ids"].size(0) == 1:  # one padding-free row
            tokens = torch.tensor(inputs["position_ids"].size(1), device=inputs["position_ids"].device)
        else:  # packs as rows, right-padded: a padding token is the pad token with no label (an eos has one)
            tokens = ((inputs["input_ids"] != self.processing_class.pad_token_id) | (inputs["labels"] != IGNORE)).sum()
        return self.accelerator.gather_for_metrics(tokens).sum().item() // self.get_tp_size()


# --- Liger ---

LIGER_KERNELS = {"rope": True, "rms_norm": True, "swiglu": True, "fused_linear_cross_entropy": True,
                 "cross_entropy": False}  # apply_liger_kernel_to_phi3's switches, our defaults


def liger_plan(recipe: Recipe, model) -> tuple[dict[str, bool] | None, str]:
    """Liger's kernel switches to apply (None: off) and a few words on why. On by default for Phi-3 on CUDA;
    train.use_liger_kernel: false turns it off; true where it cannot work is an error."""
    asked = recipe.train.get("use_liger_kernel")
    if asked is False:
        return None, "off (train.use_liger_kernel: false)"
    model_type = model.config.model_type
    why_not = (f"qctrain applies Liger's kernels to Phi-3 models, not {model_type}" if model_type != "phi3"
               else "its kernels are Triton kernels for CUDA GPUs and there is none here"
               if not torch.cuda.is_available()
               else "the liger-kernel package is not installed here; set it to false or use an image that has it"
               if importlib.util.find_spec("liger_kernel") is None else None)
    if why_not:
        if asked:
            raise InputError(f"train.use_liger_kernel: {why_not}")
        return None, f"off ({why_not.split(';')[0]})"
    config = {**LIGER_KERNELS, **(recipe.train.get("liger_kernel_config") or {})}
    unknown = sorted(set(config) - set(LIGER_KERNELS))
    if unknown:
        raise InputError(f"train.liger_kernel_config: unknown switch {', '.join(unknown)} (known: "
                         f"{', '.join(LIGER_KERNELS)})")
    return config, "on (" + ", ".join(name.replace("_", " ") for name, on in config.items() if on) + ")"


def apply_liger(model, kernels: dict[str, bool]) -> None:
    """Liger's kernels on this Phi-3 instance: RoPE, RMSNorm and SwiGLU in its layers, and (with
    fused_linear_cross_entropy) a forward whose loss never materialises the logits. Before PEFT and TRL wrap
    the model: both call into this forward."""
    from liger_kernel.transformers import apply_liger_kernel_to_phi3

    apply_liger_kernel_to_phi3(model=model, **kernels)


LOSS_PATHS = {"lean": "cross entropy over the supervised positions",
              "model": "Liger's fused linear cross entropy", "trl": "TRL's chunked LM head"}


def loss_path(device_type: str, kernels: dict[str, bool] | None) -> str:
    if kernels and kernels["fused_linear_cross_entropy"]:
        return "model"
    # TRL's chunked head runs Triton kernels over the supervised positions only on CUDA/XPU; elsewhere it
    # scores every position and computes entropy and accuracy each step.
    return "trl" if device_type in ("cuda", "xpu") else "lean"


def build_trainer(recipe: Recipe, model, tokenizer, prepared: PreparedData, output_dir: Path,
                  stop: StopOnSignal | None = None) -> SFTTrainer:
    args = sft_config(recipe, output_dir, has_eval=prepared.eval is not None)
    kernels, liger_state = liger_plan(recipe, model)
    if kernels:
        apply_liger(model, kernels)
    set_seed(args.seed)  # before PEFT initialises the adapter weights
    trainer = QcTrainer(
        model=model,
        args=args,
        train_dataset=prepared.train,
        eval_dataset=prepared.eval,
        processing_class=tokenizer,
        peft_config=lora_config(recipe.lora),
    )
    trainer.loss_path = loss_path(args.device.type, kernels)
    if packs_as_rows(recipe):
        trainer.data_collator = PackedRows(tokenizer.pad_token_id)
        trainer.padding_free = False
    if trainer.args.should_save:
        batch = args.per_device_train_batch_size
        layout = (f"{batch} pack(s) per batch as {batch} row(s)" if packs_as_rows(recipe)
                  else "packs in one padding-free row" if recipe.data.packing else "records padded per batch")
        print(f"train: liger-kernel {liger_state}; loss: {LOSS_PATHS[trainer.loss_path]}; {layout} "
              f"({recipe.model.attn_implementation})", flush=True)
    if not torch.cuda.is_available():
        keep_adapter_in_compute_dtype(trainer.model, model.dtype)
    return with_run_callbacks(trainer, recipe, prepared, output_dir, stop)


def with_run_callbacks(trainer, recipe: Recipe, prepared: PreparedData, output_dir: Path,
                       stop: StopOnSignal | None, parent: dict[str, Any] | None = None):
    """What every method's trainer gets: the checkpoint marker's contents (what a resume must match; `parent`: the
    adapter a dpo/kto run continues), metrics.jsonl, and the stop and time-based saves."""
    trainer.checkpoint_meta = {
        "recipe_fingerprint": checkpoint.recipe_fingerprint(recipe, parent),
        "data_fingerprint": prepared.fingerprint,
        "recipe": checkpoint.training_recipe(recipe, parent),
    }
    trainer.add_callback(MetricsLog(RunDir(output_dir).metrics))
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
    """Train (resuming as `plan` says); on a signal, save and raise Preempted (exit 75). A plan whose checkpoint
    ends the training (a run that died before writing its outputs) trains nothing: see finish_from_checkpoint."""
    if stop is not None:
        stop.defer = True  # from here on a signal stops training cleanly instead of raising
    if plan is not None and plan.finished:
        return finish_from_checkpoint(trainer, plan.checkpoint)
    if plan is not None:
        if trainer.args.should_save:  # one process cleans the (shared) output folder, the others wait
            plan.apply()
            if plan.checkpoint is not None:
                print(f"resuming from {plan.checkpoint} (step {plan.step})", flush=True)
        distributed.barrier()
    started = time.time()
    resume_from = str(plan.checkpoint) if plan is not None and plan.checkpoint is not None else None
    output = trainer.train(resume_from_checkpoint=resume_from)
    if stop is not None and distributed.any_rank(stop.signum is not None, trainer.args.device):
        step = trainer.state.global_step
        if getattr(trainer, "last_saved_step", None) != step:  # signalled after the last step's check
            trainer.save_checkpoint_now()
        saved = Path(trainer.args.output_dir) / f"{checkpoint.PREFIX}-{step}"
        raise Preempted(f"stopped by {stop.name} at step {step}/{trainer.state.max_steps}; checkpoint saved "
                        f"in {saved}; rerun the same command to resume")
    metrics = dict(output.metrics)
    if resume_from is not None and (loss := logged_train_loss(trainer.state.log_history)) is not None:
        metrics["train_loss"] = loss  # the Trainer's covers only the steps since the resume (none on a rerun)
    return _result(trainer, metrics, started)


def finish_from_checkpoint(trainer: SFTTrainer, ckpt: Path) -> TrainResult:
    """The end of a run whose training finished at `ckpt` (global_step = max_steps) but that ended before its
    outputs were written: the adapter weights and the trainer state (log history, step, epoch) come from the
    checkpoint, and no step is trained (transformers would train one more past max_steps, on a restarted
    learning-rate schedule)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import TrainerState

    started = time.time()
    trainer.state = TrainerState.load_from_json(str(ckpt / checkpoint.TRAINER_STATE))
    weights = load_file(ckpt / "adapter_model.safetensors")
    loaded = set_peft_model_state_dict(trainer.accelerator.unwrap_model(trainer.model), weights)
    if loaded.unexpected_keys:
        raise InputError(f"{ckpt}: its adapter does not fit this model (e.g. {loaded.unexpected_keys[0]}); "
                         "rerun with --restart")
    if trainer.args.should_save:
        print(f"training finished at {ckpt} (step {trainer.state.global_step} of {trainer.state.max_steps}): "
              "writing its outputs without training more", flush=True)
    metrics: dict[str, Any] = {"epoch": trainer.state.epoch}
    if (loss := logged_train_loss(trainer.state.log_history)) is not None:
        metrics["train_loss"] = loss
    return _result(trainer, metrics, started)


def _result(trainer: SFTTrainer, metrics: dict[str, Any], started: float) -> TrainResult:
    """The run's result, with the final evaluation (logged at the last step, else run now)."""
    if trainer.eval_dataset is not None:
        last_eval = [row for row in trainer.state.log_history
                     if "eval_loss" in row and row.get("step") == trainer.state.global_step]
        metrics.update(last_eval[-1] if last_eval else trainer.evaluate())
        metrics.pop("step", None)
    return TrainResult(trainer, metrics, list(trainer.state.log_history), trainer.state.global_step,
                       started, time.time())


def eval_trainer(recipe: Recipe, model, tokenizer, eval_dataset, output_dir: Path) -> QcTrainer:
    """A trainer that only evaluates (`qctrain eval`): `model` already carries its adapter (a PeftModel), the
    run's eval split, batch settings, collator and loss as in training, no tracker and no callback of ours."""
    quiet = recipe.model_copy(update={"train": {**recipe.train, "report_to": "none"}})
    # TRL wants a train_dataset even here: the eval split stands in (prepared already, never trained on)
    trainer = QcTrainer(model=model, args=sft_config(quiet, output_dir, has_eval=True), train_dataset=eval_dataset,
                        eval_dataset=eval_dataset, processing_class=tokenizer)
    trainer.loss_path = "lean"  # what evaluation takes on every device (QcTrainer.compute_loss)
    if packs_as_rows(recipe):
        trainer.data_collator = PackedRows(tokenizer.pad_token_id)
        trainer.padding_free = False
    return trainer
