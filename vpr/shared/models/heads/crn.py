"""Contextual Reweighting Network: NetVLAD whose soft-assignment is weighted by a mask learned from context."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpr.foundations.config import ModelConfig
from vpr.shared.models.functional import l2n
from vpr.shared.models.heads.netvlad import NetVLADHead


class ContextReweightedVLAD(nn.Module):
    """What every CRN variant shares: a NetVLAD, a ``context_mask`` of the map, and starting from NetVLAD.

    A variant builds ``self.netvlad`` and its mask layers in ``__init__`` and defines ``context_mask``.
    """

    netvlad: NetVLADHead

    @classmethod
    def from_config(cls, cfg: ModelConfig, dim: int) -> ContextReweightedVLAD:
        return cls(clusters=cfg.netvlad_clusters, dim=dim)

    def context_mask(self, x: Tensor) -> Tensor:
        """The ``B×1×H×W`` re-weighting mask for a feature map (also useful for visualisation)."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.netvlad(x, assignment_weight=self.context_mask(x))

    def start_from(self, state_dict: dict[str, Tensor]) -> None:
        """Initialise the NetVLAD part from a trained NetVLAD checkpoint.

        Accepts a ``NetVLADHead`` state dict or a whole ``VPRModel`` one (``head.*`` keys are used, the
        backbone's are ignored — the caller loads those into the backbone).
        """
        keys = set(self.netvlad.state_dict())
        if keys <= set(state_dict):
            state = {k: state_dict[k] for k in keys}
        else:
            state = {k[len("head.") :]: v for k, v in state_dict.items() if k.startswith("head.")}
        self.netvlad.load_state_dict(state, strict=True)


def near_identity_mask_conv(channels: int) -> nn.Conv2d:
    """The 1×1 conv to one channel that ends a mask: bias 1, near-zero weight, so the mask starts ≈ 1
    and the head first behaves like the NetVLAD it starts from."""
    conv = nn.Conv2d(channels, 1, kernel_size=1)
    nn.init.normal_(conv.weight, std=1e-3)
    nn.init.ones_(conv.bias)
    return conv


class CRNHead(ContextReweightedVLAD):
    """CRN as published: the mask comes from the half-resolution map through parallel 3×3/5×5/7×7 convs
    (32+32+20 = 84 channels), ReLU, a 1×1 conv to one channel, and bilinear upsampling to the map's
    exact H×W (odd sizes included)."""

    def __init__(self, clusters: int = 64, dim: int = 256) -> None:
        super().__init__()
        self.netvlad = NetVLADHead(clusters=clusters, dim=dim)
        self.out_dim = self.netvlad.out_dim
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.context = nn.ModuleList(
            nn.Conv2d(dim, channels, kernel_size=k, padding=k // 2) for k, channels in ((3, 32), (5, 32), (7, 20))
        )
        self.mask_conv = near_identity_mask_conv(84)

    def context_mask(self, x: Tensor) -> Tensor:
        h, w = x.shape[-2:]
        pooled = self.pool(l2n(x, dim=1))
        ctx = F.relu(torch.cat([conv(pooled) for conv in self.context], dim=1))
        return F.interpolate(self.mask_conv(ctx), size=(h, w), mode="bilinear", align_corners=False)
