"""Pure tensor functions behind the descriptor heads (cirtorch style).

Keeping the math apart from the ``nn.Module`` wrappers lets tests check each formula against a plain
reference implementation and lets other code (benchmarks, visualisation) reuse it without a module.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def l2n(x: Tensor, dim: int = 1, eps: float = 1e-12) -> Tensor:
    """L2-normalise ``x`` along ``dim`` (eps guards all-zero vectors against NaN)."""
    return F.normalize(x, p=2.0, dim=dim, eps=eps)


def gem(x: Tensor, p: float = 3.0, eps: float = 1e-6) -> Tensor:
    """Generalised-mean pooling over H×W: ``B×C×H×W → B×C``.

    Values are clamped at ``eps`` first so that the fractional power is defined; ``p=1`` is average
    pooling of the clamped map and ``p→∞`` tends to max pooling.
    """
    return x.clamp(min=eps).pow(p).mean(dim=(-2, -1)).pow(1.0 / p)


def vlad(features: Tensor, soft_assign: Tensor, centroids: Tensor) -> Tensor:
    """Soft-assigned residual aggregation: ``Σ_hw a_k(hw)·(x(hw) − c_k)`` for every cluster k.

    Args:
        features: ``B×D×H×W`` local descriptors.
        soft_assign: ``B×K×H×W`` assignment weights (softmax output, possibly re-weighted).
        centroids: ``K×D`` cluster centres.

    Returns:
        ``B×K×D`` un-normalised VLAD. Computed as ``A·Xᵀ − (Σ A)·C`` so no loop over clusters and no
        ``B×K×D×HW`` residual tensor is materialised.
    """
    b, d = features.shape[:2]
    k = soft_assign.shape[1]
    x = features.reshape(b, d, -1)
    a = soft_assign.reshape(b, k, -1)
    weighted = torch.bmm(a, x.transpose(1, 2))  # B×K×D
    mass = a.sum(dim=2, keepdim=True)  # B×K×1
    return weighted - mass * centroids.unsqueeze(0).to(weighted.dtype)


def intra_normalize_flatten(v: Tensor) -> Tensor:
    """Intra-normalise each cluster's residual, flatten ``B×K×D → B×(K·D)``, then L2 the whole vector.

    Intra-normalisation stops bursty clusters (repeated texture) from dominating the descriptor.
    """
    return l2n(l2n(v, dim=2).flatten(1), dim=1)
