"""``make up`` / ``make down``: a Prefect server and the served deployments, started together, stopped together.

    python -m flows.up [--host 127.0.0.1] [--port 4200] [--params params.yaml] [--root .]
    python -m flows.up --down

``up`` starts ``prefect server start`` and, once its API answers (``flows.wait_for_api``), ``python -m
flows.serve``, each in a process group of its own (what they start, such as the serve's flow-run
subprocesses, stays in that group), and writes ``$PREFECT_HOME/up.json``: its own PID and both groups.
It stays in the foreground until one of them ends or it is told to stop (Ctrl-C, SIGTERM — ``make``
passes on the SIGTERM it gets —, SIGHUP, or ``--down`` from another shell), then stops both groups:
SIGTERM, and SIGKILL for whatever is left after ``STOP_GRACE_S``. ``--down`` asks the running ``up`` to
stop and stops the groups itself if that ``up`` died without doing so (killed with SIGKILL, say).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from flows.wait_for_api import wait_for_api
from vpr.foundations.atomic import write_text_atomic

STOP_GRACE_S = 15.0  # SIGTERM → SIGKILL
API_TIMEOUT_S = 120.0


def state_file() -> Path:
    """Where ``up`` records its PID and process groups: ``$PREFECT_HOME/up.json`` (Prefect's own default home)."""
    home = os.environ.get("PREFECT_HOME") or str(Path.home() / ".prefect")
    return Path(home).expanduser() / "up.json"


def _stat(path: Path) -> list[str] | None:
    """``/proc/<pid>/stat`` after the command name: state, ppid, pgrp, ... (None once the process is gone)."""
    try:
        return path.read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie waiting for its parent to reap it does not)."""
    fields = _stat(Path(f"/proc/{pid}/stat"))
    return fields is not None and fields[0] != "Z"


def group_alive(pgid: int) -> bool:
    """Whether any process of group ``pgid`` still runs (zombies do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        fields = _stat(stat)
        if fields is not None and int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def stop_groups(groups: dict[str, int], grace_s: float = STOP_GRACE_S) -> list[str]:
    """Stop each group, the last started first (serve pauses its deployments through the server): SIGTERM,
    then SIGKILL when it is still alive after ``grace_s``; the names of the groups that had to be killed."""
    killed = []
    for name, pgid in reversed(groups.items()):
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            continue
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and group_alive(pgid):
            time.sleep(0.2)
        if group_alive(pgid):
            killed.append(name)
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return killed


def _stop_on_signal(signum: int, _frame) -> None:
    raise KeyboardInterrupt(signal.Signals(signum).name)


def up(host: str, port: int, params: str, root: str) -> int:
    """Run server + serve until one ends or a stop is asked for; both groups are stopped on the way out."""
    state = state_file()
    if state.exists():
        pid = json.loads(state.read_text()).get("pid")
        if pid and pid_alive(pid):
            print(f"already up (pid {pid}, {state}): `make down` first", file=sys.stderr)
            return 1
    state.parent.mkdir(parents=True, exist_ok=True)
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _stop_on_signal)
    api = f"http://{host}:{port}/api"
    prefect = str(Path(sys.executable).with_name("prefect"))
    procs: dict[str, subprocess.Popen] = {}

    def record() -> None:
        write_text_atomic(state, json.dumps({"pid": os.getpid(), "groups": {n: p.pid for n, p in procs.items()}}))

    try:
        procs["server"] = subprocess.Popen(
            [prefect, "server", "start", "--host", host, "--port", str(port)], start_new_session=True
        )
        record()
        if not wait_for_api(api, API_TIMEOUT_S) or procs["server"].poll() is not None:
            print(f"no Prefect API at {api} after {API_TIMEOUT_S:g} s: stopping", file=sys.stderr)
            return 1
        serve = [sys.executable, "-m", "flows.serve", "--params", params, "--root", root]
        procs["serve"] = subprocess.Popen(serve, env={**os.environ, "PREFECT_API_URL": api}, start_new_session=True)
        record()
        print(
            f"up: Prefect server (pid {procs['server'].pid}, UI http://{host}:{port}) and the served deployments "
            f"(pid {procs['serve'].pid}); stop with Ctrl-C or `make down`",
            flush=True,
        )
        while all(p.poll() is None for p in procs.values()):
            time.sleep(0.5)
        ended = next(name for name, p in procs.items() if p.poll() is not None)
        print(f"{ended} exited (status {procs[ended].returncode}): stopping the rest", file=sys.stderr)
        return procs[ended].returncode or 1
    except KeyboardInterrupt:
        return 0
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):  # a second stop must not cut this one short
            signal.signal(signum, signal.SIG_IGN)
        stop_groups({name: p.pid for name, p in procs.items()})
        for p in procs.values():
            p.wait()
        state.unlink(missing_ok=True)


def down(timeout_s: float = STOP_GRACE_S + 15.0) -> int:
    """Stop the running ``up``: SIGTERM to it, then its groups directly if anything outlives ``timeout_s``."""
    state = state_file()
    if not state.exists():
        print(f"nothing to stop: no {state}")
        return 0
    recorded = json.loads(state.read_text())
    groups = {name: int(pgid) for name, pgid in recorded.get("groups", {}).items()}
    try:
        os.kill(int(recorded["pid"]), signal.SIGTERM)
    except ProcessLookupError:
        pass
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and (
        pid_alive(int(recorded["pid"])) or any(group_alive(g) for g in groups.values())
    ):
        time.sleep(0.2)
    killed = stop_groups(groups, grace_s=1.0)
    state.unlink(missing_ok=True)
    print(f"down: stopped {', '.join(groups) or 'nothing'}" + (f" (killed: {', '.join(killed)})" if killed else ""))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m flows.up", description=__doc__.split("\n")[0])
    parser.add_argument("--down", action="store_true", help="stop what a running `python -m flows.up` started")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4200)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--root", default=".")
    args = parser.parse_args(argv)
    return down() if args.down else up(args.host, args.port, args.params, args.root)


if __name__ == "__main__":
    sys.exit(main())
