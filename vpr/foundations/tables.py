"""The one table formatter: markdown for reports and Prefect artifacts (rich cannot write markdown), rich
tables for terminals."""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence

MISSING = "—"


def cell(value: object, digits: int = 1) -> str:
    """A number with ``digits`` decimals, ``—`` for a missing value, anything else as text."""
    if value is None:
        return MISSING
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]], right: Sequence[int] = ()) -> list[str]:
    """Lines of a markdown table; ``right``: indexes of right-aligned (numeric) columns."""
    rule = ["---:" if i in right else "---" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(rule) + "|"]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in rows]
    return lines


def text_table(rows: list[dict]) -> str:
    """Aligned columns for a terminal (rich, no colour): the first left-aligned, the rest right-aligned."""
    if not rows:
        return "(no results)"
    from rich import box
    from rich.console import Console
    from rich.table import Table

    cols = list(dict.fromkeys(k for r in rows for k in r))
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    for i, c in enumerate(cols):
        table.add_column(c, justify="right" if i else "left", no_wrap=True)
    for r in rows:
        table.add_row(*(str(r.get(c, "")) for c in cols))
    console = Console(file=io.StringIO(), width=10_000, color_system=None, legacy_windows=False)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines() if line.strip())


def print_locations(results: list[dict]) -> None:
    """``vpr locate``'s answers as one rich table per image (errors in red)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for r in results:
        if not r["ok"]:
            console.print(f"[bold red]{r['image']}[/]: error: {r['error']}")
            continue
        est = r["estimate"]
        where = f"E {est['utm_east']:.1f}  N {est['utm_north']:.1f}" if est else "unknown"
        if est and est["lat"] is not None:
            where += f"  ({est['lat']:.6f}, {est['lon']:.6f})"
        table = Table(title=f"{r['image']}\n→ {where}   confidence {r['confidence']:.2f}", title_justify="left")
        for col in ("#", "path", "utm_east", "utm_north", "lat", "lon", "distance"):
            table.add_column(col, justify="left" if col == "path" else "right")
        for m in r["matches"]:
            table.add_row(
                str(m["rank"]),
                m["path"],
                f"{m['utm_east']:.1f}",
                f"{m['utm_north']:.1f}",
                "" if m["lat"] is None else f"{m['lat']:.6f}",
                "" if m["lon"] is None else f"{m['lon']:.6f}",
                f"{m['distance']:.4f}",
            )
        console.print(table)
