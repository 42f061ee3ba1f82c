"""Small PNG plots for materialisation metadata and reports.

Figures are built as `matplotlib.figure.Figure` objects (Agg canvas, no pyplot state, nothing to close), so
plotting never touches a global backend or leaks figures in a long-running code server.
"""

from __future__ import annotations

import base64
import io

import polars as pl
from matplotlib.figure import Figure
from torch import Tensor


def training_curves_png(metrics: pl.DataFrame, title: str) -> bytes:
    """L0, dead fraction and loss against training tokens, one panel each."""
    fig = Figure(figsize=(11, 3), dpi=80)
    axes = fig.subplots(1, 3)
    for axis, column, label in zip(axes, ("l0", "dead_fraction", "loss"), ("L0 (train)", "dead fraction", "loss"),
                                   strict=True):
        axis.plot(metrics["tokens"].to_list(), metrics[column].to_list())
        axis.set_title(label)
        axis.set_xlabel("tokens")
        if column == "loss":
            axis.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    return figure_png(fig)


def feature_density_png(frequency: Tensor, title: str) -> bytes:
    """Histogram of log10(firing frequency) per latent on held-out tokens; never-firing latents in their own bar."""
    freq = frequency.double()
    fig = Figure(figsize=(6, 3), dpi=80)
    axis = fig.subplots()
    live = freq[freq > 0]
    if live.numel():
        axis.hist(live.log10().numpy(), bins=40, color="tab:blue", label="firing latents")
    n_dead = int((freq == 0).sum())
    axis.bar([axis.get_xlim()[0] if live.numel() else -6.0], [n_dead], width=0.15, color="tab:red",
             label=f"never fired ({n_dead})")
    axis.set_xlabel("log10 firing frequency (held-out tokens)")
    axis.set_ylabel("latents")
    axis.legend(fontsize=8)
    axis.set_title(title, fontsize=9)
    return figure_png(fig)


def figure_png(fig: Figure) -> bytes:
    """The figure, laid out, as PNG bytes."""
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def png_data_uri(png: bytes) -> str:
    """A PNG as a `data:` URI, which markdown renders in place of a file link (how Dagster shows images inline)."""
    return f"data:image/png;base64,{base64.b64encode(png).decode()}"


def png_markdown(png: bytes, alt: str) -> str:
    """Embed a PNG in markdown metadata as a data URI."""
    return f"![{alt}]({png_data_uri(png)})"
