"""Pretrain the example's base locally: a tokenizer and a small transformer, on a generated corpus.

Nothing is downloaded. The tokenizer is trained with the Hugging Face ``tokenizers`` library's own
word-level trainer on the corpus (:mod:`corpus`); the model is ``text_model.text_classifier`` at the
size ``stream-learner.toml`` gives (``trainer_architecture_params``), trained to tell a sentence's
marker-word group (praise, complaint, intense slang, none). Written to ``--out``:

- ``tokenizer.json``, the file ``trainer_features`` names;
- ``base.safetensors``, every tensor of the model but the pretraining ``head`` (which has another
  number of classes): the frozen base ``trainer_base_weights`` and ``serving_base_weights`` name.

Run::

    python pretrain.py --out build/
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))  # corpus and text_model, wherever this is run from

from corpus import NEUTRAL, PRETRAIN_CLASSES, pretraining_corpus  # noqa: E402
from text_model import TEXT, text_classifier  # noqa: E402

CONFIG = HERE / "stream-learner.toml"


def settings() -> dict[str, Any]:
    """The example's TOML settings (the architecture's parameters and the text's ``max_length``)."""
    return tomllib.loads(CONFIG.read_text())


def max_length(config: dict[str, Any]) -> int:
    """The declared ``max_length`` of the text feature, from its ``trainer_features`` entry."""
    entry = next(f for f in config["trainer_features"] if f.startswith(f"{TEXT}:text:"))
    return int(entry.split("max_length=")[1].split(":")[0])


def train_tokenizer(texts: list[str], path: Path) -> Any:
    """A word-level tokenizer (whitespace split, ``[UNK]`` for unseen words) trained on ``texts``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))
    tokenizer.save(str(path))
    return tokenizer


def encode(tokenizer: Any, texts: list[str], length: int) -> dict[str, torch.Tensor]:
    """The model's input as the trainer's featurizer makes it: token id + 1 (0 pads), and the mask."""
    ids = torch.zeros((len(texts), length), dtype=torch.int64)
    for r, encoding in enumerate(tokenizer.encode_batch(texts)):
        row = encoding.ids[:length]
        ids[r, : len(row)] = torch.tensor(row, dtype=torch.int64) + 1
    return {f"text:{TEXT}": ids, f"mask:{TEXT}": (ids > 0).float()}


def pretrain(
    out: Path, *, sentences: int = 4000, epochs: int = 2, seed: int = 0, quiet: bool = False
) -> dict[str, Any]:
    """Write ``tokenizer.json`` and ``base.safetensors`` to ``out``; return what was trained."""

    t0 = time.monotonic()
    # One thread: a model this small gains nothing from more, and on 2 busy cores they cost 10x.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _pretrain(out, sentences, epochs, seed, quiet, t0)
    finally:
        torch.set_num_threads(threads)


def _pretrain(out: Path, sentences: int, epochs: int, seed: int, quiet: bool, t0: float) -> dict[str, Any]:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = settings()
    length = max_length(config)
    corpus = pretraining_corpus(sentences, seed)
    texts = [t for t, _ in corpus]
    # Every neutral word too: a word the corpus never used would be [UNK] for ever after.
    tokenizer = train_tokenizer([*texts, " ".join(NEUTRAL)], out / "tokenizer.json")
    vocab = tokenizer.get_vocab_size(with_added_tokens=True)
    torch.manual_seed(seed)
    model = text_classifier(
        n_features=0,
        n_outputs=len(PRETRAIN_CLASSES),
        inputs=[{"name": TEXT, "kind": "text", "vocab_size": vocab, "max_length": length}],
        **config["trainer_architecture_params"],
    )
    held = max(200, sentences // 10)
    x, y = encode(tokenizer, texts, length), torch.tensor([g for _, g in corpus])
    train = range(held, sentences)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    rng = random.Random(seed)
    for epoch in range(epochs):
        model.train()
        order = list(train)
        rng.shuffle(order)
        for start in range(0, len(order), 64):
            idx = torch.tensor(order[start : start + 64])
            loss = torch.nn.functional.cross_entropy(model({k: v[idx] for k, v in x.items()}), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            accuracy = (model({k: v[:held] for k, v in x.items()}).argmax(1) == y[:held]).float().mean().item()
        if not quiet:
            print(f"pretrain epoch {epoch + 1}/{epochs}: held-out group accuracy {accuracy:.3f}", flush=True)
    # The base: every tensor but the head, named as the model's state_dict (contiguous, as safetensors wants).
    base = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("head.")}
    save_file(base, str(out / "base.safetensors"))
    info = {
        "vocab_size": vocab,
        "parameters": sum(p.numel() for p in model.parameters()),
        "base_tensors": len(base),
        "base_bytes": (out / "base.safetensors").stat().st_size,
        "held_out_accuracy": round(accuracy, 4),
        "seconds": round(time.monotonic() - t0, 1),
    }
    if not quiet:
        print(
            f"base: {info['parameters']:,} parameters, {info['base_bytes']:,} bytes -> {out / 'base.safetensors'}; "
            f"tokenizer: {vocab} tokens -> {out / 'tokenizer.json'} ({info['seconds']} s)"
        )
    return info


def main(argv: list[str] | None = None) -> None:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE / "build")
    parser.add_argument("--sentences", type=int, default=4000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    pretrain(args.out, sentences=args.sentences, epochs=args.epochs, seed=args.seed)


if __name__ == "__main__":
    main()
