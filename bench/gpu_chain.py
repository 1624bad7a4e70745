"""The SFT -> DPO chain with evaluation through the `qctrain` CLI on one NVIDIA GPU, at Phi-3.5-mini's shapes
(random weights: nothing downloaded). What the CPU tests show on the tiny model, here at real size:

    python bench/gpu_chain.py                 # about 3-4 minutes on one H100/H200
    python bench/gpu_chain.py --tiny --cpu --results -   # the logic on the tiny Phi-3, on CPU (smoke test)

1. a Phi-3.5-mini-shaped Phi3ForCausalLM with random bf16 weights and the Phi-3.5 tokenizer, saved once;
2. `qctrain check` then `qctrain train` of an SFT recipe (NF4 + double quant, bf16 compute, LoRA r16 all-linear,
   max length 1024, batch 4, --steps steps, evaluate: held-out loss/accuracy of base and tuned + samples);
3. the same for a DPO recipe continuing that run's adapter (model.adapter: the SFT folder; the frozen adapter is
   the reference on the same 4-bit base), with its own evaluation.

Per stage: wall time of the whole command (load, quantize, data, train, evaluate, outputs), the peak GPU memory
the process held (nvidia-smi, sampled every 0.2 s) against preflight's estimate, and the run's own numbers (train
loss, held-out base -> tuned, DPO reward accuracy). Without a GPU it prints why and exits 0.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
import gpu_qlora  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEBUG = False


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--records", type=int, default=400)
    parser.add_argument("--max-seq-length", type=int, default=1024)
    parser.add_argument("--tiny", action="store_true", help="the tiny Phi-3 shapes (a quick check of the script)")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (with --tiny: the smoke test)")
    parser.add_argument("--debug", action="store_true", help="qctrain --debug (tracebacks)")
    parser.add_argument("--results", default=None, help="RESULTS.md to append to ('-': none)")
    return parser.parse_args(argv)


class GpuPeak:
    """The most GPU memory in use (MiB, nvidia-smi) while the block runs, less what was in use before it."""

    def __enter__(self):
        self.before = self.peak = _gpu_used_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self):
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, _gpu_used_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    @property
    def mib(self) -> int:
        return self.peak - self.before


def _gpu_used_mib() -> int:
    if shutil.which("nvidia-smi") is None or os.environ.get("CUDA_VISIBLE_DEVICES") == "":
        return 0
    out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"],
                         capture_output=True, text=True, check=False).stdout.strip()
    return int(out.splitlines()[0]) if out else 0


def write_model(folder: Path, tiny: bool, cpu: bool) -> Path:
    import torch
    from qctrain.tiny import build_tokenizer

    shape = gpu_qlora.TINY if tiny else gpu_qlora.PHI35_MINI
    gpu_qlora.build_random_model(shape, folder, torch.float32 if cpu else torch.bfloat16, "cpu" if cpu else "cuda",
                                 seed=0)
    build_tokenizer().save_pretrained(folder)
    return folder


def write_data(work: Path, records: int) -> tuple[Path, Path]:
    sft = common.write_alpaca(work / "data" / "sft.json", records, seed=1)
    plain = [r for r in common.alpaca_records(records * 4, seed=2, duplicate_rate=0.0)
             if not r.get("history") and not r.get("system") and not r.get("input")][:records]
    pairs = [{"prompt": r["instruction"], "chosen": r["output"], "rejected": plain[(i + 7) % len(plain)]["output"]}
             for i, r in enumerate(plain)]
    pref = work / "data" / "pairs.json"
    pref.write_text(json.dumps(pairs, ensure_ascii=False), encoding="utf-8")
    return sft, pref


def recipe(work: Path, name: str, args, **extra) -> Path:
    body = {
        "model": {"name": "model", "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True,
                                                    "compute_dtype": "float32" if args.cpu else "bfloat16"}},
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "train": {"max_steps": args.steps, "per_device_train_batch_size": 4, "gradient_accumulation_steps": 1,
                  "logging_steps": 5, "save_steps": 1000, "seed": 42},
        "evaluate": {"samples": True, "max_new_tokens": 32},  # held-out: on for sft, the trainer's own for dpo
        "output": {"dir": f"out/{name}"},
    }
    for key, value in extra.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body, sort_keys=False), encoding="utf-8")
    return path


def qctrain(work: Path, *argv: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT / "entrypoint"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "qctrain", *argv], cwd=work, capture_output=True, text=True,
                          env=env, timeout=timeout)


def estimate_gib(check_output: str) -> str:
    """Preflight's peak-memory estimate as `qctrain check` prints it."""
    found = re.search(r"estimated peak GPU memory \(GiB\):[^\n]*?total (\d+(?:\.\d+)?)", check_output)
    return f"{found.group(1)} GiB" if found else "n/a"


def stage(work: Path, name: str, path: Path) -> dict:
    checked = qctrain(work, "check", path.name)
    print(f"{name}: check exit {checked.returncode}\n{checked.stdout[-1500:]}{checked.stderr[-1500:]}", flush=True)
    started = time.perf_counter()
    with GpuPeak() as peak:
        done = qctrain(work, "train", path.name, *(["--debug"] if DEBUG else []))
    wall = time.perf_counter() - started
    print(f"{name}: train exit {done.returncode} in {wall:.0f}s\n{done.stdout[-4000:]}{done.stderr[-6000:]}",
          flush=True)
    row = {"stage": name, "exit": done.returncode, "wall s": round(wall), "GPU peak GiB": round(peak.mib / 1024, 1),
           "preflight estimate": estimate_gib(checked.stdout + checked.stderr)}
    manifest_path = work / "out" / name / "run_manifest.json"
    if done.returncode == 0 and manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        metrics = manifest.get("metrics") or {}
        row["train_loss"] = round(metrics.get("train_loss", float("nan")), 4)
        row.update(evaluation_cells(manifest))
    return row


def evaluation_cells(manifest: dict) -> dict:
    """The run's own verdicts: held-out loss base -> tuned (sft), reward accuracy start -> end (dpo), and how long
    the evaluation took."""
    evaluation = manifest.get("evaluation") or {}
    cells = {"eval s": (evaluation.get("seconds") or {}).get("total", "")}
    held = evaluation.get("heldout") or {}
    if held:
        cells["held-out loss base -> tuned"] = f"{held['base']['loss']:.3f} -> {held['tuned']['loss']:.3f}"
    accuracy = (manifest.get("preference") or {}).get("rewards/accuracies")
    if accuracy:
        cells["reward accuracy start -> end"] = f"{accuracy['start']:.2f} -> {accuracy['end']:.2f}"
    return cells


def main(argv=None) -> int:
    args = parse_args(argv)
    global DEBUG
    DEBUG = args.debug
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_chain: skipped: no CUDA GPU here (torch.cuda.is_available() is False)")
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="qctrain-chain-") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        write_model(work / "model", args.tiny, args.cpu)
        torch.cuda.empty_cache()
        built = time.perf_counter() - t0
        sft_data, pairs = write_data(work, args.records)
        data = {"max_seq_length": args.max_seq_length, "eval": {"count": 16}}
        sft = recipe(work, "sft", args, data={**data, "sources": [{"path": str(sft_data.relative_to(work))}]})
        dpo = recipe(work, "dpo", args, method="dpo", model={"adapter": "out/sft"},
                     data={**data, "sources": [{"path": str(pairs.relative_to(work)), "format": "preference"}]},
                     train={"learning_rate": 5.0e-6, "beta": 0.1, "eval_strategy": "steps",
                            "eval_steps": args.steps})
        rows.append(stage(work, "sft", sft))
        rows.append(stage(work, "dpo", dpo))
        shutil.rmtree(work / "model", ignore_errors=True)
    device = "CPU" if args.cpu else torch.cuda.get_device_name(0)
    notes = [f"- {device}; random {'tiny' if args.tiny else 'Phi-3.5-mini-shaped'} model "
             f"built and saved in {built:.0f}s; {args.steps} steps each, batch 4, max length {args.max_seq_length}",
             "- wall s: the whole `qctrain train` command (load + quantize, data, train, evaluate, outputs)",
             "- GPU peak: nvidia-smi's memory.used while the command ran, less before (CUDA context included)"]
    common.record("gpu_chain", rows, "\n".join(notes), Path(args.results) if args.results else None)
    return 0 if all(row["exit"] == 0 for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
