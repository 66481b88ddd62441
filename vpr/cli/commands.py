"""The commands around the pipeline: render the city, answer photos, serve, re-index, profiles, checks."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from vpr.cli.base import ParamsOpt, app, config_or_exit, fail


@app.command()
def synth(
    out_root: Path = typer.Argument(..., help="datasets_vg root to create"),
    params: Path = ParamsOpt,
    seed: int | None = typer.Option(None, help="override synth.seed"),
) -> None:
    """Render the deterministic synthetic city as a datasets_vg tree."""
    cfg = config_or_exit(params).synth
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
    cfg = config_or_exit(params)
    k = cfg.locate.top_k if top_k is None else top_k  # 0 is an error, not the default
    if k <= 0:
        fail("--top-k must be positive")
    if api_url:  # a running service answers: no torch import, no model load
        from vpr.steps.api.client import ApiError, locate_remote

        try:
            return _print_or_dump(locate_remote(api_url, images, k, cfg.locate), as_json)
        except ApiError as exc:
            fail(str(exc))
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
        fail(str(exc))
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
        serve(config_or_exit(params), head=head, host=host, port=port)
    except ReleaseError as exc:
        fail(str(exc))


@app.command()
def reindex(params: Path = ParamsOpt) -> None:
    """Add new imagery from the inbox to the shards, catalog and live release (bad files quarantined).

    The same logic as the scheduled Prefect flow ``reindex`` (which also records the change in DVC).
    """
    cfg = config_or_exit(params)
    from vpr.foundations.layout import Layout
    from vpr.steps.reindex import ReindexError, run_reindex

    try:
        result = run_reindex(cfg, Layout.from_config(cfg))
    except ReindexError as exc:
        fail(str(exc))
    typer.echo(json.dumps(result.to_dict(), indent=2, default=str))


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
        fail(str(exc))
    typer.echo(f"params.yaml ← profiles/{name}.yaml", err=True)


@app.command()
def weights(
    fetch: bool = typer.Option(False, "--fetch", help="download the ImageNet weights now if not cached"),
    params: Path = ParamsOpt,
) -> None:
    """Where the backbone's weights come from (model.weights); `--fetch` downloads torchvision's ImageNet file."""
    from vpr.shared.models.weights import WeightsUnavailable, describe, fetch_imagenet

    typer.echo(describe(config_or_exit(params).model.weights))
    if fetch:
        try:
            typer.echo(f"fetched:       {fetch_imagenet()}")
        except WeightsUnavailable as exc:
            fail(f"cannot fetch the ImageNet weights: {exc}")


@app.command()
def check(
    root: Path = typer.Argument(..., help="a datasets_vg root (images/<split>/<role>/...)"),
    as_json: bool = typer.Option(False, "--json", help="the report as JSON"),
    params: Path = ParamsOpt,
) -> None:
    """What ingest would accept and reject, split sizes, unmatched queries, and the cost: nothing written."""
    from vpr.steps.catalog import IngestError
    from vpr.steps.check import check_tree, render

    cfg = config_or_exit(params)
    try:
        report = check_tree(root, cfg)
    except IngestError as exc:
        fail(str(exc))
    typer.echo(json.dumps(report.to_dict(), indent=1) if as_json else render(report, cfg))
