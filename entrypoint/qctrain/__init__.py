"""qc-train-phi: one YAML recipe in, a trained QLoRA adapter out."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("qc-train-phi")
except PackageNotFoundError:  # running from a source tree without install
    __version__ = "0.0.0+unknown"

# The image's build facts (docker/Dockerfile sets them): `doctor` prints them, run_manifest.json records them.
PROVENANCE_VARS = ("QCTRAIN_IMAGE_VERSION", "QCTRAIN_GIT_REVISION", "QCTRAIN_BUILD_DATE", "QCTRAIN_IMAGE_DIGEST")
