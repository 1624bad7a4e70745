"""List-of-lists wrappers around the data package's flat-array functions, for tests that state their cases as
plain lists (the stage itself only works on arrays)."""

from typing import Any

from qctrain import data


def fit_length(input_ids: list[list[int]], labels: list[list[int]], max_len: int,
               policy: str) -> tuple[list[list[int]], list[list[int]], dict[str, int]]:
    fitted, counts = data.fit_length_flat(data.Tokenized.from_lists(input_ids, labels), max_len, policy)
    return *fitted.to_lists(), counts


def token_stats(input_ids: list[list[int]], labels: list[list[int]]) -> dict[str, Any]:
    return data.token_stats_flat(data.Tokenized.from_lists(input_ids, labels))


def to_dataset(input_ids: list[list[int]], labels: list[list[int]], packing: bool, max_len: int, seed: int):
    return data.to_dataset_flat(data.Tokenized.from_lists(input_ids, labels), packing, max_len, seed)
