"""Export helpers: folder swaps that never lose the good folder, the loss plot; outputs that travel:
the base reference, permissions, model card metadata (read back with huggingface_hub, offline)."""

import json
import os
import stat

import pytest
import torch
from huggingface_hub import ModelCard
from qctrain import atomic, card, outputs
from qctrain.basemodel import reference
from qctrain.basemodel.reference import BaseReference, base_license
from qctrain.errors import InputError
from qctrain.finished import merge
from qctrain.finished.load import FinishedRun
from qctrain.recipe import ModelSection, Recipe
from safetensors.torch import save_file


def make(folder, text):
    folder.mkdir(parents=True)
    (folder / "weights").write_text(text)
    return folder


def test_replace_dir_swaps_whole_folders(tmp_path):
    dest = make(tmp_path / "adapter", "old")
    atomic.swap_in_folder(make(tmp_path / "new", "new"), dest)
    assert (dest / "weights").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_crash_between_renames_is_repaired(tmp_path):
    make(tmp_path / ".adapter.old", "good")  # the state a crash after the first rename leaves
    atomic.restore_interrupted_swap(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "weights").read_text() == "good"

    make(tmp_path / "new", "newer")
    (tmp_path / "adapter").rename(tmp_path / ".adapter.old")
    atomic.swap_in_folder(tmp_path / "new", tmp_path / "adapter")
    assert (tmp_path / "adapter" / "weights").read_text() == "newer"
    assert not (tmp_path / ".adapter.old").exists()


def test_loss_plot_from_log_history(tmp_path):
    rows = [{"step": s, "loss": 3.0 - s / 10} for s in range(1, 6)] + [{"step": 5, "eval_loss": 2.7}]
    outputs.plot_loss(rows, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- outputs that travel: base reference, permissions, card metadata ---

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def recipe_for(tmp_path, name: str, **model_fields) -> Recipe:
    return Recipe.model_validate({
        "model": {"name": name, **model_fields},
        "data": {"sources": [{"path": "hub:acme/support-chats"}, {"path": "data/local.json"}]},
        "output": {"dir": str(tmp_path / "out" / "run-7")},
    })


def test_local_base_is_named_by_absolute_path(tmp_path, monkeypatch):
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    ref = reference.base_reference(ModelSection(name="models/tiny"))
    assert ref == BaseReference(str(tmp_path / "models" / "tiny"), None, None) and ref.local
    ref = reference.base_reference(ModelSection(name="./models/tiny", hub_id="acme/tiny"))
    assert ref.source == str(tmp_path / "models" / "tiny") and ref.hub_id == "acme/tiny"


def test_hub_base_keeps_its_id_and_revision(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ref = reference.base_reference(ModelSection(name="microsoft/Phi-3.5-mini-instruct", revision="v2"))
    assert ref == BaseReference("microsoft/Phi-3.5-mini-instruct", "v2", "microsoft/Phi-3.5-mini-instruct")
    assert not ref.local


def test_hub_id_from_the_local_copys_own_metadata(tmp_path):
    snapshot = tmp_path / "hub" / "models--microsoft--Phi-3.5-mini-instruct" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    assert reference.hub_id_of_folder(snapshot) == "microsoft/Phi-3.5-mini-instruct"
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "config.json").write_text(json.dumps({"_name_or_path": "acme/base-7b"}))
    assert reference.hub_id_of_folder(saved) == "acme/base-7b"
    (saved / "config.json").write_text(json.dumps({"_name_or_path": "Phi-3.5-mini-instruct"}))  # no owner
    assert reference.hub_id_of_folder(saved) is None
    (saved / "config.json").write_text(json.dumps({"_name_or_path": "saved/x"}))  # a path beside it, not an id
    (tmp_path / "saved" / "x").mkdir()
    assert reference.hub_id_of_folder(saved) is None
    assert reference.base_reference(ModelSection(name=str(snapshot))).hub_id == "microsoft/Phi-3.5-mini-instruct"


def finished_run(tmp_path, recipe_model: dict, adapter_base: str, base_model: dict | None = None):
    out = tmp_path / "run"
    (out / "adapter").mkdir(parents=True)
    manifest = {"recipe": {"model": recipe_model}, **({"base_model": base_model} if base_model else {})}
    (out / "run_manifest.json").write_text(json.dumps(manifest))
    (out / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": adapter_base}))
    return out


def test_a_run_finds_its_base_from_any_folder(tmp_path, monkeypatch):
    base = tmp_path / "models" / "tiny"
    base.mkdir(parents=True)
    out = finished_run(tmp_path, {"name": "models/tiny"}, str(base), {"hub_id": "acme/tiny"})
    monkeypatch.chdir(tmp_path / "run")  # not where it trained
    cfg = FinishedRun.open(out).base
    assert cfg.name == str(base) and cfg.hub_id == "acme/tiny"
    base.rename(tmp_path / "moved")
    assert FinishedRun.open(out).base.name == "acme/tiny"  # gone here: its Hub original
    out = finished_run(tmp_path / "b", {"name": "models/tiny"}, str(base))
    with pytest.raises(InputError, match=f"its base model {base} is not there"):
        FinishedRun.open(out)
    out = finished_run(tmp_path / "c", {"name": "org/model", "revision": "v1"}, "org/model")
    assert (FinishedRun.open(out).base.name, FinishedRun.open(out).base.revision) == ("org/model", "v1")


def test_adapter_config_points_at_the_resolvable_base(tmp_path):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "models/tiny", "r": 8}))
    outputs.point_adapter_at_base(adapter, BaseReference("org/model", "abc123", "org/model"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config == {"base_model_name_or_path": "org/model", "r": 8, "revision": "abc123"}


def test_outputs_are_readable_by_other_users(tmp_path):
    old = os.umask(0o077)  # what safetensors does anyway: 0600
    try:
        (tmp_path / "run" / "adapter").mkdir(parents=True)
        save_file({"w": torch.zeros(2)}, tmp_path / "run" / "adapter" / "adapter_model.safetensors")
        (tmp_path / "run" / "README.md").write_text("card")
    finally:
        os.umask(old)
    atomic.make_shareable(tmp_path / "run")
    modes = {p.relative_to(tmp_path).as_posix(): stat.S_IMODE(p.stat().st_mode)
             for p in [tmp_path / "run", *(tmp_path / "run").rglob("*")]}
    assert modes == {"run": 0o755, "run/adapter": 0o755, "run/adapter/adapter_model.safetensors": 0o644,
                     "run/README.md": 0o644}


def card_of(text: str):
    return ModelCard(text).data  # huggingface_hub's own parsing, offline


def test_card_metadata_for_a_hub_base(tmp_path):
    recipe = recipe_for(tmp_path, "microsoft/Phi-3.5-mini-instruct")
    ref = reference.base_reference(recipe.model)
    license_info = base_license(ref)  # offline, not cached: the known license of the default base
    assert license_info["license"] == "mit" and license_info["license_link"].endswith("/LICENSE")
    text = card.model_card(recipe, {}, {"eval_loss": 1.23456, "train_loss": 1.5}, [], ref, license_info)
    data = card_of(text)
    assert data.base_model == "microsoft/Phi-3.5-mini-instruct" and data.base_model_relation == "adapter"
    assert data.license == "mit" and data.library_name == "peft"
    assert data.datasets == ["acme/support-chats"]
    [result] = data.eval_results
    assert (result.metric_type, result.metric_value, result.task_type) == ("loss", 1.2346, "text-generation")
    assert result.dataset_type == "acme/support-chats"
    assert data.model_name == "run-7"


def test_card_of_a_local_base_has_no_path_for_base_model(tmp_path):
    base = tmp_path / "models" / "tiny"
    base.mkdir(parents=True)
    (base / "README.md").write_text("---\nlicense: other\nlicense_name: tiny-license\nlicense_link: LICENSE\n---\n")
    recipe = recipe_for(tmp_path, str(base))
    ref = reference.base_reference(recipe.model)
    text = card.model_card(recipe, {}, {}, [], ref, base_license(ref))
    data = card_of(text)
    assert data.base_model is None and getattr(data, "base_model_relation", None) is None and data.eval_results is None
    assert (data.license, data.license_name, data.license_link) == ("other", "tiny-license", "LICENSE")
    assert str(base) not in text.split("---")[1]
    copy = reference.base_reference(recipe_for(tmp_path, str(base), hub_id="acme/tiny").model)
    assert card_of(card.model_card(recipe, {}, {}, [], copy, {})).base_model == "acme/tiny"


def test_license_from_the_base_config_or_unknown(tmp_path):
    base = tmp_path / "m"
    base.mkdir()
    assert base_license(BaseReference(str(base), None, None)) == {}
    (base / "config.json").write_text(json.dumps({"license": "apache-2.0"}))
    assert base_license(BaseReference(str(base), None, None)) == {"license": "apache-2.0"}


def test_samples_side_by_side():
    text = card.samples_markdown([card.Sample("Who are you?", "Th foll | x\nline", "I am Quill."),
                                  card.Sample("Hi", None, "")])
    assert "| base model (adapter off) | with this adapter |" in text
    assert "| Th foll \\| x<br>line | I am Quill. |" in text
    assert "| _not generated_ | _(empty reply)_ |" in text


def test_hub_id_stays_out_of_recipe_dumps_until_set(tmp_path):
    """Recipes written before model.hub_id keep their manifest sha and checkpoint fingerprint."""
    from qctrain import checkpoint

    plain = recipe_for(tmp_path, "models/tiny")
    assert "hub_id" not in plain.model_dump(mode="json")["model"]
    copy = recipe_for(tmp_path, "models/tiny", hub_id="acme/tiny")
    assert copy.model_dump(mode="json")["model"]["hub_id"] == "acme/tiny"
    assert Recipe.model_validate(copy.model_dump(mode="json")) == copy
    assert checkpoint.recipe_fingerprint(plain) != checkpoint.recipe_fingerprint(copy)
    with pytest.raises(ValueError, match="hub_id"):
        recipe_for(tmp_path, "models/tiny", hub_id="not an id")


def test_a_merge_replaces_only_a_folder_it_may(tmp_path):
    """A merge replaces --dest whole: a folder of someone else's files is refused before any weight loads."""
    run = tmp_path / "run"
    foreign = tmp_path / "models"
    foreign.mkdir()
    (foreign / "keep.safetensors").write_bytes(b"someone else's model")
    with pytest.raises(InputError, match="holds files qctrain did not write"):
        merge.check_merge_dest(run, foreign)
    (foreign / merge.MERGED_MARKER).write_text("qc-train-phi\n")  # an earlier merge's folder
    for dest in (foreign, tmp_path / "new", run / "merged"):
        merge.check_merge_dest(run, dest)
    (tmp_path / "empty").mkdir()
    merge.check_merge_dest(run, tmp_path / "empty")
