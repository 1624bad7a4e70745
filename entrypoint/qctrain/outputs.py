"""The training outputs: the adapter (with its tokenizer, chat template and card), run_manifest.json, the model
card, the loss plot, the data report and (output.gguf) the GGUF LoRA, written into a staging folder and swapped
into output.dir (rundir.swap_in_outputs). What reads them later is the finished run's room (finished/).

The outputs travel: the adapter names its base by absolute path or Hub id, holds the model card,
tokenizer and chat template itself, and every output is readable by other users (0644, folders 0755): adapter/,
gguf/, merged/, the card, manifest, metrics, loss plot and data report. Modes are set on these alone, never on
anything else in output.dir: prepared/ and checkpoints/ keep what the umask gives.
"""

import json
import os
import platform
import shutil
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from qctrain import PROVENANCE_VARS, __version__, distributed, evaluate
from qctrain.atomic import make_shareable, read_json_object, staging_folder, write_json_atomic
from qctrain.basemodel.reference import BaseReference, base_license, base_reference
from qctrain.card import Sample, model_card, preference_section
from qctrain.finished import gguf_lora
from qctrain.recipe import Recipe
from qctrain.rundir import RunDir, swap_in_outputs

PACKAGES = ["torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets",
            "huggingface-hub", "pydantic", "tokenizers", "safetensors"]


def package_versions() -> dict[str, str | None]:
    found: dict[str, str | None] = {"qc-train-phi": __version__}
    for name in PACKAGES:
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            found[name] = None
    return found


def machine_facts() -> dict[str, Any]:
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "torch_cuda": torch.version.cuda,
        "gpus": gpus,
        "world_size": distributed.world_size(),
    }


def provenance() -> dict[str, str | None]:
    return {name.removeprefix("QCTRAIN_").lower(): os.environ.get(name) for name in PROVENANCE_VARS}


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def build_manifest(recipe: Recipe, data_report: dict, split_path: Path, metrics: dict, args,
                   started: float, finished: float, base: BaseReference | None = None,
                   checkpoint: dict | None = None, parent: dict | None = None,
                   heldout: dict | None = None, evaluation: dict | None = None) -> dict[str, Any]:
    """run_manifest.json; a dpo/kto run's also names the adapter it continued (parent: parent.Parent.identity)
    and its held-out preference metrics at the start and the end (heldout_metrics); evaluation: the evaluate
    stage's report (evaluation_summary)."""
    from qctrain.checkpoint import recipe_fingerprint

    world = distributed.world_size()
    preference = {} if recipe.method == "sft" else {"preference": heldout or {}}
    return {
        "qctrain_version": __version__,
        "recipe": recipe.model_dump(mode="json"),
        "recipe_sha256": recipe.sha256(),
        "recipe_fingerprint": recipe_fingerprint(recipe, parent),  # the training recipe's, as checkpoints record it
        **({"parent": parent} if parent else {}),
        **preference,
        "checkpoint": checkpoint,  # the newest complete checkpoint these outputs follow (checkpoint.checkpoint_record)
        "base_model": asdict(base or base_reference(recipe.model)),
        "data": {
            "fingerprint": data_report.get("fingerprint"),
            "split": json.loads(split_path.read_text(encoding="utf-8")) if split_path.is_file() else None,
            "train_records": data_report.get("train", {}).get("records"),
            "eval_records": data_report.get("eval", {}).get("records"),
        },
        "batch": {
            "per_device_train_batch_size": args.per_device_train_batch_size,
            "gradient_accumulation_steps": args.gradient_accumulation_steps,
            "world_size": world,
            "global_batch_size": args.per_device_train_batch_size * args.gradient_accumulation_steps * world,
        },
        "packages": package_versions(),
        "machine": machine_facts(),
        "image": provenance(),
        "started": iso(started),
        "finished": iso(finished),
        "metrics": metrics,
        **({"evaluation": evaluation_summary(evaluation)} if evaluation else {}),
    }


REWARD_KEYS = ("rewards/accuracies", "rewards/margins", "loss", "kl")  # what dpo/kto evaluations log (eval_ + it)


def heldout_metrics(log_history: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """A dpo/kto run's held-out reward accuracy (DPO), margin, loss and KL (KTO) at its first evaluation (step 0 with
    eval_on_start: policy = reference) and its last: {"rewards/accuracies": {"start", "end", "start_step",
    "end_step"}, ...}."""
    evals = [row for row in log_history if "eval_loss" in row and "step" in row]
    if not evals:
        return {}
    first, last = evals[0], evals[-1]
    return {key: {"start": first[f"eval_{key}"], "end": last[f"eval_{key}"], "start_step": first["step"],
                  "end_step": last["step"]} for key in REWARD_KEYS if f"eval_{key}" in first and f"eval_{key}" in last}


def plot_rewards(ax, log_history: list[dict[str, Any]]) -> None:
    """A dpo/kto run's rewards: of the chosen and rejected completions and their margin (train), and the held-out
    margin and reward accuracy (DPO)."""
    for key, label, marker in (("rewards/chosen", "chosen", None), ("rewards/rejected", "rejected", None),
                               ("rewards/margins", "margin", None), ("eval_rewards/margins", "held-out margin", "o"),
                               ("eval_rewards/accuracies", "held-out accuracy", "s")):
        points = [(row["step"], row[key]) for row in log_history if key in row and "step" in row]
        if points:
            ax.plot(*zip(*points, strict=True), marker=marker, label=label)
    ax.axhline(0, color="grey", linewidth=0.5)
    ax.set_xlabel("step")
    ax.set_ylabel("reward (beta x log-ratio to the reference)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def evaluation_summary(evaluation: dict) -> dict[str, Any]:
    """What run_manifest.json records of an evaluation: eval_results.json less the sample replies."""
    return {key: value for key, value in evaluation.items() if key != "samples"}


def plot_loss(log_history: list[dict[str, Any]], path: Path) -> None:
    """loss.png: the train and eval loss; beside it, for a dpo/kto run, its rewards (plot_rewards)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rewards = any("rewards/chosen" in row for row in log_history)
    fig, axes = plt.subplots(1, 2 if rewards else 1, figsize=(13 if rewards else 7, 4), squeeze=False)
    ax = axes[0][0]
    if rewards:
        plot_rewards(axes[0][1], log_history)
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        points = [(row["step"], row[key]) for row in log_history if key in row and "step" in row]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o" if key == "eval_loss" else None, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def point_adapter_at_base(adapter_dir: Path, base: BaseReference) -> None:
    """adapter_config.json names the base as PEFT reads it from any folder: absolute path or Hub id
    (+ revision), not the possibly relative path training ran with."""
    path = adapter_dir / "adapter_config.json"
    config = read_json_object(path)
    config["base_model_name_or_path"] = base.source
    config["revision"] = base.revision
    write_json_atomic(path, config)


def save_adapter(trainer, tokenizer, chat_template: str, dest: Path, state_dict: dict | None = None) -> None:
    """The trained adapter and the tokenizer. A dpo/kto run that continued an adapter also holds TRL's frozen copy
    of it (the reference, "ref"): only the trained one ("default") is the run's adapter."""
    if state_dict is None:
        save_trained_adapter(trainer.model, dest)
    else:  # FSDP: the full state dict every rank gathered (distributed.full_adapter_state)
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(dest, state_dict=state_dict)
    save_tokenizer(tokenizer, chat_template, dest)


def save_trained_adapter(model, dest: Path) -> None:
    """The trained adapter ("default") alone: PEFT would also write TRL's frozen reference copy into dest/ref."""
    others = [name for name in getattr(model, "peft_config", {}) if name != "default"]
    model.save_pretrained(dest, **({"selected_adapters": ["default"]} if others else {}))


def save_tokenizer(tokenizer, chat_template: str, dest: Path) -> None:
    """The tokenizer files with the inference template (data.extend_template's: what training rendered, without
    the masked training twin's markers)."""
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(dest)


@dataclass
class TrainedRun:
    """What training hands to the writer: what was trained, on which data, and how it went."""

    recipe: Recipe
    trainer: Any  # the SFTTrainer: its model holds the adapter, its args the batch settings
    tokenizer: Any
    chat_template: str  # the inference template (not the masked training twin)
    data_report: dict
    split_path: Path
    metrics: dict
    log_history: list
    started: float
    finished: float
    samples: list[Sample]
    state_dict: dict | None = None  # FSDP: the adapter gathered from every rank
    checkpoint: dict | None = None  # checkpoint.checkpoint_record of the newest complete checkpoint
    parent: dict | None = None  # dpo/kto: the adapter the run continued (parent.Parent.identity)
    evaluation: dict | None = None  # the evaluate stage's report (eval_results.json)


def write_outputs(run: TrainedRun) -> dict[str, Any]:
    """Write the outputs into output.dir, whole: until the swap, the old ones (if any) stay as they were."""
    final = RunDir.of(run.recipe)
    with staging_folder(final.staging) as staging:
        staging.mkdir(parents=True)
        manifest = _write_staged(run, RunDir(staging), final.root.resolve().name)
    swap_in_outputs(RunDir(staging), final)
    if final.metrics.is_file():
        make_shareable(final.metrics)  # appended to during training, outside the staging folder
    return manifest


def _write_staged(run: TrainedRun, staged: RunDir, name: str) -> dict[str, Any]:
    recipe, trainer, data_report, metrics = run.recipe, run.trainer, run.data_report, run.metrics
    base = base_reference(recipe.model)
    adapter = staged.adapter
    save_adapter(trainer, run.tokenizer, run.chat_template, adapter, run.state_dict)
    point_adapter_at_base(adapter, base)
    heldout = heldout_metrics(run.log_history) if recipe.method != "sft" else None
    manifest = build_manifest(recipe, data_report, run.split_path, metrics, trainer.args, run.started, run.finished,
                              base, run.checkpoint, run.parent, heldout, run.evaluation)
    write_json_atomic(staged.manifest, manifest)
    write_json_atomic(staged.data_report, data_report)
    if run.evaluation is not None:
        evaluate.write_results(staged.eval_results, run.evaluation)
    plot_loss(run.log_history, staged.loss_plot)
    card = model_card(recipe, data_report, metrics, run.samples, base, base_license(base), run.evaluation,
                      preference_section(recipe, data_report, heldout, run.parent))
    for folder in (staged.root, adapter):  # the adapter folder travels alone: its own copy of the card
        (folder / "README.md").write_text(card, encoding="utf-8")
    shutil.copyfile(staged.loss_plot, adapter / "loss.png")
    if recipe.output.gguf:
        gguf_lora.export(adapter, staged.gguf, base, _model_config(trainer), name=name)
    make_shareable(staged.root)
    return manifest


def _model_config(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    return model.config
