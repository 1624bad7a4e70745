"""The SkyPilot task (cloud/qctrain.sky.yaml) against SkyPilot's own JSON schemas, offline: task, resources (every
any_of choice) and storage, vendored from SkyPilot 0.14.1 in tests/data/skypilot/schemas.json
(cloud/regenerate_schema.py), validated the way SkyPilot does (Draft 7 plus its case_insensitive_enum). Then
what the task must do for this project: GPUs that fit, spot with recovery on exit 75, the output on a bucket,
the token as a secret without a value, recipes and data mounted, the image's entrypoint called."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from qctrain.errors import ExitCode
from qctrain.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]
TASK = ROOT / "cloud" / "qctrain.sky.yaml"
VENDORED = json.loads((ROOT / "tests" / "data" / "skypilot" / "schemas.json").read_text(encoding="utf-8"))


def sky_validator(schema: dict):
    """SkyPilot's validator (sky/utils/validator.py): Draft 7 with case-insensitive and case-sensitive enums."""
    def case_insensitive_enum(validator, enums, instance, schema):
        if instance.lower() not in [e.lower() for e in enums]:
            yield jsonschema.ValidationError(f"{instance!r} is not one of {enums!r}")

    def case_sensitive_enum(validator, enums, instance, schema):
        if instance not in enums:
            yield jsonschema.ValidationError(f"{instance!r} is not one of {enums!r}")

    cls = jsonschema.validators.extend(jsonschema.Draft7Validator, validators={
        "case_insensitive_enum": case_insensitive_enum, "case_sensitive_enum": case_sensitive_enum})
    return cls(schema)


def fill_envs(value, envs: dict[str, str]):
    """SkyPilot's substitution of task envs into file_mounts (${VAR} and $VAR), done before storage validation."""
    text = json.dumps(value)
    for name, env_value in envs.items():
        text = re.sub(r"\$\{" + name + r"\}|\$" + name + r"\b", env_value, text)
    return json.loads(text)


@pytest.fixture(scope="module")
def task() -> dict:
    return yaml.safe_load(TASK.read_text(encoding="utf-8"))


def test_vendored_schema_is_skypilots_with_its_licence():
    assert VENDORED["skypilot_version"] == "0.14.1"
    assert VENDORED["license"].replace("-", " ").startswith("Apache 2.0")
    assert "regenerate_schema.py" in VENDORED["regenerate"]
    for name in ("task", "resources", "storage"):
        assert VENDORED[name]["type"] == "object" and VENDORED[name]["properties"], name


def test_task_matches_skypilots_task_schema(task):
    sky_validator(VENDORED["task"]).validate({k: v for k, v in task.items() if v is not None})


def test_resources_and_every_choice_match_skypilots_resources_schema(task):
    validator = sky_validator(VENDORED["resources"])
    validator.validate(task["resources"])
    for choice in task["resources"]["any_of"]:
        validator.validate({**{k: v for k, v in task["resources"].items() if k != "any_of"}, **choice})


def test_bucket_mount_matches_skypilots_storage_schema(task):
    envs = {**task["envs"], "OUTPUT_BUCKET": "my-qctrain-runs"}  # the launch gives --env OUTPUT_BUCKET=...
    mounts = fill_envs(task["file_mounts"], envs)
    validator = sky_validator(VENDORED["storage"])
    storages = {dst: src for dst, src in mounts.items() if isinstance(src, dict)}
    assert storages, "no bucket mount"
    for storage in storages.values():
        validator.validate(storage)


def test_the_schema_check_can_fail(task):
    """The validator rejects what SkyPilot rejects: a typo'd key, a wrong mount mode."""
    with pytest.raises(jsonschema.ValidationError):
        sky_validator(VENDORED["task"]).validate({**task, "resource": task["resources"]})
    with pytest.raises(jsonschema.ValidationError):
        sky_validator(VENDORED["storage"]).validate({"name": "b", "mode": "MOUNT_FAST"})
    with pytest.raises(jsonschema.ValidationError):
        sky_validator(VENDORED["resources"]).validate({**task["resources"], "use_spots": True})


def test_gpus_that_fit_phi35_mini_qlora_on_spot(task):
    resources = task["resources"]
    choices = {choice["accelerators"] for choice in resources["any_of"]}
    assert {"L4:1", "A10G:1", "A100:1", "H100:1"} <= choices
    assert resources["use_spot"] is True and resources["disk_size"] >= 50
    assert "accelerators" not in resources  # any of the choices, not one fixed GPU


def test_preemption_reruns_the_command_and_exit_75_is_recovered(task):
    recovery = task["resources"]["job_recovery"]
    assert recovery["strategy"] in ("EAGER_NEXT_REGION", "FAILOVER")
    assert recovery["recover_on_exit_codes"] == [int(ExitCode.PREEMPTED)]
    assert recovery["max_restarts_on_errors"] == 0  # exit 2/3/4: a rerun would not help
    lines = [line.strip() for line in task["run"].strip().splitlines()]
    assert lines[-1] == "qctrain-entrypoint train /recipes/${RECIPE}"  # the same command: train resumes
    assert "--restart" not in task["run"]


def test_image_is_the_task_container_and_its_entrypoint_runs(task):
    image = task["resources"]["image_id"]
    assert image.startswith("docker:ghcr.io/") and "/qc-train-phi" in image
    k8s_image = re.search(r"^\s*image: (\S+)", (ROOT / "k8s" / "job.yaml").read_text(), re.M).group(1)
    assert image == f"docker:{k8s_image}"  # one released image everywhere
    assert all(line.startswith("qctrain-entrypoint ") for line in task["run"].strip().splitlines())
    options = task["config"]["docker"]["run_options"]
    assert "--user=0:0" in options and any(o.startswith("--shm-size=") for o in options)


def test_output_on_a_bucket_and_recipes_and_data_mounted(task):
    mounts = task["file_mounts"]
    out = mounts["/out"]
    assert out["name"] == "${OUTPUT_BUCKET}" and out["mode"] in ("MOUNT", "MOUNT_CACHED")
    assert task["envs"]["OUTPUT_BUCKET"] is None  # SkyPilot refuses to launch until --env gives it
    assert mounts["/recipes"] == "./recipes" and mounts["/data"] == "./data"
    recipe_path = ROOT / "recipes" / task["envs"]["RECIPE"]
    recipe = load_recipe(recipe_path, [], env={"MODEL_REVISION": "main", "HUB_REPO_ID": "a/b"})
    assert recipe.output.dir.startswith("/out/")  # the outputs and checkpoints land on the bucket
    assert all(src.path.startswith("/data/") for src in recipe.data.sources)


def test_token_is_a_secret_without_a_value(task):
    assert "HF_TOKEN" in task["secrets"] and task["secrets"]["HF_TOKEN"] is None
    text = TASK.read_text(encoding="utf-8")
    assert not re.search(r"hf_[A-Za-z0-9]{10,}", text)
    for name in task["envs"]:
        assert not re.search(r"TOKEN|KEY|PASSWORD|SECRET", name), f"{name} belongs in secrets:"
