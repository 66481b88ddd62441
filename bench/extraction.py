"""Extraction benchmark: evaluate's descriptor extraction vs the inference bound, per head.

``extract`` (``vpr.shared.descriptors``, what ``vpr evaluate``, ``vpr index``, validation and mining
refreshes run) on the test split's images — shards → decode → transform → batch → model → host
array — against the bound: the same model and batch size on a synthetic tensor already on the
device (no loading, no copies). CPU: fp32; CUDA: bf16 autocast + channels_last, as ``extract``
does there. Also, for the record, ``extract`` with torchvision's ``ToDtype`` + ``Normalize`` (the
transform before ``vpr.shared.descriptors.normalize_uint8``). Target on GPU: extraction ≥ 0.8 of the bound.

    .venv/bin/python bench/extraction.py                   # CPU here: 120x160, workers 0 and 2, every head
    .venv/bin/python bench/extraction.py --device cuda --height 480 --width 640 --workers 16 --batch-size 64
"""

from __future__ import annotations

import argparse
import time
import warnings

import _common
import numpy as np
import torch
from loader import legacy_transform

from vpr.foundations.registry import head_names
from vpr.shared.checkpoints import untrained_model
from vpr.shared.descriptors import autocast, extract, image_transform
from vpr.shared.shardio import ShardReader


@torch.inference_mode()
def bound(model, n: int, batch_size: int, shape: tuple[int, int], device: torch.device) -> float:
    """Images/s of the model alone on a synthetic batch already on the device."""
    fmt = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    x = torch.randn(batch_size, 3, *shape, device=device).contiguous(memory_format=fmt)
    model.eval()
    with autocast(device):
        model(x)  # warm-up
    _common.sync(device)
    t0 = time.perf_counter()
    done = 0
    while done < n:
        b = min(batch_size, n - done)
        with autocast(device):
            model(x[:b])
        done += b
    _common.sync(device)
    return n / (time.perf_counter() - t0)


def timed_extract(model, reader, ids, transform, device, batch_size, workers) -> float:
    t0 = time.perf_counter()
    out = extract(model, reader, ids, transform, device=device, batch_size=batch_size, workers=workers)
    assert out.shape == (len(ids), model.descriptor_dim)
    return len(ids) / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--heads",
        nargs="+",
        default=list(head_names()),
        help="heads to time (default: every registered head)",
    )
    parser.add_argument("--images", type=int, default=320, help="test-split images per measurement (0: all)")
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--city", type=float, default=1.0)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, help="default: params evaluate.batch_size")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--no-legacy", action="store_true")
    args = parser.parse_args()
    device = _common.resolve(args.device)
    cfg, layout = _common.project(args.height, args.width, city=args.city)
    batch = args.batch_size or cfg.evaluate.batch_size
    reader = ShardReader(layout.shards_dir)
    test = reader.index.filter(reader.index["split"] == "test")
    ids = np.concatenate([test.filter(test["role"] == r)["id"].to_numpy() for r in ("database", "queries")])
    if 0 < args.images < len(ids):
        ids = np.sort(np.random.default_rng(0).choice(ids, size=args.images, replace=False))
    tf = image_transform(cfg.shards.height, cfg.shards.width)
    legacy = legacy_transform(cfg.shards.height, cfg.shards.width)
    shape = (cfg.shards.height, cfg.shards.width)

    print(f"# extraction benchmark — {_common.machine(device)}")
    print(
        f"# test split, {len(ids)} images {shape[1]}x{shape[0]}, batch {batch}, device {device.type}"
        f"{' (bf16 autocast, channels_last)' if device.type == 'cuda' else ' (fp32)'}, "
        f"{args.rounds} rounds interleaved, medians (min–max) in images/s"
    )
    print(f"{'head':<8} {'variant':<44} {'images/s':>9} {'(min–max)':>13} {'vs bound':>9}")
    for head in args.heads:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # no ImageNet weights here: random init, same speed
            model = untrained_model(head, cfg.model, cfg.train.seed, device)
        extract(model, reader, ids[:batch], tf, device=device, batch_size=batch)  # warm-up
        variants = {"inference bound (synthetic batch)": lambda: bound(model, len(ids), batch, shape, device)}
        for w in args.workers:
            variants[f"extract, workers {w}"] = lambda w=w: timed_extract(model, reader, ids, tf, device, batch, w)
        if not args.no_legacy:
            w0 = min(args.workers)
            variants[f"extract, workers {w0}, torchvision normalise"] = lambda: timed_extract(
                model, reader, ids, legacy, device, batch, w0
            )
        rates = _common.interleaved(variants, args.rounds)
        top = _common.median(rates["inference bound (synthetic batch)"])
        for name, xs in rates.items():
            print(
                f"{head:<8} {name:<44} {_common.median(xs):9.1f} {_common.spread(xs):>13} "
                f"{_common.median(xs) / top:8.2f}x"
            )


if __name__ == "__main__":
    main()
