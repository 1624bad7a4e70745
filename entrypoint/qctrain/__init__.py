"""qc-train-phi: one YAML recipe in, a trained QLoRA adapter out."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qc-train-phi")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"
