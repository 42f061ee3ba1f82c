"""The sweep report's real-task sections: first-letter absorption and k-sparse probing of each finished config
(summary.json's `tasks`, `eval_tasks`), with the probing accuracy against k of the top configs as a plot."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import polars as pl
from matplotlib.figure import Figure

from sae_pipeline.markdown import format_value
from sae_pipeline.plots import figure_png
from sae_pipeline.probing import PROBE_KS
from sae_pipeline.storage import write_bytes_atomic

PROBING_PLOT_NAME = "probing_vs_k.png"
PROBING_TOP_N = 5
"""Configs drawn in the probing plot: the best by mean k-sparse accuracy over the k."""
ABSORPTION_COLUMNS = ("absorption_rate", "absorption_fraction", "split_latents", "fvu", "l0")
ACCURACY_COLUMNS = tuple(f"probe_acc_k{k}" for k in PROBE_KS)
FAMILIES = {"first_letter": "first letter", "package": "package", "doctest": "doctest"}
"""The probing task families (`eval_tasks.TASK_FAMILIES`) and how the report names them."""
Name = Callable[[str], str]
"""How a rendition names a config (`analysis.ReportView.name`)."""


def _finite(value: object) -> bool:
    return isinstance(value, int | float) and math.isfinite(value)


def _scored(runs: pl.DataFrame, column: str) -> list[dict]:
    """The rows of `runs` with a finite `column` (none when the column is absent)."""
    if column not in runs.columns:
        return []
    return [row for row in runs.iter_rows(named=True) if _finite(row[column])]


def _table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def absorption_section(runs: pl.DataFrame, name: Name) -> str:
    """Every config with an absorption figure, the least absorbed first."""
    rows = sorted(_scored(runs, "absorption_rate"), key=lambda r: (r["absorption_rate"], r["key"]))
    parts = ["## First-letter absorption", "",
             "Chanin et al. 2024 with SAEBench's definitions (`sae_pipeline.absorption`), on single-token words "
             "of the model's vocabulary: absorption_rate is the share of words a letter probe finds positive whose "
             "main latents stay silent while another latent carries the probe direction (mean over letters); "
             "absorption_fraction counts partial absorption too; split_latents is the mean number of main "
             "latents beyond the first (feature splitting). Lower absorption is better.", ""]
    if not rows:
        return "\n".join([*parts, "No finished config has absorption figures (published before they existed)."])
    table = _table(["config", *ABSORPTION_COLUMNS],
                   [[name(r["key"]), *(format_value(r.get(c)) for c in ABSORPTION_COLUMNS)] for r in rows])
    return "\n".join([*parts, table])


def mean_accuracy(row: dict) -> float:
    """The mean of a config's k-sparse probing accuracies over PROBE_KS."""
    return sum(row[c] for c in ACCURACY_COLUMNS) / len(ACCURACY_COLUMNS)


def probing_rows(runs: pl.DataFrame) -> list[dict]:
    """Configs with every k-sparse accuracy, the best mean accuracy first."""
    rows = [r for r in _scored(runs, ACCURACY_COLUMNS[0]) if all(_finite(r.get(c)) for c in ACCURACY_COLUMNS)]
    return sorted(rows, key=lambda r: (-mean_accuracy(r), r["key"]))


def probing_section(runs: pl.DataFrame, name: Name, plot: Path | None) -> str:
    """Every config's k-sparse probing accuracy at each k, the ceiling and its floor; the plot of the top."""
    rows = probing_rows(runs)
    parts = ["## k-sparse probing", "",
             "SAEBench's `sparse_probing` protocol (`sae_pipeline.probing`) on tasks built offline: the first "
             "letter of vocabulary words, the standard-library package a corpus document comes from, whether a "
             "token is on a doctest (`>>>`) line. Test accuracy of a logistic probe on the k latents with the "
             "largest class mean difference, the mean over the three task families of each family's mean over its "
             "one-vs-rest tasks (as SAEBench averages each dataset, then the datasets); `random k=5` is the same "
             "probe on a randomly initialised SAE of the same shape (the floor).", ""]
    if not rows:
        return "\n".join([*parts, "No finished config has probing figures (published before they existed)."])
    ceilings = [r["probe_acc_dense"] for r in rows if _finite(r.get("probe_acc_dense"))]
    if ceilings:
        parts += [f"Ceiling, a probe on every dimension of the raw activations: {format_value(max(ceilings))}.",
                  ""]
    headers = ["config", *(f"k={k}" for k in PROBE_KS), "random k=5"]
    parts.append(_table(headers, [[name(r["key"]), *(format_value(r[c]) for c in ACCURACY_COLUMNS),
                                   format_value(r.get("probe_acc_random_k5"))] for r in rows]))
    parts += family_table(rows, name)
    if plot is not None:
        parts += ["", f"![probing accuracy vs k]({plot.name})"]
    return "\n".join(parts)


def family_table(rows: list[dict], name: Name) -> list[str]:
    """The 5-sparse accuracy per task family, each config's row in `rows`' order, and the family ceilings; no
    lines when the runs carry no family figures (published before they existed)."""
    columns = [f"probe_acc_k5_{family}" for family in FAMILIES]
    if not any(_finite(r.get(c)) for r in rows for c in columns):
        return []
    ceilings = ", ".join(f"{label} {format_value(rows[0].get(f'probe_acc_dense_{family}'))}"
                         for family, label in FAMILIES.items())
    return ["", "At k=5 by task family (ceilings: " + ceilings + "):", "",
            _table(["config", *FAMILIES.values()], [[name(r["key"]), *(format_value(r.get(c)) for c in columns)]
                                                    for r in rows])]


def write_probing_plot(runs: pl.DataFrame, path: Path) -> Path | None:
    """Accuracy against k of the PROBING_TOP_N best configs, each with its random-init floor dashed, and the
    dense ceiling; None (and no file) when no config has probing figures."""
    rows = probing_rows(runs)[:PROBING_TOP_N]
    if not rows:
        path.unlink(missing_ok=True)
        return None
    fig = Figure(figsize=(6.4, 4.0), dpi=90)
    ax = fig.subplots()
    for row in rows:
        line, = ax.plot(PROBE_KS, [row[c] for c in ACCURACY_COLUMNS], marker="o", linewidth=1.2, label=row["key"])
        floor = [row.get(f"probe_acc_random_k{k}") for k in PROBE_KS]
        if all(_finite(v) for v in floor):
            ax.plot(PROBE_KS, floor, linestyle="--", linewidth=0.8, color=line.get_color())
    ceiling = [r["probe_acc_dense"] for r in rows if _finite(r.get("probe_acc_dense"))]
    if ceiling:
        ax.axhline(max(ceiling), color="black", linewidth=0.8, linestyle=":", label="dense probe (ceiling)")
    ax.set_xscale("log")
    ax.set_xticks(PROBE_KS, [str(k) for k in PROBE_KS])
    ax.set_xlabel("k (latents in the probe)")
    ax.set_ylabel("mean test accuracy")
    ax.set_title("k-sparse probing (dashed: random-init SAE)")
    ax.legend(fontsize=6)
    write_bytes_atomic(path, figure_png(fig))
    return path


def task_sections(runs: pl.DataFrame, name: Name, plot: Path | None) -> str:
    """Both sections, for report.md or the UI."""
    if not runs.height:
        return ""
    return "\n" + absorption_section(runs, name) + "\n\n" + probing_section(runs, name, plot) + "\n"
