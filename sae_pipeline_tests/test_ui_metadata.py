"""What the Dagster UI shows of one trained partition: column schemas that match the written tables, the sweep
report whole with its plots, reader-rounded numbers, distinct dashboard titles, and empty states that say what
to run."""

from __future__ import annotations

import base64
import re

import dagster as dg
import polars as pl
import pytest

from sae_pipeline.analysis import COUNTS_NOTE
from sae_pipeline.check_matrix import UI_COLUMNS, check_matrix_markdown
from sae_pipeline.defs.assets import DASHBOARD_DIR, calibration, feature_labels, features, sae, sweep_analysis
from sae_pipeline.defs.partitions import sae_configs
from sae_pipeline.features import EXAMPLES_FILE, FEATURES_FILE
from sae_pipeline.labelling import LABELS_FILE
from sae_pipeline.markdown import INLINE_MARKDOWN_CHARS, round_significant
from sae_pipeline.storage import CORPUS_FILE
from sae_pipeline_tests.conftest import ALL_ASSETS, Pipeline, tiny_topk


def _metadata(result: dg.ExecuteInProcessResult, node: str) -> dict:
    (event,) = result.asset_materializations_for_node(node)
    return {name: value.value for name, value in event.metadata.items()}


def _columns(schema: dg.TableSchema) -> dict[str, str]:
    return {column.name: column.type for column in schema.columns}


def _title(html: str) -> str:
    return re.search(r"<title>(.*?)</title>", html).group(1)


@pytest.fixture(scope="module")
def labelled(pipeline: Pipeline) -> tuple[str, dg.ExecuteInProcessResult]:
    key = pipeline.register(tiny_topk(k=7))
    result = pipeline.materialize([sae, features, feature_labels], partition_key=key)
    assert result.success
    return key, result


def test_parquet_assets_carry_the_written_tables_schema(pipeline: Pipeline, labelled) -> None:
    key, result = labelled
    corpus_event = pipeline.instance.get_latest_materialization_event(dg.AssetKey("corpus"))
    written = {
        "corpus": (corpus_event.asset_materialization.metadata, pipeline.layout.corpus_dir / CORPUS_FILE),
        "features": (result.asset_materializations_for_node("features")[0].metadata,
                     pipeline.layout.features_dir(key) / FEATURES_FILE),
        "feature_labels": (result.asset_materializations_for_node("feature_labels")[0].metadata,
                           pipeline.layout.labels_dir(key) / LABELS_FILE),
    }
    for asset, (metadata, path) in written.items():
        schema = metadata["dagster/column_schema"].value
        assert _columns(schema) == {name: str(dtype) for name, dtype in pl.read_parquet_schema(path).items()}, asset
        assert all(column.description for column in schema.columns), asset  # every column is explained
    examples = result.asset_materializations_for_node("features")[0].metadata["examples_column_schema"].value
    assert _columns(examples) == {name: str(dtype) for name, dtype in pl.read_parquet_schema(
        pipeline.layout.features_dir(key) / EXAMPLES_FILE).items()}


def test_labels_metadata_is_rounded_and_the_two_dashboards_have_their_own_titles(pipeline: Pipeline,
                                                                                 labelled) -> None:
    key, result = labelled
    labels = pl.read_parquet(pipeline.layout.labels_dir(key) / LABELS_FILE)
    scored = labels.filter(pl.col("detection_accuracy").is_not_null())
    meta = _metadata(result, "feature_labels")
    assert meta["mean_detection_accuracy"] == round_significant(float(scored["detection_accuracy"].mean()))
    titles = {_title((folder / DASHBOARD_DIR / "index.html").read_text())
              for folder in (pipeline.layout.features_dir(key), pipeline.layout.labels_dir(key))}
    assert titles == {f"features {key}", f"labelled features {key}"}


def test_sweep_analysis_shows_the_whole_report_with_its_plots(pipeline: Pipeline, labelled) -> None:
    key, _ = labelled
    result = pipeline.materialize([sweep_analysis])
    assert result.success
    metadata = _metadata(result, "sweep_analysis")
    numbered = sorted((int(label.split(":")[0].removeprefix("report ")), label) for label in metadata
                      if re.match(r"report \d+: ", label))
    assert [number for number, _ in numbered] == list(range(1, len(numbered) + 1))
    pieces = {label: metadata[label] for _, label in numbered}
    report = "".join(pieces.values())
    for label, piece in pieces.items():  # text in place on the asset page, each plot behind its own link
        assert len(piece) < INLINE_MARKDOWN_CHARS or label.endswith(" (plot)"), (label, len(piece))
        assert label.endswith(" (plot)") == piece.startswith("![")
    folder = pipeline.layout.analysis_dir
    on_disk = (folder / "report.md").read_text()
    for heading in re.findall(r"^#+ .+$", on_disk, flags=re.M):
        assert heading in report
    assert f"`{key}`" in report and "- Training wall time: " in report
    matrix = check_matrix_markdown(pipeline.layout, pipeline.instance.get_dynamic_partitions(sae_configs.name))
    assert metadata[numbered[0][1]].startswith("# Sweep report: sae_configs\n\n" + matrix.split("\n")[0])
    assert on_disk.startswith(f"# Sweep report: sae_configs\n\n{matrix}\n")  # the matrix opens the report
    embedded = re.findall(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", report)
    linked = re.findall(r"\]\(([\w.]+\.png)\)", on_disk)
    assert linked and [base64.b64decode(data) for data in embedded] == [(folder / n).read_bytes() for n in linked]
    shown = re.sub(r"\(data:image/png;base64,[^)]+\)", "(x)", report).splitlines()
    expected = re.sub(r"\([\w.]+\.png\)", "(x)", on_disk).splitlines()
    position = 0
    for line in expected:  # every line of the report but its tables, in order...
        if not line.startswith("|"):
            assert line in shown[position:], f"missing or out of order: {line!r}"
            position = shown.index(line, position) + 1
    # ...its tables narrowed to at most 7 columns (report.md keeps the wide ones), each key in the key table...
    assert max(line.count("|") - 1 for line in shown if line.startswith("|")) <= UI_COLUMNS
    assert all(f"| `{k}` |" in report for k in pipeline.instance.get_dynamic_partitions(sae_configs.name))
    # ...and nothing more than tables, blank lines and the note on what the summary table leaves out
    added = [line for line in shown if line not in expected or shown.count(line) > expected.count(line)]
    assert all(line in ("", COUNTS_NOTE) or line.startswith("|") for line in added), added


def test_an_empty_calibration_says_how_to_get_a_config(pipeline: Pipeline) -> None:
    result = dg.materialize([*ALL_ASSETS, calibration], selection=[calibration], instance=pipeline.instance,
                            resources=pipeline.resources())
    assert result.success
    said = _metadata(result, "calibration")["fitted_points"]
    assert "`architecture: relu`" in said and "`target_l0`" in said
    assert "sae-pipeline calibrate data/sweeps/calibration_demo.yaml" in said
    assert str(pipeline.root / "sweeps") in said  # where it looked
    assert said in (pipeline.layout.calibration_dir / "report.md").read_text()
