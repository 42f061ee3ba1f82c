"""A static HTML feature dashboard (SAEDashboard / Neuronpedia style) that opens from disk, no server.

Layout of a dashboard folder:
- `index.html`: every latent in one table (frequency, log10 frequency, max and mean activation, top tokens, and
  label and detection score once labelled), sortable by clicking a header or by opening `index.html#sort=<column>`
  (`frequency`, `max_activation`, `mean_activation`, `latent_id`, `score`); dead and near-zero latents are listed
  but have no page; `density.png` is the log10 feature-density histogram over latents.
- `latents/<id>.html`: one page per live latent: statistics, label and score, its log10 activation histogram
  (inline SVG), the vocabulary list (top/bottom logit effects or nearest embeddings), the top activating contexts
  and the quantile-band samples, each token shaded by the latent's activation on it (hover shows the value).

Every string from the data (tokens, labels, contexts) is HTML-escaped. Built by hand from string templates.
"""

from __future__ import annotations

import html
import math
from pathlib import Path

import polars as pl
import torch

from sae_pipeline.features import HIST_LOG10_EDGES
from sae_pipeline.plots import feature_density_png
from sae_pipeline.storage import write_bytes_atomic

INDEX_FILE = "index.html"
SORT_COLUMNS = ("latent_id", "frequency", "max_activation", "mean_activation", "score")

_STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
table{border-collapse:collapse;font-size:13px}td,th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:left}
th{cursor:pointer;background:#f4f4f4;position:sticky;top:0}th.num,td.num{text-align:right}
.ctx{font-family:ui-monospace,monospace;font-size:13px;line-height:1.9;margin:2px 0;white-space:pre-wrap}
.ctx span{border-radius:2px}.ctx .centre{outline:1px solid #c44}.val{color:#888;font-size:11px;margin-right:8px}
.tok{font-family:ui-monospace,monospace;background:#eef;padding:0 3px;margin:1px;display:inline-block}
.cols{display:flex;gap:2em;flex-wrap:wrap}h2{margin-top:1.4em;font-size:1.1em}.muted{color:#888}
"""

_SORT_SCRIPT = """
function sortBy(col){const body=document.querySelector('#latents tbody');
 const rows=[...body.rows];const num=r=>parseFloat(r.dataset[col]);
 rows.sort((a,b)=>col==='latent_id'?num(a)-num(b):(isNaN(num(b))?-Infinity:num(b))-(isNaN(num(a))?-Infinity:num(a)));
 rows.forEach(r=>body.appendChild(r));document.body.dataset.sortedBy=col;}
document.querySelectorAll('#latents th[data-sort]').forEach(th=>th.addEventListener('click',
 ()=>{sortBy(th.dataset.sort);history.replaceState(null,'','#sort='+th.dataset.sort);}));
const m=location.hash.match(/sort=([a-z_]+)/);if(m)sortBy(m[1]);
"""


def _esc(value: object) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def display_tokens(tokens: list[str]) -> list[str]:
    """Token strings as they read in text: WordPiece `##x` joins the previous token, BPE `Ġx`/`▁x` is ` x`."""
    bpe = any(t.startswith(("Ġ", "▁")) for t in tokens)
    out = []
    for index, token in enumerate(tokens):
        if bpe:
            out.append(token.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n"))
        elif token.startswith("##"):
            out.append(token[2:])
        else:
            out.append(token if index == 0 else " " + token)
    return out


def _shade(value: float, peak: float) -> str:
    alpha = 0.0 if peak <= 0 or value <= 0 else min(1.0, value / peak)
    return f"background:rgba(255,120,0,{alpha:.3f})"


def context_html(tokens: list[str], values: list[float], center: int, peak: float) -> str:
    """One context: each token a span shaded by the activation (title = value), the centre token outlined."""
    spans = []
    for index, (text, value) in enumerate(zip(display_tokens(tokens), values, strict=True)):
        cls = ' class="centre"' if index == center else ""
        spans.append(f'<span{cls} style="{_shade(value, peak)}" title="{value:.4g}">{_esc(text)}</span>')
    return "".join(spans)


def histogram_svg(counts: list[int], width: int = 420, height: int = 120) -> str:
    """Bars of the log10 activation histogram; x axis labelled with the log10 edges."""
    if not counts or not sum(counts):
        return '<p class="muted">no firing tokens</p>'
    used = [i for i, c in enumerate(counts) if c]
    lo, hi = max(0, used[0] - 1), min(len(counts), used[-1] + 2)
    shown, peak = counts[lo:hi], max(counts)
    bar = width / len(shown)
    bars = []
    for i, count in enumerate(shown):
        h = (height - 20) * count / peak
        left, right = HIST_LOG10_EDGES[lo + i], HIST_LOG10_EDGES[lo + i + 1]
        bars.append(f'<rect x="{i * bar:.1f}" y="{height - 20 - h:.1f}" width="{max(bar - 1, 1):.1f}" '
                    f'height="{h:.1f}" fill="#e67e22"><title>log10 activation [{left:g}, {right:g}): '
                    f'{count}</title></rect>')
    labels = (f'<text x="0" y="{height - 5}" font-size="10">1e{HIST_LOG10_EDGES[lo]:g}</text>'
              f'<text x="{width - 40}" y="{height - 5}" font-size="10">1e{HIST_LOG10_EDGES[hi]:g}</text>')
    return (f'<svg class="hist" width="{width}" height="{height}" role="img" '
            f'aria-label="log10 activation histogram">{"".join(bars)}{labels}</svg>')


def _page(title: str, body: str, script: str = "") -> str:
    tail = f"<script>{script}</script>" if script else ""
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{_STYLE}</style></head><body>{body}{tail}</body></html>\n")


def _distinct(tokens: list[str], n: int = 8) -> list[str]:
    return list(dict.fromkeys(tokens))[:n]


def _label_lookup(labels: pl.DataFrame | None) -> dict[int, dict]:
    if labels is None or labels.is_empty():
        return {}
    return {row["latent_id"]: row for row in labels.iter_rows(named=True)}


def _score_text(label_row: dict | None) -> str:
    if not label_row or label_row.get("detection_accuracy") is None:
        return ""
    return f"{label_row['detection_accuracy']:.2f}"


def latent_page(row: dict, examples: pl.DataFrame, label_row: dict | None, title: str, n_bands: int = 5) -> str:
    """The page of one latent (`row`: a latents-table row; `examples`: its rows of the examples table)."""
    peak = row["max_activation"]
    latent = row["latent_id"]
    parts = [f'<p><a href="../{INDEX_FILE}">&larr; all latents</a> &middot; {_esc(title)}</p>',
             f"<h1>Latent {latent}</h1>",
             f'<p>frequency <b>{row["frequency"]:.4g}</b> (log10 {math.log10(max(row["frequency"], 1e-12)):.2f})'
             f' &middot; max activation <b>{peak:.4g}</b> &middot; mean activation '
             f'<b>{row["mean_activation"]:.4g}</b></p>']
    if label_row:
        score = _score_text(label_row)
        parts.append(f'<p>label: <b class="label">{_esc(label_row["label"])}</b> <span class="muted">'
                     f'({_esc(label_row["labeller"])})</span>'
                     + (f' &middot; detection accuracy <b class="score">{score}</b>' if score else "") + "</p>")
    else:
        parts.append('<p class="muted">not labelled yet (run feature_labels)</p>')
    parts.append("<div class=cols><div><h2>Activation histogram (log10)</h2>"
                 + histogram_svg(row.get("hist_counts") or []) + "</div>")
    kind = row.get("vocab_kind") or "none"
    if kind != "none":
        heading = {"logit_effect": ("Top logit effects", "Bottom logit effects"),
                   "nearest_embedding": ("Nearest token embeddings", "Farthest token embeddings")}[kind]
        for name, caption in zip(("top", "bottom"), heading, strict=True):
            items = "".join(f'<tr><td><span class="tok">{_esc(t)}</span></td><td class="num">{v:.3f}</td></tr>'
                            for t, v in zip(row[f"{name}_vocab_tokens"], row[f"{name}_vocab_values"], strict=True))
            parts.append(f"<div><h2>{caption}</h2><table class='vocab'>{items}</table></div>")
    parts.append("</div>")
    tokens = " ".join(f'<span class="tok">{_esc(t)}</span>' for t in _distinct(row["top_tokens"]))
    parts.append(f'<h2>Top tokens</h2><p class="top-tokens">{tokens}</p>')
    for kind_name, heading in (("top", "Top activating contexts"), ("quantile", "Quantile samples")):
        subset = examples.filter(pl.col("kind") == kind_name).sort(["band", "rank"], descending=[True, False])
        if subset.is_empty():
            continue
        parts.append(f"<h2>{heading}</h2>")
        band = None
        for ex in subset.iter_rows(named=True):
            if kind_name == "quantile" and ex["band"] != band:
                band = ex["band"]
                parts.append(f'<p class="muted">band {band}: activation in ({band / n_bands:.0%}, '
                             f"{(band + 1) / n_bands:.0%}] of max</p>")
            parts.append(f'<div class="ctx"><span class="val">{ex["activation"]:.3f}</span>'
                         f'{context_html(ex["tokens"], ex["token_activations"], ex["center"], peak)}</div>')
    return _page(f"latent {latent} - {title}", "".join(parts))


def index_page(latents: pl.DataFrame, labels: dict[int, dict], title: str, has_density: bool) -> str:
    headers = [("latent_id", "latent", True), ("frequency", "frequency", True), (None, "log10 freq", True),
               ("max_activation", "max activation", True), ("mean_activation", "mean activation", True),
               (None, "top tokens", False), (None, "label", False), ("score", "detection accuracy", True)]
    head = "".join(f'<th{" class=num" if num else ""}{f" data-sort={key}" if key else ""}>{_esc(text)}</th>'
                   for key, text, num in headers)
    rows = []
    ordered = latents.sort(["is_live", "max_activation"], descending=True)
    for row in ordered.iter_rows(named=True):
        latent, label_row = row["latent_id"], labels.get(row["latent_id"])
        score = _score_text(label_row)
        name = (f'<a href="latents/{latent}.html">{latent}</a>' if row["is_live"]
                else f'{latent} <span class="muted">{"dead" if row["frequency"] == 0 else "near-zero"}</span>')
        tokens = " ".join(f'<span class="tok">{_esc(t)}</span>' for t in _distinct(row["top_tokens"], 5))
        log_freq = f"{math.log10(row['frequency']):.2f}" if row["frequency"] > 0 else "-inf"
        rows.append(
            f'<tr data-latent_id="{latent}" data-frequency="{row["frequency"]:.8g}" '
            f'data-max_activation="{row["max_activation"]:.8g}" data-mean_activation="{row["mean_activation"]:.8g}"'
            f' data-score="{score or "nan"}"><td class=num>{name}</td><td class=num>{row["frequency"]:.4g}</td>'
            f'<td class=num>{log_freq}</td><td class=num>{row["max_activation"]:.4g}</td>'
            f'<td class=num>{row["mean_activation"]:.4g}</td><td>{tokens}</td>'
            f'<td>{_esc(label_row["label"]) if label_row else ""}</td><td class=num>{score}</td></tr>')
    n_live = int(latents["is_live"].sum())
    density = '<p><img src="density.png" alt="feature density histogram" height="220"></p>' if has_density else ""
    body = (f"<h1>{_esc(title)}</h1><p>{len(latents)} latents, {n_live} live. Click a header to sort "
            f"(or open <code>#sort=frequency</code>, <code>#sort=max_activation</code>).</p>{density}"
            f'<table id="latents"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    return _page(title, body, _SORT_SCRIPT)


def render_dashboard(latents: pl.DataFrame, examples: pl.DataFrame, folder: Path, title: str,
                     labels: pl.DataFrame | None = None, n_bands: int = 5) -> Path:
    """Write index.html, density.png and latents/<id>.html (live latents) into `folder`; returns the index path.

    `labels` (labels table with detection scores) adds each latent's label and score when given; `n_bands` is
    the number of quantile bands the examples were drawn with (for the band captions).
    """
    folder = Path(folder)
    lookup = _label_lookup(labels)
    by_latent = examples.partition_by("latent_id", as_dict=True) if not examples.is_empty() else {}
    empty = examples.clear()
    for row in latents.filter(pl.col("is_live")).iter_rows(named=True):
        latent = row["latent_id"]
        page = latent_page(row, by_latent.get((latent,), empty), lookup.get(latent), title, n_bands)
        write_bytes_atomic(folder / "latents" / f"{latent}.html", page.encode())
    has_density = bool((latents["frequency"] > 0).any())
    if has_density:
        frequency = torch.tensor(latents["frequency"].to_list(), dtype=torch.float64)
        write_bytes_atomic(folder / "density.png", feature_density_png(frequency, title))
    index = folder / INDEX_FILE
    write_bytes_atomic(index, index_page(latents, lookup, title, has_density).encode())
    return index
