"""Triplet training of one head: UTM-mined positives, descriptor-mined hard negatives.

Each epoch samples ``queries_per_epoch`` training queries and walks them in chunks of
``refresh_every``. Before each chunk the negative pool is refreshed: descriptors are computed in
inference mode (streamed from the shards by id) for the chunk's queries, their hard positives and
the candidate negatives (``full``: the whole database; ``partial``: one shared random database
sample; ``random``: none). Selection is vectorised (one distance matrix per chunk), so mining costs
one inference pass instead of a per-query loop. Every epoch ends with validation Recall@N, an
atomic checkpoint (``last.pt``, for ``--resume``) and, when validation Recall@``train.select_by``
(default 5) improves, the best model
(``model.pt``). All randomness of epoch *e* derives from ``(seed, e)``, so a resumed run
reproduces an uninterrupted one on CPU.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Sequence

import numpy as np
import polars as pl
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from vpr.checkpoints import CheckpointError as CheckpointError  # raised here for unreadable checkpoints
from vpr.checkpoints import load_checkpoint, save_checkpoint
from vpr.config import Config
from vpr.descriptors import (
    autocast,
    extract,
    image_batches,
    image_transform,
    loader_kwargs,
    on_cuda_by_default,
    resolve_device,
    use_bf16,
)
from vpr.distributed import Ranks, current, gather_descriptors, join_from_env, leave, mean_over_ranks, my_batches
from vpr.history import write_history
from vpr.layout import Layout
from vpr.models import VPRModel, build_model
from vpr.retrieval import exact_search, recall_at_n
from vpr.rng import reseed_torch_rng
from vpr.shardio import ShardReader
from vpr.splits import SplitData, load_split
from vpr.triplets import TripletImages, select_triplets, triplet_loss
from vpr.trunk import TrunkCache, open_trunk_cache

logger = logging.getLogger(__name__)


def use_trunk_cache(cfg: Config, device: torch.device, n_images: int) -> bool:
    """Whether to cache the frozen trunk: ``on``/``off``, or ``auto`` = CPU, frozen, under 4 GiB."""
    mode = cfg.train.cache_frozen_trunk
    if mode != "auto":
        return mode == "on" and cfg.model.freeze_early_layers
    h = round(cfg.shards.height * cfg.train.image_scale)
    w = round(cfg.shards.width * cfg.train.image_scale)
    return (
        cfg.model.freeze_early_layers and device.type == "cpu" and TrunkCache.estimate_bytes(n_images, h, w) < 4 * 2**30
    )


def descriptors(
    model: VPRModel,
    reader: ShardReader,
    ids: np.ndarray,
    transform,
    device: torch.device,
    cache: TrunkCache | None,
    *,
    batch_size: int,
    workers: int,
) -> np.ndarray:
    """Inference-mode descriptors, from the trunk cache when there is one; a share per rank, all-gathered."""

    def encode(some: np.ndarray) -> np.ndarray:
        if cache is not None:
            return cache.descriptors(some, batch_size)
        return extract(model, reader, some, transform, device=device, batch_size=batch_size, workers=workers)

    return gather_descriptors(np.asarray(ids), encode, model.descriptor_dim, current(), device)


def validate(
    model: VPRModel,
    reader: ShardReader,
    val: SplitData,
    transform,
    device: torch.device,
    cache: TrunkCache | None = None,
    *,
    recall_at: Sequence[int],
    batch_size: int,
    workers: int,
) -> dict[int, float]:
    """Recall@N on the validation split (soft positives, exact search)."""
    db = descriptors(model, reader, val.db_ids, transform, device, cache, batch_size=batch_size, workers=workers)
    q = descriptors(model, reader, val.q_ids, transform, device, cache, batch_size=batch_size, workers=workers)
    _, ranked = exact_search(db, q, max(recall_at))
    return recall_at_n(ranked, val.soft, recall_at)


def init_netvlad(
    model: VPRModel, reader: ShardReader, db_ids: np.ndarray, transform, cfg: Config, device: torch.device, seed: int
) -> None:
    """k-means (faiss) centroids from local conv4 descriptors sampled over training images."""
    rng = np.random.default_rng(seed)
    target = cfg.model.kmeans_descriptors
    h = math.ceil(cfg.shards.height * cfg.train.image_scale / 16)
    w = math.ceil(cfg.shards.width * cfg.train.image_scale / 16)
    per_image = max(1, min(h * w, 100))
    n_images = min(len(db_ids), max(cfg.model.netvlad_clusters, math.ceil(target / per_image)))
    ids = np.sort(rng.choice(db_ids, size=n_images, replace=False))
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
    """A fresh model for ``head``; NetVLAD gets k-means centroids, CRN starts from this run's NetVLAD."""
    model = build_model(head, cfg.model, seed=cfg.train.seed).to(device)
    if head == "netvlad":
        init_netvlad(model, reader, train.db_ids, transform, cfg, device, cfg.train.seed)
    elif head == "crn":
        source = layout.checkpoint("netvlad")
        if not source.exists():
            raise FileNotFoundError(
                f"CRN starts from this run's NetVLAD, but {source} is missing: train the netvlad head first"
            )
        state = load_checkpoint(source)["model"]
        model.backbone.load_state_dict(
            {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
        )
        model.head.load_netvlad_state(state)
    return model


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("loss {task.fields[loss]:.4f}"),
        TimeElapsedColumn(),
        transient=not sys.stderr.isatty(),
        disable=not sys.stderr.isatty(),
    )


class _Step(nn.Module):
    """The training forward as one module (what ``DistributedDataParallel`` wraps): images or trunk maps."""

    def __init__(self, model: nn.Module, from_trunk: bool) -> None:
        super().__init__()
        self.model, self.from_trunk = model, from_trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_from_trunk(x) if self.from_trunk else self.model(x)


def _my_rows(n_rows: int, batch: int, ranks: Ranks) -> np.ndarray:
    """Rows of a chunk's triplets in this rank's batches (``vpr.distributed.my_batches``), in order."""
    mine = my_batches(math.ceil(n_rows / batch), ranks)
    return np.concatenate([np.arange(k * batch, min((k + 1) * batch, n_rows)) for k in mine] or [np.empty(0, int)])


def train_head(
    head: str, cfg: Config, layout: Layout, *, resume: bool = False, stop_after_batches: int | None = None
) -> dict:
    """Train one head; returns a summary. ``stop_after_batches`` simulates an interruption (tests).

    Started by torchrun, this process is one rank of a data-parallel run (``vpr.distributed``).
    """
    device = resolve_device(cfg.train.device)
    ranks, created = join_from_env(device)
    try:
        return _train(head, cfg, layout, device, ranks, resume, stop_after_batches)
    finally:
        leave(created)


def _train(
    head: str,
    cfg: Config,
    layout: Layout,
    device: torch.device,
    ranks: Ranks,
    resume: bool,
    stop_after_batches: int | None,
) -> dict:
    tc = cfg.train.for_head(head)
    reader = ShardReader(layout.shards_dir, ("train", "val"))  # what the train stages depend on
    index = reader.index
    train = load_split(index, pl.read_parquet(layout.mining("train")), "train")
    val = load_split(index, pl.read_parquet(layout.mining("val")), "val")
    if len(train.q_ids) == 0:
        raise ValueError("no training query has a hard positive: nothing to train on")
    eval_tf = image_transform(cfg.shards.height, cfg.shards.width, tc.image_scale)
    query_tf = image_transform(cfg.shards.height, cfg.shards.width, tc.image_scale, tc.augment)

    last_path = layout.last_checkpoint(head)
    state = load_checkpoint(last_path) if resume and last_path.exists() else None
    model = (
        build_model(head, cfg.model, seed=tc.seed).to(device)
        if state
        else build_training_model(head, cfg, layout, reader, train, eval_tf, device)
    )
    channels_last = on_cuda_by_default(device, tc.channels_last)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=tc.lr)
    history: list[dict] = []
    best, bad_epochs, start_epoch = -1.0, 0, 1
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        history, best, bad_epochs = state["history"], state["best_val_recall"], state["bad_epochs"]
        start_epoch = state["epoch"] + 1
    step_model = torch.compile(model) if tc.compile else model  # the whole-image step (no trunk cache)
    touched = np.concatenate([train.db_ids, train.q_ids, val.db_ids, val.q_ids])
    step_bf16 = use_bf16(device, tc.precision)
    cache = (
        open_trunk_cache(
            model,
            reader,
            touched,
            eval_tf,
            device,
            size=(round(cfg.shards.height * tc.image_scale), round(cfg.shards.width * tc.image_scale)),
            batch_size=cfg.evaluate.batch_size,
            folder=layout.trunk_cache_dir,
            bf16=step_bf16,
        )
        if use_trunk_cache(cfg, device, len(touched))
        else None
    )
    step: nn.Module = _Step(model if cache is not None else step_model, from_trunk=cache is not None)
    if ranks.world > 1:  # gradients averaged over the ranks; the initial weights broadcast from rank 0
        step = DistributedDataParallel(
            step, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None
        )
    batches_done = 0
    for epoch in range(start_epoch, tc.epochs + 1):
        if bad_epochs >= tc.patience:
            break
        rng = np.random.default_rng([tc.seed, epoch])
        reseed_torch_rng(tc.seed * 1_000_003 + epoch)  # augmentation draws
        t0, images, losses = time.perf_counter(), 0, []
        order = rng.permutation(len(train.q_ids))[: tc.queries_per_epoch]
        chunks = [order[i : i + tc.refresh_every] for i in range(0, len(order), tc.refresh_every)]
        n_batches = sum(len(_my_rows(len(c), tc.batch_queries, ranks)) for c in chunks) // tc.batch_queries
        with _progress() as progress:
            task = progress.add_task(f"{head} epoch {epoch}/{tc.epochs}", total=n_batches, loss=0.0)
            for chunk in chunks:
                triplets = _mine_chunk(model, reader, train, chunk, eval_tf, cfg, device, rng, cache)
                ids = np.concatenate([train.q_ids[chunk][:, None], train.db_ids[triplets]], axis=1)
                ids = ids[_my_rows(len(ids), tc.batch_queries, ranks)]
                model.train()
                for x, b, n in _batches(ids, reader, query_tf, eval_tf, cfg, device, rng, cache):
                    with autocast(device, step_bf16):
                        out = step(x)
                    desc = out.float().view(b, n, -1)
                    loss = triplet_loss(desc, tc.margin)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    losses.append(loss.item())
                    images += b * n
                    batches_done += 1
                    progress.update(task, advance=1, loss=float(np.mean(losses)))
                    if stop_after_batches is not None and batches_done >= stop_after_batches:
                        return {"head": head, "interrupted": True, "epoch": epoch}
        seconds = time.perf_counter() - t0
        epoch_loss, images = mean_over_ranks(losses, ranks), images * ranks.world
        recalls = validate(
            model,
            reader,
            val,
            eval_tf,
            device,
            cache,
            recall_at=cfg.evaluate.recall_at,
            batch_size=cfg.evaluate.batch_size,
            workers=tc.workers,
        )
        history.append(
            {
                "epoch": epoch,
                "loss": epoch_loss,
                **{f"recall@{n}": recalls.get(n, float("nan")) for n in (1, 5, 10, 20)},
                "seconds": seconds,
                "images_per_s": images / seconds,
            }
        )
        improved = recalls[tc.select_by] > best  # the same on every rank: they validate the same weights
        best, bad_epochs = (recalls[tc.select_by], 0) if improved else (best, bad_epochs + 1)
        if not ranks.main:  # rank 0 writes checkpoints, history and logs
            continue
        if improved:
            save_checkpoint(
                {
                    "model": model.state_dict(),
                    "head": head,
                    "epoch": epoch,
                    "select_by": f"recall@{tc.select_by}",
                    "val_recall": best,
                    "model_config": cfg.model.model_dump(),
                },
                layout.checkpoint(head),
            )
        save_checkpoint(
            {
                "model": model.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "history": history,
                "best_val_recall": best,
                "bad_epochs": bad_epochs,
                "head": head,
                "ranks": ranks.world,
            },
            last_path,
        )
        write_history(history, layout.live_dir(head))
        logger.info(
            "%s epoch %d: loss %.4f val R@1 %.1f R@5 %.1f (%.1f s, %.1f img/s)",
            head,
            epoch,
            history[-1]["loss"],
            recalls.get(1, float("nan")),
            recalls.get(5, float("nan")),
            seconds,
            images / seconds,
        )
    return {
        "head": head,
        "select_by": f"recall@{tc.select_by}",
        "best_val_recall": best,
        "epochs": len(history),
        "history": history,
    }


def _batches(
    ids: np.ndarray,
    reader: ShardReader,
    query_tf,
    db_tf,
    cfg: Config,
    device: torch.device,
    rng: np.random.Generator,
    cache: TrunkCache | None,
):
    """Training inputs per batch of queries: (tensor, queries, images per query).

    With a trunk cache the tensor holds trunk maps (augmented queries are encoded live); without,
    it holds images loaded by DataLoader workers (pinned memory on CUDA).
    """
    tc = cfg.train
    b_size = tc.batch_queries
    if cache is not None:
        augment = cfg.train.augment.enabled
        for start in range(0, len(ids), b_size):
            rows = ids[start : start + b_size]
            b, n = rows.shape
            feats = cache.get(rows).view(b, n, *cache.shape)
            if augment:
                with torch.no_grad():
                    queries = torch.stack([query_tf(reader.load(int(i))) for i in rows[:, 0]]).to(device)
                    feats[:, 0] = cache.model.backbone.trunk(queries)
            yield feats.flatten(0, 1), b, n
        return
    loader = DataLoader(
        TripletImages(reader, ids, query_tf, db_tf),
        batch_size=b_size,
        shuffle=False,
        **loader_kwargs(
            device, tc.workers, torch.Generator().manual_seed(int(rng.integers(2**31))), pin_memory=tc.pin_memory
        ),
    )
    for batch in loader:
        b, n = batch.shape[:2]
        batch = batch.flatten(0, 1).to(device, non_blocking=True)
        if on_cuda_by_default(device, tc.channels_last):
            batch = batch.contiguous(memory_format=torch.channels_last)
        yield batch, b, n


def _mine_chunk(
    model: VPRModel,
    reader: ShardReader,
    train: SplitData,
    chunk: np.ndarray,
    transform,
    cfg: Config,
    device: torch.device,
    rng: np.random.Generator,
    cache: TrunkCache | None = None,
) -> np.ndarray:
    """Refresh descriptors for a chunk of queries and pick their triplets (database indices)."""
    tc = cfg.train
    n_db = len(train.db_ids)
    if tc.mining == "full":
        candidates = np.arange(n_db)
    elif tc.mining == "partial":
        candidates = np.sort(rng.choice(n_db, size=min(tc.negative_sample, n_db), replace=False))
    else:
        candidates = np.empty(0, dtype=np.int64)
    positives = np.concatenate([train.hard[i] for i in chunk])
    pool_idx = np.unique(np.concatenate([positives, candidates]))
    kw = {"batch_size": cfg.evaluate.batch_size, "workers": cfg.train.workers}
    pool_desc = descriptors(model, reader, train.db_ids[pool_idx], transform, device, cache, **kw)
    q_desc = descriptors(model, reader, train.q_ids[chunk], transform, device, cache, **kw)
    return select_triplets(
        q_desc,
        pool_desc,
        pool_idx,
        [train.hard[i] for i in chunk],
        [train.soft[i] for i in chunk],
        candidates,
        tc.negatives,
        n_db,
        rng,
    )
