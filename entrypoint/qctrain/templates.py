"""TRL's chat templates and their training twins, read as files (importing TRL's template module loads
transformers' tokenizers and torch, seconds that `qctrain check` cannot spend).

data.training_template asks TRL itself (the reference); `training_twin` gives the same answer for
preflight's probe, and tests/test_preflight.py holds the two equal on every template TRL ships.
"""

import importlib.util
import re
from functools import cache
from pathlib import Path

from qctrain.errors import InputError

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")  # trl.chat_template_utils.has_generation_markers
NO_TWIN = ("data.chat_template: the template has no {% generation %} markers around assistant turns and TRL "
           "knows no training version of it; add the markers or set data.loss_on: all")


@cache
def trl_templates_dir() -> Path:
    spec = importlib.util.find_spec("trl")  # finds the package without running it
    if spec is None or not spec.submodule_search_locations:
        raise InputError("TRL is not installed")
    return Path(list(spec.submodule_search_locations)[0]) / "chat_templates"


def has_generation_markers(template: str) -> bool:
    return _GENERATION.search(template) is not None


@cache
def _twins() -> dict[str, str]:
    """Each TRL template's text -> the text of its `_training` twin."""
    folder = trl_templates_dir()
    twins = {}
    for twin in folder.glob("*_training.jinja"):
        original = folder / twin.name.replace("_training.jinja", ".jinja")
        if original.is_file():
            twins[original.read_text(encoding="utf-8")] = twin.read_text(encoding="utf-8")
    return twins


def training_twin(template: str, loss_on: str) -> str:
    """The template to tokenize with: as is when every token trains or it marks its assistant turns,
    else TRL's training twin of it."""
    if loss_on == "all" or has_generation_markers(template):
        return template
    twin = _twins().get(template)
    if twin is None:
        raise InputError(NO_TWIN)
    return twin
