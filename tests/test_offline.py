"""Provably offline: with HF_HUB_OFFLINE=1 and a pre-filled HF cache (the tiny model as a cached Hub repo), a whole
`train` + `export --gguf` opens no network connection (tests/isolation.py: a socket guard in every Python
process, and a network namespace when root); a file missing from the cache is named in one line at `check`.
The training run is conftest's shared `hub_cached_run`, trained under the same guard."""

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import HUB_ID, fill_hub_cache, offline_env, write_json, write_recipe
from isolation import attempts, can_unshare, isolated

REPO_ID = "acme/tiny-phi3"


def qctrain(tmp_path: Path, *args: str, env: dict[str, str], name: str):
    log = tmp_path / f"net-{name}.log"
    command, run_env = isolated([sys.executable, "-m", "qctrain", *args], env, log)
    done = subprocess.run(command, capture_output=True, text=True, env=run_env, cwd=tmp_path, timeout=900)
    return done, attempts(log)


def recipe_for_cached_model(tmp_path: Path, tiny_model_dir: Path) -> Path:
    data = write_json(tmp_path / "data.json", [{"instruction": f"Say {i}.", "output": f"{i} it is."}
                                               for i in range(24)])
    return write_recipe(tmp_path / "recipe.yaml", tiny_model_dir, data, tmp_path / "out",
                        model={"name": REPO_ID}, train={"max_steps": 3, "save_steps": 2})


def test_the_guard_catches_python_and_the_namespace_everything_else(tmp_path):
    """The harness itself: a connection attempt is refused and logged (so a silent test would mean no attempt)."""
    code = "import socket; socket.socket().connect(('192.0.2.1', 80))"
    log = tmp_path / "net.log"
    command, env = isolated([sys.executable, "-c", code], dict(os.environ), log)
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode != 0 and "blocked by the test's guard" in done.stderr
    assert attempts(log) and "connect" in attempts(log)[0] and "192.0.2.1" in attempts(log)[0]
    command, env = isolated([sys.executable, "-c", "import socket; socket.getaddrinfo('huggingface.co', 443)"],
                            dict(os.environ), tmp_path / "dns.log")
    subprocess.run(command, capture_output=True, env=env, timeout=60)
    assert "getaddrinfo 'huggingface.co'" in attempts(tmp_path / "dns.log")[0]


@pytest.mark.skipif(not can_unshare(), reason="a network namespace needs root (unshare -n); the guard covers Python")
def test_the_namespace_stops_code_the_guard_cannot_see(tmp_path):
    code = ("import _socket, errno; s = _socket.socket(); "  # the C socket type: no Python-level guard
            "rc = s.connect_ex(('192.0.2.1', 80)); print(errno.errorcode.get(rc, rc))")
    command, env = isolated([sys.executable, "-c", code], dict(os.environ), tmp_path / "net.log")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert done.stdout.strip() == "ENETUNREACH", done.stderr
    loopback = ("import socket; srv = socket.create_server(('127.0.0.1', 0)); "
                "socket.create_connection(srv.getsockname()).close(); print('loopback ok')")
    command, env = isolated([sys.executable, "-c", loopback], dict(os.environ), tmp_path / "lo.log")
    assert subprocess.run(command, capture_output=True, text=True, env=env, timeout=60).stdout.strip() == "loopback ok"


def test_train_and_export_from_the_hf_cache_open_no_connection(hub_cached_run, tmp_path):
    train, tried = hub_cached_run.result, hub_cached_run.attempts
    assert train.returncode == 0, train.stdout[-2000:] + train.stderr[-2000:]
    assert tried == [], tried
    out = hub_cached_run.out
    assert (out / "adapter" / "adapter_config.json").is_file() and (out / "run_manifest.json").is_file()
    assert HUB_ID in (out / "adapter" / "adapter_config.json").read_text()  # the base is the cached Hub repo
    copy = tmp_path / "run"  # the export writes into the run: a copy, without the GGUF files training wrote
    shutil.copytree(out, copy, ignore=shutil.ignore_patterns("gguf"))
    export, tried = qctrain(tmp_path, "export", str(copy), "--gguf", env=hub_cached_run.env, name="export")
    assert export.returncode == 0, export.stderr[-2000:]
    assert tried == [], tried
    assert list((copy / "gguf").glob("*.gguf")) and (copy / "gguf" / "Modelfile").is_file()


@pytest.mark.parametrize("missing, named", [
    ("model.safetensors", "model.safetensors (or model.safetensors.index.json and its shards)"),
    ("tokenizer_config.json", "tokenizer_config.json"),
])
def test_check_names_the_file_missing_from_the_offline_cache(tmp_path, tiny_model_dir, missing, named):
    # The line quotes the cache's path and is cut at 300 characters: a short HF_HOME keeps the hint at its end
    # in view wherever pytest puts tmp_path (under xdist: one folder deeper).
    with tempfile.TemporaryDirectory(prefix="hf-") as hf_home:
        fill_hub_cache(Path(hf_home) / "hub", REPO_ID, tiny_model_dir, skip=(missing,))
        recipe = recipe_for_cached_model(tmp_path, tiny_model_dir)
        done, tried = qctrain(tmp_path, "check", str(recipe), env={**offline_env(tmp_path), "HF_HOME": hf_home},
                              name="check")
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"qctrain: error: preflight: model.name: {REPO_ID}: {named} is not in the HF cache")
    assert "HF_HUB_OFFLINE=1" in lines[0] and f"hf download {REPO_ID}" in lines[0]
    assert tried == []


def test_check_passes_with_the_whole_model_cached(tmp_path, tiny_model_dir):
    fill_hub_cache(tmp_path / "hf" / "hub", REPO_ID, tiny_model_dir)
    done, tried = qctrain(tmp_path, "check", str(recipe_for_cached_model(tmp_path, tiny_model_dir)),
                          env=offline_env(tmp_path), name="check")
    assert done.returncode == 0 and "preflight: ok" in done.stdout, done.stderr
    assert tried == []
