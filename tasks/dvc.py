"""Record what a flow produced in DVC, so ``dvc status`` is clean and ``dvc repro`` has nothing to do."""

from __future__ import annotations

from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from tasks.cache import stage_specs
from vpr.foundations.dvcrun import run_dvc


def stages_writing(root: str | Path, paths: list[str | Path]) -> list[str]:
    """The ``dvc.yaml`` stages whose outputs contain (or are) one of ``paths``."""
    root = Path(root).resolve()
    wanted = [(root / p).resolve() for p in paths]
    found = []
    for name, spec in stage_specs(root).items():
        outs = [(root / o).resolve() for o in spec.outs]
        if any(w == o or o in w.parents for w in wanted for o in outs):
            found.append(name)
    return found


@task(name="record-in-dvc", retries=2, retry_delay_seconds=5)
def record_in_dvc(root: str, stages: list[str], data: bool = True) -> dict:
    """``dvc commit --force`` the given stages (and ``data.dvc``): dvc.lock now describes the files.

    Only stages that ``dvc.yaml`` defines are committed. Skipped (with a warning) outside a DVC
    repository. ``data``: also re-record ``data.dvc`` when it exists (the raw imagery may have changed).
    The DVC command line runs in a subprocess: DVC resolves paths against the working directory, and
    holds its repository lock only for that command.
    """
    logger = get_run_logger()
    root_path = Path(root).resolve()
    if not (root_path / ".dvc").is_dir():
        logger.warning("%s is not a DVC repository: outputs not recorded (run `dvc init`)", root_path)
        return {"recorded": [], "skipped": "not a DVC repository"}
    known = stage_specs(root_path)
    targets = [s for s in stages if s in known]
    unknown = [s for s in stages if s not in known]
    if unknown:
        logger.info("not in dvc.yaml, not recorded: %s", ", ".join(unknown))
    if data and (root_path / "data.dvc").exists():
        targets.insert(0, "data.dvc")
    if targets:
        run_dvc(root_path, "commit", "--force", "--quiet", *targets)
    logger.info("recorded in dvc.lock: %s", ", ".join(targets) or "nothing")
    return {"recorded": targets}
