"""The one way vpr runs DVC's command line (flow records, ablation experiments).

Always this interpreter's DVC (``python -m dvc``: the version installed beside vpr, whatever is on
``PATH``), analytics off, in the project folder (DVC resolves paths against the working directory
and holds its repository lock only for the one command), with a bound on how long it may take.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


class DvcError(RuntimeError):
    """A dvc command failed or ran past its time limit (its output is in the message)."""


def run_dvc(root: str | Path, *args: str, capture: bool = True, timeout: float | None = 600) -> str:
    """Run ``dvc ARGS`` in ``root``; its stdout (``""`` when not captured, i.e. shown to the user as it runs).

    ``timeout=None`` only for commands whose length is the work itself (``dvc exp run --run-all``).
    """
    command = [sys.executable, "-m", "dvc", *args]
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    try:
        proc = subprocess.run(command, cwd=root, env=env, capture_output=capture, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise DvcError(f"dvc {' '.join(args)} did not finish within {timeout:g} s") from exc
    if proc.returncode != 0:
        detail = f"{proc.stdout or ''}{proc.stderr or ''}".strip()[-4000:]
        raise DvcError(
            f"dvc {' '.join(args)} failed (exit status {proc.returncode})" + (f":\n{detail}" if detail else "")
        )
    return proc.stdout or ""
