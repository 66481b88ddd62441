"""torch's global random generator, shared safely by the threads of one process.

Module constructors and torchvision's random transforms draw from torch's single global generator.
Prefect runs tasks as threads of one process (``train-avg`` beside ``train-gem`` beside the untrained
baseline), so unguarded, one thread's draws or re-seeding land in the middle of another's model
construction, and the same params give different initial weights from run to run (the untrained
baseline then scored differently in the flow and under ``dvc repro``). Every vpr use of the
global generator goes through this lock; DataLoaders get private generators (``loader_kwargs``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

_LOCK = threading.RLock()


@contextmanager
def seeded_torch_rng(seed: int) -> Iterator[None]:
    """Run a block with the global generator seeded to ``seed``, one thread at a time, state restored after.

    Inside the block the draws are exactly those of ``torch.manual_seed(seed)`` in a fresh process.
    """
    with _LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def reseed_torch_rng(seed: int) -> None:
    """``torch.manual_seed`` that never lands inside another thread's seeded block."""
    with _LOCK:
        torch.manual_seed(seed)


class Locked:
    """A callable that draws from the global generator (a random transform), run under the lock."""

    def __init__(self, fn: Callable) -> None:
        self.fn = fn

    def __call__(self, *args, **kwargs):
        with _LOCK:
            return self.fn(*args, **kwargs)

    def __repr__(self) -> str:
        return f"Locked({self.fn!r})"
