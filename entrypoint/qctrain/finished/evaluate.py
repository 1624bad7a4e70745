"""`qctrain eval`: a finished run, an adapter folder or an adapter on the Hub, against its base. One 4-bit load of
the base with the adapter on top (FinishedRun.load for a run), then the evaluate stage's functions; for a run the
results go into its files: eval_results.json, the manifest's `evaluation`, the cards and metrics.jsonl."""

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qctrain.atomic import read_json_object, write_json_atomic
from qctrain.errors import InputError
from qctrain.recipe import Recipe
from qctrain.rundir import RunDir


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


def _load(target: EvalTarget):
    """(the model with its adapter, the adapter's tokenizer, the tokenizer training prepared the data with)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qctrain.basemodel.load import load_base_model, load_tokenizer
    from qctrain.finished.load import FinishedRun

    if target.run is not None:
        finished = FinishedRun.open(target.run.root)
        peft_model, tokenizer = finished.load()
        return peft_model, tokenizer, load_tokenizer(finished.base)
    cfg = target.recipe.model
    data_tokenizer = load_tokenizer(cfg)
    try:
        tokenizer = AutoTokenizer.from_pretrained(target.source)
    except (OSError, ValueError):  # an adapter without its tokenizer: the base's
        tokenizer = data_tokenizer
    base = load_base_model(cfg)
    try:
        return PeftModel.from_pretrained(base, target.source), tokenizer, data_tokenizer
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f"{target.source}: cannot load the adapter onto {cfg.name}: "
                         f"{str(err).splitlines()[0]}") from None


def evaluate_saved(target: EvalTarget, say=print, should_stop=lambda: False) -> dict[str, Any]:
    """Evaluate a saved adapter against its base: load it once (4-bit base + adapter), held-out numbers through a
    trainer that only evaluates (the run's prepared eval split: its cache in a run folder), lm-eval tasks, samples
    for the held-out prompts, the gate's verdict. Nothing is written here (record_evaluation, write_results)."""
    from qctrain import data, evaluate, train
    from qctrain.recipe import EvaluateSection

    recipe = target.recipe
    section = recipe.evaluate or EvaluateSection()
    peft_model, tokenizer, data_tokenizer = _load(target)
    held, prompts = None, []
    with tempfile.TemporaryDirectory(prefix="qctrain-eval-") as scratch:
        workdir = target.run.root if target.run is not None else Path(scratch)
        if section.heldout and recipe.data.eval is not None and recipe.method == "sft":  # dpo/kto: their own
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


def evaluated(run: RunDir) -> bool:
    """Whether the run holds a whole evaluation (not one a stop signal cut short)."""
    results = read_json_object(run.eval_results)
    return bool(results) and not results.get("stopped")


def _last_step(metrics: Path) -> int | None:
    """The last training step metrics.jsonl records (an evaluation's own rows aside)."""
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
    from qctrain import evaluate
    from qctrain.basemodel.reference import base_license
    from qctrain.card import Sample, model_card, preference_section
    from qctrain.finished.load import FinishedRun
    from qctrain.outputs import evaluation_summary

    finished = FinishedRun.open(output_dir)
    run, manifest = finished.run, finished.run.read_manifest()
    evaluate.append_metrics(run.metrics, evaluate.metrics_rows(report, _last_step(run.metrics)))
    evaluate.write_results(run.eval_results, report)
    base = finished.reference
    samples = [Sample(**sample) for sample in report.get("samples") or []]
    recipe, data_report = Recipe.model_validate(manifest["recipe"]), read_json_object(run.data_report)
    card = model_card(recipe, data_report, manifest.get("metrics") or {}, samples, base, base_license(base), report,
                      preference_section(recipe, data_report, manifest.get("preference"), manifest.get("parent")))
    for folder in (run.adapter, run.root):  # the root's last: the adapter folder travels alone
        staged = folder / f".README.md.tmp-{os.getpid()}"
        staged.write_text(card, encoding="utf-8")
        staged.chmod(0o644)
        os.replace(staged, folder / "README.md")
    write_json_atomic(run.manifest, {**manifest, "evaluation": evaluation_summary(report)}, shared=True)
