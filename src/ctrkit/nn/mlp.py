"""Multi-layer perceptron used by the deep models."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


class Dropout(nn.Module):
    """Inverted dropout whose CPU mask costs a quarter of the random draws of ``nn.Dropout``.

    On a CPU, drawing one random number per element dominates a dropout layer (it cost more than the
    matrix products of a 400-wide MLP). Here each 64-bit draw is split into four 16-bit uniforms and an
    element is kept when its uniform is at least p (p resolved to 1/65536). On other devices, where random
    numbers are cheap, it is torch's dropout.
    """

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p
        self._threshold = round(p * 65536) - 32768

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        if x.device.type != "cpu":
            return F.dropout(x, self.p, True)
        n = x.numel()
        bits = torch.randint(-(2**63), 2**63 - 1, (-(-n // 4),), dtype=torch.int64, device=x.device)
        keep = bits.view(torch.int16)[:n].view(x.shape) >= self._threshold
        # one product with the scaled mask: one pass forward and one backward instead of two each, same bits
        return x * keep.to(x.dtype).mul_(1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


class _LinearReLU(torch.autograd.Function):
    """relu(x @ w.T + b) in one matrix product whose epilogue adds the bias and applies the ReLU (cuBLASLt's
    on a GPU), so no separate pass reads and writes the layer's output; the backward masks by the saved output."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        ctx.dtypes = (x.dtype, weight.dtype, bias.dtype)
        device = x.device.type
        if torch.is_autocast_enabled(device):  # the product in the autocast dtype, as nn.Linear's would be
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        with torch.autocast(device, enabled=False):
            y = torch._addmm_activation(bias, x, weight.t())
        ctx.save_for_backward(x, weight, y)
        return y

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        x, weight, y = ctx.saved_tensors
        x_dtype, w_dtype, b_dtype = ctx.dtypes
        g = torch.where(y > 0, grad.to(y.dtype), 0.0)
        grad_x = (g @ weight).to(x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, (g.t() @ x).to(w_dtype), g.sum(0).to(b_dtype)


def linear_relu(x: torch.Tensor, layer: nn.Linear, weight: torch.Tensor | None = None) -> torch.Tensor:
    """``relu(layer(x))`` for a 2-D ``x`` and a ``layer`` with a bias, as one fused matrix product; ``weight``
    stands in for the layer's own (a folded form of it) where given."""
    return _LinearReLU.apply(x, layer.weight if weight is None else weight, layer.bias)


class MLP(nn.Sequential):
    """Linear -> [BatchNorm] -> ReLU -> [Dropout] per hidden layer, then an optional output layer.

    ``layer(in, out)`` builds each hidden layer's map (``nn.Linear``; FinalNet passes its factorized interaction).
    On a GPU, an ``nn.Linear`` followed directly by its ReLU runs as :func:`linear_relu`.
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], out_dim: int | None = 1, dropout: float = 0.0,
                 batch_norm: bool = False, layer: Callable[[int, int], nn.Module] = nn.Linear) -> None:
        if in_dim < 1:
            raise ValueError(f"MLP input size must be >= 1, got {in_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        layers: list[nn.Module] = []
        d = in_dim
        for h in hidden:
            layers.append(layer(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            if dropout > 0:
                layers.append(Dropout(dropout))
            d = h
        if out_dim is not None:
            layers.append(nn.Linear(d, out_dim))
        super().__init__(*layers)
        self.out_features = out_dim if out_dim is not None else d

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._layers(x)

    def with_first_weight(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """The MLP over ``x`` with ``weight`` in place of its first layer's (a folded form of it, such as
        :meth:`~ctrkit.nn.embedding.FeatureEmbedding.project_inputs` gives), the first layer's bias kept."""
        if type(self[0]) is not nn.Linear:
            raise ValueError(f"with_first_weight needs an nn.Linear first layer, this MLP starts with {self[0]}")
        return self._layers(x, weight)

    def _layers(self, h: torch.Tensor, first_weight: torch.Tensor | None = None) -> torch.Tensor:
        layers = list(self)
        i = 0
        while i < len(layers):
            layer = layers[i]
            weight = first_weight if i == 0 else None
            if (h.is_cuda and h.dim() == 2 and type(layer) is nn.Linear and layer.bias is not None
                    and i + 1 < len(layers) and type(layers[i + 1]) is nn.ReLU):
                h = linear_relu(h, layer, weight)
                i += 2
            elif type(layer) is nn.Linear:
                h = F.linear(h, layer.weight if weight is None else weight, layer.bias)
                i += 1
            else:
                h = layer(h)
                i += 1
        return h
