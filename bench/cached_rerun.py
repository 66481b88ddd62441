"""A cached re-run of ``train-all``: the README's run command again with nothing changed.

Builds the micro project (the tests' city, one short epoch per head) as a git + DVC repository with
this repository's code, runs ``python -m flows.train_all`` once and once more (the first re-run, not
timed: it fills the file-hash memo with the outputs the first run had only just written), then, round
by round, cached re-runs side by side, each a fresh process as a user's would be, wall time from
process start:

* ``this tree``: as shipped (every stage a cache hit, the DVC record skipped: nothing changed);
* ``record forced``: the same with ``.dvc/tmp/vpr-recorded.json`` removed, so ``dvc commit --force``
  runs (``--no-forced`` leaves it out);
* ``baseline``: with ``--baseline DIR``, a second project built the same way from the code of another
  checkout (``git worktree add /tmp/base main``), so two versions are timed in one run on one machine;
* ``server running``: with ``--server``, this tree's re-run against a Prefect server started once
  beforehand (``PREFECT_API_URL``, what ``make up`` gives), so no temporary server is started.

Then, per project, the 20 stages' cache keys alone in a fresh process (``tasks.cache.stage_key``, after
``stage_specs``): what the file-hash memo saves (it is kept across processes in this tree).

Each run's phases come from its log's timestamps: Python and imports (to "Starting temporary server"),
the server's start (to the flow run's first line), the flow until its first stage starts, the 20
stages, and the rest (results table, DVC record, the server's stop, exit).

    .venv/bin/python bench/cached_rerun.py [--rounds 2] [--baseline DIR] [--no-forced] [--server]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
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
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",  # a busy machine's first start (migrations)
        "GIT_AUTHOR_NAME": "bench",
        "GIT_AUTHOR_EMAIL": "bench@localhost",
        "GIT_COMMITTER_NAME": "bench",
        "GIT_COMMITTER_EMAIL": "bench@localhost",
    }


def _run_logged(root: Path, *cmd: str) -> tuple[float, dict[str, float]]:
    """Wall seconds of the command, and its phases (seconds each) read from its log's timestamps."""
    started = datetime.datetime.now()
    t0 = time.perf_counter()
    proc = subprocess.run(list(cmd), cwd=root, env=_env(root), capture_output=True, text=True, timeout=1200)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return wall, phases(proc.stdout + proc.stderr, started, wall)


def _run(root: Path, *cmd: str) -> float:
    return _run_logged(root, *cmd)[0]


MARKS = (  # phase name, the log line that ends it
    ("python + imports", "Starting temporary server"),
    ("server start", "Beginning flow run"),
    ("flow to 1st stage", "started  "),
    ("20 stages", "stages: "),
)
_STAMP = re.compile(r"^(\d\d:\d\d:\d\d\.\d{3}) \| ")


def phases(log: str, started: datetime.datetime, wall: float) -> dict[str, float]:
    """Seconds per phase (``MARKS``, then "the rest" to the process's end); {} if a mark is missing. Against
    a running server there is no temporary server to start: its phase is 0."""
    at: dict[str, float] = {}
    for line in log.splitlines():
        stamp = _STAMP.match(line)
        for name, text in MARKS:
            if stamp and name not in at and text in line:
                t = datetime.datetime.combine(started.date(), datetime.time.fromisoformat(stamp.group(1)))
                at[name] = (t - started).total_seconds()
    if "python + imports" not in at and "server start" in at:
        at["python + imports"] = at["server start"]
    if len(at) != len(MARKS):
        return {}
    out, last = {}, 0.0
    for name, _ in MARKS:
        out[name], last = at[name] - last, at[name]
    out["the rest"] = wall - last
    return out


def make_project(root: Path, repo: Path = REPO) -> None:
    """The micro city in a git + DVC repository holding ``repo``'s code and dvc.yaml."""
    cfg, _ = build_micro_project(root, OVERRIDES, prepare=False)
    (root / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
    shutil.copy(repo / "dvc.yaml", root / "dvc.yaml")
    for package in ("vpr", "tasks", "flows"):
        shutil.copytree(repo / package, root / package, ignore=shutil.ignore_patterns("__pycache__"))
    _run(root, "git", "init", "-q")
    _run(root, sys.executable, "-m", "dvc", "init", "-q")
    _run(root, sys.executable, "-m", "dvc", "add", "-q", "data")
    _run(root, "git", "add", "-A")
    _run(root, "git", "commit", "-qm", "bench project")


def start_server(root: Path) -> tuple[subprocess.Popen, str]:
    """``prefect server start`` with the project's Prefect home (its own database file); (process, API URL)."""
    from flows.wait_for_api import wait_for_api

    port = 4200 + os.getpid() % 700
    env = {**_env(root), "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root.parent}/server.db"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    api = f"http://127.0.0.1:{port}/api"
    if not wait_for_api(api, 180):
        proc.kill()
        raise SystemExit(f"no Prefect server at {api}")
    return proc, api


KEYS = """
import json, time
from tasks.cache import stage_key, stage_specs
from vpr.foundations.config import load_config
cfg = load_config("params.yaml")
t0 = time.perf_counter(); specs = stage_specs("."); t1 = time.perf_counter()
for name in specs:
    stage_key(".", name, cfg)
print(json.dumps({"parse dvc.yaml": t1 - t0, "20 keys": time.perf_counter() - t1}))
"""


def key_times(root: Path) -> dict[str, float]:
    """Seconds to parse dvc.yaml and to compute every stage's key, in a fresh process in ``root``."""
    proc = subprocess.run([sys.executable, "-c", KEYS], cwd=root, env=_env(root), capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"stage keys failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _commit(repo: Path) -> str:
    out = subprocess.run(["git", "-C", str(repo), "log", "-1", "--format=%h"], capture_output=True, text=True)
    return out.stdout.strip() or "?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", type=Path, help="another checkout, timed beside this one")
    parser.add_argument("--no-forced", action="store_true", help="leave out the re-runs with the record forced")
    parser.add_argument("--server", action="store_true", help="also time this tree against a running server")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="vpr-cached-"))
    projects = {"this tree": (tmp / "this" / "project", REPO)}
    if args.baseline:
        projects["baseline"] = (tmp / "baseline" / "project", args.baseline.resolve())
    flow = (sys.executable, "-m", "flows.train_all")
    try:
        first, warm = {}, {}
        for name, (root, repo) in projects.items():
            root.parent.mkdir(parents=True)
            make_project(root, repo)
            first[name] = _run(root, *flow)
            warm[name] = _run(root, *flow)
        breakdown: dict[str, list[dict[str, float]]] = {}

        server, api = start_server(projects["this tree"][0]) if args.server else (None, "")

        def timed(name: str, root: Path, forced: bool = False, api: str = ""):
            def once() -> float:
                if forced:
                    (root / STAMP).unlink(missing_ok=True)
                if api:
                    os.environ["PREFECT_API_URL"] = api
                try:
                    wall, parts = _run_logged(root, *flow)
                finally:
                    os.environ.pop("PREFECT_API_URL", None)
                breakdown.setdefault(name, []).append(parts)
                return wall

            return once

        variants = {name: timed(name, root) for name, (root, _) in projects.items()}
        if not args.no_forced:
            variants["record forced"] = timed("record forced", projects["this tree"][0], forced=True)
        if server is not None:
            variants["server running"] = timed("server running", projects["this tree"][0], api=api)
        try:
            times = _common.interleaved(variants, args.rounds)
        finally:
            if server is not None:
                server.terminate()
                server.wait(30)
        keys = _common.interleaved({name: lambda root=root: key_times(root) for name, (root, _) in projects.items()}, 3)
        rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
        print(f"# {_common.machine()}; micro project, 20 stages")
        for name, (_, repo) in projects.items():
            print(f"# {name}: {repo} ({_commit(repo)}); first run {first[name]:.1f} s, first re-run {warm[name]:.1f} s")
        print("| cached re-run | median s | range s |\n|---|---:|---:|")
        for name, xs in times.items():
            print(f"| {name} | {_common.median(xs):.1f} | {_common.spread(xs)} |")
        if "baseline" in times:
            ratio = _common.median(times["baseline"]) / _common.median(times["this tree"])
            print(f"baseline / this tree: {ratio:.2f}×")
        if "record forced" in times:
            ratio = _common.median(times["record forced"]) / _common.median(times["this tree"])
            print(f"forced / this tree: {ratio:.2f}×")
        print(f"peak RSS of a run (largest child): {rss:.0f} MiB")
        names = [n for n, _ in MARKS] + ["the rest"]
        print("\n| phase, median s | " + " | ".join(breakdown) + " |\n|---|" + "---:|" * len(breakdown))
        for phase in names:
            cells = []
            for runs in breakdown.values():
                xs = [r[phase] for r in runs if r]
                cells.append(f"{_common.median(xs):.1f}" if xs else "?")
            print(f"| {phase} | " + " | ".join(cells) + " |")
        print("\n| in a fresh process, median s | " + " | ".join(keys) + " |\n|---|" + "---:|" * len(keys))
        for what in ("parse dvc.yaml", "20 keys"):
            cells = [f"{_common.median([k[what] for k in ks]):.2f}" for ks in keys.values()]
            print(f"| {what} | " + " | ".join(cells) + " |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
