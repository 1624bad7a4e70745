"""Padded vs packed batches on the same mixed-length records: share of real (non-pad) tokens, steps per epoch.

    python bench/packing.py                    # 20k generated Alpaca records, max_seq_length 2048, batch 4

Padded: the records in the trainer's (random) order, each batch padded to its longest record (dynamic
padding; also shown: padded to max_seq_length, and grouped by length). Packed: our data stage's
best-fit-decreasing packs; with padding-free batches (TRL's collator, our default) a step computes on the
real tokens only, so the share is the fill of the packs (it sets the steps per epoch). Target: >= 0.97.
"""

import argparse
import math
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def record_lengths(n: int, max_len: int, model: str) -> np.ndarray:
    """The token counts of n generated Alpaca records as the data stage keeps them: duplicates removed,
    tokenized, those over max_len dropped (pack.fit_lengths)."""
    from qctrain import data
    from qctrain.basemodel.load import load_tokenizer
    from qctrain.data import formats, pack, sources, stage, tokens
    from qctrain.recipe import ModelSection

    tokenizer = load_tokenizer(ModelSection(name=model))
    conversations = [formats.to_conversation(sources.Record(f"gen[{i}]", r), "alpaca", {})
                     for i, r in enumerate(common.alpaca_records(n))]
    digests = np.fromiter(map(formats.conversation_digest, conversations), dtype=np.uint64, count=len(conversations))
    conversations = [conversations[i] for i in stage.first_indices(digests).tolist()]
    template = data.template.training_template(data.resolve_chat_template("model", tokenizer), tokenizer, "assistant")
    tok = tokens.tokenize_flat(conversations, tokenizer, template, "assistant")
    _, lengths, _, _ = pack.fit_lengths(tok.lengths, pack.supervised_within(tok, max_len), max_len, "drop")
    return lengths


def padded(lengths: np.ndarray, batch: int, seed: int, grouped: bool = False) -> tuple[int, int]:
    """(steps, token slots computed) with each batch padded to its longest record."""
    order = np.random.default_rng(seed).permutation(len(lengths))
    if grouped:  # what group_by_length does, roughly: sort within mega-batches of 50 batches
        mega = batch * 50
        order = np.concatenate([sorted(order[i:i + mega], key=lambda j: -lengths[j])
                                for i in range(0, len(order), mega)])
    cut = -(-len(order) // batch) * batch
    padded_len = np.zeros(cut, dtype=np.int64)
    padded_len[:len(order)] = lengths[order]
    slots = int(padded_len.reshape(-1, batch).max(axis=1).sum()) * batch
    last = len(order) % batch
    if last:  # the last batch is smaller
        slots -= (batch - last) * int(padded_len[-batch:].max())
    return math.ceil(len(lengths) / batch), slots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4, help="per_device_train_batch_size")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--model", default=None)
    parser.add_argument("--results", default=None, help="RESULTS.md to append to ('-': none)")
    args = parser.parse_args(argv)

    import datasets
    from qctrain.data import pack

    datasets.disable_progress_bars()
    model = str(common.tiny_model(args.model))
    lengths = record_lengths(args.records, args.max_seq_length, model)
    real = int(lengths.sum())
    b, max_len = args.batch_size, args.max_seq_length
    rows = []
    steps, slots = padded(lengths, b, args.seed)
    rows.append({"batches": "padded to the longest in the batch (random order)", "steps/epoch": steps,
                 "token slots computed": slots, "real-token share": real / slots})
    steps, slots = padded(lengths, b, args.seed, grouped=True)
    rows.append({"batches": "padded, grouped by length", "steps/epoch": steps,
                 "token slots computed": slots, "real-token share": real / slots})
    rows.append({"batches": f"padded to max_seq_length ({max_len})", "steps/epoch": math.ceil(len(lengths) / b),
                 "token slots computed": len(lengths) * max_len, "real-token share": real / (len(lengths) * max_len)})
    packed = len(pack.pack_rows(lengths, max_len, args.seed)[2]) - 1  # the rows the data stage writes
    fill = real / (packed * max_len)
    rows.append({"batches": "packed (BFD), padding-free: real tokens", "steps/epoch": math.ceil(packed / b),
                 "token slots computed": real, "real-token share": 1.0})
    rows.append({"batches": "packed (BFD): fill of the packs", "steps/epoch": math.ceil(packed / b),
                 "token slots computed": packed * max_len, "real-token share": fill})
    for row in rows:
        row["real-token share"] = round(row["real-token share"], 4)
    notes = (f"{len(lengths):,} records after dedup and dropping those over {max_len} tokens "
             f"(generated Alpaca, tiny tokenizer; mean {lengths.mean():.0f}, p50 {int(np.median(lengths))}, "
             f"max {lengths.max()} tokens), {real:,} real tokens, batch {b}. Packing fill {fill:.4f} "
             f"(target >= 0.97): {'met' if fill >= 0.97 else 'MISSED'}; "
             f"{math.ceil(len(lengths) / b) / math.ceil(packed / b):.1f}x fewer steps per epoch than padded.")
    common.record("packing", rows, notes, None if args.results is None else Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
