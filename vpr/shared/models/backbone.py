"""ResNet-18 truncated after ``layer3`` (conv4): 256 channels at stride 16.

``model.weights: imagenet`` takes torchvision's ImageNet weights from its cache, downloading them first
when the network answers (``vpr.shared.models.weights``: bounded timeouts, hash-checked); offline, or on any
failure, the backbone starts from random init with a loud warning that says why.
"""

from __future__ import annotations

import os
import threading
import warnings
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from vpr.foundations.config import ModelConfig
from vpr.shared.models.resnet import resnet18
from vpr.shared.models.weights import WeightsUnavailable, cached_path, fetch_imagenet

BACKBONE_CHANNELS = 256
BACKBONE_STRIDE = 16
_LAYERS = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3")
_FROZEN = ("conv1", "bn1", "layer1", "layer2")


class ResNetConv4(nn.Sequential):
    """ResNet-18 up to ``layer3``; module names match torchvision so state dicts load unchanged.

    With ``freeze_early=True`` everything before ``layer3`` gets ``requires_grad=False`` and stays in eval
    mode even under ``.train()``: otherwise BatchNorm running statistics would still drift on small
    place-recognition batches although the weights are frozen.
    """

    out_channels = BACKBONE_CHANNELS
    stride = BACKBONE_STRIDE

    def __init__(self, net: nn.Module, freeze_early: bool = True) -> None:
        super().__init__(OrderedDict((name, getattr(net, name)) for name in _LAYERS))
        self.freeze_early = freeze_early
        if freeze_early:
            for name in _FROZEN:
                for param in getattr(self, name).parameters():
                    param.requires_grad_(False)

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """The layers before ``layer3`` (frozen by default): a fixed function of the image when frozen."""
        for name in _LAYERS[:-1]:
            x = getattr(self, name)(x)
        return x

    def trunk_state(self) -> dict[str, torch.Tensor]:
        """Parameters and buffers of the layers ``trunk`` runs (what its output is a function of)."""
        return {k: v for k, v in self.state_dict().items() if k.split(".")[0] in _LAYERS[:-1]}

    def train(self, mode: bool = True) -> ResNetConv4:
        super().train(mode)
        if self.freeze_early:
            for name in _FROZEN:
                getattr(self, name).train(False)
        return self


def imagenet_weights_path() -> Path:
    """Where torchvision caches the ImageNet ResNet-18 weights (``$TORCH_HOME/hub/checkpoints/...``)."""
    return cached_path()


_WARNED: set[str] = set()  # fallback warnings given in this process: one per reason, not one per model build
_WARNED_LOCK = threading.Lock()


def imagenet_weights() -> Path | None:
    """The ImageNet weights file (fetched when missing and reachable), or None after a warning.

    The warning comes once per process and reason: a run builds many models (every head, every task
    thread), and the same fallback repeated only hides the rest of the log.
    """
    try:
        return fetch_imagenet()
    except WeightsUnavailable as exc:
        message = (
            f"ImageNet weights not found at {cached_path()} and not downloaded ({exc}); using random init "
            "(run `vpr weights --fetch` with internet, or set model.weights to a local .pth file)"
        )
        with _WARNED_LOCK:
            first = message not in _WARNED
            _WARNED.add(message)
        if first:
            warnings.warn(message, stacklevel=3)
        return None


def _load_state(net: nn.Module, path: Path) -> None:
    """Load a local state dict into a full resnet18; accepts full or conv4-only (layer4/fc-less) dicts."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"{path} does not contain a state dict (got {type(state).__name__})")
    missing, unexpected = net.load_state_dict(state, strict=False)
    missing = [k for k in missing if k.split(".")[0] in _LAYERS]
    if missing or unexpected:
        raise ValueError(
            f"{path} is not a ResNet-18 state dict: missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}"
        )


def build_backbone(cfg: ModelConfig) -> ResNetConv4:
    """Build the conv4 backbone with ``cfg.weights`` = ``"imagenet"`` (cache, else download), ``"none"``, or a .pth."""
    net = resnet18()  # torchvision's definition and init, without importing torchvision (.resnet)
    weights = cfg.weights
    if weights == "imagenet":
        path = imagenet_weights()
        if path is not None:
            _load_state(net, path)
    elif weights != "none":
        path = Path(os.path.expanduser(weights))
        if not path.is_file():
            raise FileNotFoundError(f"model.weights: backbone weights file not found: {path}")
        _load_state(net, path)
    return ResNetConv4(net, freeze_early=cfg.freeze_early_layers)
