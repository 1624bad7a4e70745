"""Shared fixtures, test tiers and the parallel run.

Tiers: `make test` runs everything but the image tests (pytest-xdist, one worker per core); `make test-fast`
(`-m "not slow and not docker"`) is the unit tier: no training run, no model loaded beyond its tokenizer, no
subprocess that imports the training stack. tests/tiers.py decides what is `slow` (a marker, a fixture of
SLOW_FIXTURES, a training command in the test's code) and fails a test outside the slow tier that trains or
loads a model all the same, naming what it did.

Shared runs (session fixtures, built once per `make test` even across xdist workers, under a file lock in a
folder all workers share; see `built_once`). Read them; never write into them: a test that changes a run (train,
prepare, export, a rerun, a deleted file) works on a copy (`copy_run(finished_run, tmp_path / "copy")`).

  tiny_model_dir   a tiny random Phi-3 with Phi-3.5's tokenizer (qctrain.tiny)
  finished_run     one finished CPU training run of the tiny model, trained the way a user would: from its own
                   work folder with relative paths (`run.yaml`: models/tiny, data/train.json, out/run), under
                   umask 077; 48 Alpaca records (English and Chinese), eval fraction 0.1 (5 held out, 3 sample
                   generations in the card), 16 steps logged every step and evaluated every 8, tensorboard,
                   output.gguf. Fields: work, recipe, out, model, stdout, stderr (of `qctrain train`).
  merged_run       `qctrain merge` of finished_run (float32) into another folder: dest, result
  hub_cached_run   a run with a Hub id as its base (qctest/tiny-phi3, license mit) read from a filled HF cache
                   by `qctrain train` under the network guard (tests/isolation.py) with offline_env: 24 records,
                   eval count 2, 6 steps, output.gguf; fields work, out (out/hub), hf_home, snapshot (the
                   cached base's folder), env, result (of `qctrain train`), attempts (connections tried: none)

Parallel runs (make test: `pytest -n auto`, pytest-xdist, the scheduler below): the tests of a module with
module-scoped fixtures (GROUPED_MODULES: one module's trained runs) stay on one worker, other tests are handed
out one by one, the heavy modules first (MODULE_SECONDS); a worker's torch runs one thread (one core a worker).
Tests marked `timing` (they bound a wall time) run last and alone: an exclusive lock that every other test
holds shared.
"""

import contextlib
import fcntl
import json
import os
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import tiers
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may reach the Hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")
if XDIST_WORKER:
    # One core per worker: torch's default (a thread per core) in every worker and each training subprocess
    # oversubscribes the cores, and OpenMP's spinning threads burn what the other worker needs.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
REPO = Path(__file__).resolve().parents[1]

# Modules with module-scoped fixtures (their trained runs, a loaded model): under xdist all their tests go to one
# worker, so that the fixture is built once. The tests of every other module are handed out one by one.
GROUPED_MODULES = {"test_distributed.py", "test_docker_image.py", "test_fast_tokenize.py", "test_gguf.py",
                   "test_hostile_inputs.py", "test_hub_flow.py", "test_loss_path.py", "test_model.py",
                   "test_packing.py", "test_preemption.py", "test_scaleout_manifests.py", "test_sky_task.py",
                   "test_stopping.py", "test_trackers.py", "test_evaluate.py", "test_evaluate_flow.py",
                   "test_preference_run.py", "test_preference_train.py"}
# Rough seconds of the heavy modules on 2 idle cores: under xdist the longest start first (scheduling only).
MODULE_SECONDS = {"test_bench_smoke.py": 90, "test_distributed.py": 60, "test_preemption.py": 50,
                  "test_hub_flow.py": 40, "test_portable.py": 35, "test_rundir.py": 35, "test_secrets.py": 30,
                  "test_quiet_and_fast.py": 30, "test_trackers.py": 25, "test_train.py": 20,
                  "test_stopping.py": 20, "test_hostile_inputs.py": 15, "test_loss_path.py": 15,
                  "test_offline.py": 10}


tiers.install_guard()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    with tiers.watching(item):
        result = yield
    if why := tiers.verdict():
        pytest.fail(why, pytrace=False)
    return result


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with tiers.watching(item):
        result = yield
    if why := tiers.verdict():
        pytest.fail(why, pytrace=False)
    return result


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        tiers.classify(item)
        scoped = [name for name, defs in item._fixtureinfo.name2fixturedefs.items()
                  if defs[-1].scope in ("module", "class", "package")]
        if scoped and item.path.name not in GROUPED_MODULES:
            raise pytest.UsageError(f"{item.nodeid} uses the module-scoped fixture(s) {', '.join(scoped)}: add "
                                    f"{item.path.name} to GROUPED_MODULES in tests/conftest.py")
    if XDIST_WORKER:  # every worker sorts alike, and the controller hands out work in this order
        def order(item):
            return (1 if item.get_closest_marker("timing") else 0), -MODULE_SECONDS.get(item.path.name, 0)
        items.sort(key=order)  # stable: a module's tests stay together and in their order


def pytest_xdist_make_scheduler(config, log):
    """xdist's load-by-scope scheduler, the scope being the module for GROUPED_MODULES and the test otherwise;
    in the order the workers collected (above), not by the number of tests in a scope."""
    if config.getoption("dist") not in ("load", "loadscope", "loadfile", "loadgroup"):
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ModuleScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return module if Path(module).name in GROUPED_MODULES else nodeid

    config.option.loadscopereorder = False
    return ModuleScheduling(config, log)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Under xdist a `timing` test runs while no other test does: it holds an exclusive lock that every other
    test holds shared (taking a gate lock first, so that a waiting timing test goes before the next test). The
    timing tests come last (above): by then the other workers are finishing their last tests."""
    if not XDIST_WORKER:
        yield
        return
    root = _worker_root(item.config)
    exclusive = bool(item.get_closest_marker("timing"))
    with _flock(root / "timing.gate", fcntl.LOCK_EX):
        held = _flock(root / "timing.lock", fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        held.__enter__()
    try:
        yield
    finally:
        held.__exit__(None, None, None)


def _worker_root(config) -> Path:
    """The folder all workers of this run share: the parent of each worker's basetemp (pytest-N/popen-gwK)."""
    return config._tmp_path_factory.getbasetemp().parent


@contextlib.contextmanager
def _flock(path: Path, how: int) -> Iterator[None]:
    with open(path, "a") as handle:
        fcntl.flock(handle, how)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def built_once(tmp_path_factory, name: str, build: Callable[[Path], None]) -> Path:
    """A folder that `build(folder)` fills once per test run: under xdist in a folder all workers share, the
    first worker to ask builds it while the others wait on a file lock. A build that failed is retried."""
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if XDIST_WORKER else base) / "shared" / name  # the xdist docs' way
    folder.parent.mkdir(parents=True, exist_ok=True)
    done = folder.with_name(f"{name}.done")
    from filelock import FileLock

    with FileLock(str(folder.with_name(f"{name}.lock"))):
        if not done.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            with tiers.unwatched():
                build(folder)
            done.touch()
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from qctrain.tiny import write_tiny_model

    return built_once(tmp_path_factory, "tiny-phi3", write_tiny_model)


@pytest.fixture(scope="session")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


# --- shared runs (see the top of this file) ---

HUB_ID = "qctest/tiny-phi3"  # hub_run's base, as the HF cache holds it


def qctrain_in(*args: str, cwd: Path, env: dict | None = None, umask: int | None = None,
               timeout: int = 600) -> subprocess.CompletedProcess:
    """`qctrain ARGS` run from `cwd` (this checkout's code, offline), optionally under a umask."""
    def preexec():
        if umask is not None:
            os.umask(umask)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO / "entrypoint"), **(env or {})}
    return subprocess.run([sys.executable, "-m", "qctrain", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env, preexec_fn=preexec)


def offline_env(root: Path) -> dict[str, str]:
    """No Hub credentials or tracker settings from outside, HF_HUB_OFFLINE=1, HF_HOME and HOME under `root`."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "WANDB_", "MLFLOW_", "TRACKIO_", "DO_NOT_TRACK"))}
    # telemetry left at its defaults on purpose: HF_HUB_OFFLINE alone must keep everything local
    env.update(HF_HOME=str(root / "hf"), HF_HUB_OFFLINE="1", HOME=str(root / "home"),
               PYTHONPATH=str(REPO / "entrypoint"), QCTRAIN_MIN_FREE_BYTES="0")
    return env


def work_folder(work: Path, model: str, out: str, records: int, eval_: dict, **train) -> Path:
    """A user's work folder: data/train.json and a recipe with paths relative to the folder; the recipe's path."""
    write_json(work / "data" / "train.json", alpaca_records(records))
    recipe = {
        "model": {"name": model, "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True,
                                                  "compute_dtype": "float32"}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"sources": [{"path": "data/train.json"}], "eval": eval_, "max_seq_length": 256},
        "train": {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1.0e-2,
                  "logging_steps": 1, "save_steps": 100, "gradient_checkpointing": False, **train},
        "output": {"dir": out, "gguf": True},
    }
    path = work / f"{Path(out).name}.yaml"
    path.write_text(yaml.safe_dump(recipe), encoding="utf-8")
    return path


def save_result(path: Path, done: subprocess.CompletedProcess) -> None:
    write_json(path, {"returncode": done.returncode, "stdout": done.stdout, "stderr": done.stderr})


def load_result(path: Path) -> SimpleNamespace:
    return SimpleNamespace(**json.loads(path.read_text(encoding="utf-8")))


@pytest.fixture(scope="session")
def finished_run(tiny_model_dir, tmp_path_factory) -> SimpleNamespace:
    def build(root: Path) -> None:
        work = root / "work"
        shutil.copytree(tiny_model_dir, work / "models" / "tiny")
        recipe = work_folder(work, "models/tiny", "out/run", 48, {"fraction": 0.1}, max_steps=16,
                             eval_strategy="steps", eval_steps=8, report_to="tensorboard")
        # a strict umask: the outputs are made readable all the same
        save_result(root / "train.json", qctrain_in("train", recipe.name, cwd=work, umask=0o077))

    root = built_once(tmp_path_factory, "finished-run", build)
    result = load_result(root / "train.json")
    assert result.returncode == 0, result.stderr[-3000:]
    return run_paths(root / "work", stdout=result.stdout, stderr=result.stderr)


def run_paths(work: Path, **more) -> SimpleNamespace:
    return SimpleNamespace(work=work, recipe=work / "run.yaml", out=work / "out" / "run",
                           model=work / "models" / "tiny", **more)


def copy_run(run: SimpleNamespace, dest: Path) -> SimpleNamespace:
    """A private copy of a shared run's work folder: its relative recipe trains, prepares and exports into the
    copy. (The copied adapter still names the original base model by its absolute path.)"""
    shutil.copytree(run.work, dest, symlinks=True)
    return run_paths(dest)


@pytest.fixture(scope="session")
def merged_run(finished_run, tmp_path_factory) -> SimpleNamespace:
    """`qctrain merge OUT --dest merged --dtype float32`, run from another folder."""
    def build(root: Path) -> None:
        save_result(root / "merge.json", qctrain_in("merge", str(finished_run.out), "--dest", "merged",
                                                    "--dtype", "float32", cwd=root))

    root = built_once(tmp_path_factory, "merged-run", build)
    result = load_result(root / "merge.json")
    assert result.returncode == 0, result.stderr[-3000:]
    return SimpleNamespace(elsewhere=root, dest=root / "merged", result=result)


@pytest.fixture(scope="session")
def hub_cached_run(tiny_model_dir, tmp_path_factory) -> SimpleNamespace:
    from isolation import attempts, isolated

    def build(root: Path) -> None:
        base = root / "base"
        shutil.copytree(tiny_model_dir, base)
        (base / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
        fill_hub_cache(root / "hf" / "hub", HUB_ID, base)
        work = root / "work"
        recipe = work_folder(work, HUB_ID, "out/hub", 24, {"count": 2}, max_steps=6)
        command, run_env = isolated([sys.executable, "-m", "qctrain", "train", recipe.name], offline_env(root),
                                    root / "net-train.log")
        save_result(root / "train.json", subprocess.run(command, capture_output=True, text=True, env=run_env,
                                                        cwd=work, timeout=900))

    root = built_once(tmp_path_factory, "hub-run", build)
    result = load_result(root / "train.json")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    return SimpleNamespace(root=root, work=root / "work", out=root / "work" / "out" / "hub", hf_home=root / "hf",
                           snapshot=hub_snapshot(root / "hf" / "hub", HUB_ID), env=offline_env(root), result=result,
                           attempts=attempts(root / "net-train.log"))


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

    snapshot = hub_snapshot(hub_cache, repo_id)
    repo, commit = snapshot.parents[1], snapshot.name
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


def hub_snapshot(hub_cache: Path, repo_id: str) -> Path:
    """Where fill_hub_cache puts a repo's files (its commit: a hash of the id)."""
    import hashlib

    return (hub_cache / f"models--{repo_id.replace('/', '--')}" / "snapshots"
            / hashlib.sha1(repo_id.encode()).hexdigest())


def snapshot(root: Path) -> dict[str, tuple]:
    """Every entry under root: its mode, and a file's bytes (a link: its target)."""
    found = {}
    for path in sorted([root, *root.rglob("*")]):
        info = path.lstat()
        content = (os.readlink(path) if path.is_symlink() else path.read_bytes() if path.is_file() else None)
        found[str(path.relative_to(root))] = (stat.S_IMODE(info.st_mode), stat.S_IFMT(info.st_mode), content)
    return found


def foreign_home(root: Path) -> Path:
    """A folder like a home: a private key, an executable, files shaped like our temporary names."""
    (root / ".ssh").mkdir(parents=True)
    (root / ".ssh").chmod(0o700)
    (root / ".ssh" / "id_rsa").write_text("-----BEGIN PRIVATE KEY-----\n")
    (root / ".ssh" / "id_rsa").chmod(0o600)
    (root / "bin").mkdir()
    (root / "bin" / "tool").write_text("#!/bin/sh\necho hi\n")
    (root / "bin" / "tool").chmod(0o750)
    (root / ".notes.tmp").write_text("my notes")
    (root / ".staging-notes").mkdir()
    (root / ".staging-notes" / "draft.txt").write_text("draft")
    return root


def gone(pids: list[int], timeout: float = 15) -> list[int]:
    """The pids still running (zombies count as gone) after up to `timeout` seconds."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)

