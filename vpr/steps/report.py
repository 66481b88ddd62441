"""The study's report: results table for every evaluated head plus the untrained baseline, and figures.

``write_report`` reads ``metrics/*.json`` and the predictions tables (it never recomputes a
metric) and writes, atomically:

- ``reports/results.md``: heads ordered by measured R@1 (whatever that order is), descriptor size,
  R@1/5/10/20, extraction ms/image, gain over the untrained avg baseline, the study's reference
  figures beside them, approximate-index losses when evaluated, and links to the figures;
- ``reports/recall_at_n.csv``: Recall@N per head, one column each, and ``reports/recall/{model}.csv``
  (one file per model: ``dvc plots show`` draws each as a series);
- ``reports/figures/*.png`` (matplotlib, Agg, no pyplot state): Recall@N curves, qualitative matches
  (query + top-5 of the best head, correct in green, wrong in red), the context masks of every mask
  head (``vpr.foundations.registry``: CRN, CRN2) over query images, and a map of database/query positions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import polars as pl

from vpr.foundations.atomic import write_bytes_atomic, write_text_atomic
from vpr.foundations.config import Config
from vpr.foundations.layout import Layout
from vpr.foundations.registry import baseline_name, head_names, head_spec
from vpr.foundations.tables import cell, markdown_table
from vpr.steps.figures import mask_figure_of, matches_figure, pick_queries, positions_figure, recall_figure

BASELINE = baseline_name()  # the untrained base line every head is measured against
FIGURES = {
    "recall": "recall_at_n.png",
    "matches": "matches.png",
    "positions": "positions.png",
}


def mask_figure(head: str) -> str:
    """The file name of a mask head's context-mask figure (``crn_masks.png``)."""
    return f"{head}_masks.png"


def _study(name: str, n: int = 1) -> float | None:
    """The study's Recall@N of a registered head (None for the baseline or an unreported N)."""
    return head_spec(name).study.recall.get(n) if name in head_names() else None


def _study_ms(name: str) -> float | None:
    return head_spec(name).study.ms_per_image if name in head_names() else None


def study_order(heads) -> list[str]:
    """``heads`` in the study's order by R@1 (best first); heads the study did not report are left out."""
    reported = [h for h in heads if _study(h) is not None]
    return sorted(reported, key=lambda h: -_study(h))  # type: ignore[operator]


_NS = (1, 5, 10, 20)


def _load_metrics(cfg: Config, layout: Layout) -> dict[str, dict]:
    found = {}
    for name in [*cfg.train.heads, BASELINE]:
        path = layout.metrics_file(name)
        if path.exists():
            found[name] = json.loads(path.read_text())
    return found


def _fmt(v: object, digits: int = 1) -> str:
    return cell(None if v is None else float(v), digits)  # type: ignore[arg-type]


def _table(metrics: dict[str, dict]) -> list[str]:
    base = metrics.get(BASELINE, {}).get("recall@1")
    ranked = sorted(metrics.items(), key=lambda kv: (-kv[1].get("recall@1", -1.0), kv[0]))
    header = [
        "rank",
        "head",
        "descriptor",
        "R@1",
        "R@5",
        "R@10",
        "R@20",
        "ms/image",
        "R@1 vs untrained avg",
        "study R@1",
        "study ms (K80)",
    ]
    rows = []
    for rank, (name, m) in enumerate(ranked, start=1):
        gain = "—" if base is None or name == BASELINE else f"{m['recall@1'] - base:+.1f}"
        label = f"`{name}` (no VPR training)" if name == BASELINE else f"`{name}`"
        rows.append(
            [
                rank,
                label,
                m.get("descriptor_dim", "—"),
                *(_fmt(m.get(f"recall@{n}")) for n in _NS),
                _fmt(m.get("ms_per_image"), 2),
                gain,
                _fmt(_study(name)),
                _fmt(_study_ms(name)),
            ]
        )
    return markdown_table(header, rows, right=[0, *range(2, len(header))])


def _findings(metrics: dict[str, dict]) -> list[str]:
    trained = {k: v for k, v in metrics.items() if k != BASELINE}
    lines = []
    if trained:
        order = sorted(trained, key=lambda k: (-trained[k]["recall@1"], k))
        measured = f"{order[0]} ({trained[order[0]]['recall@1']:.1f})"
        for prev, k in zip(order, order[1:]):
            sep = " = " if abs(trained[prev]["recall@1"] - trained[k]["recall@1"]) < 1e-9 else " > "
            measured += f"{sep}{k} ({trained[k]['recall@1']:.1f})"
        study = study_order(trained)
        verdict = "the same order as the study" if order == study else f"not the study's order ({' > '.join(study)})"
        lines.append(f"- Measured order by R@1: {measured} — {verdict}.")
    base = metrics.get(BASELINE, {}).get("recall@1")
    if base is not None:
        for head in trained:
            if head in head_names() and head_spec(head).vlad:
                gain = trained[head]["recall@1"] - base
                ok = "meets" if gain >= 20 else "does NOT meet"
                lines.append(
                    f"- `{head}` R@1 is {gain:+.1f} points over the untrained avg baseline "
                    f"({base:.1f}): {ok} the 20-point bar."
                )
    ties = [k for k in trained if sum(abs(trained[k]["recall@1"] - v["recall@1"]) < 1e-9 for v in trained.values()) > 1]
    if ties:
        lines.append(f"- Tied at R@1 (ordered by name): {', '.join(sorted(ties))}.")
    any_m = next(iter(metrics.values()), None)
    if any_m:
        lines.append(
            f"- {any_m.get('queries')} test queries ({any_m.get('queries_without_positive', 0)} without any "
            f"database image within {any_m.get('test_positive_m')} m, which no method can find) against "
            f"{any_m.get('database')} database images; extraction on {any_m.get('device', '?')}."
        )
    return lines


def _approx_lines(metrics: dict[str, dict]) -> list[str]:
    rows = [(k, m["approximate"]) for k, m in metrics.items() if "approximate" in m]
    if not rows:
        return []
    lines = [
        "",
        "## Approximate search",
        "",
        "Recall loss against exact search on the same descriptors (points; positive = worse).",
        "",
    ]
    header = ["head", "index", "PCA dim", "R@1", "loss@1", "loss@5", "top-1 agreement %", "speed-up"]
    cells = [
        [
            f"`{k}`",
            a["index"],
            a.get("pca_dim") or "—",
            *(_fmt(a.get(key)) for key in ("recall@1", "recall_loss@1", "recall_loss@5", "top1_agreement")),
            _fmt(a.get("speedup"), 2),
        ]
        for k, a in rows
    ]
    return lines + markdown_table(header, cells, right=range(2, len(header)))


def _test_set_lines(cfg: Config, layout: Layout, metrics: dict[str, dict]) -> list[str]:
    """Every head on the main test split and on each extra test set (``evaluate.test_sets``), side by side."""
    extra = {}
    for name in cfg.evaluate.test_sets:
        own = layout.test_set(name)
        extra[name] = {h: json.loads(p.read_text()) for h in cfg.train.heads if (p := own.metrics_file(h)).exists()}
    if not any(extra.values()):
        return []
    sets = {"test": metrics, **extra}
    header = ["head", *(f"{name} R@{n}" for name in sets for n in _NS)]
    rows = [
        [f"`{head}`", *(_fmt(sets[name].get(head, {}).get(f"recall@{n}")) for name in sets for n in _NS)]
        for head in cfg.train.heads
        if any(head in m for m in sets.values())
    ]
    sizes = "; ".join(
        f"{name}: {next(iter(m.values())).get('queries')} queries, {next(iter(m.values())).get('database')} database"
        for name, m in extra.items()
        if m
    )
    return [
        "",
        "## Test sets",
        "",
        "Every trained head on the main test split and on each extra test set (never seen in training, no "
        f"retraining: `cross-evaluate` stages); {sizes}.",
        "",
        *markdown_table(header, rows, right=range(1, len(header))),
    ]


# --------------------------------------------------------------------------- the report


def _recall_tables(metrics: dict[str, dict], heads: Sequence[str]) -> tuple[str, dict[str, str]]:
    """Recall@N as one wide CSV (a column per model) and one CSV per model (what ``dvc plots`` draws)."""
    names = [BASELINE, *heads, *sorted(k for k in metrics if k != BASELINE and k not in heads)]
    names = [n for n in names if n in metrics]
    ns = sorted({int(k.split("@")[1]) for m in metrics.values() for k in m if k.startswith("recall@")})
    wide = pl.DataFrame({"n": ns, **{n: [metrics[n].get(f"recall@{k}") for k in ns] for n in names}})
    per_model = {n: pl.DataFrame({"n": ns, "recall": wide[n]}).write_csv() for n in names}
    return wide.write_csv(), per_model


def write_report(cfg: Config, layout: Layout) -> Path:
    """Write ``reports/results.md``, ``reports/recall_at_n.csv`` and ``reports/figures/*.png``; return the md path."""
    from vpr.shared.shardio import ShardReader

    metrics = _load_metrics(cfg, layout)
    if not metrics:
        raise FileNotFoundError(f"no metrics in {layout.metrics} (run `vpr evaluate --head ...` first)")
    figdir = layout.reports / "figures"
    figdir.mkdir(parents=True, exist_ok=True)
    made: dict[str, str] = {}
    notes: list[str] = []

    recall_figure(metrics, figdir / FIGURES["recall"])
    made[FIGURES["recall"]] = "Recall@N curves for every head and the untrained baseline"
    reader = ShardReader(layout.shards_dir)
    positions_figure(reader.index, figdir / FIGURES["positions"])
    made[FIGURES["positions"]] = "Map of database and query positions (UTM), all splits"

    trained = [k for k in metrics if k != BASELINE]
    best = max(trained or [BASELINE], key=lambda k: (metrics[k]["recall@1"], k))
    preds_path = layout.predictions(best)
    query_ids: list[int] = []
    if preds_path.exists():
        preds = pl.read_parquet(preds_path)
        matches_figure(preds, reader, best, figdir / FIGURES["matches"])
        made[FIGURES["matches"]] = f"Qualitative matches of the best head (`{best}`): query + top-5, green = correct"
        query_ids = pick_queries(preds)["query_id"].to_list()
    else:
        notes.append(f"qualitative matches skipped: {preds_path} missing")
    for head in [h for h in cfg.train.heads if head_spec(h).mask]:
        if not layout.checkpoint(head).exists():
            notes.append(f"{head} context masks skipped: no {head} checkpoint")
            continue
        if not query_ids:
            query_ids = (
                reader.index.filter((pl.col("split") == "test") & (pl.col("role") == "queries"))["id"].head(4).to_list()
            )
        mask_figure_of(head, cfg, layout, reader, query_ids, figdir / mask_figure(head))
        made[mask_figure(head)] = f"{head} context masks over query images"
    for stale in figdir.glob("*.png"):  # a figure this run could not make must not linger from an older one
        if stale.name not in made:
            stale.unlink()

    wide, per_model = _recall_tables(metrics, cfg.train.heads)
    write_bytes_atomic(layout.reports / "recall_at_n.csv", wide.encode())
    curves = layout.reports / "recall"
    for name, text in per_model.items():
        write_bytes_atomic(curves / f"{name}.csv", text.encode())
    for stale in curves.glob("*.csv"):  # a model no longer evaluated must not linger in the plot
        if stale.stem not in per_model:
            stale.unlink()
    any_m = next(iter(metrics.values()))
    lines = [
        "# Results",
        "",
        "Visual place recognition on the test split: a query is found at N when one of its first N "
        f"database matches lies within {any_m.get('test_positive_m', cfg.mining.test_positive_m)} m. "
        "Exact (FAISS flat L2) search; heads ordered by measured R@1. The study's Pitts30k-test R@1 is "
        "given for reference only (different data, not run here).",
        "",
        *_table(metrics),
        "",
        "## Findings",
        "",
        *_findings(metrics),
        *_test_set_lines(cfg, layout, metrics),
        *_approx_lines(metrics),
        "",
        "## Setup",
        "",
        f"- Images {cfg.shards.width}×{cfg.shards.height} × scale {cfg.train.image_scale}; backbone weights "
        f"{_weights_note(cfg)}; {_budget_note(cfg)}, "
        f"lr {cfg.train.lr}, {cfg.train.mining} mining; VLAD heads with {cfg.model.netvlad_clusters} clusters.",
        "- ms/image: descriptor extraction wall time (decode + transform + model) per image during evaluation.",
        "- Sources: `metrics/*.json` (`dvc metrics show`), predictions in `artifacts/predictions/`.",
        "",
        "## Figures",
        "",
        *(f"- [{desc}](figures/{name})" for name, desc in made.items()),
        *(f"- ({n})" for n in notes),
        "",
        *(f"![{desc}](figures/{name})\n" for name, desc in made.items()),
    ]
    out = layout.reports / "results.md"
    write_text_atomic(out, "\n".join(lines))
    return out


def _budget_note(cfg: Config) -> str:
    """Epochs × queries per head, e.g. ``epochs avg 4, gem 2 × 400 queries`` (``train.per_head`` included)."""
    budgets = {h: cfg.train.for_head(h) for h in cfg.train.heads}
    per_epoch = {b.queries_per_epoch for b in budgets.values()}
    epochs = ", ".join(f"{h} {b.epochs}" for h, b in budgets.items())
    queries = f"{per_epoch.pop()} queries" if len(per_epoch) == 1 else "per-head queries"
    return f"epochs {epochs} × {queries}"


def _weights_note(cfg: Config) -> str:
    """Say plainly when 'imagenet' fell back to random init (no cached weights, and none downloaded)."""
    from vpr.shared.models.backbone import imagenet_weights_path

    if cfg.model.weights == "imagenet" and not imagenet_weights_path().exists():
        return "`imagenet` requested but neither cached nor downloadable, so **random init**"
    return f"`{cfg.model.weights}`"
