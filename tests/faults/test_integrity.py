"""What is read back is checked, not trusted: a damaged descriptor-store entry or trunk cache is rebuilt
with a warning naming it (never indexed or trained on), a non-finite loss stops training before it can
replace a good checkpoint, and a full disk while indexing is one line, with the served release intact."""

from __future__ import annotations

import errno
import hashlib

import faiss
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from tests.faults.conftest import vpr
from tests.micro import write_params
from vpr.cli import app
from vpr.steps.index import current_version

pytestmark = pytest.mark.timeout(300)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_damaged_descriptor_entries_are_encoded_again_not_indexed(released):
    root, _, layout = released
    entries = sorted(layout.descriptors_dir.rglob("*.npy"))
    assert len(entries) >= 2
    truncated, overwritten = entries[0], entries[1]
    good = {p: p.read_bytes() for p in (truncated, overwritten)}
    truncated.write_bytes(good[truncated][: len(good[truncated]) // 2])
    header = len(good[overwritten]) - np.load(overwritten).nbytes
    noise = np.random.default_rng(0).standard_normal((len(good[overwritten]) - header) // 4).astype(np.float32)
    overwritten.write_bytes(good[overwritten][:header] + noise.tobytes())  # same size, valid .npy, wrong values

    proc = vpr(root, "index")
    assert proc.returncode == 0, proc.stderr
    for path in (truncated, overwritten):
        assert str(path.relative_to(root)) in proc.stderr and path.read_bytes() == good[path]  # named, encoded again


def test_a_damaged_trunk_cache_is_rebuilt_not_trained_on(released):
    root, _, layout = released
    cache = max(layout.trunk_cache_dir.glob("*/seg-*.pt"), key=lambda p: p.stat().st_size)  # the largest segment
    stored = torch.load(cache, weights_only=True)
    features, ids = stored["features"], stored["ids"]
    data = bytearray(cache.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4096] = np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    cache.write_bytes(bytes(data))
    stale_lock = layout.trunk_cache_dir / ".0123456789abcdef0123456789abcdef.lock"  # of a pruned cache
    stale_lock.touch()

    proc = vpr(root, "train", "--head", "avg")
    assert proc.returncode == 0, proc.stderr
    assert str(cache.relative_to(root)) in proc.stderr and "damaged" in proc.stderr
    assert not stale_lock.exists() and cache.with_name(cache.name + ".damaged").exists()  # set aside
    maps = {}
    for segment in cache.parent.glob("seg-*.pt"):
        kept = torch.load(segment, weights_only=True)
        maps.update({int(i): row for i, row in zip(kept["ids"], kept["features"])})
    assert all(torch.equal(maps[int(i)], features[n]) for n, i in enumerate(ids))  # encoded again, alike


def test_a_non_finite_loss_stops_training_and_keeps_the_good_checkpoint(released):
    root, _, layout = released
    checkpoint = layout.checkpoint("avg")
    before = _digest(checkpoint)
    write_params(root, {"train": {"lr": 1e30}})  # the first step overflows every weight

    proc = vpr(root, "train", "--head", "avg")
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith("error: avg epoch 1, batch "), proc.stderr
    assert "the loss is nan" in errors[0] or "the loss is inf" in errors[0]
    assert "Traceback" not in proc.stderr and _digest(checkpoint) == before


def test_a_full_disk_while_indexing_is_one_line_and_the_release_stays(released, monkeypatch):
    root, _, layout = released
    release_dir = layout.release_dir("avg")
    served = current_version(release_dir)

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device", str(release_dir / "index.faiss"))

    monkeypatch.setattr(faiss, "write_index", full)
    monkeypatch.chdir(root)
    result = CliRunner().invoke(app, ["index"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith("error: index: no space left on the device writing ")
    assert result.output.count("\n") == 1 and current_version(release_dir) == served
