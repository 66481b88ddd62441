"""Data-parallel training on CPU (gloo): 2 ranks through torchrun, the same code as one rank."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml
from torch.nn.parallel import DistributedDataParallel

from vpr.shared.checkpoints import load_checkpoint
from vpr.shared.distributed import Ranks, gather_descriptors, my_batches, my_rows, my_share, same_buffers


def test_shares_and_batches_cover_everything_once_with_equal_steps():
    for n in (0, 1, 5, 12):
        for world in (1, 2, 3):
            shares = [my_share(n, Ranks(r, world)) for r in range(world)]
            assert sum((list(range(n))[s] for s in shares), []) == list(range(n))
    for n_batches in (1, 2, 5, 8):
        per_rank = [my_batches(n_batches, Ranks(r, 2)) for r in range(2)]
        assert len(per_rank[0]) == len(per_rank[1]) >= 1  # every rank steps as often: all-reduce never hangs
        assert len(set(per_rank[0]) & set(per_rank[1])) == 0 or n_batches < 2
    for n_rows, batch in ((7, 2), (8, 2), (3, 4)):  # the rows of each rank's batches: disjoint, in order
        rows = [my_rows(n_rows, batch, Ranks(r, 2)).tolist() for r in range(2)]
        assert rows[0] == sorted(rows[0]) and rows[1] == sorted(rows[1])
        assert not set(rows[0]) & set(rows[1]) or n_rows <= batch  # fewer batches than ranks: shared


def _gather_worker(rank: int, port: int, ids: np.ndarray, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        calls: list[int] = []

        def encode(some: np.ndarray) -> np.ndarray:
            calls.append(len(some))
            return np.stack([some * 1.5, some - 0.25], axis=1).astype(np.float32)

        got = gather_descriptors(ids, encode, 2, Ranks(rank, 2), torch.device("cpu"))
        np.save(f"{out}.{rank}.npy", got)
        np.save(f"{out}.{rank}.calls.npy", np.array(calls))

        # a training forward leaves each rank the BatchNorm statistics of its own batch; same_buffers gives rank 0's
        norm = torch.nn.BatchNorm1d(2)
        DistributedDataParallel(norm)(torch.arange(8, dtype=torch.float32).view(4, 2) * (rank + 1))
        np.save(f"{out}.{rank}.own.npy", norm.running_mean.numpy().copy())
        same_buffers(norm, Ranks(rank, 2))
        np.save(f"{out}.{rank}.synced.npy", torch.cat([norm.running_mean, norm.running_var]).numpy())
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gathered_descriptors_equal_the_single_process_ones_and_ranks_take_rank_0s_buffers(tmp_path):
    ids = np.arange(7, dtype=np.int64) * 10
    mp.spawn(_gather_worker, args=(_free_port(), ids, str(tmp_path / "g")), nprocs=2, join=True)
    single = np.stack([ids * 1.5, ids - 0.25], axis=1).astype(np.float32)
    for rank in range(2):
        np.testing.assert_array_equal(np.load(tmp_path / f"g.{rank}.npy"), single)
    assert sorted(int(np.load(tmp_path / f"g.{r}.calls.npy")[0]) for r in range(2)) == [3, 4]  # each a share
    own = [np.load(tmp_path / f"g.{r}.own.npy") for r in range(2)]
    assert not np.array_equal(own[0], own[1])
    np.testing.assert_array_equal(np.load(tmp_path / "g.0.synced.npy"), np.load(tmp_path / "g.1.synced.npy"))
    np.testing.assert_array_equal(np.load(tmp_path / "g.1.synced.npy")[:2], own[0])


def _cli_train(root, params, args: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vpr.cli", "-q", "train", *args, "--params", str(params)]
    return subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, env=env)


@pytest.mark.timeout(900)
def test_two_rank_training_learns_writes_once_and_resumes_on_one_rank(micro_project, prefect_harness, capfd, tmp_path):
    """The Prefect train task starts the ranks (``train.nproc: 2``); the CLI resumes the run on one."""
    from prefect import flow

    from tasks import run_stage

    root, cfg, layout = micro_project
    two_ranks = cfg.model_copy(update={"train": cfg.train.model_copy(update={"nproc": 2})})

    @flow(name="train-on-two-ranks")
    def train_on_two_ranks() -> dict:
        return run_stage(two_ranks, str(root), "train@netvlad")

    summary = train_on_two_ranks()
    assert summary["ranks"] == 2 and summary["epochs"] == cfg.train.epochs
    printed = [line for line in capfd.readouterr().out.splitlines() if line.startswith("{")]
    assert not printed, printed  # the launched ranks report through the task, not on stdout
    last = load_checkpoint(layout.last_checkpoint("netvlad"))
    assert last["ranks"] == 2 and last["epoch"] == cfg.train.epochs
    history = last["history"]
    assert history[-1]["loss"] < history[0]["loss"], [h["loss"] for h in history]
    # one writer: no temporaries left by a second one, one history row per epoch
    leftovers = [p.name for p in layout.models_dir.rglob("*") if p.name.startswith(".")]
    assert not leftovers, leftovers
    live = pl.read_csv(layout.live_dir("netvlad") / "plots/metrics/train/loss.tsv", separator="\t")
    assert live["step"].to_list() == list(range(1, cfg.train.epochs + 1))

    # resume the 2-rank run on one rank, one epoch further, from the command line
    longer = yaml.safe_load((root / "params.yaml").read_text())
    longer["train"]["epochs"] = cfg.train.epochs + 1
    (tmp_path / "longer.yaml").write_text(yaml.safe_dump(longer))
    proc = _cli_train(root, tmp_path / "longer.yaml", ["--head", "netvlad", "--resume", "--nproc", "1"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summaries) == 1 and summaries[0]["epochs"] == cfg.train.epochs + 1
    resumed = load_checkpoint(layout.last_checkpoint("netvlad"))
    assert resumed["ranks"] == 1 and resumed["history"][: cfg.train.epochs] == history


_RANK = """
import sys, time, torch
from vpr.shared.distributed import join_from_env, mean_over_ranks
ranks, _ = join_from_env(torch.device("cpu"), timeout_s=float(sys.argv[1]))
if ranks.rank == 1:
    time.sleep(600)  # frozen before the collective (killed by the test); rank 0 must not wait for it
else:
    mean_over_ranks([1.0], ranks)
"""


def _rank(rank: int, port: int, timeout_s: float) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "RANK": str(rank)}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), LOCAL_RANK=str(rank))
    cmd = [sys.executable, "-c", _RANK, str(timeout_s)]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.timeout(180)
def test_a_rank_that_never_joins_fails_the_others_within_ddp_timeout():
    alone = _rank(0, _free_port(), 2.0)
    try:
        _, err = alone.communicate(timeout=120)  # gloo's own default would wait 30 minutes
    finally:
        alone.kill()
    assert alone.returncode != 0
    assert "did not form within 2 s" in err and "resources.ddp_timeout_s" in err, err[-2000:]


@pytest.mark.timeout(180)
def test_a_rank_frozen_before_a_collective_fails_the_others_within_ddp_timeout():
    port = _free_port()
    procs = [_rank(r, port, 3.0) for r in (0, 1)]
    try:
        _, err = procs[0].communicate(timeout=120)
    finally:
        for p in procs:
            p.kill()
            p.communicate()
    assert procs[0].returncode != 0 and "timed out" in err.lower(), err[-2000:]
