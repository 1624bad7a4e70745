"""The plain-library baseline: QLoRA SFT written directly against TRL, as its documentation shows.

    python bench/trl_baseline.py --model models/tiny-phi3 --data ../shared/data/real/alpaca_en_demo.json --out /tmp/b

A 4-bit NF4 (double-quant) base, SFTTrainer with a peft_config (LoRA on all linear layers), TRL's own
data preparation (conversational dataset -> chat template -> assistant-only loss mask -> truncation, or BFD
packing with padding-free batches) and TRL's own loss. Nothing from qctrain. --adapter-dtype float32 casts
the LoRA weights back to the compute dtype after TRL cast them to bf16 (what qctrain does on CPU); bf16 is
TRL as it comes.
Each logged step is appended to OUT/metrics.jsonl with a wall-clock time, like qctrain's MetricsLog.
"""

import argparse
import json
import time
from pathlib import Path

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, TrainerCallback, set_seed
from trl import SFTConfig, SFTTrainer


class TimeLog(TrainerCallback):
    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"step": state.global_step, "time": round(time.time(), 3), **logs}) + "\n")


def alpaca_to_messages(record: dict) -> dict:
    prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input", "").strip() else "")
    messages = [{"role": "system", "content": record["system"]}] if record.get("system") else []
    for user, assistant in record.get("history") or []:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": [*messages, {"role": "user", "content": prompt},
                         {"role": "assistant", "content": record["output"]}]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True, help="Alpaca JSON file")
    parser.add_argument("--out", required=True)
    parser.add_argument("--max-steps", type=int, default=40)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--packing", choices=["on", "off"], default="on")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--learning-rate", type=float, default=5.0e-3)
    parser.add_argument("--lr-scheduler", default="linear")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--compute-dtype", default="float32")
    parser.add_argument("--adapter-dtype", choices=["bf16", "float32"], default="bf16")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = json.loads(Path(args.data).read_text(encoding="utf-8"))
    dataset = Dataset.from_list([alpaca_to_messages(r) for r in records])

    compute_dtype = getattr(torch, args.compute_dtype)
    gpu = torch.cuda.is_available()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(
        args.model,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute_dtype),
        dtype=compute_dtype, attn_implementation="sdpa", device_map={"": 0 if gpu else "cpu"})
    config = SFTConfig(
        output_dir=str(out / "checkpoints"), max_length=args.max_seq_length, packing=args.packing == "on",
        packing_strategy="bfd", assistant_only_loss=True, per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate, lr_scheduler_type=args.lr_scheduler, warmup_steps=0,
        max_steps=args.max_steps, logging_steps=args.logging_steps, save_strategy="no", report_to="none",
        seed=args.seed, gradient_checkpointing=False, include_num_input_tokens_seen="non_padding", bf16=gpu,
        use_cpu=not gpu, dataloader_pin_memory=gpu)
    set_seed(args.seed)  # before PEFT initialises the adapter, as qctrain does
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=LoraConfig(r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                                                target_modules="all-linear", task_type="CAUSAL_LM"))
    if args.adapter_dtype == "float32":
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.to(compute_dtype)
    trainer.add_callback(TimeLog(out / "metrics.jsonl"))
    trainer.train()


if __name__ == "__main__":
    main()
