"""Training-loop benchmark: the real loop's images/s vs the model-only bound, per head.

Real loop: ``vpr.steps.train.train_head`` for one epoch on the benchmark project — loading, mining
refreshes (amortised as configured) and the optimiser steps; its own ``images_per_s`` (the epoch
loop, without validation and checkpointing). Model-only bound: the same model, batch
(``batch_queries`` × (2 + ``negatives``) images), loss and optimiser on a synthetic batch already on
the device, measured right before and right after the real loop. On CPU both with and without the
trunk cache (frozen early layers encoded once per run; its bound is ``layer3`` + head on synthetic
trunk maps), and the one-off cost of building that cache. ``--precision fp32 bf16`` runs both step
arithmetics side by side (``train.precision``; auto = bf16 on CUDA and on CPUs with native bf16). CUDA:
channels_last, as ``train_head`` does there (``--compile`` adds torch.compile to both). Target on GPU at 480×640:
the real loop ≥ 0.8 of the bound.

Queries per epoch, refresh interval and negative sample are params.yaml's times ``--fraction``,
so mining refreshes weigh what they weigh in the configured run (or set them directly). The last
of ``--epochs`` epochs is reported. Mining % and loading % are the share of the epochs' time that
training itself reports in its summary's ``phases`` (``mining``: the refreshes; ``loading``: waiting for
triplet batches, which with DataLoader workers includes starting them once per refresh chunk); steps %
is the rest.

    .venv/bin/python bench/train_loop.py                   # CPU here: 120x160, fraction 0.25
    .venv/bin/python bench/train_loop.py --device cuda --height 480 --width 640 --workers 16 --epochs 2 \
        --refresh-every 1000 --negative-sample 1000 --queries-per-epoch 300    # paper-profile refreshes
"""

from __future__ import annotations

import argparse
import time
import warnings

import _common
import numpy as np
import torch

from vpr.foundations.config import parse_config
from vpr.foundations.registry import head_names, head_spec
from vpr.shared.descriptors import autocast, image_transform, use_bf16
from vpr.shared.models import build_model
from vpr.shared.shardio import ShardReader
from vpr.shared.triplets import triplet_loss
from vpr.shared.trunk import open_trunk_cache
from vpr.steps.train import train_head

TRAIN_ID_SPLITS = ("train", "val")


def step_bound(head: str, cfg, device: torch.device, steps: int, from_trunk: bool, compile_: bool, bf16: bool) -> float:
    """Images/s of forward + triplet loss + backward + Adam step on a synthetic batch."""
    tc = cfg.train
    b, n = tc.batch_queries, 2 + tc.negatives
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(head, cfg.model).to(device)
    h, w = cfg.shards.height, cfg.shards.width
    if from_trunk:
        x = torch.randn(b * n, 128, -(-h // 8), -(-w // 8), device=device)
        fn = model.forward_from_trunk
    else:
        x = torch.randn(b * n, 3, h, w, device=device)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        fn = torch.compile(model) if compile_ and device.type == "cuda" else model
    model.train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=tc.lr)

    def step() -> None:
        with autocast(device, bf16):
            out = fn(x)
        loss = triplet_loss(out.float().view(b, n, -1), tc.margin)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()  # the real loop reads the loss every step

    for _ in range(3 if compile_ else 1):  # warm-up (oneDNN / cuDNN / compile)
        step()
    _common.sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    _common.sync(device)
    return steps * b * n / (time.perf_counter() - t0)


def bench_cfg(cfg, args, device: torch.device, cache: str, precision: str = "auto"):
    raw = cfg.model_dump(mode="json")
    tc = raw["train"]
    tc.update(
        epochs=args.epochs,
        patience=99,
        workers=args.workers,
        device=device.type,
        compile=args.compile,
        cache_frozen_trunk=cache,
        precision=precision,
        queries_per_epoch=max(tc["batch_queries"], round(tc["queries_per_epoch"] * args.fraction)),
        refresh_every=max(tc["batch_queries"], round(tc["refresh_every"] * args.fraction)),
        negative_sample=max(tc["negatives"], round(tc["negative_sample"] * args.fraction)),
    )
    for key in ("queries_per_epoch", "refresh_every", "negative_sample"):
        if getattr(args, key) is not None:
            tc[key] = getattr(args, key)
    return parse_config(raw)


def cache_build_seconds(cfg, layout, device: torch.device) -> tuple[float, int]:
    """Wall time of encoding every train/val image into the trunk cache (the most a run can pay: a run
    encodes an image the first time it needs it)."""
    reader = ShardReader(layout.shards_dir)
    ids = reader.index.filter(reader.index["split"].is_in(TRAIN_ID_SPLITS))["id"].to_numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model("avg", cfg.model).to(device)
    tf = image_transform(cfg.shards.height, cfg.shards.width, cfg.train.image_scale)
    t0 = time.perf_counter()
    size = (round(cfg.shards.height * cfg.train.image_scale), round(cfg.shards.width * cfg.train.image_scale))
    cache = open_trunk_cache(model, reader, ids, tf, device, size=size, batch_size=cfg.evaluate.batch_size, folder=None)
    cache.ensure(ids)
    return time.perf_counter() - t0, len(ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", nargs="+", default=list(head_names()))
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--city", type=float, default=1.0)
    parser.add_argument(
        "--fraction", type=float, default=0.25, help="queries_per_epoch, refresh_every, negative_sample = params x this"
    )
    parser.add_argument("--queries-per-epoch", dest="queries_per_epoch", type=int, help="instead of --fraction")
    parser.add_argument("--refresh-every", dest="refresh_every", type=int, help="instead of --fraction")
    parser.add_argument("--negative-sample", dest="negative_sample", type=int, help="instead of --fraction")
    parser.add_argument("--epochs", type=int, default=1, help="the last epoch is reported (later ones: warm)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (train.workers)")
    parser.add_argument("--device", default="cpu", help="cpu | cuda | auto")
    parser.add_argument(
        "--cache",
        nargs="+",
        default=None,
        choices=["off", "on"],
        help="trunk cache settings to run (default: off and on on CPU, off on CUDA)",
    )
    parser.add_argument(
        "--precision",
        nargs="+",
        default=["auto"],
        choices=["auto", "fp32", "bf16"],
        help="train.precision settings to run side by side (e.g. fp32 bf16)",
    )
    parser.add_argument("--bound-steps", type=int, default=4)
    parser.add_argument("--compile", action="store_true", help="torch.compile (CUDA only, as train_head)")
    args = parser.parse_args()
    device = _common.resolve(args.device)
    base_cfg, layout = _common.project(args.height, args.width, city=args.city)
    caches = args.cache or (["off", "on"] if device.type == "cpu" else ["off"])
    # a head that starts from another (CRN from NetVLAD) runs after it, in the registry's order
    heads = sorted(args.heads, key=lambda h: (head_spec(h).starts_from is not None, list(head_names()).index(h)))

    print(f"# training-loop benchmark — {_common.machine(device)}")
    cfg0 = bench_cfg(base_cfg, args, device, "off")
    tc = cfg0.train
    print(
        f"# {cfg0.shards.width}x{cfg0.shards.height}, batch {tc.batch_queries} queries x {2 + tc.negatives} "
        f"images, {tc.queries_per_epoch} queries/epoch, refresh every {tc.refresh_every} ({tc.mining}, "
        f"{tc.negative_sample} negatives sampled), workers {tc.workers}, device {device.type}"
        f"{' channels_last' if device.type == 'cuda' else ''}{' compiled' if args.compile else ''}"
    )
    if "on" in caches:
        seconds, n = cache_build_seconds(cfg0, layout, device)
        print(
            f"# trunk cache build (once per run): {n} train+val images in {seconds:.1f} s ({n / seconds:.0f} images/s)"
        )
    print(
        f"{'head':<8} {'trunk cache':<11} {'step':<5} {'loop img/s':>10} {'bound img/s':>11} {'loop/bound':>10} "
        f"{'mining %':>8} {'loading %':>9} {'steps %':>7} {'epoch s':>8}"
    )
    for head in heads:
        for cache, precision in [(c, p) for c in caches for p in args.precision]:
            cfg = bench_cfg(base_cfg, args, device, cache, precision)
            bf16 = use_bf16(device, precision)
            steps = args.bound_steps
            before = step_bound(head, cfg, device, steps, cache == "on", args.compile, bf16)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                summary = train_head(head, cfg, layout)
            after = step_bound(head, cfg, device, steps, cache == "on", args.compile, bf16)
            epoch = summary["history"][-1]
            loop = epoch["images_per_s"]
            bound = float(np.mean([before, after]))
            all_epochs = sum(e["seconds"] for e in summary["history"])  # the phases cover every epoch
            mining = 100 * summary["phases"].get("mining", 0.0) / all_epochs
            loading = 100 * summary["phases"].get("loading", 0.0) / all_epochs
            print(
                f"{head:<8} {cache:<11} {'bf16' if bf16 else 'fp32':<5} {loop:10.1f} {bound:11.1f}"
                f" {loop / bound:9.2f}x {mining:8.0f} "
                f"{loading:9.0f} {100 - mining - loading:7.0f} {epoch['seconds']:8.1f}   "
                f"(bound before/after {before:.1f}/{after:.1f})",
                flush=True,
            )


if __name__ == "__main__":
    main()
