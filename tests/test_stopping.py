"""Every stage stops the same way: SIGTERM/SIGINT ends the command with exit 75 within seconds, one line on stderr,
no process left behind and nothing half-written in place.

The end-to-end part signals `train` and `prepare` while their forked data workers run (a 60,000-record file,
the signal sent once the workers exist), side by side in one module fixture; `prepare` gets a second signal
while it stops. The other stages' behaviour is checked in-process on StopOnSignal itself.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
from conftest import REPO, gone, write_recipe

RECORDS = 60_000  # ~6 s of preparation on 2 cores: the workers are busy when the signal comes
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "QCTRAIN_PREP_WORKERS": "2",
       "PYTHONPATH": str(REPO / "entrypoint")}


def start(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "qctrain", *args], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def workers_of(proc: subprocess.Popen) -> list[int] | None:
    """The pids of the process's forked data workers once there are two; None before."""
    if proc.poll() is not None:
        raise AssertionError(f"ended (rc {proc.returncode}) before its workers ran: {proc.communicate()}")
    children = psutil.Process(proc.pid).children(recursive=True)
    return [child.pid for child in children] if len(children) >= 2 else None


def signal_once_workers_run(runs: dict, timeout: float = 300) -> None:
    """Each run gets its first signal as soon as its own data workers run (neither waits for the other: `prepare`
    can be through its data before `train` has imported TRL), and any further one 0.3 s after the one before."""
    waiting = dict(runs)
    deadline = time.monotonic() + timeout
    while waiting:
        if time.monotonic() > deadline:
            raise AssertionError(f"no data workers within the timeout: {', '.join(waiting)}")
        for run in runs.values():  # one already stopped is timed now, not once the other is signalled
            if hasattr(run, "signalled") and not hasattr(run, "seconds") and run.proc.poll() is not None:
                run.seconds = time.monotonic() - run.signalled
        for command, run in list(waiting.items()):
            if not hasattr(run, "signalled"):
                if (workers := workers_of(run.proc)) is None:
                    continue
                run.workers, run.signalled, run.sent = workers, time.monotonic(), 0
            if run.sent < len(run.signals) and time.monotonic() >= run.signalled + 0.3 * run.sent:
                run.proc.send_signal(run.signals[run.sent])
                run.sent += 1
            if run.sent == len(run.signals):
                del waiting[command]
        time.sleep(0.05)


@pytest.fixture(scope="module")
def stopped(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("stopping")
    data = root / "data.jsonl"
    with open(data, "w", encoding="utf-8") as handle:
        for i in range(RECORDS):
            handle.write(json.dumps({"instruction": f"Say the number {i}.", "input": "", "output": f"{i}"}) + "\n")
    runs = {}
    for command, signals in (("train", [signal.SIGTERM]), ("prepare", [signal.SIGINT, signal.SIGTERM])):
        recipe = write_recipe(root / f"{command}.yaml", tiny_model_dir, data, root / command,
                              data={"eval": None, "max_seq_length": 64})
        runs[command] = SimpleNamespace(proc=start(command, str(recipe)), signals=signals, out=root / command)
    signal_once_workers_run(runs)  # prepare: a second signal while the first unwinds
    deadline = time.monotonic() + 120
    while any(run.proc.poll() is None for run in runs.values()) and time.monotonic() < deadline:
        for run in runs.values():
            if run.proc.poll() is not None and not hasattr(run, "seconds"):
                run.seconds = time.monotonic() - run.signalled
        time.sleep(0.05)
    for run in runs.values():
        if not hasattr(run, "seconds"):
            run.seconds = time.monotonic() - run.signalled
        run.stdout, run.stderr = run.proc.communicate(timeout=10)
        run.left = gone([run.proc.pid, *run.workers], timeout=2)
    return runs


@pytest.mark.parametrize("command", ["train", "prepare"])
def test_a_signal_in_the_data_stage_exits_75_within_seconds(stopped, command):
    run = stopped[command]
    print(f"{command}: exit {run.proc.returncode} {run.seconds:.1f} s after the signal")
    assert run.proc.returncode == 75, run.stderr[-3000:]
    assert run.seconds < 15, run.seconds
    name = signal.Signals(run.signals[0]).name
    assert run.stderr.splitlines() == [f"qctrain: error: stopped by {name} while preparing the data; nothing "
                                       "half-written was kept; rerun the same command to continue"]


@pytest.mark.parametrize("command", ["train", "prepare"])
def test_no_process_is_left_and_nothing_half_written(stopped, command):
    run = stopped[command]
    assert run.left == []
    prepared = run.out / "prepared"
    assert not prepared.exists() or list(prepared.iterdir()) == []  # the unfinished cache folder is gone
    assert not (run.out / ".qctrain.lock").exists()


def test_worker_init_leaves_signals_to_the_parent_and_dies_with_it(tmp_path):
    """A forked worker whose parent is SIGKILLed (no clean-up of any kind) dies too (Linux: PR_SET_PDEATHSIG)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux's")
    script = (
        "import json, time, psutil\n"
        "from qctrain.data.workers import pool as worker_pool\n"
        "with worker_pool(1) as pool:\n"
        "    pool.apply_async(time.sleep, (60,))\n"
        "    time.sleep(0.5)\n"
        "    print(json.dumps([child.pid for child in psutil.Process().children()]), flush=True)\n"
        "    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE, text=True)
    workers = json.loads(proc.stdout.readline())
    assert workers
    proc.kill()
    proc.wait()
    assert gone(workers, timeout=10) == []


# --- the other stages, in-process ---

def test_stop_on_signal_before_training_during_and_after():
    from qctrain.errors import Preempted
    from qctrain.signals import StopOnSignal

    with StopOnSignal() as stop:  # a stage where nothing is worth saving: raises at once, naming the stage
        stop.stage = "while loading the model; nothing to save"
        with pytest.raises(Preempted, match="stopped by SIGTERM while loading the model; nothing to save; rerun"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
        os.kill(os.getpid(), signal.SIGINT)  # a second signal while unwinding: no exception, no line
        time.sleep(0.1)
    with StopOnSignal() as stop:  # training and export: only recorded ...
        stop.defer = True
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.1)
        stop.stage = "during the push; outputs complete in out, not pushed"
        with pytest.raises(Preempted, match="stopped by SIGTERM during the push"):
            stop.interrupt_now()  # ... and raised where the push would start


def test_release_ignores_signals_after_a_stop_and_restores_otherwise():
    from qctrain.errors import Preempted
    from qctrain.signals import StopOnSignal

    previous = signal.getsignal(signal.SIGTERM)
    StopOnSignal().__enter__().release()
    assert signal.getsignal(signal.SIGTERM) is previous
    stop = StopOnSignal().__enter__()
    try:
        with pytest.raises(Preempted):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        stop.release()
    try:  # on its way out with exit 75: a launcher's follow-up SIGTERM changes nothing
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
        os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, previous)
        signal.signal(signal.SIGINT, signal.default_int_handler)


def test_main_reports_a_signal_in_any_command_as_one_line_and_75(monkeypatch, capsys, tmp_path):
    from qctrain import cli

    def push_again(output_dir: Path) -> int:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
        return 0

    monkeypatch.setattr("qctrain.publish.push_again", push_again)
    previous = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        assert cli.main(["push", str(tmp_path)]) == 75
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    assert capsys.readouterr().err == ("qctrain: error: stopped by SIGTERM in `qctrain push`; nothing half-written "
                                       "was kept; rerun the same command to continue\n")
