"""The ResNet-18 and the plain image transform that avoid importing torchvision give torchvision's bits.

``vpr.shared.models.resnet`` is torchvision's ResNet-18 written out (torchvision's import costs about
as much as torch's) and ``vpr.shared.descriptors.to_normalized_tensor`` its ``PILToTensor`` + the
project's normalisation: here each is compared with torchvision itself — state dict keys, the weights
one seed draws, the forward pass, the ImageNet URL, the transform's output — so a difference is a failure,
not a changed metric.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.models import ResNet18_Weights, resnet18
from torchvision.transforms import v2 as T

from vpr.foundations.config import ModelConfig
from vpr.foundations.rng import seeded_torch_rng
from vpr.shared.descriptors import image_transform, normalize_uint8, pil_to_tensor, stack_images
from vpr.shared.models import build_backbone
from vpr.shared.models import resnet as ours
from vpr.shared.models.weights import TORCHVISION_RESNET18_URL


def _both(seed: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    with seeded_torch_rng(seed):
        theirs = resnet18(weights=None)
    with seeded_torch_rng(seed):
        mine = ours.resnet18()
    return theirs, mine


@pytest.mark.parametrize("seed", [0, 7])
def test_same_modules_and_the_same_weights_from_the_same_seed(seed: int) -> None:
    theirs, mine = _both(seed)
    a, b = theirs.state_dict(), mine.state_dict()
    assert list(a) == list(b)  # names and order: a torchvision checkpoint loads key for key
    different = [k for k in a if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert different == []
    assert [n for n, _ in theirs.named_modules()] == [n for n, _ in mine.named_modules()]


@pytest.mark.parametrize("train", [False, True])
def test_same_forward_bits(train: bool) -> None:
    theirs, mine = _both(3)
    theirs.train(train)
    mine.train(train)
    x = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(theirs(x), mine(x))
    assert all(torch.equal(u, v) for u, v in zip(theirs.state_dict().values(), mine.state_dict().values()))


def test_a_torchvision_state_dict_loads_strictly_and_gives_the_same_backbone(tmp_path) -> None:
    with seeded_torch_rng(11):
        state = resnet18(weights=None).state_dict()
    ours.resnet18().load_state_dict(state, strict=True)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    backbone = build_backbone(ModelConfig(weights=str(path)))
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_the_imagenet_url_is_torchvisions() -> None:
    assert TORCHVISION_RESNET18_URL == ResNet18_Weights.IMAGENET1K_V1.url


@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_pil_to_tensor_is_torchvisions(mode: str) -> None:
    pixels = np.random.default_rng(0).integers(0, 256, size=(30, 40, 3), dtype=np.uint8)
    image = Image.fromarray(pixels).convert(mode)
    mine, theirs = pil_to_tensor(image), T.PILToTensor()(image)
    assert mine.dtype == theirs.dtype and mine.shape == theirs.shape and torch.equal(mine, theirs)


def test_the_plain_transform_gives_torchvisions_bits() -> None:
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(48, 64, 3), dtype=np.uint8))
    plain = image_transform(48, 64)
    before = T.Compose([T.PILToTensor(), normalize_uint8])  # what image_transform returned before
    assert torch.equal(plain(image), before(image))
    images = [plain(image), before(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT))]
    assert torch.equal(stack_images(images), torch.stack(images))
