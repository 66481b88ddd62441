"""Evaluation: Recall@N on the test split, approximate-index recall loss, the untrained baseline.

Recall@N (``vpr.shared.retrieval``): a query counts as found at N if any of its top-N database matches is a
soft positive (within ``mining.test_positive_m``).
"""

from __future__ import annotations

import json

import numpy as np
import polars as pl

from vpr.foundations.atomic import write_parquet_atomic, write_text_atomic
from vpr.foundations.config import Config
from vpr.foundations.layout import Layout
from vpr.foundations.registry import baseline_name
from vpr.shared.descriptors import resolve_device
from vpr.shared.descstore import (
    DescriptorSet,
    DescriptorStore,
    encode_plans,
    encoder_for,
    head_model,
    ms_per_image,
    plans_for,
)
from vpr.shared.retrieval import approximate_recall, chunked_search, recall_at_n, rows_within
from vpr.shared.shardio import ShardReader
from vpr.shared.shardnet import remote_shards
from vpr.shared.splits import SplitData, load_split

TOP_PREDICTIONS = 20  # ranked matches kept per query in the predictions table


# --------------------------------------------------------------------------- models


# --------------------------------------------------------------------------- the evaluate step


PREDICTION_SCHEMA = {
    "query_id": pl.Int64,
    "query": pl.String,
    "utm_east": pl.Float64,
    "utm_north": pl.Float64,
    "positives": pl.Int32,
    "prediction_ids": pl.List(pl.Int64),
    "predictions": pl.List(pl.String),
    "distances": pl.List(pl.Float32),
    "correct": pl.List(pl.Boolean),
    "first_correct": pl.Int32,
}


def predictions_table(
    index: pl.DataFrame, split: SplitData, ranked: np.ndarray, sq_distances: np.ndarray
) -> pl.DataFrame:
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
        rows.append(
            {
                "query_id": qid,
                "query": paths[qid],
                "utm_east": xy[qid][0],
                "utm_north": xy[qid][1],
                "positives": len(split.soft[qi]),
                "prediction_ids": ids.tolist(),
                "predictions": [paths[i] for i in ids.tolist()],
                "distances": np.sqrt(np.maximum(sq_distances[qi][: len(ranks)], 0)).tolist(),
                "correct": correct.tolist(),
                "first_correct": int(hit[0]) if len(hit) else None,
            }
        )
    return pl.DataFrame(rows, schema=PREDICTION_SCHEMA)


def search_set(db_set: DescriptorSet, queries: np.ndarray, k: int, memory_gb: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k over a stored descriptor set within ``memory_gb``: (squared distances, set rows).

    A quarter of the budget holds a database chunk, a quarter a block of queries (more queries than
    that are searched block by block, each block reading the database once more).
    """
    rows = rows_within(memory_gb * 2**30, db_set.dim)
    return chunked_search(lambda: db_set.chunks(rows), queries, min(k, max(1, len(db_set))), query_rows=rows)


def rows_to_positions(rows: np.ndarray, set_ids: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Search results as rows of a descriptor set → positions in ``order`` (ids); −1 stays −1."""
    by_id = np.argsort(order)
    pos = by_id[np.searchsorted(order[by_id], set_ids)]
    if not np.array_equal(order[pos], set_ids):
        raise ValueError("the descriptor set holds images that are not in the split")
    return np.where(rows >= 0, pos[np.maximum(rows, 0)], -1)


def evaluate_head(head: str, cfg: Config, layout: Layout, *, untrained: bool = False) -> dict:
    """Recall@N of one head on the test split; writes ``metrics/{name}.json`` and the predictions parquet.

    ``name`` is ``head`` or, with ``untrained=True``, ``{head}-untrained`` (the model as built, no VPR
    training: the baseline). Descriptors of the test database and queries are extracted in batches in
    inference mode (bf16 autocast on CUDA) from the shards, one store entry per shard (``vpr.shared.descstore``:
    shards already encoded with this model are read back, not re-encoded); search is exact (FAISS flat
    L2) over database chunks sized from ``resources.memory_gb``; a query is found at N if one of its
    first N matches is a soft positive (within ``mining.test_positive_m``, as mined into the test
    table). ``ms_per_image`` is extraction wall time (decode + transform + model) per image, after
    each shard's warm-up batch (kept with the stored descriptors). With ``evaluate.index`` ≠ exact or
    ``evaluate.pca_dim`` set, the metrics gain an ``approximate`` block: its recall loss against exact
    search on the same descriptors.
    """
    device = resolve_device(cfg.train.device)
    name = baseline_name(head) if untrained else head
    reader = ShardReader(layout.shards_dir, ("test",))
    mining_path = layout.mining("test")
    if not mining_path.exists():
        raise FileNotFoundError(f"test mining table not found: {mining_path} (run `vpr mine` first)")
    split = load_split(reader.index, pl.read_parquet(mining_path), "test")
    if len(split.q_ids) == 0 or len(split.db_ids) == 0:
        raise ValueError("the test split needs database images and queries to evaluate")
    model = head_model(head, cfg, layout, device, untrained=untrained)
    encoder = encoder_for(model, cfg, device)
    store = DescriptorStore(layout.descriptors_dir)
    url = remote_shards(cfg.resources)
    db_set = encode_plans(encoder, plans_for(reader, split.db_ids, url), store)
    q_set = encode_plans(encoder, plans_for(reader, split.q_ids, url), store)
    q = q_set.gather(split.q_ids)
    ns = cfg.evaluate.recall_at
    sq_dist, ranked = search_set(db_set, q, max(TOP_PREDICTIONS, max(ns)), cfg.resources.memory_gb)
    ranked = rows_to_positions(ranked, db_set.ids, split.db_ids)
    recalls = recall_at_n(ranked, split.soft, ns)

    metrics: dict = {f"recall@{n}": recalls[n] for n in ns}
    metrics.update(
        {
            "head": head,
            "untrained": untrained,
            "descriptor_dim": int(model.descriptor_dim),
            "ms_per_image": ms_per_image(db_set, q_set),
            "queries": int(len(q)),
            "database": int(len(db_set)),
            "queries_without_positive": int(sum(len(s) == 0 for s in split.soft)),
            "test_positive_m": cfg.mining.test_positive_m,
            "device": device.type,
        }
    )
    if cfg.evaluate.index != "exact" or cfg.evaluate.pca_dim is not None:
        metrics["approximate"] = approximate_recall(
            db_set.gather(split.db_ids),
            q,
            split.soft,
            cfg.evaluate.index,
            ns=ns,
            pca_dim=cfg.evaluate.pca_dim,
            params=cfg.index,
        )
    write_parquet_atomic(predictions_table(reader.index, split, ranked, sq_dist), layout.predictions(name))
    write_text_atomic(layout.metrics_file(name), json.dumps(metrics, indent=2) + "\n")
    return metrics
