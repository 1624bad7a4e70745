"""Checkpoints that survive preemption and crashes, and the decision whether a run resumes.

A checkpoint is written into `<output.dir>/checkpoints/.partial-checkpoint-N/checkpoint-N`, every file
fsynced, then the completion marker `qctrain_checkpoint.json` is written (fsynced), and only then is
the folder renamed to `checkpoints/checkpoint-N`. So a `checkpoint-N` folder is either complete or
absent; anything else (a `.partial-*` folder, a `checkpoint-N` whose marker is missing, broken or not
`complete`, e.g. from a SIGKILL or a full disk) is ignored and removed before the next run trains. A marker that
cannot be read at all (EIO, EACCES) says nothing: that checkpoint is neither used nor removed. A complete
checkpoint whose files do not load (a damaged disk) is passed over for the one before it.

The marker records the training recipe (model:, lora:, data: and every train: value SFTConfig gets),
its fingerprint and the prepared data's fingerprint. A run resumes only from a checkpoint of the same
data, and of a recipe that differs at most in knobs that do not change the weights (`harmless`): how
fast or how visibly it trains, when it saves, where it pushes. Anything else is refused, naming each
changed key with its old and new value.
"""

import errno
import hashlib
import json
import os
import re
import shutil
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qctrain.atomic import fsync_tree, restore_interrupted_swap, swap_in_folder, write_json_atomic
from qctrain.errors import InputError
from qctrain.recipe import Recipe, canonical_json
from qctrain.rundir import RunDir

MARKER = "qctrain_checkpoint.json"
PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR
PARTIAL_PREFIX = ".partial-"
TRAINER_STATE = "trainer_state.json"  # transformers' TRAINER_STATE_NAME
_STEP = re.compile(rf"^{PREFIX}-(\d+)$")
COMPLETE, INCOMPLETE, UNREADABLE = "complete", "incomplete", "unreadable"  # what a checkpoint's marker says

# The resume policy: train: knobs that decide speed, memory, logging, evaluation, saving or pushing, never
# the weights; changing them between a preemption and the rerun does not stop the run from resuming
# (plan_resume).
HARMLESS_TRAIN_KEYS = frozenset({
    "report_to", "run_name", "project", "trackio_space_id", "disable_tqdm", "log_level", "log_level_replica",
    "log_on_each_node", "per_device_eval_batch_size", "use_liger_kernel",
    "liger_kernel_config", "skip_memory_metrics", "ddp_timeout", "ddp_find_unused_parameters",
    "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_backend", "use_cpu", "overwrite_output_dir",
    "resume_from_checkpoint", "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
    "prediction_loss_only", "batch_eval_metrics", "restore_callback_states_from_checkpoint",
    "tf32", "torch_empty_cache_steps", "enable_jit_checkpoint",
    # dpo/kto: the reference's log-probabilities computed up front, or memory moved to the CPU: the same weights
    "precompute_ref_log_probs", "precompute_ref_batch_size", "activation_offloading",
})
HARMLESS_TRAIN_PREFIXES = ("dataloader_", "activation_checkpointing", "gradient_checkpointing", "torch_compile",
                           "logging_", "eval_", "save_", "hub_", "push_to_hub", "include_", "jit_")
# Named like harmless knobs, but they change the weights: dataloader_drop_last changes which records each epoch
# trains on, ignore_data_skip replays the data from the start on resume, auto_find_batch_size changes the
# batch size (and with it the steps and the schedule).
WEIGHT_CHANGING_TRAIN_KEYS = frozenset({"dataloader_drop_last", "ignore_data_skip", "auto_find_batch_size"})
# Attention kernels that compute the same attention (up to rounding): switching between them is harmless.
EQUIVALENT_ATTENTION = frozenset({"sdpa", "eager", "flash_attention_2", "flash_attention_3"})


def harmless(key: str, old: Any, new: Any) -> bool:
    """Whether changing recipe key `key` (dotted) from old to new leaves the trained weights as they were."""
    if key == "model.attn_implementation":
        return old in EQUIVALENT_ATTENTION and new in EQUIVALENT_ATTENTION
    section, _, name = key.partition(".")
    name = name.split(".", 1)[0]
    return section == "train" and name not in WEIGHT_CHANGING_TRAIN_KEYS and (
        name in HARMLESS_TRAIN_KEYS or name.startswith(HARMLESS_TRAIN_PREFIXES))


def checkpoints_dir(output_dir: Path) -> Path:
    return RunDir(Path(output_dir)).checkpoints


def training_recipe(recipe: Recipe, parent: dict[str, Any] | None = None) -> dict[str, Any]:
    """The recipe as training sees it: everything but hub:, output: and evaluate:, with train: as the method's TRL
    config gets it; for a dpo/kto run that continues an adapter, that adapter's identity (`parent`: its sha256
    above all, so a changed SFT adapter under the same path does not resume)."""
    parts = recipe.model_dump(mode="json", exclude={"hub", "output", "evaluate"})
    parts["train"] = recipe.sft_kwargs()
    if parent is not None:
        parts["parent"] = parent
    return parts


def recipe_fingerprint(recipe: Recipe, parent: dict[str, Any] | None = None) -> str:
    """sha256 of the training recipe without its harmless knobs: equal for recipes that train alike."""
    parts = training_recipe(recipe, parent)
    weighty = {section: {k: v for k, v in values.items() if not harmless(f"{section}.{k}", v, v)}
               if isinstance(values, dict) else values for section, values in parts.items()}
    return hashlib.sha256(canonical_json(weighty).encode()).hexdigest()


def step_of(path: Path) -> int | None:
    match = _STEP.match(path.name)
    return int(match.group(1)) if match else None


def marker_state(path: Path) -> tuple[str, dict[str, Any] | None, OSError | None]:
    """What the checkpoint folder's marker says: COMPLETE (with the marker), INCOMPLETE (read, and missing,
    broken or not complete) or UNREADABLE (the read failed: EIO, EACCES...; with the error)."""
    try:
        text = (path / MARKER).read_bytes()
    except (FileNotFoundError, NotADirectoryError):
        return INCOMPLETE, None, None
    except OSError as err:
        return UNREADABLE, None, err
    try:
        marker = json.loads(text)
    except ValueError:
        return INCOMPLETE, None, None
    if isinstance(marker, dict) and marker.get("complete") is True:
        return COMPLETE, marker, None
    return INCOMPLETE, None, None


def read_marker(path: Path) -> dict[str, Any] | None:
    """The marker of a complete checkpoint; None for any other."""
    state, marker, _ = marker_state(path)
    return marker if state == COMPLETE else None


def _checkpoint_folders(ckpt_dir: Path) -> list[Path]:
    if not ckpt_dir.is_dir():
        return []
    return sorted((p for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p) is not None),
                  key=lambda p: step_of(p) or 0)


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    return [p for p in _checkpoint_folders(ckpt_dir) if marker_state(p)[0] == COMPLETE]


def unreadable_checkpoints(ckpt_dir: Path) -> list[tuple[Path, OSError]]:
    return [(p, err) for p in _checkpoint_folders(ckpt_dir) if (err := marker_state(p)[2]) is not None]


def incomplete_entries(ckpt_dir: Path) -> list[Path]:
    """Half-written checkpoints: staging folders and checkpoint-N folders whose marker was read and does not say
    complete (never one whose marker could not be read)."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir()
                  if p.name.startswith(PARTIAL_PREFIX)
                  or (p.is_dir() and step_of(p) is not None and marker_state(p)[0] == INCOMPLETE))


def remove_incomplete(ckpt_dir: Path) -> list[Path]:
    entries = incomplete_entries(ckpt_dir)
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return entries


def restore_asides(ckpt_dir: Path) -> None:
    """A crash between the two renames of commit's swap leaves the good checkpoint-N aside: put it back."""
    if ckpt_dir.is_dir():
        for aside in ckpt_dir.glob(f"{PARTIAL_PREFIX}old-{PREFIX}-*"):
            restore_interrupted_swap(ckpt_dir / aside.name.removeprefix(f"{PARTIAL_PREFIX}old-"), aside)


def load_problem(path: Path) -> str | None:
    """Why the checkpoint's files would not load (None: they all do): JSON that does not parse, a safetensors
    file that does not load, a torch file (a zip archive) that fails its checksums, no trainer state. Reads every
    byte once and unpickles nothing."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (path / TRAINER_STATE).is_file():
        return f"no {TRAINER_STATE}"
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = file.relative_to(path).as_posix()
        try:
            if file.suffix == ".json":
                json.loads(file.read_bytes())
            elif file.suffix == ".safetensors":
                load_file(file)
            elif file.suffix in (".pt", ".pth", ".bin"):
                with zipfile.ZipFile(file) as archive:
                    if (bad := archive.testzip()) is not None:
                        return f"{name}: {bad} fails its checksum"
        except (OSError, ValueError, zipfile.BadZipFile, SafetensorError) as err:
            return f"{name}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
    return None


def trainer_state(path: Path) -> dict[str, Any]:
    try:
        state = json.loads((path / TRAINER_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return state if isinstance(state, dict) else {}


def commit(written: Path, final: Path, marker: dict[str, Any]) -> None:
    """Make the fully written checkpoint folder `written` appear as `final`, atomically."""
    fsync_tree(written)
    write_json_atomic(written / MARKER, {**marker, "complete": True})
    fsync_tree(written, files=False)
    # The same step saved twice: the new copy replaces the old one whole.
    swap_in_folder(written, final, aside=final.with_name(f"{PARTIAL_PREFIX}old-{final.name}"), fsync_parent=True)


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs."""
    if isinstance(old, dict) and isinstance(new, dict):
        keys = sorted(set(old) | set(new), key=str)
        return [change for key in keys for change in changed_keys(old.get(key), new.get(key),
                                                                  f"{prefix}.{key}" if prefix else str(key))]
    return [] if old == new else [(prefix or "(recipe)", old, new)]


def _shown(value: Any) -> str:
    text = "unset" if value is None else canonical_json(value)
    return text if len(text) <= 40 else text[:37] + "..."


def trim_metrics(path: Path, step: int) -> int:
    """Drop the rows past `step` (and the end-of-run summary of an interrupted run): a resumed run logs
    them again. Returns the number of rows dropped."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            dropped += 1  # a line cut short by a crash
            continue
        if not isinstance(row, dict) or row.get("step", 0) > step or "train_runtime" in row:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
        os.replace(tmp, path)
    return dropped


def newest_size(ckpt_dir: Path) -> int | None:
    """Bytes in the newest complete checkpoint: about what the next one needs."""
    complete = complete_checkpoints(ckpt_dir)
    if not complete:
        return None
    return sum(p.stat().st_size for p in complete[-1].rglob("*") if p.is_file())


def checkpoint_record(path: Path | None) -> dict[str, Any] | None:
    """What names a complete checkpoint for good (run_manifest.json records the newest one its outputs follow):
    its name and the time its marker was written."""
    marker = read_marker(path) if path is not None else None
    return {"name": path.name, "saved": marker.get("saved")} if path is not None and marker else None


def _iso(timestamp: float) -> str:
    return datetime.fromtimestamp(timestamp, UTC).isoformat(timespec="seconds")


@dataclass
class ResumePlan:
    output_dir: Path
    checkpoint: Path | None  # None: start at step 0
    restart: bool  # discard every checkpoint (and the metrics log) before training
    fingerprint: str
    recipe_parts: dict[str, Any]
    newest: Path | None = None  # the newest complete checkpoint, loadable or not

    @property
    def step(self) -> int:
        return step_of(self.checkpoint) or 0 if self.checkpoint else 0

    @property
    def marker(self) -> dict[str, Any]:
        return (read_marker(self.checkpoint) or {}) if self.checkpoint else {}

    @property
    def finished(self) -> bool:
        """Training ended at this checkpoint (its step reached the run's max_steps, what max_steps or the epochs
        asked for): there is nothing left to train."""
        state = trainer_state(self.checkpoint) if self.checkpoint else {}
        step, last = state.get("global_step"), state.get("max_steps")
        return isinstance(step, int) and isinstance(last, int) and 0 < last <= step

    def outputs_current(self, data_fingerprint: str) -> bool:
        """The outputs in output.dir (adapter/, run_manifest.json) were written after the newest complete checkpoint,
        for this recipe and data: the run is complete and nothing is left to train."""
        run = RunDir(self.output_dir)
        manifest = run.read_manifest(strict=False)
        if self.restart or not (run.adapter / "adapter_config.json").is_file():
            return False
        if not isinstance(manifest.get("data"), dict) or manifest["data"].get("fingerprint") != data_fingerprint:
            return False
        if "checkpoint" in manifest:
            return (manifest.get("recipe_fingerprint") == self.fingerprint
                    and manifest["checkpoint"] == checkpoint_record(self.newest))
        # A manifest of a version before the record: the same training recipe, written after the newest checkpoint.
        try:
            fingerprint = recipe_fingerprint(Recipe.model_validate(manifest.get("recipe")))
        except ValueError:
            return False
        saved = (read_marker(self.newest) or {}).get("saved") if self.newest else None
        return fingerprint == self.fingerprint and (
            self.newest is None or isinstance(saved, int | float) and str(manifest.get("finished")) >= _iso(saved))

    def check_data(self, data_fingerprint: str) -> None:
        recorded = self.marker.get("data_fingerprint")
        if self.checkpoint and recorded and recorded != data_fingerprint:
            raise InputError(f"{self.checkpoint}: the training data changed since this checkpoint was saved; "
                             "rerun with --restart to discard the checkpoints and start fresh, or restore "
                             "the data")

    def apply(self) -> None:
        """Make the output folder match the plan: called right before training starts."""
        ckpt_dir = checkpoints_dir(self.output_dir)
        metrics = RunDir(self.output_dir).metrics
        if self.restart:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        else:
            removed = remove_incomplete(ckpt_dir)
            if removed:
                print(f"removed {len(removed)} incomplete checkpoint folder(s) (not marked complete): "
                      f"{', '.join(p.name for p in removed)}", flush=True)
        if self.checkpoint is None:
            metrics.unlink(missing_ok=True)
        else:
            trim_metrics(metrics, self.step)


def _changed_recipe(checkpoint: Path, parts: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """The keys in which the recipe differs from the checkpoint's; InputError if one of them changes the weights."""
    recorded = (read_marker(checkpoint) or {}).get("recipe")
    changed = changed_keys(recorded, parts) if isinstance(recorded, dict) else [("(recipe)", None, None)]
    blocking = [(key, old, new) for key, old, new in changed if not harmless(key, old, new)]
    if blocking:
        shown = ", ".join(f"{key} ({_shown(old)} -> {_shown(new)})" if key != "(recipe)" else "unknown"
                          for key, old, new in blocking[:6])
        more = f" and {len(blocking) - 6} more" if len(blocking) > 6 else ""
        raise InputError(f"{checkpoint}: checkpoint of a different recipe (changed: {shown}{more}); "
                         "rerun with --restart to discard the checkpoints and start fresh, "
                         "or set another output.dir")
    return changed


def plan_resume(recipe: Recipe, restart: bool = False, parent: dict[str, Any] | None = None) -> ResumePlan:
    """Decide (changing nothing but putting back a checkpoint a crash left aside) whether `train` resumes, and
    from which checkpoint: the newest complete one whose files load, else the one before it. `parent`: the
    identity of the adapter a dpo/kto run continues (training_recipe).

    Raises InputError when that checkpoint belongs to a different recipe and `restart` is not set, or when no
    complete checkpoint loads.
    """
    output_dir = RunDir.of(recipe).root
    parts = training_recipe(recipe, parent)
    fingerprint = recipe_fingerprint(recipe, parent)
    plan = ResumePlan(output_dir, None, restart, fingerprint, parts)
    if restart:
        return plan
    ckpt_dir = checkpoints_dir(output_dir)
    restore_asides(ckpt_dir)
    for path, err in unreadable_checkpoints(ckpt_dir):
        print(f"{path}: its {MARKER} cannot be read ({errno.errorcode.get(err.errno or 0, '?')}: {err.strerror}); "
              "not resumed from, not removed", flush=True)
    complete = complete_checkpoints(ckpt_dir)
    if not complete:
        return plan
    plan.newest = complete[-1]
    passed_over = []
    for candidate in reversed(complete):
        problem = load_problem(candidate)
        if problem is None:
            plan.checkpoint = candidate
            break
        passed_over.append(f"{candidate.name} ({problem})")
    if passed_over:
        print(f"cannot load {'; '.join(passed_over)}: passed over, not removed", flush=True)
    if plan.checkpoint is None:
        raise InputError(f"{ckpt_dir}: no complete checkpoint loads (the newest: {passed_over[0]}); rerun with "
                         "--restart to discard the checkpoints and start fresh")
    changed = _changed_recipe(plan.checkpoint, parts)
    if changed:
        print(f"resuming with changed knobs that do not change the weights: "
              f"{', '.join(f'{key} ({_shown(old)} -> {_shown(new)})' for key, old, new in changed)}", flush=True)
    return plan
