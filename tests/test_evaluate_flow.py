"""Evaluation end to end through the CLI, on one trained run: `train` evaluates base against tuned and the gate
refuses the push (exit 5, nothing on the Hub test double, outputs complete), `push` applies the recorded verdict,
`qctrain eval` on the finished run and on an adapter folder gives the training-time numbers."""

import json
import shutil

import pytest
from conftest import REPO, alpaca_records, run_cli, write_json, write_recipe
from hub_double import HubDouble, Token

TOKEN = "hf_FAKEeval_DO_NOT_LEAK_5a4b3c"
REPO_ID = "alice/gated-adapter"
TASK_FILE = REPO / "tests" / "data" / "eval" / "qc_tiny_mc.yaml"
REFUSING = [{"metric": "heldout.loss", "tolerance": -100.0}]  # tuned must beat the base by 100 nats: never
PASSING = [{"metric": "heldout.loss", "tolerance": 100.0}, {"metric": "qc_tiny_mc.acc_norm", "tolerance": 1.0}]

pytestmark = pytest.mark.slow


def hub_env(double: HubDouble, home) -> dict[str, str]:
    return {"HF_ENDPOINT": double.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(home)}


def pushed_files(double: HubDouble) -> set[str]:
    return set(double.files(REPO_ID)) if REPO_ID in double.repos else set()


@pytest.fixture(scope="module")
def double():
    with HubDouble({TOKEN: Token("alice")}) as hub:
        yield hub


@pytest.fixture(scope="module")
def gated_run(double, tiny_model_dir, tmp_path_factory):
    """A run whose evaluate.gate cannot pass, with hub.push: if_better; what it left, as training left it."""
    tmp = tmp_path_factory.mktemp("gated")
    data_path = write_json(tmp / "d.json", alpaca_records(24))
    recipe = write_recipe(tmp / "r.yaml", tiny_model_dir, data_path, tmp / "out",
                          train={"max_steps": 4, "logging_steps": 2, "disable_tqdm": True},
                          hub={"repo_id": REPO_ID, "push": "if_better"},
                          evaluate={"tasks": [{"file": str(TASK_FILE)}], "max_new_tokens": 8, "gate": REFUSING})
    result = run_cli("train", str(recipe), env=hub_env(double, tmp / "hf"))
    out = tmp / "out"
    results = json.loads((out / "eval_results.json").read_text()) if (out / "eval_results.json").is_file() else {}
    return {"out": out, "recipe": recipe, "result": result, "tmp": tmp, "results": results,
            "pushed": pushed_files(double), "card": (out / "README.md").read_text() if out.is_dir() else ""}


def test_train_evaluates_and_the_gate_refuses_the_push(gated_run):
    result, out, results = gated_run["result"], gated_run["out"], gated_run["results"]
    assert result.returncode == 5, result.stderr[-3000:]
    assert result.stderr.splitlines() == [
        f"qctrain: error: not pushed: heldout.loss {results['heldout']['tuned']['loss']:.4g} is not better than the "
        f"base's {results['heldout']['base']['loss']:.4g} by 100 or more (lower is better); outputs complete in {out}; "
        f"to push anyway: qctrain push {out} --ignore-gate"]  # one line: no library noise, no progress bar
    assert "adapter_model.safetensors" not in gated_run["pushed"] and "README.md" not in gated_run["pushed"]
    for name in ("adapter/adapter_model.safetensors", "run_manifest.json", "README.md", "eval_results.json"):
        assert (out / name).is_file(), name
    # both models scored, on the held-out split and the task, each task and model said in one line
    assert set(results["heldout"]["base"]) == set(results["heldout"]["tuned"]) == {"loss", "mean_token_accuracy",
                                                                                    "entropy"}
    task = results["tasks"]["qc_tiny_mc"]
    assert task["documents"] == 8 and set(task["base"]) == set(task["tuned"]) >= {"acc", "acc_norm"}
    lines = [line for line in result.stdout.splitlines() if line.startswith("eval: ")]
    assert [line.split(" (")[0] for line in lines] == ["eval: held-out split", "eval: qc_tiny_mc", "eval: qc_tiny_mc"]
    assert results["gate"]["passed"] is False and len(results["samples"]) == results["heldout"]["records"] == 2
    assert set(results["seconds"]) >= {"heldout", "tasks", "samples", "total"}
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["evaluation"]["gate"] == results["gate"] and "samples" not in manifest["evaluation"]
    assert manifest["metrics"]["eval_loss"] == results["heldout"]["tuned"]["loss"]  # training's own final eval
    # the card: the table, the verdict, and model-index entries of the tuned model's numbers
    card = gated_run["card"]
    assert "## Evaluation: base vs tuned" in card and "| qc_tiny_mc | acc_norm |" in card
    assert "Gate (evaluate.gate): refused" in card and "name: qc_tiny_mc" in card
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evaluated = [row for row in rows if "model" in row]
    assert [row["model"] for row in evaluated] == ["base", "tuned"]
    assert evaluated[0]["heldout/loss"] == results["heldout"]["base"]["loss"] and evaluated[0]["step"] == 4
    assert not [row for row in rows if "model" not in row and row.get("eval_loss") == results["heldout"]["base"][
        "loss"]]  # the base pass left no eval_loss row of its own (a tracker or the loss plot would take it)


def test_push_applies_the_recorded_verdict_and_qctrain_eval_writes_a_new_one(gated_run, double):
    out, env = gated_run["out"], hub_env(double, gated_run["tmp"] / "hf")
    refused = run_cli("push", str(out), env=env)
    assert refused.returncode == 5 and "not pushed: heldout.loss" in refused.stderr
    assert "adapter_model.safetensors" not in pushed_files(double)

    # a new verdict from a new evaluation of the finished run: the same model, the same numbers as training's
    evaluated = run_cli("eval", str(out), "--set", f"evaluate.gate={json.dumps(PASSING)}", env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert evaluated.stderr == ""
    again = json.loads((out / "eval_results.json").read_text())
    before = gated_run["results"]
    assert again["heldout"]["base"] == before["heldout"]["base"]
    assert again["heldout"]["tuned"] == before["heldout"]["tuned"]
    assert again["tasks"]["qc_tiny_mc"]["base"] == before["tasks"]["qc_tiny_mc"]["base"]
    assert again["tasks"]["qc_tiny_mc"]["tuned"] == before["tasks"]["qc_tiny_mc"]["tuned"]
    assert again["samples"] == before["samples"]  # batched greedy replies, as at the end of training
    assert again["gate"]["passed"] is True and "Gate (evaluate.gate): passed" in evaluated.stdout
    assert json.loads((out / "run_manifest.json").read_text())["evaluation"]["gate"]["passed"] is True
    assert "Gate (evaluate.gate): passed" in (out / "adapter" / "README.md").read_text()

    pushed = run_cli("push", str(out), env=env)
    assert pushed.returncode == 0, pushed.stderr[-2000:]
    remote = double.files(REPO_ID)
    assert remote["eval_results.json"] == (out / "eval_results.json").read_bytes()
    assert remote["adapter_model.safetensors"] == (out / "adapter" / "adapter_model.safetensors").read_bytes()
    assert TOKEN not in evaluated.stdout + pushed.stdout + pushed.stderr


def test_qctrain_eval_on_an_adapter_folder(gated_run, tmp_path):
    adapter = tmp_path / "adapter"
    shutil.copytree(gated_run["out"] / "adapter", adapter)
    evaluated = run_cli("eval", str(adapter), "--recipe", str(gated_run["recipe"]), "--out", str(tmp_path / "res"),
                        "--set", "evaluate.gate=[]", "--set", "hub=null")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    results = json.loads((tmp_path / "res" / "eval_results.json").read_text())
    before = gated_run["results"]
    assert results["heldout"]["base"] == before["heldout"]["base"]
    assert results["heldout"]["tuned"] == before["heldout"]["tuned"]
    assert results["tasks"]["qc_tiny_mc"]["tuned"] == before["tasks"]["qc_tiny_mc"]["tuned"]
    assert results["source"] == str(adapter) and "gate" not in results
    assert sorted(p.name for p in adapter.iterdir()) == sorted(p.name for p in (gated_run["out"] / "adapter").iterdir())


def test_a_rerun_evaluates_a_finished_run_that_has_no_evaluation(gated_run, double, tmp_path):
    """A run stopped during its evaluation (or trained before its recipe had an evaluate: section) is finished on the
    rerun of the same command: evaluated, gated, nothing trained."""
    import yaml

    out = tmp_path / "out"
    shutil.copytree(gated_run["out"], out, ignore=shutil.ignore_patterns("eval_results.json", ".qctrain.lock"))
    recipe = yaml.safe_load(gated_run["recipe"].read_text())
    recipe["output"]["dir"] = str(out)
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    commits = len(double.history(REPO_ID))
    rerun = run_cli("train", str(tmp_path / "r.yaml"), env=hub_env(double, tmp_path / "hf"))
    assert rerun.returncode == 5, rerun.stderr[-3000:]
    assert "run complete: adapter in" in rerun.stdout and "eval: qc_tiny_mc (base)" in rerun.stdout
    results = json.loads((out / "eval_results.json").read_text())
    assert results["heldout"]["base"] == gated_run["results"]["heldout"]["base"]
    assert results["heldout"]["tuned"] == gated_run["results"]["heldout"]["tuned"]
    assert results["gate"]["passed"] is False and len(double.history(REPO_ID)) == commits  # nothing pushed
