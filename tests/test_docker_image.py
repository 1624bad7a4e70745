"""Checks of the BUILT image (marked `docker`): skipped when no engine or no image is available.

`make test` runs before the image exists in CI, so these usually skip there; the gate for the image
is docker/ci.sh (build + docker/smoke.sh). Run them after `make image`:
    QCTRAIN_TEST_IMAGE=qc-train-phi:dev .venv/bin/python -m pytest -m docker tests/test_docker_image.py
Without QCTRAIN_TEST_IMAGE the first of qc-train-phi:dev / qc-train-phi:ci that exists is used.
"""

import json
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest

pytestmark = pytest.mark.docker

CANDIDATES = ("qc-train-phi:dev", "qc-train-phi:ci")


@cache
def docker_binary() -> str | None:
    for candidate in ("/usr/bin/docker", shutil.which("docker")):
        if candidate and os.access(candidate, os.X_OK):
            try:
                ok = subprocess.run([candidate, "info"], capture_output=True, timeout=20).returncode == 0
            except (OSError, subprocess.TimeoutExpired):
                ok = False
            if ok:
                return candidate
    return None


@cache
def image_under_test() -> str | None:
    docker = docker_binary()
    if docker is None:
        return None
    wanted = os.environ.get("QCTRAIN_TEST_IMAGE")
    for image in (wanted,) if wanted else CANDIDATES:
        if subprocess.run([docker, "image", "inspect", image], capture_output=True).returncode == 0:
            return image
    return None


@pytest.fixture(scope="module")
def image() -> str:
    # docker/ci.sh names the image it built: then a missing engine or image is a failure, not a skip.
    give_up = pytest.fail if os.environ.get("QCTRAIN_TEST_IMAGE") else pytest.skip
    if docker_binary() is None:
        give_up("no running Docker engine")
    found = image_under_test()
    if found is None:
        give_up(f"no built image ({os.environ.get('QCTRAIN_TEST_IMAGE') or ' / '.join(CANDIDATES)}); "
                    "run `make image` first")
    return found


def docker(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([docker_binary(), *args], capture_output=True, text=True, timeout=timeout)


def run(image: str, *args: str, user: str | None = None, entrypoint: str | None = None):
    cmd = ["run", "--rm", "--network", "none"]
    if user:
        cmd += ["--user", user]
    if entrypoint:
        cmd += ["--entrypoint", entrypoint]
    return docker(*cmd, image, *args)


@pytest.fixture(scope="module")
def config(image) -> dict:
    return json.loads(docker("image", "inspect", image).stdout)[0]["Config"]


def test_help_is_the_default(image):
    explicit = run(image, "--help")
    assert explicit.returncode == 0, explicit.stderr
    assert "usage" in explicit.stdout.lower()
    default = run(image)
    assert default.returncode == 0 and default.stdout == explicit.stdout


def test_doctor_without_gpu_exits_0(image):
    result = run(image, "doctor")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "CUDA available           no" in result.stdout
    assert "libbitsandbytes" in result.stdout
    assert result.stdout.rstrip().endswith("doctor: OK")


def test_entrypoint_user_and_provenance(image, config):
    assert config["Entrypoint"] == ["/usr/bin/tini", "--", "qctrain-entrypoint"]
    assert config["User"] == "10001:10001"
    labels = config["Labels"]
    env = dict(item.split("=", 1) for item in config["Env"])
    for key in ("source", "revision", "version", "created"):
        assert f"org.opencontainers.image.{key}" in labels
    assert env["QCTRAIN_GIT_REVISION"] == labels["org.opencontainers.image.revision"] != "unknown"
    assert env["QCTRAIN_IMAGE_VERSION"] == labels["org.opencontainers.image.version"]
    assert env["QCTRAIN_BUILD_DATE"] == labels["org.opencontainers.image.created"]
    assert env["HF_HOME"] == "/cache/huggingface"
    assert not any(k.startswith("HF_TOKEN") for k in env)


def test_arbitrary_uid_can_write_home_caches_and_outputs(image):
    probes = '"$HOME/.probe" "$HF_HOME/.probe" "$XDG_CACHE_HOME/.probe" /out/.probe /models/.probe'
    script = f"touch {probes} && id -u"
    result = run(image, "-c", script, user="54321:54321", entrypoint="/bin/sh")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "54321"


def test_no_pip_cache_compilers_or_build_leftovers(image):
    # BuildKit leaves the (empty) mount points of cache/bind mounts: only content counts.
    script = (
        "for p in /root/.cache/pip /tmp/build /tmp/dist /dist /src /tmp/requirements.lock; do "
        '[ -n "$(find "$p" -mindepth 0 -type f 2>/dev/null | head -n 1)" ] && echo "leftover $p"; done; '
        'for c in gcc cc g++ nvcc; do command -v "$c" >/dev/null && echo "compiler $c"; done; '
        "find / -xdev -name '*.whl' -not -path '/usr/share/python-wheels/*' -print 2>/dev/null | head -n 3; "
        "true"
    )
    result = run(image, "-c", script, user="0:0", entrypoint="/bin/sh")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ""


def test_locked_versions_installed(image):
    code = (
        "import importlib.metadata as m;"
        "print(' '.join(f'{p}=={m.version(p)}' for p in "
        "('torch','transformers','trl','peft','bitsandbytes','accelerate','datasets','huggingface-hub')))"
    )
    result = run(image, "-c", code, entrypoint="python")
    assert result.returncode == 0, result.stderr
    installed = result.stdout.split()
    assert "transformers==5.24.0" in installed and "bitsandbytes==0.50.2" in installed
    assert any(item.startswith("torch==2.13.0") for item in installed)


def fake_gpu_host(tmp_path, driver: str, gpu: str) -> list[str]:
    """docker run options that make the container see an NVIDIA host with this driver and GPU (a fake nvidia-smi,
    as the toolkit would mount the real one) and forward-compatibility libraries (CI's base has none)."""
    bin_dir, compat = tmp_path / "bin", tmp_path / "compat"
    bin_dir.mkdir()
    compat.mkdir()
    smi = bin_dir / "nvidia-smi"
    smi.write_text(f'#!/bin/sh\ncase "$*" in *driver_version*) echo {driver};; *name*) echo "{gpu}";; esac\n')
    smi.chmod(0o755)
    (compat / "libcuda.so.580.82.07").write_bytes(b"")
    for path in (tmp_path, bin_dir, compat):
        path.chmod(0o755)
    return ["-v", f"{bin_dir}:/fakebin:ro", "-v", f"{compat}:/fakecompat:ro",
            "-e", "PATH=/fakebin:/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            "-e", "QCTRAIN_CUDA_COMPAT_DIR=/fakecompat"]


def test_entrypoint_applies_forward_compatibility_on_an_old_datacenter_driver(image, tmp_path):
    result = docker("run", "--rm", "--network", "none", *fake_gpu_host(tmp_path, "535.183.01", "NVIDIA A100-SXM4-80GB"),
                    image, "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("qctrain ")
    assert result.stderr.strip() == ("qctrain: driver 535.183.01, CUDA 13.0 runtime needs R580+: forward compatibility "
                                     "with /fakecompat (580.82.07)")


def test_geforce_on_an_old_driver_train_and_doctor_exit_3_in_one_line(image, tmp_path):
    host = fake_gpu_host(tmp_path, "550.54.15", "NVIDIA GeForce RTX 4090")
    recipes = Path(__file__).resolve().parents[1] / "docker" / "smoke"
    train = docker("run", "--rm", "--network", "none", *host, "-v", f"{recipes}:/recipes:ro", image,
                   "train", "/recipes/smoke.yaml")
    assert train.returncode == 3, train.stderr
    lines = train.stderr.strip().splitlines()
    assert len(lines) == 1 and "550.54.15" in lines[0] and "R580" in lines[0] and "GeForce RTX 4090" in lines[0]
    doctor = docker("run", "--rm", "--network", "none", *host, image, "doctor")
    assert doctor.returncode == 3
    assert "problem: the NVIDIA driver 550.54.15 is older than R580" in doctor.stdout


def test_nvidia_require_cuda_is_set_for_the_runtime(config):
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["NVIDIA_REQUIRE_CUDA"].startswith("cuda>=13.0 brand=tesla,driver>=535,driver<536")
