"""The ``vpr`` command line: one sub-command per pipeline step (DVC stages call these)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from vpr.config import ConfigError, load_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params.yaml to read")


def _config(params: Path):
    try:
        return load_config(params)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


@app.command()
def synth(
    out_root: Path = typer.Argument(..., help="datasets_vg root to create"),
    params: Path = ParamsOpt,
    seed: Optional[int] = typer.Option(None, help="override synth.seed"),
) -> None:
    """Render the deterministic synthetic city as a datasets_vg tree."""
    cfg = _config(params).synth
    from vpr.synth import generate_city

    if seed is not None:
        cfg = cfg.model_copy(update={"seed": seed})
    summary = generate_city(out_root, cfg)
    typer.echo(json.dumps(summary))


@app.command()
def ingest(
    root: Path = typer.Argument(..., help="datasets_vg root (ROOT/images/{split}/{role}/*.jpg)"),
    out: Path = typer.Option(..., "--out", help="folder for catalog.parquet and rejected.parquet"),
    params: Path = ParamsOpt,
) -> None:
    """Validate every image once and write the catalog and the rejected list."""
    cfg = _config(params)
    from vpr.catalog import IngestError, ingest as run_ingest

    try:
        result = run_ingest(root, out, cfg.ingest)
    except IngestError as exc:
        _fail(str(exc))
    typer.echo(f"catalog: {result.accepted} images, {result.rejected} rejected → {out}", err=True)


@app.command()
def shard(
    catalog: Path = typer.Option(None, help="catalog.parquet (default: from params paths)"),
    data_root: Path = typer.Option(None, help="datasets_vg root the catalog paths are relative to"),
    out: Path = typer.Option(None, help="shards folder"),
    params: Path = ParamsOpt,
) -> None:
    """Pack the catalog's images into deterministic WebDataset tars plus an id → shard table."""
    cfg = _config(params)
    from vpr.layout import Layout
    from vpr.shards import ShardError, write_shards

    layout = Layout.from_config(cfg)
    try:
        index = write_shards(catalog or layout.catalog, data_root or layout.data, out or layout.shards_dir,
                             cfg.shards)
    except ShardError as exc:
        _fail(str(exc))
    typer.echo(f"shard index → {index}", err=True)


@app.command()
def mine(
    catalog: Path = typer.Option(None, help="catalog.parquet"),
    split: list[str] = typer.Option(["train", "val", "test"], help="split(s) to mine"),
    out: Path = typer.Option(None, help="output folder ({split}.parquet per split)"),
    params: Path = ParamsOpt,
) -> None:
    """UTM positives per query: hard (≤ train_positive_m) and soft (≤ test_positive_m)."""
    cfg = _config(params)
    from vpr.layout import Layout
    from vpr.mining import mine_all

    layout = Layout.from_config(cfg)
    written = mine_all(catalog or layout.catalog, out or layout.mining_dir, cfg.mining, tuple(split))
    for s, path in written.items():
        typer.echo(f"{s} → {path}", err=True)


@app.command()
def train(
    head: str = typer.Option(..., "--head", help="avg | gem | netvlad | crn"),
    resume: bool = typer.Option(False, "--resume", help="continue from the last epoch checkpoint"),
    params: Path = ParamsOpt,
) -> None:
    """Train one head with triplets (UTM positives, descriptor-mined hard negatives)."""
    cfg = _config(params)
    from vpr.config import HEADS
    from vpr.layout import Layout
    from vpr.train import train_head

    if head not in HEADS:
        _fail(f"unknown head {head!r}; expected one of {', '.join(HEADS)}")
    summary = train_head(head, cfg, Layout.from_config(cfg), resume=resume)
    typer.echo(json.dumps({k: v for k, v in summary.items() if k != "history"}))


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
