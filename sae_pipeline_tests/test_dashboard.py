"""The static dashboard: HTML built from the tables (escaping, shading, links), a real partition through Dagster,
and headless Chromium loading the pages from disk (file://)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import polars as pl
import pytest

from sae_pipeline.dashboard import context_html, display_tokens, render_dashboard
from sae_pipeline.defs.assets import feature_labels, features, sae
from sae_pipeline.features import EXAMPLE_SCHEMA, FEATURE_SCHEMA
from sae_pipeline.markdown import round_significant
from sae_pipeline_tests.conftest import Pipeline, tiny_topk
from sae_pipeline_tests.webui import chromium


def _latent(latent_id: int, frequency: float, peak: float, tokens: list[str]) -> dict:
    return {"latent_id": latent_id, "frequency": frequency, "mean_activation": peak / 2, "max_activation": peak,
            "is_live": peak >= 1e-6, "top_activations": [peak] * len(tokens), "top_tokens": tokens,
            "top_contexts": tokens, "top_seq_ids": [0] * len(tokens), "top_positions": [1] * len(tokens),
            "hist_counts": [0] * 20 + [len(tokens)] + [0] * 19, "vocab_kind": "nearest_embedding",
            "top_vocab_tokens": ["near"], "top_vocab_values": [0.9], "bottom_vocab_tokens": ["far"],
            "bottom_vocab_values": [-0.3]}


@pytest.fixture
def hand_tables() -> tuple[pl.DataFrame, pl.DataFrame]:
    latents = pl.DataFrame([_latent(0, 0.01, 4.0, ["<script>"]), _latent(1, 0.3, 2.0, ["cat"]),
                            _latent(2, 0.0, 0.0, [])], schema=FEATURE_SCHEMA)
    examples = pl.DataFrame([
        {"latent_id": 0, "kind": "top", "band": -1, "rank": 0, "seq_id": 0, "position": 1, "activation": 4.0,
         "tokens": ["[CLS]", "<script>", "##s", "x"], "token_activations": [0.0, 4.0, 1.0, 0.0], "center": 1},
        {"latent_id": 1, "kind": "quantile", "band": 0, "rank": 0, "seq_id": 0, "position": 2, "activation": 0.2,
         "tokens": ["the", "cat"], "token_activations": [0.0, 0.2], "center": 1},
    ], schema=EXAMPLE_SCHEMA)
    return latents, examples


def test_tokens_read_as_text_and_are_shaded_by_activation():
    assert display_tokens(["[CLS]", "play", "##ing", "now"]) == ["[CLS]", " play", "ing", " now"]
    assert display_tokens(["The", "Ġcat", "Ġsat"]) == ["The", " cat", " sat"]
    html = context_html(["a", "<b>"], [1.0, 4.0], 1, 4.0)
    assert "rgba(255,120,0,0.250)" in html and "rgba(255,120,0,1.000)" in html
    assert "&lt;b&gt;" in html and "<b>" not in html and 'class="centre"' in html
    quiet = context_html(["[CLS]", "play", "##ing", "&", "now"], [0.0, 2.0, 0.0, 0.0, 0.0], 1, 2.0)
    assert quiet == ('[CLS]<span class="centre" style="background:rgba(255,120,0,1.000)" title="2"> play</span>'
                     "ing &amp; now")  # tokens where the latent is 0 are plain text
    assert context_html(["x", "y"], [0.0, 0.0], 0, 1.0) == '<span class="centre" title="0">x</span> y'


def test_render_writes_index_and_live_pages_only(hand_tables, tmp_path):
    latents, examples = hand_tables
    labels = pl.DataFrame({"latent_id": [0], "label": ["'<script>' & co"], "labeller": ["offline-top-tokens"],
                           "detection_accuracy": [0.75]})
    index = render_dashboard(latents, examples, tmp_path / "dash", "test <title>", labels=labels)
    assert sorted(p.name for p in (tmp_path / "dash" / "latents").iterdir()) == ["0.html", "1.html"]
    text = index.read_text()
    assert 'href="latents/0.html"' in text and 'href="latents/2.html"' not in text and "dead" in text
    assert "<script>alert" not in text and "&lt;script&gt;" in text and "test &lt;title&gt;" in text
    assert 'data-frequency="0.3"' in text and 'data-max_activation="4"' in text
    page = (tmp_path / "dash" / "latents" / "0.html").read_text()
    assert "&#x27;&lt;script&gt;&#x27; &amp; co" in page and ">0.75<" in page
    assert "Nearest token embeddings" in page and "<svg" in page
    unlabelled = (tmp_path / "dash" / "latents" / "1.html").read_text()
    assert "not labelled yet" in unlabelled and "band 0: activation in (0%, 20%] of max" in unlabelled


def test_a_labelled_dashboard_from_the_unlabelled_one_equals_one_rendered_whole(hand_tables, tmp_path):
    latents, examples = hand_tables
    labels = pl.DataFrame({"latent_id": [0, 1], "label": ["'<script>'", "cats"], "labeller": ["offline"] * 2,
                           "detection_accuracy": [0.75, None]})
    unlabelled = tmp_path / "features"
    render_dashboard(latents, examples, unlabelled, "features k")
    (unlabelled / "latents" / "1.html").unlink()  # a page missing there is rendered
    render_dashboard(latents, examples, tmp_path / "reused", "labelled k", labels=labels, reuse=unlabelled)
    render_dashboard(latents, examples, tmp_path / "whole", "labelled k", labels=labels)
    for name in ("index.html", "latents/0.html", "latents/1.html"):
        assert (tmp_path / "reused" / name).read_text() == (tmp_path / "whole" / name).read_text(), name
    assert (tmp_path / "reused" / "density.png").read_bytes() == (unlabelled / "density.png").read_bytes()


@pytest.fixture(scope="module")
def partition(pipeline: Pipeline) -> dict:
    key = pipeline.register(tiny_topk(k=4, lr=2e-3))
    result = pipeline.materialize([sae, features, feature_labels], partition_key=key)
    assert result.success
    meta = {}
    for node in ("features", "feature_labels"):
        (event,) = result.asset_materializations_for_node(node)
        meta[node] = {name: value.value for name, value in event.metadata.items()}
    return {"key": key, "meta": meta, "layout": pipeline.layout}


def test_partition_metadata_and_tables(partition):
    meta, layout, key = partition["meta"], partition["layout"], partition["key"]
    assert meta["features"]["vocab_projection"] == "nearest_embedding"
    assert Path(meta["features"]["dashboard_path"]).is_file()
    assert meta["features"]["top_latents"].startswith("| latent |")
    latents = pl.read_parquet(layout.features_dir(key) / "features.parquet")
    examples = pl.read_parquet(meta["features"]["examples_path"])
    assert dict(examples.schema) == EXAMPLE_SCHEMA and set(examples["kind"].unique()) == {"top", "quantile", "random"}
    assert (latents.filter(pl.col("is_live"))["top_vocab_tokens"].list.len() == 10).all()
    labels = pl.read_parquet(layout.labels_dir(key) / "labels.parquet")
    labels_meta = meta["feature_labels"]
    assert labels_meta["n_labelled"] == len(labels) == latents["is_live"].sum()
    scored = labels.filter(pl.col("detection_accuracy").is_not_null())
    assert labels_meta["n_scored"] == len(scored)
    if len(scored):
        assert labels_meta["mean_detection_accuracy"] == round_significant(scored["detection_accuracy"].mean())
        assert "**Best labelled**" in labels_meta["best_and_worst_scored"]


def _run_chromium(binary: str, profile: Path, *args: str) -> str:
    command = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
               "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_dashboard_in_headless_chromium(partition, tmp_path):
    binary = chromium()
    layout, key = partition["layout"], partition["key"]
    folder = layout.labels_dir(key) / "dashboard"
    labels = pl.read_parquet(layout.labels_dir(key) / "labels.parquet")
    latents = pl.read_parquet(layout.features_dir(key) / "features.parquet")
    index_url = (folder / "index.html").as_uri()

    dom = _run_chromium(binary, tmp_path / "profile1", "--dump-dom", index_url + "#sort=frequency")
    assert 'data-sorted-by="frequency"' in dom  # the sort script ran in the browser
    shown = [float(f) for f in re.findall(r'<tr data-latent_id="\d+" data-frequency="([^"]+)"', dom)]
    assert len(shown) == len(latents) and shown == sorted(shown, reverse=True)

    latent = labels.sort("max_activation", descending=True)["latent_id"][0]
    row = latents.filter(pl.col("latent_id") == latent).row(0, named=True)
    page_url = (folder / "latents" / f"{latent}.html").as_uri()
    page = _run_chromium(binary, tmp_path / "profile2", "--dump-dom", page_url)
    for token in list(dict.fromkeys(row["top_tokens"]))[:3]:
        assert f'<span class="tok">{token.replace("&", "&amp;").replace("<", "&lt;")}</span>' in page, token
    assert f"Latent {latent}" in page and 'class="label"' in page

    shot = tmp_path / "latent.png"
    _run_chromium(binary, tmp_path / "profile3", f"--screenshot={shot}", "--window-size=1200,900", page_url)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
