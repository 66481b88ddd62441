"""Seeded model construction is exact and thread-safe: Prefect runs tasks as threads of one process."""

from __future__ import annotations

import threading

import torch
from torch.utils.data import DataLoader

from vpr.foundations.config import ModelConfig
from vpr.foundations.rng import reseed_torch_rng
from vpr.shared.descriptors import loader_kwargs
from vpr.shared.models import build_backbone, build_head, build_model

CFG = ModelConfig(weights="none", gem_dim=64)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seeded_build_equals_manual_seed_in_a_fresh_process_and_leaves_global_state_alone() -> None:
    torch.manual_seed(1)  # the head draws from seed + 1, the backbone from the seed (the same for every head)
    expected = {"gem." + k: v for k, v in build_head("gem", CFG).state_dict().items()}
    torch.manual_seed(0)
    expected |= {"backbone." + k: v for k, v in build_backbone(CFG).state_dict().items()}
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    built = _state(build_model("gem", CFG, seed=0))
    assert torch.equal(torch.random.get_rng_state(), before)  # the caller's stream is untouched
    renamed = {k.replace("head.", "gem.", 1): v for k, v in built.items()}
    assert _same(renamed, expected)
    assert not _same(built, _state(build_model("gem", CFG, seed=1)))
    netvlad = _state(build_model("netvlad", CFG, seed=0))
    assert _same(
        {k: v for k, v in netvlad.items() if k.startswith("backbone.")},
        {k: v for k, v in built.items() if k.startswith("backbone.")},
    )  # one trunk for every head: one trunk cache per run


def test_concurrent_builds_reseeds_and_loaders_do_not_change_the_weights() -> None:
    reference = {seed: _state(build_model("gem", CFG, seed=seed)) for seed in (0, 7)}
    results: list[bool] = []
    stop = threading.Event()

    def builder(seed: int) -> None:
        for _ in range(4):
            results.append(_same(_state(build_model("gem", CFG, seed=seed)), reference[seed]))

    def trainer_like() -> None:  # what a training thread does with torch's RNG between its steps
        epoch = 0
        while not stop.is_set():
            reseed_torch_rng(epoch)
            for _ in DataLoader(list(range(8)), batch_size=4, **loader_kwargs(torch.device("cpu"), 0)):
                pass
            epoch += 1

    noise = threading.Thread(target=trainer_like)
    builders = [threading.Thread(target=builder, args=(seed,)) for seed in (0, 7, 0)]
    noise.start()
    for t in builders:
        t.start()
    for t in builders:
        t.join()
    stop.set()
    noise.join()
    assert len(results) == 12 and all(results)


def test_augmenting_transform_is_locked_picklable_and_follows_the_seed() -> None:
    import pickle

    import numpy as np
    from PIL import Image

    from vpr.foundations.config import AugmentConfig
    from vpr.foundations.rng import Locked
    from vpr.shared.descriptors import image_transform

    augment = AugmentConfig(color_jitter=0.4, horizontal_flip=True, random_erasing=0.5)
    transform = pickle.loads(pickle.dumps(image_transform(32, 40, augment=augment)))  # DataLoader workers
    assert isinstance(transform, Locked) and not isinstance(image_transform(32, 40), Locked)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 40, 3), dtype=np.uint8))
    outputs = []
    for seed in (3, 3, 4):
        reseed_torch_rng(seed)
        outputs.append(transform(image))
    assert outputs[0].shape == (3, 32, 40)
    assert torch.equal(outputs[0], outputs[1]) and not torch.equal(outputs[0], outputs[2])
