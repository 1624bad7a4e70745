"""`qctrain doctor [RECIPE]`: what this machine can do for QLoRA training, checked in seconds, before a paid GPU
hour is wasted.

The stack: torch (version, CUDA build, each GPU, its architecture against the ones torch was built for),
bitsandbytes (version, the native library it loaded, a 4-bit round trip), Python, qctrain and the image's
provenance (QCTRAIN_* environment). The host: the NVIDIA driver and CUDA forward compatibility
(qctrain.cudacompat) and which libcuda was loaded (host or compat), /dev/shm against what DataLoader workers
and NCCL need, the folders the run writes (writable by this uid?), free disk, the HF cache. With a RECIPE
these are checked against it: its output.dir, its DataLoader workers, its model's size and cache state.

Exit 0 when the stack works, including on a machine without a GPU (training then runs on CPU, slowly);
exit 3 (ExitCode.ENVIRONMENT) when something here would make the run fail: a problem line says what.
Warnings never change the exit code.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from qctrain import PROVENANCE_VARS, cudacompat
from qctrain.errors import ExitCode, InputError
from qctrain.rundir import RunDir

# NF4 round trips of N(0, 1) data lose about 9% (mean |error| / mean |x|); far beyond that the
# kernels compute garbage.
MAX_ROUNDTRIP_REL_ERROR = 0.25
# NCCL's intra-node transport keeps its buffers in /dev/shm: with more than one GPU process on a node,
# Docker's 64 MB default fails ("unable to extend /dev/shm"); 1 GiB leaves room for every channel.
NCCL_SHM_BYTES = 1 << 30
GIB = 2**30


@dataclass
class Report:
    out: TextIO
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def say(self, label: str, value: object) -> None:
        print(f"{label:<24} {value}", file=self.out)

    def finish(self) -> int:
        for warning in self.warnings:
            print(f"warning: {warning}", file=self.out)
        if self.problems:
            for problem in self.problems:
                print(f"problem: {problem}", file=self.out)
            print(f"doctor: BROKEN ({len(self.problems)} problem(s)); exit {int(ExitCode.ENVIRONMENT)}", file=self.out)
            return int(ExitCode.ENVIRONMENT)
        print("doctor: OK", file=self.out)
        return int(ExitCode.OK)


def run_doctor(out: TextIO = sys.stdout, recipe=None, nproc: int | None = None) -> int:
    """Print the facts, then the warnings and problems; 0 when sound, 3 when not. `recipe`: a loaded Recipe
    to check the host against; `nproc`: GPU processes on this node (default: one per visible GPU)."""
    report = Report(out)
    _about_build(report)
    torch = _about_torch(report)
    if torch is None:
        return report.finish()
    cuda = _about_cuda(report, torch)
    _about_driver(report, cuda)
    if not _about_bitsandbytes(report, torch, cuda):
        return report.finish()
    processes = nproc if nproc is not None else (torch.cuda.device_count() if cuda else 1)
    _about_shm(report, recipe, processes)
    _about_folders(report, recipe)
    _about_disk(report, recipe)
    _about_hf_cache(report, recipe)
    _about_token(report)
    return report.finish()


# --- the stack ---

def _qctrain_version() -> str:
    from qctrain import __version__

    return __version__


def _about_build(report: Report) -> None:
    report.say("qctrain", _qctrain_version())
    report.say("python", f"{platform.python_version()} ({sys.executable})")
    report.say("platform", f"{platform.system()} {platform.release()} {platform.machine()}")
    for name in PROVENANCE_VARS:
        report.say(name, os.environ.get(name) or "(not set)")


def _about_torch(report: Report):
    try:
        import torch
    except Exception as exc:  # any import failure is an environment problem
        report.say("torch", f"IMPORT FAILED: {exc}")
        report.problems.append(f"torch does not import: {exc}")
        return None
    report.say("torch", torch.__version__)
    report.say("torch CUDA build", torch.version.cuda or "none (CPU-only build)")
    return torch


def _cuda_available(torch) -> bool:
    return bool(torch.cuda.is_available())


def _gpu_facts(torch) -> list[tuple[str, str]]:
    """(label, value) lines about the visible GPUs; called only when CUDA is available."""
    count = torch.cuda.device_count()
    facts = [("GPUs", str(count))]
    for index in range(count):
        props = torch.cuda.get_device_properties(index)
        memory = f"{props.total_memory / GIB:.1f} GiB"
        capability = f"compute capability {props.major}.{props.minor}"
        facts.append(("", f"cuda:{index} {props.name}, {memory}, {capability}"))
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    facts.append(("cuDNN", str(cudnn or "not available")))
    facts.append(("bf16 supported", "yes" if torch.cuda.is_bf16_supported() else "no"))
    return facts


def _gpu_architectures(torch) -> tuple[list[tuple[str, tuple[int, int]]], list[str]]:
    """(GPU name, compute capability) per visible GPU, and the architectures torch was built for."""
    gpus = [(torch.cuda.get_device_name(i), tuple(torch.cuda.get_device_capability(i)))
            for i in range(torch.cuda.device_count())]
    return gpus, list(torch.cuda.get_arch_list())


def arch_support(capability: tuple[int, int], arch_list: Iterable[str]) -> str | None:
    """How torch's kernels run on a GPU of this compute capability: 'native' (built for sm_XY), 'PTX' (JIT from
    an older compute_XY: works, the first start compiles), None (no kernels for it)."""
    code = capability[0] * 10 + capability[1]
    built = [(kind, int(number)) for kind, number in (re.match(r"(sm|compute)_(\d+)", a).groups()
                                                       for a in arch_list if re.match(r"(sm|compute)_\d+", a))]
    if ("sm", code) in built or any(kind == "sm" and n // 10 == code // 10 and n <= code for kind, n in built):
        return "native"
    return "PTX" if any(kind == "compute" and n <= code for kind, n in built) else None


def _about_cuda(report: Report, torch) -> bool:
    try:
        cuda = _cuda_available(torch)
        report.say("CUDA available", "yes" if cuda else "no")
        if not cuda:
            report.say("GPUs", "none visible (training would run on CPU; in Docker: --gpus all)")
            return False
        for label, value in _gpu_facts(torch):
            report.say(label, value)
        gpus, arch_list = _gpu_architectures(torch)
    except Exception as exc:
        report.problems.append(f"CUDA query failed: {exc}")
        report.say("CUDA", f"QUERY FAILED: {exc}")
        return False
    report.say("torch built for", " ".join(arch_list) or "(no architectures)")
    for name, capability in gpus:
        how = arch_support(capability, arch_list)
        if how is None:
            report.problems.append(f"{name} (sm_{capability[0]}{capability[1]}) is not among the GPU architectures "
                                   f"this torch was built for ({', '.join(arch_list)}): no kernels run on it")
        elif how == "PTX":
            report.warnings.append(f"{name} (sm_{capability[0]}{capability[1]}) runs torch's kernels JIT-compiled "
                                   "from PTX: the first start takes minutes")
    return True


def _bnb_library(bnb) -> tuple[str, bool, str | None]:
    """(description of the loaded native library, whether it is a CUDA build, load error or None)."""
    from bitsandbytes import cextension

    lib = cextension.lib
    if type(lib).__name__.startswith("ErrorHandlerMock"):  # bitsandbytes' stand-in after a failed load
        return "none (failed to load)", False, str(getattr(lib, "error_msg", "unknown error"))
    return _mapped_library("libbitsandbytes") or "unknown", bool(getattr(lib, "compiled_with_cuda", False)), None


def _mapped_library(prefix: str) -> str | None:
    """The path of the shared library named prefix* that this process has loaded (Linux: /proc/self/maps)."""
    try:
        with open("/proc/self/maps", encoding="utf-8") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and Path(fields[5].strip()).name.startswith(prefix):
                    return fields[5].strip()
    except OSError:
        pass
    return None


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


def _about_bitsandbytes(report: Report, torch, cuda: bool) -> bool:
    try:
        import bitsandbytes as bnb
    except Exception as exc:
        report.say("bitsandbytes", f"IMPORT FAILED: {exc}")
        report.problems.append(f"bitsandbytes does not import: {exc}")
        return False
    report.say("bitsandbytes", bnb.__version__)
    try:
        path, is_cuda_lib, load_error = _bnb_library(bnb)
    except Exception as exc:
        path, is_cuda_lib, load_error = "unknown", False, f"cannot inspect: {exc}"
    report.say("bitsandbytes library", path)
    if load_error:
        report.say("bitsandbytes error", load_error.strip().splitlines()[0] if load_error.strip() else "?")
        if cuda:
            report.problems.append(f"bitsandbytes could not load its native library: {load_error.strip()}")
    elif cuda and not is_cuda_lib:
        report.problems.append(f"CUDA is available but bitsandbytes loaded a non-CUDA library ({path})")
    _about_roundtrip(report, torch, "cuda" if cuda else "cpu")
    return True


def _about_roundtrip(report: Report, torch, device: str) -> None:
    label = f"4-bit round trip ({device})"
    try:
        error = _quant_roundtrip(torch, device)
    except Exception as exc:
        report.say(label, f"FAILED: {exc}")
        report.problems.append(f"4-bit quantize/dequantize on {device} failed: {exc}")
        return
    ok = error <= MAX_ROUNDTRIP_REL_ERROR
    report.say(label, f"{'ok' if ok else 'WRONG'}, relative error {error:.3f}")
    if not ok:
        report.problems.append(f"NF4 round trip on {device} is off: relative error {error:.3f} > "
                               f"{MAX_ROUNDTRIP_REL_ERROR}")


# --- the driver and the libcuda this process loaded ---

def _proc_maps() -> str:
    try:
        return Path("/proc/self/maps").read_text(errors="replace")
    except OSError:
        return ""


def libcuda_from_maps(maps: str) -> str | None:
    """The libcuda this process mapped (read after CUDA initialised), or None."""
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if len(line.split(maxsplit=5)) == 6 else ""
        if re.search(r"/libcuda\.so(\.|$)", path):
            return path
    return None


def libcuda_origin(path: str, facts: cudacompat.Facts) -> str:
    """'compat' when the loaded libcuda is the image's forward-compatibility one, else 'host'."""
    name = Path(path).name
    compat = os.path.normpath(facts.compat_dir)
    if os.path.normpath(path).startswith(compat + os.sep) or re.match(r"/usr/local/cuda[^/]*/compat/", path):
        return "compat"
    if facts.compat_version and name == f"libcuda.so.{facts.compat_version}" and facts.compat_version != facts.driver:
        return "compat"  # libnvidia-container's mount mode: the compat file mounted over the driver's folder
    return "host"


def _about_driver(report: Report, cuda: bool) -> None:
    facts = cudacompat.gather(full=True)
    decision = cudacompat.decide(facts)
    if facts.driver is None:
        report.say("NVIDIA driver", "none")
        return
    report.say("NVIDIA driver", f"{facts.driver} (R{cudacompat.major(facts.driver)})")
    report.say("CUDA compat libraries", f"{facts.compat_dir} ({facts.compat_version})" if facts.compat_version
               else "none in this image")
    report.say("driver verdict", f"{decision.verdict.value}: {decision.reason}")
    if decision.verdict is cudacompat.Verdict.UNSUPPORTED:
        report.problems.append(decision.reason)
    elif decision.verdict is cudacompat.Verdict.USE_COMPAT:
        report.problems.append(f"{decision.reason}, but this process was started without it (not through "
                               "the image's entrypoint): start it through docker/entrypoint.sh or with "
                               f"LD_LIBRARY_PATH={decision.ld_library_path}")
    if cuda:
        _about_libcuda(report, facts, decision)
    elif decision.usable:
        report.warnings.append("an NVIDIA driver is present but torch sees no GPU: check CUDA_VISIBLE_DEVICES "
                               "and the container's GPU access (--gpus all, the NVIDIA runtime)")


def _about_libcuda(report: Report, facts: cudacompat.Facts, decision: cudacompat.Decision) -> None:
    loaded = libcuda_from_maps(_proc_maps())
    if loaded is None:
        report.say("libcuda loaded", "not found in /proc/self/maps")
        return
    origin = libcuda_origin(loaded, facts)
    report.say("libcuda loaded", f"{loaded} ({'forward compatibility' if origin == 'compat' else 'host driver'})")
    wants_compat = decision.verdict in (cudacompat.Verdict.TOOLKIT, cudacompat.Verdict.APPLIED)
    if wants_compat and origin != "compat":
        report.problems.append(f"the driver {facts.driver} needs the forward-compatibility libcuda, but {loaded} "
                               "(the host's) was loaded: something earlier in LD_LIBRARY_PATH holds a libcuda")
    if decision.verdict is cudacompat.Verdict.NATIVE and origin == "compat":
        report.problems.append(f"the forward-compatibility libcuda {loaded} was loaded with the newer host driver "
                               f"{facts.driver}: remove {facts.compat_dir} from LD_LIBRARY_PATH")


# --- /dev/shm ---

def shm_needed(workers: int, prefetch: int, batch: int, seq_len: int, processes: int) -> int:
    """Bytes of /dev/shm a run needs: each DataLoader worker hands `prefetch` batches (input ids, labels,
    position ids: int64) to the trainer through shared memory, kept 4x for pinned copies and headroom; more
    than one GPU process on the node adds NCCL's buffers."""
    data = workers * prefetch * batch * seq_len * 3 * 8 * 4 * max(processes, 1)
    return data + (NCCL_SHM_BYTES if processes > 1 else 0)


def _shm_size(path: str = "/dev/shm") -> int | None:
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    return stat.f_blocks * stat.f_frsize


def _about_shm(report: Report, recipe, processes: int) -> None:
    size = _shm_size()
    sft = recipe.sft_kwargs() if recipe is not None else {}
    workers = int(sft.get("dataloader_num_workers") or 0)
    need = shm_needed(workers, int(sft.get("dataloader_prefetch_factor") or 2),
                      int(sft.get("per_device_train_batch_size", 1)),
                      recipe.data.max_seq_length if recipe is not None else 0, processes)
    why = f"{processes} GPU process(es), {workers} DataLoader worker(s)"
    report.say("/dev/shm", f"{_gib(size)} (needs {_gib(need)}: {why})" if size is not None else "not mounted")
    if need and (size or 0) < need:
        report.problems.append(f"/dev/shm is {_gib(size or 0)}, the run needs about {_gib(need)} ({why}); "
                               "Docker: --shm-size 8g (or --ipc=host); Kubernetes: an emptyDir medium: Memory "
                               "at /dev/shm")


# --- folders and disk ---

def nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def folder_problem(path: Path, uid: int) -> str | None:
    """Why this uid cannot create files in `path` (or the nearest existing folder above it), or None."""
    try:
        existing = nearest_existing(path)
    except OSError as err:  # a folder above it that this uid may not enter
        return f"{path} cannot be reached by uid {uid}: {err.strerror or err}"
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    try:
        tempfile.TemporaryFile(dir=existing).close()
    except OSError:
        stat = existing.stat()
        return (f"{existing} is not writable by uid {uid} (owner {stat.st_uid}:{stat.st_gid}, mode "
                f"{stat.st_mode & 0o7777:o}): run as its owner (docker run --user {stat.st_uid}:{stat.st_gid}) or "
                "make it writable")
    return None


def _folders(recipe) -> dict[str, tuple[Path, bool]]:
    """name -> (folder, whether the run cannot do without it)."""
    from huggingface_hub import constants

    home = Path(os.path.expanduser("~"))
    output = RunDir.of(recipe).root if recipe is not None else Path.cwd()
    return {"output.dir" if recipe is not None else "working dir": (output, recipe is not None),
            "HF cache": (Path(constants.HF_HUB_CACHE), recipe is not None and _downloads(recipe)),
            "HOME": (home, False),
            "TMPDIR": (Path(tempfile.gettempdir()), True),
            "Triton cache": (Path(os.environ.get("TRITON_CACHE_DIR") or home / ".triton"), False)}


def _about_folders(report: Report, recipe) -> None:
    uid = os.getuid()
    for name, (folder, needed) in _folders(recipe).items():
        problem = folder_problem(folder, uid)
        report.say(name, f"{folder} ({'NOT WRITABLE' if problem else 'writable'} by uid {uid})")
        if problem:
            (report.problems if needed else report.warnings).append(f"{name}: {problem}")


@dataclass
class DiskNeeds:
    download: int = 0  # the base model, into the HF cache
    checkpoints: int = 0  # save_total_limit + 1 checkpoints (adapter, optimizer state) in output.dir
    merge: int = 0  # `qctrain merge`: the merged model in output.dir


def lora_parameters(config: dict, r: int) -> int:
    """LoRA parameters on every Linear layer of a decoder (q, k, v, o, gate, up, down: r x (in + out) each)."""
    hidden = config.get("hidden_size", 0)
    inter = config.get("intermediate_size", 4 * hidden)
    heads = config.get("num_attention_heads", 1) or 1
    kv = hidden * (config.get("num_key_value_heads") or heads) // heads
    return r * config.get("num_hidden_layers", 0) * (7 * hidden + 2 * kv + 3 * inter)


def model_parameters(config: dict) -> int:
    """About how many parameters a decoder with this config.json has (embeddings, attention, MLP, LM head)."""
    hidden, vocab = config.get("hidden_size", 0), config.get("vocab_size", 0)
    inter = config.get("intermediate_size", 4 * hidden)
    heads = config.get("num_attention_heads", 1) or 1
    kv = hidden * (config.get("num_key_value_heads") or heads) // heads
    per_layer = 2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * inter
    tied = config.get("tie_word_embeddings", False)
    return vocab * hidden * (1 if tied else 2) + config.get("num_hidden_layers", 0) * per_layer


def disk_needs(config: dict, r: int, save_total_limit: int, cached_bytes: int | None, weights_bytes: int | None
               ) -> DiskNeeds:
    """What a run writes: the download (unless cached), checkpoints of the LoRA weights and their Adam state
    (fp32: 4 + 8 bytes a parameter) and, for a merge, the model in bf16."""
    model_bytes = weights_bytes or model_parameters(config) * 2
    checkpoint = lora_parameters(config, r) * 12
    return DiskNeeds(download=0 if cached_bytes is not None else model_bytes,
                     checkpoints=checkpoint * (save_total_limit + 1), merge=model_parameters(config) * 2 or model_bytes)


def _downloads(recipe) -> bool:
    from qctrain import hubcache

    try:
        return hubcache.is_hub_model(recipe.model) and not hubcache.model_status(recipe.model).complete
    except InputError:
        return False


def _model_facts(recipe) -> tuple[dict, int | None, int | None]:
    """(config.json or {}, bytes already in the HF cache or None when not all cached, bytes of the weights or
    None when unknown). Only the cache and one short Hub query (size of the weights): doctor takes seconds."""
    import json

    from qctrain import hubcache
    from qctrain.basemodel import files

    if not hubcache.is_hub_model(recipe.model):
        folder = Path(files.model_source(recipe.model))
        weights = sum(p.stat().st_size for p in folder.glob("*.safetensors")) or None
        return files.read_config(recipe.model), 0, weights
    status = hubcache.model_status(recipe.model)
    config_path = status.paths.get("config.json")
    config = json.loads(Path(config_path).read_text(encoding="utf-8")) if config_path else {}
    if status.complete:
        return config, status.bytes, status.weight_bytes
    return config, None, None if hubcache.offline() else _hub_weight_bytes(recipe.model)


def _hub_weight_bytes(cfg) -> int | None:
    """The size of the model's safetensors files on the Hub (one request, 10 s at most), or None."""
    from huggingface_hub import HfApi

    try:
        info = HfApi().model_info(cfg.name, revision=cfg.revision, files_metadata=True, timeout=10)
    except Exception:  # noqa: BLE001 - offline, private, rate-limited: the size is then unknown
        return None
    sizes = [s.size or 0 for s in info.siblings or [] if s.rfilename.endswith(".safetensors")]
    return sum(sizes) or None


def _free(path: Path) -> tuple[int, int] | None:
    """(device id, free bytes) of the filesystem that holds `path` (or would)."""
    existing = nearest_existing(path)
    try:
        return existing.stat().st_dev, shutil.disk_usage(existing).free
    except OSError:
        return None


def _about_disk(report: Report, recipe) -> None:
    from huggingface_hub import constants

    output = RunDir.of(recipe).root if recipe is not None else Path.cwd()
    cache = Path(constants.HF_HUB_CACHE)
    places = {"output": _free(output), "cache": _free(cache)}
    for name, path in (("disk (output)", output), ("disk (HF cache)", cache)):
        where = places["output" if name == "disk (output)" else "cache"]
        report.say(name, f"{_gib(where[1])} free at {nearest_existing(path)}" if where else "unavailable")
    if recipe is None or None in places.values():
        return
    try:
        config, cached, weights = _model_facts(recipe)
    except InputError as err:
        report.warnings.append(f"disk needs not estimated: {err}")
        return
    if not config and not weights:
        report.warnings.append(f"disk needs not estimated: neither config.json nor the size of {recipe.model.name} "
                               "is known here")
        return
    sft = recipe.sft_kwargs()
    needs = disk_needs(config, recipe.lora.r, int(sft.get("save_total_limit") or 3), cached, weights)
    report.say("disk needs", f"download {_gib(needs.download)}, checkpoints {_gib(needs.checkpoints)}, "
                             f"merge {_gib(needs.merge)}")
    for problem in disk_shortfalls(places["output"], places["cache"], needs):
        (report.warnings if "merge" in problem else report.problems).append(problem)


def disk_shortfalls(output: tuple[int, int], cache: tuple[int, int], needs: DiskNeeds) -> list[str]:
    """Where free space falls short: the download and checkpoints (problems), a later merge (a warning)."""
    same = output[0] == cache[0]
    run_need = needs.checkpoints + (needs.download if same else 0)
    out = []
    if needs.download and not same and cache[1] < needs.download:
        out.append(f"the HF cache has {_gib(cache[1])} free, the base model needs {_gib(needs.download)}")
    if output[1] < run_need:
        out.append(f"output.dir has {_gib(output[1])} free, the run needs about {_gib(run_need)} "
                   f"({'the download and ' if same and needs.download else ''}checkpoints)")
    elif output[1] < run_need + needs.merge:
        out.append(f"output.dir has {_gib(output[1])} free: enough to train, not for a merge "
                   f"({_gib(needs.merge)} more)")
    return out


# --- the HF cache and the token ---

def _about_hf_cache(report: Report, recipe) -> None:
    from qctrain import hubcache

    hf_home = os.environ.get("HF_HOME") or os.path.expanduser("~/.cache/huggingface")
    report.say("HF_HOME", hf_home)
    report.say("HF_HUB_OFFLINE", "1 (nothing is downloaded)" if hubcache.offline() else "not set")
    if recipe is None:
        return
    try:
        hub = hubcache.is_hub_model(recipe.model)
    except InputError as err:
        report.problems.append(str(err))
        return
    if not hub:
        report.say("model", f"{recipe.model.name} (local folder)")
        return
    status = hubcache.model_status(recipe.model)
    state = (f"in the HF cache ({_gib(status.bytes)})" if status.complete
             else f"missing in the HF cache: {', '.join(status.missing)}")
    report.say("model", f"{recipe.model.name}: {state}")
    report.problems += hubcache.check_offline(recipe.model)


def _about_token(report: Report) -> None:
    from qctrain.hubtoken import resolve_token

    try:
        token = resolve_token()
    except InputError as err:  # HF_TOKEN_FILE names a file that cannot be read, or an empty one
        report.say("HF token", f"{err} (NOT READABLE)")
        report.warnings.append(str(err))
        return
    if token is None:
        report.say("HF token", "not set (fine for public models and no Hub push)")
    else:
        report.say("HF token", "set (HF_TOKEN)" if os.environ.get("HF_TOKEN", "").strip()
                   else f"HF_TOKEN_FILE={os.environ['HF_TOKEN_FILE']} (readable)")


def _gib(size: int | float) -> str:
    return f"{size / GIB:.1f} GiB"


if __name__ == "__main__":
    raise SystemExit(run_doctor())
