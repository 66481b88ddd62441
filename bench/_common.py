"""Shared helpers of the benchmarks: the machine line, a prepared project, side-by-side timing.

Every benchmark measures its alternatives interleaved in one run (round-robin, ``rounds`` times) and
reports medians and their ratio: these machines are shared, absolute times are not comparable
between runs, ratios measured side by side are.
"""

from __future__ import annotations

import hashlib
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent

CACHE = Path(os.environ.get("VPR_BENCH_CACHE", "/tmp/vpr-bench"))
PROJECT_CODE = (
    "steps/synth",
    "foundations/imageio.py",
    "steps/catalog.py",
    "steps/shards.py",
    "shared/shardio.py",
    "steps/mining",
    "foundations/config.py",
)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device | None = None) -> str:
    """One line: host, CPU, cores, load, torch threads, accelerator."""
    load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    line = (
        f"{platform.node()}: {cpu_name()}, {os.cpu_count()} cores, load {load}, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
    )
    if device is not None and device.type == "cuda":
        line += f", GPU {torch.cuda.get_device_name(device)}"
    return line + f", {time.strftime('%Y-%m-%d %H:%M')}"


def resolve(device: str) -> torch.device:
    """``--device`` as the library resolves ``train.device``; a missing GPU ends the benchmark."""
    from vpr.shared.descriptors import resolve_device

    try:
        return resolve_device(device)
    except RuntimeError:
        raise SystemExit(f"--device {device}: no CUDA device here") from None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_params() -> dict:
    """params.yaml of the repository (every section but paths)."""
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw.pop("paths", None)
    return raw


def project(height: int = 120, width: int = 160, *, root: Path | None = None, city: float = 1.0):
    """A prepared project (synthetic city → ingest → shards → mining) at ``height``×``width``.

    The default city of params.yaml, its image counts times ``city``; synth and shards share the
    resolution, so the JPEG folders and the shards hold images of the same size. Built once under
    ``$VPR_BENCH_CACHE`` (default /tmp/vpr-bench), keyed by the code that writes it, and reused.
    Returns (cfg, layout).
    """
    from vpr.foundations.config import load_config
    from vpr.foundations.layout import Layout
    from vpr.steps.synth.project import build_micro_project

    raw = default_params()
    raw["synth"].update(height=height, width=width)
    for split in ("train", "val", "test"):
        raw["synth"][split] = {k: max(8, round(v * city)) for k, v in raw["synth"][split].items()}
    raw["shards"].update(height=height, width=width)
    if root is None:  # keyed by the code that writes the project: a format change rebuilds it
        files = [p for f in PROJECT_CODE for p in sorted((ROOT / "vpr").glob(f"{f}/*.py" if "." not in f else f))]
        code = hashlib.sha256(b"".join(p.read_bytes() for p in files)).hexdigest()[:10]
        root = CACHE / f"city{city:g}-{height}x{width}-{code}"
    done = root / ".prepared"
    if done.exists():
        cfg = load_config(root / "params.yaml")
        return cfg, Layout.from_config(cfg, root)
    t0 = time.perf_counter()
    print(f"# building the benchmark project in {root} (once) ...", file=sys.stderr)
    cfg, layout = build_micro_project(root, raw)
    done.write_text("ok\n")
    print(f"# built in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    return cfg, layout


def interleaved(variants: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Run each variant once per round, round-robin; each call returns its own rate (or time)."""
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            results[name].append(fn())
    return results


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def spread(xs: list[float]) -> str:
    return f"{min(xs):.1f}–{max(xs):.1f}" if len(xs) > 1 else ""


if __name__ == "__main__":  # python bench/_common.py HEIGHT WIDTH [CITY]: build the project ahead
    h, w = int(sys.argv[1]), int(sys.argv[2])
    print(project(h, w, city=float(sys.argv[3]) if len(sys.argv) > 3 else 1.0)[1].root)
