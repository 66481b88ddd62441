"""A real Dask cluster on 127.0.0.1: ``dask scheduler`` and two ``dask worker`` processes, each in a
folder of its own (as on other machines), encode a micro project's shards read over HTTP; the
descriptors come back to the flow's project store. Where mount namespaces are allowed (root), each
worker sees an empty folder where the project is, so it cannot read the project at all. One worker is
killed mid-shard: Dask gives its shard to the other, and the store equals a one-process encode bit for
bit, with nothing half-written."""

from __future__ import annotations

import functools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import psutil
import pytest
import yaml

from vpr.foundations.config import load_config
from vpr.foundations.layout import Layout
from vpr.shared.descstore import encode_named_shards

REPO = Path(__file__).resolve().parents[1]
STAGE = "baseline"  # the untrained avg model: no training needed to encode with it


class GatedShards(ThreadingHTTPServer):
    """Serves the shard folder; the first shard asked for is held until the test lets it go."""

    daemon_threads = True

    def __init__(self, folder: Path) -> None:
        handler = functools.partial(_Handler, directory=str(folder))
        super().__init__(("127.0.0.1", 0), handler)
        self.held = threading.Event()  # a worker is waiting for the gated shard
        self.release = threading.Event()
        self.asked: list[str] = []
        self.held_client: tuple[str, int] | None = None


class _Handler(SimpleHTTPRequestHandler):
    server: GatedShards

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        srv = self.server
        srv.asked.append(self.path)
        if self.path.endswith(".tar") and not srv.held.is_set():
            srv.held_client = self.client_address
            srv.held.set()
            srv.release.wait(120)
        try:
            super().do_GET()
        except (BrokenPipeError, ConnectionResetError):  # the worker that asked was killed
            pass

    def log_message(self, *args) -> None:
        pass


def _can_hide_folders() -> bool:
    """Whether a process may get its own mount namespace (root, or a user namespace allowed)."""
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True) if shutil.which("unshare") else None
    return probe is not None and probe.returncode == 0


def _spawn(args: list[str], cwd: Path, log: Path, *, hide: Path | None = None) -> subprocess.Popen:
    """``python -m args``; with ``hide``, in a mount namespace where that folder is an empty tmpfs."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", *args]
    if hide is not None:
        env.update(HOME=str(cwd), PREFECT_HOME=str(cwd / ".prefect"))
        cmd = ["unshare", "-m", "sh", "-c", 'mount -t tmpfs elsewhere "$0" && exec "$@"', str(hide), *cmd]
    out = open(log, "w")  # noqa: SIM115 (closed with the process)
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _stop(procs: list[subprocess.Popen]) -> None:
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)


def _store(layout: Layout) -> dict[str, bytes]:
    """Every entry of a descriptor store: key → the descriptors' bytes (checked to load)."""
    return {p.stem: np.load(p).tobytes() for p in sorted(layout.descriptors_dir.rglob("*.npy"))}


@pytest.mark.timeout(300)
def test_two_dask_workers_elsewhere_encode_over_http_and_survive_a_killed_worker(
    micro_template, prefect_harness, tmp_path
):
    from distributed import Client

    from flows.encode import encode_shards
    from tests.micro import build_micro_project

    # five shards of the test split (4 images each), so both workers get some and one can die mid-shard
    root = tmp_path / "project"
    build_micro_project(root, {"shards": {"samples_per_shard": 4}})
    reference = tmp_path / "reference"
    shutil.copytree(root, reference)
    ref_cfg = load_config(reference / "params.yaml")
    ref_layout = Layout.from_config(ref_cfg, reference)
    shards = sorted(str(p.relative_to(ref_layout.shards_dir)) for p in ref_layout.shards_dir.glob("test/*.tar"))
    assert len(shards) == 5, shards
    encode_named_shards("avg", ref_cfg, ref_layout, shards, untrained=True)  # the one-process run

    server = GatedShards(Layout.from_config(load_config(root / "params.yaml"), root).shards_dir)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    logs = tmp_path / "logs"
    logs.mkdir()
    address = f"tcp://127.0.0.1:{_free_port()}"
    scheduler = ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1]]
    procs = [_spawn([*scheduler, "--no-dashboard"], tmp_path, logs / "scheduler.log")]
    hide = tmp_path if _can_hide_folders() else None  # the project, the reference and the logs
    homes: list[Path] = []
    written: list[str] = []
    try:
        workers = []
        for n in range(2):
            # a machine of its own: no project here (hidden where possible); shards come over HTTP
            home = Path(tempfile.mkdtemp(prefix=f"vpr-machine{n}-"))
            homes.append(home)
            worker = ["distributed.cli.dask_worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard"]
            worker += ["--name", f"machine{n}", "--local-directory", str(home)]
            workers.append(_spawn(worker, home, logs / f"machine{n}.log", hide=hide))
        procs += workers
        client = Client(address, timeout=60)
        client.wait_for_workers(2, timeout=120)
        client.close()

        params = yaml.safe_load((root / "params.yaml").read_text())
        # two shards in flight at once: the flow submits the rest as those finish (a shard's task carries the model)
        params["orchestration"].update(task_runner="dask", dask_address=address, max_in_flight=2)
        params["resources"]["shards_url"] = f"http://127.0.0.1:{server.server_address[1]}"
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

        killed: list[int] = []

        def kill_the_worker_holding_the_gated_shard() -> None:
            if not server.held.wait(180):
                return
            port = server.held_client[1] if server.held_client else None
            for proc in workers:
                ports = {c.laddr.port for c in psutil.Process(proc.pid).net_connections("tcp")}
                if port in ports:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(30)
                    killed.append(proc.pid)
            server.release.set()

        killer = threading.Thread(target=kill_the_worker_holding_the_gated_shard, daemon=True)
        killer.start()
        result = encode_shards(stage=STAGE, params=str(root / "params.yaml"), root=str(root))
        killer.join(10)
    finally:
        server.release.set()
        _stop(procs)
        server.shutdown()
        written = [p.name for home in homes for p in home.rglob("*.npy")]
        for home in homes:
            shutil.rmtree(home, ignore_errors=True)

    logs_text = {p.name: p.read_text()[-2000:] for p in logs.iterdir()}
    assert len(killed) == 1, ("no worker held the gated shard", logs_text)
    assert result["shards"] == 5 and result["encoded"] == 5, result
    layout = Layout.from_config(load_config(root / "params.yaml"), root)
    assert _store(layout) == _store(ref_layout)  # the same keys, the same bits
    # nothing half-written: every entry has its sidecar, no temporaries, nothing written on the workers
    leftovers = [p.name for p in layout.descriptors_dir.rglob("*") if p.is_file() and p.suffix not in (".npy", ".json")]
    assert not leftovers, leftovers
    assert {p.stem for p in layout.descriptors_dir.rglob("*.json")} == {
        p.stem for p in layout.descriptors_dir.rglob("*.npy")
    }
    assert not written, f"a worker wrote descriptors on its own machine: {written}"
    # the gated shard was asked for twice: by the killed worker, then by the one left
    tars = [path for path in server.asked if path.endswith(".tar")]
    assert len(tars) == 6 and len(set(tars)) == 5, tars
