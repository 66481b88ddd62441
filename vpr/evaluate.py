"""Evaluation: Recall@N on the test split, approximate-index recall loss, the untrained baseline.

Recall@N: a query counts as found at N if any of its top-N database matches is a soft positive
(within ``mining.test_positive_m``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import faiss
import numpy as np
import polars as pl
import torch

from vpr.atomic import write_parquet_atomic, write_text_atomic
from vpr.config import Config, IndexConfig, ModelConfig
from vpr.descriptors import extract, image_transform, resolve_device
from vpr.layout import Layout
from vpr.models import VPRModel, build_model
from vpr.shards import ShardReader

if TYPE_CHECKING:
    from vpr.train import SplitData

TOP_PREDICTIONS = 20  # ranked matches kept per query in the predictions table


def exact_search(database: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact L2 nearest neighbours (FAISS flat index): (distances, indices), each Q×k."""
    database = np.ascontiguousarray(database, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    index = faiss.IndexFlatL2(database.shape[1])
    index.add(database)
    return index.search(queries, min(k, len(database)))


def recall_at_n(predictions: np.ndarray, positives: Sequence[Sequence[int]],
                ns: Sequence[int] = (1, 5, 10, 20)) -> dict[int, float]:
    """Recall@N in percent from ranked database indices (Q×k) and each query's positive indices.

    A query without any positive can never be found; it still counts in the denominator, as in the
    standard benchmark protocol.
    """
    if len(predictions) != len(positives):
        raise ValueError(f"{len(predictions)} prediction rows for {len(positives)} queries")
    if len(predictions) == 0:
        raise ValueError("no queries to evaluate")
    first_hit = np.full(len(predictions), np.inf)
    for q, (ranked, pos) in enumerate(zip(predictions, positives)):
        if len(pos) == 0:
            continue
        hits = np.flatnonzero(np.isin(ranked, np.asarray(pos)))
        if len(hits):
            first_hit[q] = hits[0]
    return {n: float(100.0 * np.mean(first_hit < n)) for n in ns}


# --------------------------------------------------------------------------- approximate search


def pq_subquantizers(dim: int, wanted: int) -> int:
    """The largest divisor of ``dim`` that is at most ``wanted`` (PQ needs ``dim % m == 0``)."""
    return max(m for m in range(1, min(dim, wanted) + 1) if dim % m == 0)


def make_index(kind: str, dim: int, n_train: int, params: IndexConfig | None = None) -> faiss.Index:
    """An empty FAISS L2 index of ``kind`` (``exact`` | ``ivfpq`` | ``hnsw``), sized for ``n_train`` vectors.

    IVF-PQ's cell count and code size are clamped so that a small database still trains (k-means needs
    at least as many points as centroids): ``nlist ≤ n/39`` and ``2**pq_bits ≤ n``. The caller trains
    (``index.train``) when ``index.is_trained`` is false.
    """
    params = params or IndexConfig()
    if kind == "exact":
        return faiss.IndexFlatL2(dim)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dim, params.hnsw_m)
        index.hnsw.efSearch = params.ef_search
        return index
    if kind == "ivfpq":
        nlist = max(1, min(params.nlist, n_train // 39))
        nbits = max(1, min(params.pq_bits, int(math.log2(max(2, n_train)))))
        quantizer = faiss.IndexFlatL2(dim)
        index = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_subquantizers(dim, params.pq_m), nbits)
        index.nprobe = min(params.nprobe, nlist)
        return index
    raise ValueError(f"unknown index kind {kind!r}; expected exact, ivfpq or hnsw")


def _unit(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), dtype=np.float32)


def approximate_recall(database: np.ndarray, queries: np.ndarray, positives: Sequence[Sequence[int]],
                       kind: str, *, ns: Sequence[int] = (1, 5, 10, 20), pca_dim: int | None = None,
                       params: IndexConfig | None = None) -> dict:
    """Recall@N of an approximate index (optionally after PCA) and its loss against exact search.

    Both searches run on the same descriptors: exact = ``IndexFlatL2`` on the full descriptors;
    approximate = PCA to ``pca_dim`` (trained on the database, then re-L2-normalised) if given, then
    ``kind`` (``exact`` here means flat search on the PCA output). Returns ``recall@N``,
    ``exact_recall@N``, ``recall_loss@N`` (exact − approximate, in points: positive = worse),
    ``top1_agreement`` (% of queries whose first match is the exact one), per-query search times
    and their ratio ``speedup`` (exact time / approximate time; noisy on tiny sets).
    """
    ns = sorted(set(ns))
    database = np.ascontiguousarray(database, dtype=np.float32)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    k = min(max(ns), len(database))
    t0 = time.perf_counter()
    _, exact_ranked = exact_search(database, queries, k)
    exact_s = time.perf_counter() - t0
    db, q = database, queries
    if pca_dim is not None:
        if not 0 < pca_dim < database.shape[1]:
            raise ValueError(f"pca_dim must be in 1..{database.shape[1] - 1}, got {pca_dim}")
        if pca_dim > len(database):
            raise ValueError(f"pca_dim {pca_dim} exceeds the {len(database)} database vectors it is fitted on")
        pca = faiss.PCAMatrix(database.shape[1], pca_dim)
        pca.train(database)
        db, q = _unit(pca.apply(database)), _unit(pca.apply(queries))
    index = make_index(kind, db.shape[1], len(db), params)
    if not index.is_trained:
        index.train(db)
    index.add(db)
    t0 = time.perf_counter()
    _, ranked = index.search(q, k)
    approx_s = time.perf_counter() - t0
    exact_r = recall_at_n(exact_ranked, positives, ns)
    approx_r = recall_at_n(ranked, positives, ns)
    nq = max(1, len(queries))
    out: dict = {"index": kind, "pca_dim": pca_dim, "descriptor_dim": int(db.shape[1])}
    for n in ns:
        out[f"recall@{n}"] = approx_r[n]
        out[f"exact_recall@{n}"] = exact_r[n]
        out[f"recall_loss@{n}"] = exact_r[n] - approx_r[n]
    out["top1_agreement"] = float(100.0 * np.mean(ranked[:, 0] == exact_ranked[:, 0])) if len(queries) else 0.0
    out["ms_per_query"] = 1000.0 * approx_s / nq
    out["exact_ms_per_query"] = 1000.0 * exact_s / nq
    out["speedup"] = exact_s / max(approx_s, 1e-9)
    return out


# --------------------------------------------------------------------------- models


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[VPRModel, dict]:
    """A trained model from a ``model.pt`` checkpoint (eval mode, on ``device``) and the checkpoint dict.

    The backbone is built without reading any pretrained file (``weights="none"``): the checkpoint's
    state dict replaces every weight anyway.
    """
    from vpr.train import load_checkpoint

    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} (train the head first: `vpr train --head ...`)")
    ckpt = load_checkpoint(path)
    model_cfg = ModelConfig(**{**ckpt["model_config"], "weights": "none"})
    model = build_model(ckpt["head"], model_cfg)
    model.load_state_dict(ckpt["model"])
    return _prepare(model, torch.device(device)), ckpt


def untrained_model(head: str, cfg: Config, device: torch.device | str = "cpu") -> VPRModel:
    """The baseline: ``head`` as built before any VPR training (backbone per ``model.weights``, seeded)."""
    return _prepare(build_model(head, cfg.model, seed=cfg.train.seed), torch.device(device))


def _prepare(model: VPRModel, device: torch.device) -> VPRModel:
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model


def eval_transform(cfg: Config):
    """The transform every stored descriptor is computed with (shard size × ``train.image_scale``)."""
    return image_transform(cfg.shards.height, cfg.shards.width, cfg.train.image_scale)


# --------------------------------------------------------------------------- the evaluate step


def baseline_name(head: str) -> str:
    """Metrics/predictions name of an untrained head (``avg`` → ``avg-untrained``)."""
    return f"{head}-untrained"


PREDICTION_SCHEMA = {
    "query_id": pl.Int64, "query": pl.String, "utm_east": pl.Float64, "utm_north": pl.Float64,
    "positives": pl.Int32, "prediction_ids": pl.List(pl.Int64), "predictions": pl.List(pl.String),
    "distances": pl.List(pl.Float32), "correct": pl.List(pl.Boolean), "first_correct": pl.Int32,
}


def predictions_table(index: pl.DataFrame, split: "SplitData", ranked: np.ndarray,
                      sq_distances: np.ndarray) -> pl.DataFrame:
    """Per query: its path and position, ranked database ids/paths, L2 distances, per-rank correctness.

    ``first_correct`` is the 0-based rank of the first soft positive (null: none in the list).
    """
    paths = dict(index.select("id", "path").iter_rows())
    xy = {i: (e, n) for i, e, n in index.select("id", "utm_east", "utm_north").iter_rows()}
    rows = []
    for qi, qid in enumerate(split.q_ids.tolist()):
        ranks = ranked[qi][ranked[qi] >= 0]
        ids = split.db_ids[ranks]
        correct = np.isin(ranks, split.soft[qi])
        hit = np.flatnonzero(correct)
        rows.append({
            "query_id": qid, "query": paths[qid], "utm_east": xy[qid][0], "utm_north": xy[qid][1],
            "positives": len(split.soft[qi]), "prediction_ids": ids.tolist(),
            "predictions": [paths[i] for i in ids.tolist()],
            "distances": np.sqrt(np.maximum(sq_distances[qi][: len(ranks)], 0)).tolist(),
            "correct": correct.tolist(), "first_correct": int(hit[0]) if len(hit) else None,
        })
    return pl.DataFrame(rows, schema=PREDICTION_SCHEMA)


def evaluate_head(head: str, cfg: Config, layout: Layout, *, untrained: bool = False) -> dict:
    """Recall@N of one head on the test split; writes ``metrics/{name}.json`` and the predictions parquet.

    ``name`` is ``head`` or, with ``untrained=True``, ``{head}-untrained`` (the model as built, no VPR
    training: the baseline). Descriptors of the test database and queries are extracted in batches in
    inference mode (bf16 autocast on CUDA) from the shards; search is exact (FAISS flat L2); a query is
    found at N if one of its first N matches is a soft positive (within ``mining.test_positive_m``, as
    mined into the test table). ``ms_per_image`` is extraction wall time (decode + transform + model)
    over all images, after one warm-up batch. With ``evaluate.index`` ≠ exact or ``evaluate.pca_dim``
    set, the metrics gain an ``approximate`` block: its recall loss against exact search on the same
    descriptors.
    """
    from vpr.train import load_split

    device = resolve_device(cfg.train.device)
    name = baseline_name(head) if untrained else head
    reader = ShardReader(layout.shards_dir)
    mining_path = layout.mining("test")
    if not mining_path.exists():
        raise FileNotFoundError(f"test mining table not found: {mining_path} (run `vpr mine` first)")
    split = load_split(reader.index, pl.read_parquet(mining_path), "test")
    if len(split.q_ids) == 0 or len(split.db_ids) == 0:
        raise ValueError("the test split needs database images and queries to evaluate")
    if untrained:
        model = untrained_model(head, cfg, device)
    else:
        model, _ = load_model(layout.checkpoint(head), device)
    transform = eval_transform(cfg)
    kw = dict(device=device, batch_size=cfg.evaluate.batch_size, workers=cfg.train.workers)
    extract(model, reader, split.db_ids[: cfg.evaluate.batch_size], transform, **kw)  # warm-up (cuDNN, caches)
    t0 = time.perf_counter()
    db = extract(model, reader, split.db_ids, transform, **kw)
    q = extract(model, reader, split.q_ids, transform, **kw)
    seconds = time.perf_counter() - t0
    ns = cfg.evaluate.recall_at
    sq_dist, ranked = exact_search(db, q, max(TOP_PREDICTIONS, max(ns)))
    recalls = recall_at_n(ranked, split.soft, ns)

    metrics: dict = {f"recall@{n}": recalls[n] for n in ns}
    metrics.update({
        "head": head, "untrained": untrained, "descriptor_dim": int(model.descriptor_dim),
        "ms_per_image": 1000.0 * seconds / (len(db) + len(q)), "queries": int(len(q)),
        "database": int(len(db)), "queries_without_positive": int(sum(len(s) == 0 for s in split.soft)),
        "test_positive_m": cfg.mining.test_positive_m, "device": device.type,
    })
    if cfg.evaluate.index != "exact" or cfg.evaluate.pca_dim is not None:
        metrics["approximate"] = approximate_recall(db, q, split.soft, cfg.evaluate.index, ns=ns,
                                                    pca_dim=cfg.evaluate.pca_dim, params=cfg.index)
    write_parquet_atomic(predictions_table(reader.index, split, ranked, sq_dist), layout.predictions(name))
    write_text_atomic(layout.metrics_file(name), json.dumps(metrics, indent=2) + "\n")
    return metrics
