"""The example's model: a small transformer text classifier whose base is pretrained by ``pretrain.py``.

``text_model:text_classifier`` is the factory ``trainer_architecture`` names (and a node must allow
in ``serving_allowed_architectures``). The trainer calls it as
``text_classifier(n_features=..., n_outputs=..., inputs=[...], **trainer_architecture_params)``;
``inputs`` describes the declared features, here one text with its tokenizer's vocabulary size and
``max_length``, and the model receives a dict: ``"text:review"`` (token id + 1, 0 pads) and
``"mask:review"`` (1.0 for a token, 0.0 for padding).

Every linear layer is an ``nn.Linear`` called as a module (``blocks.N.q``, ``k``, ``v``, ``o``,
``up``, ``down``), so ``trainer_lora_layers`` can name any of them; ``head`` is the task's layer,
the one part the base file does not hold.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

TEXT = "review"


class Block(nn.Module):
    """Pre-norm self-attention over the real tokens (padding masked out), then a feed-forward."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, ffn), nn.Linear(ffn, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """``x`` is ``[B, L, dim]``; ``keep`` (bool ``[B, 1, 1, L]``) the keys attention may read."""
        b, n, d = x.shape
        h = self.ln1(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        att = nn.functional.scaled_dot_product_attention(
            split(self.q(h)), split(self.k(h)), split(self.v(h)), attn_mask=keep
        )
        x = x + self.o(att.transpose(1, 2).reshape(b, n, d))
        out: torch.Tensor = x + self.down(nn.functional.gelu(self.up(self.ln2(x))))
        return out


class TextClassifier(nn.Module):
    """Token and position embeddings, ``layers`` blocks, a masked mean over the tokens, ``head``."""

    def __init__(
        self, vocab_size: int, max_length: int, n_outputs: int, dim: int, layers: int, heads: int, ffn: int
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab_size + 1, dim, padding_idx=0)  # row 0: padding
        self.position = nn.Parameter(torch.randn(max_length, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_outputs)

    def features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The pooled representation ``[B, dim]`` the head reads (what pretraining shapes)."""
        real = mask > 0
        # Position 0 is always readable: an empty text (all padding) must not make attention NaN.
        keep = (real | (torch.arange(ids.shape[1], device=ids.device) == 0))[:, None, None, :]
        h = self.embed(ids) + self.position[: ids.shape[1]]
        for block in self.blocks:
            h = block(h, keep)
        weights = real.float().unsqueeze(-1)
        pooled: torch.Tensor = (self.norm(h) * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return pooled

    def forward(self, x: Mapping[str, torch.Tensor]) -> torch.Tensor:
        out: torch.Tensor = self.head(self.features(x[f"text:{TEXT}"], x[f"mask:{TEXT}"]))
        return out


def text_classifier(
    *,
    n_features: int,
    n_outputs: int,
    inputs: Sequence[Mapping[str, Any]] = (),
    dim: int = 64,
    layers: int = 2,
    heads: int = 4,
    ffn: int = 128,
) -> TextClassifier:
    """The factory: the text input ``review`` (from ``inputs``) sizes the embedding and positions.

    ``n_features`` (the dense columns) is 0 for a text-only spec and unused.
    """
    text = next((i for i in inputs if i.get("name") == TEXT and i.get("kind") == "text"), None)
    if text is None:
        raise ValueError(f"text_classifier reads the text feature {TEXT!r}; declare it in trainer_features")
    return TextClassifier(int(text["vocab_size"]), int(text["max_length"]), n_outputs, dim, layers, heads, ffn)
