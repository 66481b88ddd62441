"""fp32 vs bf16 autocast on this device, side by side in one run (``train.precision``).

Synthetic tensors, no data loading: the training step that ``vpr train`` runs with the trunk cache
(``layer3`` + head, triplet loss, Adam) and the inference passes (trunk, whole model), each in fp32
and then in bf16 autocast, with and without channels_last. Prints images/s and the bf16/fp32 ratio.

    .venv/bin/python bench/precision.py                 # CPU, one thread (as measured in BENCHMARKS.md)
    .venv/bin/python bench/precision.py --threads 2 --head avg
"""

from __future__ import annotations

import argparse
import time
import warnings

import _common
import torch

import vpr.steps.train as vt
from vpr.foundations.config import Config
from vpr.shared.descriptors import autocast
from vpr.shared.models import build_model


def rate(fn, images: int, repeats: int) -> float:
    fn()  # warm-up (oneDNN picks its kernels)
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return repeats * images / (time.perf_counter() - t0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--head", default="netvlad")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--height", type=int, default=120)
    parser.add_argument("--width", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    cfg = Config()
    b, n = cfg.train.batch_queries, 2 + cfg.train.negatives
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = build_model(args.head, cfg.model)
    trunk_x = torch.randn(b * n, 128, -(-args.height // 8), -(-args.width // 8))
    images = torch.randn(32, 3, args.height, args.width)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    print(
        f"# precision benchmark — {_common.machine(device)}, {args.threads} thread(s), head {args.head}, "
        f"{args.width}x{args.height}"
    )
    print(f"{'pass':<28} {'fp32 img/s':>10} {'bf16 img/s':>10} {'bf16/fp32':>9}")
    for channels_last in (False, True):
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        model = model.to(memory_format=fmt)
        x = trunk_x.contiguous(memory_format=fmt)

        def step(bf16: bool) -> None:
            model.train()
            with autocast(device, bf16):
                out = model.forward_from_trunk(x)
            loss = vt.triplet_loss(out.float().view(b, n, -1), cfg.train.margin)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        rates = [rate(lambda: step(bf16), b * n, args.repeats) for bf16 in (False, True)]
        label = f"train step{' channels_last' if channels_last else ''}"
        print(f"{label:<28} {rates[0]:10.1f} {rates[1]:10.1f} {rates[1] / rates[0]:8.2f}x", flush=True)
    model = model.to(memory_format=torch.contiguous_format).eval()
    with torch.inference_mode():
        for label, fn in (("inference trunk", model.backbone.trunk), ("inference whole model", model)):
            rates = []
            for bf16 in (False, True):

                def run(fn=fn, bf16=bf16) -> None:
                    with autocast(device, bf16):
                        fn(images)

                rates.append(rate(run, len(images), args.repeats))
            print(f"{label:<28} {rates[0]:10.1f} {rates[1]:10.1f} {rates[1] / rates[0]:8.2f}x", flush=True)


if __name__ == "__main__":
    main()
