"""Cross-seed consistency: Hungarian-matched decoder cosines, pinned against brute force, and the report section."""

from __future__ import annotations

import itertools
import json

import polars as pl
import pytest
import torch

from sae_pipeline.analysis import build_sweep_report
from sae_pipeline.config import SAEConfig
from sae_pipeline.consistency import MATCH_THRESHOLD, decoder_match, seed_consistency, seed_group
from sae_pipeline.registry import store_configs
from sae_pipeline.results import SUMMARY_FILE, collect_runs
from sae_pipeline.storage import Layout
from sae_pipeline.training import train_sae
from sae_pipeline_tests.synthetic import planted_sparse_data, write_store


def brute_force_match(a: torch.Tensor, b: torch.Tensor, threshold: float) -> tuple[float, float]:
    """(mean cosine, share above threshold) of the best injective map of a's rows into b's, by enumeration."""
    a = a.double() / a.double().norm(dim=1, keepdim=True)
    b = b.double() / b.double().norm(dim=1, keepdim=True)
    cos = (a @ b.t()).tolist()
    best = max(itertools.permutations(range(len(b)), len(a)),
               key=lambda cols: sum(cos[i][j] for i, j in enumerate(cols)))
    matched = [cos[i][j] for i, j in enumerate(best)]
    return sum(matched) / len(matched), sum(c > threshold for c in matched) / len(matched)


def test_a_permuted_rescaled_decoder_matches_itself_fully():
    decoder = torch.randn(12, 5, generator=torch.Generator().manual_seed(0))
    permuted = decoder[torch.randperm(12, generator=torch.Generator().manual_seed(1))] * 3.0
    match = decoder_match(decoder, permuted)
    assert match.mean_cosine == pytest.approx(1.0, abs=1e-12)
    assert match.share_above == 1.0
    assert match.n_matched == 12


@pytest.mark.parametrize(("n_a", "n_b", "seed"), [(6, 6, 0), (6, 6, 1), (3, 6, 2), (7, 4, 3)])
def test_random_decoders_agree_with_brute_force(n_a, n_b, seed):
    generator = torch.Generator().manual_seed(seed)
    a, b = torch.randn(n_a, 4, generator=generator), torch.randn(n_b, 4, generator=generator)
    threshold = 0.5  # random 4-d rows: some pairs above, some below, so the share is not trivially 0 or 1
    match = decoder_match(a, b, threshold)
    # brute force maps the smaller side into the larger
    expected = brute_force_match(a, b, threshold) if n_a <= n_b else brute_force_match(b, a, threshold)
    assert match.mean_cosine == pytest.approx(expected[0], abs=1e-12)
    assert match.share_above == pytest.approx(expected[1])
    assert match.n_matched == min(n_a, n_b)


def test_random_decoders_in_high_dimension_are_far_from_consistent():
    generator = torch.Generator().manual_seed(0)
    match = decoder_match(torch.randn(64, 256, generator=generator), torch.randn(64, 256, generator=generator))
    assert match.mean_cosine < 0.35
    assert match.share_above == 0.0


def test_decoder_shapes_are_checked():
    with pytest.raises(ValueError, match="same d_in"):
        decoder_match(torch.randn(4, 3), torch.randn(4, 5))


def test_seed_group_ignores_only_the_seed():
    base = SAEConfig(architecture="topk", k=4, expansion_factor=2)
    assert seed_group(base.model_copy(update={"seed": 7})) == seed_group(base) == base.partition_key()
    assert seed_group(base.model_copy(update={"lr": 1e-3})) != seed_group(base)


@pytest.fixture(scope="module")
def two_seed_sweep(tmp_path_factory, one_torch_thread):
    """Three finished partitions on a planted store: one config at seeds 0 and 1, another at seed 0 only."""
    root = tmp_path_factory.mktemp("seeds")
    data, _ = planted_sparse_data(3_000, 8, 16, 2, seed=5)
    store = write_store(root / "activations", data[:2_600], data[2_600:], shard_tokens=1_000)
    layout = Layout(root)
    base = SAEConfig(architecture="topk", k=2, expansion_factor=2, batch_size=128, train_tokens=128 * 40,
                     lr=3e-3, lr_warmup_steps=5, log_every=10)
    configs = [base, base.model_copy(update={"seed": 1}), base.model_copy(update={"k": 3})]
    keys = store_configs(layout, configs)
    decoders = {}
    for key, cfg in zip(keys, configs, strict=True):
        sae = train_sae(cfg, store, device="cpu").sae
        folder = layout.sae_dir(key)
        folder.mkdir(parents=True)
        sae.save(folder, {"key": key})
        (folder / SUMMARY_FILE).write_text(json.dumps({"key": key, "config": cfg.model_dump(mode="json"),
                                                       "metrics": {"l0": 2.0}, "final_loss": 1.0}))
        decoders[key] = sae.W_dec.detach().clone()
    return layout, keys, decoders


def test_collect_runs_marks_seed_siblings_and_their_weights(two_seed_sweep):
    layout, keys, _ = two_seed_sweep
    runs, missing = collect_runs(layout, keys)
    assert missing == []
    by_key = {row["key"]: row for row in runs.iter_rows(named=True)}
    assert by_key[keys[0]]["seed_group"] == by_key[keys[1]]["seed_group"] != by_key[keys[2]]["seed_group"]
    assert [by_key[k]["seed"] for k in keys] == [0, 1, 0]
    assert by_key[keys[0]]["sae_dir"] == str(layout.sae_dir(keys[0]))
    assert by_key[keys[2]]["sae_dir"] is None  # a single seed: its weights are not pulled


def test_sweep_report_gains_the_cross_seed_section(two_seed_sweep, tmp_path):
    layout, keys, decoders = two_seed_sweep
    runs, _ = collect_runs(layout, keys)
    table = seed_consistency(runs)
    expected = decoder_match(decoders[keys[0]], decoders[keys[1]])
    assert table.height == 1
    row = table.row(0, named=True)
    assert row["group"] == keys[0] and row["seeds"] == [0, 1] and row["n_pairs"] == 1
    assert row["mean_matched_cosine"] == pytest.approx(expected.mean_cosine, abs=1e-6)
    assert row[f"share_above_{MATCH_THRESHOLD}"] == pytest.approx(expected.share_above)
    assert 0.0 < expected.mean_cosine < 1.0  # two seeds: close, not identical

    built = build_sweep_report(runs, tmp_path / "report")
    report = built.report_path.read_text()
    (group, figures), = built.seed_consistency.items()  # what the sweep_analysis metadata shows
    assert group == keys[0] and figures["seeds"] == [0, 1]
    assert figures["mean_matched_cosine"] == pytest.approx(expected.mean_cosine, abs=1e-6)
    assert "## Cross-seed consistency" in report
    section = report.split("## Cross-seed consistency", 1)[1]
    assert f"`{keys[0]}`" in section and f"{expected.mean_cosine:.4g}" in section
    assert f"`{keys[2]}`" not in section


def test_sweep_report_without_seed_siblings_has_no_section(tmp_path):
    runs = pl.DataFrame({"key": ["a"], "l0": [1.0], "fvu": [0.5], "dead_fraction": [0.0]})
    built = build_sweep_report(runs, tmp_path)
    assert "Cross-seed" not in built.report_path.read_text() and built.seed_consistency == {}
