"""Checkpoints: safe loading (no unpickling of objects), atomic saving, and models rebuilt from them."""

from __future__ import annotations

import io
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


def load_checkpoint(path: str | Path | io.BytesIO, name: str | None = None) -> dict:
    """Load a checkpoint safely: ``weights_only=True`` never unpickles arbitrary objects.

    A file holding anything but tensors and plain containers (a pickled object whose loading would run
    code) is refused with ``CheckpointError``, as is a damaged archive; nothing in it is executed.
    ``name`` says what an in-memory ``path`` is in messages.
    """
    name = name or str(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {name}: it holds objects other than tensors and plain "
            f"data (loaded with weights_only=True; nothing in it was run): "
            f"{_first_line(exc)}"
        ) from None
    except (RuntimeError, EOFError) as exc:
        raise CheckpointError(f"cannot read checkpoint {name}: {_first_line(exc)}") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{name} is not a vpr checkpoint (a {type(state).__name__}, not a dict)")
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
    return model_from_checkpoint(ckpt, str(path), device), ckpt


def model_bytes(model: VPRModel, head: str, model_cfg: ModelConfig) -> bytes:
    """A model as the bytes of a minimal checkpoint (head, model_config, weights): what a worker without
    the project folder is sent to encode with (``model_from_bytes`` reads it back)."""
    buffer = io.BytesIO()
    state = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    torch.save({"head": head, "model_config": model_cfg.model_dump(mode="json"), "model": state}, buffer)
    return buffer.getvalue()


def model_from_bytes(data: bytes, device: torch.device | str = "cpu", name: str = "model bytes") -> VPRModel:
    """``model_bytes`` back into a model, checked as a checkpoint file is (weights only, no code run)."""
    return model_from_checkpoint(load_checkpoint(io.BytesIO(data), name), name, device)


def model_from_checkpoint(ckpt: dict, name: str, device: torch.device | str = "cpu") -> VPRModel:
    """The model a checkpoint dict describes, every part checked; ``name`` says where it came from."""
    missing = [k for k in ("head", "model_config", "model") if k not in ckpt]
    if missing:
        raise CheckpointError(f"{name} is not a trained-model checkpoint: no {', '.join(missing)}")
    if not isinstance(ckpt["head"], str) or ckpt["head"] not in head_names():
        raise CheckpointError(f"{name}: unknown head {ckpt['head']!r} (expected one of {', '.join(head_names())})")
    try:  # the same bounds as params.yaml: a forged size fails here, before anything is allocated
        model_cfg = ModelConfig(**{**dict(ckpt["model_config"]), "weights": "none"})
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{name}: invalid model_config: {_first_line(exc)}") from None
    model = build_model(ckpt["head"], model_cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{name}: weights do not fit the {ckpt['head']} model: {_first_line(exc)}") from None
    if not all(torch.isfinite(t).all() for t in model.state_dict().values() if t.is_floating_point()):
        raise CheckpointError(f"{name}: weights hold NaN or infinite values (a diverged training?)")
    return _prepare(model, torch.device(device))


def untrained_model(head: str, model_cfg: ModelConfig, seed: int, device: torch.device | str = "cpu") -> VPRModel:
    """The baseline: ``head`` as built before any VPR training (backbone per ``model.weights``, seeded)."""
    return _prepare(build_model(head, model_cfg, seed=seed), torch.device(device))


def _prepare(model: VPRModel, device: torch.device) -> VPRModel:
    model = model.to(device).eval()
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    return model
