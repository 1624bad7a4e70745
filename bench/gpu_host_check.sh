#!/usr/bin/env bash
# Print the facts qctrain.cudacompat and `qctrain doctor` decide on, as a real NVIDIA host shows them, so the
# decision logic (tested with fake facts in tests/test_cudacompat.py and tests/test_doctor.py) can be
# checked against real hardware. Read-only: it changes nothing on the host.
#
#   bash bench/gpu_host_check.sh               # from the repository root, on the GPU host
#   bash bench/gpu_host_check.sh IMAGE         # also inside the image (docker run --gpus all IMAGE)
#
# Needs python3 (3.11+); torch is optional (without it the CUDA runtime version is unknown and doctor skips).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
IMAGE=${1:-}
export PYTHONPATH="$PWD/entrypoint${PYTHONPATH:+:$PYTHONPATH}"
section() { printf '\n=== %s\n' "$*"; }
try() { "$@" 2>&1 || echo "(exit $?)"; }

section "host: kernel module, nvidia-smi"
try cat /proc/driver/nvidia/version
try nvidia-smi --query-gpu=index,name,driver_version,compute_cap,memory.total,persistence_mode --format=csv
try nvidia-smi -q | grep -E "Product Brand|Product Architecture|CUDA Version|Driver Version" | sort -u

section "host: which libcuda the loader finds, compat setup of the toolkit"
try bash -c "ldconfig -p | grep -E 'libcuda\.so|libnvidia-ptxjitcompiler'"
for lib in $(ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF}'); do echo "$lib -> $(readlink -f "$lib")"; done
try bash -c 'ls -l /usr/local/cuda*/compat/ 2>/dev/null; cat /etc/ld.so.conf.d/00-compat-*.conf 2>/dev/null; true'
try bash -c 'nvidia-ctk --version 2>/dev/null | head -n 2; nvidia-container-cli --version 2>/dev/null | head -n 2; true'
echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"

section "host: cuInit through the loader's libcuda (ctypes)"
try python3 - <<'PY'
import ctypes
cuda = ctypes.CDLL("libcuda.so.1")
rc = cuda.cuInit(0)
version = ctypes.c_int()
cuda.cuDriverGetVersion(ctypes.byref(version))
print(f"cuInit -> {rc} (0 ok, 803 driver/libcuda mismatch, 804 forward compat not supported on this GPU); "
      f"cuDriverGetVersion -> {version.value} (CUDA {version.value // 1000}.{version.value % 1000 // 10})")
maps = [line.split()[-1] for line in open("/proc/self/maps") if "libcuda.so" in line]
print("libcuda mapped:", sorted(set(maps)))
PY

section "host: qctrain.cudacompat facts and verdict"
try python3 -m qctrain.cudacompat facts

section "host: torch, if installed"
try python3 - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("arch list", torch.cuda.get_arch_list())
    for i in range(torch.cuda.device_count()):
        print(i, torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
    from qctrain.doctor import libcuda_from_maps
    print("libcuda loaded by torch:", libcuda_from_maps(open("/proc/self/maps").read()))
PY

section "host: /dev/shm, disk"
try df -h /dev/shm . /tmp

if [ -n "$IMAGE" ]; then
  docker=${DOCKER:-docker}
  section "image $IMAGE: the same facts inside the container (as the NVIDIA runtime sets it up)"
  # shellcheck disable=SC2016  # expanded inside the container
  try "$docker" run --rm --gpus all --entrypoint /bin/sh "$IMAGE" -c '
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"; echo "NVIDIA_REQUIRE_CUDA is set: ${NVIDIA_REQUIRE_CUDA:+yes}"
    ls -l /usr/local/cuda/compat/ 2>&1; cat /etc/ld.so.conf.d/*.conf 2>&1
    ldconfig -p | grep -E "libcuda\.so" ; for f in $(ldconfig -p | awk "/libcuda\.so\.1 /{print \$NF}"); do readlink -f "$f"; done
    /opt/venv/bin/python3 -m qctrain.cudacompat facts'
  section "image $IMAGE: doctor through the image's entrypoint"
  try "$docker" run --rm --gpus all "$IMAGE" doctor
  section "image $IMAGE: doctor with the entrypoint's compat step off (QCTRAIN_CUDA_COMPAT=off)"
  try "$docker" run --rm --gpus all -e QCTRAIN_CUDA_COMPAT=off "$IMAGE" doctor
fi
