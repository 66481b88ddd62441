"""Generalised-mean pooling with a fixed exponent and linear whitening."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vpr.foundations.config import ModelConfig
from vpr.shared.models.functional import gem, l2n


class GeMHead(nn.Module):
    """L2 per location, GeM with a fixed ``p`` (a buffer, not learned), Linear whitening, L2.

    The whitening layer starts as the identity (truncated/padded when ``out_dim != dim``) so an untrained
    head equals plain GeM rather than a random projection.
    """

    def __init__(self, dim: int = 256, out_dim: int = 256, p: float = 3.0, eps: float = 1e-6) -> None:
        super().__init__()
        self.out_dim = out_dim
        self.eps = eps
        self.register_buffer("p", torch.tensor(float(p)))
        self.whiten = nn.Linear(dim, out_dim)
        with torch.no_grad():
            self.whiten.weight.copy_(torch.eye(out_dim, dim))
            self.whiten.bias.zero_()

    @classmethod
    def from_config(cls, cfg: ModelConfig, dim: int) -> GeMHead:
        return cls(dim, out_dim=cfg.gem_dim, p=cfg.gem_p)

    def forward(self, x: Tensor) -> Tensor:
        pooled = gem(l2n(x, dim=1), p=float(self.p), eps=self.eps)
        return l2n(self.whiten(pooled), dim=1)
