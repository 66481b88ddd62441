"""Descriptor heads: the conv4 map ``B×256×H×W`` → an L2-normalised global descriptor (the study's four)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpr.models.functional import gem, intra_normalize_flatten, l2n, vlad


class AvgHead(nn.Module):
    """Baseline: channel-wise L2 per location, global average pool, L2."""

    def __init__(self, dim: int = 256) -> None:
        super().__init__()
        self.out_dim = dim

    def forward(self, x: Tensor) -> Tensor:
        return l2n(l2n(x, dim=1).mean(dim=(2, 3)), dim=1)


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

    def forward(self, x: Tensor) -> Tensor:
        pooled = gem(l2n(x, dim=1), p=float(self.p), eps=self.eps)
        return l2n(self.whiten(pooled), dim=1)


class NetVLADHead(nn.Module):
    """NetVLAD: 1×1 conv soft-assignment (no bias), residuals to centroids, intra-norm, flatten, L2.

    ``forward(x, assignment_weight)`` multiplies the soft-assignment by a ``B×1×H×W`` weight so that CRN
    (and any other spatial re-weighting) reuses this module instead of copying it.
    """

    def __init__(self, clusters: int = 64, dim: int = 256) -> None:
        super().__init__()
        self.clusters = clusters
        self.dim = dim
        self.out_dim = clusters * dim
        self.conv = nn.Conv2d(dim, clusters, kernel_size=1, bias=False)
        self.centroids = nn.Parameter(torch.rand(clusters, dim))
        self.alpha: float | None = None  # set by init_from_descriptors

    def forward(self, x: Tensor, assignment_weight: Tensor | None = None) -> Tensor:
        x = l2n(x, dim=1)
        # the 1×1 conv as a matmul: oneDNN's 1×1 convolution splits its channel sum by thread, so its
        # bits depended on the thread count; the matmul's do not (same weights, same checkpoint keys)
        logits = torch.matmul(self.conv.weight[:, :, 0, 0].to(x.dtype), x.flatten(2)).view(x.shape[0], -1, *x.shape[2:])
        assign = F.softmax(logits, dim=1)
        if assignment_weight is not None:
            assign = assign * assignment_weight
        return intra_normalize_flatten(vlad(x, assign, self.centroids))

    @torch.no_grad()
    def init_from_descriptors(self, descriptors: np.ndarray, seed: int = 0) -> float:
        """Initialise centroids and assignment conv from local descriptors, as the reference NetVLAD does.

        k-means (faiss, 100 iterations) on the L2-normalised ``N×D`` descriptors gives the centroids; the
        conv weight is ``α·ĉ`` with ``α = −log(0.01) / mean(top1 − top2)`` of descriptor-to-ĉ similarities,
        which makes the initial soft-assignment sharp (~100× ratio between the best and second cluster).
        Returns α.
        """
        import faiss  # local import: only training needs it

        desc = np.asarray(descriptors, dtype=np.float32)
        if desc.ndim != 2 or desc.shape[1] != self.dim:
            raise ValueError(f"descriptors must be N×{self.dim}, got shape {desc.shape}")
        if desc.shape[0] < self.clusters:
            raise ValueError(f"need at least {self.clusters} descriptors for k-means, got {desc.shape[0]}")
        desc = desc / np.maximum(np.linalg.norm(desc, axis=1, keepdims=True), 1e-12)
        desc = np.ascontiguousarray(desc)

        kmeans = faiss.Kmeans(self.dim, self.clusters, niter=100, seed=seed, verbose=False)
        threads = faiss.omp_get_max_threads()
        faiss.omp_set_num_threads(1)  # faiss's k-means sums per thread: one thread, one result on any machine
        try:
            kmeans.train(desc)
        finally:
            faiss.omp_set_num_threads(threads)
        centroids = kmeans.centroids.astype(np.float32)
        unit = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)

        sims = desc @ unit.T  # N×K
        top2 = -np.partition(-sims, 1, axis=1)[:, :2]  # best and second-best similarity
        gap = float(np.mean(top2[:, 0] - top2[:, 1]))
        alpha = -math.log(0.01) / max(gap, 1e-12)

        device = self.centroids.device
        self.centroids.copy_(torch.from_numpy(centroids).to(device))
        self.conv.weight.copy_(torch.from_numpy(alpha * unit)[:, :, None, None].to(device))
        self.alpha = alpha
        return alpha


class CRNHead(nn.Module):
    """Contextual Reweighting Network: NetVLAD whose soft-assignment is multiplied by a learned mask.

    The mask comes from the half-resolution map through parallel 3×3/5×5/7×7 convs (32+32+20 = 84
    channels), ReLU, a 1×1 conv to one channel, and bilinear upsampling to the map's exact H×W (odd sizes
    included). The last conv starts with bias 1 and near-zero weight so the mask is ≈ 1 and CRN initially
    behaves like the NetVLAD it is initialised from.
    """

    def __init__(self, clusters: int = 64, dim: int = 256) -> None:
        super().__init__()
        self.netvlad = NetVLADHead(clusters=clusters, dim=dim)
        self.out_dim = self.netvlad.out_dim
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2, ceil_mode=True)
        self.context = nn.ModuleList(
            nn.Conv2d(dim, channels, kernel_size=k, padding=k // 2) for k, channels in ((3, 32), (5, 32), (7, 20))
        )
        self.mask_conv = nn.Conv2d(84, 1, kernel_size=1)
        nn.init.normal_(self.mask_conv.weight, std=1e-3)
        nn.init.ones_(self.mask_conv.bias)

    def context_mask(self, x: Tensor) -> Tensor:
        """The ``B×1×H×W`` re-weighting mask for a feature map (also useful for visualisation)."""
        h, w = x.shape[-2:]
        pooled = self.pool(l2n(x, dim=1))
        ctx = F.relu(torch.cat([conv(pooled) for conv in self.context], dim=1))
        return F.interpolate(self.mask_conv(ctx), size=(h, w), mode="bilinear", align_corners=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.netvlad(x, assignment_weight=self.context_mask(x))

    def load_netvlad_state(self, state_dict: dict[str, Tensor]) -> None:
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
