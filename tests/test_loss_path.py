"""The lean loss path and packs as rows, against TRL's own loss on the same weights (the reference).

QcTrainer subclasses SFTTrainer, so `SFTTrainer.compute_loss(trainer, ...)` is TRL's loss (its chunked
LM head, entropy and accuracy every call) on exactly the weights our compute_loss sees. TRL's batch is
its own collator's: one padding-free row of the packs. Ours: the packs as rows (sdpa).
"""

import contextlib

import pytest
import torch
from conftest import alpaca_records, write_json
from qctrain import data, train
from qctrain.basemodel.load import load_base_model, load_tokenizer
from qctrain.errors import InputError
from qctrain.recipe import Recipe
from trl import SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

BATCH = 4


def build(tmp_path, tiny_model_dir, packing: bool = True, loss_on: str = "assistant", **train_section):
    records = alpaca_records(90) + [{"instruction": f"Write a long answer {i}.", "input": "",
                                     "output": " ".join(["A longer reply, with more words in it."] * (3 + i % 9))}
                                    for i in range(30)]
    path = write_json(tmp_path / "a.json", records)
    recipe = Recipe.model_validate({
        "model": {"name": str(tiny_model_dir), "quantization": {"bits": 4, "compute_dtype": "float32"}},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"sources": [{"path": str(path)}], "eval": None, "max_seq_length": 256, "packing": packing,
                 "loss_on": loss_on},
        "train": {"max_steps": 1, "per_device_train_batch_size": BATCH, "logging_steps": 5, **train_section},
        "output": {"dir": str(tmp_path / "out")}})
    tokenizer = load_tokenizer(recipe.model)
    prepared = data.prepare(recipe.data, tokenizer, tmp_path / "out")
    trainer = train.build_trainer(recipe, load_base_model(recipe.model), tokenizer, prepared, tmp_path / "out")
    trainer.model.train()
    trainer.state.logging_steps = 5
    # Make the adapter do something: B starts at zero, so a fresh LoRA would leave its gradients untested.
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
    rows = len(prepared.train)
    # The first pack (the longest record, alone) and the last ones (many short records), so rows differ in length.
    return trainer, [prepared.train[i] for i in (0, *range(rows - BATCH + 1, rows))], tokenizer


def supervised_count(batch) -> torch.Tensor:
    """What the Trainer passes as num_items_in_batch (labels[..., 1:] that are not ignored)."""
    return (batch["labels"][:, 1:] != data.IGNORE).sum()


def loss_and_grads(trainer, loss_fn, batch) -> tuple[float, dict[str, torch.Tensor]]:
    trainer.model.zero_grad()
    loss = loss_fn(trainer, trainer.model, dict(batch), num_items_in_batch=supervised_count(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    trainer.model.zero_grad()
    return loss.item(), grads


def assert_same_loss_and_grads(trainer, ours_batch, trl_batch):
    assert supervised_count(ours_batch) == supervised_count(trl_batch)
    ref_loss, ref_grads = loss_and_grads(trainer, SFTTrainer.compute_loss, trl_batch)
    loss, grads = loss_and_grads(trainer, train.QcTrainer.compute_loss, ours_batch)
    assert loss == pytest.approx(ref_loss, rel=1e-6, abs=1e-6)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for name, grad in grads.items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=1e-4, atol=1e-7, msg=name)
    assert any(grad.abs().sum() > 0 for grad in grads.values())


@pytest.fixture(scope="module")
def packed(tmp_path_factory, tiny_model_dir):
    return build(tmp_path_factory.mktemp("packed"), tiny_model_dir)


@pytest.fixture(scope="module")
def packed_all_tokens(tmp_path_factory, tiny_model_dir):
    """loss_on: all, so a record's first token has a label of its own (which must not be trained on)."""
    return build(tmp_path_factory.mktemp("packed-all"), tiny_model_dir, loss_on="all")


def test_packs_become_rows_with_positions_restarting_per_record(packed):
    trainer, examples, tokenizer = packed
    assert trainer.loss_path == "lean" and isinstance(trainer.data_collator, train.PackedRows)
    batch = trainer.data_collator(examples)
    longest = max(len(e["input_ids"]) for e in examples)
    assert batch["input_ids"].shape == (BATCH, longest) and "attention_mask" not in batch
    assert sum(len(e["seq_lengths"]) for e in examples) > BATCH  # several records per pack
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert batch["position_ids"][row, :n].tolist() == [i for k in example["seq_lengths"] for i in range(k)]
        padding = {key: batch[key][row, n:] for key in ("position_ids", "input_ids", "labels")}
        assert (padding["position_ids"] == 0).all() and (padding["input_ids"] == tokenizer.pad_token_id).all()
        assert (padding["labels"] == data.IGNORE).all()
    # Every token TRL's padding-free row trains on, and only those.
    flat = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(examples)
    trained = [labels[labels != data.IGNORE].tolist() for labels in (batch["labels"], flat["labels"])]
    assert trained[0] == trained[1]
    assert trainer._tokens_in(batch) == flat["input_ids"].numel()


@pytest.mark.slow  # its trainer comes from request.getfixturevalue, which tests/tiers.py cannot see at collection
@pytest.mark.parametrize("setup", ["packed", "packed_all_tokens"])
def test_rows_and_lean_loss_equal_trl_loss_and_gradients(setup, request):
    trainer, examples, tokenizer = request.getfixturevalue(setup)
    flat = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(examples)
    assert flat["input_ids"].shape[0] == 1
    assert_same_loss_and_grads(trainer, trainer.data_collator(examples), flat)


def test_the_rows_check_has_teeth(packed):
    """With an attention mask (so transformers does not read record boundaries from the position ids) the
    records of a row attend to each other and the loss moves: the comparison above can fail."""
    trainer, examples, tokenizer = packed
    rows = trainer.data_collator(examples)
    leaky = {**rows, "attention_mask": (rows["position_ids"] != 0).long()}
    leaky["attention_mask"][:, 0] = 1
    with torch.no_grad():
        apart = trainer.compute_loss(trainer.model, dict(rows), num_items_in_batch=supervised_count(rows))
        mixed = trainer.compute_loss(trainer.model, leaky, num_items_in_batch=supervised_count(rows))
    assert abs(apart.item() - mixed.item()) > 1e-4


@pytest.mark.slow
def test_padded_records_lean_loss_equals_trl_loss(tmp_path, tiny_model_dir):
    trainer, examples, tokenizer = build(tmp_path, tiny_model_dir, packing=False)
    batch = trainer.data_collator(examples)
    assert not isinstance(trainer.data_collator, train.PackedRows) and "attention_mask" in batch
    assert (batch["attention_mask"] == 0).any()  # padded: TRL scores the padding positions, we do not
    assert_same_loss_and_grads(trainer, batch, batch)


def test_model_loss_path_equals_trl_loss(packed):
    """The path Liger's fused linear cross entropy takes on CUDA: the model's own loss from labels and
    num_items_in_batch, through PEFT and TRL's forward wrapper. On CPU that is transformers' cross entropy."""
    trainer, examples, tokenizer = packed
    flat = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(examples)
    trainer.loss_path = "model"
    try:
        assert_same_loss_and_grads(trainer, trainer.data_collator(examples), flat)
    finally:
        trainer.loss_path = "lean"


def test_entropy_and_accuracy_only_on_logged_steps(packed):
    trainer, examples, tokenizer = packed
    rows = trainer.data_collator(examples)
    flat = DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id, padding_free=True)(examples)
    metrics = trainer._metrics["train"]
    with torch.no_grad():
        metrics.clear()
        trainer.state.global_step = 0  # step 1 of logging_steps 5: not logged
        trainer.compute_loss(trainer.model, dict(rows), num_items_in_batch=supervised_count(rows))
        assert "entropy" not in metrics and "mean_token_accuracy" not in metrics and metrics["num_tokens"]
        trainer.state.global_step = 4  # step 5: logged
        trainer.compute_loss(trainer.model, dict(rows), num_items_in_batch=supervised_count(rows))
        ours = {key: metrics[key][-1] for key in ("entropy", "mean_token_accuracy")}
        SFTTrainer.compute_loss(trainer, trainer.model, dict(flat), num_items_in_batch=supervised_count(flat))
        reference = {key: metrics[key][-1] for key in ("entropy", "mean_token_accuracy")}
    assert ours["entropy"] == pytest.approx(reference["entropy"], rel=1e-5)
    assert ours["mean_token_accuracy"] == pytest.approx(reference["mean_token_accuracy"], abs=1e-9)
    metrics.clear()


def test_loss_variants_only_trl_implements_go_to_trl(packed):
    """DFT (and label smoothing, a custom loss function, an MoE router loss) change the loss: TRL computes it."""
    trainer, examples, tokenizer = packed
    rows = trainer.data_collator(examples)
    with torch.no_grad():
        plain = trainer.compute_loss(trainer.model, dict(rows), num_items_in_batch=supervised_count(rows)).item()
        trainer.args.loss_type = "dft"
        try:
            dft = trainer.compute_loss(trainer.model, dict(rows), num_items_in_batch=supervised_count(rows)).item()
            reference = SFTTrainer.compute_loss(trainer, trainer.model, dict(rows),
                                                num_items_in_batch=supervised_count(rows)).item()
        finally:
            trainer.args.loss_type = "nll"
    assert dft == pytest.approx(reference, rel=1e-6) and abs(dft - plain) > 1e-3


def test_loss_path_by_device_and_liger():
    assert train.loss_path("cpu", None) == "lean"
    assert train.loss_path("cuda", None) == "trl"  # TRL's Triton head already skips unsupervised positions
    assert train.loss_path("cuda", dict(train.LIGER_KERNELS)) == "model"
    assert train.loss_path("cuda", {**train.LIGER_KERNELS, "fused_linear_cross_entropy": False}) == "trl"


@pytest.mark.slow
def test_flash_attention_keeps_the_padding_free_row(tmp_path, tiny_model_dir):
    """Flash-attention kernels take variable-length sequences: TRL's padding-free row (with cu_seq_lens)."""
    recipe = Recipe.model_validate({"model": {"name": "x", "attn_implementation": "flash_attention_2"},
                                    "data": {"sources": [{"path": "a.json"}]}, "output": {"dir": "o"}})
    assert not train.packs_as_rows(recipe)
    assert train.packs_as_rows(recipe.model_copy(update={"model": recipe.model.model_copy(
        update={"attn_implementation": "sdpa"})}))
    unpacked = recipe.data.model_copy(update={"packing": False})
    assert not train.packs_as_rows(recipe.model_copy(update={"data": unpacked}))


class _Phi3:
    class config:
        model_type = "phi3"


def _recipe(**train_section) -> Recipe:
    return Recipe.model_validate({"model": {"name": "x"}, "data": {"sources": [{"path": "a.json"}]},
                                  "train": train_section, "output": {"dir": "o"}})


def test_liger_is_off_without_cuda_and_an_error_when_asked(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert train.liger_plan(_recipe(), _Phi3) == (None, "off (its kernels are Triton kernels for CUDA GPUs and "
                                                         "there is none here)")
    assert train.liger_plan(_recipe(use_liger_kernel=False), _Phi3)[0] is None
    with pytest.raises(InputError, match="train.use_liger_kernel: .*CUDA"):
        train.liger_plan(_recipe(use_liger_kernel=True), _Phi3)


def test_liger_on_by_default_for_phi3_on_cuda(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "liger_kernel" else real_find_spec(name, *a))
    kernels, said = train.liger_plan(_recipe(), _Phi3)
    assert kernels == train.LIGER_KERNELS and said.startswith("on (rope, rms norm, swiglu, fused linear cross")
    kernels, _ = train.liger_plan(_recipe(liger_kernel_config={"swiglu": False}), _Phi3)
    assert kernels == {**train.LIGER_KERNELS, "swiglu": False}
    assert train.liger_plan(_recipe(use_liger_kernel=False), _Phi3)[0] is None
    with pytest.raises(InputError, match="train.liger_kernel_config: unknown switch geglu"):
        train.liger_plan(_recipe(liger_kernel_config={"geglu": True}), _Phi3)

    class _Llama:
        class config:
            model_type = "llama"

    assert train.liger_plan(_recipe(), _Llama)[0] is None
    with pytest.raises(InputError, match="Phi-3 models, not llama"):
        train.liger_plan(_recipe(use_liger_kernel=True), _Llama)
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "liger_kernel" else real_find_spec(name, *a))
    assert train.liger_plan(_recipe(), _Phi3) == (None, "off (the liger-kernel package is not installed here)")


def test_sft_config_leaves_liger_to_us(tmp_path):
    """TRL's own switch would apply Liger's layer kernels without its fused loss: never passed on."""
    args = train.sft_config(_recipe(use_liger_kernel=True, liger_kernel_config={"swiglu": False}), tmp_path, False)
    assert not args.use_liger_kernel and args.liger_kernel_config is None


def test_activation_checkpointing_off_on_cpu_unless_named(tmp_path):
    assert not train.sft_config(_recipe(), tmp_path, False).activation_checkpointing
    assert train.sft_config(_recipe(gradient_checkpointing=True), tmp_path, False).activation_checkpointing


@contextlib.contextmanager
def liger_slicing():
    """Phi-3's forward slicing logits_to_keep as Liger's fused-loss forward (lce_forward) does on CUDA:
    hidden_states[:, keep, :], which a boolean [batch, length] mask cannot index (seen on an H200)."""
    from transformers.models.phi3 import modeling_phi3

    def positions_only(hidden_states, logits_to_keep):
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        return hidden_states[:, keep, :]

    original = modeling_phi3.slice_logits_to_keep
    modeling_phi3.slice_logits_to_keep = positions_only
    try:
        yield
    finally:
        modeling_phi3.slice_logits_to_keep = original


def test_liger_slicing_refuses_a_boolean_mask(packed):
    trainer, examples, tokenizer = packed
    rows = trainer.data_collator(examples)
    with torch.no_grad(), liger_slicing(), pytest.raises(IndexError, match="too many indices"):
        train.supervised_logits(trainer.model, dict(rows))


@pytest.mark.parametrize("training_path", ["model", "trl"])
def test_evaluation_takes_the_lean_path_whatever_training_takes(packed, training_path):
    """With Liger's fused loss (loss path "model", CUDA) or TRL's chunked head (CUDA) an evaluation computes the
    plain cross entropy and reports next-token accuracy (what evaluate.gate's heldout.mean_token_accuracy reads):
    the same numbers on every device."""
    trainer, examples, tokenizer = packed
    rows = trainer.data_collator(examples)
    metrics = trainer._metrics["eval"]
    trainer.model.eval()
    try:
        metrics.clear()
        with torch.no_grad():
            lean = trainer.compute_loss(trainer.model, dict(rows))
            trainer.loss_path = training_path
            with liger_slicing() if training_path == "model" else contextlib.nullcontext():
                other = trainer.compute_loss(trainer.model, dict(rows))
        assert other.item() == lean.item()
        assert len(metrics["mean_token_accuracy"]) == 2 and len(metrics["entropy"]) == 2
    finally:
        trainer.loss_path = "lean"
        trainer.model.train()
