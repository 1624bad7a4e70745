"""Evaluate stage: the tuned model against its base, on the same footing, on the model that is already loaded.

- held-out: loss and next-token accuracy of both on the run's eval split, through the trainer (the adapter
  disabled for the base: one 4-bit base in memory, never a second load);
- benchmarks: lm-evaluation-harness tasks (built-in names whose data come from the HF cache, or local task
  files), scored by lm-eval's HFLM around the same PeftModel, with and without the adapter;
- samples: greedy replies of both to the held-out prompts (finished.generate: one left-padded batch per model).

The report (eval_results.json) holds base and tuned side by side; `gate` decides from it, as a pure function,
whether the tuned model may be pushed (hub.push: if_better); card.py shows it in the model card.
"""

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qctrain.errors import InputError
from qctrain.recipe import HELDOUT_METRICS, EvaluateSection, GateRule, TaskFile

# lm-eval aggregations that import scikit-learn, which the image leaves out (docker/left-out.txt).
SKLEARN_AGGREGATIONS = frozenset({"f1_score", "matthews_corrcoef", "weighted_f1_score"})
# lm-eval names this module replaces while it scores (tests/test_evaluate.py fails when they move):
# simple_evaluate runs `git describe` in the working directory (git writes "fatal: not a git repository" straight
# to fd 2 outside a repository) and torch's collect_env (subprocesses, a second per call) for its report;
# its tqdm bars go to stderr whatever the logging level.
QUIETED = {"lm_eval.evaluator": ("get_git_commit_hash", "add_env_info"), "lm_eval.models.huggingface": ("tqdm",),
           "lm_eval.api.model": ("tqdm",), "lm_eval.api.task": ("tqdm",),
           "tqdm": ("tqdm",)}  # lm_eval.api.metrics imports it inside its bootstrap functions


# --- task specs: built-in names and local task files ---

@dataclass
class TaskSpec:
    name: str  # the lm-eval task name
    spec: str | dict  # what lm-eval gets: the name, or the file's config with its paths made absolute
    where: str  # evaluate.tasks[i] (for messages)
    file: Path | None = None  # a local task file


def _absolute(value: Any, folder: Path) -> Any:
    """data_files as lm-eval hands them to datasets.load_dataset, with relative paths made relative to `folder`."""
    if isinstance(value, str):
        return value if "://" in value or Path(value).is_absolute() else str(folder / value)
    if isinstance(value, list):
        return [_absolute(v, folder) for v in value]
    if isinstance(value, dict):
        return {k: _absolute(v, folder) for k, v in value.items()}
    return value


def read_task_file(path: Path, where: str, resolve_functions: bool = True) -> dict[str, Any]:
    """A local lm-eval task YAML as a config dict whose data paths are relative to the YAML's folder, not to the
    current directory as lm-eval would take them. resolve_functions=False: `!function` tags stay strings (no
    code of the task's runs; preflight)."""
    from lm_eval.tasks._yaml_loader import load_yaml

    if not path.is_file():
        raise InputError(f"{where}: {path}: task file not found")
    try:
        config = load_yaml(path, resolve_func=resolve_functions)
    except Exception as err:  # noqa: BLE001 - YAML, include and !function errors: one line naming the file
        raise InputError(f"{where}: {path}: cannot read the task file: {_first_line(err)}") from None
    if not isinstance(config.get("task"), str):
        raise InputError(f"{where}: {path}: a task file names one task (task: NAME); groups are not supported")
    folder = path.resolve().parent
    kwargs = config.get("dataset_kwargs")
    if isinstance(kwargs, dict) and "data_files" in kwargs:
        config["dataset_kwargs"] = {**kwargs, "data_files": _absolute(kwargs["data_files"], folder)}
    dataset_path = config.get("dataset_path")
    if isinstance(dataset_path, str) and (folder / dataset_path).exists():  # a local data folder beside the YAML
        config["dataset_path"] = str(folder / dataset_path)
    return config


def task_specs(section: EvaluateSection, resolve_functions: bool = True) -> list[TaskSpec]:
    specs = []
    for i, task in enumerate(section.tasks):
        where = f"evaluate.tasks[{i}]"
        if isinstance(task, TaskFile):
            path = Path(task.file)
            config = read_task_file(path, where, resolve_functions)
            specs.append(TaskSpec(config["task"], config, where, path))
        else:
            specs.append(TaskSpec(task, task, where))
    return specs


def task_manager(specs: list[TaskSpec]):
    """lm-eval's TaskManager: with its index of built-in tasks (seconds to build) only where a spec names one."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=any(spec.file is None for spec in specs))


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return f"{type(err).__name__}: {text.splitlines()[0]}" if text else type(err).__name__


def explain(err: BaseException, spec: TaskSpec) -> InputError | None:
    """The one line for a task that cannot run here (its data not cached while offline, a missing file, a
    package the image leaves out); None: not such a failure."""
    text = str(err)
    name = f"{spec.where} ({spec.name})"
    if isinstance(err, KeyError) and "not a registered task" in text:
        return InputError(f"{name}: lm-eval has no task of that name")
    if isinstance(err, ModuleNotFoundError) and err.name and err.name.split(".")[0] in ("sklearn", "scipy"):
        return InputError(f"{name}: needs scikit-learn, which the image leaves out (README: Evaluation); use "
                          "another task or metric")
    if "OfflineModeIsEnabled" in text or "offline mode is enabled" in text.lower() or (
            isinstance(err, ConnectionError) and os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0")):
        dataset = spec.spec.get("dataset_path") if isinstance(spec.spec, dict) else None
        what = f"its data set {dataset}" if dataset else "its data set"
        return InputError(f"{name}: {what} is not in the HF cache (HF_HOME/datasets) and the Hub is offline "
                          "(HF_HUB_OFFLINE): run once online to cache it, or use a local task file")
    if isinstance(err, FileNotFoundError):
        return InputError(f"{name}: {_first_line(err)}")
    return None


@contextlib.contextmanager
def _explained(spec: TaskSpec) -> Iterator[None]:
    try:
        yield
    except InputError:
        raise
    except Exception as err:
        explained = explain(err, spec)
        if explained is None:
            raise
        raise explained from err


def check_tasks(section: EvaluateSection | None, gate: list[GateRule] | None = None) -> list[str]:
    """Preflight: every task can be built here (its file read, its data found, offline too) and scored with the
    packages the image holds; every gate rule names a task that is evaluated. Imports lm-eval (seconds) and
    loads each task's data, only when evaluate.tasks names any."""
    if section is None or not section.tasks:
        return []
    try:
        specs = task_specs(section, resolve_functions=False)
    except InputError as err:
        return [str(err)]
    import lm_eval.tasks  # noqa: F401 - before the quieting: its modules are the ones to quiet

    problems = []
    with _quiet_lm_eval():
        manager = task_manager(specs)
        built = {}
        for spec in specs:
            try:
                built.update(_build(spec, manager))
            except InputError as err:
                problems.append(str(err))
    for name, task in built.items():
        aggregations = {getattr(fn, "__name__", "") for fn in task.aggregation().values()}
        if aggregations & SKLEARN_AGGREGATIONS and not _have("sklearn"):
            problems.append(f"evaluate.tasks ({name}): its metrics ({', '.join(sorted(task.aggregation()))}) need "
                            "scikit-learn, which the image leaves out (README: Evaluation)")
    known = {spec.name for spec in specs} | set(built)
    for i, rule in enumerate(gate or []):
        if rule.task != "heldout" and rule.task not in known:
            problems.append(f"evaluate.gate[{i}].metric: {rule.metric}: no task {rule.task} in evaluate.tasks "
                            f"(evaluated: {', '.join(sorted(known))})")
    return problems


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _build(spec: TaskSpec, manager) -> dict[str, Any]:
    """The task objects a spec stands for (a group: its tasks), by name; their data loaded (from the cache)."""
    from lm_eval.tasks import get_task_dict

    def leaves(tree: dict) -> Iterator[tuple[str, Any]]:
        for key, value in tree.items():
            if isinstance(value, dict):
                yield from leaves(value)
            else:
                yield getattr(key, "group_name", None) or getattr(value, "task_name", None) or str(key), value

    with _explained(spec):
        return dict(leaves(get_task_dict([spec.spec], manager)))


@contextlib.contextmanager
def _quiet_lm_eval() -> Iterator[None]:
    """lm-eval without its stderr noise (see QUIETED) in the modules imported so far (preflight never imports the
    ones that bring torch); its log lines go through logging like any library's."""
    from tqdm import tqdm

    def quiet_tqdm(*args, **kwargs):
        kwargs["disable"] = True
        return tqdm(*args, **kwargs)

    replacements = {"get_git_commit_hash": lambda: None, "add_env_info": lambda storage: None}
    if not sys.stderr.isatty():
        replacements["tqdm"] = quiet_tqdm
    saved = []
    for module_name, names in QUIETED.items():
        module = sys.modules.get(module_name)
        if module is None:
            continue
        for name in names:
            if name in replacements:
                saved.append((module, name, getattr(module, name)))
                setattr(module, name, replacements[name])
    try:
        yield
    finally:
        for module, name, original in saved:
            setattr(module, name, original)


# --- benchmarks: base and tuned through lm-eval, on the loaded model ---

def _metrics_of(results: dict, name: str) -> dict[str, float | None]:
    """lm-eval's "acc,none" -> "acc" (a filter other than none stays: "exact_match,strict-match")."""
    found = {}
    for key, value in results.get("results", {}).get(name, {}).items():
        if "," not in key or not isinstance(value, int | float) or isinstance(value, bool):
            continue
        metric, _, filter_name = key.partition(",")
        found[metric if filter_name == "none" else key] = None if math.isnan(value) else value
    return found


def _dataset_facts(config: dict, spec: TaskSpec) -> dict[str, Any]:
    local = spec.file is not None or config.get("dataset_path") in ("json", "csv", "parquet", "text", "arrow")
    return {"path": None if local else config.get("dataset_path"), "name": config.get("dataset_name"),
            "split": config.get("test_split") or config.get("validation_split"),
            "file": str(spec.file) if spec.file else None}


def score_tasks(model, tokenizer, section: EvaluateSection, say: Callable[[str], None] = print,
                should_stop: Callable[[], bool] = lambda: False, loglikelihoods: bool = False) -> dict[str, Any]:
    """Every evaluate.tasks entry scored by lm-eval on `model` (a PeftModel: with its adapter, then with it
    disabled for the base). Returns {"tasks": {name: {"tuned", "base", "higher_is_better", "documents",
    "n_shot", "version", "dataset", "seconds"}}, "lm_eval_version", "stopped"}; says one line per task and model.
    `should_stop` is asked between them: lm-eval cannot stop inside a task. loglikelihoods: also each
    document's log-likelihood of each choice, per model ("loglikelihoods": {"tuned": [[...]], "base": ...})."""
    import lm_eval
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    specs = task_specs(section)
    report: dict[str, Any] = {"lm_eval_version": lm_eval.__version__, "tasks": {}, "stopped": False}
    with _quiet_lm_eval():
        manager = task_manager(specs)
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=section.batch_size)
        for spec in specs:
            for which in ("tuned", "base"):
                if should_stop():
                    report["stopped"] = True
                    return report
                started = time.perf_counter()
                adapter_off = model.disable_adapter() if which == "base" else contextlib.nullcontext()
                with _explained(spec), adapter_off:
                    results = simple_evaluate(
                        model=lm, tasks=[spec.spec], num_fewshot=section.num_fewshot, limit=section.limit,
                        task_manager=manager, log_samples=loglikelihoods, apply_chat_template=section.chat_template,
                        fewshot_as_multiturn=section.chat_template)
                seconds = round(time.perf_counter() - started, 2)
                for name in results["results"]:
                    entry = report["tasks"].setdefault(name, _task_entry(results, name, spec))
                    entry[which] = _metrics_of(results, name)
                    entry["seconds"][which] = seconds
                    if loglikelihoods:
                        entry.setdefault("loglikelihoods", {})[which] = document_loglikelihoods(results, name)
                    say(progress_line(name, which, entry, seconds))
    return report


def document_loglikelihoods(results: dict, name: str) -> list[list[float]]:
    """From a simple_evaluate result with log_samples: per document (in order), each request's log-likelihood."""
    rows = sorted(results.get("samples", {}).get(name, []), key=lambda row: row["doc_id"])
    return [[float(resp[0]) for resp in row["filtered_resps"]] for row in rows]


def _task_entry(results: dict, name: str, spec: TaskSpec) -> dict[str, Any]:
    config = results.get("configs", {}).get(name, {})
    counts = results.get("n-samples", {}).get(name, {})
    return {"higher_is_better": results.get("higher_is_better", {}).get(name, {}),
            "documents": counts.get("effective"), "documents_in_task": counts.get("original"),
            "n_shot": results.get("n-shot", {}).get(name), "version": results.get("versions", {}).get(name),
            "dataset": _dataset_facts(config, spec), "source": spec.where, "seconds": {}}


def progress_line(name: str, which: str, entry: dict, seconds: float) -> str:
    shown = ", ".join(f"{metric} {value:.4g}" for metric, value in entry[which].items()
                      if value is not None and "_stderr" not in metric)
    documents = f" {entry['documents']} docs" if entry.get("documents") is not None else ""
    return f"eval: {name} ({which}){documents}: {shown or 'no metric'} ({seconds:.1f} s)"


# --- held-out loss and token accuracy, base and tuned, through the trainer ---

def _strip_eval(metrics: dict[str, Any]) -> dict[str, float]:
    wanted = (*HELDOUT_METRICS, "entropy")
    return {key: metrics[f"eval_{key}"] for key in wanted if isinstance(metrics.get(f"eval_{key}"), int | float)}


@contextlib.contextmanager
def _unlogged(trainer) -> Iterator[None]:
    """The trainer's callbacks (metrics.jsonl, trackers, progress bars) left out and its log history kept as it
    was: the base pass is not an evaluation of the run, and a tracker must not plot it as one. The report's
    rows go to metrics.jsonl apart (metrics_rows), with keys of their own."""
    callbacks, logged = trainer.callback_handler.callbacks, len(trainer.state.log_history)
    trainer.callback_handler.callbacks = []
    try:
        yield
    finally:
        trainer.callback_handler.callbacks = callbacks
        del trainer.state.log_history[logged:]


def heldout(trainer, tuned_metrics: dict[str, Any] | None = None, records: int | None = None) -> dict[str, Any]:
    """Loss and next-token accuracy on the trainer's eval split (`records` held-out records, packed into its
    rows): tuned (`tuned_metrics`, what training's final evaluation logged, else evaluated now) and base (the
    adapter disabled), as {"base", "tuned", "records", "seconds"}. Under DDP every rank must call this (the
    evaluation gathers across ranks)."""
    started = time.perf_counter()
    tuned = _strip_eval(tuned_metrics or {})
    with _unlogged(trainer):
        if "loss" not in tuned:
            tuned = _strip_eval(trainer.evaluate())
        with trainer.model.disable_adapter():
            base = _strip_eval(trainer.evaluate())
    return {"base": base, "tuned": tuned, "records": records if records is not None else len(trainer.eval_dataset),
            "seconds": round(time.perf_counter() - started, 2)}


# --- the whole evaluation ---

def heldout_line(held: dict[str, Any]) -> str:
    parts = [f"{metric.replace('_', ' ')} {held['base'][metric]:.4g} -> {held['tuned'][metric]:.4g}"
             for metric in HELDOUT_METRICS if metric in held["base"] and metric in held["tuned"]]
    return f"eval: held-out split ({held['records']} records), base -> tuned: {', '.join(parts)}"


def evaluate_model(model, tokenizer, section: EvaluateSection, prompts: list, chat_template: str | None = None,
                   held: dict[str, Any] | None = None, say: Callable[[str], None] = print,
                   should_stop: Callable[[], bool] = lambda: False) -> dict[str, Any]:
    """The evaluation report of a loaded PeftModel: the held-out numbers (`held`, from `heldout`, which needs the
    trainer), the lm-eval tasks, the samples for `prompts`, the gate's verdict and the time each part took. A stop
    (`should_stop`, asked between parts and tasks) leaves the rest out and says so ("stopped": true)."""
    from qctrain.finished.generate import before_after_samples

    started = time.perf_counter()
    report: dict[str, Any] = {"heldout": None, "tasks": {}, "samples": [], "num_fewshot": section.num_fewshot,
                              "limit": section.limit, "max_new_tokens": section.max_new_tokens, "stopped": False,
                              "seconds": {}}
    if held is not None:
        report["seconds"]["heldout"] = held.pop("seconds", None)
        report["heldout"] = held
        say(heldout_line(held))
    if section.tasks:
        scored = score_tasks(model, tokenizer, section, say, should_stop)
        report.update(lm_eval_version=scored["lm_eval_version"], tasks=scored["tasks"], stopped=scored["stopped"])
        report["seconds"]["tasks"] = {name: task["seconds"] for name, task in scored["tasks"].items()}
    if section.samples and prompts and not report["stopped"]:
        if should_stop():
            report["stopped"] = True
        else:
            begun = time.perf_counter()
            replies = before_after_samples(model, tokenizer, prompts, section.max_new_tokens, chat_template)
            report["samples"] = [vars(sample) for sample in replies]
            report["seconds"]["samples"] = round(time.perf_counter() - begun, 2)
    if section.gate:
        report["gate"] = gate(report, section.gate)
    report["seconds"]["total"] = round(time.perf_counter() - started + (report["seconds"].get("heldout") or 0), 2)
    return report


def metrics_rows(report: dict[str, Any], step: int | None) -> list[dict[str, Any]]:
    """metrics.jsonl rows of an evaluation: one per model ("model": "base" | "tuned"), its numbers keyed
    TASK/METRIC (held-out: heldout/loss), apart from the training rows' loss and eval_loss."""
    rows, now = [], round(time.time(), 3)
    for which in ("base", "tuned"):
        row: dict[str, Any] = {"step": step, "time": now, "model": which}
        for metric, value in ((report.get("heldout") or {}).get(which) or {}).items():
            row[f"heldout/{metric}"] = value
        for name, task in (report.get("tasks") or {}).items():
            for metric, value in (task.get(which) or {}).items():
                if "_stderr" not in metric:
                    row[f"{name}/{metric}"] = value
        if len(row) > 3:
            rows.append(row)
    return rows


def append_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    from qctrain.errors import writing
    from qctrain.hubtoken import redact

    with writing(path), open(path, "a", encoding="utf-8") as handle:
        for row in rows:
            handle.write(redact(json.dumps(row)) + "\n")


# --- the gate: may the tuned model be pushed? ---

def _measured(report: dict[str, Any], rule: GateRule) -> tuple[Any, Any, bool | None]:
    """(base, tuned, higher_is_better) of a gate rule's metric in the report; None where not measured."""
    if rule.task == "heldout":
        held = report.get("heldout") or {}
        higher = HELDOUT_METRICS.get(rule.measure)
        return (held.get("base") or {}).get(rule.measure), (held.get("tuned") or {}).get(rule.measure), higher
    task = (report.get("tasks") or {}).get(rule.task) or {}
    metric = rule.measure.removesuffix(",none")
    higher = (task.get("higher_is_better") or {}).get(metric.split(",")[0])
    return (task.get("base") or {}).get(metric), (task.get("tuned") or {}).get(metric), higher


def gate(report: dict[str, Any], rules: list[GateRule]) -> dict[str, Any]:
    """The verdict of evaluate.gate on an evaluation report: passed when, for every rule, the tuned model is not
    worse than the base by more than the rule's tolerance (higher-is-better metrics: tuned >= base - tolerance;
    lower-is-better: tuned <= base + tolerance). A metric that was not measured fails its rule. `reason`: one
    line."""
    checks, failed = [], []
    for rule in rules:
        base, tuned, higher = _measured(report, rule)
        check = {"metric": rule.metric, "base": base, "tuned": tuned, "tolerance": rule.tolerance,
                 "higher_is_better": higher}
        numbers = all(isinstance(v, int | float) and math.isfinite(v) for v in (base, tuned))
        if not numbers or higher is None:
            check["passed"] = False
            why = "was not measured" if not numbers else "has no known direction (higher or lower is better)"
            failed.append(f"{rule.metric} {why}")
        else:
            check["passed"] = tuned >= base - rule.tolerance if higher else tuned <= base + rule.tolerance
            if not check["passed"]:
                margin = (f"worse than the base's {base:.4g} by more than {rule.tolerance:g}" if rule.tolerance >= 0
                          else f"not better than the base's {base:.4g} by {-rule.tolerance:g} or more")
                failed.append(f"{rule.metric} {tuned:.4g} is {margin}" + ("" if higher else " (lower is better)"))
        checks.append(check)
    passed = not failed
    reason = ("; ".join(failed) if failed else
              "not worse than the base: " + ", ".join(f"{c['metric']} {c['tuned']:.4g} (base {c['base']:.4g})"
                                                      for c in checks))
    return {"passed": passed, "reason": reason, "checks": checks}


# --- eval_results.json ---

def write_results(path: Path, report: dict[str, Any]) -> None:
    from qctrain.atomic import write_json_atomic

    write_json_atomic(path, json.loads(json.dumps(report, default=str)), shared=True)
