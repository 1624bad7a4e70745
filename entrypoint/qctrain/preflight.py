"""Preflight: everything that can be checked in seconds, before any weight loads.

Each check returns a list of problems; `run_checks` runs them all so the user sees every problem
at once. Nothing here writes into output.dir. Without a GPU nothing here imports torch, transformers
or TRL (seconds): the model's facts come from its files (basemodel.files), the train: section is checked
against a snapshot of SFTConfig's fields (recipe.check_train_section); `train` also builds the real
SFTConfig (check_train_args) before any data or weights load.
"""

import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

from qctrain import data, distributed, hubcache, rundir
from qctrain.basemodel import files
from qctrain.errors import InputError, QcError
from qctrain.recipe import Recipe, output_data_overlap

MIN_FREE_BYTES = 1 << 30  # adapter, checkpoints and prepared data of a LoRA run fit well inside 1 GiB
MIN_FREE_ENV = "QCTRAIN_MIN_FREE_BYTES"  # overrides MIN_FREE_BYTES (bigger runs, tests)


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
                try:
                    os.stat(path)  # a symlink loop inside a folder: say so, not "permission denied"
                except OSError as err:
                    problems.append(f"{path}: {data.os_error_text(err)}")
                    continue
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
    """output.dir apart from the data (load_recipe asks it too: here for a Recipe built in code), a folder a run
    may write into, writable, with room."""
    return output_data_overlap(recipe.data, recipe.output.dir) + _writable(rundir.RunDir.of(recipe).root, min_free)


def _writable(out: Path, min_free: int) -> list[str]:
    if problem := rundir.output_dir_problem(out):  # a system folder, the home folder, someone else's files
        return [problem]
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


def check_train_args(recipe: Recipe) -> list[str]:
    """train: values that TRL itself rejects (cross-field rules such as load_best_model_at_end without
    matching strategies), found before any data or weights load. Imports TRL and torch: `train` runs it."""
    import warnings

    from qctrain.train import sft_config

    has_eval = recipe.data.eval is not None
    run = rundir.RunDir.of(recipe)
    with warnings.catch_warnings():  # a probe: the deprecation notes show when training builds it for real
        warnings.simplefilter("ignore", FutureWarning)
        if recipe.method != "sft":  # DPOConfig's, KTOConfig's
            from qctrain.preference import preference_config

            return _problem_of(lambda: preference_config(recipe, run.checkpoints, has_eval) and None)
        return _problem_of(lambda: sft_config(recipe, run.root, has_eval=has_eval) and None)


def check_template(recipe: Recipe) -> list[str]:
    try:
        tokenizer = files.load_tokenizer_files(recipe.model)
        if tokenizer is None:  # no tokenizer.json: only transformers can build this tokenizer
            from qctrain.basemodel.load import load_tokenizer

            tokenizer = load_tokenizer(recipe.model)
        template = data.resolve_chat_template(recipe.data.chat_template, tokenizer)
        if recipe.method != "sft":
            return _check_pair_template(recipe, tokenizer, template)
        template = data.training_twin(template, recipe.data.loss_on, recipe.data.reasoning)
        probe = [{"role": "user", "content": "ping"}, {"role": "assistant", "content": "pong"}]
        ids, labels = data.tokenize([probe], tokenizer, template, recipe.data.loss_on)
    except QcError as err:
        return [str(err)]
    if all(label == data.IGNORE for label in labels[0]):
        return ["data.chat_template: renders no supervised (assistant) token for a one-turn conversation"]
    return []


def _check_pair_template(recipe: Recipe, tokenizer, template: str) -> list[str]:
    """dpo/kto: the template (as the adapter carries it) renders a probe pair into a prompt and a reply of their
    own, as the data stage will split them."""
    from qctrain.data import pairs
    from qctrain.data.tokens import rust_backend

    probe = {"prompt": [{"role": "user", "content": "ping"}], "chosen": [{"role": "assistant", "content": "pong"}],
             "rejected": [{"role": "assistant", "content": "pang"}], "tools": []}
    template = data.extend_template(template, recipe.data.reasoning)
    parts = pairs.encode_rows([probe], "dpo", tokenizer, rust_backend(tokenizer), template).parts[0]
    if parts[0] == 0 or parts[1] == 0 or parts[2] == 0:
        return ["data.chat_template: does not render a one-turn pair as a prompt and a reply (prompt, chosen, rejected "
                f"tokens: {', '.join(map(str, parts.tolist()))})"]
    return []


def check_parent(recipe: Recipe) -> list[str]:
    """model.adapter (dpo/kto): there (a finished run, an adapter folder, a Hub adapter) and trained on this
    base, quantized the same way, with the LoRA settings the recipe names."""
    from qctrain import parent

    if recipe.model.adapter is None:
        return []
    try:
        return parent.problems(recipe, parent.resolve(recipe.model.adapter))
    except QcError as err:
        return [str(err)]


def check_lora(recipe: Recipe) -> list[str]:
    """lora.target_modules against the base's Linear layers, named from its safetensors headers (or, where it has
    none, from its module tree without weights)."""
    if recipe.model.adapter is not None:  # the adapter continued keeps its own targets (check_parent)
        return []

    def check() -> None:
        config = files.read_config(recipe.model)
        shapes = files.weight_shapes(recipe.model)
        if shapes is None:  # no safetensors header to read: build the module tree without weights
            from qctrain.basemodel.load import linear_weights, meta_model

            shapes = linear_weights(meta_model(recipe.model))
        architecture = (config.get("architectures") or [config.get("model_type") or recipe.model.name])[0]
        files.check_lora_targets(recipe.lora.target_modules, files.linear_module_names(shapes, config), architecture)
    return _problem_of(check)


def check_sequence_length(recipe: Recipe) -> list[str]:
    """data.max_seq_length within the positions the model has (config.json's max_position_embeddings)."""
    def check() -> None:
        config = files.read_config(recipe.model)
        limit = config.get("max_position_embeddings", (config.get("text_config") or {}).get("max_position_embeddings"))
        if isinstance(limit, int) and not isinstance(limit, bool) and recipe.data.max_seq_length > limit:
            raise InputError(f"data.max_seq_length: {recipe.data.max_seq_length:,} tokens is beyond what "
                             f"{recipe.model.name} supports (max_position_embeddings {limit:,} in its config.json)")
    return _problem_of(check)


def check_packages(recipe: Recipe) -> list[str]:
    """Recipe switches that need a package the image may not hold: say so now, not at the first step.
    Liger is on by default for Phi-3 on CUDA when liger-kernel is installed (`qctrain train` says whether it
    is); only an explicit train.use_liger_kernel: true without the package is a problem here. Whether a GPU
    is present is left to train: finding out would import torch."""
    import importlib.util

    if recipe.sft_kwargs().get("use_liger_kernel") and importlib.util.find_spec("liger_kernel") is None:
        return ["train.use_liger_kernel: the liger-kernel package is not installed here; "
                "set it to false or use an image that has it"]
    return []


def check_publisher(recipe: Recipe, env: Mapping[str, str]) -> list[str]:
    """Where the run goes (the Hub): reachable, writable, created. Under torchrun one rank checks for all."""
    from qctrain import publish

    publisher = publish.publisher_for(recipe)
    if publisher is None or distributed.rank(env) != 0:
        return []
    return publisher.check(env)


def check_evaluation(recipe: Recipe, env: Mapping[str, str]) -> list[str]:
    """evaluate.tasks: every task builds here (its file read, its data found in the HF cache when offline, the
    packages its metrics need) and every gate rule names a task that is evaluated. Imports lm-eval and loads the
    tasks' data (seconds; the index of built-in tasks only where one is named). Under torchrun rank 0 checks."""
    if recipe.evaluate is None or not recipe.evaluate.tasks or distributed.rank(env) != 0:
        return []
    from qctrain import evaluate

    return evaluate.check_tasks(recipe.evaluate, recipe.evaluate.gate)


def run_checks(recipe: Recipe, env: Mapping[str, str] | None = None, hub: bool = True) -> list[str]:
    env = os.environ if env is None else env
    setting = env.get(MIN_FREE_ENV, "").strip()
    if setting and not setting.isdigit():
        return [f"{MIN_FREE_ENV}={setting!r}: expected a number of bytes"]
    problems = check_sources(recipe)
    problems += check_output_dir(recipe, int(setting) if setting else MIN_FREE_BYTES)
    problems += check_packages(recipe)
    model_problems = (_problem_of(lambda: files.model_source(recipe.model) and None)
                      or hubcache.check_offline(recipe.model, env))  # offline: a missing cached file, named
    # The template and LoRA checks read the model's tokenizer and config (small files, no weights).
    problems += model_problems or (check_template(recipe) + check_lora(recipe) + check_sequence_length(recipe)
                                   + check_gpu_memory(recipe, env) + check_parent(recipe))
    problems += check_evaluation(recipe, env)
    if hub:
        problems += check_publisher(recipe, env)
    return list(dict.fromkeys(problems))


def estimate_peak_memory(recipe: Recipe, skeleton) -> dict[str, float]:
    """A rough upper estimate of peak GPU memory (GiB) for one training micro-batch.

    weights: 4-bit Linear layers at ~0.52 byte/param (NF4 + double-quant constants), the rest in the
    compute dtype; LoRA: weights, grads and two Adam moments at 16 byte/param; activations: with
    gradient checkpointing one hidden state per layer plus one layer's working set, else ~34 bytes
    per hidden unit per layer; logits: fp32 logits and their gradient.
    """
    import torch

    config = skeleton.config
    quantized = recipe.model.quantization is not None
    linear_params = sum(m.weight.numel() for n, m in skeleton.named_modules()
                        if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    other_params = sum(p.numel() for p in skeleton.parameters()) - linear_params
    weight_bytes = linear_params * (0.52 if quantized else 2) + other_params * 2
    lora_params = sum(recipe.lora.r * (m.in_features + m.out_features) for n, m in skeleton.named_modules()
                      if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head"))
    sft = recipe.sft_kwargs()
    tokens = sft.get("per_device_train_batch_size", 1) * recipe.data.max_seq_length
    hidden, layers = config.hidden_size, config.num_hidden_layers
    intermediate = getattr(config, "intermediate_size", 4 * hidden)
    layer_working_set = tokens * (10 * hidden + 4 * intermediate) * 2
    if sft.get("activation_checkpointing", False):
        activation_bytes = tokens * hidden * 2 * layers + layer_working_set
    else:
        activation_bytes = layer_working_set * layers
    logits_bytes = tokens * config.vocab_size * 4 * 2
    gib = 2**30
    parts = {"weights": weight_bytes / gib, "lora_and_optimizer": lora_params * 16 / gib,
             "activations": activation_bytes / gib, "logits": logits_bytes / gib, "cuda_context": 0.5}
    parts["total"] = sum(parts.values())
    return {k: round(v, 2) for k, v in parts.items()}


def gpu_present(env: Mapping[str, str]) -> bool:
    """Whether torch may see an NVIDIA GPU, found without importing it (seconds on a CPU machine)."""
    if env.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    return Path("/dev/nvidiactl").exists() or any(Path("/dev").glob("nvidia[0-9]*"))


def check_gpu_memory(recipe: Recipe, env: Mapping[str, str] | None = None) -> list[str]:
    """On a GPU: print the estimate and compare it with the card's memory."""
    if not gpu_present(os.environ if env is None else env):
        return []
    import torch

    from qctrain.basemodel.load import meta_model

    if not torch.cuda.is_available():
        return []
    estimate = estimate_peak_memory(recipe, meta_model(recipe.model))
    card = torch.cuda.get_device_properties(0).total_memory / 2**30
    print("preflight: estimated peak GPU memory (GiB): "
          + ", ".join(f"{k} {v}" for k, v in estimate.items()) + f"; card {card:.1f}", flush=True)
    if estimate["total"] > 0.95 * card:
        return [f"the run needs about {estimate['total']} GiB of GPU memory, the card has {card:.1f} GiB: lower "
                "train.per_device_train_batch_size or data.max_seq_length, or turn on train.activation_checkpointing"]
    return []
