"""Which tier a test is in, decided without anyone remembering to mark it.

A test is `slow` (left out by `make test-fast`) when it
  - is marked `@pytest.mark.slow` (or its module's `pytestmark` says so);
  - requests, directly or through another fixture, a fixture named in SLOW_FIXTURES;
  - starts the training stack in its own code: `run_cli("train", ...)`, `qctrain_in("merge", ...)`,
    `main(["train", ...])`, `[sys.executable, "-m", "qctrain", "generate", ...]` (TRAINING_CALL, read from the
    test function's source at collection).
Whatever slips past these (a helper that builds the command, a fixture fetched with request.getfixturevalue) is
caught while it runs: a test outside the slow tier that starts a training-stack subprocess (a python process with
one of TRAINING_COMMANDS as an argument) or loads a model in process (transformers' from_pretrained) fails, naming
what it did and how to mark it. Shared runs built by conftest's built_once are exempt: they are session fixtures
named in SLOW_FIXTURES, or the tiny model every tier writes once.
"""

import contextlib
import importlib.abc
import importlib.util
import inspect
import re
import sys
from pathlib import Path

import pytest

# Fixtures that train, load a model or start the training stack: a test that requests one is `slow`.
SLOW_FIXTURES = {"finished_run", "merged_run", "hub_cached_run", "runs", "pushed_run", "tracked_run", "stopped",
                 "real_runs", "written", "base", "tiny_model", "packed", "packed_all_tokens", "exact_vocab",
                 "gated_run", "chain", "sft_adapter"}
# qctrain commands whose process imports the training stack (torch, transformers, PEFT, TRL, bitsandbytes) and
# loads a model; validate, check, prepare, doctor and tiny-model do not.
TRAINING_COMMANDS = ("train", "merge", "generate", "export", "push")
_COMMAND = "|".join(TRAINING_COMMANDS)
TRAINING_CALL = re.compile(
    rf"""(\b(run_cli|qctrain\w*|main|launch)\(\s*\[?\s*|["']-m["'],\s*["']qctrain["'],\s*)["']({_COMMAND})["']""")


def classify(item: pytest.Item) -> None:
    """Mark `item` slow when its fixtures or its own code say it trains (see the top of this file)."""
    if item.get_closest_marker("slow"):
        return
    if SLOW_FIXTURES & set(item.fixturenames):
        item.add_marker(pytest.mark.slow)
        return
    function = getattr(item, "function", None)
    try:
        source = inspect.getsource(function) if function else ""
    except (OSError, TypeError):
        source = ""
    if TRAINING_CALL.search(source):
        item.add_marker(pytest.mark.slow)


# --- the guard: what a test outside the slow tier did that only the slow tier may do ---

_watch: dict = {"item": None, "seen": []}


def _note(what: str) -> None:
    if _watch["item"] is not None:
        _watch["seen"].append(what)


def _training_command(args) -> str | None:
    if isinstance(args, (str, bytes, Path)):
        return None  # a shell string: not how the tests start qctrain
    argv = [str(a) for a in args]
    if not argv or not Path(argv[0]).name.startswith("python"):
        return None
    found = [a for a in argv[1:] if a in TRAINING_COMMANDS]
    return " ".join(argv[1:argv.index(found[0]) + 1]) if found else None


def _audit(event: str, args: tuple) -> None:
    if event == "subprocess.Popen" and _watch["item"] is not None:
        command = _training_command(args[1])
        if command:
            _note(f"started `{command}` in a subprocess")


def _patch_from_pretrained(module) -> None:
    """transformers.modeling_utils, as it is imported: PreTrainedModel.from_pretrained notes a model load."""
    load = module.PreTrainedModel.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        _note(f"loaded a model ({cls.__name__}.from_pretrained)")
        return load(cls, *args, **kwargs)

    module.PreTrainedModel.from_pretrained = classmethod(from_pretrained)


def _after_import(name: str, patch) -> None:
    """Run patch(module) once `name` is imported (now, if it already is)."""
    if name in sys.modules:
        patch(sys.modules[name])
        return

    class Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, fullname, path, target=None):
            if fullname != name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(fullname)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                patch(module)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, Hook())


def install_guard() -> None:
    sys.addaudithook(_audit)
    _after_import("transformers.modeling_utils", _patch_from_pretrained)


@contextlib.contextmanager
def unwatched():
    """A shared build (built_once): what it does is the fixture's, not the test's that first asked for it."""
    item, _watch["item"] = _watch["item"], None
    try:
        yield
    finally:
        _watch["item"] = item


@contextlib.contextmanager
def watching(item: pytest.Item):
    """Around a test's setup and call: what it did that only the slow tier may do (empty for a slow test)."""
    if item.get_closest_marker("slow"):
        yield
        return
    _watch["item"], _watch["seen"] = item, []
    try:
        yield
    finally:
        _watch["item"] = None


def verdict() -> str | None:
    """Why the test just watched belongs in the slow tier, or None."""
    seen = list(dict.fromkeys(_watch["seen"]))
    _watch["seen"] = []
    if not seen:
        return None
    return ("this test " + "; ".join(seen) + ": it belongs to the slow tier (make test-fast leaves that tier out). "
            "Mark it @pytest.mark.slow, or, if a fixture does it, add the fixture's name to SLOW_FIXTURES in "
            "tests/tiers.py")
