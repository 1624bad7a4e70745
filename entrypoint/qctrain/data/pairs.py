"""Preference data, prepared (method dpo and kto): records -> canonical rows (preference.py) -> token ids exactly as
TRL's DPOTrainer / KTOTrainer tokenize them -> checked, deduplicated, split, fitted to data.max_seq_length -> Arrow
files the trainers take as they are (their own tokenizing is skipped: preference_trainer.py).

Tokens, as TRL 1.16 makes them (DPOTrainer._prepare_dataset): the prompt rendered with the generation prompt, the
prompt followed by each completion rendered without it, and the completion starting where the prompt stops agreeing
with either (TRL's common_prefix_length; where it stops early, the prompt's end merged with the completion: counted
as `boundary_merged`). The template is the chat template the adapter carries (extended for tools and reasoning
where the model's has no place for them), rendered by the fast path of tokens.py; `reference_ids` is the same with
apply_chat_template, the definition tests hold the fast path and TRL's own processing to.

Streaming as for SFT data (stage.py): forked workers normalise and tokenise a chunk of records at a time, the ids go
to a flat file, and dedup, the split and the length fit work on a few numbers per row. Counts are in rows (pairs
for dpo; labelled completions for kto, where a paired record read counts as two): read = kept + bad + duplicates +
overlong (+ unsupervised: a completion with no token left).
"""

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from qctrain.data import stage, workers
from qctrain.data.formats import BadRecord
from qctrain.data.pack import KEPT, OVERLONG, TRUNCATED, UNSUPERVISED
from qctrain.data.preference import row_digest, row_turn_counts, to_preference_rows
from qctrain.data.sources import Record
from qctrain.data.template import Rendering
from qctrain.data.tokens import Tokenized, _render_all, encode_texts, rust_backend
from qctrain.errors import InputError
from qctrain.recipe import DataSection, DataSource

COMPLETIONS = {"dpo": ("chosen", "rejected"), "kto": ("completion",)}  # the completions of a row, per method
ID_COLUMNS = {"dpo": ("prompt_ids", "chosen_ids", "rejected_ids"), "kto": ("prompt_ids", "completion_ids")}


# --- tokenizing, as TRL does ---

def _strip(messages: list[dict], keep_reasoning: bool) -> list[dict]:
    if keep_reasoning or not any("reasoning_content" in m for m in messages):
        return messages
    return [{k: v for k, v in m.items() if k != "reasoning_content"} for m in messages]


def render_rows(rows: list[dict], method: str, template: str, special_tokens: dict,
                keep_reasoning: bool = True) -> list[str]:
    """Per row: its prompt with the generation prompt, then the prompt followed by each completion (the texts TRL's
    _prepare_dataset tokenizes), in that order, row after row."""
    sides = COMPLETIONS[method]
    prompts = [_strip(row["prompt"], keep_reasoning) for row in rows]
    tools = [row["tools"] or None for row in rows]
    fulls = [[*prompt, *_strip(row[side], keep_reasoning)] for prompt, row in zip(prompts, rows, strict=True)
             for side in sides]
    prompt_texts, _ = _render_all(prompts, tools, template, False, special_tokens, add_generation_prompt=True)
    full_texts, _ = _render_all(fulls, [t for t in tools for _ in sides], template, False, special_tokens)
    k = len(sides)
    return [text for i, prompt in enumerate(prompt_texts) for text in (prompt, *full_texts[i * k:(i + 1) * k])]


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


@dataclass
class PairTokens:
    """Rows tokenized: each row's prompt ids then each completion's ids, flat; parts[i] holds the lengths (prompt,
    chosen, rejected) for dpo, (prompt, completion) for kto; merged[i]: the prompt's last tokens merged into the
    completion (TRL's common-prefix rule cut the prompt short)."""

    ids: np.ndarray  # int32
    parts: np.ndarray  # int64, [rows, 1 + completions]
    merged: np.ndarray  # bool

    @property
    def bounds(self) -> np.ndarray:
        bounds = np.zeros(len(self.parts) + 1, dtype=np.int64)
        np.cumsum(self.parts.sum(axis=1), out=bounds[1:])
        return bounds

    def row(self, i: int) -> dict[str, list[int]]:
        """Row i as lists: {"prompt_ids", "chosen_ids", "rejected_ids"} (dpo) or {"prompt_ids", "completion_ids"}."""
        at, out = int(self.bounds[i]), {}
        names = ID_COLUMNS["dpo" if self.parts.shape[1] == 3 else "kto"]
        for name, length in zip(names, self.parts[i].tolist(), strict=True):
            out[name] = self.ids[at:at + length].tolist()
            at += length
        return out


def split_rows(ids: np.ndarray, bounds: np.ndarray, k: int) -> PairTokens:
    """From the texts' ids (per row: prompt, then its k prompt+completion texts), TRL's split: the prompt is cut
    where it stops agreeing with any of the k, each completion is the rest of its text."""
    rows = (len(bounds) - 1) // (k + 1)
    pieces, parts, merged = [], np.zeros((rows, k + 1), dtype=np.int64), np.zeros(rows, dtype=bool)
    for r in range(rows):
        base = r * (k + 1)
        prompt = ids[bounds[base]:bounds[base + 1]]
        fulls = [ids[bounds[base + 1 + j]:bounds[base + 2 + j]] for j in range(k)]
        cut = min(common_prefix(prompt, full) for full in fulls)
        merged[r] = cut < len(prompt)
        pieces.append(prompt[:cut])
        parts[r, 0] = cut
        for j, full in enumerate(fulls):
            pieces.append(full[cut:])
            parts[r, j + 1] = len(full) - cut
    return PairTokens(np.concatenate(pieces).astype(np.int32) if pieces else np.zeros(0, np.int32), parts, merged)


def encode_rows(rows: list[dict], method: str, tokenizer, backend, template: str,
                keep_reasoning: bool = True) -> PairTokens:
    """The rows' token ids as TRL's trainer would make them with this template (the fast path)."""
    if backend is None:
        return reference_tokens(rows, method, tokenizer, template, keep_reasoning)
    texts = render_rows(rows, method, template, tokenizer.special_tokens_map, keep_reasoning)
    ids, bounds = encode_texts(texts, backend)
    return split_rows(ids, bounds, len(COMPLETIONS[method]))


def reference_ids(row: dict, method: str, tokenizer, template: str, keep_reasoning: bool = True) -> dict[str, list]:
    """One row's ids the plain-library way (apply_chat_template, as TRL's _prepare_dataset calls it): what the fast
    path must give, and the path for tokenizers without a Rust backend."""
    def render(messages: list[dict], generation: bool) -> list[int]:
        return tokenizer.apply_chat_template(_strip(messages, keep_reasoning), tools=row["tools"] or None,
                                             chat_template=template, tokenize=True, return_dict=True,
                                             add_generation_prompt=generation)["input_ids"]

    prompt = np.array(render(row["prompt"], True), dtype=np.int32)
    fulls = [np.array(render([*row["prompt"], *row[side]], False), dtype=np.int32) for side in COMPLETIONS[method]]
    cut = min(common_prefix(prompt, full) for full in fulls)
    names = ID_COLUMNS[method]
    return {names[0]: prompt[:cut].tolist(), **{name: full[cut:].tolist()
                                                for name, full in zip(names[1:], fulls, strict=True)}}


def reference_tokens(rows: list[dict], method: str, tokenizer, template: str, keep_reasoning: bool = True
                     ) -> PairTokens:
    texts_ids = []
    for row in rows:
        got = reference_ids(row, method, tokenizer, template, keep_reasoning)
        texts_ids.append([got[name] for name in ID_COLUMNS[method]])
    parts = np.array([[len(p) for p in row] for row in texts_ids], dtype=np.int64).reshape(len(rows), -1)
    flat = [t for row in texts_ids for part in row for t in part]
    merged = np.zeros(len(rows), dtype=bool)  # the reference does not tell; the fast path's count is the one reported
    return PairTokens(np.array(flat, dtype=np.int32), parts if len(rows) else
                      np.zeros((0, 1 + len(COMPLETIONS[method])), np.int64), merged)


# --- the scan: records -> (forked workers) rows, digests, tokens ---

@dataclass
class PairJob:
    """What the scan needs; forked workers inherit it (data.workers.job())."""

    sources: list[DataSource]
    method: str
    tokenizer: Any
    backend: Any
    template: str
    on_bad: str
    keep_reasoning: bool
    split_seed: int | None


@dataclass
class PairChunk:
    source: int
    read: int  # rows read (a bad record: one)
    bad: list[tuple[str, str]]
    tokens: PairTokens
    digests: np.ndarray
    ranks: np.ndarray
    labels: np.ndarray  # kto: each row's label; dpo: empty
    unread: dict[str, int]
    turns: tuple[int, int, int]


def scan_pair_chunk(job: PairJob, task: tuple[int, list[Record]]) -> PairChunk:
    index, records = task
    src = job.sources[index]
    rows, bad, read = [], [], 0
    unread: dict[str, int] | None = None if job.on_bad == "error" else {}
    ignore = frozenset(src.ignore_keys)
    for record in records:
        try:
            got = to_preference_rows(record, src.format, job.method, src.columns, ignore, unread)
        except BadRecord as err:
            bad.append((err.reason, str(err)))
            read += 1
            if job.on_bad == "error":
                break
            continue
        rows += got
        read += len(got)
    tokens = encode_rows(rows, job.method, job.tokenizer, job.backend, job.template, job.keep_reasoning)
    digests = np.fromiter(map(row_digest, rows), dtype=np.uint64, count=len(rows))
    ranks = stage.split_ranks(digests, job.split_seed) if job.split_seed is not None else np.zeros(0, np.uint64)
    labels = np.array([row["label"] for row in rows], dtype=bool) if job.method == "kto" else np.zeros(0, bool)
    return PairChunk(index, read, bad, tokens, digests, ranks, labels, unread or {}, row_turn_counts(rows))


@dataclass
class ScannedRows:
    """The good rows of some sources, in read order."""

    source: np.ndarray  # int32
    digests: np.ndarray  # uint64
    parts: np.ndarray  # int64 [rows, 1 + completions]
    starts: np.ndarray  # int64: where each row's ids start in the store
    ranks: np.ndarray  # uint64 or empty
    merged: np.ndarray  # bool
    labels: np.ndarray  # bool (kto) or empty


def scan_rows(job: PairJob, indices: range, keys: list[str], counts: dict[str, dict], store: stage.TokenStore,
              progress: stage.Progress) -> ScannedRows:
    """stage.scan for preference rows: read, normalise, tokenise, count; the ids go to the store."""
    width = 1 + len(COMPLETIONS[job.method])
    columns: list[list[np.ndarray]] = [[] for _ in range(7)]
    for chunk, local in stage.counted_chunks(job, indices, keys, counts, progress, scan_pair_chunk):
        tok = chunk.tokens
        bounds = tok.bounds
        first = store.append(Tokenized(tok.ids, tok.ids, bounds))
        rows = len(tok.parts)
        for column, part in zip(columns, (np.full(rows, local, dtype=np.int32), chunk.digests,
                                          tok.parts.reshape(rows, width), first + bounds[:-1], chunk.ranks,
                                          tok.merged, chunk.labels), strict=True):
            column.append(part)
    dtypes = (np.int32, np.uint64, np.int64, np.int64, np.uint64, bool, bool)
    joined = [np.concatenate(column) if column else np.zeros(0, dtype) for column, dtype in
              zip(columns, dtypes, strict=True)]
    joined[2] = joined[2].reshape(-1, width)
    return ScannedRows(*joined)


# --- the length fit ---

def fit_rows(parts: np.ndarray, max_len: int, policy: str) -> tuple[np.ndarray, np.ndarray]:
    """Per row: how many tokens to cut from the left of its prompt (the same for every completion), and its outcome
    (KEPT, TRUNCATED, OVERLONG, UNSUPERVISED). A row fits when its prompt and its longest completion fit;
    `truncate` cuts the prompt from the left, and drops the row when the prompt would be left empty."""
    prompt, longest = parts[:, 0], parts[:, 1:].max(axis=1) if len(parts) else np.zeros(0, np.int64)
    excess = np.maximum(prompt + longest - max_len, 0)
    overlong = excess > 0
    cuttable = overlong & (prompt - excess >= 1) & (policy == "truncate")
    unsupervised = (parts[:, 1:] == 0).any(axis=1) if len(parts) else np.zeros(0, bool)
    outcomes = np.select([unsupervised, overlong & ~cuttable, cuttable], [UNSUPERVISED, OVERLONG,
                                                                          TRUNCATED], KEPT)
    return np.where(cuttable, excess, 0), outcomes


# --- writing ---

def write_rows(store: stage.TokenStore, starts: np.ndarray, parts: np.ndarray, cut: np.ndarray,
               labels: np.ndarray | None, method: str, path: Path) -> int:
    """The rows as an Arrow file (prompt_ids and each completion's ids, list<int32>; kto: label), a batch of about
    stage.ROW_BATCH_TOKENS tokens at a time. Returns the number of rows."""
    names = ID_COLUMNS[method]
    fields = [(name, pa.list_(pa.int32())) for name in names] + ([("label", pa.bool_())] if method == "kto" else [])
    schema = pa.schema(fields)
    sizes = parts.sum(axis=1) - cut
    row_tokens = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum(sizes, out=row_tokens[1:])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        lo = 0
        while lo < len(parts):
            end = int(np.searchsorted(row_tokens, row_tokens[lo] + stage.ROW_BATCH_TOKENS, side="right")) - 1
            hi = min(max(lo + 1, end), len(parts))
            columns = []
            offset = starts[lo:hi] + cut[lo:hi]  # the prompt, less what was cut from its left
            for j in range(parts.shape[1]):
                lengths = parts[lo:hi, j] - (cut[lo:hi] if j == 0 else 0)
                ids, _ = store.gather(offset, lengths)
                bounds = np.zeros(hi - lo + 1, dtype=np.int32)
                np.cumsum(lengths, out=bounds[1:])
                columns.append(pa.ListArray.from_arrays(pa.array(bounds), pa.array(ids)))
                offset = (starts[lo:hi] + parts[lo:hi, :j + 1].sum(axis=1))
            if method == "kto":
                columns.append(pa.array(labels[lo:hi]))
            writer.write_batch(pa.record_batch(columns, schema=schema))
            lo = hi
    return len(parts)


def _length_stats(lengths: np.ndarray) -> dict[str, int]:
    if not len(lengths):
        return {"p50": 0, "p95": 0, "max": 0}
    ordered = np.sort(lengths)
    return {"p50": int(ordered[len(ordered) // 2]), "p95": int(ordered[min(len(ordered) - 1,
                                                                           int(len(ordered) * 0.95))]),
            "max": int(ordered[-1])}


def _sample(store: stage.TokenStore, start: int, parts: np.ndarray, cut: int, method: str, tokenizer) -> str:
    """One row decoded: the prompt, then each completion between ⟦ ⟧ (what is scored)."""
    ids, _ = store.gather(np.array([start]), np.array([int(parts.sum())]))
    ids = ids.tolist()
    prompt = tokenizer.decode(ids[cut:parts[0]])
    at, lines = int(parts[0]), []
    for name, length in zip(COMPLETIONS[method], parts[1:].tolist(), strict=True):
        lines.append(f"{name}: {prompt}⟦{tokenizer.decode(ids[at:at + length])}⟧")
        at += length
    return "\n".join(lines)


def row_prompts(job: PairJob, src: DataSource, record: Record) -> list[list[dict] | dict]:
    """The prompts of a record's rows (stage.heldout_prompts reads them for the card's samples)."""
    rows = to_preference_rows(record, src.format, job.method, src.columns, unread={})
    return [{"messages": _strip(row["prompt"], job.keep_reasoning), "tools": row["tools"]} if row["tools"]
            else _strip(row["prompt"], job.keep_reasoning) for row in rows]


# --- the stage ---

def build_rows(cfg: DataSection, method: str, tokenizer, template: str, work: Path,
               how: Rendering) -> tuple[dict, dict]:
    """Everything that is cached, for method dpo or kto: writes work/train-*.arrow (and eval); returns the report
    and the recorded split (stage.build's counterpart: the same scan, dedup and split)."""
    eval_sources = list(cfg.eval.sources) if cfg.eval and cfg.eval.sources else []
    split_seed = cfg.seed if cfg.eval and not cfg.eval.sources and (cfg.eval.fraction or cfg.eval.count) else None
    job = PairJob([*cfg.sources, *eval_sources], method, tokenizer, rust_backend(tokenizer), template,
                  cfg.on_bad_record, cfg.reasoning != "drop", split_seed)
    store = stage.TokenStore(work / "tokens")
    try:
        with workers.forking():
            counts: dict[str, dict] = {}
            parts, split = stage.scan_and_split(job, cfg, store, counts, scan_rows)
            eval_part = parts["eval"]
            report: dict[str, Any] = {"method": method, "sources": counts, "records_read": 0, "duplicates": 0,
                                      "tools_rendered_by": how.tools,
                                      "heldout_prompts": stage.heldout_prompts(job, eval_part.indices,
                                                                               eval_part.records[:3], row_prompts)}
            for name, part in parts.items():
                if len(part.records):
                    _write_part(name, part, cfg, job, store, tokenizer, work, counts, report)
    finally:
        store.close()
    report = stage.report_totals(report, counts, cfg, how)
    if method == "kto":
        report["kto"] = kto_balance(int(report["train"]["desirable"]), int(report["train"]["undesirable"]))
    return report, split


def _write_part(name: str, part: stage.Part, cfg: DataSection, job: PairJob, store: stage.TokenStore, tokenizer,
                work: Path, counts: dict[str, dict], report: dict[str, Any]) -> None:
    """Fit the part's rows to max_seq_length, count what became of them and write them; report[name]: their
    statistics (and, for train, report["sample"])."""
    scanned, method = part.scanned, job.method
    cut, outcomes = fit_rows(scanned.parts[part.records], cfg.max_seq_length, cfg.on_overlong)
    source = scanned.source[part.records]
    kept_here = (outcomes == KEPT) | (outcomes == TRUNCATED)
    for key, chosen in ((name, kept_here), ("kept", kept_here), ("truncated", outcomes == TRUNCATED),
                        ("overlong", outcomes == OVERLONG), ("unsupervised", outcomes == UNSUPERVISED)):
        stage.per_source(part.keys, source[chosen], counts, key)
    rows = part.records[kept_here]
    if name == "train" and not len(rows):
        raise InputError(f"data: no training row left after the length fit ({int((outcomes == OVERLONG).sum())} "
                         f"longer than data.max_seq_length={cfg.max_seq_length}); raise max_seq_length or set "
                         "data.on_overlong: truncate")
    if name == "train" and method == "kto":  # KTO samples in order (its KL term pairs batch neighbours): shuffled once
        rows = rows[np.random.default_rng(cfg.seed).permutation(len(rows))]
    cut_of = np.zeros(len(scanned.parts), dtype=np.int64)
    cut_of[part.records] = cut
    row_cut = cut_of[rows]
    row_parts = scanned.parts[rows].copy()
    row_parts[:, 0] -= row_cut
    labels = scanned.labels[rows] if method == "kto" else None
    report[name] = _part_report(method, row_parts, scanned.merged[rows], outcomes, labels)
    if name == "train":
        report["sample"] = _sample(store, int(scanned.starts[rows[0]]), scanned.parts[rows[0]], int(row_cut[0]),
                                   method, tokenizer)
    report[name]["sequences"] = write_rows(store, scanned.starts[rows], scanned.parts[rows], row_cut, labels,
                                           method, work / f"{name}-00000-of-00001.arrow")


def _part_report(method: str, parts: np.ndarray, merged: np.ndarray, outcomes: np.ndarray,
                 labels: np.ndarray | None) -> dict[str, Any]:
    """What the report says of the train (or eval) rows kept: their number, tokens as the trainer sees them (the
    prompt once per completion), lengths, and the fit's counts."""
    completions = parts[:, 1:]
    tokens = int(parts[:, 0].sum()) * completions.shape[1] + int(completions.sum())
    report: dict[str, Any] = {
        "rows": len(parts), "records": len(parts), "tokens": tokens, "supervised_tokens": int(completions.sum()),
        "supervised_fraction": round(int(completions.sum()) / tokens, 4) if tokens else 0.0,
        "prompt_length": _length_stats(parts[:, 0]),
        **{f"{name}_length": _length_stats(completions[:, j]) for j, name in enumerate(COMPLETIONS[method])},
        "boundary_merged": int(merged.sum()),
        "overlong_dropped": int((outcomes == OVERLONG).sum()),
        "overlong_truncated": int((outcomes == TRUNCATED).sum()),
        "unsupervised_dropped": int((outcomes == UNSUPERVISED).sum()),
    }
    if labels is not None:
        report.update(desirable=int(labels.sum()), undesirable=int((~labels).sum()))
    return report


def kto_balance(desirable: int, undesirable: int, desirable_weight: float = 1.0,
                undesirable_weight: float = 1.0) -> dict[str, Any]:
    """KTO's counts and, when they differ, the weight ranges its paper recommends (TRL's KTOTrainer logs them as a
    warning; Eq. (8) of arXiv:2402.01306): set train.desirable_weight in the first or train.undesirable_weight in
    the second (not both)."""
    balance: dict[str, Any] = {"desirable": desirable, "undesirable": undesirable}
    d, u = max(desirable, 1), max(undesirable, 1)
    if d != u:
        balance["desirable_weight_range"] = [round(u * undesirable_weight / d, 2),
                                             round(u * undesirable_weight / d * 1.33, 2)]
        balance["undesirable_weight_range"] = [round(d * desirable_weight / u / 1.33, 2),
                                               round(d * desirable_weight / u, 2)]
    return balance
