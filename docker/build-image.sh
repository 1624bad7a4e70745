#!/usr/bin/env bash
# Build the image (`make image`):  bash docker/build-image.sh IMAGE[:TAG]
#
# Passes the provenance build args the image bakes into its labels and QCTRAIN_* env:
#   GIT_REVISION  full commit SHA (HEAD)
#   VERSION       the exact tag (v1.2.3 -> 1.2.3) if HEAD has one, else <pyproject version>+g<sha>,
#                 with ".dirty" when tracked files have uncommitted changes
#   BUILD_DATE    now, RFC 3339 UTC (or SOURCE_DATE_EPOCH if set, for reproducible rebuilds)
#   SOURCE_URL    QCTRAIN_SOURCE_URL, else the https form of the `origin` remote, else empty;
#                 credentials (https://user:token@host/...), query and fragment taken out: it
#                 becomes a label anyone who pulls the image can read
#   BASE_IMAGE    only when set in the environment (CI's local Debian base); else the Dockerfile's
#                 pinned CUDA base
# Env overrides: GIT_REVISION, VERSION, BUILD_DATE, DOCKER (client binary), QCTRAIN_BUILD_ARGS
# (extra `docker build` arguments, word-split, e.g. "--no-cache").
set -euo pipefail

# The public https form of a git remote URL: scp-style and ssh:// remotes become https://, and any
# user, password or token, query and fragment are dropped. (Sourcing this file defines it alone.)
public_url() {
  printf '%s' "$1" | sed -E \
    -e 's#^[^/@:]+@([^:/]+):#https://\1/#' \
    -e 's#^(ssh|git)://([^/]*@)?([^/:]+)(:[0-9]+)?/#https://\3/#' \
    -e 's#^([A-Za-z][A-Za-z0-9+.-]*://)[^/]*@#\1#' \
    -e 's|[?#].*$||' \
    -e 's#\.git/?$##'
}

main() {
  cd "$(dirname "$0")/.."

  IMAGE=${1:?usage: docker/build-image.sh IMAGE[:TAG]}

  # BuildKit is required (RUN --mount). Debian's docker.io client (/usr/bin/docker, 20.10) has it
  # built in; a newer client without the buildx plugin (e.g. /usr/local/bin/docker here) fails.
  if [ -z "${DOCKER:-}" ]; then
    if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=$(command -v docker); fi
  fi

  git_ok() { git rev-parse --git-dir >/dev/null 2>&1; }
  if [ -z "${GIT_REVISION:-}" ]; then
    GIT_REVISION=$(git_ok && git rev-parse HEAD || echo unknown)
  fi
  if [ -z "${VERSION:-}" ]; then
    pyproject_version=$(sed -n 's/^version *= *"\(.*\)"/\1/p' pyproject.toml | head -n 1)
    if git_ok && tag=$(git describe --tags --exact-match HEAD 2>/dev/null); then
      VERSION=${tag#v}
    elif git_ok; then
      VERSION="${pyproject_version}+g$(git rev-parse --short=12 HEAD)"
    else
      VERSION="${pyproject_version}+unknown"
    fi
    if git_ok && ! git diff --quiet HEAD -- 2>/dev/null; then
      VERSION="${VERSION}.dirty"
    fi
  fi
  if [ -z "${BUILD_DATE:-}" ]; then
    if [ -n "${SOURCE_DATE_EPOCH:-}" ]; then
      BUILD_DATE=$(date -u -d "@${SOURCE_DATE_EPOCH}" +%Y-%m-%dT%H:%M:%SZ)
    else
      BUILD_DATE=$(date -u +%Y-%m-%dT%H:%M:%SZ)
    fi
  fi
  SOURCE_URL=${QCTRAIN_SOURCE_URL:-}
  if [ -z "$SOURCE_URL" ] && git_ok; then
    SOURCE_URL=$(git remote get-url origin 2>/dev/null || true)
  fi
  SOURCE_URL=$(public_url "$SOURCE_URL")

  args=(
    --file docker/Dockerfile
    --tag "$IMAGE"
    --progress=plain
    --build-arg "GIT_REVISION=$GIT_REVISION"
    --build-arg "VERSION=$VERSION"
    --build-arg "BUILD_DATE=$BUILD_DATE"
    --build-arg "SOURCE_URL=$SOURCE_URL"
  )
  if [ -n "${BASE_IMAGE:-}" ]; then
    args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE")
  fi
  # shellcheck disable=SC2206  # intentional word splitting of the extra-args knob
  extra=(${QCTRAIN_BUILD_ARGS:-})

  echo "building $IMAGE  version=$VERSION revision=$GIT_REVISION base=${BASE_IMAGE:-<Dockerfile default>}"
  start=$(date +%s)
  DOCKER_BUILDKIT=1 "$DOCKER" build "${args[@]}" "${extra[@]}" .
  echo "built $IMAGE in $(( $(date +%s) - start )) s"
  "$DOCKER" image inspect -f 'id {{.Id}}  size {{.Size}} bytes' "$IMAGE"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  main "$@"
fi
