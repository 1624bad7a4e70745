"""Experiment trackers (train.report_to: wandb, mlflow, trackio, tensorboard): where their files go when the
user has not said.

transformers' own callbacks do the logging; this only fills in the environment they read, before they start,
so that a run keeps its tracker files in output.dir and works without a network:
- wandb: WANDB_DIR=output.dir (runs in output.dir/wandb/); WANDB_MODE=offline unless WANDB_API_KEY is set
  (and HF_HUB_OFFLINE is not): sync later with `wandb sync output.dir/wandb/offline-run-*`.
- mlflow: MLFLOW_TRACKING_URI=file:output.dir/mlruns, the skinny client's local file store (with
  MLFLOW_ALLOW_FILE_STORE=true, which MLflow 3 asks for it); a server URI of the user's is left alone.
- trackio: TRACKIO_DIR=output.dir/trackio (its SQLite database; `trackio show` reads it there).
- tensorboard: nothing (TrainingArguments.logging_dir already sits under output.dir).
A variable the user set is never changed. API keys (WANDB_API_KEY, MLFLOW_TRACKING_PASSWORD/TOKEN) are read
by the trackers themselves from the environment; nothing here prints or writes them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, MutableMapping
from pathlib import Path

TRACKERS = ("wandb", "mlflow", "trackio", "tensorboard")


def requested(report_to: str | Iterable[str] | None) -> list[str]:
    """The trackers a train.report_to value names ("all" counts as every one installed here)."""
    if report_to is None:
        return []
    names = [report_to] if isinstance(report_to, str) else list(report_to)
    if "all" in names:
        import importlib.util

        return [t for t in TRACKERS if importlib.util.find_spec(t) is not None]
    return [n for n in names if n in TRACKERS]


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def offline_defaults(trackers: Iterable[str], output_dir: Path, env: Mapping[str, str]) -> dict[str, str]:
    """The variables to set for these trackers (those the environment does not set already); pure."""
    out = output_dir.absolute()
    wanted: dict[str, str] = {}
    trackers = set(trackers)
    if "wandb" in trackers:
        wanted["WANDB_DIR"] = str(out)
        if not env.get("WANDB_API_KEY", "").strip() or _truthy(env.get("HF_HUB_OFFLINE")):
            wanted["WANDB_MODE"] = "offline"
    if "mlflow" in trackers and not env.get("MLFLOW_TRACKING_URI", "").strip():
        wanted["MLFLOW_TRACKING_URI"] = f"file:{out / 'mlruns'}"
        # MLflow 3 refuses its file store unless asked (the skinny client has no SQL store to offer instead)
        wanted["MLFLOW_ALLOW_FILE_STORE"] = "true"
    if "trackio" in trackers:
        wanted["TRACKIO_DIR"] = str(out / "trackio")
    return {name: value for name, value in wanted.items() if not env.get(name, "").strip()}


def apply(report_to, output_dir: Path, env: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set the defaults in the environment (the trackers read it when transformers starts them); returns them."""
    env = os.environ if env is None else env
    defaults = offline_defaults(requested(report_to), output_dir, env)
    env.update(defaults)
    return defaults


def offline_runs(output_dir: Path) -> list[str]:
    """One line per tracker run kept in output_dir for a later upload (wandb's offline runs), with how to."""
    runs = sorted((output_dir / "wandb").glob("offline-run-*"))
    return [f"wandb: offline run in {run}; upload it with `wandb sync {run}`" for run in runs[-1:]]
