"""`features` and `feature_labels` over several partitions in one run (`run-sweep`, an asset backfill): what the
partitions share is loaded once, and every partition still gets its own materialisation, metadata, check
evaluations, provenance and failure, with the same tables as a single-partition run."""

from __future__ import annotations

import hashlib

import dagster as dg
import polars as pl
import pytest
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from sae_pipeline.definitions import defs
from sae_pipeline.defs.assets import FEATURES_RUN_SIZE, SAE_RUN_SIZE, feature_labels, features, interpretation, sae
from sae_pipeline.defs.checks import FEATURES_CHECKS
from sae_pipeline.defs.jobs import sweep_job
from sae_pipeline.defs.staleness import is_current, stale_resolver
from sae_pipeline.features import FEATURES_FILE, features_summary
from sae_pipeline.labelling import LABELS_FILE
from sae_pipeline_tests.conftest import ALL_ASSETS, Pipeline, tiny_topk


def _ranged(pipeline: Pipeline, asset: dg.AssetsDefinition, keys: list[str]) -> dg.ExecuteInProcessResult:
    return dg.materialize(ALL_ASSETS, selection=[asset], instance=pipeline.instance, resources=pipeline.resources(),
                          tags={ASSET_PARTITION_RANGE_START_TAG: keys[0], ASSET_PARTITION_RANGE_END_TAG: keys[-1]},
                          raise_on_error=False)


def _materializations(pipeline: Pipeline, asset: str, key: str, run_id: str) -> list[dg.AssetMaterialization]:
    records = pipeline.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[key]), limit=10).records
    return [r.asset_materialization for r in records if r.run_id == run_id]


def _messages(pipeline: Pipeline, run_id: str) -> list[str]:
    return [entry.user_message for entry in pipeline.instance.all_logs(run_id)]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def trained(pipeline: Pipeline) -> list[str]:
    # configs no other test registers, so that their keys are consecutive partitions (one range)
    keys = [pipeline.register(tiny_topk(k=k, lr=1.3e-3, train_tokens=256 * 20)) for k in (3, 5, 7)]
    assert _ranged(pipeline, sae, keys).success
    return keys


def test_a_ranged_features_run_materialises_each_partition_with_its_own_checks(pipeline: Pipeline,
                                                                              trained: list[str],
                                                                              monkeypatch) -> None:
    loads = []
    for name in ("load_tokenizer", "load_vocab_matrix", "read_corpus"):
        original = getattr(interpretation, name)
        monkeypatch.setattr(interpretation, name,
                            lambda *args, _name=name, _original=original: loads.append(_name) or _original(*args))
    result = _ranged(pipeline, features, trained)
    assert result.success
    assert sorted(loads) == ["load_tokenizer", "load_vocab_matrix", "read_corpus"]  # once for the three partitions
    messages = _messages(pipeline, result.run_id)
    assert not [m for m in messages if "did not yield or return expected outputs" in m]
    logged = pipeline.instance.all_logs(result.run_id, of_type=dg.DagsterEventType.ASSET_CHECK_EVALUATION)
    evaluations = {(e.dagster_event.event_specific_data.partition, e.dagster_event.event_specific_data.check_name)
                   for e in logged}
    assert len(logged) == len(evaluations) == len(trained) * len(FEATURES_CHECKS)  # one per partition and check
    n_live = set()
    for key in trained:
        (materialization,) = _materializations(pipeline, "features", key, result.run_id)
        table = pl.read_parquet(pipeline.layout.features_dir(key) / FEATURES_FILE)
        assert materialization.metadata["n_live"].value == features_summary(table)["n_live"]
        assert {name for partition, name in evaluations if partition == key} == {s.name for s in FEATURES_CHECKS}
        n_live.add(materialization.metadata["n_live"].value)
        pages = list((pipeline.layout.features_dir(key) / "dashboard" / "latents").glob("*.html"))
        assert len(pages) == features_summary(table)["n_live"]
    resolver = stale_resolver(pipeline.instance, dg.Definitions(assets=ALL_ASSETS, resources=pipeline.resources()))
    assert all(is_current(resolver, "features", key) for key in trained)  # provenance as a single-partition run's

    # the same tables as a single-partition run of one of them
    before = _sha(pipeline.layout.features_dir(trained[1]) / FEATURES_FILE)
    assert pipeline.materialize([features], partition_key=trained[1]).success
    assert _sha(pipeline.layout.features_dir(trained[1]) / FEATURES_FILE) == before


def test_a_ranged_labels_run_reuses_the_features_pages_and_labels_each_partition(pipeline: Pipeline,
                                                                                 trained: list[str]) -> None:
    assert _ranged(pipeline, features, trained).success
    result = _ranged(pipeline, feature_labels, trained)
    assert result.success
    resolver = stale_resolver(pipeline.instance, dg.Definitions(assets=ALL_ASSETS, resources=pipeline.resources()))
    for key in trained:
        (materialization,) = _materializations(pipeline, "feature_labels", key, result.run_id)
        labels = pl.read_parquet(pipeline.layout.labels_dir(key) / LABELS_FILE)
        assert materialization.metadata["n_labelled"].value == len(labels) > 0
        assert is_current(resolver, "feature_labels", key)
        latent = labels["latent_id"][0]
        page = (pipeline.layout.labels_dir(key) / "dashboard" / "latents" / f"{latent}.html").read_text()
        unlabelled = (pipeline.layout.features_dir(key) / "dashboard" / "latents" / f"{latent}.html").read_text()
        assert 'class="label"' in page and "not labelled yet" not in page and "not labelled yet" in unlabelled
        assert f"<title>latent {latent} - labelled features {key}</title>" in page
        # everything after the label line is the features page's, shaded contexts included
        assert page.split("</p>", 4)[-1] == unlabelled.split("</p>", 4)[-1]


def test_a_failed_partition_fails_alone_in_ranged_features_and_labels(pipeline: Pipeline) -> None:
    healthy = pipeline.register(tiny_topk(k=4, lr=1.4e-3, train_tokens=256 * 20))
    untrained = pipeline.register(tiny_topk(k=6, lr=1.4e-3, train_tokens=256 * 20))
    assert pipeline.materialize([sae], partition_key=healthy).success
    keys = [healthy, untrained]
    result = _ranged(pipeline, features, keys)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_FAILURE)
    message = failure.step_failure_data.error.message
    assert "1 of 2 features partitions failed" in message and f"{untrained}: " in message
    assert healthy not in message.split("failed (the others")[1]
    assert len(_materializations(pipeline, "features", healthy, result.run_id)) == 1
    assert _materializations(pipeline, "features", untrained, result.run_id) == []

    labelled = _ranged(pipeline, feature_labels, keys)
    assert not labelled.success
    assert len(_materializations(pipeline, "feature_labels", healthy, labelled.run_id)) == 1
    assert _materializations(pipeline, "feature_labels", untrained, labelled.run_id) == []


def test_each_asset_backfills_in_its_own_runs_and_the_job_one_partition_per_run() -> None:
    """Dagster puts assets with equal backfill policies in one run, where a ranged step's downstream would be
    skipped (it yields per-partition materialisations, not an output); the job's own runs take the smallest."""
    policies = [asset.backfill_policy for asset in (sae, features, feature_labels)]
    assert [p.max_partitions_per_run if p else None for p in policies] == [SAE_RUN_SIZE, FEATURES_RUN_SIZE, None]
    assert len(set(policies)) == 3
    assert defs.resolve_job_def(sweep_job.name).backfill_policy.max_partitions_per_run == 1
