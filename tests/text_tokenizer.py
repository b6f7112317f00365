"""A small tokenizer.json built here with the tokenizers library's own trainer (nothing downloads)."""

from __future__ import annotations

from pathlib import Path

CORPUS = [
    "the product arrived broken and late",
    "great product works perfectly",
    "terrible service never again",
    "excellent quality fast delivery",
    "awful it stopped working after a day",
    "love it would buy again",
]


def make_tokenizer(path: Path, corpus: list[str] | None = None) -> Path:
    """A word-level tokenizer (whitespace split, ``[UNK]`` for unseen words) trained on ``corpus``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(corpus or CORPUS, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tokenizer.save(str(path))
    return path
