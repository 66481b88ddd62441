"""The base line: average pooling of L2-normalised local features."""

from __future__ import annotations

from torch import Tensor, nn

from vpr.foundations.config import ModelConfig
from vpr.shared.models.functional import l2n


class AvgHead(nn.Module):
    """Baseline: channel-wise L2 per location, global average pool, L2."""

    def __init__(self, dim: int = 256) -> None:
        super().__init__()
        self.out_dim = dim

    @classmethod
    def from_config(cls, cfg: ModelConfig, dim: int) -> AvgHead:
        return cls(dim)

    def forward(self, x: Tensor) -> Tensor:
        return l2n(l2n(x, dim=1).mean(dim=(2, 3)), dim=1)
