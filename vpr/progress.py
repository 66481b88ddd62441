"""Progress bars of the pipeline steps: one rich bar on stderr, so stdout stays free for results."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn


def step_progress(step: str) -> Progress:
    """``step ━━━━━━ n/N 0:00:12`` on stderr (start it with ``with``, add one task per bar)."""
    return Progress(
        TextColumn(f"[bold]{step}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
    )
