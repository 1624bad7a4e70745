"""GGUF export: the LoRA adapter as a GGUF LoRA file for llama.cpp (`--lora`) and Ollama (`ADAPTER`), with an
Ollama Modelfile; `qctrain export --gguf` (write_gguf) and `output.gguf` at the end of training (the writer calls
export on its staging folder).

Written with the `gguf` package the way llama.cpp's convert_lora_to_gguf.py writes it, so llama.cpp's
loader (llama-adapter.cpp) accepts it: general.type = adapter, adapter.type = lora,
adapter.lora.alpha, general.architecture = the base's; one tensor pair per adapted weight, named
`<base tensor name>.lora_a` / `.lora_b` with gguf's tensor-name map, lora_a of shape (r, in) and
lora_b of shape (out, r) (GGUF lists dimensions reversed: ne = (in, r) and (r, out)). Phi-3's fused
qkv_proj and gate_up_proj stay fused, as llama.cpp keeps them (blk.N.attn_qkv, blk.N.ffn_up): the
LoRA of a fused weight is the LoRA of the GGUF tensor, no splitting needed.
"""

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

from qctrain.atomic import make_shareable, staging_beside, staging_folder, swap_in_folder
from qctrain.basemodel.reference import BaseReference
from qctrain.data.template import TOOLS_HEADER
from qctrain.errors import InputError
from qctrain.finished.load import FinishedRun
from qctrain.secretmask import mask

# transformers architecture -> llama.cpp architecture, for bases whose tensors convert_hf_to_gguf.py
# writes unpermuted (a LoRA of a permuted weight, e.g. Llama's q/k, would need the same permutation).
ARCHITECTURES = {"Phi3ForCausalLM": gguf.MODEL_ARCH.PHI3}
OUTTYPES = {"f32": np.float32, "f16": np.float16}
# What `FROM` in the Modelfile says for a Hub base that is not on this machine: the Ollama library
# model built from the same weights.
OLLAMA_LIBRARY = {"microsoft/phi-3.5-mini-instruct": "phi3.5"}
_LORA_KEY = re.compile(r"^base_model\.model\.(?P<module>.+)\.lora_(?P<part>[AB])\.weight$")


@dataclass
class GgufExport:
    adapter: Path  # the .gguf file
    modelfile: Path
    tensors: int
    alpha: float


def write_gguf(output_dir: Path, outtype: str = "f32", base_gguf: str | None = None) -> GgufExport:
    """`qctrain export --gguf`: the finished run's adapter as a GGUF LoRA and Modelfile in output_dir/gguf."""
    from qctrain.basemodel.load import load_config

    finished = FinishedRun.open(output_dir)
    dest = finished.run.gguf
    with staging_folder(staging_beside(dest)) as staging:
        done = export(finished.run.adapter, staging, finished.reference, load_config(finished.base), outtype,
                      base_gguf, name=output_dir.resolve().name)
    make_shareable(staging)
    swap_in_folder(staging, dest)
    return done


def export(adapter_dir: Path, dest: Path, base: BaseReference, base_config, outtype: str = "f32",
           base_gguf: str | None = None, name: str | None = None) -> GgufExport:
    """Write dest/<name>-lora-<outtype>.gguf and dest/Modelfile (dest is replaced as a whole)."""
    name = name or adapter_dir.parent.name
    dest.mkdir(parents=True, exist_ok=True)
    gguf_path = dest / f"{name}-lora-{outtype}.gguf"
    tensors, alpha = write_lora_gguf(adapter_dir, gguf_path, base_config, base, outtype, name)
    modelfile = dest / "Modelfile"
    modelfile.write_text(mask(modelfile_text(base, gguf_path.name, base_gguf, adapter_chat_template(adapter_dir))),
                         encoding="utf-8")
    return GgufExport(gguf_path, modelfile, tensors, alpha)


def gguf_architecture(base_config) -> gguf.MODEL_ARCH:
    architectures = getattr(base_config, "architectures", None) or []
    for architecture in architectures:
        if architecture in ARCHITECTURES:
            return ARCHITECTURES[architecture]
    raise InputError(f"GGUF export: base architecture {', '.join(architectures) or 'unknown'} is not supported "
                     f"(supported: {', '.join(ARCHITECTURES)})")


def lora_pairs(weights: dict, name_map: gguf.TensorNameMap) -> dict[str, dict[str, np.ndarray]]:
    """GGUF base tensor name -> {"a": lora_A (r, in), "b": lora_B (out, r)} from PEFT's saved keys."""
    pairs: dict[str, dict[str, np.ndarray]] = {}
    for key, tensor in weights.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise InputError(f"GGUF export: {key} is not a LoRA A/B weight; llama.cpp adapters hold only those "
                             "(no modules_to_save, trained biases or embeddings)")
        base_name = name_map.get_name(f"{match['module']}.weight", try_suffixes=(".weight",))
        if base_name is None:
            raise InputError(f"GGUF export: {match['module']} has no llama.cpp tensor name")
        pairs.setdefault(base_name, {})[match["part"].lower()] = tensor.float().numpy()
    for base_name, pair in pairs.items():
        if set(pair) != {"a", "b"}:
            raise InputError(f"GGUF export: {base_name} has lora_{''.join(pair).upper()} but not both")
    return pairs


def effective_alpha(config: dict, ranks: set[int]) -> float:
    """The alpha llama.cpp needs to scale by PEFT's factor: it uses alpha / r; rsLoRA scales by
    alpha / sqrt(r), i.e. llama.cpp's formula with alpha * sqrt(r) (one rank in the file)."""
    alpha = float(config["lora_alpha"])
    if config.get("use_rslora"):
        if len(ranks) != 1:
            raise InputError("GGUF export: rsLoRA with several ranks cannot be expressed with one alpha")
        alpha *= math.sqrt(next(iter(ranks)))
    return alpha


def write_lora_gguf(adapter_dir: Path, path: Path, base_config, base: BaseReference | None = None,
                    outtype: str = "f32", name: str | None = None) -> tuple[int, float]:
    """The adapter in adapter_dir as a GGUF LoRA at `path` (written beside it, then renamed)."""
    import json

    from safetensors.torch import load_file

    if outtype not in OUTTYPES:
        raise InputError(f"GGUF export: outtype {outtype}: use one of {', '.join(OUTTYPES)}")
    try:
        config = json.loads((adapter_dir / "adapter_config.json").read_text(encoding="utf-8"))
        weights = load_file(adapter_dir / "adapter_model.safetensors")
    except (OSError, ValueError) as err:
        raise InputError(f"{adapter_dir}: cannot read the adapter: {str(err).splitlines()[0]}") from None
    if config.get("peft_type", "LORA") != "LORA":
        raise InputError(f"GGUF export: {config.get('peft_type')} adapters are not LoRA")
    for unsupported in ("use_dora", "alpha_pattern", "rank_pattern"):
        if config.get(unsupported):
            raise InputError(f"GGUF export: adapter_config.json {unsupported} is set; llama.cpp LoRA cannot apply it")
    arch = gguf_architecture(base_config)
    name_map = gguf.get_tensor_name_map(arch, int(base_config.num_hidden_layers))
    pairs = lora_pairs(weights, name_map)
    alpha = effective_alpha(config, {pair["a"].shape[0] for pair in pairs.values()})

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    metadata = gguf.Metadata.load(model_path=adapter_dir, model_name=name or adapter_dir.parent.name)
    metadata.base_models = base_models(base)  # ours, not guessed from a card that may predate this version
    metadata.set_gguf_meta_model(writer)  # name, license, tags: from the adapter's card
    writer.add_type(gguf.GGUFType.ADAPTER)
    writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
    writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
    dtype = OUTTYPES[outtype]
    for base_name in sorted(pairs):
        writer.add_tensor(f"{base_name}.lora_a", pairs[base_name]["a"].astype(dtype))
        writer.add_tensor(f"{base_name}.lora_b", pairs[base_name]["b"].astype(dtype))
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()
    os.replace(tmp, path)
    return 2 * len(pairs), alpha


def base_models(base: BaseReference | None) -> list[dict] | None:
    """general.base_model.* entries: the Hub base, or none (a local path is no base model id)."""
    if base is None or base.hub_id is None:
        return None
    organization, model = base.hub_id.split("/")
    return [{"name": gguf.Metadata.id_to_title(model), "organization": gguf.Metadata.id_to_title(organization),
             "repo_url": f"https://huggingface.co/{base.hub_id}"}]


def ollama_base(base: BaseReference, base_gguf: str | None = None) -> str:
    """What the Modelfile's FROM names: a given base GGUF, else the local base folder (Ollama imports
    safetensors), else the Hub base's snapshot in the local cache, else its Ollama library model,
    else the Hub id (replace it with a GGUF of the base)."""
    from huggingface_hub import try_to_load_from_cache

    if base_gguf:
        return str(Path(base_gguf).expanduser().resolve())
    if base.local:
        return base.source
    cached = try_to_load_from_cache(base.source, "config.json", revision=base.revision)
    if isinstance(cached, str):
        return str(Path(cached).parent)
    return OLLAMA_LIBRARY.get(base.source.lower(), base.source)


def modelfile_text(base: BaseReference, adapter_file: str, base_gguf: str | None = None,
                   chat_template: str | None = None) -> str:
    """The Modelfile: FROM the base, ADAPTER the file, and the TEMPLATE that matches the adapter's chat template
    (where we know one: see ollama_template)."""
    origin = base.hub_id or Path(base.source).name
    text = (f"# Ollama: ollama create NAME -f Modelfile (in this folder); then ollama run NAME\n"
            f"# FROM must be the base this adapter was trained on ({origin}): its GGUF file, its\n"
            f"# safetensors folder or an Ollama model of the same weights.\n"
            f"FROM {ollama_base(base, base_gguf)}\n"
            f"ADAPTER ./{adapter_file}\n")
    template = ollama_template(chat_template)
    if template is None:
        return text + ("# No TEMPLATE: the adapter's chat template is not one we can write for Ollama; the base "
                       "model's applies.\n" if chat_template else "")
    stops = "".join(f'PARAMETER stop "{stop}"\n' for stop in PHI35_STOPS)
    return (text + "# The adapter's chat template (adapter/chat_template.jinja) in Ollama's template language: the\n"
            "# same prompt as in training; with tools the JSON is written by Go (no spaces), the same structure.\n"
            + ("# Reasoning history goes in as think blocks: needs an Ollama with messages' `thinking` (0.9+).\n"
               if "$m.Thinking" in template else "")
            + f'TEMPLATE """{template}"""\n{stops}')


# --- the Modelfile's TEMPLATE: the chat template the adapter carries, in Ollama's Go template language ---
#
# Ollama renders prompts with its own Go templates, not the Jinja chat template, so for the one base format we
# know (Phi-3.5's) the Modelfile carries a Go template written to match the adapter's chat template: the same
# turns and markers, and with the extension (data.template) the same tools block, call JSON, result turns and
# think blocks. Token for token for conversations without tools; with tools, Ollama's `json` (Go's
# encoding/json) writes JSON without spaces and escapes <, > and & (the Jinja template writes json.dumps'
# ", " and ": "), and a result is taken as JSON only when its text itself starts and ends with {} or [] (the
# Jinja template trims whitespace first): the same structure, not the same bytes. Ollama also merges consecutive
# turns of one role (except tool results) into one. Tool results are paired with calls in order. A conversation
# that ends with an assistant turn is continued (its turn is left open), as Ollama's own templates do.

PHI35_STOPS = ("<|end|>", "<|user|>", "<|assistant|>", "<|endoftext|>")

_GO_TOOLS_BLOCK = (TOOLS_HEADER + '[{{ range $k, $t := $.Tools }}{{ if $k }}, {{ end }}{"type": "function", '
                   '"function": {"name": {{ json $t.Function.Name }}, "description": {{ json $t.Function.Description }}'
                   ', "parameters": {{ json $t.Function.Parameters }}}}{{ end }}]')
_GO_HEAD = """{{- $rest := "" }}{{- $last := "" }}
"""
_GO_TOOLS_SYSTEM = """{{- if and $.Tools (or (not $.Messages) (ne (index $.Messages 0).Role "system")) }}<|system|>
TOOLS_BLOCK<|end|>
{{ end }}
"""
_GO_LOOP = """{{- range $i, $m := $.Messages }}
{{- if eq $m.Role "system" }}
SYSTEM_TURN{{- else if eq $m.Role "user" }}<|user|>
{{ $m.Content }}<|end|>
{{ else if eq $m.Role "assistant" }}<|assistant|>
THINK{{ $m.Content }}CALLS{{ if ne (len (slice $.Messages $i)) 1 }}<|end|>
{{ end }}
RESULT{{ end }}
{{- $last = $m.Role }}
{{- end }}
{{- if ne $last "assistant" }}<|assistant|>
{{ end }}"""
_GO_SYSTEM_PLAIN = """{{- if $m.Content }}<|system|>
{{ $m.Content }}<|end|>
{{ end }}
"""
_GO_SYSTEM_TOOLS = """{{- if and (eq $i 0) $.Tools }}<|system|>
{{ if $m.Content }}{{ $m.Content }}

{{ end }}TOOLS_BLOCK<|end|>
{{ else if $m.Content }}<|system|>
{{ $m.Content }}<|end|>
{{ end }}
"""
_GO_THINK = """{{ if $m.Thinking }}<think>
{{ $m.Thinking }}
</think>

{{ end }}"""
_GO_CALLS = """{{ if $m.ToolCalls }}{{ if $m.Content }}
{{ end }}{"tool_calls": [{{ range $j, $c := $m.ToolCalls }}{{ if $j }}, {{ end }}{"name": {{ json $c.Function.Name }}, \
"arguments": {{ json $c.Function.Arguments }}}{{ end }}]}{{ $rest = $m.ToolCalls }}{{ end }}"""
_GO_RESULT = """{{- else if eq $m.Role "tool" }}<|user|>
{"tool_result": {"name": {{ if $rest }}{{ json (index $rest 0).Function.Name }}{{ $rest = slice $rest 1 }}\
{{ else }}""{{ end }}, "content": {{ $raw := false }}{{ if $m.Content }}{{ $first := slice $m.Content 0 1 }}\
{{ $final := slice $m.Content (len (slice $m.Content 1)) }}{{ if or (and (eq $first "{") (eq $final "}")) \
(and (eq $first "[") (eq $final "]")) }}{{ $raw = true }}{{ end }}{{ end }}{{ if $raw }}{{ $m.Content }}\
{{ else }}{{ json $m.Content }}{{ end }}}}<|end|>
"""


def go_template(tools: bool, think: bool) -> str:
    """Phi-3.5's chat template (with the extension's tools and think blocks where asked) for Ollama."""
    loop = (_GO_LOOP.replace("SYSTEM_TURN", _GO_SYSTEM_TOOLS if tools else _GO_SYSTEM_PLAIN)
            .replace("THINK", _GO_THINK if think else "").replace("CALLS", _GO_CALLS if tools else "")
            .replace("RESULT", _GO_RESULT if tools else '{{- "" }}'))
    return (_GO_HEAD + (_GO_TOOLS_SYSTEM if tools else "") + loop).replace("TOOLS_BLOCK", _GO_TOOLS_BLOCK)


def adapter_chat_template(adapter_dir: Path) -> str | None:
    """The chat template saved with the adapter (chat_template.jinja, or tokenizer_config.json's)."""
    import json

    jinja = adapter_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = adapter_dir / "tokenizer_config.json"
    if config.is_file():
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
        return template if isinstance(template, str) else None
    return None


def ollama_template(chat_template: str | None) -> str | None:
    """The Go template for Ollama that matches this chat template, where we know one (Phi-3.5's, extended or
    not); None otherwise."""
    from qctrain.data.template import split_extension, unextended
    from qctrain.tiny import phi3_5_chat_template

    if not chat_template:
        return None
    parts = unextended(chat_template)
    base, tools, think = parts if parts else (split_extension(chat_template)[1], False, False)
    if parts is None and split_extension(chat_template)[0]:
        return None
    if base.strip() != phi3_5_chat_template().strip():
        return None
    return go_template(tools, think)
