"""The page at / in a real headless Chromium over a real service: the map (fills its panel, scale bar,
north arrow, zoom/pan, density for large databases), a located photo's numbered matches tied to their
thumbnails, the GPS prior set on the map, and an empty answer that says why.

``VPR_PAGE_SCREENSHOT=docs/api-page.png`` builds a demo-sized synthetic city instead of the micro one
(a few minutes) and saves the located photo's page there: the README's picture.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from tests.apikit import running
from tests.test_evaluate import save_checkpoint
from vpr.foundations.config import ApiConfig, LocateConfig
from vpr.shared.release import haversine_m
from vpr.shared.shardio import ShardReader
from vpr.steps.api.app import create_app
from vpr.steps.api.live import LiveRelease

SCREENSHOT = os.environ.get("VPR_PAGE_SCREENSHOT")
# Debian's /usr/bin/chromium is a shell wrapper (it prints "[: ...: unexpected operator" on some
# machines); the binary behind it is what Playwright should start
REAL_BINARIES = ("/usr/lib/chromium/chromium", "/usr/lib/chromium-browser/chromium-browser")
DEMO_LIKE = {  # the demo's image counts (params.yaml) halved, at the demo's resolution
    "synth": {
        "height": 120,
        "width": 160,
        "train": {"database": 2000, "queries": 8},
        "val": {"database": 300, "queries": 8},
        "test": {"database": 200, "queries": 8},
    },
    "shards": {"height": 120, "width": 160},
}


def chromium(search_path: str | None = None, real: tuple[str, ...] = REAL_BINARIES) -> str | None:
    """The browser binary itself (not Debian's wrapper script) or, failing that, one on the PATH; None if none."""
    for path in real:
        if os.access(path, os.X_OK):
            return path
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name, path=search_path)
        if found:
            return found
    return None


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright is not installed (make setup)")
    binary = chromium()
    if binary is None:
        pytest.skip("no Chromium on this machine: `make browser` (apt-get install chromium) installs it")
    root_user = hasattr(os, "geteuid") and os.geteuid() == 0  # Chromium's sandbox refuses to start as root
    with sync_api.sync_playwright() as p:
        launched = p.chromium.launch(executable_path=binary, headless=True, args=["--no-sandbox"] if root_user else [])
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from vpr.steps.index import build_release
    from vpr.steps.synth.project import build_micro_project

    root = tmp_path_factory.mktemp("page-city")
    cfg, layout = build_micro_project(root, {"index": {"head": "avg"}, **(DEMO_LIKE if SCREENSHOT else {})})
    save_checkpoint("avg", cfg, layout)
    build_release("avg", cfg, layout)
    live = LiveRelease(layout.release_dir("avg"), shards_dir=layout.shards_dir)
    database = ShardReader(layout.shards_dir).index.filter(pl.col("role") == "database").sort("id")
    with running(create_app(live, ApiConfig(), LocateConfig())) as url:
        yield root, layout, url, database


@pytest.fixture
def page(browser, served):
    errors: list[str] = []
    context = browser.new_context(viewport={"width": 1100, "height": 760})
    pg = context.new_page()
    pg.on("pageerror", lambda exc: errors.append(str(exc)))
    pg.on("requestfailed", lambda req: errors.append(f"failed: {req.url}"))
    pg.goto(served[2] + "/")
    pg.wait_for_selector("#mapbox[data-ready]")
    yield pg
    context.close()
    assert not errors, errors


DRAWN = """() => {  // bounding box and lower-half count of the canvas pixels that differ from the background
  const c = document.getElementById('map'), d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let x0 = c.width, y0 = c.height, x1 = -1, y1 = -1, n = 0, low = 0;
  for (let y = 0; y < c.height; y++) for (let x = 0; x < c.width; x++) {
    const k = 4 * (y * c.width + x);
    if (Math.abs(d[k] - 0xee) + Math.abs(d[k + 1] - 0xf2) + Math.abs(d[k + 2] - 0xf5) < 12) continue;
    n++; if (y > c.height / 2) low++;
    x0 = Math.min(x0, x); x1 = Math.max(x1, x); y0 = Math.min(y0, y); y1 = Math.max(y1, y);
  }
  return {w: c.width, h: c.height, x0, y0, x1, y1, n, low};
}"""


GEOMETRY = """() => {  // where 100 m east and north land, every database point in pixels, the panel, the scale
  const m = window.vprMap, s = m.state, [x0, y0] = m.toPx(0, 0), [x1, y1] = m.toPx(100, 100), px = [];
  for (let i = 0; i < s.points.length; i += 2) px.push(m.toPx(s.points[i], s.points[i + 1]));
  const box = document.getElementById('mapbox');
  return {dx: x1 - x0, dy: y1 - y0, px, w: box.clientWidth, h: box.clientHeight, s: s.view.s};
}"""
MANY_POINTS = """() => {  // 10⁵ points over the database's bounds, fed to the map as its database
  const m = window.vprMap, [e0, n0, e1, n1] = m.state.bounds, pts = [];
  for (let i = 0; i < 1e5; i++) pts.push([e0 + (e1 - e0) * i / 1e5, n0 + (n1 - n0) * ((i * 7919) % 1000) / 1000]);
  m.setDatabase(pts, [e0, n0, e1, n1], 1e5);
  return {mode: m.state.mode, ms: m.state.drawMs};
}"""


def spread_over_the_panel(drawn: dict) -> None:
    """The drawn database spans the panel along its limiting axis and sits in its middle (not its top)."""
    assert drawn["n"] > 0 and drawn["low"] > 0, drawn  # drawn pixels below the middle, too
    width, height = drawn["x1"] - drawn["x0"], drawn["y1"] - drawn["y0"]
    assert width >= 0.8 * drawn["w"] or height >= 0.8 * drawn["h"], drawn
    assert abs((drawn["x0"] + drawn["x1"]) / 2 - drawn["w"] / 2) < 0.1 * drawn["w"], drawn
    assert abs((drawn["y0"] + drawn["y1"]) / 2 - drawn["h"] / 2) < 0.1 * drawn["h"], drawn


def metres(lat: float, lon: float, lat2: float, lon2: float) -> float:
    return float(haversine_m(lat, lon, np.array([lat2]), np.array([lon2]))[0])


def scale_m(page) -> float:
    return float(page.get_attribute("#scale", "data-metres"))


def test_the_map_fills_its_panel_keeps_its_aspect_and_zooms(page):
    box = page.locator("#mapbox").bounding_box()
    panel = page.locator("#map").bounding_box()
    assert box["width"] > 0.9 * 1100 and box["height"] >= 250, box
    for key in ("x", "y", "width", "height"):  # the canvas is the panel (its border aside)
        assert abs(box[key] - panel[key]) <= 2, (box, panel)
    spread_over_the_panel(page.evaluate(DRAWN))
    # equal metres per pixel on both axes; every database point inside the panel
    geometry = page.evaluate(GEOMETRY)

    assert geometry["dx"] > 0 and geometry["dx"] == pytest.approx(-geometry["dy"])
    assert all(0 <= x <= geometry["w"] and 0 <= y <= geometry["h"] for x, y in geometry["px"])
    # a scale bar as long as the metres it names, and a north arrow
    label = page.text_content("#scale-label")
    metres = scale_m(page)
    assert label in (f"{metres:g} m", f"{metres / 1000:g} km")
    bar = page.locator("#scale-bar").bounding_box()["width"]
    assert bar == pytest.approx(metres * geometry["s"], rel=0.05, abs=4)
    assert page.locator("#north").is_visible() and "N" in page.text_content("#north")
    # wheel zooms in at the cursor (the scale bar names fewer metres), drag pans, reset shows all again
    cursor = (panel["width"] * 0.3, panel["height"] * 0.6)  # off-centre: the zoom keeps this spot under it
    spot = page.evaluate(f"window.vprMap.toUtm({cursor[0]}, {cursor[1]})")
    page.mouse.move(panel["x"] + cursor[0], panel["y"] + cursor[1])
    page.mouse.wheel(0, -600)
    page.wait_for_function(f"+document.getElementById('scale').dataset.metres < {metres}")
    assert page.evaluate(f"window.vprMap.toPx({spot[0]}, {spot[1]})") == pytest.approx(cursor, abs=1.5)
    before = page.evaluate("window.vprMap.state.view.cx")
    page.mouse.move(panel["x"] + panel["width"] / 2, panel["y"] + panel["height"] / 2)
    page.mouse.down()
    page.mouse.move(panel["x"] + panel["width"] / 2 - 120, panel["y"] + panel["height"] / 2, steps=5)
    page.mouse.up()
    view = page.evaluate("window.vprMap.state.view")  # dragged 120 px left: the view moved 120 px east
    assert view["cx"] == pytest.approx(before + 120 / view["s"], abs=1 / view["s"])
    page.click("#reset")
    page.wait_for_function(f"+document.getElementById('scale').dataset.metres === {metres}")
    spread_over_the_panel(page.evaluate(DRAWN))


def test_a_large_database_is_drawn_by_density(page):
    """10⁵ points: one density grid (cells of a few pixels), still spread over the whole panel."""
    result = page.evaluate(MANY_POINTS)

    assert result["mode"] == "density", result
    print(f"density draw of 1e5 points: {result['ms']:.1f} ms")
    spread_over_the_panel(page.evaluate(DRAWN))
    assert "per 3px cell" in page.text_content("#legend")


def located(page, served, row: dict) -> None:
    page.set_input_files("#file", str(served[1].data / row["path"]))
    page.wait_for_selector("#marker", timeout=30_000)


def test_a_located_photo_shows_numbered_matches_tied_to_their_thumbnails(page, served, tmp_path):
    database = served[3]
    located(page, served, database.row(len(database) // 2, named=True))
    items = page.locator("#matches li")
    assert items.count() == 5
    assert "#1 · distance 0.000" in items.first.text_content()
    page.wait_for_function("[...document.querySelectorAll('#matches img')].every(i => i.complete)")
    widths = page.eval_on_selector_all("#matches img", "imgs => imgs.map(i => i.naturalWidth)")
    assert all(w > 0 for w in widths), widths  # every thumbnail loaded from /v1/images/{id}
    assert "Estimated position" in page.text_content("#estimate")
    # numbered markers, each where its match is, and the same number on its thumbnail
    markers = page.eval_on_selector_all(
        "#found .match",
        "gs => gs.map(g => [+g.dataset.rank, g.querySelector('text').textContent, g.getCTM().e, g.getCTM().f])",
    )
    assert sorted(m[0] for m in markers) == [1, 2, 3, 4, 5] and all(str(m[0]) == m[1] for m in markers)
    where = page.evaluate("vprMap.state.answer.matches.map(m => [m.rank, ...vprMap.toPx(m.utm_east, m.utm_north)])")
    at = {rank: (x, y) for rank, _, x, y in markers}
    for rank, x, y in where:
        assert at[rank] == pytest.approx((x, y), abs=0.2)
    assert [li.text_content() for li in page.locator("#matches li .num").all()] == ["1", "2", "3", "4", "5"]
    # hover a thumbnail: its marker lights up; hover a marker: its thumbnail lights up
    page.hover("#matches li[data-rank='2']")
    page.wait_for_selector("#found .match.hot[data-rank='2']")
    assert page.locator("#found .match.hot").count() == 1
    page.dispatch_event("#found .match[data-rank='3']", "mouseenter")
    page.wait_for_selector("#matches li.hot[data-rank='3']")
    assert page.locator("#matches li.hot").count() == 1
    page.mouse.move(0, 0)
    page.dispatch_event("#found .match[data-rank='3']", "mouseleave")
    spread_over_the_panel(page.evaluate(DRAWN))
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    assert (tmp_path / "page.png").stat().st_size > 10_000
    if SCREENSHOT:
        Path(SCREENSHOT).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(tmp_path / "page.png", SCREENSHOT)


def test_the_gps_prior_is_set_on_the_map_and_an_empty_answer_says_why(page, served):
    database = served[3]
    photo, elsewhere = database.row(0, named=True), database.row(len(database) - 1, named=True)
    assert metres(photo["lat"], photo["lon"], elsewhere["lat"], elsewhere["lon"]) > 300
    located(page, served, photo)
    # shift-click where another database image lies: the prior is centred there, drawn as a circle
    x, y = page.evaluate(f"window.vprMap.toPx({elsewhere['utm_east']}, {elsewhere['utm_north']})")
    panel = page.locator("#map").bounding_box()
    page.keyboard.down("Shift")
    page.mouse.click(panel["x"] + x, panel["y"] + y)
    page.keyboard.up("Shift")
    page.wait_for_selector("#prior-circle")
    lat, lon = float(page.input_value("#prior-lat")), float(page.input_value("#prior-lon"))
    metres_per_px = 1 / page.evaluate("window.vprMap.state.view.s")  # a click lands on whole pixels
    assert metres(lat, lon, elsewhere["lat"], elsewhere["lon"]) < 1.5 * metres_per_px
    # the map's UTM <-> GPS fit puts that image's UTM position at its own lat/lon, to under a metre
    fitted = page.evaluate(f"window.vprMap.state.geo.toLatLon({elsewhere['utm_east']}, {elsewhere['utm_north']})")
    assert metres(*fitted, elsewhere["lat"], elsewhere["lon"]) < 1
    circle = {k: float(page.get_attribute("#prior-circle", k)) for k in ("cx", "cy", "r")}
    assert circle["r"] * metres_per_px == pytest.approx(100, rel=0.01)  # the radius input's 100 m
    assert (circle["cx"], circle["cy"]) == pytest.approx((x, y), abs=1.5)
    assert page.locator("#prior-circle").is_visible()
    # the photo is located again with the prior: every match inside the circle, none from the photo's place
    page.wait_for_function(f"(window.vprMap.state.answer.matches || []).every(m => m.lat !== {photo['lat']})")
    matches = page.evaluate("window.vprMap.state.answer.matches")
    assert matches and all(metres(lat, lon, m["lat"], m["lon"]) <= 100 for m in matches)
    assert page.locator("#found .match").count() == len(matches)
    # a prior around no database image: no matches, and the page says why
    page.fill("#prior-radius", "500")
    page.fill("#prior-lat", "40.0")
    page.fill("#prior-lon", "-80.0")
    page.dispatch_event("#prior-lon", "change")
    # (each field's change locates again; only the latest request's answer is shown)
    reason = "No match: no database image within 500 m of 40, -80 (the GPS prior)"
    page.wait_for_function(f"document.getElementById('status').textContent === {reason!r}")
    assert page.locator("#matches li").count() == 0 and page.locator("#found .match").count() == 0
    assert page.locator("#marker").count() == 0


def test_the_browser_is_the_binary_not_the_wrapper_and_missing_means_skipped():
    """Debian's wrapper script prints a shell error as root; the binary behind it is started instead.
    With no browser anywhere, ``chromium()`` is None and the fixture skips with how to install one."""
    assert chromium(search_path="", real=()) is None
    binary = chromium()
    if binary is None:
        pytest.skip("no Chromium on this machine: `make browser` (apt-get install chromium) installs it")
    run = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 0 and "Chromium" in run.stdout or "Chrome" in run.stdout, run
    assert "unexpected operator" not in run.stderr, run.stderr
