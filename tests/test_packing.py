"""Packing keeps the packed records apart, as one padding-free row or as rows.

TRL's padding-free collator concatenates the packed records of a batch into one row, restarts
position_ids at each record and passes no attention mask. With sdpa (the default) transformers reads
the record boundaries from those position_ids and builds a block-diagonal causal mask: a packed row
must give the same logits and loss as its records run one by one.

Only without a KV cache: transformers skips that detection when a cache is in use, and a model whose
config says use_cache: true (Phi-3.5's does) builds one even in training mode. TRL's compute_loss and ours
pass use_cache=False, which is what keeps packed training correct; a test checks it through our trainer,
which (with sdpa) keeps a batch of packs as rows: the same detection, row by row.
"""

import json

import data_lists
import pytest
import torch
from conftest import alpaca_records, write_json
from qctrain import data
from qctrain.recipe import DataSection
from transformers import AutoModelForCausalLM
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

LENGTHS = [23, 7, 41, 1, 16]


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def tiny_model(request, tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32,
                                                 attn_implementation=request.param)
    return model.eval()


def records(vocab: int) -> list[dict]:
    gen = torch.Generator().manual_seed(0)
    out = []
    for n in LENGTHS:
        ids = torch.randint(7, vocab, (n,), generator=gen).tolist()
        labels = [t if i >= n // 3 else data.IGNORE for i, t in enumerate(ids)]
        out.append({"input_ids": ids, "labels": labels})
    return out


def test_packed_row_equals_records_run_separately(tiny_model):
    recs = records(tiny_model.config.vocab_size)
    collator = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    packed = {"input_ids": [t for r in recs for t in r["input_ids"]], "labels": [t for r in recs for t in r["labels"]],
              "seq_lengths": LENGTHS}
    batch = collator([packed])
    assert batch["input_ids"].shape == (1, sum(LENGTHS)) and "attention_mask" not in batch
    assert batch["position_ids"][0].tolist() == [i for n in LENGTHS for i in range(n)]
    with torch.no_grad():
        out = tiny_model(**batch, use_cache=False)
        separate = [tiny_model(torch.tensor([r["input_ids"]]), labels=torch.tensor([r["labels"]])) for r in recs]

    start = 0
    for rec, sep in zip(recs, separate, strict=True):
        n = len(rec["input_ids"])
        torch.testing.assert_close(out.logits[0, start:start + n], sep.logits[0], atol=1e-5, rtol=1e-4)
        start += n
    # The loss: the mean over every supervised next-token prediction of every record.
    total, count = 0.0, 0
    for rec, sep in zip(recs, separate, strict=True):
        targets = torch.tensor(rec["labels"][1:], dtype=torch.long)
        losses = torch.nn.functional.cross_entropy(sep.logits[0, :-1], targets, ignore_index=data.IGNORE,
                                                   reduction="sum")
        total, count = total + losses.item(), count + int((targets != data.IGNORE).sum())
    assert out.loss.item() == pytest.approx(total / count, abs=1e-5)


@pytest.mark.parametrize("how", ["no position_ids", "with a KV cache"])
def test_the_check_has_teeth(tiny_model, how):
    """Without restarting positions, or with a cache, the same row attends across records."""
    recs = records(tiny_model.config.vocab_size)
    ids = torch.tensor([[t for r in recs for t in r["input_ids"]]])
    positions = torch.tensor([[i for n in LENGTHS for i in range(n)]])
    with torch.no_grad():
        if how == "no position_ids":
            leaky = tiny_model(ids, use_cache=False).logits
        else:
            leaky = tiny_model(ids, position_ids=positions, use_cache=True).logits
        second = tiny_model(torch.tensor([recs[1]["input_ids"]])).logits
    start = LENGTHS[0]
    assert not torch.allclose(leaky[0, start:start + LENGTHS[1]], second[0], atol=1e-3)


def test_prepared_packs_keep_boundaries_and_tokens(tokenizer, tmp_path):
    """prepare() packs every kept record whole (seq_lengths are the record lengths) with no token lost."""
    path = write_json(tmp_path / "a.json", alpaca_records(120))
    cfg = DataSection.model_validate({"sources": [{"path": str(path)}], "eval": None, "max_seq_length": 128})
    prepared = data.prepare(cfg, tokenizer, tmp_path / "out")
    train = prepared.train
    assert "seq_lengths" in train.column_names
    lengths = sorted(n for row in train["seq_lengths"] for n in row)
    convs, _ = data_lists.load_conversations(cfg.sources, cfg.on_bad_record)
    template = data.template.training_template(data.resolve_chat_template("model", tokenizer), tokenizer, "assistant")
    ids, _ = data.tokenize(convs, tokenizer, template, "assistant")
    assert lengths == sorted(map(len, ids))
    assert all(len(row) <= 128 and len(row) == sum(s) for row, s in zip(train["input_ids"], train["seq_lengths"],
                                                                         strict=True))
    report = json.loads((prepared.dir / "report.json").read_text())
    assert report["train"]["packing_efficiency"] == round(sum(lengths) / (len(train) * 128), 4)
    assert len(train) == -(-sum(lengths) // 128) or report["train"]["packing_efficiency"] > 0.7


@pytest.mark.slow
def test_trainer_gets_packs_as_rows(tiny_model_dir, tokenizer, tmp_path):
    """With sdpa our trainer collates a batch of packs as rows (padding-free would be one row of every pack,
    whose block-diagonal mask sdpa computes densely): positions restart per record, no attention mask."""
    from qctrain import train
    from qctrain.recipe import Recipe

    path = write_json(tmp_path / "a.json", alpaca_records(40))
    recipe = Recipe.model_validate({
        "model": {"name": str(tiny_model_dir), "quantization": None},
        "data": {"sources": [{"path": str(path)}], "eval": None, "max_seq_length": 128},
        "train": {"max_steps": 1, "per_device_train_batch_size": 2, "gradient_checkpointing": False},
        "output": {"dir": str(tmp_path / "out")}})
    prepared = data.prepare(recipe.data, tokenizer, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    trainer = train.build_trainer(recipe, model, tokenizer, prepared, tmp_path / "out")
    assert trainer.args.packing and trainer.args.packing_strategy == "bfd"
    batch = next(iter(trainer.get_train_dataloader()))
    assert batch["input_ids"].shape[0] == 2 and "attention_mask" not in batch
    records = []  # (row, start, end) of every record
    for row, positions in enumerate(batch["position_ids"]):
        # Padding: the pad token with no label (a record's closing eos is the same token, with a label).
        not_padding = (batch["input_ids"][row] != tokenizer.pad_token_id) | (batch["labels"][row] != data.IGNORE)
        real = int(not_padding.nonzero().max()) + 1
        starts = (positions[:real] == 0).nonzero().flatten().tolist() + [real]
        records += [(row, lo, hi) for lo, hi in zip(starts[:-1], starts[1:], strict=True)]
    assert len(records) >= 3  # several records in the rows, each starting at position 0

    # The trainer's own loss on the rows (use_cache=False, our loss path) equals the loss of their records
    # run one by one.
    trainer.model.eval()
    with torch.no_grad():
        rows_loss = trainer.compute_loss(trainer.model, dict(batch)).item()
        total, count = 0.0, 0
        for row, lo, hi in records:
            ids, labels = batch["input_ids"][row:row + 1, lo:hi], batch["labels"][row, lo + 1:hi]
            logits = trainer.model(input_ids=ids, use_cache=False).logits[0, :-1]
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=data.IGNORE,
                                                       reduction="sum").item()
            count += int((labels != data.IGNORE).sum())
    assert rows_loss == pytest.approx(total / count, abs=1e-4)


@pytest.mark.slow
def test_liger_switch_goes_through_the_recipe(tiny_model_dir, tokenizer, tmp_path):
    """train.use_liger_kernel: we apply Liger ourselves (its fused linear cross entropy included), so TRL's
    switch, which leaves that out, is never passed on. Liger's kernels are Triton (CUDA only): asking for them
    on a machine without a GPU is an error at train start; left unset they are off and the run says so.
    Whether they engage on Phi-3 and match the unfused loss can only be checked on a GPU: bench/gpu_qlora.py
    does (packed vs packed+liger)."""
    from qctrain import train
    from qctrain.errors import InputError
    from qctrain.recipe import Recipe

    path = write_json(tmp_path / "a.json", alpaca_records(20))
    recipe = Recipe.model_validate({
        "model": {"name": str(tiny_model_dir), "quantization": None},
        "data": {"sources": [{"path": str(path)}], "eval": None, "max_seq_length": 128},
        "train": {"max_steps": 1, "use_liger_kernel": True, "gradient_checkpointing": False},
        "output": {"dir": str(tmp_path / "out")}})
    prepared = data.prepare(recipe.data, tokenizer, tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    assert not train.sft_config(recipe, tmp_path / "out", has_eval=False).use_liger_kernel
    if not torch.cuda.is_available():
        with pytest.raises(InputError, match="train.use_liger_kernel: .*CUDA GPUs"):
            train.build_trainer(recipe, model, tokenizer, prepared, tmp_path / "out")
