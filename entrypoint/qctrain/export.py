"""Export stage: adapter, model card, run manifest and loss plot, written atomically into output.dir."""

import json
import os
import platform
import shutil
import sys
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from qctrain import __version__
from qctrain.atomic import write_json_atomic
from qctrain.recipe import Recipe, dump_recipe

PACKAGES = ["torch", "transformers", "trl", "peft", "bitsandbytes", "accelerate", "datasets",
            "huggingface-hub", "pydantic", "tokenizers", "safetensors"]
PROVENANCE_ENV = ["QCTRAIN_IMAGE_VERSION", "QCTRAIN_GIT_REVISION", "QCTRAIN_IMAGE_DIGEST", "QCTRAIN_BUILD_DATE"]
FINAL_FILES = ["README.md", "run_manifest.json", "loss.png", "data_report.json"]


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
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
    }


def provenance() -> dict[str, str | None]:
    return {name.removeprefix("QCTRAIN_").lower(): os.environ.get(name) for name in PROVENANCE_ENV}


def iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


def build_manifest(recipe: Recipe, data_report: dict, split_path: Path, metrics: dict, args,
                   started: float, finished: float) -> dict[str, Any]:
    world = int(os.environ.get("WORLD_SIZE", 1))
    return {
        "qctrain_version": __version__,
        "recipe": recipe.model_dump(mode="json"),
        "recipe_sha256": recipe.sha256(),
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
    }


def plot_loss(log_history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
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


@torch.no_grad()
def generate_replies(model, tokenizer, conversations: list[list[dict]], max_new_tokens: int = 48) -> list[str]:
    model.eval()
    replies = []
    for messages in conversations:
        inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True).to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return replies


def model_card(recipe: Recipe, data_report: dict, metrics: dict, samples: list[tuple[str, str]]) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    datasets = [s.path.removeprefix("hub:") for s in recipe.data.sources if s.path.startswith("hub:")]
    card_data = ModelCardData(
        base_model=recipe.model.name,
        library_name="peft",
        license="other",
        tags=["qlora", "lora", "peft", "trl", "sft", "qc-train-phi"],
        datasets=datasets or None,
        pipeline_tag="text-generation",
    )
    train = data_report.get("train", {})
    wanted = ("train_loss", "eval_loss", "train_runtime", "train_samples_per_second", "epoch")
    metric_rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in metrics.items()
                            if k in wanted and isinstance(v, int | float))
    sample_text = "\n\n".join(f"**Prompt:** {p}\n\n**Reply:** {r}" for p, r in samples) or "_none_"
    quant = recipe.model.quantization
    method = f"QLoRA ({quant.bits}-bit {quant.quant_type})" if quant else "LoRA"
    content = f"""---
{card_data.to_yaml()}
---

# LoRA adapter for {recipe.model.name}

Trained with [qc-train-phi](https://github.com/qc-train-phi/qc-train-phi) {__version__}: {method},
rank {recipe.lora.r}, alpha {recipe.lora.alpha}, targets {recipe.lora.target_modules}.

```python
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained("<this repo or folder>")
```

## Data

{data_report.get("records_read", 0)} records read, {data_report.get("duplicates", 0)} duplicates removed;
{train.get("records", 0)} training records ({train.get("tokens", 0)} tokens,
{train.get("supervised_fraction", 0):.1%} supervised), {data_report.get("eval", {}).get("records", 0)} held out.

## Results

| metric | value |
|---|---|
{metric_rows}

![loss](loss.png)

## Sample generations (held-out prompts)

{sample_text}

## Recipe

```yaml
{dump_recipe(recipe)}```
"""
    return ModelCard(content).content


def save_adapter(trainer, tokenizer, chat_template: str, dest: Path, state_dict: dict | None = None) -> None:
    if state_dict is None:
        trainer.model.save_pretrained(dest)
    else:  # FSDP: the full state dict every rank gathered (distributed.full_adapter_state)
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(dest, state_dict=state_dict)
    tokenizer.chat_template = chat_template  # the inference template, not the masked training twin
    tokenizer.save_pretrained(dest)


def _aside(dest: Path) -> Path:
    return dest.parent / f".{dest.name}.old"


def restore_interrupted_swap(dest: Path) -> None:
    """A crash between the two renames of replace_dir leaves the good folder aside: put it back."""
    if not dest.exists() and _aside(dest).exists():
        os.replace(_aside(dest), dest)


def replace_dir(new: Path, dest: Path) -> None:
    """Put the finished folder `new` at `dest`; the old one is moved aside first, never half-overwritten."""
    restore_interrupted_swap(dest)
    shutil.rmtree(_aside(dest), ignore_errors=True)
    if dest.exists():
        os.replace(dest, _aside(dest))
    os.replace(new, dest)
    shutil.rmtree(_aside(dest), ignore_errors=True)


def publish_atomically(staging: Path, output_dir: Path) -> None:
    """Move finished outputs from staging into place; a good old adapter is only replaced by a whole new one."""
    replace_dir(staging / "adapter", output_dir / "adapter")
    for name in FINAL_FILES:
        if (staging / name).exists():
            os.replace(staging / name, output_dir / name)
    shutil.rmtree(staging, ignore_errors=True)


def write_outputs(recipe: Recipe, trainer, tokenizer, chat_template: str, data_report: dict, split_path: Path,
                  metrics: dict, log_history: list, started: float, finished: float,
                  samples: list[tuple[str, str]], state_dict: dict | None = None) -> dict[str, Any]:
    output_dir = Path(recipe.output.dir)
    staging = output_dir / f".staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    save_adapter(trainer, tokenizer, chat_template, staging / "adapter", state_dict)
    manifest = build_manifest(recipe, data_report, split_path, metrics, trainer.args, started, finished)
    write_json_atomic(staging / "run_manifest.json", manifest)
    write_json_atomic(staging / "data_report.json", data_report)
    plot_loss(log_history, staging / "loss.png")
    (staging / "README.md").write_text(model_card(recipe, data_report, metrics, samples), encoding="utf-8")
    publish_atomically(staging, output_dir)
    return manifest


def merge_adapter(output_dir: Path, dest: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A standalone model: the base loaded unquantized in `dtype`, with the adapter merged into it.
    Written next to `dest` first, then moved into place."""
    from huggingface_hub import ModelCardData
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qctrain.model import model_source, run_model_section

    cfg = run_model_section(output_dir)
    base = AutoModelForCausalLM.from_pretrained(model_source(cfg), dtype=dtype, revision=cfg.revision,
                                                trust_remote_code=cfg.trust_remote_code)
    merged = PeftModel.from_pretrained(base, output_dir / "adapter").merge_and_unload()
    staging = dest.parent / f".{dest.name}.staging-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    merged.save_pretrained(staging)
    AutoTokenizer.from_pretrained(output_dir / "adapter").save_pretrained(staging)
    card_data = ModelCardData(base_model=cfg.name, library_name="transformers", license="other",
                              tags=["qlora", "merged", "qc-train-phi"], pipeline_tag="text-generation")
    card = f"---\n{card_data.to_yaml()}\n---\n\n# {cfg.name} with a merged LoRA adapter\n\n" \
           f"The adapter from `{output_dir.name}` merged into the base in {str(dtype).removeprefix('torch.')} " \
           f"by qc-train-phi {__version__}. See the adapter's card for data and metrics.\n"
    (staging / "README.md").write_text(card, encoding="utf-8")
    replace_dir(staging, dest)
    return dest
