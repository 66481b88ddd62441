"""Shared helpers for the fault suite: CLI subprocesses, a pausable victim, a released micro project."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RELEASE_OVERRIDES = {"train": {"epochs": 1, "queries_per_epoch": 4, "negatives": 2}, "index": {"head": "avg"}}


def env(**extra: str) -> dict:
    """Subprocess environment: this checkout's ``vpr`` first on the path, no telemetry, CPU only."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {
        **os.environ,
        "PYTHONPATH": path,
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "CUDA_VISIBLE_DEVICES": "",
        **extra,
    }


def vpr(root: Path, *args: str, timeout: float = 300, **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``vpr ARGS`` (the real CLI, a fresh interpreter) in project ``root``."""
    return subprocess.run(
        [sys.executable, "-m", "vpr.cli", *args],
        cwd=root,
        env=env(**extra_env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def start_victim(
    root: Path, marker: Path, target: str, count: int, *args: str, hold: str = "inf", **extra_env: str
) -> subprocess.Popen:
    """``vpr ARGS`` that pauses before the ``count``-th call of ``target`` (see ``tests.faults.victim``)."""
    cmd = [sys.executable, "-m", "tests.faults.victim", str(marker), target, str(count), str(hold), "--", *args]
    # its own process group, so that a test can clean up whatever a killed victim left behind
    return subprocess.Popen(
        cmd,
        cwd=root,
        env=env(**extra_env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for(marker: Path, proc: subprocess.Popen, timeout: float = 180) -> None:
    """Until the victim reached its pause point; fails (with its stderr) if it ended first."""
    deadline = time.monotonic() + timeout
    while not marker.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"victim exited with {proc.returncode} before its pause point:\n{out}\n{err}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"victim did not reach its pause point in {timeout} s")
        time.sleep(0.05)


def kill9(proc: subprocess.Popen) -> None:
    """SIGKILL the victim alone: no handler, no finally block, no atexit runs.

    Its worker processes (pools) must end on their own: the pipes they inherited close only when the
    last of them is gone. If any is still there after 30 s, the group is killed and the test fails.
    """
    os.kill(proc.pid, signal.SIGKILL)
    try:
        proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        pytest.fail("the killed process left worker processes running")
    assert proc.returncode == -signal.SIGKILL


def snapshot(folder: Path) -> dict[str, str]:
    """Relative path → sha256 of every file under ``folder``."""
    return {
        p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def copy_project(src: Path, dst: Path):
    """A private copy of a project: (root, cfg, layout)."""
    from vpr.foundations.config import load_config
    from vpr.foundations.layout import Layout

    shutil.copytree(src, dst)
    cfg = load_config(dst / "params.yaml")
    return dst, cfg, Layout.from_config(cfg, dst)


@pytest.fixture(scope="session")
def released_template(micro_template, tmp_path_factory):
    """The micro project with a trained ``avg`` head and its release (index.head = avg), built once."""
    from tests.micro import write_params
    from vpr.foundations.layout import Layout
    from vpr.steps.index import build_release
    from vpr.steps.train import train_head

    root = tmp_path_factory.mktemp("faults") / "released"
    shutil.copytree(micro_template, root)
    cfg = write_params(root, RELEASE_OVERRIDES)
    layout = Layout.from_config(cfg, root)
    train_head("avg", cfg, layout)
    build_release("avg", cfg, layout)
    return root


@pytest.fixture
def released(released_template, tmp_path):
    """A private copy of the released micro project: (root, cfg, layout)."""
    return copy_project(released_template, tmp_path / "released")
