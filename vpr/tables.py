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
