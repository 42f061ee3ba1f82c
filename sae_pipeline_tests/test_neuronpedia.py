"""`sae-pipeline export-neuronpedia`: the files Neuronpedia's admin import reads, checked against the partition's
parquet tables read independently (pyarrow, not the exporter's polars)."""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from sae_pipeline import cli
from sae_pipeline.defs.assets import feature_labels, features, sae
from sae_pipeline.features import EXAMPLES_FILE, FEATURES_FILE, HIST_LOG10_EDGES
from sae_pipeline.labelling import LABELS_FILE
from sae_pipeline.neuronpedia import FEATURES_PER_BATCH, NeuronpediaSource, neuron_row, slug, write_export
from sae_pipeline_tests.conftest import Pipeline, tiny_topk

REQUIRED = {  # columns without a default in Neuronpedia's prisma schema (apps/webapp/prisma/schema.prisma)
    "features": {"modelId", "layer", "index"},
    "activations": {"id", "tokens", "index", "layer", "modelId", "maxValue", "maxValueTokenIndex", "minValue",
                    "values", "creatorId"},
    "explanations": {"id", "modelId", "layer", "index", "description", "authorId"},
    "source": {"id", "modelId", "setName", "creatorId"},
    "sourceset": {"modelId", "name", "description", "creatorName", "creatorId"},
    "model": {"id", "creatorId", "layers", "neuronsPerLayer", "owner"},
    "release": {"name", "description", "creatorName", "creatorId"},
}


def _read_jsonl_gz(path: Path) -> list[dict]:
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _table(folder: Path, table: str) -> dict[int, list[dict]]:
    """batch number -> its rows, for every features/activations/explanations batch file."""
    return {int(p.name.removeprefix("batch-").removesuffix(".jsonl.gz")): _read_jsonl_gz(p)
            for p in sorted((folder / table).glob("batch-*.jsonl.gz"))}


@pytest.fixture(scope="module")
def exported(pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory, monkeypatch_module) -> tuple[str, Path]:
    key = pipeline.register(tiny_topk(k=7))
    if not (pipeline.layout.labels_dir(key) / LABELS_FILE).exists():
        assert pipeline.materialize([sae, features, feature_labels], partition_key=key).success
    out = tmp_path_factory.mktemp("neuronpedia")
    monkeypatch_module.setenv("SAE_PIPELINE_ROOT", str(pipeline.root))
    monkeypatch_module.setenv("DAGSTER_HOME", str(out / "home"))
    assert cli.main(["export-neuronpedia", key, str(out / "export"), "--source-set", "res-test"]) == 0
    return key, out / "export"


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_layout_and_metadata_rows(exported, pipeline: Pipeline) -> None:
    key, out = exported
    cfg = json.loads((pipeline.layout.sae_dir(key) / "cfg.json").read_text())
    folder = out / slug(cfg["metadata"]["model"]) / f"{cfg['metadata']['layer']}-res-test"
    assert folder.is_dir() and [p.name for p in out.iterdir()] == [folder.parent.name]
    rows = {name: _read_jsonl(folder / f"{name}.jsonl") for name in ("release", "model", "sourceset", "source")}
    for name, (row,) in rows.items():
        assert REQUIRED[name] <= set(row), name
    assert rows["source"][0]["id"] == folder.name and rows["source"][0]["setName"] == "res-test"
    assert rows["source"][0]["saelensConfig"] == cfg and rows["model"][0]["dimension"] == cfg["d_in"]
    assert rows["sourceset"][0]["description"].endswith(f"at {cfg['hook_name']})")  # the hook the SAE reads
    assert {rows[n][0].get("modelId", rows[n][0].get("id")) for n in ("model", "sourceset", "source")} == {
        folder.parent.name}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 9)


def _source_folder(out: Path) -> Path:
    (model,) = out.iterdir()
    (source,) = model.iterdir()
    return source


def test_features_match_the_latents_table(exported, pipeline: Pipeline) -> None:
    key, out = exported
    folder = _source_folder(out)
    latents = pq.read_table(pipeline.layout.features_dir(key) / FEATURES_FILE).to_pylist()
    batches = _table(folder, "features")
    assert sorted(batches) == list(range(math.ceil(len(latents) / FEATURES_PER_BATCH))) and len(batches) > 1
    for batch, rows in batches.items():
        assert [int(r["index"]) for r in rows] == list(range(batch * FEATURES_PER_BATCH,
                                                            min(len(latents), (batch + 1) * FEATURES_PER_BATCH)))
    rows = [row for batch in sorted(batches) for row in batches[batch]]
    centres = [10 ** ((a + b) / 2) for a, b in zip(HIST_LOG10_EDGES[:-1], HIST_LOG10_EDGES[1:], strict=True)]
    for row, latent in zip(rows, latents, strict=True):
        assert REQUIRED["features"] <= set(row)
        assert (row["layer"], row["sourceSetName"]) == (folder.name, "res-test")
        assert row["maxActApprox"] == latent["max_activation"] and row["frac_nonzero"] == latent["frequency"]
        assert row["freq_hist_data_bar_heights"] == latent["hist_counts"]
        assert row["freq_hist_data_bar_values"] == pytest.approx(centres)
        assert latent["vocab_kind"] == "nearest_embedding" and row["pos_str"] == row["neg_values"] == []


def test_activations_are_the_top_and_quantile_examples(exported, pipeline: Pipeline) -> None:
    key, out = exported
    folder = _source_folder(out)
    peaks = {r["latent_id"]: r["max_activation"]
             for r in pq.read_table(pipeline.layout.features_dir(key) / FEATURES_FILE).to_pylist()}
    n_bands = json.loads((pipeline.layout.features_dir(key) / "features_meta.json").read_text())["n_bands"]
    examples = [e for e in pq.read_table(pipeline.layout.features_dir(key) / EXAMPLES_FILE).to_pylist()
                if e["kind"] in ("top", "quantile")]
    batches = _table(folder, "activations")
    rows = [row for batch in sorted(batches) for row in batches[batch]]
    for batch, part in batches.items():
        assert {int(r["index"]) // FEATURES_PER_BATCH for r in part} == {batch}
    assert len(rows) == len(examples) > 0 and len({r["id"] for r in rows}) == len(rows)
    by_place = {(int(r["index"]), r["dataIndex"], _rounded(r["binMin"])): r for r in rows}
    assert len(by_place) == len(rows)  # one row per (latent, token, band): the match below is one to one
    for example in examples:
        quantile = example["kind"] == "quantile"
        band_low = example["band"] * peaks[example["latent_id"]] / n_bands if quantile else None
        row = by_place[(example["latent_id"], f"{example['seq_id']}:{example['position']}", _rounded(band_low))]
        assert REQUIRED["activations"] <= set(row)
        assert row["tokens"] == example["tokens"] and row["values"] == example["token_activations"]
        assert row["maxValue"] == max(example["token_activations"]) >= example["activation"] > 0
        assert row["values"][row["maxValueTokenIndex"]] == row["maxValue"]
        assert row["values"][row["qualifyingTokenIndex"]] == pytest.approx(example["activation"], rel=1e-6)
        if quantile:
            assert row["binMin"] < example["activation"] <= row["binMax"] + 1e-9


def test_explanations_are_the_labels(exported, pipeline: Pipeline) -> None:
    key, out = exported
    labels = pq.read_table(pipeline.layout.labels_dir(key) / LABELS_FILE).to_pylist()
    batches = _table(_source_folder(out), "explanations")
    rows = {int(r["index"]): r for part in batches.values() for r in part}
    assert sorted(rows) == sorted(label["latent_id"] for label in labels) and rows
    for label in labels:
        row = rows[label["latent_id"]]
        assert REQUIRED["explanations"] <= set(row)
        assert row["description"] == label["label"] and label["labeller"] in row["notes"]


def test_logit_effects_become_positive_and_negative_logits(exported, pipeline: Pipeline, tmp_path: Path) -> None:
    key, _ = exported
    latent = pl.read_parquet(pipeline.layout.features_dir(key) / FEATURES_FILE).row(0, named=True)
    source = NeuronpediaSource(model_id="m", source_set="s", layer=3)
    assert neuron_row(latent, source)["pos_str"] == []  # nearest embeddings are not logits
    as_lm = {**latent, "vocab_kind": "logit_effect"}
    row = neuron_row(as_lm, source)
    assert (row["pos_str"], row["pos_values"]) == (latent["top_vocab_tokens"], latent["top_vocab_values"])
    assert (row["neg_str"], row["neg_values"]) == (latent["bottom_vocab_tokens"], latent["bottom_vocab_values"])


def test_a_partition_without_features_is_refused_by_name(pipeline: Pipeline, tmp_path: Path, monkeypatch,
                                                          capsys) -> None:
    monkeypatch.setenv("SAE_PIPELINE_ROOT", str(pipeline.root))
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "home"))
    assert cli.main(["export-neuronpedia", "topk_never_trained", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "topk_never_trained" in err and "materialise `features`" in err and not (tmp_path / "out").exists()


def test_without_labels_there_are_no_explanations(exported, pipeline: Pipeline, tmp_path: Path) -> None:
    key, _ = exported
    tables = [pl.read_parquet(pipeline.layout.features_dir(key) / name) for name in (FEATURES_FILE, EXAMPLES_FILE)]
    folder = write_export(*tables, None, 5, {"d_in": 384}, {}, NeuronpediaSource("m", "s", 3), tmp_path)
    assert sorted(p.name for p in folder.iterdir()) == ["activations", "features", "model.jsonl", "release.jsonl",
                                                         "source.jsonl", "sourceset.jsonl"]
