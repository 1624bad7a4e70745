"""The model cards, as text: the adapter's (YAML metadata through huggingface_hub's ModelCardData, how it was
trained, the data counts, the metrics, before/after samples and the recipe) and a merged model's. The writer
(outputs) and the merge (finished.merge) put them on disk. Every card is masked: it quotes the data."""

from dataclasses import dataclass
from pathlib import Path

from qctrain import __version__
from qctrain.basemodel.reference import BaseReference, base_reference
from qctrain.recipe import Recipe, dump_recipe
from qctrain.rundir import RunDir
from qctrain.secretmask import mask

CARD_METRICS = ("train_loss", "eval_loss", "eval_mean_token_accuracy", "train_runtime", "train_samples_per_second",
                "epoch")
TAGS = ["qlora", "lora", "peft", "trl", "sft", "qc-train-phi"]


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


def card_data(recipe: Recipe, base: BaseReference, metrics: dict, license_info: dict[str, str]):
    """The card's YAML metadata, through huggingface_hub's ModelCardData (model-index included)."""
    from huggingface_hub import EvalResult, ModelCardData

    datasets = _hub_datasets(recipe.data.sources)
    eval_results = None
    if isinstance(metrics.get("eval_loss"), int | float):
        where = _hub_datasets(recipe.data.eval.sources if recipe.data.eval else []) or datasets
        eval_results = [EvalResult(
            task_type="text-generation", task_name="Supervised fine-tuning",
            dataset_type=where[0] if where else "local", dataset_name="held-out evaluation split",
            metric_type="loss", metric_name="eval loss", metric_value=round(float(metrics["eval_loss"]), 4))]
    return ModelCardData(
        model_name=recipe.hub.repo_id if recipe.hub else RunDir.of(recipe).root.name,
        base_model=base.hub_id,  # a Hub id or nothing, never a local path
        base_model_relation="adapter" if base.hub_id else None,
        library_name="peft",
        **license_info,
        tags=TAGS,
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
        "method": f"QLoRA ({quant.bits}-bit {quant.quant_type})" if quant else "LoRA",
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

![loss](loss.png)

## Sample generations (held-out prompts)

Greedy, at most 48 new tokens, generated at the end of training.

{samples}

## Recipe

```yaml
{recipe}```
"""


def model_card(recipe: Recipe, data_report: dict, metrics: dict, samples: list[Sample],
               base: BaseReference | None = None, license_info: dict[str, str] | None = None) -> str:
    from huggingface_hub import ModelCard

    base = base or base_reference(recipe.model)
    license_info = license_info or {}
    content = CARD.format(metadata=card_data(recipe, base, metrics, license_info).to_yaml(), version=__version__,
                          rank=recipe.lora.r, alpha=recipe.lora.alpha, targets=recipe.lora.target_modules,
                          samples=samples_markdown(samples), recipe=dump_recipe(recipe),
                          **_facts(recipe, data_report, metrics, base, license_info))
    return mask(ModelCard(content).content)  # samples and data counts quote the data: no secret in a card


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
