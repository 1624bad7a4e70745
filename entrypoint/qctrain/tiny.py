"""Build a tiny random Phi-3 model with Phi-3.5-mini's tokenizer, for tests and the CPU demo.

Nothing is downloaded: the tokenizer is the copy of Phi-3.5-mini's that this package carries
(assets/phi-3.5-tokenizer: 32,000 SentencePiece pieces with byte fallback, Phi-3.5's added tokens,
its chat template, and tokenizer.model for llama.cpp's converters), the vocabulary is padded to
32,064 as in Phi-3.5's config, and the weights are random (seeded). `build_tokenizer` trains a
1k-piece byte-level toy tokenizer on the spot, for the few places that want a tiny vocabulary.
"""

import shutil
from importlib import resources
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, Phi3Config, Phi3ForCausalLM, PreTrainedTokenizerBase, PreTrainedTokenizerFast

PHI35_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "tokenizer.model")
PHI35_VOCAB_SIZE = 32064  # Phi-3.5-mini's embedding rows: its 32,011 tokens padded to a multiple of 64
SPECIAL_TOKENS = ["<unk>", "<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

# Enough text that byte-level BPE learns common English and Chinese pieces; any text still
# encodes through the byte alphabet.
_CORPUS = """
Write a short poem about the sea. Explain how a bicycle works. Summarize the following text.
Translate the sentence into French. What is the capital of France? Give three tips for staying healthy.
The quick brown fox jumps over the lazy dog. Python is a programming language. Here is a list:
1. First step 2. Second step 3. Third step. def main(): return 0. The answer is 42.
请写一首关于大海的短诗。解释自行车是如何工作的。总结下面的文字。法国的首都是哪里？
给出保持健康的三个建议。机器学习是人工智能的一个分支。今天天气很好，我们去公园散步吧。
"""


def phi3_5_chat_template() -> str:
    """The original Phi-3.5 template as TRL ships it (TRL swaps in its `_training` twin for masking)."""
    return resources.files("trl").joinpath("chat_templates/phi3_5.jinja").read_text(encoding="utf-8")


def phi35_tokenizer_dir() -> Path:
    """The packaged Phi-3.5-mini tokenizer files (MIT, see assets/phi-3.5-tokenizer/README.md)."""
    return Path(str(resources.files("qctrain").joinpath("assets/phi-3.5-tokenizer")))


def phi35_tokenizer() -> PreTrainedTokenizerBase:
    return AutoTokenizer.from_pretrained(phi35_tokenizer_dir())


def build_tokenizer(vocab_size: int = 1024, corpus: str = _CORPUS) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([line for line in corpus.splitlines() if line] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="<|endoftext|>",
        unk_token="<unk>",
        pad_token="<|endoftext|>",
        model_max_length=4096,
    )
    fast.chat_template = phi3_5_chat_template()
    return fast


def build_model(tokenizer: PreTrainedTokenizerBase, hidden_size: int = 64, num_layers: int = 2,
                seed: int = 0, vocab_size: int | None = None) -> Phi3ForCausalLM:
    config = Phi3Config(
        vocab_size=vocab_size or len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        original_max_position_embeddings=4096,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = Phi3ForCausalLM(config)
    # Like the real Phi-3.5: stop at <|end|> as well as at <|endoftext|>.
    model.generation_config.eos_token_id = [tokenizer.convert_tokens_to_ids("<|end|>"), tokenizer.eos_token_id]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model


def write_tiny_model(out_dir: Path, hidden_size: int = 64, num_layers: int = 2, seed: int = 0) -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = phi35_tokenizer()
    model = build_model(tokenizer, hidden_size=hidden_size, num_layers=num_layers, seed=seed,
                        vocab_size=PHI35_VOCAB_SIZE)
    model.save_pretrained(out_dir)
    # The tokenizer files as they are (tokenizer.model too: llama.cpp's converters read the vocabulary from it).
    for name in PHI35_TOKENIZER_FILES:
        shutil.copyfile(phi35_tokenizer_dir() / name, out_dir / name)
    return out_dir
