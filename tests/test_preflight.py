"""Preflight: every problem at once, in seconds, with no weights loaded and nothing written."""

import time

import pytest
import transformers
from conftest import alpaca_records, run_cli, write_json, write_recipe
from hub_double import HubDouble, Token, point_client_at
from qctrain import preflight
from qctrain.recipe import load_recipe

TOKEN = "hf_FAKEpreflight_DO_NOT_LEAK_321"
READ_TOKEN = "hf_FAKEpreflightread_DO_NOT_LEAK_654"


@pytest.fixture
def hub(monkeypatch, tmp_path):
    with HubDouble({TOKEN: Token("alice"), READ_TOKEN: Token("alice", role="read")}) as double:
        point_client_at(double, monkeypatch, tmp_path / "hf-home")
        yield double


@pytest.fixture
def no_weights(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("preflight loaded model weights")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def recipe_with(tmp_path, model_dir, **sections):
    data_path = write_json(tmp_path / "d.json", alpaca_records(10))
    return load_recipe(write_recipe(tmp_path / "r.yaml", model_dir, data_path, tmp_path / "out", **sections))


def test_good_recipe_passes_quickly(tmp_path, tiny_model_dir, hub, no_weights):
    recipe = recipe_with(tmp_path, tiny_model_dir, hub={"repo_id": "alice/adapter"})
    start = time.perf_counter()
    assert preflight.run_checks(recipe, env={"HF_TOKEN": TOKEN}) == []
    assert time.perf_counter() - start < 10
    assert hub.repos["alice/adapter"].private  # created, private by default
    assert not (tmp_path / "out").exists()


def test_every_problem_is_reported_at_once(tmp_path, tiny_model_dir, hub, no_weights):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    recipe = recipe_with(tmp_path, tiny_model_dir,
                         data={"sources": [{"path": str(tmp_path / "missing.json")}], "chat_template": "phi35"},
                         lora={"target_modules": ["q_proj"]}, output={"dir": str(blocker / "out")},
                         hub={"repo_id": "alice/adapter"})
    start = time.perf_counter()
    problems = preflight.run_checks(recipe, env={"HF_TOKEN": READ_TOKEN})
    assert time.perf_counter() - start < 10
    text = "\n".join(problems)
    assert f"{tmp_path / 'missing.json'}: data source not found" in text
    assert "is a file, not a folder" in text
    assert "unknown template 'phi35'" in text
    assert "q_proj match no module" in text and "qkv_proj" in text
    assert "token" in text.lower() and READ_TOKEN not in text
    assert len(problems) == 5, problems


def test_missing_and_invalid_tokens(tmp_path, tiny_model_dir, hub):
    recipe = recipe_with(tmp_path, tiny_model_dir, hub={"repo_id": "alice/adapter"})
    assert any("no Hub token" in p for p in preflight.run_checks(recipe, env={}))
    problems = preflight.run_checks(recipe, env={"HF_TOKEN": "hf_FAKEunknown_000"})
    assert len(problems) == 1 and "token" in problems[0].lower() and "hf_FAKEunknown_000" not in problems[0]
    assert preflight.run_checks(recipe.model_copy(update={"hub": None}), env={}) == []


def test_no_hub_check_when_push_is_never(tmp_path, tiny_model_dir):
    recipe = recipe_with(tmp_path, tiny_model_dir, hub={"repo_id": "alice/adapter", "push": "never"})
    assert preflight.run_checks(recipe, env={}) == []


def test_too_little_disk(tmp_path, tiny_model_dir):
    recipe = recipe_with(tmp_path, tiny_model_dir)
    problems = preflight.check_output_dir(recipe, min_free=1 << 60)
    assert len(problems) == 1 and "MiB free" in problems[0]


def test_memory_estimate_for_phi35_mini_shape(tmp_path):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, Phi3Config

    config = Phi3Config(hidden_size=3072, num_hidden_layers=32, num_attention_heads=32,
                        intermediate_size=8192, vocab_size=32064)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    recipe = load_recipe("recipes/phi-3.5-mini-qlora.yaml", env={})
    estimate = preflight.estimate_peak_memory(recipe, skeleton)
    assert 1.9 < estimate["weights"] < 2.4  # 3.8 B parameters, 4-bit Linear layers
    batch = recipe.sft_kwargs()["per_device_train_batch_size"]
    assert estimate["logits"] == pytest.approx(batch * 2048 * 32064 * 8 / 2**30, abs=0.01)
    without_checkpointing = preflight.estimate_peak_memory(
        recipe.model_copy(update={"train": {**recipe.train, "gradient_checkpointing": False}}), skeleton)
    assert without_checkpointing["activations"] > 5 * estimate["activations"]


def test_check_command_exit_code_and_one_line_per_problem(tmp_path, tiny_model_dir):
    data_path = write_json(tmp_path / "d.json", alpaca_records(10))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data_path, tmp_path / "out",
                          data={"sources": [{"path": str(tmp_path / "nope.jsonl")}]})
    result = run_cli("check", str(recipe))
    assert result.returncode == 2
    expected = f"qctrain: error: preflight: {tmp_path / 'nope.jsonl'}: data source not found"
    assert result.stderr.splitlines() == [expected]
    ok = run_cli("check", str(write_recipe(tmp_path / "ok.yaml", tiny_model_dir, data_path, tmp_path / "out")))
    assert ok.returncode == 0 and ok.stdout.strip() == "preflight: ok"


def test_liger_switch_without_the_package_is_a_preflight_problem(tmp_path, tiny_model_dir, monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a))
    recipe = recipe_with(tmp_path, tiny_model_dir, train={"use_liger_kernel": True})
    assert preflight.check_packages(recipe) == [
        "train.use_liger_kernel: the liger-kernel package is not installed here; "
        "set it to false or use an image that has it"]
    assert preflight.check_packages(recipe_with(tmp_path, tiny_model_dir)) == []
