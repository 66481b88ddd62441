"""The report's figures (matplotlib, Agg, no pyplot state; each PNG written atomically).

Recall@N curves of every model, qualitative matches (query + top-5, correct in green, wrong in red),
the context masks of a mask head over query images, and a map of database/query positions per split.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # before anything imports pyplot: never open a display

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from vpr.foundations.atomic import atomic_path  # noqa: E402
from vpr.foundations.config import Config  # noqa: E402
from vpr.foundations.layout import Layout  # noqa: E402
from vpr.foundations.registry import baseline_name  # noqa: E402

BASELINE = baseline_name()
RECALL_AT = (1, 5, 10, 20)


def save_png(fig: Figure, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})


def recall_figure(metrics: dict[str, dict], path: Path) -> None:
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for name, m in sorted(metrics.items(), key=lambda kv: -kv[1].get("recall@1", 0)):
        ns = sorted(int(k.split("@")[1]) for k in m if k.startswith("recall@"))
        style = dict(linestyle="--", color="grey") if name == BASELINE else {}
        ax.plot(ns, [m[f"recall@{n}"] for n in ns], marker="o", label=name, **style)
    ax.set(xlabel="N", ylabel="Recall@N (%)", title="Recall@N on the test split", ylim=(0, 100))
    ax.set_xticks(list(RECALL_AT))
    ax.grid(alpha=0.3)
    ax.legend()
    save_png(fig, path)


def _framed(ax, image, color: str | None, title: str) -> None:
    ax.imshow(image)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=7)
    for spine in ax.spines.values():
        spine.set_visible(color is not None)
        if color:
            spine.set_edgecolor(color)
            spine.set_linewidth(3)


def pick_queries(preds: pl.DataFrame, count: int = 4) -> pl.DataFrame:
    """Half found at R@1, half missed (when both kinds exist), deterministic by path."""
    preds = preds.sort("query").with_columns(pl.col("correct").list.first().fill_null(False).alias("_hit"))
    hits, misses = preds.filter(pl.col("_hit")), preds.filter(~pl.col("_hit"))
    n_hit = min(hits.height, max(count - misses.height, count // 2))
    return pl.concat([hits.head(n_hit), misses.head(count - n_hit)])


def matches_figure(preds: pl.DataFrame, reader, head: str, path: Path, top: int = 5) -> None:
    picked = pick_queries(preds)
    fig = Figure(figsize=(1.6 * (top + 1), 1.4 * max(1, picked.height) + 0.4), layout="constrained")
    fig.suptitle(f"`{head}`: query and top-{top} (green: within the test threshold, red: not)", fontsize=9)
    axes = fig.subplots(max(1, picked.height), top + 1, squeeze=False)
    for r, row in enumerate(picked.iter_rows(named=True)):
        _framed(axes[r][0], reader.load(row["query_id"]), None, "query")
        for c in range(top):
            ax = axes[r][c + 1]
            if c < len(row["prediction_ids"]):
                ok = row["correct"][c]
                _framed(
                    ax,
                    reader.load(row["prediction_ids"][c]),
                    "tab:green" if ok else "tab:red",
                    f"#{c + 1}  d={row['distances'][c]:.3f}",
                )
            else:
                ax.axis("off")
    save_png(fig, path)


def mask_figure_of(head: str, cfg: Config, layout: Layout, reader, query_ids: list[int], path: Path) -> None:
    """A mask head's context masks over query images (brighter = weighted more)."""
    import torch
    import torch.nn.functional as F

    from vpr.shared.checkpoints import load_model
    from vpr.shared.descriptors import eval_transform

    model, _ = load_model(layout.checkpoint(head), "cpu")
    tf = eval_transform(cfg.shards, cfg.train.image_scale)
    images = [reader.load(i) for i in query_ids]
    with torch.inference_mode():
        batch = torch.stack([tf(im) for im in images])
        masks = model.head.context_mask(model.features(batch))
        masks = F.interpolate(masks, size=batch.shape[-2:], mode="bilinear", align_corners=False)[:, 0].numpy()
    fig = Figure(figsize=(2.4 * len(images), 2.2), layout="constrained")
    fig.suptitle(f"{head} context masks (brighter = weighted more)", fontsize=9)
    axes = fig.subplots(1, len(images), squeeze=False)[0]
    for ax, im, mask in zip(axes, images, masks):
        ax.imshow(np.asarray(im.convert("L").resize((batch.shape[-1], batch.shape[-2]))), cmap="gray")
        shown = ax.imshow(mask, cmap="inferno", alpha=0.55)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(shown, ax=list(axes), shrink=0.8)
    save_png(fig, path)


def positions_figure(index: pl.DataFrame, path: Path) -> None:
    """One panel per split (splits usually lie kilometres apart): database dots, query crosses."""
    splits = [s for s in ("train", "val", "test") if s in set(index["split"])] or sorted(set(index["split"]))
    splits += sorted(set(index["split"]) - set(splits))
    fig = Figure(figsize=(4.2 * len(splits), 4.2), layout="constrained")
    fig.suptitle("Database and query positions (UTM metres)", fontsize=10)
    axes = fig.subplots(1, len(splits), squeeze=False)[0]
    for ax, split in zip(axes, splits):
        rows = index.filter(pl.col("split") == split)
        for role, marker, color, size in (("database", ".", "tab:blue", 8), ("queries", "x", "tab:red", 16)):
            group = rows.filter(pl.col("role") == role)
            ax.scatter(
                group["utm_east"],
                group["utm_north"],
                s=size,
                marker=marker,
                color=color,
                label=f"{role} ({group.height})",
                alpha=0.7,
            )
        ax.set(title=split, xlabel="east")
        ax.set_aspect("equal", adjustable="datalim")
        ax.ticklabel_format(useOffset=False, style="plain")
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("north")
    save_png(fig, path)


def curves_figure(series: dict[str, dict[int, float]], title: str, path: Path) -> None:
    """Recall@N curves, one per series (an ablation's settings on one test set)."""
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.add_subplot()
    for label, recall in series.items():
        ns = sorted(recall)
        ax.plot(ns, [recall[n] for n in ns], marker="o", label=label)
    ax.set(xlabel="N", ylabel="Recall@N (%)", title=title, ylim=(0, 100))
    ax.set_xticks(list(RECALL_AT))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    save_png(fig, path)
