"""Ingest: every bad-input class gets its exact reason; unusual but valid images are accepted."""

from __future__ import annotations

import hashlib
import io
import logging
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from PIL import Image

from vpr.foundations.config import IngestConfig
from vpr.foundations.geo import format_name
from vpr.steps.catalog import (
    REASON_BAD_POSITION,
    REASON_EMPTY,
    REASON_NOT_IMAGE,
    REASON_TOO_MANY_PIXELS,
    REASON_TRUNCATED,
    IngestError,
    bad_name_reason,
    ingest,
    read_catalog,
)

CFG = IngestConfig(workers=1, max_pixels=10_000_000)
DB = "images/train/database"
Q = "images/train/queries"


def jpeg_bytes(size=(64, 48), color=(200, 30, 30), mode="RGB", exif=None) -> bytes:
    im = Image.new(mode, size, color if mode == "RGB" else (color[0] if mode == "L" else (0, 0, 0, 0)))
    buf = io.BytesIO()
    kwargs = {"exif": exif} if exif is not None else {}
    im.save(buf, format="JPEG", quality=90, **kwargs)
    return buf.getvalue()


def noisy_jpeg(size=(256, 192)) -> bytes:
    """Mostly entropy-coded scan data, so cutting it in half leaves the header intact."""
    buf = io.BytesIO()
    Image.effect_noise(size, 80).convert("RGB").save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def png_bytes(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (1, 2, 3)).save(buf, format="PNG")
    return buf.getvalue()


def put(root: Path, folder: str, name: str, data: bytes) -> str:
    target = root / folder / name
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return f"{folder}/{name}"


def run(root: Path, tmp_path: Path, cfg: IngestConfig = CFG):
    return ingest(root, tmp_path / "out", cfg)


def reasons(result) -> dict[str, str]:
    return dict(result.rejected_table.select("path", "reason").iter_rows())


@pytest.fixture
def root(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    put(root, DB, "@100.00@200.00@.jpg", jpeg_bytes())  # one good image so runs succeed
    return root


def test_bad_inputs_get_exact_reasons(root: Path, tmp_path: Path) -> None:
    good = noisy_jpeg()
    paths = {
        "empty": put(root, DB, "@1@1@.jpg", b""),
        "text": put(root, DB, "@2@2@.jpg", b"hello, I am not a picture\n" * 10),
        "trunc": put(root, DB, "@3@3@.jpg", good[: len(good) // 2]),
        "nan": put(root, DB, "@nan@1@.jpg", good),
        "abc": put(root, DB, "@abc@1@.jpg", good),
        "plain": put(root, Q, "photo.jpg", good),
        "one_field": put(root, Q, "@5@.jpg", good),
    }
    got = reasons(run(root, tmp_path))
    assert got[paths["empty"]] == REASON_EMPTY
    assert got[paths["text"]] == REASON_NOT_IMAGE
    assert got[paths["trunc"]] == REASON_TRUNCATED
    assert got[paths["nan"]] == f"{REASON_BAD_POSITION}: UTM east/north are not finite"
    assert got[paths["abc"]] == bad_name_reason("UTM east/north are not numbers")
    for key in ("plain", "one_field"):
        assert got[paths[key]].startswith("bad name: ")
    assert len(got) == len(paths)


def test_too_many_pixels_rejected_from_header(root: Path, tmp_path: Path) -> None:
    big = put(root, DB, "@9@9@.jpg", jpeg_bytes(size=(400, 300)))
    result = run(root, tmp_path, IngestConfig(workers=1, max_pixels=100 * 100))
    assert reasons(result)[big] == REASON_TOO_MANY_PIXELS
    assert result.accepted == 1


def test_decompression_bomb_far_over_limit(root: Path, tmp_path: Path) -> None:
    # > 2 × max_pixels trips Pillow's own guard inside Image.open: still "too many pixels"
    big = put(root, DB, "@9@9@.png", png_bytes(size=(300, 300)))
    result = run(root, tmp_path, IngestConfig(workers=1, max_pixels=100 * 100))
    assert reasons(result)[big] == REASON_TOO_MANY_PIXELS


def test_unusual_valid_images_accepted(root: Path, tmp_path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° on display
    cmyk = io.BytesIO()
    Image.new("CMYK", (30, 20), (0, 50, 100, 0)).save(cmyk, format="JPEG")
    files = {
        put(root, DB, "@10@10@.jpg", jpeg_bytes(mode="L")): ("JPEG", 64, 48),
        put(root, DB, "@11@11@.jpg", cmyk.getvalue()): ("JPEG", 30, 20),
        put(root, DB, "@12@12@.jpg", png_bytes()): ("PNG", 40, 30),
        put(root, DB, "@13@13@.jpg", jpeg_bytes(size=(64, 48), exif=exif)): ("JPEG", 48, 64),
    }
    result = run(root, tmp_path)
    assert result.rejected == 0
    cat = {r["path"]: r for r in result.catalog.iter_rows(named=True)}
    for path, (fmt, w, h) in files.items():
        assert (cat[path]["format"], cat[path]["width"], cat[path]["height"]) == (fmt, w, h)


def test_catalog_columns_and_parsed_fields(tmp_path: Path) -> None:
    root = tmp_path / "we@ird@"  # a parent folder with @ must not confuse name parsing
    data = jpeg_bytes()
    full = format_name(
        584291.21,
        4476924.92,
        utm_zone=17,
        utm_letter="T",
        lat=40.4387,
        lon=-80.00613,
        heading=90.0,
        timestamp="201708",
        note="pitch1_yaw1",
    )
    p15 = put(root, "images/test/queries", full, data)
    p2 = put(root, "images/val/database", "@0584291.21@4476924.92@.jpg", jpeg_bytes(color=(0, 9, 0)))
    result = run(root, tmp_path)
    assert result.rejected == 0
    assert result.catalog["path"].to_list() == sorted([p15, p2])
    on_disk = read_catalog(tmp_path / "out")
    assert on_disk.equals(result.catalog)
    # one table per split: each holds exactly its split's rows
    assert pl.read_parquet(tmp_path / "out" / "val.parquet")["path"].to_list() == [p2]
    assert pl.read_parquet(tmp_path / "out" / "train.parquet").height == 0
    assert set(on_disk.columns) >= {
        "path",
        "split",
        "role",
        "utm_east",
        "utm_north",
        "utm_zone",
        "utm_letter",
        "lat",
        "lon",
        "heading",
        "timestamp",
        "width",
        "height",
        "format",
        "sha256",
        "duplicate_of",
    }
    rows = {r["path"]: r for r in on_disk.iter_rows(named=True)}
    r15, r2 = rows[p15], rows[p2]
    assert (r15["split"], r15["role"], r15["utm_zone"], r15["utm_letter"]) == ("test", "queries", 17, "T")
    assert r15["utm_east"] == pytest.approx(584291.21) and r15["lat"] == pytest.approx(40.4387)
    assert r15["heading"] == 90.0 and r15["timestamp"] == "201708"
    assert r15["sha256"] == hashlib.sha256(data).hexdigest()
    assert (r2["split"], r2["role"], r2["utm_north"]) == ("val", "database", pytest.approx(4476924.92))
    assert r2["lat"] is None and r2["timestamp"] is None and r2["utm_zone"] is None
    assert pl.read_parquet(tmp_path / "out" / "rejected.parquet").columns == ["path", "reason"]


def test_duplicates_reported_but_kept(root: Path, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="vpr")
    data = (root / DB / "@100.00@200.00@.jpg").read_bytes()
    copy = put(root, Q, "@100.00@200.00@.jpg", data)
    result = run(root, tmp_path)
    assert result.accepted == 2
    dup = dict(result.catalog.select("path", "duplicate_of").iter_rows())
    assert dup == {f"{DB}/@100.00@200.00@.jpg": None, copy: f"{DB}/@100.00@200.00@.jpg"}
    assert "duplicates: 1" in caplog.text


def test_summary_counts_reasons(root: Path, tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="vpr")
    put(root, DB, "@1@1@.jpg", b"")
    put(root, DB, "@2@2@.jpg", b"")
    run(root, tmp_path)
    err = caplog.text  # the package logger "vpr" (the CLI shows it on stderr, Prefect in the run's log)
    assert "1 accepted, 2 rejected" in err
    assert f"2 × {REASON_EMPTY}" in err


def test_the_cli_shows_the_package_log_on_stderr_and_quiet_hides_it(root: Path, tmp_path: Path) -> None:
    put(root, DB, "@2@2@.jpg", b"")
    command = [sys.executable, "-m", "vpr.cli"]
    shown = subprocess.run(
        [*command, "ingest", str(root), "--out", str(tmp_path / "a")], capture_output=True, text=True
    )
    assert shown.returncode == 0 and f"1 × {REASON_EMPTY}" in shown.stderr and shown.stdout.count("\n") <= 1
    quiet = subprocess.run(
        [*command, "--quiet", "ingest", str(root), "--out", str(tmp_path / "b")], capture_output=True, text=True
    )
    assert quiet.returncode == 0 and REASON_EMPTY not in quiet.stderr


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(IngestError, match="does not exist"):
        run(tmp_path / "nope", tmp_path)


def test_no_layout(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    put(root, ".", "@1@1@.jpg", jpeg_bytes())
    with pytest.raises(IngestError, match="images/<split>/<role>"):
        run(root, tmp_path)


def test_zero_usable_images(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    put(root, DB, "@1@1@.jpg", b"")
    put(root, DB, "bad.jpg", jpeg_bytes())
    with pytest.raises(IngestError, match="no usable images"):
        run(root, tmp_path)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").glob("*.parquet"))


def test_process_pool_matches_inline(root: Path, tmp_path: Path) -> None:
    for i in range(12):
        put(root, Q, f"@{i}@{i}@.jpg", jpeg_bytes(color=(i * 10, 0, 0)))
    put(root, Q, "@x@1@.jpg", jpeg_bytes())
    inline = ingest(root, tmp_path / "a", IngestConfig(workers=1))
    pooled = ingest(root, tmp_path / "b", IngestConfig(workers=2))
    assert inline.catalog.equals(pooled.catalog)
    assert inline.rejected_table.equals(pooled.rejected_table)
    for table in ("train.parquet", "val.parquet", "test.parquet", "rejected.parquet"):
        assert (tmp_path / "a" / table).read_bytes() == (tmp_path / "b" / table).read_bytes()
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.endswith(".tmp")]
