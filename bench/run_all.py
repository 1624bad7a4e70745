"""Run the benchmarks in turn (`make bench`); each prints its table and appends a row to bench/RESULTS.md.

    python bench/run_all.py            # full sizes: about 40-50 minutes on 2 cores, GPU one skipped there
    python bench/run_all.py --quick    # small sizes, a few minutes (numbers only indicative)
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

QUICK = {
    "prep.py": ["--sizes", "10000,20000", "--trl-records", "2000", "--rounds", "1", "--floor-records", "2000",
                "--broken-gb", "0.2"],
    "packing.py": ["--records", "5000"],
    "train_cpu.py": ["--rounds", "1", "--steps", "12", "--logging-steps", "3", "--warmup", "3", "--records", "400"],
    "gpu_qlora.py": ["--steps", "4", "--warmup", "1"],
    "check.py": ["--rounds", "3"],
    "extension.py": ["--plain-records", "1000", "--tool-records", "500", "--rounds", "2"],
    "eval_samples.py": ["--prompts", "3", "--rounds", "1", "--max-new-tokens", "16"],
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--only", default="check.py,prep.py,extension.py,packing.py,train_cpu.py,eval_samples.py,"
                                          "gpu_qlora.py")
    parser.add_argument("--results", default=None, help="RESULTS.md to append to ('-': none)")
    args = parser.parse_args(argv)

    failed = []
    for script in args.only.split(","):
        extra = QUICK.get(script, []) if args.quick else []
        if args.results:
            extra = [*extra, "--results", args.results]
        print(f"\n=== {script} {' '.join(extra)}", flush=True)
        start = time.perf_counter()
        code = subprocess.run([sys.executable, str(HERE / script), *extra]).returncode
        print(f"=== {script}: exit {code} after {time.perf_counter() - start:.0f}s", flush=True)
        if code:
            failed.append(script)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
