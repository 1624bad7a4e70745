"""Data preparation at scale: qctrain.data.prepare on real-text Alpaca records, memory and throughput.

    python bench/prep.py                                  # 100k and 1M records, TRL at 20k, a broken 2 GB file
    python bench/prep.py --sizes 2000 --trl-records 500 --broken-gb 0 --results -   # a quick look, no RESULTS.md

Records are built from real text of our own (the sentences of data/alpaca_sample.json and the Chinese of
README.zh.md; 15% Chinese, 60% empty inputs, some system prompts and histories; varied so nothing dedups) to
about 246 tokens per record on Phi-3.5's tokenizer (the tiny model's). Each measurement runs in a fresh process.
The timed run is left alone; a second, identical run is watched for memory: this process samples the proportional
set size (PSS, /proc/PID/smaps_rollup) of that process and its forked workers every 0.2 s (shared pages count
once; each read walks the page tables, a third of a core on two, so it would slow a timed run). Rows: records/s
end to end (first, uncached run), the floor (workers x one core of the Rust tokenizer's encode_batch alone on the
same rendered texts, measured before and after each run), TRL's own
SFTTrainer preparation of the same records (packing, assistant-only loss, dataset_num_proc = workers) in the
same run, alternating, and the peak PSS. Targets (issue 14): records/s >= 0.8 x floor and >= 3x TRL; 1M records
in <= 2.5 GB PSS and <= 1.2x the 100k figure; a broken 2 GB file refused in seconds with <= 1 GB RSS.
"""

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HERE = Path(__file__).resolve()
SAMPLE = common.ROOT / "data" / "alpaca_sample.json"
CHINESE = common.ROOT / "README.zh.md"


# --- real-text records ---

def text_pools() -> tuple[list[str], list[str], list[str]]:
    """English instructions and sentences from our Alpaca sample, Chinese sentences from README.zh.md."""
    sample = json.loads(SAMPLE.read_text(encoding="utf-8"))
    instructions = [r["instruction"] for r in sample]
    english = [s.strip() for r in sample for s in re.split(r"(?<=[.!?])\s+|\n+", r["output"] + "\n" + r["input"])
               if len(s.strip()) > 20]
    chinese = [s.strip() + "。" for s in re.split(r"[。\n]", CHINESE.read_text(encoding="utf-8"))
               if len(re.findall(r"[\u4e00-\u9fff]", s)) > 8 and "`" not in s and "|" not in s]
    return instructions, english, chinese


def real_records(n: int, seed: int = 0):
    """n records of real sentences; log-normal output lengths around ~246 tokens per record in all."""
    instructions, english, chinese = text_pools()
    rng = random.Random(seed)
    for i in range(n):
        zh = rng.random() < 0.15
        pool = chinese if zh else english

        def sentences(count: int, pool=pool, zh=zh) -> str:
            return ("" if zh else " ").join(rng.choice(pool) for _ in range(count))

        instruction = sentences(1) if zh else rng.choice(instructions)
        record = {"instruction": f"{instruction} ({i})",
                  "input": "" if rng.random() < 0.6 else sentences(rng.randint(1, 2)),
                  "output": sentences(min(60, max(1, int(rng.lognormvariate(1.33, 0.8)))))}
        if rng.random() < 0.05:
            record["system"] = sentences(1)
        if rng.random() < 0.05:
            record["history"] = [[sentences(1), sentences(rng.randint(1, 3))] for _ in range(rng.randint(1, 2))]
        yield record


def write_records(path: Path, n: int) -> Path:
    """A JSON array written record by record (nothing held)."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("[")
        for i, record in enumerate(real_records(n)):
            handle.write(("," if i else "") + "\n" + json.dumps(record, ensure_ascii=False))
        handle.write("\n]\n")
    return path


def write_broken(path: Path, gigabytes: float) -> Path:
    """A JSONL file of that size whose third line is cut (a broken export): refused by on_bad_record: error."""
    line = (json.dumps(next(real_records(1)), ensure_ascii=False) + "\n").encode()
    block = line * max(1, (1 << 24) // len(line))
    with open(path, "wb") as handle:
        handle.write(line + line + line[: len(line) // 2] + b"\n")
        for _ in range(int(gigabytes * (1 << 30)) // len(block)):
            handle.write(block)
    return path


# --- memory: PSS of a process and its descendants ---

def _descendants(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        current = todo.pop()
        pids.append(current)
        try:
            for task in os.listdir(f"/proc/{current}/task"):
                with open(f"/proc/{current}/task/{task}/children") as handle:
                    todo += [int(p) for p in handle.read().split()]
        except OSError:
            continue
    return pids


def _kib(pid: int) -> dict[str, int]:
    """Pss and Rss of a process in KiB, from one read of smaps_rollup (each read walks the page tables: ~15 ms
    of CPU for a process with the libraries loaded)."""
    sizes = {"Pss": 0, "Rss": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as handle:
            for line in handle:
                field = line.split(":", 1)[0]
                if field in sizes:
                    sizes[field] = int(line.split()[1])
    except OSError:
        pass
    return sizes


def run_sampled(args: list[str], timeout: float = 3600, sample: bool = True) -> dict:
    """Run `python prep.py args` and return its JSON with the peak PSS (MiB) of it and its workers together,
    the peak of the main process alone, and the peak RSS of the tree (sample=False: no sampling, whose reads of
    /proc take a third of a core on two: for timed runs)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(common.ROOT / "bench"),
                                                                      os.environ.get("PYTHONPATH")]))}
    proc = subprocess.Popen([sys.executable, str(HERE), *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    peaks = {"pss": 0, "main_pss": 0, "rss": 0}
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.2):
            sizes = [_kib(p) for p in _descendants(proc.pid)]
            peaks["pss"] = max(peaks["pss"], sum(s["Pss"] for s in sizes))
            peaks["main_pss"] = max(peaks["main_pss"], sizes[0]["Pss"] if sizes else 0)
            peaks["rss"] = max(peaks["rss"], sum(s["Rss"] for s in sizes))

    sampler = threading.Thread(target=sample, daemon=True)
    if sample:
        sampler.start()
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        done.set()
        if sample:
            sampler.join()
    lines = out.strip().splitlines()
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"prep.py {' '.join(args)} failed ({proc.returncode}):\n{err[-3000:]}")
    result = json.loads(lines[-1])
    result.update(peak_pss_mib=peaks["pss"] / 1024, peak_main_pss_mib=peaks["main_pss"] / 1024,
                  peak_rss_mib=peaks["rss"] / 1024, stderr_lines=len(err.splitlines()))
    return result


# --- children (each in a fresh process) ---

def section(data_file: Path, max_len: int, eval_fraction: float | None = 0.05):
    """Our recipe's data section; without an eval split it truncates overlong records as TRL does, so both
    prepare the same tokens."""
    from qctrain.recipe import DataSection

    return DataSection.model_validate({"sources": [{"path": str(data_file), "format": "alpaca"}],
                                       "eval": {"fraction": eval_fraction} if eval_fraction else None,
                                       "on_overlong": "drop" if eval_fraction else "truncate",
                                       "max_seq_length": max_len})


def tokenizer_of(model_dir: str):
    from qctrain.basemodel.load import load_tokenizer
    from qctrain.recipe import ModelSection

    return load_tokenizer(ModelSection(name=model_dir))


def child_prepare(args) -> dict:
    from qctrain import data

    tokenizer = tokenizer_of(args.model)
    cfg = section(Path(args.data), args.max_seq_length, None if args.no_eval else 0.05)
    # Libraries loaded before the clock starts, as for TRL's run (a training run has them loaded anyway).
    data.template.training_template(data.resolve_chat_template(cfg.chat_template, tokenizer), tokenizer, cfg.loss_on)
    start, cpu = time.perf_counter(), os.times()
    prepared = data.prepare(cfg, tokenizer, Path(args.out), force=args.child == "first")
    seconds = time.perf_counter() - start
    report = prepared.report
    after = os.times()  # the workers are joined by now: their CPU time is in children_*
    cpu_s = sum(getattr(after, k) - getattr(cpu, k) for k in ("user", "system", "children_user",
                                                              "children_system"))
    return {"seconds": seconds, "cpu_s": cpu_s, "records": report["records_read"], "cached": prepared.cached,
            "tokens": report["train"]["tokens"] + report.get("eval", {}).get("tokens", 0),
            "duplicates": report["duplicates"], "workers": data.workers.prep_workers(1 << 40)}


def child_broken(args) -> dict:
    """A broken file through data.prepare (on_bad_record: error): how long until it is refused."""
    from qctrain import data
    from qctrain.errors import InputError
    from qctrain.recipe import DataSection

    tokenizer = tokenizer_of(args.model)
    cfg = DataSection.model_validate({"sources": [{"path": args.data}], "on_bad_record": "error"})
    start = time.perf_counter()
    try:
        data.prepare(cfg, tokenizer, Path(args.out))
        message = "not refused"
    except InputError as err:
        message = str(err)
    return {"seconds": time.perf_counter() - start, "message": message}


def child_floor(args) -> dict:
    """One core, the same records: the jinja render alone, and the Rust encode_batch alone on the rendered texts."""
    from itertools import islice

    from qctrain import data
    from qctrain.data import template as templates
    from transformers.utils.chat_template_utils import render_jinja_template

    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    tokenizer = tokenizer_of(args.model)
    cfg = section(Path(args.data), args.max_seq_length)
    template = data.template.training_template(data.resolve_chat_template(cfg.chat_template, tokenizer), tokenizer,
                                               cfg.loss_on)
    src = cfg.sources[0]
    conversations = [data.formats.to_conversation(r, src.format, src.columns)
                     for r in islice(data.sources.read_source(src), args.floor_records)]
    messages, *_ = data.template.template_inputs(conversations)
    # The stage renders conversations without tools or traces with the template the extension extends (the same
    # text): so does the floor.
    template = (templates.unextended(template) or (template,))[0]
    start = time.perf_counter()
    texts, _ = render_jinja_template(conversations=messages, chat_template=template,
                                     return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
    render_s = time.perf_counter() - start
    backend = tokenizer.backend_tokenizer
    start = time.perf_counter()
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    backend.encode_batch_fast(texts, add_special_tokens=False)
    fast_s = time.perf_counter() - start
    data.tokens.tokenize_flat(conversations[:100], tokenizer, template, cfg.loss_on)  # set up outside the clock
    start = time.perf_counter()
    data.tokens.tokenize_flat(conversations, tokenizer, template, cfg.loss_on)
    ours_s = time.perf_counter() - start
    return {"records": len(texts), "tokens": sum(map(len, encodings)), "render_s": render_s,
            "encode_s": encode_s, "fast_s": fast_s, "tokenize_1proc_s": ours_s}


def child_trl(args) -> dict:
    """TRL's own preparation of the same records: SFTTrainer._prepare_dataset (tokenize with the assistant mask,
    labels, packing BFD), dataset_num_proc = our worker count."""
    from types import SimpleNamespace

    from datasets import Dataset
    from qctrain import data
    from trl import SFTConfig, SFTTrainer

    tokenizer = tokenizer_of(args.model)
    template = data.template.training_template(data.resolve_chat_template("model", tokenizer), tokenizer, "assistant")
    records = json.loads(Path(args.data).read_text(encoding="utf-8"))
    start = time.perf_counter()
    dataset = Dataset.from_list([
        {"messages": data.formats.to_conversation(data.sources.Record("r", r), "alpaca", {})["messages"]}
        for r in records])
    config = SFTConfig(output_dir=str(Path(args.out) / "trl"), max_length=args.max_seq_length, packing=True,
                       packing_strategy="bfd", assistant_only_loss=True, dataset_num_proc=args.workers,
                       report_to="none", use_cpu=True)
    trainer = SimpleNamespace(_tokenizer=tokenizer, chat_template=template, completion_only_loss=None,
                              _is_vision_dataset=False, _signature_columns=None, args=config)
    prepared = SFTTrainer._prepare_dataset(trainer, dataset, tokenizer, config, True, None, "train")
    seconds = time.perf_counter() - start
    tokens = sum(len(ids) for ids in prepared["input_ids"])
    return {"seconds": seconds, "records": len(records), "tokens": tokens}


# --- the parent ---

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000", help="record counts, comma-separated")
    parser.add_argument("--trl-records", type=int, default=20_000, help="records for the TRL comparison (0: skip)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds of ours vs TRL")
    parser.add_argument("--floor-records", type=int, default=10_000)
    parser.add_argument("--broken-gb", type=float, default=2.0, help="size of the broken file (0: skip)")
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--model", default=None, help="tiny model folder (default: models/tiny-phi3)")
    parser.add_argument("--results", default=None, help="RESULTS.md to append to ('-': none)")
    parser.add_argument("--child", choices=["first", "cached", "floor", "trl", "broken"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--workers", type=int, default=2, help=argparse.SUPPRESS)
    parser.add_argument("--no-eval", action="store_true", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


class Bench:
    """The parent's runs, each a child process in `tmp`, and what they found: rows for RESULTS.md, the floors
    measured around them, each size's result and one-core rate, and the verdicts against the targets."""

    def __init__(self, args: argparse.Namespace, tmp: Path):
        self.args, self.tmp = args, tmp
        self.base = ["--model", str(common.tiny_model(args.model)), "--max-seq-length", str(args.max_seq_length)]
        self.sizes = [int(s) for s in args.sizes.split(",") if s]
        self.first_file = write_records(tmp / f"records-{self.sizes[0]}.json", self.sizes[0])
        self.rows: list[dict] = []
        self.verdicts: list[str] = []
        self.results: dict[int, dict] = {}
        self.per_cores: dict[int, float] = {}
        self.floors = [self.floor()]

    def child(self, kind: str, data: Path, out: str, *extra: str, sample: bool = True) -> dict:
        return run_sampled([*self.base, "--data", str(data), "--out", str(self.tmp / out), "--child", kind, *extra],
                           sample=sample)

    def floor(self) -> dict:
        return self.child("floor", self.first_file, "floor", "--floor-records", str(self.args.floor_records))

    def size(self, n: int) -> None:
        """n records: a timed first run (unwatched), the floor after it, a watched run for memory, a cached rerun."""
        path = self.first_file if n == self.sizes[0] else write_records(self.tmp / f"records-{n}.json", n)
        start = time.perf_counter()
        result = self.child("first", path, f"timed-{n}", sample=False)
        self.floors.append(self.floor())  # the floor on each side of the run: the machine's speed drifts
        memory = self.child("first", path, f"out-{n}")
        cached = self.child("cached", path, f"out-{n}")
        assert cached["cached"], "the second run did not hit the cache"
        shutil.rmtree(self.tmp / f"timed-{n}")
        result.update({k: memory[k] for k in ("peak_pss_mib", "peak_main_pss_mib", "peak_rss_mib")})
        self.results[n] = result
        per_core = self.per_cores[n] = statistics.mean(f["records"] / f["encode_s"] for f in self.floors[-2:])
        rate = result["records"] / result["seconds"]
        bound = result["workers"] * per_core
        self.rows.append({"run": f"{n:,} records, first run", "records": result["records"],
                          "seconds": round(result["seconds"], 1), "records/s": rate,
                          "floor records/s": f"{bound:,.0f} ({result['workers']} x {per_core:,.0f})",
                          "vs floor": round(rate / bound, 2),
                          "records per CPU s vs one core": round(result["records"] / result["cpu_s"] / per_core, 2),
                          "peak PSS MiB (main+workers)": round(result["peak_pss_mib"]),
                          "peak PSS MiB (main)": round(result["peak_main_pss_mib"]),
                          "cached re-run s": round(cached["seconds"], 2)})
        print(f"{n:,} records: {rate:,.0f} records/s, peak PSS {result['peak_pss_mib']:,.0f} MiB "
              f"({time.perf_counter() - start:.0f}s)", flush=True)
        if n != self.sizes[0]:
            path.unlink()

    def trl(self) -> None:
        """Ours and TRL's preparation of the same records, alternating, medians."""
        records, rounds = self.args.trl_records, self.args.rounds
        subset = write_records(self.tmp / "trl.json", records)
        ours_s, trl_s = [], []
        workers = self.results[self.sizes[0]]["workers"]
        for round_ in range(rounds):
            ours = self.child("first", subset, f"ours-{round_}", "--no-eval")
            trl = self.child("trl", subset, f"trl-{round_}", "--workers", str(workers))
            ours_s.append(ours["seconds"])
            trl_s.append(trl["seconds"])
        ratio = statistics.median(trl_s) / statistics.median(ours_s)
        for who, seconds, last in (("qctrain", ours_s, ours), ("TRL SFTTrainer", trl_s, trl)):
            self.rows.append({"run": f"{records:,} records, {who} (median of {rounds})", "records": records,
                              "seconds": round(statistics.median(seconds), 2),
                              "records/s": records / statistics.median(seconds),
                              "peak PSS MiB (main+workers)": round(last["peak_pss_mib"])})
        self.verdicts.append(f"vs TRL at {records:,}: {ratio:.2f}x (target >= 3x): "
                             f"{'met' if ratio >= 3 else '**missed**'}; same tokens: "
                             f"{'yes' if trl['tokens'] == ours['tokens'] else 'no'} "
                             f"({ours['tokens']:,} vs {trl['tokens']:,})")

    def broken(self) -> None:
        """A broken file of --broken-gb: how fast it is refused, in how much memory."""
        broken = write_broken(self.tmp / "broken.jsonl", self.args.broken_gb)
        size_gb = broken.stat().st_size / 2**30
        start = time.perf_counter()
        refused = self.child("broken", broken, "broken-out")
        self.rows.append({"run": f"broken {size_gb:.1f} GB JSONL (cut 3rd line), refused",
                          "seconds": round(refused["seconds"], 1),
                          "peak PSS MiB (main+workers)": round(refused["peak_pss_mib"]),
                          "peak RSS MiB": round(refused["peak_rss_mib"])})
        met = refused["seconds"] < 10 and refused["peak_rss_mib"] <= 1024
        self.verdicts.append(f"broken {size_gb:.1f} GB file: refused in {refused['seconds']:.1f} s with "
                             f"{refused['peak_rss_mib']:,.0f} MiB peak RSS (target: seconds, <= 1 GB): "
                             f"{'met' if met else '**missed**'}; message: {refused['message'][:160]}")
        print(f"broken file: {time.perf_counter() - start:.1f}s", flush=True)
        broken.unlink()

    def all_verdicts(self) -> list[str]:
        """Records/s against the floor for each size (the biggest first), the TRL and broken-file verdicts, and the
        memory of the biggest size against the target and the smallest."""
        verdicts = []
        for n, result in reversed(self.results.items()):
            rate = result["records"] / result["seconds"]
            bound = result["workers"] * self.per_cores[n]
            verdicts.append(f"{n:,} records: {rate:,.0f} records/s = {rate / bound:.2f} x the floor (target >= 0.8): "
                            f"{'met' if rate >= 0.8 * bound else '**missed**'}")
        verdicts += self.verdicts
        if len(self.sizes) > 1:
            small, big = (self.results[self.sizes[i]]["peak_pss_mib"] for i in (0, -1))
            verdicts.append(f"{self.sizes[-1]:,} records: peak PSS {big:,.0f} MiB (target <= 2,560 MiB): "
                            f"{'met' if big <= 2560 else '**missed**'}; {big / small:.2f}x the {self.sizes[0]:,} "
                            f"figure (target <= 1.2x): {'met' if big <= 1.2 * small else '**missed**'}")
        return verdicts

    def notes(self) -> str:
        floors, floor = self.floors, self.floors[0]

        def rate_of(key: str) -> float:
            return statistics.median(f["records"] / f[key] for f in floors)

        floor_runs = ", ".join(f"{f['records'] / f['encode_s']:,.0f}" for f in floors)
        return "\n\n".join([
            "records per CPU s vs one core: records over the CPU seconds of the process and its workers "
            "together, against the one-core floor: how close the work itself is to the tokenizer alone, "
            "whatever share of the cores the machine gave it.",
            f"Real-text Alpaca records (data/alpaca_sample.json sentences, README.zh.md Chinese; "
            f"{floor['tokens'] / floor['records']:.0f} tokens/record), tiny Phi-3 on Phi-3.5's tokenizer, "
            f"max_seq_length {self.args.max_seq_length}, eval 5%, packing on. Floor: one core, "
            f"{floor['records']:,} records, encode_batch alone (what `tokenizer(texts)` runs, offsets included) on "
            f"the rendered texts, measured before and after each run (the mean of the two); its runs: {floor_runs} "
            f"records/s (encode_batch_fast, no offsets: {rate_of('fast_s'):,.0f}; jinja render alone "
            f"{rate_of('render_s'):,.0f}; our whole tokenize on one process {rate_of('tokenize_1proc_s'):,.0f} "
            "records/s, medians). Peak PSS of the process and its forked workers together, sampled every 0.2 s "
            "from /proc/PID/smaps_rollup.",
            "Targets: " + "; ".join(self.all_verdicts()) + "."])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        import datasets

        datasets.disable_progress_bars()
        handler = {"first": child_prepare, "cached": child_prepare, "floor": child_floor, "trl": child_trl,
                   "broken": child_broken}
        print(json.dumps(handler[args.child](args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="qctrain-bench-prep-") as tmp:
        bench = Bench(args, Path(tmp))
        for n in bench.sizes:
            bench.size(n)
        if args.trl_records:
            bench.trl()
        if args.broken_gb:
            bench.broken()
        notes = bench.notes()
    common.record("prep", bench.rows, notes, None if args.results is None else Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
