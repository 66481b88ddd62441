"""The ``vpr`` command line: one sub-command per pipeline step (DVC stages call these), made from the
step table (``vpr.pipeline``), plus the commands around the pipeline (synth, locate, api, reindex, ...)."""

from __future__ import annotations

import inspect
import json
import logging
import os
import sys
import typing
from pathlib import Path

import typer

from vpr.foundations.config import ConfigError, load_config
from vpr.foundations.layout import SPLITS
from vpr.foundations.registry import head_names, head_spec
from vpr.pipeline import STEPS, Step

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params.yaml to read")


@app.callback()
def _show_logs(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug messages too"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="warnings and errors only"),
    summary: bool = typer.Option(True, "--summary/--no-summary", hidden=True),  # off in launched ranks
) -> None:
    """The package logger ``vpr`` on stderr (stdout carries results only)."""
    _SUMMARY["print"] = summary
    logger = logging.getLogger("vpr")
    if not any(getattr(h, "vpr_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.vpr_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False  # one copy, not a second through a root handler
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def _config(params: Path):
    try:
        return load_config(params)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def _known_head(head: str) -> None:
    try:
        head_spec(head)
    except ValueError as exc:
        _fail(str(exc))


HEAD_CHOICES = " | ".join(head_names())


_SUMMARY = {"print": True}  # ``--no-summary``: the ranks a launcher started leave the summary to it


def _splits(values: list[str]) -> list[str]:
    bad = [v for v in values if v not in SPLITS]
    if bad:
        raise typer.BadParameter(f"unknown split {bad[0]!r} (expected {', '.join(SPLITS)})")
    return values


def _step_command(step: Step):
    """A sub-command for a step of ``vpr.pipeline``: its options are the binder's keyword-only parameters,
    its help the binder's docstring, and ``--split``/``--head`` name the stage's key."""
    binder = inspect.signature(step.run)
    hints = typing.get_type_hints(step.run)
    params: list[inspect.Parameter] = []
    annotations: dict[str, object] = {}

    def add(name: str, annotation: object, default: object) -> None:
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation))
        annotations[name] = annotation

    if step.key == "split":
        add("split", list[str], typer.Option(list(SPLITS), "--split", help="split(s) to process", callback=_splits))
    elif step.key == "head":
        add("head", str, typer.Option(..., "--head", help=HEAD_CHOICES))
    for name, p in binder.parameters.items():
        if p.kind is not inspect.Parameter.KEYWORD_ONLY:
            continue
        help_text = step.help.get(name)
        flag = f"--{name.replace('_', '-')}"
        maker = typer.Argument(p.default, help=help_text) if name in step.arguments else None
        add(name, hints[name], maker or typer.Option(p.default, flag, help=help_text))
    add("params", Path, ParamsOpt)

    def command(**kwargs) -> None:
        params_path = kwargs.pop("params")
        keys = kwargs.pop("split", None) or [kwargs.pop("head", "")]
        for key in keys:
            if step.key == "head":
                _known_head(key)
            stage = f"{step.name}@{key}" if step.key else step.name
            if kwargs.get("head"):
                _known_head(kwargs["head"])
            summary = _step(stage, params_path, **kwargs)
            if not _SUMMARY["print"] or os.environ.get("RANK", "0") != "0":
                continue  # one summary: the launcher's, or rank 0's
            if step.say is None:
                typer.echo(json.dumps(summary))
            else:
                typer.echo(f"{key}: {step.say(summary)}" if step.key == "split" else step.say(summary), err=True)

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = annotations
    command.__doc__ = step.run.__doc__
    command.__name__ = step.name
    return command


def _step(stage: str, params: Path, **options) -> dict:
    """Run a stage of the step table (``vpr.pipeline``) on this project; a refused input exits 1."""
    cfg = _config(params)
    from vpr.foundations.layout import Layout
    from vpr.pipeline import StepError, run_step

    try:
        return run_step(stage, cfg, Layout.from_config(cfg), **options)
    except StepError as exc:
        _fail(str(exc))
        raise  # unreachable: _fail exits


for _one in STEPS.values():
    if _one.name != "baseline":  # the baseline is `vpr evaluate --head avg --untrained`
        app.command(name=_one.name)(_step_command(_one))


@app.command()
def synth(
    out_root: Path = typer.Argument(..., help="datasets_vg root to create"),
    params: Path = ParamsOpt,
    seed: int | None = typer.Option(None, help="override synth.seed"),
) -> None:
    """Render the deterministic synthetic city as a datasets_vg tree."""
    cfg = _config(params).synth
    from vpr.steps.synth import generate_city

    if seed is not None:
        cfg = cfg.model_copy(update={"seed": seed})
    summary = generate_city(out_root, cfg)
    typer.echo(json.dumps(summary))


@app.command()
def locate(
    images: list[Path] = typer.Argument(..., help="photos to locate"),
    head: str | None = typer.Option(None, "--head", help="release to answer from (default: index.head)"),
    top_k: int | None = typer.Option(None, "--top-k", "-k", help="matches per image (default: locate.top_k)"),
    as_json: bool = typer.Option(False, "--json", help="print JSON instead of tables"),
    release: Path | None = typer.Option(None, "--release", help="release folder (default: from params)"),
    api_url: str | None = typer.Option(None, "--api", envvar="VPR_API_URL", help="ask a running `vpr api` at URL"),
    params: Path = ParamsOpt,
) -> None:
    """Where was each photo taken? Top-K database matches and an estimated position with a confidence.

    Exit status 1 when any image could not be answered (each such image gets its own error entry).
    """
    cfg = _config(params)
    k = cfg.locate.top_k if top_k is None else top_k  # 0 is an error, not the default
    if k <= 0:
        _fail("--top-k must be positive")
    if api_url:  # a running service answers: no torch import, no model load
        from vpr.steps.api.client import ApiError, locate_remote

        try:
            return _print_or_dump(locate_remote(api_url, images, k, cfg.locate), as_json)
        except ApiError as exc:
            _fail(str(exc))
    from vpr.foundations.layout import Layout
    from vpr.shared.checkpoints import CheckpointError
    from vpr.shared.release import ReleaseError
    from vpr.steps.locate import locate as run_locate

    release_dir = release or Layout.from_config(cfg).release_dir(head or cfg.index.head)
    try:
        results = run_locate(
            images,
            release_dir,
            k,
            max_pixels=cfg.locate.max_pixels,
            max_bytes=cfg.locate.max_file_bytes,
            device=cfg.train.device,
            batch_size=cfg.evaluate.batch_size,
        )
    except (ReleaseError, CheckpointError) as exc:
        _fail(str(exc))
    _print_or_dump(results, as_json)


def _print_or_dump(results: list[dict], as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(results, indent=2))
    else:
        from vpr.foundations.tables import print_locations

        print_locations(results)
    if not all(r["ok"] for r in results):
        raise typer.Exit(1)


@app.command()
def api(
    host: str | None = typer.Option(None, "--host", help="address to listen on (default: api.host)"),
    port: int | None = typer.Option(None, "--port", help="port (default: api.port; 0 = any free port)"),
    head: str | None = typer.Option(None, "--head", help="release to serve (default: index.head)"),
    params: Path = ParamsOpt,
) -> None:
    """Serve the live release over HTTP (page at /, OpenAPI docs at /docs); new releases are swapped in."""
    from vpr.steps.api.serve import ReleaseError, serve

    try:
        serve(_config(params), head=head, host=host, port=port)
    except ReleaseError as exc:
        _fail(str(exc))


@app.command()
def reindex(params: Path = ParamsOpt) -> None:
    """Add new imagery from the inbox to the shards, catalog and live release (bad files quarantined).

    The same logic as the scheduled Prefect flow ``reindex`` (which also records the change in DVC).
    """
    cfg = _config(params)
    from vpr.foundations.layout import Layout
    from vpr.steps.reindex import ReindexError, run_reindex

    try:
        result = run_reindex(cfg, Layout.from_config(cfg))
    except ReindexError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(result.to_dict(), indent=2, default=str))


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
        _fail(str(exc))


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
        _fail(str(exc))


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
        _fail(str(exc))
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
    cfg = _config(params)
    from vpr.foundations.layout import Layout
    from vpr.steps.ablation import threshold_table

    layout = Layout.from_config(cfg)
    try:
        typer.echo(threshold_table(layout, head, thresholds, cfg.evaluate.recall_at))
    except FileNotFoundError as exc:
        _fail(str(exc))


@app.command()
def profile(
    name: str = typer.Argument(..., help="profile name: a file profiles/NAME.yaml (cpu, paper)"),
    params: Path = ParamsOpt,
) -> None:
    """Switch params.yaml to a named profile (e.g. `paper`: 480×640, the study's Pitts30k settings)."""
    from vpr.foundations.config import ConfigError
    from vpr.foundations.profiles import apply_profile

    try:
        apply_profile(name, params)
    except ConfigError as exc:
        _fail(str(exc))
    typer.echo(f"params.yaml ← profiles/{name}.yaml", err=True)


@app.command()
def weights(
    fetch: bool = typer.Option(False, "--fetch", help="download the ImageNet weights now if not cached"),
    params: Path = ParamsOpt,
) -> None:
    """Where the backbone's weights come from (model.weights); `--fetch` downloads torchvision's ImageNet file."""
    from vpr.shared.models.weights import WeightsUnavailable, describe, fetch_imagenet

    typer.echo(describe(_config(params).model.weights))
    if fetch:
        try:
            typer.echo(f"fetched:       {fetch_imagenet()}")
        except WeightsUnavailable as exc:
            _fail(f"cannot fetch the ImageNet weights: {exc}")


@app.command()
def check(
    root: Path = typer.Argument(..., help="a datasets_vg root (images/<split>/<role>/...)"),
    as_json: bool = typer.Option(False, "--json", help="the report as JSON"),
    params: Path = ParamsOpt,
) -> None:
    """What ingest would accept and reject, split sizes, unmatched queries, and the cost: nothing written."""
    from vpr.steps.catalog import IngestError
    from vpr.steps.check import check_tree, render

    cfg = _config(params)
    try:
        report = check_tree(root, cfg)
    except IngestError as exc:
        _fail(str(exc))
    typer.echo(json.dumps(report.to_dict(), indent=1) if as_json else render(report, cfg))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
