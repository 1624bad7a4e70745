"""Every private name of a library that qctrain reads, writes or overrides, in one place, with the library versions
they were checked on. Each is used only where no public API serves (the entry says why).

tests/test_trainer_private_api.py holds each entry to the installed (locked) versions and fails loudly when one
moves; it also fails when the package uses a private name of a library that is not listed here. After a lock change:
re-read the code named in `where`, adjust ours (or drop it for a public API), then update CHECKED_ON.
"""

from dataclasses import dataclass

# The versions these entries were read against (docker/requirements.in pins the same).
CHECKED_ON = {"transformers": "5.24.0", "trl": "1.16.0", "bitsandbytes": "0.50.2", "python": "3.11"}


@dataclass(frozen=True)
class Private:
    where: str  # the library's object that holds the names
    names: tuple[str, ...]
    used_by: str  # our code that uses them
    why: str  # why no public API serves


TRAINER_CHECKPOINTS = Private(
    "transformers.Trainer", ("_save_checkpoint", "_get_output_dir"), "train.AtomicCheckpoints",
    "overridden: no public hook lets a checkpoint be written into a staging folder and renamed into place before the "
    "Trainer rotates the old ones away (a callback's on_save runs after the rotation)")
SFT_TRAINER_METRICS = Private(
    "trl.SFTTrainer", ("_metrics", "_total_train_tokens", "aux_loss_enabled"), "train.QcTrainer.compute_loss",
    "the lean loss keeps SFTTrainer's logged metrics (num_tokens, entropy, mean_token_accuracy) where SFTTrainer "
    "keeps and logs them, and takes its plain path only where SFTTrainer would (no router aux loss)")
CHAT_TEMPLATE = Private(
    "transformers.utils.chat_template_utils",
    ("_compile_jinja_template", "_render_with_assistant_indices", "_plain_template_data"), "data.tokens._render_direct",
    "render_jinja_template without its per-conversation copy (a fifth of the render time); where they are missing "
    "the public render_jinja_template renders")
POOL_PIPES = Private(
    "multiprocessing.pool.Pool", ("_inqueue", "_outqueue", "_writer"), "data.workers._widen_pipes",
    "the pool's pipes widened to 1 MiB (a chunk in one write); where they are missing the pipes stay as they are")
BNB_LIBRARY = Private(
    "bitsandbytes.cextension", ("ErrorHandlerMockBNBNativeLibrary",), "doctor._bnb_library",
    "the class of bitsandbytes' stand-in when its native library failed to load: how doctor tells that apart")
TRL_PREPARE = Private(
    "trl.SFTTrainer", ("_prepare_dataset",), "bench/prep.py",
    "the benchmark's baseline: TRL's own preparation of the same records, timed")

PRIVATE = (TRAINER_CHECKPOINTS, SFT_TRAINER_METRICS, CHAT_TEMPLATE, POOL_PIPES, BNB_LIBRARY, TRL_PREPARE)
NAMES = frozenset(name for entry in PRIVATE for name in entry.names)
