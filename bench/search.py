"""Search benchmark: exact (flat L2) vs IVF-PQ and HNSW, queries/s ratio and Recall@1 loss.

Synthetic descriptors with place structure, so that recall means something: ``places`` are points
of a 64-d latent space drawn around 32 shared "facade styles" (look-alike places), each seen by
5 database images and by queries with view noise; everything is projected to the descriptor
dimension, gets a little isotropic noise and is L2-normalised (like a PCA-reduced NetVLAD or a GeM
descriptor). A query is correct at 1 when its first match shows its place. Exact Recall@1 is about
90 % at 1e5 (it drops with the database size: more look-alikes).

Indexes are built by ``vpr.steps.evaluate.make_index`` — the code ``vpr evaluate`` and ``vpr index`` run —
with the ``index:`` params given here. Speed-up = exact search time / index search time for the same
queries, each the best of ``--repeats`` runs (exact is re-timed between all settings, so load from
other processes cannot favour one side); both for one batch of ``--queries`` (``vpr evaluate``) and
one query at a time (``vpr locate``), both with ``--threads`` faiss threads (default 1: on a shared
machine OpenMP threads stall on busy cores; both sides parallelise over queries). Target:
≥ 10× at ≤ 1 point of Recall@1 loss.

    .venv/bin/python bench/search.py                              # 1e5 x 256-d (a few minutes here)
    .venv/bin/python bench/search.py --dims 4096 --sizes 100000   # ~15 min here (IVF/HNSW builds)
    .venv/bin/python bench/search.py --sizes 1000000              # 1e6 x 256-d: ~4 GB, long builds
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import _common
import faiss
import numpy as np

from vpr.foundations.config import IndexConfig
from vpr.shared.retrieval import make_index, pq_subquantizers

LATENT, STYLES, VIEWS = 64, 32, 5


def synthetic(n_db: int, dim: int, n_q: int, seed: int = 0, noise: float = 1.0, iso: float = 0.1):
    """(database, queries, database place, query place), float32, rows L2-normalised."""
    rng = np.random.default_rng(seed)
    proj = rng.standard_normal((LATENT, dim), dtype=np.float32) / np.float32(math.sqrt(LATENT))
    styles = rng.standard_normal((STYLES, LATENT), dtype=np.float32)
    n_places = max(1, n_db // VIEWS)
    places = 0.8 * styles[rng.integers(0, STYLES, n_places)] + rng.standard_normal((n_places, LATENT), dtype=np.float32)
    db_place = np.repeat(np.arange(n_places), VIEWS)[:n_db]
    q_place = rng.integers(0, n_places, n_q)

    def views(place_ids: np.ndarray) -> np.ndarray:
        out = np.empty((len(place_ids), dim), dtype=np.float32)
        for s in range(0, len(place_ids), 50_000):  # chunks: bounded temporaries
            ids = place_ids[s : s + 50_000]
            lat = places[ids] + noise * rng.standard_normal((len(ids), LATENT), dtype=np.float32)
            x = lat @ proj + iso * rng.standard_normal((len(ids), dim), dtype=np.float32)
            out[s : s + len(ids)] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return views(db_place), views(q_place), db_place, q_place


def recall1(ranked: np.ndarray, db_place: np.ndarray, q_place: np.ndarray) -> float:
    return 100.0 * float(np.mean(db_place[ranked[:, 0]] == q_place))


def timed_search(index, q: np.ndarray, k: int, repeats: int = 1) -> tuple[float, np.ndarray]:
    best, ranked = math.inf, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, ranked = index.search(q, k)
        best = min(best, time.perf_counter() - t0)
    return best, ranked


def one_by_one(index, q: np.ndarray, k: int, repeats: int) -> float:
    """Best-of-``repeats`` time of searching ``q`` one query at a time (``vpr locate`` on one photo)."""
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(len(q)):
            index.search(q[i : i + 1], k)
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[256])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000])
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=20, help="neighbours per query (evaluate's largest N)")
    parser.add_argument("--nlist", type=int, nargs="+", help="IVF cells (default: about 4 sqrt(N))")
    parser.add_argument("--nprobe", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--pq-m", type=int, nargs="+", help="PQ sub-quantisers (default: dim/8 and dim/4, at most 128)")
    parser.add_argument("--hnsw-m", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--ef-search", type=int, nargs="+", default=[16, 24, 32, 48, 64, 128])
    parser.add_argument(
        "--threads", type=int, default=1, help="faiss threads (default 1: stable on a shared machine; 0 = all cores)"
    )
    parser.add_argument("--single", type=int, default=50, help="queries searched one at a time")
    parser.add_argument("--repeats", type=int, default=3, help="best-of repeats of every timing")
    parser.add_argument("--max-gb", type=float, default=12.0, help="skip sizes whose vectors exceed this")
    args = parser.parse_args()
    header = _common.machine()
    all_threads = faiss.omp_get_max_threads()
    search_threads = args.threads or all_threads
    faiss.omp_set_num_threads(search_threads)
    print(
        f"# search benchmark — {header}, faiss {faiss.__version__} "
        f"({search_threads} search threads, {all_threads} build threads)"
    )
    print(
        f"# {args.queries} queries (batch) and {args.single} one at a time, k={args.k}, best of {args.repeats}; "
        "speed-up = exact time / index time; loss = exact R@1 - index R@1 (points)"
    )
    for dim in args.dims:
        for n in args.sizes:
            gb = n * dim * 4 / 2**30
            if gb > args.max_gb:
                print(f"\n## {n:,} x {dim}-d: skipped ({gb:.1f} GiB of vectors > --max-gb {args.max_gb})")
                continue
            t0 = time.perf_counter()
            db, q, db_place, q_place = synthetic(n, dim, args.queries)
            flat = make_index("exact", dim, n)
            flat.add(db)
            single = q[: args.single]
            exact_times = {"batch": [], "single": []}

            def time_exact(repeats: int) -> np.ndarray:
                s_, ranked_ = timed_search(flat, q, args.k, repeats)
                exact_times["batch"].append(s_)
                exact_times["single"].append(one_by_one(flat, single, args.k, repeats))
                return ranked_

            exact_ranked = time_exact(args.repeats)
            exact_r1 = recall1(exact_ranked, db_place, q_place)
            print(
                f"\n## {n:,} x {dim}-d ({gb:.2f} GiB, generated in {time.perf_counter() - t0:.0f} s): exact "
                f"R@1 {exact_r1:.1f}",
                flush=True,
            )
            rows = []

            def report(kind: str, setting: str, build_s: float, index) -> None:
                s_, ranked = timed_search(index, q, args.k, args.repeats)
                one = one_by_one(index, single, args.k, args.repeats)
                time_exact(1)  # exact again between settings: its best time is the ratio's numerator
                r1 = recall1(ranked, db_place, q_place)
                agree = 100.0 * float(np.mean(ranked[:, 0] == exact_ranked[:, 0]))
                rows.append((kind, setting, build_s, s_, one, r1, agree))
                print(f"  measured {kind} {setting}", file=sys.stderr, flush=True)

            nlists = args.nlist or [2 ** round(math.log2(4 * math.sqrt(n)))]
            pq_ms = args.pq_m or sorted({min(128, dim // 8), min(128, dim // 4)})
            for nlist in nlists:
                for pq_m in pq_ms:
                    params = IndexConfig(nlist=nlist, pq_m=pq_m, pq_bits=8)
                    t0 = time.perf_counter()
                    faiss.omp_set_num_threads(all_threads)  # builds on every core
                    index = make_index("ivfpq", dim, n, params)
                    index.train(db)
                    index.add(db)
                    build = time.perf_counter() - t0
                    faiss.omp_set_num_threads(search_threads)
                    for nprobe in args.nprobe:
                        index.nprobe = min(nprobe, index.nlist)
                        report(
                            "ivfpq",
                            f"nlist={index.nlist} pq_m={pq_subquantizers(dim, pq_m)} nprobe={index.nprobe}",
                            build,
                            index,
                        )
                    del index
            for m in args.hnsw_m:
                t0 = time.perf_counter()
                faiss.omp_set_num_threads(all_threads)
                index = make_index("hnsw", dim, n, IndexConfig(hnsw_m=m))
                index.add(db)
                build = time.perf_counter() - t0
                faiss.omp_set_num_threads(search_threads)
                for ef in args.ef_search:
                    index.hnsw.efSearch = ef
                    report("hnsw", f"hnsw_m={m} ef_search={ef}", build, index)
                del index
            exact_s, exact_one = min(exact_times["batch"]), min(exact_times["single"])
            print(
                f"exact (flat L2): {args.queries / exact_s:.0f} queries/s in a batch of {args.queries}, "
                f"{len(single) / exact_one:.0f} queries/s one at a time"
            )
            print(
                f"{'index':<8} {'setting':<34} {'build s':>8} {'batch q/s':>10} {'speed-up':>9} "
                f"{'single q/s':>10} {'speed-up':>9} {'R@1':>6} {'loss':>6} {'top1=exact %':>12}"
            )
            table = []
            for kind, setting, build_s, s_, one, r1, agree in rows:
                table.append((kind, setting, exact_s / s_, exact_r1 - r1))
                print(
                    f"{kind:<8} {setting:<34} {build_s:8.1f} {args.queries / s_:10.0f} {exact_s / s_:8.1f}x "
                    f"{len(single) / one:10.0f} {exact_one / one:8.1f}x {r1:6.1f} {exact_r1 - r1:6.1f} {agree:12.1f}"
                )
            good = [r for r in table if r[3] <= 1.0]
            if good:
                kind, setting, ratio, loss = max(good, key=lambda r: r[2])
                verdict = "meets" if ratio >= 10 else "misses"
                print(
                    f"recommended ({n:,} x {dim}-d): {kind} {setting}: {ratio:.1f}x (batch) at {loss:.1f} points "
                    f"R@1 loss ({verdict} the 10x target)"
                )
            else:
                print(f"recommended ({n:,} x {dim}-d): none within 1 point of exact R@1")


if __name__ == "__main__":
    main()
