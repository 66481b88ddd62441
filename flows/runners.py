"""The task runner a flow uses, chosen in ``params.yaml`` (``orchestration``): threads or Dask."""

from __future__ import annotations

from prefect.task_runners import ThreadPoolTaskRunner

from vpr.foundations.config import OrchestrationConfig


def make_task_runner(orch: OrchestrationConfig):
    """``threads``: a bounded thread pool (``max_workers``). ``dask``: ``prefect_dask.DaskTaskRunner`` on
    a local cluster of ``max_workers`` single-threaded worker processes, or joining the scheduler at
    ``dask_address`` (e.g. ``tcp://scheduler:8786``) to spread tasks over other machines."""
    if orch.task_runner == "dask":
        from prefect_dask import DaskTaskRunner

        if orch.dask_address:
            return DaskTaskRunner(address=orch.dask_address)
        import dask

        # ingest and shard use process pools of their own; daemonic workers may not start children
        dask.config.set({"distributed.worker.daemon": False})
        return DaskTaskRunner(
            cluster_kwargs={"n_workers": orch.max_workers, "threads_per_worker": 1, "dashboard_address": None}
        )
    return ThreadPoolTaskRunner(max_workers=orch.max_workers)
