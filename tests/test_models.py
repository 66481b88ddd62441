"""Models: head shapes and norms, the pure functions against naive references, freezing, weights loading."""

from __future__ import annotations

import hashlib
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.models import resnet18

from vpr.foundations.config import ModelConfig
from vpr.shared.models import build_backbone, build_model
from vpr.shared.models.functional import gem, intra_normalize_flatten, vlad
from vpr.shared.models.heads.crn import CRNHead
from vpr.shared.models.heads.crn2 import CRN2Head
from vpr.shared.models.heads.netvlad import NetVLADHead

CFG = ModelConfig(weights="none", freeze_early_layers=True, netvlad_clusters=64, gem_dim=128)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize(
    ("head", "dim"), [("avg", 256), ("gem", 128), ("netvlad", 64 * 256), ("crn", 64 * 256), ("crn2", 64 * 256)]
)
def test_head_shape_and_unit_norm(head: str, dim: int) -> None:
    model = build_model(head, CFG).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 64, 80))
        fmap = model.features(torch.randn(2, 3, 64, 80))
    assert model.head_name == head
    assert model.descriptor_dim == dim
    assert out.shape == (2, dim)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)
    assert fmap.shape == (2, 256, 4, 5)


def test_unknown_head_is_named() -> None:
    with pytest.raises(ValueError, match="'vlad2'"):
        build_model("vlad2", CFG)


def test_vlad_matches_python_loop() -> None:
    b, d, k, h, w = 2, 5, 3, 4, 3
    x = torch.randn(b, d, h, w, dtype=torch.float64)
    a = torch.softmax(torch.randn(b, k, h, w, dtype=torch.float64), dim=1)
    c = torch.randn(k, d, dtype=torch.float64)
    expected = torch.zeros(b, k, d, dtype=torch.float64)
    for i in range(b):
        for j in range(k):
            for y in range(h):
                for z in range(w):
                    expected[i, j] += a[i, j, y, z] * (x[i, :, y, z] - c[j])
    got = vlad(x, a, c)
    assert torch.allclose(got, expected)
    flat = intra_normalize_flatten(got)
    assert flat.shape == (b, k * d)
    assert torch.allclose(flat.norm(dim=1), torch.ones(b, dtype=torch.float64))
    # Each cluster block carries equal weight after intra-normalisation.
    assert torch.allclose(flat.view(b, k, d).norm(dim=2), torch.full((b, k), k**-0.5, dtype=torch.float64))


def test_gem_p1_is_average_pooling() -> None:
    x = torch.rand(2, 7, 5, 6) + 0.01
    assert torch.allclose(gem(x, p=1.0), F.adaptive_avg_pool2d(x, 1).flatten(1), atol=1e-6)
    assert gem(x, p=3.0).shape == (2, 7)


@pytest.mark.parametrize(("h", "w"), [(7, 9), (8, 10), (1, 1)])
@pytest.mark.parametrize("kind", [CRNHead, CRN2Head])
def test_crn_odd_and_even_maps(h: int, w: int, kind) -> None:
    head = kind(clusters=8, dim=256)
    x = torch.randn(2, 256, h, w)
    mask = head.context_mask(x)
    assert mask.shape == (2, 1, h, w)
    assert torch.allclose(mask, torch.ones_like(mask), atol=0.05)  # starts near uniform
    out = head(x)
    assert out.shape == (2, 8 * 256)
    assert torch.allclose(out.norm(dim=1), torch.ones(2), atol=1e-5)


@pytest.mark.parametrize("kind", [CRNHead, CRN2Head])
def test_crn_loads_netvlad_and_starts_close_to_it(kind) -> None:
    netvlad = NetVLADHead(clusters=8, dim=256)
    crn = kind(clusters=8, dim=256)
    crn.start_from({f"head.{k}": v for k, v in netvlad.state_dict().items()} | {"backbone.x": torch.ones(1)})
    assert torch.equal(crn.netvlad.centroids, netvlad.centroids)
    crn.start_from(netvlad.state_dict())
    x = torch.randn(2, 256, 7, 9)
    with torch.no_grad():
        sim = (crn(x) * netvlad(x)).sum(dim=1)
    assert torch.all(sim > 0.99)


def _mask_parameters(head) -> int:
    return sum(p.numel() for name, p in head.named_parameters() if not name.startswith("netvlad."))


def test_crn2_has_the_reports_mask_parameter_count_against_crn() -> None:
    """The report: 245k mask parameters for CRN2 against CRN's 529k (64 clusters; the mask does not
    depend on the cluster count)."""
    crn, crn2 = CRNHead(clusters=64, dim=256), CRN2Head(clusters=64, dim=256)
    assert round(_mask_parameters(crn) / 1000) == 530 and _mask_parameters(crn) // 1000 == 529
    assert _mask_parameters(crn2) // 1000 == 245
    assert _mask_parameters(CRN2Head(clusters=16, dim=256)) == _mask_parameters(crn2)
    assert sum(p.numel() for p in crn2.netvlad.parameters()) == sum(p.numel() for p in crn.netvlad.parameters())


def test_crn2_computes_its_mask_at_the_maps_resolution_and_sees_as_far_as_crn() -> None:
    """No pooling and no upsampling: a mask value depends on a 13×13 window of the map (CRN's 7×7 at
    half resolution sees 14×14), and one location's change moves the mask only inside that window."""
    head = CRN2Head(clusters=8, dim=256)
    assert not any(isinstance(m, (torch.nn.AvgPool2d, torch.nn.Upsample)) for m in head.modules())
    with torch.no_grad():
        for conv in head.context.modules():
            if isinstance(conv, torch.nn.Conv2d):
                conv.weight.abs_()
                conv.bias.fill_(0.1)
        head.mask_conv.weight.fill_(1.0)
    x = torch.rand(1, 256, 21, 21)
    y = x.clone()
    y[..., 10, 10] += 1.0
    with torch.no_grad():
        changed = (head.context_mask(y) - head.context_mask(x)).abs()[0, 0] > 1e-6
    rows, cols = torch.nonzero(changed, as_tuple=True)
    assert (rows.min(), rows.max(), cols.min(), cols.max()) == (4, 16, 4, 16)


def test_frozen_layers_get_no_gradient() -> None:
    model = build_model("netvlad", CFG)
    model.train()
    bb = model.backbone
    assert not bb.bn1.training and not bb.layer1.training and not bb.layer2.training
    assert bb.layer3.training
    running = bb.bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 80)).sum().backward()
    assert torch.equal(bb.bn1.running_mean, running)  # frozen BN statistics do not drift
    for name in ("conv1", "bn1", "layer1", "layer2"):
        assert all(p.grad is None for p in getattr(bb, name).parameters()), name
    assert all(p.grad is not None for p in bb.layer3.parameters())
    assert model.head.conv.weight.grad is not None


def test_unfrozen_backbone_trains_everything() -> None:
    bb = build_backbone(ModelConfig(weights="none", freeze_early_layers=False)).train()
    bb(torch.randn(2, 3, 64, 64)).sum().backward()
    assert bb.conv1.weight.grad is not None and bb.bn1.training


def test_netvlad_init_from_descriptors() -> None:
    rng = np.random.default_rng(0)
    desc = rng.standard_normal((2000, 256)).astype(np.float32)
    head = NetVLADHead(clusters=16, dim=256)
    alpha = head.init_from_descriptors(desc, seed=3)
    assert alpha > 0 and head.alpha == alpha
    assert head.centroids.shape == (16, 256)
    assert head.conv.weight.shape == (16, 256, 1, 1) and head.conv.bias is None
    unit = F.normalize(head.centroids, dim=1)
    assert torch.allclose(head.conv.weight[:, :, 0, 0], alpha * unit, atol=1e-4)

    again = NetVLADHead(clusters=16, dim=256)
    assert again.init_from_descriptors(desc, seed=3) == pytest.approx(alpha)
    assert torch.allclose(again.centroids, head.centroids)
    other = NetVLADHead(clusters=16, dim=256)
    other.init_from_descriptors(desc, seed=4)
    assert not torch.allclose(other.centroids, head.centroids)

    with pytest.raises(ValueError, match="at least 16"):
        NetVLADHead(clusters=16, dim=256).init_from_descriptors(desc[:10])


def test_imagenet_from_cache_and_local_path(tmp_path, monkeypatch) -> None:
    state = resnet18(weights=None).state_dict()
    (tmp_path / "checkpoints").mkdir()
    torch.save(state, tmp_path / "checkpoints" / "staged.pth")
    # torch.hub's naming rule: the cached file's name carries its SHA-256 prefix, checked on use
    name = f"resnet18-{hashlib.sha256((tmp_path / 'checkpoints' / 'staged.pth').read_bytes()).hexdigest()[:8]}.pth"
    (tmp_path / "checkpoints" / "staged.pth").rename(tmp_path / "checkpoints" / name)
    monkeypatch.setenv("VPR_IMAGENET_URL", f"http://127.0.0.1:9/{name}")  # cached: never asked
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bb = build_backbone(ModelConfig(weights="imagenet"))
    assert torch.equal(bb.conv1.weight, state["conv1.weight"])

    local = tmp_path / "mine.pth"
    torch.save(state, local)
    bb = build_backbone(ModelConfig(weights=str(local)))
    assert torch.equal(bb.layer3[0].conv1.weight, state["layer3.0.conv1.weight"])
    # A conv4-only state dict (e.g. saved from this backbone) loads too.
    torch.save(bb.state_dict(), local)
    assert torch.equal(build_backbone(ModelConfig(weights=str(local))).layer2[1].bn2.bias, bb.layer2[1].bn2.bias)


def test_bad_weights_paths(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_backbone(ModelConfig(weights=str(tmp_path / "missing.pth")))
    junk = tmp_path / "junk.pth"
    torch.save({"foo": torch.zeros(1)}, junk)
    with pytest.raises(ValueError, match="not a ResNet-18 state dict"):
        build_backbone(ModelConfig(weights=str(junk)))
