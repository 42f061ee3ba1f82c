"""The check matrix: every partition against every `sae` and `features` check, read from the stored verdicts."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from sae_pipeline.check_matrix import (
    MATRIX_CHECKS,
    NOT_APPLICABLE,
    NOT_RUN,
    UI_COLUMNS,
    check_matrix,
    check_matrix_markdown,
    matrix_ui_markdown,
    worst_verdicts,
)
from sae_pipeline.checks import checks_of
from sae_pipeline.config import SAEConfig
from sae_pipeline.defs.checks import SAE_CHECKS
from sae_pipeline.quality import CheckOutcome, write_verdict
from sae_pipeline.registry import store_configs
from sae_pipeline.storage import Layout
from sae_pipeline_tests.webui import RUN_SWEEP_OUTPUT


def _outcomes(asset: str, failing: dict[str, tuple[str, float]]) -> list[CheckOutcome]:
    """Every check of `asset` passing with value 0.5, but `failing`: name -> (severity, value)."""
    outcomes = []
    for check in checks_of(asset):
        severity, value = failing.get(check.name, ("WARN", 0.5))
        outcomes.append(CheckOutcome(check.name, check.name not in failing, severity, "planted",
                                     {check.shown: value, "other": 7}))
    return outcomes


@pytest.fixture
def sweep(tmp_path: Path) -> tuple[Layout, list[str]]:
    """Four registered configs: one with an sae ERROR, one with a features WARN, one passing, one whose
    features were never extracted."""
    layout = Layout(tmp_path)
    configs = [SAEConfig(architecture="topk", k=k, lr=4e-3) for k in (8, 16, 32)]
    configs.append(SAEConfig(architecture="relu", l1_alpha=2.0, expansion_factor=8))
    keys = store_configs(layout, configs)
    failures = {keys[0]: ({"sae_dead_fraction": ("ERROR", 0.95)}, {}),
                keys[1]: ({}, {"features_not_near_zero": ("WARN", 0.3)}),
                keys[2]: ({}, {}), keys[3]: ({"sae_fvu": ("WARN", 0.61)}, None)}
    for key, (sae_failing, features_failing) in failures.items():
        for folder, asset, failing in ((layout.sae_dir(key), "sae", sae_failing),
                                       (layout.features_dir(key), "features", features_failing)):
            if failing is not None:
                folder.mkdir(parents=True)
                write_verdict(folder, _outcomes(asset, failing))
    return layout, keys


def test_each_cell_is_the_stored_verdict_with_its_value_and_failed_rows_come_first(sweep) -> None:
    layout, keys = sweep
    table = check_matrix(layout, list(reversed(keys)))
    assert table.columns == ["config", "key", *(check.name for check in MATRIX_CHECKS)]
    assert table["key"].to_list() == [keys[0], *sorted([keys[1], keys[3]]), keys[2]]  # ERROR, WARN (by key), ok
    rows = {row["key"]: row for row in table.iter_rows(named=True)}
    assert rows[keys[0]]["sae_dead_fraction"] == "ERROR 0.95"
    assert rows[keys[0]]["sae_fvu"] == "✓ 0.5"
    assert rows[keys[1]]["features_not_near_zero"] == "WARN 0.3"
    assert rows[keys[3]]["sae_fvu"] == "WARN 0.61"
    assert rows[keys[3]]["features_table_valid"] == NOT_RUN  # features never ran for it
    assert all(value == "✓ 0.5" for name, value in rows[keys[2]].items() if name not in ("config", "key"))
    assert [rows[key]["config"] for key in keys] == ["topk k8 x4 lr4e-3", "topk k16 x4 lr4e-3",
                                                     "topk k32 x4 lr4e-3", "relu l1a2 x8 lr3e-4"]


def test_a_check_that_does_not_apply_says_so_and_labels_that_collide_fall_back_to_the_key(tmp_path) -> None:
    layout = Layout(tmp_path)
    keys = store_configs(layout, [SAEConfig(architecture="topk", k=16, seed=seed) for seed in (0, 1)])
    folder = layout.sae_dir(keys[0])
    folder.mkdir(parents=True)
    write_verdict(folder, [CheckOutcome("sae_l0_in_target_band", True, "WARN", "no target",
                                        {"applicable": False, "l0_fraction": 0.01})])
    table = check_matrix(layout, keys)
    assert table["config"].to_list() == table["key"].to_list()  # same label, other seeds: the key tells them apart
    assert table.filter(key=keys[0])["sae_l0_in_target_band"].item() == NOT_APPLICABLE
    assert table.filter(key=keys[1])["sae_l0_in_target_band"].item() == NOT_RUN


def test_the_markdown_lists_every_partition_and_check(sweep) -> None:
    layout, keys = sweep
    text = check_matrix_markdown(layout, keys)
    lines = text.splitlines()
    assert lines[0].startswith("**Checks per config** (4)")
    header = lines[2].strip("|").split("|")
    assert [cell.strip() for cell in header] == ["config", "key", *(check.name for check in MATRIX_CHECKS)]
    assert len(lines) == 4 + len(keys)  # legend, blank, header, rule, one row per partition
    assert all(any(key in line for line in lines[4:]) for key in keys)


def test_run_sweep_ends_with_the_matrix_of_its_partitions(ui_home) -> None:
    printed = (ui_home.home.parent / RUN_SWEEP_OUTPUT).read_text()
    matrix = check_matrix_markdown(Layout(ui_home.root), ui_home.keys)
    assert printed.rstrip().endswith(matrix)
    assert all(f"| {key} |" in matrix for key in ui_home.keys)


def _tables(text: str) -> list[list[list[str]]]:
    """Each markdown table of `text` as rows of cells (header first, the rule line dropped)."""
    tables, current = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            if not set(line) <= set("|-"):
                current.append([cell.strip() for cell in line.strip("|").split("|")])
        elif current:
            tables.append(current)
            current = []
    return tables


def test_the_ui_matrix_splits_the_checks_into_tables_of_at_most_seven_columns_with_a_key_table(sweep) -> None:
    layout, keys = sweep
    matrix = check_matrix(layout, keys)
    *parts, key_table = _tables(matrix_ui_markdown(matrix))
    assert all(len(row) <= UI_COLUMNS for table in (*parts, key_table) for row in table)
    checks = [name for table in parts for name in table[0][1:]]
    assert checks == [check.name.replace("_", " ") for check in MATRIX_CHECKS]  # every check once, in order
    assert max(len(t[0]) for t in parts) - min(len(t[0]) for t in parts) <= 1  # split evenly
    for table in parts:  # each led by the label, rows in the matrix's order (failed first)
        assert [row[0] for row in table[1:]] == matrix["config"].to_list()
    cells = {(row[0], name): value for table in parts for row in table[1:]
             for name, value in zip(table[0][1:], row[1:], strict=True)}
    for row in matrix.iter_rows(named=True):
        assert all(cells[(row["config"], c.name.replace("_", " "))] == row[c.name] for c in MATRIX_CHECKS)
    assert key_table == [["config", "key"], *([label, f"`{key}`"] for label, key in matrix.select("config", "key")
                                               .iter_rows())]


def test_worst_verdicts_are_the_worst_cell_of_each_row(sweep) -> None:
    layout, keys = sweep
    verdicts = worst_verdicts(check_matrix(layout, keys))
    assert verdicts == {keys[0]: "ERROR", keys[1]: "WARN", keys[2]: "✓", keys[3]: "WARN"}
    assert worst_verdicts(check_matrix(layout, [*keys, *store_configs(layout, [SAEConfig(k=4)])]))[
        SAEConfig(k=4).partition_key()] == NOT_RUN


def test_sweep_analysis_metadata_opens_with_the_check_matrix_and_no_table_is_wider_than_seven(
        ui_home) -> None:
    with dg.DagsterInstance.from_config(str(ui_home.home)) as instance:
        (record,) = instance.fetch_materializations(dg.AssetKey("sweep_analysis"), limit=1).records
    metadata = record.asset_materialization.metadata
    markdown = [(label, value.value) for label, value in metadata.items()
                if isinstance(value, dg.MarkdownMetadataValue)]
    widths = [(label, line.count("|") - 1) for label, text in markdown for line in text.splitlines()
              if line.startswith("|")]
    assert widths and max(width for _, width in widths) <= UI_COLUMNS, widths
    first_label, first = markdown[0]
    assert list(metadata)[0] == first_label and "**Checks per config**" in first
    opening = "".join(text for _, text in markdown).split("- Registered configurations")[0]
    matrix = check_matrix(Layout(ui_home.root), ui_home.keys)
    assert all(f"| {label} |" in opening for label in matrix["config"])
    assert all(check.name.replace("_", " ") in opening for check in SAE_CHECKS)

