"""The sweep report's real-task sections and the probing plot, on runs whose figures are planted."""

import polars as pl

from sae_pipeline.analysis import ReportView, build_sweep_report
from sae_pipeline.task_report import PROBING_PLOT_NAME, PROBING_TOP_N, probing_rows, task_sections


def _runs(n: int) -> pl.DataFrame:
    rows = []
    for i in range(n):
        row = {"key": f"topk_exp4_k{8 + i}", "architecture": "topk", "k": 8 + i, "l0": float(8 + i),
               "fvu": 0.3 - 0.01 * i, "dead_fraction": 0.0, "absorption_rate": (i * 7 % n) / n,
               "absorption_fraction": 0.1, "split_latents": 0.5, "probe_acc_dense": 0.9, "failed_checks": []}
        row |= {f"probe_acc_k{k}": 0.5 + 0.01 * i + 0.001 * k for k in (1, 2, 5, 10, 20)}
        row |= {f"probe_acc_random_k{k}": 0.5 for k in (1, 2, 5, 10, 20)}
        row |= {f"probe_acc_k5_{family}": 0.6 + 0.01 * i for family in ("first_letter", "package", "doctest")}
        row |= {f"probe_acc_dense_{family}": 0.9 for family in ("first_letter", "package", "doctest")}
        rows.append(row)
    return pl.DataFrame(rows)


def _table_rows(text: str, heading: str) -> list[list[str]]:
    """The body rows of the first table under `heading`."""
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    table = section.split("\n| ", 1)[1].split("\n\n", 1)[0]
    lines = [line for line in ("| " + table).splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[1:]]


def test_sections_rank_configs_by_their_figures(tmp_path) -> None:
    runs = _runs(7)
    report = build_sweep_report(runs, tmp_path, ui=ReportView(compact=True))
    text = report.report_path.read_text()
    absorption = _table_rows(text, "## First-letter absorption")
    expected = sorted(runs.iter_rows(named=True), key=lambda r: (r["absorption_rate"], r["key"]))
    assert [row[0] for row in absorption] == [f"`{r['key']}`" for r in expected]
    probing = _table_rows(text, "## k-sparse probing")
    by_mean = sorted(runs.iter_rows(named=True), key=lambda r: -sum(r[f"probe_acc_k{k}"] for k in (1, 2, 5, 10, 20)))
    assert [row[0] for row in probing] == [f"`{r['key']}`" for r in by_mean]
    assert "Ceiling, a probe on every dimension of the raw activations: 0.9." in text
    families = text.split("At k=5 by task family (ceilings: first letter 0.9, package 0.9, doctest 0.9):", 1)[1]
    assert families.split("\n|", 2)[1].startswith(" config | first letter | package | doctest |")
    assert (tmp_path / PROBING_PLOT_NAME).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"]({PROBING_PLOT_NAME})" in text and f"]({PROBING_PLOT_NAME})" in report.ui_markdown
    for line in report.ui_markdown.splitlines():
        if line.startswith("| "):
            assert line.count("|") - 1 <= 7, line
    assert [r["key"] for r in probing_rows(runs)][:PROBING_TOP_N] == [r["key"] for r in by_mean][:PROBING_TOP_N]


def test_runs_without_figures_say_so(tmp_path) -> None:
    runs = _runs(2).drop("absorption_rate", "probe_acc_k1")
    text = task_sections(runs, str, None)
    assert "No finished config has absorption figures" in text
    assert "No finished config has probing figures" in text
    report = build_sweep_report(runs, tmp_path)
    assert report.probing_plot_path is None and not (tmp_path / PROBING_PLOT_NAME).exists()
