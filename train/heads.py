"""DINO / iBOT projection head: MLP -> L2-normalised bottleneck -> weight-normalised prototypes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class DINOHead(nn.Module):
    """MLP (in -> hidden -> hidden -> bottleneck), L2 norm, then K prototypes with unit-norm rows.

    The prototype layer uses `parametrizations.weight_norm` with its magnitude g initialised to 1
    and trained (lr, weight decay, EMA, last-layer freeze) like the official head's `weight_g`.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256, nlayers: int = 3) -> None:
        super().__init__()
        from torch.nn.utils.parametrizations import weight_norm

        layers: list[nn.Module] = []
        dims = [in_dim] + [hidden_dim] * (max(nlayers, 1) - 1) + [bottleneck_dim]
        for i in range(len(dims) - 1):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        self.apply(self._init)
        self.last_layer = weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        with torch.no_grad():
            self.last_layer.parametrizations.weight.original0.fill_(1.0)

    @staticmethod
    def _init(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return prototype logits [*, K] for features [*, in_dim]."""
        x = self.mlp(x)
        eps = 1e-6 if x.dtype == torch.float16 else 1e-12
        x = F.normalize(x, dim=-1, p=2, eps=eps)
        return self.last_layer(x)

    def last_layer_parameters(self) -> list[nn.Parameter]:
        """Prototype-layer parameters (g and v), frozen during the first `freeze_last_layer_iters` iterations."""
        return list(self.last_layer.parameters())
