#!/usr/bin/env bash
# Smoke-test a built image (`make smoke`):  bash docker/smoke.sh IMAGE[:TAG]
#
# Offline (--network none) and as the calling user (--user $(id -u):$(id -g)):
#   1. `IMAGE --help` prints usage; `IMAGE doctor` exits 0 without a GPU;
#   2. `IMAGE tiny-model /models/tiny-phi3` builds a tiny random Phi-3 (as an arbitrary non-root
#      uid when the caller is root, to prove any uid can run the image);
#   3. `IMAGE train /recipes/smoke.yaml` (docker/smoke/smoke.yaml) trains a 4-bit LoRA adapter on
#      the repository's sample data and evaluates it against its base (held-out split, an lm-eval task
#      file); adapter/, README.md, run_manifest.json and eval_results.json must appear on the host,
#      owned by the caller, and the manifest must record the image's git revision;
#   4. a recipe with a typo'd key exits 2 (bad input);
#   5. SIGTERM during training (docker stop) reaches qctrain through tini: it saves a checkpoint
#      and exits 75 (preempted). Skip with QCTRAIN_SMOKE_SKIP_PREEMPT=1.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${1:?usage: docker/smoke.sh IMAGE[:TAG]}
if [ -z "${DOCKER:-}" ]; then
  if [ -x /usr/bin/docker ]; then DOCKER=/usr/bin/docker; else DOCKER=$(command -v docker); fi
fi
uid=$(id -u)
gid=$(id -g)
start=$(date +%s)

work=$(mktemp -d "${TMPDIR:-/tmp}/qctrain-smoke.XXXXXX")
containers=()
cleanup() {
  for c in "${containers[@]}"; do "$DOCKER" rm -f "$c" >/dev/null 2>&1 || true; done
  # Files written by other uids inside the container: remove through a container if we can't.
  rm -rf "$work" 2>/dev/null || "$DOCKER" run --rm --network none --user 0:0 --entrypoint /bin/rm \
    -v "$work:/w" "$IMAGE" -rf /w/out /w/models /w/preempt >/dev/null 2>&1 || true
  rm -rf "$work" 2>/dev/null || true
}
trap cleanup EXIT

fail() { echo "smoke: FAIL: $*" >&2; exit 1; }
step() { echo; echo "--- smoke: $* ($(( $(date +%s) - start )) s)"; }
# run_rc VAR cmd...: run cmd, store its exit status in VAR (errexit-safe)
run_rc() { local __var=$1; shift; set +e; "$@"; printf -v "$__var" '%s' "$?"; set -e; }

run() {
  "$DOCKER" run --rm --network none --user "$uid:$gid" --shm-size 1g "$@"
}

image_id=$("$DOCKER" image inspect -f '{{.Id}}' "$IMAGE")
revision=$("$DOCKER" image inspect -f '{{index .Config.Labels "org.opencontainers.image.revision"}}' "$IMAGE")
echo "smoke: image $IMAGE ($image_id), revision $revision, as uid:gid $uid:$gid, work dir $work"

# ---------------------------------------------------------------------------------------------
step "--help"
help=$("$DOCKER" run --rm --network none "$IMAGE" --help) || fail "--help exited non-zero"
printf '%s\n' "$help" | head -n 20
printf '%s\n' "$help" | grep -qi 'usage' || fail "--help printed no usage"
# The default command (no arguments) is --help too.
"$DOCKER" run --rm --network none "$IMAGE" >/dev/null || fail "no-argument run exited non-zero"

step "doctor (no GPU here: must report that and still exit 0)"
run_rc rc "$DOCKER" run --rm --network none "$IMAGE" doctor
[ "$rc" -eq 0 ] || fail "doctor exited $rc"

# ---------------------------------------------------------------------------------------------
mkdir -p "$work/out" "$work/models"
model_uid=$uid model_gid=$gid
if [ "$uid" -eq 0 ]; then
  # Root caller (CI): build the model as an arbitrary non-root uid that exists nowhere in the image.
  model_uid=54321 model_gid=54321
  chown "$model_uid:$model_gid" "$work/models"
fi
step "tiny-model as uid $model_uid:$model_gid"
"$DOCKER" run --rm --network none --user "$model_uid:$model_gid" -v "$work/models:/models" \
  "$IMAGE" tiny-model /models/tiny-phi3 || fail "tiny-model failed"
[ -f "$work/models/tiny-phi3/config.json" ] || fail "tiny-model wrote no config.json"

step "train /recipes/smoke.yaml as uid $uid:$gid"
run_rc rc run \
  -v "$PWD/docker/smoke:/recipes:ro" \
  -v "$PWD/data:/data:ro" \
  -v "$PWD/tests/data/eval:/tasks:ro" \
  -v "$work/models:/models:ro" \
  -v "$work/out:/out" \
  -e QCTRAIN_IMAGE_DIGEST="$image_id" \
  "$IMAGE" train /recipes/smoke.yaml
[ "$rc" -eq 0 ] || fail "train exited $rc"

run_dir="$work/out/smoke"
ls -la "$run_dir" || fail "no output dir $run_dir"
[ -d "$run_dir/adapter" ] || fail "no adapter/ in $run_dir"
ls "$run_dir/adapter"/adapter_model.* >/dev/null 2>&1 || fail "adapter/ holds no adapter_model.*"
[ -s "$run_dir/README.md" ] || fail "no model card README.md"
[ -s "$run_dir/run_manifest.json" ] || fail "no run_manifest.json"
python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$run_dir/run_manifest.json" \
  || fail "run_manifest.json is not JSON"
grep -q "$revision" "$run_dir/run_manifest.json" \
  || fail "run_manifest.json does not record the image's git revision $revision"
python3 - "$run_dir/eval_results.json" <<'EOF' || fail "eval_results.json lacks base or tuned scores"
import json, sys
results = json.load(open(sys.argv[1]))
task = results["tasks"]["qc_tiny_mc"]
assert {"acc", "acc_norm"} <= set(task["base"]) & set(task["tuned"]) and results["heldout"]["base"]["loss"] > 0
assert results["gate"]["passed"] is True
print(f"evaluation: lm-eval {results['lm_eval_version']}, qc_tiny_mc acc base {task['base']['acc']} tuned "
      f"{task['tuned']['acc']}, {results['seconds']['total']} s")
EOF
foreign=$(find "$work/out" \( ! -uid "$uid" -o ! -gid "$gid" \) -print | head -n 5)
[ -z "$foreign" ] || fail "outputs not owned by $uid:$gid: $foreign"
echo "outputs present and owned by $uid:$gid"

# ---------------------------------------------------------------------------------------------
step "bad recipe -> exit 2"
run_rc rc run -v "$PWD/docker/smoke:/recipes:ro" -v "$work/out:/out" "$IMAGE" train /recipes/bad-recipe.yaml
[ "$rc" -eq 2 ] || fail "bad recipe exited $rc, expected 2"
run_rc rc run "$IMAGE" train /recipes/does-not-exist.yaml
[ "$rc" -eq 2 ] || fail "missing recipe exited $rc, expected 2"

# ---------------------------------------------------------------------------------------------
if [ "${QCTRAIN_SMOKE_SKIP_PREEMPT:-0}" != 1 ]; then
  step "SIGTERM during training -> checkpoint + exit 75"
  mkdir -p "$work/preempt"
  name="qctrain-smoke-preempt-$$"
  containers+=("$name")
  # docker/smoke/preempt.yaml: many epochs, frequent checkpoints, so a stop lands mid-training.
  "$DOCKER" run -d --name "$name" --network none --user "$uid:$gid" --shm-size 1g \
    -v "$PWD/docker/smoke:/recipes:ro" -v "$PWD/data:/data:ro" \
    -v "$work/models:/models:ro" -v "$work/preempt:/out" \
    "$IMAGE" train /recipes/preempt.yaml >/dev/null
  ckpt="$work/preempt/preempt/checkpoints"
  for _ in $(seq 1 180); do
    if ls -d "$ckpt"/checkpoint-* >/dev/null 2>&1; then break; fi
    [ "$("$DOCKER" inspect -f '{{.State.Running}}' "$name")" = true ] || break
    sleep 1
  done
  ls -d "$ckpt"/checkpoint-* >/dev/null 2>&1 || { "$DOCKER" logs "$name" 2>&1 | tail -n 30; fail "no checkpoint within 180 s"; }
  "$DOCKER" stop --time 60 "$name" >/dev/null
  rc=$("$DOCKER" wait "$name")
  "$DOCKER" logs "$name" 2>&1 | tail -n 5
  [ "$rc" -eq 75 ] || fail "SIGTERM during training exited $rc, expected 75"
fi

echo
echo "smoke: OK in $(( $(date +%s) - start )) s"
