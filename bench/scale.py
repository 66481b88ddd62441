"""Scale ladder: how each stage's time and memory grow with the database, and where the first wall is.

Every measured stage runs in a fresh process (``_stage``), so its peak RSS (``ru_maxrss`` of that process
and its children, torch's ~0.4 GB import included) is its own; times are the stage's wall time.

* ``real``: images of the synthetic city rendered at 60×80 (a test split of N database images and N/10
  queries, at most ``MAX_QUERIES``, tiny train/val), through the library's own steps: ingest → shard →
  mine → extract (untrained NetVLAD, 16 clusters, 4,096-d, into the descriptor store) → index (from the
  store: exact where its vectors fit in ``EXACT_INDEX_BYTES``, IVF-PQ beyond) → evaluate (store warm:
  chunked exact search + Recall@N, what ``vpr evaluate`` runs). ``--keep`` keeps each rung's folder and
  its finished stages' results (``results.json``): a run stopped part way resumes at the first stage
  without a result.
* ``synthetic``: descriptors with place structure (256-d float32, one store file per 10,000 "images")
  and UTM coordinates (one database image per 100 m², queries N/10): index build (exact to 10⁶,
  IVF-PQ with nlist 1024 to 10⁷), search of 1,000 queries (chunked exact over the store within
  ``resources.memory_gb``, IVF-PQ nprobe 8) and mining.
* ``evaluate``: 250k database × 1,000 queries at 4,096-d float32 and 16,384-d float16, chunked exact
  search within ``memory_gb`` 8 (and 1), beside the in-memory exact search where it fits.
* ``reindex``: 10⁴ new vectors appended to releases of two sizes, rounds interleaved, beside loading the
  whole release (the pre-segment cost) and ``append_to_catalog`` (one new part beside the catalog's base).

    .venv/bin/python bench/scale.py real --sizes 1000 10000 100000
    .venv/bin/python bench/scale.py real --sizes 1000000 --keep --stage-timeout 10800
    .venv/bin/python bench/scale.py synthetic --sizes 10000 100000 1000000 10000000
    .venv/bin/python bench/scale.py evaluate
    .venv/bin/python bench/scale.py reindex --sizes 100000 1000000 --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _common
import numpy as np

from vpr.foundations.atomic import write_text_atomic

BENCH = Path(__file__).resolve()
WORK = _common.CACHE / "scale"
LATENT, STYLES, VIEWS, SHARD_ROWS, QUERIES = 64, 32, 5, 10_000, 1_000
MAX_QUERIES = 10_000  # real rungs: N/10 queries up to 10⁵, then N/100 at 10⁶ (10⁵ × 10⁶ exact 4,096-d: hours)
EXACT_INDEX_BYTES = 4 << 30  # a flat index holds every vector in RAM; past this the real rung's index is IVF-PQ
STAGES: dict = {}


def stage(fn):
    STAGES[fn.__name__] = fn
    return fn


def peak_rss_mb() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(own, kids) / 1024


STAGE_TIMEOUT_S = [3600.0]  # --stage-timeout


def child(name: str, **args) -> dict:
    """Run stage ``name`` in a fresh process; its result dict with ``seconds`` and ``peak_rss_mb``.

    A stage that fails or runs past ``STAGE_TIMEOUT_S`` is a wall, not a crash of the ladder: its row says
    why (the last line of its error), and the rungs that depend on it are skipped.
    """
    cmd = [sys.executable, str(BENCH), "_stage", name, json.dumps(args)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=STAGE_TIMEOUT_S[0])
    except subprocess.TimeoutExpired:
        return {"failed": f"over {STAGE_TIMEOUT_S[0]:.0f} s"}
    if out.returncode != 0:
        lines = out.stderr.strip().splitlines() or [f"exit {out.returncode}"]
        print(f"# stage {name} {args} failed:\n{out.stderr[-4000:]}", file=sys.stderr)
        return {"failed": f"exit {out.returncode}: {lines[-1][:120]}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_stage(name: str, args: dict) -> None:
    t0 = time.perf_counter()
    result = STAGES[name](**args) or {}
    result.setdefault("seconds", time.perf_counter() - t0)
    result["peak_rss_mb"] = peak_rss_mb()
    print(json.dumps(result))


def exponent(rows: list[tuple[int, float]]) -> list[str]:
    """Growth exponent of time between consecutive rungs: log(t2/t1) / log(n2/n1)."""
    out = ["—"]
    for (n1, t1), (n2, t2) in zip(rows, rows[1:]):
        out.append(f"{math.log(t2 / t1) / math.log(n2 / n1):.2f}" if t1 > 0 and t2 > 0 else "—")
    return out


def table(title: str, results: dict[str, list[tuple[int, dict]]], unit: str = "img/s") -> None:
    print(f"\n### {title}\n")
    print(f"| stage | N | seconds | {unit} | peak RSS (MB) | growth exponent |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rungs in results.items():
        exps = exponent([(n, r.get("seconds", 0.0)) for n, r in rungs])
        for (n, r), e in zip(rungs, exps):
            if "failed" in r:
                print(f"| {name} | {n:,} | wall: {r['failed']} | — | — | — |")
                continue
            rate = r.get("items", n) / r["seconds"] if r["seconds"] > 0 else float("nan")
            print(f"| {name} | {n:,} | {r['seconds']:.2f} | {rate:,.0f} | {r['peak_rss_mb']:,.0f} | {e} |")


# --------------------------------------------------------------------------- real images


def real_params(n: int) -> dict:
    raw = _common.default_params()
    tiny = {"database": 40, "queries": 20}
    queries = min(MAX_QUERIES, max(100, n // 10))
    raw["synth"].update(height=60, width=80, train=tiny, val=tiny, test={"database": n, "queries": queries})
    raw["shards"].update(height=60, width=80)
    raw["model"].update(weights="none")
    raw["train"].update(device="cpu")
    return raw


def _project(root: str):
    from vpr.foundations.config import load_config
    from vpr.foundations.layout import Layout

    cfg = load_config(Path(root) / "params.yaml")
    return cfg, Layout.from_config(cfg, Path(root))


@stage
def render(root: str, n: int) -> dict:
    from vpr.steps.synth import generate_city
    from vpr.steps.synth.project import write_params

    Path(root).mkdir(parents=True, exist_ok=True)
    cfg = write_params(Path(root), real_params(n))
    generate_city(Path(root) / "data", cfg.synth)
    return {"items": n + min(MAX_QUERIES, max(100, n // 10))}


@stage
def ingest(root: str) -> dict:
    from vpr.steps.catalog import ingest as run

    cfg, layout = _project(root)
    result = run(layout.data, layout.catalog_dir, cfg.ingest)
    return {"items": result.accepted}


@stage
def shard(root: str) -> dict:
    from vpr.steps.catalog import read_split_catalog
    from vpr.steps.shards import write_shards

    cfg, layout = _project(root)
    for split in ("train", "val", "test"):
        write_shards(layout.catalog(split), layout.data, layout.split_shards(split), cfg.shards)
    return {"items": read_split_catalog(layout.catalog("test")).height}


@stage
def mine(root: str) -> dict:
    from vpr.steps.catalog import read_split_catalog
    from vpr.steps.mining import mine_all

    cfg, layout = _project(root)
    mine_all(layout.catalog("test"), layout.mining_dir, cfg.mining, ("test",))
    return {"items": read_split_catalog(layout.catalog("test")).height}


def _test_sets(root: str):
    import polars as pl
    import torch

    from vpr.shared.checkpoints import untrained_model
    from vpr.shared.descstore import DescriptorStore, encode_plans, encoder_for, plans_for
    from vpr.shared.shardio import ShardReader
    from vpr.shared.splits import load_split

    cfg, layout = _project(root)
    reader = ShardReader(layout.shards_dir, ("test",))
    split = load_split(reader.index, pl.read_parquet(layout.mining("test")), "test")
    model = untrained_model("netvlad", cfg.model, cfg.train.seed, torch.device("cpu"))
    encoder, store = encoder_for(model, cfg, torch.device("cpu")), DescriptorStore(layout.descriptors_dir)
    t0 = time.perf_counter()
    db = encode_plans(encoder, plans_for(reader, split.db_ids), store)
    q = encode_plans(encoder, plans_for(reader, split.q_ids), store)
    return cfg, db, q, time.perf_counter() - t0


@stage
def extract(root: str) -> dict:
    _, db, q, seconds = _test_sets(root)
    return {"items": len(db) + len(q), "seconds": seconds, "encoded_shards": db.encoded + q.encoded}


@stage
def index(root: str) -> dict:
    import faiss

    from vpr.steps.index import index_from_set

    cfg, db, _, _ = _test_sets(root)  # store warm: nothing encoded
    kind, params = "exact", cfg.index
    if len(db) * db.dim * 4 > EXACT_INDEX_BYTES:  # IVF-PQ, about 4·√N cells, 32 bytes a vector
        kind, params = "ivfpq", cfg.index.model_copy(update={"nlist": 4 * int(math.sqrt(len(db)))})
    t0 = time.perf_counter()
    built = index_from_set(db, params, kind, cfg.resources.memory_gb)
    faiss.write_index(built, str(Path(root) / "bench-index.faiss"))
    return {"items": len(db), "seconds": time.perf_counter() - t0, "kind": kind}


@stage
def evaluate(root: str) -> dict:
    from vpr.steps.evaluate import evaluate_head

    cfg, layout = _project(root)
    metrics = evaluate_head("netvlad", cfg, layout, untrained=True)
    return {"items": metrics["database"], "recall@1": metrics["recall@1"]}


def _flow_project(root: str, name: str) -> Path:
    """A project beside the rung's that reads its params, data, catalog, shards and mining tables and has a
    descriptor store of its own (a flow run finds nothing encoded by another)."""
    cfg, src = _project(root)
    project = Path(root) / name
    shutil.rmtree(project, ignore_errors=True)
    (project / "artifacts").mkdir(parents=True)
    shutil.copy(Path(root) / "params.yaml", project / "params.yaml")
    links = {"data": src.data, "artifacts/catalog": src.catalog_dir, "artifacts/shards": src.shards_dir}
    links["artifacts/mining"] = src.mining_dir
    for where, target in links.items():
        (project / where).symlink_to(target.resolve(), target_is_directory=True)
    return project


def _encode_flow(root: str, runner: str) -> dict:
    """The ``encode-shards`` flow (stage ``baseline``: the untrained avg model over the test split) on the
    thread runner, or on a Dask cluster of real processes on 127.0.0.1 (a scheduler and two single-threaded
    workers in folders of their own, shards read over HTTP, descriptors sent back and stored by the flow)."""
    import functools
    import os
    import socket
    import tempfile
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    import yaml

    home = Path(tempfile.mkdtemp(prefix=f"vpr-scale-{runner}-"))
    os.environ.update(PREFECT_HOME=str(home / "prefect"), PREFECT_SERVER_ANALYTICS_ENABLED="false", DO_NOT_TRACK="1")
    from prefect import flow

    from flows.encode import encode_shards
    from vpr.shared.shardio import ShardReader

    project = _flow_project(root, f"encode-{runner}")
    cfg, layout = _project(str(project))
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["orchestration"].update(task_runner=runner, max_workers=2, dask_address=None)
    procs: list[subprocess.Popen] = []
    server = None
    try:
        if runner == "dask":

            class Quiet(SimpleHTTPRequestHandler):
                def log_message(self, *args) -> None:
                    pass

            handler = functools.partial(Quiet, directory=str(layout.shards_dir.resolve()))
            server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            threading.Thread(target=server.serve_forever, daemon=True).start()
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            address = f"tcp://127.0.0.1:{port}"
            env = {**os.environ, "PYTHONPATH": str(_common.ROOT), "OMP_NUM_THREADS": "1"}
            log = open(home / "cluster.log", "w")  # noqa: SIM115 (closed below)
            scheduler = ["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"]
            launch = functools.partial(subprocess.Popen, stdout=log, stderr=subprocess.STDOUT, env=env)
            procs.append(launch([sys.executable, "-m", *scheduler], cwd=home))
            for n in range(2):
                machine = home / f"machine{n}"
                machine.mkdir()
                worker = ["distributed.cli.dask_worker", address, "--nthreads", "1", "--no-nanny", "--no-dashboard"]
                worker += ["--name", f"machine{n}", "--local-directory", str(machine)]
                procs.append(launch([sys.executable, "-m", *worker], cwd=machine))
            from distributed import Client

            with Client(address, timeout=60) as client:
                client.wait_for_workers(2, timeout=120)
            params["orchestration"].update(dask_address=address)
            params["resources"]["shards_url"] = f"http://127.0.0.1:{server.server_address[1]}"
        (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        flow(name="scale-warm-up")(lambda: None)()  # Prefect's temporary server starts here, not in the timing
        t0 = time.perf_counter()
        result = encode_shards(stage="baseline", params=str(project / "params.yaml"), root=str(project))
        seconds = time.perf_counter() - t0
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(30)
        if server is not None:
            server.shutdown()
    images = ShardReader(layout.shards_dir, ("test",)).index.height
    stored = sum(1 for _ in layout.descriptors_dir.rglob("*.npy"))
    shutil.rmtree(project, ignore_errors=True)
    shutil.rmtree(home, ignore_errors=True)
    return {
        "items": images,
        "seconds": seconds,
        "shards": result["shards"],
        "encoded": result["encoded"],
        "stored": stored,
    }


@stage
def encode_threads(root: str) -> dict:
    return _encode_flow(root, "threads")


@stage
def encode_dask(root: str) -> dict:
    return _encode_flow(root, "dask")


def run_real(sizes: list[int], keep: bool = False) -> None:
    names = ("render", "ingest", "shard", "mine", "extract", "index", "evaluate", "encode_threads", "encode_dask")
    results: dict[str, list] = {s: [] for s in names}
    for n in sizes:
        root = WORK / f"real-{n}"
        done_file = root / "results.json"
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
        done = json.loads(done_file.read_text()) if keep and done_file.exists() else {}
        for name in results:
            if name in done and "failed" not in done[name]:
                print(f"# real {n}: {name} kept from an earlier run {done[name]}", file=sys.stderr)
            else:
                args = {"root": str(root), "n": n} if name == "render" else {"root": str(root)}
                done[name] = child(name, **args)
                print(f"# real {n}: {name} {done[name]}", file=sys.stderr, flush=True)
                if keep:
                    root.mkdir(parents=True, exist_ok=True)
                    write_text_atomic(done_file, json.dumps(done, indent=1))
            results[name].append((n, done[name]))
            if "failed" in done[name]:
                break
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
    table(f"Real images (synthetic city, 60×80): database N, queries N/10 up to {MAX_QUERIES:,}", results)


# --------------------------------------------------------------------------- synthetic descriptors


def _key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def _places(n_db: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    proj = rng.standard_normal((LATENT, dim), dtype=np.float32) / np.float32(math.sqrt(LATENT))
    styles = rng.standard_normal((STYLES, LATENT), dtype=np.float32)
    n_places = max(1, n_db // VIEWS)
    places = 0.8 * styles[rng.integers(0, STYLES, n_places)]
    places += rng.standard_normal((n_places, LATENT), dtype=np.float32)
    return proj, places


def _views(rng, proj, places, place_ids, iso: float = 0.1) -> np.ndarray:
    lat = places[place_ids] + rng.standard_normal((len(place_ids), LATENT), dtype=np.float32)
    x = lat @ proj + iso * rng.standard_normal((len(place_ids), proj.shape[1]), dtype=np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@stage
def generate(folder: str, n: int, dim: int, dtype: str, rows: int = SHARD_ROWS) -> dict:
    """Store entries of ``n`` database descriptors (``rows`` per file) and 1,000 queries with their places."""
    from vpr.shared.descstore import DescriptorStore

    store, folder_p = DescriptorStore(Path(folder) / "store"), Path(folder)
    proj, places = _places(n, dim, 0)
    parts = []
    for s in range(0, n, rows):
        ids = np.arange(s, min(n, s + rows), dtype=np.int64)
        rng = np.random.default_rng([1, s])
        key = _key(f"{folder}:{s}")
        store.save(key, _views(rng, proj, places, ids // VIEWS).astype(dtype), {"rows": len(ids)})
        parts.append([int(s), len(ids), key])
    rng = np.random.default_rng(2)
    q_place = rng.integers(0, len(places), QUERIES)
    np.save(folder_p / "queries.npy", _views(rng, proj, places, q_place))
    np.save(folder_p / "q_place.npy", q_place)
    (folder_p / "parts.json").write_text(json.dumps({"dim": dim, "parts": parts}))
    return {"items": n}


def _stored(folder: str):
    from vpr.shared.descstore import DescriptorSet, DescriptorStore, ShardDescriptors

    meta = json.loads((Path(folder) / "parts.json").read_text())
    parts = [
        ShardDescriptors(f"s{s}", np.arange(s, s + rows, dtype=np.int64), key, False, 0.0, 0)
        for s, rows, key in meta["parts"]
    ]
    return DescriptorSet(DescriptorStore(Path(folder) / "store"), parts, meta["dim"])


def _index_params(kind: str):
    from vpr.foundations.config import IndexConfig

    return IndexConfig(kind=kind, nlist=1024, nprobe=8, pq_m=32, pq_bits=8)


@stage
def build_index(folder: str, kind: str, memory_gb: float = 8) -> dict:
    import faiss

    from vpr.steps.index import index_from_set

    descriptors = _stored(folder)
    built = index_from_set(descriptors, _index_params(kind), kind, memory_gb)
    faiss.write_index(built, str(Path(folder) / f"{kind}.faiss"))
    return {"items": len(descriptors)}


def _recalls(ranked: np.ndarray, folder: str, n: int) -> dict:
    from vpr.shared.retrieval import recall_at_n

    q_place = np.load(Path(folder) / "q_place.npy")
    positives = [np.arange(p * VIEWS, min(n, (p + 1) * VIEWS)) for p in q_place]
    return {f"recall@{k}": v for k, v in recall_at_n(ranked, positives).items()}


@stage
def search_store(folder: str, memory_gb: float = 8) -> dict:
    """Exact top-20 of the 1,000 queries over the store, chunked within ``memory_gb`` (``vpr evaluate``)."""
    from vpr.steps.evaluate import search_set

    descriptors, q = _stored(folder), np.load(Path(folder) / "queries.npy")
    t0 = time.perf_counter()
    _, rows = search_set(descriptors, q, 20, memory_gb)
    seconds = time.perf_counter() - t0
    return {"items": len(q), "seconds": seconds, **_recalls(descriptors.ids[rows], folder, len(descriptors))}


@stage
def search_in_memory(folder: str) -> dict:
    """The pre-store way: every database descriptor in one array, then one flat index."""
    from vpr.shared.retrieval import exact_search

    descriptors, q = _stored(folder), np.load(Path(folder) / "queries.npy")
    t0 = time.perf_counter()
    database = descriptors.gather(descriptors.ids)
    _, rows = exact_search(database, q, 20)
    return {"items": len(q), "seconds": time.perf_counter() - t0, **_recalls(rows, folder, len(database))}


@stage
def search_index(folder: str, kind: str) -> dict:
    import faiss

    built = faiss.read_index(str(Path(folder) / f"{kind}.faiss"))
    faiss.extract_index_ivf(built).nprobe = 8
    q = np.load(Path(folder) / "queries.npy")
    t0 = time.perf_counter()
    _, ids = built.search(q, 20)
    return {"items": len(q), "seconds": time.perf_counter() - t0, **_recalls(ids, folder, built.ntotal)}


def synthetic_catalog(n: int, seed: int = 0):
    """``n`` UTM coordinates: 90 % database (one per 100 m² of a square), 10 % queries beside them."""
    import polars as pl

    rng = np.random.default_rng(seed)
    n_db = n - n // 10
    side = math.sqrt(n_db * 100.0)
    db = rng.uniform(0, side, (n_db, 2))
    q = db[rng.integers(0, n_db, n // 10)] + rng.normal(0, 5.0, (n // 10, 2))
    xy = np.concatenate([db, q]) + (500_000.0, 4_000_000.0)
    role = pl.when(pl.col("i") < n_db).then(pl.lit("database")).otherwise(pl.lit("queries"))
    return (
        pl.DataFrame({"i": np.arange(n), "utm_east": xy[:, 0], "utm_north": xy[:, 1]})
        .with_columns(role=role, split=pl.lit("test"))
        .with_columns(path=pl.format("test/{}/{}.jpg", "role", pl.col("i").cast(pl.String).str.zfill(9)))
        .select("path", "split", "role", "utm_east", "utm_north")
    )


@stage
def mine_coordinates(n: int, folder: str) -> dict:
    from vpr.foundations.config import MiningConfig
    from vpr.steps.mining import mine_batches, write_mining_batches

    catalog = synthetic_catalog(n)
    t0 = time.perf_counter()
    write_mining_batches(mine_batches(catalog, "test", MiningConfig()), Path(folder) / "mining.parquet")
    return {"items": n, "seconds": time.perf_counter() - t0}


def run_synthetic(sizes: list[int]) -> None:
    results: dict[str, list] = {
        "index build, exact": [],
        "index build, IVF-PQ": [],
        "search 1,000 q, exact over the store": [],
        "search 1,000 q, IVF-PQ": [],
        "mine (coordinates)": [],
    }
    for n in sizes:
        folder = WORK / f"synthetic-{n}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        gen = child("generate", folder=str(folder), n=n, dim=256, dtype="float32")
        print(f"# synthetic {n}: generated {gen}", file=sys.stderr)
        if "failed" in gen:
            break
        if n <= 1_000_000:  # a flat index holds every vector in RAM: 10 GB at 10^7 x 256-d
            results["index build, exact"].append((n, child("build_index", folder=str(folder), kind="exact")))
        results["index build, IVF-PQ"].append((n, child("build_index", folder=str(folder), kind="ivfpq")))
        results["search 1,000 q, exact over the store"].append((n, child("search_store", folder=str(folder))))
        results["search 1,000 q, IVF-PQ"].append((n, child("search_index", folder=str(folder), kind="ivfpq")))
        results["mine (coordinates)"].append((n, child("mine_coordinates", n=n, folder=str(folder))))
        for name, rungs in results.items():
            if rungs and rungs[-1][0] == n:
                print(f"# synthetic {n}: {name} {rungs[-1][1]}", file=sys.stderr)
        shutil.rmtree(folder, ignore_errors=True)
    table("Synthetic descriptors (256-d) and coordinates", results, unit="vectors/s")
    print("\n(search rows: queries/s; IVF-PQ: nlist 1024, m 32 × 8 bits, nprobe 8, trained on 10⁵ vectors)")


def run_evaluate(n: int) -> None:
    print(f"\n### Evaluate {n:,} database × {QUERIES:,} queries within a memory budget\n")
    print("| descriptors | search | memory_gb | seconds | peak RSS (MB) | R@1 | R@5 | R@20 |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for dim, dtype in ((4096, "float32"), (16384, "float16")):
        folder = WORK / f"evaluate-{dim}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        gen = child("generate", folder=str(folder), n=n, dim=dim, dtype=dtype, rows=1_000)
        print(f"# {dim}-d: generated {gen}", file=sys.stderr)
        runs = [("chunked (store)", 8, child("search_store", folder=str(folder), memory_gb=8))]
        runs.append(("chunked (store)", 1, child("search_store", folder=str(folder), memory_gb=1)))
        if dim * n * 4 * 2 < 16 * 2**30:  # the whole array plus the flat index's copy of it
            runs.append(("in memory (one array + flat index)", "—", child("search_in_memory", folder=str(folder))))
        for how, budget, r in runs:
            if "failed" in r:
                print(f"| {dim:,}-d {dtype} | {how} | {budget} | wall: {r['failed']} | — | — | — | — |")
                continue
            print(
                f"| {dim:,}-d {dtype} ({dim * n * np.dtype(dtype).itemsize / 2**30:.1f} GiB) | {how} | {budget} | "
                f"{r['seconds']:.1f} | {r['peak_rss_mb']:,.0f} | {r['recall@1']:.1f} | {r['recall@5']:.1f} | "
                f"{r['recall@20']:.1f} |"
            )
        shutil.rmtree(folder, ignore_errors=True)


# --------------------------------------------------------------------------- re-indexing


@stage
def make_release(folder: str, n: int) -> dict:
    """A release of ``n`` 256-d vectors (untrained GeM model) in the format ``vpr index`` writes."""
    import faiss
    import polars as pl

    from vpr.foundations.config import ModelConfig
    from vpr.shared.checkpoints import save_checkpoint, untrained_model
    from vpr.shared.versions import base_segment, commit_version
    from vpr.steps.index import IDS_FILE, INDEX_FILE, MODEL_FILE, release_metadata, write_manifest

    model_cfg = ModelConfig(weights="none", gem_dim=256)
    model = untrained_model("gem", model_cfg, 0)
    checkpoint = Path(folder) / "gem.pt"
    save_checkpoint({"head": "gem", "model_config": model_cfg.model_dump(), "model": model.state_dict()}, checkpoint)
    ids = np.arange(n, dtype=np.int64)
    index = faiss.IndexIDMap2(faiss.IndexFlatL2(256))
    for s in range(0, n, 100_000):
        rng = np.random.default_rng(s)
        x = rng.standard_normal((min(n, s + 100_000) - s, 256), dtype=np.float32)
        index.add_with_ids(x / np.linalg.norm(x, axis=1, keepdims=True), ids[s : s + len(x)])
    rows = release_metadata(pl.DataFrame({"id": ids, "path": [f"db/{i:09d}.jpg" for i in ids], "split": "test"}))

    def build(version: Path, number: int) -> None:
        faiss.write_index(index, str(version / INDEX_FILE))
        rows.write_parquet(version / IDS_FILE)
        shutil.copyfile(checkpoint, version / MODEL_FILE)
        manifest = {"head": "gem", "version": number, "parent": None, "count": n, "added": n}
        manifest.update(descriptor_dim=256, index_kind="exact", segments=[base_segment(n, ids)])
        write_manifest(version, manifest)

    commit_version(Path(folder) / "release", build)
    return {"items": n}


@stage
def append(folder: str, n: int, new: int, round: int) -> dict:
    """``open_for_append`` + ``add_to_release`` of ``new`` vectors: what ``vpr reindex`` does per batch."""
    import polars as pl

    from vpr.steps.index import add_to_release, open_for_append

    ids = np.arange(n + round * new, n + (round + 1) * new, dtype=np.int64)
    x = np.random.default_rng(round).standard_normal((new, 256), dtype=np.float32)
    meta = pl.DataFrame({"id": ids, "path": [f"new/{i:09d}.jpg" for i in ids], "split": "test"})
    t0 = time.perf_counter()
    release = open_for_append(Path(folder) / "release")
    opened = time.perf_counter() - t0
    add_to_release(release, ids, x / np.linalg.norm(x, axis=1, keepdims=True), meta)
    return {"items": new, "seconds": time.perf_counter() - t0, "open_seconds": opened}


@stage
def load_whole(folder: str) -> dict:
    from vpr.steps.index import load_release

    t0 = time.perf_counter()
    release = load_release(Path(folder) / "release")
    return {"items": release.index.ntotal, "seconds": time.perf_counter() - t0}


@stage
def catalog_append(folder: str, n: int, new: int) -> dict:
    """``append_to_catalog`` of ``new`` rows to an ``n``-row catalog (one new part beside the base)."""
    import polars as pl

    from vpr.foundations.parts import write_base
    from vpr.steps.catalog import CATALOG_SCHEMA
    from vpr.steps.catalogappend import append_to_catalog

    def hashed(table):  # distinct sha256 values, so the duplicate check reads a real hash column
        raw = np.random.default_rng(table.height).bytes(32 * table.height)
        return table.with_columns(sha256=pl.Series([raw[i : i + 32].hex() for i in range(0, len(raw), 32)]))

    cat = hashed(synthetic_catalog(n))
    full = pl.DataFrame({k: cat[k] if k in cat.columns else None for k in CATALOG_SCHEMA}).cast(CATALOG_SCHEMA)
    path = Path(folder) / "catalog.parquet"
    write_base(full, path)  # as ingest writes it (the parts of an earlier round are superseded)
    extra = hashed(synthetic_catalog(new, seed=1).with_columns(pl.col("path").str.replace("test/", "new/")))
    rows = [{**{k: None for k in CATALOG_SCHEMA}, **r} for r in extra.to_dicts()]
    t0 = time.perf_counter()
    append_to_catalog(path, rows)
    return {"items": new, "seconds": time.perf_counter() - t0}


def run_reindex(sizes: list[int], new: int, rounds: int) -> None:
    folders = {n: WORK / f"reindex-{n}" for n in sizes}
    for n, folder in folders.items():
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        child("make_release", folder=str(folder), n=n)
    appends: dict[int, list[dict]] = {n: [] for n in sizes}
    loads: dict[int, list[dict]] = {n: [] for n in sizes}
    cats: dict[int, list[dict]] = {n: [] for n in sizes}
    for r in range(rounds):  # interleaved: each round appends to every release size in turn
        for n, folder in folders.items():
            appends[n].append(child("append", folder=str(folder), n=n, new=new, round=r))
            loads[n].append(child("load_whole", folder=str(folder)))
            cats[n].append(child("catalog_append", folder=str(folder), n=n, new=new))
    print(f"\n### Re-indexing {new:,} new vectors (256-d), {rounds} interleaved rounds, medians\n")
    print(
        "| release size | open + append (s) | of which open (s) | peak RSS (MB) | load whole release (s) |"
        " catalog append (s) |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    med = _common.median
    for n in sizes:
        print(
            f"| {n:,} | {med([a['seconds'] for a in appends[n]]):.2f} | "
            f"{med([a['open_seconds'] for a in appends[n]]):.2f} | "
            f"{max(a['peak_rss_mb'] for a in appends[n]):,.0f} | {med([x['seconds'] for x in loads[n]]):.2f} | "
            f"{med([c['seconds'] for c in cats[n]]):.2f} |"
        )
    small, large = sizes[0], sizes[-1]
    for label, data in (("append", appends), ("load whole", loads), ("catalog append", cats)):
        ratio = med([x["seconds"] for x in data[large]]) / med([x["seconds"] for x in data[small]])
        print(f"{label}: {large:,} / {small:,} time ratio {ratio:.2f} (release {large // small}× larger)")
    for folder in folders.values():
        shutil.rmtree(folder, ignore_errors=True)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_stage":
        return run_stage(sys.argv[2], json.loads(sys.argv[3]))
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("part", choices=("real", "synthetic", "evaluate", "reindex"))
    parser.add_argument("--sizes", type=int, nargs="+")
    parser.add_argument("--new", type=int, default=10_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="real: keep the rungs' folders; resume finished stages")
    parser.add_argument("--stage-timeout", type=float, default=STAGE_TIMEOUT_S[0], help="seconds per stage")
    args = parser.parse_args()
    STAGE_TIMEOUT_S[0] = args.stage_timeout
    print(f"machine: {_common.machine()}")
    WORK.mkdir(parents=True, exist_ok=True)
    if args.part == "real":
        run_real(args.sizes or [10_000], args.keep)
    elif args.part == "synthetic":
        run_synthetic(args.sizes or [10_000, 100_000, 1_000_000])
    elif args.part == "evaluate":
        run_evaluate((args.sizes or [250_000])[0])
    else:
        run_reindex(args.sizes or [100_000, 1_000_000], args.new, args.rounds)


if __name__ == "__main__":
    main()
