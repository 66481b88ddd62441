"""Flow ``encode-shards``: the descriptors a stage reads, one task per shard, on the configured task runner.

``train-all`` runs the same tasks before each descriptor-reading stage; this flow runs them alone, e.g.
to fill the descriptor store of a large database on a Dask cluster (``orchestration.task_runner: dask``,
``orchestration.dask_address``) before ``vpr evaluate`` or ``vpr index`` reads it:
``python -m flows.encode --stage index``.

With ``orchestration.dask_address`` the workers are taken not to share the project folder: each is sent
the model and its shard's index rows, reads the shard from ``resources.shards_url`` and sends the
descriptors back, and this process writes them into the store (docs/cluster.md). At most
``orchestration.max_in_flight`` shards are submitted at once, so a million-image database's submission
does not hold a copy of the model per shard.
"""

from __future__ import annotations

import argparse
import sys
from collections import deque

from prefect import flow
from prefect.futures import as_completed

import tasks
from flows.common import resolve
from flows.runners import make_task_runner


@flow(name="encode-shards-steps", log_prints=True)
def encode_shards_steps(params: str, root: str, stage: str) -> dict:
    cfg, root_path, _ = resolve(params, root)
    root = str(root_path)
    shards = tasks.stage_shards(cfg, root, stage)
    if cfg.orchestration.dask_address:  # workers elsewhere: descriptors come back, stored here
        encode = tasks.encode_detached.with_options(retries=cfg.orchestration.task_retries)
        waiting = deque(tasks.detached_jobs(cfg, root, stage))
        running: set = set()
        results = []
        while waiting or running:  # at most max_in_flight submitted: each task carries the model's bytes
            while waiting and len(running) < cfg.orchestration.max_in_flight:
                running.add(encode.submit(cfg, waiting.popleft()))
            done = next(as_completed(list(running)))
            running.remove(done)
            results.append(tasks.store_detached(cfg, root, done.result()))
    else:
        futures = [tasks.configure(tasks.encode_shard, cfg, root, stage).submit(cfg, root, stage, s) for s in shards]
        results = [f.result() for f in futures]
    encoded = sum(bool(r["encoded"]) for r in results)
    print(f"{stage}: {len(shards)} shards, {encoded} encoded, {len(shards) - encoded} already in the store")
    return {"stage": stage, "shards": len(shards), "encoded": encoded, "results": results}


@flow(name="encode-shards", log_prints=True)
def encode_shards(stage: str = "index", params: str = "params.yaml", root: str = ".") -> dict:
    """Encode every shard ``stage`` (``evaluate@H``, ``baseline`` or ``index``) reads into the store."""
    cfg, root_path, params_path = resolve(params, root)
    steps = encode_shards_steps.with_options(task_runner=make_task_runner(cfg.orchestration))
    return steps(str(params_path), str(root_path), stage)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.encode", description=__doc__.split("\n")[0])
    parser.add_argument("--stage", default="index", help="evaluate@HEAD, baseline or index")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    encode_shards(stage=args.stage, params=args.params, root=args.root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
