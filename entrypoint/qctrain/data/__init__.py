"""The data stage, as a package: sources (readers) -> formats (one canonical conversation per record) ->
template (chat template, training twin, tool fallback) -> tokens (fast path + reference) -> pack -> stage
(the streaming preparation, its cache and report). `from qctrain import data` gives the stage's API."""

from qctrain.data.formats import (
    ASSISTANT,
    BAD_REASONS,
    SYSTEM,
    TOOL,
    USER,
    BadRecord,
    alpaca_conversation,
    check_turns,
    conversation_id,
    conversation_messages,
    detect_format,
    messages_conversation,
    read_tools_file,
    sharegpt_conversation,
    to_conversation,
    unread_keys,
)
from qctrain.data.pack import (
    best_fit_decreasing,
    fit_length_flat,
    fit_length_outcomes,
    render_marked,
    to_dataset_flat,
    token_stats_flat,
)
from qctrain.data.sources import (
    FILE_TYPES,
    Record,
    is_hub_source,
    os_error_text,
    read_file,
    read_source,
    source_files,
    source_fingerprint,
)
from qctrain.data.stage import (
    PREP_VERSION,
    PreparedData,
    count_totals,
    data_fingerprint,
    dedup,
    fingerprint,
    load_prepared,
    prepare,
    split_mask,
    unique_indices,
)
from qctrain.data.template import (
    NO_TWIN,
    THINK_CLOSE,
    THINK_OPEN,
    TOOLS_HEADER,
    Rendering,
    extend_template,
    has_generation_markers,
    rendering,
    resolve_chat_template,
    template_extension,
    template_inputs,
    template_renders_reasoning,
    template_renders_tools,
    training_template,
    training_twin,
    trl_template_names,
)
from qctrain.data.tokens import (
    IGNORE,
    PREP_WORKERS_ENV,
    Tokenized,
    prep_workers,
    tokenize,
    tokenize_flat,
    tokenize_reference,
)

__all__ = [
    "ASSISTANT", "BAD_REASONS", "FILE_TYPES", "IGNORE", "PREP_VERSION", "PREP_WORKERS_ENV", "SYSTEM", "TOOL",
    "THINK_CLOSE", "THINK_OPEN", "TOOLS_HEADER", "USER", "BadRecord", "PreparedData", "Record", "Rendering",
    "Tokenized", "alpaca_conversation", "best_fit_decreasing", "check_turns", "conversation_id",
    "conversation_messages", "count_totals", "data_fingerprint", "dedup", "detect_format", "extend_template",
    "fingerprint",
    "fit_length_flat", "fit_length_outcomes", "rendering", "template_extension", "template_renders_reasoning",
    "is_hub_source", "load_prepared", "split_mask", "messages_conversation", "os_error_text", "prep_workers", "prepare",
    "read_file", "read_source", "read_tools_file", "unread_keys", "render_marked", "resolve_chat_template",
    "sharegpt_conversation", "source_files", "source_fingerprint", "template_inputs", "template_renders_tools",
    "to_conversation", "to_dataset_flat", "token_stats_flat", "tokenize", "tokenize_flat", "tokenize_reference",
    "training_template", "training_twin", "trl_template_names", "has_generation_markers", "NO_TWIN", "unique_indices",
]
