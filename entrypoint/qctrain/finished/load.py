"""A finished run, opened from where the command runs: its folder, its base model as it resolves on this machine,
and the adapter loaded onto that base, once (what generating, merging or scoring the trained model starts with)."""

from dataclasses import dataclass
from pathlib import Path

from qctrain.atomic import read_json_object
from qctrain.basemodel.reference import BaseReference, base_reference
from qctrain.errors import InputError
from qctrain.recipe import ModelSection
from qctrain.rundir import RunDir


@dataclass(frozen=True)
class FinishedRun:
    run: RunDir
    base: ModelSection  # the recipe's model: section, its name a base that resolves from here

    @classmethod
    def open(cls, output_dir: Path) -> "FinishedRun":
        """The run in output_dir (InputError where it is no finished run), its base resolved from here: the
        absolute folder or Hub id recorded in the adapter, else the Hub id the base is a copy of."""
        run = RunDir(output_dir)
        manifest = run.read_manifest()
        try:
            cfg = ModelSection.model_validate(manifest["recipe"]["model"])
        except (ValueError, KeyError, TypeError) as err:
            raise InputError(f"{run.manifest}: not a run manifest of qctrain ({type(err).__name__})") from None
        adapter_config = read_json_object(run.adapter / "adapter_config.json")
        hub_id = (manifest.get("base_model") or {}).get("hub_id") or cfg.hub_id
        return cls(run, _resolved_base(output_dir, cfg, adapter_config, hub_id))

    def parent_adapter(self) -> Path:
        """The adapter this (dpo/kto) run continued, as its manifest names it, where it is now; InputError where
        the run continued none, or that adapter is gone or changed since."""
        from qctrain import parent

        recorded = self.run.read_manifest().get("parent")
        if not isinstance(recorded, dict) or not recorded.get("adapter"):
            raise InputError(f"{self.run.root}: this run continued no adapter (method dpo or kto with model.adapter); "
                             "use --compare-base")
        found = parent.resolve(recorded["adapter"])
        if found.adapter_sha256 != recorded.get("adapter_sha256"):
            raise InputError(f"{self.run.root}: the adapter it continued, {recorded['adapter']}, has changed since "
                             f"(sha256 {found.adapter_sha256[:12]}..., the run recorded "
                             f"{str(recorded.get('adapter_sha256'))[:12]}...)")
        return found.adapter_dir

    @property
    def reference(self) -> BaseReference:
        return base_reference(self.base)  # self.base as resolved from here, its hub_id included

    def load(self, dtype=None):
        """The base with the trained adapter on top, and the adapter's tokenizer. dtype None: the base as training
        loaded it (quantized as the recipe says); a torch dtype: unquantized, in that dtype (to merge into).
        Loading problems are input errors."""
        from peft import PeftModel
        from transformers import AutoTokenizer

        from qctrain.basemodel.load import load_base_model, load_unquantized

        adapter = self.run.adapter
        try:
            tokenizer = AutoTokenizer.from_pretrained(adapter)
        except (OSError, ValueError) as err:
            raise InputError(f"{adapter}: cannot load the tokenizer: {str(err).splitlines()[0]}") from None
        base = load_base_model(self.base) if dtype is None else load_unquantized(self.base, dtype)
        try:
            return PeftModel.from_pretrained(base, adapter), tokenizer
        except (OSError, ValueError, RuntimeError) as err:
            raise InputError(f"{adapter}: cannot load the adapter onto {self.base.name}: "
                             f"{str(err).splitlines()[0]}") from None


def _resolved_base(output_dir: Path, cfg: ModelSection, adapter_config: dict, hub_id: str | None) -> ModelSection:
    """cfg with its name replaced by the base the adapter records, as it resolves from here."""
    recorded = adapter_config.get("base_model_name_or_path") or cfg.name
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
