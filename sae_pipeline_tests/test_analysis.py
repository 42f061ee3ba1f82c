"""Sweep analysis against a planted sweep with answers computed independently (numpy, plain Python)."""

from __future__ import annotations

import base64
import math
import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from sae_pipeline.analysis import CURVES_TOP_N, ReportView, build_sweep_report, report_with_inline_plots
from sae_pipeline.markdown import format_duration, format_value, report_pieces, round_significant, rounded
from sae_pipeline.results import collect_runs
from sae_pipeline.storage import Layout, write_json_atomic, write_parquet_atomic
from sae_pipeline.sweep_plots import MAX_POINT_LABELS, l0_fvu_figure
from sae_pipeline.sweep_stats import (
    HYPERPARAMETERS,
    METRICS,
    balanced_scores,
    hyperparameter_effects,
    last_window_mean,
    pareto_front,
    trade_offs,
)

EXPANSIONS = (4, 8, 16)
KS = (8, 16, 32, 64)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def planted_rows() -> list[dict[str, object]]:
    """12 configs: fvu strictly decreasing in k, dead_fraction strictly increasing in expansion_factor.

    Jitter keeps the per-k fvu bands and per-expansion dead bands disjoint, but makes the L0/FVU trade-off
    irregular so the Pareto front is a proper subset.
    """
    rng = np.random.default_rng(7)
    rows = []
    for ef in EXPANSIONS:
        for k in KS:
            rows.append({
                "key": f"ef{ef}_k{k}",
                "architecture": "topk",
                "expansion_factor": ef,
                "k": k,
                "batch_size": 4096,
                "l0": k * (0.6 + 0.4 * rng.random()),
                "fvu": (2.0 / k) * (1.0 + 0.5 * rng.random()),
                "dead_fraction": 0.05 * ef + 0.001 * k + 0.01 * rng.random(),
            })
    return rows


@pytest.fixture
def planted() -> pl.DataFrame:
    return pl.DataFrame(planted_rows())


def brute_force_front(rows: list[dict[str, object]]) -> set[str]:
    def dominates(a: dict[str, object], b: dict[str, object]) -> bool:
        no_worse = a["l0"] <= b["l0"] and a["fvu"] <= b["fvu"]
        return no_worse and (a["l0"] < b["l0"] or a["fvu"] < b["fvu"])

    usable = [r for r in rows if math.isfinite(r["l0"]) and math.isfinite(r["fvu"])]
    return {b["key"] for b in usable if not any(dominates(a, b) for a in usable if a is not b)}


def expected_balanced(rows: list[dict[str, object]]) -> list[float]:
    """The documented formula for distinct finite values: (rank - 1) / (n - 1) per metric, averaged."""
    n = len(rows)
    parts = []
    for metric in ("dead_fraction", "fvu"):
        order = sorted(range(n), key=lambda i: rows[i][metric])
        rank = {i: position for position, i in enumerate(order)}
        parts.append([rank[i] / (n - 1) for i in range(n)])
    return [(a + b) / 2 for a, b in zip(*parts, strict=True)]


# --- last_window_mean ----------------------------------------------------------------------------------


def test_last_window_mean_averages_the_second_half_not_the_last_step() -> None:
    log = pl.DataFrame({"step": list(range(8)), "loss": [10.0, 8.0, 6.0, 4.0, 3.0, 2.5, 2.0, 1.0]})
    assert last_window_mean(log, "loss") == pytest.approx((3.0 + 2.5 + 2.0 + 1.0) / 4)
    assert last_window_mean(log, "loss") != log["loss"][-1]
    assert last_window_mean(log, "loss", fraction=0.25) == pytest.approx(1.5)
    assert last_window_mean(log, "loss", fraction=1.0) == pytest.approx(sum(log["loss"]) / 8)


def test_last_window_mean_rounds_the_window_up_and_rejects_bad_input() -> None:
    log = pl.DataFrame({"loss": [5.0, 4.0, 3.0, 2.0, 1.0]})
    assert last_window_mean(log, "loss") == pytest.approx((3.0 + 2.0 + 1.0) / 3)
    with pytest.raises(ValueError):
        last_window_mean(log, "loss", fraction=0.0)
    with pytest.raises(ValueError):
        last_window_mean(log.head(0), "loss")


# --- planted sweep -------------------------------------------------------------------------------------


def test_effects_recover_planted_structure(planted: pl.DataFrame) -> None:
    rows = planted_rows()
    fvu = hyperparameter_effects(planted, "fvu")
    dead = hyperparameter_effects(planted, "dead_fraction")
    # architecture and batch_size are constant: omitted
    assert set(fvu["hyperparameter"]) == {"expansion_factor", "k"}
    assert set(dead["hyperparameter"]) == {"expansion_factor", "k"}

    k_row = fvu.filter(pl.col("hyperparameter") == "k").row(0, named=True)
    expected_r = np.corrcoef([r["k"] for r in rows], [r["fvu"] for r in rows])[0, 1]
    assert k_row["correlation"] < 0
    assert k_row["correlation"] == pytest.approx(expected_r, abs=1e-9)
    assert (k_row["best_value"], k_row["worst_value"], k_row["n_values"]) == ("64", "8", 4)
    assert k_row["best_mean"] == pytest.approx(np.mean([r["fvu"] for r in rows if r["k"] == 64]), abs=1e-12)
    assert k_row["worst_mean"] == pytest.approx(np.mean([r["fvu"] for r in rows if r["k"] == 8]), abs=1e-12)

    ef_row = dead.filter(pl.col("hyperparameter") == "expansion_factor").row(0, named=True)
    expected_r = np.corrcoef([r["expansion_factor"] for r in rows], [r["dead_fraction"] for r in rows])[0, 1]
    assert ef_row["correlation"] > 0
    assert ef_row["correlation"] == pytest.approx(expected_r, abs=1e-9)
    assert (ef_row["best_value"], ef_row["worst_value"], ef_row["n_values"]) == ("4", "16", 3)


def test_pareto_front_matches_brute_force(planted: pl.DataFrame) -> None:
    rows = planted_rows()
    front = pareto_front(planted, "l0", "fvu")
    expected = brute_force_front(rows)
    assert set(front) == expected
    assert 1 < len(front) < len(rows)  # the planted sweep has a non-trivial front
    l0_by_key = {r["key"]: r["l0"] for r in rows}
    assert [l0_by_key[k] for k in front] == sorted(l0_by_key[k] for k in front)


def test_pareto_front_keeps_exact_duplicates_and_skips_non_finite() -> None:
    frame = pl.DataFrame({
        "key": ["a", "b", "c", "d", "e", "f"],
        "l0": [1.0, 1.0, 2.0, 2.0, 0.5, None],
        "fvu": [0.5, 0.5, 0.4, 0.45, float("nan"), 0.0],
    })
    rows = [r for r in frame.to_dicts() if r["l0"] is not None]
    assert pareto_front(frame, "l0", "fvu") == ["a", "b", "c"]
    assert set(pareto_front(frame, "l0", "fvu")) == brute_force_front(rows)


def test_balanced_scores_follow_the_documented_formula(planted: pl.DataFrame) -> None:
    rows = planted_rows()
    expected = expected_balanced(rows)
    assert balanced_scores(planted).to_list() == pytest.approx(expected, abs=1e-12)


def test_report_on_planted_sweep(planted: pl.DataFrame, tmp_path: Path) -> None:
    rows = planted_rows()
    out = tmp_path / "analysis"
    report = build_sweep_report(planted, out, sweep_name="planted", missing=["ef32_k8", "ef32_k16"])

    expected_scores = expected_balanced(rows)
    best = min(range(len(rows)), key=lambda i: (expected_scores[i], rows[i]["key"]))
    assert report.best_balanced == rows[best]["key"]
    assert report.n_configs == 12

    assert sorted(p.name for p in out.iterdir()) == ["hyperparameters.png", "l0_vs_fvu.png", "metrics.parquet",
                                                     "report.md"]  # no training logs given: no curves plot
    assert report.plot_path is not None and report.plot_path.read_bytes()[:8] == PNG_MAGIC
    table = pl.read_parquet(report.table_path)
    assert table.height == 12 and sorted(table["key"]) == sorted(r["key"] for r in rows)
    assert {"key", *HYPERPARAMETERS, *METRICS, "balanced_score", "on_pareto_front"} <= set(table.columns)
    assert set(table.filter(pl.col("on_pareto_front"))["key"]) == brute_force_front(rows)

    text = report.report_path.read_text()
    assert "# Sweep report: planted" in text
    assert "Registered configurations: 14" in text and "Completed: 12" in text
    assert "`ef32_k8`" in text and "`ef32_k16`" in text
    assert "![L0 vs FVU](l0_vs_fvu.png)" in text
    fvus = [r["fvu"] for r in rows]
    summary = f"| fvu | 12 | {np.mean(fvus):.4g} | {np.median(fvus):.4g} | {np.std(fvus, ddof=1):.4g} |"
    assert summary in text

    top_fvu = [r["key"] for r in sorted(rows, key=lambda r: r["fvu"])][:10]
    fvu_section = text.split("### Top 10: lowest FVU")[1].split("###")[0]
    listed = [line.split("`")[1] for line in fvu_section.splitlines() if "| `" in line]
    assert listed == top_fvu

    effects_section = text.split("## Hyperparameter effects")[1].split("## Best configurations")[0]
    assert "| k |" in effects_section and "architecture" not in effects_section
    assert f"`{rows[best]['key']}`" in report.top_markdown
    assert report.top_markdown.count("\n| ") == 5


def test_the_ui_view_narrows_every_table_to_seven_columns_and_names_configs_by_label(planted: pl.DataFrame,
                                                                                      tmp_path: Path) -> None:
    rows = planted_rows()
    labels = {r["key"]: f"cfg{i}" for i, r in enumerate(rows)}
    verdicts = {r["key"]: ("WARN" if i % 3 == 0 else "✓") for i, r in enumerate(rows)}
    ui = ReportView(compact=True, labels=labels, verdicts=verdicts, check_matrix="**Checks per config** (12)")
    full_only = build_sweep_report(planted, tmp_path / "full", sweep_name="planted")
    report = build_sweep_report(planted, tmp_path / "ui", sweep_name="planted", ui=ui)
    assert report.report_path.read_text() == full_only.report_path.read_text()  # report.md keeps every column
    text = report.ui_markdown
    widths = [line.count("|") - 1 for line in text.splitlines() if line.startswith("|")]
    assert max(widths) <= 7 < max(line.count("|") - 1 for line in report.report_path.read_text().splitlines()
                                  if line.startswith("|"))
    assert text.splitlines()[2] == "**Checks per config** (12)" and not any(f"`{r['key']}`" in line for r in rows
                                                                              for line in text.splitlines()
                                                                              if line.startswith("|"))
    fvu_section = text.split("### Top 10: lowest FVU")[1].split("###")[0]
    table = [line.strip("|").split("|") for line in fvu_section.splitlines() if line.startswith("|")]
    assert [c.strip() for c in table[0]] == ["#", "config", "fvu", "l0", "dead_fraction", "verdict"]
    by_fvu = sorted(rows, key=lambda r: r["fvu"])[:10]
    assert [(c[1].strip(), c[2].strip(), c[5].strip()) for c in table[2:]] == [
        (labels[r["key"]], format_value(r["fvu"]), verdicts[r["key"]]) for r in by_fvu]
    top = [line.strip("|").split("|") for line in report.top_markdown.splitlines()]
    assert [c.strip() for c in top[0]] == ["#", "config", "balanced_score", "l0", "fvu", "dead_fraction", "verdict"]
    assert top[2][1].strip() == labels[report.best_balanced]


def test_every_held_out_metric_is_a_report_column(tmp_path: Path) -> None:
    """cosine and l2_ratio (missing before the one metric list) are tabulated like the rest."""
    from sae_pipeline.evaluation import REPORTED_METRICS

    assert set(REPORTED_METRICS) <= set(METRICS) and {"cosine", "l2_ratio"} <= set(REPORTED_METRICS)
    runs = pl.DataFrame({"key": ["a", "b", "c"], "k": [8, 16, 32], "l0": [8.0, 16.0, 32.0], "fvu": [0.3, 0.2, 0.1],
                         "dead_fraction": [0.1, 0.05, 0.0], "cosine": [0.8, 0.9, 0.95], "l2_ratio": [0.7, 0.8, 0.9],
                         "downstream_recovered": [0.5, 0.7, 0.9], "downstream_kl": [0.3, 0.2, 0.1]})
    report = build_sweep_report(runs, tmp_path)
    text = report.report_path.read_text()
    assert "| downstream_recovered | 3 | 0.7 | 0.7 |" in text and "| downstream_kl | 3 | 0.2 | 0.2 |" in text
    assert f"| cosine | 3 | {np.mean([0.8, 0.9, 0.95]):.4g} | 0.9 |" in text
    assert f"| l2_ratio | 3 | {np.mean([0.7, 0.8, 0.9]):.4g} | 0.8 |" in text
    assert pl.read_parquet(report.table_path)["cosine"].to_list() == [0.8, 0.9, 0.95]


# --- edge cases ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("runs", [pl.DataFrame(), pl.DataFrame({"key": []}, schema={"key": pl.String})])
def test_zero_runs(runs: pl.DataFrame, tmp_path: Path) -> None:
    report = build_sweep_report(runs, tmp_path / "out", sweep_name="empty", missing=["a", "b"])
    assert (report.n_configs, report.best_balanced, report.plot_path) == (0, None, None)
    assert not (tmp_path / "out" / "l0_vs_fvu.png").exists()
    table = pl.read_parquet(report.table_path)
    assert table.height == 0
    assert {"key", *HYPERPARAMETERS, *METRICS, "balanced_score", "on_pareto_front"} <= set(table.columns)
    text = report.report_path.read_text()
    assert "No configuration has finished yet" in text
    assert "Registered configurations: 2" in text and "`a`, `b`" in text


def test_one_run(tmp_path: Path) -> None:
    runs = pl.DataFrame({"key": ["only"], "k": [32], "l0": [30.0], "fvu": [0.2], "dead_fraction": [0.1]})
    report = build_sweep_report(runs, tmp_path)
    assert report.best_balanced == "only" and report.n_configs == 1
    assert report.plot_path is not None and report.plot_path.read_bytes()[:8] == PNG_MAGIC
    assert pareto_front(runs, "l0", "fvu") == ["only"]
    assert hyperparameter_effects(runs, "fvu").height == 0
    assert "Only one configuration has finished" in report.report_path.read_text()


def test_non_finite_fvu_ranks_worst_without_crashing(planted: pl.DataFrame, tmp_path: Path) -> None:
    broken = planted.with_columns(
        pl.when(pl.col("key") == "ef4_k64").then(float("nan"))
        .when(pl.col("key") == "ef8_k64").then(float("inf"))
        .otherwise(pl.col("fvu")).alias("fvu")
    )
    assert not {"ef4_k64", "ef8_k64"} & set(pareto_front(broken, "l0", "fvu"))
    scores = dict(zip(broken["key"], balanced_scores(broken), strict=True))
    rows = broken.to_dicts()
    dead_rank = {r["key"]: i / 11 for i, r in enumerate(sorted(rows, key=lambda r: r["dead_fraction"]))}
    assert scores["ef4_k64"] == pytest.approx((dead_rank["ef4_k64"] + 1.0) / 2, abs=1e-12)
    # the finite fvu values are ranked among themselves: 10 values, ranks scaled by 9
    finite = sorted((r for r in rows if math.isfinite(r["fvu"])), key=lambda r: r["fvu"])
    first = finite[0]["key"]
    assert scores[first] == pytest.approx(dead_rank[first] / 2, abs=1e-12)

    k_row = hyperparameter_effects(broken, "fvu").filter(pl.col("hyperparameter") == "k").row(0, named=True)
    assert k_row["worst_value"] == "64" and math.isinf(k_row["worst_mean"])
    finite_pairs = [(r["k"], r["fvu"]) for r in rows if math.isfinite(r["fvu"])]
    expected_r = np.corrcoef(*zip(*finite_pairs, strict=True))[0, 1]
    assert k_row["correlation"] == pytest.approx(expected_r, abs=1e-9)

    report = build_sweep_report(broken, tmp_path)
    text = report.report_path.read_text()
    assert "Non-finite FVU (diverged; ranked worst): `ef4_k64`, `ef8_k64`" in text
    fvu_section = text.split("### Top 10: lowest FVU")[1].split("###")[0]
    assert "ef4_k64" not in fvu_section  # 10 finite values fill the top 10


def test_null_metrics_are_left_out_not_treated_as_best(tmp_path: Path) -> None:
    runs = pl.DataFrame({
        "key": ["a", "b", "c"],
        "k": [8, 16, 32],
        "l0": [8.0, 16.0, None],
        "fvu": [0.3, None, 0.1],
        "dead_fraction": [0.2, 0.1, None],
    })
    scores = balanced_scores(runs).to_list()
    # a: dead rank 1 of 2 -> 1, fvu rank 2 of 2 -> 1; b: dead 0, fvu null -> 1; c: dead null -> 1, fvu 0
    assert scores == pytest.approx([1.0, 0.5, 0.5])
    report = build_sweep_report(runs, tmp_path)
    assert report.best_balanced == "b"  # tie with c broken by key
    text = report.report_path.read_text()
    fvu_section = text.split("### Top 10: lowest FVU")[1].split("###")[0]
    assert "`b`" not in fvu_section and fvu_section.index("`c`") < fvu_section.index("`a`")


def test_categorical_hyperparameter_has_no_correlation() -> None:
    frame = pl.DataFrame({
        "key": ["r1", "r2", "t1", "t2"],
        "architecture": ["relu", "relu", "topk", "topk"],
        "fvu": [0.4, 0.6, 0.1, 0.2],
    })
    row = hyperparameter_effects(frame, "fvu").row(0, named=True)
    assert row["hyperparameter"] == "architecture" and row["correlation"] is None
    assert (row["best_value"], row["worst_value"]) == ("topk", "relu")
    assert (row["best_mean"], row["worst_mean"]) == pytest.approx((0.15, 0.5))


def test_duplicate_keys_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="duplicate"):
        build_sweep_report(pl.DataFrame({"key": ["a", "a"], "fvu": [0.1, 0.2]}), tmp_path)


# --- seed-004 form: L0 vs dead front, trade-offs, box plots, overlaid curves, last-window training metrics -


def brute_force_front_dead(rows: list[dict[str, object]]) -> set[str]:
    return brute_force_front([{**r, "fvu": r["dead_fraction"]} for r in rows])


def test_report_has_dead_front_trade_offs_and_plots(planted: pl.DataFrame, tmp_path: Path) -> None:
    rows = planted_rows()
    logs = {r["key"]: pl.DataFrame({"step": [0, 1, 2, 3], "tokens": [0, 10, 20, 30], "l0": [50.0, 40, 30, 20],
                                    "dead_fraction": [0.0, 0.1, 0.2, 0.3], "loss": [1.0, 0.5, 0.3, 0.2]})
            for r in rows}
    report = build_sweep_report(planted, tmp_path, sweep_name="planted", training_logs=logs)
    expected_dead_front = brute_force_front_dead(rows)
    assert set(report.pareto_dead) == expected_dead_front and 1 <= len(expected_dead_front) < len(rows)
    table = pl.read_parquet(report.table_path)
    assert set(table.filter(pl.col("on_pareto_front_dead"))["key"]) == expected_dead_front
    for path in (report.box_plot_path, report.curves_plot_path):
        assert path is not None and path.read_bytes()[:8] == PNG_MAGIC

    offs = {r["hyperparameter"]: r for r in trade_offs(table).iter_rows(named=True)}
    assert set(offs) == {"expansion_factor", "k"}
    assert offs["k"]["effect_on_fvu"] == "higher -> lower"  # planted: fvu = 2/k * jitter
    assert offs["k"]["effect_on_l0"] == "higher -> higher"  # planted: l0 = k * jitter
    assert offs["expansion_factor"]["effect_on_dead_fraction"] == "higher -> higher"
    k_balanced = {k: np.mean([s for r, s in zip(rows, expected_balanced(rows), strict=True) if r["k"] == k])
                  for k in KS}
    assert offs["k"]["recommended"] == str(min(k_balanced, key=k_balanced.get))

    text = report.report_path.read_text()
    dead_section = text.split("## Pareto front (L0 vs dead fraction)")[1].split("##")[0]
    assert {line.split("`")[1] for line in dead_section.splitlines() if "| `" in line} == expected_dead_front
    assert "## Trade-offs" in text and "![box plots](hyperparameters.png)" in text
    assert f"## Training curves of the top {CURVES_TOP_N} balanced configs" in text


def test_collect_runs_adds_last_window_training_metrics(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    l0 = [100.0, 80.0, 60.0, 40.0, 30.0, 10.0, 20.0]
    dead = [0.0, 0.0, 0.1, 0.2, 0.2, 0.4, 0.3]
    write_parquet_atomic(pl.DataFrame({"step": range(7), "l0": l0, "dead_fraction": dead, "loss": [1.0] * 7}),
                         layout.sae_dir("a") / "metrics.parquet")
    write_json_atomic(layout.sae_dir("a") / "summary.json", {
        "config": {"architecture": "topk", "k": 8}, "metrics": {"l0": 12.0, "fvu": 0.3}, "final_loss": 0.5,
        "downstream": {"kind": "causal_lm", "recovered": 0.8, "kl": 0.05, "clean": 3.1}})
    runs, missing = collect_runs(layout, ["a", "b"])
    assert missing == ["b"]
    row = runs.row(0, named=True)
    assert row["train_l0_last_window"] == pytest.approx(sum(l0[3:]) / 4)  # ceil(7 / 2) = 4 last rows
    assert row["train_dead_fraction_last_window"] == pytest.approx(sum(dead[3:]) / 4)
    assert row["l0"] == 12.0 and row["final_loss"] == 0.5
    assert (row["downstream_recovered"], row["downstream_kl"]) == (0.8, 0.05) and "downstream_clean" not in row


# --- runs whose blocking checks failed --------------------------------------------------------------------


def test_failed_runs_are_listed_and_left_out_of_every_ranking_statistic_and_correlation(tmp_path: Path) -> None:
    rows = planted_rows()
    best_fvu = min(rows, key=lambda r: r["fvu"])["key"]  # always on the L0-FVU front
    best_dead = min(rows, key=lambda r: r["dead_fraction"])["key"]  # always on the L0-dead front
    failed = {best_fvu: ["sae_not_collapsed: collapsed at step 40: live latents 0 (peak 512)"],
              best_dead: ["sae_dead_fraction: dead fraction 0.97 (warn > 0.1, error > 0.9): ERROR"]}
    runs = pl.DataFrame([{**r, "failed_checks": failed.get(r["key"], [])} for r in rows])
    report = build_sweep_report(runs, tmp_path, sweep_name="planted")

    passing = [r for r in rows if r["key"] not in failed]
    assert set(report.failed) == set(failed)
    table = pl.read_parquet(report.table_path)
    assert set(table.filter(pl.col("on_pareto_front"))["key"]) == brute_force_front(passing)
    assert set(report.pareto_dead) == brute_force_front_dead(passing)
    scores = expected_balanced(passing)
    best = min(range(len(passing)), key=lambda i: (scores[i], passing[i]["key"]))
    assert report.best_balanced == passing[best]["key"]
    assert table.filter(pl.col("key").is_in(list(failed)))["balanced_score"].null_count() == len(failed)

    text = report.report_path.read_text()
    why = text.split("## Failed blocking checks")[1].split("\n## ")[0]
    for key, reasons in failed.items():
        assert f"- `{key}`: {reasons[0]}" in why
    for heading in ("### Top 10: lowest dead_fraction", "### Top 10: lowest FVU"):
        section = text.split(heading)[1].split("###")[0]
        assert not any(f"`{key}`" in section for key in failed), section
    summary = text.split("## Summary statistics")[1].split("\n## ")[0]
    assert f"Over {len(passing)} runs that passed their blocking checks ({len(failed)} that failed" in summary
    fvu_row = next(line for line in summary.splitlines() if line.startswith("| fvu |")).split("|")
    assert fvu_row[2].strip() == str(len(passing))  # n finite: the failed runs are not counted
    assert float(fvu_row[6]) == pytest.approx(min(r["fvu"] for r in passing), rel=1e-3)  # min without best_fvu
    effects = hyperparameter_effects(runs.filter(pl.col("key").is_in([r["key"] for r in passing])), "fvu")
    effect_lines = text.split("### fvu (lower is better)")[1].split("###")[0]
    for row in effects.iter_rows(named=True):
        r = "—" if row["correlation"] is None else f"{row['correlation']:.4g}"
        assert f"| {row['hyperparameter']} | {r} |" in effect_lines
    balanced = text.split("### Top 10: balanced")[1].split("##")[0]
    later = text.split("## Pareto front (L0 vs FVU)")[1]  # both fronts, trade-offs, recommendations
    recommended = later.split("## Recommendations")[1].split("## Pareto front (L0 vs dead fraction)")[0]
    for key in failed:
        assert f"`{key}`" not in balanced
        assert f"`{key}`" not in later.replace(recommended, "")
        assert [line for line in recommended.splitlines() if f"`{key}`" in line] == [
            next(line for line in recommended.splitlines() if line.startswith("- Not considered"))]


def test_collect_runs_reads_each_partitions_verdicts(tmp_path: Path) -> None:
    layout = Layout(tmp_path)
    for key in ("ok", "collapsed"):
        write_json_atomic(layout.sae_dir(key) / "summary.json", {
            "config": {"architecture": "relu"}, "metrics": {"l0": 3.0, "fvu": 0.2}, "final_loss": 0.5})
    write_json_atomic(layout.sae_dir("collapsed") / "quality.json", {"blocked": True, "checks": {
        "sae_not_collapsed": {"passed": False, "severity": "ERROR", "description": "collapsed at step 40"},
        "sae_l0_trend": {"passed": False, "severity": "WARN", "description": "L0 rose"}}})
    runs, _ = collect_runs(layout, ["ok", "collapsed"])
    failed = dict(zip(runs["key"], runs["failed_checks"].to_list(), strict=True))
    assert failed == {"ok": [], "collapsed": ["sae_not_collapsed: collapsed at step 40"]}


# --- what a reader sees: the report inline, labelled points, rounded numbers, durations ----------------------


def test_report_inline_embeds_each_plot_it_links(planted: pl.DataFrame, tmp_path: Path) -> None:
    logs = {r["key"]: pl.DataFrame({"tokens": [0, 10], "l0": [5.0, 4.0], "dead_fraction": [0.0, 0.1],
                                    "loss": [1.0, 0.5]}) for r in planted_rows()}
    report = build_sweep_report(planted, tmp_path, sweep_name="planted", training_logs=logs)
    on_disk, inline = report.report_path.read_text(), report_with_inline_plots(report)
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", on_disk)
    assert sorted(linked) == sorted(p.name for p in (report.plot_path, report.box_plot_path,
                                                      report.curves_plot_path))
    embedded = re.findall(r"!\[[^\]]*\]\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", inline)
    assert [base64.b64decode(data) for data in embedded] == [(tmp_path / name).read_bytes() for name in linked]
    assert not re.search(r"\]\([^)]+\.png\)", inline)  # no link left that needs the folder
    assert re.sub(r"\(data:image/png;base64,[^)]+\)", "(x)", inline) == re.sub(r"\([^)]+\.png\)", "(x)", on_disk)


def _texts(table: pl.DataFrame) -> set[str]:
    return {text.get_text() for text in l0_fvu_figure(table, "s").axes[0].texts}


def test_pareto_plot_names_its_points_and_only_the_front_when_crowded(planted: pl.DataFrame,
                                                                       tmp_path: Path) -> None:
    report = build_sweep_report(planted, tmp_path)
    table = pl.read_parquet(report.table_path)
    assert _texts(table) == set(planted["key"])
    crowded_rows = [{**row, "key": f"{row['key']}_{i}", "l0": row["l0"] * (1 + i / 100)}
                    for i in range(3) for row in planted_rows()]
    assert len(crowded_rows) > MAX_POINT_LABELS
    crowded = pl.read_parquet(build_sweep_report(pl.DataFrame(crowded_rows), tmp_path / "crowded").table_path)
    expected = brute_force_front(crowded_rows)
    assert _texts(crowded) == expected and 0 < len(expected) < len(crowded_rows)


def test_pareto_labels_of_close_points_do_not_overlap(tmp_path: Path) -> None:
    """Seven configs at the same L0 and FVU within 0.01 (as the default sweep's two k32 TopKs at L0 32), on an
    axis that two more configs stretch: every
    label, measured on the saved figure, keeps clear of the others and stays joined to its point."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    from sae_pipeline.plots import figure_png

    close = [{"key": f"topk_exp{2 ** i}_k32_lr4e-03_aux3e-02_he16fba", "architecture": "topk", "k": 32,
              "l0": 32.0, "fvu": 0.130 - i * 0.0015, "dead_fraction": 0.01} for i in range(7)]
    far = [{"key": f"topk_exp4_k{k}_lr4e-03_aux3e-02_he16fba", "architecture": "topk", "k": k, "l0": float(k),
            "fvu": fvu, "dead_fraction": 0.01} for k, fvu in ((8, 0.45), (64, 0.04))]  # the axis spans 0.04-0.45
    runs = pl.DataFrame(close + far)
    table = pl.read_parquet(build_sweep_report(runs, tmp_path).table_path)
    fig = l0_fvu_figure(table, "close")
    figure_png(fig)  # laid out as it is saved
    renderer = FigureCanvasAgg(fig).get_renderer()
    labels = fig.axes[0].texts
    for label in labels:
        label.update_positions(renderer)
    boxes = [Text.get_window_extent(label, renderer) for label in labels]  # the text, without its leader line
    assert sorted(label.get_text() for label in labels) == sorted(runs["key"])
    assert not [(a, b) for a in range(len(boxes)) for b in range(a + 1, len(boxes)) if boxes[a].overlaps(boxes[b])]
    assert all(label.arrow_patch is not None for label in labels)  # each has its leader line


def test_report_numbers_are_rounded_and_wall_time_reads_as_a_duration(tmp_path: Path) -> None:
    runs = pl.DataFrame([{"key": "a", "architecture": "relu", "l1_alpha": 0.1 + 0.2, "l0": 10.123456789,
                          "fvu": 0.020833333333333332, "dead_fraction": 0.1, "wall_seconds": 280.32290581000007},
                         {"key": "b", "architecture": "relu", "l1_alpha": 1.0, "l0": 5.0, "fvu": 0.3,
                          "dead_fraction": 0.2, "wall_seconds": 3725.0}])
    report = build_sweep_report(runs, tmp_path)
    text = report.report_path.read_text()
    assert "0.02083" in text and "10.12" in text and "0.3 (" in text  # l1_alpha 0.30000000000000004 as 0.3
    assert "0.020833" not in text and "0.30000000000000004" not in text and "280.3" not in text
    assert "- Training wall time: 1h 6m 45s over 2 run(s); per run median 33m 23s, max 1h 2m 5s" in text
    assert "| 4m 40s |" in text  # the wall time column of the config tables
    table = pl.read_parquet(report.table_path)  # the file keeps full precision
    assert table.filter(pl.col("key") == "a")["wall_seconds"][0] == 280.32290581000007


def test_reader_numbers_and_durations() -> None:
    assert round_significant(0.020833333333333332) == 0.02083 and round_significant(280.32290581000007) == 280.3
    assert rounded({"a": [0.123456, 2], "b": {"c": 1234567.0}, "d": "x"}) == {"a": [0.1235, 2],
                                                                             "b": {"c": 1235000.0}, "d": "x"}
    assert [format_duration(s) for s in (0.4213, 3.25, 42.4, 280.32, 3600.0, 7512.6)] == [
        "0.42s", "3.2s", "42s", "4m 40s", "1h 0m 0s", "2h 5m 13s"]
    with pytest.raises(ValueError, match="seconds: -1"):
        format_duration(-1)


@pytest.mark.parametrize("limit", range(150, 260))
def test_a_cut_table_stays_under_the_limit_with_the_line_break_the_cut_adds(limit: int) -> None:
    """Every limit a part can land on, its added line included (a part once reached the limit exactly)."""
    text = "## Table\n\n| a |\n|---|\n" + "".join(f"| {i:03d} |\n" for i in range(80)) + "\nafter\n"
    assert all(len(piece) < limit for _, piece in report_pieces(text, limit=limit))


def test_report_pieces_cut_at_headings_images_and_long_sections() -> None:
    header = "| a |\n|---|\n"
    rows = [f"| {i:03d} |\n" for i in range(30)]  # a 252-character table: 12 + 30 x 8
    items = [f"- item {i:02d}\n  wrapped\n" for i in range(12)]  # a 240-character list: 12 x 20
    text = ("# Report\n\nintro\n\n```\n# a comment, not a heading\n```\n"
            "## Plots\n\nbefore\n\n![plot](data:image/png;base64,AAAA)\n\nafter\n\n"
            "## Long\n\n" + "words " * 20 + "\n\n" + header + "".join(rows) + "\n" + "more " * 10 + "\n"
            "## List\n\n" + "".join(items) + "\n" + "prose " * 40 + "\n")
    pieces = report_pieces(text, limit=200)
    assert [title for title, _ in pieces] == ["Report", "Plots", "Plots (plot)", "Plots", "Long", "Long (cont.)",
                                              "Long (cont.)", "List", "List (cont.)", "List (cont.)"]
    assert pieces[0][1].endswith("# a comment, not a heading\n```\n")  # a fenced line is not a heading
    assert pieces[2][1] == "![plot](data:image/png;base64,AAAA)"
    # the table is cut between rows, each part under the header: 12 + 23 x 8 = 196 < 200
    assert pieces[5][1] == header + "".join(rows[:23]) + "\n"
    assert pieces[6][1] == header + "".join(rows[23:]) + "\n" + "more " * 10 + "\n"
    # the list is cut before an item (9 + 9 x 20 + 1 = 190 < 200), never inside one; prose over the limit stays whole
    assert pieces[7][1] == "## List\n\n" + "".join(items[:9]) + "\n"
    assert pieces[8][1] == "".join(items[9:]) + "\n"
    assert pieces[9][1] == "prose " * 40 + "\n"
    assert all(len(piece) < 200 for _, piece in pieces[:-1])
    rejoined = "".join(piece for _, piece in pieces).replace("\n" + header + "| 023", "| 023")
    assert rejoined.replace("\n\n- item 09", "\n- item 09") == text  # nothing lost or reordered
