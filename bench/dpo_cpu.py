"""`qctrain train` with method dpo against a plain TRL DPOTrainer script (bench/trl_dpo_baseline.py) on the same
pairs, alternating rounds: real tokens/s, CPU time per step, peak memory (issue 23).

    python bench/dpo_cpu.py                  # speed: 3 rounds x 4 arms x 40 steps; memory: 3 arms on a wider model

The job: the tiny Phi-3 of `make tiny-model` (hidden 64, 2 layers), 4-bit NF4 double-quant base with float32 compute,
LoRA r8 / alpha 16 / dropout 0 on all linear layers, 256 pairs of our own text (bench/common.py's generator: the
prompt an instruction, the chosen reply its output, the rejected one another record's output), Phi-3.5's chat
template, max length 512, batch 4 pairs, learning rate 5e-3 linear (no warm-up), beta 0.1, 40 steps, logging every
10, no eval, no checkpoints, seed 42, no gradient checkpointing, one torch thread per run. Speed arms, each a fresh
process, in rotating order:

- trl: the plain TRL script, a new adapter on the bare base (reference: the adapter disabled);
- ours: `qctrain train RECIPE` (the whole CLI, preflight and the data stage included; the data cache is warm after
  the first round; on CPU its trainer has TRL's fused LM head score only the completion positions, as TRL does on
  CUDA: preference.compact_head_on_cpu, same losses; the plain script scores every position of the padded batch);
- trl-adapter, ours-adapter: both continuing the same saved adapter (reference: TRL's frozen copy of it).

Memory arms (a tiny Phi-3 of hidden 1024 and 4 layers: 270 MiB of 4-bit base weights that stand out above the
libraries; 6 steps, batch 2, max length 256): ours-adapter, trl (bare base) and trl-refcopy (a second 4-bit base
as ref_model: what a reference that is not shared costs). Peak RSS of each run's process (wait4).

`num_tokens` (TRL's counter: the attention-mask tokens of the chosen and the rejected rows, so the prompt counts
twice) is the token count of both arms. With the rows in the same order (qctrain keeps DPO pairs in read order;
TRL's random sampler with the same seed draws the same batches), the losses must agree.
Targets: ours >= 1.0x trl in real tokens/s; ours-adapter's peak RSS within trl's plus the adapter copy (no second
base); trl-refcopy - ours-adapter about one base.
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from train_cpu import CpuSampler, measure  # noqa: E402

HERE = Path(__file__).resolve().parent
SPEED_ARMS = ("trl", "ours", "trl-adapter", "ours-adapter")
MEMORY_ARMS = ("ours-adapter", "trl", "trl-refcopy")


def write_pairs(path: Path, n: int, model: str, max_length: int, seed: int = 0) -> Path:
    """n pairs of our own text: prompt = an instruction, chosen = its output, rejected = another record's output;
    each side with its prompt within max_length tokens in the chat template, so both arms train on the same whole
    rows (qctrain drops a pair whose reply alone is too long, TRL cuts it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)

    def fits(prompt: str, reply: str) -> bool:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": reply}], tokenize=False)
        return len(tokenizer(text)["input_ids"]) < max_length

    records = [r for r in common.alpaca_records(n * 8, seed, duplicate_rate=0.0) if not r.get("history")
               and not r.get("system") and not r.get("input") and fits(r["instruction"], r["output"])]
    rng = random.Random(seed)
    pairs = []
    for i, record in enumerate(records):
        other = records[(i + rng.randint(1, len(records) - 1)) % len(records)]
        if fits(record["instruction"], other["output"]):
            pairs.append({"prompt": record["instruction"], "chosen": record["output"], "rejected": other["output"]})
    if len(pairs) < n:
        raise SystemExit(f"only {len(pairs)} pairs within {max_length} tokens; ask for fewer")
    path.write_text(json.dumps(pairs[:n], ensure_ascii=False), encoding="utf-8")
    return path


def write_adapter(model: str, folder: Path) -> Path:
    """A saved LoRA adapter (random, non-zero) for the arms that continue one."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    base = AutoModelForCausalLM.from_pretrained(model, quantization_config=BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32), dtype=torch.float32, device_map={"": "cpu"})
    get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False,
                                    task_type="CAUSAL_LM")).save_pretrained(folder)
    return folder


def recipe(path: Path, model: str, data_file: Path, out: Path, job: dict, adapter: Path | None) -> Path:
    path.write_text(yaml.safe_dump({
        "method": "dpo",
        "model": {"name": model, **({"adapter": str(adapter)} if adapter else {}),
                  "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "float32"}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"sources": [{"path": str(data_file), "format": "preference"}], "eval": None, "seed": 42,
                 "dedup": False, "max_seq_length": job["max_length"], "on_overlong": "truncate"},
        "train": {"max_steps": job["steps"], "learning_rate": 5.0e-3, "lr_scheduler_type": "linear",
                  "warmup_steps": 0, "logging_steps": job["logging_steps"], "save_steps": 100_000, "seed": 42,
                  "per_device_train_batch_size": job["batch"], "gradient_checkpointing": False},
        "output": {"dir": str(out)},
    }), encoding="utf-8")
    return path


def command(arm: str, model: str, data_file: Path, out: Path, recipe_path: Path, job: dict,
            adapter: Path | None) -> list[str]:
    if arm.startswith("ours"):
        return [sys.executable, "-m", "qctrain", "train", "--restart", str(recipe_path)]
    extra = (["--adapter", str(adapter)] if arm == "trl-adapter" else []) + (["--ref-copy"] if arm == "trl-refcopy"
                                                                            else [])
    return [sys.executable, str(HERE / "trl_dpo_baseline.py"), "--model", model, "--data", str(data_file),
            "--out", str(out), "--max-steps", str(job["steps"]), "--max-length", str(job["max_length"]),
            "--batch-size", str(job["batch"]), "--logging-steps", str(job["logging_steps"]), *extra]


def run_arm(arm: str, model: str, data_file: Path, work: Path, job: dict, adapter: Path, args) -> dict:
    out = work / f"{job['name']}-{arm}"  # ours: one output.dir per arm, its data cache kept between rounds
    uses_adapter = arm.endswith("-adapter")
    recipe_path = recipe(work / "recipe.yaml", model, data_file, out, job, adapter if uses_adapter else None)
    launched = time.time()
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
    with tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(command(arm, model, data_file, out, recipe_path, job, adapter), cwd=common.ROOT,
                                stdout=subprocess.DEVNULL, stderr=stderr, text=True, env=env)
        samples = CpuSampler(proc.pid)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            samples.stop()
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            stderr.seek(0)
            raise RuntimeError(f"{arm} failed ({proc.returncode}):\n{stderr.read()[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # both arms count tokens with TRL's num_tokens (the prompt twice)
        if "num_tokens" in row:
            row["num_input_tokens_seen"] = row["num_tokens"]
    result = measure(rows, launched, args.warmup, samples)
    result["process_s"] = time.time() - launched
    result["peak_rss_mib"] = usage.ru_maxrss / 1024
    return result


def rounds(arms: list[str], n: int, run) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    for round_ in range(n):
        for arm in arms[round_ % len(arms):] + arms[:round_ % len(arms)]:
            result = run(arm)
            runs[arm].append(result)
            print(f"round {round_ + 1} {arm}: {json.dumps({k: round(v, 3) for k, v in result.items()})}", flush=True)
    return runs


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10, help="rates from the log of this step on")
    parser.add_argument("--logging-steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=256)
    parser.add_argument("--arms", default=",".join(SPEED_ARMS))
    parser.add_argument("--memory-arms", default=",".join(MEMORY_ARMS), help="'' to skip the memory runs")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default=None)
    parser.add_argument("--results", default=None, help="RESULTS.md to append to ('-': none)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    model = str(common.tiny_model(args.model))
    arms, memory_arms = args.arms.split(","), [a for a in args.memory_arms.split(",") if a]
    speed_job = {"name": "speed", "steps": args.steps, "max_length": 512, "batch": 4,
                 "logging_steps": args.logging_steps}
    memory_job = {"name": "memory", "steps": 6, "max_length": 256, "batch": 2, "logging_steps": 2}
    with tempfile.TemporaryDirectory(prefix="qctrain-bench-dpo-") as tmp:
        work = Path(tmp)
        data_file = write_pairs(work / "pairs.json", args.pairs, model, memory_job["max_length"])
        adapter = write_adapter(model, work / "adapter")
        speed = rounds(arms, args.rounds, lambda arm: run_arm(arm, model, data_file, work, speed_job, adapter, args))
        memory: dict[str, list[dict]] = {}
        if memory_arms:
            from qctrain.tiny import write_tiny_model

            wide = str(write_tiny_model(work / "tiny-wide", hidden_size=1024, num_layers=4))
            wide_adapter = write_adapter(wide, work / "wide-adapter")
            memory = rounds(memory_arms, 1, lambda arm: run_arm(arm, wide, data_file, work, {
                **memory_job, "name": f"memory-{arm}"}, wide_adapter, args))

    def med(runs: dict, arm: str, key: str) -> float:
        values = [r[key] for r in runs.get(arm, []) if key in r]
        return statistics.median(values) if values else float("nan")

    rows = [{"arm": arm, "real tokens/s (median)": med(speed, arm, "tokens_per_s"),
             "real tokens/s (runs)": " ".join(f"{r.get('tokens_per_s', float('nan')):,.0f}" for r in speed[arm]),
             "CPU s/step": med(speed, arm, "cpu_s_per_step"), "real tokens per CPU s": med(speed, arm,
                                                                                        "tokens_per_cpu_s"),
             "start-up s": med(speed, arm, "startup_s"), "peak RSS MiB": med(speed, arm, "peak_rss_mib"),
             f"loss @ step {args.steps}": med(speed, arm, "last_loss")} for arm in arms]
    rows += [{"arm": f"{arm} (hidden 1024)", "peak RSS MiB": med(memory, arm, "peak_rss_mib"),
              "CPU s/step": med(memory, arm, "cpu_s_per_step"), "start-up s": med(memory, arm, "startup_s")}
             for arm in memory_arms]
    notes = [f"{args.rounds} rounds, arms in rotating order, {args.threads} torch thread(s) per run, {args.steps} "
             f"steps (rates from the step-{args.warmup} log on), {args.pairs} pairs of generated text, max length 512, "
             "batch 4 pairs, tiny Phi-3 4-bit NF4 (float32 compute), LoRA r8 all-linear, lr 5e-3 linear, beta 0.1. "
             "'ours' start-up includes preflight and the data stage (cached after the first round). Tokens: TRL's "
             "num_tokens (chosen and rejected rows, the prompt in both)."]
    notes += verdicts(lambda arm, key: med(speed, arm, key), lambda arm, key: med(memory, arm, key), arms,
                      memory_arms, args.steps)
    common.record("dpo_cpu", rows, "\n".join(f"- {n}" for n in notes),
                  None if args.results is None else Path(args.results))
    return 0


def verdicts(speed, memory, arms: list[str], memory_arms: list[str], steps: int) -> list[str]:
    lines = []
    for ours, theirs in (("ours", "trl"), ("ours-adapter", "trl-adapter")):
        if ours in arms and theirs in arms:
            ratio = speed(ours, "tokens_per_s") / speed(theirs, "tokens_per_s")
            cpu = speed(theirs, "cpu_s_per_step") / speed(ours, "cpu_s_per_step")
            target = f"; target >= 1.0: {'met' if ratio >= 1.0 else 'NOT met'}"
            lines.append(f"{ours} / {theirs}: real tokens/s {ratio:.2f}x (by CPU time per step {cpu:.2f}x){target}")
            a, b = speed(ours, "last_loss"), speed(theirs, "last_loss")
            lines.append(f"loss at step {steps}: {ours} {a:.4f}, {theirs} {b:.4f} ({100 * abs(a - b) / b:.2f}% apart)")
    if {"ours-adapter", "trl", "trl-refcopy"} <= set(memory_arms):
        ours, plain, copy = (memory(arm, "peak_rss_mib") for arm in ("ours-adapter", "trl", "trl-refcopy"))
        lines.append(f"peak RSS, hidden 1024 (270 MiB of 4-bit base weights): ours-adapter {ours:,.0f} MiB, trl "
                     f"(bare base, no reference copy) {plain:,.0f} MiB, trl-refcopy {copy:,.0f} MiB: a second base "
                     f"costs {copy - ours:+,.0f} MiB over ours-adapter, whose shared reference costs "
                     f"{ours - plain:+,.0f} MiB over the bare base")
    return lines


if __name__ == "__main__":
    sys.exit(main())
