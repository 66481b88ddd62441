"""How a head starts training, as its registry entry says: k-means centroids from training features
(the VLAD family), or the kept weights of the head it starts from in this run (CRN, CRN2 from NetVLAD)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from vpr.foundations.config import Config
from vpr.foundations.layout import Layout
from vpr.foundations.registry import head_spec
from vpr.shared.checkpoints import load_checkpoint
from vpr.shared.descriptors import autocast, image_batches
from vpr.shared.models import VPRModel, build_model
from vpr.shared.shardio import ShardReader
from vpr.shared.splits import SplitData


def init_kmeans(
    model: VPRModel, reader: ShardReader, db_ids: np.ndarray, transform, cfg: Config, device: torch.device, seed: int
) -> None:
    """k-means (faiss) centroids of the head from local conv4 descriptors sampled over training images."""
    rng = np.random.default_rng(seed)
    target = cfg.model.kmeans_descriptors
    h = math.ceil(cfg.shards.height * cfg.train.image_scale / 16)
    w = math.ceil(cfg.shards.width * cfg.train.image_scale / 16)
    per_image = max(1, min(h * w, 100))
    n_images = min(len(db_ids), max(cfg.model.netvlad_clusters, math.ceil(target / per_image)))
    ids = db_ids[np.sort(rng.choice(len(db_ids), size=n_images, replace=False))]  # in path order, not id order
    chunks = []
    waiting: dict[int, np.ndarray] = {}  # streamed out of order (loader workers): held until their turn
    model.eval()
    with torch.inference_mode():
        batches = image_batches(
            reader, ids, transform, device=device, batch_size=cfg.evaluate.batch_size, workers=cfg.train.workers
        )
        for positions, batch in batches:
            with autocast(device):
                feats = model.features(batch).float()
            local = F.normalize(feats, dim=1).flatten(2).transpose(1, 2).cpu().numpy()  # B×HW×D
            waiting.update(zip(positions.tolist(), local))
            while len(chunks) in waiting:  # sample in id order, so the draws do not depend on the workers
                f = waiting.pop(len(chunks))
                chunks.append(f[rng.choice(len(f), size=min(per_image, len(f)), replace=False)])
    descriptors = np.concatenate(chunks).astype(np.float32)
    head = model.head
    head.init_from_descriptors(descriptors, seed=seed)
    model.train()


def build_training_model(
    head: str, cfg: Config, layout: Layout, reader: ShardReader, train: SplitData, transform, device: torch.device
) -> VPRModel:
    """A fresh model for ``head``, started as its registry entry says: k-means centroids from training
    features (``init="kmeans"``), or the kept weights of the head it ``starts_from`` in this run."""
    spec = head_spec(head)
    model = build_model(head, cfg.model, seed=cfg.train.seed).to(device)
    if spec.init == "kmeans":
        init_kmeans(model, reader, train.db_ids, transform, cfg, device, cfg.train.seed)
    if spec.starts_from is not None:
        source = layout.checkpoint(spec.starts_from)
        if not source.exists():
            raise FileNotFoundError(
                f"{head} starts from this run's {spec.starts_from}, but {source} is missing: "
                f"train the {spec.starts_from} head first"
            )
        state = load_checkpoint(source)["model"]
        model.backbone.load_state_dict(
            {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        )
        model.head.start_from(state)
    return model
