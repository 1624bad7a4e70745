"""The preference trainers (issue 23) on the tiny 4-bit model, a couple of steps each: both starting points (a new
adapter on the bare base, whose reference is the base; an SFT adapter continued, whose reference is TRL's frozen
copy of it), one 4-bit base in memory either way, policy = reference exactly at step 0, and only the policy saved."""

from pathlib import Path

import pytest
import torch
from conftest import REPO
from qctrain.basemodel import load as models
from qctrain.data.stage import prepare
from qctrain.outputs import save_trained_adapter
from qctrain.preference import (
    POLICY,
    REFERENCE,
    TRAINERS,
    KLRotation,
    build_preference_trainer,
    preference_config,
)
from qctrain.recipe import Recipe
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def recipe_for(tiny_model_dir, tmp_path, method: str = "dpo", **train) -> Recipe:
    return Recipe.model_validate({
        "method": method,
        "model": {"name": str(tiny_model_dir), "quantization": {"compute_dtype": "float32"}},
        "lora": {"r": 8, "alpha": 16},
        "data": {"sources": [{"path": str(REPO / "data" / "style_pairs.json")}], "eval": {"count": 4},
                 "max_seq_length": 128},
        "train": {"max_steps": 2, "per_device_train_batch_size": 2, "per_device_eval_batch_size": 4,
                  "learning_rate": 5e-3, "logging_steps": 1, "save_strategy": "no", "eval_strategy": "steps",
                  "eval_steps": 2, **train},
        "output": {"dir": str(tmp_path / "out")}})


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, tmp_path_factory):
    """An adapter standing in for an SFT run's: random, non-zero (so the reference differs from the base)."""
    from peft import LoraConfig, get_peft_model

    recipe = recipe_for(tiny_model_dir, tmp_path_factory.mktemp("sft"))
    peft = get_peft_model(models.load_base_model(recipe.model), LoraConfig(
        r=8, lora_alpha=16, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"))
    folder = tmp_path_factory.mktemp("sft-adapter")
    peft.save_pretrained(folder)
    return folder


def four_bit_weights(model) -> int:
    import bitsandbytes as bnb

    return len({id(m.weight) for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)})


def prepared_for(recipe: Recipe, tokenizer):
    return prepare(recipe.data, tokenizer, Path(recipe.output.dir), method=recipe.method)


def rows(trainer, key: str) -> list[dict]:
    return [row for row in trainer.state.log_history if key in row]


def test_continuing_an_sft_adapter_keeps_it_frozen_as_the_reference_on_one_base(tiny_model_dir, sft_adapter,
                                                                                 tmp_path):
    recipe = recipe_for(tiny_model_dir, tmp_path)
    tokenizer = models.load_tokenizer(recipe.model)
    prepared = prepared_for(recipe, tokenizer)
    # TRL alone: its "ref" copy is taken before the trainable weights are cast to bf16, so the two differ
    base = models.load_base_model(recipe.model)
    from peft import PeftModel

    plain = TRAINERS["dpo"](model=PeftModel.from_pretrained(base, str(sft_adapter), adapter_name=POLICY,
                                                            is_trainable=True),
                            args=preference_config(recipe, tmp_path / "ckpt", has_eval=True),
                            train_dataset=prepared.train, eval_dataset=prepared.eval, processing_class=tokenizer)
    assert max((p.float() - plain.model.get_parameter(n.replace(f".{POLICY}.", f".{REFERENCE}.")).float()).abs().max()
               for n, p in plain.model.named_parameters() if f".{POLICY}." in n) > 0
    del plain, base

    base = models.load_base_model(recipe.model)
    weights_of_base = four_bit_weights(base)
    trainer = build_preference_trainer(recipe, base, tokenizer, prepared, tmp_path / "ckpt", tmp_path / "out",
                                       adapter_dir=sft_adapter)
    policy = {n: p for n, p in trainer.model.named_parameters() if f".{POLICY}." in n}
    reference = {n: p for n, p in trainer.model.named_parameters() if f".{REFERENCE}." in n}
    assert list(trainer.model.peft_config) == [POLICY, REFERENCE] and trainer.ref_model is None
    assert all(p.requires_grad for p in policy.values()) and not any(p.requires_grad for p in reference.values())
    assert four_bit_weights(trainer.model) == weights_of_base  # one 4-bit base, no second copy for the reference
    saved = load_file(sft_adapter / "adapter_model.safetensors")
    for name, param in policy.items():  # aligned: the policy starts as exactly the reference, the SFT adapter
        assert torch.equal(param, trainer.model.get_parameter(name.replace(f".{POLICY}.", f".{REFERENCE}.")))

    trainer.train()
    [start, *_] = rows(trainer, "eval_loss")
    assert start["step"] == 0 and start["eval_rewards/accuracies"] == 0.0 and start["eval_rewards/margins"] == 0.0
    first = rows(trainer, "rewards/chosen")[0]
    assert first["step"] == 1 and first["rewards/chosen"] == first["rewards/rejected"] == 0.0
    end = rows(trainer, "eval_loss")[-1]  # it learnt the preference: held-out pairs, after 2 steps
    assert end["step"] == 2 and end["eval_rewards/margins"] > 0 and end["eval_rewards/accuracies"] > 0.5
    # the reference is still the SFT adapter; the policy moved
    for name, param in reference.items():
        assert torch.equal(param.detach(), saved[name.replace(f".{REFERENCE}.", ".")].to(param.dtype)), name
    assert any(not torch.equal(param, trainer.model.get_parameter(name.replace(f".{POLICY}.", f".{REFERENCE}.")))
               for name, param in policy.items())
    save_trained_adapter(trainer.model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["README.md", "adapter_config.json",
                                                                         "adapter_model.safetensors"]


def test_from_the_bare_base_the_reference_is_the_base(tiny_model_dir, tmp_path):
    recipe = recipe_for(tiny_model_dir, tmp_path)
    tokenizer = models.load_tokenizer(recipe.model)
    base = models.load_base_model(recipe.model)
    weights_of_base = four_bit_weights(base)
    trainer = build_preference_trainer(recipe, base, tokenizer, prepared_for(recipe, tokenizer), tmp_path / "ckpt",
                                       tmp_path / "out")
    assert list(trainer.model.peft_config) == [POLICY] and four_bit_weights(trainer.model) == weights_of_base
    trainer.train()
    first = rows(trainer, "rewards/chosen")[0]
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0  # a new adapter starts as the base (B = 0)
    assert rows(trainer, "eval_loss")[0]["step"] == 0


def test_kto_makes_its_kl_completions_per_batch(tiny_model_dir, tmp_path):
    recipe = recipe_for(tiny_model_dir, tmp_path, method="kto")
    tokenizer = models.load_tokenizer(recipe.model)
    trainer = build_preference_trainer(recipe, models.load_base_model(recipe.model), tokenizer,
                                       prepared_for(recipe, tokenizer), tmp_path / "ckpt", tmp_path / "out")
    assert isinstance(trainer.data_collator, KLRotation)
    batch = trainer.data_collator([{"prompt_ids": [1, 2], "completion_ids": [3], "label": True},
                                   {"prompt_ids": [4], "completion_ids": [5, 6], "label": False}])
    pad = trainer.data_collator.pad_token_id
    assert batch["KL_input_ids"].tolist() == [[1, 2, 5, 6], [4, 3, pad, pad]]  # each prompt, another's completion
    trainer.train()
    first = rows(trainer, "rewards/chosen")[0]
    assert first["loss"] == pytest.approx(0.5) and first["rewards/chosen"] == 0.0 and first["kl"] == 0.0
    assert rows(trainer, "eval_loss")[-1]["eval_rewards/margins"] > 0


def test_the_compact_fused_head_on_cpu_gives_trls_losses(tiny_model_dir, tmp_path):
    """preference.compact_head_on_cpu, set where the trainer is built on CPU: TRL's fused LM head scoring only the
    completion positions (its CUDA path) gives on CPU the loss and log-probabilities of its every-position CPU path."""
    import trl.trainer.utils as trl_utils
    from qctrain.preference import compact_head_on_cpu
    from trl.kernels import chunked_logprob

    recipe = recipe_for(tiny_model_dir, tmp_path)
    tokenizer = models.load_tokenizer(recipe.model)
    trainer = build_preference_trainer(recipe, models.load_base_model(recipe.model), tokenizer,
                                       prepared_for(recipe, tokenizer), tmp_path / "ckpt", tmp_path / "out")
    assert getattr(trl_utils._use_triton, "qctrain_compact_on_cpu", False)  # build_preference_trainer set it
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    outputs = {}
    for name, decide in (("trl", chunked_logprob._use_triton), ("compact", None)):
        trl_utils._use_triton = decide or trl_utils._use_triton
        if decide is None:
            assert compact_head_on_cpu()
        trainer._metrics["train"].clear()
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, batch)
        outputs[name] = (loss.item(), {k: v[-1] for k, v in trainer._metrics["train"].items()})
    assert outputs["compact"][0] == pytest.approx(outputs["trl"][0], abs=1e-6)
    for key in ("logps/chosen", "logps/rejected", "rewards/margins"):
        assert outputs["compact"][1][key] == pytest.approx(outputs["trl"][1][key], rel=1e-5, abs=1e-5), key
