"""Flow ``train-all``: every stage of ``dvc.yaml`` as a Prefect task, in DVC's own dependency graph, then a
DVC record.

The graph is DVC's (a stage waits for the stages whose outputs it reads: ingest → shard ∥ mine → train
each head → evaluate ∥ baseline → index → report; CRN after NetVLAD, whose checkpoint it starts from),
plus one ordering that is not data: heads train in ``orchestration.train_lanes`` lanes (default 1: one
after another, since one training fills the machine's cores or its GPU). Every stage is the one task
``tasks.run_stage``, which runs the step of ``vpr.pipeline`` that the matching ``dvc.yaml`` stage runs
through the CLI, writing the same files. A stage that reads descriptors (evaluate, baseline, index) is preceded by one
``encode-shard`` task per shard it reads (``tasks.encode``), so extraction spreads over the task
runner's workers (Dask: all of them) and the stage finds its shards encoded.
The flow ends with ``dvc commit --force`` of those stages, so ``dvc status`` is clean afterwards and
``dvc repro`` has nothing to do.

The whole run holds the project's data lock (``vpr.foundations.datalock``): a re-index started meanwhile leaves the
inbox for its next run, so the DVC record never covers a catalog the steps did not read.

Run it: ``python -m flows.train_all`` (prints the results table), or through the served deployment:
``prefect deployment run train-all/train-all --watch``.
"""

from __future__ import annotations

import argparse
import gc
import sys
from collections.abc import Callable

from prefect import flow
from prefect.futures import PrefectFuture, as_completed

import tasks
from flows.common import resolve
from flows.progress import StageProgress, watched_run_logger
from flows.runners import make_task_runner
from tasks.artifacts import RESULTS_KEY
from vpr.foundations.datalock import data_lock
from vpr.foundations.layout import Layout
from vpr.foundations.tables import text_table
from vpr.pipeline import STEPS


def lane_order(specs: dict[str, tasks.StageSpec], lanes: int) -> dict[str, list[str]]:
    """Extra "after" edges that put the training stages into ``lanes`` queues (one training fills a device).

    Not a data dependency: the order in which trainings share the machine. Stages are dealt out in
    ``dvc.yaml`` order (a head that starts from another comes after it there).
    """
    trainings = [name for name in specs if STEPS[name.partition("@")[0]].fills_device]
    after: dict[str, list[str]] = {}
    for i, name in enumerate(trainings):
        if i >= lanes:
            after[name] = [trainings[i - lanes]]
    return after


def task_graph(specs: dict[str, tasks.StageSpec], lanes: int) -> dict[str, list[str]]:
    """Each stage's upstream stages: DVC's graph of ``dvc.yaml`` plus the training lanes."""
    extra = lane_order(specs, lanes)
    return {name: list(dict.fromkeys([*spec.upstream, *extra.get(name, [])])) for name, spec in specs.items()}


def run_when_ready(
    stages: list[str],
    graph: dict[str, list[str]],
    submit: Callable[[str, list[PrefectFuture]], PrefectFuture],
    progress: StageProgress | None = None,
) -> dict:
    """Submit each stage once all of its upstream stages completed; wait for all; the futures by stage
    (``progress`` hears of each start and finish).

    Submitting everything at once with ``wait_for`` would park each waiting task on a worker of the
    task runner, so with ``max_workers`` 2 an evaluation could not start until every training had; here
    a worker only ever holds a task that can run. A stage whose upstream failed is never submitted.
    """
    submitted: dict[str, PrefectFuture] = {}
    running: dict[PrefectFuture, str] = {}
    done: set[str] = set()
    pending = list(stages)
    while True:
        for stage in [s for s in pending if all(u in done for u in graph[s])]:
            pending.remove(stage)
            submitted[stage] = submit(stage, [submitted[u] for u in graph[stage]])  # the upstream: wait_for edges
            running[submitted[stage]] = stage
            if progress:
                progress.started(stage)
        if not running:
            return submitted
        finished = next(iter(as_completed(list(running))))
        stage = running.pop(finished)
        finished.wait()  # the future's state is final only once waited on
        if progress:
            progress.finished(stage, finished.state)
        if finished.state.is_completed():
            done.add(stage)


@flow(name="train-all-steps")
def train_all_steps(params: str, root: str, record_dvc: bool = True) -> dict:
    """The pipeline itself, run as a subflow so that its task runner can come from params.

    One task per ``dvc.yaml`` stage, submitted as soon as the stages whose outputs it reads are done
    (``task_graph``, ``run_when_ready``): nothing here names a stage's inputs a second time. Each start
    and finish is a line in the watched run's log (``flows.progress``), the results table the last one.
    """
    cfg, root_path, _ = resolve(params, root)
    root = str(root_path)
    specs = tasks.stage_specs(root)
    unknown = sorted({name.partition("@")[0] for name in specs} - set(STEPS))
    if unknown:
        raise RuntimeError(f"dvc.yaml stage(s) with no step in vpr/pipeline.py: {unknown}")
    graph = task_graph(specs, cfg.orchestration.train_lanes)

    def submit(stage: str, upstream: list):
        encodes = [  # stages that read descriptors: their shards first, one task each, on every worker
            tasks.configure(tasks.encode_shard, cfg, root, stage).submit(cfg, root, stage, shard, wait_for=upstream)
            for shard in tasks.stage_shards(cfg, root, stage)
        ]
        step = tasks.configure(tasks.run_stage, cfg, root, stage)
        return step.submit(cfg, root, stage, wait_for=upstream + encodes)

    log = watched_run_logger()
    progress = StageProgress(len(specs), log)
    submitted = run_when_ready(list(specs), graph, submit, progress)
    steps = {stage: submitted[stage].state.name if stage in submitted else "NotRun" for stage in specs}
    failed = [stage for stage in specs if stage not in submitted or not submitted[stage].state.is_completed()]
    log.info(progress.summary())
    if failed:
        raise RuntimeError(f"train-all: step(s) failed or not run: {', '.join(failed)} (see their task runs)")
    # the step whose summary names a report (the step table says which; no stage name here)
    summaries = [future.result() for future in submitted.values()]
    report_path = next((s["report"] for s in summaries if isinstance(s, dict) and s.get("report")), None)
    rows = tasks.publish_results(cfg, root, report_path)
    recorded = tasks.record_in_dvc(root, list(submitted)) if record_dvc else {"recorded": []}
    log.info("Recall@N on the test split (artifact %s):\n%s", RESULTS_KEY, text_table(rows))
    return {"results": rows, "report": report_path, "steps": steps, "dvc": recorded}


@flow(name="train-all", log_prints=True)
def train_all(params: str = "params.yaml", root: str = ".", record_dvc: bool = True) -> dict:
    """Run the whole study pipeline on the project at ``root`` with ``params`` (relative to root).

    Steps whose DVC-stage inputs (file contents, params values, code) are unchanged since a previous
    run are served from Prefect's cache and not executed again.
    """
    cfg, root_path, params_path = resolve(params, root)
    steps = train_all_steps.with_options(task_runner=make_task_runner(cfg.orchestration))
    # held from the first step to the DVC record: a re-index never changes the catalog in between
    with data_lock(Layout.from_config(cfg, root_path).artifacts, "train-all"):
        return steps(str(params_path), str(root_path), record_dvc)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.train_all", description=__doc__.split("\n")[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    parser.add_argument("--no-dvc", action="store_true", help="do not record the outputs in DVC")
    args = parser.parse_args(argv)
    result = train_all(params=args.params, root=args.root, record_dvc=not args.no_dvc)
    # the results table is already in the run's log (on this console too): printed once, not again here
    if result.get("report"):
        print(f"\nreport: {result['report']}")
    return 0


if __name__ == "__main__":
    code = main()
    # the objects the run made go untouched at exit (a last sweep of them took seconds): what must be
    # flushed or stopped is, by the atexit handlers (logging, Prefect's workers and temporary server)
    gc.freeze()
    sys.exit(code)
