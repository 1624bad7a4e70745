"""llama.cpp itself applies our GGUF LoRA: base GGUF + adapter logits against PEFT's (target: max |diff| <= 1e-3).

Not part of `make bench` or `make test`: it needs llama.cpp, which here comes from llama-cpp-python built
from its PyPI source package (a CPU build takes minutes), and the sdist's own llama.cpp tree for
convert_hf_to_gguf.py (the base conversion only; the adapter is written by qctrain's own code):

    python3 -m venv /tmp/llama/venv
    /tmp/llama/venv/bin/pip download --no-deps --no-binary :all: llama-cpp-python -d /tmp/llama/sdist
    /tmp/llama/venv/bin/pip install /tmp/llama/sdist/llama_cpp_python-*.tar.gz     # builds llama.cpp
    mkdir -p /tmp/llama/src && tar -xzf /tmp/llama/sdist/llama_cpp_python-*.tar.gz -C /tmp/llama/src
    /tmp/llama/venv/bin/pip install --target /tmp/llama/sp sentencepiece           # for the converter
    PYTHONPATH=/tmp/llama/sp .venv/bin/python bench/llama_cpp_lora.py \
        --llama-python /tmp/llama/venv/bin/python --llama-cpp /tmp/llama/src/llama_cpp_python-*/vendor/llama.cpp \
        [--run out/tiny-cpu]

Both sides run in float32 on the unquantized tiny Phi-3 (Phi-3.5's tokenizer; llama.cpp's converter reads
its tokenizer.model): PEFT's PeftModel on the transformers model, and llama.cpp with the f32 base GGUF and
our f32 GGUF LoRA. Rows: a random LoRA (A and B non-zero, every Linear, fused qkv_proj/gate_up_proj) and,
with --run, the trained adapter of a finished run (e.g. `make demo`'s out/tiny-cpu).
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import common
import numpy as np

LLAMA_SIDE = """
import json, sys
import numpy as np
from llama_cpp import Llama
base, lora, ids_path, out = sys.argv[1:5]
ids = json.load(open(ids_path))
result = {}
for name, path in (("base", None), ("lora", lora)):
    llm = Llama(model_path=base, lora_path=path, logits_all=True, n_ctx=256, n_batch=256, n_threads=2,
                verbose=False, seed=0)
    llm.eval(ids)
    result[name] = np.array(llm.scores[: len(ids)], dtype=np.float32)
    del llm
np.savez(out, **result)
"""


def peft_side(model_dir: Path, adapter_dir: Path, ids: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(base logits, base + adapter logits) from transformers and PEFT, float32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tensor = torch.tensor([ids])
    with torch.no_grad():
        plain = base(tensor).logits[0].numpy()
        tuned = PeftModel.from_pretrained(base, adapter_dir)(tensor).logits[0].numpy()
    return plain, tuned


def random_adapter(model_dir: Path, dest: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(base, config).save_pretrained(dest)
    return dest


def compare(name: str, model_dir: Path, adapter_dir: Path, base_gguf: Path, ids: list[int], work: Path,
            llama_python: str) -> dict:
    from qctrain.basemodel.reference import BaseReference
    from qctrain.finished import gguf_lora
    from transformers import AutoConfig

    slug = "".join(c if c.isalnum() else "-" for c in name)
    lora_gguf = work / f"{slug}.gguf"
    gguf_lora.write_lora_gguf(adapter_dir, lora_gguf, AutoConfig.from_pretrained(model_dir),
                              BaseReference(str(model_dir), None, None))
    (work / "ids.json").write_text(json.dumps(ids))
    out = work / f"{slug}.npz"
    subprocess.run([llama_python, "-c", LLAMA_SIDE, str(base_gguf), str(lora_gguf), str(work / "ids.json"), str(out)],
                   check=True)
    llama = np.load(out)
    plain, tuned = peft_side(model_dir, adapter_dir, ids)
    vocab = plain.shape[1]  # llama.cpp's rows have the model's n_vocab too
    diff = float(np.abs(llama["lora"][:, :vocab] - tuned).max())
    return {
        "adapter": name,
        "tokens": len(ids),
        "llama.cpp+LoRA vs PEFT, max abs diff": f"{diff:.1e}",
        "llama.cpp base vs transformers": f"{float(np.abs(llama['base'][:, :vocab] - plain).max()):.1e}",
        "adapter's own effect (PEFT vs base)": f"{float(np.abs(tuned - plain).max()):.3f}",
        "same argmax": f"{int((llama['lora'][:, :vocab].argmax(1) == tuned.argmax(1)).sum())}/{len(ids)}",
        "diff": diff,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--llama-python", required=True, help="a Python with llama-cpp-python (built from source)")
    parser.add_argument("--llama-cpp", required=True, type=Path, help="llama.cpp tree (convert_hf_to_gguf.py)")
    parser.add_argument("--model", default=None, help="tiny Phi-3 folder (default: models/tiny-phi3)")
    parser.add_argument("--run", type=Path, help="also compare this finished run's adapter (its base: --model)")
    parser.add_argument("--results", default=None, help="RESULTS.md to append to ('-': none)")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    model_dir = common.tiny_model(args.model).resolve()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "Who are you? Give three tips for staying healthy."},
                {"role": "assistant", "content": "I am Quokka. Sleep well, move every day, eat vegetables."}]
    ids = tokenizer.apply_chat_template(messages, return_dict=True)["input_ids"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        base_gguf = work / "base-f32.gguf"
        subprocess.run([sys.executable, str(args.llama_cpp / "convert_hf_to_gguf.py"), str(model_dir),
                        "--outtype", "f32", "--outfile", str(base_gguf)], check=True, capture_output=True)
        rows.append(compare("random r16 all-linear", model_dir, random_adapter(model_dir, work / "random"),
                            base_gguf, ids, work, args.llama_python))
        if args.run:
            from qctrain.rundir import RunDir

            rows.append(compare(f"trained: {args.run}", model_dir, RunDir(args.run).adapter, base_gguf, ids, work,
                                args.llama_python))
    version = subprocess.run([args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    worst = max(row.pop("diff") for row in rows)
    notes = (f"llama-cpp-python {version} built from its PyPI sdist (CPU); base converted with that sdist's "
             f"convert_hf_to_gguf.py (f32), adapter by qctrain.finished.gguf_lora (f32); PEFT on the float32 "
             f"transformers model; {len(ids)} tokens of a Phi-3.5 chat; worst max |diff| {worst:.2e} "
             f"(target <= 1e-3): {'met' if worst <= 1e-3 else 'MISSED'}.")
    common.record("llama_cpp_lora", rows, notes, Path(args.results) if args.results else None)
    return 0 if worst <= 1e-3 else 1


if __name__ == "__main__":
    sys.exit(main())
