"""Images from the shards → tensors → descriptors, batched, in inference mode.

Shared by training (mining refreshes, validation), evaluation, indexing and re-indexing, so every
descriptor in the project is computed by the same code path.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from typing import TypedDict, Unpack

import numpy as np
import polars as pl
import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from vpr.foundations.config import AugmentConfig, ShardConfig
from vpr.foundations.rng import Locked
from vpr.shared.shardio import ShardError, ShardPlan, ShardReader, decode_sample, stream_samples

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when present, else CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device is 'cuda' but no CUDA device is available")
    return torch.device(name)


_SCALE = np.float32(1.0 / 255)
_MEAN = np.array(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.array(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


def normalize_uint8(image: torch.Tensor) -> torch.Tensor:
    """uint8 3×H×W → contiguous float32, (x/255 − mean)/std: bit-identical to torchvision's
    ``ToDtype(scale=True)`` + ``Normalize``, but one single-threaded numpy pass per image.

    torch spreads each elementwise op over its intra-op threads; on one small image with the cores
    busy (other processes, or the model running beside the loader) that synchronisation made the
    transform many times slower than the JPEG decode (bench/loader.py; BENCHMARKS.md).
    """
    out = np.empty(image.shape, dtype=np.float32)
    np.multiply(image.numpy(), _SCALE, out=out, dtype=np.float32)
    out -= _MEAN
    out /= _STD
    return torch.from_numpy(out)


_TORCHVISION_IMPORT = threading.Lock()  # two threads inside torchvision's first import fail (vpr.pipeline)


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL image → uint8 ``C×H×W``, a view of a copy of its pixels: what torchvision's ``PILToTensor`` gives
    for the 8-bit modes, without importing torchvision."""
    pixels = np.array(image)
    return torch.from_numpy(pixels.reshape(image.size[1], image.size[0], -1)).permute(2, 0, 1)


def to_normalized_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB → normalised float32 ``3×H×W``: ``PILToTensor`` then ``normalize_uint8`` (the plain transform)."""
    return normalize_uint8(pil_to_tensor(image))


def image_transform(
    height: int, width: int, scale: float = 1.0, augment: AugmentConfig | None = None
) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB → normalised float tensor, resized to ``scale`` × (height, width), with optional augmentation.

    Without resizing or augmentation (evaluation, indexing at the shards' size) no torchvision is
    imported: its import alone costs about as much as torch's (BENCHMARKS.md).
    """
    size = (max(16, round(height * scale)), max(16, round(width * scale)))
    augmenting = augment is not None and augment.enabled
    if size == (height, width) and not augmenting:
        return to_normalized_tensor
    with _TORCHVISION_IMPORT:  # resizing and augmenting only; Prefect runs trainings as threads
        from torchvision.transforms import v2 as T

    steps: list = [T.PILToTensor()]
    if size != (height, width):
        steps.append(T.Resize(size, antialias=True))
    if augment is not None and augment.color_jitter > 0:
        j = augment.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j / 2)))
    if augment is not None and augment.horizontal_flip:
        steps.append(T.RandomHorizontalFlip())
    if augment is not None and augment.rotate_deg > 0:
        steps.append(T.RandomRotation(augment.rotate_deg))  # the study's "flip + rotate" with the flip
    steps.append(normalize_uint8)  # = ToDtype(float32, scale=True) + Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if augment is not None and augment.random_erasing > 0:
        steps.append(T.RandomErasing(p=augment.random_erasing))
    if augmenting:
        return Locked(T.Compose(steps))  # random draws from torch's global generator (vpr.foundations.rng)
    return T.Compose(steps)


def eval_transform(shards: ShardConfig, image_scale: float) -> Callable[[Image.Image], torch.Tensor]:
    """The transform every stored descriptor is computed with (shard size × ``train.image_scale``)."""
    return image_transform(shards.height, shards.width, image_scale)


class ShardStream(IterableDataset):
    """Batches ``(positions, image tensors)`` of the requested ids, streamed shard by shard through WebDataset.

    Shards are dealt out to DataLoader workers round-robin, each read whole and in order (every sample
    integrity-checked, see ``vpr.shared.shardio``); only the requested samples are decoded and transformed.
    ``position`` is the sample's index in ``ids`` (its first one, when an id is asked for twice).
    A batch never spans two shards, so which images share a batch does not depend on the number of
    workers: the model sees the same batches, and gives the same bits, whatever ``workers`` is.
    """

    def __init__(
        self, plans: Sequence[ShardPlan], ids: Sequence[int], transform: Callable, batch_size: int = 32
    ) -> None:
        self.batch_size = batch_size
        first: dict[int, int] = {}
        for pos, i in enumerate(np.asarray(ids, dtype=np.int64).tolist()):
            first.setdefault(i, pos)
        self.plans, self.wanted, self.transform = list(plans), first, transform

    @classmethod
    def of(cls, reader: ShardReader, ids: Sequence[int], transform: Callable, batch_size: int = 32) -> ShardStream:
        """The stream of ``ids`` over the shards of ``reader`` that hold them (unknown ids: ``ShardError``)."""
        ids = np.asarray(ids, dtype=np.int64)
        wanted = np.unique(ids)
        rows = reader.index.filter(pl.col("id").is_in(wanted.tolist()))
        if rows.height != len(wanted):
            missing = sorted(set(wanted.tolist()) - set(rows["id"].to_list()))
            raise ShardError(f"image id(s) not in the shard index of {reader.shards_dir}: {missing[:5]}")
        holding = {reader.shards_dir / shard for shard in rows["shard"].unique().to_list()}
        # whole shards (every sample is checked, wanted or not), only those that hold a requested image
        return cls([p for p in reader.plans() if p.url in holding], ids, transform, batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        info = get_worker_info()
        mine = self.plans if info is None else self.plans[info.id :: info.num_workers]
        for plan in mine:
            positions: list[int] = []
            images: list[torch.Tensor] = []
            for n, jpg, _ in stream_samples(plan):
                pos = self.wanted.get(plan.ids[n])
                if pos is not None:
                    positions.append(pos)
                    images.append(self.transform(decode_sample(plan, n, jpg)))
                if len(positions) == self.batch_size:
                    yield torch.tensor(positions), stack_images(images)
                    positions, images = [], []
            if positions:
                yield torch.tensor(positions), stack_images(images)


def stack_images(images: Sequence[torch.Tensor]) -> torch.Tensor:
    """``torch.stack`` of CPU image tensors, the copy made by numpy in this thread (the same bits).

    torch spreads the copy over its intra-op threads; with the cores busy, that synchronisation made
    stacking one 32-image batch cost up to a third of a second against 1 ms here (BENCHMARKS.md).
    """
    return torch.from_numpy(np.stack([image.numpy() for image in images]))


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively here (AVX512-BF16 or AMX); emulated bf16 is slower."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """``precision`` (auto | fp32 | bf16) resolved for ``device``: auto = bf16 on CUDA only.

    Not on CPUs with native bf16 (AVX512-BF16 / AMX): the same seed then trained differently on such a
    Xeon and on a CPU without them (bf16 steps here, fp32 there), so CPU results depended on the vendor.
    ``precision: bf16`` still opts in (``cpu_has_native_bf16`` says whether it pays, BENCHMARKS.md).
    """
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda"


def autocast(device: torch.device, bf16: bool | None = None):
    """bf16 autocast when ``bf16`` (default: on CUDA only, so CPU descriptors and metrics stay fp32)."""
    if device.type == "cuda" if bf16 is None else bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def on_cuda_by_default(device: torch.device, mode: str = "auto") -> bool:
    """An ``auto | on | off`` setting resolved for ``device``: auto = on CUDA only.

    ``on`` runs the GPU's choice on CPU too, which is how the tests exercise the CUDA-only branches.
    """
    return mode == "on" or (mode == "auto" and device.type == "cuda")


def loader_kwargs(
    device: torch.device, workers: int, generator: torch.Generator | None = None, pin_memory: str = "auto"
) -> dict:
    """DataLoader options; each loader gets its own generator (never torch's global one:
    ``vpr.foundations.rng``)."""
    kwargs: dict = {
        "num_workers": workers,
        "pin_memory": on_cuda_by_default(device, pin_memory),  # without an accelerator torch warns, ignores it
        "generator": generator if generator is not None else torch.Generator(),
    }
    if workers > 0:
        kwargs.update(persistent_workers=False, prefetch_factor=4)
    return kwargs


class Loading(TypedDict, total=False):
    """How ``image_batches`` (and so ``extract``) reads the shards."""

    batch_size: int  # images per batch (default 32)
    workers: int  # DataLoader worker processes (default 0: read in this process)


def image_batches(
    reader: ShardReader | Sequence[ShardPlan],
    ids: Sequence[int],
    transform: Callable,
    *,
    device: torch.device,
    batch_size: int = 32,
    workers: int = 0,
) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
    """Batches ``(positions in ids, images on device)`` streamed from the shards (``ShardStream``).

    ``reader``: a ``ShardReader`` (the shards holding ``ids`` are found in its index) or the shard
    plans to stream, local or remote (``vpr.shared.shardio.shard_plans`` with a URL).
    """
    if isinstance(reader, ShardReader):
        stream = ShardStream.of(reader, ids, transform, batch_size)
    else:
        stream = ShardStream(reader, ids, transform, batch_size)
    loader = DataLoader(stream, batch_size=None, **loader_kwargs(device, workers))  # the stream batches
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for positions, batch in loader:
        yield positions.numpy(), batch.to(device, non_blocking=True).contiguous(memory_format=memory_format)


@torch.inference_mode()
def extract(
    model: torch.nn.Module,
    reader: ShardReader,
    ids: Sequence[int],
    transform: Callable,
    *,
    device: torch.device,
    **loading: Unpack[Loading],
) -> np.ndarray:
    """Descriptors (float32, N×dim) of shard images ``ids``, in the given order (streamed, see ``ShardStream``).

    ``loading`` (``batch_size``, ``workers``) is passed on to ``image_batches``.
    """
    unique, inverse = np.unique(np.asarray(ids, dtype=np.int64), return_inverse=True)  # each image once
    was_training = model.training
    model.eval()
    out = np.empty((len(unique), model.descriptor_dim), dtype=np.float32)
    for positions, batch in image_batches(reader, unique, transform, device=device, **loading):
        with autocast(device):
            desc = model(batch)
        out[positions] = desc.float().cpu().numpy()
    model.train(was_training)
    return out[inverse.ravel()]
