"""Markdown tables and reader-facing numbers for reports and Dagster metadata (no tabulate dependency)."""

from __future__ import annotations

import math
import re

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


INLINE_MARKDOWN_CHARS = 1000
"""Dagster 1.13 shows a markdown metadata value in place only when it is shorter than this; a longer one sits
behind a "[Show Markdown]" link."""
_HEADING = re.compile(r"^#{1,3} +(.+?)\s*$")
_IMAGE = re.compile(r"!\[[^\]]*\]\([^)]*\)")
_LIST_ITEM = re.compile(r"([-*]|\d+\.) ")


def report_pieces(text: str, limit: int = INLINE_MARKDOWN_CHARS) -> list[tuple[str, str]]:
    """`text` cut before each heading (levels 1-3, outside code fences), around each image, and, in a section
    of `limit` characters or more, between paragraphs, list items or table rows: (title, piece) in reading
    order. The pieces concatenate back to `text` but for what a cut inside a table or list adds: a blank line,
    and the table's header again. A piece's title is its section's heading, with " (plot)" on an image and
    " (cont.)" on a continuation. Shown as one metadata value per piece, a report's text fits in place
    (INLINE_MARKDOWN_CHARS) while an embedded plot, far longer, goes behind its own link."""
    sections: list[tuple[str, list[str]]] = [("", [])]
    fenced = False
    for line in text.splitlines(keepends=True):
        fenced ^= line.startswith("```")
        heading = None if fenced else _HEADING.match(line)
        if heading:
            sections.append((heading[1], []))
        sections[-1][1].append(line)
    pieces = []
    for title, lines in sections:
        body, start = "".join(lines), 0
        for image in _IMAGE.finditer(body):
            pieces += [*_paragraph_runs(title, body[start:image.start()], limit), (f"{title} (plot)", image[0])]
            start = image.end()
        pieces += _paragraph_runs(title, body[start:], limit)
    kept: list[tuple[str, str]] = []
    for title, piece in pieces:  # a blank stretch (between an image and the next heading) joins the piece before
        if kept and not piece.strip():
            kept[-1] = (kept[-1][0], kept[-1][1] + piece)
        elif piece:
            kept.append((title, piece))
    return kept


def _paragraph_runs(title: str, text: str, limit: int) -> list[tuple[str, str]]:
    """`text` as runs of whole paragraphs (cut after blank lines), each shorter than `limit` where its
    paragraphs allow, a longer table or list first cut between its rows or items (`_line_chunks`); the runs
    after the first are titled " (cont.)"."""
    if len(text) < limit:
        return [(title, text)]
    runs = [""]
    for paragraph in re.split(r"(?<=\n\n)", text):
        for part in _line_chunks(paragraph, limit):
            if runs[-1] and len(runs[-1]) + len(part) >= limit:
                runs.append("")
            runs[-1] += part
    return [(title if i == 0 else f"{title} (cont.)", run) for i, run in enumerate(runs)]


def _line_chunks(paragraph: str, limit: int) -> list[str]:
    """A paragraph of `limit` characters or more cut between lines: a markdown table between rows, each part
    under the table's header and rule lines; a list before an item; each part shorter than `limit` where a
    line allows. Prose stays whole."""
    lines = paragraph.splitlines(keepends=True)
    table = len(lines) >= 3 and all(line.startswith("|") for line in lines[:3])
    if len(paragraph) < limit or not (table or _LIST_ITEM.match(lines[0])):
        return [paragraph]
    header, rows = ("".join(lines[:2]), lines[2:]) if table else ("", lines)
    units: list[str] = []  # table rows, or list items with their continuation lines
    for row in rows:
        if table or _LIST_ITEM.match(row) or not units:
            units.append(row)
        else:
            units[-1] += row
    chunks = [header]
    for unit in units:
        if chunks[-1] != header and len(chunks[-1]) + len(unit) + 1 >= limit:  # + the "\n" a cut adds
            chunks.append(header)
        chunks[-1] += unit
    return [chunk if i == len(chunks) - 1 else chunk + "\n" for i, chunk in enumerate(chunks)]


def format_value(value: object) -> str:
    """4 significant digits for floats, NaN/inf spelled out, — for null."""
    if value is None:
        return "—"
    if isinstance(value, float):
        if math.isnan(value):
            return "NaN"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return f"{value:.4g}"
    return str(value)
