"""Triplet training of one head: UTM-mined positives, descriptor-mined hard negatives.

In three parts: ``prepare_run`` (data, the model started as its registry entry says, optimiser,
frozen-trunk cache), ``train_epoch`` (``queries_per_epoch`` queries in chunks of ``refresh_every``,
each chunk's triplets re-mined by ``vpr.steps.mining.negatives.mine_triplets`` before its steps) and
``finish_epoch`` (validation Recall@N, an atomic ``last.pt`` for ``--resume`` and, when validation
Recall@``train.select_by`` improves, the kept ``model.pt``). All randomness of epoch *e* derives from
``(seed, e)``, so a resumed run reproduces an uninterrupted one on CPU.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from vpr.foundations.config import Config, TrainConfig
from vpr.foundations.layout import Layout
from vpr.foundations.progress import step_progress
from vpr.foundations.rng import reseed_torch_rng
from vpr.shared.checkpoints import CheckpointError as CheckpointError  # raised here for unreadable checkpoints
from vpr.shared.checkpoints import load_checkpoint, save_checkpoint
from vpr.shared.descriptors import (
    autocast,
    image_transform,
    loader_kwargs,
    on_cuda_by_default,
    resolve_device,
    stack_images,
    use_bf16,
)
from vpr.shared.distributed import Ranks, join_from_env, leave, mean_over_ranks, my_rows, same_buffers
from vpr.shared.history import write_history
from vpr.shared.models import VPRModel, build_model
from vpr.shared.retrieval import exact_search, recall_at_n
from vpr.shared.shardio import ShardReader
from vpr.shared.splits import SplitData, load_split
from vpr.shared.triplets import TripletImages, refuse_non_finite, triplet_loss
from vpr.shared.trunk import TrunkCache, open_trunk_cache
from vpr.steps.initialise import build_training_model
from vpr.steps.mining.negatives import encode_ids, mine_triplets

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
    db = encode_ids(model, reader, val.db_ids, transform, device, cache, batch_size=batch_size, workers=workers)
    q = encode_ids(model, reader, val.q_ids, transform, device, cache, batch_size=batch_size, workers=workers)
    _, ranked = exact_search(db, q, max(recall_at))
    return recall_at_n(ranked, val.soft, recall_at)


class _Step(nn.Module):
    """The training forward as one module (what ``DistributedDataParallel`` wraps): images or trunk maps."""

    def __init__(self, model: nn.Module, from_trunk: bool) -> None:
        super().__init__()
        self.model, self.from_trunk = model, from_trunk

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.forward_from_trunk(x) if self.from_trunk else self.model(x)


@contextmanager
def timed(phases: dict[str, float], name: str, cache: TrunkCache | None = None) -> Iterator[None]:
    """Add the block's wall time to ``phases[name]`` (where a training's time goes: bench/train_phases.py);
    the time ``cache`` spent encoding trunk maps meanwhile goes to ``phases["trunk cache"]`` instead."""
    t0, encoding = time.perf_counter(), cache.encode_seconds if cache is not None else 0.0
    try:
        yield
    finally:
        encoding = cache.encode_seconds - encoding if cache is not None else 0.0
        phases[name] = phases.get(name, 0.0) + time.perf_counter() - t0 - encoding
        phases["trunk cache"] = phases.get("trunk cache", 0.0) + encoding


@dataclass
class TrainingRun:
    """What the epochs of one head's training share: data, transforms, model, optimiser and the record."""

    head: str
    cfg: Config
    tc: TrainConfig  # the train section with this head's own budget
    layout: Layout
    device: torch.device
    ranks: Ranks
    reader: ShardReader
    train: SplitData
    val: SplitData
    eval_tf: Callable
    query_tf: Callable
    model: VPRModel
    optimizer: torch.optim.Optimizer
    step: nn.Module  # what a training batch goes through (trunk maps or images; DDP-wrapped on several ranks)
    step_bf16: bool
    cache: TrunkCache | None
    phases: dict[str, float] = field(default_factory=dict)  # seconds per phase (``timed``), in the summary
    history: list[dict] = field(default_factory=list)
    best: float = -1.0
    bad_epochs: int = 0
    start_epoch: int = 1


def train_head(
    head: str, cfg: Config, layout: Layout, *, resume: bool = False, stop_after_batches: int | None = None
) -> dict:
    """Train one head; returns a summary. ``stop_after_batches`` simulates an interruption (tests).

    Started by torchrun, this process is one rank of a data-parallel run (``vpr.shared.distributed``).
    """
    device = resolve_device(cfg.train.device)
    ranks, created = join_from_env(device, cfg.resources.ddp_timeout_s)
    try:
        run = prepare_run(head, cfg, layout, device, ranks, resume=resume)
        batches_done = 0
        for epoch in range(run.start_epoch, run.tc.epochs + 1):
            if run.bad_epochs >= run.tc.patience:
                break
            losses, images, seconds, batches_done = train_epoch(run, epoch, batches_done, stop_after_batches)
            if stop_after_batches is not None and batches_done >= stop_after_batches:
                return {"head": head, "interrupted": True, "epoch": epoch}
            finish_epoch(run, epoch, losses, images, seconds)
        return {
            "head": head,
            "select_by": f"recall@{run.tc.select_by}",
            "best_val_recall": run.best,
            "epochs": len(run.history),
            "history": run.history,
            "phases": {k: round(v, 3) for k, v in run.phases.items()},
        }
    finally:
        leave(created)


def prepare_run(
    head: str, cfg: Config, layout: Layout, device: torch.device, ranks: Ranks, *, resume: bool = False
) -> TrainingRun:
    """Set up a head's training: splits, transforms, the model (fresh, or resumed from ``last.pt``),
    the optimiser, the frozen-trunk cache and the step every batch goes through."""
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
    phases: dict[str, float] = {}
    with timed(phases, "init"):
        model = (
            build_model(head, cfg.model, seed=tc.seed).to(device)
            if state
            else build_training_model(head, cfg, layout, reader, train, eval_tf, device)
        )
    if on_cuda_by_default(device, tc.channels_last):
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=tc.lr)
    run_state: dict = {}
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        run_state = {
            "history": state["history"],
            "best": state["best_val_recall"],
            "bad_epochs": state["bad_epochs"],
            "start_epoch": state["epoch"] + 1,
        }
    step_model = torch.compile(model) if tc.compile else model  # the whole-image step (no trunk cache)
    touched = np.concatenate([train.db_ids, train.q_ids, val.db_ids, val.q_ids])
    step_bf16 = use_bf16(device, tc.precision)
    with timed(phases, "trunk cache"):
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
    return TrainingRun(
        head, cfg, tc, layout, device, ranks, reader, train, val, eval_tf, query_tf, model, optimizer, step,
        step_bf16, cache, phases, **run_state,
    )  # fmt: skip


def train_epoch(
    run: TrainingRun, epoch: int, batches_done: int = 0, stop_after_batches: int | None = None
) -> tuple[list[float], int, float, int]:
    """One epoch of triplet steps: (losses of this rank, images seen, seconds, batches done so far).

    All randomness of epoch *e* derives from ``(seed, e)``, so a resumed run reproduces an
    uninterrupted one on CPU. Stops early once ``batches_done`` reaches ``stop_after_batches``.
    """
    tc, train, ranks = run.tc, run.train, run.ranks
    rng = np.random.default_rng([tc.seed, epoch])
    reseed_torch_rng(tc.seed * 1_000_003 + epoch)  # augmentation draws
    t0, images, losses = time.perf_counter(), 0, []
    order = rng.permutation(len(train.q_ids))[: tc.queries_per_epoch]
    chunks = [order[i : i + tc.refresh_every] for i in range(0, len(order), tc.refresh_every)]
    n_batches = sum(len(my_rows(len(c), tc.batch_queries, ranks)) for c in chunks) // tc.batch_queries
    with step_progress("train", loss=True) as progress:
        task = progress.add_task(f"{run.head} epoch {epoch}/{tc.epochs}", total=n_batches, loss=0.0)
        for chunk in chunks:
            with timed(run.phases, "mining", run.cache):
                triplets = mine_triplets(
                    run.model, run.reader, train, chunk, run.eval_tf, run.cfg, run.device, rng, run.cache
                )
            ids = np.concatenate([train.q_ids[chunk][:, None], train.db_ids[triplets]], axis=1)
            ids = ids[my_rows(len(ids), tc.batch_queries, ranks)]
            run.model.train()
            batches = triplet_batches(run, ids, rng)
            while True:
                with timed(run.phases, "loading", run.cache):
                    batch = next(batches, None)
                if batch is None:
                    break
                x, b, n = batch
                with timed(run.phases, "steps"):
                    with autocast(run.device, run.step_bf16):
                        out = run.step(x)
                    loss = triplet_loss(out.float().view(b, n, -1), tc.margin)
                    refuse_non_finite(loss, f"{run.head} epoch {epoch}, batch {batches_done + 1}")
                    run.optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    run.optimizer.step()
                    losses.append(loss.item())
                images += b * n
                batches_done += 1
                progress.update(task, advance=1, loss=float(np.mean(losses)))
                if stop_after_batches is not None and batches_done >= stop_after_batches:
                    return losses, images, time.perf_counter() - t0, batches_done
            same_buffers(run.model, ranks)  # the next mining and the validation encode with rank 0's statistics
    return losses, images, time.perf_counter() - t0, batches_done


def finish_epoch(run: TrainingRun, epoch: int, losses: list[float], images: int, seconds: float) -> None:
    """Validate, record the epoch, and (rank 0) write the checkpoints, history and log line.

    ``model.pt`` is replaced when validation Recall@``train.select_by`` improves; ``last.pt`` (for
    ``--resume``) every epoch; both atomically.
    """
    tc, ranks = run.tc, run.ranks
    epoch_loss, images = mean_over_ranks(losses, ranks), images * ranks.world
    with timed(run.phases, "validation", run.cache):
        recalls = validate(
            run.model,
            run.reader,
            run.val,
            run.eval_tf,
            run.device,
            run.cache,
            recall_at=run.cfg.evaluate.recall_at,
            batch_size=run.cfg.evaluate.batch_size,
            workers=tc.workers,
        )
    run.history.append(
        {
            "epoch": epoch,
            "loss": epoch_loss,
            **{f"recall@{n}": recalls.get(n, float("nan")) for n in (1, 5, 10, 20)},
            "seconds": seconds,
            "images_per_s": images / seconds,
        }
    )
    improved = recalls[tc.select_by] > run.best  # the same on every rank: they validate the same weights
    run.best, run.bad_epochs = (recalls[tc.select_by], 0) if improved else (run.best, run.bad_epochs + 1)
    if not ranks.main:  # rank 0 writes checkpoints, history and logs
        return
    with timed(run.phases, "checkpoints"):
        save_epoch(run, epoch, improved)
    logger.info(
        "%s epoch %d: loss %.4f val R@1 %.1f R@5 %.1f (%.1f s, %.1f img/s)",
        run.head,
        epoch,
        run.history[-1]["loss"],
        recalls.get(1, float("nan")),
        recalls.get(5, float("nan")),
        seconds,
        images / seconds,
    )


def save_epoch(run: TrainingRun, epoch: int, improved: bool) -> None:
    """The kept model (when validation improved), ``last.pt`` and the dvclive history, each atomic."""
    tc, ranks = run.tc, run.ranks
    state = run.model.state_dict()
    if improved:
        save_checkpoint(
            {
                "model": state,
                "head": run.head,
                "epoch": epoch,
                "select_by": f"recall@{tc.select_by}",
                "val_recall": run.best,
                "model_config": run.cfg.model.model_dump(),
            },
            run.layout.checkpoint(run.head),
        )
    save_checkpoint(
        {
            "model": state,
            "optimizer": run.optimizer.state_dict(),
            "epoch": epoch,
            "history": run.history,
            "best_val_recall": run.best,
            "bad_epochs": run.bad_epochs,
            "head": run.head,
            "ranks": ranks.world,
        },
        run.layout.last_checkpoint(run.head),
    )
    write_history(run.history, run.layout.live_dir(run.head))


def triplet_batches(run: TrainingRun, ids: np.ndarray, rng: np.random.Generator) -> Iterator[tuple[Tensor, int, int]]:
    """Training inputs per batch of triplet rows (query id, then database ids): (tensor, queries, images each).

    With a trunk cache the tensor holds trunk maps (augmented queries are encoded live); without,
    it holds images loaded by DataLoader workers (pinned memory on CUDA).
    """
    tc, reader, device, cache = run.cfg.train, run.reader, run.device, run.cache
    query_tf, db_tf = run.query_tf, run.eval_tf
    b_size = tc.batch_queries
    if cache is not None:
        augment = tc.augment.enabled
        for start in range(0, len(ids), b_size):
            rows = ids[start : start + b_size]
            b, n = rows.shape
            feats = cache.get(rows).view(b, n, *cache.shape)
            if augment:
                with torch.no_grad():
                    queries = stack_images([query_tf(reader.load(int(i))) for i in rows[:, 0]]).to(device)
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
