"""Model stage: real bitsandbytes 4-bit layers, the CPU workaround, LoRA target names."""

import bitsandbytes as bnb
import pytest
import torch
from conftest import alpaca_records, run_cli, write_json, write_recipe
from qctrain.basemodel import files, load
from qctrain.errors import InputError
from qctrain.recipe import ModelSection


@pytest.fixture(scope="module")
def base(tiny_model_dir):
    cfg = ModelSection(name=str(tiny_model_dir), quantization={"compute_dtype": "float32"})
    return load.load_base_model(cfg)


def test_base_is_really_4bit_nf4(base):
    layers = [m for m in base.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(layers) == 2 * 4  # qkv_proj, o_proj, gate_up_proj, down_proj in each of 2 layers
    assert all(layer.weight.quant_state.quant_type == "nf4" for layer in layers)
    assert all(layer.weight.dtype == torch.uint8 for layer in layers)
    assert not any(layer.support_avx512bf16_for_cpu for layer in layers)  # the CPU workaround is on
    assert not isinstance(base.lm_head, bnb.nn.Linear4bit)


@pytest.mark.slow
def test_plain_lora_without_quantization(tiny_model_dir):
    plain = load.load_base_model(ModelSection(name=str(tiny_model_dir), quantization=None))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())


def test_linear_names_and_wrong_targets(base):
    names = files.linear_module_names(load.linear_weights(base), base.config.to_dict())
    assert names == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
    files.check_lora_targets(["qkv_proj", "o_proj"], names, "Phi3ForCausalLM")
    with pytest.raises(InputError) as err:
        files.check_lora_targets(["q_proj", "v_proj", "o_proj"], names, "Phi3ForCausalLM")
    assert str(err.value) == ("lora.target_modules: q_proj, v_proj match no module of Phi3ForCausalLM; "
                              "its Linear modules are: down_proj, gate_up_proj, o_proj, qkv_proj")


def test_meta_model_has_the_same_names_without_weights(tiny_model_dir, base):
    skeleton = load.meta_model(ModelSection(name=str(tiny_model_dir)))
    assert all(p.device.type == "meta" for p in skeleton.parameters())
    assert load.linear_weights(skeleton) == load.linear_weights(base)


def test_missing_model_path_is_an_input_error():
    with pytest.raises(InputError, match="model.name: ./nowhere/model: no such folder"):
        files.model_source(ModelSection(name="./nowhere/model"))


def test_check_command_lists_linear_names_for_wrong_targets(tiny_model_dir, tmp_path):
    data_path = write_json(tmp_path / "d.json", alpaca_records(10))
    recipe = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data_path, tmp_path / "out",
                          lora={"target_modules": ["q_proj", "v_proj"]})
    result = run_cli("check", str(recipe))
    assert result.returncode == 2
    assert "its Linear modules are: down_proj, gate_up_proj, o_proj, qkv_proj" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out").exists()
