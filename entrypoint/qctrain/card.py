"""The model cards, as text: the adapter's (YAML metadata through huggingface_hub's ModelCardData, how it was
trained, the data counts, the metrics, before/after samples and the recipe) and a merged model's. The writer
(outputs) and the merge (finished.merge) put them on disk. Every card is masked: it quotes the data."""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qctrain import __version__
from qctrain.basemodel.reference import BaseReference, base_reference
from qctrain.recipe import HELDOUT_METRICS, Recipe, dump_recipe
from qctrain.rundir import RunDir
from qctrain.secretmask import mask

CARD_METRICS = ("train_loss", "eval_loss", "eval_mean_token_accuracy", "train_runtime", "train_samples_per_second",
                "epoch")
TAGS = ["qlora", "lora", "peft", "trl", "qc-train-phi"]  # and the recipe's method: sft, dpo, kto
TASKS = {"sft": "Supervised fine-tuning", "dpo": "Preference tuning (DPO)", "kto": "Preference tuning (KTO)"}
LM_EVAL_URL = "https://github.com/EleutherAI/lm-evaluation-harness"


@dataclass
class Sample:
    prompt: str
    base: str | None  # the base model's reply (adapter disabled); None: not generated
    tuned: str


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


def _hub_datasets(sources) -> list[str]:
    return [s.path.removeprefix("hub:") for s in sources if s.path.startswith("hub:")]


def card_data(recipe: Recipe, base: BaseReference, metrics: dict, license_info: dict[str, str],
              evaluation: dict | None = None):
    """The card's YAML metadata, through huggingface_hub's ModelCardData (model-index included: the evaluation's
    numbers of the tuned model where there is one, else the final eval loss)."""
    from huggingface_hub import EvalResult, ModelCardData

    datasets = _hub_datasets(recipe.data.sources)
    eval_results = evaluation_results(evaluation) if evaluation else None
    if not eval_results and isinstance(metrics.get("eval_loss"), int | float):
        where = _hub_datasets(recipe.data.eval.sources if recipe.data.eval else []) or datasets
        eval_results = [EvalResult(
            task_type="text-generation", task_name=TASKS[recipe.method],
            dataset_type=where[0] if where else "local", dataset_name="held-out evaluation split",
            metric_type="loss", metric_name="eval loss", metric_value=round(float(metrics["eval_loss"]), 4))]
    return ModelCardData(
        model_name=recipe.hub.repo_id if recipe.hub else RunDir.of(recipe).root.name,
        base_model=base.hub_id,  # a Hub id or nothing, never a local path
        base_model_relation="adapter" if base.hub_id else None,
        library_name="peft",
        **license_info,
        tags=[*TAGS, recipe.method],
        datasets=datasets or None,
        pipeline_tag="text-generation",
        eval_results=eval_results,
    )


def _facts(recipe: Recipe, data_report: dict, metrics: dict, base: BaseReference,
           license_info: dict[str, str]) -> dict[str, str]:
    """The card's sentences and tables, each filled in from the run."""
    quant = recipe.model.quantization
    train = data_report.get("train", {})
    return {
        "base_name": base.hub_id or f"a local model ({Path(base.source).name})",
        "method": (f"QLoRA ({quant.bits}-bit {quant.quant_type})" if quant else "LoRA")
                  + ("" if recipe.method == "sft" else f", {recipe.method.upper()}"),
        "license": (f"License: `{license_info['license']}`, the base model's." if license_info.get("license")
                    else "License: that of the base model (not stated in its files)."),
        "where_base": (f"the base loads from the Hub (`{base.hub_id}`)" if not base.local else
                       "the base is a local folder, named in `adapter_config.json` by its absolute path"
                       + (f" (a copy of `{base.hub_id}`)" if base.hub_id else "")),
        "gguf": ("\n`gguf/` holds the adapter as a GGUF LoRA for llama.cpp (`--lora`) and Ollama (`ADAPTER`).\n"
                 if recipe.output.gguf else ""),
        "data": (f"{data_report.get('records_read', 0)} records read, {data_report.get('duplicates', 0)} duplicates "
                 f"removed;\n{train.get('records', 0)} training records ({train.get('tokens', 0)} tokens,\n"
                 f"{train.get('supervised_fraction', 0):.1%} supervised), "
                 f"{data_report.get('eval', {}).get('records', 0)} held out."),
        "metrics": "\n".join(f"| {k} | {v:.4g} |" for k, v in metrics.items()
                             if k in CARD_METRICS and isinstance(v, int | float)),
    }


# The adapter's card: its YAML metadata, then what it is, how to use it, its data, results, samples and recipe.
CARD = """---
{metadata}
---

# LoRA adapter for {base_name}

Trained with [qc-train-phi](https://github.com/qc-train-phi/qc-train-phi) {version}: {method},
rank {rank}, alpha {alpha}, targets {targets}. {license}

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

{data}

## Results

| metric | value |
|---|---|
{metrics}
{preference}
![loss](loss.png)
{evaluation}
## Sample generations (held-out prompts)

Greedy, at most {max_new_tokens} new tokens, {samples_when}.

{samples}

## Recipe

```yaml
{recipe}```
"""


def model_card(recipe: Recipe, data_report: dict, metrics: dict, samples: list[Sample],
               base: BaseReference | None = None, license_info: dict[str, str] | None = None,
               evaluation: dict | None = None, preference: str = "") -> str:
    """The adapter's card; evaluation: the evaluate stage's report; preference: a dpo/kto run's section
    (preference_section)."""
    from huggingface_hub import ModelCard

    base = base or base_reference(recipe.model)
    license_info = license_info or {}
    content = CARD.format(metadata=card_data(recipe, base, metrics, license_info, evaluation).to_yaml(),
                          version=__version__, rank=recipe.lora.r, alpha=recipe.lora.alpha,
                          targets=recipe.lora.target_modules, samples=samples_markdown(samples),
                          recipe=dump_recipe(recipe), preference=f"\n{preference}\n" if preference else "",
                          **_facts(recipe, data_report, metrics, base, license_info), **_evaluation_facts(evaluation))
    return mask(ModelCard(content).content)  # samples and data counts quote the data: no secret in a card


PREFERENCE_ROWS = {"rewards/accuracies": "reward accuracy", "rewards/margins": "reward margin",
                   "loss": "{method} loss", "kl": "KL (policy vs reference)"}
CONTINUED = {"run": "the qctrain run", "adapter": "the adapter", "hub": "the Hub adapter"}


def preference_section(recipe: Recipe, data_report: dict, heldout: dict | None, parent: dict | None) -> str:
    """A dpo/kto run's words on where it started (the adapter it continued, by its hashes, or the bare base) and
    its held-out preference metrics at step 0 and at the end ("" for SFT)."""
    if recipe.method == "sft":
        return ""
    lines = ["## Preference tuning", ""]
    if parent:
        lines.append(f"Continues {CONTINUED[parent['kind']]} `{parent['adapter']}`"
                     + (f" ({parent['method'].upper()})" if parent.get("method") else "")
                     + f": adapter sha256 `{parent['adapter_sha256']}`"
                     + (f", run manifest sha256 `{parent['manifest_sha256']}`" if parent.get("manifest_sha256") else "")
                     + (f", revision `{parent['revision']}`" if parent.get("revision") else "")
                     + ". That adapter, frozen, was the reference.")
    else:
        lines.append("A new adapter on the base model; the reference was the base model itself.")
    if heldout:
        first = next(iter(heldout.values()))
        rows = data_report.get("eval", {}).get("rows")
        lines += ["", f"Held-out {'pairs' if recipe.method == 'dpo' else 'completions'}"
                  + (f" ({rows})" if rows else "") + ":", "",
                  f"| | step {first['start_step']} | step {first['end_step']} |", "|---|---|---|"]
        lines += [f"| {PREFERENCE_ROWS[key].format(method=recipe.method.upper())} | {value['start']:.3f} | "
                  f"{value['end']:.3f} |" for key, value in heldout.items()]
        if first["start_step"] == 0:
            lines += ["", "At step 0 the policy is the reference: every reward is 0"
                      + (" and the accuracy 0.000 (ties count as wrong; chance is 0.5)" if recipe.method == "dpo"
                         else "") + "."]
    return "\n".join(lines)


def merged_card(base: BaseReference, license_info: dict[str, str], run_name: str, dtype: str) -> str:
    """The card of a merged model: the adapter of run `run_name` merged into its base in `dtype`."""
    from huggingface_hub import ModelCardData

    data = ModelCardData(base_model=base.hub_id, base_model_relation="merge" if base.hub_id else None,
                         library_name="transformers", **license_info, tags=["qlora", "merged", "qc-train-phi"],
                         pipeline_tag="text-generation")
    title = base.hub_id or Path(base.source).name
    return mask(f"---\n{data.to_yaml()}\n---\n\n# {title} with a merged LoRA adapter\n\n"
                f"The adapter from `{run_name}` merged into the base in {dtype} by qc-train-phi {__version__}. "
                "See the adapter's card for data and metrics.\n")


# --- an evaluation (evaluate: section, qctrain eval): base against tuned ---

def evaluation_rows(report: dict[str, Any]) -> list[tuple[str, str, Any, Any]]:
    """(task, metric, base, tuned) for every number the report holds, held-out first; stderr left out."""
    rows = []
    held = report.get("heldout") or {}
    for metric in (*HELDOUT_METRICS, "entropy"):
        base, tuned = (held.get("base") or {}).get(metric), (held.get("tuned") or {}).get(metric)
        if base is not None or tuned is not None:
            rows.append(("held-out split", metric, base, tuned))
    for name, task in (report.get("tasks") or {}).items():
        for metric in dict.fromkeys([*(task.get("tuned") or {}), *(task.get("base") or {})]):
            if "_stderr" not in metric:
                rows.append((name, metric, (task.get("base") or {}).get(metric), (task.get("tuned") or {}).get(metric)))
    return rows


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "–"


def evaluation_table(report: dict[str, Any]) -> str:
    """Markdown: base and tuned side by side, with the difference."""
    lines = ["| task | metric | base | tuned | Δ |", "|---|---|---|---|---|"]
    for task, metric, base, tuned in evaluation_rows(report):
        delta = f"{tuned - base:+.4f}" if isinstance(base, int | float) and isinstance(tuned, int | float) else "–"
        lines.append(f"| {task} | {metric} | {_number(base)} | {_number(tuned)} | {delta} |")
    verdict = report.get("gate")
    if verdict:
        lines.append("")
        lines.append(f"Gate (evaluate.gate): {'passed' if verdict['passed'] else 'refused'}: {verdict['reason']}")
    return "\n".join(lines)


def evaluation_results(report: dict[str, Any]) -> list:
    """model-index entries (huggingface_hub EvalResult) for the tuned model's numbers: the Hub shows them as this
    model's results and has no place for a base, whose numbers stay in the card's table."""
    from huggingface_hub import EvalResult

    results = []
    tuned = (report.get("heldout") or {}).get("tuned") or {}
    names = {"loss": ("loss", "eval loss"), "mean_token_accuracy": ("accuracy", "next-token accuracy")}
    for metric, (metric_type, label) in names.items():
        if isinstance(tuned.get(metric), int | float):
            results.append(EvalResult(task_type="text-generation", task_name="Supervised fine-tuning",
                                      dataset_type="local", dataset_name="held-out evaluation split",
                                      metric_type=metric_type, metric_name=label,
                                      metric_value=round(float(tuned[metric]), 4)))
    source = f"lm-evaluation-harness {report.get('lm_eval_version', '')}".strip()
    for name, task in (report.get("tasks") or {}).items():
        dataset = task.get("dataset") or {}
        shots = task.get("n_shot")
        for metric, value in (task.get("tuned") or {}).items():
            if "_stderr" in metric or not isinstance(value, int | float):
                continue
            results.append(EvalResult(
                task_type="text-generation", task_name=name,
                dataset_type=dataset.get("path") or "local",
                dataset_name=name if dataset.get("path") else f"{name} (local task file)",
                dataset_config=dataset.get("name"), dataset_split=dataset.get("split"),
                dataset_args={"num_few_shot": shots} if isinstance(shots, int) else None,
                metric_type=metric.split(",")[0], metric_name=f"{metric} ({shots}-shot)" if shots is not None
                else metric, metric_value=round(float(value), 4),
                metric_args={"limit": report["limit"]} if report.get("limit") is not None else None,
                source_name=source, source_url=LM_EVAL_URL))
    return results


def _evaluation_facts(evaluation: dict | None) -> dict[str, Any]:
    """The card's evaluation section (the base-against-tuned table and what was measured how) and its samples'
    settings; without an evaluation, the samples generated at the end of training."""
    evaluated_samples = bool(evaluation and evaluation.get("samples"))
    return {"evaluation": evaluation_section(evaluation) if evaluation else "",
            "max_new_tokens": (evaluation or {}).get("max_new_tokens") or 48,
            "samples_when": "generated by the evaluation, base and tuned in one batch each" if evaluated_samples
            else "generated at the end of training"}


def evaluation_section(evaluation: dict) -> str:
    if evaluation.get("skipped"):
        return f"\n## Evaluation: base vs tuned\n\nNot evaluated: {evaluation['skipped']}\n"
    how = [f"lm-evaluation-harness {evaluation['lm_eval_version']}" if evaluation.get("lm_eval_version") else None,
           f"{evaluation['num_fewshot']}-shot" if evaluation.get("num_fewshot") is not None else None,
           f"limit {evaluation['limit']} documents per task" if evaluation.get("limit") is not None else None]
    note = ("The base is the same 4-bit model with the adapter disabled. "
            + (", ".join(h for h in how if h) + ". " if any(how) else "")
            + ("Stopped before the end: some results are missing. " if evaluation.get("stopped") else ""))
    return f"\n## Evaluation: base vs tuned\n\n{note.strip()}\n\n{evaluation_table(evaluation)}\n"
