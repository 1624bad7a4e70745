"""`qctrain doctor` (qctrain.doctor.run_doctor): facts out, exit 0 when sound, 3 when broken."""

import io
import sys

import pytest
from qctrain import doctor
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
