"""A clean start: no library noise on stderr (also on AVX512-BF16 CPUs, simulated here), and `validate` /
`check` without torch, on file readers that give the same answers as the libraries they stand in for."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import REPO, alpaca_records, write_json, write_recipe
from qctrain import data, sft_fields
from qctrain.basemodel import files as basefiles
from qctrain.data import template as templates
from qctrain.recipe import ModelSection, load_recipe

SIM = str(Path(__file__).with_name("avx512bf16_sim.py"))
BNB_LINE = "Failed to load CPU gemm_4bit_forward"


def python(code: str, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    import os

    path = os.pathsep.join([str(Path(__file__).parent), str(REPO / "entrypoint")])  # this checkout's qctrain
    return subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300,
                          cwd=REPO, env={**os.environ, "PYTHONPATH": path, **(env or {})})


# --- no library noise ---

@pytest.mark.slow
@pytest.mark.parametrize("debug", [False, True])
def test_bitsandbytes_avx512bf16_import_is_quiet_unless_debug(debug):
    code = ("import sys, avx512bf16_sim; avx512bf16_sim.install()\n"
            "from qctrain import cli; cli._quiet_libraries(debug=sys.argv[1] == 'debug')\n"
            "import bitsandbytes.functional as F; assert F.has_avx512bf16()\n")
    result = python(code, "debug" if debug else "quiet")
    assert result.returncode == 0, result.stderr
    if debug:  # the simulation reaches bitsandbytes' code: --debug shows its log line
        assert BNB_LINE in result.stderr
    else:
        assert result.stderr == ""


def test_kernels_never_fetched_from_the_hub():
    """The `kernels` package (bitsandbytes' Hub kernel fetcher) is neither locked nor importable under the CLI."""
    lock = (REPO / "docker" / "requirements.lock").read_text(encoding="utf-8")
    assert "\nkernels==" not in lock
    result = python("from qctrain import cli; cli._quiet_libraries(False)\n"
                    "try:\n    import kernels\nexcept ImportError:\n    print('blocked')\n")
    assert result.stdout.strip() == "blocked", result.stderr


@pytest.mark.slow
def test_train_on_a_simulated_avx512bf16_cpu_prints_no_library_line(tmp_path, tiny_model_dir):
    data_path = write_json(tmp_path / "d.json", alpaca_records(16))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data_path, tmp_path / "out",
                          data={"sources": [{"path": str(data_path)}], "eval": None, "max_seq_length": 128},
                          train={"max_steps": 2, "logging_steps": 1, "disable_tqdm": True,
                                 "gradient_checkpointing": False})
    import os

    result = subprocess.run([sys.executable, SIM, "train", str(recipe)], capture_output=True, text=True,
                            timeout=400, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO / "entrypoint")})
    assert result.returncode == 0, result.stderr
    assert result.stderr == "", result.stderr
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_base_model_on_a_simulated_avx512bf16_cpu_keeps_gradients_after_an_eval_forward(tiny_model_dir):
    code = """
import sys, avx512bf16_sim; avx512bf16_sim.install()
import bitsandbytes as bnb, torch
from peft import get_peft_model
from qctrain.basemodel.load import load_base_model
from qctrain.recipe import LoraSection, ModelSection
from qctrain.train import lora_config
cfg = ModelSection(name=sys.argv[1], quantization={"compute_dtype": "float32"})
base = load_base_model(cfg)
layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
assert layers and bnb.functional.has_avx512bf16()
assert not any(layer.support_avx512bf16_for_cpu for layer in layers)  # the workaround turned it off
lora = get_peft_model(base, lora_config(LoraSection(r=4, alpha=8, dropout=0.0)))
ids = torch.tensor([[1, 5, 9, 12, 7, 3]])
lora.eval()
with torch.no_grad():
    lora(input_ids=ids)
lora.train()
lora(input_ids=ids, labels=ids).loss.backward()
# Without the workaround the eval forward repacks the 4-bit weights and the gradient stops at them:
# qkv_proj and gate_up_proj (behind o_proj and down_proj) then get none.
grads = {n: p.grad for n, p in lora.named_parameters() if "lora_B" in n}
assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads.values()), grads
print("ok")
"""
    result = python(code, str(tiny_model_dir))
    assert result.stdout.strip() == "ok", result.stderr


# --- validate and check without torch ---

def test_validate_and_check_import_no_torch(tmp_path, tiny_model_dir):
    from hub_double import HubDouble, Token

    data_path = write_json(tmp_path / "d.json", alpaca_records(10))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data_path, tmp_path / "out",
                          hub={"repo_id": "alice/adapter"})
    code = ("import sys\nfrom qctrain.cli import main\n"
            "for command in ('validate', 'check'):\n"
            "    assert main([command, sys.argv[1]]) == 0, command\n"
            "heavy = sorted(m for m in ('torch', 'trl', 'peft', 'bitsandbytes', 'datasets', 'accelerate')"
            " if m in sys.modules)\n"
            "print('heavy:', heavy)\n")
    with HubDouble({"hf_FAKEquiet_DO_NOT_LEAK_42": Token("alice")}) as hub:
        result = python(code, str(recipe), env={
            "PYTHONPATH": str(REPO / "entrypoint"), "HF_TOKEN": "hf_FAKEquiet_DO_NOT_LEAK_42", "HF_ENDPOINT": hub.url,
            "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "0"})
        assert "alice/adapter" in hub.repos  # the Hub check ran
    assert "preflight: ok" in result.stdout, result.stderr
    assert "heavy: []" in result.stdout, result.stdout
    assert result.stderr == ""


def test_sft_config_snapshot_matches_the_installed_trl():
    import trl

    recorded = json.loads(sft_fields.SNAPSHOT.read_text(encoding="utf-8"))
    assert recorded["trl"] == trl.__version__, "run `python -m qctrain.sft_fields` after a lock change"
    assert sft_fields.live_fields() == recorded["fields"]


def test_enum_fields_take_exactly_the_values_sftconfig_takes():
    from transformers.trainer_utils import SchedulerType
    from transformers.training_args import OptimizerNames

    choices = sft_fields.enum_choices()
    assert choices["lr_scheduler_type"] == [s.value for s in SchedulerType]
    assert choices["optim"] == [o.value for o in OptimizerNames]
    assert {"eval_strategy", "save_strategy", "logging_strategy", "hub_strategy"} <= set(choices)


def test_unknown_enum_value_is_a_recipe_error_with_a_suggestion(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump({"model": {"name": "org/m"}, "data": {"sources": [{"path": "d.json"}]},
                                    "output": {"dir": "out"},
                                    "train": {"lr_scheduler_type": "cosin", "optim": "adamw_torch_fused"}}))
    with pytest.raises(Exception) as err:
        load_recipe(path, env={})
    assert str(err.value) == (f"{path}: train.lr_scheduler_type: unknown value 'cosin' (did you mean 'cosine'?); "
                              "one of: linear, cosine, cosine_with_restarts, polynomial, constant, "
                              "constant_with_warmup, inverse_sqrt, reduce_lr_on_plateau, cosine_with_min_lr, "
                              "cosine_warmup_with_mi…")


def _tokenizer_with(template: str):
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"<unk>": 0}, "<unk>")))
    tokenizer.chat_template = template
    return tokenizer


@pytest.mark.parametrize("name", data.template.trl_template_names())
def test_training_twin_is_trls_answer_for_every_trl_template(name):
    template = (templates.trl_templates_dir() / f"{name}.jinja").read_text(encoding="utf-8")
    try:
        expected = data.template.training_template(template, _tokenizer_with(template), "assistant")
    except Exception as err:  # noqa: BLE001 - the same refusal is expected from ours
        with pytest.raises(type(err)):
            templates.training_twin(template, "assistant")
        return
    assert templates.training_twin(template, "assistant") == expected
    assert templates.training_twin(template, "all") == data.extend_template(template, "inline")
    assert templates.training_twin(template, "all", "drop") == data.extend_template(template, "drop")


@pytest.mark.slow
def test_module_names_from_safetensors_headers_match_the_module_tree(tmp_path, tiny_model_dir):
    import shutil

    from qctrain.basemodel.load import linear_weights, load_base_model, meta_model

    cfg = ModelSection(name=str(tiny_model_dir))
    config = basefiles.read_config(cfg)
    expected = basefiles.linear_module_names(linear_weights(meta_model(cfg)), config)
    assert basefiles.linear_module_names(basefiles.weight_shapes(cfg), config) == expected
    # A sharded checkpoint: the index names the files, the headers hold the shapes.
    sharded = tmp_path / "sharded"
    load_base_model(cfg.model_copy(update={"quantization": None})).save_pretrained(
        sharded, max_shard_size="200KB")
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_model_dir / name, sharded / name)
    assert (sharded / basefiles.SAFETENSORS_INDEX).is_file()
    shards = ModelSection(name=str(sharded))
    assert basefiles.linear_module_names(basefiles.weight_shapes(shards), config) == expected
    # No safetensors at all: preflight falls back to the module tree.
    for shard in sharded.glob("*.safetensors*"):
        shard.unlink()
    assert basefiles.weight_shapes(shards) is None


def test_tokenizer_files_tokenize_like_the_full_tokenizer(tiny_model_dir, tokenizer):
    files = basefiles.load_tokenizer_files(ModelSection(name=str(tiny_model_dir)))
    assert files.chat_template == tokenizer.chat_template
    assert files.special_tokens_map == tokenizer.special_tokens_map
    template = data.template.training_template(data.resolve_chat_template("model", tokenizer), tokenizer, "assistant")
    conversations = [data.formats.to_conversation(data.sources.Record(f"r[{i}]", r), "alpaca", {})
                     for i, r in enumerate(alpaca_records(12))]
    assert data.tokenize(conversations, files, template, "assistant") == \
        data.tokenize(conversations, tokenizer, template, "assistant")


def test_preflight_reads_a_hub_model_through_huggingface_hub(tmp_path, tiny_model_dir, monkeypatch):
    from hub_double import HubDouble, point_client_at

    files = {p.name: p.read_bytes() for p in tiny_model_dir.iterdir() if p.is_file()}
    with HubDouble() as double:
        point_client_at(double, monkeypatch, tmp_path / "hf-home")
        double.add_repo("org/tiny", files=files)
        cfg = ModelSection(name="org/tiny")
        assert basefiles.read_config(cfg)["model_type"] == "phi3"
        assert basefiles.load_tokenizer_files(cfg).chat_template == files["chat_template.jinja"].decode()
        shapes = basefiles.weight_shapes(cfg)
        assert basefiles.linear_module_names(shapes, basefiles.read_config(cfg)) == \
            ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
        assert basefiles.fetch(cfg, "no-such-file.json") is None
