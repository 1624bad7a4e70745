"""Scaling out: one run over several processes, GPUs or nodes, on launchers people already run.

Worker side: under `torchrun`, `accelerate launch` or `qctrain train --nproc N`, every process (rank)
runs the whole `qctrain train`. This module decides who does what:

- the rank facts come from the launcher's environment (RANK, WORLD_SIZE, LOCAL_RANK), so they hold
  before the process group exists; `ensure_process_group` creates it the way the Trainer will
  (accelerate's PartialState: NCCL on GPUs, gloo on CPUs);
- `main_process_first`: the data is prepared once. Global rank 0 prepares it while the others wait;
  then the first rank of every other node (a cache hit where output.dir is shared, as it must be for
  several nodes); then everybody else reads the cache;
- `check_same_run`: every rank prepared the same data and resumes from the same step;
- the caller lets rank 0 alone write the outputs and push (see cli.py).

Launcher side: `qctrain train --nproc N|auto` execs `python -m qctrain.distributed`, which is torchrun
(torch.distributed.run, same arguments) with two differences that matter for preemption:

- SIGTERM/SIGINT are forwarded to the workers at once and no kill deadline is set: each worker finishes
  its step, saves its part of the checkpoint and exits 75. (torchrun itself sends SIGKILL 30 s after
  forwarding, and exits 1 whatever the workers did.) The orchestrator's grace period is the deadline.
- The exit code is the workers' (75 preempted, 2 bad input, 4 not pushed, ...), not torchrun's 1, so
  Kubernetes' podFailurePolicy and `docker run` scripts read the same codes as for one process.

Multi-node: torchrun reads its rendezvous settings from PET_* variables (PET_NNODES, PET_NODE_RANK,
PET_MASTER_ADDR, PET_MASTER_PORT, or PET_RDZV_ENDPOINT...), the ones Kubeflow Trainer sets; when one of
them is set, `--standalone` is left out and torchrun rendezvouses as they say.
"""

import contextlib
import os
import signal
import sys
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from qctrain.console import say
from qctrain.errors import ExitCode, InputError, Preempted, QcError

# Any of these in the environment: a multi-node rendezvous is configured (torchrun reads PET_<FLAG>).
RENDEZVOUS_ENV = ("PET_NNODES", "PET_MASTER_ADDR", "PET_RDZV_ENDPOINT")
FORWARDED_SIGNALS = (signal.SIGTERM, signal.SIGINT)
# The signals torchrun itself still handles (forwards, then SIGKILLs after its shutdown timeout).
TORCHRUN_SIGNALS = "SIGHUP,SIGQUIT"


# --- rank facts (valid before the process group exists) ---

def _env_int(name: str, default: int, env: Mapping[str, str] | None = None) -> int:
    value = (os.environ if env is None else env).get(name, "")
    try:
        return int(value)
    except ValueError:
        return default


def world_size(env: Mapping[str, str] | None = None) -> int:
    return _env_int("WORLD_SIZE", 1, env)


def rank(env: Mapping[str, str] | None = None) -> int:
    return _env_int("RANK", 0, env)


def local_rank(env: Mapping[str, str] | None = None) -> int:
    return _env_int("LOCAL_RANK", 0, env)


def is_main() -> bool:
    """Global rank 0: prepares the data first, writes the outputs, pushes."""
    return rank() == 0


def is_local_main() -> bool:
    return local_rank() == 0


def under_launcher(env: Mapping[str, str] | None = None) -> bool:
    """This process is one rank started by torchrun/accelerate (or by `--nproc`)."""
    env = os.environ if env is None else env
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env


def ensure_process_group() -> None:
    """Join the process group now (the Trainer would create it later, the same way)."""
    if world_size() <= 1:
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def _distributed() -> bool:
    import torch.distributed as dist

    return world_size() > 1 and dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if _distributed():
        import torch.distributed as dist

        dist.barrier()


@contextlib.contextmanager
def main_process_first() -> Iterator[None]:
    """Run the body on global rank 0 first, then on the first rank of each other node, then on the rest.

    Every rank passes the same two barriers (B1, B2), in this order:
    rank 0: body, B1, B2 | other nodes' local rank 0: B1, body, B2 | everybody else: B1, B2, body.
    If the body fails (bad data), the barriers are still released: the others then run it themselves,
    meet the same problem and exit with the same message and code.
    """
    if world_size() <= 1:
        yield
        return
    ensure_process_group()
    if not is_main():
        barrier()  # B1: wait for rank 0
    if not is_local_main():
        barrier()  # B2: wait for this node's first rank
    try:
        yield
    finally:
        if is_main():
            barrier()  # B1
            barrier()  # B2
        elif is_local_main():
            barrier()  # B2


def any_rank(flag: bool, device) -> bool:
    """True on every rank if it is true on any (all ranks stop and save at the same step)."""
    if not _distributed():
        return flag
    import torch
    import torch.distributed as dist

    tensor = torch.tensor([1 if flag else 0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def all_gather(value: Any) -> list[Any]:
    if not _distributed():
        return [value]
    import torch.distributed as dist

    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def check_same_run(data_fingerprint: str, resume_step: int) -> None:
    """Every rank must train on the same data and start from the same step (else DDP hangs or worse)."""
    facts = all_gather((data_fingerprint, resume_step))
    if len({f[0] for f in facts}) > 1:
        ranks = ", ".join(f"rank {r}: {f[0][:12]}" for r, f in enumerate(facts))
        raise InputError(f"data: the ranks prepared different data ({ranks}); every node must read the "
                         "same data files")
    if len({f[1] for f in facts}) > 1:
        steps = ", ".join(f"rank {r}: step {f[1]}" for r, f in enumerate(facts))
        raise InputError(f"output.dir: the ranks would resume from different checkpoints ({steps}); with "
                         "several nodes output.dir must be on storage every node shares (a ReadWriteMany "
                         "volume), or set train.save_on_each_node: true")


# --- a lost rank ---

# What gloo and NCCL say when the other end of a collective is gone (its process died or was killed).
PEER_LOST_TEXTS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote process exited",
                   "ncclRemoteError", "NCCL communicator was aborted", "Connection refused")
BACKENDS = ("gloo", "nccl", "NCCL", "c10d", "ProcessGroup", "TCPStore")  # a message from the collectives


def lost_peer(err: BaseException, stopped_by: str | None = None, env: Mapping[str, str] | None = None
              ) -> QcError | None:
    """A collective that failed because another rank is gone, named as such (None: not that, or one process):
    which rank (the other one of two; "another rank" beyond), and that a rerun resumes from the last checkpoint.
    After a stop signal it is the other ranks stopping too: Preempted."""
    size = world_size(env)
    if size <= 1:
        return None
    text = str(err)
    if not (any(part in text for part in PEER_LOST_TEXTS) and any(name in text for name in BACKENDS)):
        return None
    if stopped_by is not None:
        return Preempted(f"stopped by {stopped_by} while the other ranks stopped too; rerun the same command to "
                         "resume from the last complete checkpoint")
    me = rank(env)
    other = f"rank {1 - me}" if size == 2 else "another rank"
    first = text.splitlines()[0] if text else type(err).__name__
    detail = first.split("] ", 1)[-1].split(". ")[0][:120]  # gloo: "[path/pair.cc:553] Connection closed by peer..."
    return QcError(f"rank {me} of {size} lost its connection to {other}: that process died or was stopped "
                   f"({detail}); rerun the same command to resume from the last complete checkpoint",
                   ExitCode.ENVIRONMENT)


# --- FSDP ---

def fsdp_requested(recipe, env: Mapping[str, str] | None = None) -> bool:
    """FSDP from the recipe (train.fsdp) or from `accelerate launch` with an FSDP config."""
    env = os.environ if env is None else env
    return bool(recipe.sft_kwargs().get("fsdp")) or env.get("ACCELERATE_USE_FSDP", "").lower() == "true"


def check_fsdp(recipe, env: Mapping[str, str] | None = None) -> None:
    """FSDP shards every parameter into flat buffers of one dtype: 4-bit weights must be stored in the
    compute dtype (bnb_4bit_quant_storage), and 8-bit layers cannot be sharded."""
    if not fsdp_requested(recipe, env):
        return
    if world_size() <= 1:
        raise InputError("train.fsdp: FSDP shards the model over several processes; run with "
                         "`qctrain train --nproc N|auto`, torchrun or accelerate launch, or drop train.fsdp")
    quant = recipe.model.quantization
    if quant is None:
        return
    if quant.bits != 4:
        raise InputError("model.quantization.bits: FSDP needs 4-bit quantization (8-bit layers cannot be "
                         "sharded); use bits: 4 or DDP")
    if quant.storage_dtype != quant.compute_dtype:
        raise InputError(f"model.quantization.storage_dtype: FSDP needs the 4-bit weights stored in the "
                         f"compute dtype: set storage_dtype: {quant.compute_dtype} "
                         f"(got {quant.storage_dtype or 'uint8, the default'})")


def fsdp_enabled(trainer) -> bool:
    return bool(getattr(trainer, "is_fsdp_enabled", False))


def full_adapter_state(trainer) -> dict | None:
    """Under FSDP, the full (unsharded) state dict for the final save: a collective, so every rank calls
    it; None otherwise (rank 0's unwrapped model holds the whole adapter)."""
    if not fsdp_enabled(trainer):
        return None
    return trainer.accelerator.get_state_dict(trainer.model)  # full, whatever the checkpoints' state_dict_type


# --- launching: `qctrain train --nproc N` ---

def resolve_nproc(value: str) -> int:
    """`auto`: one process per visible GPU (CUDA_VISIBLE_DEVICES applies), 1 without GPUs."""
    if value == "auto":
        import torch

        return max(1, torch.cuda.device_count())
    try:
        count = int(value)
    except ValueError:
        count = 0
    if count < 1:
        raise InputError(f"--nproc {value}: expected a number of processes (1 or more) or auto")
    return count


def strip_option(argv: Sequence[str], option: str) -> list[str]:
    """argv without `option VALUE` / `option=VALUE`."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        elif not arg.startswith(f"{option}="):
            out.append(arg)
    return out


def multi_node(env: Mapping[str, str] | None = None) -> bool:
    env = os.environ if env is None else env
    return any(env.get(name) for name in RENDEZVOUS_ENV)


def launch_command(qctrain_argv: Sequence[str], nproc: int, env: Mapping[str, str] | None = None,
                   python: str | None = None) -> list[str]:
    """The torchrun command line that runs `qctrain <qctrain_argv>` in `nproc` processes on this node."""
    cmd = [python or sys.executable, "-m", "qctrain.distributed", "--nproc-per-node", str(nproc)]
    if not multi_node(env):
        cmd.append("--standalone")  # one node: a private rendezvous on a free local port
    return [*cmd, "-m", "qctrain", *qctrain_argv]


def exec_launcher(qctrain_argv: Sequence[str], nproc: int) -> None:
    """Replace this process with the launcher: the same PID, so SIGTERM from Docker/Kubernetes (via tini)
    reaches it, and it forwards the signal to the workers."""
    cmd = launch_command(qctrain_argv, nproc)
    say(f"qctrain: launching {nproc} processes per node: {' '.join(cmd[3:])}\n")
    sys.stdout.flush()
    os.execv(cmd[0], cmd)


class SignalForwarder:
    """SIGTERM/SIGINT in the launcher: sent on to every worker (each stops after its step, saves and
    exits 75); the launcher keeps waiting for them. Before any worker runs there is nothing to save:
    exit 75 at once."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def install(self) -> "SignalForwarder":
        for sig in FORWARDED_SIGNALS:
            signal.signal(sig, self._handle)
        return self

    @staticmethod
    def workers() -> list[int]:
        import psutil

        return [child.pid for child in psutil.Process().children(recursive=False)]

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        first = self.signum is None
        self.signum = self.signum or signum
        pids = self.workers()
        if not pids:  # nothing to save and nothing to wait for; an exception could be lost in an import
            _say(f"{name} received before the workers started: nothing to save, exiting 75")
            os._exit(int(ExitCode.PREEMPTED))
            return  # (only where os._exit is replaced, in tests)
        if first:
            _say(f"{name} received: forwarded to {len(pids)} workers; each finishes its step, saves the "
                 "checkpoint and exits 75")
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)


def _say(text: str) -> None:
    say(f"qctrain: {text}\n")


def launcher_exit_code(failures: Mapping[int, Any], first_rank: int, signalled: bool) -> int:
    """The launcher's exit code from its failed workers (rank -> exit code; negative: killed by a signal).

    Without a signal the first failure decides (the others were stopped because of it). After a forwarded
    SIGTERM/SIGINT it is 75 (resume by rerunning), unless the first failure said the input is bad (2),
    the environment is broken (3) or the push failed (4).
    """
    first = failures[first_rank]
    decisive = (ExitCode.BAD_INPUT, ExitCode.ENVIRONMENT, ExitCode.NOT_PUSHED)
    if signalled and first not in decisive:
        return int(ExitCode.PREEMPTED)
    return 128 - first if first < 0 else first


def launch(argv: Sequence[str]) -> int:
    """torchrun with signal forwarding and the workers' exit code (see the module docstring)."""
    forwarder = SignalForwarder().install()  # first: a SIGTERM while torch imports still exits 75
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(list(argv))
    args.signals_to_handle = TORCHRUN_SIGNALS  # SIGTERM/SIGINT stay with the forwarder
    try:
        run(args)
    except ChildFailedError as err:
        first_rank, _ = err.get_first_failure()
        codes = {r: f.exitcode for r, f in err.failures.items()}
        code = launcher_exit_code(codes, first_rank, forwarder.signum is not None)
        shown = ", ".join(f"rank {r}: {c}" for r, c in sorted(codes.items()))
        _say(f"worker exit codes ({shown}); exiting {code}")
        return code
    return 0


if __name__ == "__main__":
    raise SystemExit(launch(sys.argv[1:]))
