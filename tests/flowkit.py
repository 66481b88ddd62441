"""Helpers for the Prefect flow tests: a micro project that is also a git + DVC repository, inbox files."""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from vpr.foundations.config import Config

REPO = Path(__file__).resolve().parents[1]
FLOW_OVERRIDES = {
    "train": {"epochs": 1, "queries_per_epoch": 4, "negatives": 2},
    "orchestration": {"task_retries": 0, "max_workers": 2, "reindex_cron": "7 */2 * * *"},
}


def env() -> dict:
    """Subprocess environment: this interpreter's scripts (``vpr``, ``dvc``) first on PATH, no telemetry."""
    return {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        "DVC_NO_ANALYTICS": "1",
        "DO_NOT_TRACK": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }


def run(root: Path, *cmd: str) -> str:
    proc = subprocess.run(list(cmd), cwd=root, env=env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def write_full_params(root: Path, cfg: Config) -> None:
    """Every key spelled out: dvc.yaml interpolates ``${index.head}``, which DVC reads from params.yaml."""
    (root / "params.yaml").write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))


def make_dvc_project(root: Path, overrides: dict | None = None) -> Config:
    """Micro city in ``data/`` (DVC-tracked), this repo's dvc.yaml and vpr/ sources, git + DVC initialised."""
    from tests.micro import build_micro_project

    merged = {k: dict(v) for k, v in FLOW_OVERRIDES.items()}
    for section, values in (overrides or {}).items():
        merged.setdefault(section, {}).update(values)
    cfg, _ = build_micro_project(root, merged, prepare=False)
    write_full_params(root, cfg)
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copytree(REPO / "vpr", root / "vpr", ignore=shutil.ignore_patterns("__pycache__"))
    run(root, "git", "init", "-q")
    run(root, sys.executable, "-m", "dvc", "init", "-q")
    run(root, sys.executable, "-m", "dvc", "add", "-q", "data")
    return cfg


def clone_project(src: Path, dst: Path) -> Path:
    """A private copy of a project; large files are hard links (every writer replaces files, never edits)."""

    def copy(a: str, b: str) -> None:
        if os.path.getsize(a) > (1 << 20):
            os.link(a, b)
        else:
            shutil.copy2(a, b)

    shutil.copytree(src, dst, symlinks=True, copy_function=copy)
    return dst


# --------------------------------------------------------------------------- inbox files


def _dms(x: float) -> tuple:
    d = int(x)
    m = int((x - d) * 60)
    s = (x - d - m / 60) * 3600
    return IFDRational(d, 1), IFDRational(m, 1), IFDRational(round(s * 10000), 10000)


def exif_photo(source: Path, target: Path, lat: float, lon: float, heading: float | None = None) -> Path:
    """Re-save an image as an ordinary camera photo: arbitrary name, position only in EXIF GPS."""
    exif = Image.Exif()
    gps = exif.get_ifd(0x8825)
    gps.update({1: "N" if lat >= 0 else "S", 2: _dms(abs(lat)), 3: "E" if lon >= 0 else "W", 4: _dms(abs(lon))})
    if heading is not None:
        gps[17] = IFDRational(round(heading * 10), 10)
    exif[306] = "2024:05:01 12:30:00"
    with Image.open(source) as im:
        im.convert("RGB").save(target, "JPEG", quality=95, exif=exif.tobytes())
    return target


def truncated_jpeg(source: Path, target: Path) -> Path:
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def jpeg_bytes(size=(64, 48), colour=(90, 120, 150)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "JPEG")
    return buf.getvalue()
