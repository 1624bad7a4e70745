"""CUDA forward compatibility (qctrain.cudacompat): the decision over fake host facts, the facts read from a fake
host root, the entrypoint step end to end, and the image's NVIDIA_REQUIRE_CUDA against the same rule."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from qctrain import cudacompat
from qctrain.cudacompat import Facts, Verdict, decide, gpu_class
from qctrain.errors import ExitCode, QcError

ROOT = Path(__file__).resolve().parents[1]
COMPAT = "/usr/local/cuda/compat"
H100 = "NVIDIA H100 80GB HBM3"


def facts(**values) -> Facts:
    base = {"driver": "535.183.01", "gpus": (H100,), "runtime_cuda": "13.0", "compat_version": "580.82.07",
            "ld_library_path": "/usr/local/nvidia/lib:/usr/local/nvidia/lib64"}
    return Facts(**{**base, **values})


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", "datacenter"), ("NVIDIA A100-SXM4-80GB", "datacenter"), ("NVIDIA L4", "datacenter"),
    ("NVIDIA A10G", "datacenter"), ("Tesla T4", "datacenter"), ("NVIDIA H200", "datacenter"),
    ("NVIDIA RTX PRO 6000 Blackwell Server Edition", "datacenter"), ("NVIDIA A10-24Q", "datacenter"),
    ("NVIDIA GeForce RTX 4090", "geforce"), ("NVIDIA TITAN RTX", "geforce"),
    ("NVIDIA RTX A6000", "workstation"), ("NVIDIA RTX 6000 Ada Generation", "workstation"),
    ("Quadro RTX 8000", "workstation"),
])
def test_gpu_class(name, expected):
    assert gpu_class(name) == expected


@pytest.mark.parametrize("driver", ["535.183.01", "550.163.01", "565.57.01", "570.172.08", "575.64.05"])
def test_datacenter_gpu_on_a_supported_older_branch_uses_the_compat_libs(driver):
    decision = decide(facts(driver=driver))
    assert decision.verdict is Verdict.USE_COMPAT and decision.usable
    assert decision.ld_library_path == f"{COMPAT}:/usr/local/nvidia/lib:/usr/local/nvidia/lib64"
    assert decision.driver_needed == 580
    assert driver in decision.reason and "580.82.07" in decision.reason


@pytest.mark.parametrize("driver", ["580.65.06", "580.95.05", "590.44.01"])
def test_a_new_enough_driver_runs_natively_and_nothing_is_changed(driver):
    decision = decide(facts(driver=driver))
    assert decision.verdict is Verdict.NATIVE
    assert decision.ld_library_path is None  # LD_LIBRARY_PATH left exactly as it is


def test_a_new_driver_drops_compat_libs_someone_put_first():
    # compat libs with a driver newer than they are fail with error 803: the host's libcuda must load
    decision = decide(facts(driver="580.95.05", ld_library_path=f"{COMPAT}/:/usr/local/nvidia/lib"))
    assert decision.verdict is Verdict.NATIVE and decision.ld_library_path == "/usr/local/nvidia/lib"


def test_toolkit_hook_ldconfig_mode_means_nothing_is_done_twice():
    decision = decide(facts(toolkit_dirs=("/usr/local/cuda-13.0/compat/../compat", "/usr/local/cuda/compat")))
    assert decision.verdict is Verdict.TOOLKIT and decision.ld_library_path is None
    assert "Container Toolkit" in decision.reason


def test_toolkit_mount_mode_detected_from_the_loader_cache():
    decision = decide(facts(loader_libcuda="/usr/lib/x86_64-linux-gnu/libcuda.so.580.82.07"))
    assert decision.verdict is Verdict.TOOLKIT and decision.ld_library_path is None
    host_lib = decide(facts(loader_libcuda="/usr/lib/x86_64-linux-gnu/libcuda.so.535.183.01"))
    assert host_lib.verdict is Verdict.USE_COMPAT


def test_compat_already_first_in_ld_library_path_is_left_alone():
    decision = decide(facts(ld_library_path=f"{COMPAT}:/usr/local/nvidia/lib"))
    assert decision.verdict is Verdict.APPLIED and decision.ld_library_path is None


def test_compat_elsewhere_in_the_path_moves_first_once():
    decision = decide(facts(ld_library_path=f"/a:{COMPAT}:/b"))
    assert decision.ld_library_path == f"{COMPAT}:/a:/b"
    assert decide(facts(ld_library_path="")).ld_library_path == COMPAT


@pytest.mark.parametrize("gpu", ["NVIDIA GeForce RTX 4090", "NVIDIA RTX A6000"])
def test_geforce_and_rtx_workstation_on_an_old_driver_is_one_line_with_found_and_needed(gpu):
    decision = decide(facts(driver="550.54.15", gpus=(gpu,)))
    assert decision.verdict is Verdict.UNSUPPORTED and not decision.usable
    assert "\n" not in decision.reason
    assert "550.54.15" in decision.reason and "R580" in decision.reason and gpu in decision.reason
    assert decision.reason.endswith("install driver 580 or newer on the host")


def test_a_mixed_node_with_one_geforce_is_unsupported():
    assert decide(facts(gpus=(H100, "NVIDIA GeForce RTX 3090"))).verdict is Verdict.UNSUPPORTED


def test_geforce_on_a_new_driver_is_fine():
    assert decide(facts(driver="580.76.05", gpus=("NVIDIA GeForce RTX 5090",))).verdict is Verdict.NATIVE


@pytest.mark.parametrize("driver, words", [("525.147.05", "not R525"), ("545.29.06", "not R545"),
                                           ("470.256.02", "not R470")])
def test_branches_forward_compatibility_does_not_support(driver, words):
    decision = decide(facts(driver=driver))
    assert decision.verdict is Verdict.UNSUPPORTED and words in decision.reason
    assert "R535, R550, R565, R570, R575" in decision.reason


def test_no_compat_libs_in_the_image_and_an_old_driver():
    decision = decide(facts(compat_version=None))
    assert decision.verdict is Verdict.UNSUPPORTED and "no forward-compatibility libraries" in decision.reason


def test_unknown_gpu_names_follow_the_toolkit_rule():
    # no nvidia-smi (utility capability off): the toolkit's own rule has no class check either
    assert decide(facts(gpus=())).verdict is Verdict.USE_COMPAT


def test_modes_off_and_force():
    off = decide(facts(mode="off"))
    assert off.verdict is Verdict.UNSUPPORTED and "QCTRAIN_CUDA_COMPAT=off" in off.reason
    forced = decide(facts(mode="force", gpus=("NVIDIA RTX A6000",)))  # e.g. an NGC-Ready RTX SKU
    assert forced.verdict is Verdict.USE_COMPAT


def test_no_driver_or_cpu_torch_decides_nothing():
    assert decide(facts(driver=None)).verdict is Verdict.NO_DRIVER
    assert decide(facts(runtime_cuda=None)).verdict is Verdict.NO_CUDA_RUNTIME
    assert decide(facts(driver=None)).ld_library_path is None


def test_cuda_12_runtime_needs_r525():
    assert decide(facts(runtime_cuda="12.8", driver="535.183.01")).verdict is Verdict.NATIVE


# ------------------------------------------------------------------------------------------ the facts

PROC_VERSION = ("NVRM version: NVIDIA UNIX x86_64 Kernel Module  {v}  Tue Mar  5 22:16:56 UTC 2024\n"
                "GCC version:  gcc version 12.3.0 (Ubuntu 12.3.0-1ubuntu1~22.04)\n")
OPEN_VERSION = "NVRM version: NVIDIA UNIX Open Kernel Module for x86_64  {v}  Release Build  (dvs-builder@U16)\n"


def fake_host(tmp_path: Path, driver: str | None, compat: str | None = "580.82.07", conf: str | None = None,
              proc_template: str = PROC_VERSION) -> Path:
    root = tmp_path / "host"
    if driver:
        version = root / "proc/driver/nvidia/version"
        version.parent.mkdir(parents=True)
        version.write_text(proc_template.format(v=driver))
    if compat:
        lib_dir = root / COMPAT.lstrip("/")
        lib_dir.mkdir(parents=True)
        (lib_dir / f"libcuda.so.{compat}").write_bytes(b"\x7fELF")
        (lib_dir / "libcuda.so.1").symlink_to(f"libcuda.so.{compat}")
        (lib_dir / "libnvidia-ptxjitcompiler.so.1").write_bytes(b"\x7fELF")
    if conf:
        (root / "etc/ld.so.conf.d").mkdir(parents=True)
        (root / "etc/ld.so.conf.d/00-compat-1234.conf").write_text(conf + "\n")
    return root


def tools(names: str = "", ldconfig: str = "") -> callable:
    def run(command):
        if command[0] == "nvidia-smi":
            return names or None
        if command[0] == "ldconfig":
            return ldconfig
        return None
    return run


@pytest.mark.parametrize("template", [PROC_VERSION, OPEN_VERSION])
def test_gather_reads_driver_compat_and_toolkit_facts(tmp_path, monkeypatch, template):
    monkeypatch.setattr(cudacompat, "torch_cuda_version", lambda: "13.0")
    root = fake_host(tmp_path, "550.54.15", conf=COMPAT, proc_template=template)
    ldcache = ("	libcuda.so.1 (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so.1\n"
               "	libcuda.so (libc6,x86-64) => /usr/lib/x86_64-linux-gnu/libcuda.so\n")
    got = cudacompat.gather(root, {"LD_LIBRARY_PATH": "/x"}, tools("NVIDIA H100 80GB HBM3\nNVIDIA L4\n", ldcache))
    assert got.driver == "550.54.15" and got.compat_version == "580.82.07" and got.runtime_cuda == "13.0"
    assert got.gpus == ("NVIDIA H100 80GB HBM3", "NVIDIA L4")
    assert got.toolkit_dirs == (COMPAT,) and got.ld_library_path == "/x"
    assert got.loader_libcuda == "/usr/lib/x86_64-linux-gnu/libcuda.so.1"  # not under the fake root: as listed
    assert decide(got).verdict is Verdict.TOOLKIT


def test_gather_skips_nvidia_smi_when_the_driver_is_new_enough(tmp_path, monkeypatch):
    monkeypatch.setattr(cudacompat, "torch_cuda_version", lambda: "13.0")
    calls = []

    def run(command):
        calls.append(command[0])
        return None

    got = cudacompat.gather(fake_host(tmp_path, "580.95.05"), {}, run)
    assert got.driver == "580.95.05" and calls == [] and got.gpus == ()


def test_gather_falls_back_to_nvidia_smi_for_the_driver(tmp_path, monkeypatch):
    monkeypatch.setattr(cudacompat, "torch_cuda_version", lambda: "13.0")

    def run(command):
        return "570.86.15\n" if "--query-gpu=driver_version" in command else "NVIDIA A100-SXM4-40GB\n"

    got = cudacompat.gather(fake_host(tmp_path, None, compat=None), {}, run)
    assert got.driver == "570.86.15" and got.compat_version is None
    assert decide(got).verdict is Verdict.UNSUPPORTED


def test_torch_cuda_version_is_read_without_importing_torch():
    import torch

    assert cudacompat.torch_cuda_version() == torch.version.cuda  # None for the CPU build here


def test_check_driver_raises_an_environment_error(monkeypatch):
    monkeypatch.setattr(cudacompat, "gather", lambda: facts(driver="550.54.15", gpus=("NVIDIA GeForce RTX 4090",)))
    with pytest.raises(QcError) as err:
        cudacompat.check_driver()
    assert err.value.exit_code == ExitCode.ENVIRONMENT == 3
    monkeypatch.setattr(cudacompat, "gather", lambda: facts())  # compat needed, entrypoint bypassed
    with pytest.raises(QcError, match="without it: start it through the image's entrypoint"):
        cudacompat.check_driver()
    monkeypatch.setattr(cudacompat, "gather", lambda: facts(ld_library_path=COMPAT))
    assert cudacompat.check_driver().verdict is Verdict.APPLIED


# ------------------------------------------------------------------------------ the entrypoint step


def fake_bin(tmp_path: Path, names: str) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\nprintf '{names}\\n'\n")
    ldconfig = bin_dir / "ldconfig"
    ldconfig.write_text("#!/bin/sh\nexit 0\n")
    for tool_path in (smi, ldconfig):
        tool_path.chmod(0o755)
    return bin_dir


def entrypoint(tmp_path: Path, root: Path, names: str, *command: str, **env: str):
    """Run the compat step as the image runs it (python -m qctrain.cudacompat exec), with a fake host root
    and a fake nvidia-smi, the CUDA runtime version forced through a stub torch/version.py."""
    stub = tmp_path / "stub"
    (stub / "torch").mkdir(parents=True)
    (stub / "torch/__init__.py").write_text("raise ImportError('the entrypoint must not import torch')\n")
    (stub / "torch/version.py").write_text("cuda: Optional[str] = '13.0'\n")
    run_env = {**os.environ, "PATH": f"{fake_bin(tmp_path, names)}:{os.environ['PATH']}",
               "PYTHONPATH": f"{stub}:{ROOT / 'entrypoint'}", **env}
    return subprocess.run([sys.executable, "-m", "qctrain.cudacompat", "--root", str(root), "exec", "--", *command],
                          capture_output=True, text=True, env=run_env, timeout=60)


def test_entrypoint_puts_the_compat_dir_first_then_execs(tmp_path):
    root = fake_host(tmp_path, "535.183.01")
    done = entrypoint(tmp_path, root, "NVIDIA A100-SXM4-80GB", "sh", "-c", 'echo "LD=$LD_LIBRARY_PATH"; exit 7',
                      LD_LIBRARY_PATH="/usr/local/nvidia/lib")
    assert done.returncode == 7, done.stderr  # exec'd: the command's own exit status
    assert done.stdout.strip() == f"LD={COMPAT}:/usr/local/nvidia/lib"
    assert "forward compatibility" in done.stderr and done.stderr.count("\n") == 1


def test_entrypoint_leaves_a_geforce_host_alone_for_train_and_doctor_to_report(tmp_path):
    root = fake_host(tmp_path, "550.54.15")
    done = entrypoint(tmp_path, root, "NVIDIA GeForce RTX 4090", "sh", "-c", 'echo "LD=$LD_LIBRARY_PATH"',
                      LD_LIBRARY_PATH="/x")
    assert done.returncode == 0 and done.stdout.strip() == "LD=/x" and done.stderr == ""


def test_entrypoint_with_the_toolkit_hook_does_nothing(tmp_path):
    root = fake_host(tmp_path, "535.183.01", conf=COMPAT)
    done = entrypoint(tmp_path, root, "NVIDIA H100 80GB HBM3", "sh", "-c", 'echo "LD=$LD_LIBRARY_PATH"',
                      LD_LIBRARY_PATH="/x")
    assert done.stdout.strip() == "LD=/x" and done.stderr == ""


def test_entrypoint_on_a_cpu_host_and_a_missing_command(tmp_path):
    root = fake_host(tmp_path, None)
    done = entrypoint(tmp_path, root, "", "sh", "-c", 'echo "LD=${LD_LIBRARY_PATH-unset}"', LD_LIBRARY_PATH="/x")
    assert done.stdout.strip() == "LD=/x"
    missing = entrypoint(tmp_path / "2", root, "", "no-such-command-here")
    assert missing.returncode == 127 and "cannot run no-such-command-here" in missing.stderr


def test_facts_prints_json(tmp_path):
    root = fake_host(tmp_path, "535.183.01")
    stub_env = {"PYTHONPATH": str(ROOT / "entrypoint"),
                "PATH": f"{fake_bin(tmp_path, 'NVIDIA L4')}:{os.environ['PATH']}"}
    done = subprocess.run([sys.executable, "-m", "qctrain.cudacompat", "--root", str(root), "facts"],
                          capture_output=True, text=True, env={**os.environ, **stub_env}, timeout=60)
    report = json.loads(done.stdout)
    assert report["facts"]["driver"] == "535.183.01" and report["facts"]["gpus"] == ["NVIDIA L4"]
    assert report["facts"]["compat_version"] == "580.82.07"


@pytest.mark.parametrize("mode", ["auto", "off"])
def test_the_entrypoint_script_runs_qctrain_with_the_arguments(tmp_path, mode):
    """docker/entrypoint.sh as the image runs it, pointed at this venv (the image's is /opt/venv)."""
    env = {**os.environ, "QCTRAIN_VENV": str(Path(sys.executable).parent.parent), "QCTRAIN_CUDA_COMPAT": mode,
           "PYTHONPATH": str(ROOT / "entrypoint")}
    done = subprocess.run([str(ROOT / "docker/entrypoint.sh"), "validate", "--help"], capture_output=True,
                          text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("usage: qctrain validate")
    bad = subprocess.run([str(ROOT / "docker/entrypoint.sh"), "validate", str(tmp_path / "missing.yaml")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and "missing.yaml" in bad.stderr  # qctrain's own exit code comes through


# ------------------------------------------------------------------ NVIDIA_REQUIRE_CUDA against the rule


def require_cuda() -> str:
    text = (ROOT / "docker/Dockerfile").read_text().replace("\\\n", "")  # Docker joins continued lines
    match = re.search(r'NVIDIA_REQUIRE_CUDA="([^"]+)"', text)
    assert match, "docker/Dockerfile must set NVIDIA_REQUIRE_CUDA"
    return match.group(1)


def runtime_accepts(requirement: str, brand: str, driver: str, cuda: str) -> bool:
    """libnvidia-container's requirement check (src/cli/dsl.c): space-separated alternatives, each a
    comma-separated conjunction of brand=/driver>=/driver</cuda>= rules."""
    def version(v: str) -> tuple[int, ...]:
        return tuple(int(x) for x in v.split("."))

    def holds(rule: str) -> bool:
        name, op, value = re.fullmatch(r"(\w+)(>=|<=|!=|=|<|>)(\S+)", rule).groups()
        if name == "brand":
            assert op == "="
            return brand == value
        have = version(driver if name == "driver" else cuda)
        want = version(value)
        width = max(len(have), len(want))
        have, want = have + (0,) * (width - len(have)), want + (0,) * (width - len(want))
        return {">=": have >= want, "<": have < want, ">": have > want, "<=": have <= want, "=": have == want,
                "!=": have != want}[op]

    return any(all(holds(rule) for rule in alternative.split(",")) for alternative in requirement.split())


# NVML brand names (nvmlBrandType_t, lower-case as the toolkit compares them) and a GPU of each
BRANDS = {"tesla": "Tesla T4", "nvidia": H100, "unknown": "NVIDIA B200", "grid": "NVIDIA A10-24Q",
          "vws": "NVIDIA A40-48Q", "geforce": "NVIDIA GeForce RTX 4090", "geforcertx": "NVIDIA GeForce RTX 3090",
          "titan": "NVIDIA TITAN V", "quadro": "Quadro RTX 8000", "nvidiartx": "NVIDIA RTX A6000"}
DRIVERS = ["470.256.02", "525.147.05", "535.183.01", "545.29.06", "550.163.01", "560.35.03", "565.57.01",
           "570.172.08", "575.64.05", "580.65.06", "580.95.05", "590.44.01"]
CUDA_OF_DRIVER = {470: "11.4", 525: "12.0", 535: "12.2", 545: "12.3", 550: "12.4", 560: "12.6", 565: "12.7",
                  570: "12.8", 575: "12.9", 580: "13.0", 590: "13.1"}


@pytest.mark.parametrize("brand", sorted(BRANDS))
def test_nvidia_require_cuda_accepts_exactly_the_hosts_the_image_serves(brand):
    requirement = require_cuda()
    for driver in DRIVERS:
        host = facts(driver=driver, gpus=(BRANDS[brand],))
        serves = decide(host).usable
        accepts = runtime_accepts(requirement, brand, driver, CUDA_OF_DRIVER[int(driver.split(".")[0])])
        assert accepts == serves, f"{brand} on {driver}: runtime {'accepts' if accepts else 'refuses'}, " \
                                  f"image {'serves' if serves else 'cannot serve'} it"


def test_require_cuda_dsl_reading_matches_nvidia_base_semantics():
    nvidia_base = "cuda>=13.0 brand=tesla,driver>=535,driver<536"
    assert runtime_accepts(nvidia_base, "tesla", "535.1", "12.2")
    assert runtime_accepts(nvidia_base, "geforce", "580.65.06", "13.0")
    assert not runtime_accepts(nvidia_base, "geforce", "535.1", "12.2")
    assert not runtime_accepts(nvidia_base, "tesla", "550.1", "12.4")
