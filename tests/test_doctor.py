"""`qctrain doctor [RECIPE]` (qctrain.doctor.run_doctor): facts out, exit 0 when sound, 3 when broken; hosts
are simulated with fake facts (GPUs, driver, /proc/self/maps, /dev/shm, folders, the HF cache)."""

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import fill_hub_cache, write_json, write_recipe
from qctrain import cudacompat, doctor
from qctrain.errors import ExitCode


def run() -> tuple[int, str]:
    out = io.StringIO()
    code = doctor.run_doctor(out=out)
    return code, out.getvalue()


def test_healthy_machine_without_gpu_is_ok(monkeypatch):
    monkeypatch.setenv("QCTRAIN_GIT_REVISION", "0123abcd")
    monkeypatch.setenv("QCTRAIN_IMAGE_VERSION", "9.9.9")
    monkeypatch.delenv("QCTRAIN_IMAGE_DIGEST", raising=False)
    monkeypatch.setattr(doctor, "_cuda_available", lambda torch: False)
    code, text = run()
    assert code == ExitCode.OK == 0, text
    import bitsandbytes
    import torch

    assert torch.__version__ in text
    assert f"bitsandbytes             {bitsandbytes.__version__}" in text
    assert "CUDA available           no" in text
    assert "torch CUDA build" in text
    assert "bitsandbytes library" in text and "libbitsandbytes" in text
    assert "4-bit round trip (cpu)   ok" in text
    assert "QCTRAIN_GIT_REVISION     0123abcd" in text
    assert "QCTRAIN_IMAGE_VERSION    9.9.9" in text
    assert "QCTRAIN_IMAGE_DIGEST     (not set)" in text
    assert f"python                   {sys.version_info.major}.{sys.version_info.minor}" in text
    assert text.rstrip().endswith("doctor: OK")


def test_token_is_never_printed(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_supersecretvalue123")
    code, text = run()
    assert code == 0
    assert "hf_supersecretvalue123" not in text
    assert "set (HF_TOKEN)" in text


def test_unreadable_token_file_warns_but_passes(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_FILE", str(tmp_path / "missing"))
    code, text = run()
    assert code == 0
    assert "NOT READABLE" in text and "warning: HF_TOKEN_FILE=" in text


def test_bitsandbytes_import_failure_is_environment_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # makes `import bitsandbytes` fail
    code, text = run()
    assert code == ExitCode.ENVIRONMENT == 3
    assert "bitsandbytes             IMPORT FAILED" in text
    assert "problem: bitsandbytes does not import" in text


def test_torch_import_failure_is_environment_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    code, text = run()
    assert code == 3
    assert "torch does not import" in text


def test_failing_quantization_round_trip_is_environment_error(monkeypatch):
    def boom(torch, device):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(doctor, "_quant_roundtrip", boom)
    code, text = run()
    assert code == 3
    assert "FAILED: kernel exploded" in text


def test_wrong_quantization_result_is_environment_error(monkeypatch):
    monkeypatch.setattr(doctor, "_quant_roundtrip", lambda torch, device: 0.9)
    code, text = run()
    assert code == 3
    assert "WRONG" in text and "relative error 0.900" in text


def test_cuda_available_but_cpu_bitsandbytes_library_is_environment_error(monkeypatch):
    monkeypatch.setattr(doctor, "_cuda_available", lambda torch: True)
    gpus = [("GPUs", "1"), ("", "cuda:0 Fake GPU, 80.0 GiB")]
    monkeypatch.setattr(doctor, "_gpu_facts", lambda torch: gpus)
    monkeypatch.setattr(doctor, "_quant_roundtrip", lambda torch, device: 0.09)
    code, text = run()
    assert code == 3
    assert "cuda:0 Fake GPU" in text
    assert "4-bit round trip (cuda)" in text
    assert "CUDA is available but bitsandbytes loaded a non-CUDA library" in text


def test_cuda_available_and_bitsandbytes_failed_to_load_is_environment_error(monkeypatch):
    monkeypatch.setattr(doctor, "_cuda_available", lambda torch: True)
    monkeypatch.setattr(doctor, "_gpu_facts", lambda torch: [("GPUs", "1")])
    monkeypatch.setattr(doctor, "_quant_roundtrip", lambda torch, device: 0.09)
    monkeypatch.setattr(
        doctor, "_bnb_library", lambda bnb: ("none (failed to load)", False, "libcudart.so.13: cannot open")
    )
    code, text = run()
    assert code == 3
    assert "bitsandbytes error       libcudart.so.13: cannot open" in text
    assert "could not load its native library" in text


def test_cuda_healthy_stack_is_ok(monkeypatch):
    monkeypatch.setattr(doctor, "_cuda_available", lambda torch: True)
    monkeypatch.setattr(doctor, "_gpu_facts", lambda torch: [("GPUs", "1")])
    monkeypatch.setattr(doctor, "_quant_roundtrip", lambda torch, device: 0.09)
    monkeypatch.setattr(doctor, "_bnb_library", lambda bnb: ("/x/libbitsandbytes_cuda130.so", True, None))
    code, text = run()
    assert code == 0, text
    assert "libbitsandbytes_cuda130.so" in text


@pytest.mark.parametrize("device", ["cpu"])
def test_real_round_trip_is_accurate(device):
    import torch

    error = doctor._quant_roundtrip(torch, device)
    assert 0 < error < doctor.MAX_ROUNDTRIP_REL_ERROR


# ---------------------------------------------------------------------- simulated hosts (fake facts)

PHI35_MINI = {"hidden_size": 3072, "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
              "num_key_value_heads": 32, "vocab_size": 32064, "tie_word_embeddings": False}


def gpu_host(monkeypatch, count: int = 1, name: str = "NVIDIA H100 80GB HBM3", capability=(9, 0),
             arch_list=("sm_80", "sm_90", "sm_100", "sm_120", "compute_120")):
    """A CUDA host as far as doctor can tell: torch sees `count` GPUs, bitsandbytes loaded its CUDA library."""
    monkeypatch.setattr(doctor, "_cuda_available", lambda torch: True)
    monkeypatch.setattr(doctor, "_gpu_facts", lambda torch: [("GPUs", str(count))])
    monkeypatch.setattr(doctor, "_gpu_architectures", lambda torch: ([(name, capability)] * count, list(arch_list)))
    monkeypatch.setattr(doctor, "_quant_roundtrip", lambda torch, device: 0.09)
    monkeypatch.setattr(doctor, "_bnb_library", lambda bnb: ("/x/libbitsandbytes_cuda130.so", True, None))


def driver(monkeypatch, **facts):
    values = {"driver": "580.95.05", "gpus": ("NVIDIA H100 80GB HBM3",), "runtime_cuda": "13.0",
              "compat_version": "580.82.07", **facts}
    monkeypatch.setattr(cudacompat, "gather", lambda *a, **k: cudacompat.Facts(**values))


def maps_with(monkeypatch, libcuda: str):
    line = f"7f2a4c000000-7f2a4d000000 r-xp 00000000 fd:01 123456                     {libcuda}\n"
    python = "55d0c0000000-55d0c0001000 r--p 00000000 fd:01 1 /usr/bin/python3\n"
    monkeypatch.setattr(doctor, "_proc_maps", lambda: python + line)


@pytest.mark.parametrize("capability, arch_list, expected", [
    ((9, 0), ["sm_80", "sm_90"], "native"),
    ((8, 6), ["sm_80", "sm_90"], "native"),  # sm_80 cubins run on 8.6 (same major)
    ((12, 0), ["sm_80", "sm_90", "sm_100", "compute_100"], "PTX"),
    ((7, 0), ["sm_75", "sm_80", "sm_90", "compute_90"], None),  # Volta: CUDA 13 builds carry nothing for it
    ((7, 5), ["sm_80", "sm_90"], None),
])
def test_arch_support(capability, arch_list, expected):
    assert doctor.arch_support(capability, arch_list) == expected


def test_gpu_torch_was_not_built_for_is_a_problem(monkeypatch):
    gpu_host(monkeypatch, name="Tesla V100-SXM2-16GB", capability=(7, 0), arch_list=("sm_75", "sm_80", "sm_90"))
    driver(monkeypatch)
    maps_with(monkeypatch, "/usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05")
    code, text = run()
    assert code == 3
    assert "problem: Tesla V100-SXM2-16GB (sm_70) is not among the GPU architectures this torch was built for" in text
    assert "torch built for          sm_75 sm_80 sm_90" in text


def test_geforce_on_an_old_driver_says_found_and_needed_in_one_line(monkeypatch):
    driver(monkeypatch, driver="550.54.15", gpus=("NVIDIA GeForce RTX 4090",))
    code, text = run()
    assert code == 3
    problems = [line for line in text.splitlines() if line.startswith("problem:")]
    assert len(problems) == 1 and "550.54.15" in problems[0] and "R580" in problems[0]
    assert "NVIDIA driver            550.54.15 (R550)" in text


COMPAT_LIB = "/usr/local/cuda-13.0/compat/libcuda.so.580.82.07"
MOUNTED_COMPAT_LIB = "/usr/lib/x86_64-linux-gnu/libcuda.so.580.82.07"  # libnvidia-container's mount mode
HOST_535 = "/usr/local/nvidia/lib64/libcuda.so.535.183.01"


@pytest.mark.parametrize("facts, loaded, code, says", [
    ({"driver": "535.183.01", "ld_library_path": "/usr/local/cuda/compat:/usr/local/nvidia/lib64"}, COMPAT_LIB, 0,
     ["driver verdict           compat, applied", f"libcuda loaded           {COMPAT_LIB} (forward compatibility)"]),
    ({"driver": "535.183.01", "loader_libcuda": MOUNTED_COMPAT_LIB}, MOUNTED_COMPAT_LIB, 0,
     ["compat, by the container toolkit", "(forward compatibility)"]),
    ({"driver": "535.183.01", "ld_library_path": "/usr/local/cuda/compat"}, HOST_535, 3,
     ["(host driver)", f"but {HOST_535} (the host's) was loaded"]),
    ({"driver": "580.95.05"}, "/usr/local/cuda/compat/libcuda.so.580.82.07", 3,
     ["remove /usr/local/cuda/compat from LD_LIBRARY_PATH"]),
], ids=["compat-applied", "toolkit-mount-mode", "host-lib-where-compat-needed", "compat-lib-on-new-driver"])
def test_the_libcuda_the_process_loaded_against_the_verdict(monkeypatch, facts, loaded, code, says):
    gpu_host(monkeypatch)
    driver(monkeypatch, **facts)
    maps_with(monkeypatch, loaded)
    got, text = run()
    assert got == code, text
    for words in says:
        assert words in text


def test_entrypoint_bypassed_where_compat_was_needed(monkeypatch):
    driver(monkeypatch, driver="570.172.08")
    code, text = run()
    assert code == 3 and "started without it" in text


def test_libcuda_from_maps():
    maps = ("7f00-7f01 r-xp 00000000 fd:01 1 /usr/lib/x86_64-linux-gnu/libc.so.6\n"
            "7f02-7f03 rw-p 00000000 00:00 0 \n"
            "7f04-7f05 r-xp 00000000 fd:01 2 /usr/local/cuda/compat/libcuda.so.580.82.07\n")
    assert doctor.libcuda_from_maps(maps) == "/usr/local/cuda/compat/libcuda.so.580.82.07"
    assert doctor.libcuda_from_maps(maps.splitlines()[0]) is None


@pytest.mark.parametrize("shm, nproc, code", [(64 << 20, 8, 3), (8 << 30, 8, 0), (64 << 20, 1, 0)])
def test_shm_against_nccl_on_a_multi_gpu_node(monkeypatch, shm, nproc, code):
    gpu_host(monkeypatch, count=nproc)
    driver(monkeypatch)
    maps_with(monkeypatch, "/usr/lib/x86_64-linux-gnu/libcuda.so.580.95.05")
    monkeypatch.setattr(doctor, "_shm_size", lambda path="/dev/shm": shm)
    out = io.StringIO()
    assert doctor.run_doctor(out=out, nproc=nproc) == code, out.getvalue()
    if code:
        assert "problem: /dev/shm is 0.1 GiB, the run needs about 1.0 GiB (8 GPU process(es)" in out.getvalue()
        assert "--shm-size" in out.getvalue()


def test_shm_needed_grows_with_dataloader_workers():
    assert doctor.shm_needed(0, 2, 4, 4096, 1) == 0
    assert doctor.shm_needed(4, 2, 4, 4096, 1) == 4 * 2 * 4 * 4096 * 3 * 8 * 4
    assert doctor.shm_needed(0, 2, 4, 4096, 2) == doctor.NCCL_SHM_BYTES


def test_model_and_lora_sizes_of_phi35_mini():
    assert 3.7e9 < doctor.model_parameters(PHI35_MINI) < 3.9e9  # Phi-3.5-mini: 3.82B
    assert 20e6 < doctor.lora_parameters(PHI35_MINI, 16) < 40e6  # r=16 on every Linear layer
    needs = doctor.disk_needs(PHI35_MINI, r=16, save_total_limit=3, cached_bytes=None, weights_bytes=None)
    assert 7.0 * 2**30 < needs.download < 7.4 * 2**30 and needs.merge == needs.download
    assert needs.checkpoints < 2 * 2**30
    assert doctor.disk_needs(PHI35_MINI, 16, 3, cached_bytes=7 << 30, weights_bytes=7 << 30).download == 0


def test_disk_shortfalls_same_and_separate_filesystems():
    needs = doctor.DiskNeeds(download=8 << 30, checkpoints=1 << 30, merge=8 << 30)
    assert doctor.disk_shortfalls((1, 100 << 30), (1, 100 << 30), needs) == []
    short = doctor.disk_shortfalls((1, 5 << 30), (1, 5 << 30), needs)
    assert short == ["output.dir has 5.0 GiB free, the run needs about 9.0 GiB (the download and checkpoints)"]
    merge_only = doctor.disk_shortfalls((1, 12 << 30), (1, 12 << 30), needs)
    assert len(merge_only) == 1 and "not for a merge" in merge_only[0]
    separate = doctor.disk_shortfalls((1, 100 << 30), (2, 4 << 30), needs)
    assert separate == ["the HF cache has 4.0 GiB free, the base model needs 8.0 GiB"]


def test_folder_that_is_a_file(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert doctor.folder_problem(blocker / "out", os.getuid()) == f"{blocker} is a file, not a folder"
    assert doctor.folder_problem(tmp_path / "new" / "out", os.getuid()) is None


def test_root_owned_volume_is_not_writable_for_another_uid():
    """A root-owned mount, a container that could not pass --user: checked as a real other uid (as root, a child
    process drops to uid 65534 after its imports; elsewhere the folder is made read-only for its owner)."""
    import tempfile

    parent = Path(tempfile.mkdtemp(prefix="qctrain-volume-", dir="/tmp"))  # pytest's tmp_path is 0700
    volume = parent / "volume"
    volume.mkdir(mode=0o755)
    parent.chmod(0o755)
    root = os.getuid() == 0
    if not root:
        volume.chmod(0o555)
    code = ("import os, sys, pathlib; sys.path.insert(0, sys.argv[2]); from qctrain import doctor; "
            f"{'os.setgid(65534); os.setuid(65534); ' if root else ''}"
            "print(doctor.folder_problem(pathlib.Path(sys.argv[1]) / 'run', os.getuid()))")
    done = subprocess.run([sys.executable, "-c", code, str(volume), str(Path(doctor.__file__).parents[1])],
                          capture_output=True, text=True, timeout=120)
    volume.chmod(0o755)
    shutil.rmtree(parent)
    uid = 65534 if root else os.getuid()
    assert done.stdout.strip().startswith(f"{volume} is not writable by uid {uid} (owner "), done.stderr
    assert "docker run --user" in done.stdout


def test_doctor_recipe_checks_the_run_against_the_host(tmp_path, tiny_model_dir, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    data = write_json(tmp_path / "d.json", [{"instruction": "a", "output": "b"}])
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data, blocker / "out",
                               train={"dataloader_num_workers": 2})
    monkeypatch.setattr(doctor, "_shm_size", lambda path="/dev/shm": 64 << 20)
    from qctrain.recipe import load_recipe

    out = io.StringIO()
    code = doctor.run_doctor(out=out, recipe=load_recipe(recipe_path, []), nproc=2)
    text = out.getvalue()
    assert code == 3, text
    assert f"problem: output.dir: {blocker} is a file, not a folder" in text
    assert "problem: /dev/shm is 0.1 GiB" in text and "2 DataLoader worker(s)" in text
    assert f"model                    {tiny_model_dir} (local folder)" in text
    assert "disk needs               download 0.0 GiB" in text


def test_doctor_recipe_names_a_file_missing_from_the_offline_cache(tmp_path, tiny_model_dir, monkeypatch):
    import huggingface_hub.constants as hf_constants

    hub = tmp_path / "hf" / "hub"
    fill_hub_cache(hub, "acme/tiny-phi3", tiny_model_dir, skip=("model.safetensors",))
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data = write_json(tmp_path / "d.json", [{"instruction": "a", "output": "b"}])
    recipe_path = write_recipe(tmp_path / "r.yaml", tiny_model_dir, data, tmp_path / "out")
    from qctrain.recipe import load_recipe

    recipe = load_recipe(recipe_path, ["model.name=acme/tiny-phi3"])
    out = io.StringIO()
    assert doctor.run_doctor(out=out, recipe=recipe) == 3
    assert ("problem: model.name: acme/tiny-phi3: model.safetensors (or model.safetensors.index.json and its "
            "shards) is not in the HF cache") in out.getvalue()
    fill_hub_cache(hub, "acme/tiny-phi3", tiny_model_dir)
    out = io.StringIO()
    assert doctor.run_doctor(out=out, recipe=recipe) == 0, out.getvalue()
    assert "model                    acme/tiny-phi3: in the HF cache" in out.getvalue()
