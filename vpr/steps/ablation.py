"""The study's ablations as DVC experiments: queued, parameter-set, versioned.

Each ablation is a list of parameter settings. ``queue_ablation`` stages one experiment per setting
with ``dvc exp run --queue -n NAME -S key=value ... evaluate@HEAD`` (DVC reruns only what the changed
parameters invalidate: for HEAD that is usually mining and/or training, then evaluation);
``run_queue`` runs the queue (``dvc exp run --run-all``); ``comparison_table`` turns
``dvc exp show --json`` into a markdown table of the experiments' parameters and Recall@N. Every
experiment is a git ref (``dvc exp list``), so results stay reproducible (``dvc exp apply NAME``).

The test-threshold ablation changes ``mining.test_positive_m``, which also decides which database
images may serve as training negatives, so its experiments retrain. The study instead re-scored one
trained model at several thresholds; ``threshold_table`` does that from a saved predictions table
(no retraining, exact for N ≤ 20 because retrieval does not depend on the threshold).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from vpr.foundations.dvcrun import DvcError, run_dvc
from vpr.foundations.layout import Layout
from vpr.foundations.tables import cell, markdown_table


class AblationError(RuntimeError):
    """Unknown ablation, a failing dvc command, or unreadable experiment data."""


@dataclass(frozen=True)
class Ablation:
    description: str
    settings: tuple[dict[str, object], ...]


ABLATIONS: dict[str, Ablation] = {
    "lr": Ablation(
        "learning rate (study: 1e-3 / 1e-4 / 1e-5 → NetVLAD 78.6 / 79.1 / 79.3 R@1)",
        ({"train.lr": 1e-3}, {"train.lr": 1e-4}, {"train.lr": 1e-5}),
    ),
    "train-threshold": Ablation(
        "train positive threshold in metres (hard positives)",
        tuple({"mining.train_positive_m": m} for m in (5.0, 10.0, 15.0, 20.0, 25.0)),
    ),
    "test-threshold": Ablation(
        "test threshold in metres (soft positives; retrains, see `vpr ablation thresholds` for the study's re-scoring)",
        tuple({"mining.test_positive_m": m} for m in (10.0, 20.0, 30.0, 40.0, 50.0)),
    ),
    "augmentation": Ablation(
        "training augmentation: colour jitter, horizontal flip, flip + rotate, random erasing, all",
        (
            {"train.augment.color_jitter": 0.4},
            {"train.augment.horizontal_flip": True},
            {"train.augment.horizontal_flip": True, "train.augment.rotate_deg": 10.0},
            {"train.augment.random_erasing": 0.5},
            {
                "train.augment.color_jitter": 0.4,
                "train.augment.horizontal_flip": True,
                "train.augment.rotate_deg": 10.0,
                "train.augment.random_erasing": 0.5,
            },
        ),
    ),
    "image-scale": Ablation(
        "image scale for training and evaluation", tuple({"train.image_scale": s} for s in (0.5, 0.75, 1.0, 1.25))
    ),
    "clusters": Ablation(
        "NetVLAD/CRN cluster count (not in the study, which keeps 64 at 480×640; a 120×160 "
        "map has only 80 local features)",
        tuple({"model.netvlad_clusters": k} for k in (8, 16, 32, 64)),
    ),
}


def _value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):  # positional, with no exponent: YAML 1.1 reads "1e-05" as a string
        return np.format_float_positional(v, trim="-")
    return str(v)


def experiment_name(ablation: str, head: str, setting: dict[str, object]) -> str:
    """A git-ref-safe experiment name, e.g. ``abl-lr-netvlad-lr-0p001``."""
    parts = []
    for key, value in setting.items():
        leaf = key.rsplit(".", 1)[-1].replace("_", "-")
        parts.append(f"{leaf}-{_value(value).replace('.', 'p').replace('-', 'm')}")
    return f"abl-{ablation}-{head}-" + "-".join(parts)


def queue_commands(ablation: str, head: str) -> list[list[str]]:
    """The ``dvc exp run --queue`` command of every setting of ``ablation`` (targets ``evaluate@HEAD``)."""
    if ablation not in ABLATIONS:
        raise AblationError(f"unknown ablation {ablation!r}; expected one of {', '.join(ABLATIONS)}")
    commands = []
    for setting in ABLATIONS[ablation].settings:
        cmd = ["dvc", "exp", "run", "--queue", "-n", experiment_name(ablation, head, setting)]
        for key, value in setting.items():
            cmd += ["-S", f"{key}={_value(value)}"]
        commands.append(cmd + [f"evaluate@{head}"])
    return commands


def _dvc(cmd: list[str], capture: bool = False) -> str:
    """Run one ``dvc ...`` command line in the current project (``vpr.foundations.dvcrun``); the experiment's own
    length has no bound."""
    try:
        return run_dvc(Path.cwd(), *cmd[1:], capture=capture, timeout=None)
    except DvcError as exc:
        raise AblationError(str(exc)) from exc


def queue_ablation(ablation: str, head: str = "netvlad", *, dry_run: bool = False) -> list[list[str]]:
    """Queue one experiment per setting (nothing runs yet); returns the commands."""
    commands = queue_commands(ablation, head)
    if not dry_run:
        for cmd in commands:
            _dvc(cmd)
    return commands


def run_queue(jobs: int = 1, *, dry_run: bool = False) -> list[list[str]]:
    """Run every queued experiment and wait for them (``dvc exp run --run-all``)."""
    cmd = ["dvc", "exp", "run", "--run-all", "--jobs", str(jobs)]
    if not dry_run:
        _dvc(cmd)
    return [cmd]


def exp_show() -> list:
    """``dvc exp show --json`` of the workspace and every experiment, parsed."""
    return json.loads(_dvc(["dvc", "exp", "show", "--json", "--all-commits"], capture=True) or "[]")


# --------------------------------------------------------------------------- experiment table


def _flatten(d: dict, prefix: str = "") -> dict[str, object]:
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _records(node: dict) -> list[dict]:
    """Depth-first every revision record of a ``dvc exp show --json`` tree (DVC 3 layout)."""
    records = [node]
    for exp in node.get("experiments") or []:
        for rev in exp.get("revs") or []:
            records += _records(rev)
    return records


def experiments(data: list) -> list[dict]:
    """Rows ``{name, rev, params (flat), metrics (file → flat dict)}`` from ``dvc exp show --json``."""
    if not isinstance(data, list):
        raise AblationError("unexpected `dvc exp show --json` output: not a list")
    rows = []
    for top in data:
        for rec in _records(top):
            payload = rec.get("data") or {}
            params = {}
            for file_data in (payload.get("params") or {}).values():
                params.update(_flatten(file_data.get("data") or {}))
            metrics = {path: _flatten(m.get("data") or {}) for path, m in (payload.get("metrics") or {}).items()}
            name = rec.get("name") or rec.get("rev") or "?"
            rows.append({"name": name, "rev": rec.get("rev"), "params": params, "metrics": metrics})
    return rows


def _metric_file(metrics: dict[str, dict], head: str) -> dict:
    for path, values in metrics.items():
        if Path(path).name == f"{head}.json":
            return values
    return {}


def _fmt(v: object) -> str:
    """Like ``cell``, but a small float parameter (a learning rate) keeps its significant digits."""
    if isinstance(v, float) and 0 < abs(v) < 0.1:
        return f"{v:g}"
    return cell(v)


def comparison_table(
    data: list, *, head: str = "netvlad", ablation: str | None = None, recall_at: Sequence[int] = (1, 5, 10, 20)
) -> str:
    """Markdown: one row per experiment (workspace first), the ablations' parameters and ``head``'s Recall@N.

    ``ablation`` keeps the workspace plus the experiments named ``abl-{ablation}-...``.
    """
    rows = experiments(data)
    if ablation is not None:
        if ablation not in ABLATIONS:
            raise AblationError(f"unknown ablation {ablation!r}; expected one of {', '.join(ABLATIONS)}")
        rows = [r for r in rows if r["name"] == "workspace" or str(r["name"]).startswith(f"abl-{ablation}-")]
        keys = sorted({k for s in ABLATIONS[ablation].settings for k in s})
    else:
        keys = sorted({k for ab in ABLATIONS.values() for s in ab.settings for k in s})
    rows = [r for r in rows if _metric_file(r["metrics"], head) or r["name"] == "workspace"]
    seen, unique = set(), []
    for r in rows:  # the workspace and its baseline commit often repeat: keep the first of each name
        if r["name"] not in seen:
            seen.add(r["name"])
            unique.append(r)
    header = ["experiment", *keys, *(f"R@{n}" for n in recall_at), "ms/image"]
    cells = []
    for r in unique:
        m = _metric_file(r["metrics"], head)
        cells.append(
            [
                str(r["name"]),
                *(_fmt(r["params"].get(k)) for k in keys),
                *(_fmt(m.get(f"recall@{n}")) for n in recall_at),
                _fmt(m.get("ms_per_image")),
            ]
        )
    lines = [f"Ablations — head `{head}`" + (f", {ablation}" if ablation else ""), "", *markdown_table(header, cells)]
    if len(unique) <= 1:
        lines += [
            "",
            "No finished experiments yet: queue them with `vpr ablation queue NAME`, run them with `vpr ablation run`.",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- re-scoring at other thresholds


def recall_at_thresholds(
    predictions: pl.DataFrame,
    database_xy: dict[int, tuple[float, float]],
    thresholds: Sequence[float],
    ns: Sequence[int],
) -> dict[float, dict[int, float]]:
    """Recall@N (percent) when a match counts within each threshold, from saved ranked predictions."""
    out: dict[float, dict[int, float]] = {}
    q_xy = predictions.select("utm_east", "utm_north").to_numpy()
    ranked = predictions["prediction_ids"].to_list()
    for t in thresholds:
        first = np.full(len(ranked), math.inf)
        for i, ids in enumerate(ranked):
            if not ids:
                continue
            xy = np.array([database_xy[j] for j in ids])
            hits = np.flatnonzero(np.hypot(xy[:, 0] - q_xy[i, 0], xy[:, 1] - q_xy[i, 1]) <= t)
            if len(hits):
                first[i] = hits[0]
        out[float(t)] = {n: float(100.0 * np.mean(first < n)) if len(ranked) else 0.0 for n in ns}
    return out


def threshold_table(layout: Layout, head: str, thresholds: Sequence[float], ns: Sequence[int]) -> str:
    """Markdown: Recall@N of ``head``'s saved predictions at each test threshold (no retraining)."""
    from vpr.shared.shardio import read_index

    path = layout.predictions(head)
    if not path.exists():
        raise FileNotFoundError(f"predictions not found: {path} (run `vpr evaluate --head {head}` first)")
    preds = pl.read_parquet(path)
    index = read_index(layout.shards_dir)
    xy = {i: (e, n) for i, e, n in index.select("id", "utm_east", "utm_north").iter_rows()}
    ns = [n for n in ns if n <= max((len(p) for p in preds["prediction_ids"].to_list()), default=0)] or list(ns)
    table = recall_at_thresholds(preds, xy, thresholds, ns)
    header = ["test threshold (m)", *(f"R@{n}" for n in ns)]
    cells = [[f"{t:g}", *(cell(rec[n]) for n in ns)] for t, rec in table.items()]
    lines = [
        f"Test-threshold ablation — head `{head}` (re-scored predictions, same model)",
        "",
        *markdown_table(header, cells),
    ]
    return "\n".join(lines) + "\n"
