"""Recipes of method dpo and kto (issue 23): train: checked against DPOConfig's and KTOConfig's fields as strictly as
SFTConfig's (snapshots kept equal to the installed TRL, `check` free of torch), and the settings preference tuning
cannot honour refused by name."""

import inspect
import json
import re

import pytest
import yaml
from qctrain import sft_fields
from qctrain.errors import InputError
from qctrain.recipe import Recipe, load_recipe


def recipe_file(tmp_path, **sections):
    data = {"model": {"name": "org/m"}, "data": {"sources": [{"path": "d.json"}]}, "output": {"dir": "out"},
            **sections}
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def problems(tmp_path, **sections) -> list[str]:
    path = recipe_file(tmp_path, **sections)
    with pytest.raises(InputError) as err:
        load_recipe(path, env={})
    return [line.removeprefix(f"{path}: ") for line in str(err.value).splitlines()]


@pytest.mark.parametrize("method", ["sft", "dpo", "kto"])
def test_each_config_snapshot_matches_the_installed_trl(method):
    import trl

    recorded = json.loads(sft_fields.SNAPSHOTS[method].read_text(encoding="utf-8"))
    assert recorded["trl"] == trl.__version__, "run `python -m qctrain.sft_fields` after a lock change"
    assert sft_fields.live_fields(method) == recorded["fields"]
    assert sft_fields.live_choices(method) == recorded["choices"]


def test_dpo_loss_names_are_the_ones_its_trainer_computes():
    from trl import DPOTrainer

    source = inspect.getsource(DPOTrainer._compute_loss)
    assert set(re.findall(r'loss_type == "(\w+)"', source)) == set(sft_fields.DPO_LOSS_TYPES)


def test_dpo_and_kto_knobs_are_plain_train_keys(tmp_path):
    dpo = load_recipe(recipe_file(tmp_path, method="dpo", data={"sources": [{"path": "d.json"}]},
                                  train={"beta": 0.5, "loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.1],
                                         "precompute_ref_log_probs": True, "learning_rate": "1e-5"}), env={})
    assert dpo.train["loss_type"] == ["sigmoid", "sft"] and dpo.train["learning_rate"] == 1e-5
    assert load_recipe(recipe_file(tmp_path, method="dpo", train={"loss_type": "ipo"}), env={}).train["loss_type"] \
        == "ipo"
    kto = load_recipe(recipe_file(tmp_path, method="kto", train={"desirable_weight": 1.3}), env={})
    assert kto.sft_kwargs()["desirable_weight"] == 1.3


def test_dpo_defaults_differ_where_sft_ones_would_be_wrong(tmp_path):
    dpo = load_recipe(recipe_file(tmp_path, method="dpo"), env={})
    assert dpo.sft_kwargs()["learning_rate"] == 5.0e-6  # SFT's 2e-4 would overshoot
    assert (dpo.data.packing, dpo.lora.dropout) == (False, 0.0)  # padded pairs; TRL zeroes dropout
    sft = load_recipe(recipe_file(tmp_path), env={})
    assert (sft.sft_kwargs()["learning_rate"], sft.data.packing, sft.lora.dropout) == (2.0e-4, True, 0.05)
    # method: sft and an unset model.adapter stay out of the dump: SFT recipes keep their fingerprints
    dumped = sft.model_dump(mode="json")
    assert "method" not in dumped and "adapter" not in dumped["model"]
    assert Recipe.model_validate(dumped) == sft
    assert dpo.model_dump(mode="json")["method"] == "dpo"


def test_knobs_of_another_method_or_owned_elsewhere_are_refused_by_name(tmp_path):
    assert problems(tmp_path, method="dpo", train={"beta2": 0.1, "max_length": 10, "truncation_mode": "keep_end",
                                                  "loss_type": ["sigmoid", "sigmod"], "packing": True}) == [
        "train.beta2: unknown key, not a field of TRL's DPOConfig (did you mean 'beta'?)",
        "train.loss_type: unknown value 'sigmod' (did you mean 'sigmoid'?); one of: sigmoid, hinge, ipo, exo_pair, "
        "nca_pair, robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm",
        "train.max_length: set by data.max_seq_length, not under train:",
        "train.packing: set by data.packing, not under train:",
        "train.truncation_mode: set by data.on_overlong (drop, or truncate: the prompt is cut from the left), not "
        "under train:"]
    assert problems(tmp_path, train={"beta": 0.1}) == [
        "train.beta: unknown key, not a field of TRL's SFTConfig"]
    assert problems(tmp_path, method="kto", train={"loss_type": "sigmoid", "train_sampling_strategy": "lenght"}) == [
        "train.loss_type: unknown value 'sigmoid'; one of: kto, apo_zero_unpaired",
        "train.train_sampling_strategy: unknown value 'lenght'; one of: random, sequential, group_by_length"]


def test_what_preference_tuning_cannot_honour_is_refused_by_name(tmp_path):
    assert problems(tmp_path, method="kto", lora={"dropout": 0.1, "target_modules": ["qkv_proj", "lm_head"]},
                    data={"sources": [{"path": "d.json", "format": "alpaca"}], "packing": True, "loss_on": "all"},
                    train={"per_device_train_batch_size": 1, "train_sampling_strategy": "random",
                           "sync_ref_model": True}) == [
        "data.sources[0].format: alpaca is not a preference format; method kto reads preference, sharegpt_ranking, "
        "kto (or auto)",
        "data.packing: method kto trains each pair padded (TRL's preference collator; its padding_free is "
        "disabled); set data.packing: false or leave it out",
        "data.loss_on: method kto scores the completions, never the prompt; leave it at assistant",
        "lora.dropout: 0.1 is not honoured: train.disable_dropout (true by default for kto) zeroes every dropout, "
        "LoRA's too; set lora.dropout: 0 or train.disable_dropout: false",
        "lora.target_modules: lm_head cannot be trained with method kto (TRL scores the completions with the LM "
        "head's weight directly)",
        "train.sync_ref_model: TRL cannot sync the reference of a LoRA run (its reference is the base or a frozen "
        "copy of the adapter); leave it false",
        "train.train_sampling_strategy: KTO's KL term pairs each completion with its batch neighbours, so it must "
        "be sequential (qctrain shuffles the rows once, seeded)",
        "train.per_device_train_batch_size: KTO needs at least 2 rows per batch (its KL term takes the completions "
        "of the other rows)"]
    # dropout kept where the recipe turns TRL's zeroing off
    kept = load_recipe(recipe_file(tmp_path, method="dpo", lora={"dropout": 0.1},
                                   train={"disable_dropout": False}), env={})
    assert kept.lora.dropout == 0.1
    assert problems(tmp_path, model={"name": "org/m", "adapter": "out/sft"}) == [
        "model.adapter: continuing an adapter is for method: dpo or kto (preference tuning after SFT); an SFT run "
        "starts a new adapter"]
    assert problems(tmp_path, data={"sources": [{"path": "d.json", "format": "preference"}]}) == [
        "data.sources[0].format: preference is a preference format; method sft reads alpaca, sharegpt, messages "
        "(or auto); set method: dpo or kto"]


def test_a_preference_run_measures_its_held_out_rows_itself(tmp_path):
    """evaluate.heldout (base against tuned through the SFT loss) is off by default for dpo/kto and refused when
    set, as is a gate on it: the preference trainer evaluates the held-out pairs (manifest: preference)."""
    pairs = {"sources": [{"path": "d.json", "format": "preference"}], "eval": {"count": 4}}
    path = recipe_file(tmp_path, method="dpo", data=pairs, evaluate={"samples": True})
    assert load_recipe(path, env={}).evaluate.heldout is False
    sft = recipe_file(tmp_path, data={"sources": [{"path": "d.json"}], "eval": {"count": 4}}, evaluate={})
    assert load_recipe(sft, env={}).evaluate.heldout is True
    found = problems(tmp_path, method="dpo", data=pairs, evaluate={"heldout": True})
    assert any(line.startswith("evaluate.heldout: method dpo measures its held-out pairs itself") for line in found)
    found = problems(tmp_path, method="kto", data={**pairs, "sources": [{"path": "d.json", "format": "kto"}]},
                     evaluate={"gate": {"metric": "heldout.loss"}})
    assert any(line.startswith("evaluate.gate[0].metric: heldout.loss: the held-out loss and accuracy of base and "
                               "tuned are measured for method sft") for line in found), found
