"""Markdown tables and reader-facing numbers for reports and Dagster metadata (no tabulate dependency)."""

from __future__ import annotations

import math

import polars as pl

READER_DIGITS = 4
"""Significant digits of a float shown to a reader (reports, asset metadata); files keep full precision."""


def format_cell(value: object, digits: int = READER_DIGITS) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, list):
        return ", ".join(format_cell(v, digits) for v in value)
    return "" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def markdown_table(frame: pl.DataFrame, digits: int = READER_DIGITS) -> str:
    """A GitHub-flavoured markdown table of `frame`; floats to `digits` significant digits."""
    header = "| " + " | ".join(frame.columns) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(format_cell(v, digits) for v in row) + " |" for row in frame.iter_rows()]
    return "\n".join([header, rule, *body])


def round_significant(value: float, digits: int = READER_DIGITS) -> float:
    """`value` rounded to `digits` significant digits (0, NaN and ±inf unchanged)."""
    if value == 0 or not math.isfinite(value):
        return value
    return float(f"{value:.{digits - 1}e}")


def rounded(value: object, digits: int = READER_DIGITS) -> object:
    """`value` with every float in it (inside dicts, lists and tuples too) rounded to `digits` significant digits:
    what a metadata table shows, where `0.020833333333333332` should read `0.02083`."""
    if isinstance(value, float):
        return round_significant(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [rounded(v, digits) for v in value]
    return value


def format_duration(seconds: float) -> str:
    """A duration as a reader says it: `0.42s`, `42s`, `4m 40s`, `2h 5m 12s`."""
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"seconds: {seconds} must be a finite number >= 0")
    if seconds < 10:
        return f"{seconds:.2g}s" if seconds < 1 else f"{seconds:.1f}s"
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h {minutes}m {secs}s"
    return f"{minutes}m {secs}s" if minutes else f"{secs}s"
