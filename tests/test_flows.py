"""Prefect orchestration under the test harness: train-all (+ cache, + DVC), reindex, deployments, Dask."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.flowkit import REPO, clone_project, exif_photo, make_dvc_project, run, truncated_jpeg
from vpr.foundations.config import load_config
from vpr.foundations.layout import Layout, image_id
from vpr.foundations.registry import head_names
from vpr.shared.shardio import read_index
from vpr.steps.catalog import read_catalog

pytestmark = pytest.mark.timeout(900)

HEADS = list(head_names())
SPLITS = ["train", "val", "test"]
PIPELINE_STEPS = {
    "ingest",
    *(f"shard@{s}" for s in SPLITS),
    *(f"mine@{s}" for s in SPLITS),
    *(f"train@{h}" for h in HEADS),
    *(f"evaluate@{h}" for h in HEADS),
    "baseline",
    "index",
    "report",
}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- train-all


def test_train_all_completes_with_results_and_artifacts(trained):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterTextSearch

    root, result, _ = trained
    assert set(result["steps"]) == PIPELINE_STEPS
    assert all(state == "Completed" for state in result["steps"].values()), result["steps"]
    models = [r["model"] for r in result["results"]]
    assert models == [*HEADS, "avg-untrained"]
    assert all(0.0 <= r["R@1"] <= r["R@5"] <= 100.0 for r in result["results"])
    layout = Layout.from_config(load_config(root / "params.yaml"), root)
    for head in HEADS:
        assert layout.checkpoint(head).exists() and layout.metrics_file(head).exists()
    assert (layout.release_dir("netvlad") / "CURRENT").exists()
    assert Path(result["report"]).exists()
    with get_client(sync_client=True) as client:
        keys = {a.key for a in client.read_artifacts()}
        # the library's package logger reaches the task runs' logs (per-epoch lines of every head)
        logs = client.read_logs(LogFilter(text=LogFilterTextSearch(query="val R@1")))
    assert {"train-all-results", "train-all-report"} <= keys
    epoch_logs = [log for log in logs if log.name == "vpr.steps.train"]
    assert epoch_logs and all(log.task_run_id for log in epoch_logs)
    assert {log.message.split()[0] for log in epoch_logs} == set(HEADS)


def test_heads_train_one_at_a_time_by_default(trained):
    """``orchestration.train_lanes: 1``: no two training task runs overlap (they would only contend)."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = [
            r
            for r in client.read_task_runs()
            if r.name in {f"train@{h}" for h in HEADS} and r.state_name == "Completed"
        ]
    spans = sorted((r.start_time, r.end_time) for r in runs)
    assert len(spans) >= len(HEADS)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), [
        (r.name, r.start_time.time(), r.end_time.time()) for r in sorted(runs, key=lambda r: r.start_time)
    ]


def test_evaluations_run_beside_the_remaining_trainings(trained):
    """evaluate@avg needs only train@avg: its work (encoding its shards, then searching) starts beside the
    next training, train@gem (max_workers 2), not after the first three trainings as when waiting tasks
    held the workers."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = [r for r in client.read_task_runs() if r.state_name == "Completed" and r.start_time]
    by_flow: dict = {}
    for r in runs:
        by_flow.setdefault(r.flow_run_id, {})[r.name] = r
    full = [rs for rs in by_flow.values() if {f"train@{h}" for h in HEADS} | {"evaluate@avg"} <= set(rs)]
    assert full
    for rs in full:  # evaluate@avg's work starts with its shards' encode tasks
        work = [r for name, r in rs.items() if name == "evaluate@avg" or name.endswith("[evaluate@avg]")]
        assert min(r.start_time for r in work) < rs["train@gem"].end_time


def test_the_flow_ran_dvcs_graph(trained):
    """The task runs' wait_for edges are exactly dvc.yaml's graph plus the training lanes."""
    from prefect.client.orchestration import get_client

    from flows.train_all import task_graph
    from tasks.cache import stage_specs

    root = trained[0]
    expected = {(s, u) for s, us in task_graph(stage_specs(root), lanes=1).items() for u in us}
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs()
    by_flow: dict = {}
    for r in runs:
        by_flow.setdefault(r.flow_run_id, []).append(r)
    complete = [rs for rs in by_flow.values() if PIPELINE_STEPS <= {r.name for r in rs}]
    assert complete
    for rs in complete:
        name = {r.id: r.name for r in rs}
        edges = {(r.name, name[i.id]) for r in rs for i in r.task_inputs.get("wait_for", [])}
        assert {(s, u) for s, u in edges if s in PIPELINE_STEPS and u in PIPELINE_STEPS} == expected
        # a stage that reads descriptors waits for its shards' encode tasks, which wait for its upstream
        encodes = {u for s, u in edges if s == "evaluate@avg" and u.startswith("encode@")}
        assert encodes and all(u.endswith("[evaluate@avg]") for u in encodes)
        upstream = {u for s, u in edges if s == "evaluate@avg" and u in PIPELINE_STEPS}
        assert all({u for s, u in edges if s == e} == upstream for e in encodes)


def test_train_all_leaves_dvc_clean_and_repro_has_nothing_to_do(trained):
    root, result, _ = trained
    assert "data.dvc" in result["dvc"]["recorded"] and "train@crn" in result["dvc"]["recorded"]
    assert "up to date" in run(root, sys.executable, "-m", "dvc", "status")
    out = run(root, sys.executable, "-m", "dvc", "repro")
    assert "Running stage" not in out, out
    assert "up to date" in out


def _run_log(flow_run_id) -> list:
    """The log records of one flow run itself (not of its task runs or subflows), oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    APILogHandler().flush()  # records still queued in this process reach the API first
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])), limit=200)
    return sorted((log for log in logs if log.task_run_id is None), key=lambda log: log.timestamp)


def test_train_all_shows_each_stage_in_its_own_run_log(trained):
    """``prefect deployment run train-all/train-all --watch`` and the UI follow the train-all run itself, whose
    tasks sit in a subflow: each stage's start and finish, the cache hits and the table are in its own log."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    root = trained[0]
    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["train-all"])))
    first = min((r for r in runs if r.parameters.get("root") == str(root)), key=lambda r: r.start_time)
    lines = [log.message for log in _run_log(first.id)]
    for stage in PIPELINE_STEPS:
        assert any(line.startswith(f"started  {stage} (") for line in lines), (stage, lines)
        assert any(line.startswith(f"finished {stage}: ran ") for line in lines), (stage, lines)
    n = len(PIPELINE_STEPS)
    assert any(line.startswith(f"stages: {n} of {n} done in ") and "0 cache hits and" in line for line in lines)
    assert sum(line.startswith("Recall@N on the test split") for line in lines) == 1, lines


def test_second_train_all_run_hits_the_cache(trained):
    from flows.train_all import train_all

    root, first, _ = trained
    layout = Layout.from_config(load_config(root / "params.yaml"), root)
    before = {h: _sha(layout.checkpoint(h)) for h in HEADS}
    state = train_all(root=str(root), record_dvc=False, return_state=True)
    second = state.result()
    assert all(state == "Cached" for state in second["steps"].values()), second["steps"]
    assert second["results"] == first["results"]
    assert {h: _sha(layout.checkpoint(h)) for h in HEADS} == before  # nothing retrained
    # the run's own log counts them: every stage a cache hit
    lines = [log.message for log in _run_log(state.state_details.flow_run_id)]
    n = len(PIPELINE_STEPS)
    assert sum(line.startswith("finished ") and ": cache hit (" in line for line in lines) == n, lines
    assert any(line.startswith(f"stages: {n} of {n} done") and f"{n} cache hits and 0 ran" in line for line in lines)


def test_python_m_flows_train_all_prints_the_table_once_and_no_runtime_warning(trained):
    """The README's command, in a process of its own (all cache hits): no runpy RuntimeWarning, the stage
    lines on the console, the results table once (it was printed by the flow and again by ``main``), and
    torch never imported (seconds of a cached re-run's start and exit: no step runs, none needs it)."""
    root = trained[0]
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "flows.train_all", "--root", str(root), "--no-dvc"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "RuntimeWarning" not in out and "found in sys.modules" not in out, out
    assert "finished train@netvlad: cache hit" in out, out
    headers = [line for line in out.splitlines() if line.startswith("model ") and "R@1" in line]
    assert len(headers) == 1, out  # the table's header row, once
    imported = {line.rpartition("|")[2].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
    assert "prefect" in imported and not imported & {"torch", "torchvision", "vpr.steps.evaluate"}


def test_a_cached_rerun_skips_the_dvc_record_until_a_file_changes(trained):
    """Nothing changed since the last record: no ``dvc commit`` (it cost most of a cached re-run); a
    touched output is recorded again, and DVC stays clean either way."""
    from flows.train_all import train_all

    root, _, _ = trained
    unchanged = train_all(root=str(root))
    assert unchanged["dvc"]["recorded"] == [] and "train@crn" in unchanged["dvc"]["current"]
    assert "up to date" in run(root, sys.executable, "-m", "dvc", "status")
    os.utime(root / "dvc.lock")  # what a hand edit or another tool would leave
    touched = train_all(root=str(root))
    assert "train@crn" in touched["dvc"]["recorded"]
    assert "up to date" in run(root, sys.executable, "-m", "dvc", "status")


def test_cache_key_follows_dvc_stage_inputs(trained):
    from tasks.cache import stage_key

    root, _, _ = trained
    cfg = load_config(root / "params.yaml")
    keys = {s: stage_key(root, s, cfg) for s in ("shard@test", "mine@test", "train@avg")}
    other = cfg.model_copy(update={"mining": cfg.mining.model_copy(update={"test_positive_m": 30.0})})
    assert stage_key(root, "mine@test", other) != keys["mine@test"]  # its params section changed
    assert stage_key(root, "shard@test", other) == keys["shard@test"]  # an unrelated section did not matter
    assert stage_key(root, "report", cfg) is not None and stage_key(root, "no-such-stage", cfg) is None


def test_missing_outputs_force_the_step_to_run(trained):
    from flows.train_all import train_all_steps
    from tasks.cache import outputs_present

    root = trained[0]
    shutil.rmtree(root / "artifacts" / "mining")
    assert not outputs_present(root, "mine@test")  # a cache record alone must not stand in for the files
    result = train_all_steps(str(root / "params.yaml"), str(root), record_dvc=False)
    assert result["steps"]["mine@test"] == "Completed" and (root / "artifacts" / "mining" / "test.parquet").exists()
    # the same mining tables again: every step downstream is still a cache hit
    assert {s for s, state in result["steps"].items() if state != "Cached"} == {f"mine@{s}" for s in SPLITS}


# --------------------------------------------------------------------------- reindex


def _drop_batch(root: Path) -> dict:
    """One datasets_vg image, one EXIF-GPS photo, one broken file, from the test split's queries."""
    from vpr.foundations.geo import parse_name

    queries = sorted((root / "data/images/test/queries").iterdir())
    inbox = root / "inbox"
    inbox.mkdir(exist_ok=True)
    named = shutil.copy(queries[0], inbox / queries[0].name)
    geo = parse_name(queries[1].name)
    photo = exif_photo(queries[1], inbox / "IMG_0001.jpg", geo.lat, geo.lon, heading=90.0)
    broken = truncated_jpeg(queries[2], inbox / "@590000.00@4477000.00@.jpg")
    return {"named": Path(named), "photo": photo, "broken": broken, "photo_source": queries[1]}


def _locate(layout: Layout, images: list[Path]) -> list[dict]:
    from vpr.steps.locate import locate

    return locate(images, layout.release_dir("netvlad"), top_k=5)


def test_reindex_adds_batch_quarantines_broken_and_repeats_as_noop(trained, tmp_path):
    from prefect.client.orchestration import get_client

    from flows.reindex import CONCURRENCY_LIMIT, reindex
    from vpr.steps.index import load_release

    root = clone_project(trained[0], tmp_path / "project")
    cfg = load_config(root / "params.yaml")
    layout = Layout.from_config(cfg, root)
    old_tars = {p.relative_to(layout.shards_dir).as_posix(): _sha(p) for p in layout.shards_dir.rglob("*.tar")}
    n_before = load_release(layout.release_dir("netvlad")).index.ntotal
    n_catalog = read_catalog(layout.catalog_dir).height
    files = _drop_batch(root)

    summary = reindex(root=str(root))

    assert len(summary["added"]) == 2 and {a["source"] for a in summary["added"]} == {"name", "exif"}
    assert [r["inbox"] for r in summary["rejected"]] == [files["broken"].name]
    assert summary["rejected"][0]["reason"] == "truncated image"
    quarantined = root / "inbox" / summary["rejected"][0]["quarantined"]
    assert quarantined.exists() and Path(str(quarantined) + ".reason.txt").read_text().startswith("truncated")
    # release, shard index and catalog all grew by the two images, under new ids
    release = load_release(layout.release_dir("netvlad"))
    assert release.index.ntotal == n_before + 2
    new_ids = {a["id"] for a in summary["added"]}
    assert len(new_ids) == 2 and new_ids <= set(release.ids["id"].to_list())
    assert all(a["id"] == image_id("test", a["path"]) for a in summary["added"])  # what a rebuild will give
    assert read_catalog(layout.catalog_dir).height == n_catalog + 2
    index = read_index(layout.shards_dir, ("test",))  # each id is its path's, inside the test split's range
    assert all(image_id("test", p) == i for p, i in index.select("path", "id").iter_rows())
    # existing shards untouched; files moved into the data tree; the inbox holds only the quarantine
    assert {n: _sha(layout.shards_dir / n) for n in old_tars} == old_tars
    assert len(list(layout.shards_dir.rglob("*.tar"))) == len(old_tars) + 1
    assert all((layout.data / a["path"]).exists() for a in summary["added"])
    assert [p.name for p in (root / "inbox").iterdir()] == ["quarantine"]
    # locate finds the EXIF photo at its own new id
    answer = _locate(layout, [files["photo_source"]])[0]
    photo_id = next(a["id"] for a in summary["added"] if a["source"] == "exif")
    assert answer["ok"] and photo_id in [m["id"] for m in answer["matches"][:2]]
    # recorded in DVC: the raw data and the stages that own catalog, shards and release are clean
    assert set(summary["dvc"]["recorded"]) == {"data.dvc", "ingest", "shard@test", "index"}
    status = run(root, sys.executable, "-m", "dvc", "status", "data.dvc", "ingest", "shard@test", "index")
    assert "up to date" in status, status
    # summary artifact and the one-at-a-time limit
    with get_client(sync_client=True) as client:
        assert "reindex-summary" in {a.key for a in client.read_artifacts()}
        assert client.read_global_concurrency_limit_by_name(CONCURRENCY_LIMIT).limit == 1

    version = (layout.release_dir("netvlad") / "CURRENT").read_text()
    catalog_sha = _sha(layout.catalog("test"))
    again = reindex(root=str(root))
    assert again["added"] == [] and again["rejected"] == []
    assert (layout.release_dir("netvlad") / "CURRENT").read_text() == version
    assert _sha(layout.catalog("test")) == catalog_sha


def test_reindexing_the_test_database_reruns_only_what_reads_it(prefect_harness, tmp_path):
    """New imagery in one split's database: the next train-all reuses every training step from cache.

    A project of its own: cache keys include the project folder (results name files in it), so a clone
    of ``trained`` would share none of its cache records.
    """
    from flows.reindex import reindex
    from flows.train_all import train_all

    root = tmp_path / "project"
    make_dvc_project(root)
    train_all(root=str(root))
    layout = Layout.from_config(load_config(root / "params.yaml"), root)
    checkpoints = {h: _sha(layout.checkpoint(h)) for h in HEADS}
    catalogs = {s: _sha(layout.catalog(s)) for s in ("train", "val")}
    _drop_batch(root)
    added = {a["id"]: a["path"] for a in reindex(root=str(root))["added"]}
    assert len(added) == 2
    stale = run(root, sys.executable, "-m", "dvc", "status")  # DVC agrees: no training is out of date
    assert "mine@test" in stale and "evaluate@avg" in stale and "train@" not in stale and "shard@train" not in stale

    result = train_all(root=str(root))

    rerun = {s for s, state in result["steps"].items() if state != "Cached"}
    # ingest checks the whole dataset (duplicates across splits), so it runs again; its train and val
    # tables come out byte for byte the same, so nothing downstream of them runs
    assert rerun == {
        "ingest",
        "shard@test",
        "mine@test",
        *(f"evaluate@{h}" for h in HEADS),
        "baseline",
        "index",
        "report",
    }
    assert {s: _sha(layout.catalog(s)) for s in ("train", "val")} == catalogs
    assert {h: _sha(layout.checkpoint(h)) for h in HEADS} == checkpoints
    assert "up to date" in run(root, sys.executable, "-m", "dvc", "status")
    from vpr.shared.release import load_release

    served = load_release(layout.release_dir(load_config(root / "params.yaml").index.head)).ids
    assert {i: p for i, p in served.select("id", "path").iter_rows() if i in added} == added  # ids still answer


def test_crash_after_new_shards_keeps_previous_index_serving(trained, tmp_path, monkeypatch):
    import vpr.steps.reindex
    from flows.reindex import reindex

    root = clone_project(trained[0], tmp_path / "project")
    layout = Layout.from_config(load_config(root / "params.yaml"), root)
    probes = sorted((root / "data/images/test/queries").iterdir())[3:6]
    before = _locate(layout, probes)
    version = (layout.release_dir("netvlad") / "CURRENT").read_text()
    catalog_sha, index_sha = _sha(layout.catalog("test")), _sha(layout.split_shards("test") / "index.parquet")
    files = _drop_batch(root)

    def crash(step: str) -> None:
        if step == "shards-written":
            raise RuntimeError("injected crash after the new shards were written")

    monkeypatch.setattr(vpr.steps.reindex, "reached", crash)
    with pytest.raises(RuntimeError, match="injected crash"):
        reindex(root=str(root), record_dvc=False)
    pending = json.loads((root / "artifacts/reindex/pending.json").read_text())
    new_tars = {it["shard"] for it in pending["items"]}
    assert all((layout.split_shards("test") / t).exists() for t in new_tars)  # the crash came after the tars
    # nothing that serves changed: same release version, same catalog and shard index, same answers
    assert (layout.release_dir("netvlad") / "CURRENT").read_text() == version
    assert (
        _sha(layout.catalog("test")) == catalog_sha and _sha(layout.split_shards("test") / "index.parquet") == index_sha
    )
    assert _locate(layout, probes) == before
    assert files["named"].exists() and files["photo"].exists()

    monkeypatch.undo()
    summary = reindex(root=str(root), record_dvc=False)
    assert summary["resumed"] and {a["id"] for a in summary["added"]} == {it["id"] for it in pending["items"]}
    assert not (root / "artifacts/reindex/pending.json").exists()
    after = _locate(layout, [files["photo_source"]])[0]
    assert {a["id"] for a in summary["added"]} & {m["id"] for m in after["matches"]}


def test_a_second_reindex_waits_for_the_running_one(trained, tmp_path):
    from prefect.concurrency.sync import concurrency

    from flows.reindex import CONCURRENCY_LIMIT, ensure_concurrency_limit, reindex

    root = clone_project(trained[0], tmp_path / "project")
    ensure_concurrency_limit()
    with concurrency(CONCURRENCY_LIMIT, occupy=1, strict=True):  # a run in progress holds the only slot
        with pytest.raises(TimeoutError):
            reindex(root=str(root), wait_timeout_s=2)
    assert reindex(root=str(root), wait_timeout_s=30)["added"] == []  # slot free again: runs


# --------------------------------------------------------------------------- deployments, runners


def test_served_deployments_and_reindex_cron_from_params(trained):
    from flows.serve import build_deployments

    root = trained[0]
    cfg = load_config(root / "params.yaml")
    deployments = {f"{d.flow_name}/{d.name}": d for d in build_deployments("params.yaml", str(root))}
    assert set(deployments) == {"train-all/train-all", "reindex/reindex"}
    assert deployments["train-all/train-all"].schedules == []
    crons = [s.schedule.cron for s in deployments["reindex/reindex"].schedules]
    assert crons == [cfg.orchestration.reindex_cron] == ["7 */2 * * *"]
    assert deployments["reindex/reindex"].concurrency_limit == 1
    # a manual run seconds before a scheduled one waits its turn, never cancelled unseen
    assert deployments["reindex/reindex"].concurrency_options.collision_strategy == "ENQUEUE"
    assert deployments["train-all/train-all"].parameters == {"params": str(root / "params.yaml"), "root": str(root)}


def test_prefect_yaml_matches_the_flows_and_params():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    by_name = {d["name"]: d for d in spec["deployments"]}
    assert by_name["train-all"]["entrypoint"] == "flows/train_all.py:train_all"
    assert by_name["reindex"]["entrypoint"] == "flows/reindex.py:reindex"
    cron = load_config(REPO / "params.yaml").orchestration.reindex_cron
    assert [s["cron"] for s in by_name["reindex"]["schedules"]] == [cron]
    assert by_name["reindex"]["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}
    pools = {d["work_pool"]["name"] for d in spec["deployments"]}
    assert len(pools) == 1


def test_task_runner_comes_from_params():
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.runners import make_task_runner
    from vpr.foundations.config import OrchestrationConfig

    threads = make_task_runner(OrchestrationConfig(max_workers=3))
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 3
    assert isinstance(make_task_runner(OrchestrationConfig(task_runner="dask")), DaskTaskRunner)
    remote = make_task_runner(OrchestrationConfig(task_runner="dask", dask_address="tcp://10.0.0.1:8786"))
    assert remote.address == "tcp://10.0.0.1:8786"


def test_dask_runner_runs_the_shard_step_on_a_local_cluster(prefect_harness, micro_project):
    from prefect import flow, task

    import tasks
    from flows.runners import make_task_runner
    from vpr.foundations.config import OrchestrationConfig
    from vpr.shared.shardio import ShardReader

    root, cfg, layout = micro_project
    shutil.rmtree(layout.shards_dir)

    @task
    def worker_pid() -> int:
        return os.getpid()

    runner = make_task_runner(OrchestrationConfig(task_runner="dask", max_workers=1))

    @flow(task_runner=runner)
    def shard_on_dask() -> tuple[dict, int]:
        shard = tasks.run_stage.submit(cfg, str(root), "shard@test")
        return shard.result(), worker_pid.submit().result()

    result, pid = shard_on_dask()
    assert pid != os.getpid()  # tasks ran in the cluster's worker process
    assert Path(result["index"]).exists()
    assert len(ShardReader(layout.shards_dir, ("test",))) == read_catalog(layout.catalog_dir, ("test",)).height


def test_prefect_yaml_deploys_to_a_process_pool_and_a_worker_runs_it(prefect_harness, tmp_path):
    """`prefect deploy --all` with prefect.yaml, then one process worker picks a reindex run up."""
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    project = tmp_path / "checkout"
    project.mkdir()
    for name in ("flows", "tasks", "vpr"):
        shutil.copytree(REPO / name, project / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("prefect.yaml", "params.yaml"):
        shutil.copy(REPO / name, project / name)
    prefect = [sys.executable, "-m", "prefect"]
    api = {"PREFECT_API_URL": PREFECT_API_URL.value()}

    def cli(*args: str, cwd: Path = project) -> str:
        import subprocess

        from tests.flowkit import env

        proc = subprocess.run(
            [*prefect, *args], cwd=cwd, env={**env(), **api}, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, f"prefect {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
        return proc.stdout

    cli("work-pool", "create", "vpr-process", "--type", "process", "--overwrite")
    cli("deploy", "--all", "--no-prompt")
    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name("reindex/reindex")
        assert deployment.work_pool_name == "vpr-process"
        assert [s.schedule.cron for s in deployment.schedules] == ["*/15 * * * *"]
        client.read_deployment_by_name("train-all/train-all")
        run_id = client.create_flow_run_from_deployment(deployment.id).id
    cli("worker", "start", "--pool", "vpr-process", "--run-once", cwd=tmp_path)
    with get_client(sync_client=True) as client:
        state = client.read_flow_run(run_id).state
    assert state.is_completed(), state


def test_make_up_waits_for_a_real_api_and_gives_up_on_a_silent_port(tmp_path):
    """``make up`` starts ``serve`` only once the server answers (``flows.wait_for_api``), bounded."""
    import http.server
    import socket
    import threading

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server API
            self.send_response(200 if self.path == "/api/health" else 404)
            self.end_headers()
            self.wfile.write(b"true")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        up = run(REPO, sys.executable, "-m", "flows.wait_for_api", f"http://127.0.0.1:{server.server_port}/api")
        assert up == ""
    finally:
        server.shutdown()
    with socket.socket() as s:  # a port with nothing behind it
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run(
        [sys.executable, "-m", "flows.wait_for_api", f"http://127.0.0.1:{port}/api", "--timeout", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and "no Prefect API" in proc.stderr
    makefile = (REPO / "Makefile").read_text()
    assert "-m flows.up " in makefile.split("\nup:")[1].split("\n\n")[0]
    assert "wait_for_api(" in (REPO / "flows" / "up.py").read_text()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _processes_in_groups(groups: set[int]) -> set[int]:
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) in groups and fields[0] != "Z":
            found.add(int(stat.parent.name))
    return found


def test_make_up_then_make_down_leaves_no_process_behind(tmp_path):
    """``make up`` in the background (a real Prefect server, then the served deployments), then ``make down``
    from elsewhere: make, the launcher, the server, serve and whatever they started are all gone."""
    import signal
    import urllib.request

    home, port = tmp_path / "prefect-home", _free_port()
    # this interpreter's environment instead of .venv (its stamp taken as built: nothing is installed)
    make = ["make", "-s", "-o", ".venv/.installed", f"BIN={Path(sys.executable).parent}", f"PREFECT_HOME={home}"]
    make.append(f"PREFECT_PORT={port}")
    log = tmp_path / "up.log"
    with open(log, "w") as out:  # its own session: whatever happens, the finally below can end all of it
        up = subprocess.Popen([*make, "up"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    state = home / "up.json"
    groups: set[int] = set()
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and up.poll() is None:
            if state.exists() and "serve" in (recorded := json.loads(state.read_text()))["groups"]:
                groups = set(recorded["groups"].values())
                break
            time.sleep(0.5)
        assert groups, f"make up did not start both (status {up.poll()}):\n{log.read_text()}"
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=10) as response:
            assert response.status == 200
        started = {up.pid, recorded["pid"], *_processes_in_groups(groups)}
        assert len(started) >= 4 and all(_running(pid) for pid in started)

        down = subprocess.run([*make, "down"], cwd=REPO, capture_output=True, text=True, timeout=120)
        assert down.returncode == 0 and "down: stopped server, serve" in down.stdout, down.stdout + down.stderr
        up.wait(timeout=60)  # make itself ends once its launcher has
        assert not [pid for pid in started if _running(pid)]
        assert not _processes_in_groups(groups) and not state.exists()
        with pytest.raises(OSError):  # nothing listens on the port any more
            urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=5)
    finally:
        for pgid in groups:  # only if the test failed half-way: leave nothing running
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
            up.wait()
