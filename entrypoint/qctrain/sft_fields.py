"""The fields of TRL's SFTConfig, read from a snapshot instead of importing TRL.

Importing TRL pulls in torch, transformers, PEFT and bitsandbytes (seconds); `validate` and `check`
only need each field's name, value type and, for the enum-typed ones, the accepted strings.
`sft_config_fields.json` holds that for the locked TRL; tests/test_recipe.py checks it against the
live SFTConfig, and `python -m qctrain.sft_fields` rewrites it after a lock change.
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

SNAPSHOT = Path(__file__).with_name("sft_config_fields.json")


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


def live_fields() -> dict[str, Any]:
    """Describe the installed SFTConfig (imports TRL: for the snapshot and its test only)."""
    from trl import SFTConfig

    hints = typing.get_type_hints(SFTConfig)
    return {f.name: describe(hints.get(f.name, Any)) for f in dataclasses.fields(SFTConfig) if f.init}


@cache
def snapshot() -> dict[str, Any]:
    return json.loads(SNAPSHOT.read_text(encoding="utf-8"))["fields"]


@cache
def field_types() -> dict[str, Any]:
    fields = {name: build(description) for name, description in snapshot().items()}
    if "fsdp" in fields:
        fields["fsdp"] = bool | str | None  # annotated str, but `fsdp: true` is how transformers 5 turns it on
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
def enum_choices() -> dict[str, list[str]]:
    """Fields typed `SomeEnum | str`: SFTConfig turns the string into the enum, so only its values pass."""
    return {name: choices for name, d in snapshot().items() if (choices := _choices(d))
            and isinstance(d, dict) and "union" in d and "str" in d["union"]}


def write_snapshot(path: Path = SNAPSHOT) -> None:
    import trl

    payload = {"trl": trl.__version__, "fields": live_fields()}
    path.write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n", encoding="utf-8")


if __name__ == "__main__":
    write_snapshot(Path(sys.argv[1]) if len(sys.argv) > 1 else SNAPSHOT)
    print(f"wrote {SNAPSHOT}")
