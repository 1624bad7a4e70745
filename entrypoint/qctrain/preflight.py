"""Preflight: everything that can be checked in seconds, before any weight loads.

Each check returns a list of problems; `run_checks` runs them all so the user sees every problem
at once. Nothing here writes into output.dir.
"""

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from qctrain import data, model
from qctrain.errors import QcError
from qctrain.recipe import Recipe

MIN_FREE_BYTES = 1 << 30  # adapter, checkpoints and prepared data of a LoRA run fit well inside 1 GiB


def _problem_of(check: Callable[[], None]) -> list[str]:
    try:
        check()
    except QcError as err:
        return [str(err)]
    return []


def check_sources(recipe: Recipe) -> list[str]:
    sources = [*recipe.data.sources, *(recipe.data.eval.sources if recipe.data.eval else [])]
    problems = []
    for src in sources:
        if data.is_hub_source(src.path):
            continue
        try:
            for path in data.source_files(src):
                if not os.access(path, os.R_OK):
                    problems.append(f"{path}: permission denied")
        except QcError as err:
            problems.append(str(err))
    return problems


def nearest_existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def check_output_dir(recipe: Recipe, min_free: int = MIN_FREE_BYTES) -> list[str]:
    out = Path(recipe.output.dir)
    existing = nearest_existing(out.absolute())
    if existing.exists() and not existing.is_dir():
        return [f"output.dir: {existing} is a file, not a folder"]
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError:
        return [f"output.dir: {existing} is not writable by uid {os.getuid()}"]
    free = shutil.disk_usage(existing).free
    if free < min_free:
        return [f"output.dir: only {free / 2**20:.0f} MiB free on {existing}, need at least "
                f"{min_free / 2**20:.0f} MiB for checkpoints and outputs"]
    return []


def check_template(recipe: Recipe) -> list[str]:
    try:
        tokenizer = model.load_tokenizer(recipe.model)
        template = data.resolve_chat_template(recipe.data.chat_template, tokenizer)
        template = data.training_template(template, tokenizer, recipe.data.loss_on)
        probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
        ids, labels = data.tokenize([probe], tokenizer, template, recipe.data.loss_on)
    except QcError as err:
        return [str(err)]
    if all(label == data.IGNORE for label in labels[0]):
        return ["data.chat_template: renders no supervised (assistant) token for a one-turn conversation"]
    return []


def check_lora_targets(recipe: Recipe) -> list[str]:
    def check() -> None:
        skeleton = model.meta_model(recipe.model)
        model.check_lora_targets(recipe.lora.target_modules, model.linear_module_names(skeleton),
                                 type(skeleton).__name__)
    return _problem_of(check)


def check_hub(recipe: Recipe, env: Mapping[str, str]) -> list[str]:
    if recipe.hub is None or recipe.hub.push == "never":
        return []
    from qctrain import publish

    try:
        token = publish.resolve_token(env)
    except QcError as err:
        return [str(err)]
    return publish.check_hub_access(recipe.hub.repo_id, recipe.hub.private, token)


def run_checks(recipe: Recipe, env: Mapping[str, str] | None = None, hub: bool = True) -> list[str]:
    env = os.environ if env is None else env
    problems = check_sources(recipe) + check_output_dir(recipe)
    model_problems = _problem_of(lambda: model.model_source(recipe.model) and None)
    # The template and LoRA checks read the model's tokenizer and config (small files, no weights).
    problems += model_problems or check_template(recipe) + check_lora_targets(recipe)
    if hub:
        problems += check_hub(recipe, env)
    return list(dict.fromkeys(problems))
