"""The recipe: one YAML file (plus overlays, overrides and ${ENV}) -> one validated `Recipe`.

Strict by design: every section forbids unknown keys, and an unknown key is reported with its
dotted path and the closest valid name. `train:` is checked against the fields of the TRL config of the recipe's
`method` (SFTConfig, DPOConfig, KTOConfig), so every TRL/TrainingArguments knob works without being re-typed here.
"""

import difflib
import hashlib
import json
import math
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

from qctrain.atomic import FileTooLarge, NotRegularFile, read_regular
from qctrain.errors import InputError, shorten
from qctrain.secretmask import find_secret, is_secret_name, mask


class _Strict(BaseModel):
    # allow_inf_nan: a NaN would be written as null into run_manifest.json, which then no longer validates
    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


MAX_SEED = 2**32 - 1  # numpy's and CUDA's seeds are 32-bit
MAX_SEQ_LENGTH = 1 << 24  # tokens; preflight also holds it to the model's max_position_embeddings
MAX_LORA_RANK = 4096


def hub_id_problem(value: str, owner_required: bool) -> str | None:
    """Why `value` is not a Hub repo id (huggingface_hub's own rules: no '..', no leading '/', one '/' at most),
    None when it is one."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError as err:
        return str(err).split(": '", 1)[0].removesuffix(".").replace("Repo id", "a Hub id")
    if owner_required and value.count("/") != 1:
        return "a Hub repo id names its owner: 'user-or-org/name'"
    return None


def _repo_id(value: str | None) -> str | None:
    if value is not None and (problem := hub_id_problem(value, owner_required=True)):
        raise ValueError(problem)
    return value


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
    # method dpo/kto: the LoRA adapter to continue, a finished qctrain run folder (its adapter/ and manifest) or a
    # Hub adapter repo id; the same adapter, frozen, is the reference. None: a new adapter on the bare base, whose
    # reference is the base itself (the adapter disabled).
    adapter: str | None = Field(None, min_length=1)

    @model_serializer(mode="wrap")
    def _omit_unset_optional(self, handler):
        # Unset, they stay out of dumps, so recipes written before the fields keep their fingerprints.
        data = handler(self)
        for key in ("hub_id", "adapter"):
            if getattr(self, key) is None:
                data.pop(key, None)
        return data


class LoraSection(_Strict):
    r: int = Field(16, gt=0, le=MAX_LORA_RANK)
    alpha: int = Field(32, gt=0, le=1 << 20)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: Literal["all-linear"] | list[str] = "all-linear"
    bias: Literal["none", "all", "lora_only"] = "none"
    use_rslora: bool = False


_URL = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


# The record formats data.formats has a normaliser for (NORMALISERS is keyed by this tuple).
DATA_FORMATS = ("alpaca", "sharegpt", "messages")
# The preference record formats data.preference has a normaliser for (method dpo and kto; PAIR_NORMALISERS).
PREFERENCE_FORMATS = ("preference", "sharegpt_ranking", "kto")
METHODS = ("sft", "dpo", "kto")
# The formats each method reads: kto also reads paired data, each pair as a desirable and an undesirable row.
METHOD_FORMATS = {"sft": DATA_FORMATS, "dpo": ("preference", "sharegpt_ranking"), "kto": PREFERENCE_FORMATS}


class DataSource(_Strict):
    path: str = Field(min_length=1)  # file, folder, or hub:org/name
    format: Literal["auto", *DATA_FORMATS, *PREFERENCE_FORMATS] = "auto"
    # our field name -> the column that holds it in this source, e.g. {instruction: prompt}
    columns: dict[str, str] = {}
    # keys of this source's records (or turns) that are not read and not to be reported: its own metadata
    ignore_keys: list[str] = []
    split: str = "train"  # Hub data sets only
    revision: str | None = None  # Hub data sets only

    @field_validator("path")
    @classmethod
    def _not_a_url(cls, path: str) -> str:
        if path.startswith("hub:") and (problem := hub_id_problem(path.removeprefix("hub:"), owner_required=False)):
            raise ValueError(f"hub:NAME names a Hub data set: {problem}")
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
    seed: int = Field(42, ge=0, le=MAX_SEED)
    chat_template: str = "model"  # "model", a TRL template name (phi3_5), or a .jinja file
    max_seq_length: int = Field(2048, gt=0, le=MAX_SEQ_LENGTH)
    packing: bool = True  # method dpo/kto: false (TRL trains preference pairs padded)
    loss_on: Literal["assistant", "all"] = "assistant"
    dedup: bool = True
    on_bad_record: Literal["error", "skip"] = "error"
    on_overlong: Literal["drop", "truncate"] = "drop"  # dpo/kto: truncate cuts the prompt from the left
    # An assistant turn's reasoning trace: rendered and trained on (inline: by the chat template, or as a think
    # block before the answer where the template has no place for it), or left out and counted (drop).
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
    # if_better: as end, once the evaluation says the tuned model is not worse than its base (evaluate.gate)
    push: Literal["end", "checkpoints", "never", "if_better"] = "end"
    revision: str | None = None  # branch to push to
    push_merged: bool = False
    merged_repo_id: str | None = None

    _repo_ids = field_validator("repo_id", "merged_repo_id")(_repo_id)


HELDOUT_METRICS = {"loss": False, "mean_token_accuracy": True}  # gateable held-out metrics: higher is better?


class GateRule(_Strict):
    """The tuned model may be worse than its base on `metric` by at most `tolerance` (absolute; negative: it must
    be better by that much). metric: heldout.loss, heldout.mean_token_accuracy, or TASK.METRIC of an
    evaluate.tasks entry (lm-eval's metric name, e.g. arc_easy.acc_norm; METRIC,FILTER where a task filters)."""

    metric: str
    tolerance: float = 0.0

    @field_validator("metric")
    @classmethod
    def _task_dot_metric(cls, metric: str) -> str:
        if not re.fullmatch(r"[^.\s]+(\.[^.\s]+)*\.[^.\s]+", metric):
            raise ValueError("expected TASK.METRIC (e.g. arc_easy.acc_norm) or heldout.loss / "
                             "heldout.mean_token_accuracy")
        return metric

    @property
    def task(self) -> str:
        return self.metric.rsplit(".", 1)[0]

    @property
    def measure(self) -> str:
        return self.metric.rsplit(".", 1)[1]


class TaskFile(_Strict):
    file: str = Field(min_length=1)  # an lm-eval task YAML; its data_files are relative to its own folder


class EvaluateSection(_Strict):
    """Base against tuned on the same footing (qctrain eval, and at the end of train)."""

    heldout: bool = True  # loss and token accuracy of both on data.eval
    samples: bool = True  # replies of both to the held-out prompts (the card's samples)
    max_new_tokens: int = Field(48, gt=0, le=4096)
    # lm-eval tasks: built-in names (their data from the HF cache, or the Hub when online) or local task files
    tasks: list[str | TaskFile] = []
    num_fewshot: int | None = Field(None, ge=0, le=1000)  # null: each task's own default
    limit: int | float | None = Field(None, gt=0)  # documents per task: a count, or a fraction below 1 (the first ones)
    batch_size: int = Field(8, gt=0, le=4096)
    chat_template: bool = False  # render the prompts through the chat template (lm-eval's apply_chat_template)
    gate: list[GateRule] = []  # every rule must hold for hub.push: if_better to push

    @field_validator("gate", mode="before")
    @classmethod
    def _one_rule_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, dict) else value

    @field_validator("limit")
    @classmethod
    def _count_or_fraction(cls, limit: int | float | None) -> int | float | None:
        if limit is not None and limit >= 1 and limit != int(limit):
            raise ValueError("a number of documents (a whole number), or a fraction below 1")
        return int(limit) if limit is not None and limit >= 1 else limit

    def task_names(self) -> list[str]:
        return [task for task in self.tasks if isinstance(task, str)]


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

# Preference methods: TRL's configs own these names too (DPOConfig, KTOConfig).
PREFERENCE_OWNED_ELSEWHERE = {
    "max_length": "data.max_seq_length",
    "truncation_mode": "data.on_overlong (drop, or truncate: the prompt is cut from the left)",
    "padding_free": "data.packing (TRL trains preference pairs padded)",
    "dataset_num_proc": "data (qctrain tokenizes the pairs itself)",
    "pad_token": "the tokenizer",
}

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
    "activation_checkpointing": True,  # on CPU off unless the recipe names it (train.sft_config_kwargs)
    "activation_checkpointing_kwargs": {"use_reentrant": False},
    "report_to": "none",
}
# Overlaid on TRAIN_DEFAULTS per method. DPO and KTO on a LoRA adapter: 5e-6, the learning rate of the alignment
# handbook's QLoRA DPO recipes (SFT's 2e-4 overshoots at once; TRL's own 1e-6 is a full fine-tuning value).
METHOD_TRAIN_DEFAULTS: dict[str, dict[str, Any]] = {"sft": {}, "dpo": {"learning_rate": 5.0e-6},
                                                    "kto": {"learning_rate": 5.0e-6}}


class Recipe(_Strict):
    # sft: supervised fine-tuning (TRL's SFTTrainer); dpo, kto: preference tuning (DPOTrainer, KTOTrainer), usually
    # continuing an SFT run's adapter (model.adapter). Declared before train:, whose keys it decides.
    method: Literal["sft", "dpo", "kto"] = "sft"
    model: ModelSection
    lora: LoraSection = LoraSection()
    data: DataSection
    train: dict[str, Any] = {}
    output: OutputSection
    hub: HubSection | None = None
    evaluate: EvaluateSection | None = None  # null: the final eval loss and the samples, as ever

    @field_validator("train")
    @classmethod
    def _train_keys(cls, train: dict[str, Any], info) -> dict[str, Any]:
        return check_train_section(train, info.data.get("method", "sft"))

    @model_validator(mode="after")
    def _method_rules(self) -> "Recipe":
        problems = format_problems(self)
        if self.method == "sft":
            if self.model.adapter is not None:
                problems.append("model.adapter: continuing an adapter is for method: dpo or kto (preference tuning "
                                "after SFT); an SFT run starts a new adapter")
            if problems:
                raise _Problems(problems)
            return self
        problems += preference_problems(self)
        if problems:
            raise _Problems(problems)
        # Defaults that differ for preference tuning, where the recipe leaves them unset.
        if "packing" not in self.data.model_fields_set:
            self.data.packing = False
        if "dropout" not in self.lora.model_fields_set:
            self.lora.dropout = 0.0  # TRL zeroes every dropout for DPO/KTO unless train.disable_dropout: false
        if self.evaluate is not None and "heldout" not in self.evaluate.model_fields_set:
            self.evaluate.heldout = False  # the preference trainer evaluates its held-out rows itself
        return self

    @model_serializer(mode="wrap")
    def _omit_defaults_added_later(self, handler):
        # method: sft and an unset evaluate: stay out of dumps, so recipes written before those fields keep their
        # hashes and fingerprints (one serializer: pydantic keeps only the last one a class defines).
        data = handler(self)
        if self.method == "sft":
            data.pop("method", None)
        if self.evaluate is None:
            data.pop("evaluate", None)
        return data

    def sha256(self) -> str:
        return hashlib.sha256(canonical_json(self.model_dump(mode="json")).encode()).hexdigest()

    def sft_kwargs(self) -> dict[str, Any]:
        """TRAIN_DEFAULTS (and the method's own, METHOD_TRAIN_DEFAULTS) overlaid with the recipe's train: section
        (what the method's TRL config receives: SFTConfig, DPOConfig or KTOConfig)."""
        kwargs = {**TRAIN_DEFAULTS, **METHOD_TRAIN_DEFAULTS[self.method],
                  **{RENAMED_TRAIN_KEYS.get(k, k): v for k, v in self.train.items()}}
        kwargs.setdefault("seed", self.data.seed)
        return kwargs


def format_problems(recipe: "Recipe") -> list[str]:
    """Sources whose format the recipe's method does not read (SFT conversations, preference pairs)."""
    problems = []
    data, method = recipe.data, recipe.method
    for where, sources in (("data.sources", data.sources), ("data.eval.sources", data.eval.sources if data.eval
                                                            else [])):
        for i, src in enumerate(sources):
            if src.format in ("auto", *METHOD_FORMATS[method]):
                continue
            if method == "sft":
                problems.append(f"{where}[{i}].format: {src.format} is a preference format; method sft reads "
                                f"{', '.join(DATA_FORMATS)} (or auto); set method: dpo or kto")
            else:
                problems.append(f"{where}[{i}].format: {src.format} is not a preference format; method {method} "
                                f"reads {', '.join(METHOD_FORMATS[method])} (or auto)")
    return problems


def preference_problems(recipe: "Recipe") -> list[str]:
    """What a dpo/kto recipe asks that preference tuning cannot honour, one line each naming the keys."""
    method, data, train = recipe.method, recipe.data, recipe.train
    problems = []
    if "packing" in data.model_fields_set and data.packing:
        problems.append(f"data.packing: method {method} trains each pair padded (TRL's preference collator; its "
                        "padding_free is disabled); set data.packing: false or leave it out")
    if data.loss_on != "assistant":
        problems.append(f"data.loss_on: method {method} scores the completions, never the prompt; leave it "
                        "at assistant")
    if "dropout" in recipe.lora.model_fields_set and recipe.lora.dropout > 0 and train.get("disable_dropout",
                                                                                          True) is not False:
        problems.append(f"lora.dropout: {recipe.lora.dropout:g} is not honoured: train.disable_dropout (true by "
                        f"default for {method}) zeroes every dropout, LoRA's too; set lora.dropout: 0 or "
                        "train.disable_dropout: false")
    targets = recipe.lora.target_modules
    if isinstance(targets, list) and "lm_head" in targets:
        problems.append(f"lora.target_modules: lm_head cannot be trained with method {method} (TRL scores the "
                        "completions with the LM head's weight directly)")
    if train.get("fsdp"):
        problems.append(f"train.fsdp: method {method} runs as DDP (one whole 4-bit model per process); FSDP is "
                        "for SFT here")
    if train.get("sync_ref_model"):
        problems.append("train.sync_ref_model: TRL cannot sync the reference of a LoRA run (its reference is the "
                        "base or a frozen copy of the adapter); leave it false")
    if method == "kto" and train.get("loss_type", "kto") != "apo_zero_unpaired":
        if train.get("train_sampling_strategy", "sequential") != "sequential":
            problems.append("train.train_sampling_strategy: KTO's KL term pairs each completion with its batch "
                            "neighbours, so it must be sequential (qctrain shuffles the rows once, seeded)")
        if train.get("per_device_train_batch_size", TRAIN_DEFAULTS["per_device_train_batch_size"]) < 2:
            problems.append("train.per_device_train_batch_size: KTO needs at least 2 rows per batch (its KL term "
                            "takes the completions of the other rows)")
    for key in ("use_liger_kernel", "liger_kernel_config"):
        if train.get(key):
            problems.append(f"train.{key}: qctrain applies Liger's kernels to SFT runs; method {method} scores the "
                            "completions with TRL's own fused LM head (leave it out)")
    evaluate = recipe.evaluate
    if evaluate is not None and evaluate.heldout and "heldout" in evaluate.model_fields_set:
        problems.append(f"evaluate.heldout: method {method} measures its held-out {HELD_OUT_ROWS[method]} itself "
                        "(reward accuracy and margins at the first and the last evaluation: the manifest's preference "
                        "and the card); set evaluate.heldout: false or leave it out")
    return problems


HELD_OUT_ROWS = {"dpo": "pairs", "kto": "completions"}


def gate_problems(recipe: "Recipe") -> list[str]:
    """What makes hub.push: if_better or evaluate.gate impossible to decide, found without reading any file (a
    local task's name is in its file: preflight checks those)."""
    evaluate, problems = recipe.evaluate, []
    if recipe.hub is not None and recipe.hub.push == "if_better" and (evaluate is None or not evaluate.gate):
        problems.append("hub.push: if_better needs evaluate.gate: the metric(s) the tuned model must not be worse on")
    for i, rule in enumerate(evaluate.gate if evaluate else []):
        where = f"evaluate.gate[{i}].metric: {rule.metric}"
        if rule.task == "heldout":
            if recipe.method != "sft":
                problems.append(f"{where}: the held-out loss and accuracy of base and tuned are measured for method "
                                f"sft; a {recipe.method} run's held-out metrics are in its manifest (preference)")
            elif rule.measure not in HELDOUT_METRICS:
                problems.append(f"{where}: the held-out metrics are {', '.join(HELDOUT_METRICS)}")
            elif not evaluate.heldout or recipe.data.eval is None:
                problems.append(f"{where}: needs evaluate.heldout: true and a data.eval split")
        elif rule.task not in evaluate.task_names() and len(evaluate.task_names()) == len(evaluate.tasks):
            problems.append(f"{where}: {rule.task} is not in evaluate.tasks"
                            + did_you_mean(rule.task, evaluate.task_names()))
    return problems


_CANONICAL = json.JSONEncoder(sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def canonical_json(value: Any) -> str:
    return _CANONICAL.encode(value)  # json.dumps would build the encoder anew on every call


def sft_field_types(method: str = "sft") -> dict[str, Any]:
    from qctrain.sft_fields import field_types

    return field_types(method)


def abbreviate(value: Any, limit: int = 60) -> str:
    return shorten(repr(value), limit)


def did_you_mean(word: str, choices: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}'?)" if close else ""


# Ranges of the numeric train: keys (TRL/transformers accept some of these out of range and fail late, or train
# on nonsense): key -> (lowest, highest, whether the lowest is allowed). None: unbounded on that side.
_POSITIVE = (0, None, False)
_NON_NEGATIVE = (0, None, True)
_AT_LEAST_ONE = (1, None, True)
_FRACTION = (0, 1, True)
TRAIN_RANGES: dict[str, tuple[float | None, float | None, bool]] = {
    "learning_rate": _POSITIVE, "num_train_epochs": _NON_NEGATIVE, "max_steps": (-1, None, True),
    "seed": (0, MAX_SEED, True), "data_seed": (0, MAX_SEED, True),
    "warmup_steps": _NON_NEGATIVE, "weight_decay": _NON_NEGATIVE,
    "max_grad_norm": _NON_NEGATIVE, "adam_beta1": _FRACTION, "adam_beta2": _FRACTION, "adam_epsilon": _POSITIVE,
    "label_smoothing_factor": _FRACTION, "neftune_noise_alpha": _NON_NEGATIVE,
    "per_device_train_batch_size": _AT_LEAST_ONE, "per_device_eval_batch_size": _AT_LEAST_ONE,
    "gradient_accumulation_steps": _AT_LEAST_ONE, "eval_accumulation_steps": _AT_LEAST_ONE,
    "logging_steps": _POSITIVE, "save_steps": _POSITIVE, "eval_steps": _POSITIVE, "eval_delay": _NON_NEGATIVE,
    "save_total_limit": _NON_NEGATIVE, "dataloader_num_workers": _NON_NEGATIVE,
    "dataloader_prefetch_factor": _AT_LEAST_ONE, "torch_empty_cache_steps": _AT_LEAST_ONE,
    "ddp_timeout": _POSITIVE,
}


def _non_finite(value: Any) -> bool:
    if isinstance(value, float):
        return not math.isfinite(value)
    if isinstance(value, dict):
        return any(_non_finite(v) for v in value.values())
    return isinstance(value, list) and any(_non_finite(v) for v in value)


def range_problem(key: str, value: Any) -> str | None:
    """Why a checked train: value is out of range (NaN and infinity anywhere in it included), None if it is not."""
    if _non_finite(value):
        return f"must be a finite number (got {abbreviate(value)})"
    if key not in TRAIN_RANGES or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    low, high, low_allowed = TRAIN_RANGES[key]
    if low is not None and (value < low or (value == low and not low_allowed)):
        return f"must be {'at least' if low_allowed else 'greater than'} {low} (got {abbreviate(value)})"
    if high is not None and value > high:
        return f"must be at most {high:,} (got {abbreviate(value)})"
    return None


class _Problems(ValueError):
    """Problems found by a validator, each a whole line naming its key (describe_errors prints them as they are)."""

    def __init__(self, lines: list[str]):
        super().__init__("; ".join(lines))
        self.lines = lines


class _TrainProblems(_Problems):
    def __init__(self, problems: list[tuple[str, str]]):
        super().__init__([f"train.{key}: {msg}" for key, msg in problems])
        self.problems = problems


CONFIG_NAMES = {"sft": "SFTConfig", "dpo": "DPOConfig", "kto": "KTOConfig"}


def check_train_section(train: dict[str, Any], method: str = "sft") -> dict[str, Any]:
    from qctrain.sft_fields import enum_choices

    fields = sft_field_types(method)
    owned = OWNED_ELSEWHERE if method == "sft" else {**OWNED_ELSEWHERE, **PREFERENCE_OWNED_ELSEWHERE}
    problems: list[tuple[str, str]] = []
    checked = dict(train)
    for key, value in train.items():
        if key in owned:
            problems.append((key, f"set by {owned[key]}, not under train:"))
        elif key not in fields:
            problems.append((key, f"unknown key, not a field of TRL's {CONFIG_NAMES[method]}"
                             + did_you_mean(key, fields)))
        else:
            try:
                checked[key] = TypeAdapter(fields[key]).validate_python(value)  # "1e-5" -> 1e-05
            except ValidationError as err:
                problems.append((key, f"{err.errors()[0]['msg']} (got {abbreviate(value)})"))
                continue
            except Exception:  # a field type pydantic cannot check; SFTConfig checks it at train time
                continue
            if problem := range_problem(key, checked[key]):
                problems.append((key, problem))
                continue
            choices = enum_choices(method).get(key)
            for name in ([value] if isinstance(value, str) else value if isinstance(value, list) else []):
                if choices and isinstance(name, str) and name not in choices:
                    problems.append((key, f"unknown value {name!r}{did_you_mean(name, choices)}; one of: "
                                          f"{shorten(', '.join(choices), 160)}"))
    if problems:
        raise _TrainProblems(problems)
    return checked


# --- loading: YAML, base overlays, --set overrides, ${ENV} ---

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

# A recipe is a few kilobytes. The bounds keep a hostile one (a FIFO, /dev/zero, a 100 MB file, a kilobyte
# of aliases standing for gigabytes) to a one-line refusal within a second.
MAX_RECIPE_BYTES = 1 << 20  # each file: the recipe and each base:
MAX_EXPANDED_BYTES = 2 << 20  # what it stands for once aliases, bases, --set and ${VAR} are written out
MAX_YAML_VALUES = 100_000  # a recipe holds a few hundred values
MAX_BASE_DEPTH = 16  # base: files chained

_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml's parser where PyYAML was built with it
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Size:
    """Values and bytes a YAML node stands for once every alias is written out (memoised per node)."""

    def __init__(self, path: Path | str):
        self.path, self.known, self.open = path, {}, set()

    def of(self, node: yaml.Node) -> tuple[int, int]:
        key = id(node)
        if key in self.known:
            return self.known[key]
        if key in self.open:
            raise InputError(f"{self.path}: a YAML alias (*name) refers to a value that contains it; write the "
                             "value out")
        self.open.add(key)
        if isinstance(node, yaml.ScalarNode):
            values, size = 1, len(node.value.encode("utf-8", "replace")) + 2
        else:
            children = [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else node.value
            values, size = 1, 2
            for child in children:
                child_values, child_size = self.of(child)
                values, size = values + child_values, size + child_size
                if values > MAX_YAML_VALUES or size > MAX_EXPANDED_BYTES:
                    break
        self.open.discard(key)
        self.known[key] = values, size
        return values, size


def _safe_load_bounded(text: str, path: Path | str) -> Any:
    """yaml.safe_load (libyaml's), refusing a document whose aliases expand it beyond MAX_EXPANDED_BYTES or
    MAX_YAML_VALUES (an alias bomb: a kilobyte that stands for gigabytes) or that refers to itself, before
    anything walks it."""
    loader = _LOADER(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        values, size = _Size(path).of(node)
        if values > MAX_YAML_VALUES or size > MAX_EXPANDED_BYTES:
            raise InputError(f"{path}: YAML aliases (*name) expand the recipe beyond "
                             f"{MAX_EXPANDED_BYTES >> 20} MiB or {MAX_YAML_VALUES:,} values; write the values out")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _read_recipe_text(path: Path) -> str:
    try:
        raw = read_regular(path, MAX_RECIPE_BYTES)
    except FileNotFoundError:
        raise InputError(f"{path}: recipe file not found") from None
    except NotRegularFile as err:
        raise InputError(f"{path}: {err}; a recipe is a YAML file") from None
    except FileTooLarge as err:
        raise InputError(f"{path}: {err} ({MAX_RECIPE_BYTES >> 20} MiB); a recipe is a few kilobytes") from None
    except OSError as err:
        raise InputError(f"{path}: cannot read recipe: {err.strerror or err}") from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: cannot read recipe: invalid UTF-8 at byte {err.start}") from None


def read_yaml(path: Path) -> dict[str, Any]:
    text = _read_recipe_text(path)
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
    if len(seen) >= MAX_BASE_DEPTH:
        raise InputError(f"{path}: 'base:' chain longer than {MAX_BASE_DEPTH} files")
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
        value = _safe_load_bounded(raw, f"--set {shorten(dotted, 100)}") if raw else ""
    except yaml.YAMLError:
        value = raw
    try:
        node[parts[-1]] = value
    except (IndexError, TypeError):
        raise InputError(f"--set {shorten(assignment, 100)}: {shorten(str(parts[-1]))} does not exist in the "
                         "recipe") from None


def secret_references(value: Any, where: str = "") -> list[tuple[str, str]]:
    """(place, variable) for every ${VAR} whose name says it holds a secret (secretmask.is_secret_name)."""
    if isinstance(value, dict):
        return [r for k, v in value.items() for r in secret_references(v, f"{where}.{k}" if where else str(k))]
    if isinstance(value, list):
        return [r for i, v in enumerate(value) for r in secret_references(v, f"{where}[{i}]")]
    if not isinstance(value, str):
        return []
    return [(where, m.group(1)) for m in _ENV_REF.finditer(value) if is_secret_name(m.group(1))]


class _Budget:
    """Bytes left for the values ${VAR} brings in (a thousand references to a 128 KiB variable)."""

    def __init__(self, left: int):
        self.left = left

    def spend(self, text: str, where: str) -> None:
        self.left -= len(text)
        if self.left < 0:
            raise InputError(f"{where}: ${{VAR}} values make the recipe larger than {MAX_EXPANDED_BYTES >> 20} MiB")


def expand_env(value: Any, env: typing.Mapping[str, str], where: str = "", budget: _Budget | None = None) -> Any:
    """${VAR} and ${VAR:-default} replaced from env. A variable named like a secret is left as written: a recipe
    never holds a secret (load_recipe refuses the reference)."""
    budget = budget or _Budget(MAX_EXPANDED_BYTES)
    if isinstance(value, dict):
        return {k: expand_env(v, env, f"{where}.{k}" if where else str(k), budget) for k, v in value.items()}
    if isinstance(value, list):
        return [expand_env(v, env, f"{where}[{i}]", budget) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, default = match.group(1), match.group(2)
        if is_secret_name(name):
            return match.group(0)
        if name in env and env[name] != "":
            return env[name]
        if default is not None:
            return default
        raise InputError(f"{where}: environment variable {name} is not set (use ${{{name}:-default}})")

    expanded = _ENV_REF.sub(substitute, value)
    if expanded == value:
        return value
    budget.spend(expanded, where)
    if _ENV_REF.fullmatch(value) and len(expanded) <= 64:
        # A whole-value reference may stand for a number or a boolean; anything else stays the string it is.
        try:
            loaded = yaml.load(expanded, Loader=_LOADER)
        except yaml.YAMLError:
            return expanded
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
        if isinstance(ctx_error, _Problems):
            problems += ctx_error.lines
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


HUB_TOKEN_ADVICE = "never put a Hub token in a recipe; set HF_TOKEN or HF_TOKEN_FILE in the environment"


def _secret_places(value: Any, where: str, env: typing.Mapping[str, str]) -> list[tuple[str, str]]:
    """(place, what it holds) for every key or value holding a secret: a Hub token, typed in or brought in by
    --set, or the value of a secret environment variable (secretmask.find_secret)."""
    if isinstance(value, dict):
        places = []
        for key, item in value.items():
            if isinstance(key, str) and (source := find_secret(key, env)):
                places.append((f"{where}.<a key>" if where else "<a key>", source))  # the key would show it
                continue
            places += _secret_places(item, f"{where}.{key}" if where else str(key), env)
        return places
    if isinstance(value, list):
        return [p for i, v in enumerate(value) for p in _secret_places(v, f"{where}[{i}]", env)]
    source = find_secret(value, env) if isinstance(value, str) else None
    return [(where, source)] if source else []


def _reject_secrets(data: dict[str, Any], references: list[tuple[str, str]],
                    env: typing.Mapping[str, str]) -> list[str]:
    """The recipe is printed, written into run_manifest.json, the model card and checkpoint markers, pushed,
    and its train: values reach the trainer's trackers: no secret may be in it. One line per place, naming
    the variable, never the value."""
    hub = data.get("hub")
    problems = {f"hub.{k}": HUB_TOKEN_ADVICE for k in hub if "token" in str(k).lower()} if isinstance(hub, dict) \
        else {}
    problems.update({str(k): HUB_TOKEN_ADVICE for k in data if "token" in str(k).lower()})
    for place, name in references:
        problems.setdefault(place, f"${{{name}}} names a secret; secrets stay in the environment, never in a recipe "
                                   "(it is printed, written into the run's manifest and card, and pushed)")
    for place, source in _secret_places(data, "", env):
        problems.setdefault(place, HUB_TOKEN_ADVICE if source == "a Hub token" else
                            f"holds the value of {source}, a secret; secrets stay in the environment, never in a "
                            "recipe")
    return [f"{place}: {text}" for place, text in problems.items()]


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
    env = os.environ if env is None else env
    data = load_with_bases(path)
    for assignment in overrides:
        apply_override(data, assignment)
    references = secret_references(data)
    data = expand_env(data, env)
    if len(json.dumps(data, default=str)) > MAX_EXPANDED_BYTES:  # bases and --set values added up
        raise InputError(f"{path}: the recipe with its bases and --set values is larger than "
                         f"{MAX_EXPANDED_BYTES >> 20} MiB")
    problems = _reject_secrets(data, references, env)
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as err:
        flagged = {p.split(":")[0] for p in problems}
        problems += [p for p in describe_errors(err) if p.split(":")[0] not in flagged]
    else:
        problems += output_data_overlap(recipe.data, recipe.output.dir) + gate_problems(recipe)
    if problems:
        raise RecipeError(path, [mask(p, env=env) for p in problems])  # a type error quoting a refused value
    return recipe


def dump_recipe(recipe: Recipe) -> str:
    return yaml.dump(recipe.model_dump(mode="json"), Dumper=_DUMPER, sort_keys=False, allow_unicode=True)
