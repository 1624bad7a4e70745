"""Faults have names and codes: a full disk (quota, read-only filesystem) anywhere is exit 74 with one line naming
the path; an unreadable checkpoint marker keeps its checkpoint; a checkpoint that does not load is passed over;
a broken data cache is rebuilt.

A full disk is a real one where the test may mount a small tmpfs (root), else a write that fails with ENOSPC.
"""

import errno
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import alpaca_records, write_json, write_recipe
from qctrain import checkpoint, data
from qctrain.data import stage
from qctrain.errors import DiskFull, ExitCode, InputError, disk_full, writing
from qctrain.recipe import DataSection, load_recipe

ROOT = os.geteuid() == 0 and shutil.which("mount") is not None


def mount_tmpfs(where: Path, size: str, read_only: bool = False) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    options = f"size={size}" + (",ro" if read_only else "")
    return subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB filesystem, or None where the test cannot mount one (it then simulates the failing write)."""
    disk = tmp_path / "disk"
    mounted = ROOT and mount_tmpfs(disk, "2m")
    yield disk if mounted else None
    if mounted:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True)


def one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qctrain: error: "), err
    return lines[0]


# --- a full disk ---

def test_prepare_on_a_full_disk_exits_74_naming_the_path(small_disk, tmp_path, tiny_model_dir, monkeypatch, capsys):
    from qctrain.cli import main

    out = (small_disk or tmp_path / "disk") / "run"
    data_file = write_json(tmp_path / "d.json", alpaca_records(6000))  # ~2.4 MiB of prepared shards
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data_file, out, data={"eval": None})
    if small_disk is None:  # simulated: the token store's write fails as a full disk's does
        def full(self, tok):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        monkeypatch.setattr(stage.TokenStore, "append", full)
    assert main(["prepare", str(recipe)]) == ExitCode.DISK_FULL == 74
    line = one_error_line(capsys.readouterr().err)
    print(line)
    assert line.startswith(f"qctrain: error: no space left on the device (ENOSPC) writing {out / 'prepared'}/.tmp-")
    assert "MiB free there" in line and "free some space" in line and "rerun the same command" in line
    assert [p.name for p in (out / "prepared").iterdir()] == []  # the unfinished cache is gone, space given back


def test_a_read_only_filesystem_exits_74(tmp_path, tiny_model_dir, capsys):
    from qctrain.cli import main

    if not (ROOT and mount_tmpfs(tmp_path / "ro", "1m", read_only=True)):
        pytest.skip("needs root to mount a read-only tmpfs (the EROFS text is checked in test_disk_full_lines)")
    try:
        data_file = write_json(tmp_path / "d.json", alpaca_records(8))
        recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data_file, tmp_path / "ro" / "run")
        assert main(["prepare", str(recipe)]) == 74
        line = one_error_line(capsys.readouterr().err)
        assert "the filesystem is read-only (EROFS) writing" in line and "make it writable" in line
        assert main(["check", str(recipe)]) == 2  # found by the preflight, before a run starts
        assert f"output.dir: {tmp_path / 'ro'} is not writable" in one_error_line(capsys.readouterr().err)
    finally:
        subprocess.run(["umount", "-l", str(tmp_path / "ro")], capture_output=True)


def test_a_full_disk_reaching_main_from_anywhere_is_74(tmp_path, tiny_model_dir, monkeypatch, capsys):
    """The top-level net: an ENOSPC/EDQUOT OSError no stage named still becomes the documented line."""
    from qctrain.cli import main

    data_file = write_json(tmp_path / "d.json", alpaca_records(8))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data_file, tmp_path / "out")

    def over_quota(*args, **kwargs):
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT), str(tmp_path / "out" / "data_report.json"))

    monkeypatch.setattr(data, "prepare", over_quota)
    assert main(["prepare", str(recipe)]) == 74
    line = one_error_line(capsys.readouterr().err)
    assert line.startswith(f"qctrain: error: disk quota exceeded (EDQUOT) writing {tmp_path / 'out'}/data_report.json")


@pytest.mark.parametrize("writer", ["torch", "safetensors"])
def test_checkpoint_writers_on_a_full_disk(writer, small_disk):
    """torch.save says only "unexpected pos" on a full disk (no errno): writing() learns the cause by a probe."""
    if small_disk is None:
        pytest.skip("needs a real full filesystem (root, tmpfs): the probe must meet ENOSPC itself")
    from safetensors.torch import save_file

    staging = small_disk / ".partial-checkpoint-4"
    staging.mkdir()
    tensors = {"w": torch.zeros(1 << 20)}  # 4 MiB
    with pytest.raises(DiskFull) as caught:
        with writing(staging, needed=5 << 20):
            if writer == "torch":
                torch.save(tensors, staging / "optimizer.pt")
            else:
                save_file(tensors, staging / "adapter_model.safetensors")
    message = str(caught.value)
    assert message.startswith(f"no space left on the device (ENOSPC) writing {staging} (")
    assert "about 5 MiB needed" in message
    assert not list(small_disk.glob(".qctrain-probe-*"))


def test_the_metrics_log_on_a_full_disk(small_disk, tmp_path, monkeypatch):
    from qctrain.train import MetricsLog

    path = (small_disk or tmp_path) / "metrics.jsonl"
    if small_disk is not None:
        with open(small_disk / "filler", "wb") as handle:  # fill the disk up to its last byte
            try:
                handle.write(b"\0" * (4 << 20))
            except OSError:
                pass
    else:
        real_open = open

        def full_open(file, *args, **kwargs):
            if Path(file) == path:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
            return real_open(file, *args, **kwargs)
        monkeypatch.setattr("builtins.open", full_open)
    state = SimpleNamespace(is_world_process_zero=True, global_step=3, epoch=0.5)
    with pytest.raises(DiskFull, match=f"no space left on the device \\(ENOSPC\\) writing {path}"):
        MetricsLog(path).on_log(None, state, None, logs={"loss": 1.0, "text": "x" * 8192})


def test_export_on_a_full_disk_keeps_the_old_adapter_and_no_staging(small_disk, tmp_path, monkeypatch):
    from qctrain import outputs

    out = (small_disk or tmp_path) / "run"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"GOOD")

    class BigModel:
        def save_pretrained(self, dest):
            Path(dest).mkdir(parents=True, exist_ok=True)
            if small_disk is None:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            (Path(dest) / "adapter_model.safetensors").write_bytes(b"\0" * (3 << 20))

    recipe = load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "model", tmp_path / "d.json", out))
    trainer = SimpleNamespace(model=BigModel(), args=SimpleNamespace())
    with pytest.raises(DiskFull, match=f"writing {out}/.staging-"):
        outputs.write_outputs(outputs.TrainedRun(recipe, trainer, None, "", {}, out / "none.json", {}, [], 0.0, 1.0,
                                                 []))
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == b"GOOD"
    assert sorted(p.name for p in out.iterdir()) == ["adapter"]


@pytest.mark.parametrize("code, text", [(errno.ENOSPC, "no space left on the device (ENOSPC)"),
                                        (errno.EDQUOT, "disk quota exceeded (EDQUOT)"),
                                        (errno.EROFS, "the filesystem is read-only (EROFS)")])
def test_disk_full_lines(code, text, tmp_path):
    wrapped = RuntimeError(f"Error while serializing: I/O error: {os.strerror(code)} (os error {code})")
    for err in (OSError(code, os.strerror(code)), wrapped):
        fault = disk_full(err, tmp_path / "x", needed=3 << 20)
        assert fault is not None and fault.exit_code == 74
        assert str(fault).startswith(f"{text} writing {tmp_path / 'x'}")
    assert disk_full(OSError(errno.EIO, "Input/output error")) is None
    assert disk_full(ValueError("no")) is None


# --- checkpoints: an unreadable marker says nothing, a broken checkpoint is passed over ---

@pytest.fixture
def recipe(tmp_path):
    data_file = write_json(tmp_path / "d.json", alpaca_records(4))
    return load_recipe(write_recipe(tmp_path / "r.yaml", tmp_path / "model", data_file, tmp_path / "out"))


def make_checkpoint(recipe, step: int) -> Path:
    from safetensors.torch import save_file

    ckpt = checkpoint.checkpoints_dir(Path(recipe.output.dir)) / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"lora_A": torch.full((4, 4), float(step))}, ckpt / "adapter_model.safetensors")
    torch.save({"state": {0: {"exp_avg": torch.ones(64)}}}, ckpt / "optimizer.pt")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 8}))
    marker = {"complete": True, "recipe": checkpoint.training_recipe(recipe), "step": step, "saved": 100.0 + step}
    (ckpt / checkpoint.MARKER).write_text(json.dumps(marker))
    return ckpt


def test_a_marker_unreadable_for_eio_keeps_its_checkpoint(recipe, capsys):
    make_checkpoint(recipe, 2)
    newest = make_checkpoint(recipe, 4)
    (newest / checkpoint.MARKER).unlink()
    os.symlink("/proc/self/mem", newest / checkpoint.MARKER)  # every read fails with EIO, even for root
    plan = checkpoint.plan_resume(recipe)
    assert plan.checkpoint.name == "checkpoint-2"
    assert f"{newest}: its {checkpoint.MARKER} cannot be read (EIO" in capsys.readouterr().out
    plan.apply()
    assert newest.is_dir() and (newest / "optimizer.pt").is_file()  # not deleted: nothing says it is incomplete


def test_a_checkpoint_that_does_not_load_is_passed_over(recipe, capsys):
    make_checkpoint(recipe, 2)
    newest = make_checkpoint(recipe, 4)
    optimizer = newest / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[:200])  # cut short: a damaged disk, a copy that stopped
    plan = checkpoint.plan_resume(recipe)
    assert plan.checkpoint.name == "checkpoint-2" and plan.newest == newest
    assert "cannot load checkpoint-4 (optimizer.pt: BadZipFile" in capsys.readouterr().out
    plan.apply()
    assert newest.is_dir()  # its marker says complete: kept, not deleted


def test_when_no_checkpoint_loads_the_rerun_says_restart(recipe):
    for step in (2, 4):
        ckpt = make_checkpoint(recipe, step)
        (ckpt / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(InputError, match="no complete checkpoint loads .* rerun with --restart") as caught:
        checkpoint.plan_resume(recipe)
    assert caught.value.exit_code == 2


# --- the prepared data cache: verified on use, rebuilt when broken ---

def test_a_broken_data_cache_is_rebuilt(tokenizer, tmp_path, capsys):
    path = write_json(tmp_path / "d.json", alpaca_records(60))
    cfg = DataSection.model_validate({"sources": [{"path": str(path)}], "max_seq_length": 256, "eval": {"count": 4}})
    first = data.prepare(cfg, tokenizer, tmp_path / "out")
    shards = first.report["shards"]
    assert set(shards) == {p.name for p in first.dir.glob("*.arrow")} and all(shards.values())
    rows = first.train.num_rows
    assert data.prepare(cfg, tokenizer, tmp_path / "out").cached

    train_shard = first.dir / next(name for name in shards if name.startswith("train-"))
    for damage, said in ((lambda: train_shard.unlink(), "train shards missing"),
                         (lambda: train_shard.write_bytes(train_shard.read_bytes()[:-100]), "bytes, the report says")):
        damage()
        again = data.prepare(cfg, tokenizer, tmp_path / "out")
        assert not again.cached and again.train.num_rows == rows
        out = capsys.readouterr().out
        assert f"data: the prepared data in {first.dir} is damaged (" in out and said in out
    report = json.loads((first.dir / "report.json").read_text())
    del report["shards"]  # a cache of an earlier version: no sizes recorded, the shard set and rows still checked
    (first.dir / "report.json").write_text(json.dumps(report))
    assert data.prepare(cfg, tokenizer, tmp_path / "out").cached


def test_shards_are_on_disk_before_the_report(tokenizer, tmp_path, monkeypatch):
    calls = []
    real_fsync, real_write = stage.fsync_tree, stage.write_json_atomic
    monkeypatch.setattr(stage, "fsync_tree", lambda root, **kw: (calls.append(("fsync", Path(root).name)),
                                                                  real_fsync(root, **kw))[1])
    monkeypatch.setattr(stage, "write_json_atomic", lambda path, value: (calls.append(("write", Path(path).name)),
                                                                          real_write(path, value))[1])
    path = write_json(tmp_path / "d.json", alpaca_records(20))
    data.prepare(DataSection.model_validate({"sources": [{"path": str(path)}], "eval": None}), tokenizer,
                 tmp_path / "out")
    assert [name for _, name in calls][-2:][-1] == "report.json"
    assert calls.index(("write", "report.json")) > max(i for i, c in enumerate(calls) if c[0] == "fsync")
