"""`dvc repro` never takes away what is being served (issue 17, case 4): during a forced rebuild of the
release every `locate` answers (from the previous version, then the new one), version numbers keep
counting, and a failed shard rebuild leaves the previous shards in place."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

from tests.faults.conftest import snapshot
from tests.flowkit import clone_project, env, run
from vpr.foundations.config import load_config
from vpr.foundations.layout import Layout
from vpr.steps.index import current_version
from vpr.steps.locate import locate

pytestmark = pytest.mark.timeout(900)


def _project(trained, tmp_path):
    root = clone_project(trained[0], tmp_path / "project")
    cfg = load_config(root / "params.yaml")
    return root, cfg, Layout.from_config(cfg, root)


def test_locate_keeps_answering_during_dvc_repro_of_the_index(trained, tmp_path):
    root, cfg, layout = _project(trained, tmp_path)
    release = layout.release_dir(cfg.index.head)
    first = current_version(release).name
    query = sorted((layout.data / "images/test/queries").iterdir())[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "-f", "-s", "index"],
        cwd=root,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    answered, failures, versions = 0, [], set()
    while proc.poll() is None:
        try:
            (answer,) = locate([query], release, top_k=3)
            answered += answer["ok"]
            versions.add(current_version(release).name)
        except Exception as exc:  # noqa: BLE001 - every failure is the finding
            failures.append(f"{type(exc).__name__}: {exc}")
        time.sleep(0.05)
    out = proc.communicate()[0]
    assert proc.returncode == 0, out
    assert failures == [] and answered > 0
    last = current_version(release).name
    assert int(last[1:]) > int(first[1:])  # numbering continues; nothing restarted at v000001
    assert first in versions or last in versions
    assert "up to date" in run(root, sys.executable, "-m", "dvc", "status", "index")


def test_a_failed_shard_rebuild_under_dvc_keeps_the_previous_shards(trained, tmp_path):
    root, _, layout = _project(trained, tmp_path)
    shards = layout.split_shards("test")
    before = snapshot(shards)
    a, b = sorted((layout.data / "images/test/database").iterdir())[:2]
    shutil.copy(b, a)  # the cataloged bytes changed: `vpr shard` refuses (re-run ingest first)
    proc = subprocess.run(
        [sys.executable, "-m", "dvc", "repro", "-s", "shard@test"],
        cwd=root,
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode != 0 and "changed since it was cataloged" in proc.stdout + proc.stderr
    assert snapshot(shards) == before
