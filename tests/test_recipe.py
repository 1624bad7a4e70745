"""Recipe loading: strict keys with suggestions, SFTConfig passthrough, overlays, --set, ${ENV}."""

from pathlib import Path

import pytest
import yaml
from conftest import run_cli
from qctrain.errors import InputError
from qctrain.recipe import dump_recipe, load_recipe

MINIMAL = {"model": {"name": "org/model"}, "data": {"sources": [{"path": "d.json"}]}, "output": {"dir": "out"}}


def write(tmp_path: Path, value, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(value if isinstance(value, str) else yaml.safe_dump(value), encoding="utf-8")
    return path


def problems(path: Path, *overrides: str, env=None) -> list[str]:
    with pytest.raises(InputError) as err:
        load_recipe(path, overrides, env=env or {})
    return str(err.value).splitlines()


def test_minimal_recipe_gets_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), env={})
    assert recipe.model.quantization.quant_type == "nf4"
    assert recipe.lora.target_modules == "all-linear"
    assert recipe.data.packing is True and recipe.data.loss_on == "assistant"
    assert recipe.hub is None


@pytest.mark.parametrize("section, key, suggestion", [
    ("model", "revison", "revision"),
    ("lora", "alhpa", "alpha"),
    ("data", "packng", "packing"),
    ("output", "dirr", "dir"),
])
def test_misspelt_key_names_path_and_suggests(tmp_path, section, key, suggestion):
    recipe = {**MINIMAL, section: {**MINIMAL.get(section, {}), key: 1}}
    lines = problems(write(tmp_path, recipe))
    assert any(f"{section}.{key}: unknown key (did you mean '{suggestion}'?)" in line for line in lines), lines


def test_nested_and_top_level_unknown_keys(tmp_path):
    recipe = {**MINIMAL, "modle": {}, "data": {"sources": [{"path": "d.json", "fromat": "alpaca"}]}}
    lines = problems(write(tmp_path, recipe))
    assert any("modle: unknown key (did you mean 'model'?)" in line for line in lines)
    assert any("data.sources[0].fromat: unknown key (did you mean 'format'?)" in line for line in lines)


def test_every_problem_reported_at_once(tmp_path):
    recipe = {**MINIMAL, "lora": {"r": "big", "dropout": 2}, "train": {"num_train_epoch": 1}}
    lines = problems(write(tmp_path, recipe))
    assert len(lines) == 3, lines
    assert all(line.startswith(str(tmp_path / "r.yaml")) for line in lines)
    assert any("lora.r:" in line and "'big'" in line for line in lines)


def test_train_keys_checked_against_sftconfig(tmp_path):
    recipe = {**MINIMAL, "train": {"learning_rate": "fast", "num_train_epoch": 3, "max_length": 9,
                                   "lr_scheduler_type": "cosine", "weight_decay": 0.1}}
    lines = problems(write(tmp_path, recipe))
    assert any("train.learning_rate:" in line and "'fast'" in line for line in lines)
    assert any("train.num_train_epoch: unknown key" in line and "num_train_epochs" in line for line in lines)
    assert any("train.max_length: set by data.max_seq_length" in line for line in lines)
    assert not any("weight_decay" in line or "lr_scheduler_type" in line for line in lines)


def test_any_sftconfig_knob_passes_through(tmp_path):
    recipe = load_recipe(write(tmp_path, {**MINIMAL, "train": {"neftune_noise_alpha": 5, "optim": "adamw_torch"}}),
                         env={})
    kwargs = recipe.sft_kwargs()
    assert kwargs["neftune_noise_alpha"] == 5 and kwargs["optim"] == "adamw_torch"
    assert kwargs["seed"] == recipe.data.seed


def test_token_in_recipe_is_rejected(tmp_path):
    lines = problems(write(tmp_path, {**MINIMAL, "hub": {"repo_id": "org/x", "token": "hf_abc"}}))
    assert lines == [f"{tmp_path / 'r.yaml'}: hub.token: never put a Hub token in a recipe; "
                     "set HF_TOKEN or HF_TOKEN_FILE in the environment"]


def test_token_value_anywhere_is_rejected_even_through_env(tmp_path):
    fake = "hf_" + "A1b2C3d4" * 5
    recipe = {**MINIMAL, "data": {"sources": [{"path": "d.json", "revision": "${DATA_REVISION}"}]}}
    lines = problems(write(tmp_path, recipe), env={"DATA_REVISION": fake})
    assert lines == [f"{tmp_path / 'r.yaml'}: data.sources[0].revision: never put a Hub token in a recipe; "
                     "set HF_TOKEN or HF_TOKEN_FILE in the environment"]
    assert fake not in "".join(lines)


def test_malformed_yaml_names_line(tmp_path):
    lines = problems(write(tmp_path, "model:\n  name: [unclosed\ndata: {}\n"))
    assert len(lines) == 1 and ":3:" in lines[0] and "malformed YAML" in lines[0]


def test_base_overlay_deep_merges(tmp_path):
    write(tmp_path, {**MINIMAL, "lora": {"r": 32, "alpha": 64}, "train": {"learning_rate": 1e-4}}, "base.yaml")
    child = write(tmp_path, {"base": "base.yaml", "lora": {"r": 8}, "output": {"dir": "child-out"}}, "child.yaml")
    recipe = load_recipe(child, env={})
    assert (recipe.lora.r, recipe.lora.alpha) == (8, 64)
    assert recipe.output.dir == "child-out" and recipe.train == {"learning_rate": 1e-4}


def test_base_loop_is_an_error(tmp_path):
    write(tmp_path, {"base": "b.yaml", **MINIMAL}, "a.yaml")
    write(tmp_path, {"base": "a.yaml"}, "b.yaml")
    assert "loops back" in problems(tmp_path / "a.yaml")[0]


def test_set_overrides_with_yaml_values_and_indexes(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL),
                         ["lora.r=4", "data.packing=false", "data.sources[0].format=alpaca",
                          "train.learning_rate=1e-5", "lora.target_modules=[qkv_proj, o_proj]"], env={})
    assert recipe.lora.r == 4 and recipe.data.packing is False
    assert recipe.data.sources[0].format == "alpaca"
    assert recipe.train["learning_rate"] == 1e-5
    assert recipe.lora.target_modules == ["qkv_proj", "o_proj"]


def test_bad_set_is_an_error(tmp_path):
    assert "expected KEY.PATH=VALUE" in problems(write(tmp_path, MINIMAL), "lora.r")[0]


def test_env_expansion_with_defaults_and_types(tmp_path):
    recipe = {**MINIMAL, "data": {"sources": [{"path": "${DATA_DIR}/train.json"}],
                                  "max_seq_length": "${LEN:-1024}", "seed": "${SEED}"},
              "output": {"dir": "${OUT:-/out}/run"}}
    loaded = load_recipe(write(tmp_path, recipe), env={"DATA_DIR": "/data", "SEED": "7"})
    assert loaded.data.sources[0].path == "/data/train.json"
    assert loaded.data.max_seq_length == 1024 and loaded.data.seed == 7
    assert loaded.output.dir == "/out/run"


def test_missing_env_var_names_field(tmp_path):
    recipe = {**MINIMAL, "output": {"dir": "${NOPE}/x"}}
    assert problems(write(tmp_path, recipe)) == [
        "output.dir: environment variable NOPE is not set (use ${NOPE:-default})"]


def test_resolved_recipe_round_trips_and_hash_is_stable(tmp_path):
    recipe = load_recipe(write(tmp_path, MINIMAL), env={})
    again = load_recipe(write(tmp_path, dump_recipe(recipe), "resolved.yaml"), env={})
    assert again == recipe and again.sha256() == recipe.sha256()
    assert load_recipe(write(tmp_path, MINIMAL), ["lora.r=4"], env={}).sha256() != recipe.sha256()


def test_validate_command_exit_codes(tmp_path):
    good = write(tmp_path, MINIMAL)
    ok = run_cli("validate", str(good), "--set", "lora.r=4")
    assert ok.returncode == 0, ok.stderr
    assert yaml.safe_load(ok.stdout)["lora"]["r"] == 4
    bad = run_cli("validate", str(write(tmp_path, {**MINIMAL, "lora": {"alpah": 4}}, "bad.yaml")))
    assert bad.returncode == 2
    expected = f"{tmp_path / 'bad.yaml'}: lora.alpah: unknown key (did you mean 'alpha'?)"
    assert bad.stderr.strip() == f"qctrain: error: {expected}"
    assert "Traceback" not in bad.stderr


def test_shipped_recipes_validate():
    root = Path(__file__).resolve().parents[1] / "recipes"
    for path in sorted(root.rglob("*.yaml")):
        if "accelerate" in path.parts:
            continue
        load_recipe(path, env={})


def test_train_ranges_name_real_sftconfig_fields():
    from qctrain.recipe import TRAIN_RANGES, sft_field_types

    assert set(TRAIN_RANGES) <= set(sft_field_types())


def test_numbers_at_the_edges_of_their_ranges_pass(tmp_path):
    train = {"learning_rate": 1e-9, "num_train_epochs": 0, "max_steps": -1, "seed": 0, "data_seed": 2**32 - 1,
             "warmup_steps": 0.03, "weight_decay": 0, "adam_beta2": 1, "per_device_train_batch_size": 1,
             "save_total_limit": 0}
    recipe = load_recipe(write(tmp_path, {**MINIMAL, "train": train,
                                          "data": {**MINIMAL["data"], "seed": 2**32 - 1, "max_seq_length": 1 << 24},
                                          "hub": {"repo_id": "org/x", "merged_repo_id": "org/x-merged"}}), env={})
    assert recipe.sft_kwargs()["data_seed"] == 2**32 - 1 and recipe.data.seed == 2**32 - 1
    assert recipe.sft_kwargs()["learning_rate"] == 1e-9


@pytest.mark.parametrize("path", ["hub:org/name", "hub:squad", "hub:org/name.v2"])
def test_hub_data_ids_pass(tmp_path, path):
    recipe = load_recipe(write(tmp_path, {**MINIMAL, "data": {"sources": [{"path": path}]}}), env={})
    assert recipe.data.sources[0].path == path


def test_a_variable_holding_text_that_is_not_yaml_stays_that_text(tmp_path):
    recipe = load_recipe(write(tmp_path, {**MINIMAL, "train": {"run_name": "${NAME}"}}), env={"NAME": "[a: {"})
    assert recipe.train["run_name"] == "[a: {"
    recipe = load_recipe(write(tmp_path, {**MINIMAL, "data": {**MINIMAL["data"], "seed": "${SEED}"}}),
                         env={"SEED": "7"})
    assert recipe.data.seed == 7


@pytest.mark.parametrize("key", ["dataloader_drop_last", "ignore_data_skip", "auto_find_batch_size"])
def test_knobs_that_change_the_weights_are_not_harmless(key):
    """A resume with one of these changed would train on other records, replay the data or change the batch."""
    from qctrain.checkpoint import harmless

    assert not harmless(f"train.{key}", False, True)
    assert harmless("train.dataloader_num_workers", 0, 2) and harmless("train.save_steps", 10, 20)


def test_weight_changing_knobs_are_in_the_resume_fingerprint(tmp_path):
    from qctrain.checkpoint import recipe_fingerprint

    base = load_recipe(write(tmp_path, MINIMAL), env={})
    for key in ("dataloader_drop_last", "ignore_data_skip", "auto_find_batch_size"):
        changed = load_recipe(write(tmp_path, {**MINIMAL, "train": {key: True}}, "c.yaml"), env={})
        assert recipe_fingerprint(changed) != recipe_fingerprint(base), key
    quiet = load_recipe(write(tmp_path, {**MINIMAL, "train": {"dataloader_num_workers": 3}}, "q.yaml"), env={})
    assert recipe_fingerprint(quiet) == recipe_fingerprint(base)
