"""Loader benchmark: images/s from the WebDataset shards into training tensors vs the JPEG folders.

Same images, same resolution (the synthetic city rendered at the shard size), same transform
(``vpr.shared.descriptors.image_transform``), same batch size and DataLoader workers:

- ``shards random``: ``ShardReader`` random access (one ``pread`` per image) in shuffled order: the
  path triplet batches take (``vpr.shared.triplets.TripletImages``);
- ``shards stream``: ``vpr.shared.descriptors.ShardStream`` (WebDataset, shard by shard, shards dealt out to
  the workers): the path every sequential read takes (extraction, trunk cache, k-means sample);
- ``jpeg folders``: ``PIL.Image.open`` on the datasets_vg files, same shuffled order;
- ``... torchvision normalise``: ``shards random`` with torchvision's ``ToDtype`` + ``Normalize``
  (the transform before the fix in ``vpr.shared.descriptors.normalize_uint8``), for the record;
- on CUDA also ``shards random, GPU decode``: the workers only read JPEG bytes, nvJPEG decodes the
  batch on the GPU (``torchvision.io.decode_jpeg``) and normalises it there.

On CUDA every batch is copied to the device (pinned memory, non-blocking) and the clock stops after
a synchronise. A single-process per-image breakdown (read, decode, transform) comes first.

    .venv/bin/python bench/loader.py                       # CPU here: 120x160, workers 0 and 2
    .venv/bin/python bench/loader.py --device cuda --height 480 --width 640 --workers 16
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import _common
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from vpr.shared.descriptors import IMAGENET_MEAN, IMAGENET_STD, ShardStream, image_transform, loader_kwargs
from vpr.shared.shardio import ShardReader


class FolderImages(Dataset):
    def __init__(self, paths: list[Path], transform) -> None:
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        with Image.open(self.paths[i]) as im:
            return self.transform(im.convert("RGB"))


class RandomImages(Dataset):
    """Images by id through ``ShardReader`` (one ``pread`` each): how triplet batches read the shards."""

    def __init__(self, reader: ShardReader, ids: np.ndarray, transform) -> None:
        self.reader, self.ids, self.transform = reader, ids, transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.reader.load(int(self.ids[i])))


class JpegBytes(Dataset):
    """Raw JPEG bytes (uint8 tensors) for decoding on the GPU."""

    def __init__(self, reader: ShardReader, ids: np.ndarray) -> None:
        self.reader, self.ids = reader, ids

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.frombuffer(bytearray(self.reader.read_jpeg(int(self.ids[i]))), dtype=torch.uint8)


def legacy_transform(height: int, width: int):
    return T.Compose([T.PILToTensor(), T.ToDtype(torch.float32, scale=True), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def first_batch_seconds(loader) -> float:
    """Time from creating the iterator (worker start-up) to the first batch: paid per DataLoader."""
    t0 = time.perf_counter()
    it = iter(loader)
    next(it)
    seconds = time.perf_counter() - t0
    del it
    return seconds


def drain(loader, device: torch.device, n_expected: int) -> float:
    """Images/s of iterating ``loader`` to the end (worker start-up included), batches on ``device``."""
    t0 = time.perf_counter()
    n = 0
    for batch in loader:
        if isinstance(batch, list | tuple):  # ShardStream: (positions, images)
            batch = batch[-1]
        batch = batch.to(device, non_blocking=True)
        n += len(batch)
    _common.sync(device)
    assert n == n_expected, (n, n_expected)
    return n / (time.perf_counter() - t0)


def gpu_decode(loader, device: torch.device, n_expected: int) -> float:
    from torchvision.io import decode_jpeg

    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1) * 255
    t0 = time.perf_counter()
    n = 0
    for datas in loader:
        images = torch.stack(decode_jpeg(datas, device=device))
        batch = (images.float() - mean) / std
        n += len(batch)
    _common.sync(device)
    assert n == n_expected, (n, n_expected)
    return n / (time.perf_counter() - t0)


def breakdown(reader: ShardReader, paths: dict[int, Path], ids: np.ndarray, tf, legacy) -> None:
    """Single-process ms per image of each part of the path (median of 3 passes over ``ids``)."""

    def per_image(fn) -> float:
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for i in ids:
                fn(int(i))
            times.append((time.perf_counter() - t0) / len(ids) * 1e3)
        return _common.median(times)

    jpegs = {int(i): reader.read_jpeg(int(i)) for i in ids}
    images = {int(i): reader.load(int(i)) for i in ids}

    def decode(i: int):
        with Image.open(io.BytesIO(jpegs[i])) as im:
            im.convert("RGB")

    parts = {
        "shard pread": per_image(reader.read_jpeg),
        "folder open+read": per_image(lambda i: paths[i].read_bytes()),
        "decode (PIL)": per_image(decode),
        "transform": per_image(lambda i: tf(images[i])),
        "transform, torchvision normalise": per_image(lambda i: legacy(images[i])),
    }
    print("single process, ms per image: " + ", ".join(f"{k} {v:.3f}" for k, v in parts.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--city", type=float, default=1.0, help="scale of the default city's image counts")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--batch-size", type=int, default=48, help="training batch: 4 queries x 12 images")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument("--no-legacy", action="store_true", help="skip the torchvision-normalise variant")
    args = parser.parse_args()
    device = _common.resolve(args.device)
    cfg, layout = _common.project(args.height, args.width, city=args.city)
    reader = ShardReader(layout.shards_dir)
    ids = np.random.default_rng(0).permutation(reader.index["id"].to_numpy())  # ids are per-split ranges
    paths = {int(i): layout.data / p for i, p in zip(reader.index["id"].to_list(), reader.index["path"].to_list())}
    tf = image_transform(cfg.shards.height, cfg.shards.width)
    legacy = legacy_transform(cfg.shards.height, cfg.shards.width)
    with Image.open(paths[int(ids[0])]) as im:
        assert im.size == (cfg.shards.width, cfg.shards.height), "folders and shards differ in size"

    print(f"# loader benchmark — {_common.machine(device)}")
    print(
        f"# {len(ids)} images {cfg.shards.width}x{cfg.shards.height}, batch {args.batch_size}, "
        f"device {device.type}, {args.rounds} rounds interleaved, medians (min–max)"
    )
    breakdown(reader, paths, ids[:200], tf, legacy)
    for workers in args.workers:
        kw = dict(batch_size=args.batch_size, **loader_kwargs(device, workers))
        variants = {
            "shards random (ShardReader)": lambda: drain(
                DataLoader(RandomImages(reader, ids, tf), **kw), device, len(ids)
            ),
            "shards stream (ShardStream)": lambda: drain(
                DataLoader(ShardStream.of(reader, np.sort(ids), tf), **kw), device, len(ids)
            ),
            "jpeg folders (PIL)": lambda: drain(
                DataLoader(FolderImages([paths[i] for i in ids], tf), **kw), device, len(ids)
            ),
        }
        if not args.no_legacy:
            variants["shards random, torchvision normalise"] = lambda: drain(
                DataLoader(RandomImages(reader, ids, legacy), **kw), device, len(ids)
            )
        if device.type == "cuda":
            variants["shards random, GPU decode (nvJPEG)"] = lambda: gpu_decode(
                DataLoader(JpegBytes(reader, ids), collate_fn=list, **kw), device, len(ids)
            )
        rates = _common.interleaved(variants, args.rounds)
        base = _common.median(rates["jpeg folders (PIL)"])
        startup = _common.median(
            [first_batch_seconds(DataLoader(RandomImages(reader, ids, tf), **kw)) for _ in range(args.rounds)]
        )
        print(f"\nworkers {workers}: first batch after {1e3 * startup:.0f} ms (paid by every new DataLoader)")
        print(f"{'path':<40} {'images/s':>9} {'(min–max)':>13} {'vs folders':>10}")
        for name, xs in rates.items():
            print(f"{name:<40} {_common.median(xs):9.0f} {_common.spread(xs):>13} {_common.median(xs) / base:9.2f}x")


if __name__ == "__main__":
    main()
