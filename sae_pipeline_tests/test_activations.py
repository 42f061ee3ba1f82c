"""Activation store: layout round trip, streaming, sampling, resumable batch order, corruption errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from sae_pipeline.activations import norm_statistics, split_sequences
from sae_pipeline.config import ActivationSpec, ConfigError
from sae_pipeline.store import ActivationStore, BatchSampler, Prefetcher, StoreError
from sae_pipeline_tests.synthetic import write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data(n, d=5, seed=0, offset=0.0):
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(n, d, generator=generator)
    rows[:, 0] = torch.arange(n, dtype=torch.float32) + offset  # unique id per row in column 0
    return rows


@pytest.fixture
def store(tmp_path):
    return write_store(tmp_path / "acts", _data(103), _data(37, seed=1, offset=10_000), shard_tokens=20)


def test_store_round_trip(store, tmp_path):
    train, eval_ = _data(103), _data(37, seed=1, offset=10_000)
    assert store.d_model == 5
    assert [s["n_tokens"] for s in store.shards("train")] == [20, 20, 20, 20, 20, 3]
    assert [s["n_tokens"] for s in store.shards("eval")] == [20, 17]
    assert store.n_tokens("train") == 103 and store.n_tokens("eval") == 37
    read_train = torch.cat([store.read("train", i) for i in range(6)])
    assert torch.equal(read_train, train)
    acts, locs = store.read("eval", 1, 3, 9, with_locations=True)
    assert torch.equal(acts, eval_[23:29])
    assert locs.dtype == torch.int32 and list(locs.shape) == [6, 2]
    reopened = ActivationStore(tmp_path / "acts")
    assert reopened.meta == store.meta


@pytest.mark.parametrize("chunk", [1, 7, 20, 64])
def test_iter_split_covers_each_eval_row_once_in_order(store, chunk):
    expected = _data(37, seed=1, offset=10_000)
    chunks = list(store.iter_split("eval", chunk))
    assert all(len(c) <= chunk for c in chunks)
    assert torch.equal(torch.cat(chunks), expected)
    with_locs = list(store.iter_split("eval", chunk, with_locations=True))
    assert torch.equal(torch.cat([a for a, _ in with_locs]), expected)
    assert len(torch.cat([loc for _, loc in with_locs])) == 37


def test_sample_returns_distinct_train_rows(store):
    train = _data(103)
    for n in (1, 10, 50, 103, 500):
        sample = store.sample(n, seed=n)
        assert len(sample) == min(n, 103)
        ids = sample[:, 0].tolist()
        assert len(set(ids)) == len(ids)
        for row in sample:
            assert torch.equal(train[int(row[0].item())], row)  # a real train row, never eval
    assert torch.equal(store.sample(10, seed=3), store.sample(10, seed=3))
    assert not torch.equal(store.sample(10, seed=3), store.sample(10, seed=4))
    eval_ids = store.sample(5, seed=0, split="eval")[:, 0]
    assert (eval_ids >= 10_000).all()


@pytest.mark.parametrize(("n_train", "shard", "batch"), [(60, 20, 10), (60, 20, 7), (103, 20, 16), (45, 15, 64)])
def test_batch_sampler_visits_every_row_once_per_epoch(tmp_path, n_train, shard, batch):
    store = write_store(tmp_path, _data(n_train), _data(5, seed=1), shard_tokens=shard)
    sampler = BatchSampler(store, batch, seed=1)
    n_batches = math.ceil(3 * n_train / batch)
    seen = torch.cat([sampler.next_batch() for _ in range(n_batches)])
    assert all(len(b) == batch for b in [seen[i: i + batch] for i in range(0, len(seen) - batch + 1, batch)])
    ids = seen[:, 0].long()
    for epoch in range(3):
        epoch_ids = ids[epoch * n_train: (epoch + 1) * n_train]
        if len(epoch_ids) == n_train:
            assert sorted(epoch_ids.tolist()) == list(range(n_train)), epoch
    first, second = ids[:n_train], ids[n_train: 2 * n_train]
    assert not torch.equal(first, torch.arange(n_train))  # shuffled
    assert not torch.equal(first, second)  # each epoch reshuffled
    for row in seen:
        assert torch.equal(_data(n_train)[int(row[0])], row)


def test_batch_sampler_batch_size_is_constant(tmp_path):
    store = write_store(tmp_path, _data(50), _data(5, seed=1), shard_tokens=20)
    sampler = BatchSampler(store, 16, seed=0)
    assert [len(sampler.next_batch()) for _ in range(12)] == [16] * 12


@pytest.mark.parametrize("stop_after", [1, 3, 5, 7])
def test_batch_sampler_resume_yields_same_batches(tmp_path, stop_after):
    store = write_store(tmp_path, _data(70), _data(5, seed=1), shard_tokens=20)
    reference = BatchSampler(store, 9, seed=5)
    expected = [reference.next_batch() for _ in range(20)]
    interrupted = BatchSampler(store, 9, seed=5)
    for _ in range(stop_after):
        interrupted.next_batch()
    state = json.loads(json.dumps(interrupted.state_dict()))  # what a checkpoint stores
    resumed = BatchSampler(ActivationStore(tmp_path), 9, seed=5)
    resumed.load_state_dict(state)
    for index in range(stop_after, 20):
        assert torch.equal(resumed.next_batch(), expected[index]), index


def test_batch_sampler_seed_changes_order(tmp_path):
    store = write_store(tmp_path, _data(60), _data(5, seed=1), shard_tokens=20)
    a = BatchSampler(store, 60, seed=0).next_batch()
    b = BatchSampler(store, 60, seed=1).next_batch()
    assert not torch.equal(a, b)
    assert torch.equal(a, BatchSampler(store, 60, seed=0).next_batch())


def test_truncated_shard_raises_store_error_naming_file(store, tmp_path):
    path = tmp_path / "acts" / "train_00002.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 50])
    with pytest.raises(StoreError, match="train_00002.safetensors"):
        ActivationStore(tmp_path / "acts")


def test_truncated_header_raises_store_error(store, tmp_path):
    path = tmp_path / "acts" / "eval_00001.safetensors"
    path.write_bytes(path.read_bytes()[:5])
    with pytest.raises(StoreError, match="eval_00001.safetensors"):
        ActivationStore(tmp_path / "acts")


def test_missing_shard_raises_store_error(store, tmp_path):
    (tmp_path / "acts" / "train_00005.safetensors").unlink()
    with pytest.raises(StoreError, match="train_00005.safetensors"):
        ActivationStore(tmp_path / "acts")


def test_meta_token_count_mismatch_raises_store_error(store, tmp_path):
    meta_path = tmp_path / "acts" / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["train_shards"][1]["n_tokens"] = 21
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(StoreError, match=r"train_00001\.safetensors: shape \[20, 5\] disagrees"):
        ActivationStore(tmp_path / "acts")


def test_missing_or_invalid_meta(tmp_path):
    with pytest.raises(StoreError, match="meta.json: missing"):
        ActivationStore(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(StoreError, match="meta.json: not valid JSON"):
        ActivationStore(tmp_path)


@pytest.mark.parametrize("n", [2, 3, 10, 101])
@pytest.mark.parametrize("fraction", [0.01, 0.1, 0.5, 0.89])
def test_split_sequences_never_one_sided(n, fraction):
    for seed in range(3):
        held_out = split_sequences(n, fraction, seed)
        assert 1 <= len(held_out) <= n - 1
        assert held_out <= set(range(n))
    assert split_sequences(n, fraction, 0) == split_sequences(n, fraction, 0)
    assert len(split_sequences(1000, 0.1, 0)) == 100


def test_split_sequences_needs_two():
    with pytest.raises(ConfigError, match="corpus: 1 sequence"):
        split_sequences(1, 0.5, 0)


def test_norm_statistics_against_numpy():
    rng = np.random.default_rng(0)
    acts = rng.normal(size=(501, 7)) * rng.uniform(0.1, 10, size=(501, 1))
    norms = np.linalg.norm(acts, axis=1)
    with_bad = torch.tensor(np.concatenate([norms, [np.nan, np.inf]]), dtype=torch.float32)
    stats = norm_statistics(with_bad, 7)
    reference = norms.astype(np.float32).astype(np.float64)
    assert stats["mean"] == pytest.approx(reference.mean(), rel=1e-12)
    assert stats["std"] == pytest.approx(reference.std(ddof=1), rel=1e-12)
    assert stats["min"] == pytest.approx(reference.min()) and stats["max"] == pytest.approx(reference.max())
    assert stats["median"] == pytest.approx(np.median(reference), rel=1e-12)  # odd count: unambiguous
    assert stats["scaling_factor"] == pytest.approx(math.sqrt(7) / reference.mean(), rel=1e-12)
    assert norm_statistics(torch.tensor([float("nan")]), 4)["scaling_factor"] == 1.0
    single = norm_statistics(torch.tensor([2.0]), 4)
    assert single["std"] == 0.0 and single["scaling_factor"] == pytest.approx(1.0)


def test_write_store_norm_stats_match_numpy(store):
    train = _data(103).numpy().astype(np.float64)
    mean = np.linalg.norm(train, axis=1).mean()
    assert store.meta["norm_stats"]["scaling_factor"] == pytest.approx(math.sqrt(5) / mean, rel=1e-6)
    assert store.meta["n_train_tokens"] == 103 and store.meta["n_eval_tokens"] == 37


# ---------------------------------------------------------------- mixing across shards, prefetch, 16-bit shards

def _distinct_sequences_per_batch(store: ActivationStore, sampler: BatchSampler, n_batches: int) -> float:
    """Mean number of distinct documents (sequence ids, from the shards' locations) per batch."""
    seq_of = {}
    for index in range(len(store.shards("train"))):
        acts, locs = store.read("train", index, with_locations=True)
        seq_of.update(zip(acts[:, 0].tolist(), locs[:, 0].tolist(), strict=True))
    counts = [len({seq_of[v] for v in sampler.next_batch()[:, 0].tolist()}) for _ in range(n_batches)]
    return sum(counts) / len(counts)


def test_batches_mix_many_documents_across_shards(tmp_path):
    """One shard holds whole documents in a row (16 tokens each here); drawing from one shard at a time, as the
    sampler did before, a batch of 64 sees at most the 8 documents of a 128-row shard."""
    store = write_store(tmp_path, _data(4096), _data(64, seed=1, offset=10_000), shard_tokens=128)
    one_shard = _distinct_sequences_per_batch(store, BatchSampler(store, 64, seed=0, mix_shards=1), 40)
    mixed = _distinct_sequences_per_batch(store, BatchSampler(store, 64, seed=0), 40)
    assert one_shard <= 8
    assert mixed > 3 * one_shard  # measured: 8.0 vs 51.8 distinct documents per batch
    print(f"distinct documents per batch of 64: one shard {one_shard:.1f}, mixed over 16 shards {mixed:.1f}")


def test_mixing_keeps_only_one_window_of_shards_open(tmp_path):
    store = write_store(tmp_path, _data(600), _data(20, seed=1, offset=10_000), shard_tokens=20)  # 30 shards
    sampler = BatchSampler(store, 50, seed=2, mix_shards=4)
    seen = torch.cat([sampler.next_batch() for _ in range(12)])  # one epoch
    assert sorted(seen[:, 0].tolist()) == list(range(600))
    _, window = sampler._window
    assert len(window.maps) <= 4  # memory: the window's shards, never the store


@pytest.mark.parametrize("depth", [0, 3])
@pytest.mark.parametrize("stop_after", [1, 5, 13])
def test_prefetcher_yields_the_samplers_batches_and_resumes_exactly(tmp_path, stop_after, depth):
    store = write_store(tmp_path, _data(150), _data(20, seed=1, offset=10_000), shard_tokens=20)
    reference = BatchSampler(store, 9, seed=5, mix_shards=3)
    expected = [reference.next_batch() for _ in range(25)]
    with Prefetcher(BatchSampler(store, 9, seed=5, mix_shards=3), depth=depth) as loader:
        got = [loader.next_batch() for _ in range(stop_after)]
        state = loader.state_dict()  # a thread is ahead; the state is the consumer's
    resumed = BatchSampler(ActivationStore(tmp_path), 9, seed=5, mix_shards=3)
    resumed.load_state_dict(state)
    with Prefetcher(resumed, depth=depth) as loader:
        got += [loader.next_batch() for _ in range(25 - stop_after)]
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_prefetcher_raises_the_threads_error(tmp_path):
    store = write_store(tmp_path, _data(60), _data(20, seed=1, offset=10_000), shard_tokens=20)
    (tmp_path / store.shards("train")[0]["file"]).write_bytes(b"")  # the shard vanishes under the run
    with Prefetcher(BatchSampler(store, 10, seed=0, mix_shards=3)) as loader, \
            pytest.raises(StoreError, match="train_00000.safetensors: cannot be memory-mapped"):
        loader.next_batch()


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_16_bit_shards_halve_the_files_and_read_back_as_float32(pipeline, tmp_path, dtype):
    from sae_pipeline.activations import extract_activations
    from sae_pipeline.corpus import read_corpus
    from sae_pipeline.model import load_model, load_tokenizer

    reference = ActivationStore(pipeline.layout.activations_dir)
    spec = ActivationSpec(shard_tokens=1024, dtype=dtype)  # as the session fixture's store, in 16 bits
    (meta,) = extract_activations(read_corpus(pipeline.layout), load_model(spec), load_tokenizer(spec), spec,
                                  tmp_path, spec.model)
    store = ActivationStore(tmp_path)
    assert meta["dtype"] == dtype and meta["n_tokens"] == reference.meta["n_tokens"]
    assert meta["norm_stats"] == reference.meta["norm_stats"]  # computed before the cast
    size = sum((tmp_path / s["file"]).stat().st_size for s in store.shards("train"))
    size_32 = sum((reference.folder / s["file"]).stat().st_size for s in reference.shards("train"))
    n = reference.n_tokens("train")
    assert size - 8 * n == pytest.approx((size_32 - 8 * n) / 2, rel=0.01)  # activations halve; locations stay
    rows, rows_32 = store.read("train", 0), reference.read("train", 0)
    assert rows.dtype == torch.float32
    tolerance = 2**-8 if dtype == "float16" else 2**-6  # relative precision of the 16-bit type
    assert torch.allclose(rows, rows_32, rtol=tolerance, atol=1e-3)
    picked = torch.tensor([5, 0, 17])
    assert torch.equal(store.gather("train", 0, picked), rows[picked])  # memory-mapped rows: the same values
