"""End to end on CPU: a recipe trains a real 4-bit LoRA adapter, writes every output, and reloads.

The run is conftest's shared `finished_run` (48 records, 16 steps, evaluated every 8)."""

import json

import torch
import yaml
from conftest import copy_run, run_cli, write_json
from safetensors.torch import load_file


def test_outputs_are_complete(finished_run):
    out = finished_run.out
    for name in ("adapter/adapter_model.safetensors", "adapter/adapter_config.json", "adapter/tokenizer.json",
                 "adapter/chat_template.jinja", "README.md", "run_manifest.json", "metrics.jsonl",
                 "loss.png", "data_report.json"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")
    from qctrain import data

    # the chat template the data stage rendered through (Phi-3.5's, extended for tools and traces), unmasked
    template = (out / "adapter/chat_template.jinja").read_text()
    assert template.startswith(data.template.template_extension(True, True))
    assert not data.template.has_generation_markers(template)
    assert "data: 48 read, 0 duplicates" in finished_run.stdout
    assert ("train: liger-kernel off (its kernels are Triton kernels for CUDA GPUs and there is none here); loss: "
            "cross entropy over the supervised positions; 2 pack(s) per batch as 2 row(s) (sdpa)") \
        in finished_run.stdout
    assert not list(out.glob(".staging-*"))


def test_loss_decreases(finished_run):
    rows = [json.loads(line) for line in (finished_run.out / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in rows if "loss" in row]
    assert len(losses) == 16
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.05, losses
    assert any("eval_loss" in row for row in rows)


def test_manifest_records_the_run(finished_run):
    out, recipe_path = finished_run.out, finished_run.recipe
    manifest = json.loads((out / "run_manifest.json").read_text())
    from qctrain.recipe import load_recipe

    assert manifest["recipe_sha256"] == load_recipe(recipe_path).sha256()
    assert manifest["recipe"]["lora"]["r"] == 8
    assert manifest["packages"]["trl"] and manifest["packages"]["bitsandbytes"]
    assert manifest["data"]["split"]["method"] == "fraction" and len(manifest["data"]["split"]["eval_ids"]) == 5
    assert manifest["data"]["fingerprint"] == json.loads((out / "data_report.json").read_text())["fingerprint"]
    assert manifest["batch"]["global_batch_size"] == 2
    assert manifest["metrics"]["train_loss"] > 0 and "eval_loss" in manifest["metrics"]
    assert manifest["started"] <= manifest["finished"]


def test_model_card_header(finished_run):
    text = (finished_run.out / "README.md").read_text()
    header = yaml.safe_load(text.split("---")[1])
    # A local base with no Hub id and no license in its files: neither is made up (never a path).
    assert header["library_name"] == "peft" and "base_model" not in header and "license" not in header
    assert "qlora" in header["tags"] and header["model-index"][0]["results"][0]["metrics"][0]["type"] == "loss"
    assert "## Sample generations (held-out prompts)" in text
    assert "| base model (adapter off) | with this adapter |" in text


def test_adapter_reloads_on_the_base_and_generates(finished_run, tiny_model_dir, tmp_path):
    from peft import PeftModel
    from qctrain.basemodel.load import load_base_model
    from qctrain.recipe import ModelSection

    out = finished_run.out
    weights = load_file(out / "adapter" / "adapter_model.safetensors")
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # B starts at zero: trained
    base = load_base_model(ModelSection(name=str(tiny_model_dir), quantization={"compute_dtype": "float32"}))
    ids = torch.tensor([[4, 10, 20, 30]])
    with torch.no_grad():
        before = base(ids).logits
        tuned = PeftModel.from_pretrained(base, out / "adapter")
        after = tuned(ids).logits
    assert not torch.allclose(before, after)

    result = run_cli("generate", str(out), "--prompt", "Explain item 3 briefly.", "--max-new-tokens", "8")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("prompt: Explain item 3 briefly.\nreply:")
    tools = write_json(tmp_path / "tools.json", [{"type": "function", "function": {
        "name": "lookup", "description": "Look an item up", "parameters": {"type": "object", "properties": {}}}}])
    result = run_cli("generate", str(out), "--prompt", "Look up item 3.", "--tools", str(tools),
                     "--max-new-tokens", "4")
    assert result.returncode == 0 and result.stdout.startswith("prompt: Look up item 3.\nreply:"), result.stderr


def test_prepare_prints_marked_sample_and_hits_cache(finished_run, tmp_path):
    copy = copy_run(finished_run, tmp_path / "work")  # prepare holds the run folder: not the shared one
    result = run_cli("prepare", copy.recipe.name, cwd=copy.work)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(cached)" in result.stdout and "⟦" in result.stdout and "<|assistant|>" in result.stdout
