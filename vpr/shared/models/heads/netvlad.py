"""NetVLAD: soft-assignment to k-means centroids, aggregated residuals."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vpr.foundations.config import ModelConfig
from vpr.shared.models.functional import intra_normalize_flatten, l2n, vlad


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

    @classmethod
    def from_config(cls, cfg: ModelConfig, dim: int) -> NetVLADHead:
        return cls(clusters=cfg.netvlad_clusters, dim=dim)

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
