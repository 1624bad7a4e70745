#!/usr/bin/env bash
# CI for the image (called by .ci/run after `make test`): build the exact image and smoke-test it.
#
#   1. installs what it needs if missing: Debian's docker.io (its 20.10 client does BuildKit without
#      buildx), debootstrap, docker-compose (v1, to validate compose.yaml);
#   2. starts dockerd in the background if no engine answers;
#   3. prunes what earlier runs left (stopped containers, dangling images, build cache above a cap);
#   4. builds a local Debian bookworm base with debootstrap (no registry is reachable, so no FROM of
#      Docker Hub images), carrying the host's CA bundle for the TLS-intercepting proxy; cached
#      between runs on the same machine;
#   5. validates compose.yaml; `make image` with BASE_IMAGE=<that base>; checks the image size;
#      `make smoke`.
# Idempotent; runs as root on a fresh Debian/Ubuntu machine with access to PyPI and Debian only.
#
# Knobs (env): IMAGE (qc-train-phi:ci), QCTRAIN_CI_BASE (qctrain-ci-base:bookworm-v1-<CA sum>),
# QCTRAIN_MAX_IMAGE_BYTES (6500000000), QCTRAIN_BUILD_CACHE_KEEP (15GB), DEBIAN_MIRROR.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-qc-train-phi:ci}
CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt
# The base's tag names what goes into it (recipe version + the CA bundle it carries), so a changed
# bundle or recipe builds a new base instead of reusing a stale one.
BASE_RECIPE_VERSION=1
ca_sum=$( { sha256sum "$CA_BUNDLE" 2>/dev/null || echo none; } | cut -c1-12)
BASE=${QCTRAIN_CI_BASE:-qctrain-ci-base:bookworm-v${BASE_RECIPE_VERSION}-${ca_sum}}
MAX_IMAGE_BYTES=${QCTRAIN_MAX_IMAGE_BYTES:-6500000000}
BUILD_CACHE_KEEP=${QCTRAIN_BUILD_CACHE_KEEP:-15GB}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
DOCKER=/usr/bin/docker   # Debian's client: BuildKit built in (/usr/local/bin/docker has no buildx)
export DOCKER

ci_start=$(date +%s)
declare -a SUMMARY=()
phase_start=0
phase() { phase_start=$(date +%s); echo; echo "=== ci.sh: $* ==="; }
phase_done() {
  local took=$(( $(date +%s) - phase_start ))
  SUMMARY+=("$(printf '%-22s %5d s' "$1" "$took")")
  echo "--- $1 took ${took} s"
}
as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

# ---------------------------------------------------------------------------------------------
phase "install docker.io, debootstrap, docker-compose (if missing)"
missing=()
[ -x /usr/bin/docker ] && [ -x /usr/sbin/dockerd ] || missing+=(docker.io)
command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing+=(debootstrap)
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  as_root apt-get update -q
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
else
  echo "all present"
fi
phase_done install

# ---------------------------------------------------------------------------------------------
phase "docker engine"
if ! "$DOCKER" info >/dev/null 2>&1; then
  echo "starting dockerd (log: /var/log/qctrain-dockerd.log)"
  as_root setsid nohup /usr/sbin/dockerd >/var/log/qctrain-dockerd.log 2>&1 < /dev/null &
  for _ in $(seq 1 60); do
    "$DOCKER" info >/dev/null 2>&1 && break
    sleep 1
  done
  if ! "$DOCKER" info >/dev/null 2>&1; then
    echo "ci.sh: dockerd did not come up in 60 s" >&2
    tail -n 30 /var/log/qctrain-dockerd.log >&2 || true
    exit 3
  fi
fi
"$DOCKER" version --format 'client {{.Client.Version}}, server {{.Server.Version}}'
phase_done engine

# ---------------------------------------------------------------------------------------------
phase "prune what earlier runs left"
"$DOCKER" container prune -f >/dev/null
"$DOCKER" image prune -f >/dev/null
"$DOCKER" builder prune -f --keep-storage "$BUILD_CACHE_KEEP" >/dev/null
"$DOCKER" system df
df -h /var/lib/docker 2>/dev/null | tail -n 1 || true
phase_done prune

# ---------------------------------------------------------------------------------------------
phase "local base image $BASE"
if "$DOCKER" image inspect "$BASE" >/dev/null 2>&1; then
  echo "cached: $BASE"
else
  rootfs=$(mktemp -d /var/tmp/qctrain-rootfs.XXXXXX)
  trap 'as_root rm -rf "$rootfs"' EXIT
  as_root debootstrap --variant=minbase --include=ca-certificates bookworm "$rootfs" "$DEBIAN_MIRROR"
  # HTTPS leaves through an intercepting proxy: carry the host's bundle, both where tools read it
  # and where update-ca-certificates (run when the image installs ca-certificates) keeps it.
  if [ -f "$CA_BUNDLE" ]; then
    as_root install -D -m 0644 "$CA_BUNDLE" "$rootfs/usr/local/share/ca-certificates/ci-host-bundle.crt"
    as_root install -D -m 0644 "$CA_BUNDLE" "$rootfs/etc/ssl/certs/ca-certificates.crt"
  fi
  as_root tee "$rootfs/etc/apt/sources.list" >/dev/null <<EOF
deb $DEBIAN_MIRROR bookworm main
deb $DEBIAN_MIRROR bookworm-updates main
deb http://deb.debian.org/debian-security bookworm-security main
EOF
  as_root rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/log/*.log
  as_root tar --numeric-owner -C "$rootfs" -c . | "$DOCKER" import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change "ENV SSL_CERT_FILE=$CA_BUNDLE" \
    --change "ENV PIP_CERT=$CA_BUNDLE" \
    --change "ENV REQUESTS_CA_BUNDLE=$CA_BUNDLE" \
    --change 'CMD ["/bin/bash"]' \
    --message "qc-train-phi CI base: debootstrap minbase bookworm + host CA bundle" \
    - "$BASE"
  as_root rm -rf "$rootfs"
  trap - EXIT
  # Older bases (another recipe version or CA bundle) are dead weight now.
  "$DOCKER" image ls --format '{{.Repository}}:{{.Tag}}' "${BASE%%:*}" | grep -vxF "$BASE" \
    | xargs -r "$DOCKER" image rm >/dev/null 2>&1 || true
fi
"$DOCKER" image inspect -f '{{.Id}}  {{.Size}} bytes' "$BASE"
phase_done base

# ---------------------------------------------------------------------------------------------
phase "validate compose.yaml (docker-compose v1)"
docker-compose -f compose.yaml config -q
echo "compose.yaml OK"
phase_done compose

# ---------------------------------------------------------------------------------------------
phase "make image IMAGE=$IMAGE BASE_IMAGE=$BASE"
BASE_IMAGE="$BASE" make image IMAGE="$IMAGE"
size=$("$DOCKER" image inspect -f '{{.Size}}' "$IMAGE")
echo "image size: $size bytes ($(( size / 1000000 )) MB); budget ${MAX_IMAGE_BYTES} bytes"
"$DOCKER" image inspect -f '{{json .Config.Labels}}' "$IMAGE"
phase_done image
if [ "$size" -gt "$MAX_IMAGE_BYTES" ]; then
  echo "ci.sh: image $IMAGE is $size bytes, over the ${MAX_IMAGE_BYTES}-byte budget" >&2
  "$DOCKER" history --no-trunc --format '{{.Size}}\t{{.CreatedBy}}' "$IMAGE" | head -n 20 >&2
  exit 1
fi

# ---------------------------------------------------------------------------------------------
phase "make smoke IMAGE=$IMAGE"
make smoke IMAGE="$IMAGE"
phase_done smoke

# The pytest checks that need the built image (docker stop -> exit 75 -> resume, ...): make test ran
# before the image existed, so they skipped there and run here, against this exact image.
phase "pytest -m docker IMAGE=$IMAGE"
QCTRAIN_TEST_IMAGE="$IMAGE" .venv/bin/python -m pytest -q -m docker tests/
phase_done docker-tests

# Re-tagging left the previous build's image dangling: drop it now rather than next run.
"$DOCKER" image prune -f >/dev/null

echo
echo "=== ci.sh summary ==="
printf '%s\n' "${SUMMARY[@]}"
printf '%-22s %5d s\n' total "$(( $(date +%s) - ci_start ))"
echo "image $IMAGE: $size bytes"
