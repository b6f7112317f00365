"""int8 linear layers: int8 weights with per-output-channel scales, activations quantized at run time.

A :class:`Int8Linear` holds, as plain buffers (so they travel as ordinary
safetensors entries and load strictly like any weight, never pickled):
``weight`` (int8, ``[out, in]``), ``scale`` (float32, ``[out]``: the real
weight of row ``o`` is ``weight[o] * scale[o]``) and ``bias`` (float32,
``[out]``, when the layer has one). Each forward quantizes its input per row
(dynamic quantization: ``x ≈ xq * s_row`` with ``s_row = max|x_row| / 127``),
multiplies ``int8 × int8 → int32`` with ``torch._int_mm`` and applies both
scales and the bias in float32.

**Why plain ``torch._int_mm`` and not torchao.** Measured on the 2-core
AVX-512 VNNI machine of bench/README.md, one torch thread, p50 of the
network's forward for a 9 → 2560×4 → 2 MLP (19.7M parameters;
``bench/bench_variants.py --micro``, a quiet run): fp32 3.9 ms at batch 1
and 31 ms at batch 64; this layer 0.51 ms and 5.4 ms; torchao 0.18's
``Int8DynamicActivationInt8WeightConfig`` 7.3 ms and 18 ms (slower than fp32
at batch 1: its tensor subclass dispatches in Python around each matmul) and
its weight-only config 6.8 ms and 52 ms. ``torch.ao.quantization.quantize_dynamic``
(fbgemm) is about as fast as this layer but deprecated, and its packed
weights cannot be stored without pickle. So torchao is not a dependency.

>>> import torch
>>> lin = torch.nn.Linear(4, 3)
>>> q = Int8Linear.from_linear(lin)
>>> x = torch.randn(5, 4)
>>> bool((q(x) - lin(x)).abs().max() < 0.05)
True
>>> sorted((k, str(v.dtype)) for k, v in q.state_dict().items())
[('bias', 'torch.float32'), ('scale', 'torch.float32'), ('weight', 'torch.int8')]
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

__all__ = ["Int8Linear", "quantize_weight", "replace_linears"]

_TINY = 1e-12


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: ``(int8 [out, in], float32 scale [out])``.

    >>> w = torch.tensor([[1.0, -0.5], [0.0, 0.0]])
    >>> q, s = quantize_weight(w)
    >>> q.tolist(), [round(v, 5) for v in s.tolist()]
    ([[127, -64], [0, 0]], [0.00787, 0.0])
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scale = amax / 127.0
    safe = torch.where(amax > 0, scale, torch.ones_like(scale))
    q = torch.round(w / safe[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, torch.where(amax > 0, scale, torch.zeros_like(scale))


class Int8Linear(nn.Module):
    """A linear layer computed in int8 (see the module docstring); built empty, filled by loading."""

    weight: torch.Tensor
    scale: torch.Tensor
    bias: torch.Tensor | None

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.zeros(out_features, dtype=torch.float32))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float32))
        else:
            self.bias = None

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        """The int8 version of a trained float layer."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None)
        q, s = quantize_weight(linear.weight)
        layer.weight.copy_(q)
        layer.scale.copy_(s)
        if linear.bias is not None and layer.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer

    def dequantized(self) -> torch.Tensor:
        """The float weight this layer computes with (``weight * scale``)."""
        w: torch.Tensor = self.weight.float() * self.scale[:, None]
        return w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).float()
        amax = x2.abs().amax(dim=1, keepdim=True).clamp_min(_TINY)
        row_scale = amax / 127.0
        xq = torch.round(x2 / row_scale).to(torch.int8)  # |x / s| <= 127 by construction
        acc = torch._int_mm(xq, self.weight.t())
        out = acc.float() * (row_scale * self.scale)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


def replace_linears(model: nn.Module, paths: Sequence[str]) -> nn.Module:
    """Replace the ``nn.Linear`` submodules named by ``paths`` with empty :class:`Int8Linear` of the same shape.

    Used by the model builder for a spec with ``int8_layers``: the buffers are then loaded from
    the checkpoint. Raises ``ValueError`` for a path that is not an ``nn.Linear``.
    """
    for path in paths:
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        layer = getattr(parent, name, None)
        if not isinstance(layer, nn.Linear):
            raise ValueError(f"int8 layer {path!r} is not an nn.Linear of the architecture")
        setattr(parent, name, Int8Linear(layer.in_features, layer.out_features, layer.bias is not None))
    return model
