"""Checkpoints: safe loading (no unpickling of objects), atomic saving, and models rebuilt from them."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from vpr.foundations.atomic import atomic_path
from vpr.foundations.config import ModelConfig
from vpr.foundations.registry import head_names
from vpr.shared.models import VPRModel, build_model


class CheckpointError(ValueError):
    """A checkpoint file that cannot be trusted or read (foreign objects, damaged archive)."""


def _first_line(exc: BaseException) -> str:
    """The first line of an error's message, or its type when the message is empty (a zero-byte file)."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else f"{type(exc).__name__} (the file is empty or cut short)"


def load_checkpoint(path: str | Path) -> dict:
    """Load a checkpoint safely: ``weights_only=True`` never unpickles arbitrary objects.

    A file holding anything but tensors and plain containers (a pickled object whose loading would run
    code) is refused with ``CheckpointError``, as is a damaged archive; nothing in it is executed.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: it holds objects other than tensors and plain "
            f"data (loaded with weights_only=True; nothing in it was run): "
            f"{_first_line(exc)}"
        ) from None
    except (RuntimeError, EOFError) as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {_first_line(exc)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is not a vpr checkpoint (a {type(state).__name__}, not a dict)")
    return state


def save_checkpoint(state: dict, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, then an atomic rename over it."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_model(checkpoint: str | Path, device: torch.device | str = "cpu") -> tuple[VPRModel, dict]:
    """A trained model from a ``model.pt`` checkpoint (eval mode, on ``device``) and the checkpoint dict.

    The backbone is built without reading any pretrained file (``weights="none"``): the checkpoint's
    state dict replaces every weight anyway.
    """
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path} (train the head first: `vpr train --head ...`)")
    ckpt = load_checkpoint(path)
    missing = [k for k in ("head", "model_config", "model") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path} is not a trained-model checkpoint: no {', '.join(missing)}")
    if not isinstance(ckpt["head"], str) or ckpt["head"] not in head_names():
        raise CheckpointError(f"{path}: unknown head {ckpt['head']!r} (expected one of {', '.join(head_names())})")
    try:  # the same bounds as params.yaml: a forged size fails here, before anything is allocated
        model_cfg = ModelConfig(**{**dict(ckpt["model_config"]), "weights": "none"})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid model_config: {_first_line(exc)}") from None
    model = build_model(ckpt["head"], model_cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{path}: weights do not fit the {ckpt['head']} model: {_first_line(exc)}") from None
    if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
        raise CheckpointError(f"{path}: weights hold NaN or infinite values (a diverged training?)")
    return _prepare(model, torch.device(device)), ckpt


def untrained_model(head: str, model_cfg: ModelConfig, seed: int, device: torch.device | str = "cpu") -> VPRModel:
    """The baseline: ``head`` as built before any VPR training (backbone per ``model.weights``, seeded)."""
    return _prepare(build_model(head, model_cfg, seed=seed), torch.device(device))


def _prepare(model: VPRModel, device: torch.device) -> VPRModel:
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model
