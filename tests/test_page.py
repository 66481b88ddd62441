"""The page at / in a real headless Chromium: upload a photo, see the matches and the marker on the map."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import polars as pl
import pytest

from tests.apikit import running
from tests.test_evaluate import build_micro_release
from vpr.foundations.config import ApiConfig, LocateConfig
from vpr.shared.shardio import ShardReader
from vpr.steps.api.app import create_app
from vpr.steps.api.live import LiveRelease

SCREENSHOT = os.environ.get("VPR_PAGE_SCREENSHOT")  # set to docs/api-page.png to refresh the docs' picture


def chromium() -> str:
    """The system's Chromium (Debian package; `make test` installs it when missing)."""
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    raise AssertionError("no Chromium on this machine: `make browser` (apt-get install chromium) installs it")


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("micro-page")
    cfg, layout = build_micro_release(root)
    live = LiveRelease(layout.release_dir("avg"), shards_dir=layout.shards_dir)
    with running(create_app(live, ApiConfig(), LocateConfig())) as url:
        yield root, layout, url


def test_uploading_a_photo_shows_its_matches_and_the_estimated_position(served, tmp_path):
    from playwright.sync_api import sync_playwright

    root, layout, url = served
    row = ShardReader(layout.shards_dir).index.filter(pl.col("role") == "database").sort("id").row(2, named=True)
    photo = root / "data" / row["path"]
    errors: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium(), headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("requestfailed", lambda req: errors.append(f"failed: {req.url}"))
            page.goto(url + "/")
            page.wait_for_selector("#points circle")  # the map of the database positions
            assert "release v000001" in page.text_content("#release")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector("#marker", timeout=30_000)
            items = page.locator("#matches li")
            assert items.count() == 5
            assert "#1 · distance 0.000" in items.first.text_content()
            # every thumbnail loaded from /v1/images/{id} (naturalWidth 0 = broken image)
            page.wait_for_function("[...document.querySelectorAll('#matches img')].every(i => i.complete)")
            widths = page.eval_on_selector_all("#matches img", "imgs => imgs.map(i => i.naturalWidth)")
            assert all(w > 0 for w in widths), widths
            assert page.locator("#found circle.match").count() == 5
            assert "Estimated position" in page.text_content("#estimate")
            page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
            if SCREENSHOT:
                Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(tmp_path / "page.png", SCREENSHOT)
        finally:
            browser.close()
    assert not errors, errors
    assert (tmp_path / "page.png").stat().st_size > 10_000
