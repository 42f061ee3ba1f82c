"""The Dagster UI as a researcher reads it after `run-sweep`: headless Chromium (over the DevTools protocol) opens
the asset graph, one `sae` partition's materialisation, the `sae` checks with their per-partition history, the
ranged training run's log and the sweep report, and finds on screen what the instance recorded: partition keys,
metrics, check verdicts with their reasons, the report's sections and plots, numbers a reader can read. No page
logs an error."""

from __future__ import annotations

import json
import re
import struct
import subprocess
import sys
from pathlib import Path

import dagster as dg
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_START_TAG

from sae_pipeline.check_matrix import check_matrix
from sae_pipeline.defs.checks import SAE_CHECKS
from sae_pipeline.storage import Layout
from sae_pipeline_tests.webui import (
    CHROMIUM_MISSING,
    REPO,
    DevToolsPage,
    UIHome,
    checkout_env,
    chromium,
    find_chromium,
    graphql,
)

# before any fixture: the session-scoped materialised home would otherwise be built only to skip
pytestmark = pytest.mark.skipif(find_chromium() is None, reason=CHROMIUM_MISSING)

GRAPH_ASSETS = ["corpus", "activations", "sae", "features", "feature_labels", "sweep_analysis"]
SAE_METRICS = ["fvu", "dead_fraction", "l0"]
HISTORY_CHECK = "sae_dead_fraction"
DECIMAL = re.compile(r"(?<![\w.])\d+\.\d+")
# Errors the Dagster UI itself logs that are not about our pages: a substring of the message -> why it is allowed.
# Empty: Dagster 1.13.27 logs none on these pages (instance: the shipped dagster.yaml, telemetry off).
ALLOWED_ERRORS: dict[str, str] = {}


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory):
    browser = DevToolsPage(chromium(), tmp_path_factory.mktemp("chromium") / "profile")
    try:
        yield browser
    finally:
        browser.close()


@pytest.fixture(scope="module")
def instance(ui_home: UIHome):
    with dg.DagsterInstance.from_config(str(ui_home.home)) as opened:
        yield opened


def _lines(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip()]


def _value_after(text: str, label: str) -> str:
    """The first non-blank line after the line reading `label` (a metadata table row: label, then value)."""
    lines = _lines(text)
    return lines[lines.index(label) + 1]


def _metadata(page: DevToolsPage) -> dict[str, str]:
    """The metadata table on screen: label -> the value as shown (the row's last non-empty cell); the rows of
    tables inside a value (markdown rendered in place) are not rows of their own."""
    rows = page.evaluate("""[...document.querySelectorAll('tr')].filter(r => !r.parentElement.closest('td'))
                            .map(r => [...r.cells].map(c => c.innerText.trim())).filter(cells => cells.length >= 2)""")
    return {cells[0]: next(cell for cell in reversed(cells) if cell) for cells in rows if any(cells[1:])}


def _raw_floats(text: str) -> list[str]:
    """Decimals shown with more than 6 significant digits (0.061197916666666664, 280.32290581000007): numbers as
    a reader should never have to parse them."""
    return [number for number in DECIMAL.findall(text) if len(number.replace(".", "").lstrip("0")) > 6]


def _no_console_errors(page: DevToolsPage) -> None:
    errors = [error for error in page.errors() if not any(allowed in error for allowed in ALLOWED_ERRORS)]
    assert not errors, errors


def _dismiss_community_dialog(page: DevToolsPage) -> None:
    """The first visit shows Dagster's "Join the Dagster community" dialog; Skip closes it (stored locally)."""
    page.evaluate("""[...document.querySelectorAll('[role=dialog] button')]
                     .filter(b => b.innerText.trim() === 'Skip').forEach(b => b.click())""")
    page.wait_for(lambda text: "Join the Dagster community" not in text, "the community dialog closed", timeout=10)


def _png_size(png: bytes) -> tuple[int, int]:
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR", png[:16]
    return struct.unpack(">II", png[16:24])


def test_console_errors_are_caught(page: DevToolsPage, ui_home: UIHome) -> None:
    """The collector itself: a console.error and an uncaught exception in a Dagster page are both reported."""
    page.open(ui_home.url("/assets"), lambda text: "sweep_analysis" in text, "the asset catalog")
    _no_console_errors(page)
    page.evaluate("console.error('probe: console.error'); setTimeout(() => { throw new Error('probe: thrown'); })")
    page.wait_for(lambda _: len(page.errors()) >= 2, "both probes reported", timeout=10)
    assert any("probe: console.error" in e for e in page.errors()) and any("probe: thrown" in e for e in page.errors())
    page.events.clear()


def test_asset_graph_shows_every_asset(page: DevToolsPage, ui_home: UIHome) -> None:
    nodes = graphql(ui_home.port, "{ assetNodes { assetKey { path } groupName } }")["data"]["assetNodes"]
    groups = sorted({node["groupName"] for node in nodes if node["assetKey"]["path"][0] in GRAPH_ASSETS})
    # groups start collapsed to one box each; `expanded` opens them (Dagster's own query parameter)
    expanded = ",".join(f"global@global:{group}" for group in groups)
    nodes = "[...document.querySelectorAll('svg foreignObject')].map(e => e.textContent.trim())"  # graph boxes
    page.open(ui_home.url(f"/asset-groups?expanded={expanded}"),
              lambda _: set(GRAPH_ASSETS) <= set(page.evaluate(nodes)), f"asset nodes {GRAPH_ASSETS} in the graph")
    assert set(groups) <= set(page.evaluate(nodes))  # each inside its group's outline
    _no_console_errors(page)


def test_sae_partition_shows_its_materialisation(page: DevToolsPage, ui_home: UIHome, instance,
                                                 tmp_path: Path) -> None:
    key = ui_home.keys[0]
    (record,) = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("sae"), asset_partitions=[key]), limit=1).records
    metadata = {name: value.value for name, value in record.asset_materialization.metadata.items()}
    # the Partitions tab shows the selected partition; the Overview tab's "latest" is the latest of any partition
    text = page.open(ui_home.url(f"/assets/sae?view=partitions&partition={key}"),
                     lambda text: "Latest materialization" in text and "weights_dir" in text,
                     f"the materialisation of partition {key}")
    assert key in _lines(text) and "Materialized" in _lines(text)
    assert record.run_id[:8] in _lines(text) and "train_sweep" in text
    shown = _metadata(page)
    for name in SAE_METRICS:
        assert float(shown[name]) == pytest.approx(metadata[name]), (name, shown)
    assert shown["weights_dir"].endswith(key)
    assert shown["wall_time"] == metadata["wall_time"]  # a duration, e.g. 1.7s
    assert not _raw_floats(text)
    _no_console_errors(page)

    _dismiss_community_dialog(page)
    png = page.screenshot()
    (tmp_path / "sae_partition.png").write_bytes(png)
    assert _png_size(png) == (1600, 1000) and 20_000 < len(png) < 10_000_000, len(png)


def test_check_history_names_each_partition_and_its_reason(page: DevToolsPage, ui_home: UIHome, instance) -> None:
    check_key = dg.AssetCheckKey(dg.AssetKey("sae"), HISTORY_CHECK)
    records = instance.event_log_storage.get_asset_check_execution_history(check_key, limit=20)
    recorded = {}
    for entry in records:
        evaluation = entry.event.dagster_event.event_specific_data
        recorded.setdefault(evaluation.partition, ("Passed" if evaluation.passed else "Failed",
                                                   evaluation.description))
    assert set(recorded) == set(ui_home.keys), recorded

    text = page.open(ui_home.url(f"/assets/sae?view=checks&checkDetail={HISTORY_CHECK}"),
                     lambda text: "Latest execution" in text and "Partition" in _lines(text),
                     f"{HISTORY_CHECK}'s latest execution")
    latest = _value_after(text, "Partition")
    assert latest in recorded, (latest, recorded)
    text = page.wait_for(lambda text: recorded[latest][1] in text, f"the reason of {latest}'s latest verdict")
    assert not _raw_floats(text)  # the check's metadata reads rounded

    page.click("[role=tab]", "Execution history")
    page.wait_for(lambda text: all(key in text for key in ui_home.keys), "every partition in the history")
    rows = page.evaluate("""[...document.querySelectorAll('table')].filter(t => t.innerText.includes('Partition'))
        .flatMap(t => [...t.querySelectorAll('tbody tr')].map(r => [...r.cells].map(c => c.innerText.trim())))""")
    shown = {row[3]: (row[0], row[4]) for row in rows if len(row) >= 5}
    # result, timestamp, target materialisation, partition, description, metadata
    assert shown == recorded, rows
    for result, reason in shown.values():  # the reason names the measurement and the verdict behind the result
        verdict = re.fullmatch(r"dead fraction \S+ \(warn > \S+, error > \S+\): (ok|WARN|ERROR)", reason)
        assert verdict and (verdict[1] == "ok") == (result == "Passed"), (result, reason)
    _no_console_errors(page)


def test_ranged_run_log_names_the_partition_of_each_check(page: DevToolsPage, ui_home: UIHome, instance) -> None:
    """One `sae` run trained both configs; its event log shows each check evaluation's partition and verdict."""
    (run,) = [run for run in instance.get_runs(filters=dg.RunsFilter(
        job_name="train_sweep", tags={ASSET_PARTITION_RANGE_START_TAG: ui_home.keys[0]}))
              if run.asset_selection == {dg.AssetKey("sae")}]
    recorded = {}
    for spec in SAE_CHECKS:
        for entry in instance.event_log_storage.get_asset_check_execution_history(spec.key, limit=20):
            if entry.run_id == run.run_id:
                evaluation = entry.event.dagster_event.event_specific_data
                recorded[spec.name, evaluation.partition] = "succeeded" if evaluation.passed else "failed"
    assert len(recorded) == len(SAE_CHECKS) * len(ui_home.keys), recorded
    page.open(ui_home.url(f"/runs/{run.run_id}"),
              lambda text: text.count("ASSET_CHECK_EVALUATION") >= len(SAE_CHECKS), "the run's check evaluations")
    rows = page.evaluate("""[...document.querySelectorAll('[data-index]')].map(r => r.innerText)
                            .filter(t => t.includes('ASSET_CHECK_EVALUATION'))""")
    shown = {}
    for row in rows:  # the log is virtualised: what is rendered, in order, the first partition's checks first
        name, result = re.search(r"Check (\S+) (succeeded|failed) for materialization of sae", row).groups()
        lines = _lines(row)
        assert "partition" in lines, row
        shown[name, lines[lines.index("partition") + 1]] = result
        assert not _raw_floats(row), row
    assert shown.items() <= recorded.items(), (shown, recorded)
    assert {(spec.name, ui_home.keys[0]) for spec in SAE_CHECKS} <= set(shown), shown
    _no_console_errors(page)


def test_sweep_report_shows_its_sections_and_plots(page: DevToolsPage, ui_home: UIHome) -> None:
    report = (ui_home.root / "sweep_analysis" / "report.md").read_text()
    headings = [line.lstrip("#").strip() for line in report.splitlines() if re.match(r"#{1,3} ", line)]
    n_plots = report.count("![")
    assert {"Summary statistics", "Best configurations", "Pareto front (L0 vs FVU)", "Recommendations"} <= set(
        headings), headings
    rendered = "[...document.querySelectorAll('td h1, td h2, td h3')].map(h => h.innerText.trim())"
    text = page.open(ui_home.url("/assets/sweep_analysis"),  # markdown values render a moment after the table
                     lambda text: "report_path" in text and len(page.evaluate(rendered)) >= len(headings),
                     "sweep_analysis's latest materialisation, its report rendered")
    shown = _metadata(page)
    # the top configurations table is short enough to be shown inline: a header, then one row per config label
    labels = dict(check_matrix(Layout(ui_home.root), ui_home.keys).select("config", "key").iter_rows())
    table = _lines(shown["top_configs"])
    assert table[0].startswith("#\tconfig\t") and sorted(labels[row.split("\t")[1]] for row in table[1:]) == sorted(
        ui_home.keys), table
    assert shown["best_balanced"] in ui_home.keys and not _raw_floats(text)
    # the report is on the page itself, section by section: every heading rendered in place, in order, and
    # only the plots behind Dagster's "[Show Markdown]" (markdown over 1,000 characters)
    assert page.evaluate(rendered) == headings
    # every table and paragraph fits its metadata value's column, and the column fits the 1600 px window
    overflow = page.evaluate("""[...document.querySelectorAll('td table, td p, td li')].map(e => {
        const box = e.getBoundingClientRect(), column = e.parentElement.closest('td').getBoundingClientRect();
        return [e.tagName, e.innerText.slice(0, 60), Math.round(box.right - column.right),
                Math.round(column.right - window.innerWidth), e.scrollWidth - e.clientWidth];
    }).filter(([tag, text, past, outside, hidden]) => past > 1 || outside > 1 || hidden > 1)""")
    assert not overflow, overflow
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    plots = [label for label, value in shown.items() if label.endswith(" (plot)")]
    assert len(plots) == n_plots >= 3 and all(shown[label] == "[Show Markdown]" for label in plots), shown
    assert [label for label, value in shown.items() if value == "[Show Markdown]"] == plots
    page.evaluate(f"""[...document.querySelectorAll('tr')].find(r => r.cells.length && r.cells[0].innerText.trim()
                     === {plots[0]!r}).querySelector('a').click()""")
    dialog = "[...document.querySelectorAll('[role=dialog]')].find(d => d.querySelector('img'))"
    loaded = f"!!{dialog} && [...{dialog}.querySelectorAll('img')].every(i => i.complete)"
    page.wait_for(lambda _: page.evaluate(loaded), "the plot's dialog, its image loaded")
    (plot,) = page.evaluate(f"[...{dialog}.querySelectorAll('img')].map(i => [i.src.slice(0, 22), i.naturalWidth])")
    assert plot[0] == "data:image/png;base64," and plot[1] > 0
    _no_console_errors(page)


def test_job_page_and_timeline_list_the_cli_runs(page: DevToolsPage, ui_home: UIHome, instance) -> None:
    """`run-sweep` runs are runs of the code location: `train_sweep`'s Runs tab lists each of them, and the
    Overview timeline has a row for each job they ran."""
    from sae_pipeline.defs.runs import LOCATION_NAME

    runs = [run for run in instance.get_runs(filters=dg.RunsFilter(job_name="train_sweep"))
            if set(run.tags.values()) & set(ui_home.keys)]
    assert len(runs) == 3  # the ranged sae run, then features + feature_labels per partition
    text = page.open(ui_home.url(f"/locations/{LOCATION_NAME}/jobs/train_sweep/runs"),
                     lambda text: all(run.run_id[:8] in text for run in runs), "train_sweep's runs on its job page")
    assert "No runs found" not in text
    page.open(ui_home.url("/overview/activity/timeline"),
              lambda text: "train_sweep" in text and "analyze_sweep" in text, "a timeline row per job that ran")
    _no_console_errors(page)


def test_a_failed_run_says_why_and_what_to_do(page: DevToolsPage, ui_home: UIHome, instance) -> None:
    """A partition added in the UI ("Add partition") has no config: its run's page says so and names the
    command that registers one."""
    key = "topk_added_in_the_ui"
    instance.add_dynamic_partitions("sae_configs", [key])
    env = checkout_env(SAE_PIPELINE_ROOT=str(ui_home.root), DAGSTER_HOME=str(ui_home.home), SAE_PIPELINE_DEVICE="cpu")
    done = subprocess.run([str(Path(sys.executable).with_name("dagster")), "job", "execute", "-m",
                           "sae_pipeline.definitions", "-j", "train_sweep", "--tags",
                           json.dumps({"dagster/partition": key})], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0
    (run,) = instance.get_runs(filters=dg.RunsFilter(job_name="train_sweep", tags={"dagster/partition": key}))
    assert run.status == dg.DagsterRunStatus.FAILURE
    text = page.open(ui_home.url(f"/runs/{run.run_id}"), lambda text: "sae-pipeline register-sweep" in text,
                     "the failed step's reason on the run page")
    assert key in text and "Failure" in text
    _no_console_errors(page)

