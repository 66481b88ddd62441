"""The one DVC runner: this environment's real DVC, its output back, failures with DVC's own message."""

from __future__ import annotations

import pytest

from vpr.foundations.dvcrun import DvcError, run_dvc


def test_runs_this_environments_dvc(tmp_path):
    import dvc

    assert dvc.__version__ in run_dvc(tmp_path, "version")


def test_a_failing_command_raises_with_dvcs_message(tmp_path):
    with pytest.raises(DvcError, match=r"dvc status failed \(exit status \d+\):\n.*(not inside of a DVC repository)"):
        run_dvc(tmp_path, "status")
