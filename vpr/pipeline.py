"""The pipeline's steps, each written once: the function a stage runs, bound to the config and layout.

``dvc.yaml`` says what each stage reads and writes; this table says what it *does*. The CLI commands
(which DVC runs), the Prefect task (``tasks.pipeline.run_stage``), the per-shard encode tasks and the
``train-all`` flow all call ``run_step`` with a stage name (``train@crn``), so a step's arguments are
bound here and nowhere else. Each binder imports its step module inside itself: the stage's code
dependencies are what that binder imports (``tests/test_pipeline.py`` checks ``dvc.yaml`` covers them),
and ``outputs`` is what it writes (checked against ``dvc.yaml``'s outs).
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from vpr.foundations.config import Config
from vpr.foundations.layout import Layout
from vpr.foundations.registry import BASELINE_HEAD, baseline_name


class StepError(Exception):
    """A step refused its input (a damaged shard, a missing checkpoint, ...): one line, no traceback."""


Binder = Callable[..., dict]


@dataclass(frozen=True)
class Step:
    """One stage group of ``dvc.yaml`` (``train`` for ``train@avg``, ``train@gem``, ...).

    ``run`` is the binder, ``(cfg, layout, key, **options) -> summary``: its docstring is the CLI
    command's help, its keyword-only parameters the command's options (``help`` describes them,
    ``arguments`` names those given by position). ``key`` says what the ``@`` part of a stage name is
    (``split``: ``--split``, repeatable; ``head``: ``--head``; ``set``: ``--set``, an extra test set,
    repeatable; ``head-set``: both, as ``netvlad-town2``). ``say`` turns a summary into the
    command's one line on stderr; without it the summary is printed as JSON on stdout.
    """

    name: str
    run: Binder
    outputs: Callable[[Config, Layout, str], list[Path]]  # what it writes (dvc.yaml outs, metrics, plots)
    key: Literal["split", "head", "set", "head-set"] | None = None
    help: dict[str, str] = field(default_factory=dict)
    arguments: tuple[str, ...] = ()
    say: Callable[[dict], str] | None = None
    command: bool = True  # a `vpr` command of its own (the baseline is `vpr evaluate --head avg --untrained`)
    fills_device: bool = False  # one run fills the cores or the GPU: the flow queues these in train_lanes
    # steps that read descriptors: the model they encode with, (head, untrained), and the shards they read
    model: Callable[[Config, str], tuple[str, bool]] | None = None
    shards: Callable[[Config, Layout, str], list[str]] | None = None


def _ingest(cfg: Config, layout: Layout, key: str, *, root: Path | None = None, out: Path | None = None) -> dict:
    """Validate every image once and write the catalog and the rejected list."""
    from vpr.steps.catalog import IngestError, ingest

    try:
        result = ingest(root or layout.data, out or layout.catalog_dir, cfg.ingest)
    except IngestError as exc:
        raise StepError(str(exc)) from None
    return {
        "accepted": result.accepted,
        "rejected": result.rejected,
        "catalog": str(out or layout.catalog_dir),
        "rejected_files": result.rejected_table.head(50).to_dicts(),
    }


def _shard(cfg: Config, layout: Layout, split: str) -> dict:
    """Pack each split's cataloged images into deterministic WebDataset tars plus an id → shard table."""
    from vpr.shared.shardio import ShardError
    from vpr.steps.shards import write_shards

    try:
        index = write_shards(layout.catalog(split), layout.data, layout.split_shards(split), cfg.shards)
    except ShardError as exc:
        raise StepError(str(exc)) from None
    return {"index": str(index)}


def _mine(cfg: Config, layout: Layout, split: str) -> dict:
    """UTM positives per query: hard (≤ train_positive_m) and soft (≤ test_positive_m)."""
    from vpr.steps.mining import mine_all

    return {s: str(p) for s, p in mine_all(layout.catalog(split), layout.mining_dir, cfg.mining, (split,)).items()}


def _train(cfg: Config, layout: Layout, head: str, *, resume: bool = False, nproc: int | None = None) -> dict:
    """Train one head with triplets (UTM positives, descriptor-mined hard negatives)."""
    from vpr.shared.checkpoints import CheckpointError
    from vpr.shared.shardio import ShardError
    from vpr.shared.triplets import TrainingDiverged
    from vpr.steps.launch import LaunchError, train_head_ranks

    if nproc is not None and nproc < 1:
        raise StepError(f"--nproc must be at least 1, got {nproc}")
    rank_argv = ["train", "--head", head, *(["--resume"] * resume)]  # what each torchrun rank runs
    try:
        summary = train_head_ranks(head, cfg, layout, nproc=nproc, resume=resume, rank_argv=rank_argv)
    except (ShardError, CheckpointError, LaunchError, TrainingDiverged) as exc:
        raise StepError(str(exc)) from None
    return {k: v for k, v in summary.items() if k != "history"} | {"epochs_run": len(summary.get("history", []))}


def _evaluate(cfg: Config, layout: Layout, head: str, *, untrained: bool = False) -> dict:
    """Recall@1/5/10/20 on the test split → metrics/HEAD.json and the top-20 predictions table."""
    from vpr.shared.shardio import ShardError
    from vpr.steps.evaluate import evaluate_head

    try:
        return evaluate_head(head, cfg, layout, untrained=untrained)
    except (FileNotFoundError, ValueError, ShardError) as exc:
        raise StepError(str(exc)) from None


def _baseline(cfg: Config, layout: Layout, key: str) -> dict:
    """The untrained base line every head is measured against → metrics/avg-untrained.json."""
    return _evaluate(cfg, layout, BASELINE_HEAD, untrained=True)


def _index(cfg: Config, layout: Layout, key: str, *, head: str | None = None) -> dict:
    """Build a release: FAISS IndexIDMap2 of the database, id → metadata table, model (atomic switch)."""
    from vpr.shared.checkpoints import CheckpointError
    from vpr.shared.shardio import ShardError
    from vpr.steps.index import ReleaseError, build_release

    head = head or cfg.index.head
    try:
        version = build_release(head, cfg, layout)
    except (FileNotFoundError, ReleaseError, ShardError, CheckpointError) as exc:
        raise StepError(str(exc)) from None
    return {"head": head, "version": str(version)}


def _report(cfg: Config, layout: Layout, key: str) -> dict:
    """reports/results.md (the study's table, all heads + untrained baseline) and PNG figures."""
    from vpr.steps.report import write_report

    try:
        return {"report": str(write_report(cfg, layout))}
    except FileNotFoundError as exc:
        raise StepError(str(exc)) from None


def _test_set(cfg: Config, layout: Layout, name: str) -> dict:
    """Ingest, shard and mine an extra test set (its test split) on its own: tested on, never trained on."""
    from vpr.shared.shardio import ShardError
    from vpr.steps.catalog import IngestError, ingest
    from vpr.steps.mining import mine_all
    from vpr.steps.shards import write_shards

    own = layout.test_set(name)
    if not (own.data / "images" / "test").is_dir():
        raise StepError(f"test set {name!r}: no images/test folder in {own.data} (render it with `vpr synth`)")
    try:
        result = ingest(own.data, own.catalog_dir, cfg.ingest)
        index = write_shards(own.catalog("test"), own.data, own.split_shards("test"), cfg.shards)
    except (IngestError, ShardError) as exc:
        raise StepError(f"test set {name!r}: {exc}") from None
    mine_all(own.catalog("test"), own.mining_dir, cfg.mining, ("test",))
    return {"test_set": name, "accepted": result.accepted, "rejected": result.rejected, "index": str(index)}


def _head_and_set(key: str) -> tuple[str, str]:
    """``netvlad-town2`` → (``netvlad``, ``town2``): head names are identifiers, so the first ``-`` splits."""
    head, _, name = key.partition("-")
    return head, name


def _cross_evaluate(cfg: Config, layout: Layout, key: str) -> dict:
    """Recall@N of a trained head on an extra test set → metrics/test-sets/SET/HEAD.json (no retraining)."""
    head, name = _head_and_set(key)
    return _evaluate(cfg, layout.test_set(name), head)


def _evaluation_shards(cfg: Config, layout: Layout, key: str) -> list[str]:
    from vpr.shared.shardio import evaluation_shards  # not the step's module: listing shards needs no torch

    return evaluation_shards(layout)


def _test_set_shards(cfg: Config, layout: Layout, key: str) -> list[str]:
    from vpr.shared.shardio import evaluation_shards

    return evaluation_shards(layout.test_set(_head_and_set(key)[1]))


def _release_shards(cfg: Config, layout: Layout, key: str) -> list[str]:
    from vpr.shared.shardio import release_shards

    return release_shards(cfg, layout)


def _evaluated(layout: Layout, name: str) -> list[Path]:
    return [layout.predictions(name), layout.metrics_file(name)]


STEPS: dict[str, Step] = {
    step.name: step
    for step in (
        Step(
            "ingest",
            _ingest,
            lambda cfg, layout, key: [layout.catalog_dir],
            help={
                "root": "datasets_vg root (images/{split}/{role}/; default: paths.data)",
                "out": "catalog folder ({split}.parquet, rejected.parquet)",
            },
            arguments=("root",),
            say=lambda r: f"catalog: {r['accepted']} images, {r['rejected']} rejected → {r['catalog']}",
        ),
        Step(
            "shard",
            _shard,
            lambda cfg, layout, split: [layout.split_shards(split)],
            key="split",
            say=lambda r: f"shard index → {r['index']}",
        ),
        Step(
            "mine",
            _mine,
            lambda cfg, layout, split: [layout.mining(split)],
            key="split",
            say=lambda r: ", ".join(f"{name} → {path}" for name, path in r.items()),
        ),
        Step(
            "train",
            _train,
            lambda cfg, layout, head: [
                layout.checkpoint(head).parent,
                layout.live_dir(head) / "metrics.json",
                layout.live_dir(head) / "plots/metrics",
            ],
            key="head",
            fills_device=True,
            help={
                "resume": "continue from the last epoch checkpoint",
                "nproc": "data-parallel ranks (default train.nproc)",
            },
        ),
        Step(
            "evaluate",
            _evaluate,
            lambda cfg, layout, head: _evaluated(layout, head),
            key="head",
            help={"untrained": "evaluate the head as built, without training (the baseline)"},
            model=lambda cfg, head: (head, False),
            shards=_evaluation_shards,
        ),
        Step(
            "baseline",
            _baseline,
            lambda cfg, layout, key: _evaluated(layout, baseline_name()),
            command=False,
            model=lambda cfg, key: (BASELINE_HEAD, True),
            shards=_evaluation_shards,
        ),
        Step(
            "test-set",
            _test_set,
            lambda cfg, layout, name: [
                layout.test_set(name).catalog_dir,
                layout.test_set(name).split_shards("test"),
                layout.test_set(name).mining("test"),
            ],
            key="set",
            say=lambda r: f"{r['accepted']} images, {r['rejected']} rejected, shard index → {r['index']}",
        ),
        Step(
            "cross-evaluate",
            _cross_evaluate,
            lambda cfg, layout, key: _evaluated(layout.test_set(_head_and_set(key)[1]), _head_and_set(key)[0]),
            key="head-set",
            model=lambda cfg, key: (_head_and_set(key)[0], False),
            shards=_test_set_shards,
        ),
        Step(
            "index",
            _index,
            lambda cfg, layout, key: [layout.release_dir(cfg.index.head)],
            help={"head": "head to release (default: index.head)"},
            say=lambda r: f"release {r['head']} → {r['version']}",
            model=lambda cfg, key: (cfg.index.head, False),
            shards=_release_shards,
        ),
        Step(
            "report",
            _report,
            lambda cfg, layout, key: [
                layout.reports / "results.md",
                layout.reports / "recall_at_n.csv",
                layout.reports / "recall",
                layout.reports / "figures",
            ],
            say=lambda r: f"report → {r['report']}",
        ),
    )
}


def step_for(stage: str) -> tuple[Step, str]:
    """The step of a stage name and its key: ``train@crn`` → (the train step, ``crn``)."""
    group, _, key = stage.partition("@")
    if group not in STEPS:
        raise KeyError(f"stage {stage!r} has no step in vpr/pipeline.py (known: {', '.join(STEPS)})")
    return STEPS[group], key


_STEP_MODULES = (
    "vpr.steps.catalog",
    "vpr.steps.shards",
    "vpr.steps.mining",
    "vpr.steps.launch",
    "vpr.steps.train",
    "vpr.steps.evaluate",
    "vpr.steps.index",
    "vpr.steps.report",
)
_IMPORT_LOCK = threading.Lock()


def import_steps() -> None:
    """Import every step's module, one thread at a time. The binders import lazily (a CLI command loads
    only what it runs), but a flow runs stages in parallel threads, and two threads starting
    torchvision's import at once fail ("partially initialized module 'torchvision.transforms'"). The step
    modules no longer import torchvision (only ``image_transform`` does, to resize or augment, under a lock)."""
    with _IMPORT_LOCK:
        for name in _STEP_MODULES:
            importlib.import_module(name)


def run_step(stage: str, cfg: Config, layout: Layout, **options: Any) -> dict:
    """Run one stage (``shard@test``, ``report``) with the caller's options (the CLI's ``--resume``)."""
    step, key = step_for(stage)
    return step.run(cfg, layout, key, **options)


def stage_outputs(stage: str, cfg: Config, layout: Layout) -> list[Path]:
    step, key = step_for(stage)
    return step.outputs(cfg, layout, key)


def stage_model(cfg: Config, stage: str) -> tuple[str, bool]:
    """(head, untrained) of the model a descriptor-reading stage encodes with."""
    step, key = step_for(stage)
    if step.model is None:
        raise ValueError(f"stage {stage!r} reads no descriptors")
    return step.model(cfg, key)


def stage_shards(cfg: Config, layout: Layout, stage: str) -> list[str]:
    """The shards a descriptor-reading stage encodes (empty for any other stage)."""
    step, key = step_for(stage)
    return step.shards(cfg, layout, key) if step.shards else []
