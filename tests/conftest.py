"""Test isolation: Prefect and DVC never phone home and never touch the user's state."""

import os
import tempfile

_prefect_home = tempfile.mkdtemp(prefix="vpr-prefect-home-")
os.environ.setdefault("PREFECT_HOME", _prefect_home)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["DO_NOT_TRACK"] = "1"
os.environ["DVC_NO_ANALYTICS"] = "1"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
# ImageNet weights never come from the internet in tests: a closed local port refuses at once
# (tests/test_weights.py serves its own files on 127.0.0.1)
os.environ["VPR_IMAGENET_URL"] = "http://127.0.0.1:9/resnet18-f37072fd.pth"

import shutil  # noqa: E402

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def micro_template(tmp_path_factory):
    """A prepared micro project (synth → ingest → shard → mine), built once per session."""
    from tests.micro import build_micro_project

    root = tmp_path_factory.mktemp("micro") / "project"
    build_micro_project(root)
    return root


@pytest.fixture
def micro_project(micro_template, tmp_path):
    """A private copy of the prepared micro project: (root, cfg, layout)."""
    from vpr.foundations.config import load_config
    from vpr.foundations.layout import Layout

    root = tmp_path / "project"
    shutil.copytree(micro_template, root)
    cfg = load_config(root / "params.yaml")
    return root, cfg, Layout.from_config(cfg, root)


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server and database for the whole session (Prefect's own test harness)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):  # PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS
        yield


@pytest.fixture(scope="session")
def trained(prefect_harness, tmp_path_factory):
    """A micro project (git + DVC) on which train-all ran once: (root, first result, seconds).

    Tests that change it work on a ``tests.flowkit.clone_project`` copy.
    """
    import time

    from flows.train_all import train_all
    from tests.flowkit import make_dvc_project

    root = tmp_path_factory.mktemp("flows") / "project"
    make_dvc_project(root)
    t0 = time.perf_counter()
    result = train_all(root=str(root))
    return root, result, time.perf_counter() - t0
