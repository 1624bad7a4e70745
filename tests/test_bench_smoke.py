"""Smoke runs of the benchmarks at tiny sizes: they run, print their tables and append dated rows.

The real runs are `make bench` (bench/run_all.py); these only check that each script works end to end.
"""

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "bench"


def bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def rows_of(results: Path, bench: str) -> str:
    text = results.read_text(encoding="utf-8")
    assert f"### {bench}" in text and "- machine: " in text and "cores" in text and "- versions: " in text
    return text


@pytest.mark.slow
def test_prep(tiny_model_dir, tmp_path, capsys):
    results = tmp_path / "RESULTS.md"
    assert bench_module("prep").main(["--sizes", "300,600", "--trl-records", "200", "--rounds", "1",
                                      "--floor-records", "100", "--broken-gb", "0.01", "--model",
                                      str(tiny_model_dir), "--results", str(results)]) == 0
    text = rows_of(results, "prep")
    assert "600 records, first run" in text and "TRL SFTTrainer" in text and "peak PSS MiB" in text
    assert "broken 0.0 GB JSONL (cut 3rd line), refused" in text and "x the floor" in text
    assert "same tokens: yes" in text and "invalid JSON" in text
    assert "records/s" in capsys.readouterr().out


def test_packing(tiny_model_dir, tmp_path):
    results = tmp_path / "RESULTS.md"
    assert bench_module("packing").main(["--records", "200", "--max-seq-length", "512",
                                         "--model", str(tiny_model_dir), "--results", str(results)]) == 0
    text = rows_of(results, "packing")
    assert "packed (BFD)" in text and "padded to the longest" in text and "Packing fill" in text


@pytest.mark.slow
def test_train_cpu_ours_against_plain_trl(tiny_model_dir, tmp_path):
    results = tmp_path / "RESULTS.md"
    assert bench_module("train_cpu").main([
        "--rounds", "1", "--steps", "3", "--logging-steps", "1", "--warmup", "1", "--records", "40",
        "--max-seq-length", "128", "--arms", "ours-on,trl-on,ours-default", "--model", str(tiny_model_dir),
        "--results", str(results)]) == 0
    text = rows_of(results, "train_cpu")
    assert "| ours-on" in text and "| trl-on" in text and "| ours-default" in text
    assert "ours-on / trl-on: real tokens/s ratio" in text and "target >= 3.0: " in text
    assert "ours-default / ours-on (the faster explicit arm): real tokens/s ratio" in text
    assert "loss at step 3: ours-on " in text and "target <= 1%: " in text


@pytest.mark.slow
def test_gpu_qlora_logic_on_a_tiny_model_on_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    results = tmp_path / "RESULTS.md"
    assert bench_module("gpu_qlora").main([
        "--tiny", "--cpu", "--steps", "1", "--warmup", "1", "--records", "100", "--max-seq-length", "128",
        "--variants", "padded,packed,packed+liger,packed+compile", "--results", str(results)]) == 0
    text = rows_of(results, "gpu_qlora (tiny, CPU)")
    assert "| padded " in text and "| packed " in text
    assert "packed+liger   | skipped: needs a CUDA GPU" in text
    assert "packed / padded real tokens/s" in text


def test_gpu_qlora_mfu_formula():
    gpu = bench_module("gpu_qlora")
    # Phi-3.5-mini: 3.72e9 parameters in matmuls (embedding excluded), 3.8e9 with it
    assert gpu.linear_params(gpu.PHI35_MINI) == 32 * (4 * 3072**2 + 3 * 3072 * 8192) + 32064 * 3072
    assert 3.7e9 < gpu.linear_params(gpu.PHI35_MINI) < 3.75e9
    assert gpu.peak_tflops("NVIDIA H100 PCIe", None) == 756.0 and gpu.peak_tflops("NVIDIA H200", None) == 989.5


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present: the benchmark would run")
def test_gpu_benchmark_skips_without_a_gpu_and_run_all_goes_on(tmp_path, capfd):
    assert bench_module("run_all").main(["--only", "gpu_qlora.py", "--results", str(tmp_path / "R.md")]) == 0
    out = capfd.readouterr().out
    assert "gpu_qlora: skipped: no CUDA GPU" in out and "exit 0" in out
    assert not (tmp_path / "R.md").exists()


@pytest.mark.slow
def test_check_timing_against_an_earlier_commit(tiny_model_dir, tmp_path):
    results = tmp_path / "RESULTS.md"
    assert bench_module("check").main(["--rounds", "1", "--model", str(tiny_model_dir),
                                       "--results", str(results)]) == 0
    text = rows_of(results, "check")
    assert "| qctrain            | check" in text
    import subprocess

    if subprocess.run(["git", "cat-file", "-e", "29bd231"], cwd=BENCH, capture_output=True).returncode == 0:
        assert "| qctrain at 29bd231 | check" in text  # a clone with history: the earlier commit is timed too
    assert "Target check < 3 s:" in text


def test_extension(tiny_model_dir, tmp_path):
    results = tmp_path / "RESULTS.md"
    assert bench_module("extension").main(["--plain-records", "40", "--tool-records", "20", "--rounds", "1",
                                           "--model", str(tiny_model_dir), "--results", str(results)]) == 0
    text = rows_of(results, "extension")
    assert "plain (40)" in text and "tools (20)" in text and "extended, us/record" in text


@pytest.mark.slow  # loads the 4-bit model and generates
def test_eval_samples(tiny_model_dir, tmp_path):
    results = tmp_path / "RESULTS.md"
    assert bench_module("eval_samples").main(["--prompts", "2", "--rounds", "1", "--max-new-tokens", "4", "--model",
                                              str(tiny_model_dir), "--results", str(results)]) == 0
    text = rows_of(results, "eval_samples")
    assert re.search(r"\| 2 +\|", text) and "speed-up" in text and "True" in text
