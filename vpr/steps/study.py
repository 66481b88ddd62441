"""The study's ablations, run and plotted in one go: ``vpr ablation study`` (``make ablations``).

Each ablation of ``vpr.steps.ablation.ABLATIONS`` is a list of settings. For every setting (and seed)
this trains the head on the project's shards with the ablation budget (``profiles/ablations.yaml``
over the project's params) into its own folder, ``<artifacts>/ablations/<experiment>/`` (the
catalog, shards and frozen-trunk cache are the project's, linked; mining, model, predictions and
metrics are the experiment's own), and evaluates it on validation (the kept epoch), the test split
and every extra test set. An experiment whose ``result.json`` matches its config is not run again, so
an interrupted study resumes. The test threshold is also re-scored from the reference model's saved
predictions, as the study did (no retraining).

Per ablation it writes, under ``out`` (``docs/results/ablations/``): ``<name>.md`` (the table and the
params), ``<name>.json`` (the rows), ``<name>-<set>.png`` (Recall@N curves per test set); and
``README.md``: the study's finding beside ours for each (``vpr.steps.findings``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from vpr.foundations.atomic import write_text_atomic
from vpr.foundations.config import Config, parse_config
from vpr.foundations.layout import Layout
from vpr.foundations.registry import head_spec
from vpr.foundations.tables import cell, markdown_table
from vpr.steps.ablation import ABLATIONS, experiment_name, recall_at_thresholds

logger = logging.getLogger(__name__)
NS = (1, 5, 10, 20)
REFERENCE = "reference"  # the budget with no setting changed: the re-scoring model and every table's reference row
AUGMENTATIONS = {
    "color_jitter": "jitter",
    "horizontal_flip": "flip",
    "rotate_deg": "rotate",
    "random_erasing": "erasing",
}


@dataclass(frozen=True)
class Experiment:
    ablation: str
    setting: dict[str, object]
    seed: int

    @property
    def name(self) -> str:
        base = experiment_name(self.ablation, "x", self.setting) if self.setting else REFERENCE
        return f"{base}-seed{self.seed}"

    @property
    def label(self) -> str:
        """``lr=1e-05``; augmentations by their short names (``flip+rotate``)."""
        if self.setting and all(k.startswith("train.augment.") for k in self.setting):
            on = [AUGMENTATIONS[k.rsplit(".", 1)[-1]] for k, v in self.setting.items() if v]
            return "all" if len(on) > 2 else "+".join(on)
        return ", ".join(f"{k.rsplit('.', 1)[-1]}={v}" for k, v in self.setting.items()) or REFERENCE


def _set(raw: dict, dotted: str, value: object) -> None:
    *path, leaf = dotted.split(".")
    for key in path:
        raw = raw.setdefault(key, {})
    raw[leaf] = value


def experiment_config(cfg: Config, budget: dict, exp: Experiment, head: str) -> Config:
    """The project's config, the ablation budget over it, then the setting; only ``head`` (and the
    head it starts from) train; the seed is the experiment's."""
    raw = cfg.model_dump(mode="json")
    for section, values in budget.items():
        raw.setdefault(section, {}).update(values)
    start = head_spec(head).starts_from
    raw["train"]["heads"] = [h for h in (start, head) if h]
    raw["train"]["per_head"] = {}
    raw["train"]["seed"] = exp.seed
    for key, value in exp.setting.items():
        _set(raw, key, value)
    return parse_config(raw)


def _link(target: Path, link: Path) -> None:
    if link.is_symlink() or link.exists():
        return
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(os.path.relpath(target, link.parent), target_is_directory=True)


def experiment_layout(layout: Layout, cfg: Config, name: str) -> Layout:
    """The experiment's folder: the project's catalog, shards and trunk cache linked, all else its own."""
    art = layout.artifacts / "ablations" / name
    exp = Layout(layout.root, layout.data, art, art / "metrics", art / "reports", layout.inbox)
    _link(layout.catalog_dir, exp.catalog_dir)
    _link(layout.shards_dir, exp.shards_dir)
    layout.trunk_cache_dir.mkdir(parents=True, exist_ok=True)
    _link(layout.trunk_cache_dir, exp.trunk_cache_dir)  # content-addressed: experiments share what they can
    for test_set in cfg.evaluate.test_sets:
        _link(layout.test_set(test_set).catalog_dir, exp.test_set(test_set).catalog_dir)
        _link(layout.test_set(test_set).split_shards("test"), exp.test_set(test_set).split_shards("test"))
    return exp


def _digest(cfg: Config) -> str:
    return hashlib.sha256(json.dumps(cfg.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:16]


def run_experiment(cfg: Config, layout: Layout, exp: Experiment, head: str, budget: dict) -> dict:
    """Train and evaluate one setting (or read its earlier result); the table row."""
    from vpr.steps.evaluate import evaluate_head
    from vpr.steps.mining import mine_all
    from vpr.steps.train import train_head

    ecfg = experiment_config(cfg, budget, exp, head)
    elayout = experiment_layout(layout, cfg, _digest(ecfg))  # one folder per config: equal settings run once
    done = elayout.artifacts / "result.json"
    labels = {"ablation": exp.ablation, "setting": exp.setting, "label": exp.label, "experiment": exp.name}
    if done.exists():
        return json.loads(done.read_text()) | labels
    t0 = time.perf_counter()
    for split in ("train", "val", "test"):
        mine_all(elayout.catalog(split), elayout.mining_dir, ecfg.mining, (split,))
    for test_set in ecfg.evaluate.test_sets:
        own = elayout.test_set(test_set)
        mine_all(own.catalog("test"), own.mining_dir, ecfg.mining, ("test",))
    summary = {}
    for name in ecfg.train.heads:
        summary = train_head(name, ecfg, elayout)
    select = f"recall@{ecfg.train.select_by}"
    kept = max(summary["history"], key=lambda e: (e[select], -e["epoch"]))  # the epoch model.pt holds
    row: dict = {
        "ablation": exp.ablation,
        "setting": exp.setting,
        "label": exp.label,
        "seed": exp.seed,
        "experiment": exp.name,
        "config": _digest(ecfg),
        "epochs": len(summary["history"]),
        "kept_epoch": kept["epoch"],
        "val": {n: kept[f"recall@{n}"] for n in NS},
    }
    metrics = evaluate_head(head, ecfg, elayout)
    row["test"] = {n: metrics[f"recall@{n}"] for n in NS}
    row["queries"] = {"test": metrics["queries"]}
    for test_set in ecfg.evaluate.test_sets:
        m = evaluate_head(head, ecfg, elayout.test_set(test_set))
        row[test_set] = {n: m[f"recall@{n}"] for n in NS}
        row["queries"][test_set] = m["queries"]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    write_text_atomic(done, json.dumps(row, indent=1, default=str))
    logger.info("%s: test R@1 %.1f (%.0f s)", exp.name, row["test"][1], row["seconds"])
    return json.loads(done.read_text()) | labels  # as stored (JSON keys), the same whether run now or read back


def rescored_thresholds(cfg: Config, layout: Layout, head: str, budget: dict, thresholds) -> dict[str, dict]:
    """Recall@N of the reference model's saved predictions at each test threshold, per test set."""
    import polars as pl

    from vpr.shared.shardio import read_index

    ref = experiment_layout(layout, cfg, _digest(experiment_config(cfg, budget, Experiment(REFERENCE, {}, 0), head)))
    out = {}
    for name, own in [("test", ref), *((s, ref.test_set(s)) for s in cfg.evaluate.test_sets)]:
        preds = pl.read_parquet(own.predictions(head))
        index = read_index(own.shards_dir, ("test",))
        xy = {i: (e, n) for i, e, n in index.select("id", "utm_east", "utm_north").iter_rows()}
        out[name] = {
            str(t): {str(n): v for n, v in r.items()}
            for t, r in recall_at_thresholds(preds, xy, thresholds, NS).items()
        }
    return out


def experiments_of(ablation: str, seeds: int) -> list[Experiment]:
    """The reference (no setting changed) and every setting of ``ablation``, each for ``seeds`` seeds."""
    settings = [{}, *ABLATIONS[ablation].settings]
    return [Experiment(ablation, dict(s), seed) for s in settings for seed in range(seeds)]


def _table(rows: list[dict], sets: list[str]) -> list[str]:
    header = ["setting", "seed", "epochs", *(f"{s} R@{n}" for s in ["val", *sets] for n in NS)]
    cells = [
        [
            r["label"],
            r["seed"],
            f"{r['kept_epoch']}/{r['epochs']}",
            *(cell(r[s][str(n)]) for s in ["val", *sets] for n in NS),
        ]
        for r in rows
    ]
    return markdown_table(header, cells, right=range(1, len(header)))


def write_ablation(name: str, rows: list[dict], sets: list[str], budget: dict, out: Path, extra: list[str]) -> Path:
    """``<name>.md``, ``<name>.json`` and one Recall@N figure per test set."""
    from vpr.steps.figures import curves_figure

    out.mkdir(parents=True, exist_ok=True)
    figures = []
    for s in sets:
        series = {f"{r['label']} (seed {r['seed']})": {int(n): v for n, v in r[s].items()} for r in rows}
        curves_figure(series, f"{ABLATIONS[name].description.split(' (')[0]} — Recall@N, {s}", out / f"{name}-{s}.png")
        figures.append(f"![{name} on {s}]({name}-{s}.png)")
    lines = [
        f"# Ablation: {name}",
        "",
        ABLATIONS[name].description + ".",
        "",
        f"Budget per experiment (over the project's params): `{json.dumps(budget, sort_keys=True)}`. "
        "`reference` is the budget with no setting changed; `epochs` is the kept epoch (best validation "
        "R@5) of those run. Validation recall is the kept epoch's; test sets are evaluated with the kept model.",
        "",
        *_table(rows, sets),
        *extra,
        "",
        *figures,
        "",
    ]
    write_text_atomic(out / f"{name}.json", json.dumps({"budget": budget, "rows": rows}, indent=1, default=str))
    path = out / f"{name}.md"
    write_text_atomic(path, "\n".join(lines))
    return path


def load_budget(path: str | Path) -> dict:
    return yaml.safe_load(Path(path).read_text()) or {}


THRESHOLDS = (10.0, 20.0, 25.0, 30.0, 40.0, 50.0)


def run_study(
    cfg: Config,
    layout: Layout,
    out: Path,
    *,
    head: str = "netvlad",
    ablations: list[str] | None = None,
    budget: dict | None = None,
    seeds: dict[str, int] | None = None,
) -> list[Path]:
    """Every ablation (or ``ablations``): its experiments, tables, figures, then the findings page."""
    from vpr.steps.findings import FINDINGS, verdicts, write_findings

    budget, seeds = budget or {}, seeds or {}
    sets = ["test", *cfg.evaluate.test_sets]
    written, results = [], {}
    for name in ablations or list(ABLATIONS):
        if name not in ABLATIONS:
            raise ValueError(f"unknown ablation {name!r}; expected one of {', '.join(ABLATIONS)}")
        rows, failed = [], []
        for exp in experiments_of(name, seeds.get(name, 1)):
            try:
                rows.append(run_experiment(cfg, layout, exp, head, budget))
            except ValueError as exc:  # one setting this data cannot train (too few negatives...): say so, go on
                logger.warning("%s (%s): %s", exp.name, exp.label, exc)
                failed.append(f"- `{exp.label}` (seed {exp.seed}) did not run: {exc}")
        extra: list[str] = ["", *failed] if failed else []
        if name == "test-threshold":
            rescored = rescored_thresholds(cfg, layout, head, budget, THRESHOLDS)
            extra = ["", "Re-scored from the reference model's predictions, as the study did (no retraining):", ""]
            for s, table in rescored.items():
                header = [f"{s}: threshold (m)", *(f"R@{n}" for n in NS)]
                extra += [*markdown_table(header, [[t, *(cell(r[str(n)]) for n in NS)] for t, r in table.items()]), ""]
        written.append(write_ablation(name, rows, sets, budget, out, extra))
        results[name] = (rows, verdicts(rows, FINDINGS.get(name, []), cfg.evaluate.test_sets))
    written.append(write_findings(results, budget, head, out))
    return written
