"""A token encoder over numeric features: the shape of a large model (an embedding plus a transformer).

``stream_learner.learn.encoder:token_encoder`` is a model factory
(``trainer_architecture``; a node must allow it in
``serving_allowed_architectures``) for bringing a pretrained base: feature
``i``'s standardized value ``x`` becomes token ``i * buckets + bucket(x)``
of an embedding of ``vocab`` rows, plus a learned position (the feature)
and a linear view of the value itself; ``layers`` pre-norm transformer
blocks, a mean over the features, then ``head``. Every linear layer is an
``nn.Linear`` called as a module (``blocks.N.q``, ``k``, ``v``, ``o``,
``up``, ``down``), so any of them can carry LoRA adapters.

With ``vocab=100_000, dim=512, layers=6, ffn=1024`` it has about 64M
parameters, 51M of them the embedding: the issue's target shape, used by
``bench/bench_large.py``.

>>> model = token_encoder(n_features=3, n_outputs=2, vocab=64, dim=8, layers=1, heads=2, ffn=16)
>>> model(torch.zeros(4, 3)).shape
torch.Size([4, 2])
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["TokenEncoder", "token_encoder", "token_encoder_large"]


class Block(nn.Module):
    """Pre-norm self-attention and feed-forward, each with a residual."""

    def __init__(self, dim: int, heads: int, ffn: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.up, self.down = nn.Linear(dim, ffn), nn.Linear(ffn, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.ln1(x)

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(b, n, self.heads, d // self.heads).transpose(1, 2)

        att = nn.functional.scaled_dot_product_attention(split(self.q(h)), split(self.k(h)), split(self.v(h)))
        x = x + self.o(att.transpose(1, 2).reshape(b, n, d))
        out: torch.Tensor = x + self.down(nn.functional.gelu(self.up(self.ln2(x))))
        return out


class TokenEncoder(nn.Module):
    """See the module docstring."""

    def __init__(
        self, n_features: int, n_outputs: int, vocab: int, dim: int, layers: int, heads: int, ffn: int
    ) -> None:
        super().__init__()
        self.n_features = n_features
        self.buckets = max(1, vocab // max(1, n_features))
        self.embed = nn.Embedding(vocab, dim)
        self.position = nn.Parameter(torch.randn(n_features, dim) * 0.02)
        self.value = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, ffn) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, n_outputs)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Token ids ``[B, n_features]``: the feature's bucket of [-4, 4] standard deviations."""
        frac = ((x.clamp(-4.0, 4.0) + 4.0) / 8.0 * self.buckets).long().clamp(0, self.buckets - 1)
        offsets = torch.arange(self.n_features, device=x.device) * self.buckets
        ids: torch.Tensor = (offsets + frac) % self.embed.num_embeddings
        return ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(self.tokens(x)) + self.position + self.value(x.unsqueeze(-1))
        for block in self.blocks:
            h = block(h)
        out: torch.Tensor = self.head(self.norm(h).mean(dim=1))
        return out


def token_encoder(
    *,
    n_features: int,
    n_outputs: int,
    vocab: int = 1000,
    dim: int = 32,
    layers: int = 2,
    heads: int = 4,
    ffn: int = 64,
) -> TokenEncoder:
    """The factory ``trainer_architecture`` names (small by default: the keywords give its size)."""
    return TokenEncoder(n_features, n_outputs, vocab, dim, layers, heads, ffn)


def token_encoder_large(*, n_features: int, n_outputs: int) -> TokenEncoder:
    """The issue's target shape as a preset: a 100k x 512 embedding and 6 blocks (about 64M parameters)."""
    return TokenEncoder(n_features, n_outputs, vocab=100_000, dim=512, layers=6, heads=8, ffn=1024)
