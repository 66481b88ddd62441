"""Prefect artifacts: the results table, the report and the re-index summary, visible in the UI.

Artifact keys may hold only lowercase letters, digits and dashes (Prefect rejects anything else).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prefect import task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from vpr.foundations.config import Config
from vpr.foundations.layout import Layout
from vpr.foundations.tables import markdown_table

RESULTS_KEY = "train-all-results"
REPORT_KEY = "train-all-report"
REINDEX_KEY = "reindex-summary"
_KEY = re.compile(r"^[a-z0-9-]+$")


def artifact_key(text: str) -> str:
    """A valid artifact key from any text (lowercase, other characters → dashes)."""
    key = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    assert _KEY.match(key), key
    return key


def results_rows(cfg: Config, root: str | Path) -> list[dict]:
    """One row per evaluated model (``metrics/*.json``): trained heads first, then untrained baselines."""
    layout = Layout.from_config(cfg, Path(root))
    rows = []
    names = list(cfg.train.heads) + [f"{h}-untrained" for h in cfg.train.heads]
    for name in names:
        path = layout.metrics_file(name)
        if not path.exists():
            continue
        m = json.loads(path.read_text())
        row = {"model": name, "dim": m.get("descriptor_dim")}
        row.update({f"R@{n}": round(float(m[f"recall@{n}"]), 1) for n in cfg.evaluate.recall_at if f"recall@{n}" in m})
        if "ms_per_image" in m:
            row["ms/img"] = round(float(m["ms_per_image"]), 2)
        rows.append(row)
    return rows


@task(name="publish-results")
def publish_results(cfg: Config, root: str, report_path: str | None = None) -> list[dict]:
    """Table artifact of Recall@N per model, and the report (markdown) when there is one."""
    rows = results_rows(cfg, root)
    create_table_artifact(
        rows,
        key=RESULTS_KEY,
        description=f"Recall@N on the test split (soft positives ≤ {cfg.mining.test_positive_m} m)",
    )
    if report_path and Path(report_path).exists():
        path = Path(report_path)
        text = path.read_text() if path.suffix in (".md", ".txt") else f"Report written to `{path}`."
        create_markdown_artifact(text, key=REPORT_KEY, description="train-all report")
    return rows


def reindex_markdown(summary: dict) -> str:
    lines = [f"# Re-index {summary.get('batch') or ''}".rstrip(), "", summary.get("note", ""), ""]
    if summary.get("added"):
        added = [
            (a["id"], f"`{a['path']}`", a["source"], f"`{a['inbox']}`", "; ".join(a.get("warnings") or ()))
            for a in summary["added"]
        ]
        lines += ["## Added", "", *markdown_table(["id", "path", "source", "from inbox", "warnings"], added)]
        lines.append("")
    if summary.get("rejected"):
        rejected = [
            (f"`{r['inbox']}`", r["reason"], f"`inbox/{r['quarantined']}`" if r["quarantined"] else "(gone)")
            for r in summary["rejected"]
        ]
        lines += ["## Quarantined", "", *markdown_table(["inbox file", "reason", "now at"], rejected)]
        lines.append("")
    if summary.get("releases"):
        lines += ["## Live releases", ""] + [f"- {h}: {v}" for h, v in summary["releases"].items()]
    return "\n".join(lines) + "\n"


@task(name="publish-reindex-summary")
def publish_reindex_summary(summary: dict) -> None:
    create_markdown_artifact(
        reindex_markdown(summary), key=REINDEX_KEY, description="what the re-index added and quarantined"
    )
