"""Grouped training: several configs in lockstep on one data stream equal each trained alone; one failing
config fails alone; groups are planned by batch size, seed and memory."""

from __future__ import annotations

import pytest
import torch

from sae_pipeline.config import ConfigError, SAEConfig
from sae_pipeline.saes.relu import ReluSAE
from sae_pipeline.training import CHECKPOINT_FILE, LOCKSTEP_BYTES, lockstep_batches, plan_groups, train_group, train_sae
from sae_pipeline_tests.synthetic import planted_sparse_data, write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")

RUN = dict(expansion_factor=4, batch_size=100, train_tokens=100 * 30, log_every=5, dead_tokens=400)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    data, _ = planted_sparse_data(4_500, 16, 32, 2, seed=4)
    return write_store(tmp_path_factory.mktemp("groups"), data[:4_000], data[4_000:], shard_tokens=500)


def _configs() -> list[SAEConfig]:
    return [SAEConfig(architecture="topk", k=2, **RUN),
            SAEConfig(architecture="batchtopk", k=3, lr=1e-3, **RUN),
            SAEConfig(architecture="relu", l1_alpha=0.5, **{**RUN, "train_tokens": 100 * 17}),  # ends early
            SAEConfig(architecture="topk", k=4, early_stop_window=3, early_stop_tolerance=0.5, **RUN)]


def _assert_same(a, b) -> None:
    for (name, p), q in zip(a.sae.state_dict().items(), b.sae.state_dict().values(), strict=True):
        assert torch.allclose(p, q, atol=1e-5, rtol=0), name
    assert a.metrics.equals(b.metrics)
    assert a.train_tokens == b.train_tokens


def test_a_config_trained_in_a_group_equals_it_trained_alone(store):
    cfgs = _configs()
    grouped = train_group(cfgs, store, "cpu")
    for cfg, result in zip(cfgs, grouped, strict=True):
        _assert_same(result, train_sae(cfg, store, "cpu"))
    assert grouped[2].train_tokens == 1700 and grouped[0].train_tokens == 3000  # each its own length
    assert grouped[3].train_tokens < 3000  # and its own early stop


def test_a_failing_config_fails_alone(monkeypatch, store):
    cfgs = _configs()[:3]
    original = ReluSAE.forward
    calls = {"n": 0}

    def fails_at_step_7(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise FloatingPointError("planted: the relu SAE diverged")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ReluSAE, "forward", fails_at_step_7)
    results = train_group(cfgs, store, "cpu")
    assert isinstance(results[2], FloatingPointError)
    monkeypatch.undo()
    for cfg, result in zip(cfgs[:2], results[:2], strict=True):
        _assert_same(result, train_sae(cfg, store, "cpu"))


def test_a_killed_group_resumes_each_config_exactly(store, tmp_path):
    cfgs = [SAEConfig(architecture="topk", k=2, checkpoint_every=10, **RUN),
            SAEConfig(architecture="relu", l1_alpha=0.5, checkpoint_every=10, **RUN)]
    dirs = [tmp_path / "a", tmp_path / "b"]
    uninterrupted = train_group(cfgs, store, "cpu")

    class Killed(BaseException):
        pass

    def kill_after_second_checkpoint(count={"n": 0}):  # noqa: B006 - a counter shared by both hooks
        count["n"] += 1
        if count["n"] == 4:
            raise Killed

    with pytest.raises(Killed):
        train_group(cfgs, store, "cpu", dirs, on_checkpoints=[kill_after_second_checkpoint] * 2)
    assert all((d / CHECKPOINT_FILE).exists() for d in dirs)
    resumed = train_group(cfgs, store, "cpu", dirs)
    assert [r.resumed_from_step for r in resumed] == [20, 20]
    for a, b in zip(resumed, uninterrupted, strict=True):
        _assert_same(a, b)


def test_configs_that_cannot_share_a_stream_are_refused(store):
    with pytest.raises(ConfigError, match="group: configs must share batch_size, seed"):
        train_group([SAEConfig(architecture="topk", k=2, **RUN),
                     SAEConfig(architecture="topk", k=2, **{**RUN, "batch_size": 50})], store, "cpu")


def test_plan_groups_by_stream_and_memory():
    a = SAEConfig(architecture="topk", k=2, batch_size=100)
    b = SAEConfig(architecture="topk", k=4, batch_size=100)
    c = SAEConfig(architecture="topk", k=2, batch_size=200)
    d = SAEConfig(architecture="topk", k=2, batch_size=100, seed=1)
    assert plan_groups([a, b, c, d], 16) == [[0, 1], [2], [3]]
    one = a.training_bytes(16)
    assert plan_groups([a, a, a], 16, memory_bytes=2 * one) == [[0, 1], [2]]  # split where it would not fit
    assert plan_groups([a, a, a], 16, memory_bytes=one // 2) == [[0], [1], [2]]


def test_a_group_reads_ahead_within_its_memory_bound() -> None:
    assert lockstep_batches(1024, 384, n_members=1) == 1  # alone: nothing read ahead
    assert lockstep_batches(1024, 384, n_members=5) == 8
    assert lockstep_batches(8192, 4096, n_members=5) == 1  # 128 MiB a batch: one at a time
    assert lockstep_batches(2048, 4096, n_members=2) == 2 == LOCKSTEP_BYTES // (2048 * 4096 * 4)  # 32 MiB each
