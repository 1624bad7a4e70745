"""Data preparation throughput: qctrain.data.prepare on a generated Alpaca set of mixed lengths.

    python bench/prep.py                       # 100k records (about 2 minutes on 2 cores)
    python bench/prep.py --records 2000 --baseline-records 500 --results -   # quick look, no RESULTS.md row

Measures, each in a fresh process: the first (uncached) prepare() end to end, the cached re-run, the
time per stage, the raw speed of the jinja render and the Rust tokenizer on the same texts (the floor
nobody's pipeline goes under), and the same prepare() as it was before the fast path (the data.py of
the commit before it, from git) on a subset. Targets: >= 10,000 records/s end to end, cached <= 5%.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

HERE = Path(__file__).resolve()


def section(data_file: Path, max_len: int):
    from qctrain.recipe import DataSection

    return DataSection.model_validate({"sources": [{"path": str(data_file), "format": "alpaca"}],
                                       "eval": {"fraction": 0.05}, "max_seq_length": max_len})


def tokenizer_of(model_dir: str):
    from qctrain.model import load_tokenizer
    from qctrain.recipe import ModelSection

    return load_tokenizer(ModelSection(name=model_dir))


def summary(prepared, seconds: float) -> dict:
    report = prepared.report
    tokens = report["train"]["tokens"] + report.get("eval", {}).get("tokens", 0)
    return {"seconds": seconds, "records": report["records_read"], "tokens": tokens,
            "train_sequences": report["train"]["sequences"],
            "packing_efficiency": report["train"].get("packing_efficiency"),
            "peak_rss_mib": common.peak_rss_mib(), "peak_rss_children_mib": common.peak_rss_mib(children=True)}


def child_run(args) -> dict:
    from qctrain import data

    tokenizer = tokenizer_of(args.model)
    cfg = section(Path(args.data), args.max_seq_length)
    start = time.perf_counter()
    prepared = data.prepare(cfg, tokenizer, Path(args.out), force=args.child == "first")
    result = summary(prepared, time.perf_counter() - start)
    result["cached"] = prepared.cached
    return result


def child_baseline(args) -> dict:
    """prepare() of the data.py before the fast path, loaded from git."""
    import subprocess

    source = subprocess.run(["git", "show", f"{args.baseline_rev}:entrypoint/qctrain/data.py"], cwd=common.ROOT,
                            capture_output=True, text=True, check=True).stdout
    module = types.ModuleType("qctrain._data_baseline")
    module.__package__ = "qctrain"
    exec(compile(source, f"{args.baseline_rev}:data.py", "exec"), module.__dict__)
    tokenizer = tokenizer_of(args.model)
    cfg = section(Path(args.data), args.max_seq_length)
    start = time.perf_counter()
    prepared = module.prepare(cfg, tokenizer, Path(args.out), force=True)
    return summary(prepared, time.perf_counter() - start)


def child_stages(args) -> dict:
    """Each stage of build() timed on its own, plus the render/encode floor on the same texts."""
    from datasets import load_from_disk
    from qctrain import data
    from transformers.utils.chat_template_utils import render_jinja_template

    tokenizer = tokenizer_of(args.model)
    cfg = section(Path(args.data), args.max_seq_length)
    times: dict[str, float] = {}

    def timed(name, fn):
        start = time.perf_counter()
        value = fn()
        times[name] = time.perf_counter() - start
        return value

    template = timed("template", lambda: data.training_template(
        data.resolve_chat_template(cfg.chat_template, tokenizer), tokenizer, cfg.loss_on))
    timed("fingerprint", lambda: data.data_fingerprint(cfg, tokenizer, template))
    conversations, _ = timed("read+normalise", lambda: data.load_conversations(cfg.sources, cfg.on_bad_record))
    conversations, ids, _ = timed("dedup", lambda: data.dedup(conversations))
    eval_ids = timed("split", lambda: data.split_ids(ids, cfg.seed, cfg.eval.fraction, None))
    train = [m for m, cid in zip(conversations, ids, strict=True) if cid not in eval_ids]
    workers = data.prep_workers(len(train))
    tokens = timed("tokenize", lambda: data.tokenize_flat(train, tokenizer, template, cfg.loss_on))
    tokens, _ = timed("fit_length", lambda: data.fit_length_flat(tokens, cfg.max_seq_length, cfg.on_overlong))
    timed("token_stats", lambda: data.token_stats_flat(tokens))
    dataset = timed("pack (arrow+shuffle+bfd)",
                    lambda: data.to_dataset_flat(tokens, True, cfg.max_seq_length, cfg.seed))
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        timed("save_to_disk", lambda: dataset.save_to_disk(tmp + "/train"))
        timed("load_from_disk", lambda: load_from_disk(tmp + "/train"))

    # The floor: one process, the same conversations, nothing but the jinja render and the Rust encode.
    sample = train[:args.floor_records]
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    start = time.perf_counter()
    texts, _ = render_jinja_template(conversations=sample, chat_template=template,
                                     return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
    render_s = time.perf_counter() - start
    backend = tokenizer.backend_tokenizer
    start = time.perf_counter()
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    encode_s = time.perf_counter() - start
    sample_tokens = sum(map(len, encodings))
    start = time.perf_counter()
    data.tokenize_flat(sample, tokenizer, template, cfg.loss_on, workers=1)
    ours_1proc_s = time.perf_counter() - start
    return {"stages": times, "train_records": len(train), "workers": workers, "tokens": int(tokens.bounds[-1]),
            "floor": {"records": len(sample), "tokens": sample_tokens, "render_s": render_s,
                      "encode_s": encode_s, "tokenize_flat_1proc_s": ours_1proc_s}}


def baseline_rev() -> str:
    """The commit before the one that brought the fast path into data.py (HEAD if it is not committed)."""
    import subprocess

    out = subprocess.run(["git", "log", "--format=%h", "-S", "def tokenize_flat", "--",
                          "entrypoint/qctrain/data.py"], cwd=common.ROOT, capture_output=True, text=True)
    commits = out.stdout.split()
    return f"{commits[-1]}~1" if out.returncode == 0 and commits else "HEAD"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--baseline-records", type=int, default=20_000,
                        help="records for the before-the-fast-path run (0: skip it)")
    parser.add_argument("--baseline-rev", default=None, help="git revision whose data.py is the baseline")
    parser.add_argument("--floor-records", type=int, default=10_000)
    parser.add_argument("--no-stages", action="store_true", help="skip the per-stage breakdown")
    parser.add_argument("--model", default=None, help="tiny model folder (default: models/tiny-phi3)")
    parser.add_argument("--results", default=None, help="RESULTS.md to append to ('-': none)")
    parser.add_argument("--child", choices=["first", "cached", "stages", "baseline"], help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.child:
        import datasets

        datasets.disable_progress_bars()
        handler = {"first": child_run, "cached": child_run, "stages": child_stages, "baseline": child_baseline}
        print(json.dumps(handler[args.child](args)))
        return 0

    model = str(common.tiny_model(args.model))
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="qctrain-bench-prep-") as tmp:
        tmp = Path(tmp)
        start = time.perf_counter()
        data_file = common.write_alpaca(tmp / "alpaca.json", args.records)
        print(f"generated {args.records:,} records ({data_file.stat().st_size / 2**20:.0f} MiB) "
              f"in {time.perf_counter() - start:.1f}s", flush=True)
        base = ["--model", model, "--max-seq-length", str(args.max_seq_length)]
        child = [*base, "--data", str(data_file), "--out", str(tmp / "out")]
        first = common.run_child(HERE, [*child, "--child", "first"])
        cached = common.run_child(HERE, [*child, "--child", "cached"])
        assert cached["cached"], "the second run did not hit the cache"
        rows.append(row("fast path, first run", first))
        rows.append(row("fast path, cached re-run", cached))
        if args.baseline_records:
            rev = args.baseline_rev or baseline_rev()
            subset = common.write_alpaca(tmp / "subset.json", args.baseline_records)
            try:
                baseline = common.run_child(HERE, [*base, "--data", str(subset), "--out", str(tmp / "base"),
                                                   "--child", "baseline", "--baseline-rev", rev])
                rows.append(row(f"before ({rev}), first run", baseline))
                same = common.run_child(HERE, [*base, "--data", str(subset), "--out", str(tmp / "same"),
                                               "--child", "first"])
                rows.append(row("fast path, same subset", same))
            except RuntimeError as err:
                notes.append(f"baseline run skipped: {str(err).splitlines()[0]}")
        if not args.no_stages:
            stages = common.run_child(HERE, [*child, "--child", "stages", "--floor-records",
                                             str(args.floor_records)])
            notes.append(stage_notes(stages))
    ratio = cached["seconds"] / first["seconds"]
    notes.insert(0, f"Generated Alpaca data ({args.records:,} records: log-normal lengths, 60% empty inputs, "
                    f"5% system, 5% multi-turn, 15% Chinese, 2% duplicates), tiny Phi-3 tokenizer, "
                    f"max_seq_length {args.max_seq_length}, eval 5%, packing on. "
                    f"Cached re-run = {ratio:.1%} of the first (target <= 5%); first run "
                    f"{first['records'] / first['seconds']:,.0f} records/s (target >= 10,000).")
    common.record("prep", rows, "\n\n".join(notes), None if args.results is None else Path(args.results))
    return 0


def row(name: str, result: dict) -> dict:
    return {"run": name, "records": result["records"], "seconds": round(result["seconds"], 2),
            "records/s": result["records"] / result["seconds"], "tokens/s": result["tokens"] / result["seconds"],
            "tokens/record": result["tokens"] / result["records"],
            "peak RSS MiB (main/worker)": f"{result['peak_rss_mib']:.0f}/{result['peak_rss_children_mib']:.0f}"}


def stage_notes(stages: dict) -> str:
    total = sum(stages["stages"].values())
    parts = [f"{name} {seconds:.2f}s ({seconds / total:.0%})" for name, seconds in stages["stages"].items()]
    floor = stages["floor"]
    render = floor["records"] / floor["render_s"]
    encode = floor["tokens"] / floor["encode_s"]
    ours = floor["records"] / floor["tokenize_flat_1proc_s"]
    return (f"Stages ({stages['train_records']:,} train records, {stages['workers']} tokenize worker(s)): "
            + ", ".join(parts) + ".\n\n"
            f"Floor, one process, {floor['records']:,} records: jinja render alone {render:,.0f} records/s; "
            f"Rust encode_batch alone {encode:,.0f} tokens/s = "
            f"{encode / (floor['tokens'] / floor['records']):,.0f} records/s "
            f"({floor['tokens'] / floor['records']:.0f} tokens/record); our whole tokenize (render + encode + "
            f"mask) on one process {ours:,.0f} records/s.")


if __name__ == "__main__":
    sys.exit(main())
