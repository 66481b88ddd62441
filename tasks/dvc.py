"""Record what a flow produced in DVC, so ``dvc status`` is clean and ``dvc repro`` has nothing to do."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from prefect import task
from prefect.logging import get_run_logger

from tasks.cache import stage_specs
from vpr.foundations.atomic import write_text_atomic
from vpr.foundations.dvcrun import run_dvc

STAMP = Path(".dvc/tmp/vpr-recorded.json")  # DVC's own scratch folder: never versioned


def record_signature(root: Path, targets: list[str]) -> str:
    """What a record covers, by file metadata as DVC's own state does (path, size, mtime, inode):
    dvc.yaml, params.yaml, dvc.lock, data.dvc and every dependency and output file of ``targets``."""
    specs = stage_specs(root)
    paths = {"dvc.yaml", "params.yaml", "dvc.lock", "data.dvc"}
    for name in targets:
        if name in specs:
            paths |= set(specs[name].deps) | set(specs[name].outs)
    digest = hashlib.sha256(json.dumps(sorted(targets)).encode())

    def add(path: Path) -> None:
        try:
            st = path.stat()
        except FileNotFoundError:
            digest.update(f"{path.relative_to(root)} missing\n".encode())
            return
        digest.update(f"{path.relative_to(root)} {st.st_size} {st.st_mtime_ns} {st.st_ino}\n".encode())

    for rel in sorted(paths):
        top = root / rel
        if not top.is_dir():
            add(top)
            continue
        for dirpath, dirnames, filenames in os.walk(top):
            dirnames.sort()
            for name in sorted(filenames):
                add(Path(dirpath) / name)
    return digest.hexdigest()


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
    holds its repository lock only for that command. When no file of the stages (and no DVC file)
    changed since the last record (``record_signature``, kept in ``.dvc/tmp``), nothing is run: a
    cached re-run costs a walk of file metadata, not a ``dvc commit``.
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
    if not targets:
        logger.info("recorded in dvc.lock: nothing")
        return {"recorded": []}
    stamp = root_path / STAMP
    if stamp.is_file() and stamp.read_text().strip() == record_signature(root_path, targets):
        logger.info("dvc.lock is current: no file of %d stage(s) changed since the last record", len(targets))
        return {"recorded": [], "current": targets}
    run_dvc(root_path, "commit", "--force", "--quiet", *targets)
    write_text_atomic(stamp, record_signature(root_path, targets) + "\n")
    logger.info("recorded in dvc.lock: %s", ", ".join(targets))
    return {"recorded": targets}
