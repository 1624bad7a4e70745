"""The evaluate stage's functions: the gate, the recipe's evaluate: section, local task files, lm-eval on a loaded
model against a plain lm-eval run, batched samples, the card's results. No training here (test_evaluate_flow.py
trains)."""

import importlib
import json
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import REPO, alpaca_records, write_json, write_recipe
from qctrain import evaluate
from qctrain.errors import ExitCode, InputError, NotBetter
from qctrain.recipe import EvaluateSection, GateRule, TaskFile, load_recipe

TASK_DIR = REPO / "tests" / "data" / "eval"
TASK_FILE = TASK_DIR / "qc_tiny_mc.yaml"


def report(base_acc=0.5, tuned_acc=0.6, base_loss=2.0, tuned_loss=1.5) -> dict:
    return {"heldout": {"base": {"loss": base_loss, "mean_token_accuracy": 0.3},
                        "tuned": {"loss": tuned_loss, "mean_token_accuracy": 0.4}},
            "tasks": {"mc": {"higher_is_better": {"acc": True, "acc_norm": True},
                             "base": {"acc": base_acc, "acc_stderr": 0.1}, "tuned": {"acc": tuned_acc}}}}


# --- the gate ---

def test_gate_passes_when_the_tuned_model_is_not_worse():
    verdict = evaluate.gate(report(), [GateRule(metric="mc.acc"), GateRule(metric="heldout.loss")])
    assert verdict["passed"] and [c["passed"] for c in verdict["checks"]] == [True, True]
    assert verdict["reason"].startswith("not worse than the base: mc.acc 0.6 (base 0.5)")


@pytest.mark.parametrize(("rules", "reason"), [
    ([GateRule(metric="mc.acc")], None),  # worse by 0.1, no tolerance
    ([GateRule(metric="mc.acc", tolerance=0.05)], None),
    ([GateRule(metric="heldout.loss", tolerance=0.2)], "(lower is better)"),  # loss 2.5 vs 2.0
])
def test_gate_refuses_a_worse_model(rules, reason):
    verdict = evaluate.gate(report(base_acc=0.6, tuned_acc=0.5, tuned_loss=2.5), rules)
    assert not verdict["passed"]
    assert "is worse than the base's" in verdict["reason"] and "\n" not in verdict["reason"]
    if reason:
        assert reason in verdict["reason"]


def test_gate_tolerance_is_absolute_and_a_negative_one_asks_for_better():
    worse_by_a_little = report(base_acc=0.6, tuned_acc=0.59)
    assert evaluate.gate(worse_by_a_little, [GateRule(metric="mc.acc", tolerance=0.02)])["passed"]
    better_by_a_little = report(base_acc=0.5, tuned_acc=0.51)
    verdict = evaluate.gate(better_by_a_little, [GateRule(metric="mc.acc", tolerance=-0.05)])
    assert not verdict["passed"]
    assert verdict["reason"] == "mc.acc 0.51 is not better than the base's 0.5 by 0.05 or more"
    assert evaluate.gate(better_by_a_little, [GateRule(metric="mc.acc", tolerance=-0.005)])["passed"]


def test_gate_every_rule_must_hold_and_an_unmeasured_metric_fails():
    verdict = evaluate.gate(report(), [GateRule(metric="mc.acc"), GateRule(metric="mc.f1"),
                                       GateRule(metric="other.acc")])
    assert not verdict["passed"]
    assert verdict["reason"] == "mc.f1 was not measured; other.acc was not measured"
    no_direction = report()
    no_direction["tasks"]["mc"]["higher_is_better"] = {}
    assert "no known direction" in evaluate.gate(no_direction, [GateRule(metric="mc.acc")])["reason"]


def test_not_better_has_its_own_exit_code():
    assert int(ExitCode.NOT_BETTER) == 5 and NotBetter("x").exit_code == ExitCode.NOT_BETTER
    assert len({int(code) for code in ExitCode}) == len(ExitCode)


# --- the recipe ---

def _recipe(tmp_path, **sections) -> Path:
    data = write_json(tmp_path / "d.json", alpaca_records(4))
    return write_recipe(tmp_path / "r.yaml", tmp_path / "model", data, tmp_path / "out", **sections)


@pytest.mark.parametrize(("sections", "message"), [
    ({"hub": {"repo_id": "a/b", "push": "if_better"}}, "hub.push: if_better needs evaluate.gate"),
    ({"hub": {"repo_id": "a/b", "push": "if_better"}, "evaluate": {"tasks": ["arc_easy"]}},
     "hub.push: if_better needs evaluate.gate"),
    ({"evaluate": {"tasks": ["arc_easy"], "gate": {"metric": "arc_eazy.acc"}}},
     "evaluate.gate[0].metric: arc_eazy.acc: arc_eazy is not in evaluate.tasks (did you mean 'arc_easy'?)"),
    ({"evaluate": {"gate": [{"metric": "heldout.accuracy"}]}},
     "evaluate.gate[0].metric: heldout.accuracy: the held-out metrics are loss, mean_token_accuracy"),
    ({"evaluate": {"heldout": False, "gate": {"metric": "heldout.loss"}}}, "needs evaluate.heldout: true"),
    ({"evaluate": {"gate": {"metric": "acc"}}}, "expected TASK.METRIC"),
    ({"evaluate": {"limit": 2.5}}, "evaluate.limit"),
    ({"evaluate": {"task": ["arc_easy"]}}, "evaluate.task: unknown key (did you mean 'tasks'?)"),
])
def test_recipe_refuses_a_gate_it_cannot_decide(tmp_path, sections, message):
    with pytest.raises(InputError) as err:
        load_recipe(_recipe(tmp_path, **sections))
    assert message in str(err.value)


def test_recipe_evaluate_section(tmp_path):
    recipe = load_recipe(_recipe(tmp_path, hub={"repo_id": "a/b", "push": "if_better"}, evaluate={
        "tasks": ["arc_easy", {"file": "t.yaml"}], "limit": 20.0, "gate": {"metric": "arc_easy.acc_norm"}}))
    assert recipe.evaluate.tasks == ["arc_easy", TaskFile(file="t.yaml")] and recipe.evaluate.limit == 20
    assert recipe.evaluate.gate == [GateRule(metric="arc_easy.acc_norm", tolerance=0.0)]
    # a gate on a local task's metric: its name is in the file, which preflight reads
    load_recipe(_recipe(tmp_path, evaluate={"tasks": [{"file": "t.yaml"}], "gate": {"metric": "qc_tiny_mc.acc"}}))


def test_evaluate_changes_neither_the_recipe_hash_nor_the_training_fingerprint(tmp_path):
    from qctrain.checkpoint import recipe_fingerprint

    plain = load_recipe(_recipe(tmp_path))
    assert "evaluate" not in plain.model_dump()  # unset: recipes written before the section hash as they did
    with_eval = load_recipe(_recipe(tmp_path, evaluate={"tasks": ["arc_easy"]}))
    assert with_eval.sha256() != plain.sha256()
    assert recipe_fingerprint(with_eval) == recipe_fingerprint(plain)  # evaluating never blocks a resume


# --- local task files ---

def test_task_file_data_paths_are_relative_to_the_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # lm-eval would look for qc_tiny_mc.jsonl here
    config = evaluate.read_task_file(TASK_FILE, "evaluate.tasks[0]")
    assert config["task"] == "qc_tiny_mc"
    assert config["dataset_kwargs"]["data_files"] == {"test": str(TASK_DIR / "qc_tiny_mc.jsonl")}
    [spec] = evaluate.task_specs(EvaluateSection(tasks=[TaskFile(file=str(TASK_FILE))]))
    assert spec.name == "qc_tiny_mc" and spec.where == "evaluate.tasks[0]" and spec.spec == config


@pytest.mark.parametrize(("content", "message"), [
    (None, "task file not found"),
    ("group: g\ntask: [a, b]\n", "a task file names one task"),
    ("task: [unclosed\n", "cannot read the task file"),
])
def test_a_bad_task_file_is_one_line(tmp_path, content, message):
    path = tmp_path / "t.yaml"
    if content is not None:
        path.write_text(content)
    with pytest.raises(InputError) as err:
        evaluate.read_task_file(path, "evaluate.tasks[2]")
    assert str(err.value).startswith(f"evaluate.tasks[2]: {path}: {message}") and "\n" not in str(err.value)


def _task_copy(tmp_path, **changes) -> Path:
    config = yaml.safe_load(TASK_FILE.read_text())
    config.update(changes)
    shutil.copyfile(TASK_DIR / "qc_tiny_mc.jsonl", tmp_path / "qc_tiny_mc.jsonl")
    path = tmp_path / "task.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_preflight_builds_local_tasks_and_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    good = EvaluateSection(tasks=[TaskFile(file=str(TASK_FILE))], gate=[GateRule(metric="qc_tiny_mc.acc")])
    assert evaluate.check_tasks(good, good.gate) == []
    assert evaluate.check_tasks(good, [GateRule(metric="qc_tiny_mcq.acc")]) == [
        "evaluate.gate[0].metric: qc_tiny_mcq.acc: no task qc_tiny_mcq in evaluate.tasks (evaluated: qc_tiny_mc)"]

    missing_file = _task_copy(tmp_path, dataset_kwargs={"data_files": {"test": "nowhere.jsonl"}})
    [problem] = evaluate.check_tasks(EvaluateSection(tasks=[TaskFile(file=str(missing_file))]))
    assert problem.startswith("evaluate.tasks[0] (qc_tiny_mc): FileNotFoundError") and "nowhere.jsonl" in problem

    uncached = _task_copy(tmp_path, dataset_path="qc-nobody/not-cached-anywhere", dataset_kwargs=None)
    [problem] = evaluate.check_tasks(EvaluateSection(tasks=[TaskFile(file=str(uncached))]))
    assert problem == ("evaluate.tasks[0] (qc_tiny_mc): its data set qc-nobody/not-cached-anywhere is not in the HF "
                       "cache (HF_HOME/datasets) and the Hub is offline (HF_HUB_OFFLINE): run once online to cache "
                       "it, or use a local task file")


def test_preflight_names_a_task_whose_metric_needs_scikit_learn(tmp_path, monkeypatch):
    f1 = _task_copy(tmp_path, metric_list=[{"metric": "f1", "aggregation": "f1", "higher_is_better": True}])
    monkeypatch.setattr(evaluate, "_have", lambda module: module != "sklearn")  # the image's set (left-out.txt)
    [problem] = evaluate.check_tasks(EvaluateSection(tasks=[TaskFile(file=str(f1))]))
    assert problem == ("evaluate.tasks (qc_tiny_mc): its metrics (f1) need scikit-learn, which the image leaves out "
                       "(README: Evaluation)")


def test_the_image_leaves_out_exactly_what_left_out_txt_names():
    names = [line for line in (REPO / "docker" / "left-out.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert names == ["scikit-learn", "scipy", "threadpoolctl"]
    lock = (REPO / "docker" / "requirements.lock").read_text()
    assert "\nlm-eval==0.4.13 " in lock
    assert not [name for name in names if f"\n{name}==" in lock]


def test_lm_eval_names_quieted_during_scoring_exist():
    """evaluate.QUIETED replaces these lm-eval names while it scores, and read_task_file uses lm-eval's own YAML
    reader (private_api): a newer lm-eval that moves them must fail here, not bring `fatal: not a git repository`
    and progress bars back to stderr."""
    import lm_eval
    from qctrain import private_api

    assert lm_eval.__version__ == private_api.CHECKED_ON["lm-eval"]
    for module_name, names in evaluate.QUIETED.items():
        module = importlib.import_module(module_name)
        for name in names:
            assert callable(getattr(module, name, None)), f"{module_name}.{name}"
    for entry in (private_api.LM_EVAL_TASK_FILE, private_api.LM_EVAL_QUIETED):
        module = importlib.import_module(entry.where)
        assert all(callable(getattr(module, name, None)) for name in entry.names), entry
    assert set(private_api.LM_EVAL_QUIETED.names) <= set(evaluate.QUIETED[private_api.LM_EVAL_QUIETED.where])


# --- lm-eval on the loaded model against a plain lm-eval run ---

@pytest.fixture(scope="module")
def exact_vocab(tmp_path_factory):
    """A 4-bit tiny Phi-3 whose vocabulary is the tokenizer's length (a plain lm-eval `peft=` run resizes the
    embeddings to len(tokenizer) otherwise, see README: Evaluation) with a LoRA adapter whose B is not zero,
    loaded as qctrain loads it; the same base saved pre-quantised and the adapter saved, for lm-eval to load."""
    import torch
    from peft import LoraConfig, get_peft_model
    from qctrain.basemodel.load import load_base_model
    from qctrain.recipe import ModelSection, Quantization
    from qctrain.tiny import build_model, phi35_tokenizer, phi35_tokenizer_dir

    root = tmp_path_factory.mktemp("exact-vocab")
    tokenizer = phi35_tokenizer()
    build_model(tokenizer).save_pretrained(root / "base")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copyfile(phi35_tokenizer_dir() / name, root / "base" / name)
    base = load_base_model(ModelSection(name=str(root / "base"), quantization=Quantization(compute_dtype="float32")))
    base.save_pretrained(root / "nf4")
    tokenizer.save_pretrained(root / "nf4")
    torch.manual_seed(1)
    peft_model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    peft_model.save_pretrained(root / "adapter")
    return peft_model, tokenizer, root


def plain_lm_eval(pretrained: Path, adapter: Path | None, monkeypatch) -> list[list[float]]:
    """The task scored as `lm_eval --model hf --model_args pretrained=...[,peft=...] --tasks qc_tiny_mc
    --include_path tests/data/eval --batch_size 8` does it, from the task's folder (where lm-eval finds its
    data file): lm-eval loads the model itself. Per document, each choice's log-likelihood."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from qctrain.basemodel.load import disable_avx512bf16_repack

    monkeypatch.chdir(TASK_DIR)
    lm = HFLM(pretrained=str(pretrained), peft=str(adapter) if adapter else None, device="cpu", batch_size=8)
    disable_avx512bf16_repack(lm.model)  # as qctrain's loader does (a bitsandbytes kernel switch on such CPUs)
    with evaluate._quiet_lm_eval():
        results = simple_evaluate(model=lm, tasks=["qc_tiny_mc"], num_fewshot=0, log_samples=True,
                                  task_manager=TaskManager(include_path=str(TASK_DIR), include_defaults=False))
    return evaluate._metrics_of(results, "qc_tiny_mc"), evaluate.document_loglikelihoods(results, "qc_tiny_mc")


@pytest.mark.slow
def test_scores_on_the_loaded_model_equal_a_plain_lm_eval_run(exact_vocab, monkeypatch, tmp_path):
    peft_model, tokenizer, root = exact_vocab
    lines = []
    monkeypatch.chdir(tmp_path)  # not the task's folder: qctrain resolves its data file against the YAML
    section = EvaluateSection(tasks=[TaskFile(file=str(TASK_FILE))], num_fewshot=0)
    scored = evaluate.score_tasks(peft_model, tokenizer, section, say=lines.append, loglikelihoods=True)
    task = scored["tasks"]["qc_tiny_mc"]
    assert [line.split(": acc")[0] for line in lines] == ["eval: qc_tiny_mc (tuned) 8 docs",
                                                          "eval: qc_tiny_mc (base) 8 docs"]
    assert task["documents"] == 8 and task["n_shot"] == 0 and task["higher_is_better"] == {"acc": True,
                                                                                          "acc_norm": True}
    assert task["loglikelihoods"]["tuned"] != task["loglikelihoods"]["base"]  # the adapter changes every score

    tuned_metrics, tuned_ll = plain_lm_eval(root / "nf4", root / "adapter", monkeypatch)
    base_metrics, base_ll = plain_lm_eval(root / "nf4", None, monkeypatch)
    assert task["loglikelihoods"]["tuned"] == tuned_ll and task["tuned"] == tuned_metrics  # bit for bit
    assert task["loglikelihoods"]["base"] == base_ll and task["base"] == base_metrics
    assert len(tuned_ll) == 8 and all(len(doc) == 3 for doc in tuned_ll)


def one_at_a_time(model, tokenizer, conversations, max_new_tokens):
    """Greedy replies with one generate call per conversation, as the card's samples were made before batching."""
    import torch

    replies = []
    for conversation in conversations:
        messages = conversation["messages"] if isinstance(conversation, dict) else conversation
        tools = conversation.get("tools") if isinstance(conversation, dict) else None
        inputs = tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, return_tensors="pt",
                                               return_dict=True)
        with torch.no_grad():
            output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
        replies.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
    return replies


def test_batched_samples_equal_one_at_a_time(exact_vocab):
    from qctrain.finished.generate import before_after_samples

    peft_model, tokenizer, _ = exact_vocab
    side = tokenizer.padding_side
    conversations = [[{"role": "user", "content": "Who are you?"}],
                     {"messages": [{"role": "user", "content": "What is the capital of France? Answer in a word."}],
                      "tools": [{"type": "function", "function": {"name": "lookup", "parameters": {}}}]},
                     [{"role": "user", "content": "Hi"}]]
    batched = before_after_samples(peft_model, tokenizer, conversations, max_new_tokens=8)
    assert [s.tuned for s in batched] == one_at_a_time(peft_model, tokenizer, conversations, 8)
    with peft_model.disable_adapter():
        assert [s.base for s in batched] == one_at_a_time(peft_model, tokenizer, conversations, 8)
    assert [s.prompt for s in batched] == ["Who are you?", "What is the capital of France? Answer in a word.", "Hi"]
    assert all(s.base != s.tuned for s in batched)
    assert tokenizer.padding_side == side  # left only while the batch was tokenized


# --- where the results go ---

def test_card_results_round_trip_through_the_hub_card_and_hold_only_the_tuned_numbers():
    from huggingface_hub import ModelCard, ModelCardData
    from qctrain import card

    full = report()
    full["lm_eval_version"] = "0.4.13"
    full["limit"] = 20
    full["tasks"]["mc"].update(n_shot=0, dataset={"path": "allenai/ai2_arc", "name": "ARC-Easy", "split": "test"})
    data = ModelCardData(model_name="org/tuned", eval_results=card.evaluation_results(full))
    back = ModelCard(f"---\n{data.to_yaml()}\n---\n\n# card\n").data.eval_results
    assert [(r.task_name, r.metric_type, r.metric_value) for r in back] == [
        ("Supervised fine-tuning", "loss", 1.5), ("Supervised fine-tuning", "accuracy", 0.4), ("mc", "acc", 0.6)]
    assert back[2].dataset_type == "allenai/ai2_arc" and back[2].dataset_config == "ARC-Easy"
    assert back[2].metric_args == {"limit": 20} and back[2].source_name == "lm-evaluation-harness 0.4.13"

    full["gate"] = evaluate.gate(full, [GateRule(metric="mc.acc")])
    table = card.evaluation_table(full)
    assert "| held-out split | loss | 2.0000 | 1.5000 | -0.5000 |" in table
    assert "| mc | acc | 0.5000 | 0.6000 | +0.1000 |" in table and "stderr" not in table
    assert "Gate (evaluate.gate): passed" in table


def test_results_file_is_json_and_shareable(tmp_path):
    path = tmp_path / "eval_results.json"
    evaluate.write_results(path, {**report(), "path": Path("/x")})
    assert json.loads(path.read_text())["path"] == "/x" and (path.stat().st_mode & 0o644) == 0o644


def test_check_names_a_missing_task_file_before_any_weight_loads(tmp_path, tiny_model_dir):
    from conftest import run_cli

    data = write_json(tmp_path / "d.json", alpaca_records(8))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data, tmp_path / "out",
                          evaluate={"tasks": [{"file": str(tmp_path / "missing.yaml")}]})
    result = run_cli("check", str(recipe))
    assert result.returncode == 2
    assert result.stderr == (f"qctrain: error: preflight: evaluate.tasks[0]: {tmp_path / 'missing.yaml'}: task file "
                             "not found\n")


def test_lm_eval_failures_become_one_line_naming_the_task():
    spec = evaluate.TaskSpec("arc_eazy", "arc_eazy", "evaluate.tasks[1]")
    unknown = KeyError("Spec 'arc_eazy' is not a registered task/group/tag name or valid YAML path")
    assert str(evaluate.explain(unknown, spec)) == "evaluate.tasks[1] (arc_eazy): lm-eval has no task of that name"
    missing = ModuleNotFoundError("No module named 'sklearn'", name="sklearn")
    assert str(evaluate.explain(missing, spec)).startswith("evaluate.tasks[1] (arc_eazy): needs scikit-learn")
    assert evaluate.explain(RuntimeError("CUDA out of memory"), spec) is None  # not the input's fault: a traceback
