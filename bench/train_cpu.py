"""`qctrain train` against plain TRL (bench/trl_baseline.py) on the tiny model, alternating A/B.

    python bench/train_cpu.py                   # 3 rounds x 3 arms x 24 steps (10-15 minutes on 2 cores)

Same tiny Phi-3, same generated data (1,000 Alpaca records, no duplicates), 4-bit NF4 double-quant base
(float32 compute), LoRA r8 all-linear, max_seq_length 512, batch 4, BFD packing + padding-free batches,
assistant-only loss, no eval, no gradient checkpointing. Arms, each a fresh process, in rotating order:

- ours: `qctrain train RECIPE` (the whole CLI; its data cache is warm after the first round);
- ours-cold (optional): the same with the data cache removed before every run;
- ours-bs1 (optional): per_device_train_batch_size 1 x gradient_accumulation_steps BATCH (same packs per
  optimizer step; sdpa attends within max_seq_length rows, not one batch x max_seq_length row);
- trl-fp32: the plain TRL script with the LoRA weights cast back to float32, which is what qctrain does on
  CPU (same dtype handling: the fair comparison of the per-step path);
- trl-bf16: the plain TRL script as TRL leaves it (adapters in bf16, which CPUs without bf16 matrix units
  run slowly).

Each run uses one torch thread by default (--threads): on a shared machine, torch's OpenMP threads
spin-wait whenever another process takes a core, and step times then swing by 10x for every arm;
single-threaded runs compare the per-step code paths stably (--threads 0: torch's default).

Per run: steps/s and real tokens/s between the end of step WARMUP and the last step (from each step's
wall-clock log time), CPU seconds per step over the same steps (the process's user + system time,
sampled from /proc: less sensitive to other load on a shared machine), and start-up = launch to the end
of the first step. Target: ours/trl-fp32 >= 0.95.
"""

import argparse
import json
import os
import shutil
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


def recipe(path: Path, model: str, data_file: Path, out: Path, args, arm: str = "ours") -> Path:
    # ours-bs1: one pack per row and gradient accumulation (the same packs per optimizer step): sdpa then
    # attends within rows of max_seq_length instead of one padding-free row of batch x max_seq_length.
    batch, accumulation = (1, args.batch_size) if arm == "ours-bs1" else (args.batch_size, 1)
    path.write_text(yaml.safe_dump({
        "model": {"name": model, "attn_implementation": "sdpa",
                  "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True,
                                   "compute_dtype": "float32"}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"sources": [{"path": str(data_file), "format": "alpaca"}], "eval": None, "seed": 42,
                 "max_seq_length": args.max_seq_length, "packing": True, "loss_on": "assistant"},
        "train": {"max_steps": args.steps, "per_device_train_batch_size": batch,
                  "gradient_accumulation_steps": accumulation, "learning_rate": 5.0e-3,
                  "logging_steps": 1, "save_steps": 100_000, "gradient_checkpointing": False,
                  "include_num_input_tokens_seen": True},
        "output": {"dir": str(out)},
    }), encoding="utf-8")
    return path


def command(arm: str, model: str, data_file: Path, out: Path, recipe_path: Path, args) -> list[str]:
    if arm.startswith("ours"):
        return [sys.executable, "-m", "qctrain", "train", str(recipe_path)]
    return [sys.executable, str(HERE / "trl_baseline.py"), "--model", model, "--data", str(data_file),
            "--out", str(out), "--max-steps", str(args.steps), "--max-seq-length", str(args.max_seq_length),
            "--batch-size", str(args.batch_size), "--adapter-dtype", {"trl-fp32": "float32", "trl-bf16": "bf16"}[arm]]


def measure(rows: list[dict], launched: float, warmup: int, samples: "CpuSampler | None" = None) -> dict:
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
        cpu = (samples.at(b["time"]), samples.at(a["time"])) if samples else (None, None)
        if None not in cpu and cpu[0] > cpu[1]:
            result["cpu_s_per_step"] = (cpu[0] - cpu[1]) / (b["step"] - a["step"])
        if "num_input_tokens_seen" in b:
            result["tokens_per_s"] = (b["num_input_tokens_seen"] - a["num_input_tokens_seen"]) / span
    return result


def run_arm(arm: str, model: str, data_file: Path, work: Path, index: int, args) -> dict:
    out = work / f"{arm}-{index}"
    if arm.startswith("ours"):
        # One output.dir per arm, emptied but for the data cache (kept for "ours": a user's rerun).
        out = work / arm
        if out.exists():
            for path in out.iterdir():
                if path.name != "prepared" or arm == "ours-cold":
                    shutil.rmtree(path) if path.is_dir() else path.unlink()
    recipe_path = recipe(work / "recipe.yaml", model, data_file, out, args, arm)
    launched = time.time()
    with tempfile.TemporaryFile("w+") as stderr:
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)} if args.threads else None
        proc = subprocess.Popen(command(arm, model, data_file, out, recipe_path, args), stdout=subprocess.DEVNULL,
                                stderr=stderr, text=True, cwd=common.ROOT, env=env)
        samples = CpuSampler(proc.pid)
        try:
            code = proc.wait(timeout=args.timeout)
        finally:
            samples.stop()
            if proc.poll() is None:
                proc.kill()
        total = time.time() - launched
        if code != 0:
            stderr.seek(0)
            raise RuntimeError(f"{arm} failed ({code}):\n{stderr.read()[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    result = measure(rows, launched, args.warmup, samples)
    result["process_s"] = total
    return result


class CpuSampler:
    """CPU seconds (user + system, all threads) of a process, sampled every 20 ms from /proc: a per-step
    cost that other load on a shared machine inflates far less than wall time."""

    def __init__(self, pid: int, every: float = 0.02):
        import threading

        self.path, self.every, self.points = Path(f"/proc/{pid}/stat"), every, []
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done.is_set():
            try:
                fields = self.path.read_text().rsplit(")", 1)[1].split()
                self.points.append((time.time(), (int(fields[11]) + int(fields[12])) / self.tick))
            except (OSError, IndexError, ValueError):
                pass
            self._done.wait(self.every)

    def stop(self):
        self._done.set()
        self._thread.join()

    def at(self, when: float) -> float | None:
        """CPU seconds used by `when` (interpolated); None without samples around it."""
        before = [p for p in self.points if p[0] <= when]
        after = [p for p in self.points if p[0] >= when]
        if not before or not after:
            return None
        (t0, c0), (t1, c1) = before[-1], after[0]
        return c0 if t1 == t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4, help="steps left out of the rates")
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--max-seq-length", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--arms", default="ours,trl-fp32,trl-bf16")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per run (OMP_NUM_THREADS; 0: torch's default, one per core)")
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
                     "CPU s/step (median)": med(arm, "cpu_s_per_step"),
                     "real tokens/s": med(arm, "tokens_per_s"),
                     "start-up to 1st step s (runs)": " ".join(f"{r['startup_s']:.1f}" for r in runs[arm]),
                     "process s": med(arm, "process_s"), "last loss": med(arm, "last_loss")})
    threads = f"{args.threads} torch thread(s) per run" if args.threads else "torch's default threads"
    notes = [f"{args.rounds} rounds, arms in rotating order, {threads}, {args.steps} steps each (rates from step "
             f"{args.warmup} on), {args.records} generated Alpaca records, max_seq_length {args.max_seq_length}, "
             f"batch {args.batch_size}, tiny Phi-3 4-bit NF4 (float32 compute), LoRA r8 all-linear, BFD packing, "
             "padding-free, assistant-only loss. 'ours' start-up includes preflight and the data stage (uncached "
             "in its first run, cached after); the TRL script tokenizes and packs in every run."]
    if "ours" in runs:
        for other in arms:
            if other != "ours":
                ratio = med("ours", "steps_per_s") / med(other, "steps_per_s")
                token_ratio = med("ours", "tokens_per_s") / med(other, "tokens_per_s")
                cpu_ratio = med(other, "cpu_s_per_step") / med("ours", "cpu_s_per_step")
                notes.append(f"ours / {other}: steps/s ratio {ratio:.3f}, real tokens/s ratio {token_ratio:.3f}, "
                             f"by CPU time per step {cpu_ratio:.3f}"
                             + (" (target >= 0.95)" if other == "trl-fp32" else ""))
    common.record("train_cpu", rows, "\n".join(f"- {n}" for n in notes),
                  None if args.results is None else Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
