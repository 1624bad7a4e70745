"""Export stage: adapter, model card, run manifest and loss plot, written atomically into output.dir.

The outputs travel: the adapter names its base by absolute path or Hub id, holds the model card,
tokenizer and chat template itself, and every output is readable by other users (0644, folders 0755): adapter/,
gguf/, merged/, the card, manifest, metrics, loss plot and data report. Modes are set on these alone, never on
anything else in output.dir: prepared/ and checkpoints/ keep what the umask gives.
"""

import json
import os
import platform
import shutil
import stat
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

from qctrain import PROVENANCE_VARS, __version__, distributed
from qctrain.atomic import read_json_object, staging_folder, swap_in_folder, write_json_atomic
from qctrain.errors import InputError
from qctrain.model import BaseReference, base_reference
from qctrain.recipe import Recipe, dump_recipe
from qctrain.rundir import RunDir
from qctrain.secretmask import mask

MERGED_MARKER = ".qctrain-merged"  # in a merged model's folder: qctrain wrote it, a later merge may replace it
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
                   checkpoint: dict | None = None, evaluation: dict | None = None) -> dict[str, Any]:
    from qctrain.checkpoint import recipe_fingerprint

    world = distributed.world_size()
    return {
        "qctrain_version": __version__,
        "recipe": recipe.model_dump(mode="json"),
        "recipe_sha256": recipe.sha256(),
        "recipe_fingerprint": recipe_fingerprint(recipe),  # the training recipe's, as checkpoints record it
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


def evaluation_summary(evaluation: dict) -> dict[str, Any]:
    """What run_manifest.json records of an evaluation: eval_results.json less the sample replies."""
    return {key: value for key, value in evaluation.items() if key != "samples"}


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
def generate_replies(model, tokenizer, conversations: list[list[dict] | dict], max_new_tokens: int = 48,
                     chat_template: str | None = None, tools: list[dict] | None = None) -> list[str]:
    """Greedy replies; a conversation is a list of messages or {"messages", "tools"} (tools: for all of them
    otherwise); chat_template: the one to render with instead of the tokenizer's."""
    model.eval()
    replies = []
    for conversation in conversations:
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        these_tools = conversation.get("tools") if isinstance(conversation, dict) else tools
        inputs = tokenizer.apply_chat_template(messages, tools=these_tools or None, chat_template=chat_template,
                                               add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True).to(model.device)
        output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return replies


@dataclass
class Sample:
    prompt: str
    base: str | None  # the base model's reply (adapter disabled); None: not generated
    tuned: str


def before_after_samples(model, tokenizer, conversations: list[list[dict] | dict], max_new_tokens: int = 48,
                         chat_template: str | None = None, tools: list[dict] | None = None) -> list[Sample]:
    """Greedy replies to each conversation with the adapter, and with it disabled (the base model)."""
    tuned = generate_replies(model, tokenizer, conversations, max_new_tokens, chat_template, tools)
    base: list[str | None] = [None] * len(conversations)
    if conversations and hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            base = list(generate_replies(model, tokenizer, conversations, max_new_tokens, chat_template, tools))
    prompts = [(c["messages"] if isinstance(c, dict) else c)[-1]["content"] for c in conversations]
    return [Sample(p, b, t) for p, b, t in zip(prompts, base, tuned, strict=True)]


# Licenses of bases whose own card is often not at hand (from_pretrained does not fetch README.md):
# the default base's, as its Hub card states it.
KNOWN_LICENSES = {
    "microsoft/phi-3.5-mini-instruct": {
        "license": "mit", "license_link": "https://huggingface.co/microsoft/Phi-3.5-mini-instruct/resolve/main/LICENSE"},
}
LICENSE_KEYS = ("license", "license_name", "license_link")


def _base_file(base: BaseReference, filename: str) -> Path | None:
    """A file of the base model: in its folder, else in the Hugging Face cache, else downloaded (Hub
    bases, when online); None when it cannot be had."""
    from huggingface_hub import constants, hf_hub_download, try_to_load_from_cache

    if base.local:
        found = Path(base.source) / filename
        if found.is_file():
            return found
    repo = base.source if not base.local else base.hub_id
    if repo is None:
        return None
    revision = base.revision if not base.local else None
    cached = try_to_load_from_cache(repo, filename, revision=revision)
    if isinstance(cached, str):
        return Path(cached)
    if base.local or constants.HF_HUB_OFFLINE:
        return None
    try:
        return Path(hf_hub_download(repo, filename, revision=revision, etag_timeout=5))
    except Exception:  # noqa: BLE001 - an unreachable card only means the license stays unknown
        return None


def base_license(base: BaseReference) -> dict[str, str]:
    """license (and license_name, license_link) of the base model: from its model card, else its
    config.json, else KNOWN_LICENSES; empty when none says."""
    from huggingface_hub import metadata_load

    sources = []
    if readme := _base_file(base, "README.md"):
        try:
            sources.append(metadata_load(readme) or {})
        except (OSError, ValueError):
            pass
    if base.local:
        sources.append(read_json_object(Path(base.source) / "config.json"))
    sources.append(KNOWN_LICENSES.get((base.hub_id or "").lower(), {}))
    for meta in sources:
        if isinstance(meta.get("license"), str) and meta["license"]:
            return {k: meta[k] for k in LICENSE_KEYS if isinstance(meta.get(k), str) and meta[k]}
    return {}


def _cell(text: str | None) -> str:
    if text is None:
        return "_not generated_"
    text = text.strip()
    return text.replace("|", "\\|").replace("\n", "<br>") if text else "_(empty reply)_"


def samples_markdown(samples: list[Sample]) -> str:
    blocks = []
    for sample in samples:
        blocks.append(f"**Prompt:** {sample.prompt.strip()}\n\n"
                      f"| base model (adapter off) | with this adapter |\n|---|---|\n"
                      f"| {_cell(sample.base)} | {_cell(sample.tuned)} |")
    return "\n\n".join(blocks) or "_none_"


def card_data(recipe: Recipe, base: BaseReference, metrics: dict, license_info: dict[str, str],
              evaluation: dict | None = None):
    """The card's YAML metadata, through huggingface_hub's ModelCardData (model-index included: the evaluation's
    numbers of the tuned model where there is one, else the final eval loss)."""
    from huggingface_hub import EvalResult, ModelCardData

    from qctrain import evaluate

    datasets = [s.path.removeprefix("hub:") for s in recipe.data.sources if s.path.startswith("hub:")]
    eval_results = evaluate.card_results(evaluation) if evaluation else None
    if not eval_results and isinstance(metrics.get("eval_loss"), int | float):
        eval_sources = [s.path.removeprefix("hub:") for s in (recipe.data.eval.sources if recipe.data.eval else [])
                        if s.path.startswith("hub:")]
        where = eval_sources or datasets
        eval_results = [EvalResult(
            task_type="text-generation", task_name="Supervised fine-tuning",
            dataset_type=where[0] if where else "local", dataset_name="held-out evaluation split",
            metric_type="loss", metric_name="eval loss", metric_value=round(float(metrics["eval_loss"]), 4))]
    return ModelCardData(
        model_name=recipe.hub.repo_id if recipe.hub else Path(recipe.output.dir).name,
        base_model=base.hub_id,  # a Hub id or nothing, never a local path
        base_model_relation="adapter" if base.hub_id else None,
        library_name="peft",
        **license_info,
        tags=["qlora", "lora", "peft", "trl", "sft", "qc-train-phi"],
        datasets=datasets or None,
        pipeline_tag="text-generation",
        eval_results=eval_results,
    )


def model_card(recipe: Recipe, data_report: dict, metrics: dict, samples: list[Sample],
               base: BaseReference | None = None, license_info: dict[str, str] | None = None,
               evaluation: dict | None = None) -> str:
    from huggingface_hub import ModelCard

    base = base or base_reference(recipe.model)
    data = card_data(recipe, base, metrics, license_info or {}, evaluation)
    train = data_report.get("train", {})
    wanted = ("train_loss", "eval_loss", "eval_mean_token_accuracy", "train_runtime", "train_samples_per_second",
              "epoch")
    metric_rows = "\n".join(f"| {k} | {v:.4g} |" for k, v in metrics.items()
                            if k in wanted and isinstance(v, int | float))
    quant = recipe.model.quantization
    method = f"QLoRA ({quant.bits}-bit {quant.quant_type})" if quant else "LoRA"
    base_name = base.hub_id or f"a local model ({Path(base.source).name})"
    where_base = (f"the base loads from the Hub (`{base.hub_id}`)" if not base.local else
                  "the base is a local folder, named in `adapter_config.json` by its absolute path"
                  + (f" (a copy of `{base.hub_id}`)" if base.hub_id else ""))
    gguf = ("\n`gguf/` holds the adapter as a GGUF LoRA for llama.cpp (`--lora`) and Ollama (`ADAPTER`).\n"
            if recipe.output.gguf else "")
    license_line = (f"License: `{license_info['license']}`, the base model's." if license_info and
                    license_info.get("license") else "License: that of the base model (not stated in its files).")
    content = f"""---
{data.to_yaml()}
---

# LoRA adapter for {base_name}

Trained with [qc-train-phi](https://github.com/qc-train-phi/qc-train-phi) {__version__}: {method},
rank {recipe.lora.r}, alpha {recipe.lora.alpha}, targets {recipe.lora.target_modules}. {license_line}

## Use it

```python
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer

model = AutoPeftModelForCausalLM.from_pretrained("<this repo or folder>")
tokenizer = AutoTokenizer.from_pretrained("<this repo or folder>")  # with the chat template
```

The folder is complete (weights, tokenizer, chat template, this card); {where_base}.
{gguf}
## Data

{data_report.get("records_read", 0)} records read, {data_report.get("duplicates", 0)} duplicates removed;
{train.get("records", 0)} training records ({train.get("tokens", 0)} tokens,
{train.get("supervised_fraction", 0):.1%} supervised), {data_report.get("eval", {}).get("records", 0)} held out.

## Results

| metric | value |
|---|---|
{metric_rows}

![loss](loss.png)
{evaluation_section(evaluation) if evaluation else ""}
## Sample generations (held-out prompts)

Greedy, at most {(evaluation or {}).get("max_new_tokens") or 48} new tokens, {samples_when(evaluation)}.

{samples_markdown(samples)}

## Recipe

```yaml
{dump_recipe(recipe)}```
"""
    return mask(ModelCard(content).content)  # samples and data counts quote the data: no secret in a card


def samples_when(evaluation: dict | None) -> str:
    return ("generated by the evaluation, base and tuned in one batch each" if evaluation and evaluation.get("samples")
            else "generated at the end of training")


def evaluation_section(evaluation: dict) -> str:
    """The card's base-against-tuned table (evaluate.card_table) with what was measured how."""
    from qctrain import evaluate

    if evaluation.get("skipped"):
        return f"\n## Evaluation: base vs tuned\n\nNot evaluated: {evaluation['skipped']}\n"
    how = [f"lm-evaluation-harness {evaluation['lm_eval_version']}" if evaluation.get("lm_eval_version") else None,
           f"{evaluation['num_fewshot']}-shot" if evaluation.get("num_fewshot") is not None else None,
           f"limit {evaluation['limit']} documents per task" if evaluation.get("limit") is not None else None]
    note = ("The base is the same 4-bit model with the adapter disabled. "
            + (", ".join(h for h in how if h) + ". " if any(how) else "")
            + ("Stopped before the end: some results are missing. " if evaluation.get("stopped") else ""))
    return f"\n## Evaluation: base vs tuned\n\n{note.strip()}\n\n{evaluate.card_table(evaluation)}\n"


def make_shareable(root: Path) -> None:
    """root (a file, or a folder and everything under it) 0644 for files and 0755 for folders (safetensors writes
    0600 whatever the umask), so a serving process under another uid on a shared volume can read the outputs.
    Only ever called on what this run wrote: its staging folders and its own files."""
    paths = [root, *root.rglob("*")] if root.is_dir() else [root]
    for path in paths:
        try:
            mode = path.lstat().st_mode
            if stat.S_ISDIR(mode):
                path.chmod(0o755)
            elif stat.S_ISREG(mode):
                path.chmod(0o644)
        except (PermissionError, FileNotFoundError):  # another user's file, or gone meanwhile
            pass


def point_adapter_at_base(adapter_dir: Path, base: BaseReference) -> None:
    """adapter_config.json names the base as PEFT reads it from any folder: absolute path or Hub id
    (+ revision), not the possibly relative path training ran with."""
    path = adapter_dir / "adapter_config.json"
    config = read_json_object(path)
    config["base_model_name_or_path"] = base.source
    config["revision"] = base.revision
    write_json_atomic(path, config)


def save_adapter(trainer, tokenizer, chat_template: str, dest: Path, state_dict: dict | None = None) -> None:
    if state_dict is None:
        trainer.model.save_pretrained(dest)
    else:  # FSDP: the full state dict every rank gathered (distributed.full_adapter_state)
        trainer.accelerator.unwrap_model(trainer.model).save_pretrained(dest, state_dict=state_dict)
    save_tokenizer(tokenizer, chat_template, dest)


def save_tokenizer(tokenizer, chat_template: str, dest: Path) -> None:
    """The tokenizer files with the inference template (data.extend_template's: what training rendered, without
    the masked training twin's markers)."""
    tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(dest)


def publish_atomically(staging: Path, output_dir: Path) -> None:
    """Move finished outputs from staging into place; a good old adapter is only replaced by a whole new one."""
    staged, final = RunDir(staging), RunDir(output_dir)
    swap_in_folder(staged.adapter, final.adapter)
    if staged.gguf.is_dir():
        swap_in_folder(staged.gguf, final.gguf)
    # run_manifest.json last: its presence says the outputs beside it are complete (checkpoint.ResumePlan)
    for name in sorted(RunDir.FINAL_FILES, key=lambda name: name == "run_manifest.json"):
        if (staging / name).exists():
            os.replace(staging / name, output_dir / name)
    shutil.rmtree(staging, ignore_errors=True)


@dataclass
class FinishedRun:
    """What a finished training run hands to export: what was trained, on which data, and how it went."""

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
    evaluation: dict | None = None  # the evaluate stage's report (eval_results.json)


def write_outputs(run: FinishedRun) -> dict[str, Any]:
    output_dir = Path(run.recipe.output.dir)
    with staging_folder(output_dir / f".staging-{os.getpid()}") as staging:
        staging.mkdir(parents=True)
        manifest = _write_staged(run, staging)
    publish_atomically(staging, output_dir)
    if RunDir(output_dir).metrics.is_file():
        make_shareable(RunDir(output_dir).metrics)  # appended to during training, outside the staging folder
    return manifest


def _write_staged(run: FinishedRun, staging: Path) -> dict[str, Any]:
    recipe, trainer, data_report, metrics = run.recipe, run.trainer, run.data_report, run.metrics
    output_dir = Path(recipe.output.dir)
    base = base_reference(recipe.model)
    staged = RunDir(staging)
    adapter = staged.adapter
    save_adapter(trainer, run.tokenizer, run.chat_template, adapter, run.state_dict)
    point_adapter_at_base(adapter, base)
    manifest = build_manifest(recipe, data_report, run.split_path, metrics, trainer.args, run.started, run.finished,
                              base, run.checkpoint, run.evaluation)
    write_json_atomic(staged.manifest, manifest)
    write_json_atomic(staged.data_report, data_report)
    if run.evaluation is not None:
        from qctrain import evaluate

        evaluate.write_results(staged.eval_results, run.evaluation)
    plot_loss(run.log_history, staged.loss_plot)
    card = model_card(recipe, data_report, metrics, run.samples, base, base_license(base), run.evaluation)
    for folder in (staging, adapter):  # the adapter folder travels alone: its own copy of the card
        (folder / "README.md").write_text(card, encoding="utf-8")
    shutil.copyfile(staged.loss_plot, adapter / "loss.png")
    if recipe.output.gguf:
        from qctrain import gguf_adapter

        gguf_adapter.export(adapter, staged.gguf, base, _model_config(trainer), name=output_dir.resolve().name)
    make_shareable(staging)
    return manifest


def _model_config(trainer):
    model = trainer.accelerator.unwrap_model(trainer.model) if hasattr(trainer, "accelerator") else trainer.model
    return model.config


def load_base_for_merge(base_cfg, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    from qctrain.modelfiles import model_source

    try:
        return AutoModelForCausalLM.from_pretrained(model_source(base_cfg), dtype=dtype, revision=base_cfg.revision,
                                                    trust_remote_code=base_cfg.trust_remote_code)
    except (OSError, ValueError) as err:
        raise InputError(f"cannot load the base model {base_cfg.name}: {str(err).splitlines()[0]}") from None


def merge_adapter(output_dir: Path, dest: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A standalone model: the base loaded unquantized in `dtype`, with the adapter merged into it.
    Written next to `dest` first, then moved into place. Works from any folder; a base or adapter
    that cannot be loaded is an input error (exit 2) naming the cause."""
    from huggingface_hub import ModelCardData
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qctrain.model import run_model_section

    cfg = run_model_section(output_dir)
    check_merge_dest(output_dir, dest)
    adapter = output_dir / "adapter"
    base = load_base_for_merge(cfg, dtype)
    try:
        merged = PeftModel.from_pretrained(base, adapter).merge_and_unload()
        tokenizer = AutoTokenizer.from_pretrained(adapter)
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f"{adapter}: cannot load the adapter onto {cfg.name}: {str(err).splitlines()[0]}") from None
    reference = base_reference(cfg)  # cfg: as resolved from here, its hub_id included
    hub_id = reference.hub_id
    needed = sum(p.numel() * p.element_size() for p in merged.parameters())
    with staging_folder(dest.parent / f".{dest.name}.staging-{os.getpid()}", needed) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        card_data = ModelCardData(base_model=hub_id, base_model_relation="merge" if hub_id else None,
                                  library_name="transformers", **base_license(reference),
                                  tags=["qlora", "merged", "qc-train-phi"], pipeline_tag="text-generation")
        title = hub_id or Path(cfg.name).name
        card = f"---\n{card_data.to_yaml()}\n---\n\n# {title} with a merged LoRA adapter\n\n" \
               f"The adapter from `{output_dir.name}` merged into the base in {str(dtype).removeprefix('torch.')} " \
               f"by qc-train-phi {__version__}. See the adapter's card for data and metrics.\n"
        (staging / "README.md").write_text(mask(card), encoding="utf-8")
        (staging / MERGED_MARKER).write_text(f"qc-train-phi {__version__}\n", encoding="utf-8")
    make_shareable(staging)
    swap_in_folder(staging, dest)
    return dest


def check_merge_dest(output_dir: Path, dest: Path) -> None:
    """A merge replaces `dest` whole: it must be absent, empty, or a merged model qctrain wrote (its marker)."""
    if dest.resolve() == RunDir(output_dir).merged.resolve() or not dest.exists():
        return
    if not dest.is_dir():
        raise InputError(f"--dest {dest}: is a file, not a folder")
    if any(dest.iterdir()) and not (dest / MERGED_MARKER).is_file():
        raise InputError(f"--dest {dest}: holds files qctrain did not write, and a merge replaces the folder whole; "
                         "name a new or empty folder")


def write_gguf(output_dir: Path, outtype: str = "f32", base_gguf: str | None = None):
    """`qctrain export --gguf`: the finished run's adapter as a GGUF LoRA and Modelfile in output_dir/gguf."""
    from qctrain import gguf_adapter, model

    cfg = model.run_model_section(output_dir)
    dest = RunDir(output_dir).gguf
    with staging_folder(output_dir / f".gguf.staging-{os.getpid()}") as staging:
        done = gguf_adapter.export(RunDir(output_dir).adapter, staging, model.base_reference(cfg),
                                   model.load_config(cfg), outtype, base_gguf, name=output_dir.resolve().name)
    make_shareable(staging)
    swap_in_folder(staging, dest)
    return done


# --- evaluating a finished run, an adapter folder or a Hub adapter (`qctrain eval`) ---

@dataclass
class EvalTarget:
    """What `qctrain eval` evaluates and where the results go."""

    source: str  # a finished run's folder, an adapter folder or a Hub id, as given
    recipe: Recipe  # the run's own (its evaluate: from --recipe, --set applied), or --recipe's
    run: RunDir | None  # a finished run: the results go into it (eval_results.json, manifest, card, metrics)
    out: Path  # the folder eval_results.json goes into


def _run_recipe(run: RunDir, recipe_path: str | None, overrides: list[str]) -> Recipe:
    """The recipe a finished run was trained with, its evaluate: section taken from `recipe_path` if given, then
    the --set overrides."""
    from pydantic import ValidationError

    from qctrain.recipe import RecipeError, apply_override, describe_errors, gate_problems, load_recipe

    data = run.read_manifest()["recipe"]
    if recipe_path is not None:
        other = load_recipe(recipe_path)
        data["evaluate"] = other.evaluate.model_dump(mode="json") if other.evaluate else None
    for assignment in overrides:
        apply_override(data, assignment)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        raise RecipeError(run.manifest, describe_errors(err)) from None
    if problems := gate_problems(recipe):
        raise RecipeError(run.manifest, problems)
    return recipe


def eval_target(source: str, recipe_path: str | None, overrides: list[str], out: str | None) -> EvalTarget:
    from qctrain.recipe import hub_id_problem, load_recipe

    path = Path(source)
    if RunDir(path).manifest.is_file():
        run = RunDir(path)
        return EvalTarget(source, _run_recipe(run, recipe_path, overrides), run, Path(out) if out else path)
    is_adapter = (path / "adapter_config.json").is_file()
    if not is_adapter and (path.exists() or hub_id_problem(source, owner_required=True)):
        raise InputError(f"{source}: neither a finished run (no run_manifest.json) nor an adapter folder (no "
                         "adapter_config.json), nor a Hub id")
    if recipe_path is None:
        raise InputError(f"{source}: an adapter needs --recipe RECIPE: its model: section names the base (and how to "
                         "load it), its evaluate: section what to measure, its data: the held-out split")
    if out is None and not is_adapter:
        raise InputError(f"{source}: a Hub adapter needs --out FOLDER for eval_results.json")
    return EvalTarget(source, load_recipe(recipe_path, overrides), None, Path(out) if out else path)


def _load_for_eval(target: EvalTarget):
    """(the model with its adapter, the adapter's tokenizer, the tokenizer training prepared the data with)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qctrain import model

    if target.run is not None:
        peft_model, tokenizer = model.load_adapter_model(target.run.root)
        return peft_model, tokenizer, model.load_tokenizer(model.run_model_section(target.run.root))
    cfg = target.recipe.model
    data_tokenizer = model.load_tokenizer(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(target.source)
    except (OSError, ValueError):  # an adapter without its tokenizer: the base's
        tokenizer = data_tokenizer
    base = model.load_base_model(cfg)
    try:
        return PeftModel.from_pretrained(base, target.source), tokenizer, data_tokenizer
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f"{target.source}: cannot load the adapter onto {cfg.name}: "
                         f"{str(err).splitlines()[0]}") from None


def evaluate_saved(target: EvalTarget, say=print, should_stop=lambda: False) -> dict[str, Any]:
    """Evaluate a saved adapter against its base: load it once (4-bit base + adapter), held-out numbers through a
    trainer that only evaluates (the run's prepared eval split: its cache in a run folder), lm-eval tasks, samples
    for the held-out prompts, the gate's verdict. Nothing is written here (record_evaluation, write_results)."""
    import tempfile

    from qctrain import data, evaluate, train
    from qctrain.recipe import EvaluateSection

    recipe = target.recipe
    section = recipe.evaluate or EvaluateSection()
    peft_model, tokenizer, data_tokenizer = _load_for_eval(target)
    held, prompts = None, []
    with tempfile.TemporaryDirectory(prefix="qctrain-eval-") as scratch:
        workdir = target.run.root if target.run is not None else Path(scratch)
        if section.heldout and recipe.data.eval is not None:
            prepared = data.prepare(recipe.data, data_tokenizer, workdir)
            prompts = prepared.report.get("heldout_prompts", [])
            if prepared.eval is not None and len(prepared.eval):
                trainer = train.eval_trainer(recipe, peft_model, data_tokenizer, prepared.eval, workdir)
                held = evaluate.heldout(trainer, records=prepared.report.get("eval", {}).get("records"))
        elif target.run is not None:
            prompts = read_json_object(target.run.data_report).get("heldout_prompts", [])
        report = evaluate.evaluate_model(peft_model, tokenizer, section, prompts, None, held, say, should_stop)
    report["source"] = target.source
    return report


def _last_step(metrics: Path) -> int | None:
    steps = []
    if metrics.is_file():
        for line in metrics.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and "model" not in row and isinstance(row.get("step"), int):
                steps.append(row["step"])
    return max(steps, default=None)


def record_evaluation(output_dir: Path, report: dict[str, Any]) -> None:
    """A finished run's new evaluation, into its files: eval_results.json, the manifest's `evaluation`, the model
    card (beside the adapter too) with the table and model-index entries, and two rows of metrics.jsonl."""
    from qctrain import evaluate, model

    run = RunDir(output_dir)
    manifest = run.read_manifest()
    recipe = Recipe.model_validate(manifest["recipe"])
    evaluate.append_metrics(run.metrics, evaluate.metrics_rows(report, _last_step(run.metrics)))
    evaluate.write_results(run.eval_results, report)
    cfg = model.run_model_section(output_dir)
    base = base_reference(cfg)
    samples = [Sample(**sample) for sample in report.get("samples") or []]
    card = model_card(recipe, read_json_object(run.data_report), manifest.get("metrics") or {}, samples, base,
                      base_license(base), report)
    for folder in (run.adapter, run.root):  # the root's last: the adapter folder travels alone
        staged = folder / f".README.md.tmp-{os.getpid()}"
        staged.write_text(card, encoding="utf-8")
        staged.chmod(0o644)
        os.replace(staged, folder / "README.md")
    write_json_atomic(run.manifest, {**manifest, "evaluation": evaluation_summary(report)}, shared=True)
