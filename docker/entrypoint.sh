#!/bin/sh
# The image's entrypoint (under tini): decide CUDA forward compatibility before anything loads libcuda,
# then exec qctrain with the container's arguments.
#
# qctrain.cudacompat reads the host driver's version, the GPUs' names and the compat libraries of the
# CUDA base image (/usr/local/cuda/compat). On a datacenter GPU whose driver branch is older than the
# CUDA runtime needs (R535..R575 for CUDA 13), it puts the compat folder first in LD_LIBRARY_PATH; it
# does nothing where the host driver is new enough, where the NVIDIA Container Toolkit already set the
# compat libraries up, or where forward compatibility cannot help (GeForce/RTX workstation GPUs:
# `qctrain train` and `qctrain doctor` then say so and exit 3). See docker/README.md.
#   QCTRAIN_CUDA_COMPAT=off    skip this step (the host's libcuda, whatever its version)
#   QCTRAIN_CUDA_COMPAT=force  use the compat libraries whenever the driver is older, whatever the GPU
#
# By absolute path: launchers that run commands in the container through their own shell (SkyPilot's
# runtime, `docker exec`) may put another Python first on PATH.
set -eu
VENV=${QCTRAIN_VENV:-/opt/venv}  # the image's venv (docker/Dockerfile); tests point it elsewhere
if [ "${QCTRAIN_CUDA_COMPAT:-auto}" = off ]; then
  exec "$VENV/bin/qctrain" "$@"
fi
exec "$VENV/bin/python3" -m qctrain.cudacompat exec -- "$VENV/bin/qctrain" "$@"
