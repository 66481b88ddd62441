"""Training history through dvclive: per-epoch values that ``dvc plots`` draws and ``dvc exp show`` lists.

The folder (``artifacts/live/<head>``) holds dvclive's own layout: ``metrics.json`` (the last epoch)
and ``plots/metrics/{train,val}/<name>.tsv`` (one row per epoch, ``step`` = epoch). The full history
lives in the resumable checkpoint; every epoch it is replayed into a fresh dvclive folder beside the
target and each file is moved into place with one rename, so a reader never sees a half-written file
and a resumed run writes exactly what an uninterrupted one would (no timestamps are logged). Writers
of one folder take turns under a lock; the one holding it removes staging folders that a killed writer
left behind.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

# history key → dvclive metric name (train/…, val/…)
METRICS = {
    "loss": "train/loss",
    "seconds": "train/seconds",
    "images_per_s": "train/images_per_s",
    "recall@1": "val/recall@1",
    "recall@5": "val/recall@5",
    "recall@10": "val/recall@10",
    "recall@20": "val/recall@20",
}


def write_history(history: list[dict], live_dir: str | Path) -> Path:
    """Write every epoch of ``history`` (dicts with ``epoch`` and the ``METRICS`` keys) as a dvclive folder."""
    live_dir = Path(live_dir)
    live_dir.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(live_dir.parent / f".{live_dir.name}.lock"):
        for stale in live_dir.parent.glob(f".{live_dir.name}.*"):
            if stale.is_dir() and not stale.is_symlink():  # a killed writer's staging (the lock is a file)
                shutil.rmtree(stale, ignore_errors=True)
        staging = Path(tempfile.mkdtemp(dir=live_dir.parent, prefix=f".{live_dir.name}."))
        try:
            _replay(history, staging)
            written = {p.relative_to(staging) for p in staging.rglob("*") if p.is_file()}
            for rel in sorted(written):
                (live_dir / rel).parent.mkdir(parents=True, exist_ok=True)
                os.replace(staging / rel, live_dir / rel)
            for old in [p for p in live_dir.rglob("*") if p.is_file() and p.relative_to(live_dir) not in written]:
                old.unlink()  # a metric that is no longer logged: after the new files are in place
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return live_dir


def _replay(history: list[dict], folder: Path) -> None:
    """dvclive's own writers (``Metric`` rows, ``dump_json`` summary), without ``Live``: its start-up
    looks for a DVC repository from the working directory, runs ``dvc init`` in an enclosing git
    repository that has none, and fails in a git repository without commits."""
    from dvclive.plots import Metric  # imports dvclive: only when a history is written
    from dvclive.serialize import dump_json

    metrics = {key: Metric(name, str(folder / "plots")) for key, name in METRICS.items()}
    for row in history:
        for key, metric in metrics.items():
            metric.step = int(row["epoch"])
            metric.dump(float(row[key]))
    summary: dict = {}  # the last epoch, nested as dvclive nests it (train/loss → {"train": {"loss": …}})
    if history:
        last = history[-1]
        for key, name in METRICS.items():
            group, leaf = name.split("/")
            summary.setdefault(group, {})[leaf] = float(last[key])
        summary["step"] = int(last["epoch"])
    dump_json(summary, folder / "metrics.json")
