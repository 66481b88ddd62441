"""End-to-end benchmark: wall time of the README's run command, split per stage.

``make run`` = ``python -m flows.train_all`` on a project whose ``data/`` holds the synthetic city.
This runs that flow on a fresh copy of the repository (code, ``dvc.yaml``, ``params.yaml``) with the
default city rendered once into ``$VPR_BENCH_CACHE``, in its own ``PREFECT_HOME`` (so nothing is a
cache hit), without the final DVC record (``--no-dvc``: no git repository in the copy). Per-stage
times are read back from the Prefect API (task-run start/end); the flow runs independent stages in
parallel (``orchestration.max_workers``), so stage times add up to more than the wall time.

``--mode cli`` instead runs each ``dvc.yaml`` stage's ``vpr`` command one after the other (what
``dvc repro`` does), timing each process: that also shows the per-command start-up cost.

By default the training is shortened (1 epoch of params' ``queries_per_epoch`` × ``--fraction``, with
``refresh_every`` and ``negative_sample`` scaled alike) so that it takes minutes here; ``--full`` runs
params.yaml unchanged (3 epochs × 200 queries per head: the real ``make run``).

    .venv/bin/python bench/end_to_end.py                # flow, shortened training
    .venv/bin/python bench/end_to_end.py --full         # the README's run as is
    .venv/bin/python bench/end_to_end.py --mode cli     # each vpr stage as a process (dvc repro order)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common
import yaml

CODE = ("vpr", "tasks", "flows", "dvc.yaml", "pyproject.toml")

DRIVER = r"""
import json, sys, time
t0 = time.perf_counter()
from flows.train_all import train_all
from prefect.client.orchestration import get_client
imported = time.perf_counter() - t0
result = train_all(params="params.yaml", root=".", record_dvc=False)
with get_client(sync_client=True) as client:
    for run in client.read_task_runs(limit=200):
        print("TASKRUN " + json.dumps({"name": run.name, "state": run.state_name,
              "start": run.start_time.timestamp() if run.start_time else None,
              "end": run.end_time.timestamp() if run.end_time else None}))
    for run in client.read_flow_runs(limit=20):
        print("FLOWRUN " + json.dumps({"name": client.read_flow(run.flow_id).name,
              "start": run.start_time.timestamp() if run.start_time else None,
              "end": run.end_time.timestamp() if run.end_time else None}))
print("IMPORT " + json.dumps(imported))
"""


def make_copy(dest: Path, data: Path, args) -> None:
    for name in CODE:
        src = _common.ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        elif src.exists():
            shutil.copy2(src, dest / name)
    raw = yaml.safe_load((_common.ROOT / "params.yaml").read_text())
    if not args.full:
        tc = raw["train"]
        tc.update(
            epochs=args.epochs,
            queries_per_epoch=max(tc["batch_queries"], round(tc["queries_per_epoch"] * args.fraction)),
            refresh_every=max(tc["batch_queries"], round(tc["refresh_every"] * args.fraction)),
            negative_sample=max(tc["negatives"], round(tc["negative_sample"] * args.fraction)),
        )
    if args.max_workers:
        raw["orchestration"]["max_workers"] = args.max_workers
    (dest / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    shutil.copytree(data, dest / raw["paths"]["data"])


def env(prefect_home: Path) -> dict:
    e = dict(os.environ)
    e.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        DVC_NO_ANALYTICS="1",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        PYTHONUNBUFFERED="1",
    )
    e["PATH"] = f"{Path(sys.executable).parent}:{e.get('PATH', '')}"
    return e


def stage_name(task_run_name: str) -> str:
    """``train-avg`` stays; Prefect's default ``ingest-3f2`` loses its random suffix."""
    if re.match(r"^(train|evaluate)-(avg|gem|netvlad|crn)$", task_run_name):
        return task_run_name.replace("-", "@", 1)
    return re.sub(r"-[0-9a-f]{3}$", "", task_run_name)


def run_flow(root: Path, prefect_home: Path) -> tuple[float, list[tuple[str, float, float]], dict]:
    t0 = time.time()
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER], cwd=root, env=env(prefect_home), capture_output=True, text=True
    )
    wall = time.time() - t0
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"the flow failed (exit {proc.returncode})")
    stages, flows, extra = [], {}, {}
    for line in proc.stdout.splitlines():
        if line.startswith("TASKRUN "):
            r = json.loads(line[8:])
            if r["start"] and r["end"] and not r["name"].startswith("train-all-steps"):  # the subflow's own run
                stages.append((stage_name(r["name"]), r["start"] - t0, r["end"] - r["start"]))
        elif line.startswith("FLOWRUN "):
            r = json.loads(line[8:])
            if r["start"] and r["end"]:
                flows[r["name"]] = (r["start"] - t0, r["end"] - r["start"])
        elif line.startswith("IMPORT "):
            extra["import"] = json.loads(line[7:])
    extra["flows"] = flows
    return wall, sorted(stages, key=lambda s: s[1]), extra


def dvc_commands(root: Path) -> list[tuple[str, str]]:
    """(stage, command) of dvc.yaml in file order, foreach stages expanded (a valid run order)."""
    spec = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    out = []
    for name, stage in spec.items():
        if "foreach" in stage:
            for key in stage["foreach"]:
                out.append((f"{name}@{key}", stage["do"]["cmd"].replace("${key}", str(key))))
        else:
            out.append((name, stage["cmd"]))
    return out


def run_cli(root: Path, prefect_home: Path) -> tuple[float, list[tuple[str, float, float]], dict]:
    t_start = time.time()
    stages = []
    for name, cmd in dvc_commands(root):
        t0 = time.time()
        proc = subprocess.run(cmd, shell=True, cwd=root, env=env(prefect_home), capture_output=True, text=True)
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
            raise SystemExit(f"stage {name} failed: {cmd}")
        stages.append((name, t0 - t_start, time.time() - t0))
        print(f"  {name}: {stages[-1][2]:.1f} s", file=sys.stderr, flush=True)
    wall = time.time() - t_start
    t0 = time.time()
    subprocess.run(
        [sys.executable, "-c", "import vpr.cli, vpr.steps.train, vpr.steps.evaluate"],
        cwd=root,
        env=env(prefect_home),
        check=True,
        capture_output=True,
    )
    return wall, stages, {"cli_startup": time.time() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=["flow", "cli"], default="flow")
    parser.add_argument("--full", action="store_true", help="params.yaml unchanged (the real make run)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--fraction", type=float, default=0.25)
    parser.add_argument("--max-workers", type=int, help="override orchestration.max_workers")
    parser.add_argument("--keep", action="store_true", help="keep the project copy")
    args = parser.parse_args()
    synth = _common.default_params()["synth"]
    cfg, layout = _common.project(synth["height"], synth["width"])
    tmp = Path(tempfile.mkdtemp(prefix="vpr-e2e-"))
    root = tmp / "project"
    root.mkdir()
    make_copy(root, layout.data, args)
    run_cfg = yaml.safe_load((root / "params.yaml").read_text())
    tc = run_cfg["train"]
    print(f"# end-to-end benchmark — {_common.machine()}")
    print(
        f"# {'python -m flows.train_all --no-dvc' if args.mode == 'flow' else 'each dvc.yaml stage via the vpr CLI'}"
        f" on a copy of the repository; {'params.yaml as is' if args.full else 'shortened training'}: "
        f"{tc['epochs']} epoch(s) x {tc['queries_per_epoch']} queries, refresh every {tc['refresh_every']}, "
        f"heads {', '.join(tc['heads'])}; task runner {run_cfg['orchestration']['task_runner']} "
        f"(max_workers {run_cfg['orchestration']['max_workers']}); city {synth['width']}x{synth['height']}"
    )
    try:
        runner = run_flow if args.mode == "flow" else run_cli
        wall, stages, extra = runner(root, tmp / "prefect")
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"# kept {root}")
    total = sum(s[2] for s in stages)
    print(f"{'stage':<18} {'starts at s':>11} {'seconds':>8} {'% of wall':>9}")
    for name, start, seconds in stages:
        print(f"{name:<18} {start:11.1f} {seconds:8.1f} {100 * seconds / wall:8.0f}%")
    print(f"{'wall time':<18} {'':>11} {wall:8.1f}   (stage times add up to {total:.1f} s)")
    if args.mode == "flow":
        first = min(s[1] for s in stages)
        last = max(s[1] + s[2] for s in stages)
        flows = "; ".join(
            f"{name} runs {start:.1f}–{start + seconds:.1f} s"
            for name, (start, seconds) in sorted(extra["flows"].items(), key=lambda f: f[1][0])
        )
        print(f"flow runs: {flows}")
        print(
            f"before the first stage: {first:.1f} s (interpreter and imports {extra.get('import', 0):.1f} s, "
            f"Prefect's ephemeral API start-up, flow set-up); after the last stage: {wall - last:.1f} s "
            "(results table, shutdown)"
        )
    else:
        print(
            f"start-up of a command that loads a model (python, import vpr.cli + steps train + evaluate): "
            f"{extra['cli_startup']:.1f} s"
        )


if __name__ == "__main__":
    main()
