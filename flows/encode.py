"""Flow ``encode-shards``: the descriptors a stage reads, one task per shard, on the configured task runner.

``train-all`` runs the same tasks before each descriptor-reading stage; this flow runs them alone, e.g.
to fill the descriptor store of a large database on a Dask cluster (``orchestration.task_runner: dask``,
``orchestration.dask_address``) before ``vpr evaluate`` or ``vpr index`` reads it:
``python -m flows.encode --stage index``.
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow

import tasks
from flows.common import resolve
from flows.runners import make_task_runner


@flow(name="encode-shards-steps", log_prints=True)
def encode_shards_steps(params: str, root: str, stage: str) -> dict:
    cfg, root_path, _ = resolve(params, root)
    root = str(root_path)
    futures = [
        tasks.configure(tasks.encode_shard, cfg, root, stage).submit(cfg, root, stage, shard)
        for shard in tasks.stage_shards(cfg, root, stage)
    ]
    results = [f.result() for f in futures]
    encoded = sum(r["encoded"] for r in results)
    print(f"{stage}: {len(results)} shards, {encoded} encoded, {len(results) - encoded} already in the store")
    return {"stage": stage, "shards": len(results), "encoded": encoded, "results": results}


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
