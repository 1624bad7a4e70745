"""`qctrain train` against plain TRL (bench/trl_baseline.py) on the tiny model, alternating A/B.

    python bench/train_cpu.py                   # 3 rounds x 3 arms x 40 steps (about 6 minutes on 2 cores)

Same tiny Phi-3, same generated data (2,000 Alpaca records, no duplicates), 4-bit NF4 double-quant base
(float32 compute), LoRA r8 all-linear, max_seq_length 1024, batch 4, BFD packing + padding-free batches,
assistant-only loss, no eval, no gradient checkpointing. Arms, each a fresh process, in rotating order:

- ours: `qctrain train RECIPE` (the whole CLI; its data cache is warm after the first round);
- trl-fp32: the plain TRL script with the LoRA weights cast back to float32, which is what qctrain does on
  CPU (same dtype handling: the fair comparison of the per-step path);
- trl-bf16: the plain TRL script as TRL leaves it (adapters in bf16, which CPUs without bf16 matrix units
  run slowly).

Per run: steps/s and real tokens/s between the end of step WARMUP and the last step (from each step's
wall-clock log time), and start-up = launch to the end of the first step. Target: ours/trl-fp32 >= 0.95.
"""

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HERE = Path(__file__).resolve().parent


def recipe(path: Path, model: str, data_file: Path, out: Path, args) -> Path:
    path.write_text(yaml.safe_dump({
        "model": {"name": model, "attn_implementation": "sdpa",
                  "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True,
                                   "compute_dtype": "float32"}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"sources": [{"path": str(data_file), "format": "alpaca"}], "eval": None, "seed": 42,
                 "max_seq_length": args.max_seq_length, "packing": True, "loss_on": "assistant"},
        "train": {"max_steps": args.steps, "per_device_train_batch_size": args.batch_size, "learning_rate": 5.0e-3,
                  "logging_steps": 1, "save_steps": 100_000, "gradient_checkpointing": False,
                  "include_num_input_tokens_seen": True},
        "output": {"dir": str(out)},
    }), encoding="utf-8")
    return path


def command(arm: str, model: str, data_file: Path, out: Path, recipe_path: Path, args) -> list[str]:
    if arm == "ours":
        return [sys.executable, "-m", "qctrain", "train", str(recipe_path)]
    return [sys.executable, str(HERE / "trl_baseline.py"), "--model", model, "--data", str(data_file),
            "--out", str(out), "--max-steps", str(args.steps), "--max-seq-length", str(args.max_seq_length),
            "--batch-size", str(args.batch_size), "--adapter-dtype", {"trl-fp32": "float32", "trl-bf16": "bf16"}[arm]]


def measure(rows: list[dict], launched: float, warmup: int) -> dict:
    steps = [r for r in rows if "loss" in r and "time" in r]
    if not steps:
        raise RuntimeError("no step was logged")
    first = steps[0]
    warm = [r for r in steps if r["step"] >= warmup] or steps
    a, b = warm[0], warm[-1]
    span = b["time"] - a["time"]
    result = {"startup_s": first["time"] - launched, "steps": b["step"], "first_loss": steps[0]["loss"],
              "last_loss": b["loss"]}
    if span > 0 and b["step"] > a["step"]:
        result["steps_per_s"] = (b["step"] - a["step"]) / span
        if "num_input_tokens_seen" in b:
            result["tokens_per_s"] = (b["num_input_tokens_seen"] - a["num_input_tokens_seen"]) / span
    return result


def run_arm(arm: str, model: str, data_file: Path, work: Path, index: int, args) -> dict:
    out = work / f"{arm}-{index}"
    if arm == "ours":
        out = work / "ours"  # one output.dir: the data cache is shared, as when a user reruns
        for name in ("metrics.jsonl",):
            (out / name).unlink(missing_ok=True)
        for path in out.glob("checkpoints"):
            subprocess.run(["rm", "-rf", str(path)], check=False)
    recipe_path = recipe(work / "recipe.yaml", model, data_file, out, args)
    launched = time.time()
    proc = subprocess.run(command(arm, model, data_file, out, recipe_path, args), capture_output=True, text=True,
                          timeout=args.timeout, cwd=common.ROOT)
    total = time.time() - launched
    if proc.returncode != 0:
        raise RuntimeError(f"{arm} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = measure(rows, launched, args.warmup)
    result["process_s"] = total
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the rates")
    parser.add_argument("--records", type=int, default=2000)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--arms", default="ours,trl-fp32,trl-bf16")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--model", default=None)
    parser.add_argument("--results", default=None, help="RESULTS.md to append to ('-': none)")
    args = parser.parse_args(argv)

    model = str(common.tiny_model(args.model))
    arms = args.arms.split(",")
    runs: dict[str, list[dict]] = {arm: [] for arm in arms}
    with tempfile.TemporaryDirectory(prefix="qctrain-bench-train-") as tmp:
        work = Path(tmp)
        data_file = work / "alpaca.json"
        data_file.write_text(json.dumps(common.alpaca_records(args.records, seed=1, duplicate_rate=0.0),
                                        ensure_ascii=False), encoding="utf-8")
        for round_ in range(args.rounds):
            order = arms[round_ % len(arms):] + arms[:round_ % len(arms)]
            for arm in order:
                result = run_arm(arm, model, data_file, work, round_, args)
                runs[arm].append(result)
                print(f"round {round_ + 1} {arm}: {json.dumps({k: round(v, 3) for k, v in result.items()})}",
                      flush=True)

    def med(arm: str, key: str) -> float:
        values = [r[key] for r in runs[arm] if key in r]
        return statistics.median(values) if values else float("nan")

    rows = []
    for arm in arms:
        rates = [r.get("steps_per_s", float("nan")) for r in runs[arm]]
        rows.append({"arm": arm, "steps/s (median)": med(arm, "steps_per_s"),
                     "steps/s (runs)": " ".join(f"{x:.2f}" for x in rates),
                     "real tokens/s": med(arm, "tokens_per_s"),
                     "start-up to 1st step s (runs)": " ".join(f"{r['startup_s']:.1f}" for r in runs[arm]),
                     "process s": med(arm, "process_s"), "last loss": med(arm, "last_loss")})
    notes = [f"{args.rounds} rounds, arms in rotating order, {args.steps} steps each (rates from step "
             f"{args.warmup} on), {args.records} generated Alpaca records, max_seq_length {args.max_seq_length}, "
             f"batch {args.batch_size}, tiny Phi-3 4-bit NF4 (float32 compute), LoRA r8 all-linear, BFD packing, "
             "padding-free, assistant-only loss. 'ours' start-up includes preflight and the data stage (uncached "
             "in its first run, cached after); the TRL script tokenizes and packs in every run."]
    if "ours" in runs:
        for other in arms:
            if other != "ours":
                ratio = med("ours", "steps_per_s") / med(other, "steps_per_s")
                token_ratio = med("ours", "tokens_per_s") / med(other, "tokens_per_s")
                notes.append(f"ours / {other}: steps/s ratio {ratio:.3f}, real tokens/s ratio {token_ratio:.3f}"
                             + (" (target >= 0.95)" if other == "trl-fp32" else ""))
    common.record("train_cpu", rows, "\n".join(f"- {n}" for n in notes),
                  None if args.results is None else Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
