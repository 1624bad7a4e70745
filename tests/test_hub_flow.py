"""Train and push end to end through the CLI against the Hub test double: checkpoints, merged model,
a push that fails after training (exit 4) and is finished later, and the token never leaking."""

import json
import os

import pytest
import torch
from conftest import alpaca_records, run_cli, write_json, write_recipe
from hub_double import HubDouble, Token, validate_card_metadata

TOKEN = "hf_FAKEflow_DO_NOT_LEAK_9f8e7d"


def hub_env(double: HubDouble, home) -> dict[str, str]:
    return {"HF_ENDPOINT": double.url, "HF_TOKEN": TOKEN, "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(home)}


@pytest.fixture(scope="module")
def double():
    with HubDouble({TOKEN: Token("alice")}) as hub:
        yield hub


@pytest.fixture(scope="module")
def pushed_run(double, tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("flow")
    data_path = write_json(tmp / "d.json", alpaca_records(24))
    recipe = write_recipe(tmp / "r.yaml", tiny_model_dir, data_path, tmp / "out",
                          train={"max_steps": 4, "save_steps": 2, "logging_steps": 1},
                          hub={"repo_id": "alice/tiny-adapter", "push": "checkpoints", "push_merged": True})
    result = run_cli("train", str(recipe), env=hub_env(double, tmp / "hf"))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp / "out", recipe, result, tmp


def test_adapter_and_run_files_pushed_byte_identical(pushed_run, double, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest keeps the test process offline
    out = pushed_run[0]
    remote = double.files("alice/tiny-adapter")
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"):
        assert remote[name] == (out / "adapter" / name).read_bytes(), name
    for name in ("README.md", "run_manifest.json", "metrics.jsonl", "loss.png", "data_report.json"):
        assert remote[name] == (out / name).read_bytes(), name
    assert not any(path.startswith(("checkpoints/", "prepared/")) for path in remote)
    assert double.repos["alice/tiny-adapter"].private
    assert validate_card_metadata(remote["README.md"].decode(), TOKEN, endpoint=double.url) == []


def test_each_checkpoint_pushed_to_its_branch(pushed_run, double):
    remote = double.files("alice/tiny-adapter", revision="checkpoints")
    for step in (2, 4):
        assert f"checkpoints/checkpoint-{step}/adapter_model.safetensors" in remote
        assert f"checkpoints/checkpoint-{step}/optimizer.pt" in remote


def test_merged_model_pushed(pushed_run, double):
    remote = double.files("alice/tiny-adapter-merged")
    assert "model.safetensors" in remote and "config.json" in remote and "tokenizer.json" in remote


def test_second_push_makes_no_commit(pushed_run, double):
    out, _, _, tmp = pushed_run
    commits = len(double.history("alice/tiny-adapter"))
    result = run_cli("push", str(out), env=hub_env(double, tmp / "hf"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "already up to date" in result.stdout
    assert len(double.history("alice/tiny-adapter")) == commits


def test_token_never_written_or_printed(pushed_run):
    out, _, result, _ = pushed_run
    assert TOKEN not in result.stdout + result.stderr
    for path in out.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


def test_merged_logits_match_base_plus_adapter(merged_run, finished_run, tiny_model_dir):
    """conftest's merged_run: `qctrain merge` of the shared finished_run, float32."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = finished_run.out
    ids = torch.tensor([[4, 50, 60, 70, 80, 90]])
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(merged_run.dest, dtype=torch.float32)(ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        with_adapter = PeftModel.from_pretrained(base, out / "adapter")(ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)(ids).logits
    assert torch.allclose(merged, with_adapter, atol=1e-5)
    assert not torch.allclose(merged, plain, atol=1e-5)


@pytest.mark.slow
def test_failed_push_exits_4_and_push_later_finishes(double, tiny_model_dir, tmp_path):
    data_path = write_json(tmp_path / "d.json", alpaca_records(12))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data_path, tmp_path / "out",
                          train={"max_steps": 2}, hub={"repo_id": "alice/later"})
    double.fail("commit", 403)
    try:
        result = run_cli("train", str(recipe), env=hub_env(double, tmp_path / "hf"))
    finally:
        double.clear_faults()
    assert result.returncode == 4, result.stderr[-2000:]
    assert "permission" in result.stderr.lower() and TOKEN not in result.stderr
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "out" / "push.json").exists()

    later = run_cli("push", str(tmp_path / "out"), env=hub_env(double, tmp_path / "hf"))
    assert later.returncode == 0, later.stderr[-2000:]
    assert double.files("alice/later")["adapter_model.safetensors"] == \
        (tmp_path / "out" / "adapter" / "adapter_model.safetensors").read_bytes()
    assert json.loads((tmp_path / "out" / "push.json").read_text())["pushed"] is True
    assert os.environ.get("HF_TOKEN") != TOKEN
