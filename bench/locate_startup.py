"""Where `vpr locate`'s time goes: interpreter and imports vs the answer itself (issue: 6–12 s a call).

Each probe is a fresh process (what a user's call is), run ``--rounds`` times interleaved; medians,
and each process's peak RSS (GNU time). Probes: an empty interpreter, ``import torch``, ``import
torch, torchvision`` (the backbone's definition), ``import vpr.cli`` (what ``vpr --help`` pays), then
``vpr locate`` on 1 and on N query images of a released project. Per-image time is the difference
between the two ``locate`` runs divided by N − 1: what a long-running service pays per image.

    .venv/bin/python bench/locate_startup.py PROJECT_DIR [--images 32] [--rounds 3]

PROJECT_DIR is a project after `make run` (it has a release and data/images/test/queries).
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import _common

PY = sys.executable


def run(cmd: list[str], cwd: Path) -> tuple[float, float]:
    """(seconds, peak RSS in MiB) of one fresh process, its RSS read by GNU time (the ``wait4`` of this
    process would count pages the child shared with it before ``exec``)."""
    with tempfile.NamedTemporaryFile("r", suffix=".rss") as rss:
        t0 = time.perf_counter()
        proc = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name, *cmd], cwd=cwd, capture_output=True)
        seconds = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed: {proc.stderr.decode()[-2000:]}")
        return seconds, int(rss.read().split()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("project", type=Path)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    queries = sorted((args.project / "data/images/test/queries").iterdir())[: args.images]
    vpr = [PY, "-m", "vpr.cli", "-q", "locate"]
    probes = {
        "python -c pass": [PY, "-c", "pass"],
        "import torch": [PY, "-c", "import torch"],
        "import torch, torchvision": [PY, "-c", "import torch, torchvision"],
        "import vpr.cli (vpr --help)": [PY, "-c", "import vpr.cli"],
        "vpr locate, 1 image": [*vpr, str(queries[0])],
        f"vpr locate, {len(queries)} images": [*vpr, *map(str, queries)],
    }
    results: dict[str, list[tuple[float, float]]] = {name: [] for name in probes}
    for _ in range(args.rounds):
        for name, cmd in probes.items():
            results[name].append(run(cmd, args.project))
    print(_common.machine())
    print(f"{'probe':34} {'median s':>9} {'peak RSS MiB':>13}")
    med = {}
    for name, runs in results.items():
        med[name] = statistics.median(s for s, _ in runs)
        print(f"{name:34} {med[name]:9.2f} {max(r for _, r in runs):13.0f}")
    one, many = med["vpr locate, 1 image"], med[f"vpr locate, {len(queries)} images"]
    per_image = (many - one) / max(1, len(queries) - 1)
    print(
        f"per extra image: {per_image * 1000:.0f} ms; start-up share of a 1-image call: {(one - per_image) / one:.0%}"
    )


if __name__ == "__main__":
    main()
