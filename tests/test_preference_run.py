"""The SFT -> DPO chain through the CLI (issue 23), on the tiny 4-bit model: a DPO run continuing a finished SFT run
names it in its manifest and card, learns the preference (held-out reward accuracy from 0 to well above chance),
writes the trained adapter alone with the usual outputs, and after SIGTERM (exit 75) resumes to the end an
uninterrupted run reaches; a KTO run from the bare base; `check` refuses an adapter that is not there or not of
this base.

The runs (one short SFT run, the DPO run from it, the same DPO run interrupted and resumed, a KTO run) happen once,
in the module fixture `chain`; the tests read what they left.
"""

import hashlib
import json
import shutil
import signal
import struct
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import REPO, finish, run_cli
from test_preemption import error_lines, start, wait_for_step

pytestmark = pytest.mark.slow
DPO_STEPS = 8


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write(path: Path, recipe: dict) -> Path:
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


# The uninterrupted DPO run also evaluates: an lm-eval task and the samples, base (every adapter off) and tuned.
EVALUATE = {"tasks": [{"file": str(REPO / "tests" / "data" / "eval" / "qc_tiny_mc.yaml")}], "limit": 4,
            "max_new_tokens": 8, "gate": [{"metric": "qc_tiny_mc.acc", "tolerance": 1.0}]}


def quantization() -> dict:
    return {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}


def sft_recipe(model: Path, out: Path) -> dict:
    return {"model": {"name": str(model), "quantization": quantization()}, "lora": {"r": 8, "alpha": 16,
                                                                                    "dropout": 0.0},
            "data": {"sources": [{"path": str(REPO / "data" / "style_sft.json")}], "eval": {"count": 4},
                     "max_seq_length": 128},
            "train": {"max_steps": 10, "per_device_train_batch_size": 4, "learning_rate": 1.0e-2,
                      "logging_steps": 5, "save_steps": 100, "gradient_checkpointing": False},
            "output": {"dir": str(out)}}


def dpo_recipe(model: Path, sft_out: Path | None, out: Path, method: str = "dpo", evaluate: dict | None = None,
               **train) -> dict:
    return {"method": method, **({"evaluate": evaluate} if evaluate else {}),
            "model": {"name": str(model), "quantization": quantization(),
                      **({"adapter": str(sft_out)} if sft_out else {})},
            "data": {"sources": [{"path": str(REPO / "data" / "style_pairs.json")}], "eval": {"count": 8},
                     "max_seq_length": 128},
            "train": {"max_steps": DPO_STEPS, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 8,
                      "learning_rate": 5.0e-3, "logging_steps": 1, "eval_strategy": "steps",
                      "eval_steps": DPO_STEPS, "save_steps": 4, "gradient_checkpointing": False, **train},
            "output": {"dir": str(out), "gguf": True}}


@pytest.fixture(scope="module")
def chain(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("chain")
    sft_out, dpo_out, resumed_out, kto_out = (root / name for name in ("sft", "dpo", "dpo-resumed", "kto"))
    sft = run_cli("train", str(write(root / "sft.yaml", sft_recipe(tiny_model_dir, sft_out))))
    assert sft.returncode == 0, sft.stderr[-3000:]
    dpo_yaml = write(root / "dpo.yaml", dpo_recipe(tiny_model_dir, sft_out, dpo_out, evaluate=EVALUATE))
    reference = start(dpo_yaml)  # the uninterrupted run, beside the interrupted one
    resumed_yaml = write(root / "dpo-resumed.yaml", dpo_recipe(tiny_model_dir, sft_out, resumed_out))
    proc = start(resumed_yaml, hooks={"sleep_per_step": 0.5})
    wait_for_step(proc, resumed_out, 5)
    proc.send_signal(signal.SIGTERM)
    preempted = finish(proc)
    checkpoints = sorted(p.name for p in (resumed_out / "checkpoints").iterdir())
    resumed = finish(start(resumed_yaml))
    reference = finish(reference)
    kto = run_cli("train", str(write(root / "kto.yaml", dpo_recipe(
        tiny_model_dir, None, kto_out, method="kto", max_steps=2, eval_steps=2, save_steps=100))))
    return SimpleNamespace(root=root, model=tiny_model_dir, sft_out=sft_out, dpo_out=dpo_out, dpo_yaml=dpo_yaml,
                           reference=reference, preempted=preempted, checkpoints=checkpoints, resumed=resumed,
                           resumed_out=resumed_out, resumed_yaml=resumed_yaml, kto=kto, kto_out=kto_out)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_the_dpo_run_names_the_sft_run_it_continued(chain):
    assert chain.reference.returncode == 0, chain.reference.stderr[-3000:]
    manifest = json.loads((chain.dpo_out / "run_manifest.json").read_text())
    sft_manifest = json.loads((chain.sft_out / "run_manifest.json").read_text())
    assert manifest["recipe"]["method"] == "dpo"
    assert manifest["parent"] == {
        "adapter": str(chain.sft_out.resolve()), "kind": "run", "revision": None,
        "adapter_sha256": sha256(chain.sft_out / "adapter" / "adapter_model.safetensors"),
        "manifest_sha256": sha256(chain.sft_out / "run_manifest.json"), "method": "sft",
        "recipe_sha256": sft_manifest["recipe_sha256"]}
    card = (chain.dpo_out / "README.md").read_text()
    assert manifest["parent"]["adapter_sha256"] in card and manifest["parent"]["manifest_sha256"] in card
    assert card == (chain.dpo_out / "adapter" / "README.md").read_text()


def test_heldout_reward_accuracy_rises_well_above_chance(chain):
    evals = [row for row in rows(chain.dpo_out) if "eval_rewards/accuracies" in row]
    start_row, end_row = evals[0], evals[-1]
    # step 0 (eval_on_start): the policy is the reference, every reward 0, no pair preferred yet
    assert start_row["step"] == 0 and start_row["eval_rewards/accuracies"] == 0.0
    assert start_row["eval_rewards/margins"] == 0.0
    assert end_row["step"] == DPO_STEPS and end_row["eval_rewards/accuracies"] >= 0.75
    assert end_row["eval_rewards/margins"] > 0.2
    first_step = next(row for row in rows(chain.dpo_out) if "rewards/chosen" in row)
    assert first_step["rewards/chosen"] == first_step["rewards/rejected"] == 0.0
    manifest = json.loads((chain.dpo_out / "run_manifest.json").read_text())
    accuracy = manifest["preference"]["rewards/accuracies"]
    assert (accuracy["start"], accuracy["end"]) == (0.0, end_row["eval_rewards/accuracies"])
    card = (chain.dpo_out / "README.md").read_text()
    assert f"| reward accuracy | 0.000 | {end_row['eval_rewards/accuracies']:.3f} |" in card
    assert "Held-out pairs (8):" in card


def test_the_adapter_folder_holds_the_trained_adapter_alone_with_the_usual_outputs(chain):
    from safetensors.torch import load_file

    adapter = chain.dpo_out / "adapter"
    assert not (adapter / "ref").exists()
    trained, sft = (load_file(folder / "adapter_model.safetensors") for folder in (adapter, chain.sft_out /
                                                                                   "adapter"))
    assert trained.keys() == sft.keys() and any(not trained[k].equal(sft[k]) for k in trained)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(chain.model)
    assert any((chain.dpo_out / "gguf").glob("*.gguf")) and (chain.dpo_out / "gguf" / "Modelfile").is_file()
    width = struct.unpack(">I", (chain.dpo_out / "loss.png").read_bytes()[16:20])[0]
    assert width > 1000  # two panels: the losses, and the rewards of the chosen and rejected replies
    reply = run_cli("generate", str(chain.dpo_out), "--prompt", "What do bees make?", "--max-new-tokens", "8",
                    "--compare-parent")
    assert reply.returncode == 0, reply.stderr
    assert [line.split(":")[0] for line in reply.stdout.splitlines()] == ["prompt", "parent", "reply"]


def test_sigterm_checkpoints_exits_75_and_the_rerun_ends_where_an_uninterrupted_run_ends(chain):
    import torch
    from safetensors.torch import load_file

    assert chain.preempted.returncode == 75, chain.preempted.stderr[-3000:]
    [line] = error_lines(chain.preempted.stderr)
    step = int(line.split("at step ")[1].split("/")[0])
    assert 5 <= step < DPO_STEPS and f"checkpoint-{step}" in chain.checkpoints
    assert chain.resumed.returncode == 0, chain.resumed.stderr[-3000:]
    assert f"resuming from {chain.resumed_out / 'checkpoints' / f'checkpoint-{step}'}" in chain.resumed.stdout
    train_rows = {name: [r for r in rows(out) if "loss" in r] for name, out in (("ref", chain.dpo_out),
                                                                                ("got", chain.resumed_out))}
    assert [r["step"] for r in train_rows["got"]] == list(range(1, DPO_STEPS + 1))
    for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins"):
        assert [r[key] for r in train_rows["got"]] == pytest.approx([r[key] for r in train_rows["ref"]], abs=1e-4)
    ref, got = (load_file(out / "adapter" / "adapter_model.safetensors") for out in (chain.dpo_out,
                                                                                   chain.resumed_out))
    assert all(torch.allclose(ref[k], got[k], atol=1e-4, rtol=0) for k in ref)


def test_a_changed_sft_adapter_under_the_same_path_does_not_resume(chain, tmp_path):
    from qctrain import checkpoint, parent
    from qctrain.errors import InputError
    from qctrain.recipe import load_recipe

    recipe = load_recipe(chain.resumed_yaml)
    identity = parent.resolve(recipe.model.adapter).identity()
    assert checkpoint.plan_resume(recipe, parent=identity).checkpoint is not None  # the same adapter: resumes
    with pytest.raises(InputError, match=r'changed: parent\.adapter_sha256 \("[0-9a-f]+\.\.\. -> "0+\.\.\.\)'):
        checkpoint.plan_resume(recipe, parent={**identity, "adapter_sha256": "0" * 64})


def test_kto_from_the_bare_base(chain):
    assert chain.kto.returncode == 0, chain.kto.stderr[-3000:]
    manifest = json.loads((chain.kto_out / "run_manifest.json").read_text())
    assert manifest["recipe"]["method"] == "kto" and "parent" not in manifest
    logged = rows(chain.kto_out)
    assert any("kl" in row for row in logged) and logged[0]["step"] == 0  # held-out KL and margin at step 0
    assert "the reference was the base model itself" in (chain.kto_out / "README.md").read_text()


def test_check_refuses_an_adapter_that_is_missing_or_of_another_base(chain, tmp_path):
    recipe = yaml.safe_load(chain.dpo_yaml.read_text())
    recipe["output"]["dir"] = str(tmp_path / "out")
    recipe["model"]["adapter"] = str(tmp_path / "nowhere")
    result = run_cli("check", str(write(tmp_path / "a.yaml", recipe)))
    assert result.returncode == 2 and f"model.adapter: {tmp_path / 'nowhere'}: not found" in result.stderr
    other = tmp_path / "other-model"
    shutil.copytree(chain.model, other)
    recipe["model"].update(adapter=str(chain.sft_out), name=str(other))
    result = run_cli("check", str(write(tmp_path / "b.yaml", recipe)))
    assert result.returncode == 2
    assert f"model.adapter: {chain.sft_out} was trained on {chain.model}, not model.name {other}" in result.stderr


def test_the_dpo_run_evaluates_its_task_and_samples_with_its_parent_loaded(chain):
    """evaluate: on a dpo run that continues an adapter: the lm-eval task scored for the base (every adapter
    disabled) and the tuned policy, the samples in the card, the gate decided; its held-out pairs stay the preference
    trainer's (evaluate.heldout is off for dpo)."""
    results = json.loads((chain.dpo_out / "eval_results.json").read_text())
    task = results["tasks"]["qc_tiny_mc"]
    assert set(task["base"]) >= {"acc"} and set(task["tuned"]) >= {"acc"}
    assert results.get("heldout") is None and results["gate"]["passed"] is True
    assert results["samples"] and all(s["base"] is not None and s["tuned"] for s in results["samples"])
    manifest = json.loads((chain.dpo_out / "run_manifest.json").read_text())
    assert manifest["evaluation"]["tasks"]["qc_tiny_mc"]["tuned"]["acc"] == task["tuned"]["acc"]
    card = (chain.dpo_out / "README.md").read_text()
    assert "qc_tiny_mc" in card and "## Preference tuning" in card
    assert "eval: qc_tiny_mc" in chain.reference.stdout
