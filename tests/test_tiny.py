"""The tiny test model carries Phi-3.5-mini's tokenizer (packaged, not read from ../shared): its ids, its
padded vocabulary, its SentencePiece model for llama.cpp, its chat template."""

import hashlib
import json
import tomllib
from pathlib import Path

from conftest import REPO
from qctrain import tiny

SENTENCEPIECE_SHA256 = "9e556afd44213b6bd1be2b850ebbbd98f5481437a8021afaf58ee7fb1818d347"
PHI35_SPECIAL = {"<|endoftext|>": 32000, "<|assistant|>": 32001, "<|system|>": 32006, "<|end|>": 32007,
                 "<|user|>": 32010, "<s>": 1, "<unk>": 0}


def test_tiny_model_has_phi35_tokenizer_and_padded_vocabulary(tiny_model_dir, tokenizer):
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["vocab_size"] == 32064 and len(tokenizer) == 32011
    assert (config["hidden_size"], config["num_hidden_layers"]) == (64, 2)
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 32000, 32000)
    generation = json.loads((tiny_model_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [32007, 32000]
    assert {t: tokenizer.convert_tokens_to_ids(t) for t in PHI35_SPECIAL} == PHI35_SPECIAL
    # Llama-2 SentencePiece ids of ordinary text, and byte fallback for an emoji (U+1F408 as its 4 UTF-8 bytes)
    assert tokenizer("Hello world", add_special_tokens=False)["input_ids"] == [15043, 3186]
    assert tokenizer.convert_ids_to_tokens(tokenizer("🐈", add_special_tokens=False)["input_ids"])[-4:] == [
        "<0xF0>", "<0x9F>", "<0x90>", "<0x88>"]
    assert tokenizer.chat_template == (tiny.phi35_tokenizer_dir() / "chat_template.jinja").read_text()
    assert tokenizer.chat_template == tiny.phi3_5_chat_template()  # the template TRL ships as phi3_5


def test_sentencepiece_model_travels_with_the_tiny_model(tiny_model_dir):
    """llama.cpp's converters read the vocabulary from tokenizer.model: the same 32,000 pieces as tokenizer.json."""
    from transformers.utils import sentencepiece_model_pb2_new as sentencepiece_pb2

    raw = (tiny_model_dir / "tokenizer.model").read_bytes()
    assert hashlib.sha256(raw).hexdigest() == SENTENCEPIECE_SHA256
    model = sentencepiece_pb2.ModelProto()
    model.ParseFromString(raw)
    assert model.trainer_spec.byte_fallback
    vocab = json.loads((tiny_model_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    assert [p.piece for p in model.pieces] == sorted(vocab, key=vocab.get)


def test_tokenizer_is_package_data():
    """Inside the package (so the wheel and the image hold it), with its licence note; nothing from ../shared."""
    folder = tiny.phi35_tokenizer_dir()
    assert folder.is_relative_to(REPO / "entrypoint" / "qctrain") or "site-packages" in folder.parts
    assert {p.name for p in folder.iterdir()} >= {*tiny.PHI35_TOKENIZER_FILES, "README.md"}
    assert "MIT" in (folder / "README.md").read_text()
    package_data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "assets/phi-3.5-tokenizer/*" in package_data["qctrain"]
    assert "shared" not in Path(tiny.__file__).read_text()


def test_toy_tokenizer_still_builds():  # bench/gpu_qlora.py --tiny uses it
    toy = tiny.build_tokenizer()
    assert len(toy) <= 1024 and toy.convert_tokens_to_ids("<|end|>") < 16
