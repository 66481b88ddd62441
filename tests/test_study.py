"""The ablation study in one command: experiments, tables, curves, and the findings beside the study's."""

from __future__ import annotations

import json
import shutil

from vpr.foundations.config import parse_config
from vpr.pipeline import run_step
from vpr.steps.findings import FAILS, HOLDS, UNSURE, best, near, noise, ordered
from vpr.steps.study import Experiment, experiment_config, run_study
from vpr.steps.synth.project import build_micro_project

PNG = b"\x89PNG\r\n\x1a\n"


def _row(label: str, r1: float, seed: int = 0, n: int = 200) -> dict:
    return {"label": label, "seed": seed, "test": {"1": r1}, "queries": {"test": n}}


def test_verdicts_count_a_difference_only_beyond_the_noise():
    rows = [_row("lr=0.001", 30.0), _row("lr=0.0001", 35.0), _row("lr=1e-05", 45.0)]
    eps = noise(rows, "test")
    assert 8 < eps < 10  # 2 * sqrt(2 * 0.367 * 0.633 / 200) = 9.6 points at 200 queries
    rising = ordered(["lr=0.001", "lr=0.0001", "lr=1e-05"])
    assert rising({r["label"]: r["test"]["1"] for r in rows}, eps)[0] == HOLDS
    assert rising({"lr=0.001": 45.0, "lr=0.0001": 35.0, "lr=1e-05": 30.0}, eps)[0] == FAILS
    assert rising({"lr=0.001": 33.0, "lr=0.0001": 35.0, "lr=1e-05": 36.0}, eps)[0] == UNSURE
    assert best("a")({"a": 50.0, "b": 30.0, "reference": 60.0}, 5.0)[0] == HOLDS  # the reference row is no rival
    assert near("reference", ["a", "b"])({"reference": 40.0, "a": 43.0, "b": 36.0}, 5.0)[0] == HOLDS
    two_seeds = [_row("a", 40.0, 0, 10_000), _row("a", 52.0, 1, 10_000), _row("b", 45.0, 0, 10_000)]
    assert noise(two_seeds, "test") == 12.0  # the seeds' spread, when it is the larger


def test_an_experiment_is_the_projects_params_the_budget_then_the_setting():
    cfg = parse_config({"train": {"epochs": 9, "per_head": {"netvlad": {"epochs": 7}}}})
    exp = Experiment("augmentation", {"train.augment.horizontal_flip": True, "train.augment.rotate_deg": 10.0}, 1)
    ecfg = experiment_config(cfg, {"train": {"epochs": 2}}, exp, "crn2")
    assert ecfg.train.heads == ["netvlad", "crn2"] and ecfg.train.per_head == {} and ecfg.train.seed == 1
    assert ecfg.train.epochs == 2 and ecfg.train.augment.horizontal_flip and ecfg.train.augment.rotate_deg == 10.0
    assert exp.label == "flip+rotate" and Experiment("lr", {"train.lr": 1e-05}, 0).label == "lr=1e-05"


def test_the_study_runs_each_setting_once_and_writes_tables_curves_and_findings(tmp_path):
    root = tmp_path / "project"
    town = {"town2": {"seed": 3, "test": {"database": 12, "queries": 8}}}
    cfg, layout = build_micro_project(root, {"synth": {"test_sets": town}, "evaluate": {"test_sets": ["town2"]}})
    run_step("test-set@town2", cfg, layout)
    out = tmp_path / "results"
    paths = run_study(cfg, layout, out, ablations=["lr"], budget={"train": {"epochs": 1}})
    assert [p.name for p in paths] == ["lr.md", "README.md"]
    rows = json.loads((out / "lr.json").read_text())["rows"]
    assert [r["label"] for r in rows] == ["reference", "lr=0.001", "lr=0.0001", "lr=1e-05"]
    assert all(set(r) >= {"val", "test", "town2"} for r in rows)
    for name in ("lr-test.png", "lr-town2.png"):
        assert (out / name).read_bytes().startswith(PNG)
    readme = (out / "README.md").read_text()
    assert "a lower learning rate is better" in readme and "lr = 1e-5\t83.5\t93.1\t94.3\t97.1" in readme
    assert cfg.train.lr == 0.001 and rows[0]["config"] == rows[1]["config"]  # the same config trains once
    folders = sorted((layout.artifacts / "ablations").iterdir())
    assert len(folders) == 3 and all((f / "result.json").exists() for f in folders)
    stamp = {f: (f / "result.json").stat().st_mtime_ns for f in folders}
    shutil.rmtree(out)
    run_study(cfg, layout, out, ablations=["lr"], budget={"train": {"epochs": 1}})  # resumes: nothing re-run
    assert {f: (f / "result.json").stat().st_mtime_ns for f in folders} == stamp
    assert json.loads((out / "lr.json").read_text())["rows"] == rows
