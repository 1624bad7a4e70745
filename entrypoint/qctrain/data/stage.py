"""The data stage: sources -> conversations -> dedup -> split -> tokens, labels -> packs, cached under
`<output.dir>/prepared/<fingerprint>/`, keyed by the data content, the tokenizer, the chat template and every
setting that changes the result."""

import dataclasses
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qctrain.atomic import write_json_atomic
from qctrain.errors import InputError
from qctrain.recipe import DataSection, DataSource, canonical_json, output_data_overlap

if TYPE_CHECKING:
    from datasets import Dataset

from qctrain.data.formats import BadRecord, conversation_id, to_conversation
from qctrain.data.pack import (
    KEPT,
    OVERLONG,
    TRUNCATED,
    UNSUPERVISED,
    fit_length_outcomes,
    render_marked,
    to_dataset_flat,
    token_stats_flat,
)
from qctrain.data.sources import read_source, source_fingerprint
from qctrain.data.template import resolve_chat_template, template_inputs, template_renders_tools, training_template
from qctrain.data.tokens import tokenize_flat

PREP_VERSION = "3"  # bump when the preparation logic changes what it writes

@dataclass
class PreparedData:
    train: "Dataset"  # datasets is imported where used: preflight imports this module
    eval: "Dataset | None"
    report: dict[str, Any]
    fingerprint: str
    dir: Path
    cached: bool

@dataclass
class SourceCounts:
    """What became of one source's records: read = kept + bad + duplicates + overlong + unsupervised."""

    read: int = 0
    bad: int = 0
    kept: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)


def load_sources(sources: list[DataSource], on_bad: str) -> tuple[list[dict], list[int], dict[str, SourceCounts]]:
    """The conversations of every source, the index of the source each came from, and per-source counts."""
    conversations: list[dict] = []
    origins: list[int] = []
    counts: dict[str, SourceCounts] = {}
    for index, src in enumerate(sources):
        tally = counts.setdefault(src.path, SourceCounts())
        for record in read_source(src):
            tally.read += 1
            try:
                conversations.append(to_conversation(record, src.format, src.columns))
                origins.append(index)
                tally.kept += 1
            except BadRecord as err:
                if on_bad == "error":
                    raise InputError(f"{err} (set data.on_bad_record: skip to skip such records)") from None
                tally.bad += 1
                tally.by_reason[err.reason] = tally.by_reason.get(err.reason, 0) + 1
                if len(tally.examples) < 5:
                    tally.examples.append(str(err))
    return conversations, origins, counts


def load_conversations(sources: list[DataSource], on_bad: str) -> tuple[list[dict], dict[str, Any]]:
    conversations, _, counts = load_sources(sources, on_bad)
    return conversations, {path: dataclasses.asdict(tally) for path, tally in counts.items()}


# --- dedup and split ---

def unique_indices(ids: list[str]) -> list[int]:
    """Positions of the first occurrence of each id."""
    seen: set[str] = set()
    first = []
    for index, cid in enumerate(ids):
        if cid not in seen:
            seen.add(cid)
            first.append(index)
    return first


def dedup(conversations: list) -> tuple[list, list[str], int]:
    ids = [conversation_id(c) for c in conversations]
    keep = unique_indices(ids)
    return [conversations[i] for i in keep], [ids[i] for i in keep], len(conversations) - len(keep)


def split_ids(ids: list[str], seed: int, fraction: float | None, count: int | None) -> set[str]:
    """Eval ids: the records whose seeded hash ranks lowest. Independent of input order."""
    n_eval = count if count is not None else max(1, round(len(ids) * fraction)) if fraction else 0
    if n_eval >= len(ids):
        raise InputError(f"data.eval: {n_eval} eval records would leave none of {len(ids)} for training")
    ranked = sorted(ids, key=lambda cid: hashlib.blake2b(f"{seed}:{cid}".encode(), digest_size=8).digest())
    return set(ranked[:n_eval])

# --- the stage ---

def tokenizer_fingerprint(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else canonical_json(tokenizer.get_vocab())
    return hashlib.sha256(text.encode()).hexdigest()


def data_fingerprint(cfg: DataSection, tokenizer, template: str) -> str:
    settings = cfg.model_dump(mode="json", exclude={"sources"})
    eval_sources = [source_fingerprint(s) for s in (cfg.eval.sources if cfg.eval else [])]
    parts = {
        "version": PREP_VERSION,
        "sources": [source_fingerprint(s) for s in cfg.sources],
        "eval_sources": eval_sources,
        "settings": settings,
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "template": hashlib.sha256(template.encode()).hexdigest(),
    }
    return hashlib.sha256(canonical_json(parts).encode()).hexdigest()


COUNT_KEYS = ("read", "kept", "bad", "duplicates", "overlong", "unsupervised")  # read = the sum of the others


def _source_counts(tally: SourceCounts) -> dict[str, Any]:
    return {"read": tally.read, "kept": 0, "bad": tally.bad, "duplicates": 0, "overlong": 0, "unsupervised": 0,
            "train": 0, "eval": 0, "truncated": 0, "bad_by_reason": dict(sorted(tally.by_reason.items())),
            "examples": tally.examples}


def _load_split(sources: list[DataSource], cfg: DataSection, prefix: str
                ) -> tuple[list[dict], list[str], list[str], int, dict[str, dict]]:
    """Conversations (deduplicated when data.dedup), their ids, the report key of the source each came from,
    the number read from all sources, and per-source counts."""
    conversations, origins, tallies = load_sources(sources, cfg.on_bad_record)
    counts = {prefix + path: _source_counts(tally) for path, tally in tallies.items()}
    keys = [prefix + sources[i].path for i in origins]
    ids = [conversation_id(c) for c in conversations]
    if cfg.dedup:
        keep = unique_indices(ids)
        kept = set(keep)
        for index, key in enumerate(keys):
            if index not in kept:
                counts[key]["duplicates"] += 1
        conversations, ids, keys = ([values[i] for i in keep] for values in (conversations, ids, keys))
    return conversations, ids, keys, sum(c["read"] for c in counts.values()), counts


def _count_outcomes(counts: dict[str, dict], keys: list[str], outcomes: np.ndarray, split: str) -> None:
    names = {KEPT: split, TRUNCATED: split, OVERLONG: "overlong", UNSUPERVISED: "unsupervised"}
    for key, outcome in zip(keys, outcomes.tolist(), strict=True):
        counts[key][names[outcome]] += 1
        counts[key]["kept"] += outcome in (KEPT, TRUNCATED)
        counts[key]["truncated"] += outcome == TRUNCATED


def count_totals(per_source: dict[str, dict]) -> dict[str, Any]:
    """All sources together; read = kept + bad + duplicates + overlong + unsupervised, kept = train + eval."""
    totals: dict[str, Any] = {k: sum(s[k] for s in per_source.values())
                              for k in (*COUNT_KEYS, "train", "eval", "truncated")}
    reasons: dict[str, int] = {}
    for counts in per_source.values():
        for reason, n in counts["bad_by_reason"].items():
            reasons[reason] = reasons.get(reason, 0) + n
    totals["bad_by_reason"] = dict(sorted(reasons.items()))
    return totals


def build(cfg: DataSection, tokenizer, template: str) -> tuple["Dataset", "Dataset | None", dict, dict]:
    """Everything that is cached: returns train, eval, report and the recorded split."""
    conversations, ids, keys, read, per_source = _load_split(cfg.sources, cfg, "")
    duplicates = sum(c["duplicates"] for c in per_source.values())
    if not conversations:
        bad = sum(s["bad"] for s in per_source.values())
        examples = [e for s in per_source.values() for e in s["examples"]]
        raise InputError(f"data: no usable records ({read} read, {bad} bad and skipped, {duplicates} duplicates); "
                         f"sources: {', '.join(s.path for s in cfg.sources)}"
                         + (f"; first bad record: {examples[0]}" if examples else ""))

    split: dict[str, Any] = {"seed": cfg.seed}
    eval_cfg = cfg.eval
    parts: dict[str, tuple[list[dict], list[str]]]
    if eval_cfg and eval_cfg.sources:
        eval_conversations, _, eval_keys, _, eval_counts = _load_split(eval_cfg.sources, cfg, "eval:")
        per_source.update(eval_counts)
        parts = {"train": (conversations, keys), "eval": (eval_conversations, eval_keys)}
        split.update(method="sources", eval_sources=[s.path for s in eval_cfg.sources])
    elif eval_cfg and (eval_cfg.fraction or eval_cfg.count):
        try:
            eval_ids = split_ids(ids, cfg.seed, eval_cfg.fraction, eval_cfg.count)
        except InputError as err:
            raise InputError(f"{err} ({read} records read, {duplicates} duplicates removed)") from None
        in_eval = [cid in eval_ids for cid in ids]
        parts = {name: ([c for c, e in zip(conversations, in_eval, strict=True) if e == wanted],
                        [k for k, e in zip(keys, in_eval, strict=True) if e == wanted])
                 for name, wanted in (("train", False), ("eval", True))}
        split.update(method="fraction" if eval_cfg.fraction else "count",
                     fraction=eval_cfg.fraction, count=eval_cfg.count,
                     eval_ids=[cid for cid in ids if cid in eval_ids])
    else:
        parts = {"train": (conversations, keys), "eval": ([], [])}
        split.update(method="none")

    native_tools = template_renders_tools(template)
    report: dict[str, Any] = {"sources": per_source, "records_read": 0, "duplicates": 0,
                              "tools_rendered_by": "template" if native_tools else "fallback",
                              "heldout_prompts": [template_inputs([c], native_tools)[0][0][:-1]
                                                  for c in parts["eval"][0][:3]]}
    datasets: dict[str, Dataset | None] = {}
    for name, (convs, origin_keys) in parts.items():
        if not convs:
            datasets[name] = None
            continue
        tokens = tokenize_flat(convs, tokenizer, template, cfg.loss_on)
        tokens, fit_counts, outcomes = fit_length_outcomes(tokens, cfg.max_seq_length, cfg.on_overlong)
        _count_outcomes(per_source, origin_keys, outcomes, name)
        report[name] = {"conversations": len(convs), **fit_counts, **token_stats_flat(tokens)}
        if name == "train":
            if not len(tokens):
                raise InputError(
                    "data: no training record left after filtering "
                    f"({fit_counts['overlong_dropped']} longer than "
                    f"data.max_seq_length={cfg.max_seq_length}, {fit_counts['unsupervised_dropped']} with no "
                    "supervised token); raise max_seq_length or set data.on_overlong: truncate")
            report["sample"] = render_marked(*tokens.record(0), tokenizer)
        if not len(tokens):
            datasets[name] = None
            continue
        dataset = to_dataset_flat(tokens, cfg.packing, cfg.max_seq_length, cfg.seed)
        report[name]["sequences"] = len(dataset)
        if cfg.packing:
            report[name]["packing_efficiency"] = round(
                report[name]["tokens"] / (len(dataset) * cfg.max_seq_length), 4)
        datasets[name] = dataset
    if report["train"]["supervised_tokens"] == 0:
        raise InputError("data: no token is supervised; check data.loss_on and the chat template")
    report["counts"] = count_totals(per_source)
    report["records_read"], report["duplicates"] = report["counts"]["read"], report["counts"]["duplicates"]
    return datasets["train"], datasets["eval"], report, split


def prepare(cfg: DataSection, tokenizer, output_dir: Path, force: bool = False) -> PreparedData:
    from datasets import load_from_disk

    if problems := output_data_overlap(cfg, output_dir):
        raise InputError("\n".join(problems))
    template = training_template(resolve_chat_template(cfg.chat_template, tokenizer), tokenizer, cfg.loss_on)
    fingerprint = data_fingerprint(cfg, tokenizer, template)
    cache_root = output_dir / "prepared"
    target = cache_root / fingerprint[:16]
    if not force and (target / "report.json").is_file():
        report = json.loads((target / "report.json").read_text(encoding="utf-8"))
        eval_path = target / "eval"
        return PreparedData(load_from_disk(str(target / "train")),
                            load_from_disk(str(eval_path)) if eval_path.exists() else None,
                            report, fingerprint, target, cached=True)

    train, evaluation, report, split = build(cfg, tokenizer, template)
    report["fingerprint"] = fingerprint
    tmp = cache_root / f".tmp-{fingerprint[:16]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    train.save_to_disk(str(tmp / "train"))
    if evaluation is not None:
        evaluation.save_to_disk(str(tmp / "eval"))
    write_json_atomic(tmp / "split.json", split)
    write_json_atomic(tmp / "report.json", report)  # written last: its presence marks a complete cache
    shutil.rmtree(target, ignore_errors=True)
    os.replace(tmp, target)
    eval_path = target / "eval"
    return PreparedData(load_from_disk(str(target / "train")),
                        load_from_disk(str(eval_path)) if eval_path.exists() else None,
                        report, fingerprint, target, cached=False)
