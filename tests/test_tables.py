"""The one table formatter: markdown rows and alignment, terminal columns, missing values."""

from __future__ import annotations

from vpr.foundations.tables import cell, markdown_table, text_table


def test_markdown_table_aligns_the_numeric_columns_right():
    lines = markdown_table(["head", "R@1"], [["`gem`", cell(55.04)], ["`avg`", cell(None)]], right=[1])
    assert lines == ["| head | R@1 |", "|---|---:|", "| `gem` | 55.0 |", "| `avg` | — |"]


def test_text_table_pads_columns_to_their_widest_cell():
    text = text_table([{"model": "netvlad", "R@1": 55.0}, {"model": "gem", "R@1": 100.0}])
    assert text.splitlines() == ["model       R@1", "─" * 15, "netvlad    55.0", "gem       100.0"]
    assert text_table([]) == "(no results)"
