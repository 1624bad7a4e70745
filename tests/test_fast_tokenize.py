"""The fast tokenizing path (jinja render + one Rust batch + array masking, optionally in worker
processes) gives exactly the token ids and labels of tokenizer.apply_chat_template(...,
return_assistant_tokens_mask=True), and the flat fit/stats/dataset helpers match the list ones."""

import random

import data_lists
import data_reference
import numpy as np
import pytest
from qctrain import data

CONVERSATIONS = [
    [{"role": "user", "content": "Give three tips for staying healthy."},
     {"role": "assistant", "content": "1. Eat well.\n2. Sleep.\n3. Move every day."}],
    [{"role": "system", "content": "You answer in one word."},
     {"role": "user", "content": "What is the capital of France?"},
     {"role": "assistant", "content": "Paris."}],
    [{"role": "user", "content": "请写一首关于大海的短诗。"},
     {"role": "assistant", "content": "大海啊，蓝色的梦。\n浪花轻轻地唱。"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
     {"role": "user", "content": "Translate 'cat' into French."}, {"role": "assistant", "content": "chat"},
     {"role": "user", "content": "和德语？"}, {"role": "assistant", "content": "Katze 🐈"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""},
     {"role": "assistant", "content": "An answer to an empty prompt."}],
    [{"role": "user", "content": "  leading and trailing spaces  \n\n"},
     {"role": "assistant", "content": "\n  indented\n\tand tabbed  "}],
    [{"role": "user", "content": "Special-looking text: <|end|> <|assistant|> <s>"},
     {"role": "assistant", "content": "Echo <|end|> and <|endoftext|> inside an answer."}],
    [{"role": "user", "content": "x" * 700}, {"role": "assistant", "content": "y " * 300}],
    [{"role": "user", "content": "Empty answer next."}, {"role": "assistant", "content": ""},
     {"role": "user", "content": "Now answer."}, {"role": "assistant", "content": "ok", "name": None}],
]


def random_conversations(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    pieces = ["hello", " world", "\n", "请", "写", "诗", "é", "🙂", "  ", "\t", "<|end|>", "data", "42", ".",
              "The quick brown fox", "机器学习", "", "a" * 20]
    out = []
    for _ in range(n):
        turns = [] if rng.random() < 0.7 else [{"role": "system", "content": "".join(rng.choices(pieces, k=4))}]
        for _ in range(rng.randint(1, 3)):
            turns.append({"role": "user", "content": "".join(rng.choices(pieces, k=rng.randint(0, 12)))})
            turns.append({"role": "assistant", "content": "".join(rng.choices(pieces, k=rng.randint(1, 30)))})
        out.append(turns)
    return out


@pytest.fixture(scope="module")
def template(tokenizer):
    return data.template.training_template(data.resolve_chat_template("model", tokenizer), tokenizer, "assistant")


@pytest.mark.parametrize("loss_on", ["assistant", "all"])
def test_fast_path_matches_apply_chat_template(tokenizer, loss_on):
    template = data.template.training_template(data.resolve_chat_template("model", tokenizer), tokenizer, loss_on)
    conversations = CONVERSATIONS + random_conversations(200)
    expected = data.tokens.tokenize_reference(conversations, tokenizer, template, loss_on)
    assert data.tokenize(conversations, tokenizer, template, loss_on) == expected
    # also the raw library call, record by record (no batching in between)
    first = len(CONVERSATIONS)
    for conversation, ids, labels in zip(CONVERSATIONS, expected[0][:first], expected[1][:first], strict=True):
        out = tokenizer.apply_chat_template(conversation, chat_template=template, tokenize=True, return_dict=True,
                                            return_assistant_tokens_mask=loss_on == "assistant")
        assert out["input_ids"] == ids
        if loss_on == "assistant":
            assert [t if m else data.IGNORE for t, m in zip(ids, out["assistant_masks"], strict=True)] == labels
    supervised = sum(label != data.IGNORE for labels in expected[1] for label in labels)
    assert 0 < supervised < sum(map(len, expected[0])) or loss_on == "all"


def test_worker_processes_give_the_same_result(tokenizer, template):
    conversations = random_conversations(300, seed=1)
    one = data.tokens.tokenize_flat(conversations, tokenizer, template, "assistant", chunk=64)
    two = data_reference.tokenize_in_workers(conversations, tokenizer, template, "assistant", 2, chunk=64)
    for a, b in ((one.ids, two.ids), (one.labels, two.labels), (one.bounds, two.bounds)):
        np.testing.assert_array_equal(a, b)
    assert one.to_lists() == data.tokens.tokenize_reference(conversations, tokenizer, template, "assistant")


def test_mask_vectorised_equals_loop_on_adversarial_offsets():
    class Enc:  # stand-in for tokenizers.Encoding: offsets may repeat, go back or have zero width
        def __init__(self, offsets):
            self.offsets = offsets

        def __len__(self):
            return len(self.offsets)

    rng = random.Random(3)
    encodings, spans = [], []
    for _ in range(300):
        offsets, at = [], 0
        for _ in range(rng.randint(0, 25)):
            start = max(0, at + rng.randint(-3, 4))
            offsets.append((start, start + rng.randint(0, 4)))
            at = start + rng.randint(0, 3)
        record_spans, pos = [], 0
        for _ in range(rng.randint(0, 4)):
            s = pos + rng.randint(0, 8)
            e = s + rng.randint(0, 8)
            record_spans.append((s, e))
            pos = e
        encodings.append(Enc(offsets))
        spans.append(record_spans)
    total = sum(map(len, encodings))
    np.testing.assert_array_equal(data.tokens._assistant_mask(encodings, spans, total),
                                  data.tokens._assistant_mask_loop(encodings, spans, total))


def test_mask_at_span_bounds_equals_loop_on_real_encodings(tokenizer):
    """The mask the fast path computes from the Rust encoding at the span ends (no per-token offsets in Python)
    equals the one-pass loop over every token's offsets, for spans anywhere: mid-word, on spaces, newlines,
    special tokens, and Chinese characters that fall back to several byte tokens sharing one offset."""
    rng = random.Random(5)
    pieces = ["Hello", " world", "  ", "\n\n", "<|assistant|>", "<|end|>", "今天天气很好", "𝔘𝔫𝔦", "ü", "\t", "42",
              "don't", " 中文", "..."]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(300)]
    encodings = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    spans = []
    for text in texts:
        cuts = sorted(rng.sample(range(len(text) + 1), k=min(len(text) + 1, 2 * rng.randint(0, 3))))
        spans.append([(cuts[k], cuts[k + 1]) for k in range(0, len(cuts) - 1, 2)])
    bounds = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encodings], out=bounds[1:])
    np.testing.assert_array_equal(data.tokens._assistant_mask_at_bounds(encodings, spans, bounds),
                                  data.tokens._assistant_mask_loop(encodings, spans, int(bounds[-1])))


def test_python_tokenizer_falls_back_to_the_library(tokenizer, template, monkeypatch):
    monkeypatch.setattr(data.tokens, "_rust_backend", lambda tok: None)
    conversations = CONVERSATIONS[:3]
    assert data.tokenize(conversations, tokenizer, template, "assistant") == data.tokens.tokenize_reference(
        conversations, tokenizer, template, "assistant")


def list_fit_length(input_ids, labels, max_len, policy):  # the list implementation the flat one replaced
    kept_ids, kept_labels = [], []
    counts = {"overlong_dropped": 0, "overlong_truncated": 0, "unsupervised_dropped": 0}
    for ids, lab in zip(input_ids, labels, strict=True):
        if len(ids) > max_len:
            if policy == "drop":
                counts["overlong_dropped"] += 1
                continue
            ids, lab = ids[:max_len], lab[:max_len]
            counts["overlong_truncated"] += 1
        if all(t == data.IGNORE for t in lab):
            counts["unsupervised_dropped"] += 1
            continue
        kept_ids.append(ids)
        kept_labels.append(lab)
    return kept_ids, kept_labels, counts


@pytest.mark.parametrize("policy", ["drop", "truncate"])
def test_flat_fit_length_and_stats_match_lists(policy):
    rng = random.Random(5)
    ids = [[rng.randint(0, 99) for _ in range(rng.randint(0, 40))] for _ in range(200)]
    labels = [[t if rng.random() < 0.2 or i > 30 else data.IGNORE for i, t in enumerate(row)] for row in ids]
    assert data_lists.fit_length(ids, labels, 25, policy) == list_fit_length(ids, labels, 25, policy)
    fitted_ids, fitted_labels, _ = data_lists.fit_length(ids, labels, 25, policy)
    stats = data_lists.token_stats(fitted_ids, fitted_labels)
    lengths = sorted(map(len, fitted_ids))
    assert stats["records"] == len(lengths) and stats["tokens"] == sum(lengths)
    assert stats["supervised_tokens"] == sum(t != data.IGNORE for row in fitted_labels for t in row)
    assert stats["length_p50"] == lengths[len(lengths) // 2]
    assert data_lists.token_stats([], []) == {"records": 0, "tokens": 0, "supervised_tokens": 0,
                                        "supervised_fraction": 0.0}


@pytest.mark.parametrize("packing", [True, False])
def test_flat_dataset_equals_the_plain_datasets_way(packing):
    from datasets import Dataset
    from trl.data_utils import pack_dataset

    rng = random.Random(7)
    ids = [[rng.randint(0, 99) for _ in range(rng.choice([0, 64, 90, *range(1, 60)]))] for _ in range(500)]
    labels = [[t if rng.random() < 0.5 else data.IGNORE for t in row] for row in ids]
    expected = Dataset.from_dict({"input_ids": ids, "labels": labels})
    if packing:
        expected = pack_dataset(expected.shuffle(seed=11).flatten_indices(), 64, "bfd",
                                map_kwargs={"batch_size": None})
    got = data_lists.to_dataset(ids, labels, packing, 64, 11)
    assert got.features == expected.features
    assert got.to_dict() == expected.to_dict()


@pytest.mark.parametrize("capacity", [8, 64, 100])
def test_best_fit_decreasing_gives_trls_bins(capacity, monkeypatch):
    import pyarrow as pa
    from trl.data_utils import _pack_bfd

    monkeypatch.setattr(data.pack, "BFD_BLOCK", 300)  # records read in several blocks

    rng = np.random.default_rng(capacity)
    lengths = rng.integers(1, capacity + 1, 2000)  # many ties
    ids = pa.ListArray.from_arrays(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
                                   pa.array(np.arange(lengths.sum(), dtype=np.int64)))
    theirs = _pack_bfd(pa.table({"input_ids": ids}), capacity)
    order, counts = data.pack.best_fit_decreasing(lengths, capacity)
    assert theirs["seq_lengths"].to_pylist() == [lengths[order[a:b]].tolist()
                                                 for a, b in zip(np.cumsum([0, *counts[:-1]]), np.cumsum(counts),
                                                                 strict=True)]
    starts = np.concatenate([[0], np.cumsum(lengths)])
    assert pa.concat_arrays(theirs["input_ids"].chunks).flatten().to_numpy().tolist() == np.concatenate(
        [np.arange(starts[i], starts[i + 1]) for i in order]).tolist()


def test_mask_from_added_tokens_equals_loop_or_says_it_cannot(tokenizer):
    """Without offsets (encode_batch_fast), the mask comes from the added tokens' places in the ids: exact for
    every record it takes on (spans from piece edge to piece edge, rstrip whitespace, empty pieces, text that
    looks like a token but is cut), and the others are handed back for the offsets path."""
    backend = tokenizer.backend_tokenizer
    added = data.tokens.added_tokens(backend)
    assert added is not None  # Phi-3.5's tokenizer takes this path
    rng = random.Random(11)
    pieces = ["Hello", " world", "  ", "\n\n", "<|assistant|>", "<|end|>", "<|end|>\n  ", "<|user|>\t\n",
              "<|endoftext|>", "<s>", "</s>", "<|end", "|>", "今天天气很好", "𝔘𝔫𝔦", "ü", "\t", "42", " \u3000 ", "\x1c"]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 30))) for _ in range(600)]
    spans = []
    for i, text in enumerate(texts):
        edges = sorted({0, len(text)} | {e for m in added.pattern.finditer(text) for e in m.span()})
        points = edges if i % 3 else list(range(len(text) + 1))  # two in three on piece edges
        cuts = sorted(rng.sample(points, k=min(len(points), 2 * rng.randint(0, 3))))
        spans.append([(cuts[k], cuts[k + 1]) for k in range(0, len(cuts) - 1, 2)])
    encodings = backend.encode_batch(texts, add_special_tokens=False)
    fast = backend.encode_batch_fast(texts, add_special_tokens=False)
    assert [e.ids for e in fast] == [e.ids for e in encodings]
    bounds = np.zeros(len(texts) + 1, dtype=np.int64)
    np.cumsum([len(e) for e in encodings], out=bounds[1:])
    ids = np.array([t for e in encodings for t in e.ids], dtype=np.int32)
    mask, misses = data.tokens._mask_at_added_tokens(texts, spans, ids, bounds, added)
    expected = data.tokens._assistant_mask_loop(encodings, spans, int(bounds[-1]))
    taken = [i for i in range(len(texts)) if i not in set(misses) and spans[i]]
    assert len(taken) > 250 and len(misses) > 50  # both sides exercised
    for i in taken:
        np.testing.assert_array_equal(mask[bounds[i]:bounds[i + 1]], expected[bounds[i]:bounds[i + 1]])
    for i in misses:
        assert not mask[bounds[i]:bounds[i + 1]].any()


def test_tokenizers_the_added_token_mask_cannot_serve_take_the_offsets(tokenizer, template):
    from tokenizers import AddedToken, Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    assert data.tokens.added_tokens(backend) is not None
    backend.add_tokens([AddedToken("<|lstrip|>", lstrip=True)])
    assert data.tokens.added_tokens(backend) is None
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.encode_special_tokens = True
    assert data.tokens.added_tokens(backend) is None


RUST_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2005\u200a\u2028\u2029\u202f\u205f\u3000"
NOT_WHITESPACE = "\x1c\x1d\x1e\x1f\u180e\u200b\ufeff"  # Python's str.isspace or \s says yes to some; Rust says no


def test_metaspace_in_python_gives_the_same_ids(tokenizer):
    """Phi-3.5's Metaspace step done in Python (spaces replaced between added tokens, the first piece prefixed)
    and the tokenizer without it give the ids of the tokenizer itself: spaces and every kind of whitespace
    after rstrip tokens, a text that starts with text, with a space or with the replacement character."""
    backend = data.tokens.rust_backend(tokenizer)
    assert backend.plain and backend.prepend_first
    rng = random.Random(7)
    pieces = ["Hello", " world", " ", "  ", "\u2581", "\u2581x", "\n", "<|assistant|>", "<|end|>", "<|user|>",
              "<|endoftext|>", "<s>", "<|end", "今天 天气", "ü", "42", *RUST_WHITESPACE, *NOT_WHITESPACE]
    texts = ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 25))) for _ in range(2000)]
    texts += ["", " ", "\u2581", " lead", "<|end|>   x", "<|end|>\u3000 \x1c y"]
    matches = [list(backend.added.pattern.finditer(text)) for text in texts]
    pre_tokenizer = backend.tokenizer.pre_tokenizer
    plain = backend.encode_plain(data.tokens._plain_texts(texts, matches, backend))
    assert backend.tokenizer.pre_tokenizer.__getstate__() == pre_tokenizer.__getstate__()  # put back
    expected = backend.tokenizer.encode_batch(texts, add_special_tokens=False)
    assert [e.ids for e in plain] == [e.ids for e in expected]


def test_metaspace_in_python_only_for_a_bare_metaspace_step(tokenizer):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers

    def variant(change):
        copy = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
        change(copy)
        return data.tokens.Backend(copy, data.tokens.added_tokens(copy), *data.tokens._metaspace_step(
            copy, data.tokens.added_tokens(copy)))

    assert variant(lambda t: None).plain
    assert variant(lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Metaspace(prepend_scheme="always",
                                                                                  split=False))).plain is False
    assert variant(lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Metaspace(split=True))).plain is False
    assert variant(lambda t: setattr(t, "normalizer", normalizers.NFKC())).plain is False
    never = variant(lambda t: setattr(t, "pre_tokenizer", pre_tokenizers.Metaspace(prepend_scheme="never",
                                                                                   split=False)))
    assert never.plain and not never.prepend_first
    texts = [" lead", "x <|end|> y", "<|user|>\n a b"]
    matches = [list(never.added.pattern.finditer(text)) for text in texts]
    assert [e.ids for e in never.encode_plain(data.tokens._plain_texts(texts, matches, never))] == [
        e.ids for e in never.tokenizer.encode_batch(texts)]


def test_direct_render_equals_the_library_call(tokenizer, template):
    """Conversations of plain strings are rendered without render_jinja_template's copy: the same texts and
    generation spans; the rest (None values, reasoning, non-string content) still goes through the library."""
    from transformers.utils.chat_template_utils import render_jinja_template

    conversations = CONVERSATIONS + random_conversations(100, seed=4)
    plain = [c for c in conversations if data.tokens._plain_strings(c)]
    assert len(plain) > 100
    special = tokenizer.special_tokens_map
    assert data.tokens._render_direct(plain, template, special) == render_jinja_template(
        conversations=plain, chat_template=template, return_assistant_tokens_mask=True, **special)
    assert not data.tokens._plain_strings([{"role": "assistant", "content": "x", "reasoning_content": "why"}])
    assert not data.tokens._plain_strings([{"role": "assistant", "content": "x", "name": None}])
    assert not data.tokens._plain_strings([{"role": "user", "content": [{"type": "text", "text": "x"}]}])
