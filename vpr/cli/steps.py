"""The pipeline's step commands, made from the step table (``vpr.pipeline``): one per stage group.

A binder's docstring is the command's help, its keyword-only parameters the command's options;
``--split``, ``--head`` and ``--set`` name the stage's key.
"""

from __future__ import annotations

import errno
import inspect
import json
import os
import typing
from pathlib import Path

import typer

from vpr.cli.base import HEAD_CHOICES, SUMMARY, ParamsOpt, app, config_or_exit, fail, known_head
from vpr.foundations.layout import SPLITS
from vpr.pipeline import STEPS, Step


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
    if step.key in ("head", "head-set"):
        add("head", str, typer.Option(..., "--head", help=HEAD_CHOICES))
    if step.key in ("set", "head-set"):
        add(
            "test_set",
            list[str] | None,
            typer.Option(None, "--set", help="extra test set(s) (default: evaluate.test_sets)"),
        )
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
        for key in _keys(step, kwargs, params_path):
            stage = f"{step.name}@{key}" if step.key else step.name
            if kwargs.get("head"):
                known_head(kwargs["head"])
            summary = _step(stage, params_path, **kwargs)
            if not SUMMARY["print"] or os.environ.get("RANK", "0") != "0":
                continue  # one summary: the launcher's, or rank 0's
            if step.say is None:
                typer.echo(json.dumps(summary))
            else:
                typer.echo(
                    f"{key}: {step.say(summary)}" if step.key in ("split", "set") else step.say(summary), err=True
                )

    command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    command.__annotations__ = annotations
    command.__doc__ = step.run.__doc__
    command.__name__ = step.name
    return command


def _keys(step: Step, options: dict, params: Path) -> list[str]:
    """The stage keys a command runs (``--split``/``--head``/``--set`` taken out of ``options``)."""
    splits, head, sets = options.pop("split", None), options.pop("head", None), options.pop("test_set", None)
    if step.key in ("set", "head-set"):
        sets = sets or config_or_exit(params).evaluate.test_sets
        if not sets:
            fail("no test set: name one with --set, or list them in evaluate.test_sets")
    if head is not None:
        known_head(head)
    if step.key == "split":
        return splits
    if step.key == "head":
        return [head]
    if step.key == "set":
        return sets
    if step.key == "head-set":
        return [f"{head}-{name}" for name in sets]
    return [""]


def _step(stage: str, params: Path, **options) -> dict:
    """Run a stage of the step table (``vpr.pipeline``) on this project; a refused input exits 1."""
    cfg = config_or_exit(params)
    from vpr.foundations.layout import Layout
    from vpr.pipeline import StepError, run_step

    try:
        return run_step(stage, cfg, Layout.from_config(cfg), **options)
    except StepError as exc:
        fail(str(exc))
        raise  # unreachable: fail() exits
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        where = f" writing {exc.filename}" if exc.filename else ""
        fail(f"{stage}: no space left on the device{where}; nothing half-written was published (free space, run again)")
        raise  # unreachable: fail() exits


for _one in STEPS.values():
    if _one.command:
        app.command(name=_one.name)(_step_command(_one))
