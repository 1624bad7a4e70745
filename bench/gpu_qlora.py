"""Real-scale QLoRA benchmark on one NVIDIA GPU: a Phi-3.5-mini-shaped model with random weights.

    pip install -r bench/gpu_requirements.txt          # on the GPU machine (CUDA build of torch)
    python bench/gpu_qlora.py                           # about 4-6 minutes on one H100/H200
    python bench/gpu_qlora.py --tiny --cpu --results -  # the logic on a tiny model, on CPU (smoke test)

Phi3ForCausalLM with Phi-3.5-mini's shapes (hidden 3072, 32 layers, 32 heads, intermediate 8192, vocab
32064), random weights (nothing downloaded), loaded through qctrain's own model stage: NF4 + double
quant, bf16 compute, sdpa; LoRA r16 all-linear; max_seq_length 2048; batch 4; gradient checkpointing
(use_reentrant false); trained through qctrain's build_trainer (TRL SFTTrainer on pre-packed data).
Variants, in this order (Liger patches Phi-3 module-wide, so the unfused ones run first):

  padded          records padded per batch (attention mask), no packing
  packed          BFD packs, batch 4 as 4 rows with sdpa (our default layout), Liger off
  packed-bs1      one pack per row, gradient accumulation 4: the same packs per optimizer step
  packed+liger    + Liger's kernels (RMSNorm, RoPE, SwiGLU, fused linear cross entropy), qctrain's default on CUDA
  packed+compile  + train.torch_compile (after liger when it ran)

Reported per variant: real (non-pad) tokens/s, MFU, peak allocated/reserved memory, step time, loss at
step 1 (packed vs packed+liger must agree: same seed, data and order). MFU counts model FLOPs only:
  per real token = 4*N_base + 6*N_lora + 6*layers*hidden*(sum n_i^2 / sum n_i)
(frozen base: forward 2N + activation gradients 2N; LoRA weights also get weight gradients; causal
attention over each record of length n_i: 2*n*hidden per token per layer forward, x3 with backward;
gradient-checkpointing recompute and padding are not counted) / (step time * peak dense bf16 FLOP/s).
Without a GPU it prints why and exits 0.
"""

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402

sys.path.insert(0, str(common.ROOT / "tests"))  # data_reference: the in-memory data set

PHI35_MINI = {"hidden_size": 3072, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
              "intermediate_size": 8192, "vocab_size": 32064}
TINY = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4,
        "intermediate_size": 128, "vocab_size": 1024}
DEFAULT_VARIANTS = "padded,packed,packed-bs1,packed+liger,packed+compile"
KNOWN_VARIANTS = ("padded", "packed", "packed+liger", "packed+compile", "packed-bs1")
PEAK_BF16_TFLOPS = {"H200": 989.5, "H100 PCIe": 756.0, "H100": 989.5, "H800": 989.5, "A100": 312.0,
                    "L40S": 362.0, "L4": 121.0}
PAD_ID = 2  # the tiny tokenizer's <|endoftext|>; synthetic token ids start above the special tokens


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    for key, value in PEAK_BF16_TFLOPS.items():  # most specific first
        if key in name:
            return value
    return None


def linear_params(shape: dict) -> int:
    d, layers, inter, vocab = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"], \
        shape["vocab_size"]
    kv = shape["num_key_value_heads"] * d // shape["num_attention_heads"]
    per_layer = d * (d + 2 * kv) + d * d + d * 2 * inter + inter * d
    return layers * per_layer + vocab * d  # + lm_head; the embedding lookup has no FLOPs


def lora_params(shape: dict, r: int) -> int:
    d, layers, inter = shape["hidden_size"], shape["num_hidden_layers"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * d // shape["num_attention_heads"]
    return layers * r * ((d + d + 2 * kv) + (d + d) + (d + 2 * inter) + (inter + d))


def flops_per_token(shape: dict, r: int, lengths) -> float:
    weighted = float((lengths.astype("float64") ** 2).sum() / lengths.sum())
    return (4 * linear_params(shape) + 6 * lora_params(shape, r)
            + 6 * shape["num_hidden_layers"] * shape["hidden_size"] * weighted)


def synthetic_records(n: int, max_len: int, vocab: int, seed: int):
    """Mixed lengths (log-normal, median ~200, long tail cut at max_len) of random ids; the last 70% of
    each record supervised, like an answer after a prompt."""
    import numpy as np
    from qctrain import data

    rng = np.random.default_rng(seed)
    lengths = np.clip(rng.lognormal(5.3, 0.8, n).astype(np.int64), 16, max_len)
    bounds = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=bounds[1:])
    ids = rng.integers(10, vocab, int(bounds[-1]), dtype=np.int32)
    position = np.arange(int(bounds[-1])) - np.repeat(bounds[:-1], lengths)
    supervised = position >= np.repeat((lengths * 0.3).astype(np.int64), lengths)
    labels = np.where(supervised, ids, data.IGNORE).astype(np.int32)
    return data.tokens.Tokenized(ids, labels, bounds)


def build_random_model(shape: dict, out: Path, dtype, device: str, seed: int) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, Phi3Config

    config = Phi3Config(**shape, max_position_embeddings=4096, original_max_position_embeddings=4096,
                        bos_token_id=1, eos_token_id=PAD_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):  # initialised on the GPU: seconds, where the CPU would take minutes
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(out)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


class StepTimer:
    """Wall time and real tokens of every optimizer step, end to end (from the previous step's end, so data
    loading and collation count), synchronised with the GPU."""

    def __init__(self):
        from transformers import TrainerCallback

        timer = self

        class Callback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                timer._sync()
                timer._last, timer._tokens = time.perf_counter(), state.num_input_tokens_seen

            def on_step_end(self, args, state, control, **kwargs):
                timer._sync()
                now = time.perf_counter()
                timer.steps.append((now - timer._last, state.num_input_tokens_seen - timer._tokens))
                timer._last, timer._tokens = now, state.num_input_tokens_seen

            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    timer.losses.append(logs["loss"])

        self.callback = Callback()
        self.steps: list[tuple[float, int]] = []
        self.losses: list[float] = []

    @staticmethod
    def _sync():
        import torch

        if torch.cuda.is_available():
            torch.cuda.synchronize()


def liger_engaged(model) -> dict[str, bool]:
    """Which Liger kernels replaced Phi-3's modules (checked on the trained model)."""
    from transformers.models.phi3 import modeling_phi3

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    layer = base.model.layers[0]
    return {"rms_norm": "Liger" in getattr(layer.input_layernorm.forward, "__qualname__", ""),
            "swiglu": "Liger" in getattr(layer.mlp.forward, "__qualname__", ""),
            "rope": "liger" in getattr(modeling_phi3.apply_rotary_pos_emb, "__module__", "")}


def liger_status(cpu: bool) -> str | None:
    """None when Liger can run here, else why not."""
    if cpu:
        return "needs a CUDA GPU (Triton kernels)"
    try:
        import liger_kernel  # noqa: F401
    except ImportError:
        return "liger-kernel is not installed (pip install liger-kernel)"
    return None


def variant_recipe(name: str, args, model_dir: Path, work: Path):
    """The recipe a variant trains with: packed or padded rows, Liger on or off, torch.compile or not."""
    from qctrain.recipe import Recipe

    batch, accumulation = (1, 4) if name == "packed-bs1" else (args.batch_size, 1)
    train_section = {"max_steps": args.warmup + args.steps, "per_device_train_batch_size": batch,
                     "gradient_accumulation_steps": accumulation, "logging_steps": 1, "save_steps": 10**6,
                     "learning_rate": 2.0e-4, "gradient_checkpointing": True,
                     "gradient_checkpointing_kwargs": {"use_reentrant": False},
                     "include_num_input_tokens_seen": "non_padding", "dataloader_num_workers": 0,
                     "report_to": "none", "disable_tqdm": True}
    if not args.cpu:
        train_section["bf16"] = True
    train_section["use_liger_kernel"] = "liger" in name  # on by default on CUDA: off for the unfused variants
    if "compile" in name:
        train_section["torch_compile"] = True
    compute = "float32" if args.cpu else "bfloat16"
    return Recipe.model_validate({
        "model": {"name": str(model_dir), "attn_implementation": "sdpa",
                  "quantization": {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": compute}},
        "lora": {"r": args.lora_r, "alpha": 2 * args.lora_r, "dropout": 0.0, "target_modules": "all-linear"},
        "data": {"sources": [{"path": "synthetic"}], "eval": None, "max_seq_length": args.max_seq_length,
                 "packing": name != "padded"},
        "train": train_section,
        "output": {"dir": str(work / name)},
    })


def run_variant(name: str, args, shape: dict, model_dir: Path, tokens, tokenizer, work: Path) -> dict:
    import numpy as np
    import torch
    from data_reference import to_dataset_flat  # tests/: the data set in memory, as the data stage writes it
    from qctrain import data, train
    from qctrain.basemodel.load import load_base_model

    recipe = variant_recipe(name, args, model_dir, work)
    packed, batch = recipe.data.packing, recipe.train["per_device_train_batch_size"]
    accumulation = recipe.train["gradient_accumulation_steps"]
    dataset = to_dataset_flat(tokens, packed, args.max_seq_length, seed=42)
    prepared = data.PreparedData(dataset, None, {}, "synthetic", work, cached=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    base = load_base_model(recipe.model)
    loaded = time.perf_counter() - start
    (work / name).mkdir(parents=True, exist_ok=True)
    trainer = train.build_trainer(recipe, base, tokenizer, prepared, work / name)
    from transformers import PrinterCallback, ProgressCallback

    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    timer = StepTimer()
    trainer.add_callback(timer.callback)
    trainer.train()
    warm = timer.steps[args.warmup:] or timer.steps
    seconds = sum(s for s, _ in warm)
    real = sum(t for _, t in warm)
    result = {"variant": name, "load_s": loaded, "first_step_s": timer.steps[0][0] if timer.steps else math.nan,
              "step_s": seconds / len(warm), "tokens_per_step": real / len(warm), "tokens_per_s": real / seconds,
              "loss_step1": timer.losses[0] if timer.losses else math.nan,
              "rows": f"{batch}x{accumulation}"}
    lengths = tokens.lengths
    result["flops_per_token"] = flops_per_token(shape, args.lora_r, np.asarray(lengths))
    if torch.cuda.is_available():
        result["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        result["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    if "liger" in name:
        result["liger"] = liger_engaged(trainer.model)
    del trainer, base
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def parse_args(argv: list[str] | None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny Phi-3 instead of Phi-3.5-mini's shapes")
    parser.add_argument("--cpu", action="store_true", help="run on CPU (with --tiny: the smoke test)")
    parser.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma list of {', '.join(KNOWN_VARIANTS)}")
    parser.add_argument("--steps", type=int, default=6, help="measured steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the rates")
    parser.add_argument("--max-seq-length", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lora-r", type=int, default=16)
    parser.add_argument("--records", type=int, default=3000)
    parser.add_argument("--budget-s", type=float, default=450, help="skip the variants left after this long")
    parser.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense bf16 peak, for MFU")
    parser.add_argument("--results", default=None, help="RESULTS.md to append to ('-': none)")
    args = parser.parse_args(argv)
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in args.variants if v not in KNOWN_VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(KNOWN_VARIANTS)}")
    return args


def skip_reason(name: str, args, started: float) -> str | None:
    if time.perf_counter() - started > args.budget_s:
        return f"time budget ({args.budget_s:.0f}s) spent"
    if "compile" in name and args.cpu:
        return "torch.compile is only measured on the GPU"
    return liger_status(args.cpu) if "liger" in name else None


def result_row(name: str, result: dict, peak: float | None) -> dict:
    row = {"variant": name, "status": "ok", "rows x accum": result["rows"],
           "real tokens/s": result["tokens_per_s"], "tokens/step": result["tokens_per_step"],
           "step s": result["step_s"], "1st step s": result["first_step_s"],
           "loss@1": round(result["loss_step1"], 4)}
    if peak:
        row["MFU"] = f"{result['tokens_per_s'] * result['flops_per_token'] / (peak * 1e12):.1%}"
    if "peak_alloc_gib" in result:
        row["peak alloc/reserved GiB"] = f"{result['peak_alloc_gib']:.1f}/{result['peak_reserved_gib']:.1f}"
    if "liger" in result:
        row["status"] = "ok, liger on: " + ", ".join(k for k, v in result["liger"].items() if v) \
            if any(result["liger"].values()) else "ok, but liger did NOT engage"
    return row


def run_variants(args, shape: dict, model_dir: Path, tokens, tokenizer, work: Path, started: float,
                 peak: float | None) -> tuple[list[dict], list[dict]]:
    """Each variant in turn (skipped, failed or measured): the table's rows and the measured results."""
    rows, results = [], []
    for name in args.variants:
        if why := skip_reason(name, args, started):
            rows.append({"variant": name, "status": f"skipped: {why}"})
            print(f"{name}: skipped: {why}", flush=True)
            continue
        try:
            result = run_variant(name, args, shape, model_dir, tokens, tokenizer, work)
        except Exception as err:  # noqa: BLE001 - one variant failing (e.g. compile) must not end the run
            first = str(err).splitlines()[0][:200] if str(err) else ""
            rows.append({"variant": name, "status": f"failed: {type(err).__name__}: {first}"})
            print(f"{name}: failed: {type(err).__name__}: {first}", flush=True)
            continue
        results.append(result)
        print(f"{name}: {json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in result.items()})}",
              flush=True)
        rows.append(result_row(name, result, peak))
    return rows, results


def comparisons(results: list[dict]) -> list[str]:
    by_name = {r["variant"]: r for r in results}
    notes = []
    if "packed" in by_name and "padded" in by_name:
        gain = by_name["packed"]["tokens_per_s"] / by_name["padded"]["tokens_per_s"]
        notes.append(f"packed / padded real tokens/s: {gain:.2f}x")
    if "packed" in by_name and "packed+liger" in by_name:
        delta = abs(by_name["packed"]["loss_step1"] - by_name["packed+liger"]["loss_step1"])
        speed = by_name["packed+liger"]["tokens_per_s"] / by_name["packed"]["tokens_per_s"]
        notes.append(f"liger vs unfused: loss at step 1 differs by {delta:.2e} (same seed, data, order); "
                     f"{speed:.2f}x tokens/s")
    return notes


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.cpu:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""  # before torch initialises CUDA
    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_qlora: skipped: no CUDA GPU here (torch.cuda.is_available() is False). On a machine with an "
              "NVIDIA GPU: pip install -r bench/gpu_requirements.txt && python bench/gpu_qlora.py "
              "(or --tiny --cpu to check the logic on CPU)")
        return 0

    import datasets
    import transformers
    from qctrain.tiny import build_tokenizer

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    started = time.perf_counter()
    shape = TINY if args.tiny else PHI35_MINI
    tokens = synthetic_records(args.records, args.max_seq_length, shape["vocab_size"], seed=0)
    gpu_name = "" if args.cpu else torch.cuda.get_device_name(0)
    peak = None if args.cpu else peak_tflops(gpu_name, args.peak_tflops)
    with tempfile.TemporaryDirectory(prefix="qctrain-bench-gpu-") as tmp:
        t0 = time.perf_counter()
        model_dir = build_random_model(shape, Path(tmp) / "model", torch.float32 if args.cpu else torch.bfloat16,
                                       "cpu" if args.cpu else "cuda", seed=0)
        built = f"random model built and saved in {time.perf_counter() - t0:.0f}s"
        rows, results = run_variants(args, shape, model_dir, tokens, build_tokenizer(), Path(tmp), started, peak)
    model_desc = "tiny Phi-3" if args.tiny else "Phi-3.5-mini-shaped Phi3ForCausalLM (3.8B, random weights)"
    notes = [f"{model_desc}, NF4 + double quant, {'float32' if args.cpu else 'bf16'} compute, sdpa, LoRA "
             f"r{args.lora_r} all-linear, max_seq_length {args.max_seq_length}, batch {args.batch_size}, "
             f"gradient checkpointing, {args.steps} measured steps after {args.warmup}; device "
             f"{gpu_name or 'CPU'}; peak {peak or 'unknown'} TFLOP/s bf16 dense; MFU formula in "
             f"bench/gpu_qlora.py; whole run {time.perf_counter() - started:.0f}s", built, *comparisons(results)]
    common.record("gpu_qlora" + (" (tiny, CPU)" if args.cpu else ""), rows,
                  "\n".join(f"- {n}" for n in notes), None if args.results is None else Path(args.results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
