"""The fields of TRL's trainer configs (SFTConfig, DPOConfig, KTOConfig: one per recipe `method`), read from
snapshots instead of importing TRL.

Importing TRL pulls in torch, transformers, PEFT and bitsandbytes (seconds); `validate` and `check`
only need each field's name, value type and, for the enum-typed ones and those whose metadata lists
`choices`, the accepted strings. `sft_config_fields.json`, `dpo_config_fields.json` and
`kto_config_fields.json` hold that for the locked TRL; tests/test_quiet_and_fast.py checks each against the
live config, and `python -m qctrain.sft_fields` rewrites all three after a lock change.
"""

import dataclasses
import enum
import json
import sys
import types
import typing
from functools import cache
from pathlib import Path
from typing import Any, Literal

SNAPSHOTS = {method: Path(__file__).with_name(f"{method}_config_fields.json") for method in ("sft", "dpo", "kto")}
SNAPSHOT = SNAPSHOTS["sft"]
CONFIGS = {"sft": "SFTConfig", "dpo": "DPOConfig", "kto": "KTOConfig"}  # trl's class per method
# DPOConfig's loss_type is typed list[str], but TRL takes one name as well (DPOConfig.__post_init__ wraps it); every
# name must be one _compute_loss knows (tests/test_quiet_and_fast.py reads them out of the installed trainer).
DPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
                  "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


def describe(annotation: Any) -> Any:
    """A JSON description of a type annotation: "int", {"union": [...]}, {"enum": [...]}, ..."""
    if annotation is type(None):
        return "none"
    if annotation in (int, float, bool, str):
        return annotation.__name__
    if annotation in (dict, list):
        return {annotation.__name__: "any"}
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return {"enum": [member.value for member in annotation]}
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return {"union": [describe(arg) for arg in args]}
    if origin is Literal:
        return {"literal": list(args)}
    if origin is list:
        return {"list": describe(args[0]) if args else "any"}
    if origin is dict:
        return {"dict": describe(args[1]) if args else "any"}
    return "any"  # objects no YAML value can be (a ParallelismConfig): SFTConfig itself checks them


def build(description: Any) -> Any:
    """The Python type a description stands for (enums become Literals of their values)."""
    if isinstance(description, str):
        return {"none": type(None), "int": int, "float": float, "bool": bool, "str": str, "any": Any}[description]
    (kind, inner), = description.items()
    if kind == "union":
        return typing.Union[tuple(build(d) for d in inner)]  # noqa: UP007 - built at run time
    if kind in ("enum", "literal"):
        return Literal[tuple(inner)]
    return list[build(inner)] if kind == "list" else dict[str, build(inner)]


def _config_class(method: str):
    import trl

    return getattr(trl, CONFIGS[method])


def live_fields(method: str = "sft") -> dict[str, Any]:
    """Describe the installed config of `method` (imports TRL: for the snapshot and its test only)."""
    config = _config_class(method)
    hints = typing.get_type_hints(config)
    return {f.name: describe(hints.get(f.name, Any)) for f in dataclasses.fields(config) if f.init}


def live_choices(method: str = "sft") -> dict[str, list[str]]:
    """The fields whose metadata lists the accepted strings (`choices`), and those strings."""
    return {f.name: list(f.metadata["choices"]) for f in dataclasses.fields(_config_class(method))
            if f.init and f.metadata.get("choices")}


@cache
def _recorded(method: str) -> dict[str, Any]:
    return json.loads(SNAPSHOTS[method].read_text(encoding="utf-8"))


def snapshot(method: str = "sft") -> dict[str, Any]:
    return _recorded(method)["fields"]


@cache
def field_types(method: str = "sft") -> dict[str, Any]:
    fields = {name: build(description) for name, description in snapshot(method).items()}
    if "fsdp" in fields:
        fields["fsdp"] = bool | str | None  # annotated str, but `fsdp: true` is how transformers 5 turns it on
    if method == "dpo":
        fields["loss_type"] = str | list[str]
    return fields


def _choices(description: Any) -> list[str]:
    if isinstance(description, dict):
        (kind, inner), = description.items()
        if kind == "enum":
            return list(inner)
        if kind == "union":
            return [choice for d in inner for choice in _choices(d)]
    return []


@cache
def enum_choices(method: str = "sft") -> dict[str, list[str]]:
    """The strings a field accepts: fields typed `SomeEnum | str` (the config turns the string into the enum, so
    only its values pass), and fields whose metadata lists `choices` (DPO's truncation_mode, KTO's loss_type...);
    DPO's loss_type: the names its trainer computes."""
    choices = {name: found for name, d in snapshot(method).items() if (found := _choices(d))
               and isinstance(d, dict) and "union" in d and "str" in d["union"]}
    choices.update(_recorded(method).get("choices", {}))
    if method == "dpo":
        choices["loss_type"] = list(DPO_LOSS_TYPES)
    return choices


def write_snapshot(method: str = "sft", path: Path | None = None) -> Path:
    import trl

    path = path or SNAPSHOTS[method]
    payload = {"trl": trl.__version__, "fields": live_fields(method), "choices": live_choices(method)}
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return path


if __name__ == "__main__":
    for name in sys.argv[1:] or SNAPSHOTS:
        print(f"wrote {write_snapshot(name)}")
