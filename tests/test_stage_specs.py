"""The stages of dvc.yaml as the cache keys read them, kept for the next process (``tasks.cache.stage_specs``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks.cache import SPECS_DIR, stage_specs

REPO = Path(__file__).resolve().parents[1]
DVC_YAML = """stages:
  make:
    cmd: 'true'
    deps:
      - in.txt
    params:
      - a
    outs:
      - ${out}
  use:
    foreach: [x, y]
    do:
      cmd: 'true'
      deps:
        - ${out}
      outs:
        - used-${item}.txt
"""


def _project(root: Path, dvc_yaml: str = DVC_YAML, out: str = "made.txt") -> Path:
    root.mkdir()
    (root / "dvc.yaml").write_text(dvc_yaml)
    (root / "params.yaml").write_text(f"a: 1\nout: {out}\n")
    (root / "in.txt").write_text("in\n")
    return root


def _in_a_process_of_its_own(root: Path) -> dict:
    code = (
        "import json, sys; from tasks.cache import stage_specs;"
        "print(json.dumps({n: [s.deps, s.params, s.outs, s.upstream] for n, s in stage_specs(sys.argv[1]).items()}))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(root)], cwd=REPO, capture_output=True, text=True, timeout=300, check=True
    )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _specs(root: Path) -> dict:
    return {n: [list(s.deps), list(s.params), list(s.outs), list(s.upstream)] for n, s in stage_specs(root).items()}


@pytest.fixture
def no_dvc_parser(monkeypatch):
    """DVC's parser refuses to run: whatever comes back was kept by an earlier process."""
    import dvc.repo

    def refuse(*args, **kwargs):
        raise AssertionError("dvc.yaml parsed again")

    monkeypatch.setattr(dvc.repo, "Repo", refuse)


def test_the_next_process_reads_the_stages_without_dvc(tmp_path, no_dvc_parser):
    root = _project(tmp_path / "p")
    parsed = _in_a_process_of_its_own(root)
    assert parsed["use@x"] == [["made.txt"], [], ["used-x.txt"], ["make"]]
    assert _specs(root) == parsed
    assert list(stage_specs(root)) == ["make", "use@x", "use@y"]  # dvc.yaml's order


def test_an_edit_to_params_yaml_is_parsed_again(tmp_path, no_dvc_parser):
    root = _project(tmp_path / "p")
    _in_a_process_of_its_own(root)
    (root / "params.yaml").write_text("a: 1\nout: other.txt\n")  # what dvc.yaml interpolates
    with pytest.raises(AssertionError, match="parsed again"):
        stage_specs(root)


def test_stages_that_read_vars_files_are_not_kept(tmp_path):
    home = Path(os.environ["PREFECT_HOME"]) / SPECS_DIR
    before = set(home.glob("*.json")) if home.exists() else set()
    root = _project(tmp_path / "p", "vars:\n  - extra.yaml\n" + DVC_YAML.replace("${out}", "${extra_out}"))
    (root / "extra.yaml").write_text("extra_out: from-extra.txt\n")
    assert _in_a_process_of_its_own(root)["make"][2] == ["from-extra.txt"]
    assert (set(home.glob("*.json")) if home.exists() else set()) == before
