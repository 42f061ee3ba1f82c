"""Which config failed which check, at a glance: one row per partition (a short label and its key), one column
per check of `sae` and `features` (`checks.CHECKS`), each cell the verdict that step stored in its quality.json
(✓, WARN or ERROR) with the measured value; rows with a failure first. It reads the stored verdicts, the same
outcomes the Dagster check evaluations recorded, and recomputes nothing."""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from sae_pipeline.checks import CHECKS, Check
from sae_pipeline.config import ConfigError, SAEConfig
from sae_pipeline.markdown import format_cell, markdown_table
from sae_pipeline.quality import VERDICT_FILE
from sae_pipeline.registry import load_config
from sae_pipeline.saes import architecture_class
from sae_pipeline.storage import Layout, read_json

MATRIX_CHECKS: tuple[Check, ...] = tuple(check for check in CHECKS if check.asset in ("sae", "features"))
NOT_RUN = "–"
"""A cell whose step has not stored a verdict for the partition (not run yet, or it failed before its checks)."""
NOT_APPLICABLE = "n/a"
"""A cell of a check that does not apply to the config (`applicable: false` in its metadata: no target_l0 set,
an L0 trend of an architecture that does not steer L0 with l1_alpha)."""
VALUE_DIGITS = 4
UI_COLUMNS = 7
"""Most columns of a table shown in Dagster's metadata column (issue 28: wider ones clip at a 1600 px window)."""


def config_label(cfg: SAEConfig) -> str:
    """A short label for a config, e.g. `topk k16 x4 lr4e-3` or `relu l1a2 x4 lr1e-3`, with its hook when set."""
    field = architecture_class(cfg.architecture).sparsity_field
    short = {"k": "k", "l1_alpha": "l1a"}.get(field, field)
    lr = f"{cfg.lr:.0e}".replace("e-0", "e-")
    parts = [cfg.architecture, f"{short}{getattr(cfg, field):g}", f"x{cfg.expansion_factor:g}", f"lr{lr}"]
    return " ".join(parts + ([cfg.hook] if cfg.hook else []))


def stored_verdicts(layout: Layout, key: str) -> dict[str, dict]:
    """The check outcomes `sae` and `features` stored for a partition, by check name (absent: not stored)."""
    found: dict[str, dict] = {}
    for folder in (layout.sae_dir(key), layout.features_dir(key)):
        path = layout.pull(folder, VERDICT_FILE) / VERDICT_FILE
        if path.exists():
            found.update(read_json(path)["checks"])
    return found


def cell(check: Check, stored: dict | None) -> str:
    """`✓ 0.2103`, `WARN 0.2103` or `ERROR 0.95`: the stored verdict and the check's measured value."""
    if stored is None:
        return NOT_RUN
    if stored["metadata"].get("applicable") is False:
        return NOT_APPLICABLE
    verdict = "✓" if stored["passed"] else stored["severity"]
    value = stored["metadata"].get(check.shown)
    return verdict if value is None else f"{verdict} {format_cell(value, VALUE_DIGITS)}"


def _rank(cells: Sequence[str]) -> int:
    """0 for a row with an ERROR, 1 with a WARN, 2 otherwise: the order rows are shown in."""
    verdicts = {text.split(" ")[0] for text in cells}
    return 0 if "ERROR" in verdicts else 1 if "WARN" in verdicts else 2


def _labels(layout: Layout, keys: Sequence[str]) -> dict[str, str]:
    """Each key's short label; the key itself where its config is not registered or two labels collide."""
    labels = {}
    for key in keys:
        try:
            labels[key] = config_label(load_config(layout, key))
        except ConfigError:
            labels[key] = key
    taken = list(labels.values())
    return {key: label if taken.count(label) == 1 else key for key, label in labels.items()}


def check_matrix(layout: Layout, keys: Sequence[str]) -> pl.DataFrame:
    """The matrix as a table: `config` (short label), `key`, then one column per check in MATRIX_CHECKS; rows
    with an ERROR first, then with a WARN, then the rest, each group by key."""
    labels = _labels(layout, keys)
    rows = []
    for key in keys:
        verdicts = stored_verdicts(layout, key)
        rows.append([labels[key], key, *(cell(check, verdicts.get(check.name)) for check in MATRIX_CHECKS)])
    rows.sort(key=lambda row: (_rank(row[2:]), row[1]))
    columns = ["config", "key", *(check.name for check in MATRIX_CHECKS)]
    return pl.DataFrame(rows, schema=dict.fromkeys(columns, pl.String), orient="row")


def _legend(n_keys: int) -> str:
    return (f"**Checks per config** ({n_keys}): ✓ passed, WARN or ERROR, each with the measured value; "
            f"{NOT_APPLICABLE} does not apply; {NOT_RUN} not run. Failed rows first.")


def check_matrix_markdown(layout: Layout, keys: Sequence[str]) -> str:
    """The matrix as markdown, under a one-line legend (what `run-sweep` prints and report.md opens with)."""
    return matrix_markdown(check_matrix(layout, keys))


def matrix_markdown(matrix: pl.DataFrame) -> str:
    """`check_matrix`'s table as markdown, under its legend."""
    if not matrix.height:
        return _legend(0) + "\n\nNo registered configuration."
    return _legend(matrix.height) + "\n\n" + markdown_table(matrix)


def matrix_ui_markdown(matrix: pl.DataFrame) -> str:
    """The matrix for the UI, every table at most UI_COLUMNS wide: the checks split evenly into tables of at
    most UI_COLUMNS - 1, each led by the config label (rows in the matrix's order, failed first; a check's name
    with spaces, so that its header wraps), then a table of each label's key."""
    if not matrix.height:
        return _legend(0) + "\n\nNo registered configuration."
    checks = matrix.columns[2:]
    n_tables = -(-len(checks) // (UI_COLUMNS - 1))
    size = -(-len(checks) // n_tables)
    tables = [markdown_table(matrix.select("config", *part).rename({name: name.replace("_", " ") for name in part}))
              for part in (checks[start:start + size] for start in range(0, len(checks), size))]
    keyed = matrix.select("config", pl.format("`{}`", "key").alias("key"))
    return "\n\n".join([_legend(matrix.height), *tables, markdown_table(keyed)])


def worst_verdicts(matrix: pl.DataFrame) -> dict[str, str]:
    """Each key's worst verdict in the matrix: ERROR, WARN, ✓, or NOT_RUN when none is stored."""
    found = {}
    for row in matrix.iter_rows():
        cells = [c for c in row[2:] if c not in (NOT_RUN, NOT_APPLICABLE)]
        found[row[1]] = NOT_RUN if not cells else ("ERROR", "WARN", "✓")[_rank(cells)]
    return found
