"""Evaluation on a micro city: metrics and predictions files, the untrained baseline, approximate indexes.

``build_micro`` (also used by test_locate.py and test_report.py) makes a tiny datasets_vg tree with
Pillow, runs the real ingest → shard → mine steps on it and saves untrained checkpoints in the
training format, so every test here exercises the same code paths as ``dvc repro``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch
from PIL import Image, ImageFilter

from tests.micro import shard_and_mine
from vpr.foundations.config import Config, EvalConfig, IndexConfig, IngestConfig, ModelConfig, ShardConfig, TrainConfig
from vpr.foundations.geo import format_name
from vpr.foundations.layout import Layout
from vpr.shared.models import build_model
from vpr.shared.retrieval import approximate_recall, exact_search, make_index, recall_at_n
from vpr.steps.catalog import ingest
from vpr.steps.evaluate import evaluate_head

PLACES = 8
SPACING_M = 100.0
H, W = 48, 64


def micro_config(**updates) -> Config:
    cfg = Config(
        shards=ShardConfig(height=H, width=W, jpeg_quality=90, samples_per_shard=8),
        model=ModelConfig(weights="none", netvlad_clusters=4, gem_dim=64),
        train=TrainConfig(device="cpu", workers=0),
        evaluate=EvalConfig(batch_size=8),
        index=IndexConfig(head="avg", nlist=4, pq_m=8),
    )
    return cfg.model_copy(update=updates)


def _place_image(rng: np.random.Generator, place: int, variant: int) -> Image.Image:
    """A distinctive blocky façade per place; variants are shifted, blurred, brighter copies."""
    base = np.random.default_rng(1000 + place).integers(0, 255, size=(6, 8, 3)).astype(np.uint8)
    im = Image.fromarray(base).resize((W * 2, H * 2), Image.Resampling.NEAREST)
    dx, dy = int(rng.integers(0, 6)), int(rng.integers(0, 6))
    im = im.crop((dx, dy, dx + W * 2 - 6, dy + H * 2 - 6))
    if variant:
        im = im.filter(ImageFilter.GaussianBlur(1)).point(lambda v: min(255, int(v * 1.1)))
    return im


def build_micro(root: Path, heads=("avg",), cfg: Config | None = None) -> tuple[Config, Layout]:
    """Micro city under ``root``: test split, 2 database images + 1 query per place, plus one query far away."""
    cfg = cfg or micro_config()
    rng = np.random.default_rng(0)
    data = root / "data"
    for p in range(PLACES):
        east, north = 500_000.0 + p * SPACING_M, 4_000_000.0
        for v in range(2):
            name = format_name(
                east + 2 * v, north, utm_zone=17, utm_letter="T", lat=40.0 + p * 1e-3, lon=-80.0, note=f"p{p}v{v}"
            )
            path = data / "images/test/database" / name
            path.parent.mkdir(parents=True, exist_ok=True)
            _place_image(rng, p, v).save(path, quality=95)
        qpath = data / "images/test/queries" / format_name(east + 3, north + 1, note=f"q{p}")
        qpath.parent.mkdir(parents=True, exist_ok=True)
        _place_image(rng, p, 1).save(qpath, quality=95)
    far = data / "images/test/queries" / format_name(900_000.0, 4_500_000.0, note="nowhere")
    _place_image(rng, 99, 0).save(far, quality=95)

    layout = Layout.from_config(cfg, root)
    ingest(data, layout.catalog_dir, IngestConfig(workers=1))
    shard_and_mine(cfg, layout, ("test",), workers=1)
    for head in heads:
        save_checkpoint(head, cfg, layout)
    return cfg, layout


def build_micro_release(root: Path) -> tuple[Config, Layout]:
    """``build_micro`` with avg trained, and its release published (what locate and the service read)."""
    from vpr.steps.index import build_release

    cfg, layout = build_micro(root, heads=("avg",))
    build_release("avg", cfg, layout)
    return cfg, layout


def save_checkpoint(head: str, cfg: Config, layout: Layout) -> Path:
    torch.manual_seed(0)
    model = build_model(head, cfg.model)
    path = layout.checkpoint(head)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {"model": model.state_dict(), "head": head, "epoch": 0, "recall5": 0.0, "model_config": cfg.model.model_dump()},
        path,
    )
    return path


@pytest.fixture(scope="module")
def micro(tmp_path_factory) -> tuple[Config, Layout]:
    return build_micro(tmp_path_factory.mktemp("micro"), heads=("avg", "gem"))


def test_evaluate_writes_metrics_and_predictions(micro):
    cfg, layout = micro
    metrics = evaluate_head("avg", cfg, layout)
    on_disk = json.loads(layout.metrics_file("avg").read_text())
    assert on_disk == metrics
    for n in (1, 5, 10, 20):
        assert 0.0 <= metrics[f"recall@{n}"] <= 100.0
    assert metrics["recall@1"] <= metrics["recall@5"] <= metrics["recall@10"] <= metrics["recall@20"]
    assert metrics["descriptor_dim"] == 256 and metrics["ms_per_image"] > 0
    assert metrics["queries"] == PLACES + 1 and metrics["database"] == 2 * PLACES
    assert metrics["queries_without_positive"] == 1
    # the far-away query can never be found: recall tops out at 8/9
    assert metrics["recall@20"] <= 100.0 * PLACES / (PLACES + 1) + 1e-9

    preds = pl.read_parquet(layout.predictions("avg"))
    assert preds.height == PLACES + 1
    row = preds.filter(pl.col("query").str.contains("nowhere")).row(0, named=True)
    assert row["positives"] == 0 and row["first_correct"] is None and not any(row["correct"])
    assert all(len(p) == 2 * PLACES for p in preds["predictions"])  # top-20 clipped to the database
    assert all(d == sorted(d) for d in preds["distances"].to_list())
    # the table agrees with the metric: R@1 = share of queries whose first match is correct
    assert 100.0 * np.mean([c[0] for c in preds["correct"].to_list()]) == pytest.approx(metrics["recall@1"])


def test_untrained_baseline_has_its_own_files(micro):
    cfg, layout = micro
    metrics = evaluate_head("avg", cfg, layout, untrained=True)
    assert metrics["untrained"] is True
    assert layout.metrics_file("avg-untrained").exists() and layout.predictions("avg-untrained").exists()


def test_vpr_evaluate_never_imports_torchvision(micro, tmp_path):
    """``vpr evaluate`` builds its ResNet-18 and transform without torchvision: importing torchvision
    pulls ``torch._dynamo`` (via ``torchvision.ops``) and cost about as much as torch itself."""
    cfg, layout = micro
    params = tmp_path / "params.yaml"
    params.write_text(cfg.model_dump_json())  # JSON is YAML
    args = ["-q", "evaluate", "--head", "avg", "--untrained", "--params", str(params)]
    heavy = ("torchvision", "torch._dynamo")
    probe = (
        "import json, sys\n"
        "from typer.testing import CliRunner\n"
        "from vpr.cli import app\n"
        f"r = CliRunner().invoke(app, {args!r})\n"
        f"loaded = [m for m in {heavy!r} if m in sys.modules]\n"
        "print(json.dumps({'code': r.exit_code, 'out': r.output, 'loaded': loaded}))\n"
    )
    proc = subprocess.run([sys.executable, "-c", probe], cwd=layout.root, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["code"] == 0, report["out"]
    assert report["loaded"] == []
    assert json.loads(layout.metrics_file("avg-untrained").read_text())["queries"] == PLACES + 1


def test_evaluate_reports_approximate_loss(micro):
    cfg, layout = micro
    cfg = cfg.model_copy(update={"evaluate": EvalConfig(batch_size=8, index="hnsw")})
    metrics = evaluate_head("gem", cfg, layout)
    approx = metrics["approximate"]
    assert approx["index"] == "hnsw"
    for n in (1, 5, 10, 20):
        assert approx[f"exact_recall@{n}"] == pytest.approx(metrics[f"recall@{n}"])
        assert approx[f"recall_loss@{n}"] == pytest.approx(approx[f"exact_recall@{n}"] - approx[f"recall@{n}"])


def test_missing_checkpoint_is_named(micro, tmp_path):
    cfg, layout = micro
    with pytest.raises(FileNotFoundError, match="netvlad"):
        evaluate_head("netvlad", cfg, layout)


# --------------------------------------------------------------------------- approximate recall on synthetic data


def _clustered(n_db=2000, n_q=200, dim=64, seed=0):
    rng = np.random.default_rng(seed)
    db = rng.normal(size=(n_db, dim)).astype(np.float32)
    db /= np.linalg.norm(db, axis=1, keepdims=True)
    truth = rng.integers(0, n_db, size=n_q)
    q = db[truth] + 0.05 * rng.normal(size=(n_q, dim)).astype(np.float32)
    return db, q.astype(np.float32), [[int(t)] for t in truth]


@pytest.mark.parametrize("kind", ["ivfpq", "hnsw"])
def test_approximate_loss_is_measured_against_exact(kind):
    db, q, positives = _clustered()
    out = approximate_recall(db, q, positives, kind, ns=(1, 5), params=IndexConfig(nlist=16, nprobe=4, pq_m=8))
    _, ranked = exact_search(db, q, 5)
    exact = recall_at_n(ranked, positives, (1, 5))
    assert out["exact_recall@1"] == exact[1] and out["exact_recall@5"] == exact[5]
    assert out["recall_loss@1"] == pytest.approx(exact[1] - out["recall@1"])
    assert 0 <= out["top1_agreement"] <= 100


def test_coarse_pq_loses_recall_and_exact_loses_none():
    db, q, positives = _clustered(dim=64)
    # 1 sub-quantiser × 2 bits: 4 codes for 2000 vectors → most queries land on a wrong neighbour
    coarse = approximate_recall(db, q, positives, "ivfpq", ns=(1,), params=IndexConfig(nlist=1, pq_m=1, pq_bits=2))
    assert coarse["recall_loss@1"] > 20
    flat = approximate_recall(db, q, positives, "exact", ns=(1,))
    assert flat["recall_loss@1"] == 0 and flat["top1_agreement"] == 100


def test_pca_recall_loss_and_bad_dimension():
    db, q, positives = _clustered(dim=64)
    out = approximate_recall(db, q, positives, "exact", ns=(1,), pca_dim=32)
    assert out["descriptor_dim"] == 32 and out["pca_dim"] == 32
    assert out["recall_loss@1"] == pytest.approx(out["exact_recall@1"] - out["recall@1"])
    with pytest.raises(ValueError, match="pca_dim"):
        approximate_recall(db, q, positives, "exact", pca_dim=64)


def test_small_database_still_trains_ivfpq():
    index = make_index("ivfpq", 32, 50, IndexConfig(nlist=64, pq_m=48, pq_bits=8))
    assert index.nlist == 1 and index.pq.M == 32 and index.pq.nbits == 5
