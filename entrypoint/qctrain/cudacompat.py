"""CUDA forward compatibility: whether this process must load the image's compat libcuda instead of the host's.

The image's CUDA runtime (torch's CUDA 13 wheels) needs an R580+ driver. Datacenter GPUs on an older driver
branch that NVIDIA supports for forward compatibility run it through the compat libraries of the CUDA base
image (/usr/local/cuda/compat: a libcuda.so.580.x and its companions). NVIDIA's rule, as its container
toolkit applies it (the enable-cuda-compat hook; libnvidia-container's compat filter): use them when, and
only when, their major version is newer than the host driver's. Forward compatibility is not supported on
GeForce and RTX workstation GPUs, and only on the branches NVIDIA lists for the compat package.

`decide(facts)` is the rule, a pure function; `gather()` reads the facts of this host; `python -m
qctrain.cudacompat exec -- CMD...` (the image's entrypoint, docker/entrypoint.sh) applies the verdict to
LD_LIBRARY_PATH and execs CMD, before anything has loaded libcuda. `train` and `doctor` call
`check_driver()`, which turns an unusable host into one line and exit 3.
Nothing here imports torch: the entrypoint runs before every command.
"""

from __future__ import annotations

import enum
import glob
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from qctrain.errors import ExitCode, QcError

COMPAT_DIR = "/usr/local/cuda/compat"
MODE_ENV = "QCTRAIN_CUDA_COMPAT"  # auto (default) | off | force
COMPAT_DIR_ENV = "QCTRAIN_CUDA_COMPAT_DIR"
# The oldest driver branch each CUDA major version runs on natively (NVIDIA's minor version compatibility).
NATIVE_DRIVER = {12: 525, 13: 580}
# The driver branches each compat package (by its own major version) supports: the brand clauses of the
# NVIDIA_REQUIRE_CUDA that NVIDIA's CUDA 13.0 base images carry (docker/Dockerfile repeats them).
COMPAT_BRANCHES = {580: (535, 550, 565, 570, 575)}


class Verdict(enum.Enum):
    NO_DRIVER = "no NVIDIA driver"  # no GPU here: nothing to decide
    NO_CUDA_RUNTIME = "no CUDA runtime"  # a CPU build of torch
    NATIVE = "host driver"  # the host's libcuda is new enough
    TOOLKIT = "compat, by the container toolkit"  # the NVIDIA Container Toolkit already put the compat libs first
    APPLIED = "compat, applied"  # LD_LIBRARY_PATH already starts with the compat dir
    USE_COMPAT = "compat, to apply"  # the entrypoint must put the compat dir first
    UNSUPPORTED = "unsupported"  # the driver is too old and forward compatibility cannot help


@dataclass(frozen=True)
class Facts:
    driver: str | None = None  # the host driver's version, "550.54.15"
    gpus: tuple[str, ...] = ()  # GPU names, as nvidia-smi prints them (empty: unknown)
    runtime_cuda: str | None = None  # the CUDA version torch was built for, "13.0"
    compat_dir: str = COMPAT_DIR
    compat_version: str | None = None  # the version of the compat libcuda, "580.82.07"; None: no compat libs
    toolkit_dirs: tuple[str, ...] = ()  # folders named by /etc/ld.so.conf.d/00-compat-*.conf (toolkit hook)
    loader_libcuda: str | None = None  # the file ld.so.cache resolves libcuda.so.1 to (toolkit mount mode)
    ld_library_path: str = ""
    mode: str = "auto"


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    reason: str  # one line: what was found and why
    driver_needed: int | None = None  # the oldest driver branch this image's CUDA runtime runs on natively
    ld_library_path: str | None = None  # the value to exec with (None: leave it as it is)

    @property
    def usable(self) -> bool:
        return self.verdict is not Verdict.UNSUPPORTED


def major(version: str | None) -> int | None:
    match = re.match(r"\s*(\d+)", version or "")
    return int(match.group(1)) if match else None


def gpu_class(name: str) -> str:
    """datacenter, geforce or workstation (RTX/Quadro): forward compatibility serves only the first."""
    lowered = name.lower()
    if "geforce" in lowered or "titan" in lowered:
        return "geforce"
    if "quadro" in lowered or ("rtx" in lowered and "server edition" not in lowered):
        return "workstation"
    return "datacenter"


def _path_entries(value: str) -> list[str]:
    return [entry for entry in value.split(":") if entry]


def _same_dir(a: str, b: str) -> bool:
    return os.path.normpath(a) == os.path.normpath(b)


def without_compat(ld_library_path: str, compat_dir: str) -> str:
    return ":".join(e for e in _path_entries(ld_library_path) if not _same_dir(e, compat_dir))


def _toolkit_active(facts: Facts) -> bool:
    """The NVIDIA Container Toolkit put the compat libs first already: its hook (ldconfig mode) named the compat
    dir in /etc/ld.so.conf.d/00-compat-*.conf, or libnvidia-container (mount mode) mounted the compat libcuda
    over the driver's, so the loader's libcuda.so.1 has the compat version."""
    if any(_same_dir(d, facts.compat_dir) for d in facts.toolkit_dirs):
        return True
    loaded = Path(facts.loader_libcuda or "").name
    return bool(facts.compat_version) and loaded == f"libcuda.so.{facts.compat_version}"


def _why_compat_cannot(facts: Facts, driver_major: int, compat_major: int) -> str | None:
    """Why forward compatibility does not apply here (None: it does)."""
    if compat_major <= driver_major:
        return f"the image's forward-compatibility libraries ({facts.compat_version}) are not newer than the driver"
    others = [name for name in facts.gpus if gpu_class(name) != "datacenter"]
    if others:
        return (f"forward compatibility does not apply to {others[0]} (it serves datacenter GPUs, "
                "not GeForce or RTX workstation cards)")
    branches = COMPAT_BRANCHES.get(compat_major)
    if branches and driver_major not in branches:
        listed = ", ".join(f"R{b}" for b in branches)
        return f"forward compatibility supports the driver branches {listed}, not R{driver_major}"
    return None


def decide(facts: Facts) -> Decision:
    """The verdict for these facts (see the module docstring); pure."""
    if not facts.driver:
        return Decision(Verdict.NO_DRIVER, "no NVIDIA driver on this host")
    cuda_major = major(facts.runtime_cuda)
    if cuda_major is None:
        return Decision(Verdict.NO_CUDA_RUNTIME, f"driver {facts.driver}; torch is a CPU build")
    compat_major = major(facts.compat_version)
    needed = NATIVE_DRIVER.get(cuda_major) or compat_major or 0
    driver_major = major(facts.driver) or 0
    found = f"driver {facts.driver}, CUDA {facts.runtime_cuda} runtime needs R{needed}+"
    if driver_major >= needed:
        cleaned = without_compat(facts.ld_library_path, facts.compat_dir)  # compat libs on a newer driver: error 803
        return Decision(Verdict.NATIVE, f"{found}: the host driver serves it", needed,
                        cleaned if cleaned != facts.ld_library_path else None)
    if facts.mode == "off":
        why = f"{MODE_ENV}=off"
    elif compat_major is None:
        why = f"this image has no forward-compatibility libraries ({facts.compat_dir})"
    else:
        why = None if facts.mode == "force" else _why_compat_cannot(facts, driver_major, compat_major)
    if why:
        return Decision(Verdict.UNSUPPORTED,
                        f"the NVIDIA driver {facts.driver} is older than R{needed}, which this image's CUDA "
                        f"{facts.runtime_cuda} runtime needs, and {why}: install driver {needed} or newer on the host",
                        needed)
    how = f"{found}: forward compatibility with {facts.compat_dir} ({facts.compat_version})"
    if _toolkit_active(facts):
        return Decision(Verdict.TOOLKIT, f"{how}, set up by the NVIDIA Container Toolkit", needed)
    entries = _path_entries(facts.ld_library_path)
    if entries and _same_dir(entries[0], facts.compat_dir):
        return Decision(Verdict.APPLIED, how, needed)
    rest = without_compat(facts.ld_library_path, facts.compat_dir)
    return Decision(Verdict.USE_COMPAT, how, needed, ":".join(filter(None, [facts.compat_dir, rest])))


# --- the facts of this host ---

def driver_version(root: Path, run: Callable[[list[str]], str | None]) -> str | None:
    """The kernel module's version (/proc/driver/nvidia/version), else nvidia-smi's."""
    try:
        text = (root / "proc/driver/nvidia/version").read_text(errors="replace")
    except OSError:
        text = ""
    match = re.search(r"Kernel Module(?: for \S+)?\s+(\d+\.\d+(?:\.\d+)?)", text)
    if match:
        return match.group(1)
    out = run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    return out.splitlines()[0].strip() if out and out.strip() else None


def gpu_names(run: Callable[[list[str]], str | None]) -> tuple[str, ...]:
    out = run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]) or ""
    return tuple(line.strip() for line in out.splitlines() if line.strip())


def torch_cuda_version() -> str | None:
    """torch.version.cuda, read from torch/version.py without importing torch (seconds saved per start)."""
    import importlib.util

    spec = importlib.util.find_spec("torch")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        try:
            text = (Path(folder) / "version.py").read_text()
        except OSError:
            continue
        match = re.search(r"^cuda\b[^=\n]*=\s*['\"]([\d.]+)['\"]", text, re.MULTILINE)
        return match.group(1) if match else None
    return None


def compat_version(compat_dir: Path) -> str | None:
    """The version of the compat libcuda (libcuda.so.580.82.07 -> 580.82.07)."""
    versions = [Path(p).name[len("libcuda.so."):] for p in glob.glob(str(compat_dir / "libcuda.so.*.*"))]
    return max(versions, key=lambda v: [int(x) for x in re.findall(r"\d+", v)]) if versions else None


def toolkit_conf_dirs(root: Path) -> tuple[str, ...]:
    dirs: list[str] = []
    for conf in sorted((root / "etc/ld.so.conf.d").glob("00-compat-*.conf")):
        try:
            dirs += [line.strip() for line in conf.read_text().splitlines() if line.strip()]
        except OSError:
            continue
    return tuple(dirs)


def loader_libcuda(root: Path, run: Callable[[list[str]], str | None]) -> str | None:
    """The file the dynamic loader's cache resolves libcuda.so.1 to (symlinks followed)."""
    out = run(["ldconfig", "-p"]) or ""
    match = re.search(r"^\s*libcuda\.so\.1 \([^)]*x86-64[^)]*\) => (\S+)", out, re.MULTILINE) \
        or re.search(r"^\s*libcuda\.so\.1 \([^)]*\) => (\S+)", out, re.MULTILINE)
    if not match:
        return None
    path = root / match.group(1).lstrip("/")
    return os.path.realpath(path) if path.exists() else match.group(1)


def run_tool(command: list[str], timeout: float = 20) -> str | None:
    """A tool's stdout, or None when it is missing or fails."""
    if shutil.which(command[0]) is None and command[0] == "ldconfig" and os.path.exists("/sbin/ldconfig"):
        command = ["/sbin/ldconfig", *command[1:]]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout if done.returncode == 0 else None


def gather(root: Path = Path("/"), env: Mapping[str, str] | None = None,
           run: Callable[[list[str]], str | None] = run_tool, full: bool = False) -> Facts:
    """This host's facts. GPU names and the loader cache are read only when the driver is too old (or `full`):
    nvidia-smi can take seconds, and this runs before every command."""
    env = os.environ if env is None else env
    compat_dir = env.get(COMPAT_DIR_ENV) or COMPAT_DIR
    facts = Facts(driver=driver_version(root, run), runtime_cuda=torch_cuda_version(), compat_dir=compat_dir,
                  compat_version=compat_version(root / compat_dir.lstrip("/")),
                  ld_library_path=env.get("LD_LIBRARY_PATH", ""),
                  mode=(env.get(MODE_ENV) or "auto").strip().lower())
    needed = NATIVE_DRIVER.get(major(facts.runtime_cuda) or 0, 0)
    if facts.driver and (full or (major(facts.driver) or 0) < needed):
        facts = replace(facts, gpus=gpu_names(run), toolkit_dirs=toolkit_conf_dirs(root),
                        loader_libcuda=loader_libcuda(root, run))
    return facts


def check_driver() -> Decision:
    """For `train` and `doctor`: the decision for this process; an unusable driver is an environment error
    (exit 3), and so is a process started without the entrypoint's compat setup where it needed it."""
    decision = decide(gather())
    if decision.verdict is Verdict.UNSUPPORTED:
        raise QcError(decision.reason, ExitCode.ENVIRONMENT)
    if decision.verdict is Verdict.USE_COMPAT:
        raise QcError(f"{decision.reason}, but this process was started without it: start it through the image's "
                      f"entrypoint (docker/entrypoint.sh) or with LD_LIBRARY_PATH={decision.ld_library_path}",
                      ExitCode.ENVIRONMENT)
    return decision


# --- the entrypoint step ---

def _exec(command: list[str], env: Mapping[str, str]) -> int:
    try:
        os.execvpe(command[0], command, dict(env))
    except OSError as err:
        print(f"qctrain-entrypoint: cannot run {command[0]}: {err.strerror or err}", file=sys.stderr)
        return 127
    return 0  # not reached


def main(argv: list[str] | None = None) -> int:
    """`exec -- CMD...`: apply the verdict, then exec CMD (the image's entrypoint). `facts`: print this host's
    facts and the verdict as JSON (bench/gpu_host_check.sh). --root DIR (before the action) reads the host's
    files under another root (tests)."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m qctrain.cudacompat")
    parser.add_argument("action", choices=["exec", "facts"])
    parser.add_argument("--root", type=Path, default=Path("/"))
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if args.action == "facts":
        facts = gather(args.root, full=True)
        decision = decide(facts)
        print(json.dumps({"facts": asdict(facts), "verdict": decision.verdict.name, "reason": decision.reason,
                          "driver_needed": decision.driver_needed, "ld_library_path": decision.ld_library_path},
                         indent=2))
        return 0
    if not command:
        parser.error("exec needs a command: exec -- CMD [ARGS...]")
    env = dict(os.environ)
    decision = decide(gather(args.root, env))
    if decision.ld_library_path is not None:
        env["LD_LIBRARY_PATH"] = decision.ld_library_path
    if decision.verdict is Verdict.USE_COMPAT:
        print(f"qctrain: {decision.reason}", file=sys.stderr)
    return _exec(command, env)


if __name__ == "__main__":
    raise SystemExit(main())
