"""`qctrain merge`: a standalone model, the finished run's adapter merged into its base (unquantized), written
beside its destination first and then swapped in whole."""

from pathlib import Path

import torch

from qctrain import __version__
from qctrain.atomic import make_shareable, staging_beside, staging_folder, swap_in_folder
from qctrain.basemodel.reference import base_license
from qctrain.card import merged_card
from qctrain.errors import InputError
from qctrain.finished.load import FinishedRun
from qctrain.rundir import RunDir

MERGED_MARKER = ".qctrain-merged"  # in a merged model's folder: qctrain wrote it, a later merge may replace it


def merge_adapter(output_dir: Path, dest: Path, dtype: torch.dtype = torch.bfloat16) -> Path:
    """A standalone model: the base loaded unquantized in `dtype`, with the adapter merged into it.
    Written next to `dest` first, then moved into place. Works from any folder; a base or adapter
    that cannot be loaded is an input error (exit 2) naming the cause."""
    finished = FinishedRun.open(output_dir)
    check_merge_dest(output_dir, dest)
    model, tokenizer = finished.load(dtype)
    merged = model.merge_and_unload()
    reference = finished.reference
    needed = sum(p.numel() * p.element_size() for p in merged.parameters())
    with staging_folder(staging_beside(dest), needed) as staging:
        merged.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        card = merged_card(reference, base_license(reference), output_dir.name, str(dtype).removeprefix("torch."))
        (staging / "README.md").write_text(card, encoding="utf-8")
        (staging / MERGED_MARKER).write_text(f"qc-train-phi {__version__}\n", encoding="utf-8")
    make_shareable(staging)
    swap_in_folder(staging, dest)
    return dest


def check_merge_dest(output_dir: Path, dest: Path) -> None:
    """A merge replaces `dest` whole: it must be absent, empty, or a merged model qctrain wrote (its marker)."""
    if dest.resolve() == RunDir(output_dir).merged.resolve() or not dest.exists():
        return
    if not dest.is_dir():
        raise InputError(f"--dest {dest}: is a file, not a folder")
    if any(dest.iterdir()) and not (dest / MERGED_MARKER).is_file():
        raise InputError(f"--dest {dest}: holds files qctrain did not write, and a merge replaces the folder whole; "
                         "name a new or empty folder")
