"""Flow ``train-all``: ingest → shard ∥ mine → train each head ∥ untrained baseline → evaluate → index →
report → DVC record.

Heads train in ``orchestration.train_lanes`` lanes (default 1: one after another, since one training
fills the machine's cores or its GPU), beside the untrained baseline and the evaluations of heads
already trained (bounded by the task runner, ``orchestration.max_workers``); CRN waits for NetVLAD,
whose checkpoint it starts from. Every step is a ``tasks`` wrapper of the same
``vpr`` function that the matching ``dvc.yaml`` stage runs through the CLI, writing the same files;
the flow ends with ``dvc commit --force`` of those stages, so ``dvc status`` is clean afterwards and
``dvc repro`` has nothing to do.

Run it: ``python -m flows.train_all`` (prints the results table), or through the served deployment:
``prefect deployment run train-all/train-all --watch``.
"""

from __future__ import annotations

import argparse
import sys

from prefect import flow
from prefect.futures import wait
from prefect.logging import get_run_logger

import tasks
from flows.common import resolve
from flows.runners import make_task_runner
from tasks.artifacts import format_table


@flow(name="train-all-steps", log_prints=True)
def train_all_steps(params: str, root: str, record_dvc: bool = True) -> dict:
    """The pipeline itself, run as a subflow so that its task runner can come from params."""
    cfg, root_path, _ = resolve(params, root)
    root = str(root_path)
    logger = get_run_logger()
    submitted: dict[str, object] = {}

    def submit(step, stage: str, *args, wait_for=()):
        future = tasks.configure(step, cfg, root, stage).submit(cfg, root, *args, wait_for=list(wait_for))
        submitted[stage] = future
        return future

    heads = sorted(cfg.train.heads, key=lambda h: h == "crn")  # NetVLAD is submitted before CRN
    ingested = submit(tasks.ingest, "ingest")
    sharded = submit(tasks.shard, "shard", wait_for=[ingested])
    mined = submit(tasks.mine, "mine", wait_for=[ingested])
    trained = {}
    lanes: list[list] = [[] for _ in range(cfg.orchestration.train_lanes)]  # heads trained at once
    for i, head in enumerate(heads):
        lane = lanes[i % len(lanes)]
        after = [sharded, mined, *lane[-1:]] + ([trained["netvlad"]] if head == "crn" and "netvlad" in trained else [])
        trained[head] = submit(tasks.train, f"train@{head}", head, wait_for=after)
        lane.append(trained[head])
    evaluated = [submit(tasks.evaluate, f"evaluate@{h}", h, wait_for=[trained[h]]) for h in heads]
    evaluated.append(submit(tasks.baseline, "baseline", wait_for=[sharded, mined]))
    indexed = []
    if cfg.index.head in trained:
        indexed = [submit(tasks.index, "index", wait_for=[trained[cfg.index.head], *evaluated])]
    else:
        logger.warning("index.head=%s is not among train.heads: no release built", cfg.index.head)
    reported = submit(tasks.report, "report", wait_for=[*evaluated, *indexed])

    wait(list(submitted.values()))
    steps = {stage: f.state.name for stage, f in submitted.items()}
    failed = [stage for stage, f in submitted.items() if not f.state.is_completed()]
    if failed:
        raise RuntimeError(f"train-all: step(s) failed or not run: {', '.join(failed)} (see their task runs)")
    cached = [stage for stage, name in steps.items() if name == "Cached"]
    print(
        f"{len(cached)} of {len(steps)} steps unchanged since a previous run (cache hits)"
        + (f": {', '.join(cached)}" if cached else "")
    )
    report_path = reported.result().get("report")
    rows = tasks.publish_results(cfg, root, report_path)
    recorded = tasks.record_in_dvc(root, list(submitted)) if record_dvc else {"recorded": []}
    print("results (test split):\n" + format_table(rows))
    return {"results": rows, "report": report_path, "steps": steps, "dvc": recorded}


@flow(name="train-all", log_prints=True)
def train_all(params: str = "params.yaml", root: str = ".", record_dvc: bool = True) -> dict:
    """Run the whole study pipeline on the project at ``root`` with ``params`` (relative to root).

    Steps whose DVC-stage inputs (file contents, params values, code) are unchanged since a previous
    run are served from Prefect's cache and not executed again.
    """
    cfg, root_path, params_path = resolve(params, root)
    steps = train_all_steps.with_options(task_runner=make_task_runner(cfg.orchestration))
    return steps(str(params_path), str(root_path), record_dvc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.train_all", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    parser.add_argument("--no-dvc", action="store_true", help="do not record the outputs in DVC")
    args = parser.parse_args(argv)
    result = train_all(params=args.params, root=args.root, record_dvc=not args.no_dvc)
    print("\nRecall@N on the test split:\n" + format_table(result["results"]))
    if result.get("report"):
        print(f"\nreport: {result['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
