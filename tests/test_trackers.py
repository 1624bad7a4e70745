"""report_to: wandb | mlflow | trackio | tensorboard (qctrain.trackers): the offline defaults, and one CPU training
run that reports to all four with no network (tests/isolation.py), their files landing in output.dir, and
none of the trackers' API keys (fake values here) in any file or stream of the run."""

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_json, write_recipe
from isolation import attempts, isolated
from qctrain import trackers

FAKE_SECRETS = {
    "WANDB_API_KEY": "wandbfakekey" + "0123456789abcdef" * 2,  # 44 characters, as a real key's length
    "MLFLOW_TRACKING_PASSWORD": "mlflow-fake-password-4f1c9e",
    "MLFLOW_TRACKING_TOKEN": "mlflow-fake-token-77ad02b",
    "HF_TOKEN": "hf_" + "FakeTokenForTrackerTest0123",
}


def test_offline_defaults_fill_in_only_what_is_unset(tmp_path):
    out = tmp_path / "run"
    got = trackers.offline_defaults(["wandb", "mlflow", "trackio", "tensorboard"], out, {})
    assert got == {"WANDB_DIR": str(out), "WANDB_MODE": "offline", "MLFLOW_TRACKING_URI": f"file:{out}/mlruns",
                   "MLFLOW_ALLOW_FILE_STORE": "true", "TRACKIO_DIR": f"{out}/trackio"}
    mine = {"WANDB_DIR": "/mine", "MLFLOW_TRACKING_URI": "http://mlflow:5000", "TRACKIO_DIR": "/t"}
    assert trackers.offline_defaults(["wandb", "mlflow", "trackio"], out, mine) == {"WANDB_MODE": "offline"}


def test_wandb_goes_online_only_with_a_key_and_not_offline(tmp_path):
    key = {"WANDB_API_KEY": "k" * 40}
    assert "WANDB_MODE" not in trackers.offline_defaults(["wandb"], tmp_path, key)
    assert trackers.offline_defaults(["wandb"], tmp_path, {**key, "HF_HUB_OFFLINE": "1"})["WANDB_MODE"] == "offline"
    assert "WANDB_MODE" not in trackers.offline_defaults(["wandb"], tmp_path, {"WANDB_MODE": "online"})


def test_requested_trackers():
    assert trackers.requested("none") == [] and trackers.requested(None) == []
    assert trackers.requested(["wandb", "tensorboard"]) == ["wandb", "tensorboard"]
    assert set(trackers.requested("all")) == {"wandb", "mlflow", "trackio", "tensorboard"}  # all installed here


def test_apply_sets_the_environment(tmp_path):
    env = {"MLFLOW_TRACKING_URI": "http://x"}
    assert trackers.apply("mlflow", tmp_path, env) == {}
    assert trackers.apply(["trackio"], tmp_path, env) == {"TRACKIO_DIR": f"{tmp_path.absolute()}/trackio"}
    assert env["TRACKIO_DIR"] == f"{tmp_path.absolute()}/trackio"


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, tiny_model_dir):
    """One CPU training run reporting to every tracker, offline, with fake tracker keys in the environment."""
    tmp = tmp_path_factory.mktemp("tracked")
    data = write_json(tmp / "data.json", [{"instruction": f"Say {i}.", "output": f"{i} it is."} for i in range(24)])
    recipe = write_recipe(tmp / "recipe.yaml", tiny_model_dir, data, tmp / "out",
                          train={"max_steps": 4, "logging_steps": 1, "save_steps": 100,
                                 "report_to": ["wandb", "mlflow", "trackio", "tensorboard"], "run_name": "tracked"})
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "MLFLOW_", "TRACKIO_", "HF_TOKEN"))}
    env.update(FAKE_SECRETS, HOME=str(tmp / "home"), HF_HOME=str(tmp / "hf"), HF_HUB_OFFLINE="1",
               PYTHONPATH=str(REPO / "entrypoint"), QCTRAIN_MIN_FREE_BYTES="0")
    log = tmp / "net.log"
    command, run_env = isolated([sys.executable, "-m", "qctrain", "train", str(recipe)], env, log)
    done = subprocess.run(command, capture_output=True, text=True, env=run_env, cwd=tmp, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return tmp, done, attempts(log)


@pytest.mark.slow
def test_every_tracker_ran_offline(tracked_run):
    _, done, tried = tracked_run
    assert tried == [], tried
    assert "trackers: WANDB_DIR=" in done.stdout and "WANDB_MODE=offline" in done.stdout  # HF_HUB_OFFLINE=1


@pytest.mark.slow
def test_wandb_offline_run_is_in_output_dir(tracked_run):
    out = tracked_run[0] / "out"
    runs = list((out / "wandb").glob("offline-run-*"))
    assert len(runs) == 1, list((out / "wandb").iterdir()) if (out / "wandb").exists() else "no out/wandb"
    assert list(runs[0].glob("run-*.wandb")) and (runs[0] / "files").is_dir()
    done = tracked_run[1]
    assert f"wandb: offline run in {runs[0].resolve()}; upload it with `wandb sync" in done.stdout
    assert "wandb" not in done.stderr  # its banner and hints are not qctrain's lines (--debug shows them)


@pytest.mark.slow
def test_mlflow_file_store_is_in_output_dir(tracked_run):
    mlruns = tracked_run[0] / "out" / "mlruns"
    losses = list(mlruns.glob("*/*/metrics/loss"))
    assert losses, sorted(str(p.relative_to(mlruns)) for p in mlruns.rglob("*"))[:30]
    assert len(losses[0].read_text().splitlines()) == 4  # logging_steps 1, max_steps 4


@pytest.mark.slow
def test_trackio_database_is_in_output_dir(tracked_run):
    databases = list((tracked_run[0] / "out" / "trackio").glob("*.db"))
    assert databases, "no trackio database in out/trackio"
    with sqlite3.connect(databases[0]) as db:
        tables = [row[0] for row in db.execute("select name from sqlite_master where type='table'")]
        assert "metrics" in tables, tables
        assert db.execute("select count(*) from metrics").fetchone()[0] >= 4


@pytest.mark.slow
def test_tensorboard_events_are_in_output_dir(tracked_run):
    assert list((tracked_run[0] / "out").rglob("events.out.tfevents.*"))


def files_holding(tmp: Path, needle: bytes) -> list[str]:
    """Every file under `tmp` whose bytes contain `needle` (binary files too: wandb's .wandb, SQLite, events)."""
    return [str(path.relative_to(tmp)) for path in sorted(Path(tmp).rglob("*"))
            if path.is_file() and not path.is_symlink() and path.name != "recipe.yaml" and needle in path.read_bytes()]


@pytest.mark.slow
def test_no_tracker_key_in_any_file_or_stream(tracked_run):
    """The keys are read by the trackers from the environment; nothing of the run may print or write them.
    Every file under the run's temporary tree (output.dir, HOME with the trackers' caches and settings, the HF
    cache) and both streams are searched, binary files included."""
    tmp, done, _ = tracked_run
    # the search sees what the trackers wrote: the run's name is in each tracker's own files
    holding_name = files_holding(tmp, b"tracked")
    for tracker_dir in ("out/wandb/", "out/mlruns/", "out/trackio/"):
        assert any(path.startswith(tracker_dir) for path in holding_name), (tracker_dir, holding_name)
    found = [f"{name} in {stream}" for name, value in FAKE_SECRETS.items()
             for stream, text in (("stdout", done.stdout), ("stderr", done.stderr)) if value in text]
    found += [f"{name} in {path}" for name, value in FAKE_SECRETS.items()
              for path in files_holding(tmp, value.encode())]
    assert found == []
