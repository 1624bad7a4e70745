"""Shared fixtures: a tiny random Phi-3 (built once per session) and helpers to write recipes and data."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from qctrain.tiny import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny-phi3")


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def alpaca_records(n: int, start: int = 0) -> list[dict]:
    """Varied small records: English and Chinese, some with input, some multi-line."""
    records = []
    for i in range(start, start + n):
        if i % 4 == 3:
            records.append({"instruction": f"把第{i}句话翻译成英文。", "input": "今天天气很好。",
                            "output": f"The weather is nice today ({i})."})
        else:
            records.append({"instruction": f"Explain item {i} briefly.",
                            "input": "" if i % 2 else f"Context line {i}\nsecond line",
                            "output": f"Item {i} is explained here.\nIt has two lines."})
    return records


def write_json(path: Path, value) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
    return path


def write_recipe(path: Path, model_dir: Path, data_path: Path, out_dir: Path, **sections) -> Path:
    recipe = {
        "model": {"name": str(model_dir),
                  "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True,
                                   "compute_dtype": "float32"}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"sources": [{"path": str(data_path)}], "eval": {"fraction": 0.1}, "max_seq_length": 256},
        "train": {"max_steps": 8, "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                  "learning_rate": 5.0e-3,
                  "logging_steps": 1, "save_steps": 100, "gradient_checkpointing": False},
        "output": {"dir": str(out_dir)},
    }
    for section, values in sections.items():
        recipe[section] = {**recipe.get(section, {}), **values} if isinstance(values, dict) else values
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def tool(name: str) -> str:
    """Path of a CLI tool (hadolint, kubernetes-validate...): the running venv's bin first, then PATH;
    skip the test if it is absent."""
    import shutil

    candidate = Path(sys.executable).parent / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip/apt install it to run this check)")
    return found


def finish(proc: subprocess.Popen, timeout: int = 400) -> SimpleNamespace:
    """Wait for a started qctrain process; its exit code and output."""
    out, err = proc.communicate(timeout=timeout)
    return SimpleNamespace(returncode=proc.returncode, stdout=out, stderr=err)


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None,
            timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qctrain", *args], cwd=cwd or REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def fill_hub_cache(hub_cache: Path, repo_id: str, folder: Path, skip: tuple[str, ...] = ()) -> Path:
    """Put a model folder into a Hugging Face cache (HF_HUB_CACHE layout: blobs, a snapshot of symlinks, refs/main)
    as `hf download` leaves it, less the files in `skip`; return the snapshot folder."""
    import hashlib

    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(folder.iterdir()):
        if path.name in skip or not path.is_file():
            continue
        data = path.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.write_bytes(data)
        link = snapshot / path.name
        if not link.is_symlink():
            link.symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
