"""Random streams and colour helpers shared by every stage of the synthetic city.

Every RNG is keyed by (seed, keys) rather than drawn from a shared stream, which is what makes the
city independent of generation order and of the number of worker processes.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

RGB = tuple[int, int, int]


def keyed_rng(seed: int, *keys: int) -> np.random.Generator:
    """An independent RNG per (seed, keys): order of generation never matters."""
    return np.random.default_rng(np.random.SeedSequence([seed % 2**63, *keys]))


def to_rgb(values: Iterable[float]) -> RGB:
    """Three floats clipped to [0, 255] and truncated to an 8-bit RGB triple."""
    r, g, b = (int(np.clip(v, 0, 255)) for v in values)
    return r, g, b


def jitter(rng: np.random.Generator, colour: Iterable[float], amount: float) -> RGB:
    """``colour`` with each channel moved by a uniform draw in [-amount, amount]."""
    return to_rgb([c + rng.uniform(-amount, amount) for c in colour])
