"""VPR models: ResNet-18 conv4 backbone + one descriptor head (the heads of ``vpr.foundations.registry``)."""

from __future__ import annotations

from torch import Tensor, nn

from vpr.foundations.config import ModelConfig
from vpr.foundations.registry import head_spec
from vpr.foundations.rng import seeded_torch_rng
from vpr.shared.models.backbone import BACKBONE_CHANNELS, ResNetConv4, build_backbone, imagenet_weights_path

__all__ = [
    "ResNetConv4",
    "VPRModel",
    "build_backbone",
    "build_head",
    "build_model",
    "imagenet_weights_path",
]


def build_head(head: str, cfg: ModelConfig, dim: int = BACKBONE_CHANNELS) -> nn.Module:
    """One descriptor head by its registered name; unknown names raise ``ValueError`` naming the head."""
    return head_spec(head).load().from_config(cfg, dim)


class VPRModel(nn.Module):
    """Backbone + head: images ``B×3×H×W`` → L2-normalised descriptors ``B×descriptor_dim``."""

    def __init__(self, backbone: ResNetConv4, head: nn.Module, head_name: str) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.head_name = head_name
        self.descriptor_dim: int = head.out_dim

    def features(self, images: Tensor) -> Tensor:
        """The conv4 map ``B×256×H/16×W/16`` (k-means sampling, CRN mask visualisation)."""
        return self.backbone(images)

    def forward(self, images: Tensor) -> Tensor:
        return self.head(self.backbone(images))

    def forward_from_trunk(self, trunk_features: Tensor) -> Tensor:
        """Descriptors from precomputed ``backbone.trunk`` output (``layer3`` + head only)."""
        return self.head(self.backbone.layer3(trunk_features))


def build_model(head: str, cfg: ModelConfig, seed: int = 0) -> VPRModel:
    """Build backbone (weights per ``cfg.weights``) and the named head; random init drawn from ``seed``.

    The same seed gives the same weights whatever other threads of the process do (``vpr.foundations.rng``). The
    backbone's draws do not depend on the head, so every head of a run starts from the same trunk (and
    shares one trunk cache, ``vpr.shared.trunk``).
    """
    with seeded_torch_rng(seed + 1):
        head_module = build_head(head, cfg)  # validate the name before the (possibly warning) backbone build
    with seeded_torch_rng(seed):
        return VPRModel(build_backbone(cfg), head_module, head)
