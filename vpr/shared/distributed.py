"""Data-parallel training with PyTorch's own engine (``torch.distributed``; NCCL on GPUs, gloo on CPU).

``vpr train --head H --nproc N`` starts N ranks through ``torch.distributed.run`` (torchrun) on this
node; ``torchrun --nnodes ... -m vpr.cli train --head H`` spans several. A rank learns who it is from
torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_WORLD_SIZE``, ``MASTER_ADDR``/``PORT``).
Outside torchrun there is one rank and nothing here changes a thing.

What each rank does is in ``vpr.steps.train``: mining refreshes split their descriptor computation over the
ranks and all-gather the result (``gather_descriptors``), each rank steps on its share of the
triplet batches (``my_batches``) with gradients averaged by ``DistributedDataParallel``, after each
chunk's steps every rank takes rank 0's BatchNorm statistics (``same_buffers``), so every rank validates
the same model and takes the same decisions, and only rank 0 writes checkpoints, history and metrics.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

DDP_TIMEOUT_S = 300.0  # resources.ddp_timeout_s's default: a frozen rank stops the run after 5 minutes


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        """Whether this rank writes (checkpoints, history, metrics, logs)."""
        return self.rank == 0


def current() -> Ranks:
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


class RanksTimeout(RuntimeError):
    """The process group did not form in time: a rank never started, died or froze."""


def join_from_env(device: torch.device, timeout_s: float = DDP_TIMEOUT_S) -> tuple[Ranks, bool]:
    """Join the process group torchrun's environment describes; (ranks, whether this call created it).

    ``timeout_s`` (``resources.ddp_timeout_s``) bounds the wait for the other ranks to join and every
    collective after it: without it gloo waits 30 minutes (NCCL longer) for a frozen rank.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or (dist.is_available() and dist.is_initialized()):
        return current(), False
    if device.type == "cuda":  # one GPU per rank of this node: "cuda" now means this rank's
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    try:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    except (RuntimeError, TimeoutError) as exc:  # DistStoreError, gloo's connect timeout...
        where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RanksTimeout(
            f"rank {os.environ.get('RANK', '?')} of {world}: the process group at {where} did not form within "
            f"{timeout_s:g} s (another rank did not start, died or froze; resources.ddp_timeout_s sets this "
            f"bound): {reason}"
        ) from None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if device.type == "cpu":  # ranks of one node share its cores instead of each taking all of them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))
    return current(), True


def leave(created: bool) -> None:
    if created and dist.is_initialized():
        dist.destroy_process_group()


def my_share(n: int, ranks: Ranks) -> slice:
    """This rank's contiguous part of ``n`` items (the first ranks take one more when it does not divide)."""
    bounds = np.linspace(0, n, ranks.world + 1).round().astype(int)
    return slice(int(bounds[ranks.rank]), int(bounds[ranks.rank + 1]))


def gather_descriptors(
    ids: np.ndarray, encode: Callable[[np.ndarray], np.ndarray], dim: int, ranks: Ranks, device: torch.device
) -> np.ndarray:
    """``encode(ids)`` computed a share per rank and all-gathered: every rank gets all rows, in order."""
    if ranks.world == 1:
        return encode(ids)
    shares = [my_share(len(ids), Ranks(r, ranks.world)) for r in range(ranks.world)]
    sizes = [sh.stop - sh.start for sh in shares]
    local = encode(ids[shares[ranks.rank]]) if sizes[ranks.rank] else np.empty((0, dim), np.float32)
    comm = device if device.type == "cuda" else torch.device("cpu")  # NCCL gathers GPU tensors, gloo CPU ones
    padded = torch.zeros((max(sizes), dim), dtype=torch.float32, device=comm)
    padded[: len(local)] = torch.from_numpy(np.ascontiguousarray(local, dtype=np.float32)).to(comm)
    parts = [torch.empty_like(padded) for _ in range(ranks.world)]
    dist.all_gather(parts, padded)
    rows = [part[:size] for part, size in zip(parts, sizes)]
    return torch.cat(rows).cpu().numpy()


def my_batches(n_batches: int, ranks: Ranks) -> list[int]:
    """Indices of the batches this rank steps on: every ``world``-th, the same count on every rank.

    All ranks must take as many steps (each step all-reduces gradients), so the last incomplete round
    is dropped; with fewer batches than ranks, ranks share batches.
    """
    if ranks.world == 1:
        return list(range(n_batches))
    if n_batches < ranks.world:
        return [ranks.rank % n_batches] if n_batches else []
    rounds = n_batches // ranks.world
    return [r * ranks.world + ranks.rank for r in range(rounds)]


def my_rows(n_rows: int, batch: int, ranks: Ranks) -> np.ndarray:
    """Rows of a chunk's ``n_rows`` triplets in this rank's batches of ``batch`` (``my_batches``), in order."""
    mine = my_batches(math.ceil(n_rows / batch), ranks)
    return np.concatenate([np.arange(k * batch, min((k + 1) * batch, n_rows)) for k in mine] or [np.empty(0, int)])


def same_buffers(module: torch.nn.Module, ranks: Ranks) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics), in place.

    ``DistributedDataParallel`` broadcasts rank 0's buffers at the start of each training forward, so
    after a step each rank holds what its own batch left. Encoding then (mining and validation: each
    rank encodes a share) would mix the ranks' statistics, and a run resumed from rank 0's checkpoint
    would not repeat the uninterrupted one.
    """
    if ranks.world == 1:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer, src=0)


def mean_over_ranks(values: Sequence[float], ranks: Ranks) -> float:
    """The mean of every rank's ``values`` together (the epoch loss of the whole run)."""
    total = torch.tensor([float(np.sum(values)), float(len(values))], dtype=torch.float64)
    if ranks.world > 1:
        dist.all_reduce(total)
    return float(total[0] / max(total[1], 1.0))


def launch(nproc: int, argv: Sequence[str], cwd: str | os.PathLike | None = None) -> int:
    """Run ``python -m vpr.cli ARGV`` as ``nproc`` ranks on this node through torchrun; its exit status."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    return subprocess.call([*cmd, "-m", "vpr.cli", *argv], cwd=cwd)
