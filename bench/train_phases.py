"""Where a training run's time goes: trunk cache, NetVLAD initialisation, mining, steps, validation.

Whole ``vpr.steps.train.train_head`` runs on the benchmark project (the default city); each phase is what the
training reports in its summary's ``phases`` (``vpr.steps.train.timed``):

- ``trunk cache``: opening it and encoding the images the run needs that no earlier head encoded
  (each the first time a refresh or the validation asks for it; every head of a run shares the cache,
  ``vpr.shared.trunk``), taken out of the phase that asked;
- ``init``: building the model and starting it (NetVLAD: the k-means sample and centroids);
- ``mining``: the refreshes (``vpr.steps.mining.negatives.mine_triplets``); ``loading``: waiting for triplet
  batches; ``steps``: forward, loss, backward, optimiser;
- ``validation``: after each epoch; ``checkpoints``: the atomic saves and the history.

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

from vpr.foundations.layout import Layout
from vpr.steps.train import train_head


def timed_run(cfg, layout: Layout, head: str) -> dict[str, float]:
    """Seconds per phase of one ``train_head`` as it reports them, plus ``total`` and ``other``."""
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        summary = train_head(head, cfg, layout)
    total = time.perf_counter() - t0
    phases = dict(summary["phases"])
    return phases | {"other": total - sum(phases.values()), "total": total}


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
    columns = ["total", "trunk cache", "init", "mining", "loading", "steps", "validation", "checkpoints", "other"]
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
