"""Scaling out on CPU: `qctrain train --nproc 2` (torchrun, gloo, 2 ranks) against one process.

The expensive part runs once, in the module fixture `runs` (each run is mostly process start-up):

  single     `qctrain train R1`, per_device_train_batch_size 4            (in parallel with `preempted`)
  preempted  `qctrain train --nproc 2 R2`, per_device_train_batch_size 2: the same global batch of 4;
             SIGTERM to the PID it started as (now the launcher: what tini/Docker/Kubernetes signal)
             once step 2 is logged; steps are slowed by 0.3 s (a sitecustomize on PYTHONPATH,
             test-only) so the signal lands mid-run
  resumed    the same command again: resumes from the checkpoint and finishes
  accelerate `accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 2 -m qctrain
             train R3` (in parallel with `resumed`): qctrain unchanged under accelerate's launcher
  two nodes  two `qctrain train --nproc 1 R4` with PET_NNODES=2, PET_NODE_RANK=0/1, PET_MASTER_ADDR=
             127.0.0.1 (in parallel with `resumed`): the multi-node path of the Kubernetes manifests, on
             one machine (a static rendezvous, rank 1 is the first rank of "node 1")

The DDP checks (both ranks train, data tokenized once, one set of outputs, the curve) read the
preempted-then-resumed run: resuming is exact (tests/test_preemption.py), and it keeps the suite short.

Loss tolerance (LOSS_ATOL = 2e-5): with the same seed, the 2 ranks x 2 sequences of a DDP step are the
4 sequences of the single-process step (accelerate shards one seeded permutation), and the loss is
normalised by the tokens of the whole global batch, so the curves are equal up to float32 summation
order: measured differences are <= 1e-6 (steps 1-7, 4-bit tiny Phi-3). A step whose global batch differs
by one sequence of four (step 8, where DDP pads the last batch; measured with the earlier 1k-piece toy
tokenizer) already differs by 1.9e-4, so 2e-5 separates "the same computation" from "different data" with
~10x margin either way.
"""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import alpaca_records, finish, gone, write_json, write_recipe
from qctrain import distributed
from qctrain.errors import InputError

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS = 6  # of 7 full global batches: the last, padded one is left out of the comparison
LOSS_ATOL = 2e-5
ADAPTER_ATOL = 1e-4  # LoRA tensors after 6 steps, DDP vs one process (measured: see the test's output)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
       "PYTHONPATH": str(REPO / "entrypoint")}

# Test-only: slows every optimizer step of every rank (tests/slowsteps/sitecustomize.py, imported by each process).
SLOW_STEPS = Path(__file__).resolve().parent / "slowsteps"


# --- helpers ---

def qctrain(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qctrain", *args], cwd=REPO, env=env or ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def losses(out: Path) -> list[float]:
    return [row["loss"] for row in metrics(out) if "loss" in row]


def wait_for_step(proc: subprocess.Popen, out: Path, step: int, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(row.get("step", 0) >= step and "loss" in row for row in metrics(out)):
            return
        if proc.poll() is not None:
            result = finish(proc)
            raise AssertionError(f"ended (rc {result.returncode}) before step {step}: {result.stderr[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"no step {step} within {timeout} s")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("qctrain: error:")]


def adapter_tensors(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(out / "adapter" / "adapter_model.safetensors")


# --- the runs ---

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    import psutil
    from qctrain.tiny import write_tiny_model

    root = tmp_path_factory.mktemp("ddp")
    model_dir = write_tiny_model(root / "tiny-phi3")
    data = write_json(root / "data.json", alpaca_records(48))

    def recipe(name: str, per_device: int, **sections) -> Path:
        return write_recipe(root / f"{name}.yaml", model_dir, data, root / name,
                            # 44 train records pack into 30 sequences of <= 68 Phi-3.5 tokens: 7 full global
                            # batches of 4, then a padded one
                            data={"eval": {"count": 4}, "max_seq_length": 68},
                            train={"max_steps": MAX_STEPS, "per_device_train_batch_size": per_device,
                                   "save_steps": 100}, **sections)

    slow = {**ENV, "PYTHONPATH": f"{SLOW_STEPS}{os.pathsep}{ENV['PYTHONPATH']}", "QCTRAIN_TEST_STEP_DELAY": "0.3"}
    ddp_recipe, out = recipe("ddp", 2), root / "ddp"
    timings: dict[str, float] = {}

    t0 = time.monotonic()
    single = qctrain("train", str(recipe("single", 4)))
    proc = qctrain("train", "--nproc", "2", str(ddp_recipe), env=slow)
    wait_for_step(proc, out, 2)
    tree = [p.pid for p in psutil.Process(proc.pid).children(recursive=True)]
    launcher_cmdline = psutil.Process(proc.pid).cmdline()
    proc.send_signal(signal.SIGTERM)
    signalled_at = max(row["step"] for row in metrics(out))
    preempted = finish(proc)
    timings["preempted"] = time.monotonic() - t0
    left_running = gone(tree)
    after_preempt = SimpleNamespace(
        checkpoints=sorted(p.name for p in (out / "checkpoints").iterdir() if p.name != "README.md"),
        files=sorted(p.name for p in out.iterdir()))
    single = finish(single)
    timings["single"] = time.monotonic() - t0

    t = time.monotonic()
    accelerate = subprocess.Popen(
        [sys.executable, "-m", "accelerate.commands.accelerate_cli", "launch", "--config_file",
         str(REPO / "recipes" / "accelerate" / "ddp.yaml"), "--num_processes", "2",
         "-m", "qctrain", "train", str(recipe("accelerate", 2))],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    node_recipe, port = recipe("nodes", 2, evaluate={"samples": False}), free_port()  # base pass on every rank
    nodes = [qctrain("train", "--nproc", "1", str(node_recipe),
                     env={**ENV, "PET_NNODES": "2", "PET_NODE_RANK": str(rank), "PET_MASTER_ADDR": "127.0.0.1",
                          "PET_MASTER_PORT": str(port)}) for rank in (0, 1)]
    resumed = finish(qctrain("train", "--nproc", "2", str(ddp_recipe)))
    timings["resumed"] = time.monotonic() - t
    accelerate = finish(accelerate)
    nodes = [finish(node) for node in nodes]
    timings["accelerate+2 nodes"] = time.monotonic() - t
    return SimpleNamespace(root=root, out=out, single=single, preempted=preempted, resumed=resumed,
                           accelerate=accelerate, nodes=nodes, tree=tree,
                           launcher_cmdline=launcher_cmdline, left_running=left_running,
                           signalled_at=signalled_at, after_preempt=after_preempt, timings=timings)


def preempted_step(runs) -> int:
    return int(error_lines(runs.preempted.stderr)[0].split("at step ")[1].split("/")[0])


# --- DDP: both ranks train, data once, outputs once, same curve as one process ---

def test_single_and_ddp_runs_finish(runs):
    assert runs.single.returncode == 0, runs.single.stderr[-3000:]
    assert runs.resumed.returncode == 0, runs.resumed.stderr[-3000:]
    assert "qctrain: launching 2 processes per node: --nproc-per-node 2 --standalone -m qctrain train" \
        in runs.resumed.stderr


def test_both_ranks_train_with_the_global_batch_in_the_manifest(runs):
    manifest = json.loads((runs.out / "run_manifest.json").read_text())
    assert manifest["batch"] == {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1,
                                 "world_size": 2, "global_batch_size": 4}
    assert manifest["machine"]["world_size"] == 2
    single = json.loads((runs.root / "single" / "run_manifest.json").read_text())
    assert single["batch"]["global_batch_size"] == 4 and single["batch"]["world_size"] == 1
    # Every rank saved its own RNG state in the checkpoints (a rank that trained alone, world size 1,
    # would not write rng_state_1.pth), and they agreed on the number of steps.
    for ckpt in (preempted_step(runs), MAX_STEPS):
        path = runs.out / "checkpoints" / f"checkpoint-{ckpt}"
        assert (path / "rng_state_0.pth").is_file() and (path / "rng_state_1.pth").is_file()
    assert json.loads((runs.out / "checkpoints" / f"checkpoint-{MAX_STEPS}" / "trainer_state.json")
                      .read_text())["max_steps"] == MAX_STEPS


def test_data_is_tokenized_once_by_rank_0(runs):
    # Every process that tokenizes prints the data summary (cli._train); rank 1 read rank 0's cache.
    def summaries(stdout: str) -> list[str]:
        return [line for line in stdout.splitlines() if line.startswith("data: ") and " read, " in line]

    [first] = summaries(runs.preempted.stdout)
    assert "(cached)" not in first
    [again] = summaries(runs.resumed.stdout)  # the rerun: rank 0 reports the cache, rank 1 stays quiet
    assert again.endswith("(cached)")
    prepared = sorted(p.name for p in (runs.out / "prepared").iterdir())
    assert len(prepared) == 1 and not prepared[0].startswith("."), prepared


def test_one_set_of_outputs(runs):
    assert sorted(p.name for p in runs.out.iterdir()) == [
        ".qctrain-run", "README.md", "adapter", "checkpoints", "data_report.json", "loss.png", "metrics.jsonl",
        "prepared", "run_manifest.json"]  # no second adapter, no leftover staging folder
    assert runs.resumed.stdout.count("done: adapter in") == 1
    rows = metrics(runs.out)
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, MAX_STEPS + 1))
    assert sum("train_runtime" in r for r in rows) == 1
    assert "| with this adapter |" in (runs.out / "README.md").read_text()  # rank 0 generated the held-out samples


def test_every_rank_joins_the_held_out_pass_of_the_base(runs):
    """evaluate: with two processes: the base's held-out pass gathers across ranks, so both run it before rank 1
    returns; rank 0 alone writes the results."""
    assert all(node.returncode == 0 for node in runs.nodes), [node.stderr[-2000:] for node in runs.nodes]
    out = runs.root / "nodes"
    held = json.loads((out / "eval_results.json").read_text())["heldout"]
    assert held["records"] == 4 and held["base"]["loss"] != held["tuned"]["loss"]
    assert held["tuned"]["loss"] == json.loads((out / "run_manifest.json").read_text())["metrics"]["eval_loss"]


def test_the_adapter_loads_and_generates(runs):
    from qctrain.finished.generate import generate_replies
    from qctrain.finished.load import FinishedRun

    adapter_model, tokenizer = FinishedRun.open(runs.out).load()
    [reply] = generate_replies(adapter_model, tokenizer, [[{"role": "user", "content": "Hello"}]],
                                      max_new_tokens=4)
    assert isinstance(reply, str)


def test_loss_curve_matches_one_process_at_the_same_global_batch(runs):
    import torch

    single, ddp = losses(runs.root / "single"), losses(runs.out)
    assert len(single) == len(ddp) == MAX_STEPS
    worst = max(abs(a - b) for a, b in zip(single, ddp, strict=True))
    ref, got = adapter_tensors(runs.root / "single"), adapter_tensors(runs.out)
    adapter_worst = max((ref[k] - got[k]).abs().max().item() for k in ref)
    others = {name: max((abs(a - b) for a, b in zip(single, losses(runs.root / name), strict=False)), default=None)
              for name in ("accelerate", "nodes")}
    print(f"loss, one process (4/device) vs DDP (2 ranks x 2/device, preempted at step "
          f"{preempted_step(runs)} and resumed): max abs difference {worst:.3g} (atol {LOSS_ATOL}); adapter "
          f"tensors: {adapter_worst:.3g} (atol {ADAPTER_ATOL}); accelerate launch, 2 nodes: {others}; timings "
          f"{json.dumps({k: round(v, 1) for k, v in runs.timings.items()})}")
    assert ddp == pytest.approx(single, abs=LOSS_ATOL, rel=0)
    assert ref.keys() == got.keys()
    assert all(torch.allclose(ref[k], got[k], atol=ADAPTER_ATOL, rtol=0) for k in ref), adapter_worst


def test_accelerate_launch_ddp_runs_qctrain_unchanged(runs):
    result, out = runs.accelerate, runs.root / "accelerate"
    assert result.returncode == 0, result.stderr[-3000:]
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["batch"]["world_size"] == 2 and manifest["batch"]["global_batch_size"] == 4
    summaries = [line for line in result.stdout.splitlines() if line.startswith("data: ") and " read, " in line]
    assert len(summaries) == 1 and "(cached)" not in summaries[0]
    assert result.stdout.count("done: adapter in") == 1
    assert losses(out) == pytest.approx(losses(runs.root / "single"), abs=LOSS_ATOL, rel=0)


def test_two_nodes_by_pet_variables(runs):
    node0, node1 = runs.nodes
    assert node0.returncode == 0 and node1.returncode == 0, (node0.stderr[-2000:], node1.stderr[-2000:])
    for node in runs.nodes:  # PET_* set: no --standalone, torchrun rendezvouses at PET_MASTER_ADDR
        assert "launching 1 processes per node: --nproc-per-node 1 -m qctrain train" in node.stderr
    out = runs.root / "nodes"
    manifest = json.loads((out / "run_manifest.json").read_text())
    assert manifest["batch"]["world_size"] == 2 and manifest["batch"]["global_batch_size"] == 4
    # Node 0's rank tokenized; node 1's first rank waited for it and read the cache (no summary line).
    assert [line for line in node0.stdout.splitlines() if " read, " in line and "(cached)" not in line]
    assert " read, " not in node1.stdout and "done:" not in node1.stdout
    assert node0.stdout.count("done: adapter in") == 1
    assert losses(out) == pytest.approx(losses(runs.root / "single"), abs=LOSS_ATOL, rel=0)


# --- SIGTERM to the launcher: every worker checkpoints and exits 75, then a clean resume ---

def test_the_launcher_replaced_the_qctrain_process(runs):
    # exec: the PID that Docker/Kubernetes signal is the launcher (python -m qctrain.distributed)
    assert runs.launcher_cmdline[1:3] == ["-m", "qctrain.distributed"], runs.launcher_cmdline
    assert len(runs.tree) >= 2  # the workers were running when it was signalled


def test_sigterm_reaches_every_worker_and_exits_75_with_one_complete_checkpoint(runs):
    result = runs.preempted
    assert result.returncode == 75, result.stderr[-3000:]
    assert "SIGTERM received: forwarded to 2 workers" in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 2, result.stderr[-3000:]  # one per rank: each stopped itself and exited 75
    steps = {int(line.split("at step ")[1].split("/")[0]) for line in lines}
    assert len(steps) == 1, lines  # every rank stopped after the same step
    [step] = steps
    assert runs.signalled_at <= step < MAX_STEPS
    # The launcher's summary: every worker that it saw end exited 75 itself (none killed by a signal).
    summary = re.search(r"qctrain: worker exit codes \((.*)\); exiting (\d+)", result.stderr)
    assert summary and summary.group(2) == "75", result.stderr[-3000:]
    codes = dict(re.findall(r"rank (\d+): (-?\d+)", summary.group(1)))
    assert codes.get("0") == "75" and set(codes.values()) == {"75"}, summary.group(0)
    assert "Traceback" not in result.stderr
    assert runs.after_preempt.checkpoints == [f"checkpoint-{step}"]  # one, complete, no partial folder
    assert "adapter" not in runs.after_preempt.files  # no final outputs from a stopped run
    marker = json.loads((runs.out / "checkpoints" / f"checkpoint-{step}" / "qctrain_checkpoint.json").read_text())
    assert marker["complete"] is True and marker["step"] == step


def test_no_worker_outlives_the_launcher(runs):
    assert runs.left_running == [], runs.left_running


def test_rerun_resumes_from_that_checkpoint(runs):
    step = preempted_step(runs)
    ckpt = runs.out / "checkpoints" / f"checkpoint-{step}"
    assert runs.resumed.stdout.count(f"resuming from {ckpt} (step {step})") == 1  # rank 0 says it once
    assert runs.resumed.returncode == 0


# --- the pieces, without processes ---

def test_launch_command_single_node_and_multi_node():
    argv = ["train", "r.yaml", "--set", "train.max_steps=3"]
    cmd = distributed.launch_command(argv, 4, env={}, python="py")
    assert cmd == ["py", "-m", "qctrain.distributed", "--nproc-per-node", "4", "--standalone",
                   "-m", "qctrain", *argv]
    # Kubeflow Trainer / the Indexed Job set PET_*: torchrun rendezvouses as they say, not standalone.
    env = {"PET_NNODES": "2", "PET_NODE_RANK": "1", "PET_MASTER_ADDR": "job-0.svc", "PET_MASTER_PORT": "29500"}
    cmd = distributed.launch_command(argv, 8, env=env, python="py")
    assert "--standalone" not in cmd and cmd[3:5] == ["--nproc-per-node", "8"]


def test_nproc_is_stripped_from_the_workers_arguments():
    assert distributed.strip_option(["train", "--nproc", "2", "r.yaml", "--restart"], "--nproc") == \
        ["train", "r.yaml", "--restart"]
    assert distributed.strip_option(["train", "--nproc=auto", "r.yaml"], "--nproc") == ["train", "r.yaml"]


def test_resolve_nproc():
    import torch

    assert distributed.resolve_nproc("3") == 3
    assert distributed.resolve_nproc("auto") == max(1, torch.cuda.device_count())
    for bad in ("0", "-1", "two"):
        with pytest.raises(InputError, match="--nproc"):
            distributed.resolve_nproc(bad)


def test_launcher_exit_code_policy():
    code = distributed.launcher_exit_code
    assert code({0: 75, 1: 75}, 0, signalled=True) == 75
    assert code({1: 1, 0: -15}, 1, signalled=True) == 75  # a rank lost its peer while stopping: rerun
    assert code({0: 2}, 0, signalled=True) == 2  # bad input stays bad input
    assert code({0: 4}, 0, signalled=False) == 4  # rank 0's push failed; the others exited 0
    assert code({1: 1, 0: 75}, 1, signalled=False) == 1  # the first failure decides, not rank order
    assert code({0: -9}, 0, signalled=False) == 137


def test_nproc_one_without_rendezvous_runs_in_process(monkeypatch, tmp_path):
    from qctrain import cli

    monkeypatch.setattr(distributed, "exec_launcher", lambda *a: pytest.fail("must not launch"))
    for name in (*distributed.RENDEZVOUS_ENV, "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    # A missing recipe fails in-process (exit 2) instead of starting a launcher for one process.
    assert cli.main(["train", "--nproc", "1", str(tmp_path / "none.yaml")]) == 2


def test_nproc_under_a_launcher_is_ignored(monkeypatch, tmp_path):
    from qctrain import cli

    monkeypatch.setattr(distributed, "exec_launcher", lambda *a: pytest.fail("must not launch twice"))
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert cli.main(["train", "--nproc", "4", str(tmp_path / "none.yaml")]) == 2


def test_bad_recipe_fails_before_any_worker_starts(monkeypatch, tmp_path):
    from qctrain import cli

    monkeypatch.setattr(distributed, "exec_launcher", lambda *a: pytest.fail("must not launch"))
    for name in ("LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert cli.main(["train", "--nproc", "2", str(tmp_path / "none.yaml")]) == 2


def test_main_process_first_is_a_no_op_for_one_process(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ran = []
    with distributed.main_process_first():
        ran.append(1)
    assert ran == [1]
    distributed.check_same_run("abc", 0)  # one process: nothing to compare


def test_signal_forwarder_forwards_to_workers_or_exits_75_before_they_start(monkeypatch):
    forwarder = distributed.SignalForwarder()
    exits = []
    monkeypatch.setattr(distributed.os, "_exit", exits.append)
    monkeypatch.setattr(forwarder, "workers", lambda: [])
    forwarder._handle(signal.SIGTERM, None)
    assert exits == [75]  # before any worker runs: nothing to save, exit at once

    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        monkeypatch.setattr(forwarder, "workers", lambda: [worker.pid])
        forwarder._handle(signal.SIGTERM, None)
        assert worker.wait(timeout=30) == -signal.SIGTERM  # passed on, as it came
        assert forwarder.signum == signal.SIGTERM and exits == [75]
    finally:
        worker.kill()


# --- a rank that dies: the others name it ---

LOST_PEER = '''
import os, sys, time
import torch.distributed as dist
from qctrain import cli, distributed
from qctrain.signals import StopOnSignal

dist.init_process_group("gloo")
distributed.all_gather(0)
if distributed.rank() == 1:
    os._exit(9)  # killed: no goodbye to the others
time.sleep(1)
stop = StopOnSignal()
if sys.argv[1] == "stopping":
    stop.signum = 15  # this rank was signalled too: the others going away is the stop, not a fault
try:
    distributed.all_gather(1)
except Exception as err:
    fault = cli._fault(err, stop)
    print(int(fault.exit_code), fault, flush=True)
'''


@pytest.mark.slow
@pytest.mark.parametrize("case", ["lost", "stopping"])
def test_a_dead_rank_is_named_not_an_internal_error(case, tmp_path):
    port = str(free_port())
    env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "LOCAL_RANK": "0"}
    procs = [subprocess.Popen([sys.executable, "-c", LOST_PEER, case], env={**env, "RANK": str(rank)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    out, err = procs[0].communicate(timeout=120)
    procs[1].communicate(timeout=30)
    code, _, message = out.strip().partition(" ")
    if case == "lost":
        assert code == "3", out + err
        assert message.startswith("rank 0 of 2 lost its connection to rank 1: that process died or was stopped ("), out
        assert message.endswith("; rerun the same command to resume from the last complete checkpoint")
    else:
        assert code == "75", out + err
        assert message.startswith("stopped by SIGTERM while the other ranks stopped too"), out
