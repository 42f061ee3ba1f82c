"""A static HTML feature dashboard (SAEDashboard / Neuronpedia style) that opens from disk, no server.

Layout of a dashboard folder:
- `index.html`: every latent in one table (frequency, log10 frequency, max and mean activation, top tokens, and
  label and detection score once labelled), sortable by clicking a header or by opening `index.html#sort=<column>`
  (`frequency`, `max_activation`, `mean_activation`, `latent_id`, `score`); dead and near-zero latents are listed
  but have no page; `density.png` is the log10 feature-density histogram over latents.
- `latents/<id>.html`: one page per live latent: statistics, label and score, its log10 activation histogram
  (inline SVG), the vocabulary list (top/bottom logit effects or nearest embeddings), the top activating contexts
  and the quantile-band samples, each token where the latent fires shaded by its activation (hover shows the
  value) and the centre token outlined.

The labelled dashboard (`feature_labels`) is the unlabelled one with each page's label line filled in. Every
string from the data (tokens, labels, contexts) is HTML-escaped. Built by hand from string templates, the
contexts column-wise in polars (a dashboard holds millions of tokens).
"""

from __future__ import annotations

import html
import math
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import torch

from sae_pipeline.features import HIST_LOG10_EDGES
from sae_pipeline.plots import feature_density_png
from sae_pipeline.storage import write_bytes_atomic

INDEX_FILE = "index.html"
DENSITY_FILE = "density.png"
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


def _display(token: pl.Expr, position: pl.Expr, bpe: bool) -> pl.Expr:
    """Token strings as they read in text: WordPiece `##x` joins the previous token (any other token after the
    first gets a space), byte-level BPE `Ġx` / SentencePiece `▁x` is ` x` and `Ċ` a newline."""
    if bpe:
        return token.str.replace_all("Ġ", " ", literal=True).str.replace_all("▁", " ", literal=True) \
            .str.replace_all("Ċ", "\n", literal=True)
    return pl.when(token.str.starts_with("##")).then(token.str.slice(2)).when(position == 0).then(token) \
        .otherwise(pl.lit(" ") + token)


def _is_bpe(tokens: pl.Series) -> bool:
    return bool((tokens.str.starts_with("Ġ") | tokens.str.starts_with("▁")).any())


def display_tokens(tokens: list[str]) -> list[str]:
    """One context's token strings as they read in text (see `_display`; BPE when any token is)."""
    column = pl.Series("token", tokens, dtype=pl.String())
    return pl.select(_display(pl.lit(column), pl.int_range(len(tokens)), _is_bpe(column))).to_series().to_list()


_ESCAPES = (["&", "<", ">", '"', "'"], ["&amp;", "&lt;", "&gt;", "&quot;", "&#x27;"])
"""What `html.escape(text, quote=True)` replaces, for polars' replace_many (one pass, so `&` is not escaped twice)."""


def _value_attributes(values: list[float], peaks: list[float]) -> list[str]:
    """The shade and title of tokens where the latent is not 0."""
    return [(f' style="background:rgba(255,120,0,{min(1.0, value / peak):.3f})"' if value > 0 and peak > 0 else "")
            + f' title="{value:.4g}"' for value, peak in zip(values, peaks, strict=True)]


def context_spans(tokens: pl.Series, values: pl.Series, centers: pl.Series, peaks: pl.Series, bpe: bool
                  ) -> list[str]:
    """Each context's HTML (list columns `tokens`, `values`; the centre index and the latent's max per context):
    a token where the latent fires is a span shaded by its activation over the max (title = value), the centre
    token a span outlined, and the others (most of a window) plain text, which keeps a dashboard of thousands of
    pages small. Built column-wise: a dashboard has millions of tokens."""
    lengths = tokens.list.len().to_numpy()
    starts = np.cumsum(lengths) - lengths
    flat = pl.DataFrame({"token": tokens.explode(empty_as_null=False),
                         "value": values.explode(empty_as_null=False).fill_null(0.0),
                         "position": np.arange(int(lengths.sum())) - np.repeat(starts, lengths),
                         "centre": np.repeat(centers.to_numpy(), lengths), "example": np.repeat(
                             np.arange(len(lengths)), lengths)})
    position, value = pl.col("position"), flat["value"].to_numpy()
    centre = (flat["position"] == flat["centre"]).to_numpy()
    marked = np.flatnonzero((value != 0) | centre)
    peak_of = np.repeat(peaks.to_numpy(), lengths)[marked]
    attributes = pl.repeat(None, len(flat), dtype=pl.String(), eager=True).scatter(
        marked, _value_attributes(value[marked].tolist(), peak_of.tolist()))
    text = _display(pl.col("token"), position, bpe).str.replace_many(*_ESCAPES)
    span = pl.concat_str([pl.lit("<span"), pl.when(position == pl.col("centre")).then(pl.lit(' class="centre"'))
                          .otherwise(pl.lit("")), pl.col("attributes"), pl.lit(">"), text, pl.lit("</span>")])
    spans = flat.with_columns(attributes=attributes).select(
        "example", span=pl.when(pl.col("attributes").is_null()).then(text).otherwise(span))
    joined = spans.group_by("example", maintain_order=True).agg(pl.col("span").str.join(""))
    out = [""] * len(lengths)
    for example, html_text in zip(joined["example"].to_list(), joined["span"].to_list(), strict=True):
        out[example] = html_text
    return out


def context_html(tokens: list[str], values: list[float], center: int, peak: float) -> str:
    """One context's HTML (see `context_spans`)."""
    column = pl.Series([tokens], dtype=pl.List(pl.String()))
    return context_spans(column, pl.Series([values], dtype=pl.List(pl.Float64())), pl.Series([center]),
                         pl.Series([peak]), _is_bpe(column.explode(empty_as_null=False)))[0]


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


def _page_start(title: str) -> str:
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_esc(title)}</title>'
            f"<style>{_STYLE}</style></head><body>")


_PAGE_END = "</body></html>\n"


def _page(title: str, body: str, script: str = "") -> str:
    tail = f"<script>{script}</script>" if script else ""
    return f"{_page_start(title)}{body}{tail}{_PAGE_END}"


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


UNLABELLED = '<p class="muted">not labelled yet (run feature_labels)</p>'
"""The label line of a latent page made before labelling; `render_dashboard(reuse=...)` puts the label there."""


def _latent_head(row: dict, title: str) -> str:
    """A latent page up to its label line: the document head, the back link and the statistics."""
    latent, peak = row["latent_id"], row["max_activation"]
    return (f"{_page_start(f'latent {latent} - {title}')}"
            f'<p><a href="../{INDEX_FILE}">&larr; all latents</a> &middot; {_esc(title)}</p>'
            f"<h1>Latent {latent}</h1>"
            f'<p>frequency <b>{row["frequency"]:.4g}</b> (log10 {math.log10(max(row["frequency"], 1e-12)):.2f})'
            f" &middot; max activation <b>{peak:.4g}</b> &middot; mean activation "
            f'<b>{row["mean_activation"]:.4g}</b></p>')


def _label_line(label_row: dict | None) -> str:
    if not label_row:
        return UNLABELLED
    score = _score_text(label_row)
    return (f'<p>label: <b class="label">{_esc(label_row["label"])}</b> <span class="muted">'
            f'({_esc(label_row["labeller"])})</span>'
            + (f' &middot; detection accuracy <b class="score">{score}</b>' if score else "") + "</p>")


def _latent_body(row: dict, examples: list[tuple], n_bands: int) -> str:
    """A latent page after its label line: histogram, vocabulary, top tokens and the shaded contexts
    (`examples`: its top then quantile rows as (kind, band, activation, context HTML), in display order)."""
    parts = ["<div class=cols><div><h2>Activation histogram (log10)</h2>"
             + histogram_svg(row.get("hist_counts") or []) + "</div>"]
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
    headings = {"top": "Top activating contexts", "quantile": "Quantile samples"}
    shown_kind, band = None, None
    for kind_name, ex_band, activation, context in examples:
        if kind_name != shown_kind:
            shown_kind = kind_name
            parts.append(f"<h2>{headings[kind_name]}</h2>")
        if kind_name == "quantile" and ex_band != band:
            band = ex_band
            parts.append(f'<p class="muted">band {band}: activation in ({band / n_bands:.0%}, '
                         f"{(band + 1) / n_bands:.0%}] of max</p>")
        parts.append(f'<div class="ctx"><span class="val">{activation:.3f}</span>{context}</div>')
    return "".join(parts) + _PAGE_END


def latent_page(row: dict, examples: list[tuple], label_row: dict | None, title: str, n_bands: int = 5) -> str:
    """The page of one latent (`row`: a latents-table row; `examples`: as `_latent_body` takes them)."""
    return _latent_head(row, title) + _label_line(label_row) + _latent_body(row, examples, n_bands)


def _relabelled(page: str, row: dict, label_row: dict | None, title: str) -> str | None:
    """An unlabelled page (from `features`) with this title and label; None when it has no label slot."""
    at = page.find(UNLABELLED)
    return None if at < 0 else _latent_head(row, title) + _label_line(label_row) + page[at + len(UNLABELLED):]


def _shown_examples(examples: pl.DataFrame, latents: pl.DataFrame) -> dict[int, list[tuple]]:
    """Each latent's top then quantile examples (bands highest first), in the order a page shows them, as
    (kind, band, activation, context HTML)."""
    shown = examples.filter(pl.col("kind").is_in(["top", "quantile"])).sort(
        ["latent_id", "kind", "band", "rank"], descending=[False, True, True, False]).join(
        latents.select("latent_id", "max_activation"), on="latent_id", how="left", maintain_order="left")
    contexts = context_spans(shown["tokens"], shown["token_activations"], shown["center"],
                             shown["max_activation"], _is_bpe(shown["tokens"].explode(empty_as_null=False)))
    by_latent: dict[int, list[tuple]] = {}
    for latent, kind, band, activation, context in zip(shown["latent_id"].to_list(), shown["kind"].to_list(),
                                                       shown["band"].to_list(), shown["activation"].to_list(),
                                                       contexts, strict=True):
        by_latent.setdefault(latent, []).append((kind, band, activation, context))
    return by_latent


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
    density = (f'<p><img src="{DENSITY_FILE}" alt="feature density histogram" height="220"></p>' if has_density
               else "")
    body = (f"<h1>{_esc(title)}</h1><p>{len(latents)} latents, {n_live} live. Click a header to sort "
            f"(or open <code>#sort=frequency</code>, <code>#sort=max_activation</code>).</p>{density}"
            f'<table id="latents"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>')
    return _page(title, body, _SORT_SCRIPT)


def render_dashboard(latents: pl.DataFrame, examples: pl.DataFrame, folder: Path, title: str,
                     labels: pl.DataFrame | None = None, n_bands: int = 5, reuse: Path | None = None) -> Path:
    """Write index.html, density.png and latents/<id>.html (live latents) into `folder`; returns the index path.

    `labels` (labels table with detection scores) adds each latent's label and score when given; `n_bands` is
    the number of quantile bands the examples were drawn with (for the band captions). `reuse`: an unlabelled
    dashboard of the same tables (the `features` one); its pages get the title and label instead of being
    rendered again (a latent without a page there is rendered), and its density plot is copied.

    `folder` is a fresh folder that `Layout.publish` swaps in whole, so the pages are plain writes, not each
    its own atomic, fsynced file: a dashboard is thousands of them.
    """
    folder = Path(folder)
    (folder / "latents").mkdir(parents=True, exist_ok=True)
    lookup = _label_lookup(labels)
    live = latents.filter(pl.col("is_live"))
    shown = None
    for row in live.iter_rows(named=True):
        latent = row["latent_id"]
        source = reuse / "latents" / f"{latent}.html" if reuse is not None else None
        page = _relabelled(source.read_text(), row, lookup.get(latent), title) if source and source.exists() else None
        if page is None:
            shown = _shown_examples(examples, latents) if shown is None else shown
            page = latent_page(row, shown.get(latent, []), lookup.get(latent), title, n_bands)
        (folder / "latents" / f"{latent}.html").write_bytes(page.encode())
    has_density = bool((latents["frequency"] > 0).any())
    if has_density and reuse is not None and (reuse / DENSITY_FILE).exists():
        shutil.copyfile(reuse / DENSITY_FILE, folder / DENSITY_FILE)  # labels do not change the densities
    elif has_density:
        frequency = torch.tensor(latents["frequency"].to_list(), dtype=torch.float64)
        write_bytes_atomic(folder / DENSITY_FILE, feature_density_png(frequency, title))
    index = folder / INDEX_FILE
    write_bytes_atomic(index, index_page(latents, lookup, title, has_density).encode())
    return index
