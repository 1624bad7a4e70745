"""Before/after sample replies: one left-padded batch per model (finished.generate.before_after_samples, what the card
and the evaluation use) against one generate call per prompt and model (how they were made before), alternating, on
the 4-bit tiny Phi-3 with a LoRA adapter (B not zero, so base and tuned reply differently); greedy.

    python bench/eval_samples.py [--prompts 3,8] [--rounds 3] [--max-new-tokens 48]
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import ROOT, record, tiny_model


def adapter_model(model_dir: Path):
    import torch
    from peft import LoraConfig, get_peft_model
    from qctrain.basemodel.load import load_base_model
    from qctrain.recipe import ModelSection, Quantization

    base = load_base_model(ModelSection(name=str(model_dir), quantization=Quantization(compute_dtype="float32")))
    torch.manual_seed(1)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def one_at_a_time(model, tokenizer, conversations, max_new_tokens: int):
    """The baseline: the adapter's replies, then the base's, one generate call per conversation."""
    import torch
    from qctrain.card import Sample

    def replies() -> list[str]:
        found = []
        for messages in conversations:
            inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                   return_dict=True)
            with torch.no_grad():
                output = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
            found.append(tokenizer.decode(output[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
        return found

    tuned = replies()
    with model.disable_adapter():
        base = replies()
    return [Sample(c[-1]["content"], b, t) for c, b, t in zip(conversations, base, tuned, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", default="3,8", help="numbers of prompts, comma-separated")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--model", default=None, help="tiny model folder (default: models/tiny-phi3, built if missing)")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)

    sys.modules.setdefault("kernels", None)  # as the CLI does: bitsandbytes must not reach for the Hub
    from qctrain.finished.generate import before_after_samples
    from transformers import AutoTokenizer

    model_dir = tiny_model(args.model)
    model, tokenizer = adapter_model(model_dir), AutoTokenizer.from_pretrained(model_dir)
    identity = json.loads((ROOT / "data" / "identity.json").read_text(encoding="utf-8"))
    rows = []
    for count in (int(n) for n in args.prompts.split(",")):
        conversations = [[{"role": "user", "content": record["instruction"]}] for record in identity[:count]]
        loop_s, batch_s, same = [], [], True
        for _ in range(args.rounds):  # alternating: both see the same load
            start = time.perf_counter()
            looped = one_at_a_time(model, tokenizer, conversations, args.max_new_tokens)
            loop_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            batched = before_after_samples(model, tokenizer, conversations, args.max_new_tokens)
            batch_s.append(time.perf_counter() - start)
            same &= looped == batched
        ratios = [a / b for a, b in zip(loop_s, batch_s, strict=True)]
        rows.append({"prompts": count, "one at a time s (median)": round(statistics.median(loop_s), 2),
                     "batched s (median)": round(statistics.median(batch_s), 2),
                     "speed-up (median of rounds)": round(statistics.median(ratios), 2), "same replies": same})
    notes = (f"Tiny Phi-3 (4-bit NF4, float32 compute) with a rank-8 LoRA adapter, greedy, at most "
             f"{args.max_new_tokens} new tokens, base and tuned for each prompt; {args.rounds} alternating rounds; "
             "speed-up = one-at-a-time / batched time of the same round.")
    record("eval_samples", rows, notes=notes, results=args.results)
    return 0 if all(row["same replies"] for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
