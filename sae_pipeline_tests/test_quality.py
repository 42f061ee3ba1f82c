"""The pure checks of `sae_pipeline.quality`, pinned against independent computations and the seeds' numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch
from safetensors.torch import load_file

from sae_pipeline import quality
from sae_pipeline.activation_scan import DUPLICATE_EXAMPLES, scan_activations
from sae_pipeline.activations import _exclude_outliers
from sae_pipeline.config import ConfigError
from sae_pipeline.quality import DEFAULT_THRESHOLDS, QualityThresholds, parse_thresholds
from sae_pipeline_tests.synthetic import write_store

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ----------------------------------------------------------------------------------------------- thresholds


def test_default_thresholds_are_the_seeds_numbers() -> None:
    t = DEFAULT_THRESHOLDS
    target = 0.05  # seed 003: "L0 sparsity converges to target +-2 % (e.g. 3 %-7 % for target = 5 %)"
    assert (t.l0_warn_low * target, t.l0_warn_high * target) == pytest.approx((0.03, 0.07))
    assert (t.l0_error_low * target, t.l0_error_high * target) == pytest.approx((0.01, 0.10))  # its red flags
    assert (t.dead_fraction_warn, t.dead_fraction_error) == (0.1, 0.9)
    assert t.live_threshold == 1e-6


def test_every_threshold_is_documented() -> None:
    undocumented = [name for name, info in QualityThresholds.model_fields.items() if not info.description]
    assert not undocumented


@pytest.mark.parametrize(("raw", "field"), [
    ({"dead_fraction_wran": 0.2}, "dead_fraction_wran"),
    ({"dead_fraction_warn": -0.1}, "dead_fraction_warn"),
    ({"outlier_norm_ratio": 1.0}, "outlier_norm_ratio"),
    ({"fvu_warn": 2.0}, "fvu_warn"),  # above fvu_error
    ({"l0_warn_low": 0.1}, "l0_error_low"),  # below l0_error_low
    ({"live_threshold": "tiny"}, "live_threshold"),
])
def test_bad_thresholds_are_rejected_naming_the_field(raw: dict, field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        parse_thresholds(raw)


def test_overrides_apply() -> None:
    assert parse_thresholds({"dead_fraction_warn": 0.2}).dead_fraction_warn == 0.2
    assert parse_thresholds(None) == DEFAULT_THRESHOLDS


# ---------------------------------------------------------------------------------------------- activations


def _planted_store(tmp_path):
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(300, 8, generator=generator) + 1.0
    train[5] = float("nan")
    train[7, 3] = float("inf")
    train[100:110] = 0.0  # 10 zero rows in shard 1 (rows 100..199): 10 %
    train[120:125] = 2.5  # 5 constant, non-zero rows in shard 1
    train[250] *= 1000.0  # an attention-sink-like outlier
    eval_ = torch.randn(50, 8, generator=generator) + 1.0
    return write_store(tmp_path / "acts", train, eval_, shard_tokens=100), train, eval_


def test_scan_counts_match_an_independent_count(tmp_path) -> None:
    store, train, eval_ = _planted_store(tmp_path)
    scan = scan_activations(store, chunk=37)  # chunks straddle rows of interest
    rows = np.concatenate([train.numpy(), eval_.numpy()]).astype(np.float64)
    files = [s.file for s in scan.shards]
    assert files == ["train_00000.safetensors", "train_00001.safetensors", "train_00002.safetensors",
                     "eval_00000.safetensors"]
    per_shard = np.split(rows, [100, 200, 300])
    for s, block in zip(scan.shards, per_shard, strict=True):
        assert s.n_tokens == len(block)
        assert s.n_nonfinite == int((~np.isfinite(block).all(axis=1)).sum())
        assert s.n_zero == int((block == 0).all(axis=1).sum())
        assert s.n_constant == int((block.max(axis=1) == block.min(axis=1)).sum())
    finite = rows[np.isfinite(rows).all(axis=1)]
    norms = np.linalg.norm(finite, axis=1)
    stats = scan.norm_stats()
    assert stats["median"] == pytest.approx(np.sort(norms)[(len(norms) - 1) // 2])  # torch: lower median
    assert stats["mean"] == pytest.approx(norms.mean()) and stats["std"] == pytest.approx(norms.std(ddof=1))
    assert stats["max"] == pytest.approx(norms.max())

    finite_check = quality.activations_finite(scan)
    assert not finite_check.passed and finite_check.severity == "ERROR"
    assert finite_check.metadata["n_nonfinite_tokens"] == 2
    assert finite_check.metadata["nonfinite_by_shard"] == {"train_00000.safetensors": 2}

    degenerate = quality.activations_not_degenerate(scan)
    assert not degenerate.passed and degenerate.severity == "ERROR"
    assert set(degenerate.metadata["degenerate_shards"]) == {"train_00001.safetensors"}
    assert degenerate.metadata["degenerate_shards"]["train_00001.safetensors"] == {
        "zero_fraction": 0.10, "constant_fraction": 0.15}

    outliers = quality.activations_norm_outliers(scan, n_excluded=3)
    limit = 10 * stats["median"]
    assert outliers.metadata["n_outlier_tokens"] == int((norms > limit).sum()) == 1
    assert outliers.metadata["outlier_norm_limit"] == pytest.approx(limit)
    assert outliers.metadata["n_excluded_at_extraction"] == 3
    assert not outliers.passed and outliers.severity == "WARN"  # 1/350 > 0.1 %
    assert quality.activations_norm_outliers(scan, parse_thresholds({"max_outlier_fraction": 0.01})).passed


def test_clean_store_passes_every_activation_check(tmp_path) -> None:
    generator = torch.Generator().manual_seed(1)
    store = write_store(tmp_path / "acts", torch.randn(200, 8, generator=generator),
                        torch.randn(40, 8, generator=generator), shard_tokens=64)
    scan = scan_activations(store)
    assert quality.activations_finite(scan).passed
    assert quality.activations_not_degenerate(scan).passed
    assert quality.activations_norm_outliers(scan).passed


def test_store_of_identical_rows_is_degenerate(tmp_path) -> None:
    row = torch.arange(8, dtype=torch.float32)  # not constant within the row, but every token is the same
    store = write_store(tmp_path / "acts", row.repeat(100, 1), row.repeat(20, 1), shard_tokens=64)
    outcome = quality.activations_not_degenerate(scan_activations(store))
    assert not outcome.passed and outcome.metadata["norms_all_equal"] is True
    assert not outcome.metadata["degenerate_shards"]


def test_sink_like_repeated_vector_fails_the_duplicates_check_with_its_positions(tmp_path) -> None:
    generator = torch.Generator().manual_seed(2)
    train, eval_ = torch.randn(200, 8, generator=generator), torch.randn(50, 8, generator=generator)
    sink = torch.randn(8, generator=generator)  # an ordinary-norm vector, not constant within the row
    planted = sorted(torch.randperm(250, generator=generator)[:75].tolist())  # 30 % of all rows, both splits
    rows = torch.cat([train, eval_])
    rows[planted] = sink
    store = write_store(tmp_path / "acts", rows[:200], rows[200:], shard_tokens=64)
    scan = scan_activations(store, chunk=29)
    assert quality.activations_not_degenerate(scan).passed  # what the existing checks see: nothing
    assert quality.activations_norm_outliers(scan).passed
    outcome = quality.activations_duplicates(scan)
    assert not outcome.passed and outcome.severity == "ERROR"
    assert outcome.metadata["n_duplicate_rows"] == 75 and outcome.metadata["largest_duplicate_group"] == 75
    assert outcome.metadata["duplicate_row_fraction"] == pytest.approx(0.3)
    examples = outcome.metadata["duplicate_positions"]
    assert len(examples) == DUPLICATE_EXAMPLES
    for example in examples:  # each names a planted row; write_store: 16 tokens per sequence, eval from seq 13
        train_split = example["shard"].startswith("train")
        in_split = int(example["shard"].split("_")[1].split(".")[0]) * 64 + example["row"]
        assert (0 if train_split else 200) + in_split in planted
        assert example["seq_id"] == (0 if train_split else 13) + in_split // 16
        assert example["position"] == in_split % 16
    graded = quality.activations_duplicates(scan, parse_thresholds({"duplicate_row_fraction_error": 0.5}))
    assert not graded.passed and graded.severity == "WARN"


def test_a_few_repeated_rows_pass_and_distinct_rows_are_not_duplicates(tmp_path) -> None:
    generator = torch.Generator().manual_seed(3)
    train = torch.randn(500, 8, generator=generator)
    train[10] = train[20]  # one pair: 2 of 600 rows = 0.33 %, under the 1 % warning
    store = write_store(tmp_path / "acts", train, torch.randn(100, 8, generator=generator), shard_tokens=128)
    outcome = quality.activations_duplicates(scan_activations(store))
    assert outcome.passed and outcome.metadata["n_duplicate_rows"] == 2
    assert sorted(e["row"] for e in outcome.metadata["duplicate_positions"]) == [10, 20]


def test_exclude_outliers_rewrites_shards_without_them(tmp_path) -> None:
    store, train, _ = _planted_store(tmp_path)
    folder = store.folder
    norms = train.norm(dim=-1)
    limit = 50.0
    kept, dropped = _exclude_outliers(folder, store.shards("train"), limit)
    assert dropped == int((norms > limit).sum()) == 2  # the 1000x row and the Inf row; NaN rows are kept
    remaining = torch.cat([load_file(str(folder / s["file"]))["activations"] for s in kept])
    expected = train[~(norms > limit)]
    assert torch.equal(remaining.nan_to_num(-7.0), expected.nan_to_num(-7.0))
    assert [s["n_tokens"] for s in kept] == [99, 100, 99]


# ------------------------------------------------------------------------------------------------------ sae


def _log(steps, l0, dead) -> pl.DataFrame:
    return pl.DataFrame({"step": steps, "l0": [float(v) for v in l0], "dead_fraction": [float(v) for v in dead]})


def test_collapse_found_at_seed_000_step() -> None:
    """Seed 000, iteration 3 (d_sae 8192): 'Step 12,000: 0.3 % L0, 7,647 dead (93 %) <- COLLAPSE'."""
    d_sae = 8192
    steps = [8000, 10000, 12000, 15000, 16000, 16700]
    l0 = [f * d_sae for f in (0.24, 0.034, 0.003, 0.008, 0.021, 0.013)]
    dead = [n / d_sae for n in (129, 1835, 7647, 7493, 7405, 7467)]
    outcome = quality.not_collapsed(_log(steps, l0, dead), d_sae)
    assert not outcome.passed and outcome.severity == "ERROR"
    assert outcome.metadata["collapsed_at_step"] == 12000  # live 545 < 0.25 x peak 8063, and stays below
    assert outcome.metadata["peak_live_latents"] == pytest.approx(8063)
    assert "collapsed at step 12000" in outcome.description


def test_recovered_dip_is_not_a_collapse() -> None:
    d_sae = 1000
    dead = [0.02, 0.05, 0.91, 0.92, 0.40, 0.30, 0.25]  # a resample brings the latents back
    outcome = quality.not_collapsed(_log(list(range(7)), [50] * 7, dead), d_sae)
    assert outcome.passed and outcome.metadata["collapsed_at_step"] == -1


def test_l0_collapse_alone_is_found() -> None:
    l0 = [100, 80, 60, 0.5, 0.4, 0.3]
    outcome = quality.not_collapsed(_log([10, 20, 30, 40, 50, 60], l0, [0.0] * 6), 1000)
    assert not outcome.passed and outcome.metadata["collapsed_at_step"] == 40


@pytest.mark.parametrize(("l0", "dead"), [
    pytest.param([0.0] * 4, [1.0] * 4, id="live latents peaked at 0"),
    pytest.param([math.nan] * 4, [math.nan] * 4, id="NaN training"),
    pytest.param([40.0, 45.0, math.nan, math.nan], [0.1, 0.1, math.nan, math.nan], id="NaN after a healthy start"),
])
def test_never_alive_or_nan_run_is_collapsed(l0: list[float], dead: list[float]) -> None:
    outcome = quality.not_collapsed(_log([10, 20, 30, 40], l0, dead), 1000)
    assert not outcome.passed and outcome.blocks
    assert outcome.metadata["collapsed_at_step"] in (10, 30)
    assert "collapsed at step" in outcome.description


@pytest.mark.parametrize(("value", "passed", "severity"), [
    (0.0, True, "WARN"), (0.1, True, "WARN"), (0.155, False, "WARN"), (0.72, False, "WARN"),
    (0.9, False, "WARN"), (0.97, False, "ERROR"), (math.nan, False, "ERROR"),
])
def test_dead_fraction_grading(value: float, passed: bool, severity: str) -> None:
    outcome = quality.dead_fraction(value)
    assert (outcome.passed, outcome.severity) == (passed, severity)
    assert outcome.metadata["warn_above"] == 0.1 and outcome.metadata["error_above"] == 0.9


def test_dense_fraction_matches_an_independent_count() -> None:
    generator = torch.Generator().manual_seed(3)
    frequency = torch.rand(1000, generator=generator, dtype=torch.float64) ** 6  # P(u^6 > 0.1) = 32 %
    expected = float((frequency.numpy() > 0.1).mean())
    outcome = quality.dense_fraction(frequency)
    assert outcome.metadata["dense_fraction"] == pytest.approx(expected)
    assert outcome.metadata["n_dense"] == int((frequency.numpy() > 0.1).sum())
    assert not outcome.passed and outcome.severity == "WARN"  # above 5 %, below 50 %
    assert quality.dense_fraction(frequency * 0.05).passed
    assert quality.dense_fraction(frequency ** 0.1).severity == "ERROR"


@pytest.mark.parametrize(("l0", "passed", "severity"), [
    (0.0419, True, "WARN"),  # seed 000 iteration 2's final 4.19 %: inside 3-7 %
    (0.03, True, "WARN"), (0.07, True, "WARN"),
    (0.0262, False, "WARN"),  # its second-half average: below the band, not far
    (0.0965, False, "WARN"),  # iteration 1's second half: above the band, under the 10 % red flag
    (0.113, False, "ERROR"),  # iteration 1's final 11.3 %: far above
    (0.0041, False, "ERROR"),  # seed 003's collapsed 0.41 %
    (math.nan, False, "ERROR"),
])
def test_l0_target_band_with_seed_numbers(l0: float, passed: bool, severity: str) -> None:
    outcome = quality.l0_in_target_band(l0, 0.05)
    assert (outcome.passed, outcome.severity) == (passed, severity)
    assert outcome.metadata["warn_band"] == pytest.approx([0.03, 0.07])


def test_l0_band_without_target_passes_and_says_so() -> None:
    outcome = quality.l0_in_target_band(0.5, None)
    assert outcome.passed and outcome.metadata["applicable"] is False


@pytest.mark.parametrize(("fvu", "passed", "severity"), [
    (0.2, True, "WARN"), (0.7, False, "WARN"), (1.3, False, "ERROR"), (math.inf, False, "ERROR"),
])
def test_fvu_bound(fvu: float, passed: bool, severity: str) -> None:
    outcome = quality.fvu_bound(fvu)
    assert (outcome.passed, outcome.severity) == (passed, severity)


def test_l0_rising_like_seed_003_fails_the_trend() -> None:
    """Seed 003's broken L1: 'L0 sparsity INCREASED from 11.86 % to 15.62 %'."""
    l0 = list(np.linspace(0.1186, 0.1562, 12) * 2048)
    outcome = quality.l0_trend(_log(list(range(100, 1300, 100)), l0, [0.0] * 12), "relu")
    assert not outcome.passed and outcome.severity == "WARN"
    assert outcome.metadata["window_rows"] == 3
    assert outcome.metadata["first_window_l0"] == pytest.approx(np.mean(l0[:3]))
    assert outcome.metadata["last_window_l0"] == pytest.approx(np.mean(l0[-3:]))


def test_l0_trend_judges_windows_not_single_steps() -> None:
    l0 = [50, 48, 45, 40, 36, 30, 25, 20, 18, 15, 14, 13, 12, 11, 10, 10, 9, 9, 9, 60.0]  # a spike at the end
    outcome = quality.l0_trend(_log(list(range(20)), l0, [0.0] * 20), "relu")
    assert outcome.passed  # last 5 rows average 19.4, first 5 average 43.8
    assert outcome.metadata["last_window_l0"] == pytest.approx(np.mean(l0[-5:]))
    assert quality.l0_trend(_log(list(range(20)), l0[::-1], [0.0] * 20), "relu").passed is False


def test_l0_trend_not_applicable_to_topk() -> None:
    outcome = quality.l0_trend(_log([1, 2, 3], [8, 9, 10], [0, 0, 0]), "topk")
    assert outcome.passed and outcome.metadata["applicable"] is False


def test_finite_weights_counts_per_tensor() -> None:
    state = {"W_enc": torch.ones(3, 4), "b_enc": torch.tensor([0.0, math.nan, math.inf, 1.0])}
    outcome = quality.finite_weights(state)
    assert not outcome.passed and outcome.metadata["nonfinite_by_tensor"] == {"W_enc": 0, "b_enc": 2}


# ------------------------------------------------------------------------------------------------- features


def _features(n: int = 6, **columns) -> pl.DataFrame:
    base = {"latent_id": list(range(n)), "frequency": [0.01 * i for i in range(n)],
            "mean_activation": [0.5 * i for i in range(n)], "max_activation": [1.0 * i for i in range(n)],
            "is_live": [i > 0 for i in range(n)],
            "top_contexts": [[] if i == 0 else [f"ctx [[{i}]]"] for i in range(n)]}
    return pl.DataFrame({**base, **columns}, schema_overrides={"top_contexts": pl.List(pl.String)})


def test_near_zero_maxima_block_labelling() -> None:
    table = _features(max_activation=[0.0] + [1e-16] * 4 + [2.0])
    outcome = quality.features_not_near_zero(table)
    assert not outcome.passed and outcome.severity == "ERROR"
    assert outcome.metadata["n_not_live"] == 5 and outcome.metadata["share_not_live"] == pytest.approx(5 / 6)
    assert quality.features_not_near_zero(_features()).passed  # 1 of 6 below 1e-6


def test_great_expectations_suite_passes_a_valid_table() -> None:
    outcome = quality.features_table_valid(_features())
    assert outcome.passed, outcome.description
    assert outcome.metadata["n_expectations"] == 11 and outcome.metadata["n_failed"] == 0


@pytest.mark.parametrize(("columns", "failed"), [
    ({"latent_id": [0, 1, 2, 3, 3, 5]}, "expect_column_values_to_be_unique(latent_id)"),
    ({"frequency": [0.0, None, 0.1, 0.1, 0.1, 0.1]}, "expect_column_values_to_not_be_null(frequency)"),
    ({"frequency": [0.0, 0.1, 1.5, 0.1, 0.1, 0.1]}, "expect_column_values_to_be_between(frequency)"),
    ({"frequency": [0.0, 0.1, -0.1, 0.1, 0.1, 0.1]}, "expect_column_values_to_be_between(frequency)"),
    ({"mean_activation": [0.0, 0.5, 3.0, 1.0, 1.0, 1.0]},
     "expect_column_pair_values_a_to_be_greater_than_b(max_activation)"),
    ({"mean_activation": [-1.0, 0.5, 1.0, 1.0, 1.0, 1.0]}, "expect_column_values_to_be_between(mean_activation)"),
    ({"top_contexts": [[], ["a"], [], ["c"], ["d"], ["e"]]}, "expect_column_values_to_be_in_set(live_has_contexts)"),
    ({"top_contexts": [[], ["a"], [""], ["c"], ["d"], ["e"]]}, "expect_column_values_to_be_in_set(live_has_contexts)"),
])
def test_great_expectations_suite_catches_each_fault(columns: dict, failed: str) -> None:
    outcome = quality.features_table_valid(_features(**columns))
    assert not outcome.passed and outcome.severity == "ERROR"
    assert list(outcome.metadata["failed_unexpected_counts"]) == [failed]
    assert outcome.metadata["failed_unexpected_counts"][failed] >= 1


# -------------------------------------------------------------------------------------------------- verdicts


def test_verdict_round_trip_blocks_only_on_error(tmp_path) -> None:
    assert quality.blocking_failures(tmp_path) == [f"no quality verdict at {tmp_path / 'quality.json'}: "
                                                   "materialise it first"]
    assert quality.blocking_failures(tmp_path, missing_ok=True) == []
    warn, fvu = quality.dead_fraction(0.5).named("sae_dead_fraction"), quality.fvu_bound(0.1).named("sae_fvu")
    quality.write_verdict(tmp_path, [warn, fvu])
    assert quality.blocking_failures(tmp_path) == []
    error = quality.dead_fraction(0.95).named("sae_dead_fraction")
    quality.write_verdict(tmp_path, [error, fvu])
    assert quality.blocking_failures(tmp_path) == [f"sae_dead_fraction: {error.description}"]
    verdict = json.loads((tmp_path / "quality.json").read_text())
    assert verdict["blocked"] is True
    assert verdict["checks"]["sae_dead_fraction"]["metadata"]["dead_fraction"] == 0.95


# ---------------------------------------------------------------------- outlier exclusion, through Dagster


def test_outlier_exclusion_drops_exactly_the_tokens_above_the_limit(pipeline, tmp_path) -> None:
    import shutil

    import dagster as dg

    from sae_pipeline.defs.assets import activations
    from sae_pipeline_tests.conftest import Pipeline

    pipe = Pipeline(tmp_path / "root", dg.DagsterInstance.ephemeral())
    shutil.copytree(pipeline.layout.corpus_dir, pipe.layout.corpus_dir)
    ratio = 1.05  # far below any real sink ratio, so that a good share of tokens goes
    config = {"ops": {"activations": {"config": {"shard_tokens": 1024, "exclude_norm_outliers": ratio}}}}
    result = pipe.materialize([activations], run_config=config)
    assert result.success

    def rows(folder, split):
        meta = json.loads((folder / "meta.json").read_text())
        tensors = [load_file(str(folder / s["file"])) for s in meta[f"{split}_shards"]]
        return torch.cat([t["activations"] for t in tensors]), torch.cat([t["locations"] for t in tensors]), meta

    full_train, _, _ = rows(pipeline.layout.activations_dir, "train")
    limit = ratio * full_train.norm(dim=-1).median().item()
    n_excluded = 0
    for split in ("train", "eval"):
        full, full_locs, _ = rows(pipeline.layout.activations_dir, split)
        kept, kept_locs, meta = rows(pipe.layout.activations_dir, split)
        keep = full.norm(dim=-1) <= limit
        assert torch.equal(kept_locs, full_locs[keep]) and torch.equal(kept, full[keep])
        n_excluded += int((~keep).sum())
    assert 0 < n_excluded < len(full_train)
    assert meta["n_excluded_outliers"] == n_excluded
    check = {e.check_name: e for e in result.get_asset_check_evaluations()}["activations_norm_outliers"]
    assert check.metadata["n_excluded_at_extraction"].value == n_excluded
    assert check.metadata["n_outlier_tokens"].value == 0  # nothing above 10 x median is left


# ------------------------------------------------------------------------------------------------- the table


def test_the_check_table_is_what_dagster_declares() -> None:
    from sae_pipeline.checks import CHECKS
    from sae_pipeline.defs.checks import ACTIVATIONS_CHECKS, FEATURES_CHECKS, SAE_CHECKS

    names = [check.name for check in CHECKS]
    assert len(set(names)) == len(names) and all(check.name.startswith(check.asset) for check in CHECKS)
    declared = {(spec.name, spec.asset_key.to_user_string(), spec.description)
                for spec in [*ACTIVATIONS_CHECKS, *SAE_CHECKS, *FEATURES_CHECKS]}
    assert declared == {(check.name, check.asset, check.description) for check in CHECKS}


def test_run_checks_names_each_finding_from_the_table_in_order() -> None:
    from sae_pipeline.checks import SAEEvidence, checks_of, run_checks
    from sae_pipeline.evaluation import REPORTED_METRICS, EvalMetrics

    values = dict.fromkeys(REPORTED_METRICS, 0.2) | {"dead_fraction": 0.95, "l0_fraction": 0.05, "n_tokens": 100}
    metrics = EvalMetrics(**values)
    frequency = torch.tensor([0.0, 0.3, 0.05, 0.0])
    log = _log(list(range(8)), [4, 4, 4, 4, 4, 4, 4, 4], [0.0] * 8)
    evidence = SAEEvidence({"W_dec": torch.ones(4, 2)}, log, 4, metrics, frequency, 0.05, "relu")
    outcomes = run_checks("sae", evidence, DEFAULT_THRESHOLDS)
    assert [o.name for o in outcomes] == [check.name for check in checks_of("sae")]
    by_name = {o.name: o for o in outcomes}
    direct = {"sae_dead_fraction": quality.dead_fraction(0.95), "sae_dense_fraction": quality.dense_fraction(frequency),
              "sae_fvu": quality.fvu_bound(0.2), "sae_l0_trend": quality.l0_trend(log, "relu")}
    for name, finding in direct.items():
        got = by_name[name]
        assert (got.passed, got.severity, got.description) == (finding.passed, finding.severity, finding.description)
    assert by_name["sae_dead_fraction"].blocks and not by_name["sae_fvu"].blocks


def test_several_stores_merge_into_one_outcome_per_check_failing_at_the_worst() -> None:
    from sae_pipeline.checks import merge_store_outcomes

    ok, warn = quality.dead_fraction(0.0).named("c"), quality.dead_fraction(0.5).named("c")
    error = quality.dead_fraction(0.95).named("c")
    alone = merge_store_outcomes({"a": [warn]})
    assert alone == [warn]
    (both_ok,) = merge_store_outcomes({"a": [ok], "b": [ok]})
    assert both_ok.passed and both_ok.severity == ok.severity and set(both_ok.metadata) == {"a", "b"}
    (one_warns,) = merge_store_outcomes({"a": [ok], "b": [warn]})
    assert not one_warns.passed and one_warns.severity == "WARN" and not one_warns.blocks
    (one_errs,) = merge_store_outcomes({"a": [warn], "b": [error]})
    assert one_errs.blocks and one_errs.description == f"a: {warn.description}; b: {error.description}"
