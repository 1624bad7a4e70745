"""The recipe: one YAML file (plus overlays, overrides and ${ENV}) -> one validated `Recipe`.

Strict by design: every section forbids unknown keys, and an unknown key is reported with its
dotted path and the closest valid name. `train:` is checked against TRL's SFTConfig fields, so
every TRL/TrainingArguments knob works without being re-typed here.
"""

import difflib
import hashlib
import json
import os
import re
import typing
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from qctrain.errors import InputError
from qctrain.hubtoken import TOKEN_PATTERN


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class Quantization(_Strict):
    bits: Literal[4, 8] = 4
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # How the packed 4-bit weights are stored (null: bitsandbytes' uint8). FSDP shards every parameter
    # into flat buffers of one dtype, so with FSDP set it to the compute dtype.
    storage_dtype: Literal["uint8", "bfloat16", "float16", "float32"] | None = None


class ModelSection(_Strict):
    name: str = Field(min_length=1)  # a Hub id or a local folder
    revision: str | None = None
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] = "sdpa"
    quantization: Quantization | None = Quantization()  # null: plain LoRA on an unquantized base
    trust_remote_code: bool = False
    # For a local folder: the Hub id it is a copy of. Only the model card and GGUF metadata use it
    # (base_model); the adapter itself points at the folder's absolute path.
    hub_id: str | None = Field(None, pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

    @model_serializer(mode="wrap")
    def _omit_unset_hub_id(self, handler):
        # Unset, it stays out of dumps, so recipes written before the field keep their fingerprints.
        data = handler(self)
        if self.hub_id is None:
            data.pop("hub_id", None)
        return data


class LoraSection(_Strict):
    r: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# The record formats data.formats has a normaliser for (NORMALISERS is keyed by this tuple).
DATA_FORMATS = ("alpaca", "sharegpt", "messages")


class DataSource(_Strict):
    path: str = Field(min_length=1)  # file, folder, or hub:org/name
    format: Literal["auto", *DATA_FORMATS] = "auto"
    # our field name -> the column that holds it in this source, e.g. {instruction: prompt}
    columns: dict[str, str] = {}
    # keys of this source's records (or turns) that are not read and not to be reported: its own metadata
    ignore_keys: list[str] = []
    split: str = "train"  # Hub data sets only
    revision: str | None = None  # Hub data sets only

    @field_validator("path")
    @classmethod
    def _not_a_url(cls, path: str) -> str:
        url = _URL.match(path)
        if url is None:
            return path
        repo = re.match(r"^hf://datasets/([^/@]+/[^/@]+)", path)
        hub = f"hub:{repo.group(1)}" if repo else "hub:ORG/NAME"
        raise ValueError(f"a {url.group(1)}:// URL is not read as data; use {hub} for a data set on the Hugging "
                         "Face Hub, or download the file and give its local path")


class EvalSplit(_Strict):
    fraction: float | None = Field(None, gt=0, lt=1)
    count: int | None = Field(None, gt=0)
    sources: list[DataSource] = []

    @model_validator(mode="after")
    def _one_way(self) -> "EvalSplit":
        ways = [self.fraction is not None, self.count is not None, bool(self.sources)]
        if sum(ways) > 1:
            raise ValueError("give only one of fraction, count or sources")
        return self


class DataSection(_Strict):
    sources: list[DataSource] = Field(min_length=1)
    eval: EvalSplit | None = EvalSplit(fraction=0.05)  # null: no evaluation
    seed: int = 42
    chat_template: str = "model"  # "model", a TRL template name (phi3_5), or a .jinja file
    max_seq_length: int = Field(2048, gt=0)
    packing: bool = True
    loss_on: Literal["assistant", "all"] = "assistant"
    dedup: bool = True
    on_bad_record: Literal["error", "skip"] = "error"
    on_overlong: Literal["drop", "truncate"] = "drop"
    # A reasoning trace (reasoning_content) where the chat template does not render one: a think block before the
    # answer, trained on (inline), or left out and counted (drop).
    reasoning: Literal["inline", "drop"] = "inline"


class OutputSection(_Strict):
    dir: str = Field(min_length=1)
    # Save a checkpoint at least this often (besides train.save_steps): bounds the work a preemption
    # or crash can lose. train.save_total_limit prunes the old ones either way.
    save_every_minutes: float | None = Field(None, gt=0)
    # Also write the adapter as a GGUF LoRA (llama.cpp, Ollama) with a Modelfile, into output.dir/gguf/.
    gguf: bool = False


class HubSection(_Strict):
    repo_id: str = Field(pattern=r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    private: bool = True
    push: Literal["end", "checkpoints", "never"] = "end"
    revision: str | None = None  # branch to push to
    push_merged: bool = False
    merged_repo_id: str | None = None


# SFTConfig fields that other recipe sections decide; naming them under train: is an error.
OWNED_ELSEWHERE = {
    "output_dir": "output.dir",
    "max_length": "data.max_seq_length",
    "max_seq_length": "data.max_seq_length",
    "packing": "data.packing",
    "assistant_only_loss": "data.loss_on",
    "completion_only_loss": "data.loss_on",
    "push_to_hub": "hub.push",
    "hub_model_id": "hub.repo_id",
    "hub_token": "the HF_TOKEN environment variable",
    "hub_private_repo": "hub.private",
    "model_init_kwargs": "model",
    "chat_template_path": "data.chat_template",
    "dataset_kwargs": "data",
    "trust_remote_code": "model.trust_remote_code",
}

# transformers 5 renamed these; recipes may use either name, SFTConfig gets the new one.
RENAMED_TRAIN_KEYS = {"gradient_checkpointing": "activation_checkpointing",
                      "gradient_checkpointing_kwargs": "activation_checkpointing_kwargs"}

TRAIN_DEFAULTS: dict[str, Any] = {
    "num_train_epochs": 1,
    # Four packs per step, as four rows with sdpa/eager (one padding-free row with flash attention): per
    # token as cheap as one pack per step with accumulation, with a quarter of the per-step overhead.
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    "learning_rate": 2.0e-4,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 0.03,  # a float below 1 is a fraction of the total steps
    "logging_steps": 10,
    "save_strategy": "steps",
    "save_steps": 200,
    "save_total_limit": 3,
    "eval_strategy": "epoch",
    "activation_checkpointing": True,  # on CPU off unless the recipe names it (Recipe.sft_config_kwargs)
    "activation_checkpointing_kwargs": {"use_reentrant": False},
    "report_to": "none",
}


# The resume policy: train: knobs that decide speed, memory, logging, evaluation, saving or pushing, never
# the weights; changing them between a preemption and the rerun does not stop the run from resuming
# (checkpoint.plan_resume).
HARMLESS_TRAIN_KEYS = frozenset({
    "report_to", "run_name", "project", "trackio_space_id", "disable_tqdm", "log_level", "log_level_replica",
    "log_on_each_node", "per_device_eval_batch_size", "auto_find_batch_size", "use_liger_kernel",
    "liger_kernel_config", "skip_memory_metrics", "ddp_timeout", "ddp_find_unused_parameters",
    "ddp_bucket_cap_mb", "ddp_broadcast_buffers", "ddp_backend", "use_cpu", "overwrite_output_dir",
    "resume_from_checkpoint", "load_best_model_at_end", "metric_for_best_model", "greater_is_better",
    "prediction_loss_only", "batch_eval_metrics", "restore_callback_states_from_checkpoint",
    "ignore_data_skip", "tf32", "torch_empty_cache_steps", "enable_jit_checkpoint",
})
HARMLESS_TRAIN_PREFIXES = ("dataloader_", "activation_checkpointing", "gradient_checkpointing", "torch_compile",
                           "logging_", "eval_", "save_", "hub_", "push_to_hub", "include_", "jit_")
# Attention kernels that compute the same attention (up to rounding): switching between them is harmless.
EQUIVALENT_ATTENTION = frozenset({"sdpa", "eager", "flash_attention_2", "flash_attention_3"})


def harmless(key: str, old: Any, new: Any) -> bool:
    """Whether changing recipe key `key` (dotted) from old to new leaves the trained weights as they were."""
    if key == "model.attn_implementation":
        return old in EQUIVALENT_ATTENTION and new in EQUIVALENT_ATTENTION
    section, _, name = key.partition(".")
    name = name.split(".", 1)[0]
    return section == "train" and (name in HARMLESS_TRAIN_KEYS or name.startswith(HARMLESS_TRAIN_PREFIXES))


class Recipe(_Strict):
    model: ModelSection
    lora: LoraSection = LoraSection()
    data: DataSection
    train: dict[str, Any] = {}
    output: OutputSection
    hub: HubSection | None = None

    @field_validator("train")
    @classmethod
    def _train_keys(cls, train: dict[str, Any]) -> dict[str, Any]:
        return check_train_section(train)

    def sha256(self) -> str:
        return hashlib.sha256(canonical_json(self.model_dump(mode="json")).encode()).hexdigest()

    def sft_kwargs(self) -> dict[str, Any]:
        """TRAIN_DEFAULTS overlaid with the recipe's train: section (what SFTConfig receives)."""
        kwargs = {**TRAIN_DEFAULTS, **{RENAMED_TRAIN_KEYS.get(k, k): v for k, v in self.train.items()}}
        kwargs.setdefault("seed", self.data.seed)
        return kwargs

    def sft_config_kwargs(self, checkpoints_dir: Path, has_eval: bool, cuda: bool) -> dict[str, Any]:
        """What TRL's SFTConfig gets (train.sft_config builds it): sft_kwargs plus what the other sections
        decide, with the settings that differ on a machine without CUDA."""
        kwargs = self.sft_kwargs()
        # Liger is applied by train.build_trainer (TRL's switch would leave out its fused linear cross entropy).
        kwargs.pop("use_liger_kernel", None)
        kwargs.pop("liger_kernel_config", None)
        kwargs.update(
            output_dir=str(checkpoints_dir),
            max_length=self.data.max_seq_length,
            packing=self.data.packing,
            packing_strategy="bfd",
            # The data stage already tokenized, masked, truncated and packed: the trainer takes it as is.
            dataset_kwargs={"skip_prepare_dataset": True},
            assistant_only_loss=False,
        )
        if not has_eval:
            kwargs["eval_strategy"] = "no"
        if not cuda:
            if not {"activation_checkpointing", "gradient_checkpointing"} & set(self.train):
                kwargs["activation_checkpointing"] = False  # recomputing costs a third of the forward; RAM is not short
            kwargs.setdefault("bf16", False)  # bf16 autocast on CPU is slow and gains nothing here
            kwargs.setdefault("fp16", False)
            kwargs.setdefault("dataloader_pin_memory", False)  # pinning needs an accelerator
            kwargs.setdefault("use_cpu", True)  # without it, ranks under torchrun on CPUs each train alone
        return kwargs


_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def canonical_json(value: Any) -> str:
    return _CANONICAL.encode(value)  # json.dumps would build the encoder anew on every call


def sft_field_types() -> dict[str, Any]:
    from qctrain.sft_fields import field_types

    return field_types()


def shorten(text: str, limit: int = 60) -> str:
    """text cut to `limit` characters: an error line stays short whatever it quotes."""
    return text if len(text) <= limit else f"{text[:limit - 1]}…"


def abbreviate(value: Any, limit: int = 60) -> str:
    return shorten(repr(value), limit)


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


class _TrainProblems(ValueError):
    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__("; ".join(f"{key}: {msg}" for key, msg in problems))
        self.problems = problems


def check_train_section(train: dict[str, Any]) -> dict[str, Any]:
    from qctrain.sft_fields import enum_choices

    fields = sft_field_types()
    problems: list[tuple[str, str]] = []
    checked = dict(train)
    for key, value in train.items():
        if key in OWNED_ELSEWHERE:
            problems.append((key, f"set by {OWNED_ELSEWHERE[key]}, not under train:"))
        elif key not in fields:
            problems.append((key, "unknown key, not a field of TRL's SFTConfig" + did_you_mean(key, fields)))
        else:
            try:
                checked[key] = TypeAdapter(fields[key]).validate_python(value)  # "1e-5" -> 1e-05
            except ValidationError as err:
                problems.append((key, f"{err.errors()[0]['msg']} (got {abbreviate(value)})"))
                continue
            except Exception:  # a field type pydantic cannot check; SFTConfig checks it at train time
                continue
            choices = enum_choices().get(key)
            if choices and isinstance(value, str) and value not in choices:
                problems.append((key, f"unknown value {value!r}{did_you_mean(value, choices)}; one of: "
                                      f"{shorten(', '.join(choices), 160)}"))
    if problems:
        raise _TrainProblems(problems)
    return checked


# --- loading: YAML, base overlays, --set overrides, ${ENV} ---

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


MAX_YAML_VALUES = 100_000  # a recipe holds a few hundred; aliases (*name) may not multiply that past sanity


def _expanded_size(node: yaml.Node, path: Path, sizes: dict[int, int], open_nodes: set[int]) -> int:
    """How many values the node stands for once every alias is written out (stops counting past the bound)."""
    key = id(node)
    if key in sizes:
        return sizes[key]
    if key in open_nodes:
        raise InputError(f"{path}: a YAML alias (*name) refers to a value that contains it; write the value out")
    open_nodes.add(key)
    children = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                else node.value if isinstance(node, yaml.SequenceNode) else [])
    total = 1
    for child in children:
        total += _expanded_size(child, path, sizes, open_nodes)
        if total > MAX_YAML_VALUES:
            break
    open_nodes.discard(key)
    sizes[key] = total
    return total


def _safe_load_bounded(text: str, path: Path) -> Any:
    """yaml.safe_load, refusing a document whose aliases expand it beyond MAX_YAML_VALUES (an alias bomb: a
    kilobyte that stands for billions of values) or that refers to itself, before anything walks it."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        if _expanded_size(node, path, {}, set()) > MAX_YAML_VALUES:
            raise InputError(f"{path}: YAML aliases (*name) expand the recipe beyond {MAX_YAML_VALUES:,} values; "
                             "write the values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"{path}: recipe file not found") from None
    except (OSError, UnicodeDecodeError) as err:
        raise InputError(f"{path}: cannot read recipe: {err}") from None
    try:
        data = _safe_load_bounded(text, path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f":{mark.line + 1}:{mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise InputError(f"{path}{where}: malformed YAML: {shorten(problem, 200)}") from None
    except RecursionError:
        raise InputError(f"{path}: malformed YAML: nested too deeply") from None
    if data is None:
        raise InputError(f"{path}: recipe is empty")
    if not isinstance(data, dict):
        raise InputError(f"{path}: a recipe is a mapping of sections, got {type(data).__name__}")
    return data


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_with_bases(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    path = path.resolve()
    if path in seen:
        raise InputError(f"{path}: 'base:' chain loops back to itself")
    data = read_yaml(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise InputError(f"{path}: base: expected a file name, got {abbreviate(base)}")
    return deep_merge(load_with_bases(path.parent / base, (*seen, path)), data)


def _path_parts(dotted: str) -> list[str | int]:
    """a.b[0].c -> ['a', 'b', 0, 'c']"""
    parts: list[str | int] = []
    for piece in dotted.split("."):
        name, *indexes = piece.replace("]", "").split("[")
        parts += [name, *(int(i) for i in indexes)] if name else [int(i) for i in indexes]
    return parts


def apply_override(data: dict[str, Any], assignment: str) -> None:
    """Apply one --set a.b[0].c=value; the value is parsed as YAML (so 3, true, [a, b] work)."""
    dotted, sep, raw = assignment.partition("=")
    try:
        parts = _path_parts(dotted) if sep and dotted else []
    except ValueError:
        parts = []
    if not parts:
        raise InputError(f"--set {shorten(assignment, 100)}: expected KEY.PATH=VALUE, "
                         "e.g. train.learning_rate=1e-4")
    node: Any = data
    for part, following in zip(parts[:-1], parts[1:], strict=True):
        try:
            if isinstance(part, str) and part not in node:
                node[part] = [] if isinstance(following, int) else {}
            node = node[part]
        except (IndexError, KeyError, TypeError):
            raise InputError(f"--set {shorten(assignment, 100)}: {shorten(str(part))} does not exist in the "
                         "recipe") from None
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        value = raw
    try:
        node[parts[-1]] = value
    except (IndexError, TypeError):
        raise InputError(f"--set {shorten(assignment, 100)}: {shorten(str(parts[-1]))} does not exist in the "
                         "recipe") from None


def expand_env(value: Any, env: typing.Mapping[str, str], where: str = "") -> Any:
    if isinstance(value, dict):
        return {k: expand_env(v, env, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, f"{where}[{i}]") for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise InputError(f"{where}: environment variable {name} is not set (use ${{{name}:-default}})")

    expanded = _ENV_REF.sub(substitute, value)
    if expanded != value and _ENV_REF.fullmatch(value):
        # A whole-value reference may stand for a number or a boolean.
        loaded = yaml.safe_load(expanded) if expanded else expanded
        return loaded if isinstance(loaded, (int, float, bool)) else expanded
    return expanded


# --- validation errors, one line each ---

def _loc(loc: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{shorten(str(p))}" for p in loc).lstrip(".")


def _section_fields(loc: tuple) -> list[str]:
    """The valid keys of the mapping that holds loc[-1], to suggest a spelling."""
    model: Any = Recipe
    for part in loc[:-1]:
        if isinstance(part, int) or model is None:
            continue
        field = model.model_fields.get(part) if hasattr(model, "model_fields") else None
        model = None
        if field is not None:
            for arg in [field.annotation, *typing.get_args(field.annotation)]:
                for inner in [arg, *typing.get_args(arg)]:
                    if isinstance(inner, type) and issubclass(inner, BaseModel):
                        model = inner
    return list(model.model_fields) if model is not None else []


def describe_errors(err: ValidationError) -> list[str]:
    problems = []
    for item in err.errors():
        loc = tuple(item["loc"])
        ctx_error = (item.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _TrainProblems):
            problems += [f"train.{key}: {msg}" for key, msg in ctx_error.problems]
        elif item["type"] == "extra_forbidden":
            problems.append(f"{_loc(loc)}: unknown key{did_you_mean(str(loc[-1])[:100], _section_fields(loc))}")
        elif item["type"] == "missing":
            problems.append(f"{_loc(loc)}: required")
        else:
            got = item.get("input")
            shown = "" if isinstance(got, dict) else f" (got {abbreviate(got)})"
            problems.append(f"{_loc(loc)}: {shorten(item['msg'], 300)}{shown}")
    return problems


class RecipeError(InputError):
    def __init__(self, path: Path, problems: list[str]):
        self.problems = [f"{path}: {p}" for p in problems]
        super().__init__("\n".join(self.problems))


def _token_like_values(value: Any, where: str) -> list[str]:
    """Paths of values that hold a Hub token (typed in, or brought in by ${HF_TOKEN})."""
    if isinstance(value, dict):
        return [p for k, v in value.items() for p in _token_like_values(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _token_like_values(v, f"{where}[{i}]")]
    return [where] if isinstance(value, str) and TOKEN_PATTERN.search(value) else []


def _reject_secrets(data: dict[str, Any]) -> list[str]:
    """The resolved recipe goes into run_manifest.json and the model card: no token may be in it."""
    hub = data.get("hub")
    keys = [f"hub.{k}" for k in hub if "token" in str(k).lower()] if isinstance(hub, dict) else []
    keys += [str(k) for k in data if "token" in str(k).lower()]
    keys += [k for k in _token_like_values(data, "") if k not in keys]
    return [f"{k}: never put a Hub token in a recipe; set HF_TOKEN or HF_TOKEN_FILE in the environment"
            for k in keys]


def output_data_overlap(data: DataSection, output_dir: str | Path) -> list[str]:
    """output.dir equal to, inside or containing a local data source: the run would write its reports and
    checkpoints among the data (and read them back as data next time). Paths only, nothing is read."""
    out = Path(os.path.realpath(output_dir))
    sources = [*data.sources, *(data.eval.sources if data.eval else [])]
    problems = []
    for src in sources:
        if src.path.startswith("hub:"):
            continue
        source = Path(os.path.realpath(src.path))
        if out == source:
            relation = "is the data source"
        elif out in source.parents:
            relation = "contains the data source"
        elif source in out.parents:
            relation = "is inside the data folder"
        else:
            continue
        problems.append(f"output.dir: {shorten(str(output_dir), 100)} {relation} {shorten(src.path, 100)}; "
                        "use a folder apart from the data (the run writes reports and checkpoints there)")
    return problems


def load_recipe(path: str | Path, overrides: typing.Sequence[str] = (),
                env: typing.Mapping[str, str] | None = None) -> Recipe:
    path = Path(path)
    data = load_with_bases(path)
    for assignment in overrides:
        apply_override(data, assignment)
    data = expand_env(data, os.environ if env is None else env)
    problems = _reject_secrets(data)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        flagged = {p.split(":")[0] for p in problems}
        problems += [p for p in describe_errors(err) if p.split(":")[0] not in flagged]
    else:
        problems += output_data_overlap(recipe.data, recipe.output.dir)
    if problems:
        raise RecipeError(path, problems)
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False, allow_unicode=True)
