"""Shared helpers for the benchmarks: machine facts, result tables, RESULTS.md rows, test data."""

import datetime as _dt
import json
import os
import platform
import random
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
TINY_MODEL = ROOT / "models" / "tiny-phi3"


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    parts = [f"python {platform.python_version()}"]
    for name in ("torch", "transformers", "trl", "peft", "bitsandbytes", "datasets", "tokenizers", "liger-kernel"):
        try:
            parts.append(f"{name} {version(name)}")
        except PackageNotFoundError:
            pass
    return ", ".join(parts)


_LOAD_AT_START = None  # set on import: the load when the benchmark started


def machine() -> str:
    gpu = ""
    try:
        import torch

        if torch.cuda.is_available():
            gpu = f", GPU {torch.cuda.get_device_name(0)}"
    except ImportError:
        pass
    return f"{cores()} cores, {cpu_model()}{gpu}, load average {_LOAD_AT_START} at start, {load_average()} at end"


def peak_rss_mib(children: bool = False) -> float:
    """Peak resident set size of this process (or of its waited-for children), in MiB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024  # Linux reports KiB


def table(rows: list[dict], columns: list[str] | None = None) -> str:
    """A Markdown table of dicts (also readable in a terminal)."""
    columns = columns or list(dict.fromkeys(k for row in rows for k in row))
    cells = [[_cell(row.get(c, "")) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) + " |" for r in cells]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        if value != value:  # NaN
            return "n/a"
        if abs(value) < 1:
            return f"{value:.4f}"
        return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.1f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def record(bench: str, rows: list[dict], notes: str = "", results: Path | None = None,
           columns: list[str] | None = None) -> None:
    """Print the table and append it, dated and with the machine and versions, to bench/RESULTS.md."""
    text = table(rows, columns)
    print(text)
    if notes:
        print(notes)
    path = results or Path(os.environ.get("QCTRAIN_BENCH_RESULTS", RESULTS))
    if str(path) == "-":
        return
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    commit = _git_commit()
    block = [f"\n### {bench} — {stamp}", "",
             f"- machine: {machine()}", f"- versions: {versions()}",
             f"- command: `{' '.join([Path(sys.argv[0]).name, *sys.argv[1:]])}`" + (f" at {commit}" if commit else ""),
             ""]
    if notes:
        block += [notes, ""]
    block += [text, ""]
    if not path.exists():
        path.write_text("# Benchmark results\n\nRows are appended by the scripts in bench/ (see bench/README.md).\n",
                        encoding="utf-8")
    with open(path, "a", encoding="utf-8") as handle:
        handle.write("\n".join(block))


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=5)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


# --- generated Alpaca data ---

_EN = ("the a of to and in is it that for on with as this by be are from or an which at was can "
       "write short poem about sea explain how bicycle works summarize following text translate sentence "
       "into french what capital france give three tips staying healthy quick brown fox jumps over lazy dog "
       "python programming language here list first second third step main return answer model data "
       "learning machine network system user time people year way day thing world life hand part child eye "
       "woman place work week case point government company number group problem fact good new first last long "
       "great little own other old right big high different small large next early young important few public "
       "bad same able customer table query function value result example method process energy water light "
       "history science music story city country market health food school student teacher question").split()
_RARE = ("photosynthesis chlorophyll mitochondria cryptography blockchain derivative eigenvalue metamorphosis "
         "renaissance parliamentary infrastructure thermodynamics biodiversity kaleidoscope").split()
_ZH = ("请写一首关于大海的短诗解释自行车是如何工作的总结下面文字法国首都哪里"
       "给出保持健康三个建议机器学习人工智能分支今天天气很好我们去公园散步吧")


def _words(rng: random.Random, n: int, chinese: bool) -> str:
    if chinese:
        return "".join(rng.choice(_ZH) for _ in range(n * 2)) + "。"
    out = []
    for i in range(n):
        word = rng.choice(_RARE) if rng.random() < 0.03 else rng.choice(_EN)
        out.append(word.capitalize() if i == 0 else word)
        if i % 14 == 13:
            out[-1] += rng.choice([".", ",", ".\n", ":\n- "])
    return " ".join(out) + "."


def alpaca_records(n: int, seed: int = 0, duplicate_rate: float = 0.02) -> list[dict]:
    """n Alpaca records of mixed lengths (log-normal output lengths with a long tail, 60% empty inputs,
    some system prompts and multi-turn histories, 15% Chinese) and a few exact duplicates."""
    rng = random.Random(seed)
    records: list[dict] = []
    for _ in range(n):
        if records and rng.random() < duplicate_rate:
            records.append(dict(rng.choice(records)))
            continue
        zh = rng.random() < 0.15
        rec = {"instruction": _words(rng, rng.randint(4, 30), zh),
               "input": "" if rng.random() < 0.6 else _words(rng, int(rng.lognormvariate(2.7, 0.8)) + 1, zh),
               "output": _words(rng, min(1500, int(rng.lognormvariate(3.9, 0.9)) + 1), zh)}
        if rng.random() < 0.05:
            rec["system"] = _words(rng, rng.randint(5, 20), zh)
        if rng.random() < 0.05:
            rec["history"] = [[_words(rng, rng.randint(3, 20), zh), _words(rng, rng.randint(5, 60), zh)]
                              for _ in range(rng.randint(1, 3))]
        records.append(rec)
    return records


def alpaca_like(lengths: list[list[int]], seed: int = 0) -> list[dict]:
    """English records of our own text with the given (instruction, input, output) word counts."""
    rng = random.Random(seed)
    return [{"instruction": _words(rng, max(1, i), False), "input": _words(rng, n, False) if n else "",
             "output": _words(rng, max(1, o), False)} for i, n, o in lengths]


def write_alpaca(path: Path, n: int, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(alpaca_records(n, seed), ensure_ascii=False), encoding="utf-8")
    return path


def tiny_model(path: str | None = None) -> Path:
    """The tiny Phi-3 of `make tiny-model` (built here if missing)."""
    target = Path(path) if path else TINY_MODEL
    if not (target / "config.json").is_file():
        from qctrain.tiny import write_tiny_model

        write_tiny_model(target)
    return target


def run_child(script: Path, args: list[str], timeout: float = 1800) -> dict:
    """Run `python script args` (a measurement in a fresh process) and return the JSON on its last line."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "bench"),
                                                                      os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                         env=env)
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        raise RuntimeError(f"{script.name} {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(lines[-1])


_LOAD_AT_START = load_average()
