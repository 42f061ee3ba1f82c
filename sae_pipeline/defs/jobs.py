"""Jobs: prepare the activations once, train/describe/label one config partition, analyse the sweep."""

import warnings

import dagster as dg

from sae_pipeline.defs.assets import activations, calibration, corpus, feature_labels, features, sae, sweep_analysis

# Intended, so not a warning worth printing on every load: in an asset backfill `sae` trains up to SAE_RUN_SIZE
# partitions per run, `features` describes up to FEATURES_RUN_SIZE and `feature_labels` labels one per run; a job's
# own runs (job-page backfills included) take the smallest policy, one partition per run, so the three run together.
warnings.filterwarnings("ignore", message=r"Asset job \w+ materializes assets with varying BackfillPolicies")

prepare_job = dg.define_asset_job(
    "prepare_activations", selection=[corpus, activations],
    description="Tokenise the corpus and extract activations (unpartitioned; run once per model/layer).")

sweep_job = dg.define_asset_job(
    "train_sweep", selection=[sae, features, feature_labels],
    description="The main job: train, describe and label one SAE config partition (one run per key).")

analysis_job = dg.define_asset_job(
    "analyze_sweep", selection=[sweep_analysis, calibration],
    description="Write the sweep report over every finished partition, then the l1_alpha calibration report.")

ci_job = dg.define_asset_job(
    "ci_smoke", selection=[corpus, activations, sae, features, feature_labels, sweep_analysis],
    description="The whole graph for one (tiny) partition: pass --tags '{\"dagster/partition\": \"<key>\"}'.")
