"""The report (table, honest ordering, figures) and the ablation tables."""

from __future__ import annotations

import json

import polars as pl
import pytest

from tests.test_evaluate import build_micro
from vpr.foundations.config import HeadBudget
from vpr.steps.ablation import (
    ABLATIONS,
    comparison_table,
    experiment_name,
    queue_commands,
    recall_at_thresholds,
    threshold_table,
)
from vpr.steps.evaluate import evaluate_head
from vpr.steps.report import FIGURES, mask_figure, write_report

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro-report")
    cfg, layout = build_micro(root, heads=("avg", "crn"))
    for head in ("avg", "crn"):
        evaluate_head(head, cfg, layout)
    evaluate_head("avg", cfg, layout, untrained=True)
    return cfg, layout


def test_report_table_figures_and_csv(evaluated):
    cfg, layout = evaluated
    out = write_report(cfg, layout)
    text = out.read_text()
    metrics = {n: json.loads(layout.metrics_file(n).read_text()) for n in ("avg", "crn", "avg-untrained")}
    rows = [line for line in text.splitlines() if line.startswith("| ") and "`" in line]
    assert len(rows) == 3
    # honest ordering: rows sorted by measured R@1, whatever the study says
    r1 = [float(line.split("|")[4]) for line in rows]
    assert r1 == sorted(r1, reverse=True)
    assert {f"{m['recall@1']:.1f}" for m in metrics.values()} == {f"{v:.1f}" for v in r1}
    assert f"| {4 * 256} |" in text and "| 256 |" in text and "no VPR training" in text
    assert "Measured order by R@1" in text and "20-point bar" in text
    for name in [*FIGURES.values(), mask_figure("crn")]:
        png = layout.reports / "figures" / name
        assert png.read_bytes().startswith(PNG), name
        assert f"(figures/{name})" in text
    csv = pl.read_csv(layout.reports / "recall_at_n.csv")
    assert csv["n"].to_list() == [1, 5, 10, 20]
    assert csv["crn"].to_list() == [metrics["crn"][f"recall@{n}"] for n in (1, 5, 10, 20)]
    assert "avg-untrained" in csv.columns


def test_report_without_crn_drops_stale_mask_figure(evaluated, tmp_path):
    cfg, layout = evaluated
    write_report(cfg, layout)
    ckpt = layout.checkpoint("crn")
    moved = tmp_path / "crn.pt"
    ckpt.rename(moved)
    try:
        text = write_report(cfg, layout).read_text()
    finally:
        moved.rename(ckpt)
    assert not (layout.reports / "figures" / mask_figure("crn")).exists()
    assert "crn context masks skipped" in text


def test_threshold_rescoring_matches_evaluation(evaluated):
    cfg, layout = evaluated
    from vpr.shared.shardio import read_index

    preds = pl.read_parquet(layout.predictions("avg"))
    index = read_index(layout.shards_dir)
    xy = {i: (e, n) for i, e, n in index.select("id", "utm_east", "utm_north").iter_rows()}
    metrics = json.loads(layout.metrics_file("avg").read_text())
    at = recall_at_thresholds(preds, xy, [cfg.mining.test_positive_m, 1e9], [1, 5])
    assert at[cfg.mining.test_positive_m] == {1: metrics["recall@1"], 5: metrics["recall@5"]}
    assert at[1e9] == {1: 100.0, 5: 100.0}
    assert "| 25 |" in threshold_table(layout, "avg", [10, 25], [1, 5, 10, 20])


def test_ablation_commands_are_queued_dvc_experiments():
    assert set(ABLATIONS) == {"lr", "train-threshold", "test-threshold", "augmentation", "image-scale", "clusters"}
    cmds = queue_commands("lr", "netvlad")
    assert [c[c.index("-S") + 1] for c in cmds] == ["train.lr=0.001", "train.lr=0.0001", "train.lr=0.00001"]
    assert all(c[:5] == ["dvc", "exp", "run", "--queue", "-n"] and c[-1] == "evaluate@netvlad" for c in cmds)
    names = [experiment_name(a, "crn", s) for a, ab in ABLATIONS.items() for s in ab.settings]
    assert len(set(names)) == len(names) and all("." not in n and " " not in n for n in names)
    scale = queue_commands("image-scale", "gem")
    assert [c[c.index("-S") + 1] for c in scale] == [f"train.image_scale={v}" for v in ("0.5", "0.75", "1", "1.25")]
    clusters = queue_commands("clusters", "netvlad")
    assert [c[c.index("-S") + 1] for c in clusters] == [f"model.netvlad_clusters={k}" for k in (8, 16, 32, 64)]


def _exp(name, lr, r1):
    return {
        "rev": name,
        "name": name,
        "data": {
            "params": {"params.yaml": {"data": {"train": {"lr": lr, "augment": {"horizontal_flip": False}}}}},
            "metrics": {
                "metrics/netvlad.json": {"data": {"recall@1": r1, "recall@5": r1 + 5, "ms_per_image": 3.25}},
                "metrics/avg.json": {"data": {"recall@1": 1.0}},
            },
        },
        "error": None,
        "experiments": None,
    }


def test_comparison_table_from_exp_show_json():
    workspace = _exp("workspace", 1e-4, 50.0)
    workspace["name"] = None
    base = _exp("3f2a", 1e-4, 50.0)
    base["experiments"] = [
        {"revs": [_exp("abl-lr-netvlad-lr-0p001", 1e-3, 40.0)], "name": "x"},
        {"revs": [_exp("abl-lr-netvlad-lr-0p00001", 1e-5, 55.5)], "name": "y"},
        {
            "revs": [
                {
                    "rev": "f00",
                    "name": "abl-image-scale-netvlad-image-scale-0p5",
                    "data": {
                        "params": {},
                        "metrics": {"metrics/netvlad.json": {"error": {"type": "FileNotFoundError"}}},
                    },
                }
            ]
        },
    ]
    text = comparison_table([workspace, base], head="netvlad", ablation="lr")
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert lines[0].split("|")[1:-1] == [
        " experiment ",
        " train.lr ",
        " R@1 ",
        " R@5 ",
        " R@10 ",
        " R@20 ",
        " ms/image ",
    ]
    body = {line.split("|")[1].strip(): line for line in lines[1:]}
    assert set(body) == {"workspace", "abl-lr-netvlad-lr-0p001", "abl-lr-netvlad-lr-0p00001"}
    assert (
        "| 0.001 | 40.0 | 45.0 | — | — | 3.2 |" in body["abl-lr-netvlad-lr-0p001"]
        or "| 0.001 | 40.0 | 45.0 | — | — | 3.3 |" in body["abl-lr-netvlad-lr-0p001"]
    )
    assert "55.5" in body["abl-lr-netvlad-lr-0p00001"]
    everything = comparison_table([workspace, base], head="netvlad")
    assert "train.image_scale" in everything and "abl-image-scale" not in everything  # failed: no metrics


def test_setup_line_states_each_heads_epochs(evaluated):
    cfg, layout = evaluated
    cfg = cfg.model_copy(
        update={"train": cfg.train.model_copy(update={"per_head": {"crn": HeadBudget(epochs=cfg.train.epochs + 2)}})}
    )
    text = write_report(cfg, layout).read_text()
    epochs = ", ".join(f"{h} {cfg.train.epochs + 2 if h == 'crn' else cfg.train.epochs}" for h in cfg.train.heads)
    assert "crn" in cfg.train.heads and f"epochs {epochs} × {cfg.train.queries_per_epoch} queries" in text
