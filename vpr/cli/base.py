"""What every ``vpr`` command shares: the app, ``--params``, logging, one-line errors, head names."""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import typer

from vpr.foundations.config import ConfigError, load_config
from vpr.foundations.registry import head_names, head_spec

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Visual place recognition as a data pipeline: one command per pipeline step (DVC stages call "
    "these), made from the step table (vpr.pipeline), plus the commands around it.",
)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", "-p", help="params.yaml to read")
SUMMARY = {"print": True}  # ``--no-summary``: the ranks a launcher started leave the summary to it


@app.callback()
def _show_logs(
    verbose: bool = typer.Option(False, "--verbose", "-v", help="debug messages too"),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="warnings and errors only"),
    summary: bool = typer.Option(True, "--summary/--no-summary", hidden=True),  # off in launched ranks
) -> None:
    """The package logger ``vpr`` on stderr (stdout carries results only)."""
    SUMMARY["print"] = summary
    logger = logging.getLogger("vpr")
    if not any(getattr(h, "vpr_cli", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler.vpr_cli = True  # type: ignore[attr-defined]
        logger.addHandler(handler)
        logger.propagate = False  # one copy, not a second through a root handler
    logger.setLevel(logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO)


def config_or_exit(params: Path):
    """The validated config, or exit 2 with the error naming the key."""
    try:
        return load_config(params)
    except ConfigError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def fail(message: str) -> None:
    """One line on stderr and exit 1 (no traceback for a refused input)."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def known_head(head: str) -> None:
    """Exit 1 naming the registered heads when ``head`` is not one."""
    try:
        head_spec(head)
    except ValueError as exc:
        fail(str(exc))


HEAD_CHOICES = " | ".join(head_names())
