"""A finished run's base model, resolved from where the command runs, and its adapter loaded onto it: where
`generate` (and anything else that runs the trained model) starts."""

from pathlib import Path

from qctrain.atomic import read_json_object
from qctrain.errors import InputError
from qctrain.recipe import ModelSection
from qctrain.rundir import RunDir


def base_section(output_dir: Path) -> ModelSection:
    """The model: section of a finished run, its name replaced by a base that resolves from here:
    the absolute folder or Hub id recorded in the adapter, else the Hub id the base is a copy of."""
    run = RunDir(output_dir)
    manifest = run.read_manifest()
    try:
        cfg = ModelSection.model_validate(manifest["recipe"]["model"])
    except (ValueError, KeyError, TypeError) as err:
        raise InputError(f"{run.manifest}: not a run manifest of qctrain ({type(err).__name__})") from None
    adapter_config = read_json_object(run.adapter / "adapter_config.json")
    recorded = adapter_config.get("base_model_name_or_path") or cfg.name
    hub_id = (manifest.get("base_model") or {}).get("hub_id") or cfg.hub_id
    folder = Path(recorded).expanduser()
    if folder.exists():
        return cfg.model_copy(update={"name": str(folder.resolve()), "hub_id": hub_id})
    if folder.is_absolute():
        if hub_id:  # the local copy is not here: its Hub original is the same model
            return cfg.model_copy(update={"name": hub_id, "revision": None})
        raise InputError(f"{output_dir}: its base model {recorded} is not there (the adapter was trained on "
                         "it); put it back, or name the Hub model it is a copy of with model.hub_id")
    if recorded.startswith((".", "~")) or recorded.count("/") > 1:
        raise InputError(f"{output_dir}: its base model {recorded} is a path relative to where it was "
                         "trained and is not found from here: run from that folder")
    return cfg.model_copy(update={"name": recorded, "revision": adapter_config.get("revision") or cfg.revision})


def load_adapter_model(output_dir: Path):
    """The run's base with the trained adapter on top, and the adapter's tokenizer; the base is the
    one recorded in the adapter, so this works from any folder. Loading problems are input errors."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from qctrain.basemodel.load import load_base_model

    cfg = base_section(output_dir)
    adapter = RunDir(output_dir).adapter
    try:
        tokenizer = AutoTokenizer.from_pretrained(adapter)
    except (OSError, ValueError) as err:
        raise InputError(f"{adapter}: cannot load the tokenizer: {str(err).splitlines()[0]}") from None
    base = load_base_model(cfg)
    try:
        return PeftModel.from_pretrained(base, adapter), tokenizer
    except (OSError, ValueError, RuntimeError) as err:
        raise InputError(f"{adapter}: cannot load the adapter onto {cfg.name}: {str(err).splitlines()[0]}") from None
