"""Where a training run's time goes: trunk cache, NetVLAD initialisation, mining, steps, validation.

Whole ``vpr.train.train_head`` runs on the benchmark project (the default city), each phase timed by
wrapping the functions ``train_head`` calls (the rest of the run is the training steps and loading):

- ``trunk cache``: ``open_trunk_cache`` — building it (the run's first head) or loading it (the others:
  every head of a run shares it, ``vpr.trunk``);
- ``netvlad init``: the k-means sample and centroids; ``mining``: the refreshes (``_mine_chunk``);
- ``validation``: ``validate`` after each epoch; ``checkpoints``: the atomic saves.

Runs (interleaved per round): NetVLAD for 1 and for 3 epochs with a cold cache (an empty cache folder:
what the first head of a run pays), and the same with the cache the first run left (what every other
head pays), plus NetVLAD with the cache off (``train.cache_frozen_trunk: off``: every refresh and step
runs the whole network). Queries per epoch and the rest come from params.yaml.

    .venv/bin/python bench/train_phases.py [--rounds 1] [--epochs 1 3]
"""

from __future__ import annotations

import argparse
import resource
import shutil
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

import _common

import vpr.train as vt
from vpr.layout import Layout

PHASES = {
    "open_trunk_cache": "trunk cache",
    "init_netvlad": "netvlad init",
    "_mine_chunk": "mining",
    "validate": "validation",
    "save_checkpoint": "checkpoints",
}


def timed_run(cfg, layout: Layout, head: str) -> dict[str, float]:
    """Seconds per phase of one ``train_head`` (``steps`` = the rest)."""
    spent: dict[str, float] = defaultdict(float)
    originals = {name: getattr(vt, name) for name in PHASES}

    def wrap(name, fn):
        def inner(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[PHASES[name]] += time.perf_counter() - t0

        return inner

    for name, fn in originals.items():
        setattr(vt, name, wrap(name, fn))
    try:
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            vt.train_head(head, cfg, layout)
        total = time.perf_counter() - t0
    finally:
        for name, fn in originals.items():
            setattr(vt, name, fn)
    spent["steps + loading"] = total - sum(spent.values())
    spent["total"] = total
    return dict(spent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default="netvlad")
    parser.add_argument("--epochs", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args()
    cfg, layout = _common.project()
    work = Path(tempfile.mkdtemp(prefix="vpr-bench-phases-"))
    results: dict[str, list[dict]] = defaultdict(list)
    try:
        for _ in range(args.rounds):
            for epochs in args.epochs:
                for variant in ("cold cache", "shared cache", "cache off"):
                    train = cfg.train.model_copy(update={"epochs": epochs, "patience": epochs + 1, "per_head": {}})
                    if variant == "cache off":
                        train = train.model_copy(update={"cache_frozen_trunk": "off"})
                    run_cfg = cfg.model_copy(update={"train": train})
                    artifacts = work / "artifacts"
                    if variant == "cold cache":
                        shutil.rmtree(artifacts / "trunk-cache", ignore_errors=True)
                    for name in ("shards", "mining"):  # the project's inputs, the run's own outputs
                        if not (artifacts / name).exists():
                            artifacts.mkdir(parents=True, exist_ok=True)
                            (artifacts / name).symlink_to(layout.artifacts / name)
                    run_layout = Layout(work, layout.data, artifacts, work / "m", work / "r", work / "i")
                    results[f"{epochs} epoch(s), {variant}"].append(timed_run(run_cfg, run_layout, args.head))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    columns = ["total", "trunk cache", "netvlad init", "mining", "steps + loading", "validation", "checkpoints"]
    print(f"# {_common.machine()}")
    print(
        f"# {args.head}, {cfg.train.queries_per_epoch} queries/epoch, refresh every {cfg.train.refresh_every}, "
        f"negative sample {cfg.train.negative_sample}; medians of {args.rounds} round(s), seconds"
    )
    print("| run | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, runs in results.items():
        cells = [_common.median([r.get(c, 0.0) for r in runs]) for c in columns]
        print(f"| {name} | " + " | ".join(f"{x:.1f}" for x in cells) + " |")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")


if __name__ == "__main__":
    main()
