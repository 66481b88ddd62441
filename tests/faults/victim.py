"""Run the ``vpr`` CLI with one pause point, so a test can ``kill -9`` it at a known moment.

    python -m tests.faults.victim MARKER TARGET COUNT HOLD -- <vpr arguments>

``TARGET`` is ``module:function`` (``vpr.steps.train:triplet_loss``, ``os:replace``...). Just before its
``COUNT``-th call the process writes ``MARKER`` (atomically) and waits, ``HOLD`` being ``inf`` (until
it is killed), a number of seconds, or a path (until that file exists); then the call goes on.
Nothing in the library knows about this hook: the process is the real CLI, with the real code paths
on either side of the pause.
"""

from __future__ import annotations

import importlib
import os
import sys
import time


def _wait(hold: str) -> None:
    if hold == "inf":
        while True:
            time.sleep(60)
    try:
        seconds = float(hold)
    except ValueError:
        while not os.path.exists(hold):
            time.sleep(0.05)
        return
    time.sleep(seconds)


def _install(marker: str, target: str, count: int, hold: str) -> None:
    module_name, attr = target.split(":")
    module = importlib.import_module(module_name)
    original = getattr(module, attr)
    calls = 0

    def paused(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == count:
            with open(marker + ".tmp", "w") as fh:
                fh.write(str(os.getpid()))
            os.rename(marker + ".tmp", marker)
            _wait(hold)
        return original(*args, **kwargs)

    setattr(module, attr, paused)


def main(argv: list[str]) -> int:
    marker, target, count, hold, sep, *cli_args = argv
    assert sep == "--", "usage: victim MARKER TARGET COUNT HOLD -- <vpr arguments>"
    _install(marker, target, int(count), hold)
    from vpr.cli import app

    try:
        app(cli_args, prog_name="vpr")
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
