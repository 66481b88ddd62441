"""``vpr ablation ...``: the study's ablations as queued ``dvc exp`` runs, and their tables."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from vpr.cli.base import ParamsOpt, app, config_or_exit, fail

ablation_app = typer.Typer(no_args_is_help=True, help="The study's ablations as queued `dvc exp` runs.")
app.add_typer(ablation_app, name="ablation")


@ablation_app.command("list")
def ablation_list() -> None:
    """The ablations and the parameter values each one queues."""
    from vpr.steps.ablation import ABLATIONS

    for name, ab in ABLATIONS.items():
        settings = "; ".join(" ".join(f"{k}={v}" for k, v in s.items()) for s in ab.settings)
        typer.echo(f"{name:16s} {ab.description}\n{'':16s} {settings}")


@ablation_app.command("queue")
def ablation_queue(
    name: str = typer.Argument(
        ..., help="lr | train-threshold | test-threshold | augmentation | image-scale | clusters"
    ),
    head: str = typer.Option("netvlad", "--head", help="the head each experiment trains and evaluates"),
    run: bool = typer.Option(False, "--run", help="also start the queue and wait (dvc exp run --run-all)"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the dvc commands only"),
) -> None:
    """Queue one `dvc exp run --queue -S key=value` experiment per setting of an ablation."""
    from vpr.steps.ablation import AblationError, queue_ablation, run_queue

    try:
        for cmd in queue_ablation(name, head, dry_run=dry_run):
            typer.echo(" ".join(cmd))
        if run:
            for cmd in run_queue(dry_run=dry_run):
                typer.echo(" ".join(cmd))
    except AblationError as exc:
        fail(str(exc))


@ablation_app.command("run")
def ablation_run(
    jobs: int = typer.Option(1, "--jobs", "-j", help="parallel queue workers"),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the dvc command only"),
) -> None:
    """Run every queued experiment and wait (dvc exp run --run-all)."""
    from vpr.steps.ablation import AblationError, run_queue

    try:
        for cmd in run_queue(jobs=jobs, dry_run=dry_run):
            typer.echo(" ".join(cmd))
    except AblationError as exc:
        fail(str(exc))


@ablation_app.command("table")
def ablation_table(
    name: str | None = typer.Argument(None, help="only this ablation's experiments"),
    head: str = typer.Option("netvlad", "--head", help="whose metrics file to compare"),
    out: Path | None = typer.Option(None, "--out", help="also write the markdown here"),
    exp_json: Path | None = typer.Option(
        None, "--from-json", help="read `dvc exp show --json` output from this file instead of running it"
    ),
) -> None:
    """Finished experiments (dvc exp show --json) → a markdown comparison table like the study's."""
    from vpr.steps.ablation import AblationError, comparison_table, exp_show

    try:
        data = json.loads(exp_json.read_text()) if exp_json else exp_show()
        text = comparison_table(data, head=head, ablation=name)
    except AblationError as exc:
        fail(str(exc))
    if out:
        from vpr.foundations.atomic import write_text_atomic

        write_text_atomic(out, text)
    typer.echo(text)


@ablation_app.command("thresholds")
def ablation_thresholds(
    head: str = typer.Option("netvlad", "--head", help="whose predictions to re-score"),
    thresholds: list[float] = typer.Option([10.0, 20.0, 25.0, 30.0, 40.0, 50.0], "--threshold", "-t"),
    params: Path = ParamsOpt,
) -> None:
    """Test-threshold ablation without retraining: Recall@N at each distance from saved predictions."""
    cfg = config_or_exit(params)
    from vpr.foundations.layout import Layout
    from vpr.steps.ablation import threshold_table

    layout = Layout.from_config(cfg)
    try:
        typer.echo(threshold_table(layout, head, thresholds, cfg.evaluate.recall_at))
    except FileNotFoundError as exc:
        fail(str(exc))


@ablation_app.command("study")
def ablation_study(
    names: list[str] = typer.Argument(None, help="ablations to run (default: all of `vpr ablation list`)"),
    params: Path = ParamsOpt,
) -> None:
    """Run every ablation at the `ablation` budget of params.yaml: tables, curves and the findings page."""
    from vpr.foundations.layout import Layout
    from vpr.steps.study import run_study

    cfg = config_or_exit(params)
    ab = cfg.ablation
    try:
        paths = run_study(
            cfg, Layout.from_config(cfg), Path(ab.out), head=ab.head, ablations=names or None, budget=ab.budget,
            seeds=ab.seeds,
        )  # fmt: skip
    except (ValueError, FileNotFoundError) as exc:
        fail(str(exc))
    for path in paths:
        typer.echo(str(path))
