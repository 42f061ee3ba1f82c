"""Markdown tables for reports and Dagster metadata (no tabulate dependency)."""

from __future__ import annotations

import polars as pl


def format_cell(value: object, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, list):
        return ", ".join(format_cell(v, digits) for v in value)
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pl.DataFrame, digits: int = 4) -> str:
    """A GitHub-flavoured markdown table of `frame`; floats to `digits` significant digits."""
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(format_cell(v, digits) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join([header, rule, *body])
