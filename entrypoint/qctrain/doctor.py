"""`qctrain doctor`: print what this machine/image can do for QLoRA training, and whether it is sound.

Reports torch (version, the CUDA it was built with, whether CUDA is usable, each GPU's name and
memory), bitsandbytes (version, backend, which native library it loaded), Python, qctrain and the
image provenance (QCTRAIN_* environment). Exit 0 when the stack works, including on a machine
without a GPU (training then runs on CPU, slowly); exit 3 (ExitCode.ENVIRONMENT) when it is broken:
torch or bitsandbytes does not import, CUDA is available but bitsandbytes did not load its CUDA
library, or a 4-bit (NF4) quantize/dequantize round trip of a small tensor fails.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from typing import TextIO

from qctrain import PROVENANCE_VARS
from qctrain.errors import ExitCode, InputError
from qctrain.hubtoken import resolve_token

# NF4 round trips of N(0, 1) data lose about 9% (mean |error| / mean |x|); far beyond that the
# kernels compute garbage.
MAX_ROUNDTRIP_REL_ERROR = 0.25


def _qctrain_version() -> str:
    from qctrain import __version__

    return __version__


def _cuda_available(torch) -> bool:
    return bool(torch.cuda.is_available())


def _gpu_facts(torch) -> list[tuple[str, str]]:
    """(label, value) lines about the visible GPUs; called only when CUDA is available."""
    count = torch.cuda.device_count()
    facts = [("GPUs", str(count))]
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        memory = f"{props.total_memory / 2**30:.1f} GiB"
        capability = f"compute capability {props.major}.{props.minor}"
        facts.append(("", f"cuda:{index} {props.name}, {memory}, {capability}"))
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    facts.append(("cuDNN", str(cudnn or "not available")))
    facts.append(("bf16 supported", "yes" if torch.cuda.is_bf16_supported() else "no"))
    return facts


def _bnb_library(bnb) -> tuple[str, bool, str | None]:
    """(description of the loaded native library, whether it is a CUDA build, load error or None)."""
    from bitsandbytes import cextension

    lib = cextension.lib
    if type(lib).__name__.startswith("ErrorHandlerMock"):  # bitsandbytes' stand-in after a failed load
        return "none (failed to load)", False, str(getattr(lib, "error_msg", "unknown error"))
    cdll = lib.__dict__.get("_lib")
    path = getattr(cdll, "_name", None) or "unknown"
    return path, bool(getattr(lib, "compiled_with_cuda", False)), None


def _quant_roundtrip(torch, device: str) -> float:
    """NF4-quantize and dequantize a small tensor on `device`; return the relative mean error."""
    import bitsandbytes.functional as F

    generator = torch.Generator().manual_seed(0)
    original = torch.randn(128, 64, generator=generator).to(device)
    packed, state = F.quantize_4bit(original, quant_type="nf4", blocksize=64)
    restored = F.dequantize_4bit(packed, state)
    if restored.shape != original.shape:
        raise RuntimeError(f"dequantized shape {tuple(restored.shape)} != {tuple(original.shape)}")
    error = (original.float() - restored.float()).abs().mean() / original.float().abs().mean()
    return float(error)


def _disk_free(path: str) -> str:
    try:
        return f"{shutil.disk_usage(path).free / 2**30:.1f} GiB free"
    except OSError as exc:
        return f"unavailable ({exc.strerror or exc})"


def run_doctor(out: TextIO = sys.stdout) -> int:
    problems: list[str] = []
    warnings: list[str] = []

    def say(label: str, value: object) -> None:
        print(f"{label:<24} {value}", file=out)

    say("qctrain", _qctrain_version())
    say("python", f"{platform.python_version()} ({sys.executable})")
    say("platform", f"{platform.system()} {platform.release()} {platform.machine()}")
    for name in PROVENANCE_VARS:
        say(name, os.environ.get(name) or "(not set)")

    try:
        import torch
    except Exception as exc:  # any import failure is an environment problem
        say("torch", f"IMPORT FAILED: {exc}")
        problems.append(f"torch does not import: {exc}")
        return _finish(out, problems, warnings)

    say("torch", torch.__version__)
    say("torch CUDA build", torch.version.cuda or "none (CPU-only build)")
    cuda = False
    try:
        cuda = _cuda_available(torch)
        say("CUDA available", "yes" if cuda else "no")
        if cuda:
            for label, value in _gpu_facts(torch):
                say(label, value)
        else:
            say("GPUs", "none visible (training would run on CPU; in Docker: --gpus all)")
            if os.path.exists("/dev/nvidiactl") or os.path.isdir("/proc/driver/nvidia"):
                warnings.append(
                    "an NVIDIA driver is present but torch sees no GPU: check CUDA_VISIBLE_DEVICES, "
                    "the driver version (torch's CUDA build needs a driver that supports it) and "
                    "the container's GPU access"
                )
    except Exception as exc:
        problems.append(f"CUDA query failed: {exc}")
        say("CUDA", f"QUERY FAILED: {exc}")

    try:
        import bitsandbytes as bnb
    except Exception as exc:
        say("bitsandbytes", f"IMPORT FAILED: {exc}")
        problems.append(f"bitsandbytes does not import: {exc}")
        return _finish(out, problems, warnings)

    say("bitsandbytes", bnb.__version__)
    try:
        path, is_cuda_lib, load_error = _bnb_library(bnb)
    except Exception as exc:
        path, is_cuda_lib, load_error = "unknown", False, f"cannot inspect: {exc}"
    say("bitsandbytes library", path)
    if load_error:
        say("bitsandbytes error", load_error.strip().splitlines()[0] if load_error.strip() else "?")
        if cuda:
            problems.append(f"bitsandbytes could not load its native library: {load_error.strip()}")
    elif cuda and not is_cuda_lib:
        problems.append(f"CUDA is available but bitsandbytes loaded a non-CUDA library ({path})")

    device = "cuda" if cuda else "cpu"
    try:
        error = _quant_roundtrip(torch, device)
        ok = error <= MAX_ROUNDTRIP_REL_ERROR
        say(f"4-bit round trip ({device})", f"{'ok' if ok else 'WRONG'}, relative error {error:.3f}")
        if not ok:
            problems.append(
                f"NF4 round trip on {device} is off: relative error {error:.3f} > {MAX_ROUNDTRIP_REL_ERROR}"
            )
    except Exception as exc:
        say(f"4-bit round trip ({device})", f"FAILED: {exc}")
        problems.append(f"4-bit quantize/dequantize on {device} failed: {exc}")

    hf_home = os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface")
    say("HF_HOME", f"{hf_home} ({_disk_free(hf_home) if os.path.isdir(hf_home) else 'does not exist yet'})")
    try:
        token = resolve_token()
    except InputError as err:  # HF_TOKEN_FILE names a file that cannot be read, or an empty one
        say("HF token", f"{err} (NOT READABLE)")
        warnings.append(str(err))
    else:
        if token is None:
            say("HF token", "not set (fine for public models and no Hub push)")
        else:
            say("HF token", "set (HF_TOKEN)" if os.environ.get("HF_TOKEN", "").strip()
                else f"HF_TOKEN_FILE={os.environ['HF_TOKEN_FILE']} (readable)")
    say("working dir", f"{os.getcwd()} ({_disk_free(os.getcwd())})")

    return _finish(out, problems, warnings)


def _finish(out: TextIO, problems: list[str], warnings: list[str]) -> int:
    for warning in warnings:
        print(f"warning: {warning}", file=out)
    if problems:
        for problem in problems:
            print(f"problem: {problem}", file=out)
        print(f"doctor: BROKEN ({len(problems)} problem(s)); exit {int(ExitCode.ENVIRONMENT)}", file=out)
        return int(ExitCode.ENVIRONMENT)
    print("doctor: OK", file=out)
    return int(ExitCode.OK)


if __name__ == "__main__":
    raise SystemExit(run_doctor())
