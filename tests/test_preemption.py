"""Preemption and resume: SIGTERM -> complete checkpoint + exit 75; the rerun resumes and ends where an
uninterrupted run ends; SIGKILL mid-save loses only that save; a changed recipe refuses to resume.

The expensive part (five short CPU training runs of a tiny 4-bit Phi-3) runs once, in the module fixture
`runs`; the tests then check what it recorded:

  reference  train R                    uninterrupted (in parallel with `killed`)
  killed     train R (save every step: output.save_every_minutes), SIGKILLed inside its 2nd checkpoint save
  preempted  train R, resumes from checkpoint-1, gets SIGTERM mid-run (and a 2nd signal during the save)
  resumed    train R, the same command again: resumes and finishes

Hooks (a kill inside a save, a pause per step so the signal lands mid-run) are installed by running this
file as a script (see the bottom), which then calls qctrain's real `main`; the production code has no
test switches.
"""

import hashlib
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from conftest import finish, foreign_home, snapshot

REPO = Path(__file__).resolve().parents[1]
ATOL = 1e-4  # adapter tensors, resumed vs uninterrupted (measured on CPU: 0.0, bit-identical)
MAX_STEPS = 8
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(REPO / "entrypoint")}


# --- helpers ---

def records(n: int) -> list[dict]:
    return [{"instruction": f"Explain item {i} briefly.", "input": "" if i % 2 else f"Context {i}",
             "output": f"Item {i} is explained here.\nIt has two lines."} for i in range(n)]


def write_recipe(path: Path, model_dir: Path, data: Path, out: Path) -> Path:
    recipe = {
        "model": {"name": str(model_dir),
                  "quantization": {"bits": 4, "quant_type": "nf4", "compute_dtype": "float32"}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        # 12 packed sequences (~29 Phi-3.5 tokens a record), 2 per step: 6 steps an epoch, so every resume here
        # crosses an epoch boundary
        "data": {"sources": [{"path": str(data)}], "eval": None, "max_seq_length": 64},
        "train": {"max_steps": MAX_STEPS, "per_device_train_batch_size": 2, "learning_rate": 5.0e-3,
                  "logging_steps": 1, "save_steps": 2, "gradient_checkpointing": False},
        "output": {"dir": str(out)},
    }
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def start(recipe: Path, *extra: str, hooks: dict | None = None) -> subprocess.Popen:
    """`qctrain train RECIPE`, through this file's hook wrapper when hooks are given."""
    entry = [str(Path(__file__))] if hooks else ["-m", "qctrain"]
    env = {**ENV, "QCTRAIN_TEST_HOOKS": json.dumps(hooks or {})}
    return subprocess.Popen([sys.executable, *entry, "train", str(recipe), *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metrics_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = metrics_steps(out)
        if steps and max(steps) >= step:
            return
        if proc.poll() is not None:
            result = finish(proc)
            raise AssertionError(f"training ended (rc {result.returncode}) before step {step}: "
                                 f"{result.stderr[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


def complete(ckpt: Path) -> bool:
    marker = ckpt / "qctrain_checkpoint.json"
    return marker.is_file() and json.loads(marker.read_text()).get("complete") is True


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("qctrain: error:")]


# --- the runs ---

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from qctrain.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("preempt")
    model_dir = write_tiny_model(root / "tiny-phi3")
    data = root / "data.json"
    data.write_text(json.dumps(records(24)), encoding="utf-8")
    ref_out, out = root / "ref", root / "run"
    ref_recipe = write_recipe(root / "ref.yaml", model_dir, data, ref_out)
    recipe = write_recipe(root / "run.yaml", model_dir, data, out)
    timings: dict[str, float] = {}
    t0 = time.monotonic()

    # Reference and the SIGKILL run side by side (the machine has few cores; each is mostly startup).
    reference = start(ref_recipe)
    every_step = ["--set", "output.save_every_minutes=0.0001", "--set", "train.save_steps=1000"]
    killed = finish(start(recipe, *every_step, hooks={"sigkill_in_save": 2}))
    timings["killed"] = time.monotonic() - t0
    after_kill = {p.name: complete(p) for p in (out / "checkpoints").iterdir() if p.is_dir()}
    # A checkpoint-N folder without the completion marker (e.g. from an older tool): must be ignored.
    fake = out / "checkpoints" / "checkpoint-7"
    shutil.copytree(out / "checkpoints" / "checkpoint-1", fake)
    (fake / "qctrain_checkpoint.json").unlink()

    t = time.monotonic()
    proc = start(recipe, hooks={"sleep_per_step": 0.5, "signal_again_in_save": True})
    wait_for_step(proc, out, 3)
    signalled_at = max(metrics_steps(out))
    proc.send_signal(signal.SIGTERM)
    preempted = finish(proc)
    timings["preempted"] = time.monotonic() - t
    after_preempt = {p.name: complete(p) for p in (out / "checkpoints").iterdir() if p.is_dir()}
    metrics_after_preempt = metrics_steps(out)

    t = time.monotonic()
    resumed = finish(start(recipe))
    timings["resumed"] = time.monotonic() - t
    reference = finish(reference)
    timings["total"] = time.monotonic() - t0
    return SimpleNamespace(root=root, model_dir=model_dir, data=data, recipe=recipe, out=out, ref_out=ref_out,
                           reference=reference, killed=killed, after_kill=after_kill, preempted=preempted,
                           signalled_at=signalled_at, after_preempt=after_preempt,
                           metrics_after_preempt=metrics_after_preempt, resumed=resumed, timings=timings)


def test_reference_run_finishes(runs):
    assert runs.reference.returncode == 0, runs.reference.stderr[-3000:]
    assert (runs.ref_out / "adapter" / "adapter_model.safetensors").is_file()


def test_sigkill_during_save_leaves_previous_checkpoint_usable(runs):
    assert runs.killed.returncode == -signal.SIGKILL, runs.killed.stderr[-3000:]
    # output.save_every_minutes saved after step 1; the kill hit the save after step 2, half-way through.
    assert runs.after_kill == {"checkpoint-1": True, ".partial-checkpoint-2": False}
    # The rerun (the SIGTERM run below) resumed from the complete checkpoint-1, ignoring the partial
    # checkpoint-2 and the unmarked checkpoint-7, and removed both.
    assert "resuming from" in runs.preempted.stdout and "checkpoint-1 (step 1)" in runs.preempted.stdout
    assert "removed 2 incomplete checkpoint folder(s)" in runs.preempted.stdout
    assert ".partial-checkpoint-2" not in runs.after_preempt
    assert "checkpoint-7" not in runs.after_preempt


def test_sigterm_saves_complete_checkpoint_and_exits_75(runs):
    result = runs.preempted
    assert result.returncode == 75, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    [line] = error_lines(result.stderr)
    assert "stopped by SIGTERM at step" in line and "rerun the same command to resume" in line
    step = int(line.split("at step ")[1].split("/")[0])
    assert runs.signalled_at <= step < MAX_STEPS  # the step in progress finished, then it stopped
    # A second SIGTERM and a SIGINT arrived during the save (hook): ignored, nothing corrupted.
    assert "already stopping" in result.stderr
    assert runs.after_preempt.get(f"checkpoint-{step}") is True
    assert all(runs.after_preempt.values()), runs.after_preempt  # no partial folder left behind
    ckpt = runs.out / "checkpoints" / f"checkpoint-{step}"
    for name in ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                 "trainer_state.json", "qctrain_checkpoint.json"):
        assert (ckpt / name).is_file(), name
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == step
    assert runs.metrics_after_preempt[-1] == step  # the log reaches the checkpoint


def test_rerun_resumes_and_matches_uninterrupted_run(runs):
    import torch

    assert runs.resumed.returncode == 0, runs.resumed.stderr[-3000:]
    assert runs.reference.returncode == 0
    step = int(error_lines(runs.preempted.stderr)[0].split("at step ")[1].split("/")[0])
    assert f"checkpoint-{step} (step {step})" in runs.resumed.stdout
    ref, got = adapter_tensors(runs.ref_out), adapter_tensors(runs.out)
    assert ref.keys() == got.keys()
    worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
    print(f"resumed vs uninterrupted adapter: max abs difference {worst:.3g} (atol {ATOL}); "
          f"timings {json.dumps({k: round(v, 1) for k, v in runs.timings.items()})}")
    assert all(torch.allclose(ref[k], got[k], atol=ATOL, rtol=0) for k in ref), worst
    # The manifest's train_loss is the whole run's, not just the part after the last resume.
    ref_loss, got_loss = (json.loads((out / "run_manifest.json").read_text())["metrics"]["train_loss"]
                          for out in (runs.ref_out, runs.out))
    assert got_loss == pytest.approx(ref_loss, abs=1e-3)  # logged losses are rounded to 4 digits
    # Rotation kept working across the resumes: at most save_total_limit (3) complete checkpoints.
    left = sorted(p.name for p in (runs.out / "checkpoints").iterdir() if p.is_dir())
    assert left[-1] == f"checkpoint-{MAX_STEPS}" and len(left) <= 3, left


def test_metrics_log_has_no_duplicate_steps_after_resumes(runs):
    rows = [json.loads(line) for line in (runs.out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r["step"] for r in rows if "loss" in r]
    assert train_rows == list(range(1, MAX_STEPS + 1))
    assert sum("train_runtime" in r for r in rows) == 1  # the interrupted runs' summaries were dropped
    ref_rows = [json.loads(line) for line in (runs.ref_out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses == pytest.approx([r["loss"] for r in ref_rows if "loss" in r], abs=1e-4)


def test_changed_recipe_refuses_to_resume(runs, capsys):
    from qctrain.cli import main

    before = tree_digest(runs.out)
    code = main(["train", str(runs.recipe), "--set", "train.learning_rate=1e-3", "--set", "lora.r=4"])
    err = capsys.readouterr().err
    assert code == 2
    [line] = err.strip().splitlines()
    assert line.startswith("qctrain: error: ") and "checkpoint-8" in line
    assert "changed: lora.r (8 -> 4), train.learning_rate (0.005 -> 0.001))" in line and "--restart" in line
    assert tree_digest(runs.out) == before  # nothing touched: checkpoints, adapter, metrics


def test_changed_data_refuses_to_resume(runs, capsys, tmp_path):
    from qctrain.cli import main

    out = tmp_path / "run"
    shutil.copytree(runs.out, out)
    recipe = write_recipe(tmp_path / "r.yaml", runs.model_dir, runs.data, out)
    marker = out / "checkpoints" / f"checkpoint-{MAX_STEPS}" / "qctrain_checkpoint.json"
    meta = json.loads(marker.read_text())
    marker.write_text(json.dumps({**meta, "data_fingerprint": "0" * 64}))
    before = tree_digest(out / "checkpoints")
    assert main(["train", str(recipe)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert "training data changed since this checkpoint" in line and "--restart" in line
    assert tree_digest(out / "checkpoints") == before


# --- a finished run stays finished (the finished run of `runs`, copied) ---

FOREIGN = (".ssh", "bin", ".notes.tmp", ".staging-notes")


def copy_run(runs, tmp_path: Path, **sections) -> tuple[Path, Path]:
    out = tmp_path / "run"
    shutil.copytree(runs.out, out, symlinks=True)
    recipe = write_recipe(tmp_path / "r.yaml", runs.model_dir, runs.data, out)
    if sections:
        recipe.write_text(yaml.safe_dump({**yaml.safe_load(recipe.read_text()), **sections}))
    return out, recipe


def test_rerunning_a_finished_run_trains_nothing(runs, tmp_path, capsys):
    from qctrain.cli import main

    out, recipe = copy_run(runs, tmp_path)
    before = tree_digest(out)
    assert main(["train", str(recipe)]) == 0
    printed = capsys.readouterr().out
    assert (f"run complete: adapter in {out / 'adapter'} (step {MAX_STEPS}, checkpoint-{MAX_STEPS}); nothing to "
            "train (rerun with --restart to train again)") in printed
    assert "resuming" not in printed and "train_loss" not in printed
    assert tree_digest(out) == before  # not a byte changed: adapter, metrics, checkpoints, manifest, data report
    # A manifest of an earlier version (no checkpoint record): told by its recipe and its time.
    manifest = json.loads((out / "run_manifest.json").read_text())
    for key in ("checkpoint", "recipe_fingerprint"):
        manifest.pop(key)
    (out / "run_manifest.json").write_text(json.dumps(manifest))
    assert main(["train", str(recipe)]) == 0
    assert "run complete" in capsys.readouterr().out
    assert tree_digest(out / "adapter") == {k.removeprefix("adapter/"): v for k, v in before.items()
                                            if k.startswith("adapter/")}


def test_a_finished_run_completes_only_the_stages_that_did_not_finish(runs, tmp_path, capsys, monkeypatch):
    from qctrain.cli import main

    out, recipe = copy_run(runs, tmp_path, hub={"repo_id": "someone/finished-run", "push": "end"})
    adapter = tree_digest(out / "adapter")
    pushed = []
    monkeypatch.setattr("qctrain.preflight.check_publisher", lambda recipe, env: [])  # no Hub here
    monkeypatch.setattr("qctrain.publish.HubPublisher.push_run", lambda self, output_dir: pushed.append(output_dir))
    assert main(["train", str(recipe), "--set", "output.gguf=true"]) == 0  # a push and a GGUF export asked for
    printed = capsys.readouterr().out
    assert "run complete" in printed and "GGUF LoRA adapter: " in printed and pushed == [out]
    [gguf] = (out / "gguf").glob("*.gguf")
    written = gguf.stat().st_mtime_ns
    assert main(["train", str(recipe), "--set", "output.gguf=true"]) == 0
    assert "GGUF" not in capsys.readouterr().out and gguf.stat().st_mtime_ns == written  # done once, kept
    assert pushed == [out, out]  # the push is asked of the Hub again (it commits nothing when nothing changed)
    assert tree_digest(out / "adapter") == adapter


def test_a_run_killed_before_its_outputs_writes_them_without_training(runs, tmp_path, capsys):
    """Also: a run changes the modes of what it writes and of nothing else in its folder."""
    from qctrain.cli import main
    from safetensors.torch import load_file

    out, recipe = copy_run(runs, tmp_path)
    for name in ("adapter", "README.md", "run_manifest.json", "loss.png", "data_report.json"):
        shutil.rmtree(out / name) if (out / name).is_dir() else (out / name).unlink()
    foreign_home(out)  # a user's files in the run folder
    for private in (out / "prepared", out / "checkpoints"):
        private.chmod(0o700)
    kept = {name: snapshot(out / name) for name in (*FOREIGN, "prepared", "checkpoints")}
    steps = metrics_steps(out)
    assert main(["train", str(recipe)]) == 0
    printed = capsys.readouterr().out
    final = out / "checkpoints" / f"checkpoint-{MAX_STEPS}"
    assert f"training finished at {final} (step {MAX_STEPS} of {MAX_STEPS}): writing its outputs without " \
           "training more" in printed
    assert metrics_steps(out) == steps  # no step trained
    written, saved = adapter_tensors(out), load_file(final / "adapter_model.safetensors")
    assert written.keys() == saved.keys() and all(torch_equal(written[k], saved[k]) for k in saved)
    manifest = json.loads((out / "run_manifest.json").read_text())
    marker = json.loads((final / "qctrain_checkpoint.json").read_text())
    assert manifest["checkpoint"] == {"name": final.name, "saved": marker["saved"]}
    assert {name: snapshot(out / name) for name in kept} == kept  # names, modes, contents: untouched
    shared = [out / "adapter", *(out / "adapter").iterdir(), out / "README.md", out / "run_manifest.json",
              out / "loss.png", out / "metrics.jsonl", out / "data_report.json"]
    assert {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in shared} == {
        p.name: "0o755" if p.is_dir() else "0o644" for p in shared}
    before = tree_digest(out / "adapter")
    assert main(["train", str(recipe)]) == 0  # and now it is complete
    assert "run complete" in capsys.readouterr().out and tree_digest(out / "adapter") == before


def torch_equal(a, b) -> bool:
    import torch

    return torch.equal(a, b)


# --- plan_resume / --restart / time-based saving / signals, in-process (no training) ---

@pytest.fixture
def recipe_factory(tmp_path):
    from qctrain.recipe import load_recipe

    data = tmp_path / "d.json"
    data.write_text(json.dumps(records(4)))
    path = write_recipe(tmp_path / "r.yaml", tmp_path / "model", data, tmp_path / "out")

    def make(*overrides: str):
        return load_recipe(path, overrides)
    return make


def fake_checkpoint(recipe, step: int, marker: bool = True, fingerprint: str | None = None) -> Path:
    import torch
    from qctrain import checkpoint
    from safetensors.torch import save_file

    ckpt = checkpoint.checkpoints_dir(Path(recipe.output.dir)) / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"lora_A": torch.full((2, 2), float(step))}, ckpt / "adapter_model.safetensors")
    torch.save({"state": {}, "param_groups": []}, ckpt / "optimizer.pt")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 8, "log_history": []}))
    if marker:
        meta = {"complete": True, "recipe_fingerprint": fingerprint or checkpoint.recipe_fingerprint(recipe),
                "recipe": checkpoint.training_recipe(recipe), "step": step}
        (ckpt / "qctrain_checkpoint.json").write_text(json.dumps(meta))
    return ckpt


def test_plan_resume_picks_newest_complete_checkpoint_and_cleans_up(recipe_factory):
    from qctrain import checkpoint

    recipe = recipe_factory()
    out = Path(recipe.output.dir)
    fake_checkpoint(recipe, 2)
    fake_checkpoint(recipe, 10)
    fake_checkpoint(recipe, 12, marker=False)
    (out / "checkpoints" / ".partial-checkpoint-14").mkdir()
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"step": 5, "loss": 1}, {"step": 10, "loss": 1}, {"step": 10, "train_runtime": 3},
        {"step": 11, "loss": 1}]) + '{"step": 12, "lo')
    plan = checkpoint.plan_resume(recipe)
    assert plan.checkpoint.name == "checkpoint-10" and plan.step == 10
    assert (out / "checkpoints" / "checkpoint-12").exists()  # planning changes nothing
    plan.apply()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-10", "checkpoint-2"]
    assert metrics_steps(out) == [5, 10]
    # Settings that only decide saving/logging, and output:/hub:, do not block a resume.
    assert checkpoint.plan_resume(recipe_factory("train.save_steps=7", "train.logging_steps=3",
                                                 "output.save_every_minutes=5")).checkpoint is not None


def test_restart_discards_checkpoints_of_a_changed_recipe(recipe_factory):
    from qctrain import checkpoint
    from qctrain.cli import build_parser
    from qctrain.errors import InputError

    recipe = recipe_factory()
    out = Path(recipe.output.dir)
    fake_checkpoint(recipe, 4)
    (out / "metrics.jsonl").write_text('{"step": 4, "loss": 1}\n')
    changed = recipe_factory("train.max_steps=9")
    with pytest.raises(InputError, match=r"changed: train\.max_steps \(8 -> 9\)\); rerun with --restart"):
        checkpoint.plan_resume(changed)
    assert build_parser().parse_args(["train", "r.yaml", "--restart"]).restart is True
    plan = checkpoint.plan_resume(changed, restart=True)
    assert plan.checkpoint is None
    plan.apply()
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


def test_save_every_minutes_sets_should_save_and_resets_on_save():
    from qctrain.train import PreemptionCallback
    from transformers import TrainerControl

    now = [0.0]
    callback = PreemptionCallback(None, save_every_minutes=2, clock=lambda: now[0])
    args = SimpleNamespace(device="cpu")
    callback.on_train_begin(args, None, TrainerControl())
    for minute, expect in [(1.0, False), (2.0, True), (2.5, True), (3.0, True)]:
        now[0] = minute * 60
        control = TrainerControl()
        callback.on_step_end(args, None, control)
        assert control.should_save is expect, minute
        assert not control.should_training_stop
    callback.on_save(args, None, control)
    now[0] += 60
    control = TrainerControl()
    callback.on_step_end(args, None, control)
    assert not control.should_save


def test_signal_before_training_raises_preempted_and_during_training_only_flags():
    from qctrain.errors import ExitCode, Preempted
    from qctrain.train import PreemptionCallback, StopOnSignal
    from transformers import TrainerControl

    previous = signal.getsignal(signal.SIGTERM)
    with StopOnSignal() as stop:
        with pytest.raises(Preempted, match="before training started") as caught:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        assert caught.value.exit_code == ExitCode.PREEMPTED
    with StopOnSignal() as stop:
        stop.defer = True
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)  # a second signal: ignored
        time.sleep(0.1)
        assert stop.name == "SIGINT"
        control = TrainerControl()
        PreemptionCallback(stop).on_step_end(SimpleNamespace(device="cpu"), None, control)
        assert control.should_save and control.should_training_stop
    assert signal.getsignal(signal.SIGTERM) is previous


def test_logged_train_loss_weights_each_log_by_its_steps():
    from qctrain.train import logged_train_loss

    history = [{"step": 1, "loss": 1.0}, {"step": 4, "loss": 2.0}, {"step": 4, "eval_loss": 9.0},
               {"step": 4, "train_loss": 5.0, "train_runtime": 1.0}]
    assert logged_train_loss(history) == pytest.approx((1.0 + 3 * 2.0) / 4)
    assert logged_train_loss([{"step": 3, "eval_loss": 1.0}]) is None


def test_checkpoint_commit_is_atomic_and_replaces_a_same_step_checkpoint(tmp_path):
    from qctrain import checkpoint

    root = tmp_path / "checkpoints"
    for content in (b"old", b"new"):
        written = root / ".partial-checkpoint-3" / "checkpoint-3"
        written.mkdir(parents=True)
        (written / "optimizer.pt").write_bytes(content)
        checkpoint.commit(written, root / "checkpoint-3", {"step": 3})
        shutil.rmtree(root / ".partial-checkpoint-3")
    assert [p.name for p in root.iterdir()] == ["checkpoint-3"]
    assert (root / "checkpoint-3" / "optimizer.pt").read_bytes() == b"new"
    assert checkpoint.complete_checkpoints(root) == [root / "checkpoint-3"]


# --- final outputs: a crash while exporting never leaves a half-written adapter where a good one stood ---

class _FakeModel:
    def __init__(self, crash_after: int | None = None):
        self.crash_after = crash_after

    def save_pretrained(self, dest):
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "adapter_config.json").write_text('{"r": 8, "new": true}')
        if self.crash_after == 1:
            raise OSError("simulated crash half-way through the adapter")
        (dest / "adapter_model.safetensors").write_bytes(b"NEW" * 1000)


class _FakeTokenizer:
    chat_template = ""

    def save_pretrained(self, dest):
        (Path(dest) / "tokenizer_config.json").write_text("{}")


CRASH_POINTS = ["adapter", "tokenizer", "manifest", "plot", "card", "old_aside", "new_into_place"]


@pytest.mark.parametrize("crash_at", CRASH_POINTS)
def test_export_crash_never_leaves_a_half_written_adapter(crash_at, recipe_factory, monkeypatch):
    from qctrain import outputs

    recipe = recipe_factory()
    out = Path(recipe.output.dir)
    good = out / "adapter"
    good.mkdir(parents=True)
    (good / "adapter_model.safetensors").write_bytes(b"GOOD" * 1000)
    (good / "adapter_config.json").write_text('{"r": 8}')
    before = tree_digest(good)

    def boom(*args, **kwargs):
        raise OSError(f"simulated crash at {crash_at}")

    model = _FakeModel(crash_after=1 if crash_at == "adapter" else None)
    tokenizer = _FakeTokenizer()
    if crash_at == "tokenizer":
        monkeypatch.setattr(tokenizer, "save_pretrained", boom)
    if crash_at == "manifest":
        monkeypatch.setattr(outputs, "write_json_atomic", boom)
    if crash_at == "plot":
        monkeypatch.setattr(outputs, "plot_loss", boom)
    if crash_at == "card":
        monkeypatch.setattr(outputs, "model_card", boom)
    real_replace = os.replace

    def replace(src, dst):
        # rundir.swap_in_outputs: adapter -> .adapter.old ("old_aside"), then staging/adapter -> adapter
        if (crash_at == "old_aside" and Path(src) == good) or (
                crash_at == "new_into_place" and Path(dst) == good):
            boom()
        return real_replace(src, dst)
    monkeypatch.setattr(outputs.os, "replace", replace)
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(per_device_train_batch_size=1,
                                                                gradient_accumulation_steps=1))
    with pytest.raises(OSError, match="simulated crash"):
        outputs.write_outputs(outputs.TrainedRun(recipe, trainer, tokenizer, "", {}, out / "none.json", {}, [], 0.0,
                                                 1.0, []))
    if crash_at != "new_into_place":
        assert tree_digest(good) == before
    else:
        # Between swap_in_outputs' two renames the old adapter sits at .adapter.old and adapter/ is
        # absent (two renames cannot swap folders atomically): never half-written, never lost.
        assert not good.exists() or tree_digest(good) == before
        assert good.exists() or tree_digest(out / ".adapter.old") == before


def test_export_replaces_the_adapter_whole(recipe_factory):
    from qctrain import outputs

    recipe = recipe_factory()
    out = Path(recipe.output.dir)
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "stale_file.bin").write_bytes(b"old")
    trainer = SimpleNamespace(model=_FakeModel(), args=SimpleNamespace(per_device_train_batch_size=1,
                                                                       gradient_accumulation_steps=1))
    outputs.write_outputs(outputs.TrainedRun(recipe, trainer, _FakeTokenizer(), "", {}, out / "none.json", {}, [], 0.0,
                                             1.0, []))
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "loss.png", "tokenizer_config.json"]
    assert not [p for p in out.iterdir() if p.name.startswith((".staging", ".adapter.old"))]


# --- the image: `docker stop` sends SIGTERM through tini ---

IMAGE = os.environ.get("QCTRAIN_TEST_IMAGE", "qc-train-phi:dev")


def _docker_image_present() -> bool:
    docker = shutil.which("docker")
    if not docker:
        return False
    try:
        found = subprocess.run([docker, "image", "inspect", IMAGE], capture_output=True, timeout=30)
        return found.returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.docker
@pytest.mark.skipif(not os.environ.get("QCTRAIN_TEST_IMAGE") and not _docker_image_present(),
                    reason=f"needs docker and the image {IMAGE} (make image)")
def test_docker_stop_checkpoints_exits_75_and_rerun_resumes(tmp_path):
    # docker/ci.sh sets QCTRAIN_TEST_IMAGE: there a missing image fails here instead of skipping
    assert _docker_image_present(), f"image {IMAGE} not found"
    docker = shutil.which("docker")
    uid, gid = os.getuid(), os.getgid()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "data.json").write_text(json.dumps(records(24)))
    (tmp_path / "out").mkdir()
    (tmp_path / "models").mkdir()
    recipe = write_recipe(tmp_path / "recipe.yaml", Path("/models/tiny-phi3"), Path("/data/data.json"),
                          Path("/out/run"))
    mounts = ["-v", f"{tmp_path / 'models'}:/models", "-v", f"{tmp_path / 'data'}:/data:ro",
              "-v", f"{tmp_path / 'out'}:/out", "-v", f"{recipe}:/recipe.yaml:ro"]
    base = [docker, "run", "--network", "none", "--user", f"{uid}:{gid}", "--shm-size", "1g", *mounts]
    subprocess.run([*base, "--rm", IMAGE, "tiny-model", "/models/tiny-phi3"], check=True, timeout=300)
    name = f"qctrain-preempt-test-{os.getpid()}"
    # Enough steps (a checkpoint every 2) that `docker stop` lands mid-training.
    long_run = ["--set", "train.max_steps=60"]
    subprocess.run([*base, "-d", "--name", name, IMAGE, "train", "/recipe.yaml", *long_run], check=True,
                   capture_output=True, timeout=120)
    try:
        wait_for = tmp_path / "out" / "run"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and len(metrics_steps(wait_for)) < 3:
            time.sleep(0.5)
        subprocess.run([docker, "stop", "--time", "60", name], check=True, capture_output=True, timeout=120)
        rc = int(subprocess.run([docker, "wait", name], capture_output=True, text=True, timeout=120).stdout)
        logs = subprocess.run([docker, "logs", name], capture_output=True, text=True, timeout=60).stderr
    finally:
        subprocess.run([docker, "rm", "-f", name], capture_output=True, timeout=60)
    assert rc == 75, logs[-3000:]
    ckpts = [p for p in (wait_for / "checkpoints").iterdir() if p.name.startswith("checkpoint-")]
    assert ckpts and all(complete(p) for p in ckpts)
    rerun = subprocess.run([*base, "--rm", IMAGE, "train", "/recipe.yaml", *long_run],
                           capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout


# --- hook wrapper: `python tests/test_preemption.py train RECIPE ...` with QCTRAIN_TEST_HOOKS ---

def _install_hooks(hooks: dict) -> None:
    import transformers
    from qctrain import checkpoint, train

    if hooks.get("sigkill_in_save"):
        saves = {"n": 0}
        original_save = transformers.Trainer._save_optimizer_and_scheduler

        def save_then_die(self, output_dir):
            saves["n"] += 1
            if saves["n"] == hooks["sigkill_in_save"]:  # the adapter is written, the optimizer not yet
                os.kill(os.getpid(), signal.SIGKILL)
            return original_save(self, output_dir)
        transformers.Trainer._save_optimizer_and_scheduler = save_then_die

    if hooks.get("signal_again_in_save"):
        original_commit, original_enter = checkpoint.commit, train.StopOnSignal.__enter__
        guards = []

        def enter(self):
            guards.append(self)
            return original_enter(self)

        def commit_under_fire(*args, **kwargs):
            if guards and guards[0].signum is not None:  # the save that the first SIGTERM asked for
                os.kill(os.getpid(), signal.SIGTERM)
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.2)
            return original_commit(*args, **kwargs)
        train.StopOnSignal.__enter__ = enter
        checkpoint.commit = commit_under_fire

    if hooks.get("sleep_per_step"):
        original_step_end = train.PreemptionCallback.on_step_end

        def slow_step_end(self, *args, **kwargs):
            time.sleep(hooks["sleep_per_step"])
            return original_step_end(self, *args, **kwargs)
        train.PreemptionCallback.on_step_end = slow_step_end


if __name__ == "__main__":
    _install_hooks(json.loads(os.environ.get("QCTRAIN_TEST_HOOKS") or "{}"))
    from qctrain.cli import main

    raise SystemExit(main(sys.argv[1:]))


# --- what may change between a preemption and the rerun ---

@pytest.mark.parametrize("override", [
    "train.dataloader_num_workers=2", "train.dataloader_pin_memory=false", "train.activation_checkpointing=true",
    "train.gradient_checkpointing=true", "train.torch_compile=true", "train.report_to=tensorboard",
    "train.logging_steps=3", "train.eval_steps=5", "train.save_total_limit=1", "train.use_liger_kernel=true",
    "model.attn_implementation=eager", "output.save_every_minutes=5",
])
def test_knobs_that_do_not_change_the_weights_resume(recipe_factory, override):
    from qctrain import checkpoint

    fake_checkpoint(recipe_factory(), 4)
    changed = recipe_factory(override)
    plan = checkpoint.plan_resume(changed)
    assert plan.checkpoint is not None and plan.step == 4
    assert checkpoint.recipe_fingerprint(changed) == checkpoint.recipe_fingerprint(recipe_factory())


@pytest.mark.parametrize("override, shown", [
    ("train.learning_rate=1e-4", "train.learning_rate (0.005 -> 0.0001)"),
    ("train.per_device_train_batch_size=4", "train.per_device_train_batch_size (2 -> 4)"),
    ("train.lr_scheduler_type=linear", 'train.lr_scheduler_type ("cosine" -> "linear")'),
    ("lora.r=16", "lora.r (8 -> 16)"),
    ("data.max_seq_length=32", "data.max_seq_length (64 -> 32)"),
    ("train.seed=7", "train.seed (42 -> 7)"),
])
def test_knobs_that_change_the_weights_refuse_naming_old_and_new(recipe_factory, override, shown):
    from qctrain import checkpoint
    from qctrain.errors import InputError

    fake_checkpoint(recipe_factory(), 4)
    with pytest.raises(InputError) as err:
        checkpoint.plan_resume(recipe_factory(override, "train.dataloader_num_workers=2"))
    message = str(err.value)
    assert f"checkpoint of a different recipe (changed: {shown}); rerun with --restart" in message
    assert "dataloader" not in message  # the harmless change beside it is not blamed


def test_checkpoint_of_an_older_qctrain_without_logging_keys_resumes(recipe_factory):
    """Markers written before the resume policy recorded no logging/saving keys: still the same recipe."""
    from qctrain import checkpoint

    recipe = recipe_factory()
    ckpt = fake_checkpoint(recipe, 6)
    marker = json.loads((ckpt / checkpoint.MARKER).read_text())
    for key in ("save_steps", "logging_steps", "save_total_limit", "report_to"):
        marker["recipe"]["train"].pop(key)
    marker["recipe_fingerprint"] = "older"
    (ckpt / checkpoint.MARKER).write_text(json.dumps(marker))
    assert checkpoint.plan_resume(recipe).checkpoint == ckpt
