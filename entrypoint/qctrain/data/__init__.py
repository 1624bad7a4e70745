"""The data stage, as a package: sources (readers) -> formats (one canonical conversation per record) ->
template (chat template, training twin, the extension for tools and traces) -> tokens (the fast path, and the
library's way it matches) -> pack (length fit, statistics, packing) -> stage (the streaming preparation on forked
workers (workers), its cache and report); preference data (method dpo, kto): preference (one canonical pair or
labelled completion per record) -> pairs (tokenized as TRL does, checked and fitted, through stage's scan and
split). `from qctrain import data` gives what the other stages use; the modules' own names are theirs
(`from qctrain.data import formats`)."""

from qctrain.data.formats import read_tools_file
from qctrain.data.sources import is_hub_source, os_error_text, source_files
from qctrain.data.stage import PreparedData, fingerprint, prepare
from qctrain.data.template import extend_template, resolve_chat_template, training_twin
from qctrain.data.tokens import IGNORE, tokenize

__all__ = [
    "IGNORE", "PreparedData", "extend_template", "fingerprint", "is_hub_source", "os_error_text", "prepare",
    "read_tools_file", "resolve_chat_template", "source_files", "tokenize", "training_twin",
]
