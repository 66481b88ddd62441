"""CRN2: CRN with fewer parameters and its mask computed at the feature map's own resolution."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpr.shared.models.functional import l2n
from vpr.shared.models.heads.crn import ContextReweightedVLAD, near_identity_mask_conv
from vpr.shared.models.heads.netvlad import NetVLADHead


def _dilated_stack(dim: int, widths: tuple[int, ...]) -> nn.Sequential:
    """Stacked 3×3 convs with dilation 2 and ReLU between them: ``len(widths)`` of them see a
    ``4·len(widths)+1`` square of the full-resolution map, what a 2·k−1 filter sees at half resolution."""
    layers: list[nn.Module] = []
    for i, width in enumerate(widths):
        if i:
            layers.append(nn.ReLU())
        layers.append(nn.Conv2d(dim if i == 0 else widths[i - 1], width, kernel_size=3, padding=2, dilation=2))
    return nn.Sequential(*layers)


class CRN2Head(ContextReweightedVLAD):
    """CRN's three context branches (32 + 32 + 20 channels) as 1, 2 and 3 stacked dilated 3×3 convs.

    The 5×5 and 7×7 filters of CRN, which run on the map pooled to half size, become 2 and 3 stacked
    3×3 filters (32 channels inside each stack) with dilation 2 on the map itself, so the mask has the
    map's resolution: no pooling, no upsampling, and 245k mask parameters against CRN's 529k.
    """

    def __init__(self, clusters: int = 64, dim: int = 256) -> None:
        super().__init__()
        self.netvlad = NetVLADHead(clusters=clusters, dim=dim)
        self.out_dim = self.netvlad.out_dim
        self.context = nn.ModuleList(_dilated_stack(dim, widths) for widths in ((32,), (32, 32), (32, 32, 20)))
        self.mask_conv = near_identity_mask_conv(84)

    def context_mask(self, x: Tensor) -> Tensor:
        x = l2n(x, dim=1)
        return self.mask_conv(F.relu(torch.cat([branch(x) for branch in self.context], dim=1)))
