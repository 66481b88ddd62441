"""A whole `vpr evaluate` against the model bound: what a call costs beyond the model (start-up, loading).

Fresh processes, as a user's or DVC's call is: ``vpr evaluate --head HEAD --untrained`` on PROJECT's test
split with an empty descriptor store each time (every image is decoded and encoded), for each tree
under test (``--tree PATH``, repeatable: the code put first on ``PYTHONPATH``; default: this
checkout), beside the model bound measured in this process as bench/extraction.py does (the same
model and batch size on a synthetic batch already in memory, warm-up excluded, as many images as the
split), ``python -c "import torch"`` (what any fresh process that uses torch pays) and, per tree, a
fresh ``import vpr.cli, vpr.steps.evaluate`` (the command's imports). Everything runs
interleaved, ``--rounds`` times; medians. The calls run in a scratch project beside PROJECT (its
params, its shards and mining tables linked, its own descriptor store): PROJECT's files are only read.
Every tree's metrics (but ``ms_per_image``, a timing) and predictions table must be the same bytes:
the benchmark stops otherwise.

    .venv/bin/python bench/evaluate_startup.py PROJECT [--tree OLD_CHECKOUT --tree .] [--rounds 3]

PROJECT: a project with the test split sharded and mined (``vpr ingest && vpr shard --split test &&
vpr mine --split test``, or after ``make run``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import _common
import torch
from extraction import bound

from vpr.foundations.config import load_config
from vpr.foundations.layout import Layout
from vpr.foundations.registry import baseline_name
from vpr.shared.checkpoints import untrained_model
from vpr.shared.shardio import ShardReader

VPR = str(Path(sys.executable).with_name("vpr"))  # the console script: PYTHONPATH comes before the install


def scratch_project(project: Path, where: Path) -> Path:
    """A project that reads PROJECT's params, shards and mining tables and writes only under ``where``."""
    root = where / "project"
    (root / "artifacts").mkdir(parents=True)
    shutil.copy(project / "params.yaml", root / "params.yaml")
    cfg = load_config(project / "params.yaml")
    src = Layout.from_config(cfg, project.resolve())
    for name, path in (("shards", src.shards_dir), ("mining", src.mining("test").parent)):
        (root / "artifacts" / name).symlink_to(path, target_is_directory=True)
    return root


def evaluate(tree: Path, root: Path, head: str, keep: Path) -> float:
    """Seconds of one fresh ``vpr evaluate --untrained`` with ``tree`` first on the path; its outputs kept."""
    layout = Layout.from_config(load_config(root / "params.yaml"), root)
    shutil.rmtree(layout.descriptors_dir, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    t0 = time.perf_counter()
    cmd = [VPR, "-q", "evaluate", "--head", head, "--untrained"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"vpr evaluate ({tree}) failed: {proc.stderr.decode()[-2000:]}")
    name = baseline_name(head)
    keep.mkdir(parents=True, exist_ok=True)
    metrics = json.loads(layout.metrics_file(name).read_text())
    metrics.pop("ms_per_image")  # a timing
    (keep / "metrics.json").write_text(json.dumps(metrics, sort_keys=True))
    shutil.copy(layout.predictions(name), keep / "predictions.parquet")
    return seconds


def fresh(cmd: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - t0


def imports(tree: Path) -> float:
    """Seconds of a fresh process that imports what ``vpr evaluate`` imports, ``tree`` first on the path."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import vpr.cli, vpr.steps.evaluate"], check=True, env=env, cwd="/")
    return time.perf_counter() - t0


def same_outputs(runs: list[Path]) -> bool:
    first = [(runs[0] / f).read_bytes() for f in ("metrics.json", "predictions.parquet")]
    return all([(r / f).read_bytes() for f in ("metrics.json", "predictions.parquet")] == first for r in runs[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--tree", type=Path, action="append", help="code to run (default: this checkout)")
    parser.add_argument("--head", default="avg")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--no-imports", action="store_true", help="only the bound and the calls (a short quiet window)")
    args = parser.parse_args()
    trees = args.tree or [_common.ROOT]
    cfg = load_config(args.project / "params.yaml")
    test = ShardReader(Layout.from_config(cfg, args.project).shards_dir, ("test",)).index
    images, batch = test.height, cfg.evaluate.batch_size
    device = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no ImageNet weights here: random init, same speed
        model = untrained_model(args.head, cfg.model, cfg.train.seed, device)
    shape = (cfg.shards.height, cfg.shards.width)

    with tempfile.TemporaryDirectory(prefix="vpr-eval-bench-") as tmp:
        root = scratch_project(args.project, Path(tmp))
        probes = {"model bound": lambda: images / bound(model, images, batch, shape, device)}
        if not args.no_imports:
            probes['python -c "import torch"'] = lambda: fresh([sys.executable, "-c", "import torch"])
        outputs: list[Path] = []
        for n, tree in enumerate(trees):
            keep = Path(tmp) / f"out{n}"
            if not args.no_imports:
                probes[f"import vpr.cli, vpr.steps.evaluate, {tree}"] = lambda tree=tree: imports(tree)
            probes[f"vpr evaluate, {tree}"] = lambda tree=tree, keep=keep: evaluate(tree, root, args.head, keep)
            outputs.append(keep)
        loads = [os.getloadavg()[0]]
        times = {}
        for _ in range(args.rounds):
            for name, probe in probes.items():
                times.setdefault(name, []).append(probe())
            loads.append(os.getloadavg()[0])
        identical = same_outputs(outputs)

    print(_common.machine())
    print(
        f"# {args.project}: test split, {images} images {shape[1]}x{shape[0]}, head {args.head} untrained, "
        f"batch {batch}, {args.rounds} rounds interleaved, load (1 min) {min(loads):.1f}–{max(loads):.1f}"
    )
    top = _common.median(times["model bound"])
    print(f"{'probe':<60} {'median s':>9} {'(min–max)':>11} {'× bound':>8}")
    for name, xs in times.items():
        print(f"{name:<60} {_common.median(xs):9.2f} {_common.spread(xs):>11} {_common.median(xs) / top:7.2f}x")
    print(f"metrics (but ms_per_image) and predictions byte-identical across trees: {'yes' if identical else 'NO'}")
    if not identical:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
