"""Extra test sets: a second town rendered apart from the city, prepared and evaluated without retraining."""

from __future__ import annotations

import json

import polars as pl
import pytest

from vpr.foundations.geo import parse_name
from vpr.pipeline import run_step, stage_outputs
from vpr.steps.synth.project import build_micro_project

TOWN = {"town2": {"seed": 3, "season": "winter", "offset_km": 30.0, "test": {"database": 12, "queries": 8}}}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    root = tmp_path_factory.mktemp("town") / "project"
    cfg, layout = build_micro_project(
        root,
        {
            "synth": {"test_sets": TOWN},
            "evaluate": {"test_sets": ["town2"]},
            "train": {"heads": ["avg"], "epochs": 1},
        },
    )
    run_step("train@avg", cfg, layout)
    return cfg, layout


def test_the_town_is_a_test_split_of_its_own_apart_from_the_city_in_winter(project):
    cfg, layout = project
    town = layout.test_set("town2").data / "images"
    assert sorted(p.name for p in town.iterdir()) == ["test"]
    names = {role: sorted(p.name for p in (town / "test" / role).iterdir()) for role in ("database", "queries")}
    assert len(names["database"]) == 12 and len(names["queries"]) == 8
    city = [parse_name(p.name) for p in (layout.data / "images/test/database").iterdir()]
    here = [parse_name(n) for n in names["database"]]
    assert min(g.utm_north for g in here) - max(g.utm_north for g in city) > 25_000  # 30 km north, never overlapping
    assert all(n.split("@")[-2] == "winter" for n in names["database"])  # the database is captured in winter light
    assert not (layout.data / "test-sets" / "town2" / "images" / "train").exists()


def test_a_test_set_is_prepared_and_evaluated_with_the_trained_model_beside_the_main_split(project):
    cfg, layout = project
    prepared = run_step("test-set@town2", cfg, layout)
    assert prepared["accepted"] == 20 and prepared["rejected"] == 0
    for path in stage_outputs("test-set@town2", cfg, layout):
        assert path.exists() and "test-sets/town2" in path.as_posix()
    main = run_step("evaluate@avg", cfg, layout)
    other = run_step("cross-evaluate@avg-town2", cfg, layout)
    own = layout.test_set("town2")
    assert json.loads(own.metrics_file("avg").read_text()) == other
    assert other["database"] == 12 and other["queries"] == 8 and main["database"] != 0
    assert own.checkpoint("avg") == layout.checkpoint("avg")  # the project's model, not retrained
    preds = pl.read_parquet(own.predictions("avg"))
    assert preds.height == 8 and not layout.predictions("avg").samefile(own.predictions("avg"))
    run_step("baseline", cfg, layout)
    text = run_step("report", cfg, layout)["report"]
    report = open(text).read()
    assert "## Test sets" in report and "town2 R@1" in report and "test R@1" in report
    row = next(line for line in report.splitlines() if line.startswith("| `avg` |") and "town2" not in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1:] == [f"{main[f'recall@{n}']:.1f}" for n in (1, 5, 10, 20)] + [
        f"{other[f'recall@{n}']:.1f}" for n in (1, 5, 10, 20)
    ]


def test_the_cli_runs_every_listed_test_set_and_names_a_missing_one(project, monkeypatch):
    from typer.testing import CliRunner

    from vpr.cli import app

    cfg, layout = project
    monkeypatch.chdir(layout.root)
    result = CliRunner().invoke(app, ["cross-evaluate", "--head", "avg"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout.splitlines()[-1])["queries"] == 8
    result = CliRunner().invoke(app, ["test-set", "--set", "nowhere"])
    assert result.exit_code == 1 and "no images/test folder" in result.output
