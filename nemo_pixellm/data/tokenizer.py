"""Tokenizer: a small byte-level BPE trained offline for the tiny default, or a Hugging Face
``tokenizer.json`` directory for real variants. Both get the same PixelLM special tokens."""

import os
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

PAD, EOS, IMAGE = "<|pad|>", "<|end|>", "<image>"
NEWLINE, VIEW_SEP = "<|image_newline|>", "<|view_sep|>"
USER, ASSISTANT, SYSTEM = "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, EOS, IMAGE, NEWLINE, VIEW_SEP, USER, ASSISTANT, SYSTEM]


class PixelTokenizer:
    def __init__(self, tokenizer: Tokenizer):
        tokenizer.add_special_tokens(SPECIAL_TOKENS)
        self.tok = tokenizer
        self.pad_id, self.eos_id, self.image_id = (tokenizer.token_to_id(t) for t in (PAD, EOS, IMAGE))
        self.user_id, self.assistant_id = tokenizer.token_to_id(USER), tokenizer.token_to_id(ASSISTANT)
        self.system_id = tokenizer.token_to_id(SYSTEM)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "PixelTokenizer":
        file = Path(path) / "tokenizer.json" if Path(path).is_dir() else Path(path)
        if not file.is_file():
            raise FileNotFoundError(f"tokenizer not found: {file} (set dataset.tokenizer_path to a directory with tokenizer.json, or leave it unset for the synthetic BPE)")
        return cls(Tokenizer.from_file(str(file)))


def train_bpe(texts, vocab_size: int, out_file: str | os.PathLike) -> PixelTokenizer:
    """Train a byte-level BPE on an iterable of strings and save it (deterministic for a given corpus)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    Path(out_file).parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{out_file}.tmp{os.getpid()}"
    tok.save(tmp)
    os.replace(tmp, out_file)
    return PixelTokenizer(tok)
