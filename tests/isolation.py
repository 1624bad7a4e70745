"""Run a command with no network: the Python guard (tests/netguard/sitecustomize.py) always, and as root also in
a fresh network namespace (unshare -n, loopback up), where even non-Python code (wandb's Go service, C
libraries) finds no route out. `isolated(cmd, env, log)` returns the command and environment to run."""

import os
import shutil
import sys
from pathlib import Path

GUARD = Path(__file__).resolve().parent / "netguard"
LO_UP = ("import fcntl, os, socket, struct, sys; "
         "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); "
         "fcntl.ioctl(s, 0x8914, struct.pack('16sH', b'lo', 0x1 | 0x40)); "  # SIOCSIFFLAGS: IFF_UP | IFF_RUNNING
         "os.execvp(sys.argv[1], sys.argv[1:])")


def can_unshare() -> bool:
    return os.getuid() == 0 and shutil.which("unshare") is not None


def isolated(command: list[str], env: dict[str, str], log: Path) -> tuple[list[str], dict[str, str]]:
    env = {**env, "QCTRAIN_NETGUARD_LOG": str(log),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(GUARD), env.get("PYTHONPATH", "")]))}
    if can_unshare():
        command = ["unshare", "--net", "--", sys.executable, "-c", LO_UP, *command]
    return command, env


def attempts(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []
