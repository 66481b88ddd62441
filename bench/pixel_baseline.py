"""Raw-pixel nearest-neighbour baseline on the test split: the floor any learned model must beat.

Each image becomes a 16x12 grey thumbnail, mean-subtracted and L2-normalised; every query is matched to
its exact nearest database thumbnails. A query counts at N if any of its top-N matches lies within
25 m (UTM from the file name). On the synthetic city this must stay well below a learned descriptor:
pixels fail under lighting change, distractors and viewpoint shift.

    .venv/bin/python bench/pixel_baseline.py [--root DATASETS_VG_ROOT] [--split test]

Without --root, the default city (params.yaml synth section) is generated in a temporary folder.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from vpr.foundations.config import load_config
from vpr.foundations.geo import parse_name
from vpr.steps.synth import generate_city

THUMB = (16, 12)
RECALL_AT = (1, 5, 10, 20)
POSITIVE_M = 25.0


def thumbnails(paths: list[Path]) -> np.ndarray:
    """(n, 192) float32: grey 16x12 thumbnails, mean-subtracted and L2-normalised."""
    rows = []
    for path in paths:
        with Image.open(path) as im:
            rows.append(np.asarray(im.convert("L").resize(THUMB, Image.BILINEAR), dtype=np.float32).ravel())
    x = np.stack(rows)
    x -= x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True) + 1e-8
    return x


def utm(paths: list[Path]) -> np.ndarray:
    return np.array([(g.utm_east, g.utm_north) for g in map(parse_name, paths)])


def recall_at(root: Path, split: str = "test") -> dict[int, float]:
    """Recall@N (percent) of raw-pixel exact nearest neighbour search on one split."""
    db_paths = sorted((root / "images" / split / "database").glob("*.jpg"))
    q_paths = sorted((root / "images" / split / "queries").glob("*.jpg"))
    if not db_paths or not q_paths:
        raise SystemExit(f"no {split} database/queries images under {root}/images")
    db, q = thumbnails(db_paths), thumbnails(q_paths)
    ranked = np.argsort(-(q @ db.T), axis=1, kind="stable")[:, : max(RECALL_AT)]
    dist = np.linalg.norm(utm(q_paths)[:, None, :] - utm(db_paths)[None, :, :], axis=-1)
    hit = np.take_along_axis(dist, ranked, axis=1) <= POSITIVE_M
    return {n: 100.0 * float(hit[:, :n].any(axis=1).mean()) for n in RECALL_AT}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", type=Path, help="datasets_vg root; default: generate the default city")
    parser.add_argument("--split", default="test")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vpr-city-") as tmp:
        root = args.root
        if root is None:
            root = Path(tmp)
            start = time.perf_counter()
            summary = generate_city(root, load_config(args.params).synth)
            print(
                f"generated {summary['images']} images in {time.perf_counter() - start:.1f} s "
                f"(queries without a database image within 25 m: {summary['queries_without_db_within_25m']})"
            )
        recalls = recall_at(root, args.split)
    print(
        f"pixel baseline ({THUMB[0]}x{THUMB[1]} grey, exact NN), {args.split} split: "
        + "  ".join(f"R@{n} {r:.1f}" for n, r in recalls.items())
    )


if __name__ == "__main__":
    main()
