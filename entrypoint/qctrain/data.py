"""Data stage: sources -> conversational `messages` -> dedup -> split -> template -> tokens, labels -> packs.

The prepared data sets are cached under `<output.dir>/prepared/<fingerprint>/`, keyed by the data
content, the tokenizer, the chat template and every setting that changes the result.
"""

import csv
import hashlib
import io
import json
import os
import shutil
import statistics
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from datasets import Dataset, load_from_disk

from qctrain.errors import InputError
from qctrain.recipe import DataSection, DataSource, canonical_json

PREP_VERSION = "1"  # bump when the preparation logic changes what it writes
FILE_TYPES = (".json", ".jsonl", ".csv", ".parquet")
ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                "model": "assistant", "system": "system"}
IGNORE = -100


class BadRecord(ValueError):
    """One record that cannot be used; `where` is file:line or file[index]."""

    def __init__(self, where: str, message: str):
        super().__init__(f"{where}: {message}")


@dataclass
class Record:
    where: str
    fields: dict[str, Any]


@dataclass
class PreparedData:
    train: Dataset
    eval: Dataset | None
    report: dict[str, Any]
    fingerprint: str
    dir: Path
    cached: bool


# --- reading sources ---

def is_hub_source(path: str) -> bool:
    return path.startswith("hub:")


def source_files(src: DataSource) -> list[Path]:
    path = Path(src.path)
    if not path.exists():
        raise InputError(f"{path}: data source not found")
    if path.is_file():
        if path.suffix.lower() not in FILE_TYPES:
            raise InputError(f"{path}: unsupported data file type (use {', '.join(FILE_TYPES)})")
        return [path]
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in FILE_TYPES and not p.name.startswith("."))
    if not files:
        raise InputError(f"{path}: folder holds no {', '.join(FILE_TYPES)} files")
    kinds = sorted({".json" if p.suffix.lower() == ".jsonl" else p.suffix.lower() for p in files})
    if len(kinds) > 1:
        raise InputError(f"{path}: folder mixes {' and '.join(kinds)} files; keep one format per folder "
                         "or list the files as separate sources")
    return files


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise InputError(f"{path}:{line}: invalid UTF-8 (byte {err.start}); save the file as UTF-8") from None


def _read_json(path: Path, text: str) -> Iterator[Record]:
    if not text.strip():
        raise InputError(f"{path}: file is empty")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"{path}:{err.lineno}:{err.colno}: invalid JSON: {err.msg}") from None
    if isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON array of records, got an object "
                         f"(keys: {', '.join(list(data)[:5])}); for one record per line use .jsonl")
    if not isinstance(data, list):
        raise InputError(f"{path}: expected a JSON array of records, got {type(data).__name__}")
    for index, item in enumerate(data):
        yield Record(f"{path}[{index}]", item)


def _read_jsonl(path: Path, text: str) -> Iterator[Record]:
    if not text.strip():
        raise InputError(f"{path}: file is empty")
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield Record(f"{path}:{number}", json.loads(line))
        except json.JSONDecodeError as err:
            raise InputError(f"{path}:{number}:{err.colno}: invalid JSON: {err.msg}") from None


def _read_csv(path: Path, text: str) -> Iterator[Record]:
    if not text.strip():
        raise InputError(f"{path}: file is empty")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    _ = reader.fieldnames  # reads the header line
    first_line = reader.line_num + 1
    for row in reader:
        yield Record(f"{path}:{first_line}", row)  # where the record starts; quoted fields may span lines
        first_line = reader.line_num + 1


def _read_parquet(path: Path) -> Iterator[Record]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as err:  # pyarrow raises several types for a broken file
        raise InputError(f"{path}: cannot read Parquet: {err}") from None
    if not rows:
        raise InputError(f"{path}: file is empty")
    for index, row in enumerate(rows):
        yield Record(f"{path}[{index}]", row)


def read_file(path: Path) -> Iterator[Record]:
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    try:
        text = _decode(path, path.read_bytes())
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    readers: dict[str, Callable[[Path, str], Iterator[Record]]] = {
        ".json": _read_json, ".jsonl": _read_jsonl, ".csv": _read_csv}
    return readers[suffix](path, text)


def read_hub(src: DataSource) -> Iterator[Record]:
    from datasets import load_dataset

    name = src.path.removeprefix("hub:")
    try:
        ds = load_dataset(name, split=src.split, revision=src.revision)
    except Exception as err:
        raise InputError(f"{src.path}: cannot load Hub data set: {str(err).splitlines()[0]}") from None
    for index, row in enumerate(ds):
        yield Record(f"{src.path}[{index}]", row)


def read_source(src: DataSource) -> Iterator[Record]:
    if is_hub_source(src.path):
        yield from read_hub(src)
        return
    for path in source_files(src):
        yield from read_file(path)


def source_fingerprint(src: DataSource) -> str:
    digest = hashlib.sha256(canonical_json(src.model_dump(mode="json")).encode())
    if not is_hub_source(src.path):
        for path in source_files(src):
            digest.update(path.name.encode())
            try:
                with open(path, "rb") as handle:
                    for block in iter(lambda: handle.read(1 << 20), b""):
                        digest.update(block)
            except PermissionError:
                raise InputError(f"{path}: permission denied") from None
    return digest.hexdigest()


# --- normalising to messages ---

def _text(fields: dict[str, Any], name: str, where: str, required: bool = True) -> str:
    value = fields.get(name)
    if value is None:
        if required:
            raise BadRecord(where, f"field '{name}' is missing" if name not in fields
                            else f"field '{name}' is null")
        return ""
    if not isinstance(value, str):
        raise BadRecord(where, f"field '{name}' must be a string, got {type(value).__name__}")
    return value


def _alpaca(fields: dict[str, Any], where: str) -> list[dict[str, str]]:
    instruction = _text(fields, "instruction", where)
    output = _text(fields, "output", where)
    extra = _text(fields, "input", where, required=False)
    system = _text(fields, "system", where, required=False)
    messages = [{"role": "system", "content": system}] if system else []
    history = fields.get("history") or []
    if not isinstance(history, list):
        raise BadRecord(where, "field 'history' must be a list of [user, assistant] pairs")
    for turn in history:
        if not (isinstance(turn, list | tuple) and len(turn) == 2 and all(isinstance(t, str) for t in turn)):
            raise BadRecord(where, "field 'history' must be a list of [user, assistant] string pairs")
        messages += [{"role": "user", "content": turn[0]}, {"role": "assistant", "content": turn[1]}]
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [*messages, {"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def _turns(fields: dict[str, Any], where: str, list_key: str, role_key: str,
           content_key: str) -> list[dict[str, str]]:
    turns = fields.get(list_key)
    if not isinstance(turns, list) or not turns:
        raise BadRecord(where, f"field '{list_key}' must be a non-empty list of turns")
    messages = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict):
            raise BadRecord(where, f"{list_key}[{i}] must be an object")
        role = ROLE_ALIASES.get(str(turn.get(role_key)))
        if role is None:
            raise BadRecord(where, f"{list_key}[{i}].{role_key}: unknown role {turn.get(role_key)!r}")
        messages.append({"role": role, "content": _text(turn, content_key, f"{where} {list_key}[{i}]")})
    return messages


def _sharegpt(fields: dict[str, Any], where: str) -> list[dict[str, str]]:
    return _turns(fields, where, "conversations", "from", "value")


def _messages(fields: dict[str, Any], where: str) -> list[dict[str, str]]:
    return _turns(fields, where, "messages", "role", "content")


NORMALISERS = {"alpaca": _alpaca, "sharegpt": _sharegpt, "messages": _messages}


def detect_format(fields: dict[str, Any], where: str) -> str:
    if "messages" in fields:
        return "messages"
    if "conversations" in fields:
        return "sharegpt"
    if "instruction" in fields:
        return "alpaca"
    raise BadRecord(where, f"cannot tell the format from keys {sorted(fields)[:6]}; "
                           "set format: alpaca|sharegpt|messages or a columns: mapping")


def to_messages(record: Record, fmt: str, columns: dict[str, str]) -> list[dict[str, str]]:
    fields = record.fields
    if not isinstance(fields, dict):
        raise BadRecord(record.where, f"a record must be an object, got {type(fields).__name__}")
    if columns:
        fields = {**fields, **{ours: fields.get(theirs) for ours, theirs in columns.items()}}
    if fmt == "auto":
        fmt = detect_format(fields, record.where)
    messages = NORMALISERS[fmt](fields, record.where)
    if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
        raise BadRecord(record.where, "no assistant turn with text to learn from")
    if messages[-1]["role"] != "assistant":
        raise BadRecord(record.where, "the last turn must be the assistant's")
    return messages


@dataclass
class SourceCounts:
    read: int = 0
    bad: int = 0
    kept: int = 0
    examples: list[str] = field(default_factory=list)


def load_conversations(sources: list[DataSource], on_bad: str) -> tuple[list[list[dict]], dict[str, Any]]:
    conversations: list[list[dict]] = []
    counts: dict[str, Any] = {}
    for src in sources:
        tally = SourceCounts()
        for record in read_source(src):
            tally.read += 1
            try:
                conversations.append(to_messages(record, src.format, src.columns))
                tally.kept += 1
            except BadRecord as err:
                if on_bad == "error":
                    raise InputError(f"{err} (set data.on_bad_record: skip to skip such records)") from None
                tally.bad += 1
                if len(tally.examples) < 5:
                    tally.examples.append(str(err))
        counts[src.path] = tally.__dict__
    return conversations, counts


# --- dedup and split ---

def conversation_id(messages: list[dict[str, str]]) -> str:
    return hashlib.blake2b(canonical_json(messages).encode(), digest_size=8).hexdigest()


def dedup(conversations: list[list[dict]]) -> tuple[list[list[dict]], list[str], int]:
    seen: set[str] = set()
    unique, ids = [], []
    for messages in conversations:
        cid = conversation_id(messages)
        if cid not in seen:
            seen.add(cid)
            unique.append(messages)
            ids.append(cid)
    return unique, ids, len(conversations) - len(unique)


def split_ids(ids: list[str], seed: int, fraction: float | None, count: int | None) -> set[str]:
    """Eval ids: the records whose seeded hash ranks lowest. Independent of input order."""
    n_eval = count if count is not None else max(1, round(len(ids) * fraction)) if fraction else 0
    if n_eval >= len(ids):
        raise InputError(f"data.eval: {n_eval} eval records would leave none of {len(ids)} for training")
    ranked = sorted(ids, key=lambda cid: hashlib.blake2b(f"{seed}:{cid}".encode(), digest_size=8).digest())
    return set(ranked[:n_eval])


# --- chat template ---

def trl_template_names() -> list[str]:
    folder = resources.files("trl").joinpath("chat_templates")
    return sorted(p.name[:-6] for p in folder.iterdir()
                  if p.name.endswith(".jinja") and not p.name.endswith("_training.jinja"))


def resolve_chat_template(setting: str, tokenizer) -> str:
    if setting == "model":
        template = tokenizer.chat_template
        if isinstance(template, dict):
            template = template.get("default")
        if not template:
            raise InputError("data.chat_template: the model has no chat template; name one of TRL's "
                             f"({', '.join(trl_template_names()[:8])}, ...) or a .jinja file")
        return template
    if setting.endswith(".jinja") or os.sep in setting:
        path = Path(setting)
        if not path.is_file():
            raise InputError(f"data.chat_template: {path}: file not found")
        return path.read_text(encoding="utf-8")
    names = trl_template_names()
    if setting not in names:
        from qctrain.recipe import did_you_mean

        raise InputError(f"data.chat_template: unknown template '{setting}'{did_you_mean(setting, names)}; "
                         f"known: model, {', '.join(names)}, or a .jinja file")
    return resources.files("trl").joinpath(f"chat_templates/{setting}.jinja").read_text(encoding="utf-8")


def training_template(template: str, tokenizer, loss_on: str) -> str:
    """The template used to tokenize: with {% generation %} markers when only assistant tokens train."""
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if loss_on == "all" or has_generation_markers(template):
        return template
    original = tokenizer.chat_template
    tokenizer.chat_template = template
    try:
        return get_training_chat_template(tokenizer) or template
    except ValueError:
        raise InputError("data.chat_template: the template has no {% generation %} markers around assistant "
                         "turns and TRL knows no training version of it; add the markers or set "
                         "data.loss_on: all") from None
    finally:
        tokenizer.chat_template = original


# --- tokenizing ---

def tokenize(conversations: list[list[dict]], tokenizer, template: str, loss_on: str,
             batch_size: int = 512) -> tuple[list[list[int]], list[list[int]]]:
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    masked = loss_on == "assistant"
    for start in range(0, len(conversations), batch_size):
        batch = conversations[start:start + batch_size]
        out = tokenizer.apply_chat_template(batch, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=masked)
        for i, ids in enumerate(out["input_ids"]):
            input_ids.append(ids)
            if masked:
                labels.append([t if m else IGNORE for t, m in zip(ids, out["assistant_masks"][i], strict=True)])
            else:
                labels.append(list(ids))
    return input_ids, labels


def fit_length(input_ids: list[list[int]], labels: list[list[int]], max_len: int,
               policy: str) -> tuple[list[list[int]], list[list[int]], dict[str, int]]:
    kept_ids, kept_labels = [], []
    counts = {"overlong_dropped": 0, "overlong_truncated": 0, "unsupervised_dropped": 0}
    for ids, lab in zip(input_ids, labels, strict=True):
        if len(ids) > max_len:
            if policy == "drop":
                counts["overlong_dropped"] += 1
                continue
            ids, lab = ids[:max_len], lab[:max_len]
            counts["overlong_truncated"] += 1
        if all(t == IGNORE for t in lab):
            counts["unsupervised_dropped"] += 1
            continue
        kept_ids.append(ids)
        kept_labels.append(lab)
    return kept_ids, kept_labels, counts


def token_stats(input_ids: list[list[int]], labels: list[list[int]]) -> dict[str, Any]:
    lengths = sorted(len(ids) for ids in input_ids)
    total = sum(lengths)
    supervised = sum(sum(1 for t in lab if t != IGNORE) for lab in labels)
    if not lengths:
        return {"records": 0, "tokens": 0, "supervised_tokens": 0, "supervised_fraction": 0.0}
    return {
        "records": len(lengths),
        "tokens": total,
        "supervised_tokens": supervised,
        "supervised_fraction": round(supervised / total, 4),
        "length_min": lengths[0],
        "length_mean": round(total / len(lengths), 1),
        "length_p50": lengths[len(lengths) // 2],
        "length_p95": lengths[min(len(lengths) - 1, int(len(lengths) * 0.95))],
        "length_max": lengths[-1],
        "length_stdev": round(statistics.pstdev(lengths), 1),
    }


def render_marked(ids: list[int], labels: list[int], tokenizer, start: str = "⟦", end: str = "⟧") -> str:
    """Decode one record, with the supervised (trained-on) spans between markers."""
    pieces, run, run_supervised = [], [], None
    for token, label in zip(ids, labels, strict=True):
        supervised = label != IGNORE
        if run and supervised != run_supervised:
            text = tokenizer.decode(run)
            pieces.append(f"{start}{text}{end}" if run_supervised else text)
            run = []
        run.append(token)
        run_supervised = supervised
    if run:
        text = tokenizer.decode(run)
        pieces.append(f"{start}{text}{end}" if run_supervised else text)
    return "".join(pieces)


def to_dataset(input_ids: list[list[int]], labels: list[list[int]], packing: bool, max_len: int,
               seed: int) -> Dataset:
    from trl.data_utils import pack_dataset

    dataset = Dataset.from_dict({"input_ids": input_ids, "labels": labels})
    if packing:
        # As TRL does: shuffle first so each pack mixes records, then best-fit-decreasing packing.
        dataset = pack_dataset(dataset.shuffle(seed=seed).flatten_indices(), max_len, "bfd")
    return dataset


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


def write_json_atomic(path: Path, value: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(value, handle, indent=2, ensure_ascii=False)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def build(cfg: DataSection, tokenizer, template: str) -> tuple[Dataset, Dataset | None, dict, dict]:
    """Everything that is cached: returns train, eval, report and the recorded split."""
    conversations, per_source = load_conversations(cfg.sources, cfg.on_bad_record)
    read = len(conversations)
    duplicates = 0
    if cfg.dedup:
        conversations, ids, duplicates = dedup(conversations)
    else:
        ids = [conversation_id(m) for m in conversations]
    if not conversations:
        raise InputError(f"data: no usable records (read {read}, duplicates {duplicates}); "
                         f"sources: {', '.join(s.path for s in cfg.sources)}")

    split: dict[str, Any] = {"seed": cfg.seed}
    eval_cfg = cfg.eval
    if eval_cfg and eval_cfg.sources:
        eval_conversations, eval_counts = load_conversations(eval_cfg.sources, cfg.on_bad_record)
        per_source.update({f"eval:{k}": v for k, v in eval_counts.items()})
        train_conversations = conversations
        split.update(method="sources", eval_sources=[s.path for s in eval_cfg.sources])
    elif eval_cfg and (eval_cfg.fraction or eval_cfg.count):
        eval_ids = split_ids(ids, cfg.seed, eval_cfg.fraction, eval_cfg.count)
        train_conversations = [m for m, cid in zip(conversations, ids, strict=True) if cid not in eval_ids]
        eval_conversations = [m for m, cid in zip(conversations, ids, strict=True) if cid in eval_ids]
        split.update(method="fraction" if eval_cfg.fraction else "count",
                     fraction=eval_cfg.fraction, count=eval_cfg.count,
                     eval_ids=[cid for cid in ids if cid in eval_ids])
    else:
        train_conversations, eval_conversations = conversations, []
        split.update(method="none")

    report: dict[str, Any] = {"sources": per_source, "records_read": read, "duplicates": duplicates,
                              "heldout_prompts": [c[:-1] for c in eval_conversations[:3]]}
    datasets: dict[str, Dataset | None] = {}
    for name, convs in (("train", train_conversations), ("eval", eval_conversations)):
        if not convs:
            datasets[name] = None
            continue
        input_ids, labels = tokenize(convs, tokenizer, template, cfg.loss_on)
        input_ids, labels, fit_counts = fit_length(input_ids, labels, cfg.max_seq_length, cfg.on_overlong)
        report[name] = {"conversations": len(convs), **fit_counts, **token_stats(input_ids, labels)}
        if name == "train":
            if not input_ids:
                raise InputError(
                    f"data: no training record left after filtering ({fit_counts['overlong_dropped']} longer than "
                    f"data.max_seq_length={cfg.max_seq_length}, {fit_counts['unsupervised_dropped']} with no "
                    "supervised token); raise max_seq_length or set data.on_overlong: truncate")
            report["sample"] = render_marked(input_ids[0], labels[0], tokenizer)
        if not input_ids:
            datasets[name] = None
            continue
        dataset = to_dataset(input_ids, labels, cfg.packing, cfg.max_seq_length, cfg.seed)
        report[name]["sequences"] = len(dataset)
        if cfg.packing:
            report[name]["packing_efficiency"] = round(
                report[name]["tokens"] / (len(dataset) * cfg.max_seq_length), 4)
        datasets[name] = dataset
    if report["train"]["supervised_tokens"] == 0:
        raise InputError("data: no token is supervised; check data.loss_on and the chat template")
    return datasets["train"], datasets["eval"], report, split


def prepare(cfg: DataSection, tokenizer, output_dir: Path, force: bool = False) -> PreparedData:
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
