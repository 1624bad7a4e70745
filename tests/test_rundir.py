"""One run per output folder: the lock, a dead run's lock, the ranks of one run, a dead run's temporary files."""

import errno
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import REPO, alpaca_records, finish, foreign_home, snapshot, write_json, write_recipe
from qctrain import rundir
from qctrain.errors import InputError

HOLD = ("import sys, time\nfrom pathlib import Path\nfrom qctrain import rundir\n"
        "with rundir.hold(Path(sys.argv[1])):\n    print('held', flush=True)\n    time.sleep(float(sys.argv[2]))\n")


def holder(output_dir: Path, seconds: float) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(output_dir), str(seconds)], stdout=subprocess.PIPE,
                            text=True, env={**os.environ, "PYTHONPATH": str(REPO / "entrypoint")})
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_is_refused_naming_the_first(tmp_path):
    proc = holder(tmp_path / "out", 60)
    try:
        with pytest.raises(InputError) as err:
            with rundir.hold(tmp_path / "out"):
                pass
        message = str(err.value)
        assert message.startswith(f"output.dir: {tmp_path / 'out'} is in use by another run (host "
                                  f"{socket.gethostname()}, pid {proc.pid}, started ")
        assert message.endswith("wait for it to end or set another output.dir")
    finally:
        proc.kill()
        proc.wait()


def test_a_dead_runs_lock_does_not_block(tmp_path):
    proc = holder(tmp_path / "out", 60)
    proc.send_signal(signal.SIGKILL)  # no clean-up of any kind
    proc.wait()
    assert json.loads((tmp_path / "out" / rundir.LOCK_NAME).read_text())["pid"] == proc.pid
    with rundir.hold(tmp_path / "out"):
        assert json.loads((tmp_path / "out" / rundir.LOCK_NAME).read_text())["pid"] == os.getpid()
    assert not (tmp_path / "out" / rundir.LOCK_NAME).exists()  # a run that ends leaves no lock file


def test_the_same_process_cannot_hold_twice_and_ranks_other_than_main_do_not_hold(tmp_path):
    with rundir.hold(tmp_path / "out"):
        with pytest.raises(InputError, match="in use by another run"):
            with rundir.hold(tmp_path / "out"):
                pass
        with rundir.hold(tmp_path / "out", enabled=False):  # another rank of the same run
            pass
    with rundir.hold(tmp_path / "out"):  # released at the end of the block
        pass
    with rundir.hold(tmp_path / "other", enabled=False):
        pass
    assert not (tmp_path / "other").exists()


def test_a_dead_runs_temporary_files_are_removed_and_nothing_else(tmp_path, capsys):
    out = tmp_path / "out"
    leftovers = [out / ".staging-123" / "adapter", out / ".merged.staging-55",
                 out / "prepared" / ".tmp-0123456789abcdef-9", out / ".run_manifest.json.tmp-77",
                 out / ".metrics.jsonl.tmp"]
    kept = [out / "adapter" / "adapter_model.safetensors", out / ".adapter.old" / "adapter_config.json",
            out / "run_manifest.json", out / "prepared" / "0123abcd" / "report.json", out / "metrics.jsonl",
            out / "checkpoints" / "checkpoint-4" / "qctrain_checkpoint.json",
            # shaped like ours, but not our names: a user's files
            out / ".notes.tmp", out / ".staging-notes" / "draft.txt", out / ".notes.json.tmp-1",
            out / "prepared" / ".tmp-notes", out / "adapter" / ".staging-5" / "x.txt"]
    for path in leftovers + kept:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix or path.name.startswith((".run", ".notes")) or path.name.endswith(".tmp"):
            path.write_text("x")
        else:
            path.mkdir()
    removed = rundir.remove_leftovers(out)
    assert sorted(removed) == sorted(p if p.parent in (out, out / "prepared") else p.parent for p in leftovers)
    assert all(not p.exists() for p in removed) and all(p.exists() for p in kept)
    assert "removed 5 temporary file(s) of an earlier run that did not finish" in capsys.readouterr().out
    assert rundir.remove_leftovers(out) == []


@pytest.mark.slow
def test_second_train_on_a_busy_output_dir_exits_2_and_leaves_the_first_alone(tmp_path, tiny_model_dir):
    data_path = write_json(tmp_path / "d.json", alpaca_records(40))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data_path, tmp_path / "out",
                          train={"max_steps": 100000, "logging_steps": 1, "save_steps": 100000,
                                 "gradient_checkpointing": False, "disable_tqdm": True})
    env = {**os.environ, "PYTHONPATH": str(REPO / "entrypoint")}
    # the first run sleeps 0.5 s a step (tests/slowsteps): it trains on while leaving the cores to the second
    slow = {**env, "PYTHONPATH": f"{REPO / 'tests' / 'slowsteps'}{os.pathsep}{env['PYTHONPATH']}",
            "QCTRAIN_TEST_STEP_DELAY": "0.5"}
    first = subprocess.Popen([sys.executable, "-m", "qctrain", "train", str(recipe)], cwd=tmp_path, env=slow,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        metrics = tmp_path / "out" / "metrics.jsonl"
        deadline = time.monotonic() + 300
        while not metrics.is_file() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)  # training has started: the first run holds the folder
        assert first.poll() is None, first.communicate()
        second = subprocess.run([sys.executable, "-m", "qctrain", "train", str(recipe)], cwd=tmp_path, env=env,
                                capture_output=True, text=True, timeout=300)
        assert second.returncode == 2, second.stderr
        assert second.stderr == (f"qctrain: error: output.dir: {tmp_path / 'out'} is in use by another run "
                                 f"(host {socket.gethostname()}, pid {first.pid}, started "
                                 + second.stderr.split(", started ")[1])
        assert first.poll() is None  # the first run trains on
    finally:
        first.send_signal(signal.SIGTERM)
    result = finish(first)
    assert result.returncode == 75, result.stderr  # stopped cleanly, checkpoint saved


# --- which folders a run may write into: its own, never someone else's ---

@pytest.mark.parametrize("command", ["check", "prepare", "train"])
def test_a_folder_holding_foreign_files_is_refused_before_anything_is_written(command, tmp_path, tiny_model_dir,
                                                                               capsys):
    from qctrain.cli import main

    out = foreign_home(tmp_path / "home")
    data = write_json(tmp_path / "d.json", alpaca_records(8))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data, out)
    before = snapshot(out)
    assert main([command, str(recipe)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"qctrain: error: {'preflight: ' if command != 'prepare' else ''}output.dir: {out} is "
                           "not empty and not a qctrain run folder (it holds ")
    assert "use a new or empty folder" in line
    assert snapshot(out) == before  # names, modes and contents: nothing written, nothing changed


@pytest.mark.parametrize("where", ["/", "/etc", "/usr/share/qctrain-out", "/var/lib/qctrain", "/proc/x", "home",
                                   "link-to-etc"])
def test_system_folders_and_the_home_folder_are_refused(where, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    (tmp_path / "me").mkdir()
    os.symlink("/etc", tmp_path / "etc-link")
    out = {"home": tmp_path / "me", "link-to-etc": tmp_path / "etc-link" / "run"}.get(where, Path(where))
    problem = rundir.output_dir_problem(out)
    assert problem is not None and problem.startswith(f"output.dir: {out} ")
    assert ("is the home folder" if where == "home" else "is a system folder") in problem
    with pytest.raises(InputError):
        rundir.claim(out)
    assert not (tmp_path / "me" / rundir.MARKER_NAME).exists()


def test_folders_a_run_may_use(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "me"))
    fresh_volume = tmp_path / "pvc"
    (fresh_volume / "lost+found").mkdir(parents=True)  # what mkfs leaves on a new volume mounted at /out
    inside_home = tmp_path / "me" / "runs" / "one"
    older_run = tmp_path / "older"  # a run folder of a version before the marker, and a file of the user's
    (older_run / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (older_run / "checkpoints" / "checkpoint-2" / "qctrain_checkpoint.json").write_text('{"complete": true}')
    (older_run / "notes.txt").write_text("mine")
    earlier_outputs = tmp_path / "outputs"  # only names a run writes
    (earlier_outputs / "adapter").mkdir(parents=True)
    (earlier_outputs / "metrics.jsonl").write_text("")
    for out in (tmp_path / "new" / "run", fresh_volume, inside_home, older_run, earlier_outputs,
                Path("/var/tmp") / f"qctrain-test-{os.getpid()}"):
        assert rundir.output_dir_problem(out) is None, out
    rundir.claim(fresh_volume)
    assert json.loads((fresh_volume / rundir.MARKER_NAME).read_text())["qctrain_run_folder"] == 1
    (fresh_volume / "mine.txt").write_text("a file of the user's in a run folder")
    assert rundir.output_dir_problem(fresh_volume) is None  # marked: ours, whatever else it holds
    rundir.claim(tmp_path / "new" / "run")
    assert stat.S_IMODE((tmp_path / "new" / "run").stat().st_mode) == 0o755  # created by us: others reach outputs


@pytest.mark.parametrize("err, expect", [
    (errno.EWOULDBLOCK, "is in use by another run"),
    (errno.ENOLCK, "is on a filesystem that cannot lock files (flock: ENOLCK"),
    (errno.EOPNOTSUPP, f"is on a filesystem that cannot lock files (flock: {errno.errorcode[errno.EOPNOTSUPP]}"),
    (errno.EINVAL, "is on a filesystem that cannot lock files (flock: EINVAL"),
])
def test_only_a_held_lock_means_busy(err, expect, tmp_path, monkeypatch):
    def flock(fd, how):
        raise OSError(err, os.strerror(err))

    monkeypatch.setattr(rundir.fcntl, "flock", flock)
    with pytest.raises(InputError) as caught:
        with rundir.hold(tmp_path / "out"):
            pass
    assert expect in str(caught.value)
    if err != errno.EWOULDBLOCK:
        assert f"{rundir.NO_LOCK_ENV}=1" in str(caught.value)
        monkeypatch.setenv(rundir.NO_LOCK_ENV, "1")
        with rundir.hold(tmp_path / "out"):  # the documented way out: no lock taken
            assert not (tmp_path / "out" / rundir.LOCK_NAME).exists()
