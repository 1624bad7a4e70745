#!/usr/bin/env bash
# Regenerate docker/requirements.lock from docker/requirements.in (`make lock`).
#
# One universal, hash-locked resolution whose markers cover every Python the lock serves:
#   - the image: Python 3.12 (CUDA Ubuntu 24.04 base) or 3.11 (CI's local Debian bookworm base),
#     linux x86_64 manylinux, real CUDA torch wheels from PyPI;
#   - `make setup`: the dev/CI venv on Python 3.11, which turns the lock into pip constraints
#     (docker/lock_to_constraints.py) and gets the CPU build of the same torch version.
# Only PyPI is consulted (no local indexes or find-links), so the hashes are PyPI's.
set -euo pipefail
cd "$(dirname "$0")/.."

UV=${UV:-}
if [ -z "$UV" ]; then
  if [ -x .venv/bin/uv ]; then UV=.venv/bin/uv; else UV=$(command -v uv || true); fi
fi
if [ -z "$UV" ]; then
  echo "lock.sh: uv not found (pip install uv, or set UV=/path/to/uv)" >&2
  exit 3
fi

# Behind a TLS-intercepting proxy uv must trust the system CA bundle.
if [ -z "${SSL_CERT_FILE:-}" ] && [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  export SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt
fi

# Packages the image leaves out although a locked package requires them (docker/left-out.txt): not emitted.
LEFT_OUT=()
while read -r name; do LEFT_OUT+=(--no-emit-package "$name"); done < <(grep -v -e '^#' -e '^ *$' docker/left-out.txt)

UV_CUSTOM_COMPILE_COMMAND="make lock  (docker/lock.sh: uv pip compile --universal --python-version 3.11 --generate-hashes)" "$UV" pip compile \
  --no-config \
  --default-index https://pypi.org/simple \
  --universal \
  --python-version 3.11 \
  --generate-hashes \
  --no-emit-index-url \
  --quiet \
  "${LEFT_OUT[@]}" \
  --output-file docker/requirements.lock \
  docker/requirements.in
echo "wrote docker/requirements.lock ($(grep -c '==' docker/requirements.lock) pins)"
