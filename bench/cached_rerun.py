"""A cached re-run of ``train-all``: the README's run command again with nothing changed.

Builds the micro project (the tests' city, one short epoch per head) as a git + DVC repository with
this repository's code, runs ``python -m flows.train_all`` once, then, round by round, two cached
re-runs side by side: as shipped (the DVC record is skipped: nothing changed since the last one) and
with the record forced (``.dvc/tmp/vpr-recorded.json`` removed, so ``dvc commit --force`` runs as it
did before). Each run is a fresh process, as a user's would be; wall time from process start.

    .venv/bin/python bench/cached_rerun.py [--rounds 2]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import yaml

from vpr.steps.synth.project import build_micro_project

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = {  # what the flow tests run: one short epoch per head
    "train": {"epochs": 1, "queries_per_epoch": 4, "negatives": 2},
    "orchestration": {"task_retries": 0, "max_workers": 2},
}
STAMP = ".dvc/tmp/vpr-recorded.json"


def _env(root: Path) -> dict:
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(root),
        "PREFECT_HOME": str(root.parent / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "DO_NOT_TRACK": "1",
        "DVC_NO_ANALYTICS": "1",
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@localhost",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@localhost",
    }


def _run(root: Path, *cmd: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), cwd=root, env=_env(root), capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t0


def make_project(root: Path) -> None:
    """The micro city in a git + DVC repository holding this repository's code and dvc.yaml."""
    cfg, _ = build_micro_project(root, OVERRIDES, prepare=False)
    (root / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    for package in ("vpr", "tasks", "flows"):
        shutil.copytree(REPO / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    _run(root, "git", "init", "-q")
    _run(root, sys.executable, "-m", "dvc", "init", "-q")
    _run(root, sys.executable, "-m", "dvc", "add", "-q", "data")
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-qm", "bench project")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="vpr-cached-")) / "project"
    try:
        make_project(root)
        flow = (sys.executable, "-m", "flows.train_all")
        first = _run(root, *flow)

        def skipped() -> float:
            return _run(root, *flow)

        def forced() -> float:
            (root / STAMP).unlink(missing_ok=True)
            return _run(root, *flow)

        times = _common.interleaved({"record skipped": skipped, "record forced": forced}, args.rounds)
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"# {_common.machine()}; micro project, 20 stages; first run {first:.1f} s")
        print("| cached re-run | median s | range s |\n|---|---:|---:|")
        for name, xs in times.items():
            print(f"| {name} | {_common.median(xs):.1f} | {_common.spread(xs)} |")
        ratio = _common.median(times["record forced"]) / _common.median(times["record skipped"])
        print(f"forced / skipped: {ratio:.2f}×; peak RSS of a run (largest child): {rss:.0f} MiB")
    finally:
        shutil.rmtree(root.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
