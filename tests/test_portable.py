"""Outputs that travel (end to end on CPU): trained in one folder with relative paths, then used from
another, offline, by PEFT's own AutoPeftModelForCausalLM and by `qctrain merge/generate/export`; for a
local base and for a Hub-id base (a populated HF_HOME cache standing in for the Hub).

The runs are conftest's shared `finished_run` (local base, trained under umask 077, tensorboard, output.gguf)
and `hub_run` (the Hub-id base from the cache); `elsewhere` is each test's own folder."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import HUB_ID, copy_run
from conftest import qctrain_in as qctrain


@pytest.fixture
def local_run(finished_run, tmp_path):
    """The shared run trained from its work folder (out, work) and a folder of this test's own to use it from."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    return finished_run.out, elsewhere, finished_run.work


@pytest.fixture
def hub_run(hub_cached_run, tmp_path):
    elsewhere = tmp_path / "elsewhere-hub"
    elsewhere.mkdir()
    return hub_cached_run.out, elsewhere


@pytest.fixture
def hf_home(hub_cached_run):
    return hub_cached_run.hf_home


def python(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


AUTO_PEFT = """
import sys, torch
from peft import AutoPeftModelForCausalLM
from transformers import AutoTokenizer
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"]
print(model.peft_config["default"].base_model_name_or_path, tuple(model(ids).logits.shape))
"""


def auto_peft(adapter: Path, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return python(AUTO_PEFT.replace("sys.argv[1]", repr(os.path.relpath(adapter, cwd))), cwd, env)


def test_local_base_is_named_by_absolute_path(local_run):
    out, _, work = local_run
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str((work / "models" / "tiny").resolve())
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["base_model"] == {"source": config["base_model_name_or_path"], "revision": None, "hub_id": None}


def test_auto_peft_model_loads_a_local_base_adapter_from_elsewhere(local_run):
    out, elsewhere, work = local_run
    result = auto_peft(out / "adapter", elsewhere)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == str((work / "models" / "tiny").resolve())


def test_auto_peft_model_loads_a_hub_base_adapter_from_elsewhere_offline(hub_run, hf_home):
    out, elsewhere = hub_run
    config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == HUB_ID
    result = auto_peft(out / "adapter", elsewhere, {"HF_HOME": str(hf_home)})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == HUB_ID


def test_hub_base_card_metadata(hub_run):
    from huggingface_hub import ModelCard

    out, _ = hub_run
    card = ModelCard.load(out / "adapter" / "README.md")
    assert card.data.base_model == HUB_ID and card.data.base_model_relation == "adapter"
    assert card.data.license == "mit"  # the base's own card, from the cache
    eval_loss = json.loads((out / "run_manifest.json").read_text())["metrics"]["eval_loss"]
    assert card.data.eval_results[0].metric_value == pytest.approx(eval_loss, abs=1e-4)


def test_adapter_folder_is_self_contained(local_run):
    out, _, _ = local_run
    adapter = out / "adapter"
    assert (adapter / "README.md").read_text() == (out / "README.md").read_text()
    assert "More Information Needed" not in (adapter / "README.md").read_text()
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "loss.png"):
        assert (adapter / name).is_file(), name
    header = yaml.safe_load((out / "README.md").read_text().split("---")[1])
    assert "base_model" not in header  # a local base without a Hub id: absent, never a path


def test_card_shows_base_and_tuned_replies(local_run):
    out, _, _ = local_run
    text = (out / "README.md").read_text()
    samples = text.split("## Sample generations (held-out prompts)")[1].split("## Recipe")[0]
    # 5 held out (eval fraction 0.1 of 48): the card shows the first 3
    assert samples.count("| base model (adapter off) | with this adapter |") == 3
    assert "_not generated_" not in samples


SHARED = ("adapter", "README.md", "run_manifest.json", "metrics.jsonl", "loss.png", "data_report.json")


def test_every_output_is_readable_by_others_and_nothing_else_is_made_so(local_run):
    """Trained under umask 077: the outputs are 0644/0755 all the same; the tokenised data and the checkpoints
    keep what the umask gave them."""
    out, _, _ = local_run
    paths = [out, *(p for name in SHARED for p in [out / name, *(out / name).rglob("*")])]
    wrong = [f"{p.relative_to(out)} {oct(stat.S_IMODE(p.stat().st_mode))}" for p in paths
             if stat.S_IMODE(p.stat().st_mode) != (0o755 if p.is_dir() else 0o644)]
    assert not wrong
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    private = [p for name in ("prepared", "checkpoints") for p in [out / name, *(out / name).rglob("*")]]
    opened = [f"{p.relative_to(out)} {oct(stat.S_IMODE(p.stat().st_mode))}" for p in private
              if stat.S_IMODE(p.stat().st_mode) & 0o077]
    assert len(private) > 10 and not opened


def test_tensorboard_logs_under_output_dir(local_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _, _ = local_run
    [events] = list(out.rglob("events.out.tfevents.*"))
    accumulator = EventAccumulator(str(events.parent))
    accumulator.Reload()
    assert len(accumulator.Scalars("train/loss")) == 16  # max_steps, logged every step


def test_generate_and_merge_work_from_anywhere(local_run, merged_run):
    out, elsewhere, _ = local_run
    result = qctrain("generate", os.path.relpath(out, elsewhere), "--prompt", "Explain item 3 briefly.",
                     "--max-new-tokens", "6", "--compare-base", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("prompt: Explain item 3 briefly.\nbase:   ") and "\nreply:  " in result.stdout
    # conftest's merged_run: `qctrain merge OUT --dest merged --dtype float32` from a folder of its own
    assert merged_run.result.returncode == 0, merged_run.result.stderr[-2000:]
    assert merged_run.dest == merged_run.elsewhere / "merged" and (merged_run.dest / "config.json").is_file()
    assert stat.S_IMODE((merged_run.dest / "model.safetensors").stat().st_mode) == 0o644


def test_export_gguf_from_anywhere(local_run, finished_run, hub_run, hub_cached_run, tmp_path):
    import gguf

    _, elsewhere, _ = local_run
    trained = sorted(p.name for p in (finished_run.out / "gguf").iterdir())
    assert trained == ["Modelfile", "run-lora-f32.gguf"]  # output.gguf: true wrote them at the end
    out = copy_run(finished_run, tmp_path / "copy").out  # the export writes into the run: a copy
    result = qctrain("export", str(out), "--gguf", "--outtype", "f16", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{out / 'gguf' / 'run-lora-f16.gguf'}" in result.stdout
    reader = gguf.GGUFReader(out / "gguf" / "run-lora-f16.gguf")
    assert reader.fields["general.architecture"].contents() == "phi3"
    assert not [k for k in reader.fields if k.startswith("general.base_model")]
    hub_out, hub_elsewhere = hub_run
    reader = gguf.GGUFReader(hub_out / "gguf" / "hub-lora-f32.gguf")
    assert reader.fields["general.base_model.0.repo_url"].contents() == f"https://huggingface.co/{HUB_ID}"
    modelfile = (hub_out / "gguf" / "Modelfile").read_text()
    assert f"FROM {hub_cached_run.snapshot}\n" in modelfile


def test_missing_base_is_exit_2_with_the_cause(local_run, tmp_path):
    out, elsewhere, work = local_run
    moved = tmp_path / "run"
    shutil.copytree(out, moved, ignore=shutil.ignore_patterns("checkpoints", "prepared"))
    config_path = moved / "adapter" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")
    config_path.write_text(json.dumps(config))
    for command in (["generate", str(moved), "--prompt", "hi"], ["merge", str(moved)],
                    ["export", str(moved), "--gguf"]):
        result = qctrain(*command, cwd=elsewhere)
        assert result.returncode == 2, (command, result.stderr[-2000:])
        assert f"qctrain: error: {moved}: its base model {tmp_path / 'gone'} is not there" in result.stderr
        assert "Traceback" not in result.stderr


def test_merged_model_card_names_the_hub_base(hub_run, hf_home):
    from huggingface_hub import ModelCard

    out, elsewhere = hub_run
    result = qctrain("merge", str(out), "--dest", "merged-hub", cwd=elsewhere, env={"HF_HOME": str(hf_home)})
    assert result.returncode == 0, result.stderr[-2000:]
    card = ModelCard.load(elsewhere / "merged-hub" / "README.md").data
    assert (card.base_model, card.base_model_relation, card.license) == (HUB_ID, "merge", "mit")


def test_hub_base_not_in_the_cache_is_exit_2(hub_run, tmp_path):
    out, elsewhere = hub_run
    result = qctrain("merge", str(out), cwd=elsewhere, env={"HF_HOME": str(tmp_path / "empty")})
    assert result.returncode == 2, result.stderr[-2000:]
    assert f"qctrain: error: cannot load the base model {HUB_ID}:" in result.stderr
