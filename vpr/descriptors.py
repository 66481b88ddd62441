"""Images from the shards → tensors → descriptors, batched, in inference mode.

Shared by training (mining refreshes, validation), evaluation, indexing and re-indexing, so every
descriptor in the project is computed by the same code path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import v2 as T

from vpr.config import AugmentConfig
from vpr.rng import Locked
from vpr.shards import ShardReader

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
    transform 10–100× slower than the JPEG decode (bench/loader.py).
    """
    out = np.empty(image.shape, dtype=np.float32)
    np.multiply(image.numpy(), _SCALE, out=out, dtype=np.float32)
    out -= _MEAN
    out /= _STD
    return torch.from_numpy(out)


def image_transform(height: int, width: int, scale: float = 1.0,
                    augment: AugmentConfig | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """PIL RGB → normalised float tensor, resized to ``scale`` × (height, width), with optional augmentation."""
    size = (max(16, round(height * scale)), max(16, round(width * scale)))
    steps: list = [T.PILToTensor()]
    if size != (height, width):
        steps.append(T.Resize(size, antialias=True))
    if augment is not None and augment.color_jitter > 0:
        j = augment.color_jitter
        steps.append(T.ColorJitter(brightness=j, contrast=j, saturation=j, hue=min(0.5, j / 2)))
    if augment is not None and augment.horizontal_flip:
        steps.append(T.RandomHorizontalFlip())
    steps.append(normalize_uint8)  # = ToDtype(float32, scale=True) + Normalize(IMAGENET_MEAN, IMAGENET_STD)
    if augment is not None and augment.random_erasing > 0:
        steps.append(T.RandomErasing(p=augment.random_erasing))
    if augment is not None and augment.enabled:
        return Locked(T.Compose(steps))  # random draws from torch's global generator (vpr.rng)
    return T.Compose(steps)


class ShardImages(Dataset):
    """Images by shard id, decoded and transformed (for DataLoader workers)."""

    def __init__(self, reader: ShardReader, ids: Sequence[int], transform: Callable) -> None:
        self.reader, self.ids, self.transform = reader, np.asarray(ids, dtype=np.int64), transform

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.transform(self.reader.load(int(self.ids[i])))


def cpu_has_native_bf16() -> bool:
    """Whether oneDNN runs bf16 convolutions natively here (AVX512-BF16 or AMX); emulated bf16 is slower."""
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def use_bf16(device: torch.device, precision: str = "auto") -> bool:
    """``precision`` (auto | fp32 | bf16) resolved for ``device``: auto = CUDA, or a CPU with native bf16."""
    if precision != "auto":
        return precision == "bf16"
    return device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16())


def autocast(device: torch.device, bf16: bool | None = None):
    """bf16 autocast when ``bf16`` (default: on CUDA only, so CPU descriptors and metrics stay fp32)."""
    if device.type == "cuda" if bf16 is None else bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def loader_kwargs(device: torch.device, workers: int, generator: torch.Generator | None = None) -> dict:
    """DataLoader options; each loader gets its own generator (never torch's global one, see ``vpr.rng``)."""
    kwargs: dict = {"num_workers": workers, "pin_memory": device.type == "cuda",
                    "generator": generator if generator is not None else torch.Generator()}
    if workers > 0:
        kwargs.update(persistent_workers=False, prefetch_factor=4)
    return kwargs


@torch.inference_mode()
def extract(model: torch.nn.Module, reader: ShardReader, ids: Sequence[int], transform: Callable, *,
            device: torch.device, batch_size: int = 32, workers: int = 0) -> np.ndarray:
    """Descriptors (float32, N×dim) of shard images ``ids``, in the given order."""
    was_training = model.training
    model.eval()
    loader = DataLoader(ShardImages(reader, ids, transform), batch_size=batch_size, shuffle=False,
                        **loader_kwargs(device, workers))
    out = np.empty((len(ids), model.descriptor_dim), dtype=np.float32)
    pos = 0
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    for batch in loader:
        batch = batch.to(device, non_blocking=True).contiguous(memory_format=memory_format)
        with autocast(device):
            desc = model(batch)
        out[pos:pos + len(batch)] = desc.float().cpu().numpy()
        pos += len(batch)
    model.train(was_training)
    return out
