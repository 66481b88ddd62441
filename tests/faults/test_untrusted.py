"""Case 6: untrusted inputs. Checkpoints never run pickled code; shard samples with pickle payloads are
refused; images over the pixel limit are refused from their header, never decoded; hostile file names
(non-UTF-8 bytes, path separators, ``..``, control characters) never escape the data or quarantine folder."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import tarfile
from pathlib import Path

import polars as pl
import pytest
import torch
from PIL import Image, ImageFile
from typer.testing import CliRunner

from tests.faults.conftest import snapshot
from tests.flowkit import exif_photo
from vpr.cli import app
from vpr.foundations.config import IngestConfig
from vpr.foundations.geo import parse_name
from vpr.foundations.imageio import strict_pillow
from vpr.shared.checkpoints import CheckpointError, load_checkpoint
from vpr.shared.shardio import ShardError, iter_split, read_index
from vpr.steps.catalog import ingest

pytestmark = pytest.mark.timeout(120)


class _Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def _evil_checkpoint(path: Path, marker: Path) -> Path:
    path.unlink(missing_ok=True)  # release files are hard links: never write through them
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": {}, "head": "avg", "epoch": 1, "extra": _Payload(marker)}, path)
    return path


# --------------------------------------------------------------------------- checkpoints


def test_malicious_checkpoint_is_refused_and_never_runs(released, tmp_path, monkeypatch):
    root, cfg, layout = released
    marker = tmp_path / "pwned"
    # the payload is live: plain unpickling would run it (the test would be meaningless otherwise)
    pickle.loads(pickle.dumps(_Payload(tmp_path / "control")))
    assert (tmp_path / "control").exists()

    with pytest.raises(CheckpointError, match="refusing to load"):
        load_checkpoint(_evil_checkpoint(tmp_path / "evil.pt", marker))

    monkeypatch.chdir(root)
    from vpr.steps.index import current_version

    probe = sorted((layout.data / "images/test/queries").iterdir())[0]
    _evil_checkpoint(current_version(layout.release_dir("avg")) / "model.pt", marker)
    _evil_checkpoint(layout.checkpoint("avg"), marker)
    _evil_checkpoint(layout.last_checkpoint("avg"), marker)
    for command in (
        ["locate", str(probe)],
        ["index", "--head", "avg"],
        ["train", "--head", "avg", "--resume"],
        ["evaluate", "--head", "avg"],
    ):
        result = CliRunner().invoke(app, command)
        assert result.exit_code == 1 and "refusing to load" in result.output, (command, result.output)
    with pytest.raises(Exception, match="Weights only load failed"):  # a local backbone weights file
        from vpr.foundations.config import ModelConfig
        from vpr.shared.models import build_model

        build_model("avg", ModelConfig(weights=str(_evil_checkpoint(tmp_path / "weights.pth", marker))))
    assert not marker.exists()


# --------------------------------------------------------------------------- shard samples


def _forged(state: dict, **changes) -> dict:
    out = {**state, **changes}
    return {k: v for k, v in out.items() if v is not None}


def _damaged_checkpoints(good: Path) -> dict[str, tuple[bytes | dict, str]]:
    state = torch.load(good, weights_only=True)
    weights = dict(state["model"])
    name = next(k for k, v in weights.items() if v.is_floating_point())
    nan = {**weights, name: torch.full_like(weights[name], float("nan"))}
    data = good.read_bytes()
    return {
        "zero bytes": (b"", "empty or cut short"),
        "truncated": (data[: len(data) // 2], "cannot read checkpoint"),
        "no model_config": (_forged(state, model_config=None), "no model_config"),
        "unknown head": (_forged(state, head="vit"), "unknown head 'vit'"),
        "extra weight": (_forged(state, model={**weights, "stray.weight": torch.zeros(1)}), "do not fit"),
        "missing weight": (_forged(state, model={k: v for k, v in weights.items() if k != name}), "do not fit"),
        "huge clusters": (
            _forged(state, model_config={**state["model_config"], "netvlad_clusters": 4_000_000}),
            "model_config",
        ),
        "NaN weights": (_forged(state, model=nan), "NaN"),
    }


def test_damaged_or_forged_model_checkpoints_give_a_clear_error_naming_the_file(released, tmp_path):
    from vpr.shared.checkpoints import load_model

    _, _, layout = released
    for case, (content, message) in _damaged_checkpoints(layout.checkpoint("avg")).items():
        path = tmp_path / case.replace(" ", "-") / "model.pt"
        path.parent.mkdir()
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            torch.save(content, path)
        with pytest.raises(CheckpointError) as err:
            load_model(path)
        assert str(path) in str(err.value) and message in str(err.value), (case, str(err.value))


@pytest.mark.parametrize("ext", ["pyd", "pickle"])
def test_shard_sample_with_a_pickle_member_is_refused(micro_project, tmp_path, ext):
    root, cfg, layout = micro_project
    marker = tmp_path / "pwned"
    index = read_index(layout.shards_dir)
    row = index.filter((pl.col("split") == "test") & (pl.col("role") == "database")).sort("id").row(2, named=True)
    path = layout.shards_dir / row["shard"]
    payload = pickle.dumps(_Payload(marker))
    out = io.BytesIO()
    with tarfile.open(path) as src, tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for member in src.getmembers():
            dst.addfile(member, src.extractfile(member))
            if member.name == f"{row['key']}.json":
                extra = tarfile.TarInfo(f"{row['key']}.{ext}")
                extra.size = len(payload)
                dst.addfile(extra, io.BytesIO(payload))
    path.write_bytes(out.getvalue())

    with pytest.raises(ShardError) as err:
        list(iter_split(layout.shards_dir, "test", "database"))
    message = str(err.value)
    assert row["shard"] in message and row["key"] in message and f".{ext}" in message
    assert not marker.exists()


# --------------------------------------------------------------------------- decompression bombs


def _bomb(source: Path, target: Path, width: int, height: int) -> Path:
    """A small JPEG whose header claims ``width``×``height`` pixels (its data holds far fewer)."""
    data = bytearray(source.read_bytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    target.write_bytes(bytes(data))
    with strict_pillow(None), Image.open(target) as im:  # Pillow's own guard off, just to read the header
        assert im.size == (width, height)
    return target


@pytest.fixture
def decoded(monkeypatch) -> list[tuple[int, int]]:
    """Sizes of every image Pillow decodes in this process."""
    sizes: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def spy(self):
        sizes.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spy)
    return sizes


def test_images_over_the_pixel_limit_are_refused_before_decoding(released, tmp_path, decoded):
    from vpr.steps.inbox import check_file
    from vpr.steps.locate import locate

    root, cfg, layout = released
    limit = 100_000
    good = sorted((layout.data / "images/test/queries").iterdir())[0]
    geo = parse_name(good.name)
    city = tmp_path / "city"
    folder = city / "images/train/database"
    folder.mkdir(parents=True)
    shutil.copy(good, folder / good.name)
    # just over the limit (only our header check refuses it) and far over (Pillow's own guard trips too)
    over = _bomb(good, folder / f"@{geo.utm_east + 1:.2f}@{geo.utm_north:.2f}@.jpg", 400, 300)
    huge = _bomb(good, folder / f"@{geo.utm_east + 2:.2f}@{geo.utm_north:.2f}@.jpg", 60000, 60000)

    result = ingest(city, tmp_path / "catalog", IngestConfig(workers=1, max_pixels=limit))
    reasons = dict(result.rejected_table.iter_rows())
    assert reasons == {
        f"images/train/database/{over.name}": "too many pixels",
        f"images/train/database/{huge.name}": "too many pixels",
    }
    assert result.accepted == 1

    answers = locate([over, huge, good], layout.release_dir("avg"), 3, max_pixels=limit)
    assert [a["ok"] for a in answers] == [False, False, True]
    assert all("pixels" in a["error"] and "refused before decoding" in a["error"] for a in answers[:2])

    assert check_file(folder, over.name, "test", limit, 2**26)["reason"] == "too many pixels"
    assert check_file(folder, huge.name, "test", limit, 2**26)["reason"] == "too many pixels"
    assert decoded and all(w * h <= limit for w, h in decoded)  # only the good image was ever decoded


# --------------------------------------------------------------------------- hostile file names


def _bytes_path(folder: Path, name: bytes) -> Path:
    return Path(os.fsdecode(os.path.join(os.fsencode(folder), name)))


def test_ingest_hostile_names_rejected_or_safe(micro_template, tmp_path):
    city = tmp_path / "city"
    folder = city / "images/train/database"
    folder.mkdir(parents=True)
    sources = sorted((micro_template / "data/images/train/database").iterdir())[:6]
    shutil.copy(sources[0], folder / sources[0].name)
    prefix = b"@584100.00@4477100.00@17@T@@@@@@@@@@"
    hostile = {
        prefix + b"caf\xe9@.jpg": "bad name: name is not valid UTF-8",
        prefix + b"..\\..\\..\\escape@.jpg": "bad name: name contains a path separator",
        prefix + b"line\nbreak@.jpg": "bad name: name contains control characters",
        b"..@584100.00@4477100.00@.jpg": "bad name: name does not follow @UTM_east@UTM_north@...@ convention",
    }
    for (name, _), src in zip(hostile.items(), sources[1:]):
        shutil.copy(src, _bytes_path(folder, name))
    safe = folder / "@584100.00@4477100.00@17@T@@@@@@@@@@..@.jpg"  # ".." as a field: just text
    shutil.copy(sources[5], safe)

    result = ingest(city, tmp_path / "catalog", IngestConfig(workers=1))
    rejected = dict(result.rejected_table.iter_rows())
    expected = {
        "images/train/database/"
        + os.fsdecode(n).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace"): r
        for n, r in hostile.items()
    }
    assert rejected == expected
    assert "images/train/database/@584100.00@4477100.00@17@T@@@@@@@@@@caf\\xe9@.jpg" in rejected
    paths = result.catalog["path"].to_list()
    assert sorted(paths) == sorted(f"images/train/database/{n}" for n in (sources[0].name, safe.name))
    for p in paths:  # plain relative paths that stay inside the tree
        assert (city / p).resolve().parent == folder.resolve()
    for table in ("train.parquet", "rejected.parquet"):  # readable back, valid UTF-8 throughout
        pl.read_parquet(tmp_path / "catalog" / table).write_json()


def test_reindex_inbox_hostile_names_stay_in_quarantine(released):
    from vpr.steps.reindex import run_reindex

    root, cfg, layout = released
    inbox = layout.inbox
    (inbox / "sub").mkdir(parents=True)
    query = sorted((layout.data / "images/test/queries").iterdir())[0]
    geo = parse_name(query.name)
    photo = exif_photo(query, _bytes_path(inbox, b"holiday caf\xe9.jpg"), geo.lat, geo.lon)
    no_position = _bytes_path(inbox, b"@584100.00@4477100.00@17@T@@@@@@@@@@bad\xff@.jpg")
    shutil.copy(query, no_position)
    odd_folder = _bytes_path(inbox, b"sub\xfe")
    odd_folder.mkdir()
    shutil.copy(query, odd_folder / "evil\\..\\..\\..\\x.jpg")
    shutil.copy(query, inbox / "sub" / "x..@1@2@.jpg")
    hidden = shutil.copy(query, inbox / "sub" / "..\\..\\evil.jpg")  # a dot name: "still being copied"
    before = snapshot(root)

    result = run_reindex(cfg, layout)

    json.dumps(result.to_dict(), ensure_ascii=False).encode("utf-8")  # printable: no stray surrogates
    assert len(result.added) == 1 and result.added[0]["source"] == "exif"
    assert result.added[0]["inbox"] == "holiday caf\\xe9.jpg"
    added = layout.data / result.added[0]["path"]
    assert added.parent == layout.data / "images/test/database" and added.exists() and not photo.exists()
    assert len(result.rejected) == 3 and not no_position.exists()
    assert Path(hidden).exists()  # hidden files are left alone, where they are
    quarantine = inbox / "quarantine"
    for entry in os.listdir(os.fsencode(quarantine)):  # every file directly inside, every name UTF-8
        entry.decode("utf-8")
        assert (quarantine / os.fsdecode(entry)).is_file()
    for r in result.rejected:
        moved = inbox / r["quarantined"]
        assert moved.parent == quarantine and moved.is_file()
        assert Path(str(moved) + ".reason.txt").read_text(encoding="utf-8").startswith(r["reason"])
    new = set(snapshot(root)) - set(before)
    allowed = ("inbox/quarantine/", "data/images/test/database/", "artifacts/")
    assert all(p.startswith(allowed) for p in new), sorted(p for p in new if not p.startswith(allowed))
