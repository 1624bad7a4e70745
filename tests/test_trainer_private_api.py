"""The private transformers Trainer API that train.AtomicCheckpoints overrides, pinned to the locked version.

When transformers moves, this fails loudly: re-read Trainer._save_checkpoint, adjust the adapter (or drop it
for a public hook), then update the pins here.
"""

import inspect
import re
from pathlib import Path

import transformers
from qctrain.train import AtomicCheckpoints, QcTrainer
from transformers import Trainer

LOCK_IN = Path(__file__).resolve().parents[1] / "docker" / "requirements.in"


def test_transformers_is_the_locked_version():
    locked = re.search(r"^transformers==(\S+)$", LOCK_IN.read_text(encoding="utf-8"), re.M).group(1)
    assert transformers.__version__ == locked


def test_the_two_private_methods_keep_their_shape():
    assert list(inspect.signature(Trainer._save_checkpoint).parameters) == ["self", "model", "trial"]
    assert list(inspect.signature(Trainer._get_output_dir).parameters) == ["self", "trial"]
    source = inspect.getsource(Trainer._save_checkpoint)
    # The staging trick: the checkpoint folder is <_get_output_dir(trial)>/checkpoint-<global_step>.
    assert "run_dir = self._get_output_dir(trial=trial)" in source
    assert 'checkpoint_folder = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"' in source
    assert "os.path.join(run_dir, checkpoint_folder)" in source


def test_only_the_adapter_overrides_private_trainer_methods():
    from trl import SFTTrainer

    private = {name for name in dir(SFTTrainer) if name.startswith("_") and not name.startswith("__")}
    assert {name for name in vars(AtomicCheckpoints) if name in private} == {"_save_checkpoint", "_get_output_dir"}
    assert not {name for name in vars(QcTrainer) if name in private}


def test_the_preference_trainers_override_only_the_pinned_private_methods():
    """DPO/KTO (qctrain.preference): besides the checkpoint adapter, `_prepare_dataset` alone, which TRL 1.16 calls
    on every data set it is given (there is no switch to skip its tokenizing) and which the prepared rows pass
    through unchanged."""
    from qctrain.preference import QcDPOTrainer, QcKTOTrainer
    from trl import DPOTrainer, KTOTrainer

    for ours, theirs in ((QcDPOTrainer, DPOTrainer), (QcKTOTrainer, KTOTrainer)):
        private = {name for name in dir(theirs) if name.startswith("_") and not name.startswith("__")}
        assert {name for name in vars(ours) if name in private} == {"_prepare_dataset"}
        assert list(inspect.signature(theirs._prepare_dataset).parameters) == [
            "self", "dataset", "processing_class", "args", "dataset_name"]
        source = inspect.getsource(theirs.__init__)
        assert 'train_dataset = self._prepare_dataset(train_dataset, processing_class, args, "train")' in source
        assert 'eval_dataset = self._prepare_dataset(eval_dataset, processing_class, args, "eval")' in source
        # TRL's checkpoint writes its card, then the Trainer's, which writes into _get_output_dir (our staging)
        assert "super()._save_checkpoint(model, trial)" in inspect.getsource(theirs._save_checkpoint)
