"""The chat template extension's cost (issue 21): the tokenize step per record, Phi-3.5's template as it is
against the extended one the data stage renders through, alternating, in one process.

    python bench/extension.py                  # 4,000 plain and 2,000 tool records, 5 alternating rounds

Plain Alpaca records pass through the extension's preamble unchanged, so the stage renders them with the template
it extends: expected 1.0x. Tool records (tests/data/shapes/openai_tools.jsonl: definitions, calls, results) go
through the preamble; as it is, Phi-3.5's template drops their tools, calls and results (a lower bound, not a
usable baseline), so the ratio is the preamble's price for keeping them. Each cell: the best of 3 runs of
data.tokens.tokenize_flat in this process (no workers), in microseconds per record.
"""

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

TOOL_RECORDS = common.ROOT / "tests" / "data" / "shapes" / "openai_tools.jsonl"


def conversations(kind: str, n: int) -> list[dict]:
    from qctrain import data

    if kind == "plain":
        return [data.formats.to_conversation(data.sources.Record(f"gen[{i}]", r), "alpaca", {})
                for i, r in enumerate(common.alpaca_records(n))]
    lines = TOOL_RECORDS.read_text(encoding="utf-8").splitlines()
    return [data.formats.to_conversation(data.sources.Record(f"tools[{i}]", json.loads(lines[i % len(lines)])),
                                         "messages", {}) for i in range(n)]


def per_record_us(records: list[dict], tokenizer, template: str) -> float:
    from qctrain import data

    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        data.tokens.tokenize_flat(records, tokenizer, template, "assistant")
        best = min(best, time.perf_counter() - start)
    return best * 1e6 / len(records)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plain-records", type=int, default=4000)
    parser.add_argument("--tool-records", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--model", default=None)
    parser.add_argument("--results", default=None, help="RESULTS.md to append to ('-': none)")
    args = parser.parse_args(argv)

    from qctrain import data
    from qctrain.basemodel.load import load_tokenizer
    from qctrain.data.template import split_extension
    from qctrain.recipe import ModelSection

    tokenizer = load_tokenizer(ModelSection(name=str(common.tiny_model(args.model))))
    extended = data.template.training_template(data.resolve_chat_template("model", tokenizer), tokenizer, "assistant")
    as_it_is = split_extension(extended)[1]
    rows = []
    for kind, n in (("plain", args.plain_records), ("tools", args.tool_records)):
        records = conversations(kind, n)
        times: dict[str, list[float]] = {"as it is": [], "extended": []}
        for _ in range(args.rounds):  # alternating, so load on the machine falls on both alike
            times["as it is"].append(per_record_us(records, tokenizer, as_it_is))
            times["extended"].append(per_record_us(records, tokenizer, extended))
        base, ours = statistics.median(times["as it is"]), statistics.median(times["extended"])
        rows.append({"records": f"{kind} ({n:,})", "Phi-3.5's template, us/record": round(base, 1),
                     "extended, us/record": round(ours, 1), "ratio": round(ours / base, 2),
                     "rounds (extended / as it is)": ", ".join(f"{e / b:.2f}" for e, b in
                                                               zip(times["extended"], times["as it is"],
                                                                   strict=True))})
    notes = ("tokenize_flat on one process (render, encode, mask), medians of alternating rounds, best of 3 runs "
             "each. Plain: the stage renders them with the template the extension extends (expected 1.0x). Tools: "
             "Phi-3.5's template alone drops tools, calls and results, so its figure is a lower bound; the ratio is "
             "what keeping them costs.")
    common.record("extension", rows, notes, None if args.results is None else Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
