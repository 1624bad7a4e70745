"""Checkpoints that survive preemption and crashes, and the decision whether a run resumes.

A checkpoint is written into `<output.dir>/checkpoints/.partial-checkpoint-N/checkpoint-N`, every file
fsynced, then the completion marker `qctrain_checkpoint.json` is written (fsynced), and only then is
the folder renamed to `checkpoints/checkpoint-N`. So a `checkpoint-N` folder is either complete or
absent; anything else (a `.partial-*` folder, a `checkpoint-N` without the marker, e.g. from a
SIGKILL or a full disk) is ignored and removed before the next run trains.

The marker records the training recipe (model:, lora:, data: and every train: value SFTConfig gets),
its fingerprint and the prepared data's fingerprint. A run resumes only from a checkpoint of the same
data, and of a recipe that differs at most in knobs that do not change the weights (`harmless`): how
fast or how visibly it trains, when it saves, where it pushes. Anything else is refused, naming each
changed key with its old and new value.
"""

import hashlib
import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qctrain.atomic import swap_in_folder, write_json_atomic
from qctrain.errors import InputError
from qctrain.recipe import Recipe, canonical_json, harmless
from qctrain.rundir import RunDir

MARKER = "qctrain_checkpoint.json"
PREFIX = "checkpoint"  # transformers' PREFIX_CHECKPOINT_DIR
PARTIAL_PREFIX = ".partial-"
_STEP = re.compile(rf"^{PREFIX}-(\d+)$")

def checkpoints_dir(output_dir: Path) -> Path:
    return RunDir(Path(output_dir)).checkpoints


def training_recipe(recipe: Recipe) -> dict[str, Any]:
    """The recipe as training sees it: everything but hub: and output:, with train: as SFTConfig gets it."""
    parts = recipe.model_dump(mode="json", exclude={"hub", "output"})
    parts["train"] = recipe.sft_kwargs()
    return parts


def recipe_fingerprint(recipe: Recipe) -> str:
    """sha256 of the training recipe without its harmless knobs: equal for recipes that train alike."""
    parts = training_recipe(recipe)
    weighty = {section: {k: v for k, v in values.items() if not harmless(f"{section}.{k}", v, v)}
               if isinstance(values, dict) else values for section, values in parts.items()}
    return hashlib.sha256(canonical_json(weighty).encode()).hexdigest()


def step_of(path: Path) -> int | None:
    match = _STEP.match(path.name)
    return int(match.group(1)) if match else None


def read_marker(path: Path) -> dict[str, Any] | None:
    try:
        marker = json.loads((path / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("complete") is True else None


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.is_dir() and step_of(p) is not None and read_marker(p)]
    return sorted(found, key=lambda p: step_of(p) or 0)


def incomplete_entries(ckpt_dir: Path) -> list[Path]:
    """Half-written checkpoints: staging folders and checkpoint-N folders without a valid marker."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p for p in ckpt_dir.iterdir()
                  if p.name.startswith(PARTIAL_PREFIX)
                  or (p.is_dir() and step_of(p) is not None and read_marker(p) is None))


def remove_incomplete(ckpt_dir: Path) -> list[Path]:
    entries = incomplete_entries(ckpt_dir)
    for entry in entries:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
    return entries


def _fsync_path(path: Path, directory: bool = False) -> None:
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under root, then every folder (deepest first), so a rename publishes data on disk."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            _fsync_path(Path(folder) / name)
        _fsync_path(Path(folder), directory=True)


def commit(written: Path, final: Path, marker: dict[str, Any]) -> None:
    """Make the fully written checkpoint folder `written` appear as `final`, atomically."""
    fsync_tree(written)
    write_json_atomic(written / MARKER, {**marker, "complete": True})
    _fsync_path(written, directory=True)
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


@dataclass
class ResumePlan:
    output_dir: Path
    checkpoint: Path | None  # None: start at step 0
    restart: bool  # discard every checkpoint (and the metrics log) before training
    fingerprint: str
    recipe_parts: dict[str, Any]

    @property
    def step(self) -> int:
        return step_of(self.checkpoint) or 0 if self.checkpoint else 0

    @property
    def marker(self) -> dict[str, Any]:
        return (read_marker(self.checkpoint) or {}) if self.checkpoint else {}

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
                print(f"removed {len(removed)} incomplete checkpoint folder(s) (no {MARKER}): "
                      f"{', '.join(p.name for p in removed)}", flush=True)
        if self.checkpoint is None:
            metrics.unlink(missing_ok=True)
        else:
            trim_metrics(metrics, self.step)


def plan_resume(recipe: Recipe, restart: bool = False) -> ResumePlan:
    """Decide (without changing anything) whether `train` resumes, and from which checkpoint.

    Raises InputError when the newest complete checkpoint belongs to a different recipe and
    `restart` is not set.
    """
    output_dir = Path(recipe.output.dir)
    parts = training_recipe(recipe)
    fingerprint = recipe_fingerprint(recipe)
    plan = ResumePlan(output_dir, None, restart, fingerprint, parts)
    if restart:
        return plan
    complete = complete_checkpoints(checkpoints_dir(output_dir))
    if not complete:
        return plan
    newest = complete[-1]
    marker = read_marker(newest) or {}
    recorded = marker.get("recipe")
    changed = changed_keys(recorded, parts) if isinstance(recorded, dict) else [("(recipe)", None, None)]
    blocking = [(key, old, new) for key, old, new in changed if not harmless(key, old, new)]
    if blocking:
        shown = ", ".join(f"{key} ({_shown(old)} -> {_shown(new)})" if key != "(recipe)" else "unknown"
                          for key, old, new in blocking[:6])
        more = f" and {len(blocking) - 6} more" if len(blocking) > 6 else ""
        raise InputError(f"{newest}: checkpoint of a different recipe (changed: {shown}{more}); "
                         "rerun with --restart to discard the checkpoints and start fresh, "
                         "or set another output.dir")
    if changed:
        print(f"resuming with changed knobs that do not change the weights: "
              f"{', '.join(f'{key} ({_shown(old)} -> {_shown(new)})' for key, old, new in changed)}", flush=True)
    plan.checkpoint = newest
    return plan
