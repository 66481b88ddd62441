"""Progress bars of the pipeline steps: one rich bar on stderr, so stdout stays free for results."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn


def step_progress(step: str, *, loss: bool = False) -> Progress:
    """``step ━━━━━━ n/N 0:00:12`` on stderr (start it with ``with``, add one task per bar).

    ``loss=True`` is training's bar: each task is titled by its description (``netvlad epoch 2/5``)
    and shows the running loss (a ``loss`` field); it is drawn on a terminal only, since a log gets
    the epoch's summary line instead.
    """
    console = Console(stderr=True)
    columns: list[ProgressColumn] = [TextColumn("{task.description}" if loss else f"[bold]{step}"), BarColumn()]
    columns.append(MofNCompleteColumn())
    if loss:
        columns.append(TextColumn("loss {task.fields[loss]:.4f}"))
    columns.append(TimeElapsedColumn())
    quiet = loss and not console.is_terminal
    return Progress(*columns, console=console, transient=quiet, disable=quiet)
