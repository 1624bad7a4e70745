"""Outputs that travel (end to end on CPU): trained in one folder with relative paths, then used from
another, offline, by PEFT's own AutoPeftModelForCausalLM and by `qctrain merge/generate/export`; for a
local base and for a Hub-id base (a populated HF_HOME cache standing in for the Hub)."""

import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import alpaca_records, write_json

COMMIT = "0123456789abcdef0123456789abcdef01234567"
HUB_ID = "qctest/tiny-phi3"


def qctrain(*args: str, cwd: Path, env: dict | None = None, umask: int | None = None) -> subprocess.CompletedProcess:
    def preexec():
        if umask is not None:
            os.umask(umask)
    return subprocess.run([sys.executable, "-m", "qctrain", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}, preexec_fn=preexec)


def python(code: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})})


def write_run(workdir: Path, model: dict, out: str, **train) -> Path:
    """A recipe with paths relative to workdir, as a user writes them."""
    write_json(workdir / "data" / "train.json", alpaca_records(24))
    recipe = {
        "model": {**model, "quantization": {"compute_dtype": "float32"}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"sources": [{"path": "data/train.json"}], "eval": {"count": 2}, "max_seq_length": 256},
        "train": {"max_steps": 6, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                  "learning_rate": 1.0e-2, "logging_steps": 1, "save_steps": 100,
                  "gradient_checkpointing": False, **train},
        "output": {"dir": out, "gguf": True},
    }
    path = workdir / f"{Path(out).name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def local_run(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("portable")
    work = root / "work"
    shutil.copytree(tiny_model_dir, work / "models" / "tiny")
    recipe = write_run(work, {"name": "models/tiny"}, "out/local", report_to="tensorboard")
    result = qctrain("train", recipe.name, cwd=work, umask=0o077)  # a strict umask: we make the files readable
    assert result.returncode == 0, result.stderr[-3000:]
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return work / "out" / "local", elsewhere, work


@pytest.fixture(scope="module")
def hf_home(tiny_model_dir, tmp_path_factory):
    """A Hugging Face cache holding qctest/tiny-phi3 as hf_hub_download leaves it (refs/main -> snapshot)."""
    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / f"models--{HUB_ID.replace('/', '--')}"
    shutil.copytree(tiny_model_dir, repo / "snapshots" / COMMIT)
    (repo / "snapshots" / COMMIT / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return home


@pytest.fixture(scope="module")
def hub_run(hf_home, tmp_path_factory):
    root = tmp_path_factory.mktemp("portable-hub")
    work = root / "work"
    recipe = write_run(work, {"name": HUB_ID}, "out/hub")
    result = qctrain("train", recipe.name, cwd=work, env={"HF_HOME": str(hf_home)})
    assert result.returncode == 0, result.stderr[-3000:]
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return work / "out" / "hub", elsewhere


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
    assert samples.count("| base model (adapter off) | with this adapter |") == 2  # eval: {count: 2}
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
    assert len(accumulator.Scalars("train/loss")) == 6


def test_generate_and_merge_work_from_anywhere(local_run):
    out, elsewhere, _ = local_run
    result = qctrain("generate", os.path.relpath(out, elsewhere), "--prompt", "Explain item 3 briefly.",
                     "--max-new-tokens", "6", "--compare-base", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("prompt: Explain item 3 briefly.\nbase:   ") and "\nreply:  " in result.stdout
    result = qctrain("merge", str(out), "--dest", "merged", "--dtype", "float32", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (elsewhere / "merged" / "config.json").is_file()
    assert stat.S_IMODE((elsewhere / "merged" / "model.safetensors").stat().st_mode) == 0o644


def test_export_gguf_from_anywhere(local_run, hub_run, hf_home):
    import gguf

    out, elsewhere, _ = local_run
    trained = sorted(p.name for p in (out / "gguf").iterdir())
    assert trained == ["Modelfile", "local-lora-f32.gguf"]  # output.gguf: true wrote them at the end
    result = qctrain("export", str(out), "--gguf", "--outtype", "f16", cwd=elsewhere)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"{out / 'gguf' / 'local-lora-f16.gguf'}" in result.stdout
    reader = gguf.GGUFReader(out / "gguf" / "local-lora-f16.gguf")
    assert reader.fields["general.architecture"].contents() == "phi3"
    assert not [k for k in reader.fields if k.startswith("general.base_model")]
    hub_out, hub_elsewhere = hub_run
    reader = gguf.GGUFReader(hub_out / "gguf" / "hub-lora-f32.gguf")
    assert reader.fields["general.base_model.0.repo_url"].contents() == f"https://huggingface.co/{HUB_ID}"
    modelfile = (hub_out / "gguf" / "Modelfile").read_text()
    assert f"FROM {hf_home / 'hub' / 'models--qctest--tiny-phi3' / 'snapshots' / COMMIT}\n" in modelfile


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
