"""Load test of `vpr api` on loopback: latency and images/s at several concurrencies, the model bound, a swap.

Serves a project's live release (default: the repository's own, after `make run`) with a real uvicorn
server on 127.0.0.1 and posts its test-split query photos, one image per request, from clients in a
process of their own (``bench/apiload.py``: in the server's process they would share its GIL;
``--clients thread`` puts them there, as this benchmark used to):

- for each concurrency (default 1, 8, 32): ``--requests`` requests (or ``--seconds``, whichever ends
  first), p50/p99 latency, images/s, images per model pass and per search call, the load average;
- the model-only inference bound measured in the same run, before and after the loads (their mean):
  ``Release.encode_images`` on prepared images in batches of ``api.batch_images`` (what the
  micro-batcher calls), images/s;
- the same load at concurrency 8 while a new release is published in the middle (``add_to_release`` of
  a few query images, as a re-index does): failed requests, and the seconds from the publish until
  the first answer from the new version.

With ``--hostile``: normal clients at concurrency 8 for ``--seconds`` alone, then again beside a
hostile mix (pixel-bomb PNGs of ``--bomb-side``² pixels, four per request, from 2 clients ignoring
Retry-After; ``--slow`` uploads announcing 58 MB that stall after 2 MB; ``--half`` connections that
never finish their headers, reopened as the server closes them): the normal requests' p50/p99, what
the hostile clients got, how long the server kept them, and the process's peak RSS in each phase
(the server and the hostile clients; the normal clients run in their own). ``--micro`` serves the
synthetic micro project with an untrained avg head (built in a temporary folder) instead of a project's release.

    .venv/bin/python bench/api.py                       # the repository's project (after make run)
    .venv/bin/python bench/api.py --root /tmp/run1 --concurrency 1 8 32
    .venv/bin/python bench/api.py --micro --hostile --seconds 30
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import _common
import httpx
import numpy as np
import polars as pl
from PIL import Image

from vpr.foundations.config import load_config
from vpr.foundations.layout import Layout
from vpr.shared.shardio import ShardReader
from vpr.steps.api.app import create_app
from vpr.steps.api.background import running
from vpr.steps.api.live import LiveRelease
from vpr.steps.index import CURRENT, add_to_release, current_version, load_release
from vpr.steps.locate import prepare_image


def query_photos(layout: Layout) -> list[tuple[str, bytes]]:
    rows = ShardReader(layout.shards_dir).index.filter((pl.col("split") == "test") & (pl.col("role") == "queries"))
    return [(Path(p).name, (layout.data / p).read_bytes()) for p in rows.sort("id")["path"].to_list()]


CLIENTS_IN_PROCESS = False  # --clients thread: the load generator in this process (the old way), not its own


def load(url: str, photos, concurrency: int, requests: int, seconds: float, versions: list | None = None) -> dict:
    """``requests`` one-image POSTs from ``concurrency`` clients; latencies, failures, images/s.

    The clients run in a process of their own (``bench/apiload.py``): in this one they would take the
    GIL from the server they measure. ``--clients thread`` runs the same clients here instead (where this
    bench ran its httpx clients before): what sharing the server's GIL costs."""
    if not CLIENTS_IN_PROCESS:
        with tempfile.TemporaryDirectory() as tmp:
            bundle = Path(tmp) / "photos.pickle"
            bundle.write_bytes(pickle.dumps(photos))
            cmd = [sys.executable, str(Path(__file__).with_name("apiload.py")), url, str(bundle)]
            cmd += ["--concurrency", str(concurrency), "--requests", str(requests), "--seconds", str(seconds)]
            out = subprocess.run(cmd + (["--versions"] if versions is not None else []), capture_output=True, text=True)
        if out.returncode:
            raise RuntimeError(f"the load generator failed: {out.stderr[-2000:]}")
        got = json.loads(out.stdout.strip().splitlines()[-1])
        if versions is not None:
            versions.extend((t, v) for t, v in got["versions"])
        return _summary(got["latencies"], got["failures"], got["wall"], got["cpu_s"])
    from apiload import run

    got = run(url, photos, concurrency, requests, seconds, versions is not None)
    if versions is not None:
        versions.extend(got["versions"])
    return _summary(got["latencies"], got["failures"], got["wall"], got["cpu_s"])


def _summary(latencies: list[float], failures: list[str], wall: float, cpu_s: float = 0.0) -> dict:
    ms = sorted(1000 * x for x in latencies)
    return {
        "ms": ms,
        "wall": wall,
        "cpu_s": cpu_s,
        "requests": len(ms),
        "failed": len(failures),
        "p50_ms": statistics.median(ms),
        "p99_ms": ms[min(len(ms) - 1, int(0.99 * len(ms)))],
        "images_per_s": len(ms) / wall,
    }


class PeakRss:
    """The process's resident memory, sampled every 50 ms while in use: the peak (MiB)."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            with open("/proc/self/status") as status:
                kb = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
            self.peak = max(self.peak, kb / 1024)

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


def hostile(url: str, stop: threading.Event, side: int, slow: int, half: int) -> dict:
    """Bomb requests, stalled uploads and half-sent headers until ``stop``; what they got (see docstring)."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side)).save(buf, format="PNG")
    bomb = ("bomb.png", buf.getvalue(), "image/png")
    host, port = url.removeprefix("http://").split(":")
    got: dict = {"bomb_status": {}, "slow_held_s": [], "half_held_s": [], "bomb_kb": len(bomb[1]) / 1024}
    lock = threading.Lock()

    def bomber() -> None:
        with httpx.Client(timeout=300) as http:
            while not stop.is_set():
                code = http.post(f"{url}/v1/locate", files=[("images", bomb)] * 4).status_code
                with lock:
                    got["bomb_status"][code] = got["bomb_status"].get(code, 0) + 1
                time.sleep(0.1)

    def held(payload: bytes, count: int, key: str) -> None:
        """``count`` connections sending ``payload`` and nothing more, reopened once the server closes one."""
        sel = selectors.DefaultSelector()

        def open_one() -> None:
            s = socket.create_connection((host, int(port)))
            s.sendall(payload)
            s.setblocking(False)
            sel.register(s, selectors.EVENT_READ, time.monotonic())

        for _ in range(count):
            open_one()
        while not stop.is_set():
            for k, _ in sel.select(timeout=0.2):
                try:
                    closed = k.fileobj.recv(65536) == b""  # an answer (408) comes just before the close
                except OSError:
                    closed = True
                if closed:
                    sel.unregister(k.fileobj)
                    k.fileobj.close()
                    with lock:
                        got[key].append(time.monotonic() - k.data)
                    open_one()
        for k in list(sel.get_map().values()):
            k.fileobj.close()

    head = b'--x\r\nContent-Disposition: form-data; name="images"; filename="big.jpg"\r\n\r\n'
    stalled = (
        (
            f"POST /v1/locate HTTP/1.1\r\nHost: {host}\r\nContent-Length: {58 * 2**20}\r\n"
            "Content-Type: multipart/form-data; boundary=x\r\n\r\n"
        ).encode()
        + head
        + b"\0" * (2 * 2**20)
    )
    partial = f"POST /v1/locate HTTP/1.1\r\nHost: {host}\r\nContent-Type: multi".encode()
    threads = [threading.Thread(target=bomber) for _ in range(2)]
    threads += [threading.Thread(target=held, args=(stalled, slow, "slow_held_s"))]
    threads += [threading.Thread(target=held, args=(partial, half, "half_held_s"))]
    for t in threads:
        t.start()
    stop.wait()
    for t in threads:
        t.join()
    return got


def hostile_comparison(url: str, photos, seconds: float, args) -> None:
    """Normal clients (concurrency 8) alone, then beside the hostile mix; the table of BENCHMARKS.md."""
    with PeakRss() as rss:
        alone = load(url, photos, 8, 10**6, seconds)
    rows = [("normal clients alone", alone, rss.peak, None)]
    stop = threading.Event()
    result: dict = {}
    with PeakRss() as rss:
        mix = threading.Thread(target=lambda: result.update(hostile(url, stop, args.bomb_side, args.slow, args.half)))
        mix.start()
        time.sleep(2)  # the hostile clients are connected and bombing
        beside = load(url, photos, 8, 10**6, seconds)
        stop.set()
        mix.join()
    rows.append(("beside the hostile mix", beside, rss.peak, result))
    print("\n| phase | normal requests | failed | p50 ms | p99 ms | peak RSS MiB |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, r, peak, _ in rows:
        print(f"| {name} | {r['requests']} | {r['failed']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {peak:.0f} |")

    def spread(xs: list[float]) -> str:
        return f"{len(xs)} closed, held {min(xs):.1f}–{max(xs):.1f} s" if xs else "none closed"

    print(
        f"\nhostile mix: bomb requests (4 × {args.bomb_side}² PNG, {result['bomb_kb']:.0f} kB each) by status "
        f"{dict(sorted(result['bomb_status'].items()))}; stalled 58 MB uploads ({args.slow} open at a time): "
        f"{spread(result['slow_held_s'])}; half-sent headers ({args.half} open at a time): "
        f"{spread(result['half_held_s'])}"
    )


def micro_project(root: Path):
    """The synthetic micro project (``vpr.steps.synth.project``) under ``root`` with an untrained avg
    head released (seeded: the same weights every run); (cfg, layout)."""
    import torch

    from vpr.shared.models import build_model
    from vpr.steps.index import build_release
    from vpr.steps.synth.project import build_micro_project

    cfg, layout = build_micro_project(root, {"index": {"head": "avg"}})
    torch.manual_seed(0)
    model = build_model("avg", cfg.model)
    path = layout.checkpoint("avg")
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {"model": model.state_dict(), "head": "avg", "epoch": 0, "recall5": 0.0}
    torch.save({**state, "model_config": cfg.model.model_dump()}, path)
    build_release("avg", cfg, layout)
    return cfg, layout


def prepared_images(photos, img: dict, batch: int) -> list:
    """Two batches of query photos prepared as the service prepares them (what ``model_bound`` encodes)."""
    with tempfile.TemporaryDirectory() as tmp:
        prepared = []
        for name, data in photos[: batch * 2]:
            path = Path(tmp) / name
            path.write_bytes(data)
            prepared.append(prepare_image(path, img["height"], img["width"], img.get("jpeg_quality", 90), 10**9))
    return prepared


def model_bound(release, prepared: list, batch: int, rounds: int = 1) -> float:
    """Images/s of ``encode_images`` alone on prepared images (no HTTP, no decoding, no search)."""
    release.encode_images(prepared[:batch], batch_size=batch)  # warm-up
    rates = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        release.encode_images(prepared, batch_size=batch)
        rates.append(len(prepared) / (time.perf_counter() - t0))
    return statistics.median(rates)


def throughput_and_swap(url: str, app, release, photos, cfg, layout, release_dir: Path, args) -> None:
    """The concurrency table beside the model bound, then a release published under load.

    Each concurrency runs in ``--rounds`` slices, each right after a model-bound measurement: the
    ratio to the bound is the median of the slices' ratios (a shared machine's load drifts within a
    run; a bound measured once, minutes away from a load, would not be its bound)."""
    batch = cfg.api.batch_images
    prepared = prepared_images(photos, release.manifest["image"], batch)
    batcher = app.state.batcher
    rows = []
    for c in args.concurrency:
        slices, ms, failed, wall, cpu, busy, images, passes, searches = [], [], 0, 0.0, 0.0, 0.0, 0, 0, 0
        for _ in range(args.rounds):
            bound = model_bound(release, prepared, batch)
            batches0, images0, searches0 = batcher.batches, batcher.images, getattr(batcher, "searches", 0)
            encode0 = getattr(batcher, "encode_s", 0.0)
            r = load(url, photos, c, max(1, args.requests // args.rounds), args.seconds / args.rounds)
            images += batcher.images - images0
            passes += batcher.batches - batches0
            searches += getattr(batcher, "searches", 0) - searches0  # stays 0 where the service searched per request
            ms += r["ms"]
            failed += r["failed"]
            wall += r["wall"]
            cpu += r["cpu_s"]
            busy += getattr(batcher, "encode_s", 0.0) - encode0
            slices.append((r["images_per_s"] / bound, bound, os.getloadavg()[0]))
        r = _summary([x / 1000 for x in ms], ["x"] * failed, wall, cpu)
        r["busy"] = busy / wall
        rows.append((c, r, slices, images / max(1, passes), images / searches if searches else 1.0))
    print(
        "\n| concurrency | requests | failed | p50 ms | p99 ms | images/s | / model bound | model bound | "
        "images per model pass | images per search | load |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c, r, slices, per_pass, per_search in rows:
        ratios, bounds, loads = zip(*slices)
        print(
            f"| {c} | {r['requests']} | {r['failed']} | {r['p50_ms']:.0f} | {r['p99_ms']:.0f} | "
            f"{r['images_per_s']:.1f} | {statistics.median(ratios):.2f} | {statistics.median(bounds):.1f} | "
            f"{per_pass:.1f} | {per_search:.1f} | {min(loads):.1f}–{max(loads):.1f} |"
        )
    print(
        f"\n/ model bound: median over {args.rounds} slices of images/s ÷ the model-only bound measured just "
        f"before (encode_images, batches of {batch}; its median shown); load: 1-min load average after each slice"
    )
    client = ", ".join(f"{c}: {1000 * r['cpu_s'] / max(1, r['requests']):.2f}" for c, r, *_ in rows)
    print(f"load generator CPU per request (ms), by concurrency: {client}")
    if hasattr(batcher, "encode_s"):
        busy = ", ".join(f"{c}: {100 * r['busy']:.0f}%" for c, r, *_ in rows)
        print(f"model busy (share of the wall time in model passes), by concurrency: {busy}")

    if args.no_swap:
        return
    # a release published in the middle of the load
    versions: list[tuple[float, str]] = []
    published: dict = {}

    def publish() -> None:
        time.sleep(args.seconds / 3)
        base = load_release(release_dir)
        reader = ShardReader(layout.shards_dir)
        new = reader.index.filter(pl.col("role") == "queries").sort("id").head(20)
        new = new.filter(~pl.col("id").is_in(base.ids["id"].to_list()))
        desc = base.encode(reader, new["id"].to_list()) if new.height else np.empty((0, base.index.d))
        published["at"] = time.monotonic()
        published["version"] = add_to_release(base, new["id"].to_list(), desc, new).name
        published["old"] = base.version

    swapper = threading.Thread(target=publish)
    swapper.start()
    r = load(url, photos, 8, 10**6, args.seconds, versions)
    swapper.join()
    new_answers = [t for t, v in versions if v == published["version"]]
    lag = min(new_answers) - published["at"] if new_answers else float("nan")
    print(
        f"\nswap under load (concurrency 8, {args.seconds:g} s): {r['requests']} requests, {r['failed']} failed; "
        f"{published['old']} → {published['version']} published at {args.seconds / 3:g} s, first answer from it "
        f"{lag:.2f} s later (api.poll_s {cfg.api.poll_s:g}); p50 {r['p50_ms']:.0f} ms, p99 {r['p99_ms']:.0f} ms; "
        f"versions answering: {sorted({v for _, v in versions})}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, default=_common.ROOT, help="project root (params.yaml, release)")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=400, help="per concurrency level, at most")
    parser.add_argument("--seconds", type=float, default=30.0, help="per concurrency level, at most")
    parser.add_argument("--rounds", type=int, default=3, help="slices per concurrency level, each after a model bound")
    parser.add_argument("--no-swap", action="store_true", help="skip the release published under load")
    parser.add_argument("--micro", action="store_true", help="serve a synthetic micro release instead of --root")
    parser.add_argument("--hostile", action="store_true", help="normal p99 and peak RSS with and without attackers")
    parser.add_argument("--bomb-side", type=int, default=9999, help="pixel-bomb PNG side (--hostile)")
    parser.add_argument("--slow", type=int, default=20, help="stalled 58 MB uploads held open (--hostile)")
    parser.add_argument("--half", type=int, default=1000, help="half-sent header connections held (--hostile)")
    parser.add_argument(
        "--clients", choices=["process", "thread"], default="process", help="load generator: own process or here"
    )
    args = parser.parse_args()
    global CLIENTS_IN_PROCESS
    CLIENTS_IN_PROCESS = args.clients == "thread"
    if args.micro:
        args.root = Path(tempfile.mkdtemp(prefix="vpr-bench-api-micro-"))
        cfg, layout = micro_project(args.root)
        os.chdir(args.root)
    else:
        os.chdir(args.root)
        cfg = load_config(args.root / "params.yaml")
        layout = Layout.from_config(cfg, args.root)
    photos = query_photos(layout)
    # a copy of the live version: the swap below publishes into the copy, never into the project's release
    tmp = Path(tempfile.mkdtemp(prefix="vpr-bench-api-"))
    source = current_version(layout.release_dir(cfg.index.head))
    if source is None:
        raise SystemExit(f"no release in {layout.release_dir(cfg.index.head)}: run `make run` (or vpr index) first")
    release_dir = tmp / "release"
    shutil.copytree(source, release_dir / source.name)
    (release_dir / CURRENT).write_text(source.name + "\n")
    live = LiveRelease(release_dir, device=cfg.train.device, shards_dir=layout.shards_dir)
    app = create_app(live, cfg.api, cfg.locate)
    release = live.current().release
    print(f"# {_common.machine()}")
    print(
        f"# release {release.version} ({release.manifest['head']}, {release.index.ntotal} images, "
        f"{release.index.d}-d, {release.manifest['index_kind']}); {len(photos)} query photos; "
        f"api.batch_images {cfg.api.batch_images}, batch_wait_ms {cfg.api.batch_wait_ms:g}; clients: "
        + ("threads of this process (they share the server's GIL)" if CLIENTS_IN_PROCESS else "a process of their own")
    )
    with running(app, cfg.api) as url:
        load(url, photos, 2, 8, 30)  # warm-up
        if args.hostile:
            hostile_comparison(url, photos, args.seconds, args)
        else:
            throughput_and_swap(url, app, release, photos, cfg, layout, release_dir, args)
    shutil.rmtree(tmp, ignore_errors=True)
    import resource

    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
