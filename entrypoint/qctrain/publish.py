"""Publishing to the Hugging Face Hub: fail in seconds before training, never lose a trained adapter.

`check_hub_access` runs before the model loads: token present and valid, allowed to write the
namespace, repo id well formed, repo created (private by default). `push_output` uploads a
finished run in one commit with retries; when it still fails the outputs stay as they were and
`PushFailed` (exit 4, "trained, not pushed") says which of token, permission or repo id is
wrong. The token is never logged, printed or written: messages and commit messages pass through secretmask.

Where runs go is one seam at the end of this module: a `Publisher` (check before training, push the
run, push a checkpoint), `publisher_for(recipe)` choosing it from the recipe, and the push policy of
`train` and `qctrain push`. To add a destination (an S3 or GCS bucket), write one Publisher class and
one recipe section, and map the section to the class in `publisher_for`.
"""

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, TypeVar

import httpx2
from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.errors import (
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status, validate_repo_id

from qctrain import __version__
from qctrain.atomic import read_json_object, restore_interrupted_swap, write_json_atomic
from qctrain.errors import InputError, Preempted, PushFailed
from qctrain.hubtoken import redact, resolve_token
from qctrain.recipe import HubSection, Recipe
from qctrain.rundir import RunDir
from qctrain.secretmask import mask

log = logging.getLogger(__name__)

RETRYABLE_STATUS = frozenset({408, 429, 500, 502, 503, 504})
CHECK_TIMEOUT_S = 10.0
MAX_RETRY_AFTER_S = 600.0
T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for 429/5xx/connection errors: base_delay, 2x, 4x... capped at max_delay;
    a Retry-After header wins when present."""

    attempts: int = 6  # 2+4+8+16+32 s of patience: an end-of-run push is worth a minute
    base_delay: float = 2.0
    max_delay: float = 60.0
    sleep: Callable[[float], None] = time.sleep
    honour_retry_after: bool = True


CHECK_RETRY = RetryPolicy(attempts=3, base_delay=0.5, max_delay=2.0)
# Pushed from inside the training loop (other ranks wait at the next collective): give up within ~30 s.
CHECKPOINT_RETRY = RetryPolicy(attempts=3, base_delay=5.0, max_delay=20.0, honour_retry_after=False)


@dataclass
class PushResult:
    repo_id: str
    revision: str
    commit_sha: str | None
    pushed: bool  # False: the Hub already held exactly these files
    skipped_reason: str | None
    url: str
    files: list[str] = field(default_factory=list)  # paths in the repo


def check_hub_access(
    repo_id: str,
    private: bool,
    token: str | None,
    create: bool = True,
    endpoint: str | None = None,
    retry: RetryPolicy = CHECK_RETRY,
) -> list[str]:
    """Problems that would make the final push fail (empty: none). Creates the repo if missing."""
    problems = [p for p in (_repo_id_problem(repo_id), None if token else _NO_TOKEN) if p]
    if problems or token is None:
        return problems
    api = _api(endpoint, token)
    try:
        return _with_retries(lambda: _check(api, token, repo_id, private, create), retry)
    except (HfHubHTTPError, httpx2.TransportError, OfflineModeIsEnabled) as err:
        return [_explain(err, repo_id, token, api.endpoint)]


def push_output(
    output_dir: Path,
    repo_id: str,
    token: str,
    private: bool = True,
    revision: str | None = None,
    commit_message: str | None = None,
    endpoint: str | None = None,
    retry: RetryPolicy = RetryPolicy(),
) -> PushResult:
    """Upload a finished run (adapter at the repo root, card, manifest, metrics) in one commit and
    record the result in output_dir/push.json. Pushing the same output again commits nothing."""
    output_dir = Path(output_dir)
    files = output_files(output_dir)
    message = commit_message or default_commit_message(output_dir)
    result = _push(files, repo_id, token, private, revision or "main", message, endpoint, retry)
    record = {**asdict(result), "time": datetime.now(UTC).isoformat(timespec="seconds")}
    write_json_atomic(RunDir(output_dir).push_record, record, shared=True)
    return result


def push_checkpoint(
    checkpoint_dir: Path,
    repo_id: str,
    token: str,
    branch: str = "checkpoints",
    private: bool = True,
    endpoint: str | None = None,
    retry: RetryPolicy = RetryPolicy(),
) -> PushResult:
    """Upload a trainer checkpoint (adapter and the optimizer/scheduler/RNG state needed to resume)
    to checkpoints/<name>/ on `branch`, so losing the node loses nothing."""
    checkpoint_dir = Path(checkpoint_dir)
    files = {f"checkpoints/{checkpoint_dir.name}/{rel}": path for rel, path in _files_under(checkpoint_dir)}
    if not files:
        raise InputError(f"checkpoint {checkpoint_dir} holds no files")
    step = read_json_object(checkpoint_dir / "trainer_state.json").get("global_step")
    message = f"qctrain: checkpoint {checkpoint_dir.name}" + (f" (step {step})" if step is not None else "")
    return _push(files, repo_id, token, private, branch, message, endpoint, retry)


def push_folder(
    folder: Path,
    repo_id: str,
    token: str,
    private: bool = True,
    revision: str | None = None,
    commit_message: str = "qctrain: merged model",
    endpoint: str | None = None,
    retry: RetryPolicy = RetryPolicy(),
) -> PushResult:
    """Upload every file of `folder` (e.g. a merged model) in one commit."""
    files = dict(_files_under(Path(folder)))
    if not files:
        raise InputError(f"{folder} holds no files: nothing to push")
    return _push(files, repo_id, token, private, revision or "main", commit_message, endpoint, retry)


def output_files(output_dir: Path) -> dict[str, Path]:
    """What a run publishes, path in repo -> local file: the adapter folder's files at the repo root
    (so PeftModel.from_pretrained(repo_id) works), then the run files and GGUF adapters; no
    checkpoints, no caches."""
    run = RunDir(output_dir)
    if not (run.adapter / "adapter_config.json").is_file():
        raise InputError(f"{run.adapter} holds no trained adapter (no adapter_config.json): nothing to push")
    files = dict(_files_under(run.adapter))
    for name in RunDir.PUSHED_FILES:  # the run's README.md replaces the stub card PEFT writes next to the adapter
        if (run.root / name).is_file():
            files[name] = run.root / name
    for path in sorted(run.gguf.glob("*.gguf")):  # not the Modelfile: its FROM is a local path
        files[f"gguf/{path.name}"] = path
    return files


def default_commit_message(output_dir: Path) -> str:
    """qctrain: adapter from run <id or finish time> (recipe <sha>), final loss X, eval loss Y;
    each part only when run_manifest.json holds it."""
    manifest = RunDir(output_dir).read_manifest(strict=False)
    run = _first(manifest, "run_id", "finished")
    recipe = _first(manifest, "recipe_sha256")
    message = "qctrain: adapter"
    if run is not None:
        message += f" from run {run}"
    if recipe is not None:
        message += f" (recipe {str(recipe)[:12]})"
    losses = {"final loss": ("final_loss", "metrics.train_loss"), "eval loss": ("metrics.eval_loss",)}
    for label, keys in losses.items():
        if isinstance(value := _first(manifest, *keys), int | float):
            message += f", {label} {value:.4f}"
    return message


# ---- internals -----------------------------------------------------------------------------
_NO_TOKEN = "no Hub token: set HF_TOKEN, or HF_TOKEN_FILE to a file holding a token with write access"


def _api(endpoint: str | None, token: str) -> HfApi:
    return HfApi(endpoint=endpoint, token=token, library_name="qctrain", library_version=__version__)


def _headers(token: str | None) -> dict[str, str]:
    return build_hf_headers(token=token or False, library_name="qctrain", library_version=__version__)


def _repo_id_problem(repo_id: str) -> str | None:
    try:
        validate_repo_id(repo_id)
        if repo_id.count("/") != 1:
            raise HFValidationError("it must name the owner: 'user-or-org/name'")
    except HFValidationError as err:
        return f"repo id {repo_id!r} is malformed: {err}"
    return None


def _check(api: HfApi, token: str, repo_id: str, private: bool, create: bool) -> list[str]:
    url = f"{api.endpoint}/api/whoami-v2"
    response = get_session().get(url, headers=_headers(token), timeout=CHECK_TIMEOUT_S)
    hf_raise_for_status(response)
    me = response.json()
    user, namespace = me.get("name"), repo_id.split("/")[0]
    role = ((me.get("auth") or {}).get("accessToken") or {}).get("role")
    if role == "read":
        return [f"the Hub token of '{user}' is read-only: pushing needs write access to '{namespace}'"]
    orgs = {org.get("name"): org.get("roleInOrg") for org in me.get("orgs") or []}
    if role == "write" and namespace != user and (namespace not in orgs or orgs[namespace] == "read"):
        return [
            f"the Hub token belongs to '{user}', who may not write to namespace '{namespace}' "
            f"(write access to: {', '.join([user, *(o for o, r in orgs.items() if r != 'read')])}): "
            "fix hub.repo_id or use a token of a member with write access"
        ]
    try:
        info = api.repo_info(repo_id, timeout=CHECK_TIMEOUT_S)
    except RepositoryNotFoundError:
        if not create:
            return [f"Hub repo '{repo_id}' does not exist (check hub.repo_id)"]
        api.create_repo(repo_id, private=private, exist_ok=True)
        log.info("created %s Hub repo %s", "private" if private else "public", repo_id)
        return []
    api.auth_check(repo_id, write=True)
    return [_public_problem(repo_id)] if private and info.private is False else []


def _public_problem(repo_id: str) -> str:
    return (
        f"Hub repo '{repo_id}' exists and is public, but hub.private is true: "
        "make it private on the Hub or set hub.private: false"
    )


def _push(
    files: dict[str, Path],
    repo_id: str,
    token: str,
    private: bool,
    branch: str,
    message: str,
    endpoint: str | None,
    retry: RetryPolicy,
) -> PushResult:
    if problem := _repo_id_problem(repo_id) or (None if token else _NO_TOKEN):
        raise PushFailed(problem)
    api = _api(endpoint, token)
    message = mask(message, (token,))  # built from the manifest and repo ids: no secret in the Hub's history
    head_before: list[str | None] = []  # read once: a retry after a lost answer still compares to it

    def attempt() -> str:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if branch != constants.DEFAULT_REVISION:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        if not head_before:
            info = api.repo_info(repo_id, revision=branch, timeout=CHECK_TIMEOUT_S)
            if private and info.private is False:
                raise PushFailed(_public_problem(repo_id))
            head_before.append(info.sha)
        operations = [CommitOperationAdd(path_in_repo=p, path_or_fileobj=str(f)) for p, f in files.items()]
        return api.create_commit(repo_id, operations, commit_message=message, revision=branch).oid

    try:
        sha = _with_retries(attempt, retry)
    except (HfHubHTTPError, httpx2.TransportError, OfflineModeIsEnabled) as err:
        raise PushFailed(f"{_explain(err, repo_id, token, api.endpoint)}. {_KEPT}") from None
    except ValueError as err:  # e.g. create_commit has the Hub check README.md metadata first
        raise PushFailed(f"push refused before upload: {redact(str(err), token)}. {_KEPT}") from None
    pushed = sha != head_before[0]
    url = f"{api.endpoint}/{repo_id}" + ("" if branch == constants.DEFAULT_REVISION else f"/tree/{branch}")
    log.info("%s %s@%s (%s)", "pushed to" if pushed else "already up to date:", repo_id, branch, sha)
    skipped = None if pushed else "already up to date"
    return PushResult(repo_id, branch, sha, pushed, skipped, url, sorted(files))


_KEPT = "Nothing was lost: the outputs are intact locally; fix the cause and push again"


def _with_retries(fn: Callable[[], T], retry: RetryPolicy) -> T:
    for attempt in range(1, retry.attempts + 1):
        try:
            return fn()
        except (HfHubHTTPError, httpx2.TransportError) as err:
            status = err.response.status_code if isinstance(err, HfHubHTTPError) else None
            if attempt == retry.attempts or (status is not None and status not in RETRYABLE_STATUS):
                raise
            after = _retry_after(err)
            backoff = min(retry.max_delay, retry.base_delay * 2 ** (attempt - 1))
            delay = backoff if after is None or not retry.honour_retry_after else min(after, MAX_RETRY_AFTER_S)
            what = f"HTTP {status}" if status else type(err).__name__
            log.warning("Hub answered %s; retry %d/%d in %.1fs", what, attempt, retry.attempts - 1, delay)
            retry.sleep(delay)
    raise AssertionError("unreachable")


def _retry_after(err: Exception) -> float | None:
    if not isinstance(err, HfHubHTTPError):
        return None
    try:
        return float(err.response.headers.get("Retry-After", ""))
    except ValueError:
        return None


def _explain(err: Exception, repo_id: str, token: str, endpoint: str) -> str:
    """Which of token, permission, repo id or the Hub itself is at fault, in one line."""
    namespace = repo_id.split("/")[0]
    if isinstance(err, OfflineModeIsEnabled):
        return "HF_HUB_OFFLINE is set, so the Hub cannot be reached"
    if isinstance(err, httpx2.TransportError):
        return f"cannot reach the Hub at {endpoint} ({type(err).__name__}: {redact(str(err), token)})"
    assert isinstance(err, HfHubHTTPError)
    status = err.response.status_code
    server = redact(err.server_message or "", token).strip().replace("\n", " ")
    detail = f" [Hub: {server}]" if server else ""
    if status == 401:
        return f"the Hub rejected the token (401): invalid, expired or revoked; check HF_TOKEN(_FILE){detail}"
    if status == 403:
        return (
            f"permission denied (403): the token may not write to '{repo_id}'; "
            f"it needs write access to '{namespace}'{detail}"
        )
    if isinstance(err, RevisionNotFoundError):
        return f"branch not found in '{repo_id}' (404): check hub.revision{detail}"
    if status == 404:
        return f"repo id '{repo_id}' not found (404), or not visible to this token: check hub.repo_id{detail}"
    if status in RETRYABLE_STATUS:
        return f"the Hub kept failing (HTTP {status}) after retries{detail}"
    return f"the Hub refused the request (HTTP {status}){detail}"


def _files_under(folder: Path) -> list[tuple[str, Path]]:
    """Regular files under `folder` as (posix relative path, path), skipping hidden entries."""
    found = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and not any(part.startswith(".") for part in rel.parts):
            found.append((rel.as_posix(), path))
    return found


def _first(data: dict[str, Any], *keys: str) -> Any:
    for key in keys:
        value: Any = data
        for part in key.split("."):
            value = value.get(part) if isinstance(value, dict) else None
        if value is not None:
            return value
    return None


# --- the publishing seam: where a finished run and its checkpoints go ---
#
# A destination is one Publisher class (check before training, push the run, push a checkpoint) and one
# recipe section that `publisher_for` maps to it. The Hub is the one there is; an S3 or GCS bucket would
# be a class beside HubPublisher and a `bucket:` section.

class Publisher(Protocol):
    checkpoints: bool  # push every saved checkpoint too

    def check(self, env: Mapping[str, str]) -> list[str]:
        """Problems that would make the final push fail, found before any weights load (may create the
        destination)."""

    def push_run(self, output_dir: Path) -> None:
        """Push a finished run's outputs; PushFailed (exit 4) when it cannot."""

    def push_checkpoint(self, checkpoint_dir: Path) -> str:
        """Push one saved checkpoint (from inside the training loop: give up fast); returns where it went."""


@dataclass
class HubPublisher:
    hub: HubSection
    endpoint: str | None = None

    @property
    def checkpoints(self) -> bool:
        return self.hub.push == "checkpoints"

    def check(self, env: Mapping[str, str]) -> list[str]:
        try:
            token = resolve_token(env)
        except InputError as err:
            return [str(err)]
        return check_hub_access(self.hub.repo_id, self.hub.private, token, endpoint=self.endpoint)

    def push_run(self, output_dir: Path) -> None:
        from qctrain.finished.merge import merge_adapter

        token = resolve_token()
        if not token:
            raise PushFailed(f"no Hub token: set HF_TOKEN or HF_TOKEN_FILE, then run `qctrain push {output_dir}`")
        result = push_output(output_dir, self.hub.repo_id, token, private=self.hub.private,
                             revision=self.hub.revision, endpoint=self.endpoint)
        print(f"pushed: {result.url}" if result.pushed else f"push: {result.skipped_reason}")
        if self.hub.push_merged:
            merged = merge_adapter(output_dir, RunDir(output_dir).merged)
            repo_id = self.hub.merged_repo_id or f"{self.hub.repo_id}-merged"
            result = push_folder(merged, repo_id, token, private=self.hub.private, endpoint=self.endpoint,
                                 commit_message=f"qctrain: {self.hub.repo_id} merged into its base")
            print(f"pushed merged model: {result.url}" if result.pushed else f"merged: {result.skipped_reason}")

    def push_checkpoint(self, checkpoint_dir: Path) -> str:
        token = resolve_token()
        if not token:
            raise PushFailed("no Hub token")
        return push_checkpoint(checkpoint_dir, self.hub.repo_id, token, private=self.hub.private,
                               endpoint=self.endpoint, retry=CHECKPOINT_RETRY).url


def publisher_for(recipe: Recipe) -> Publisher | None:
    """Where this recipe's run goes (None: nowhere)."""
    if recipe.hub is not None and recipe.hub.push != "never":
        return HubPublisher(recipe.hub)
    return None


def publish_after_training(recipe: Recipe, output_dir: Path, stopped_by: str | None, world_size: int) -> int:
    """The end of `train`: push the finished run, unless a stop signal came after training."""
    publisher = publisher_for(recipe)
    if publisher is None:
        return 0
    if stopped_by is not None and world_size > 1:
        # A rerun would need every rank again (other nodes' pods may have finished): push by hand.
        raise PushFailed(f"stopped by {stopped_by} after training; outputs complete in {output_dir}, "
                         f"not pushed: run `qctrain push {output_dir}`")
    if stopped_by is not None:
        raise Preempted(f"stopped by {stopped_by} after training; outputs complete in {output_dir}, not pushed: "
                        "rerun the same command to push")
    return push_finished(output_dir, publisher)


def push_finished(output_dir: Path, publisher: Publisher) -> int:

    restore_interrupted_swap(RunDir(output_dir).adapter)
    publisher.push_run(output_dir)
    return 0


def push_again(output_dir: Path) -> int:
    """`qctrain push OUTPUT_DIR`: push a finished run where its recipe says."""
    run = RunDir(output_dir)
    recipe = run.read_recipe()
    if recipe.hub is None:
        raise InputError(f"{run.manifest}: the run's recipe has no hub: section")
    return push_finished(output_dir, HubPublisher(recipe.hub))
