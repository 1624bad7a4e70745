"""Tokenizing: the fast path (jinja render, one batched Rust encode, labels from offsets) and the library's way
(apply_chat_template with the assistant mask: the definition the fast path matches, and the path for tokenizers
without a Rust backend)."""

import re
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np

from qctrain.data.template import passes_through, supervised_spans, template_inputs, unextended
from qctrain.data.workers import CHUNK_RECORDS

IGNORE = -100

# --- tokenizing ---
#
# The fast path renders the chat template with transformers' own jinja machinery (the function that
# `apply_chat_template` calls, so the text and the {% generation %} spans are the same), encodes the texts
# with one batched call to the Rust tokenizer, and turns spans into labels with array operations on the
# token offsets, reproducing `apply_chat_template(..., return_assistant_tokens_mask=True)` exactly, a chunk
# (CHUNK_RECORDS) at a time: the data stage's forked workers each encode a chunk (encode_chunk).
# Records travel as flat arrays (`Tokenized`), never as one Python list per record.


@dataclass
class Tokenized:
    """Token ids and labels of many records, flat: record i is ids[bounds[i]:bounds[i + 1]]."""

    ids: np.ndarray  # int32
    labels: np.ndarray  # int32, IGNORE where not supervised
    bounds: np.ndarray  # int64, len(records) + 1

    def __len__(self) -> int:
        return len(self.bounds) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.bounds)

    def to_lists(self) -> tuple[list[list[int]], list[list[int]]]:
        cuts = self.bounds[1:-1]
        return ([part.tolist() for part in np.split(self.ids, cuts)] if len(self) else [],
                [part.tolist() for part in np.split(self.labels, cuts)] if len(self) else [])

    @classmethod
    def from_lists(cls, input_ids: list[list[int]], labels: list[list[int]]) -> "Tokenized":
        lengths = np.fromiter(map(len, input_ids), dtype=np.int64, count=len(input_ids))
        bounds = np.zeros(len(input_ids) + 1, dtype=np.int64)
        np.cumsum(lengths, out=bounds[1:])
        total = int(bounds[-1])
        return cls(np.fromiter(chain.from_iterable(input_ids), dtype=np.int32, count=total),
                   np.fromiter(chain.from_iterable(labels), dtype=np.int32, count=total), bounds)

    @classmethod
    def concat(cls, parts: list["Tokenized"]) -> "Tokenized":
        if not parts:
            return cls(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(1, np.int64))
        offsets = np.cumsum([0] + [int(p.bounds[-1]) for p in parts[:-1]])
        bounds = np.concatenate([parts[0].bounds[:1]]
                                + [p.bounds[1:] + o for p, o in zip(parts, offsets, strict=True)])
        return cls(np.concatenate([p.ids for p in parts]), np.concatenate([p.labels for p in parts]), bounds)


def tokenize_reference(conversations: list, tokenizer, template: str, loss_on: str, batch_size: int = 512,
                       reasoning: str = "inline") -> tuple[list[list[int]], list[list[int]]]:
    """The plain-library way (`apply_chat_template` with the assistant mask, and `tools=` per record): the
    definition the fast path must match, and the path for tokenizers without a Rust backend. A record with
    assistant turns left in the context (weight 0) takes the library's mask over the spans of the others."""
    input_ids: list[list[int]] = []
    labels: list[list[int]] = []
    masked = loss_on == "assistant"
    all_messages, all_tools, all_contexts = template_inputs(conversations, reasoning != "drop")
    for start in range(0, len(all_messages), batch_size):
        batch, batch_tools = all_messages[start:start + batch_size], all_tools[start:start + batch_size]
        groups = [(batch, None)] if not any(batch_tools) else [([m], t) for m, t in zip(batch, batch_tools,
                                                                                          strict=True)]
        for group, tools in groups:
            out = tokenizer.apply_chat_template(group, tools=tools, chat_template=template, tokenize=True,
                                                return_dict=True, return_assistant_tokens_mask=masked)
            for i, ids in enumerate(out["input_ids"]):
                context = all_contexts[len(input_ids)]
                input_ids.append(ids)
                if masked and context:
                    mask = _mask_without_context(tokenizer, template, group[i], tools, context, out.encodings[i])
                    labels.append([t if m else IGNORE for t, m in zip(ids, mask, strict=True)])
                elif masked:
                    mask = out["assistant_masks"][i]
                    labels.append([t if m else IGNORE for t, m in zip(ids, mask, strict=True)])
                else:
                    labels.append(list(ids))
    return input_ids, labels


def _mask_without_context(tokenizer, template: str, messages: list[dict], tools, context: tuple[int, ...],
                          encoding) -> list[bool]:
    """apply_chat_template's assistant mask (its loop over the token offsets) over the generation spans of the
    assistant turns that are not left in the context."""
    from transformers.utils.chat_template_utils import render_jinja_template

    (text,), (spans,) = render_jinja_template(conversations=[messages], tools=tools, chat_template=template,
                                             return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
    kept = supervised_spans(spans, text, messages, context)
    return _assistant_mask_loop([encoding], [kept], len(encoding)).tolist()


def _rust_backend(tokenizer):
    """The tokenizers.Tokenizer behind a fast tokenizer, set up as `tokenizer(text)` would use it (no
    padding, no truncation, special tokens as the tokenizer says); None for a Python-only tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is None or not hasattr(backend, "encode_batch"):
        return None
    if backend.truncation is not None:
        backend.no_truncation()
    if backend.padding is not None:
        backend.no_padding()
    split_special = getattr(tokenizer, "split_special_tokens", False)
    if hasattr(backend, "encode_special_tokens") and backend.encode_special_tokens != split_special:
        backend.encode_special_tokens = split_special
    return backend


def _assistant_mask(encodings, spans: list[list[tuple[int, int]]], total: int) -> np.ndarray:
    """Per token: does it overlap a {% generation %} span, exactly as apply_chat_template decides (one pass
    over the tokens with a span pointer that only moves forward), computed on arrays for a whole chunk."""
    n = len(encodings)
    offsets = np.fromiter(chain.from_iterable(chain.from_iterable(e.offsets for e in encodings)),
                          dtype=np.int64, count=2 * total).reshape(-1, 2)
    span_counts = np.fromiter(map(len, spans), dtype=np.int64, count=n)
    flat_spans = np.fromiter(chain.from_iterable(chain.from_iterable(spans)), dtype=np.int64,
                             count=2 * int(span_counts.sum())).reshape(-1, 2)
    span_record = np.repeat(np.arange(n, dtype=np.int64), span_counts)
    if len(flat_spans) > 1:
        same = span_record[1:] == span_record[:-1]
        if np.any(same & (flat_spans[1:, 1] < flat_spans[:-1, 1])):  # spans out of order: the plain loop
            return _assistant_mask_loop(encodings, spans, total)
    if total == 0 or len(flat_spans) == 0:
        return np.zeros(total, dtype=bool)
    lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=n)
    token_record = np.repeat(np.arange(n, dtype=np.int64), lengths)
    # One key space for the whole chunk: record i's positions live in [i * stride, (i + 1) * stride).
    stride = int(max(offsets.max(initial=0), flat_spans.max(initial=0))) + 1
    # The pointer moves past a span once a token starts at or after its end: it follows the running max start.
    reached = np.maximum.accumulate(token_record * stride + offsets[:, 0])
    span_keys = span_record * stride + flat_spans[:, 1]
    pointer = np.searchsorted(span_keys, reached, side="right")  # first span ending after it
    valid = pointer < len(span_keys)
    pointer = np.minimum(pointer, len(span_keys) - 1)
    return valid & (span_record[pointer] == token_record) & (offsets[:, 1] > flat_spans[pointer, 0])


def _assistant_mask_at_bounds(encodings, spans: list[list[tuple[int, int]]], bounds: np.ndarray) -> np.ndarray:
    """_assistant_mask without reading every token's offsets into Python (a third of the tokenize time): the
    tokens a span [s, e) overlaps are the run from the first token ending after s to the last starting before e,
    found by asking the Rust encoding at the span's two ends (char_to_token, token_to_chars). Exact where token
    offsets never go back, as tokenizers give them; a record whose spans are empty or out of order takes the
    one-pass loop over its offsets."""
    mask = np.zeros(int(bounds[-1]), dtype=bool)
    for index, (encoding, record_spans) in enumerate(zip(encodings, spans, strict=True)):
        base, n = int(bounds[index]), len(encoding)
        if not record_spans or not n:
            continue
        ordered = all(s < e for s, e in record_spans) and all(
            record_spans[k][1] <= record_spans[k + 1][0] for k in range(len(record_spans) - 1))
        if not ordered:
            mask[base:base + n] = _assistant_mask_loop([encoding], [record_spans], n)
            continue
        for start, end in record_spans:
            first, last = _first_token_ending_after(encoding, n, start, end), _last_token_starting_before(
                encoding, n, start, end)
            if first is not None and last is not None and first <= last:
                mask[base + first:base + last + 1] = True
    return mask


def _first_token_ending_after(encoding, n: int, start: int, end: int) -> int | None:
    for char in range(start, end):  # the first char of the span that a token covers (almost always `start`)
        token = encoding.char_to_token(char)
        if token is not None:
            while token > 0 and (encoding.token_to_chars(token - 1) or (0, 0))[1] > start:  # shared offsets
                token -= 1
            return token
    return None


def _last_token_starting_before(encoding, n: int, start: int, end: int) -> int | None:
    for char in range(end - 1, start - 1, -1):
        token = encoding.char_to_token(char)
        if token is not None:
            while token + 1 < n and (encoding.token_to_chars(token + 1) or (end, end))[0] < end:
                token += 1
            return token
    return None


def _assistant_mask_loop(encodings, spans, total: int) -> np.ndarray:
    mask = np.zeros(total, dtype=bool)
    at = 0
    for encoding, record_spans in zip(encodings, spans, strict=True):
        span_idx = 0
        for token_id, (token_start, token_end) in enumerate(encoding.offsets):
            while span_idx < len(record_spans) and token_start >= record_spans[span_idx][1]:
                span_idx += 1
            if span_idx == len(record_spans):
                break
            if token_end > record_spans[span_idx][0]:
                mask[at + token_id] = True
        at += len(encoding)
    return mask


# --- the mask without offsets ---
#
# Offsets cost the Rust tokenizer about a sixth of its time (encode_batch_fast skips them). Added tokens split a
# text into pieces that are tokenized one by one, so a generation span whose both ends sit on piece edges covers
# whole pieces: the tokens between the matching added tokens, found by their ids. Where a span end falls inside a
# piece, or the added tokens in the ids are not the ones found in the text, that record takes the offsets.

# char::is_whitespace in Rust (Unicode White_Space): what an rstrip added token takes after it
RUST_WHITESPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000"


@dataclass(frozen=True)
class AddedTokens:
    """A tokenizer's added tokens as it finds them in a text: leftmost, longest, with the whitespace an rstrip
    token takes; group k of the pattern is the token ids[k - 1]."""

    pattern: re.Pattern
    ids: tuple[int, ...]
    id_set: np.ndarray  # sorted
    contents: tuple[str, ...]


def added_tokens(backend) -> "AddedTokens | None":
    """The added tokens of a Rust tokenizer, or None where they can't be found in the text this way: a token
    matched after normalization, with lstrip or single_word, special tokens split like text, no fast encode.
    Read afresh each time (a few microseconds; re caches the compiled pattern): tokens may be added later."""
    decoder = backend.get_added_tokens_decoder() if hasattr(backend, "get_added_tokens_decoder") else None
    if (decoder is None or not hasattr(backend, "encode_batch_fast") or getattr(backend, "encode_special_tokens", False)
            or any(t.normalized or t.lstrip or t.single_word for t in decoder.values())):
        return None
    # Alternatives grouped by their first character (longest first within a group): the regex engine then
    # looks for those characters, not for every alternative at every position (~100x faster).
    by_first: dict[str, list[tuple[int, object]]] = {}
    for token_id, token in sorted(decoder.items(), key=lambda item: (-len(item[1].content), item[0])):
        if token.content:
            by_first.setdefault(token.content[0], []).append((token_id, token))
    ids, groups = [], []
    for first, tokens in by_first.items():
        ids += [token_id for token_id, _ in tokens]
        groups.append(re.escape(first) + "(?:" + "|".join(
            f"({re.escape(t.content[1:])})" + (f"[{RUST_WHITESPACE}]*" if t.rstrip else "") for _, t in tokens)
            + ")")
    return AddedTokens(re.compile("|".join(groups) or "(?!)"), tuple(ids), np.array(sorted(decoder), dtype=np.int32),
                       tuple(t.content for t in decoder.values()))


@dataclass
class Backend:
    """The Rust tokenizer as `tokenizer(text)` uses it, and what the offset-free path needs of it."""

    tokenizer: Any
    added: AddedTokens | None  # None: masks need the offsets (encode_batch)
    plain: bool = False  # its Metaspace step can be done in Python: encode without it, texts with spaces replaced
    replacement: str = "\u2581"
    prepend_first: bool = False

    def encode_plain(self, texts: list[str]) -> list:
        """encode_batch_fast with the pre-tokenizer taken out for the call (put back whatever happens): cheaper
        than a copy of the tokenizer (0.15 s to build), and nothing else uses it meanwhile."""
        pre_tokenizer = self.tokenizer.pre_tokenizer
        self.tokenizer.pre_tokenizer = None
        try:
            return self.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
        finally:
            self.tokenizer.pre_tokenizer = pre_tokenizer


def rust_backend(tokenizer) -> Backend | None:
    backend = _rust_backend(tokenizer)
    if backend is None:
        return None
    added = added_tokens(backend)
    return Backend(backend, added, *_metaspace_step(backend, added))


def _metaspace_step(backend, added: AddedTokens | None) -> tuple:
    """For a tokenizer whose only text step is a Metaspace pre-tokenizer without split (Phi-3 and Llama 2 style
    SentencePiece): (True, its replacement character, its prepend rule). Replacing the spaces in Python and
    encoding without that step gives the same ids ~10% faster (Rust's replace keeps an alignment per character).
    Empty where that does not hold."""
    pre = backend.pre_tokenizer
    if (added is None or backend.normalizer is not None or type(pre).__name__ != "Metaspace" or pre.split
            or pre.prepend_scheme not in ("first", "never")
            or any(" " in content or pre.replacement in content for content in added.contents)):
        return ()
    return True, pre.replacement, pre.prepend_scheme == "first"


def _plain_texts(texts: list[str], matches: list[list[re.Match]], backend: Backend) -> list[str]:
    """The texts as the Metaspace step leaves the pieces between added tokens: spaces replaced, the replacement
    prepended to a first piece that starts the text (prepend_scheme first). The added tokens and the whitespace
    an rstrip one takes stay as they are: the tokenizer still finds them."""
    replacement, out = backend.replacement, []
    for text, found in zip(texts, matches, strict=True):
        parts, at = [], 0
        for match in found:
            start, end = match.span()
            parts += (text[at:start].replace(" ", replacement), text[start:end])
            at = end
        parts.append(text[at:].replace(" ", replacement))
        if backend.prepend_first and parts[0] and not parts[0].startswith(replacement):
            parts[0] = replacement + parts[0]
        out.append("".join(parts))
    return out


def _mask_at_added_tokens(texts: list[str], spans: list[list[tuple[int, int]]], ids: np.ndarray,
                          bounds: np.ndarray, added: AddedTokens, matches: list[list[re.Match]] | None = None
                          ) -> tuple[np.ndarray, list[int]]:
    """The assistant mask of the records whose spans all start and end on piece edges, and the indices of the
    others (their part of the mask is left False). matches: added.pattern's matches in each text, if known."""
    if matches is None:
        matches = [list(added.pattern.finditer(text)) for text in texts]
    mask = np.zeros(len(ids), dtype=bool)
    positions = np.flatnonzero(np.isin(ids, added.id_set))
    cuts = np.searchsorted(positions, bounds).tolist()
    positions_list, found_ids = positions.tolist(), ids[positions].tolist()
    token_ids, bounds_list = added.ids, bounds.tolist()
    misses = []
    for index, (text, record_spans) in enumerate(zip(texts, spans, strict=True)):
        if not record_spans:
            continue
        base, k, end = bounds_list[index], cuts[index], cuts[index + 1]
        token_at = {0: 0}  # char edge of a piece -> the token edge it maps to
        ok = True
        for match in matches[index]:
            if k == end or found_ids[k] != token_ids[match.lastindex - 1]:
                ok = False
                break
            at = positions_list[k] - base
            for char, token in ((match.start(), at), (match.end(), at + 1)):
                if token_at.setdefault(char, token) != token:  # an empty piece between: no token either
                    ok = False
            k += 1
        if ok and k == end and token_at.setdefault(len(text), bounds_list[index + 1] - base) == \
                bounds_list[index + 1] - base:
            for start, stop in record_spans:
                first, last = token_at.get(start), token_at.get(stop)
                if first is None or last is None:
                    ok = False
                    break
                mask[base + first:base + last] = True
        else:
            ok = False
        if not ok:
            mask[base:bounds_list[index + 1]] = False
            misses.append(index)
    return mask, misses


def _without_none(conversation: list[dict]) -> list[dict]:
    # What apply_chat_template does to each message before rendering (drops keys whose value is None).
    if all(isinstance(m, dict) and None not in m.values() for m in conversation):
        return conversation
    return [{k: v for k, v in m.items() if v is not None} if isinstance(m, dict) else m for m in conversation]


REASONING_KEYS = frozenset(("reasoning_content", "thinking", "reasoning"))  # what the library aliases


def _plain_strings(conversation: list[dict]) -> bool:
    """Messages of string values only, none of them reasoning: what render_jinja_template would pass to the
    template unchanged (its copy into plain JSON types and its reasoning aliases change nothing)."""
    return all(type(m) is dict and all(type(v) is str for v in m.values()) and not (m.keys() & REASONING_KEYS)
               for m in conversation)


def _plain_json(value: Any) -> bool:
    kind = type(value)
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return True
    if kind is list:
        return all(map(_plain_json, value))
    return kind is dict and all(type(k) is str and _plain_json(v) for k, v in value.items())


def _plain_data(conversation: list[dict], tools: list[dict] | None) -> bool:
    """Messages (and tools) of plain JSON types, no message value null, no reasoning: what render_jinja_template
    would pass to the template unchanged (as _plain_strings, for conversations with tool calls and tools)."""
    return (all(type(m) is dict and not (m.keys() & REASONING_KEYS) and all(v is not None for v in m.values())
                and _plain_json(m) for m in conversation) and _plain_json(tools))


def _render_direct(messages: list[list[dict]], template: str, special_tokens: dict,
                   tools: list[list[dict] | None] | None = None) -> tuple[list, list] | None:
    """render_jinja_template(..., return_assistant_tokens_mask=True) for conversations of _plain_strings (or
    _plain_data, with their tools), without its per-conversation copy (a fifth of the render time): the same
    compiled template and span tracker, called as it calls them (private functions: private_api.CHAT_TEMPLATE).
    None where this transformers lacks them."""
    from transformers.utils import chat_template_utils

    compile_template = getattr(chat_template_utils, "_compile_jinja_template", None)
    render = getattr(chat_template_utils, "_render_with_assistant_indices", None)
    plain = getattr(chat_template_utils, "_plain_template_data", None)
    if compile_template is None or render is None or plain is None:
        return None
    compiled = compile_template(template)
    special_tokens = plain(special_tokens)
    texts, spans = [], []
    for conversation, record_tools in zip(messages, tools or [None] * len(messages), strict=True):
        text, indices = render(compiled, conversation, record_tools, None, False, **special_tokens)
        texts.append(text)
        spans.append(indices)
    return texts, spans


def _render(messages: list[list[dict]], tools: list[list[dict] | None], contexts: list[tuple[int, ...]],
            template: str, masked: bool, special_tokens: dict) -> tuple[list[str], list]:
    """The texts and, when masked, the generation spans of the assistant turns to supervise."""
    texts, spans = _render_all(messages, tools, template, masked, special_tokens)
    if masked:
        for i, context in enumerate(contexts):
            if context:
                spans[i] = supervised_spans(spans[i], texts[i], messages[i], context)
    return texts, spans


def _render_all(messages: list[list[dict]], tools: list[list[dict] | None], template: str, masked: bool,
                special_tokens: dict, add_generation_prompt: bool = False) -> tuple[list[str], list]:
    """Every conversation through the template (add_generation_prompt: ending with the assistant's header, as a
    prompt is rendered for generation). An extended template's preamble leaves a conversation without tools,
    calls, results or traces as it is, so those go to the template it extends, the same text at half the render
    time (tests/test_data_fields.py holds the two equal)."""
    parts = unextended(template)
    if parts is None:
        return _render_with(messages, tools, template, masked, special_tokens, add_generation_prompt)
    base, tools_mode, think_mode = parts
    plain = [passes_through(m, t, tools_mode, think_mode) for m, t in zip(messages, tools, strict=True)]
    if all(plain):
        return _render_with(messages, tools, base, masked, special_tokens, add_generation_prompt)
    if not any(plain):
        return _render_with(messages, tools, template, masked, special_tokens, add_generation_prompt)
    texts: list = [None] * len(messages)
    spans: list = [None] * len(messages)
    for chosen, with_template in ((True, base), (False, template)):
        where = [i for i, p in enumerate(plain) if p == chosen]
        got = _render_with([messages[i] for i in where], [tools[i] for i in where], with_template, masked,
                           special_tokens, add_generation_prompt)
        for i, text, span in zip(where, *got, strict=True):
            texts[i], spans[i] = text, span
    return texts, spans


def _render_with(messages: list[list[dict]], tools: list[list[dict] | None], template: str, masked: bool,
                 special_tokens: dict, add_generation_prompt: bool = False) -> tuple[list[str], list]:
    from transformers.utils.chat_template_utils import render_jinja_template

    kwargs = {"chat_template": template, "return_assistant_tokens_mask": masked,
              "add_generation_prompt": add_generation_prompt, **special_tokens}
    if masked and not add_generation_prompt and (all(map(_plain_strings, messages)) if not any(tools) else
                   all(map(_plain_data, messages, tools))):
        direct = _render_direct(messages, template, special_tokens, tools)
        if direct is not None:
            return direct
    if not any(tools):
        texts, spans = render_jinja_template(conversations=[_without_none(c) for c in messages], **kwargs)
        return texts, spans if masked else [[] for _ in texts]  # unmasked, the library gives no spans at all
    texts, spans = [], []
    for conversation, record_tools in zip(messages, tools, strict=True):
        (text,), found = render_jinja_template(conversations=[_without_none(conversation)], tools=record_tools,
                                               **kwargs)
        texts.append(text)
        spans.append(found[0] if masked else [])
    return texts, spans


def _encodings(texts: list[str], backend: Backend) -> tuple[list, list | None]:
    """The Rust tokenizer's encodings of the texts (as `tokenizer(text, add_special_tokens=False)`), and the added
    tokens found in each text (None where the tokenizer needs offsets for masks)."""
    added, matches = backend.added, None
    if added is not None:  # no offsets needed: the fast encode, without the Metaspace step where it can
        matches = [list(added.pattern.finditer(text)) for text in texts]
        if backend.plain:
            encodings = backend.encode_plain(_plain_texts(texts, matches, backend))
        else:
            encodings = backend.tokenizer.encode_batch_fast(texts, add_special_tokens=False)
    else:
        encodings = backend.tokenizer.encode_batch(texts, add_special_tokens=False)
    return encodings, matches


def _flat_ids(encodings: list) -> tuple[np.ndarray, np.ndarray]:
    """The encodings' token ids, flat (int32), and the bounds of each (int64, one more than there are)."""
    lengths = np.fromiter(map(len, encodings), dtype=np.int64, count=len(encodings))
    bounds = np.zeros(len(encodings) + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    return np.fromiter(chain.from_iterable(e.ids for e in encodings), dtype=np.int32, count=int(bounds[-1])), bounds


def encode_texts(texts: list[str], backend: Backend) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of the texts as `tokenizer(text, add_special_tokens=False)` gives them, flat, with their bounds."""
    return _flat_ids(_encodings(texts, backend)[0])


def _encode(messages: list[list[dict]], tools: list[list[dict] | None], contexts: list[tuple[int, ...]], tokenizer,
            backend: Backend, template: str, masked: bool) -> Tokenized:
    texts, spans = _render(messages, tools, contexts, template, masked, tokenizer.special_tokens_map)
    added = backend.added
    encodings, matches = _encodings(texts, backend)
    ids, bounds = _flat_ids(encodings)
    if not masked:
        return Tokenized(ids, ids.copy(), bounds)
    if added is None:
        mask = _assistant_mask_at_bounds(encodings, spans, bounds)
    else:
        mask, misses = _mask_at_added_tokens(texts, spans, ids, bounds, added, matches)
        if misses:  # these records' spans need the token offsets
            again = backend.tokenizer.encode_batch([texts[i] for i in misses], add_special_tokens=False)
            sub_bounds = np.zeros(len(misses) + 1, dtype=np.int64)
            np.cumsum([len(e) for e in again], out=sub_bounds[1:])
            sub_mask = _assistant_mask_at_bounds(again, [spans[i] for i in misses], sub_bounds)
            for at, index in enumerate(misses):
                mask[bounds[index]:bounds[index + 1]] = sub_mask[sub_bounds[at]:sub_bounds[at + 1]]
    labels = np.where(mask, ids, np.int32(IGNORE)).astype(np.int32)
    return Tokenized(ids, labels, bounds)


def encode_chunk(conversations: list, tokenizer, backend, template: str, loss_on: str,
                 reasoning: str = "inline") -> Tokenized:
    """One chunk in this process: the fast path, or the reference where the tokenizer has no Rust backend."""
    if backend is None:
        return Tokenized.from_lists(*tokenize_reference(conversations, tokenizer, template, loss_on,
                                                        reasoning=reasoning))
    messages, tools, contexts = template_inputs(conversations, reasoning != "drop")
    return _encode(messages, tools, contexts, tokenizer, backend, template, loss_on == "assistant")


def tokenize_flat(conversations: list, tokenizer, template: str, loss_on: str, chunk: int = CHUNK_RECORDS,
                  reasoning: str = "inline") -> Tokenized:
    """Token ids and labels (IGNORE outside the supervised assistant turns when loss_on is 'assistant') of every
    conversation (canonical, or a plain list of messages), the same as `tokenize_reference`, fast, in this process
    (the data stage forks workers for large inputs), `chunk` records at a time. reasoning: data.reasoning ("drop"
    renders the conversations without their traces)."""
    backend = rust_backend(tokenizer)
    return Tokenized.concat([encode_chunk(conversations[start:start + chunk], tokenizer, backend, template, loss_on,
                                          reasoning) for start in range(0, len(conversations), chunk)])


def tokenize(conversations: list, tokenizer, template: str, loss_on: str,
             batch_size: int = 512, reasoning: str = "inline") -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and labels per conversation, as lists (see tokenize_flat)."""
    return tokenize_flat(conversations, tokenizer, template, loss_on, reasoning=reasoning).to_lists()
