"""Every private name of a library that qctrain reads, writes or overrides, in one place, with the library versions
they were checked on. Each is used only where no public API serves (the entry says why).

tests/test_trainer_private_api.py holds each entry to the installed (locked) versions and fails loudly when one
moves; it also fails when the package uses a private name of a library that is not listed here. After a lock change:
re-read the code named in `where`, adjust ours (or drop it for a public API), then update CHECKED_ON.
"""

from dataclasses import dataclass

# The versions these entries were read against (docker/requirements.in pins the same).
CHECKED_ON = {"transformers": "5.24.0", "trl": "1.16.0", "bitsandbytes": "0.50.2", "lm-eval": "0.4.13",
              "python": "3.11"}


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
PREFERENCE_PREPARE = Private(
    "trl.DPOTrainer, trl.KTOTrainer", ("_prepare_dataset",), "preference.QcDPOTrainer, preference.QcKTOTrainer",
    "overridden: TRL 1.16 tokenizes every data set it is given again and has no switch to skip it (SFTConfig's "
    "skip_prepare_dataset has no DPO/KTO counterpart); the data stage's rows, equal to its processing, pass through")

LM_EVAL_TASK_FILE = Private(
    "lm_eval.tasks._yaml_loader", ("load_yaml",), "evaluate.read_task_file",
    "lm-eval's own reader of a task YAML (its !function tags and include:), which no public function returns as a "
    "config dict; qctrain then makes the data paths relative to the file and hands lm-eval the dict")
LM_EVAL_QUIETED = Private(
    "lm_eval.evaluator", ("get_git_commit_hash", "add_env_info"), "evaluate._quiet_lm_eval",
    "replaced while qctrain scores (evaluate.QUIETED): simple_evaluate runs `git describe` (git writes 'fatal: not "
    "a git repository' to fd 2) and torch's collect_env (subprocesses) for a report qctrain does not keep; no "
    "argument turns them off")

TRL_FUSED_HEAD = Private(
    "trl.trainer.utils", ("_use_triton",), "preference.compact_head_on_cpu",
    "the fused LM head of DPO/KTO scores only the completion positions where this says the device runs Triton; no "
    "public switch makes it do so on CPU, where it scores every position of the padded batch instead")

PRIVATE = (TRAINER_CHECKPOINTS, SFT_TRAINER_METRICS, CHAT_TEMPLATE, POOL_PIPES, BNB_LIBRARY, TRL_PREPARE,
           PREFERENCE_PREPARE, TRL_FUSED_HEAD, LM_EVAL_TASK_FILE, LM_EVAL_QUIETED)
NAMES = frozenset(name for entry in PRIVATE for name in entry.names)
