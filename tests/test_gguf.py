"""GGUF LoRA export, read back with gguf's own reader and checked against PEFT's delta weights."""

import json
import math
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from qctrain.basemodel.reference import BaseReference
from qctrain.errors import InputError
from qctrain.finished import gguf_lora

TARGETS = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
GGUF_NAMES = {"qkv_proj": "attn_qkv", "o_proj": "attn_output", "gate_up_proj": "ffn_up", "down_proj": "ffn_down"}


def peft_adapter(model_dir: Path, dest: Path, **lora) -> tuple[Path, dict[str, torch.Tensor]]:
    """A PEFT LoRA adapter with random (non-zero) A and B on the tiny Phi-3, saved as PEFT saves it;
    with each module's delta weight as PEFT computes it (the reference)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": TARGETS, "init_lora_weights": False,
                           "task_type": "CAUSAL_LM", **lora})
    model = get_peft_model(base, config)
    model.save_pretrained(dest)
    deltas = {name.removeprefix("base_model.model."): module.get_delta_weight("default")
              for name, module in model.named_modules() if hasattr(module, "get_delta_weight")}
    return dest, deltas


@pytest.fixture(scope="module")
def config(tiny_model_dir):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def written(tiny_model_dir, config, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gguf")
    adapter, deltas = peft_adapter(tiny_model_dir, tmp / "adapter")
    base = BaseReference(str(tiny_model_dir), None, "qctest/tiny-phi3")
    done = gguf_lora.export(adapter, tmp / "gguf", base, config, name="tiny-run")
    return done, gguf.GGUFReader(done.adapter), deltas


def field(reader: gguf.GGUFReader, key: str):
    return reader.fields[key].contents() if key in reader.fields else None


def test_metadata_is_what_llama_cpp_checks(written):
    done, reader, _ = written
    assert done.adapter.name == "tiny-run-lora-f32.gguf"
    assert field(reader, "general.architecture") == "phi3"
    assert field(reader, "general.type") == "adapter"
    assert field(reader, "adapter.type") == "lora"
    assert field(reader, "adapter.lora.alpha") == pytest.approx(8.0)
    assert field(reader, "general.base_model.count") == 1
    assert field(reader, "general.base_model.0.repo_url") == "https://huggingface.co/qctest/tiny-phi3"


def test_tensor_names_and_shapes(written, config):
    _, reader, _ = written
    hidden, inter, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    fused_out = {"attn_qkv": 3 * hidden, "attn_output": hidden, "ffn_up": 2 * inter, "ffn_down": hidden}
    inputs = {"attn_qkv": hidden, "attn_output": hidden, "ffn_up": hidden, "ffn_down": inter}
    expected = {}
    for block in range(layers):
        for name in GGUF_NAMES.values():
            expected[f"blk.{block}.{name}.weight.lora_a"] = (4, inputs[name])  # numpy order: (r, in)
            expected[f"blk.{block}.{name}.weight.lora_b"] = (fused_out[name], 4)  # (out, r)
    found = {t.name: tuple(int(d) for d in t.data.shape) for t in reader.tensors}
    assert found == expected
    assert all(t.tensor_type == gguf.GGMLQuantizationType.F32 for t in reader.tensors)
    # ggml's ne (reversed): what llama-adapter.cpp compares with the base tensor (ne = in, out)
    qkv_a = next(t for t in reader.tensors if t.name == "blk.0.attn_qkv.weight.lora_a")
    assert [int(d) for d in qkv_a.shape] == [hidden, 4]


def test_llama_cpp_scaling_reproduces_peft_delta_weights(written):
    _, reader, deltas = written
    tensors = {t.name: np.array(t.data) for t in reader.tensors}
    alpha = field(reader, "adapter.lora.alpha")
    for module, delta in deltas.items():
        block, kind = module.split(".")[2], module.rsplit(".", 1)[-1]
        stem = f"blk.{block}.{GGUF_NAMES[kind]}.weight"
        a, b = tensors[f"{stem}.lora_a"], tensors[f"{stem}.lora_b"]
        ours = (b @ a) * alpha / a.shape[0]  # llama.cpp: scale = alpha / rank
        np.testing.assert_allclose(ours, delta.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_rslora_is_folded_into_alpha(tiny_model_dir, config, tmp_path):
    adapter, deltas = peft_adapter(tiny_model_dir, tmp_path / "adapter", use_rslora=True, r=4, lora_alpha=8)
    path = tmp_path / "a.gguf"
    tensors, alpha = gguf_lora.write_lora_gguf(adapter, path, config)
    assert tensors == 16 and alpha == pytest.approx(8 * math.sqrt(4))
    reader = gguf.GGUFReader(path)
    a = np.array(next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight.lora_a").data)
    b = np.array(next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight.lora_b").data)
    np.testing.assert_allclose(b @ a * alpha / 4, deltas["model.layers.1.mlp.down_proj"].detach().numpy(),
                               rtol=1e-5, atol=1e-6)


def test_f16_outtype(written, config, tmp_path):
    done, _, _ = written
    path = tmp_path / "half.gguf"
    gguf_lora.write_lora_gguf(done.adapter.parent.parent / "adapter", path, config, outtype="f16")
    assert {t.tensor_type for t in gguf.GGUFReader(path).tensors} == {gguf.GGMLQuantizationType.F16}


@pytest.mark.parametrize(("lora", "complaint"), [
    ({"use_dora": True}, "use_dora is set"),
    ({"modules_to_save": ["lm_head"]}, "is not a LoRA A/B weight"),
])
@pytest.mark.slow
def test_what_llama_cpp_cannot_apply_is_an_input_error(tiny_model_dir, config, tmp_path, lora, complaint):
    adapter, _ = peft_adapter(tiny_model_dir, tmp_path / "adapter", **lora)
    with pytest.raises(InputError, match=complaint):
        gguf_lora.write_lora_gguf(adapter, tmp_path / "x.gguf", config)
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


def test_unsupported_architecture_is_named(written, config, tmp_path):
    done, _, _ = written
    llama = type(config).from_dict({**config.to_dict(), "architectures": ["LlamaForCausalLM"]})
    with pytest.raises(InputError, match="LlamaForCausalLM is not supported .supported: Phi3ForCausalLM"):
        gguf_lora.write_lora_gguf(done.adapter.parent.parent / "adapter", tmp_path / "x.gguf", llama)


def test_modelfile_from_the_base_with_the_adapter(written, tiny_model_dir, tmp_path, monkeypatch):
    done, _, _ = written
    text = done.modelfile.read_text()
    lines = [line for line in text.splitlines() if not line.startswith("#")]
    assert lines == [f"FROM {tiny_model_dir}", "ADAPTER ./tiny-run-lora-f32.gguf"]
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # the Hub base is not cached here
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-hf-home" / "hub"))
    phi = BaseReference("microsoft/Phi-3.5-mini-instruct", None, "microsoft/Phi-3.5-mini-instruct")
    assert "FROM phi3.5\n" in gguf_lora.modelfile_text(phi, "a.gguf")
    other = BaseReference("org/unknown", None, "org/unknown")
    assert "FROM org/unknown\n" in gguf_lora.modelfile_text(other, "a.gguf")
    assert f"FROM {tmp_path / 'base.gguf'}\n" in gguf_lora.modelfile_text(phi, "a.gguf", str(tmp_path / "base.gguf"))


def test_local_base_without_hub_id_has_no_base_model_entry(written, config, tmp_path):
    done, _, _ = written
    path = tmp_path / "local.gguf"
    local = BaseReference("/models/tiny", None, None)
    gguf_lora.write_lora_gguf(done.adapter.parent.parent / "adapter", path, config, local)
    assert not [k for k in gguf.GGUFReader(path).fields if k.startswith("general.base_model")]


# --- the Modelfile's TEMPLATE: the adapter's chat template for Ollama ---

def test_modelfile_has_no_template_it_cannot_match(tmp_path):
    base = BaseReference("microsoft/Phi-3.5-mini-instruct", None, "microsoft/Phi-3.5-mini-instruct")
    text = gguf_lora.modelfile_text(base, "a.gguf", chat_template="{{ messages[0]['content'] }}")
    assert "TEMPLATE" not in text.replace("No TEMPLATE", "") and "# No TEMPLATE: the adapter's chat template" in text
    assert gguf_lora.ollama_template(None) is None


@pytest.fixture
def ollama_render(tmp_path):
    """Ollama's prompt for a TEMPLATE and a request: tests/ollama/render.go (Go's text/template as Ollama uses it)."""
    import shutil
    import subprocess

    go = shutil.which("go")
    if go is None:
        pytest.skip("Go is not installed (apt install golang-go): Ollama's template language cannot be run here")
    binary = tmp_path / "render"
    subprocess.run([go, "build", "-o", str(binary), "render.go"], cwd=Path(__file__).parent / "ollama", check=True,
                   capture_output=True, timeout=300)

    def render(template: str, request: dict) -> str:
        path = tmp_path / "template.gotmpl"
        path.write_text(template, encoding="utf-8")
        done = subprocess.run([str(binary), str(path)], input=json.dumps(request), capture_output=True, text=True,
                              check=True, timeout=60)
        return done.stdout

    return render


def test_modelfile_template_gives_ollama_the_training_prompt(tmp_path, tiny_model_dir, ollama_render):
    from qctrain import data, outputs
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    outputs.save_tokenizer(tokenizer, data.extend_template(tokenizer.chat_template, "inline"), tmp_path / "adapter")
    tuned = AutoTokenizer.from_pretrained(tmp_path / "adapter")
    base = BaseReference(str(tiny_model_dir), None, None)
    modelfile = gguf_lora.modelfile_text(base, "a.gguf",
                                         chat_template=gguf_lora.adapter_chat_template(tmp_path / "adapter"))
    template = modelfile.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
    assert 'PARAMETER stop "<|end|>"' in modelfile and "$m.Thinking" in template

    def hf(messages, tools=None):
        return tuned.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)

    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Capital of Norway?"}]
    assert ollama_render(template, {"messages": plain}) == hf(plain)
    reasoning = [{"role": "user", "content": "Is 91 prime?"},
                 {"role": "assistant", "content": "No.", "reasoning_content": "91 = 7 x 13."},
                 {"role": "user", "content": "And 97?"}]
    ollama = [{**m, "thinking": m["reasoning_content"]} if "reasoning_content" in m else m for m in reasoning]
    assert ollama_render(template, {"messages": ollama}) == hf(reasoning)
    # with tools: the same prompt but for the spaces Go's JSON leaves out
    tool = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
                                             "parameters": {"type": "object", "required": ["city"],
                                                            "properties": {"city": {"type": "string"}}}}}
    calls = [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}]
    messages = [{"role": "system", "content": "You check the weather."},
                {"role": "user", "content": "Weather in Oslo?"},
                {"role": "assistant", "content": "", "tool_calls": calls},
                {"role": "tool", "name": "get_weather", "content": '{"temperature": 9}'},
                {"role": "assistant", "content": "9 degrees."}, {"role": "user", "content": "And tomorrow?"}]
    expected = hf(messages, [tool])
    assert '"content": {"temperature": 9}' in expected
    got = ollama_render(template, {"messages": messages, "tools": [tool]})
    assert got.replace(" ", "") == expected.replace(" ", "") and got != expected
