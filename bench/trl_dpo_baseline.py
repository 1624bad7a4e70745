"""The plain-library baseline for preference tuning: QLoRA DPO written directly against TRL, as its documentation shows.

    python bench/trl_dpo_baseline.py --model models/tiny-phi3 --data pairs.json --out /tmp/b

A 4-bit NF4 (double-quant) base, DPOTrainer with a peft_config (LoRA on all linear layers; the reference is the base
with the adapter disabled), or with --adapter continuing a saved adapter (TRL adds its frozen copy as the reference),
or with --ref-copy a second 4-bit base as ref_model (the memory counterfactual of a reference that is not shared).
TRL's own data processing (conversational pairs -> chat template -> prompt/completion split) and loss. Nothing from
qctrain. The LoRA weights are cast back to the float32 compute dtype after TRL cast them to bf16 (what qctrain does
on CPU). Each logged step is appended to OUT/metrics.jsonl with a wall-clock time, like qctrain's MetricsLog.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
from trl import DPOConfig, DPOTrainer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from trl_baseline import TimeLog  # noqa: E402


def conversational(pair: dict) -> dict:
    return {"prompt": [{"role": "user", "content": pair["prompt"]}],
            "chosen": [{"role": "assistant", "content": pair["chosen"]}],
            "rejected": [{"role": "assistant", "content": pair["rejected"]}]}


def load_4bit(model: str):
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(model, quantization_config=quantization, dtype=torch.float32,
                                                attn_implementation="sdpa", device_map={"": "cpu"})
    import bitsandbytes as bnb

    for layer in base.modules():  # as qctrain.model.disable_avx512bf16_repack (keeps gradients on AVX512-BF16 CPUs)
        if isinstance(layer, bnb.nn.Linear4bit):
            layer.support_avx512bf16_for_cpu = False
    return base


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="JSON list of {prompt, chosen, rejected} strings")
    parser.add_argument("--out", required=True)
    parser.add_argument("--adapter", help="continue this saved LoRA adapter (its frozen copy is the reference)")
    parser.add_argument("--ref-copy", action="store_true", help="a second 4-bit base as ref_model")
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5.0e-3)
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").unlink(missing_ok=True)
    set_seed(args.seed)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    pairs = json.loads(Path(args.data).read_text(encoding="utf-8"))
    dataset = Dataset.from_list([conversational(pair) for pair in pairs])
    model, peft_config = load_4bit(args.model), None
    if args.adapter:
        model = PeftModel.from_pretrained(model, args.adapter, is_trainable=True)
    else:
        peft_config = LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                 target_modules="all-linear", task_type="CAUSAL_LM")
    config = DPOConfig(output_dir=str(out / "checkpoints"), max_steps=args.max_steps,
                       per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
                       lr_scheduler_type="linear", warmup_steps=0, logging_steps=args.logging_steps,
                       save_strategy="no", eval_strategy="no", report_to="none", seed=args.seed,
                       max_length=args.max_length, gradient_checkpointing=False, bf16=False, use_cpu=True,
                       dataloader_pin_memory=False)
    trainer = DPOTrainer(model=model, ref_model=load_4bit(args.model) if args.ref_copy else None, args=config,
                         train_dataset=dataset, processing_class=tokenizer, peft_config=peft_config)
    for param in trainer.model.parameters():  # as qctrain does on CPU: the adapter in the float32 compute dtype
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    trainer.add_callback(TimeLog(out / "metrics.jsonl"))
    trainer.train()
    print(json.dumps({"done": True}), file=sys.stderr)


if __name__ == "__main__":
    main()
