"""The training history is dvclive's layout, written without dvclive's DVC and git start-up."""

from __future__ import annotations

import subprocess
from pathlib import Path

from vpr.shared.history import METRICS, write_history


def _history(epochs: int) -> list[dict]:
    return [{"epoch": e, **{key: 0.5 * e + i for i, key in enumerate(METRICS)}} for e in range(1, epochs + 1)]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_the_history_is_what_dvclive_writes(tmp_path, monkeypatch):
    from dvclive import Live

    monkeypatch.chdir(tmp_path)  # no git, no DVC here: Live starts without touching a repository
    with Live(str(tmp_path / "by-live"), save_dvc_exp=False, dvcyaml=None, report=None) as live:
        for row in _history(3):
            live.step = row["epoch"]
            for key, name in METRICS.items():
                live.log_metric(name, float(row[key]))
    ours = write_history(_history(3), tmp_path / "live" / "netvlad")
    assert _files(ours) == _files(tmp_path / "by-live")
    assert "plots/metrics/val/recall@1.tsv" in _files(ours)


def test_an_empty_git_repository_is_neither_a_failure_nor_initialised(tmp_path, monkeypatch):
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    monkeypatch.chdir(tmp_path)  # where dvclive's Live raised "Empty git repo" and would run `dvc init`
    folder = write_history(_history(2), "artifacts/live/gem")
    assert (folder / "metrics.json").is_file()
    assert not (tmp_path / ".dvc").exists()


def test_a_killed_writers_staging_is_removed_and_fewer_epochs_replace_more(tmp_path):
    live = tmp_path / "live"
    left = live / ".gem.x1y2z3" / "plots"  # what a writer killed mid-write leaves beside the folder
    left.mkdir(parents=True)
    (left / "partial.tsv").write_text("step\tloss\n")
    write_history(_history(4), live / "gem")
    write_history(_history(2), live / "gem")  # a restart from scratch: the files say 2 epochs, not 4
    assert sorted(p.name for p in live.iterdir() if p.is_dir()) == ["gem"]
    assert (live / "gem" / "plots/metrics/train/loss.tsv").read_text().splitlines()[1:] == ["1\t0.5", "2\t1.0"]
