"""Quiet logs: each warning once per process, none at start (subprocesses: a fresh interpreter each)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.flowkit import REPO

BUILDS = """
import threading
from vpr.foundations.config import ModelConfig
from vpr.shared.models import build_backbone, build_model

cfg = ModelConfig(weights="imagenet")
build_backbone(cfg)  # two call sites, then two threads (Prefect's workers): four builds, one fallback
build_backbone(cfg)
threads = [threading.Thread(target=build_model, args=("avg", cfg)) for _ in range(2)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print("built")
"""


def _python(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_random_init_warning_comes_once_per_process(tmp_path):
    """Offline, every model build falls back to random init: the warning (with what to do) comes once."""
    proc = _python(
        "-c",
        BUILDS,
        env={"TORCH_HOME": str(tmp_path / "torch"), "VPR_IMAGENET_URL": "http://127.0.0.1:9/resnet18-f37072fd.pth"},
    )
    assert proc.returncode == 0 and "built" in proc.stdout, proc.stderr
    assert proc.stderr.count("using random init") == 1, proc.stderr
    assert "vpr weights --fetch" in proc.stderr  # what to do about it


@pytest.mark.parametrize("module", ["flows.train_all", "flows.reindex", "flows.encode", "flows.serve"])
def test_python_m_flows_starts_without_a_runtime_warning(module):
    """``python -m flows.X`` (the docs' commands): the package no longer imports X before runpy runs it."""
    proc = _python("-W", "error::RuntimeWarning", "-m", module, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "RuntimeWarning" not in proc.stderr and proc.stdout.startswith("usage:"), proc.stderr
