"""`qctrain check` and `qctrain validate` wall time on the tiny recipe with a Hub section (a Hub double on
this machine), through the real entrypoint, against the same commands of an earlier qctrain (its
`entrypoint/` from git, default: the commit before preflight stopped importing torch), alternating.

    python bench/check.py [--rounds 7] [--baseline-rev 29bd231]

Target: check < 3 s on 2 cores.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml
from common import ROOT, record, tiny_model

sys.path.insert(0, str(ROOT / "tests"))
from hub_double import HubDouble, Token  # noqa: E402

TOKEN = "hf_FAKEbenchcheck_DO_NOT_LEAK_123"
BASELINE_REV = "29bd231"  # preflight built SFTConfig and a meta model: torch, transformers, TRL imported


def baseline_tree(rev: str, dest: Path) -> Path | None:
    archive = subprocess.run(["git", "archive", rev, "entrypoint"], cwd=ROOT, capture_output=True)
    if archive.returncode != 0:
        return None
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return dest / "entrypoint"


def timed(command: list[str], env: dict[str, str], cwd: Path) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    took = time.perf_counter() - start
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({result.returncode}): {result.stderr.strip()}")
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision to compare with ('': none)")
    parser.add_argument("--model", default=None, help="tiny model folder (default: models/tiny-phi3, built if missing)")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args(argv)

    model = tiny_model(args.model)
    with tempfile.TemporaryDirectory() as tmp, HubDouble({TOKEN: Token("alice")}) as hub:
        tmp = Path(tmp)
        recipe = tmp / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({
            "model": {"name": str(model), "quantization": {"compute_dtype": "float32"}},
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "data": {"sources": [{"path": str(ROOT / "data" / "alpaca_sample.json")}], "max_seq_length": 1024},
            "train": {"max_steps": 10, "learning_rate": 5e-3, "logging_steps": 5},
            "output": {"dir": str(tmp / "out")},
            "hub": {"repo_id": "alice/tiny-adapter"},
        }))
        env = {**os.environ, "HF_TOKEN": TOKEN, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1",
               "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HOME": str(tmp / "hf-home"), "PYTHONPATH": ""}
        env.pop("HF_HUB_OFFLINE", None)
        arms = {"qctrain": str(ROOT / "entrypoint")}
        old = baseline_tree(args.baseline_rev, tmp) if args.baseline_rev else None
        if old is not None:
            arms[f"qctrain at {args.baseline_rev}"] = str(old)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for arm, path in arms.items():  # alternating: both arms see the same load
                for command in ("validate", "check"):
                    arm_env = {**env, "PYTHONPATH": path}
                    took = timed([sys.executable, "-m", "qctrain", command, str(recipe)], arm_env, tmp)
                    times.setdefault((arm, command), []).append(took)
        assert hub.repos["alice/tiny-adapter"].private  # the Hub check really ran (and created the repo)

    ours = {command: statistics.median(times[("qctrain", command)]) for command in ("validate", "check")}
    rows = []
    for (arm, command), samples in times.items():
        median = statistics.median(samples)
        rows.append({"arm": arm, "command": command, "median s": round(median, 2), "min s": round(min(samples), 2),
                     "max s": round(max(samples), 2), "vs qctrain": round(median / ours[command], 2)})
    verdict = "met" if ours["check"] < 3 else "NOT met"
    notes = (f"Tiny recipe with a hub: section (Hub double on 127.0.0.1: whoami, repo creation), {args.rounds} "
             f"alternating rounds, wall time of the whole process. Target check < 3 s: {verdict} "
             f"(median {ours['check']:.2f} s).")
    record("check", rows, notes=notes, results=args.results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
