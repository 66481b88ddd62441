"""The one table formatter: markdown for reports and Prefect artifacts, aligned plain text for terminals."""

from __future__ import annotations

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
    """Aligned columns for a terminal: the first left-aligned, the rest right-aligned (numbers)."""
    if not rows:
        return "(no results)"
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[str(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths)))

    return "\n".join([line(cols), line(["-" * w for w in widths]), *(line(r) for r in cells)])


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
