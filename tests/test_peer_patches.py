"""bench/peer.py's patcher on a fake reference checkout: every patch applied to the copy, the
checkout itself untouched, and a missing target string refused by the patch's name."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


@pytest.fixture(scope="module")
def peer():
    sys.path.insert(0, str(BENCH))  # peer.py imports its sibling _common
    try:
        spec = importlib.util.spec_from_file_location("bench_peer", BENCH / "peer.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def fake_checkout(root: Path, patches) -> None:
    for p in patches:
        path = root / p.file
        path.parent.mkdir(parents=True, exist_ok=True)
        text = path.read_text() if path.exists() else "# fake\n"
        path.write_text(text + p.old + "\n")
    (root / ".git").mkdir()
    (root / "logs").mkdir()


def test_every_patch_lands_in_the_copy_only(peer, tmp_path):
    src = tmp_path / "checkout"
    fake_checkout(src, peer.PATCHES)
    before = {p: p.read_text() for p in src.rglob("*.py")}
    applied = peer.apply_patches(src, tmp_path / "copy")
    assert [p.name for p in applied] == [p.name for p in peer.PATCHES]
    for p in peer.PATCHES:
        assert p.new in (tmp_path / "copy" / p.file).read_text(), p.name
    assert {p: p.read_text() for p in src.rglob("*.py")} == before
    assert not (tmp_path / "copy" / ".git").exists() and not (tmp_path / "copy" / "logs").exists()


def test_a_missing_target_names_its_patch(peer, tmp_path):
    src = tmp_path / "checkout"
    fake_checkout(src, [p for p in peer.PATCHES if p.name != "numpy2-in1d"])
    (src / "test.py").write_text("# no in1d here\n")
    with pytest.raises(SystemExit, match="numpy2-in1d"):
        peer.apply_patches(src, tmp_path / "copy")
